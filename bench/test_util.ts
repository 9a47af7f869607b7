/**
 * Test helpers: start the bridge in-process (Deno) or as a subprocess (`deno run main.ts` or
 * `bun main.ts`) against a fake Dify, and read what it streams back.
 */
import OpenAI from "openai";
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

function freePort(): number {
  const listener = Deno.listen({ port: 0, hostname: "127.0.0.1" });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** Starts main.ts in a subprocess on a free port and waits until /healthz answers. */
export async function startProcess(runtime: "deno" | "bun", env: Record<string, string>): Promise<ProcessBridge> {
  const port = freePort();
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
    await new Promise((r) => setTimeout(r, 50));
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
