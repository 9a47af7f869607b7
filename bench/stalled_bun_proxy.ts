// The least a Bun bridge can do for a streaming chat: any POST becomes one streaming Dify chat call whose bytes
// are copied to the client untranslated. `bench/stalled.ts --runtimes bun-fetch,bun-pull,bun-node` runs it beside
// main.ts, so what Bun itself holds per stalled stream shows apart from what main.ts adds.
//
//   MODE=fetch  fetch, default reader, a direct stream whose writes wait (main.ts's shape on Bun)
//   MODE=pull   fetch, default reader, a standard pull stream
//   MODE=node   node:http (paused until read), a direct stream whose writes wait
//
//   bun bench/stalled_bun_proxy.ts      Env: PORT, DIFY_API_URL, DIFY_API_KEY, MODE
// GET /healthz answers 200.
import http from "node:http";

interface BunServe {
  serve(o: { port: number; idleTimeout: number; fetch(req: Request): Promise<Response> }): { port: number };
}
interface DirectController {
  write(data: Uint8Array): number | Promise<number>;
  close(): void;
}
const g = globalThis as unknown as { Bun: BunServe; process: { env: Record<string, string | undefined> } };
const env = g.process.env;
const dify = env.DIFY_API_URL ?? "http://127.0.0.1:8788/v1";
const mode = env.MODE ?? "fetch";
const agent = new http.Agent({ keepAlive: true });
const SSE = { "content-type": "text/event-stream" };

/** A chunk source: the next chunk, or null at the end. */
type Next = () => Promise<Uint8Array | null>;

function fetchChunks(body: string): Promise<Next> {
  return fetch(`${dify}/chat-messages`, { method: "POST", headers: headers(body), body }).then((res) => {
    const reader = res.body!.getReader();
    return async () => {
      const { value, done } = await reader.read();
      return done ? null : value;
    };
  });
}

function nodeChunks(body: string): Promise<Next> {
  return new Promise((resolve, reject) => {
    const req = http.request(`${dify}/chat-messages`, { method: "POST", headers: headers(body), agent }, (res) => {
      res.pause();
      let wake: (() => void) | undefined;
      let ended = false;
      const signal = () => {
        const w = wake;
        wake = undefined;
        w?.();
      };
      res.on("readable", signal);
      res.on("end", () => {
        ended = true;
        signal();
      });
      resolve(async () => {
        for (;;) {
          const chunk = res.read() as Uint8Array | null;
          if (chunk !== null) return chunk;
          if (ended) return null;
          await new Promise<void>((r) => wake = r);
        }
      });
    });
    req.on("error", reject);
    req.end(body);
  });
}

function headers(body: string): Record<string, string> {
  return {
    authorization: `Bearer ${env.DIFY_API_KEY ?? "app-chat"}`,
    "content-type": "application/json",
    "content-length": String(new TextEncoder().encode(body).length),
  };
}

function directBody(next: Next): ReadableStream<Uint8Array> {
  return new ReadableStream({
    type: "direct",
    async pull(c: DirectController) {
      for (let chunk = await next(); chunk; chunk = await next()) {
        const written = c.write(chunk);
        if (written instanceof Promise) await written;
      }
      c.close();
    },
  } as unknown as UnderlyingDefaultSource<Uint8Array>);
}

function pullBody(next: Next): ReadableStream<Uint8Array> {
  return new ReadableStream<Uint8Array>({
    async pull(c) {
      const chunk = await next();
      if (chunk) c.enqueue(chunk);
      else c.close();
    },
  });
}

async function handler(req: Request): Promise<Response> {
  if (new URL(req.url).pathname === "/healthz") return new Response("ok");
  const { messages } = await req.json() as { messages: { content: string }[] };
  const body = JSON.stringify({ query: messages.at(-1)!.content, inputs: {}, user: "u", response_mode: "streaming" });
  const next = await (mode === "node" ? nodeChunks(body) : fetchChunks(body));
  return new Response(mode === "pull" ? pullBody(next) : directBody(next), { headers: SSE });
}

const server = g.Bun.serve({ port: Number(env.PORT ?? "0"), idleTimeout: 0, fetch: handler });
console.log(`listening ${server.port}`);
