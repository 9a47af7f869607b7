/**
 * Every entry of the error catalogue (`ERRORS` in main.ts) a client can provoke, provoked against `deno run
 * main.ts` and `bun main.ts` side by side, and compared: the same status, type, code, param and message on
 * both runtimes. (Its own file, apart from runtime_test.ts: it waits out several limits, so the test runner
 * can start it early.)
 */
import assert from "node:assert/strict";
import { apiError, type AppConfig, difyError, errorJson, type ErrorName, ERRORS } from "../main.ts";
import { type FakeDify, readErrorsJson } from "../bench/fake_dify.ts";
import {
  bunAvailable,
  closedPort,
  hasContent,
  type ProcessBridge,
  rawHttp,
  readSse,
  readUntil,
  sseData,
  until,
  user,
  withProcess,
} from "../bench/test_util.ts";

type RuntimeName = "deno" | "bun";

const HAVE_BUN = bunAvailable();

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
    ["a forced tool call the app does not make (TOOLS=ignore)", "tools_unsupported", () =>
      post({
        model: "dify",
        messages: [user("hi")],
        tools: [{ type: "function", function: { name: "f" } }],
        tool_choice: "required",
      })],
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
