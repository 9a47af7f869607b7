/**
 * The README stays true to main.ts: every setting main.ts reads is one row of the configuration table (and every row
 * is a setting it reads), every `DIFY_APPS` field is in the fields table, and every link inside the README or to a
 * file of the repository leads somewhere.
 */
import assert from "node:assert/strict";

const ROOT = new URL("../", import.meta.url);

const README = await Deno.readTextFile(new URL("README.md", ROOT));
const MAIN = await Deno.readTextFile(new URL("main.ts", ROOT));

/** Environment variables that are not settings: one the Bun launcher passes its child, one Deno Deploy sets. */
const NOT_SETTINGS = new Set(["DIFY_OPENAI_LAUNCHER", "DENO_DEPLOYMENT_ID"]);

/** The text of a `## ` section of the README, up to the next one. */
function section(title: string): string {
  const start = README.indexOf(`\n## ${title}\n`);
  assert.ok(start >= 0, `README has a "${title}" section`);
  const end = README.indexOf("\n## ", start + 1);
  return README.slice(start, end < 0 ? undefined : end);
}

/** The first cells (in backticks) of a section's table rows, one entry per row. */
function firstCells(text: string): string[] {
  return [...text.matchAll(/^\| `([^`]+)` +\|/gm)].map((m) => m[1]);
}

/** The body of a top-level function of main.ts. */
function functionBody(name: string): string {
  const start = MAIN.search(new RegExp(`^(export )?function ${name}\\(`, "m"));
  assert.ok(start >= 0, `main.ts has function ${name}`);
  return MAIN.slice(start, MAIN.indexOf("\n}\n", start));
}

function settingsRead(): Set<string> {
  const names = new Set<string>();
  const reads = /\benv\.([A-Z][A-Z0-9_]+)|\(env, "([A-Z][A-Z0-9_]+)"|\bseconds\("([A-Z][A-Z0-9_]+)"/g;
  for (const m of MAIN.matchAll(reads)) names.add(m[1] ?? m[2] ?? m[3]);
  for (const name of NOT_SETTINGS) names.delete(name);
  return names;
}

Deno.test("readme: every setting main.ts reads is exactly one row of the configuration table, and no row is stale", () => {
  const rows = firstCells(section("Configuration")).filter((cell) => /^[A-Z][A-Z0-9_]+$/.test(cell));
  const read = settingsRead();
  for (const name of read) assert.equal(rows.filter((r) => r === name).length, 1, `${name}: one row`);
  for (const row of rows) assert.ok(read.has(row), `${row} is in the table but main.ts does not read it`);
});

Deno.test("readme: every DIFY_APPS field main.ts reads is a row of the fields table", () => {
  const fields = new Set([...functionBody("parseApps").matchAll(/\bspec\.([a-z_]+)/g)].map((m) => m[1]));
  const rows = firstCells(section("Configuration")).filter((cell) => /^[a-z_]+$/.test(cell));
  assert.ok(fields.size >= 7, `found ${[...fields]}`);
  for (const field of fields) assert.equal(rows.filter((r) => r === field).length, 1, `DIFY_APPS field ${field}`);
  for (const row of rows) assert.ok(fields.has(row), `field ${row} is in the table but parseApps does not read it`);
});

Deno.test("readme: links to sections and to files of the repository lead somewhere", async () => {
  const anchors = new Set(
    [...README.matchAll(/^#+ (.+)$/gm)].map((m) =>
      m[1].toLowerCase().replace(/[^\p{L}\p{N} _-]/gu, "").trim().replace(/ /g, "-")
    ),
  );
  for (const [, target] of README.matchAll(/\]\(#([^)]+)\)/g)) assert.ok(anchors.has(target), `#${target}`);
  for (const [, path] of README.matchAll(/\]\((?!#|https?:)([^)]+)\)/g)) {
    assert.ok(await Deno.stat(new URL(path, ROOT)).then(() => true, () => false), `${path} exists`);
  }
});
