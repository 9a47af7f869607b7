// Bare pass-through for Bun, JS pump: forwards the client's request to UPSTREAM, reads every
// upstream chunk with a default reader and enqueues it into a pull-driven ReadableStream (Bun's
// fetch bodies refuse BYOB readers). Bun's floor for a proxy that touches every chunk in JS.
//
//   bun bench/passthrough_bun.ts      Env: PORT, UPSTREAM, BENCH_PARENT_PID (as the Deno ones)
// Prints `listening <port>` on stdout once ready. GET /healthz answers 200.

interface BunServe {
  serve(o: { hostname: string; port: number; idleTimeout: number; fetch(req: Request): Promise<Response> }): {
    port: number;
  };
}
const g = globalThis as unknown as {
  Bun: BunServe;
  process: { env: Record<string, string | undefined>; kill(pid: number, sig: number): void; exit(code: number): void };
};
const env = g.process.env;
const upstream = (env.UPSTREAM ?? "http://127.0.0.1:8788").replace(/\/+$/, "");

async function handler(req: Request): Promise<Response> {
  const url = new URL(req.url);
  if (url.pathname === "/healthz") return new Response("ok");
  const res = await fetch(upstream + url.pathname + url.search, {
    method: req.method,
    headers: {
      "content-type": req.headers.get("content-type") ?? "application/json",
      "authorization": req.headers.get("authorization") ?? "",
    },
    body: req.method === "GET" || req.method === "HEAD" ? undefined : await req.arrayBuffer(),
  });
  if (!res.body) return new Response(null, { status: res.status });
  const reader = res.body.getReader();
  const body = new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        const { done, value } = await reader.read();
        if (done) controller.close();
        else controller.enqueue(value);
      } catch (err) {
        controller.error(err);
      }
    },
    cancel(reason) {
      return reader.cancel(reason);
    },
  });
  return new Response(body, {
    status: res.status,
    headers: { "content-type": res.headers.get("content-type") ?? "text/event-stream", "cache-control": "no-cache" },
  });
}

const parent = Number(env.BENCH_PARENT_PID ?? "0");
if (parent > 0) {
  const timer = setInterval(() => {
    try {
      g.process.kill(parent, 0);
    } catch {
      g.process.exit(0);
    }
  }, 1000);
  (timer as unknown as { unref(): void }).unref();
}
const server = g.Bun.serve({ hostname: "127.0.0.1", port: Number(env.PORT ?? "0"), idleTimeout: 0, fetch: handler });
console.log(`listening ${server.port}`);
