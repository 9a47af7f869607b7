// Fake Dify Service API used by the benchmark (bench/bench.ts).
//
// Usage:
//   deno run -A bench/dify_bench_server.ts [--port 0] [--events 20] [--pace 0]
//
//   --port N     listen port on 127.0.0.1 (default: $PORT or 8788; 0 = any free port)
//   --events N   number of `message` events per answer (default 20)
//   --pace MS    delay between two events; 0 = no delay, every frame is still
//                enqueued (written) on its own (default 0). A request whose
//                query is "bench-warmup" is always answered without delay.
//   --parent PID exit when that process is gone (the orchestrator passes its pid)
//
// Endpoints:
//   POST /v1/chat-messages            streamed answer (modern Dify SSE framing)
//   POST /v1/chat-messages/{id}/stop  {"result":"success"}
//   GET  /v1/info                     app info
//   GET  /v1/parameters               app parameters (no required inputs)
//   GET  /_stats                      counters (active / peak concurrent streams ...)
//   POST /_stats/reset                zero the peak and the counters
//
// Prints one line `listening <port>` on stdout once it is ready.

import { exitWithParent, flags, serveOnLoopback } from "./child.ts";

interface Options {
  port: number;
  events: number;
  pace: number;
  parent: number;
}

function parseArgs(args: string[]): Options {
  const opts: Options = {
    port: Number(Deno.env.get("PORT") ?? "8788"),
    events: 20,
    pace: 0,
    parent: 0,
  };
  for (const [flag, value] of flags(args)) {
    switch (flag) {
      case "--port":
        opts.port = Number(value());
        break;
      case "--events":
        opts.events = Number(value());
        break;
      case "--pace":
        opts.pace = Number(value());
        break;
      case "--parent":
        opts.parent = Number(value());
        break;
      default:
        throw new Error(`unknown argument ${flag}`);
    }
  }
  for (const [k, v] of Object.entries(opts)) {
    if (!Number.isInteger(v) || v < 0) throw new Error(`bad --${k}: ${v}`);
  }
  if (opts.events < 1 || opts.events > 100_000) {
    throw new Error("--events must be in 1..100000");
  }
  return opts;
}

const opts = parseArgs(Deno.args);
const enc = new TextEncoder();
const CREATED_AT = 1795489200;
const SSE_HEADERS = {
  "content-type": "text/event-stream",
  "cache-control": "no-cache",
  "x-accel-buffering": "no",
};

const stats = {
  requests: 0,
  streams: 0,
  active: 0,
  peakActive: 0,
  completed: 0,
  cancelled: 0,
  badRequests: 0,
  stops: 0,
  info: 0,
  authHeaders: {} as Record<string, number>,
};

function noteAuth(value: string | null) {
  const key = value ?? "(none)";
  if (key in stats.authHeaders) stats.authHeaders[key]++;
  else if (Object.keys(stats.authHeaders).length < 8) {
    stats.authHeaders[key] = 1;
  }
}

function json(body: unknown, status = 200): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json" },
  });
}

const usageTail = (completion: number) =>
  `"metadata":{"annotation_reply":null,"retriever_resources":[],"usage":{` +
  `"prompt_tokens":10,"prompt_unit_price":"0","prompt_price_unit":"0.001",` +
  `"prompt_price":"0","completion_tokens":${completion},` +
  `"completion_unit_price":"0","completion_price_unit":"0.001",` +
  `"completion_price":"0","total_tokens":${10 + completion},` +
  `"total_price":"0","currency":"USD","latency":0.5,` +
  `"time_to_first_token":0.1,"time_to_generate":0.4}},"files":null}`;
const END_TAIL = usageTail(opts.events);

/** Builds the frames of one answer: every `message` frame is identical within
 * one answer (as in Dify: same ids, one token each), the end frame differs. */
function frames(conversationId: string): [Uint8Array, Uint8Array] {
  const messageId = crypto.randomUUID();
  const taskId = crypto.randomUUID();
  const head = `"conversation_id":"${conversationId}",` +
    `"message_id":"${messageId}","created_at":${CREATED_AT},` +
    `"task_id":"${taskId}","id":"${messageId}",`;
  const message = enc.encode(
    `data: {"event":"message",${head}"answer":" word",` +
      `"from_variable_selector":null}\n\n`,
  );
  const end = enc.encode(`data: {"event":"message_end",${head}${END_TAIL}\n\n`);
  return [message, end];
}

/** A request whose query is exactly this is answered without pacing (used to
 * warm a server up before the slow-stream measurement). */
const WARMUP_QUERY = "bench-warmup";

function streamAnswer(conversationId: string, pace: number): Response {
  const [message, end] = frames(conversationId);
  const n = opts.events;
  stats.streams++;
  stats.active++;
  if (stats.active > stats.peakActive) stats.peakActive = stats.active;
  let finished = false;
  const finish = (cancelled: boolean) => {
    if (finished) return;
    finished = true;
    stats.active--;
    if (cancelled) stats.cancelled++;
    else stats.completed++;
  };

  if (pace === 0) {
    const body = new ReadableStream<Uint8Array>({
      start(controller) {
        // Each frame is its own chunk (its own write on the wire).
        for (let i = 0; i < n; i++) controller.enqueue(message.slice());
        controller.enqueue(end);
        controller.close();
        finish(false);
      },
    });
    return new Response(body, { headers: SSE_HEADERS });
  }

  let timer: ReturnType<typeof setInterval> | undefined;
  const body = new ReadableStream<Uint8Array>({
    start(controller) {
      let sent = 0;
      const tick = () => {
        try {
          controller.enqueue(message.slice());
          sent++;
          if (sent >= n) {
            clearInterval(timer);
            controller.enqueue(end);
            controller.close();
            finish(false);
          }
        } catch {
          clearInterval(timer);
          finish(true);
        }
      };
      tick(); // first event at once, then one every `pace` ms
      if (sent < n) timer = setInterval(tick, pace);
    },
    cancel() {
      clearInterval(timer);
      finish(true);
    },
  });
  return new Response(body, { headers: SSE_HEADERS });
}

const STOP_RE = /^\/v1\/chat-messages\/[^/]+\/stop$/;

async function handler(req: Request): Promise<Response> {
  const { pathname } = new URL(req.url);
  if (req.method === "POST" && pathname === "/v1/chat-messages") {
    stats.requests++;
    noteAuth(req.headers.get("authorization"));
    let body: { query?: unknown; response_mode?: unknown; conversation_id?: unknown };
    try {
      body = await req.json();
    } catch {
      stats.badRequests++;
      return json({ code: "invalid_param", message: "bad json", status: 400 }, 400);
    }
    if (typeof body?.query !== "string") {
      stats.badRequests++;
      return json({ code: "invalid_param", message: "query is required", status: 400 }, 400);
    }
    const cid = typeof body.conversation_id === "string" && body.conversation_id
      ? body.conversation_id
      : crypto.randomUUID();
    if (body.response_mode !== "streaming") {
      // Blocking mode, for completeness.
      stats.completed++;
      return json({
        event: "message",
        task_id: crypto.randomUUID(),
        id: crypto.randomUUID(),
        message_id: crypto.randomUUID(),
        conversation_id: cid,
        mode: "chat",
        answer: " word".repeat(opts.events),
        metadata: JSON.parse(`{${END_TAIL}`).metadata,
        created_at: CREATED_AT,
      });
    }
    return streamAnswer(cid, body.query === WARMUP_QUERY ? 0 : opts.pace);
  }
  if (req.method === "POST" && STOP_RE.test(pathname)) {
    stats.stops++;
    await req.body?.cancel();
    return json({ result: "success" });
  }
  if (req.method === "GET" && pathname === "/v1/info") {
    stats.info++;
    return json({
      name: "bench",
      description: "",
      tags: [],
      mode: "chat",
      author_name: "bench",
    });
  }
  // Every Dify serves it, and the bridge asks once per app (a 404 would be asked again on every request).
  if (req.method === "GET" && pathname === "/v1/parameters") {
    return json({
      opening_statement: "",
      user_input_form: [],
      speech_to_text: { enabled: false },
      text_to_speech: { enabled: false },
      file_upload: { image: { enabled: false } },
      system_parameters: { file_size_limit: 15 },
    });
  }
  if (pathname === "/_stats") return json({ ...stats, options: opts });
  if (req.method === "POST" && pathname === "/_stats/reset") {
    for (const k of Object.keys(stats) as (keyof typeof stats)[]) {
      if (k === "active") continue;
      if (k === "authHeaders") stats.authHeaders = {};
      else stats[k] = 0;
    }
    stats.peakActive = stats.active;
    return json({ ok: true });
  }
  return json({ code: "not_found", message: "not found", status: 404 }, 404);
}

exitWithParent(opts.parent);
serveOnLoopback(opts.port, handler);
