// The ablation ladder (issue 13): the BYOB pass-through, then the proxy's per-request work added back
// one piece at a time (bench/ladder/rungs.ts), beside the pass-throughs and main.ts itself, all in
// one interleaved run: every row's server runs at once and the rows take turns, a few seconds each,
// round after round, so whatever else the machine does falls on all rows alike.
//
//   deno task ladder                          # 5 rounds x 4 s at c=32, then c=1 latency rounds
//   deno task ladder --rounds 3 --seconds 3 --rows byob,r0,r9,main
//
// Options:
//   --rounds N         throughput rounds (default 5); latency takes as many rounds
//   --seconds S        seconds per row per throughput round (default 4)
//   --latency-seconds S  seconds per row per latency round at c=1 (default 2)
//   --rows a,b,...     a subset of the rows (default: all; see ROWS)
//   --main FILE        the main.ts to run and to take the rungs' pieces from (default main.ts)
//   --before FILE      also run this older main.ts (default and CONVERSATION_MODE=off rows): before/after in one run
//   --events N         message events per answer (default 20)
//   --markdown FILE    also write the table to FILE
// Load: wrk (apt-get install wrk) when installed, else bench/load.ts (which costs more CPU per request).
// Nothing here asserts a time: it prints figures.

import { flags } from "../child.ts";
import { cpuMs } from "../http_client.ts";
import { LADDER } from "./rungs.ts";

const ROOT = new URL("../..", import.meta.url).pathname.replace(/\/$/, "");
const DENO = Deno.execPath();

interface Row {
  key: string;
  label: string;
  /** "openai": an OpenAI chat request; "responses": a Responses request; "dify": Dify's own (the pass-throughs). */
  kind: "openai" | "responses" | "dify";
  /** What the answer is: Dify's events copied, or OpenAI chunks (default: as `kind`). */
  answers?: "openai" | "dify";
  /** The request body, when it is not the kind's (`BODIES`). */
  body?: string;
  /** Scrape its `GET /metrics` once a second while it is under load. */
  scrape?: boolean;
  /** Runs `--before`'s main.ts: only when one is given. */
  before?: boolean;
  cmd: (o: Options) => string[];
  env?: (o: Options, dir: string, key: string) => Record<string, string>;
}

export interface Options {
  rounds: number;
  seconds: number;
  latencySeconds: number;
  rows?: string[];
  main: string;
  /** An older main.ts to run beside `main` (rows `main-before`, `main-off-before`). */
  before?: string;
  events: number;
  markdown?: string;
}

export const DEFAULTS: Options = { rounds: 5, seconds: 4, latencySeconds: 2, main: "main.ts", events: 20 };

function parseOptions(args: string[]): Options {
  const o: Options = { ...DEFAULTS };
  for (const [flag, value] of flags(args)) {
    if (flag === "--rounds") o.rounds = Number(value());
    else if (flag === "--seconds") o.seconds = Number(value());
    else if (flag === "--latency-seconds") o.latencySeconds = Number(value());
    else if (flag === "--rows") o.rows = value().split(",").map((s) => s.trim()).filter(Boolean);
    else if (flag === "--main") o.main = value();
    else if (flag === "--before") o.before = value();
    else if (flag === "--events") o.events = Number(value());
    else if (flag === "--markdown") o.markdown = value();
    else throw new Error(`unknown argument ${flag}`);
  }
  return o;
}

const mainUrl = (o: Options) => new URL(o.main, `file://${ROOT}/`).href;

/** Rung n: the first n features of rungs.ts switched on. */
function rung(n: number, features: readonly string[] = LADDER.slice(0, n), key = `r${n}`, label?: string): Row {
  return {
    key,
    label: label ?? (n === 0 ? "r0 BYOB copy, OpenAI request in" : `r${n} + ${LADDER[n - 1]}`),
    kind: "openai",
    answers: features.includes("translate") ? "openai" : "dify",
    cmd: () => [DENO, "run", "-A", `${ROOT}/bench/ladder/rungs.ts`],
    env: (o, dir) => ({
      LADDER_FEATURES: features.join(","),
      LADDER_MAIN: mainUrl(o),
      KV_PATH: `${dir}/${key}.kv`,
    }),
  };
}

const proxyEnv = (mode: string, metrics = "on") => (_o: Options, dir: string, key: string) => ({
  DIFY_API_KEY: "app-bench",
  KV_PATH: `${dir}/${key}.kv`,
  CONVERSATION_MODE: mode,
  METRICS: metrics,
  BUN_CONFIG_MAX_HTTP_REQUESTS: "2048",
});

export const ROWS: Row[] = [
  {
    key: "byob",
    label: "BYOB pass-through (Deno)",
    kind: "dify",
    cmd: () => [DENO, "run", "-A", `${ROOT}/bench/passthrough_byob.ts`],
  },
  {
    key: "js",
    label: "JS pass-through (Deno)",
    kind: "dify",
    cmd: () => [DENO, "run", "-A", `${ROOT}/bench/passthrough_js.ts`],
  },
  {
    key: "native",
    label: "native pass-through (Deno)",
    kind: "dify",
    cmd: () => [DENO, "run", "-A", `${ROOT}/bench/passthrough_native.ts`],
  },
  ...LADDER.map((_, i) => rung(i)),
  rung(LADDER.length),
  rung(0, [...LADDER, "push"], "push", "all pieces, free-running pump into a push stream"),
  {
    key: "main",
    label: "main.ts on Deno",
    kind: "openai",
    cmd: (o) => [DENO, "run", "-A", "--unstable-kv", o.main],
    env: proxyEnv("history"),
  },
  {
    key: "responses",
    label: "main.ts on Deno, POST /v1/responses",
    kind: "responses",
    cmd: (o) => [DENO, "run", "-A", "--unstable-kv", o.main],
    env: proxyEnv("history"),
  },
  {
    key: "responses-nostore",
    label: "main.ts on Deno, POST /v1/responses, store: false",
    kind: "responses",
    body: JSON.stringify({ model: "dify", stream: true, store: false, input: "hi" }),
    cmd: (o) => [DENO, "run", "-A", "--unstable-kv", o.main],
    env: proxyEnv("history"),
  },
  {
    key: "main-scraped",
    label: "main.ts on Deno, /metrics scraped every second",
    kind: "openai",
    cmd: (o) => [DENO, "run", "-A", "--unstable-kv", o.main],
    env: proxyEnv("history"),
    scrape: true,
  },
  {
    key: "main-nometrics",
    label: "main.ts on Deno, METRICS=off",
    kind: "openai",
    cmd: (o) => [DENO, "run", "-A", "--unstable-kv", o.main],
    env: proxyEnv("history", "off"),
  },
  {
    key: "main-off",
    label: "main.ts on Deno, CONVERSATION_MODE=off",
    kind: "openai",
    cmd: (o) => [DENO, "run", "-A", "--unstable-kv", o.main],
    env: proxyEnv("off"),
  },
  {
    key: "main-before",
    label: "main.ts before (--before) on Deno",
    kind: "openai",
    before: true,
    cmd: (o) => [DENO, "run", "-A", "--unstable-kv", o.before!],
    env: proxyEnv("history"),
  },
  {
    key: "responses-before",
    label: "main.ts before (--before) on Deno, POST /v1/responses",
    kind: "responses",
    before: true,
    cmd: (o) => [DENO, "run", "-A", "--unstable-kv", o.before!],
    env: proxyEnv("history"),
  },
  {
    key: "responses-nostore-before",
    label: "main.ts before (--before) on Deno, POST /v1/responses, store: false",
    kind: "responses",
    body: JSON.stringify({ model: "dify", stream: true, store: false, input: "hi" }),
    before: true,
    cmd: (o) => [DENO, "run", "-A", "--unstable-kv", o.before!],
    env: proxyEnv("history"),
  },
  {
    key: "main-off-before",
    label: "main.ts before (--before) on Deno, CONVERSATION_MODE=off",
    kind: "openai",
    before: true,
    cmd: (o) => [DENO, "run", "-A", "--unstable-kv", o.before!],
    env: proxyEnv("off"),
  },
  {
    key: "bun-js",
    label: "JS pass-through (Bun)",
    kind: "dify",
    cmd: () => ["bun", `${ROOT}/bench/passthrough_bun.ts`],
    env: () => ({ BUN_CONFIG_MAX_HTTP_REQUESTS: "2048" }),
  },
  {
    key: "bun",
    label: "main.ts on Bun",
    kind: "openai",
    cmd: (o) => ["bun", o.main],
    env: proxyEnv("history"),
  },
];

// ------------------------------------------------------------- processes --

interface Server {
  row: Row;
  child: Deno.ChildProcess;
  port: number;
  url: string;
  script: string;
  log: string;
  problem?: string;
}

const children = new Set<Deno.ChildProcess>();

function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

function spawn(cmd: string[], env: Record<string, string>, log: string): Deno.ChildProcess {
  const child = new Deno.Command("sh", {
    args: ["-c", 'exec "$@" >"$LADDER_LOG" 2>&1', "sh", ...cmd],
    cwd: ROOT,
    env: { ...env, LADDER_LOG: log, BENCH_PARENT_PID: String(Deno.pid) },
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  children.add(child);
  return child;
}

async function waitReady(url: string, log: string): Promise<void> {
  for (let i = 0; i < 300; i++) {
    try {
      const r = await fetch(url, { signal: AbortSignal.timeout(1000) });
      await r.body?.cancel();
      if (r.ok) return;
    } catch { /* not yet */ }
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error(`${url} not ready: ${await Deno.readTextFile(log).catch(() => "")}`);
}

function stopAll(): void {
  for (const c of children) {
    try {
      c.kill("SIGKILL");
    } catch { /* gone */ }
  }
}

// ------------------------------------------------------------------ load --

const OPENAI_BODY = JSON.stringify({ model: "dify", stream: true, messages: [{ role: "user", content: "hi" }] });
const DIFY_BODY = JSON.stringify({
  inputs: {},
  query: "hi",
  response_mode: "streaming",
  user: "bench",
  conversation_id: "",
});
/** The same question on each route: a Responses row and the chat row get the same answer from Dify. */
const BODIES: Record<Row["kind"], string> = {
  openai: OPENAI_BODY,
  responses: JSON.stringify({ model: "dify", stream: true, input: "hi" }),
  dify: DIFY_BODY,
};
const PATHS: Record<Row["kind"], string> = {
  openai: "/v1/chat/completions",
  responses: "/v1/responses",
  dify: "/v1/chat-messages",
};
const bodyOf = (row: Row) => row.body ?? BODIES[row.kind];
/** Rows compared with another row of the same run, round by round, under the table. */
const PAIRS: [string, string][] = [
  ["responses", "main"],
  ["responses-nostore", "main"],
  ["responses-before", "main-before"],
  ["responses-nostore-before", "main-before"],
];

interface Run {
  requests: number;
  seconds: number;
  p50Ms: number;
  errors: number;
}

const hasWrk = await new Deno.Command("sh", { args: ["-c", "command -v wrk"], stdout: "null", stderr: "null" })
  .output().then((o) => o.success, () => false);

function wrkScript(row: Row, dir: string): string {
  const body = bodyOf(row);
  const file = `${dir}/${row.key}.lua`;
  Deno.writeTextFileSync(
    file,
    `wrk.method = "POST"\nwrk.body = [[${body}]]\nwrk.headers["Content-Type"] = "application/json"\n` +
      `wrk.headers["Authorization"] = "Bearer app-bench"\n`,
  );
  return file;
}

const UNIT_MS: Record<string, number> = { us: 0.001, ms: 1, s: 1000, m: 60_000 };

async function load(s: Server, concurrency: number, seconds: number): Promise<Run> {
  if (hasWrk) {
    const out = await new Deno.Command("wrk", {
      args: ["-t1", `-c${concurrency}`, `-d${seconds}s`, "--latency", "-s", s.script, s.url],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(out.stdout);
    const done = /(\d+) requests in ([\d.]+)(\w+)/.exec(text);
    const p50 = /\n\s*50%\s+([\d.]+)(\w+)/.exec(text);
    const non2xx = Number(/Non-2xx or 3xx responses: (\d+)/.exec(text)?.[1] ?? 0);
    const socket = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(text);
    if (!done) throw new Error(`wrk failed on ${s.row.key}: ${text}${new TextDecoder().decode(out.stderr)}`);
    return {
      requests: Number(done[1]),
      seconds: Number(done[2]) * UNIT_MS[done[3]] / 1000,
      p50Ms: p50 ? Number(p50[1]) * UNIT_MS[p50[2]] : NaN,
      errors: non2xx + (socket ? socket.slice(1).reduce((a, b) => a + Number(b), 0) : 0),
    };
  }
  const out = await new Deno.Command(DENO, {
    args: [
      "run",
      "-A",
      `${ROOT}/bench/load.ts`,
      "--url",
      s.url,
      "--body",
      bodyOf(s.row),
      "--header",
      "authorization: Bearer app-bench",
      "--concurrency",
      String(concurrency),
      "--duration",
      String(seconds),
    ],
    stdout: "piped",
    stderr: "piped",
  }).output();
  const r = JSON.parse(new TextDecoder().decode(out.stdout).trim().split("\n").at(-1)!);
  return { requests: r.completed, seconds: r.elapsedMs / 1000, p50Ms: r.latencyP50Ms, errors: r.errors };
}

/** One `GET /metrics`, read to its end (a failed scrape is the row's problem). */
function scrape(s: Server): void {
  fetch(`http://127.0.0.1:${s.port}/metrics`).then(async (r) => {
    const text = await r.text();
    if (r.status !== 200 || !text.includes("dify_openai_requests_total")) s.problem = `metrics: HTTP ${r.status}`;
  }, (e) => s.problem = `metrics: ${e}`);
}

/** One answer, checked: 200, and every event of Dify's answer in it. */
async function validate(s: Server, events: number): Promise<string | undefined> {
  const r = await fetch(s.url, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer app-bench" },
    body: bodyOf(s.row),
  });
  const text = await r.text();
  if (r.status !== 200) return `HTTP ${r.status}: ${text.slice(0, 200)}`;
  if (s.row.kind === "responses") {
    const n = text.split('"delta":" word"').length - 1;
    if (n !== events) return `${n} output_text deltas, expected ${events}`;
    if (!text.includes("event: response.completed\n")) return "no response.completed event";
    return;
  }
  const openai = (s.row.answers ?? s.row.kind) === "openai";
  const n = text.split(openai ? '"content":" word"' : '"event":"message"').length - 1;
  if (n !== events) return `${n} content events, expected ${events}`;
  if (openai && !text.endsWith("data: [DONE]\n\n")) return "no data: [DONE] at the end";
}

// ------------------------------------------------------------------ main --

interface Tally {
  requests: number;
  seconds: number;
  cpuMs: number;
  rps: number[];
  /** CPU µs per request of the row's process, round by round. */
  cpuUs: number[];
  p50s: number[];
  errors: number;
  problem?: string;
}

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  return s.length ? (s[(s.length - 1) >> 1] + s[s.length >> 1]) / 2 : NaN;
};
const fmt = (x: number, digits = 0) =>
  Number.isFinite(x)
    ? x.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits })
    : "—";

export async function ladder(o: Options): Promise<string> {
  const rows = (o.rows ? o.rows.map((k) => ROWS.find((r) => r.key === k) ?? fail(`unknown row ${k}`)) : ROWS)
    .filter((r) => !r.before || o.before);
  const dir = await Deno.makeTempDir({ prefix: "dify-ladder-" });
  try {
    const difyPort = freePort();
    const difyLog = `${dir}/dify.log`;
    spawn(
      [
        DENO,
        "run",
        "-A",
        `${ROOT}/bench/dify_bench_server.ts`,
        "--port",
        String(difyPort),
        "--events",
        String(o.events),
      ],
      {},
      difyLog,
    );
    await waitReady(`http://127.0.0.1:${difyPort}/v1/info`, difyLog);
    const servers: Server[] = [];
    for (const row of rows) {
      const port = freePort();
      const log = `${dir}/${row.key}.log`;
      const child = spawn(row.cmd(o), {
        PORT: String(port),
        UPSTREAM: `http://127.0.0.1:${difyPort}`,
        DIFY_API_URL: `http://127.0.0.1:${difyPort}/v1`,
        ...row.env?.(o, dir, row.key),
      }, log);
      await waitReady(`http://127.0.0.1:${port}/healthz`, log);
      servers.push({
        row,
        child,
        port,
        url: `http://127.0.0.1:${port}${PATHS[row.kind]}`,
        script: wrkScript(row, dir),
        log,
      });
    }
    const tally = new Map<Server, Tally>(
      servers.map((s) => [s, { requests: 0, seconds: 0, cpuMs: 0, rps: [], cpuUs: [], p50s: [], errors: 0 }]),
    );
    for (const s of servers) {
      tally.get(s)!.problem = await validate(s, o.events);
      await load(s, 32, 1); // warm-up: the code paths compiled before anything counts
    }
    const say = (m: string) => console.error(`[ladder] ${m}`);
    say(`${servers.length} rows, ${hasWrk ? "wrk" : "bench/load.ts"}; ${o.rounds} rounds x ${o.seconds} s at c=32`);
    for (let round = 0; round < o.rounds; round++) {
      // Each round starts at a different row: none is always first after the latency rounds' lull.
      const order = servers.map((_, i) => servers[(i + round) % servers.length]);
      for (const s of order) {
        const t = tally.get(s)!;
        const c0 = cpuOf(s);
        const scraper = s.row.scrape ? setInterval(() => scrape(s), 1000) : undefined;
        const r = await load(s, 32, o.seconds).finally(() => clearInterval(scraper));
        const used = cpuOf(s) - c0;
        t.cpuMs += used;
        t.cpuUs.push((used * 1000) / r.requests);
        t.requests += r.requests;
        t.seconds += r.seconds;
        t.errors += r.errors;
        t.rps.push(r.requests / r.seconds);
      }
      say(`round ${round + 1}/${o.rounds} done`);
    }
    for (let round = 0; round < o.rounds; round++) {
      for (const s of servers) tally.get(s)!.p50s.push((await load(s, 1, o.latencySeconds)).p50Ms);
    }
    const base = tally.get(servers.find((s) => s.row.key === "byob") ?? servers[0])!;
    const baseP50 = median(base.p50s);
    const L = [
      `| row | req/s (c=32) | × BYOB | p50 µs (c=1) | p50 − BYOB µs | CPU µs / request | CPU × BYOB |`,
      `|---|---:|---:|---:|---:|---:|---:|`,
    ];
    for (const s of servers) {
      const t = tally.get(s)!;
      const rps = median(t.rps);
      // Round by round: a round's ratio compares rows measured seconds apart, not minutes.
      const ratio = median(t.rps.map((x, i) => x / base.rps[i]));
      const p50 = median(t.p50s) * 1000;
      const note = [t.problem, s.problem, t.errors ? `${t.errors} errors` : ""].filter(Boolean).join("; ");
      L.push(
        `| ${s.row.label}${note ? ` (${note})` : ""} | ${fmt(rps)} | ${fmt(ratio, 2)} | ${fmt(p50)} | ` +
          `${fmt(p50 - baseP50 * 1000)} | ${fmt(median(t.cpuUs))} | ${
            fmt(median(t.cpuUs.map((x, i) => x / base.cpuUs[i])), 2)
          } |`,
      );
    }
    const pairs = PAIRS.map(([a, b]) => [servers.find((s) => s.row.key === a), servers.find((s) => s.row.key === b)]);
    for (const [a, b] of pairs) {
      if (!a || !b) continue;
      const [ta, tb] = [tally.get(a)!, tally.get(b)!];
      L.push(
        "",
        `${a.row.label} / ${b.row.label}, round by round (medians): CPU per request ` +
          `${fmt(median(ta.cpuUs.map((x, i) => x / tb.cpuUs[i])), 2)}×, req/s ` +
          `${fmt(median(ta.rps.map((x, i) => x / tb.rps[i])), 2)}×, p50 (c=1) ` +
          `${fmt(median(ta.p50s.map((x, i) => x / tb.p50s[i])), 2)}×`,
      );
    }
    return L.join("\n");
  } finally {
    stopAll();
    await Deno.remove(dir, { recursive: true }).catch(() => {});
  }
}

function cpuOf(s: Server): number {
  try {
    return cpuMs(s.child.pid, 100);
  } catch {
    throw new Error(`${s.row.key} exited: ${Deno.readTextFileSync(s.log).slice(-1000)}`);
  }
}

/** What the ladder's columns mean, for the report under its table. */
export const LADDER_NOTE =
  "Rows r0–r9 add main.ts's per-request pieces to the BYOB pass-through one at a time (bench/ladder/rungs.ts, " +
  "cumulative). Every row's server runs at once; the rows take turns, a few seconds each, round after round. " +
  "req/s: median of the rounds; × BYOB: median of the rounds' ratios to the BYOB pass-through in the same round; " +
  "CPU µs / request: the row's process (all threads), median of the rounds. p50 at concurrency 1: median of the " +
  "latency rounds. Rerun: `deno task ladder` (options: --rounds, --seconds, --rows, --main).";

function fail(message: string): never {
  throw new Error(message);
}

if (import.meta.main) {
  const o = parseOptions(Deno.args);
  for (const sig of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(sig, () => {
      stopAll();
      Deno.exit(130);
    });
  }
  try {
    const table = await ladder(o);
    console.log(table);
    if (o.markdown) await Deno.writeTextFile(o.markdown, table + "\n");
  } finally {
    stopAll();
  }
}
