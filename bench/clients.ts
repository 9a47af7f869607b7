/**
 * Opt-in: the README's clients, run for real against the bridge (`deno run main.ts`, or `bun main.ts` with `--bun`)
 * in front of the fake Dify, each checked by what Dify received: every chat lands in one Dify conversation, and each
 * turn's query is only the new input. Needs the network for npm; not part of `deno task test`.
 *
 *   deno run --allow-all bench/clients.ts                      every client found on this machine
 *   deno run --allow-all bench/clients.ts --only codex,openai  a few of them
 *   deno run --allow-all bench/clients.ts --bun                against `bun main.ts`
 *   deno run --allow-all bench/clients.ts --python venv/bin/python
 *
 * Clients: the Codex CLI (`codex` on PATH: `npm i -g @openai/codex`), `examples/*.mjs` with node (their npm packages
 * are installed into a scratch folder), `examples/chat.py` (when python3 has `openai`), and OpenClaw (`openclaw` on
 * PATH, which needs Node 24; about a minute per turn).
 */
import { type FakeDify, startFakeDify } from "./fake_dify.ts";
import { ROOT, startProcess } from "./test_util.ts";

const KEY = "sk-clients";
const EXAMPLES = new URL("../examples/", import.meta.url).pathname;
const NPM_PACKAGES = ["openai", "@openai/agents", "ai", "@ai-sdk/openai", "@langchain/openai", "@langchain/core"];

/** One client: how to run it, and the chats (each a list of queries, in order) Dify must have received. */
interface Client {
  name: string;
  available(): boolean;
  run(base: string, scratch: string): Promise<string>;
  chats: string[][];
}

function flag(name: string): string | undefined {
  const i = Deno.args.findIndex((a) => a === `--${name}` || a.startsWith(`--${name}=`));
  if (i < 0) return undefined;
  return Deno.args[i].includes("=") ? Deno.args[i].split("=")[1] : Deno.args[i + 1] ?? "";
}

function found(command: string, args = ["--version"]): boolean {
  try {
    return new Deno.Command(command, { args, stdout: "null", stderr: "null" }).outputSync().success;
  } catch {
    return false;
  }
}

/** Runs a command to its end; throws with its output if it fails. */
async function sh(command: string, args: string[], options: { cwd?: string; env?: Record<string, string> } = {}) {
  const out = await new Deno.Command(command, { args, ...options, stdin: "null", stdout: "piped", stderr: "piped" })
    .output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  if (!out.success) throw new Error(`${command} ${args.join(" ")} exited ${out.code}:\n${text.slice(-3000)}`);
  return text;
}

let npmReady: Promise<void> | undefined;

/** The examples' npm packages, installed once into the scratch folder. */
function npmInstall(scratch: string): Promise<void> {
  npmReady ??= sh("npm", ["install", "--no-audit", "--no-fund", "--prefix", scratch, ...NPM_PACKAGES]).then(() => {});
  return npmReady;
}

/** `examples/<file>` run with node from the scratch folder, where its packages are. */
function nodeExample(file: string, model: string, chats: string[][]): Client {
  return {
    name: file,
    available: () => found("node") && found("npm"),
    async run(base, scratch) {
      await npmInstall(scratch);
      await Deno.copyFile(`${EXAMPLES}${file}`, `${scratch}/${file}`);
      return await sh("node", [`${scratch}/${file}`], { env: { BASE_URL: base, API_KEY: KEY, MODEL: model } });
    },
    chats,
  };
}

const codex: Client = {
  name: "codex",
  available: () => found("codex"),
  async run(base, scratch) {
    const home = `${scratch}/codex-home`;
    const work = `${scratch}/codex-work`;
    await Deno.mkdir(home, { recursive: true });
    await Deno.mkdir(work, { recursive: true });
    await Deno.writeTextFile(
      `${home}/config.toml`,
      `model = "chat"\nmodel_provider = "dify"\n\n[model_providers.dify]\nname = "Dify via dify-openai"\n` +
        `base_url = "${base}"\nenv_key = "DIFY_OPENAI_KEY"\nwire_api = "responses"\n`,
    );
    const env = { CODEX_HOME: home, DIFY_OPENAI_KEY: KEY };
    const exec = ["exec", "--skip-git-repo-check"];
    return await sh("codex", [...exec, "say hello in five words"], { cwd: work, env }) +
      await sh("codex", [...exec, "resume", "--last", "now say goodbye"], { cwd: work, env });
  },
  chats: [["say hello in five words", "now say goodbye"]],
};

/** `--python <path>`: a Python that has the openai package (a venv's), else python3. */
const PYTHON = flag("python") || "python3";

const python: Client = {
  name: "chat.py",
  available: () => found(PYTHON, ["-c", "import openai"]),
  run: (base) => sh(PYTHON, [`${EXAMPLES}chat.py`], { env: { BASE_URL: base, API_KEY: KEY, MODEL: "chat" } }),
  chats: [["Hello"], ["What can you do?", "And what did I ask?"]],
};

const openclaw: Client = {
  name: "openclaw",
  available: () => found("openclaw"),
  async run(base, scratch) {
    const home = `${scratch}/openclaw-home`;
    await Deno.mkdir(`${home}/.openclaw`, { recursive: true });
    const model = {
      id: "chat",
      name: "chat",
      reasoning: false,
      input: ["text"],
      contextWindow: 128000,
      maxTokens: 8192,
    };
    const provider = { baseUrl: base, apiKey: KEY, api: "openai-responses", timeoutSeconds: 120, models: [model] };
    await Deno.writeTextFile(
      `${home}/.openclaw/openclaw.json`,
      JSON.stringify({
        agents: { defaults: { model: { primary: "dify/chat" } } },
        models: { mode: "replace", providers: { dify: provider } },
      }),
    );
    const turn = (message: string) =>
      sh("openclaw", ["agent", "--local", "--agent", "main", "--message", message], { env: { HOME: home } });
    return await turn("hi there") + await turn("second message");
  },
  chats: [["hi there", "second message"]],
};

const CLIENTS: Client[] = [
  codex,
  nodeExample("openai.mjs", "chat", [["Hello"], ["What can you do?", "What did I just ask?"]]),
  nodeExample("agents-sdk.mjs", "agent", [["What can you do?", "And what did I just ask?"], [
    "Hello!",
    "One more turn, streamed.",
  ]]),
  nodeExample("ai-sdk.mjs", "chat", [["Hello"], ["Hello"]]),
  nodeExample("langchain.mjs", "chat", [["Hello"]]),
  python,
  openclaw,
];

/** The chats Dify received since `seen`, each as its queries in order. */
function newChats(dify: FakeDify, seen: Set<string>): string[][] {
  const chats = [...dify.conversations.values()].filter((c) => !seen.has(c.id));
  for (const c of chats) seen.add(c.id);
  return chats.map((c) => c.turns.map((t) => t.query));
}

const only = flag("only")?.split(",");
const runtime = Deno.args.includes("--bun") ? "bun" : "deno";
const dify = await startFakeDify();
// SYSTEM_PROMPT=drop, as the README advises for Codex and OpenClaw: their agent prompts are for their own tools.
const bridge = await startProcess(runtime, {
  DIFY_API_URL: dify.url,
  DIFY_APPS: JSON.stringify({ chat: "app-chat", agent: "app-agent" }),
  PROXY_API_KEYS: KEY,
  SYSTEM_PROMPT: "drop",
});
const scratch = await Deno.makeTempDir({ prefix: "dify-openai-clients-" });
const seen = new Set<string>();
let failed = 0;
console.log(`bridge: ${runtime} main.ts at ${bridge.url} (${ROOT.pathname}), fake Dify at ${dify.url}`);
try {
  for (const client of CLIENTS) {
    if (only && !only.includes(client.name) && !only.includes(client.name.replace(/\.\w+$/, ""))) continue;
    if (!client.available()) {
      console.log(`skip  ${client.name}: not installed`);
      continue;
    }
    const started = Date.now();
    try {
      await client.run(bridge.url, scratch);
      const got = newChats(dify, seen).map((c) => JSON.stringify(c));
      const missing = client.chats.map((c) => JSON.stringify(c)).filter((c) => !got.includes(c));
      if (missing.length) throw new Error(`Dify did not receive ${missing.join(", ")}; it got ${got.join(", ")}`);
      console.log(`ok    ${client.name} (${((Date.now() - started) / 1000).toFixed(1)} s): ${got.join(" ")}`);
    } catch (e) {
      failed++;
      console.log(`FAIL  ${client.name}: ${(e as Error).message}`);
    }
  }
} finally {
  await bridge.stop();
  await dify.close();
  await Deno.remove(scratch, { recursive: true }).catch(() => {});
}
Deno.exit(failed ? 1 : 0);
