/**
 * Subprocess tests: main.ts as its own process, `deno run main.ts` and `bun main.ts`, in front of the fake
 * Dify — what only a real process shows: start-up, signals, shutdown, stores on disk, identical errors on
 * both runtimes, many connections at once.
 */
import assert from "node:assert/strict";
import { apiError, type AppConfig, difyError, errorJson, type ErrorName, ERRORS } from "../main.ts";
import { type FakeDify, readErrorsJson, startFakeDify } from "../bench/fake_dify.ts";
import {
  answerOf,
  assistant,
  type Bridge,
  bunAvailable,
  ChatSession,
  closedPort,
  fixtureEvents,
  hasContent,
  MAIN,
  openai,
  OPENCLAW_WIRE,
  type ProcessBridge,
  rawChat,
  rawHttp,
  readSse,
  readUntil,
  ROOT,
  sseData,
  startBridge,
  startProcess,
  streamText,
  tempStoreFile,
  turnOf,
  until,
  untilFingerprints,
  untilRefused,
  usageOf,
  user,
  withBridge,
} from "../bench/test_util.ts";

// ─── Helpers ─────────────────────────────────────────────────────────────────────────────────────

type RuntimeName = "deno" | "bun";

const HAVE_BUN = bunAvailable();

const RUNTIMES: { rt: RuntimeName; ignore: boolean }[] = [
  { rt: "deno", ignore: false },
  { rt: "bun", ignore: !HAVE_BUN },
];

/** Registers the same test body once per runtime. */
function testEachRuntime(name: string, fn: (rt: RuntimeName) => Promise<void>): void {
  for (const { rt, ignore } of RUNTIMES) {
    Deno.test({
      name: `runtimes: ${name} (${rt})`,
      ignore,
      fn: () => fn(rt),
    });
  }
}

interface ProcessRig {
  dify: FakeDify;
  proc: ProcessBridge;
  client: ReturnType<typeof openai>;
}

/**
 * A fake Dify and `<rt> main.ts` in front of it; after `fn`, SIGTERM must end the process with 0.
 * A failure carries what the process printed.
 */
async function withProcess(
  rt: RuntimeName,
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

// ─── Answers ─────────────────────────────────────────────────────────────────────────────────────

testEachRuntime("streaming and non-streaming answers with usage, through the SDK and raw fetch", async (rt) => {
  const events = await fixtureEvents("chat_basic");
  const fx = { answer: answerOf(events), usage: usageOf(events) };
  await withProcess(rt, {}, async ({ dify, proc, client }) => {
    const s = await streamText(client, {
      model: "dify",
      messages: [user("fixture:chat_basic")],
      stream_options: { include_usage: true },
    });
    assert.equal(s.content, fx.answer);
    assert.deepEqual(s.usage, fx.usage, "streamed usage = the fixture's message_end usage");
    const last = s.chunks.at(-1) as { choices: unknown[] };
    assert.deepEqual(last.choices, [], "usage comes in its own final chunk");

    const c = await client.chat.completions.create({ model: "dify", messages: [user("fixture:chat_basic please")] });
    assert.equal(c.object, "chat.completion");
    assert.equal(c.choices[0].message.content, fx.answer);
    assert.equal(c.choices[0].finish_reason, "stop");
    assert.deepEqual(c.usage, fx.usage, "aggregated usage = the fixture's message_end usage");

    const r = await rawChat(proc.url, { model: "dify", messages: [user("hello raw fetch")], stream: true });
    assert.equal(r.status, 200, r.text);
    assert.match(r.headers.get("content-type") ?? "", /^text\/event-stream/);
    const conv = r.headers.get("x-dify-conversation-id") ?? "";
    assert.match(conv, /^[0-9a-f-]{36}$/);
    const data = sseData(r.text);
    assert.equal(data.at(-1), "[DONE]");
    assert.equal((data[0] as { choices: { delta: { role: string } }[] }).choices[0].delta.role, "assistant");
    assert.equal(readSse(r.text).content, `Turn 1 of ${conv.slice(0, 8)}: hello raw fetch`);

    const n = await rawChat(proc.url, { model: "dify", messages: [user("hello again")] });
    assert.equal(n.status, 200, n.text);
    assert.match(n.headers.get("content-type") ?? "", /^application\/json/);
    const body = JSON.parse(n.text);
    assert.equal(turnOf(body.choices[0].message.content).query, "hello again");
    assert.equal(body.usage.total_tokens, body.usage.prompt_tokens + body.usage.completion_tokens);
    assert.ok(body.usage.completion_tokens > 0, JSON.stringify(body.usage));
    assert.deepEqual(dify.generateBodies().map((b) => b.response_mode), Array(4).fill("streaming"));
  });
});

testEachRuntime("three turns continue one Dify conversation", async (rt) => {
  await withProcess(rt, {}, async ({ dify, client }) => {
    const messages: { role: "user" | "assistant"; content: string }[] = [user("first question")];
    const say = async (stream: boolean) => {
      const text = stream
        ? (await streamText(client, { model: "dify", messages, user: "multi" })).content
        : (await client.chat.completions.create({ model: "dify", messages, user: "multi" })).choices[0].message
          .content ?? "";
      messages.push(assistant(text));
      return turnOf(text);
    };
    const t1 = await say(false);
    messages.push(user("second question"));
    const t2 = await say(true);
    messages.push(user("third question"));
    const t3 = await say(false);
    assert.deepEqual([t1.n, t2.n, t3.n], [1, 2, 3]);
    assert.deepEqual([t2.conv, t3.conv], [t1.conv, t1.conv], `Turn 3 of ${t1.conv}`);
    const bodies = dify.generateBodies();
    assert.deepEqual(bodies.map((b) => b.query), ["first question", "second question", "third question"]);
    assert.deepEqual(bodies.map((b) => b.user), ["multi", "multi", "multi"]);
    assert.equal(bodies[0].conversation_id, "");
    assert.equal(bodies[1].conversation_id.slice(0, 8), t1.conv);
    assert.equal(bodies[2].conversation_id, bodies[1].conversation_id);
  });
});

testEachRuntime("a client abort mid-stream stops the Dify task for the same user", async (rt) => {
  await withProcess(rt, {}, async ({ dify, proc, client }) => {
    const stream = await client.chat.completions.create({
      model: "dify",
      messages: [user("please stop me halfway through this rather long answer fault:slow:100")],
      user: "abort-me",
      stream: true,
    });
    let content = "";
    for await (const chunk of stream) {
      content += chunk.choices[0]?.delta?.content ?? "";
      if (content) break;
    }
    stream.controller.abort();
    assert.match(content, /^Turn\b/);
    assert.ok(await until(() => dify.stops.length > 0, 5_000), "no stop call reached Dify");
    assert.equal(dify.stops.length, 1);
    assert.equal(dify.stops[0].user, "abort-me");
    assert.match(dify.stops[0].path, /^\/chat-messages\/[0-9a-f-]+\/stop$/);
    assert.ok(
      await until(() => /"status":499\b/.test(proc.output()), 5_000),
      "the bridge logs the request as closed by the client",
    );
    assert.match(proc.output(), /"error":"client_closed"/);
  });
});

testEachRuntime("the OpenClaw request shape, POSTed as captured", async (rt) => {
  await withProcess(rt, { SYSTEM_PROMPT: "drop" }, async ({ dify, proc }) => {
    const body = await Deno.readTextFile(new URL("telegram-turn1.json", OPENCLAW_WIRE));
    const r = await rawChat(proc.url, body);
    assert.equal(r.status, 200, r.text);
    assert.match(r.headers.get("content-type") ?? "", /^text\/event-stream/);
    const data = sseData(r.text);
    assert.equal(data.at(-1), "[DONE]");
    assert.equal(turnOf(readSse(r.text).content).query, "hi there");
    const usage = (data.at(-2) as { usage?: Record<string, number> }).usage;
    assert.ok(usage && usage.total_tokens > 0, "include_usage is honoured");
    const sent = dify.lastBody();
    assert.equal(sent.query, "hi there");
    assert.equal(sent.user, "telegram:123456789");
  });
});

// ─── Errors: the catalogue, provoked on both runtimes ───────────────────────────────────────────

/** What a client can see of an answer: status, the OpenAI error fields, and for 200 streams the frames. */
interface Outcome {
  status: number;
  type?: string;
  code?: string | null;
  param?: string | null;
  /** The message with runtime-made text (JS engine parse errors, socket errors) cut off. */
  message?: string;
  retryAfter?: string | null;
  allow?: string | null;
  /** 200 streams only. */
  content?: boolean;
  done?: boolean;
}

/** Engine- or OS-made text inside our messages differs between V8 and JavaScriptCore: cut it off. */
function stableMessage(message: string): string {
  return message.replace(/(not valid JSON|mid-answer|could not reach Dify for model \S+ at)[: ].*$/s, "$1 …");
}

function outcomeOfText(status: number, headers: Headers, text: string): Outcome {
  const out: Outcome = { status };
  let error: Record<string, unknown> | undefined;
  if (status === 200 && /event-stream/.test(headers.get("content-type") ?? "")) {
    const data = sseData(text);
    out.content = readSse(text).content !== "";
    out.done = data.includes("[DONE]");
    error = (data.find((d) => typeof d === "object" && d !== null && "error" in d) as { error?: never })?.error;
  } else if (status !== 200) {
    error = JSON.parse(text).error;
    out.retryAfter = headers.get("retry-after");
    out.allow = headers.get("allow");
  }
  if (error) {
    out.type = error.type as string;
    out.code = error.code as string | null;
    out.param = error.param as string | null;
    out.message = stableMessage(String(error.message));
  }
  return out;
}

async function outcomeOf(res: Response): Promise<Outcome> {
  return outcomeOfText(res.status, res.headers, await res.text());
}

/** A raw HTTP/1.1 answer (status line, headers, a chunked or plain JSON body), as an outcome. */
function outcomeOfRaw(raw: string): Outcome {
  const [head, ...rest] = raw.split("\r\n\r\n");
  const headers = new Headers(head.split("\r\n").slice(1).map((l) => l.split(/:\s*/, 2) as [string, string]));
  const body = /\{[\s\S]*\}/.exec(rest.join("\r\n\r\n"))?.[0] ?? "";
  return outcomeOfText(Number(head.slice(9, 12)), headers, body);
}

/** Entries whose `code` is Dify's own code, passed on, rather than the entry's name. */
const PASSES_DIFY_CODE = new Set<ErrorName>([
  "dify_invalid_request",
  "dify_unauthorized",
  "dify_forbidden",
  "dify_too_large",
  "dify_rate_limited",
  "dify_key_rejected",
  "dify_not_found",
  "upstream_error",
  "upstream_gateway_timeout",
]);

/** Entries no client can provoke, with the reason: checked for their shape only. */
const NOT_PROVOKABLE: Partial<Record<ErrorName, string>> = {
  client_closed: "the client has left: only the request log records it",
  client_stalled: "the client stopped reading: it never reads the error",
  internal_error: "a bug in the bridge: no request is meant to reach it",
};

/** Asserts an outcome is the catalogue's entry `name`: its type, its status (unless a stream had begun), its code. */
function assertCatalogued(outcome: Outcome, name: ErrorName, label: string): void {
  const [status, type] = ERRORS[name];
  const what = `${label} should be ${name}: ${JSON.stringify(outcome)}`;
  assert.equal(outcome.type, type, what);
  if (outcome.status !== 200) assert.equal(outcome.status, status, what);
  if (!PASSES_DIFY_CODE.has(name)) assert.equal(outcome.code, name, what);
  assert.ok(outcome.message, what);
}

const PROXY_KEY = "sk-runtimes-proxy";
const DIFY_STATUSES = [400, 401, 403, 404, 413, 415, 429, 500, 503];
/** Held at once, the answers that fill MAX_CONCURRENT_STREAMS; the cases before run fewer at a time. */
const MAX_STREAMS = 16;
/** An id no conversation has: the same on both runtimes, so their messages match. */
const UNKNOWN_CONVERSATION = "00000000-0000-4000-8000-000000000000";
/** Enough paced words to outlast ANSWER_TIMEOUT_SECONDS and SHUTDOWN_GRACE_SECONDS. */
const LONG_ANSWER = `${"a long answer, word by word ".repeat(8)}fault:slow:250`;

/**
 * The process every proxied error case runs against: apps for chat and workflow (and one unreachable), a
 * proxy key, and every limit small enough to reach in a test.
 */
function errorCaseEnv(dify: FakeDify): Record<string, string> {
  const down = `http://127.0.0.1:${closedPort()}/v1`;
  return {
    DIFY_APPS: JSON.stringify({
      dify: { key: "app-chat", type: "chat", url: dify.url },
      wf: { key: "app-workflow", type: "workflow", url: dify.url },
      // The fake's `speech` app requires the input `city` and has speech to text on; the others have it off.
      speech: { key: "app-speech", type: "chat", url: dify.url },
      down: { key: "app-chat", type: "chat", url: down },
    }),
    PROXY_API_KEYS: PROXY_KEY,
    MAX_BODY_BYTES: "65536",
    MAX_ANSWER_BYTES: "100000",
    MAX_CONCURRENT_STREAMS: String(MAX_STREAMS),
    BODY_TIMEOUT_SECONDS: "1",
    UPSTREAM_TIMEOUT_SECONDS: "3",
    UPSTREAM_IDLE_SECONDS: "1",
    ANSWER_TIMEOUT_SECONDS: "4",
    SHUTDOWN_GRACE_SECONDS: "1",
  };
}

/** One error case: its label, the catalogue entry it must be (when one is certain), how to provoke it. */
type ErrorCase = [label: string, name: ErrorName | undefined, provoke: () => Promise<Outcome>];

/**
 * Every error case against one runtime, by label: Dify's HTTP errors and stream faults, timeouts and limits,
 * bad requests, a full server, a shutdown mid-answer (last: it ends the process), and the errors of
 * pass-through keys (`open`, a second process without PROXY_API_KEYS).
 */
async function provokeErrors(
  proc: ProcessBridge,
  dify: FakeDify,
  open: string,
): Promise<Map<string, Outcome & { name?: ErrorName }>> {
  const url = proc.url;
  const auth = { authorization: `Bearer ${PROXY_KEY}` };
  const post = (body: unknown, headers: Record<string, string> = {}, path = "/chat/completions", base = url) =>
    fetch(base + path, {
      method: "POST",
      headers: { "content-type": "application/json", ...auth, ...headers },
      body: typeof body === "string" || body instanceof Uint8Array ? body as BodyInit : JSON.stringify(body),
    }).then(outcomeOf);
  const ask = (text: string, stream: boolean, model = "dify", extra: Record<string, unknown> = {}) =>
    post({ model, messages: [user(text)], stream, user: "errors", ...extra });
  const cases: ErrorCase[] = [];
  const both = (label: string, name: ErrorName | undefined, text: string, model?: string, extra = {}) => {
    cases.push([`${label} (non-streaming)`, name, () => ask(text, false, model, extra)]);
    cases.push([`${label} (streaming)`, name, () => ask(text, true, model, extra)]);
  };
  const difyStatus: Record<number, ErrorName> = {
    400: "dify_invalid_request",
    401: "dify_key_rejected",
    403: "dify_key_rejected",
    404: "dify_not_found",
    413: "dify_too_large",
    415: "upstream_error",
    429: "dify_rate_limited",
    500: "upstream_error",
    503: "upstream_error",
  };
  for (const status of DIFY_STATUSES) both(`status_${status}`, difyStatus[status], `fault:status_${status}`);
  const errors = await readErrorsJson();
  for (const name of Object.keys(errors.http)) both(`http_${name}`, undefined, `fault:http_${name}`);
  const faults: Record<string, ErrorName> = {
    midstream_error: "dify_invalid_request",
    eof: "incomplete_stream",
    html502: "upstream_error",
    json_instead: "bad_upstream_response",
    error200: "dify_invalid_request",
  };
  for (const [fault, name] of Object.entries(faults)) {
    both(fault, name, `several words of answer before the fault fault:${fault}`);
  }
  both("html504", "upstream_gateway_timeout", "fault:html504");
  // Dify's stream breaks off, or goes silent past UPSTREAM_IDLE_SECONDS, before any answer text (the
  // fixture has none before its end): nothing was said, so a stream too must get an HTTP status.
  both("eof before any content", "incomplete_stream", "fixture:workflow_run_failed fault:eof");
  both("connection refused", "upstream_unreachable", "anyone there?", "down");
  both("no first byte within UPSTREAM_TIMEOUT_SECONDS", "upstream_timeout", "fault:first_byte:10000");
  both("an answer over MAX_ANSWER_BYTES", "answer_too_large", "fault:huge_line:200000");
  both("an answer past ANSWER_TIMEOUT_SECONDS", "answer_timeout", LONG_ANSWER);
  both("a failed workflow run", "workflow_failed", "fixture:workflow_run_failed", "wf");
  both("an unknown conversation id", "conversation_not_found", "hello", "dify", {
    conversation_id: UNKNOWN_CONVERSATION,
  });
  const big = JSON.stringify({ model: "dify", messages: [user("x".repeat(100_000))] });
  const invalidUtf8 = new TextEncoder().encode(JSON.stringify({ model: "dify", messages: [user("hi ~")] }));
  invalidUtf8[invalidUtf8.indexOf("~".charCodeAt(0))] = 0xff;
  const parts = Array.from({ length: 1001 }, () => ({ type: "text", text: "x" }));
  cases.push(
    ["invalid JSON", "invalid_json", () => post("{not json")],
    ["invalid UTF-8", "invalid_encoding", () => post(invalidUtf8)],
    ["body not an object", "invalid_request", () => post("[1, 2]")],
    ["no messages", "invalid_request", () => post({ model: "dify", messages: [] })],
    ["bad role", "invalid_request", () => post({ model: "dify", messages: [{ role: "robot", content: "hi" }] })],
    ["too many content parts", "too_many_parts", () => post({ model: "dify", messages: [user(parts)] })],
    ["an unsupported parameter", "unsupported_parameter", () => post({ model: "dify", messages: [user("hi")], n: 2 })],
    ["a required app input left out", "missing_input", () => post({ model: "speech", messages: [user("hi")] })],
    ["speech to text, turned off in the app", "speech_disabled", () => {
      const form = new FormData();
      form.set("model", "dify");
      form.set("file", new File([new Uint8Array([0x49, 0x44, 0x33])], "a.mp3", { type: "audio/mp3" }));
      return fetch(`${url}/audio/transcriptions`, { method: "POST", headers: auth, body: form }).then(outcomeOf);
    }],
    [
      "an unknown response id",
      "response_not_found",
      () => fetch(`${url}/responses/resp_0000000000000000`, { headers: auth }).then(outcomeOf),
    ],
    ["unknown model", "model_not_found", () => post({ model: "nope", messages: [user("hi")] })],
    ["unknown route", "not_found", () => post({ model: "dify", messages: [user("hi")] }, {}, "/nowhere")],
    ["wrong method", "method_not_allowed", () => fetch(`${url}/chat/completions`, { headers: auth }).then(outcomeOf)],
    ["body over MAX_BODY_BYTES (content-length)", "request_too_large", () => post(big)],
    ["body over MAX_BODY_BYTES (chunked)", "request_too_large", () => {
      const bytes = new TextEncoder().encode(big);
      const body = new ReadableStream<Uint8Array>({
        start(c) {
          for (let i = 0; i < bytes.length; i += 8192) c.enqueue(bytes.slice(i, i + 8192));
          c.close();
        },
      });
      return fetch(`${url}/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", ...auth },
        body,
      }).then(outcomeOf);
    }],
    ["a body slower than BODY_TIMEOUT_SECONDS", "request_timeout", async () =>
      outcomeOfRaw(
        await rawHttp(
          proc.port,
          "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
            `Authorization: Bearer ${PROXY_KEY}\r\nContent-Length: 1000\r\n\r\n`,
          '{"model":"',
          10_000,
        ),
      )],
    ["no API key", "invalid_api_key", () => post({ model: "dify", messages: [user("hi")] }, { authorization: "" })],
    [
      "wrong API key",
      "invalid_api_key",
      () => post({ model: "dify", messages: [user("hi")] }, { authorization: "Bearer sk-wrong" }),
    ],
    // Pass-through: the client brings its own Dify key.
    [
      "pass-through: no Dify key",
      "missing_dify_key",
      () => post({ model: "any", messages: [user("hi")] }, { authorization: "Bearer sk-not-dify" }, undefined, open),
    ],
    [
      "pass-through: a key Dify rejects",
      "dify_unauthorized",
      () => post({ model: "any", messages: [user("hi")] }, { authorization: "Bearer app-bad" }, undefined, open),
    ],
    [
      "pass-through: a key of a disabled app",
      "dify_forbidden",
      () => post({ model: "any", messages: [user("hi")] }, { authorization: "Bearer app-gone" }, undefined, open),
    ],
  );
  const results = new Map<string, Outcome & { name?: ErrorName }>();
  // One at a time: the fixture's task id is the same in both, and the bridge stopping the first one's task
  // would end the other's silence early.
  const idles = async () => {
    for (const stream of [false, true]) {
      const outcome = await ask("fixture:workflow_run_failed fault:idle:10000", stream);
      results.set(`idle before any content (${stream ? "streaming" : "non-streaming"})`, {
        ...outcome,
        name: "upstream_idle_timeout",
      });
    }
  };
  // A few at a time, so that they stay under MAX_CONCURRENT_STREAMS; the ones that wait out a limit first.
  const slow = (label: string) => /SECONDS/.test(label);
  const queue = [...cases.filter(([label]) => slow(label)), ...cases.filter(([label]) => !slow(label))];
  const idling = idles();
  await Promise.all(Array.from({ length: MAX_STREAMS / 2 }, async () => {
    for (let c = queue.shift(); c; c = queue.shift()) {
      const [label, name, provoke] = c;
      results.set(label, { ...await provoke(), ...name && { name } });
    }
  }));
  // Paced and sent alone, after the rest: Bun's fetch discards body bytes it received but the reader
  // had not taken yet when the connection resets, so under load the words before the reset can vanish.
  const resets = async () => {
    for (const stream of [false, true]) {
      const outcome = await ask("several words of answer before the fault fault:reset fault:slow:50", stream);
      results.set(`reset (${stream ? "streaming" : "non-streaming"})`, { ...outcome, name: "upstream_broken" });
    }
  };
  await Promise.all([resets(), idling]);
  // A full server: every slot held by an answer Dify has not started, then one more request.
  const held = Array.from({ length: MAX_STREAMS }, (_, i) => ask(`held ${i} fault:hold`, true));
  await until(() => dify.held() >= MAX_STREAMS, 10_000, "every slot held");
  for (const stream of [false, true]) {
    const label = `past MAX_CONCURRENT_STREAMS (${stream ? "streaming" : "non-streaming"})`;
    results.set(label, { ...await ask("one too many", stream), name: "overloaded" });
  }
  dify.release();
  await Promise.all(held);
  // Last: SIGTERM while an answer streams past SHUTDOWN_GRACE_SECONDS.
  const res = await fetch(`${url}/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", ...auth },
    body: JSON.stringify({ model: "dify", messages: [user(LONG_ANSWER)], stream: true }),
  });
  const reader = res.body!.getReader();
  const head = await readUntil(reader, "", hasContent);
  proc.process.kill("SIGTERM");
  const text = await readUntil(reader, head, () => false);
  results.set("SIGTERM mid-answer, past SHUTDOWN_GRACE_SECONDS", {
    ...outcomeOfText(res.status, res.headers, text),
    name: "shutting_down",
  });
  return new Map([...results].sort(([a], [b]) => a.localeCompare(b)));
}

/** What the mapping table of issue 3 says the Dify cases must be, beyond their catalogue entry. */
async function expectedErrors(): Promise<Map<string, Partial<Outcome>>> {
  const app: AppConfig = { model: "dify", key: "app-chat", type: "chat", url: "http://dify", input: "query" };
  const expected = new Map<string, Partial<Outcome>>();
  const both = (label: string, outcome: Partial<Outcome>, streamed = outcome) => {
    expected.set(`${label} (non-streaming)`, outcome);
    expected.set(`${label} (streaming)`, streamed);
  };
  const upstream = { type: "upstream_error" };
  const mapped: Record<number, Partial<Outcome>> = {
    400: { status: 400, type: "invalid_request_error" },
    401: { status: 502, ...upstream }, // the operator's key was rejected: not the client's fault
    403: { status: 502, ...upstream },
    404: { status: 502, ...upstream },
    413: { status: 413, type: "invalid_request_error" },
    415: { status: 502, ...upstream },
    429: { status: 429, type: "rate_limit_error", retryAfter: "1" },
    500: { status: 502, ...upstream },
    503: { status: 502, ...upstream },
  };
  for (const status of DIFY_STATUSES) both(`status_${status}`, mapped[status]);
  const errors = await readErrorsJson();
  for (const [name, s] of Object.entries(errors.http)) {
    const e = difyError(s.status, s.body, app, false);
    both(`http_${name}`, { status: e.status, type: e.type, code: e.code });
  }
  const midAnswer = (code: string) => ({ status: 200, content: true, done: false, code });
  both("midstream_error", { status: 400, code: "completion_request_error" }, midAnswer("completion_request_error"));
  both("eof", { status: 502, code: "incomplete_stream" }, midAnswer("incomplete_stream"));
  both("reset", { status: 502, code: "upstream_broken" }, midAnswer("upstream_broken"));
  both("an answer past ANSWER_TIMEOUT_SECONDS", { status: 504 }, midAnswer("answer_timeout"));
  both("html502", { status: 502, code: "dify_502" });
  both("html504", { status: 504, code: "dify_504" });
  both("json_instead", { status: 502, code: "bad_upstream_response" });
  both("error200", { status: 400, code: "invalid_param" });
  expected.set("no messages", { status: 400, param: "messages" });
  expected.set("bad role", { status: 400, param: "messages[0].role" });
  expected.set("too many content parts", { param: "messages[0].content" });
  expected.set("unknown model", { param: "model" });
  expected.set("wrong method", { allow: "POST" });
  expected.set("SIGTERM mid-answer, past SHUTDOWN_GRACE_SECONDS", midAnswer("shutting_down"));
  both("past MAX_CONCURRENT_STREAMS", { status: 503, retryAfter: "1" });
  return expected;
}

Deno.test("errors: every catalogue entry a client can provoke comes out the same on Deno and Bun", async () => {
  const runtimes: RuntimeName[] = HAVE_BUN ? ["deno", "bun"] : ["deno"];
  const outcomes = new Map<RuntimeName, Map<string, Outcome & { name?: ErrorName }>>();
  await Promise.all(
    runtimes.map((rt) =>
      withProcess(
        rt,
        { DIFY_API_KEY: "" },
        ({ proc: open }) =>
          withProcess(rt, errorCaseEnv, async ({ proc, dify }) => {
            outcomes.set(rt, await provokeErrors(proc, dify, open.url));
          }),
      )
    ),
  );
  const expected = await expectedErrors();
  const provoked = new Set<ErrorName>();
  for (const [rt, got] of outcomes) {
    for (const [label, want] of expected) {
      const outcome = got.get(label);
      assert.ok(outcome, `${rt}: no case ${label}`);
      const seen = Object.fromEntries(Object.keys(want).map((k) => [k, outcome[k as keyof Outcome]]));
      assert.deepEqual(seen, want, `${rt}, ${label}: ${JSON.stringify(outcome)}`);
    }
    for (const [label, outcome] of got) {
      assert.ok(outcome.code && outcome.type && outcome.message, `${rt}, ${label}: ${JSON.stringify(outcome)}`);
      if (outcome.name) {
        assertCatalogued(outcome, outcome.name, `${rt}, ${label}`);
        provoked.add(outcome.name);
      }
    }
  }
  // The catalogue, walked: each entry was provoked from outside, or cannot be (and has its shape).
  for (const name of Object.keys(ERRORS) as ErrorName[]) {
    if (provoked.has(name)) continue;
    assert.ok(NOT_PROVOKABLE[name], `no case provokes ${name}: add one, or say why none can`);
    const e = apiError(name, "m");
    assert.deepEqual([e.status, e.type, e.code], [...ERRORS[name], name]);
    assert.deepEqual(Object.keys(JSON.parse(errorJson(e)).error), ["message", "type", "param", "code"]);
  }
  for (const name of Object.keys(NOT_PROVOKABLE)) assert.ok(!provoked.has(name as ErrorName), `${name} is provoked`);
  if (outcomes.size === 2) {
    const deno = outcomes.get("deno")!;
    const bun = outcomes.get("bun")!;
    assert.ok(deno.size > 120, `${deno.size} cases`);
    assert.deepEqual([...bun.keys()], [...deno.keys()]);
    for (const [label, outcome] of deno) assert.deepEqual(bun.get(label), outcome, `bun vs deno: ${label}`);
  }
});

// ─── Conversations across restarts and processes ─────────────────────────────────────────────────

/** A store file for `rt` in a folder main.ts has to create: Bun's SQLite file and a Deno KV file differ. */
function storeFileFor(rt: RuntimeName) {
  return tempStoreFile(`data/conversations.${rt === "bun" ? "sqlite" : "kv"}`);
}

testEachRuntime("a restart on the same KV_PATH file continues the chat", async (rt) => {
  const dify = await startFakeDify();
  const store = await storeFileFor(rt);
  const env = { DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat", KV_PATH: store.path };
  let proc: ProcessBridge | undefined;
  try {
    proc = await startProcess(rt, env);
    const chat = new ChatSession(openai(proc.url), { stream: true, extra: { user: "restart" } });
    const t1 = turnOf((await chat.say("before the restart")).content);
    // Stopped the moment the answer arrived: shutdown waits for the conversation's write.
    const first = await proc.stop();
    assert.equal(first, 0, `SIGTERM → exit 0:\n${proc.output()}`);
    proc = undefined;
    assert.ok((await Deno.stat(store.path)).size > 0, "the store file exists");
    proc = await startProcess(rt, env);
    const again = new ChatSession(openai(proc.url), { extra: { user: "restart" } });
    again.messages = chat.messages;
    const t2 = turnOf((await again.say("after the restart")).content);
    assert.deepEqual([t2.n, t2.conv, t2.query], [2, t1.conv, "after the restart"]);
    assert.equal(dify.lastBody().query, "after the restart", "only the new message goes to Dify");
    const t3 = turnOf((await again.say("still going")).content);
    assert.deepEqual([t3.n, t3.conv], [3, t1.conv]);
    const second = await proc.stop();
    assert.equal(second, 0, `SIGTERM → exit 0:\n${proc.output()}`);
    proc = undefined;
  } finally {
    if (proc) await proc.stop();
    await dify.close();
    await store.remove();
  }
});

testEachRuntime("two processes sharing one KV_PATH file continue each other's chats", async (rt) => {
  const dify = await startFakeDify();
  const store = await storeFileFor(rt);
  const env = { DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat", KV_PATH: store.path };
  const procs: ProcessBridge[] = [];
  try {
    // Started together: both open (and set up) the new file at the same moment.
    procs.push(...await Promise.all([startProcess(rt, env), startProcess(rt, env)]));
    const [a, b] = procs.map((p) => openai(p.url));
    const messages: { role: "user" | "assistant"; content: string }[] = [user("turn one on A")];
    const turns = [];
    for (const [client, next] of [[a, "turn two on B"], [b, "turn three on A"], [a, ""]] as const) {
      const text = (await streamText(client, { model: "dify", messages })).content;
      turns.push(turnOf(text));
      messages.push(assistant(text));
      if (next) messages.push(user(next));
      // The other process reads the mapping once its durable write commits (not awaited by the answer).
      await untilFingerprints(store.path, turns.length);
    }
    assert.deepEqual(turns.map((t) => t.n), [1, 2, 3]);
    assert.deepEqual(turns.map((t) => t.conv), [turns[0].conv, turns[0].conv, turns[0].conv]);
    assert.deepEqual(dify.generateBodies().map((b) => b.query), ["turn one on A", "turn two on B", "turn three on A"]);
    for (const p of procs.splice(0)) assert.equal(await p.stop(), 0, p.output());
  } finally {
    for (const p of procs) await p.stop();
    await dify.close();
    await store.remove();
  }
});

Deno.test("two in-process bridges and a deno process on one KV file continue each other's chat", async () => {
  const fake = await startFakeDify();
  const kv = await tempStoreFile();
  const env = { DIFY_API_URL: fake.url, DIFY_API_KEY: "app-chat", KV_PATH: kv.path };
  const bridges: Bridge[] = [];
  let proc: ProcessBridge | undefined;
  try {
    bridges.push(await startBridge(env), await startBridge(env));
    proc = await startProcess("deno", env);
    const one = new ChatSession(bridges[0].client(), { extra: { user: "scale" } });
    const a1 = turnOf((await one.say("on the first bridge")).content);
    // Across processes a mapping is there once its KV write commits (the answer does not wait for it).
    await untilFingerprints(kv.path, 1);
    const two = new ChatSession(bridges[1].client(), { stream: true });
    two.messages = one.messages;
    const a2 = turnOf((await two.say("on the second bridge")).content);
    assert.deepEqual([a2.n, a2.conv], [2, a1.conv]);
    await untilFingerprints(kv.path, 2);
    const three = new ChatSession(openai(proc.url));
    three.messages = one.messages;
    const a3 = turnOf((await three.say("on the subprocess")).content);
    assert.deepEqual([a3.n, a3.conv], [3, a1.conv]);
    await untilFingerprints(kv.path, 3);
    const a4 = turnOf((await one.say("back on the first bridge")).content);
    assert.deepEqual([a4.n, a4.conv], [4, a1.conv]);
    const bodies = fake.generateBodies();
    assert.deepEqual(bodies.map((b) => b.user), ["scale", "scale", "scale", "scale"]);
    assert.deepEqual(bodies.slice(1).map((b) => b.query), [
      "on the second bridge",
      "on the subprocess",
      "back on the first bridge",
    ]);
  } finally {
    if (proc) await proc.stop();
    for (const b of bridges) await b.close();
    await fake.close();
    await kv.remove();
  }
});

// ─── Shutdown ────────────────────────────────────────────────────────────────────────────────────

testEachRuntime(
  "SIGTERM: new connections are refused, the answer in flight finishes with [DONE], exit 0",
  async (rt) => {
    // BUN_CONFIG_MAX_HTTP_REQUESTS empty: on Bun the launcher re-executes main.ts and forwards SIGTERM.
    const dify = await startFakeDify();
    let proc: ProcessBridge | undefined;
    try {
      proc = await startProcess(rt, {
        DIFY_API_URL: dify.url,
        DIFY_API_KEY: "app-chat",
        BUN_CONFIG_MAX_HTTP_REQUESTS: "",
        SHUTDOWN_GRACE_SECONDS: "20",
      });
      const query = "graceful shutdown lets this answer finish word by word fault:slow:50";
      const res = await fetch(`${proc.url}/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: "Bearer sk-test" },
        body: JSON.stringify({ model: "dify", messages: [user(query)], stream: true }),
        signal: AbortSignal.timeout(15_000),
      });
      assert.equal(res.status, 200);
      const reader = res.body!.getReader();
      const head = await readUntil(reader, "", hasContent);
      const exited = proc.stop("SIGTERM");
      assert.ok(await untilRefused(proc.port), "still accepting connections after SIGTERM");
      // The answer was still streaming while new connections were refused, and it completes.
      assert.ok(!head.includes("[DONE]"));
      const text = await readUntil(reader, head, () => false);
      const code = await exited;
      const output = proc.output();
      proc = undefined;
      assert.equal(code, 0, output);
      assert.match(output, /shutting down, letting 1 open answers finish/);
      assert.equal(sseData(text).at(-1), "[DONE]", text);
      assert.equal(turnOf(readSse(text).content).query, query);
      assert.equal(dify.stops.length, 0, "the answer was not cut short");
    } finally {
      if (proc) await proc.stop();
      await dify.close();
    }
  },
);

Deno.test(
  "lifecycle: a stream longer than SHUTDOWN_GRACE_SECONDS gets an error frame, and the process exits 0",
  async () => {
    const dify = await startFakeDify();
    const proc = await startProcess("deno", {
      DIFY_API_URL: dify.url,
      DIFY_API_KEY: "app-chat",
      SHUTDOWN_GRACE_SECONDS: "0.5",
      KEEPALIVE_SECONDS: "0.1",
    });
    try {
      const res = await fetch(`${proc.url}/chat/completions`, {
        method: "POST",
        headers: { authorization: "Bearer sk" },
        body: JSON.stringify({ model: "dify", stream: true, messages: [user("fault:forever")] }),
        signal: AbortSignal.timeout(15_000),
      });
      assert.equal(res.status, 200);
      const reader = res.body!.getReader();
      let text = await readUntil(reader, "", (t) => t.includes('"role":"assistant"'));
      proc.process.kill("SIGTERM");
      text = await readUntil(reader, text, () => false);
      const last = sseData(text).at(-1) as { error?: { code?: string } };
      assert.equal(last?.error?.code, "shutting_down", text.slice(-300));
      assert.ok(!text.includes("[DONE]"));
      assert.equal(await proc.stop(), 0);
    } finally {
      await proc.stop();
      await dify.close();
    }
  },
);

Deno.test("lifecycle: a client that stops reading does not keep the process from exiting", async () => {
  const dify = await startFakeDify();
  const proc = await startProcess("deno", {
    DIFY_API_URL: dify.url,
    DIFY_API_KEY: "app-chat",
    SHUTDOWN_GRACE_SECONDS: "0.5",
    MAX_ANSWER_BYTES: "64000000",
  });
  const conn = await Deno.connect({ hostname: "127.0.0.1", port: proc.port });
  try {
    // A 30 MB answer to a client that reads nothing after the response head: the answer never ends.
    const body = JSON.stringify({ model: "dify", stream: true, messages: [user("fault:huge_line:30000000")] });
    await conn.write(new TextEncoder().encode(
      `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
    ));
    const head = new Uint8Array(1024);
    const n = await conn.read(head);
    assert.match(new TextDecoder().decode(head.subarray(0, n ?? 0)), /^HTTP\/1\.1 200/);
    proc.process.kill("SIGTERM");
    let timer: ReturnType<typeof setTimeout> | undefined;
    const status = await Promise.race([
      proc.process.status,
      new Promise<null>((resolve) => timer = setTimeout(() => resolve(null), 15_000)),
    ]);
    clearTimeout(timer);
    assert.ok(status, "the process is still waiting for the client after SIGTERM");
    assert.equal(status.code, 0);
  } finally {
    conn.close();
    await proc.stop();
    await dify.close();
  }
});

Deno.test("lifecycle: invalid configuration stops start-up with exit code 1 and one line on stderr", async () => {
  const cases: [Record<string, string>, RegExp][] = [
    [{ DIFY_APPS: '{"a": "app-1",' }, /DIFY_APPS is not valid JSON/],
    [{ DIFY_APPS: '{"a": 42}' }, /DIFY_APPS\["a"\]/],
    [{ DIFY_API_URL: "not a url" }, /DIFY_API_URL is not a URL/],
    [{ DIFY_API_URL: "ftp://dify.example/v1" }, /DIFY_API_URL must be an http\(s\) URL/],
    [{ CONVERSATION_MODE: "sometimes" }, /CONVERSATION_MODE must be one of/],
    [{ MAX_BODY_BYTES: "lots" }, /MAX_BODY_BYTES must be a number/],
  ];
  const { port } = Deno.listen({ port: 0, hostname: "127.0.0.1" }).addr as Deno.NetAddr;
  await Promise.all(cases.map(async ([env, message]) => {
    const out = await new Deno.Command("deno", {
      args: ["run", "--allow-all", "--unstable-kv", MAIN],
      cwd: ROOT.pathname,
      env: { PORT: String(port), KV_PATH: ":memory:", DIFY_API_KEY: "app-chat", ...env },
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      signal: AbortSignal.timeout(20_000),
    }).output();
    const stderr = new TextDecoder().decode(out.stderr);
    const what = `${JSON.stringify(env)}: ${stderr}`;
    assert.equal(out.code, 1, what);
    assert.equal(new TextDecoder().decode(out.stdout), "", what);
    const lines = stderr.split("\n").filter((l) => l.trim());
    assert.equal(lines.length, 1, what);
    assert.match(lines[0], /^dify-openai: /, what);
    assert.match(lines[0], message, what);
    assert.doesNotMatch(stderr, /\bat .*:\d+:\d+|Error:|Uncaught/, what);
  }));
});

// ─── Secrets ─────────────────────────────────────────────────────────────────────────────────────

/** Everything a client can see of a response: status line, headers and body. */
async function visibleText(res: Response): Promise<string> {
  const headers = [...res.headers].map(([k, v]) => `${k}: ${v}`).join("\n");
  return `${res.status}\n${headers}\n\n${await res.text()}`;
}

/** Requests that walk the success and error paths, with secrets everywhere they could leak from. */
async function leakWalk(base: string, proxyKey: string): Promise<string[]> {
  const seen: string[] = [];
  const post = async (body: unknown, key = proxyKey, extra: Record<string, string> = {}) => {
    const res = await fetch(`${base}/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${key}`, ...extra },
      body: typeof body === "string" ? body : JSON.stringify(body),
    });
    seen.push(await visibleText(res));
  };
  for (const stream of [true, false]) {
    await post({ model: "good", stream, messages: [user("hi")] });
    await post({ model: "good", stream, messages: [user("fault:status_500")] });
    await post({ model: "good", stream, messages: [user("fault:reset")] });
    await post({ model: "good", stream, messages: [user("fault:html502")] });
    await post({ model: "bad", stream, messages: [user("hi")] }); // Dify 401 on the configured key
    await post({ model: "down", stream, messages: [user("hi")] }); // connection refused
    await post({ model: "nope", stream, messages: [user("hi")] });
  }
  await post("{not json");
  await post({ model: "good", messages: [user("hi")] }, "sk-client-s3cr3t-wrong");
  await post({ model: "good", messages: [user("hi")] }, "app-chat-s3cr3t-client");
  for (const path of ["/models", "/models/good", "/conversations/u1"]) {
    const res = await fetch(base + path, {
      method: path.startsWith("/conv") ? "DELETE" : "GET",
      headers: { authorization: `Bearer ${proxyKey}` },
    });
    seen.push(await visibleText(res));
  }
  return seen;
}

Deno.test(
  "security: keys and tokens never reach logs, error messages or response headers (in-process and subprocess)",
  async () => {
    const dify = await startFakeDify();
    const closed = closedPort();
    const env = {
      DIFY_API_URL: dify.url,
      PROXY_API_KEYS: "sk-proxy-s3cr3t-1,sk-proxy-s3cr3t-2",
      DIFY_APPS: JSON.stringify({
        good: "app-chat-s3cr3t-good",
        bad: "app-bad",
        down: { key: "app-chat-s3cr3t-down", url: `http://127.0.0.1:${closed}/v1` },
      }),
      LOG_CONTENT: "",
    };
    const secrets = /s3cr3t|app-bad/;
    const bridge = await startBridge(env);
    let proc: Awaited<ReturnType<typeof startProcess>> | undefined;
    try {
      const seen = await leakWalk(bridge.url, "sk-proxy-s3cr3t-1");
      // The walk really went through the error paths it names.
      const statuses = seen.map((s) => Number(s.slice(0, 3)));
      for (const status of [200, 400, 401, 404, 502]) assert.ok(statuses.includes(status), `no ${status}`);
      assert.ok(dify.requests.some((r) => r.key === "app-bad") && dify.requests.some((r) => r.key.includes("s3cr3t")));
      for (const text of [...seen, ...bridge.logs, ...bridge.warnings]) assert.doesNotMatch(text, secrets);
      assert.ok(bridge.logs.length >= 14);
      // The same walk against main.ts as a process: nothing on stdout or stderr either.
      proc = await startProcess("deno", env);
      const seenProc = await leakWalk(proc.url, "sk-proxy-s3cr3t-2");
      for (const text of seenProc) assert.doesNotMatch(text, secrets);
      assert.equal(await proc.stop(), 0);
      assert.match(proc.output(), /"status":502/);
      assert.doesNotMatch(proc.output(), secrets);
    } finally {
      if (proc) await proc.stop();
      await bridge.close();
      await dify.close();
    }
    // Pass-through: the client's own Dify key, accepted or rejected, stays out of everything.
    await withBridge({ DIFY_API_KEY: "" }, async ({ dify, bridge: open }) => {
      const seen: string[] = [];
      for (
        const [key, query] of [["app-chat-s3cr3t-pass", "hi"], ["app-chat-s3cr3t-pass", "fault:status_401"], [
          "app-bad",
          "hi",
        ]]
      ) {
        for (const stream of [true, false]) {
          const res = await fetch(`${open.url}/chat/completions`, {
            method: "POST",
            headers: { authorization: `Bearer ${key}` },
            body: JSON.stringify({ model: "x", stream, messages: [user(query)] }),
          });
          seen.push(await visibleText(res));
        }
      }
      assert.deepEqual(seen.map((s) => Number(s.slice(0, 3))), [200, 200, 401, 401, 401, 401]);
      assert.ok(dify.requests.some((r) => r.key === "app-chat-s3cr3t-pass"));
      for (const text of [...seen, ...open.logs, ...open.warnings]) assert.doesNotMatch(text, secrets);
    });
  },
);

// ─── Start-up and load ───────────────────────────────────────────────────────────────────────────

Deno.test({
  name: "runtimes: KV_PATH=https://… stops bun main.ts at start-up with one clear line (bun)",
  ignore: !HAVE_BUN,
  async fn() {
    for (const limit of ["", "2048"]) {
      const out = await new Deno.Command("bun", {
        args: [MAIN],
        cwd: ROOT.pathname,
        env: {
          PORT: String(closedPort()),
          DIFY_API_KEY: "app-chat",
          KV_PATH: "https://api.deno.com/databases/00000000-0000-0000-0000-000000000000/connect",
          BUN_CONFIG_MAX_HTTP_REQUESTS: limit,
        },
        stdin: "null",
        signal: AbortSignal.timeout(15_000),
      }).output();
      const stderr = new TextDecoder().decode(out.stderr);
      const lines = stderr.split("\n").filter((l) => l.trim());
      assert.equal(out.code, 1, `BUN_CONFIG_MAX_HTTP_REQUESTS=${limit}: ${stderr}`);
      assert.equal(lines.length, 1, stderr);
      assert.match(lines[0], /^dify-openai: KV_PATH .*Deno only/);
      assert.equal(new TextDecoder().decode(out.stdout), "");
    }
  },
});

testEachRuntime("1,000 concurrent streams all reach Dify at once (nothing queues), then all complete", async (rt) => {
  const total = 1000;
  // BUN_CONFIG_MAX_HTTP_REQUESTS empty counts as unset: main.ts must relaunch Bun with the limit raised,
  // or Bun's fetch holds all but 256 of these back and the fake never holds 1,000.
  await withProcess(rt, { BUN_CONFIG_MAX_HTTP_REQUESTS: "" }, async ({ dify, proc }) => {
    // Raw fetch from Deno: no client-side cap, every request gets its own connection.
    const answers = Array.from({ length: total }, async (_, i) => {
      const res = await fetch(`${proc.url}/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: "Bearer sk-test" },
        body: JSON.stringify({ model: "dify", messages: [user(`stream ${i} fault:hold`)], stream: true }),
      });
      return { i, status: res.status, text: await res.text() };
    });
    const settled = Promise.allSettled(answers);
    const reached = await until(() => dify.held() >= total, 60_000);
    // Failing here, before waiting for the answers: the queued rest would sit out the upstream timeout.
    assert.ok(reached, `only ${dify.held()} of ${total} requests reached Dify at once`);
    assert.equal(dify.held(), total);
    dify.release();
    const results = await settled;
    for (const r of results) {
      assert.equal(r.status, "fulfilled", String((r as PromiseRejectedResult).reason));
      const { i, status, text } = (r as PromiseFulfilledResult<Awaited<(typeof answers)[number]>>).value;
      assert.equal(status, 200, text);
      assert.equal(sseData(text).at(-1), "[DONE]", text);
      assert.equal(turnOf(readSse(text).content).query, `stream ${i} fault:hold`);
    }
  });
});

Deno.test({
  name: "runtimes: a bun main.ts whose launcher is SIGKILLed stops instead of serving on as an orphan (bun)",
  ignore: !HAVE_BUN,
  async fn() {
    // BUN_CONFIG_MAX_HTTP_REQUESTS empty: main.ts relaunches itself; the launcher is the process we hold.
    const proc = await startProcess("bun", { DIFY_API_KEY: "app-chat", BUN_CONFIG_MAX_HTTP_REQUESTS: "" });
    const launcher = proc.process.pid;
    const children = (await Deno.readTextFile(`/proc/${launcher}/task/${launcher}/children`).catch(() => ""))
      .trim().split(/\s+/).filter(Boolean).map(Number);
    if (Deno.build.os === "linux") assert.equal(children.length, 1, "BUN_CONFIG_MAX_HTTP_REQUESTS='' relaunches Bun");
    try {
      proc.process.kill("SIGKILL");
      await proc.process.status;
      const gone = await untilRefused(proc.port, 10_000);
      assert.ok(gone, `the relaunched child still serves port ${proc.port} after its launcher died`);
    } finally {
      for (const pid of children) {
        try {
          Deno.kill(pid, "SIGKILL");
        } catch { /* already gone */ }
      }
    }
  },
});
