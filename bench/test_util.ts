/**
 * Test helpers: start the bridge in-process (Deno) or as a subprocess (`deno run main.ts` or
 * `bun main.ts`) against a fake Dify, and read what it streams back.
 */
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
}

/** Starts the bridge in this process on port 0 with the given environment. */
export async function startBridge(env: Record<string, string>, opts: BridgeOptions = {}): Promise<Bridge> {
  const config = loadConfig({ KV_PATH: ":memory:", ...env });
  const store = opts.store ?? new DenoKvStore(await Deno.openKv(config.kvPath));
  const logs: string[] = [];
  const warnings: string[] = [];
  const conversations = new ConversationStore(store, config.conversationTtlMs, (m) => warnings.push(m));
  const server = createServer(config, {
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

/** Starts main.ts in a subprocess on a free port and waits until /healthz answers. */
export async function startProcess(runtime: "deno" | "bun", env: Record<string, string>): Promise<ProcessBridge> {
  const port = closedPort();
  const args = runtime === "deno" ? ["run", "--allow-all", "--unstable-kv", MAIN] : [MAIN];
  const process = new Deno.Command(runtime, {
    args,
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
