// One rung of the ablation ladder (bench/ladder/ladder.ts): the BYOB pass-through with some of the
// proxy's per-request work added back, piece by piece, using main.ts's own functions. Each rung is
// its own process; the ladder runs them all in one interleaved run so the step that costs shows itself.
//
// Env: PORT, UPSTREAM (the fake Dify's origin), LADDER_FEATURES (comma-separated, see FEATURES),
//      LADDER_MAIN (the main.ts to take the pieces from; default ../../main.ts), KV_PATH (store rung),
//      BENCH_PARENT_PID. Prints `listening <port>`; GET /healthz answers 200.
// Clients send an OpenAI chat request; the answer is Dify's bytes until `translate` is on, then
// OpenAI chunks.

import { exitWithParent, serveOnLoopback } from "../child.ts";
import { byobCopy } from "../passthrough_byob.ts";

type Main = typeof import("../../main.ts");

/** The pieces, in the order the ladder adds them. */
export const FEATURES = [
  "parse", // readJsonBody + parseChatRequest + buildTurn + difyRequestBody, instead of arrayBuffer + a fixed body
  "fetchopts", // callDify's fetch: its headers, an AbortController's signal and the abort listener on it
  "reqsignal", // a listener on req.signal, added and removed per request
  "watchdog", // an Exchange per request, added to and removed from the shared Watchdog
  "translate", // SSE lines -> Dify events -> OpenAI chunks (pull-driven: Dify is read when the client pulls)
  "hold", // the response waits for the first content
  "store", // resolveConversation + recordTurn on the file-backed KV store (CONVERSATION_MODE=history)
  "headers", // the request id and main.ts's response headers (CORS and the rest)
  "log", // one JSON log line per request (LineBatch)
  // Not a rung: the variant beside the top rung. The body is fed by a free-running pump into a
  // start()-controller stream (main.ts before its pull-driven AnswerStream).
  "push",
] as const;
/** The rungs' pieces: every feature but the `push` variant. */
export const LADDER = FEATURES.filter((f) => f !== "push");
export type Feature = typeof FEATURES[number];

const textEncoder = new TextEncoder();

export async function rungHandler(m: Main, env: Record<string, string | undefined>) {
  const on = new Set((env.LADDER_FEATURES ?? "").split(",").filter(Boolean));
  for (const f of on) if (!FEATURES.includes(f as Feature)) throw new Error(`unknown feature ${f}`);
  const upstream = (env.UPSTREAM ?? "http://127.0.0.1:8788").replace(/\/+$/, "");
  const config = m.loadConfig({
    DIFY_API_URL: `${upstream}/v1`,
    DIFY_API_KEY: "app-bench",
    CONVERSATION_MODE: "history",
    KV_PATH: env.KV_PATH ?? ":memory:",
  });
  const app = config.catchAll!;
  const route = { app, key: app.key ?? "app-bench", clientKey: false, type: "chat" as const };
  const now = () => performance.now();
  const watchdog = new m.Watchdog(config, now);
  const kv = on.has("store") ? new m.DenoKvStore(await Deno.openKv(config.kvPath)) : undefined;
  const store = kv && new m.ConversationStore(kv, config.conversationTtlMs, console.error);
  const ctx = store && { config, store, continuing: new Set<string>(), recording: new Set<Promise<void>>() };
  const requestLog = new m.LineBatch((text) => console.log(text));
  const fixedBody = JSON.stringify({
    inputs: {},
    query: "hi",
    response_mode: "streaming",
    user: "bench",
    conversation_id: "",
  });
  const options = {
    reasoning: config.reasoning,
    reasoningNodes: config.reasoningNodes,
    origin: new URL(app.url).origin,
    app,
    clientKey: false,
  };

  return async function handler(req: Request): Promise<Response> {
    const url = new URL(req.url);
    if (url.pathname === "/healthz") return new Response("ok");
    const entry: Record<string, unknown> = { t: new Date().toISOString(), method: req.method, path: url.pathname };
    let body = fixedBody;
    let chatReq: ReturnType<Main["parseChatRequest"]> | undefined;
    let turn: ReturnType<Main["buildTurn"]> | undefined;
    let res: Awaited<ReturnType<Main["resolveConversation"]>> = { via: "new", user: "bench", head: null };
    if (on.has("parse")) {
      const json = await m.readJsonBody(
        req,
        config.bodyLimit,
        config.bodyTimeoutMs,
        (ms, expire) => watchdog.deadline(ms, expire),
      );
      chatReq = m.parseChatRequest(json, req.headers, config);
      turn = m.buildTurn(chatReq.messages, config.envelope);
      if (ctx) res = await m.resolveConversation(ctx, chatReq, turn, route, "bench-client");
      body = JSON.stringify(m.difyRequestBody("chat", app, {
        query: m.difyQuery(turn, !res.conversationId, config.systemPrompt),
        user: res.user,
        conversationId: res.conversationId,
        inputs: { ...chatReq.inputs },
        files: [],
      }));
    } else await req.arrayBuffer();

    const ex = new m.Exchange(now);
    if (on.has("watchdog")) watchdog.add(ex);
    const clientGone = () => void (ex.goneAt ??= ex.now());
    if (on.has("reqsignal")) req.signal.addEventListener("abort", clientGone, { once: true });
    const upstreamRes = await fetch(
      `${app.url}/chat-messages`,
      on.has("fetchopts")
        ? {
          method: "POST",
          headers: {
            authorization: `Bearer ${route.key}`,
            "content-type": "application/json",
            accept: "text/event-stream",
          },
          body,
          signal: ex.upstream.signal,
        }
        : {
          method: "POST",
          headers: { authorization: `Bearer ${route.key}`, "content-type": "application/json" },
          body,
        },
    );
    ex.headersReceived = true;
    const done = () => {
      if (on.has("reqsignal")) req.signal.removeEventListener("abort", clientGone);
      if (on.has("watchdog")) watchdog.delete(ex);
      if (on.has("log")) {
        entry.status = 200;
        entry.ms = Math.round(now() - ex.started);
        requestLog.add(JSON.stringify(entry));
      }
    };
    const headers: Record<string, string> = {
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
    };
    const respond = (stream: ReadableStream<Uint8Array>) =>
      new Response(
        stream,
        on.has("headers")
          ? { headers: { ...headers, "x-accel-buffering": "no", ...CORS, "x-request-id": String(entry.id) } }
          : { headers },
      );
    if (on.has("headers")) entry.id = `chatcmpl-${crypto.randomUUID().replaceAll("-", "")}`;

    if (!on.has("translate")) {
      const copy = byobCopy(upstreamRes.body!, done);
      if (on.has("fetchopts")) {
        ex.upstream.signal.addEventListener("abort", () => void copy.cancel().catch(() => {}), { once: true });
      }
      return respond(copy);
    }
    const reader = m.byobReader(upstreamRes.body!);
    if (on.has("fetchopts")) ex.upstream.signal.addEventListener("abort", () => reader.cancel(), { once: true });
    const t = m.newTranslation("chat", true);
    const format = new m.ChatFormat(String(entry.id ?? "chatcmpl-bench"), Math.floor(Date.now() / 1000), "dify", {
      includeUsage: false,
      reasoningContent: true,
    });
    let pending = format.open();
    const sink = {
      content: (text: string) => void (pending += format.content(text)),
      reasoning: (text: string) => void (pending += format.reasoning(text)),
      ping: () => void (pending += ": ping\n\n"),
    };
    const events = new m.DifyEvents(reader, t, sink, options, ex);
    const take = () => {
      const text = pending;
      pending = "";
      return textEncoder.encode(text);
    };
    const closing = () => {
      m.finishTranslation(t, sink);
      pending += format.close(t);
      return take();
    };
    const after = () => {
      if (ctx && chatReq && turn) m.recordTurn(ctx, chatReq, turn, route, "bench-client", res, t);
      done();
    };
    /** Reads Dify until there is something to send (with `hold`: until the answer says something); false at the end. */
    const step = async (): Promise<boolean> => {
      while (await events.next()) if (pending && (t.bytes || !on.has("hold"))) return true;
      return false;
    };
    let more = true;
    if (on.has("hold")) more = await step();

    if (on.has("push")) {
      // A free-running pump: Dify is read as fast as it sends, whether or not the client takes it.
      let controller!: ReadableStreamDefaultController<Uint8Array>;
      let closed = false;
      const stream = new ReadableStream<Uint8Array>({
        start: (c) => void (controller = c),
        cancel: () => void (closed = true, ex.abort(m.apiError("client_closed", "client closed the request"))),
      });
      const write = (bytes: Uint8Array) => {
        if (closed) return;
        try {
          controller.enqueue(bytes);
        } catch {
          closed = true;
        }
      };
      (async () => {
        if (pending) write(take());
        while (more) {
          more = await events.next();
          if (pending && more) write(take());
        }
        write(closing());
        if (!closed) controller.close();
        after();
      })();
      return respond(stream);
    }

    const stream = new ReadableStream<Uint8Array>({
      async pull(c) {
        if (pending && more) return c.enqueue(take());
        if (more) more = await step();
        if (more) return c.enqueue(take());
        c.enqueue(closing());
        c.close();
        after();
      },
      cancel: () => {
        reader.cancel();
        done();
      },
    });
    return respond(stream);
  };
}

const CORS: Record<string, string> = {
  "access-control-allow-origin": "*",
  "access-control-allow-methods": "GET, POST, DELETE, OPTIONS",
  "access-control-allow-headers":
    "authorization, content-type, x-session-id, x-dify-conversation-id, x-openwebui-chat-id, openai-organization, openai-project, x-stainless-arch, x-stainless-lang, x-stainless-os, x-stainless-package-version, x-stainless-retry-count, x-stainless-runtime, x-stainless-runtime-version, x-stainless-timeout",
  "access-control-expose-headers": "x-dify-conversation-id, x-request-id",
  "access-control-max-age": "86400",
};

if (import.meta.main) {
  const env = Deno.env.toObject();
  const m: Main = await import(env.LADDER_MAIN ?? new URL("../../main.ts", import.meta.url).href);
  exitWithParent(Number(env.BENCH_PARENT_PID ?? "0"));
  serveOnLoopback(Number(env.PORT ?? "0"), await rungHandler(m, env));
}
