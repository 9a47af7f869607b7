// Bare pass-through, BYOB pump: forwards the client's request to UPSTREAM, reads the upstream
// body with a BYOB reader into one reused buffer and enqueues a copy of each chunk into a
// pull-driven ReadableStream (no parsing). The floor for a Deno proxy that touches every chunk in
// JS the cheapest way the runtime offers: the copy is needed because the next read reuses the buffer.
//
// Env: PORT (listen port, 0 = any), UPSTREAM (e.g. http://127.0.0.1:8788),
//      BENCH_PARENT_PID (optional: exit when that process is gone).
// Prints `listening <port>` on stdout once ready. GET /healthz answers 200.

import { exitWithParent, serveOnLoopback } from "./child.ts";

const upstream = (Deno.env.get("UPSTREAM") ?? "http://127.0.0.1:8788").replace(/\/+$/, "");
const port = Number(Deno.env.get("PORT") ?? "8792");

/** A pull-driven body that re-enqueues `body`'s bytes, read through one reused 4 KiB buffer; `onEnd` runs at its end
 * or when the client goes. */
export function byobCopy(body: ReadableStream<Uint8Array>, onEnd?: () => void): ReadableStream<Uint8Array> {
  const reader = body.getReader({ mode: "byob" });
  let buffer = new ArrayBuffer(4096);
  return new ReadableStream<Uint8Array>({
    async pull(controller) {
      try {
        const { done, value } = await reader.read(new Uint8Array(buffer));
        if (done || !value) {
          controller.close();
          return onEnd?.();
        }
        buffer = value.buffer as ArrayBuffer;
        controller.enqueue(value.slice());
      } catch (err) {
        controller.error(err);
      }
    },
    cancel(reason) {
      onEnd?.();
      return reader.cancel(reason);
    },
  });
}

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
  return new Response(byobCopy(res.body), {
    status: res.status,
    headers: {
      "content-type": res.headers.get("content-type") ?? "text/event-stream",
      "cache-control": "no-cache",
    },
  });
}

if (import.meta.main) {
  exitWithParent(Number(Deno.env.get("BENCH_PARENT_PID") ?? "0"));
  serveOnLoopback(port, handler);
}
