// Bare pass-through, native pipe: forwards the client's request to UPSTREAM and
// hands the upstream body straight to the response (`new Response(upstream.body)`),
// which Deno pipes without running JS per chunk.
//
// Env: PORT (listen port, 0 = any), UPSTREAM (e.g. http://127.0.0.1:8788),
//      BENCH_PARENT_PID (optional: exit when that process is gone).
// Prints `listening <port>` on stdout once ready. GET /healthz answers 200.

import { exitWithParent, serveOnLoopback } from "./child.ts";

const upstream = (Deno.env.get("UPSTREAM") ?? "http://127.0.0.1:8788").replace(/\/+$/, "");
const port = Number(Deno.env.get("PORT") ?? "8790");

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
  return new Response(res.body, {
    status: res.status,
    headers: {
      "content-type": res.headers.get("content-type") ?? "text/event-stream",
      "cache-control": "no-cache",
    },
  });
}

exitWithParent(Number(Deno.env.get("BENCH_PARENT_PID") ?? "0"));
serveOnLoopback(port, handler);
