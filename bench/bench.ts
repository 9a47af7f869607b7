// Benchmark orchestrator for the Dify -> OpenAI proxy (issue 6).
//
//   deno run -A bench/bench.ts            # full run, ~6 minutes on 2 cores
//   deno run -A bench/bench.ts --quick    # ~3 minutes, smaller counts
//
// Options:
//   --quick                 shorter phases (5 s throughput, 2k/10k requests for RSS)
//   --paths a,b,...         subset of direct,native,byob,js,deno,responses,deno-off,bun (default: all)
//   --events N              message events per answer in the fast mode (default 20)
//   --proxy-entry FILE      run this file instead of main.ts as the proxy
//                           (for testing the harness itself)
//   --conversation-mode M   CONVERSATION_MODE for the proxy rows (default history, the
//                           proxy's own default); the deno-off row always runs with off
//   --keep-logs             keep the processes' logs (their folder is printed)
//   --no-write              do not write bench/results.json / bench/results.md
//   --no-ladder             skip the ablation ladder at the end (bench/ladder/ladder.ts, ~6 min)
//   --before FILE           the ladder also runs this older main.ts (before/after in one run)
//
// Every server (fake Dify, pass-throughs, proxies) and every load generator
// runs in its own process. All of them are killed at the end, on errors and on
// Ctrl-C; a watchdog shell kills them if this process dies without cleaning up.
// Nothing here asserts a time: the run reports figures and the checks it made.

import { flags } from "./child.ts";
import { Connection, cpuMs, makeTarget, Marker, memKiB, percentile } from "./http_client.ts";
import type { Result as LoadResult } from "./load.ts";
import { DEFAULTS as LADDER_DEFAULTS, ladder, LADDER_NOTE } from "./ladder/ladder.ts";

// ---------------------------------------------------------------- options --

interface Options {
  quick: boolean;
  paths: PathKey[];
  events: number;
  proxyEntry: string;
  conversationMode: string;
  keepLogs: boolean;
  write: boolean;
  ladder: boolean;
  before?: string;
}

type PathKey = "direct" | "native" | "byob" | "js" | "deno" | "responses" | "deno-off" | "bun";
const ALL_PATHS: PathKey[] = ["direct", "native", "byob", "js", "deno", "responses", "deno-off", "bun"];

const ROOT = new URL("..", import.meta.url).pathname.replace(/\/$/, "");
const BENCH_DIR = `${ROOT}/bench`;

function parseOptions(args: string[]): Options {
  const o: Options = {
    quick: false,
    paths: [...ALL_PATHS],
    events: 20,
    proxyEntry: "main.ts",
    conversationMode: "history",
    keepLogs: false,
    write: true,
    ladder: true,
  };
  for (const [a, v] of flags(args)) {
    switch (a) {
      case "--quick":
        o.quick = true;
        break;
      case "--paths": {
        const list = v().split(",").map((s) => s.trim()).filter(Boolean);
        for (const p of list) {
          if (!ALL_PATHS.includes(p as PathKey)) throw new Error(`unknown path ${p}`);
        }
        o.paths = ALL_PATHS.filter((p) => list.includes(p));
        break;
      }
      case "--events":
        o.events = Number(v());
        if (!Number.isInteger(o.events) || o.events < 1 || o.events > 10_000) {
          throw new Error("--events must be in 1..10000");
        }
        break;
      case "--proxy-entry":
        o.proxyEntry = v();
        break;
      case "--conversation-mode":
        o.conversationMode = v();
        break;
      case "--keep-logs":
        o.keepLogs = true;
        break;
      case "--no-ladder":
        o.ladder = false;
        break;
      case "--before":
        o.before = v();
        break;
      case "--no-write":
        o.write = false;
        break;
      case "-h":
      case "--help":
        console.log(
          "usage: deno run -A bench/bench.ts [--quick] [--paths direct,native,js,deno,bun]\n" +
            "       [--events N] [--proxy-entry FILE] [--conversation-mode off|history|user]\n" +
            "       [--keep-logs] [--no-write] [--no-ladder] [--before FILE]",
        );
        Deno.exit(0);
        break;
      default:
        throw new Error(`unknown argument ${a} (try --help)`);
    }
  }
  return o;
}

const opts = parseOptions(Deno.args);

/** Phase sizes. Defaults total ~4 min on 2 cores; --quick ~1 min. */
const P = opts.quick
  ? {
    warmupS: 1,
    throughputS: 4,
    latencyRounds: 5,
    latencyPerRound: 100,
    rssA: 2_000,
    rssB: 10_000,
    rssCapS: 15,
    pacedS: 2,
    pacedWarmS: 0.5,
    pacedPaths: ["js", "deno", "responses", "bun"] as PathKey[],
    slowEvents: 4,
    slowPaths: ["deno", "bun"] as PathKey[],
  }
  : {
    warmupS: 2,
    throughputS: 10,
    latencyRounds: 10,
    latencyPerRound: 200,
    rssA: 5_000,
    rssB: 50_000,
    rssCapS: 45,
    pacedS: 8,
    pacedWarmS: 1,
    pacedPaths: ["direct", "native", "byob", "js", "deno", "responses", "bun"] as PathKey[],
    slowEvents: 10,
    slowPaths: ["native", "js", "deno", "bun"] as PathKey[],
  };
const CONCURRENCY = 32;
const PACED_CONCURRENCY = 500;
const PACE_MS = 20;
const PACED_EVENTS = 20;
const SLOW_STREAMS = 1000;
const SLOW_PACE_MS = 1000;
const API_KEY = "app-bench";

// ------------------------------------------------------------- processes --

const LOG_DIR = await Deno.makeTempDir({ prefix: "dify-bench-" });
const PID_FILE = `${LOG_DIR}/pids`;
const CLK_TCK = await (async () => {
  try {
    const out = await new Deno.Command("getconf", { args: ["CLK_TCK"] }).output();
    const n = Number(new TextDecoder().decode(out.stdout).trim());
    return n > 0 ? n : 100;
  } catch {
    return 100;
  }
})();

interface Proc {
  name: string;
  pid: number;
  child: Deno.ChildProcess;
  exited: boolean;
  status: Promise<Deno.CommandStatus>;
  stdoutLog: string;
  stderrLog: string;
}

const live = new Set<Proc>();

function writePidFile() {
  Deno.writeTextFileSync(PID_FILE, [...live].map((p) => p.pid).join("\n") + "\n");
}

/** Starts `cmd` with stdout/stderr redirected to files (never a pipe that
 * could fill up and block the child). The pid is the command's own: `exec`. */
function spawn(name: string, cmd: string[], env: Record<string, string>): Proc {
  const stdoutLog = `${LOG_DIR}/${name}.out`;
  const stderrLog = `${LOG_DIR}/${name}.err`;
  const child = new Deno.Command("sh", {
    args: ["-c", 'exec "$@" >"$BENCH_STDOUT" 2>"$BENCH_STDERR"', "sh", ...cmd],
    cwd: ROOT,
    env: { ...env, BENCH_STDOUT: stdoutLog, BENCH_STDERR: stderrLog },
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  const proc: Proc = {
    name,
    pid: child.pid,
    child,
    exited: false,
    status: child.status,
    stdoutLog,
    stderrLog,
  };
  proc.status.then(() => {
    proc.exited = true;
  });
  live.add(proc);
  writePidFile();
  return proc;
}

async function stop(proc: Proc): Promise<void> {
  if (!live.has(proc)) return;
  if (!proc.exited) {
    try {
      proc.child.kill("SIGTERM");
    } catch { /* gone */ }
    const t = setTimeout(() => {
      try {
        if (!proc.exited) proc.child.kill("SIGKILL");
      } catch { /* gone */ }
    }, 2000);
    await proc.status;
    clearTimeout(t);
  }
  live.delete(proc);
  writePidFile();
}

let cleaningUp: Promise<void> | undefined;
function cleanup(): Promise<void> {
  cleaningUp ??= (async () => {
    await Promise.all([...live].filter((p) => p !== watchdog).map(stop));
    if (watchdog) await stop(watchdog);
    if (!opts.keepLogs) {
      try {
        Deno.removeSync(LOG_DIR, { recursive: true });
      } catch { /* ignore */ }
    }
  })();
  return cleaningUp;
}

for (const sig of ["SIGINT", "SIGTERM"] as const) {
  Deno.addSignalListener(sig, () => {
    console.error(`\n${sig}: stopping all bench processes...`);
    cleanup().finally(() => Deno.exit(130));
  });
}

// Kills every child listed in the pid file if this process goes away without
// cleaning up (e.g. SIGKILL), then removes the log folder (unless --keep-logs).
// Bounded: gives up after 2 hours.
const watchdog: Proc = spawn("watchdog", [
  "sh",
  "-c",
  'i=0; while [ "$i" -lt 7200 ] && kill -0 "$0" 2>/dev/null; do sleep 1; i=$((i+1)); done; ' +
  'for p in $(cat "$1" 2>/dev/null); do [ "$p" != "$$" ] && kill -9 "$p" 2>/dev/null; done; ' +
  '[ -n "$2" ] && rm -rf "$2"',
  String(Deno.pid),
  PID_FILE,
  opts.keepLogs ? "" : LOG_DIR,
], {});

function freePort(): number {
  const l = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (l.addr as Deno.NetAddr).port;
  l.close();
  return port;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function tail(file: string, lines = 15): Promise<string> {
  try {
    const text = await Deno.readTextFile(file);
    return text.trimEnd().split("\n").slice(-lines).join("\n");
  } catch {
    return "";
  }
}

/** Polls `url` (GET) until it answers 200; bounded by `timeoutMs`. */
async function waitReady(proc: Proc, url: string, timeoutMs = 30_000): Promise<void> {
  const deadline = performance.now() + timeoutMs;
  let last = "";
  while (performance.now() < deadline) {
    if (proc.exited) {
      const st = await proc.status;
      throw new Error(
        `${proc.name} exited (code ${st.code}) before it was ready\n` +
          `stderr: ${await tail(proc.stderrLog)}\nstdout: ${await tail(proc.stdoutLog)}`,
      );
    }
    try {
      const r = await fetch(url, { signal: AbortSignal.timeout(1000) });
      await r.body?.cancel();
      if (r.status === 200) return;
      last = `HTTP ${r.status}`;
    } catch (e) {
      last = String(e);
    }
    await sleep(100);
  }
  throw new Error(`${proc.name} not ready after ${timeoutMs} ms (${last})\n${await tail(proc.stderrLog)}`);
}

const DENO = Deno.execPath();

async function commandOutput(cmd: string, args: string[]): Promise<string | null> {
  try {
    const out = await new Deno.Command(cmd, { args, stdout: "piped", stderr: "null" }).output();
    return out.success ? new TextDecoder().decode(out.stdout).trim() : null;
  } catch {
    return null;
  }
}

// ----------------------------------------------------------- fake Dify --

interface FakeDify {
  proc: Proc;
  port: number;
  api: string; // DIFY_API_URL
}

async function startFakeDify(name: string, events: number, pace: number): Promise<FakeDify> {
  const port = freePort();
  const proc = spawn(name, [
    DENO,
    "run",
    "-A",
    `${BENCH_DIR}/dify_bench_server.ts`,
    "--port",
    String(port),
    "--events",
    String(events),
    "--pace",
    String(pace),
    "--parent",
    String(Deno.pid),
  ], {});
  await waitReady(proc, `http://127.0.0.1:${port}/v1/info`);
  return { proc, port, api: `http://127.0.0.1:${port}/v1` };
}

async function difyStats(d: FakeDify): Promise<Record<string, unknown>> {
  const r = await fetch(`http://127.0.0.1:${d.port}/_stats`, { signal: AbortSignal.timeout(5000) });
  return await r.json();
}

async function resetDifyStats(d: FakeDify): Promise<void> {
  const r = await fetch(`http://127.0.0.1:${d.port}/_stats/reset`, {
    method: "POST",
    signal: AbortSignal.timeout(5000),
  });
  await r.body?.cancel();
}

// ---------------------------------------------------------------- paths --

interface PathDef {
  key: PathKey;
  label: string;
  /** "openai": /v1/chat/completions; "responses": /v1/responses; "dify": /v1/chat-messages */
  kind: "openai" | "responses" | "dify";
  /** Starts the path's own server (none for direct). */
  start?: (up: FakeDify, tag: string) => Promise<{ proc: Proc; port: number }>;
}

const openaiBody = (text: string) =>
  JSON.stringify({ model: "dify", stream: true, messages: [{ role: "user", content: text }] });
const responsesBody = (text: string) => JSON.stringify({ model: "dify", stream: true, input: text });
const difyBody = (text: string) =>
  JSON.stringify({ inputs: {}, query: text, response_mode: "streaming", user: "bench", conversation_id: "" });
/** The fake Dify answers this query without pacing (see dify_bench_server.ts). */
const WARMUP_QUERY = "bench-warmup";

function passthrough(file: string) {
  return async (up: FakeDify, tag: string) => {
    const port = freePort();
    const proc = spawn(tag, [DENO, "run", "-A", `${BENCH_DIR}/${file}`], {
      PORT: String(port),
      UPSTREAM: `http://127.0.0.1:${up.port}`,
      BENCH_PARENT_PID: String(Deno.pid),
    });
    await waitReady(proc, `http://127.0.0.1:${port}/healthz`);
    return { proc, port };
  };
}

/** The proxy on `runtime`, with `--conversation-mode` unless `mode` says otherwise. */
function proxy(runtime: "deno" | "bun", mode?: string) {
  return async (up: FakeDify, tag: string) => {
    const port = freePort();
    const cmd = runtime === "deno" ? [DENO, "run", "-A", opts.proxyEntry] : ["bun", opts.proxyEntry];
    const env: Record<string, string> = {
      PORT: String(port),
      DIFY_API_URL: up.api,
      DIFY_API_KEY: API_KEY,
      // A file, as the proxy's default is: the stored conversations are not in its memory.
      KV_PATH: `${LOG_DIR}/${tag}.kv`,
      CONVERSATION_MODE: mode ?? opts.conversationMode,
    };
    if (runtime === "bun") env.BUN_CONFIG_MAX_HTTP_REQUESTS = "2048";
    const proc = spawn(tag, cmd, env);
    await waitReady(proc, `http://127.0.0.1:${port}/healthz`);
    return { proc, port };
  };
}

const PATHS: Record<PathKey, PathDef> = {
  direct: { key: "direct", label: "direct to fake Dify", kind: "dify" },
  native: {
    key: "native",
    label: "native pass-through (Deno)",
    kind: "dify",
    start: passthrough("passthrough_native.ts"),
  },
  byob: {
    key: "byob",
    label: "BYOB pass-through (Deno)",
    kind: "dify",
    start: passthrough("passthrough_byob.ts"),
  },
  js: {
    key: "js",
    label: "JS pass-through (Deno)",
    kind: "dify",
    start: passthrough("passthrough_js.ts"),
  },
  deno: { key: "deno", label: "proxy main.ts on Deno", kind: "openai", start: proxy("deno") },
  responses: {
    key: "responses",
    label: "proxy main.ts on Deno, POST /v1/responses",
    kind: "responses",
    start: proxy("deno"),
  },
  "deno-off": {
    key: "deno-off",
    label: "proxy main.ts on Deno, CONVERSATION_MODE=off",
    kind: "openai",
    start: proxy("deno", "off"),
  },
  bun: { key: "bun", label: "proxy main.ts on Bun", kind: "openai", start: proxy("bun") },
};

interface Endpoint {
  url: string;
  body: string;
  headers: Record<string, string>;
  marker: string;
  markerNotNext?: string;
}

function endpoint(def: PathDef, port: number, query = "hi"): Endpoint {
  if (def.kind === "openai") {
    return {
      url: `http://127.0.0.1:${port}/v1/chat/completions`,
      body: openaiBody(query),
      // No client key: the proxy runs without PROXY_API_KEYS and uses DIFY_API_KEY.
      headers: {},
      // First chunk whose delta carries non-empty content.
      marker: '"content":"',
      markerNotNext: '"',
    };
  }
  if (def.kind === "responses") {
    return {
      url: `http://127.0.0.1:${port}/v1/responses`,
      body: responsesBody(query),
      headers: {},
      // One event per content delta; reasoning and lifecycle events have other names.
      marker: "event: response.output_text.delta\n",
    };
  }
  return {
    url: `http://127.0.0.1:${port}/v1/chat-messages`,
    body: difyBody(query),
    headers: { authorization: `Bearer ${API_KEY}` },
    marker: '"event":"message"',
  };
}

// ---------------------------------------------------------------- load --

interface LoadArgs {
  concurrency: number;
  duration?: number;
  requests?: number;
  countMarkers?: boolean;
  ramp?: number;
  grace?: number;
}

/** Runs bench/load.ts in its own process and returns its JSON result. */
async function runLoad(ep: Endpoint, a: LoadArgs, tag: string): Promise<LoadResult> {
  const args = [
    "run",
    "-A",
    `${BENCH_DIR}/load.ts`,
    "--url",
    ep.url,
    "--body",
    ep.body,
    "--concurrency",
    String(a.concurrency),
    "--parent",
    String(Deno.pid),
    "--grace",
    String(a.grace ?? 30),
  ];
  for (const [k, v] of Object.entries(ep.headers)) args.push("--header", `${k}: ${v}`);
  if (a.duration) args.push("--duration", String(a.duration));
  if (a.requests) args.push("--requests", String(a.requests));
  if (a.ramp) args.push("--ramp", String(a.ramp));
  if (a.countMarkers) {
    args.push("--marker", ep.marker);
    if (ep.markerNotNext) args.push("--marker-not-next", ep.markerNotNext);
  }
  const child = new Deno.Command(DENO, {
    args,
    cwd: ROOT,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const proc: Proc = {
    name: `load-${tag}`,
    pid: child.pid,
    child,
    exited: false,
    status: child.status,
    stdoutLog: "",
    stderrLog: "",
  };
  live.add(proc);
  writePidFile();
  try {
    // The load generator stops itself (deadline + grace); this is the backstop.
    const limitMs = ((a.duration ?? 3600) + (a.grace ?? 30) + 30) * 1000;
    const killer = setTimeout(() => {
      try {
        child.kill("SIGKILL");
      } catch { /* gone */ }
    }, limitMs);
    const out = await child.output().finally(() => clearTimeout(killer)); // drains stdout and stderr
    proc.exited = true;
    const text = new TextDecoder().decode(out.stdout).trim();
    if (!out.success || !text) {
      throw new Error(
        `load generator failed (code ${out.code}): ${new TextDecoder().decode(out.stderr).slice(-2000)}`,
      );
    }
    return JSON.parse(text.split("\n").at(-1)!) as LoadResult;
  } finally {
    live.delete(proc);
    writePidFile();
  }
}

// ----------------------------------------------------------- validation --

interface Validation {
  ok: boolean;
  status: number;
  contentType: string | null;
  problems: string[];
  /** content chunks (openai) or message events (dify) */
  contentEvents: number;
  text: string;
  bytes: number;
  chunks: number;
  finishReason?: string | null;
  done?: boolean;
  usage?: unknown;
  firstFrame?: string;
  lastFrames?: string[];
}

/** Fetches one full answer and checks its SSE framing and content. */
async function validate(def: PathDef, ep: Endpoint, events: number): Promise<Validation> {
  const res = await fetch(ep.url, {
    method: "POST",
    headers: { "content-type": "application/json", ...ep.headers },
    body: ep.body,
    signal: AbortSignal.timeout(30_000),
  });
  const v: Validation = {
    ok: false,
    status: res.status,
    contentType: res.headers.get("content-type"),
    problems: [],
    contentEvents: 0,
    text: "",
    bytes: 0,
    chunks: 0,
  };
  const dec = new TextDecoder();
  let raw = "";
  if (res.body) {
    for await (const chunk of res.body) {
      v.bytes += chunk.length;
      v.chunks++;
      raw += dec.decode(chunk, { stream: true });
    }
  }
  if (res.status !== 200) {
    v.problems.push(`HTTP ${res.status}: ${raw.slice(0, 300)}`);
    return v;
  }
  if (!v.contentType?.startsWith("text/event-stream")) {
    v.problems.push(`content-type ${v.contentType}`);
  }
  const frames = raw.split(/\r?\n\r?\n/).filter((f) => f.trim() !== "");
  v.firstFrame = frames[0]?.slice(0, 400);
  v.lastFrames = frames.slice(-3).map((f) => f.slice(0, 400));
  const datas = frames.map((f) =>
    f.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n")
  );
  if (def.kind === "openai") {
    v.done = datas.at(-1) === "[DONE]";
    if (!v.done) v.problems.push("stream does not end with data: [DONE]");
    const ids = new Set<string>();
    for (const d of datas) {
      if (d === "[DONE]" || d === "") continue;
      let j: {
        id?: string;
        object?: string;
        choices?: { delta?: { content?: string }; finish_reason?: string | null }[];
        usage?: unknown;
      };
      try {
        j = JSON.parse(d);
      } catch {
        v.problems.push(`non-JSON data: ${d.slice(0, 100)}`);
        continue;
      }
      if (j.id) ids.add(j.id);
      if (j.object !== "chat.completion.chunk") {
        v.problems.push(`object=${j.object}`);
      }
      const c = j.choices?.[0];
      if (c?.delta?.content) {
        v.contentEvents++;
        v.text += c.delta.content;
      }
      if (c?.finish_reason) v.finishReason = c.finish_reason;
      if (j.usage) v.usage = j.usage;
    }
    if (ids.size > 1) v.problems.push(`${ids.size} different chunk ids in one stream`);
    if (!v.finishReason) v.problems.push("no finish_reason");
  } else if (def.kind === "responses") {
    let sequence = 0;
    for (const [i, d] of datas.entries()) {
      let j: { type?: string; sequence_number?: number; delta?: string; response?: { status?: string } };
      try {
        j = JSON.parse(d);
      } catch {
        v.problems.push(`non-JSON data: ${d.slice(0, 100)}`);
        continue;
      }
      if (j.sequence_number !== sequence++) v.problems.push(`sequence_number ${j.sequence_number} at ${i}`);
      if (j.type === "response.output_text.delta") {
        v.contentEvents++;
        v.text += j.delta;
      }
      if (j.type === "response.completed") v.finishReason = j.response?.status;
    }
    v.done = v.finishReason === "completed";
    if (!v.done) v.problems.push("stream does not end with response.completed");
  } else {
    let end = false;
    for (const d of datas) {
      try {
        const j = JSON.parse(d);
        if (j.event === "message") {
          v.contentEvents++;
          v.text += j.answer;
        } else if (j.event === "message_end") end = true;
      } catch {
        v.problems.push(`non-JSON data: ${d.slice(0, 100)}`);
      }
    }
    if (!end) v.problems.push("no message_end");
  }
  if (v.contentEvents !== events) {
    v.problems.push(`${v.contentEvents} content events, expected ${events}`);
  }
  if (v.text !== " word".repeat(events)) {
    v.problems.push(`text differs: ${JSON.stringify(v.text.slice(0, 80))}`);
  }
  v.ok = v.problems.length === 0;
  return v;
}

// ------------------------------------------------------------- latency --

interface Latency {
  n: number;
  p50Ms: number;
  p99Ms: number;
  ttfcP50Ms: number;
  ttfcP99Ms: number;
  firstByteP50Ms: number;
  errors: number;
}

/** Sequential requests (concurrency 1) on one keep-alive connection, from this process. */
class LatencySampler {
  private readonly conn: Connection;
  private readonly marker: Marker;
  private readonly total: number[] = [];
  private readonly ttfc: number[] = [];
  private readonly fb: number[] = [];
  private errors = 0;

  constructor(ep: Endpoint) {
    this.conn = new Connection(makeTarget(ep.url, ep.body, ep.headers));
    this.marker = new Marker(ep.marker, ep.markerNotNext);
  }

  /** Sends `n` requests one after another; `keep` false discards their times (warm-up). */
  async run(n: number, keep = true): Promise<void> {
    for (let i = 0; i < n; i++) {
      // A request that hangs is cut off by closing its socket (its read then throws).
      const guard = setTimeout(() => this.conn.close(), 15_000);
      try {
        const r = await this.conn.request(this.marker);
        if (r.status !== 200) {
          this.errors++;
          continue;
        }
        if (!keep) continue;
        this.total.push(r.totalMs);
        this.ttfc.push(r.firstMarkerMs);
        this.fb.push(r.firstByteMs);
      } catch {
        this.errors++;
        this.conn.close();
      } finally {
        clearTimeout(guard);
      }
    }
  }

  close(): void {
    this.conn.close();
  }

  result(): Latency {
    return {
      n: this.total.length,
      p50Ms: percentile(this.total, 50),
      p99Ms: percentile(this.total, 99),
      ttfcP50Ms: percentile(this.ttfc, 50),
      ttfcP99Ms: percentile(this.ttfc, 99),
      firstByteP50Ms: percentile(this.fb, 50),
      errors: this.errors,
    };
  }
}

// --------------------------------------------------------------- phases --

interface CpuBreakdown {
  /** CPU µs per completed request, per process */
  serverUsPerReq: number | null;
  fakeDifyUsPerReq: number;
  loadGenUsPerReq: number;
  /** share of one core used by the load generator during the phase */
  loadGenCorePct: number;
  serverCorePct: number | null;
  fakeDifyCorePct: number;
}

interface PathResult {
  key: PathKey;
  label: string;
  skipped?: string;
  errors: string[];
  validation?: Validation;
  rssIdleKiB?: number;
  throughput?: LoadResult & { cpu: CpuBreakdown; machine: MachineLoad };
  latency?: Latency;
  rssAfter?: { requests: number; rssKiB: number; hwmKiB: number; capped: boolean }[];
  /** RSS of the path's process at the end of its throughput run */
  rssEnd?: { requests: number; rssKiB: number; hwmKiB: number };
  paced?: {
    streams: number;
    events: number;
    completed: number;
    cpuMs: number;
    cpuMsPer1kEvents: number;
    fakeDifyCpuMsPer1kEvents: number;
    maxInFlight: number;
    upstreamPeakActive: number;
    errors: number;
    elapsedMs: number;
    note?: string;
    machine: MachineLoad;
    /** stream duration; the ideal is (events - 1) x pace */
    latencyP50Ms: number;
  };
  slow?: {
    streams: number;
    completed: number;
    errors: number;
    rssBeforeKiB: number;
    peakRssKiB: number;
    hwmKiB: number;
    kibPerStream: number;
    maxInFlight: number;
    upstreamPeakActive: number;
    firstError?: string;
  };
  log?: { stdoutBytes: number; stdoutLines: number; stderrTail: string };
}

function cpuOf(proc: Proc | null): number {
  return proc ? cpuMs(proc.pid, CLK_TCK) : 0;
}

/** Busy CPU ms of the whole machine (all cores), from /proc/stat. */
function machineBusyMs(): number {
  const line = Deno.readTextFileSync("/proc/stat").split("\n")[0];
  const f = line.trim().split(/\s+/).slice(1, 9).map(Number);
  const total = f.reduce((a, b) => a + b, 0);
  return ((total - f[3] - f[4]) * 1000) / CLK_TCK;
}

interface Snapshot {
  t: number;
  machine: number;
  self: number;
  procs: Map<number, number>;
}

/** CPU counters of the machine, this process and every live child. */
function snapshot(): Snapshot {
  const procs = new Map<number, number>();
  for (const p of live) {
    try {
      procs.set(p.pid, cpuMs(p.pid, CLK_TCK));
    } catch { /* exited */ }
  }
  return { t: performance.now(), machine: machineBusyMs(), self: cpuMs("self", CLK_TCK), procs };
}

export interface MachineLoad {
  /** busy CPU of the whole machine, % of one core (2 cores = 200 %) */
  busyCorePct: number;
  /** busy CPU not used by this bench's processes, % of one core */
  otherCorePct: number;
}

/** How busy the machine was between two snapshots, and how much of it was not
 * this bench (other users of the machine make the figures noisy). */
function machineLoad(a: Snapshot, b: Snapshot, loadGenMs: number): MachineLoad {
  let ours = b.self - a.self + loadGenMs;
  for (const [pid, before] of a.procs) {
    const after = b.procs.get(pid);
    if (after !== undefined) ours += after - before;
  }
  const wall = b.t - a.t;
  const busy = b.machine - a.machine;
  return {
    busyCorePct: (100 * busy) / wall,
    otherCorePct: Math.max(0, (100 * (busy - ours)) / wall),
  };
}

async function logInfo(proc: Proc): Promise<PathResult["log"]> {
  let stdoutBytes = 0;
  let stdoutLines = 0;
  try {
    const text = await Deno.readTextFile(proc.stdoutLog);
    stdoutBytes = text.length;
    stdoutLines = text.split("\n").length - 1;
  } catch { /* none */ }
  return { stdoutBytes, stdoutLines, stderrTail: await tail(proc.stderrLog, 10) };
}

function checkLoad(r: LoadResult, what: string, expectMarkers?: number): string[] {
  const out: string[] = [];
  if (r.errors > 0) out.push(`${what}: ${r.errors} errors (first: ${r.firstError})`);
  if (r.timedOut) out.push(`${what}: load generator hit its hard time limit`);
  if (r.maxInFlight < r.concurrency && r.started >= r.concurrency) {
    out.push(`${what}: only ${r.maxInFlight}/${r.concurrency} requests in flight at once`);
  }
  if (r.completed > 0 && r.bodyBytesMin !== r.bodyBytesMax) {
    out.push(`${what}: body sizes vary ${r.bodyBytesMin}..${r.bodyBytesMax} bytes`);
  }
  if (
    expectMarkers !== undefined && r.completed > 0 &&
    (r.markersPerResponseMin !== expectMarkers || r.markersPerResponseMax !== expectMarkers)
  ) {
    out.push(
      `${what}: ${r.markersPerResponseMin}..${r.markersPerResponseMax} content events per response, expected ${expectMarkers}`,
    );
  }
  return out;
}

function log(msg: string) {
  const t = ((performance.now() - T0) / 1000).toFixed(1).padStart(6);
  console.error(`[${t}s] ${msg}`);
}

/** (a), (e): throughput and RSS after N requests. */
async function fastPhases(def: PathDef, up: FakeDify, res: PathResult): Promise<void> {
  let proc: Proc | null = null;
  let port = up.port;
  try {
    if (def.start) {
      ({ proc, port } = await def.start(up, `${def.key}-fast`));
      res.rssIdleKiB = memKiB(proc.pid).rss;
    }
    const ep = endpoint(def, port);
    res.validation = await validate(def, ep, opts.events);
    let served = 1;
    if (!res.validation.ok) {
      res.errors.push(`validation: ${res.validation.problems.join("; ")}`);
      if (res.validation.status !== 200) {
        res.skipped = `first request failed: HTTP ${res.validation.status}`;
        return;
      }
    }
    const isProxy = def.kind !== "dify";
    res.rssAfter = [];
    const rssCheckpoint = async (target: number) => {
      if (!proc) return;
      const want = target - served;
      let capped = false;
      if (want > 0) {
        log(`  ${def.key}: load to ${target} requests (cap ${P.rssCapS} s)`);
        const r = await runLoad(ep, {
          concurrency: CONCURRENCY,
          requests: want,
          duration: P.rssCapS,
        }, `${def.key}-rss`);
        served += r.completed + r.errors;
        capped = r.started < want;
        res.errors.push(...checkLoad(r, `rss-load-${target}`));
      }
      const m = memKiB(proc.pid);
      res.rssAfter!.push({ requests: served, rssKiB: m.rss, hwmKiB: m.hwm, capped });
    };

    // Warm-up (for the proxies: the first RSS checkpoint doubles as warm-up).
    if (isProxy && proc) await rssCheckpoint(P.rssA);
    else {
      log(`  ${def.key}: warm-up ${P.warmupS} s`);
      const w = await runLoad(ep, { concurrency: CONCURRENCY, duration: P.warmupS }, `${def.key}-warm`);
      served += w.completed;
    }

    // (a) throughput
    log(`  ${def.key}: throughput, concurrency ${CONCURRENCY}, ${P.throughputS} s`);
    const s0 = snapshot();
    const c0 = { s: cpuOf(proc), d: cpuOf(up.proc) };
    const t = await runLoad(ep, { concurrency: CONCURRENCY, duration: P.throughputS }, `${def.key}-tput`);
    const c1 = { s: cpuOf(proc), d: cpuOf(up.proc) };
    const s1 = snapshot();
    served += t.completed + t.errors;
    const per = (ms: number) => t.completed > 0 ? (ms * 1000) / t.completed : NaN;
    const pct = (ms: number) => t.elapsedMs > 0 ? (100 * ms) / t.elapsedMs : NaN;
    res.throughput = {
      ...t,
      cpu: {
        serverUsPerReq: proc ? per(c1.s - c0.s) : null,
        fakeDifyUsPerReq: per(c1.d - c0.d),
        loadGenUsPerReq: per(t.clientCpuMs),
        loadGenCorePct: pct(t.clientCpuMs),
        serverCorePct: proc ? pct(c1.s - c0.s) : null,
        fakeDifyCorePct: pct(c1.d - c0.d),
      },
      machine: machineLoad(s0, s1, t.clientCpuTotalMs),
    };
    res.errors.push(...checkLoad(t, "throughput"));

    // (e) RSS after many requests
    if (isProxy && proc) await rssCheckpoint(P.rssB);
    if (proc) {
      const m = memKiB(proc.pid);
      res.rssEnd = { requests: served, rssKiB: m.rss, hwmKiB: m.hwm };
    }
  } finally {
    if (proc) {
      res.log = await logInfo(proc);
      await stop(proc);
    }
  }
}

/**
 * (b) Latency at concurrency 1, every path at once: each gets a warm-up load, then the paths take
 * turns, a round of requests each, so that whatever else the machine does falls on all of them
 * alike and the added latencies compare within one run.
 */
async function latencyPhase(defs: PathDef[], up: FakeDify, byKey: Record<PathKey, PathResult>): Promise<void> {
  const running: { def: PathDef; proc: Proc | null; sampler: LatencySampler }[] = [];
  try {
    for (const def of defs) {
      let proc: Proc | null = null;
      let port = up.port;
      if (def.start) ({ proc, port } = await def.start(up, `${def.key}-latency`));
      const ep = endpoint(def, port);
      running.push({ def, proc, sampler: new LatencySampler(ep) });
      log(`  ${def.key}: warm-up ${P.warmupS} s`);
      await runLoad(ep, { concurrency: CONCURRENCY, duration: P.warmupS }, `${def.key}-latency-warm`);
    }
    for (const r of running) await r.sampler.run(20, false);
    log(`  ${P.latencyRounds} rounds of ${P.latencyPerRound} sequential requests per path, taking turns`);
    for (let round = 0; round < P.latencyRounds; round++) {
      for (const r of running) await r.sampler.run(P.latencyPerRound);
    }
    for (const r of running) {
      const res = byKey[r.def.key];
      res.latency = r.sampler.result();
      if (res.latency.errors > 0) res.errors.push(`latency: ${res.latency.errors} errors`);
    }
  } finally {
    for (const r of running) {
      r.sampler.close();
      if (r.proc) await stop(r.proc);
    }
  }
}

/** (c) CPU per 1,000 events with 500 paced streams. */
async function pacedPhase(def: PathDef, up: FakeDify, res: PathResult): Promise<void> {
  let proc: Proc | null = null;
  let port = up.port;
  try {
    if (def.start) ({ proc, port } = await def.start(up, `${def.key}-paced`));
    const ep = endpoint(def, port);
    log(`  ${def.key}: paced warm-up ${P.pacedWarmS} s`);
    await runLoad(ep, { concurrency: 100, duration: P.pacedWarmS }, `${def.key}-pwarm`);
    await resetDifyStats(up);
    log(
      `  ${def.key}: paced, ${PACED_CONCURRENCY} streams x ${PACED_EVENTS} events every ${PACE_MS} ms, ${P.pacedS} s`,
    );
    const measured = proc ?? up.proc;
    const s0 = snapshot();
    const c0 = cpuMs(measured.pid, CLK_TCK);
    const d0 = cpuMs(up.proc.pid, CLK_TCK);
    const r = await runLoad(ep, {
      concurrency: PACED_CONCURRENCY,
      duration: P.pacedS,
      countMarkers: true,
    }, `${def.key}-paced`);
    const c1 = cpuMs(measured.pid, CLK_TCK);
    const d1 = cpuMs(up.proc.pid, CLK_TCK);
    const s1 = snapshot();
    const st = await difyStats(up);
    const events = r.markers;
    res.paced = {
      streams: PACED_CONCURRENCY,
      events,
      completed: r.completed,
      cpuMs: c1 - c0,
      cpuMsPer1kEvents: events > 0 ? (c1 - c0) / (events / 1000) : NaN,
      fakeDifyCpuMsPer1kEvents: events > 0 ? (d1 - d0) / (events / 1000) : NaN,
      maxInFlight: r.maxInFlight,
      upstreamPeakActive: Number(st.peakActive),
      errors: r.errors,
      elapsedMs: r.elapsedMs,
      note: proc ? undefined : "measured process: the fake Dify itself",
      machine: machineLoad(s0, s1, r.clientCpuTotalMs),
      latencyP50Ms: r.latencyP50Ms,
    };
    res.errors.push(...checkLoad(r, "paced", PACED_EVENTS));
    if (res.paced.upstreamPeakActive < PACED_CONCURRENCY) {
      res.errors.push(
        `paced: the fake Dify saw at most ${res.paced.upstreamPeakActive} of ${PACED_CONCURRENCY} streams at once`,
      );
    }
  } finally {
    if (proc) await stop(proc);
  }
}

/** (d) peak RSS with 1,000 concurrent slow streams. */
async function slowPhase(def: PathDef, up: FakeDify, res: PathResult): Promise<void> {
  if (!def.start) return;
  let proc: Proc | null = null;
  try {
    const s = await def.start(up, `${def.key}-slow`);
    proc = s.proc;
    const ep = endpoint(def, s.port);
    // A few unpaced requests first so the code paths are loaded, like a live server.
    await runLoad(
      endpoint(def, s.port, WARMUP_QUERY),
      { concurrency: 4, requests: 200, duration: 30 },
      `${def.key}-swarm`,
    );
    await resetDifyStats(up);
    const before = memKiB(proc.pid).rss;
    log(`  ${def.key}: ${SLOW_STREAMS} concurrent slow streams (1 event/s, ${P.slowEvents} events)`);
    let peak = before;
    let peakActive = 0;
    let sampling = true;
    const pid = proc.pid;
    const sampler = (async () => {
      // Bounded by the load run below (sampling=false), and by a count.
      for (let i = 0; sampling && i < 2000; i++) {
        try {
          const m = memKiB(pid).rss;
          if (m > peak) peak = m;
          if (i % 5 === 0) {
            const st = await difyStats(up);
            peakActive = Math.max(peakActive, Number(st.peakActive));
          }
        } catch { /* process gone */ }
        await sleep(100);
      }
    })();
    const r = await runLoad(ep, {
      concurrency: SLOW_STREAMS,
      requests: SLOW_STREAMS,
      duration: P.slowEvents + 20,
      countMarkers: true,
      grace: 60,
    }, `${def.key}-slow`);
    sampling = false;
    await sampler;
    const st = await difyStats(up);
    peakActive = Math.max(peakActive, Number(st.peakActive));
    const m = memKiB(proc.pid);
    peak = Math.max(peak, m.rss);
    res.slow = {
      streams: SLOW_STREAMS,
      completed: r.completed,
      errors: r.errors,
      rssBeforeKiB: before,
      peakRssKiB: Math.max(peak, m.hwm),
      hwmKiB: m.hwm,
      kibPerStream: (Math.max(peak, m.hwm) - before) / SLOW_STREAMS,
      maxInFlight: r.maxInFlight,
      upstreamPeakActive: peakActive,
      firstError: r.firstError,
    };
    res.errors.push(...checkLoad(r, "slow", P.slowEvents));
    if (peakActive < SLOW_STREAMS) {
      res.errors.push(`slow: upstream saw at most ${peakActive} concurrent streams`);
    }
  } finally {
    if (proc) await stop(proc);
  }
}

// ----------------------------------------------------------------- report --

const fmt = (x: number | undefined | null, digits = 0) =>
  x === undefined || x === null || Number.isNaN(x) ? "—" : x.toLocaleString("en-US", {
    minimumFractionDigits: digits,
    maximumFractionDigits: digits,
  });
const mib = (kib: number | undefined) => (kib === undefined ? undefined : kib / 1024);

function renderMarkdown(meta: Record<string, unknown>, results: PathResult[], notes: string[]): string {
  const L: string[] = [];
  L.push(`# dify-openai benchmark${opts.quick ? " (--quick)" : ""}`);
  L.push("");
  L.push(
    `${meta.date} · ${meta.cpu} · nproc ${meta.nproc} · deno ${meta.deno} · bun ${meta.bun ?? "missing"} · ` +
      `kernel ${meta.kernel}`,
  );
  L.push("");
  const rssA = P.rssA.toLocaleString("en-US");
  const rssB = P.rssB.toLocaleString("en-US");
  L.push(
    `| path | req/s (c=${CONCURRENCY}) | p50 ms (c=1) | p99 ms (c=1) | TTFC p50 ms | ` +
      `CPU ms / 1k events (${PACED_CONCURRENCY} paced) | peak RSS MiB (${SLOW_STREAMS} slow) | ` +
      `RSS MiB idle | RSS MiB @${rssA} | RSS MiB @${rssB} |`,
  );
  L.push("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
  for (const r of results) {
    if (r.skipped && !r.throughput) {
      L.push(`| ${r.label} | skipped: ${r.skipped} | | | | | | | | |`);
      continue;
    }
    const a = r.rssAfter?.[0];
    const b = r.rssAfter?.[1];
    const rssCell = (target: number, x?: { requests: number; rssKiB: number; capped: boolean }) =>
      x
        ? fmt(mib(x.rssKiB), 1) +
          (x.capped || Math.abs(x.requests - target) > target * 0.05 ? ` (after ${fmt(x.requests)})` : "")
        : "—";
    L.push(
      `| ${r.label} | ${fmt(r.throughput?.rps)} | ${fmt(r.latency?.p50Ms, 3)} | ${fmt(r.latency?.p99Ms, 3)} | ` +
        `${fmt(r.latency?.ttfcP50Ms, 3)} | ${fmt(r.paced?.cpuMsPer1kEvents, 1)}${r.paced?.note ? "*" : ""} | ` +
        `${fmt(mib(r.slow?.peakRssKiB), 1)} | ${fmt(mib(r.rssIdleKiB), 1)} | ${rssCell(P.rssA, a)} | ${
          rssCell(P.rssB, b)
        } |`,
    );
  }
  L.push("");
  L.push(
    'TTFC = time to the first content chunk (proxy: first chunk with non-empty `"content"`, or the first ' +
      "`response.output_text.delta` event on /v1/responses; " +
      'direct/pass-throughs: first `"event":"message"` frame). ' +
      `Paced: ${PACED_CONCURRENCY} concurrent streams of ${PACED_EVENTS} events, one every ${PACE_MS} ms; ` +
      "CPU = utime+stime of the path's process (*direct row: the fake Dify's own CPU). " +
      `Slow: ${SLOW_STREAMS} concurrent streams, one event per second, ${P.slowEvents} events.`,
  );
  L.push("");
  L.push("## Ratios");
  L.push("");
  const by = Object.fromEntries(results.map((r) => [r.key, r]));
  const ratio = (a?: number, b?: number) => a && b ? (a / b).toFixed(2) : "—";
  const directP50 = by.direct?.latency?.p50Ms;
  const directTtfc = by.direct?.latency?.ttfcP50Ms;
  for (const k of ["deno", "responses", "deno-off", "bun"] as const) {
    const r = by[k];
    if (!r?.throughput) continue;
    L.push(
      `- ${r.label}: throughput ${ratio(r.throughput.rps, by.js?.throughput?.rps)}× JS pass-through, ` +
        `${ratio(r.throughput.rps, by.native?.throughput?.rps)}× native pipe, ` +
        `${ratio(r.throughput.rps, by.byob?.throughput?.rps)}× BYOB pass-through; ` +
        `CPU per 1k events ${ratio(r.paced?.cpuMsPer1kEvents, by.js?.paced?.cpuMsPer1kEvents)}× JS pass-through ` +
        `(${fmt(r.paced?.cpuMsPer1kEvents, 1)} vs ${fmt(by.js?.paced?.cpuMsPer1kEvents, 1)} ms)`,
    );
  }
  const [resp, chat] = [by.responses, by.deno];
  if (resp?.throughput && chat?.throughput) {
    const cpu = ratio(resp.throughput.cpu.serverUsPerReq ?? NaN, chat.throughput.cpu.serverUsPerReq ?? NaN);
    const rps = ratio(resp.throughput.rps, chat.throughput.rps);
    const p50 = ratio(resp.latency?.p50Ms, chat.latency?.p50Ms);
    L.push(
      `- ${resp.label} / ${chat.label}, the same answer: CPU per request ${cpu}×, throughput ${rps}×, ` +
        `p50 at c=1 ${p50}× (throughput phases one after the other; the ladder below takes them round by round)`,
    );
  }
  for (const k of ["native", "byob", "js", "deno", "responses", "deno-off", "bun"] as const) {
    const r = by[k];
    if (!r?.latency || directP50 === undefined) continue;
    L.push(
      `- added latency, ${r.label}: p50 +${fmt((r.latency.p50Ms - directP50) * 1000)} µs, ` +
        `TTFC p50 +${fmt((r.latency.ttfcP50Ms - (directTtfc ?? NaN)) * 1000)} µs`,
    );
  }
  L.push("");
  L.push("## Where the CPU went (throughput phase, µs per request)");
  L.push("");
  L.push(
    "| path | path process | fake Dify | load generator | path process % of a core | load generator % of a core | " +
      "other processes % of a core | max in flight | p50 ms under load |",
  );
  L.push("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
  for (const r of results) {
    const t = r.throughput;
    if (!t) continue;
    L.push(
      `| ${r.label} | ${fmt(t.cpu.serverUsPerReq)} | ${fmt(t.cpu.fakeDifyUsPerReq)} | ${
        fmt(t.cpu.loadGenUsPerReq)
      } | ` +
        `${fmt(t.cpu.serverCorePct ?? t.cpu.fakeDifyCorePct)} | ${fmt(t.cpu.loadGenCorePct)} | ` +
        `${fmt(t.machine.otherCorePct)} | ${t.maxInFlight} | ${fmt(t.latencyP50Ms, 2)} |`,
    );
  }
  L.push("");
  L.push(
    'The machine has 2 cores (200 %). "Other processes" is busy CPU in /proc/stat not used by this ' +
      "bench's processes: anything else running on the machine makes the figures noisy.",
  );
  L.push("");
  L.push("## Details");
  L.push("");
  for (const r of results) {
    if (r.rssEnd) {
      L.push(
        `- ${r.label}: RSS ${fmt(mib(r.rssEnd.rssKiB), 1)} MiB (peak ${fmt(mib(r.rssEnd.hwmKiB), 1)}) after ` +
          `${fmt(r.rssEnd.requests)} requests; ` +
          (r.log && r.log.stdoutLines
            ? `stdout log ${fmt(r.log.stdoutBytes / Math.max(1, r.log.stdoutLines))} bytes per line, ${
              fmt(r.log.stdoutLines)
            } lines`
            : "no stdout log lines"),
      );
    }
  }
  for (const r of results) {
    if (r.paced) {
      L.push(
        `- ${r.label}, paced: ${r.paced.maxInFlight} client streams in flight, fake Dify saw ` +
          `${r.paced.upstreamPeakActive} at once; ${fmt(r.paced.events)} events in ${
            fmt(r.paced.elapsedMs / 1000, 1)
          } s; ` +
          `stream p50 ${fmt(r.paced.latencyP50Ms)} ms (ideal ${(PACED_EVENTS - 1) * PACE_MS} ms); ` +
          `other processes ${fmt(r.paced.machine.otherCorePct)} % of a core`,
      );
    }
    if (r.slow) {
      L.push(
        `- ${r.label}, slow: ${r.slow.maxInFlight} client streams in flight, fake Dify saw ` +
          `${r.slow.upstreamPeakActive} at once; ${r.slow.completed}/${r.slow.streams} completed; ` +
          `RSS ${fmt(mib(r.slow.rssBeforeKiB), 1)} → ${fmt(mib(r.slow.peakRssKiB), 1)} MiB ` +
          `(${fmt(r.slow.kibPerStream, 1)} KiB per open stream)`,
      );
    }
  }
  if (notes.length) {
    L.push("");
    L.push("## Notes and problems seen");
    L.push("");
    for (const n of notes) L.push(`- ${n.replaceAll("\n", " ")}`);
  }
  L.push("");
  return L.join("\n");
}

// ------------------------------------------------------------------- main --

const T0 = performance.now();

async function main() {
  const cpuinfo = await Deno.readTextFile("/proc/cpuinfo").catch(() => "");
  const bunVersion = await commandOutput("bun", ["--version"]);
  const meta: Record<string, unknown> = {
    date: new Date().toISOString(),
    nproc: Number(await commandOutput("nproc", [])) || navigator.hardwareConcurrency,
    cpu: /model name\s*:\s*(.*)/.exec(cpuinfo)?.[1] ?? "unknown",
    deno: Deno.version.deno,
    bun: bunVersion,
    node: await commandOutput("node", ["--version"]),
    kernel: Deno.osRelease(),
    clkTck: CLK_TCK,
    quick: opts.quick,
    proxyEntry: opts.proxyEntry,
    conversationMode: opts.conversationMode,
    events: opts.events,
    phases: P,
  };
  console.log(
    `machine: ${meta.cpu}, nproc ${meta.nproc}, deno ${meta.deno}, bun ${meta.bun ?? "missing"}, ` +
      `node ${meta.node ?? "missing"}, kernel ${meta.kernel}, ${meta.date}`,
  );
  log(`logs: ${LOG_DIR}${opts.keepLogs ? "" : " (removed at the end; --keep-logs keeps them)"}`);

  const notes: string[] = [];
  const results: PathResult[] = opts.paths.map((k) => ({ key: k, label: PATHS[k].label, errors: [] }));
  const byKey = Object.fromEntries(results.map((r) => [r.key, r])) as Record<PathKey, PathResult>;

  let entryExists = true;
  try {
    Deno.statSync(`${ROOT}/${opts.proxyEntry}`);
  } catch {
    try {
      Deno.statSync(opts.proxyEntry);
    } catch {
      entryExists = false;
    }
  }
  for (const k of ["deno", "responses", "deno-off", "bun"] as const) {
    const r = byKey[k];
    if (!r) continue;
    if (!entryExists) r.skipped = `${opts.proxyEntry} not found`;
    else if (k === "bun" && !bunVersion) r.skipped = "bun not installed";
    if (r.skipped) notes.push(`${r.label}: skipped (${r.skipped})`);
  }
  if (opts.proxyEntry !== "main.ts") notes.push(`proxy rows run ${opts.proxyEntry}, not main.ts`);

  log("starting fake Dify servers (fast, paced, slow)");
  const fast = await startFakeDify("dify-fast", opts.events, 0);
  const paced = await startFakeDify("dify-paced", PACED_EVENTS, PACE_MS);
  const slow = await startFakeDify("dify-slow", P.slowEvents, SLOW_PACE_MS);

  const runPhase = async (r: PathResult, name: string, fn: () => Promise<void>) => {
    try {
      await fn();
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      r.errors.push(`${name}: ${msg}`);
      log(`  ${r.key}: ${name} failed: ${msg.split("\n")[0]}`);
    }
  };

  for (const r of results) {
    if (r.skipped) continue;
    log(`${r.label}: throughput${PATHS[r.key].kind !== "dify" ? " / RSS" : ""}`);
    await runPhase(r, "fast", () => fastPhases(PATHS[r.key], fast, r));
  }
  const latencyPaths = results.filter((r) => !r.skipped);
  if (latencyPaths.length) {
    log(`latency at concurrency 1: ${latencyPaths.map((r) => r.key).join(", ")}`);
    try {
      await latencyPhase(latencyPaths.map((r) => PATHS[r.key]), fast, byKey);
    } catch (e) {
      const msg = e instanceof Error ? e.message : String(e);
      for (const r of latencyPaths) r.errors.push(`latency: ${msg}`);
      log(`  latency failed: ${msg.split("\n")[0]}`);
    }
  }
  for (const r of results) {
    if (r.skipped || !P.pacedPaths.includes(r.key)) continue;
    log(`${r.label}: paced CPU`);
    await runPhase(r, "paced", () => pacedPhase(PATHS[r.key], paced, r));
  }
  for (const r of results) {
    if (r.skipped || !P.slowPaths.includes(r.key)) continue;
    log(`${r.label}: slow streams RSS`);
    await runPhase(r, "slow", () => slowPhase(PATHS[r.key], slow, r));
  }

  const fastStats = await difyStats(fast);
  meta.fakeDifyAuthHeaders = fastStats.authHeaders;
  const auths = Object.keys(fastStats.authHeaders as Record<string, number>);
  if (auths.some((a) => a !== `Bearer ${API_KEY}`)) {
    notes.push(
      `fake Dify saw Authorization headers other than "Bearer ${API_KEY}": ${JSON.stringify(fastStats.authHeaders)}`,
    );
  }
  meta.fakeDifyBadRequests = fastStats.badRequests;
  if (Number(fastStats.badRequests) > 0) {
    notes.push(`fake Dify answered ${fastStats.badRequests} requests with 400 (bad body)`);
  }
  for (const r of results) {
    const other = Math.max(r.throughput?.machine.otherCorePct ?? 0, r.paced?.machine.otherCorePct ?? 0);
    if (other > 15) {
      notes.push(
        `${r.label}: other processes on the machine used up to ${fmt(other)} % of a core during the measurements; ` +
          "its figures are noisy",
      );
    }
    for (const e of r.errors) notes.push(`${r.label}: ${e}`);
    if (r.errors.length && r.log?.stderrTail) notes.push(`${r.label}: stderr: ${r.log.stderrTail.slice(-500)}`);
  }
  meta.durationS = Math.round((performance.now() - T0) / 1000);

  let md = renderMarkdown(meta, results, notes);
  if (opts.ladder) {
    log("the ladder: every row at once, taking turns (bench/ladder/ladder.ts)");
    const rounds = opts.quick ? { rounds: 3, seconds: 2, latencySeconds: 1 } : {};
    const table = await ladder({
      ...LADDER_DEFAULTS,
      ...rounds,
      main: opts.proxyEntry,
      before: opts.before,
      events: opts.events,
    });
    md += `\n## Ladder (one interleaved run)\n\n${table}\n\n${LADDER_NOTE}\n`;
  }
  console.log("\n" + md);
  if (opts.write) {
    await Deno.writeTextFile(
      `${BENCH_DIR}/results.json`,
      JSON.stringify({ meta, results, notes }, null, 2) + "\n",
    );
    await Deno.writeTextFile(`${BENCH_DIR}/results.md`, md);
    log(`wrote bench/results.json and bench/results.md (${meta.durationS} s)`);
  }
}

let failed = false;
try {
  await main();
} catch (e) {
  failed = true;
  console.error("bench failed:", e);
} finally {
  await cleanup();
}
Deno.exit(failed ? 1 : 0);
