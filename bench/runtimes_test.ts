/**
 * Runtimes (issue 9): the same HTTP-level tests against `deno run main.ts` and `bun main.ts`, each a
 * subprocess in front of the in-process fake Dify, driven by the official openai SDK and raw fetch.
 * Every test runs once per runtime ("… (deno)", "… (bun)"); the Bun half is skipped when Bun is not
 * installed. Runtime-specific state (Deno KV file vs SQLite file) gets its own temp file per runtime.
 */
import assert from "node:assert/strict";
import { type AppConfig, difyError } from "../main.ts";
import { type FakeDify, readErrorsJson, readFixture, startFakeDify } from "./fake_dify.ts";
import {
  assistant,
  bunAvailable,
  MAIN,
  openai,
  type ProcessBridge,
  rawChat,
  ROOT,
  sseData,
  startProcess,
  streamText,
  user,
} from "./test_util.ts";

type RuntimesName = "deno" | "bun";

const RUNTIMES_HAVE_BUN = bunAvailable();
const RUNTIMES: { rt: RuntimesName; ignore: boolean }[] = [
  { rt: "deno", ignore: false },
  { rt: "bun", ignore: !RUNTIMES_HAVE_BUN },
];
const RUNTIMES_OPENCLAW = "/work/shared/openclaw-wire/";

/** Registers the same test body once per runtime. */
function runtimesTest(name: string, fn: (rt: RuntimesName) => Promise<void>): void {
  for (const { rt, ignore } of RUNTIMES) {
    Deno.test({
      name: `runtimes: ${name} (${rt})`,
      ignore,
      sanitizeResources: false,
      sanitizeOps: false,
      fn: () => fn(rt),
    });
  }
}

interface RuntimesRig {
  dify: FakeDify;
  proc: ProcessBridge;
  client: ReturnType<typeof openai>;
}

/**
 * A fake Dify and `<rt> main.ts` in front of it; after `fn`, SIGTERM must end the process with 0.
 * A failure carries what the process printed.
 */
async function runtimesWith(
  rt: RuntimesName,
  env: Record<string, string> | ((dify: FakeDify) => Record<string, string>),
  fn: (rig: RuntimesRig) => Promise<void>,
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

async function runtimesFixture(name: string) {
  const text = new TextDecoder().decode(await readFixture(`${name}.sse`));
  const events = text.split("\n").filter((l) => l.startsWith("data: ")).map((l) => JSON.parse(l.slice(6)));
  const answer = events.filter((e) => e.event === "message").map((e) => e.answer).join("");
  const u = events.find((e) => e.event === "message_end").metadata.usage;
  return {
    answer,
    usage: { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens, total_tokens: u.total_tokens },
  };
}

/** The fake's generated answer `Turn <n> of <conv8>: <query>`, taken apart. */
function runtimesTurn(text: string) {
  const m = /^Turn (\d+) of ([0-9a-f]{8}): ([\s\S]*)$/.exec(text);
  assert.ok(m, `not a generated answer: ${JSON.stringify(text)}`);
  return { n: Number(m[1]), conv: m[2], query: m[3] };
}

/** The joined `delta.content` of an SSE body. */
function runtimesContent(text: string): string {
  return sseData(text).filter((d) => d !== "[DONE]").map((d) =>
    (d as { choices?: { delta?: { content?: string } }[] }).choices?.[0]?.delta?.content ?? ""
  ).join("");
}

function runtimesSleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Waits until `check` is true or the deadline passes; returns whether it became true. */
async function runtimesUntil(check: () => boolean, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) return false;
    await runtimesSleep(20);
  }
  return true;
}

/** Waits until nothing accepts connections on the port any more; false if something still does. */
async function runtimesPortClosed(port: number, ms: number): Promise<boolean> {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    try {
      const res = await fetch(`http://127.0.0.1:${port}/healthz`);
      await res.body?.cancel();
    } catch {
      return true;
    }
    await runtimesSleep(100);
  }
  return false;
}

function runtimesClosedPort(): number {
  const listener = Deno.listen({ port: 0, hostname: "127.0.0.1" });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
}

/** Reads a streaming response until its SSE text holds some answer content; returns the text so far. */
async function runtimesReadUntilContent(reader: ReadableStreamDefaultReader<Uint8Array>): Promise<string> {
  const decoder = new TextDecoder();
  let text = "";
  while (!runtimesContent(text.slice(0, text.lastIndexOf("\n\n") + 2))) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`the stream ended before any content:\n${text}`);
    text += decoder.decode(value, { stream: true });
  }
  return text;
}

async function runtimesReadRest(reader: ReadableStreamDefaultReader<Uint8Array>, text: string): Promise<string> {
  const decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return text + decoder.decode();
    text += decoder.decode(value, { stream: true });
  }
}

// ─── answers ────────────────────────────────────────────────────────────────────────────────────

runtimesTest("streaming and non-streaming answers with usage, through the SDK and raw fetch", async (rt) => {
  const fx = await runtimesFixture("chat_basic");
  await runtimesWith(rt, {}, async ({ dify, proc, client }) => {
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
    assert.equal(runtimesContent(r.text), `Turn 1 of ${conv.slice(0, 8)}: hello raw fetch`);

    const n = await rawChat(proc.url, { model: "dify", messages: [user("hello again")] });
    assert.equal(n.status, 200, n.text);
    assert.match(n.headers.get("content-type") ?? "", /^application\/json/);
    const body = JSON.parse(n.text);
    assert.equal(runtimesTurn(body.choices[0].message.content).query, "hello again");
    assert.equal(body.usage.total_tokens, body.usage.prompt_tokens + body.usage.completion_tokens);
    assert.ok(body.usage.completion_tokens > 0, JSON.stringify(body.usage));
    assert.deepEqual(dify.generateBodies().map((b) => b.response_mode), Array(4).fill("streaming"));
  });
});

runtimesTest("three turns continue one Dify conversation", async (rt) => {
  await runtimesWith(rt, {}, async ({ dify, client }) => {
    const messages: { role: "user" | "assistant"; content: string }[] = [user("first question")];
    const say = async (stream: boolean) => {
      const text = stream
        ? (await streamText(client, { model: "dify", messages, user: "multi" })).content
        : (await client.chat.completions.create({ model: "dify", messages, user: "multi" })).choices[0].message
          .content ?? "";
      messages.push(assistant(text));
      return runtimesTurn(text);
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

// ─── errors ─────────────────────────────────────────────────────────────────────────────────────

/** What a client can see of an answer: status, the OpenAI error fields, and for 200 streams the frames. */
interface RuntimesOutcome {
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
function runtimesStableMessage(message: string): string {
  return message.replace(/(not valid JSON|mid-answer|could not reach Dify for model \S+ at)[: ].*$/s, "$1 …");
}

async function runtimesOutcome(res: Response): Promise<RuntimesOutcome> {
  const text = await res.text();
  const out: RuntimesOutcome = { status: res.status };
  let error: Record<string, unknown> | undefined;
  if (res.status === 200 && /event-stream/.test(res.headers.get("content-type") ?? "")) {
    const data = sseData(text);
    out.content = runtimesContent(text) !== "";
    out.done = data.includes("[DONE]");
    error = (data.find((d) => typeof d === "object" && d !== null && "error" in d) as { error?: never })?.error;
  } else if (res.status !== 200) {
    error = JSON.parse(text).error;
    out.retryAfter = res.headers.get("retry-after");
    out.allow = res.headers.get("allow");
  }
  if (error) {
    out.type = error.type as string;
    out.code = error.code as string | null;
    out.param = error.param as string | null;
    out.message = runtimesStableMessage(String(error.message));
  }
  return out;
}

const RUNTIMES_KEY = "sk-runtimes-proxy";
const RUNTIMES_STATUSES = [400, 401, 403, 404, 413, 415, 429, 500, 503];

/** The process every error case runs against: two apps (one unreachable), a proxy key, a 64 KiB body limit,
 * a 1 s idle limit. */
function runtimesErrorEnv(dify: FakeDify): Record<string, string> {
  const down = `http://127.0.0.1:${runtimesClosedPort()}/v1`;
  return {
    DIFY_APPS: JSON.stringify({
      dify: { key: "app-chat", type: "chat", url: dify.url },
      down: { key: "app-chat", type: "chat", url: down },
    }),
    PROXY_API_KEYS: RUNTIMES_KEY,
    MAX_BODY_BYTES: "65536",
    UPSTREAM_IDLE_SECONDS: "1",
  };
}

/** Every error case, by label: Dify's HTTP errors and stream faults, connection refused, bad requests. */
async function runtimesErrorMatrix(url: string): Promise<Map<string, RuntimesOutcome>> {
  const auth = { authorization: `Bearer ${RUNTIMES_KEY}` };
  const post = (body: unknown, headers: Record<string, string> = {}, path = "/chat/completions") =>
    fetch(url + path, {
      method: "POST",
      headers: { "content-type": "application/json", ...auth, ...headers },
      body: typeof body === "string" ? body : JSON.stringify(body),
    });
  const ask = (text: string, stream: boolean, model = "dify") =>
    post({ model, messages: [user(text)], stream, user: "errors" });
  const cases: [string, () => Promise<Response>][] = [];
  const both = (label: string, text: string, model?: string) => {
    cases.push([`${label} (non-streaming)`, () => ask(text, false, model)]);
    cases.push([`${label} (streaming)`, () => ask(text, true, model)]);
  };
  for (const status of RUNTIMES_STATUSES) both(`status_${status}`, `fault:status_${status}`);
  const errors = await readErrorsJson();
  for (const name of Object.keys(errors.http)) both(`http_${name}`, `fault:http_${name}`);
  for (const fault of ["midstream_error", "eof", "html502", "json_instead", "error200"]) {
    both(fault, `several words of answer before the fault fault:${fault}`);
  }
  // Paced and sent alone, after the rest: Bun's fetch discards body bytes it received but the reader
  // had not taken yet when the connection resets, so under load the words before the reset can vanish.
  const serial: [string, () => Promise<Response>][] = [
    ["reset (non-streaming)", () => ask("several words of answer before the fault fault:reset fault:slow:50", false)],
    ["reset (streaming)", () => ask("several words of answer before the fault fault:reset fault:slow:50", true)],
  ];
  // Dify's stream breaks off, or goes silent past UPSTREAM_IDLE_SECONDS, before any answer text (the
  // fixture has none before its end): nothing was said, so a stream too must get an HTTP status.
  both("eof before any content", "fixture:workflow_run_failed fault:eof");
  both("idle before any content", "fixture:workflow_run_failed fault:idle:10000");
  both("connection refused", "anyone there?", "down");
  const big = JSON.stringify({ model: "dify", messages: [user("x".repeat(100_000))] });
  cases.push(
    ["invalid JSON", () => post("{not json")],
    ["body not an object", () => post("[1, 2]")],
    ["no messages", () => post({ model: "dify", messages: [] })],
    ["bad role", () => post({ model: "dify", messages: [{ role: "robot", content: "hi" }] })],
    ["unknown model", () => post({ model: "nope", messages: [user("hi")] })],
    ["unknown route", () => post({ model: "dify", messages: [user("hi")] }, {}, "/nowhere")],
    ["wrong method", () => fetch(`${url}/chat/completions`, { headers: auth })],
    ["body over MAX_BODY_BYTES (content-length)", () => post(big)],
    ["body over MAX_BODY_BYTES (chunked)", () => {
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
      });
    }],
    ["no API key", () => post({ model: "dify", messages: [user("hi")] }, { authorization: "" })],
    ["wrong API key", () => post({ model: "dify", messages: [user("hi")] }, { authorization: "Bearer sk-wrong" })],
  );
  const results = new Map<string, RuntimesOutcome>();
  await Promise.all(cases.map(async ([label, send]) => results.set(label, await runtimesOutcome(await send()))));
  for (const [label, send] of serial) results.set(label, await runtimesOutcome(await send()));
  return new Map([...results].sort(([a], [b]) => a.localeCompare(b)));
}

/** What the mapping table of issue 3 says each case must be. */
async function runtimesExpectedErrors(): Promise<Map<string, Partial<RuntimesOutcome>>> {
  const app: AppConfig = { model: "dify", key: "app-chat", type: "chat", url: "http://dify", input: "query" };
  const expected = new Map<string, Partial<RuntimesOutcome>>();
  const both = (label: string, outcome: Partial<RuntimesOutcome>, streamed = outcome) => {
    expected.set(`${label} (non-streaming)`, outcome);
    expected.set(`${label} (streaming)`, streamed);
  };
  const upstream = { type: "upstream_error" };
  const mapped: Record<number, Partial<RuntimesOutcome>> = {
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
  for (const status of RUNTIMES_STATUSES) both(`status_${status}`, mapped[status]);
  const errors = await readErrorsJson();
  for (const [name, s] of Object.entries(errors.http)) {
    const e = difyError(s.status, s.body, app, false);
    both(`http_${name}`, { status: e.status, type: e.type, code: e.code });
  }
  both("midstream_error", { status: 400, code: "completion_request_error" }, {
    status: 200,
    content: true,
    done: false,
    code: "completion_request_error",
  });
  both("eof", { status: 502, code: "incomplete_stream" }, {
    status: 200,
    content: true,
    done: false,
    code: "incomplete_stream",
  });
  both("reset", { status: 502, code: "upstream_broken" }, {
    status: 200,
    content: true,
    done: false,
    code: "upstream_broken",
  });
  both("eof before any content", { status: 502, code: "incomplete_stream" });
  both("idle before any content", { status: 504, code: "upstream_idle_timeout" });
  both("html502", { status: 502, code: "dify_502" });
  both("json_instead", { status: 502, code: "bad_upstream_response" });
  both("error200", { status: 400, code: "invalid_param" });
  both("connection refused", { status: 502, type: "upstream_error", code: "upstream_unreachable" });
  expected.set("invalid JSON", { status: 400, code: "invalid_json" });
  expected.set("body not an object", { status: 400, type: "invalid_request_error" });
  expected.set("no messages", { status: 400, param: "messages" });
  expected.set("bad role", { status: 400, param: "messages[0].role" });
  expected.set("unknown model", { status: 404, code: "model_not_found", param: "model" });
  expected.set("unknown route", { status: 404, code: "not_found" });
  expected.set("wrong method", { status: 405, code: "method_not_allowed", allow: "POST" });
  expected.set("body over MAX_BODY_BYTES (content-length)", { status: 413, code: "request_too_large" });
  expected.set("body over MAX_BODY_BYTES (chunked)", { status: 413, code: "request_too_large" });
  expected.set("no API key", { status: 401, type: "authentication_error", code: "invalid_api_key" });
  expected.set("wrong API key", { status: 401, type: "authentication_error", code: "invalid_api_key" });
  return expected;
}

runtimesTest("every error mapping: Dify errors, stream faults, connection refused, bad requests", async (rt) => {
  await runtimesWith(rt, runtimesErrorEnv, async ({ proc }) => {
    const got = await runtimesErrorMatrix(proc.url);
    const expected = await runtimesExpectedErrors();
    assert.deepEqual([...got.keys()].sort(), [...expected.keys()].sort());
    for (const [label, want] of expected) {
      const outcome = got.get(label)!;
      const seen = Object.fromEntries(Object.keys(want).map((k) => [k, outcome[k as keyof RuntimesOutcome]]));
      assert.deepEqual(seen, want, `${label}: ${JSON.stringify(outcome)}`);
      assert.ok(outcome.status === 200 || (outcome.code && outcome.type && outcome.message), label);
    }
  });
});

Deno.test({
  name: "runtimes: Deno and Bun give exactly the same statuses and error codes for every error case",
  ignore: !RUNTIMES_HAVE_BUN,
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const outcomes: Partial<Record<RuntimesName, Map<string, RuntimesOutcome>>> = {};
    await Promise.all((["deno", "bun"] as const).map((rt) =>
      runtimesWith(rt, runtimesErrorEnv, async ({ proc }) => {
        outcomes[rt] = await runtimesErrorMatrix(proc.url);
      })
    ));
    const deno = outcomes.deno!;
    const bun = outcomes.bun!;
    assert.ok(deno.size > 100, `${deno.size} cases`);
    assert.deepEqual([...bun.keys()], [...deno.keys()]);
    for (const [label, outcome] of deno) assert.deepEqual(bun.get(label), outcome, `bun vs deno: ${label}`);
  },
});

// ─── conversations across restarts and processes ────────────────────────────────────────────────

/** A fresh temp directory; the store file sits in a subfolder main.ts has to create. */
async function runtimesTempStore(rt: RuntimesName) {
  const dir = await Deno.makeTempDir({ prefix: `runtimes-${rt}-` });
  return {
    // Separate files per runtime: a Bun SQLite store and a Deno KV file are different formats.
    path: `${dir}/data/conversations.${rt === "bun" ? "sqlite" : "kv"}`,
    remove: () => Deno.remove(dir, { recursive: true }).catch(() => {}),
  };
}

runtimesTest("a restart on the same KV_PATH file continues the chat", async (rt) => {
  const dify = await startFakeDify();
  const store = await runtimesTempStore(rt);
  const env = { DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat", KV_PATH: store.path };
  let proc: ProcessBridge | undefined;
  try {
    proc = await startProcess(rt, env);
    const messages: { role: "user" | "assistant"; content: string }[] = [user("before the restart")];
    const a1 = (await streamText(openai(proc.url), { model: "dify", messages, user: "restart" })).content;
    const t1 = runtimesTurn(a1);
    const first = await proc.stop();
    assert.equal(first, 0, `SIGTERM → exit 0:\n${proc.output()}`);
    proc = undefined;
    assert.ok((await Deno.stat(store.path)).size > 0, "the store file exists");
    proc = await startProcess(rt, env);
    messages.push(assistant(a1), user("after the restart"));
    const c = await openai(proc.url).chat.completions.create({ model: "dify", messages, user: "restart" });
    const t2 = runtimesTurn(c.choices[0].message.content ?? "");
    assert.deepEqual([t2.n, t2.conv, t2.query], [2, t1.conv, "after the restart"]);
    assert.equal(dify.lastBody().query, "after the restart", "only the new message goes to Dify");
    const second = await proc.stop();
    assert.equal(second, 0, `SIGTERM → exit 0:\n${proc.output()}`);
    proc = undefined;
  } finally {
    if (proc) await proc.stop();
    await dify.close();
    await store.remove();
  }
});

runtimesTest("two processes sharing one KV_PATH file continue each other's chats", async (rt) => {
  const dify = await startFakeDify();
  const store = await runtimesTempStore(rt);
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
      turns.push(runtimesTurn(text));
      messages.push(assistant(text));
      if (next) messages.push(user(next));
      // The other process reads the mapping once its durable write commits (not awaited by the answer).
      await runtimesSleep(250);
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

// ─── client abort, OpenClaw, shutdown ───────────────────────────────────────────────────────────

runtimesTest("a client abort mid-stream stops the Dify task for the same user", async (rt) => {
  await runtimesWith(rt, {}, async ({ dify, proc, client }) => {
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
    assert.ok(await runtimesUntil(() => dify.stops.length > 0, 5_000), "no stop call reached Dify");
    assert.equal(dify.stops.length, 1);
    assert.equal(dify.stops[0].user, "abort-me");
    assert.match(dify.stops[0].path, /^\/chat-messages\/[0-9a-f-]+\/stop$/);
    assert.ok(
      await runtimesUntil(() => /"status":499\b/.test(proc.output()), 5_000),
      "the bridge logs the request as closed by the client",
    );
    assert.match(proc.output(), /"error":"client_closed"/);
  });
});

runtimesTest("the OpenClaw request shape, POSTed as captured", async (rt) => {
  await runtimesWith(rt, { SYSTEM_PROMPT: "drop" }, async ({ dify, proc }) => {
    const body = await Deno.readTextFile(`${RUNTIMES_OPENCLAW}telegram-turn1.json`);
    const r = await rawChat(proc.url, body);
    assert.equal(r.status, 200, r.text);
    assert.match(r.headers.get("content-type") ?? "", /^text\/event-stream/);
    const data = sseData(r.text);
    assert.equal(data.at(-1), "[DONE]");
    assert.equal(runtimesTurn(runtimesContent(r.text)).query, "hi there");
    const usage = (data.at(-2) as { usage?: Record<string, number> }).usage;
    assert.ok(usage && usage.total_tokens > 0, "include_usage is honoured");
    const sent = dify.lastBody();
    assert.equal(sent.query, "hi there");
    assert.equal(sent.user, "telegram:123456789");
  });
});

runtimesTest("SIGTERM lets an answer in flight finish with [DONE], then exits 0", async (rt) => {
  // BUN_CONFIG_MAX_HTTP_REQUESTS empty: on Bun the launcher re-executes main.ts and forwards SIGTERM.
  const dify = await startFakeDify();
  let proc: ProcessBridge | undefined;
  try {
    proc = await startProcess(rt, {
      DIFY_API_URL: dify.url,
      DIFY_API_KEY: "app-chat",
      BUN_CONFIG_MAX_HTTP_REQUESTS: "",
    });
    const query = "graceful shutdown lets this answer finish word by word fault:slow:50";
    const res = await fetch(`${proc.url}/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: "Bearer sk-test" },
      body: JSON.stringify({ model: "dify", messages: [user(query)], stream: true }),
    });
    assert.equal(res.status, 200);
    const reader = res.body!.getReader();
    const head = await runtimesReadUntilContent(reader);
    const exited = proc.stop("SIGTERM");
    const text = await runtimesReadRest(reader, head);
    const code = await exited;
    const output = proc.output();
    proc = undefined;
    assert.equal(code, 0, output);
    assert.match(output, /shutting down, letting 1 open answers finish/);
    assert.equal(sseData(text).at(-1), "[DONE]", text);
    assert.equal(runtimesTurn(runtimesContent(text)).query, query);
    assert.equal(dify.stops.length, 0, "the answer was not cut short");
  } finally {
    if (proc) await proc.stop();
    await dify.close();
  }
});

Deno.test({
  name: "runtimes: KV_PATH=https://… stops bun main.ts at start-up with one clear line (bun)",
  ignore: !RUNTIMES_HAVE_BUN,
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    for (const limit of ["", "2048"]) {
      const out = await new Deno.Command("bun", {
        args: [MAIN],
        cwd: ROOT.pathname,
        env: {
          PORT: String(runtimesClosedPort()),
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

// ─── 1,000 concurrent streams ───────────────────────────────────────────────────────────────────

runtimesTest("1,000 concurrent streams all reach Dify at once (nothing queues), then all complete", async (rt) => {
  const total = 1000;
  // BUN_CONFIG_MAX_HTTP_REQUESTS empty counts as unset: main.ts must relaunch Bun with the limit raised,
  // or Bun's fetch holds all but 256 of these back and the fake never holds 1,000.
  await runtimesWith(rt, { BUN_CONFIG_MAX_HTTP_REQUESTS: "" }, async ({ dify, proc }) => {
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
    const reached = await runtimesUntil(() => dify.held() >= total, 60_000);
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
      assert.equal(runtimesTurn(runtimesContent(text)).query, `stream ${i} fault:hold`);
    }
  });
});

Deno.test({
  name: "runtimes: a bun main.ts whose launcher is SIGKILLed stops instead of serving on as an orphan (bun)",
  ignore: !RUNTIMES_HAVE_BUN,
  sanitizeResources: false,
  sanitizeOps: false,
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
      const gone = await runtimesPortClosed(proc.port, 10_000);
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
