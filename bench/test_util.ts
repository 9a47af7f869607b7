/**
 * Test helpers, one set for every test file: start the bridge in-process (Deno) or as a subprocess
 * (`deno run main.ts` or `bun main.ts`) against the fake Dify, read what it streams back, hold a
 * conversation, and wait for a condition rather than for a time.
 */
import assert from "node:assert/strict";
import { DatabaseSync } from "node:sqlite";
import OpenAI from "openai";
import { type FakeDify, type FakeDifyOptions, readFixture, startFakeDify } from "./fake_dify.ts";
import {
  byobReader,
  type ChunkReader,
  type Config,
  ConversationStore,
  createServer,
  DenoKvStore,
  loadConfig,
  type Metrics,
  type Store,
} from "../main.ts";

export const ROOT = new URL("../", import.meta.url);
export const MAIN = new URL("../main.ts", import.meta.url).pathname;

/** Registers a test without Deno's resource and op sanitizers: servers and streams outlive a test body. */
export function test(name: string, fn: () => Promise<void> | void): void {
  Deno.test({ name, sanitizeResources: false, sanitizeOps: false, fn });
}

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/**
 * Polls `check` every 20 ms until it is true; returns false once `ms` have passed without it.
 * Given `what`, a timeout throws `timed out waiting for <what>` instead.
 */
export async function until(check: () => boolean, ms: number, what?: string): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) {
      if (what !== undefined) throw new Error(`timed out waiting for ${what}`);
      return false;
    }
    await sleep(20);
  }
  return true;
}

/** Like `until`, for a check that has to ask over the network: polls every 20 ms, throws after `ms`. */
export async function eventually(check: () => Promise<boolean>, ms: number, what: string): Promise<void> {
  for (const deadline = Date.now() + ms; !(await check()); await sleep(20)) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
  }
}

/** A Dify fixture's parsed `data:` events. */
export async function fixtureEvents(name: string): Promise<Record<string, unknown>[]> {
  const text = new TextDecoder().decode(await readFixture(`${name}.sse`));
  return text.split("\n").filter((l) => l.startsWith("data: ")).map((l) => JSON.parse(l.slice(6)));
}

/** The answer text fixture events carry: their message / agent_message / message_file answers joined. */
export function answerOf(events: Record<string, unknown>[]): string {
  return events
    .filter((e) => ["message", "agent_message", "message_file"].includes(String(e.event)))
    .map((e) => typeof e.answer === "string" ? e.answer : "")
    .join("");
}

/** The token usage of fixture events' `message_end`, as OpenAI reports it. */
export function usageOf(events: Record<string, unknown>[]) {
  const end = events.find((e) => e.event === "message_end") as {
    metadata: { usage: { prompt_tokens: number; completion_tokens: number; total_tokens: number } };
  };
  const u = end.metadata.usage;
  return { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens, total_tokens: u.total_tokens };
}

/**
 * A store whose every call fails: synchronously (a broken driver, like bun:sqlite) or as a rejected
 * promise (like KV). `close` succeeds, so a bridge around it shuts down cleanly.
 */
export class BrokenStore implements Store {
  calls = 0;
  constructor(private sync: boolean) {}
  #fail(op: string): Promise<never> {
    this.calls++;
    const e = new Error(`${op}: the database is on fire`);
    if (this.sync) throw e;
    return Promise.reject(e);
  }
  get<T>(): Promise<T | null> {
    return this.#fail("get");
  }
  set(): Promise<void> {
    return this.#fail("set");
  }
  setIf(): Promise<boolean> {
    return this.#fail("setIf");
  }
  delete(): Promise<void> {
    return this.#fail("delete");
  }
  close(): void {}
}

/** A running bridge: its base URL (with /v1), what it logged, and how to stop it. */
export interface Bridge {
  url: string;
  logs: string[];
  warnings: string[];
  config: Config;
  client(key?: string): OpenAI;
  close(): Promise<void>;
}

export interface BridgeOptions {
  /** A store to use instead of Deno KV at `env.KV_PATH` (default `:memory:`). */
  store?: Store;
  bodyReader?: (body: ReadableStream<Uint8Array>) => ChunkReader;
  /** Counts for `GET /metrics` (none: no such route). */
  metrics?: Metrics;
}

/** Starts the bridge in this process on port 0 with the given environment. */
export async function startBridge(env: Record<string, string>, opts: BridgeOptions = {}): Promise<Bridge> {
  const config = loadConfig({ KV_PATH: ":memory:", ...env });
  const store = opts.store ?? new DenoKvStore(await Deno.openKv(config.kvPath));
  const logs: string[] = [];
  const warnings: string[] = [];
  const counted = opts.metrics ? opts.metrics.countWrites(store) : store;
  const conversations = new ConversationStore(counted, config.conversationTtlMs, (m) => warnings.push(m));
  const server = createServer(config, {
    metrics: opts.metrics,
    store: conversations,
    log: (line) => logs.push(line),
    warn: (m) => warnings.push(m),
    fetch: (input, init) => fetch(input, init),
    bodyReader: opts.bodyReader ?? byobReader,
    now: () => performance.now(),
  });
  const http = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen() {} }, server.handler);
  const url = `http://127.0.0.1:${http.addr.port}/v1`;
  return {
    url,
    logs,
    warnings,
    config,
    client: (key = "sk-test") => new OpenAI({ baseURL: url, apiKey: key, maxRetries: 0, timeout: 30_000 }),
    async close() {
      server.abortAll();
      await http.shutdown();
      await conversations.flush();
      store.close();
    },
  };
}

/** A fake Dify and a bridge in front of it. */
export interface Rig {
  fake: FakeDify;
  bridge: Bridge;
  client: OpenAI;
  close(): Promise<void>;
}

/** Bridge options, and the fake Dify's under `dify`. */
export type RigOptions = BridgeOptions & { dify?: FakeDifyOptions };

/** A fake Dify (chat app) and a bridge in front of it; `env` adds to (or overrides) DIFY_API_URL/DIFY_API_KEY. */
export async function startRig(env: Record<string, string> = {}, opts: RigOptions = {}): Promise<Rig> {
  const { dify: difyOptions, ...bridgeOptions } = opts;
  const fake = await startFakeDify(difyOptions);
  let bridge: Bridge;
  try {
    bridge = await startBridge({ DIFY_API_URL: fake.url, DIFY_API_KEY: "app-chat", ...env }, bridgeOptions);
  } catch (e) {
    await fake.close();
    throw e;
  }
  return {
    fake,
    bridge,
    client: bridge.client(),
    async close() {
      await bridge.close();
      await fake.close();
    },
  };
}

/** A fake Dify and a bridge in front of it, closed after `fn`. */
export async function withBridge(
  env: Record<string, string>,
  fn: (ctx: { dify: FakeDify; bridge: Bridge }) => Promise<void>,
  opts: RigOptions = {},
): Promise<void> {
  const rig = await startRig(env, opts);
  try {
    await fn({ dify: rig.fake, bridge: rig.bridge });
  } finally {
    await rig.close();
  }
}

/** A bridge running as its own process: `deno run main.ts` or `bun main.ts`. */
export interface ProcessBridge {
  url: string;
  port: number;
  process: Deno.ChildProcess;
  /** Everything the process printed so far (stdout + stderr). */
  output(): string;
  /** SIGTERM, then wait for the exit code. */
  stop(signal?: Deno.Signal): Promise<number>;
}

export function bunAvailable(): boolean {
  try {
    return new Deno.Command("bun", { args: ["--version"], stdout: "null", stderr: "null" }).outputSync().success;
  } catch {
    return false;
  }
}

/** A port nobody listens on: free to bind, or to dial for a refused connection. */
export function closedPort(): number {
  const listener = Deno.listen({ port: 0, hostname: "127.0.0.1" });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/**
 * Starts main.ts in a subprocess on a free port and waits until /healthz answers. `openFiles` lowers
 * the process's open-file limit (`ulimit -n`) first.
 */
export async function startProcess(
  runtime: "deno" | "bun",
  env: Record<string, string>,
  opts: { openFiles?: number } = {},
): Promise<ProcessBridge> {
  const port = closedPort();
  const args = runtime === "deno" ? ["run", "--allow-all", "--unstable-kv", MAIN] : [MAIN];
  const limited = opts.openFiles ? ["-c", `ulimit -n ${opts.openFiles} && exec "$0" "$@"`, runtime] : [];
  const process = new Deno.Command(opts.openFiles ? "bash" : runtime, {
    args: [...limited, ...args],
    cwd: ROOT.pathname,
    env: { PORT: String(port), KV_PATH: ":memory:", BUN_CONFIG_MAX_HTTP_REQUESTS: "2048", ...env },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  let text = "";
  const decoder = new TextDecoder();
  const drain = async (stream: ReadableStream<Uint8Array>) => {
    for await (const chunk of stream) text += decoder.decode(chunk, { stream: true });
  };
  const drained = Promise.all([drain(process.stdout), drain(process.stderr)]);
  const url = `http://127.0.0.1:${port}/v1`;
  const deadline = Date.now() + 15_000;
  for (;;) {
    try {
      const res = await fetch(`http://127.0.0.1:${port}/healthz`);
      await res.body?.cancel();
      if (res.ok) break;
    } catch { /* not up yet */ }
    if (Date.now() > deadline) {
      try {
        process.kill("SIGKILL");
      } catch { /* gone */ }
      await process.status;
      await drained;
      throw new Error(`${runtime} main.ts did not start:\n${text}`);
    }
    await sleep(50);
  }
  return {
    url,
    port,
    process,
    output: () => text,
    async stop(signal: Deno.Signal = "SIGTERM") {
      try {
        process.kill(signal);
      } catch { /* already gone */ }
      const status = await process.status;
      await drained;
      return status.code;
    },
  };
}

/** An OpenAI SDK client for a base URL. */
export function openai(url: string, key = "sk-test"): OpenAI {
  return new OpenAI({ baseURL: url, apiKey: key, maxRetries: 0, timeout: 30_000 });
}

/** Streams a completion through the SDK and returns the joined content, reasoning, chunks and usage. */
export async function streamText(client: OpenAI, body: Record<string, unknown>) {
  const stream = await client.chat.completions.create({ ...body, stream: true } as never) as unknown as AsyncIterable<
    Record<string, unknown>
  >;
  let content = "";
  let reasoning = "";
  let usage: Record<string, number> | undefined;
  const chunks: Record<string, unknown>[] = [];
  for await (const chunk of stream) {
    chunks.push(chunk);
    const choices = chunk.choices as { delta: Record<string, string> }[];
    for (const c of choices) {
      content += c.delta?.content ?? "";
      reasoning += c.delta?.reasoning_content ?? "";
    }
    if (chunk.usage) usage = chunk.usage as Record<string, number>;
  }
  return { content, reasoning, usage, chunks };
}

/** POSTs a chat completion with raw fetch; returns status, headers and the raw body text. */
export async function rawChat(url: string, body: unknown, headers: Record<string, string> = {}) {
  const res = await fetch(`${url}/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer sk-test", ...headers },
    body: typeof body === "string" ? body : JSON.stringify(body),
  });
  return { status: res.status, headers: res.headers, text: await res.text() };
}

/** The `data:` payloads of an SSE body, parsed (except `[DONE]`, kept as the string). */
export function sseData(text: string): unknown[] {
  return text.split(/\r?\n/).filter((l) => l.startsWith("data: ")).map((l) => {
    const data = l.slice(6);
    return data === "[DONE]" ? data : JSON.parse(data);
  });
}

// deno-lint-ignore no-explicit-any
export const user = (content: any) => ({ role: "user" as const, content });
export const assistant = (content: string) => ({ role: "assistant" as const, content });

// ─── Reading answers back ───────────────────────────────────────────────────────────────────────

/** An SSE body from the bridge, read back: its frames, joined content and reasoning, the last data frame, [DONE]. */
export function readSse(text: string) {
  const frames = sseData(text);
  let content = "";
  let reasoning = "";
  for (const f of frames) {
    const delta = (f as { choices?: { delta?: { content?: string; reasoning_content?: string } }[] }).choices?.[0]
      ?.delta;
    content += delta?.content ?? "";
    reasoning += delta?.reasoning_content ?? "";
  }
  const data = frames.filter((f) => f !== "[DONE]") as { error?: { code: string; message: string } }[];
  return { frames, content, reasoning, last: data[data.length - 1], done: frames.includes("[DONE]") };
}

/** Asserts an OpenAI-shaped error body, `{"error": {message, type, param, code}}`, and returns the error. */
export function errorBody(text: string, context = "") {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    assert.fail(`${context}: error body is not JSON: ${text.slice(0, 200)}`);
  }
  const e = (body as { error?: Record<string, unknown> }).error;
  assert.ok(e && typeof e === "object", `${context}: no error object in ${text.slice(0, 200)}`);
  assert.equal(typeof e.message, "string", context);
  assert.equal(typeof e.type, "string", context);
  assert.ok("param" in e && (e.param === null || typeof e.param === "string"), `${context}: param`);
  assert.ok("code" in e && (e.code === null || typeof e.code === "string"), `${context}: code`);
  return e as { message: string; type: string; param: string | null; code: string | null };
}

/** The bridge's /healthz, asserted ok: how many streams are open. */
export async function health(bridgeUrl: string): Promise<{ status: string; streams: number }> {
  const res = await fetch(bridgeUrl.replace(/\/v1$/, "") + "/healthz");
  const body = await res.json();
  assert.equal(res.status, 200);
  assert.equal(body.status, "ok");
  return body;
}

/** What a chat completion through the SDK came to: the answer, or the error it raised (and whether mid-stream). */
export async function sdkOutcome(client: OpenAI, body: Record<string, unknown>) {
  let content = "";
  try {
    if (body.stream) {
      const stream = await client.chat.completions.create(body as never) as unknown as AsyncIterable<
        { choices: { delta: { content?: string } }[] }
      >;
      try {
        for await (const chunk of stream) for (const c of chunk.choices) content += c.delta?.content ?? "";
      } catch (e) {
        return { content, error: e, midStream: true };
      }
    } else {
      const done = await client.chat.completions.create(body as never) as {
        choices: { message: { content: string } }[];
      };
      content = done.choices[0].message.content;
    }
  } catch (e) {
    return { content, error: e, midStream: false };
  }
  return { content, error: undefined, midStream: false };
}

/** Reads a streamed response until `done(text so far)` holds, or to its end; fails after 15 s without progress. */
export async function readUntil(
  reader: ReadableStreamDefaultReader<Uint8Array>,
  sofar: string,
  done: (text: string) => boolean,
): Promise<string> {
  const decoder = new TextDecoder();
  let text = sofar;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`stream stalled; so far: ${text.slice(-300)}`)), 15_000);
  });
  try {
    while (!done(text)) {
      const read = await Promise.race([reader.read(), timeout]);
      if (read.done) return text + decoder.decode();
      text += decoder.decode(read.value, { stream: true });
    }
  } finally {
    clearTimeout(timer);
  }
  return text;
}

/** True once an SSE text's complete frames carry some answer content. */
export function hasContent(text: string): boolean {
  return readSse(text.slice(0, text.lastIndexOf("\n\n") + 2)).content !== "";
}

/** Streams with raw fetch and aborts as soon as the text matches `stopAt` (some content by default). */
export async function streamThenAbort(url: string, body: Record<string, unknown>, stopAt = /"content":"[^"]/) {
  const ac = new AbortController();
  const res = await fetch(`${url}/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer sk-test" },
    body: JSON.stringify({ ...body, stream: true }),
    signal: ac.signal,
  });
  assert.equal(res.status, 200);
  const reader = res.body!.getReader();
  const text = await readUntil(reader, "", (t) => stopAt.test(t));
  assert.match(text, stopAt, "the stream ended first");
  ac.abort();
  await reader.cancel().catch(() => {});
  return text;
}

/**
 * Waits until nothing accepts TCP connections on the port (a connection reset while the listener closes
 * counts as refused); false if something still accepts after `ms`.
 */
export async function untilRefused(port: number, ms = 5_000): Promise<boolean> {
  for (const deadline = Date.now() + ms; Date.now() < deadline; await sleep(10)) {
    try {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      conn.close();
    } catch (e) {
      if (e instanceof Deno.errors.ConnectionRefused || e instanceof Deno.errors.ConnectionReset) return true;
      throw e;
    }
  }
  return false;
}

/** Sends raw HTTP over a new TCP connection; returns what the server answered by `waitMs` (its first JSON body). */
export async function rawHttp(port: number, head: string, body: string, waitMs: number): Promise<string> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    await conn.write(new TextEncoder().encode(head + body));
    const buf = new Uint8Array(65536);
    const decoder = new TextDecoder();
    let text = "";
    const late = new Promise<null>((resolve) => timer = setTimeout(() => resolve(null), waitMs));
    while (!/\r\n\r\n[\s\S]*\}/.test(text)) {
      const n = await Promise.race([conn.read(buf).catch(() => null), late]);
      if (n === null) break;
      text += decoder.decode(buf.subarray(0, n), { stream: true });
    }
    return text;
  } finally {
    clearTimeout(timer);
    try {
      conn.close();
    } catch { /* closed by the server */ }
  }
}

/** How many times `needle` occurs in `haystack`. */
export function countOf(haystack: string, needle: string): number {
  return needle ? haystack.split(needle).length - 1 : 0;
}

// ─── Conversations ──────────────────────────────────────────────────────────────────────────────

/** The fake Dify's generated chat answer `Turn <n> of <conv8>: <query>`, taken apart (throws on any other). */
export function turnOf(answer: string): { n: number; conv: string; query: string } {
  const m = /^Turn (\d+) of ([0-9a-f]{8}): ([\s\S]*)$/.exec(answer);
  assert.ok(m, `not a fake Dify chat answer: ${JSON.stringify(answer.slice(0, 120))}`);
  return { n: Number(m[1]), conv: m[2], query: m[3] };
}

export type ChatMessage = { role: string; content: unknown };

export interface ChatAnswer {
  content: string;
  /** The response header X-Dify-Conversation-Id. */
  conversationId: string | null;
}

/** One chat completion through the SDK, streaming or not, with the conversation header. */
export async function sendChat(
  client: OpenAI,
  messages: ChatMessage[],
  opts: { stream?: boolean; extra?: Record<string, unknown>; headers?: Record<string, string> } = {},
): Promise<ChatAnswer> {
  const body = { model: "dify", messages, ...opts.extra } as Record<string, unknown>;
  const options = opts.headers ? { headers: opts.headers } : undefined;
  if (!opts.stream) {
    const { data, response } = await client.chat.completions.create(body as never, options).withResponse();
    const completion = data as unknown as { choices: { message: { content: string } }[] };
    return {
      content: completion.choices[0].message.content,
      conversationId: response.headers.get("x-dify-conversation-id"),
    };
  }
  const { data, response } = await client.chat.completions.create({ ...body, stream: true } as never, options)
    .withResponse();
  let content = "";
  for await (const chunk of data as unknown as AsyncIterable<{ choices: { delta?: { content?: string } }[] }>) {
    for (const c of chunk.choices) content += c.delta?.content ?? "";
  }
  return { content, conversationId: response.headers.get("x-dify-conversation-id") };
}

/** A client-side chat that resends its whole history each turn, as OpenAI clients do. */
export class ChatSession {
  messages: ChatMessage[] = [];
  constructor(
    private client: OpenAI,
    private opts: { stream?: boolean; extra?: Record<string, unknown>; system?: string } = {},
  ) {
    if (opts.system) this.messages.push({ role: "system", content: opts.system });
  }
  async say(text: string, extra: Record<string, unknown> = {}): Promise<ChatAnswer> {
    this.messages.push(user(text));
    const answer = await sendChat(this.client, this.messages, {
      stream: this.opts.stream,
      extra: { ...this.opts.extra, ...extra },
    });
    this.messages.push(assistant(answer.content));
    return answer;
  }
}

/** The fake Dify conversations holding a turn whose query includes `text`. */
export function conversationsHolding(fake: FakeDify, text: string): string[] {
  return [...fake.conversations.values()].filter((c) => c.turns.some((t) => t.query.includes(text))).map((c) => c.id);
}

/** A store file in a fresh temporary directory (`file` may name a subfolder main.ts has to create). */
export async function tempStoreFile(file = "conversations.kv"): Promise<{ path: string; remove(): Promise<void> }> {
  const dir = await Deno.makeTempDir({ prefix: "dify_openai_store_" });
  return { path: `${dir}/${file}`, remove: () => Deno.remove(dir, { recursive: true }).catch(() => {}) };
}

/**
 * Waits until a store file (Deno KV, or Bun's SQLite for a `.sqlite` path) holds `turns` history fingerprints:
 * each is written after its turn's head, so another process can then continue the conversation.
 */
export async function untilFingerprints(path: string, turns: number): Promise<void> {
  const count = path.endsWith(".sqlite") ? sqliteFingerprints : kvFingerprints;
  for (const deadline = Date.now() + 10_000; Date.now() < deadline; await sleep(5)) {
    if (await count(path) >= turns) return;
  }
  throw new Error(`the store file never got ${turns} fingerprints`);
}

async function kvFingerprints(path: string): Promise<number> {
  const kv = await Deno.openKv(path);
  try {
    let n = 0;
    for await (const _ of kv.list({ prefix: ["fp"] })) n++;
    return n;
  } finally {
    kv.close();
  }
}

/** SqliteStore keeps each key as its JSON text in table `kv`. */
function sqliteFingerprints(path: string): number {
  const db = new DatabaseSync(path, { readOnly: true });
  try {
    return Number((db.prepare("SELECT count(*) AS n FROM kv WHERE k LIKE ?").get('["fp",%') as { n: number }).n);
  } catch {
    return 0; // not created yet
  } finally {
    db.close();
  }
}

/** A store whose writes land late, like a slow or remote KV: write n waits `delayMs(n, op)`. */
export class SlowStore implements Store {
  writes = 0;
  /** Writes started and not yet landed. */
  pending = 0;
  constructor(private inner: Store, private delayMs: (n: number, op: string) => number) {}
  private async late<T>(op: string, write: () => Promise<T>): Promise<T> {
    this.pending++;
    try {
      await sleep(this.delayMs(this.writes++, op));
      return await write();
    } finally {
      this.pending--;
    }
  }
  get<T>(key: string[]) {
    return this.inner.get<T>(key);
  }
  set(key: string[], value: unknown, ttlMs: number) {
    return this.late("set", () => this.inner.set(key, value, ttlMs));
  }
  setIf(key: string[], expected: unknown, value: unknown, ttlMs: number, also?: [string[], unknown][]) {
    return this.late("setIf", () => this.inner.setIf(key, expected, value, ttlMs, also));
  }
  delete(key: string[]) {
    return this.late("delete", () => this.inner.delete(key));
  }
  close() {
    this.inner.close();
  }
}

// ─── OpenClaw ───────────────────────────────────────────────────────────────────────────────────

/** Real OpenClaw 2026.9.6 request bodies (testdata/openclaw-wire). */
export const OPENCLAW_WIRE = new URL("../testdata/openclaw-wire/", import.meta.url);

/** A real OpenClaw request body from testdata/openclaw-wire, e.g. "telegram-turn1". */
export async function openclawRequest(name: string): Promise<Record<string, unknown>> {
  return JSON.parse(await Deno.readTextFile(new URL(`${name}.json`, OPENCLAW_WIRE)));
}

// ─── Processes ──────────────────────────────────────────────────────────────────────────────────

export interface ProcessRig {
  dify: FakeDify;
  proc: ProcessBridge;
  client: ReturnType<typeof openai>;
}

/**
 * A fake Dify and `<rt> main.ts` in front of it; after `fn`, SIGTERM must end the process with 0.
 * A failure carries what the process printed.
 */
export async function withProcess(
  rt: "deno" | "bun",
  env: Record<string, string> | ((dify: FakeDify) => Record<string, string>),
  fn: (rig: ProcessRig) => Promise<void>,
): Promise<void> {
  const dify = await startFakeDify();
  let proc: ProcessBridge | undefined;
  try {
    const extra = typeof env === "function" ? env(dify) : env;
    proc = await startProcess(rt, { DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat", ...extra });
    await fn({ dify, proc, client: openai(proc.url) });
    const code = await proc.stop();
    assert.equal(code, 0, `SIGTERM: ${rt} main.ts exited with ${code}`);
  } catch (e) {
    if (proc) {
      await proc.stop();
      if (e instanceof Error) e.message += `\n--- ${rt} main.ts printed ---\n${proc.output()}`;
    }
    throw e;
  } finally {
    await dify.close();
  }
}
