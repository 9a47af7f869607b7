// Bare pass-through, JS pump: forwards the client's request to UPSTREAM, reads
// every upstream chunk in JS with a default reader and enqueues the same bytes
// into a new ReadableStream (no parsing). This is the floor for any proxy that
// touches every chunk in JS.
//
// Env: PORT (listen port, 0 = any), UPSTREAM (e.g. http://127.0.0.1:8788),
//      BENCH_PARENT_PID (optional: exit when that process is gone).
// Prints `listening <port>` on stdout once ready. GET /healthz answers 200.

import { exitWithParent, serveOnLoopback } from "./child.ts";

const upstream = (Deno.env.get("UPSTREAM") ?? "http://127.0.0.1:8788").replace(/\/+$/, "");
const port = Number(Deno.env.get("PORT") ?? "8791");

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
    headers: {
      "content-type": res.headers.get("content-type") ?? "text/event-stream",
      "cache-control": "no-cache",
    },
  });
}

exitWithParent(Number(Deno.env.get("BENCH_PARENT_PID") ?? "0"));
serveOnLoopback(port, handler);
