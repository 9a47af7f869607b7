/**
 * All of Dify that an OpenAI client can use (issue 15): reasoning chunks, paused workflows, conversation
 * naming, pinned versions, required inputs, audio, forgetting at Dify, and OpenAI fields that must not be
 * ignored silently. Unit tests against Dify's fixture bytes, and client calls against the fake Dify.
 */
import assert from "node:assert/strict";
import {
  ApiError,
  type AppConfig,
  applyDifyEvent,
  appParameters,
  deleteDifyConversation,
  difyAudioType,
  difyRequestBody,
  finishTranslation,
  loadConfig,
  missingInputs,
  newTranslation,
  ParametersCache,
  parseChatRequest,
  parseSpeechRequest,
  parseTranscriptionForm,
  runPath,
  type Sink,
  speak,
  transcribe,
  type TranslateOptions,
} from "../main.ts";
import { readFixture, startFakeDify, ttsAudioChunks } from "../bench/fake_dify.ts";
import {
  bunAvailable,
  fixtureEvents,
  openai,
  rawChat,
  sseData,
  startProcess,
  streamText,
  user,
  withBridge,
} from "../bench/test_util.ts";
import { toFile } from "openai";

const limits = { maxMessages: 10, maxParts: 5 };

/** The 400 (or other ApiError) `fn` throws. */
function thrown(fn: () => unknown): ApiError {
  try {
    fn();
  } catch (e) {
    assert.ok(e instanceof ApiError, `an ApiError, got ${e}`);
    return e;
  }
  throw new Error("expected an ApiError");
}

async function rejected(p: Promise<unknown>): Promise<ApiError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof ApiError, `an ApiError, got ${e}`);
    return e;
  }
  throw new Error("expected an ApiError");
}

/** Replays a fixture's events through the translation, collecting what a stream would send. */
async function translate(fixture: string, reasoning: TranslateOptions["reasoning"] = "reasoning_content") {
  const app: AppConfig = { model: "flow", url: "http://dify.test/v1", input: "query" };
  const t = newTranslation("chatflow", true, true);
  const sent = { content: [] as string[], reasoning: [] as string[] };
  const sink: Sink = {
    content: (text) => void sent.content.push(text),
    reasoning: (text) => void sent.reasoning.push(text),
    ping() {},
  };
  const o: TranslateOptions = { reasoning, reasoningNodes: false, origin: "http://dify.test", app, clientKey: false };
  for (const ev of await fixtureEvents(fixture)) applyDifyEvent(t, ev, sink, o);
  finishTranslation(t, sink);
  return { t, sent };
}

// ─── Configuration ──────────────────────────────────────────────────────────────────────────────

Deno.test("config: AUTO_GENERATE_NAME globally and per app, workflow_id per app, FORGET_AT_DIFY", () => {
  const pinned = "5b8e6c1a-3f0e-4d7a-9d1e-2a4b6c8d0e1f";
  const apps = JSON.stringify({
    flow: { key: "app-chatflow", type: "chatflow", workflow_id: pinned, auto_generate_name: true },
    chat: "app-chat",
  });
  const off = loadConfig({ DIFY_APPS: apps, AUTO_GENERATE_NAME: "false", FORGET_AT_DIFY: "true" });
  assert.equal(off.autoGenerateName, false);
  assert.equal(off.forgetAtDify, true);
  assert.equal(off.apps.get("flow")!.autoGenerateName, true, "the app's own setting wins");
  assert.equal(off.apps.get("flow")!.workflowId, pinned);
  assert.equal(off.apps.get("chat")!.autoGenerateName, false, "an app without one takes the global setting");
  const dflt = loadConfig({});
  assert.equal(dflt.autoGenerateName, true, "Dify's own default: name conversations");
  assert.equal(dflt.catchAll!.autoGenerateName, undefined, "on is Dify's default: nothing to send");
  assert.equal(dflt.forgetAtDify, false);
  assert.throws(() => loadConfig({ AUTO_GENERATE_NAME: "maybe" }), /AUTO_GENERATE_NAME must be true or false/);
  assert.throws(
    () => loadConfig({ DIFY_APPS: JSON.stringify({ flow: { key: "k", workflow_id: "latest" } }) }),
    /workflow_id must be a workflow version id/,
  );
  assert.throws(
    () => loadConfig({ DIFY_APPS: JSON.stringify({ flow: { key: "k", auto_generate_name: "no" } }) }),
    /auto_generate_name must be true or false/,
  );
});

Deno.test("dify body: auto_generate_name only when off, workflow_id for a chatflow, a workflow app pins in the path", () => {
  const pinned = "5b8e6c1a-3f0e-4d7a-9d1e-2a4b6c8d0e1f";
  const args = { query: "hi", user: "u", inputs: {}, files: [] };
  const base: AppConfig = { model: "m", url: "http://d/v1", input: "query" };
  const named = difyRequestBody("chat", { ...base, autoGenerateName: true }, args);
  assert.ok(!("auto_generate_name" in named), "Dify's default is not sent: older builds never knew the field");
  assert.equal(difyRequestBody("agent", { ...base, autoGenerateName: false }, args).auto_generate_name, false);
  const flow = difyRequestBody("chatflow", { ...base, workflowId: pinned, autoGenerateName: false }, args);
  assert.equal(flow.workflow_id, pinned);
  assert.equal(flow.auto_generate_name, false);
  assert.ok(!("workflow_id" in difyRequestBody("chat", { ...base, workflowId: pinned }, args)));
  const wf = difyRequestBody("workflow", { ...base, workflowId: pinned, autoGenerateName: false }, args);
  assert.ok(!("workflow_id" in wf) && !("auto_generate_name" in wf), "a workflow app has neither field");
  assert.equal(runPath({ type: "workflow", app: { ...base, workflowId: pinned } }), `/workflows/${pinned}/run`);
  assert.equal(runPath({ type: "workflow", app: base }), "/workflows/run");
  assert.equal(runPath({ type: "chatflow", app: { ...base, workflowId: pinned } }), "/chat-messages");
});

// ─── OpenAI fields ──────────────────────────────────────────────────────────────────────────────

Deno.test("parse: fields a Dify app cannot honour are 400s naming the field", () => {
  const base = { model: "m", messages: [user("x")] };
  const cases: [Record<string, unknown>, string][] = [
    [{ n: 2 }, "n"],
    [{ logprobs: true }, "logprobs"],
    [{ top_logprobs: 3 }, "top_logprobs"],
    [{ modalities: ["text", "audio"] }, "modalities"],
    [{ audio: { voice: "alloy", format: "mp3" } }, "audio"],
    [{ response_format: { type: "json_object" } }, "response_format"],
    [{ response_format: { type: "json_schema", json_schema: { name: "x", schema: {} } } }, "response_format"],
    [{ response_format: { type: "yaml" } }, "response_format"],
    [{ response_format: "json" }, "response_format"],
  ];
  for (const [extra, param] of cases) {
    const e = thrown(() => parseChatRequest({ ...base, ...extra }, new Headers(), limits));
    assert.equal(e.status, 400, param);
    assert.equal(e.param, param);
    assert.match(e.message, new RegExp(param));
  }
  assert.equal(
    thrown(() => parseChatRequest({ ...base, logprobs: true }, new Headers(), limits)).code,
    "unsupported_parameter",
  );
});

Deno.test("parse: fields that only tune generation are accepted; safety_identifier is read like user", () => {
  const ignored = {
    temperature: 0.2,
    top_p: 0.9,
    seed: 7,
    stop: ["\n"],
    max_tokens: 100,
    max_completion_tokens: 100,
    frequency_penalty: 0.5,
    presence_penalty: 0.5,
    logit_bias: { "50256": -100 },
    reasoning_effort: "low",
    verbosity: "low",
    parallel_tool_calls: false,
    prediction: { type: "content", content: "x" },
    service_tier: "auto",
    store: false,
    web_search_options: {},
    logprobs: false,
    top_logprobs: 0,
    n: 1,
    modalities: ["text"],
    audio: null,
    response_format: { type: "text" },
  };
  const req = parseChatRequest({ model: "m", messages: [user("x")], ...ignored }, new Headers(), limits);
  assert.equal(req.user, undefined);
  const safety = parseChatRequest(
    { model: "m", messages: [user("x")], safety_identifier: "hashed-42" },
    new Headers(),
    limits,
  );
  assert.equal(safety.user, "hashed-42");
  const both = parseChatRequest(
    { model: "m", messages: [user("x")], user: "alice", safety_identifier: "hashed-42" },
    new Headers(),
    limits,
  );
  assert.equal(both.user, "alice", "an explicit user keeps the Dify user it always had");
  assert.equal(
    thrown(() => parseChatRequest({ model: "m", messages: [user("x")], safety_identifier: 5 }, new Headers(), limits))
      .param,
    "safety_identifier",
  );
});

// ─── Event translation ──────────────────────────────────────────────────────────────────────────

Deno.test("events: reasoning_chunk becomes reasoning_content, apart from the clean answer", async () => {
  const events = await fixtureEvents("chatflow_reasoning_chunk");
  const chunks = events.filter((e) => e.event === "reasoning_chunk").map((e) => e.data as Record<string, unknown>);
  const expected = chunks.map((d) => d.reasoning).join("");
  const answer = events.filter((e) => e.event === "message").map((e) => e.answer).join("");
  const { t, sent } = await translate("chatflow_reasoning_chunk");
  assert.ok(expected.length > 20);
  assert.equal(t.reasoning, expected);
  assert.equal(sent.reasoning.join(""), expected);
  assert.equal(sent.reasoning.length, chunks.filter((d) => d.reasoning).length, "one delta per chunk, none empty");
  assert.equal(t.content, answer);
  assert.ok(!t.content.includes("<think>"));
  assert.ok(t.ended && !t.error);
});

Deno.test("events: reasoning_chunk as <think> (REASONING=think) closes at is_final; off drops it", async () => {
  const events = await fixtureEvents("chatflow_reasoning_chunk");
  const reasoning = events.filter((e) => e.event === "reasoning_chunk")
    .map((e) => (e.data as Record<string, unknown>).reasoning).join("");
  const answer = events.filter((e) => e.event === "message").map((e) => e.answer).join("");
  const think = await translate("chatflow_reasoning_chunk", "think");
  assert.equal(think.t.content, `<think>\n${reasoning}\n</think>\n\n${answer}`);
  assert.equal(think.sent.reasoning.length, 0);
  const finalAt = think.sent.content.indexOf("\n</think>\n\n");
  assert.ok(finalAt > 0, "the block closes as its own delta, at is_final");
  const off = await translate("chatflow_reasoning_chunk", "off");
  assert.equal(off.t.content, answer);
  assert.equal(off.t.reasoning, "");
});

Deno.test("events: reasoning from a second LLM node starts a new paragraph", () => {
  const app: AppConfig = { model: "flow", url: "http://d/v1", input: "query" };
  const t = newTranslation("workflow", false);
  const sink: Sink = { content() {}, reasoning() {}, ping() {} };
  const o: TranslateOptions = {
    reasoning: "reasoning_content",
    reasoningNodes: false,
    origin: "",
    app,
    clientKey: false,
  };
  const chunk = (node: string, reasoning: string, final = false) => ({
    event: "reasoning_chunk",
    workflow_run_id: "r",
    task_id: "t",
    data: { message_id: null, reasoning, node_id: node, is_final: final },
  });
  for (const ev of [chunk("a", "First."), chunk("a", " Still a."), chunk("a", "", true), chunk("b", "Second.")]) {
    applyDifyEvent(t, ev, sink, o);
  }
  assert.equal(t.reasoning, "First. Still a.\n\nSecond.");
});

Deno.test("events: a workflow paused for human input ends the answer cleanly, saying what it waits for and where", async () => {
  const events = await fixtureEvents("chatflow_paused_human_input");
  const answer = events.filter((e) => e.event === "message").map((e) => e.answer).join("");
  const { t, sent } = await translate("chatflow_paused_human_input");
  assert.ok(t.ended, "a clean end, not a truncated stream");
  assert.equal(t.error, undefined);
  assert.ok(t.content.startsWith(answer + "\n\n"), "the partial answer, then the notice");
  const notice = t.content.slice(answer.length + 2);
  assert.match(notice, /waiting for human input/);
  assert.match(notice, /"Approve Refund"/);
  assert.match(notice, /Refund request for order A-1029/);
  assert.match(notice, /Approve \/ Reject/);
  assert.ok(!notice.includes("hf-"), "the form token (a capability) is not handed out");
  assert.equal(sent.content.join(""), t.content);
  assert.deepEqual(t.paused, { nodes: ["1795488200003"], run: "6192246c-ac30-4a02-8300-ae52a8538bd0" });
});

Deno.test("events: a pause without human_input_required still says where, from the pause's reasons or nodes", () => {
  const app: AppConfig = { model: "wf", url: "http://d/v1", input: "query" };
  const o: TranslateOptions = { reasoning: "think", reasoningNodes: false, origin: "", app, clientKey: false };
  const sink: Sink = { content() {}, reasoning() {}, ping() {} };
  const reasons = newTranslation("workflow", false);
  applyDifyEvent(
    reasons,
    {
      event: "workflow_paused",
      workflow_run_id: "r1",
      task_id: "t",
      data: {
        workflow_run_id: "r1",
        paused_nodes: ["n9"],
        outputs: {},
        reasons: [{ type: "human_input_required", node_id: "n9", node_title: "Sign off" }],
        status: "paused",
      },
    },
    sink,
    o,
  );
  assert.match(reasons.content, /waiting for human input at "Sign off"/);
  assert.ok(reasons.ended);
  const bare = newTranslation("workflow", false);
  applyDifyEvent(bare, { event: "workflow_paused", data: { paused_nodes: ["n7"] } }, sink, o);
  assert.match(bare.content, /at node n7\./);
  assert.deepEqual(bare.paused, { nodes: ["n7"], run: undefined });
});

// ─── /parameters and required inputs ────────────────────────────────────────────────────────────

Deno.test("parameters: the fixture's required input and speech switches; a missing input is a 400 naming it", async () => {
  const body = JSON.parse(new TextDecoder().decode(await readFixture("parameters_required_speech.json")));
  const p = appParameters(body);
  assert.deepEqual(p, { required: [{ variable: "city", label: "City" }], speechToText: true, textToSpeech: true });
  assert.deepEqual(appParameters({}), { required: [], speechToText: false, textToSpeech: false });
  assert.deepEqual(appParameters({ user_input_form: [null, 5, { "text-input": null }] }).required, []);
  for (const inputs of [{}, { city: "" }, { city: null }, { pace: "packed" }]) {
    const e = missingInputs(p, inputs, "flow");
    assert.ok(e, JSON.stringify(inputs));
    assert.equal(e.status, 400);
    assert.equal(e.code, "missing_input");
    assert.equal(e.param, "inputs.city");
    assert.match(e.message, /"city" \(City\)/);
  }
  assert.equal(missingInputs(p, { city: "Lisbon", unknown: 1 }, "flow"), undefined, "unknown inputs pass");
  assert.equal(missingInputs(undefined, {}, "flow"), undefined, "parameters unknown: Dify checks");
  assert.ok(missingInputs({ ...p, required: [{ variable: "constructor", label: "constructor" }] }, {}, "m"));
  const two = missingInputs({ ...p, required: [...p.required, { variable: "day", label: "day" }] }, {}, "m")!;
  assert.match(two.message, /variables "city" \(City\), "day": send them/);
});

Deno.test("parameters: read once per app and key from the fake Dify, failures not kept", async () => {
  const fake = await startFakeDify();
  try {
    let now = 0;
    const cache = new ParametersCache((i, init) => fetch(i, init), () => now, 1000);
    const route = (key: string) => ({
      app: { model: "m", url: fake.url, input: "query" },
      key,
      clientKey: false,
      type: "chatflow" as const,
    });
    const [a, b] = await Promise.all([
      cache.get(route("app-chatflow-speech")),
      cache.get(route("app-chatflow-speech")),
    ]);
    assert.equal(a, b);
    assert.deepEqual(a?.required, [{ variable: "city", label: "City" }]);
    assert.equal((await cache.get(route("app-chat")))?.speechToText, false);
    assert.equal(fake.requests.filter((r) => r.path === "/parameters").length, 2);
    assert.equal(await cache.get(route("app-bad")), undefined, "a 401 is unknown, not an empty form");
    await cache.get(route("app-bad"));
    assert.equal(fake.requests.filter((r) => r.key === "app-bad").length, 2, "a failure is asked again");
    now = 1001;
    await cache.get(route("app-chatflow-speech"));
    assert.equal(fake.requests.filter((r) => r.key === "app-chatflow-speech").length, 2, "asked again after the TTL");
  } finally {
    await fake.close();
  }
});

// ─── Audio ──────────────────────────────────────────────────────────────────────────────────────

Deno.test("audio: the part type Dify's speech-to-text accepts", () => {
  assert.equal(difyAudioType("a.mp3", "audio/mpeg"), "audio/mp3");
  assert.equal(difyAudioType("a.bin", "audio/mpeg; charset=binary"), "audio/mp3");
  assert.equal(difyAudioType("voice.m4a", ""), "audio/m4a");
  assert.equal(difyAudioType("voice.m4a", "audio/x-m4a"), "audio/m4a");
  assert.equal(difyAudioType("clip.wav", "application/octet-stream"), "audio/wav");
  assert.equal(difyAudioType("clip", "audio/x-wav"), "audio/wav");
  assert.equal(difyAudioType("rec.webm", "audio/webm"), "audio/webm", "anything else goes as sent: Dify decides");
  assert.equal(difyAudioType("x", ""), "application/octet-stream");
});

Deno.test("audio: transcription and speech requests are parsed as OpenAI defines them", async () => {
  const file = new File([new Uint8Array([1, 2, 3])], "q.mp3", { type: "audio/mpeg" });
  const form = (fields: Record<string, string>, f: File | null = file) => {
    const fd = new FormData();
    if (f) fd.append("file", f);
    for (const [k, v] of Object.entries(fields)) fd.append(k, v);
    return fd;
  };
  const ok = await parseTranscriptionForm(form({ model: "flow", language: "en", prompt: "p", temperature: "0" }));
  assert.equal(ok.model, "flow");
  assert.equal(ok.format, "json");
  assert.deepEqual([...ok.file.bytes], [1, 2, 3]);
  assert.equal(ok.file.filename, "q.mp3");
  assert.equal((await parseTranscriptionForm(form({ model: "flow", response_format: "text" }))).format, "text");
  const bad: [FormData, string][] = [
    [form({}), "model"],
    [form({ model: "flow" }, null), "file"],
    [form({ model: "flow" }, new File([], "e.mp3")), "file"],
    [form({ model: "flow", response_format: "verbose_json" }), "response_format"],
    [form({ model: "flow", response_format: "srt" }), "response_format"],
    [form({ model: "flow", stream: "true" }), "stream"],
    [form({ model: "flow", "include[]": "logprobs" }), "include"],
  ];
  for (const [fd, param] of bad) {
    const e = await rejected(parseTranscriptionForm(fd));
    assert.equal(e.status, 400);
    assert.equal(e.param, param);
  }

  assert.deepEqual(
    parseSpeechRequest({ model: "flow", input: "Hi", voice: "alloy", speed: 1.5, instructions: "calm" }),
    {
      model: "flow",
      input: "Hi",
      voice: "alloy",
      user: undefined,
    },
  );
  assert.equal(parseSpeechRequest({ model: "m", input: "Hi", voice: { id: "v-1" } }).voice, "v-1");
  assert.equal(parseSpeechRequest({ model: "m", input: "Hi", safety_identifier: "s" }).user, "s");
  assert.equal(parseSpeechRequest({ model: "m", input: "Hi", response_format: "wav" }).input, "Hi");
  const badSpeech: [unknown, string | null][] = [
    [[], null],
    [{ input: "x" }, "model"],
    [{ model: "m" }, "input"],
    [{ model: "m", input: " " }, "input"],
    [{ model: "m", input: "x", voice: 3 }, "voice"],
    [{ model: "m", input: "x", response_format: "ogg" }, "response_format"],
    [{ model: "m", input: "x", response_format: "pcm" }, "response_format"],
    [{ model: "m", input: "x", stream_format: "sse" }, "stream_format"],
  ];
  for (const [body, param] of badSpeech) {
    const e = thrown(() => parseSpeechRequest(body));
    assert.equal(e.status, 400);
    assert.equal(e.param, param, JSON.stringify(body));
  }
});

Deno.test("audio: speech-to-text and text-to-speech calls against the fake Dify", async () => {
  const fake = await startFakeDify();
  try {
    const f = (i: RequestInfo | URL, init?: RequestInit) => fetch(i, init);
    const route = (key: string) => ({
      app: { model: "flow", url: fake.url, input: "query" },
      key,
      clientKey: false,
      type: "chatflow" as const,
    });
    const signal = new AbortController().signal;
    const audio = { bytes: new Uint8Array([73, 68, 51]), filename: "question.mp3", mime: "audio/mpeg" };
    const expected = JSON.parse(new TextDecoder().decode(await readFixture("audio_to_text.json"))).text;
    assert.equal(await transcribe(f, route("app-chatflow-speech"), "alice", audio, signal), expected);
    const sent = fake.requests.at(-1)!;
    assert.equal(sent.path, "/audio-to-text");
    assert.deepEqual(
      { user: sent.body.user, filename: sent.body.filename, type: sent.body.contentType },
      { user: "alice", filename: "question.mp3", type: "audio/mp3" },
      "audio/mpeg goes as audio/mp3, the type Dify accepts",
    );
    const off = await rejected(transcribe(f, route("app-chat"), "alice", audio, signal));
    assert.equal(off.status, 400);
    assert.equal(off.code, "speech_to_text_disabled");
    const webm = await rejected(transcribe(f, route("app-speech"), "a", { ...audio, mime: "audio/webm" }, signal));
    assert.equal(webm.status, 400, "Dify's 415 for the file type is the client's to fix");
    assert.equal(webm.code, "unsupported_audio_type");

    const res = await speak(f, route("app-chatflow-speech"), { text: "Hello", voice: "alloy", user: "alice" }, signal);
    assert.equal(res.headers.get("content-type"), "audio/mpeg");
    const bytes = new Uint8Array(await res.arrayBuffer());
    const chunks = await ttsAudioChunks();
    assert.equal(bytes.length, chunks.reduce((n, c) => n + c.length, 0));
    assert.deepEqual(fake.lastBody("/text-to-audio"), { text: "Hello", user: "alice", voice: "alloy" });
    const tts = await rejected(speak(f, route("app-chat"), { text: "Hello", user: "alice" }, signal));
    assert.equal(tts.status, 400);
    assert.match(tts.message, /TTS is not enabled/);
  } finally {
    await fake.close();
  }
});

// ─── Forgetting at Dify ─────────────────────────────────────────────────────────────────────────

Deno.test("forget: a conversation is deleted at Dify under its user; gone already is not an error", async () => {
  const fake = await startFakeDify();
  try {
    const f = (i: RequestInfo | URL, init?: RequestInit) => fetch(i, init);
    const r = {
      app: { model: "dify", url: fake.url, input: "query" },
      key: "app-chat",
      clientKey: false,
      type: "chat" as const,
    };
    const run = await fetch(`${fake.url}/chat-messages`, {
      method: "POST",
      headers: { authorization: "Bearer app-chat", "content-type": "application/json" },
      body: JSON.stringify({ query: "hi", inputs: {}, user: "alice", response_mode: "blocking" }),
    });
    const id = (await run.json()).conversation_id;
    assert.ok(fake.conversations.has(id));
    const signal = new AbortController().signal;
    assert.equal(await deleteDifyConversation(f, r, id, "bob", signal), false, "another user's: Dify says not found");
    assert.ok(fake.conversations.has(id));
    assert.equal(await deleteDifyConversation(f, r, id, "alice", signal), true);
    assert.ok(!fake.conversations.has(id));
    assert.deepEqual(fake.lastBody(`/conversations/${id}`), { user: "alice" });
    assert.equal(await deleteDifyConversation(f, r, id, "alice", signal), false);
    const bad = await rejected(deleteDifyConversation(f, { ...r, key: "app-bad" }, id, "alice", signal));
    assert.equal(bad.status, 502, "the operator's key was refused: a gateway fault");
  } finally {
    await fake.close();
  }
});

// ─── Through the bridge (HTTP, the official openai SDK) ─────────────────────────────────────────

const PINNED = "5b8e6c1a-3f0e-4d7a-9d1e-2a4b6c8d0e1f";

/** Apps on the fake Dify: keys decide the mode; `speech` keys have speech on and require the input `city`. */
const APPS = JSON.stringify({
  flow: { key: "app-chatflow", type: "chatflow" },
  trip: { key: "app-chatflow-speech", type: "chatflow" },
  talk: { key: "app-chat-speech", type: "chat" },
  wf: { key: "app-workflow", type: "workflow", workflow_id: PINNED },
  pinned: { key: "app-chatflow-pinned", type: "chatflow", workflow_id: PINNED, auto_generate_name: true },
  dify: "app-chat",
});

/** The MP3 bytes the fake Dify's text-to-speech streams (from tts_autoplay.sse), joined. */
async function ttsBytes(): Promise<Uint8Array> {
  const chunks = await ttsAudioChunks();
  const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
  let at = 0;
  for (const c of chunks) out.set(c, (at += c.length) - c.length);
  return out;
}

/** The log line of the last request to `path`. */
function lastLog(logs: string[], path: string): Record<string, unknown> {
  const lines = logs.map((l) => JSON.parse(l)).filter((l) => String(l.path).endsWith(path));
  assert.ok(lines.length, `a log line for ${path}`);
  return lines.at(-1);
}

Deno.test("http: reasoning_chunk streams as reasoning_content and aggregates as message.reasoning_content", async () => {
  const events = await fixtureEvents("chatflow_reasoning_chunk");
  const reasoning = events.filter((e) => e.event === "reasoning_chunk")
    .map((e) => (e.data as Record<string, unknown>).reasoning).join("");
  const answer = events.filter((e) => e.event === "message").map((e) => e.answer).join("");
  await withBridge({ DIFY_APPS: APPS }, async ({ bridge }) => {
    const client = bridge.client();
    const s = await streamText(client, { model: "flow", messages: [user("fixture:chatflow_reasoning_chunk")] });
    assert.equal(s.reasoning, reasoning);
    assert.equal(s.content, answer);
    const last = s.chunks.filter((c) => (c.choices as unknown[]).length).at(-1) as {
      choices: { finish_reason: string }[];
    };
    assert.equal(last.choices[0].finish_reason, "stop");
    const r = await client.chat.completions.create({
      model: "flow",
      messages: [user("fixture:chatflow_reasoning_chunk")],
    });
    const message = r.choices[0].message as unknown as Record<string, unknown>;
    assert.equal(message.content, answer);
    assert.equal(message.reasoning_content, reasoning);
  });
  await withBridge({ DIFY_APPS: APPS, REASONING: "think" }, async ({ bridge }) => {
    const s = await streamText(bridge.client(), {
      model: "flow",
      messages: [user("fixture:chatflow_reasoning_chunk")],
    });
    assert.equal(s.content, `<think>\n${reasoning}\n</think>\n\n${answer}`);
    assert.equal(s.reasoning, "");
  });
});

Deno.test("http: a paused workflow is a complete answer with finish_reason stop, logged, never an error frame", async () => {
  const events = await fixtureEvents("chatflow_paused_human_input");
  const partial = events.filter((e) => e.event === "message").map((e) => e.answer).join("");
  await withBridge({ DIFY_APPS: APPS }, async ({ bridge }) => {
    const raw = await rawChat(bridge.url, {
      model: "flow",
      stream: true,
      messages: [user("fixture:chatflow_paused_human_input")],
    });
    assert.equal(raw.status, 200);
    const frames = sseData(raw.text);
    assert.equal(frames.at(-1), "[DONE]");
    assert.ok(!frames.some((f) => typeof f === "object" && f !== null && "error" in f), "no error frame");
    const chunks = frames.filter((f) => typeof f === "object") as {
      choices: { delta: { content?: string }; finish_reason: string | null }[];
    }[];
    const content = chunks.map((c) => c.choices[0]?.delta.content ?? "").join("");
    assert.ok(content.startsWith(partial + "\n\n"));
    assert.match(content, /waiting for human input at "Approve Refund": Refund request for order A-1029/);
    assert.equal(chunks.at(-1)!.choices[0].finish_reason, "stop");
    const log = lastLog(bridge.logs, "/chat/completions");
    assert.equal(log.status, 200);
    assert.equal(log.error, undefined);
    assert.deepEqual(log.paused, { nodes: ["1795488200003"], run: "6192246c-ac30-4a02-8300-ae52a8538bd0" });

    const r = await bridge.client().chat.completions.create({
      model: "flow",
      messages: [user("fixture:chatflow_paused_human_input")],
    });
    assert.equal(r.choices[0].finish_reason, "stop");
    assert.equal(r.choices[0].message.content, content);
  });
});

Deno.test("http: AUTO_GENERATE_NAME and workflow_id reach Dify as it expects", async () => {
  await withBridge({ DIFY_APPS: APPS, AUTO_GENERATE_NAME: "false" }, async ({ dify, bridge }) => {
    const client = bridge.client();
    await client.chat.completions.create({ model: "dify", messages: [user("hello")] });
    assert.equal(dify.lastBody("/chat-messages").auto_generate_name, false);
    await client.chat.completions.create({ model: "pinned", messages: [user("hello")] });
    const pinned = dify.lastBody("/chat-messages");
    assert.equal(pinned.workflow_id, PINNED);
    assert.ok(!("auto_generate_name" in pinned), "the app's own auto_generate_name: true wins");
    const wf = await client.chat.completions.create({ model: "wf", messages: [user("hello wf")] });
    assert.equal(wf.choices[0].message.content, "Workflow: hello wf");
    assert.ok(dify.requests.some((r) => r.path === `/workflows/${PINNED}/run`), "a workflow app pins in the path");
    assert.ok(!("workflow_id" in dify.lastBody(`/workflows/${PINNED}/run`)));
  });
  await withBridge({ DIFY_APPS: APPS }, async ({ dify, bridge }) => {
    await bridge.client().chat.completions.create({ model: "dify", messages: [user("hello")] });
    assert.ok(!("auto_generate_name" in dify.lastBody("/chat-messages")), "default: Dify's own (names conversations)");
  });
});

Deno.test("http: a missing required input is a 400 naming it before Dify runs anything; /parameters is cached", async () => {
  await withBridge({ DIFY_APPS: APPS }, async ({ dify, bridge }) => {
    const client = bridge.client();
    for (const stream of [false, true]) {
      const raw = await rawChat(bridge.url, { model: "trip", stream, messages: [user("plan my day")] });
      assert.equal(raw.status, 400);
      const error = JSON.parse(raw.text).error;
      assert.equal(error.code, "missing_input");
      assert.equal(error.param, "inputs.city");
      assert.match(error.message, /"city" \(City\)/);
    }
    const err = await client.chat.completions.create({
      model: "trip",
      messages: [user("plan my day")],
      inputs: { city: "" },
    } as never).catch((e) => e);
    assert.equal(err.status, 400);
    assert.equal(dify.requests.filter((r) => r.path === "/chat-messages").length, 0, "Dify never ran");
    const ok = await client.chat.completions.create({
      model: "trip",
      messages: [user("plan my day")],
      inputs: { city: "Lisbon", mood: "unknown inputs pass through" },
    } as never);
    assert.match(ok.choices[0].message.content ?? "", /plan my day$/);
    assert.deepEqual(dify.lastBody("/chat-messages").inputs, { city: "Lisbon", mood: "unknown inputs pass through" });
    assert.equal(dify.requests.filter((r) => r.path === "/parameters").length, 1, "asked once, then cached");
  });
});

Deno.test("http: OpenAI fields Dify cannot honour are 400s naming them; safety_identifier is the Dify user", async () => {
  await withBridge({}, async ({ dify, bridge }) => {
    const client = bridge.client();
    const cases: [Record<string, unknown>, string][] = [
      [{ n: 2 }, "n"],
      [{ logprobs: true }, "logprobs"],
      [{ modalities: ["text", "audio"], audio: { voice: "alloy", format: "mp3" } }, "modalities"],
      [{ response_format: { type: "json_object" } }, "response_format"],
      [
        { response_format: { type: "json_schema", json_schema: { name: "x", schema: { type: "object" } } } },
        "response_format",
      ],
    ];
    for (const [extra, param] of cases) {
      const e = await client.chat.completions.create({ model: "dify", messages: [user("x")], ...extra } as never)
        .catch((e) => e);
      assert.equal(e.status, 400, param);
      assert.equal(e.param, param);
      assert.equal(e.code, "unsupported_parameter");
    }
    assert.equal(dify.generateBodies().length, 0);
    await client.chat.completions.create({
      model: "dify",
      messages: [user("x")],
      temperature: 0.1,
      top_p: 0.5,
      seed: 1,
      stop: ["\n"],
      max_tokens: 5,
      max_completion_tokens: 5,
      reasoning_effort: "low",
      parallel_tool_calls: false,
      prediction: { type: "content", content: "x" },
      safety_identifier: "user-7f3a",
    } as never);
    assert.equal(dify.lastBody().user, "user-7f3a");
  });
});

Deno.test("http: audio through the official openai SDK — transcriptions and speech", async () => {
  await withBridge({ DIFY_APPS: APPS }, async ({ dify, bridge }) => {
    const client = bridge.client();
    const expected = JSON.parse(new TextDecoder().decode(await readFixture("audio_to_text.json"))).text;
    const file = await toFile(new Uint8Array([73, 68, 51, 4, 0]), "question.mp3", { type: "audio/mpeg" });
    const t = await client.audio.transcriptions.create({ file, model: "talk" });
    assert.equal(t.text, expected);
    const up = dify.lastBody("/audio-to-text");
    assert.equal(up.contentType, "audio/mp3");
    assert.equal(up.user, "dify-openai");
    const text = await client.audio.transcriptions.create({ file, model: "talk", response_format: "text" });
    assert.equal(String(text).trim(), expected);

    const speech = await client.audio.speech.create({ model: "talk", input: "Hello there", voice: "alloy" });
    assert.equal(speech.headers.get("content-type"), "audio/mpeg");
    assert.deepEqual(new Uint8Array(await speech.arrayBuffer()), await ttsBytes());
    assert.deepEqual(dify.lastBody("/text-to-audio"), { text: "Hello there", user: "dify-openai", voice: "alloy" });
    assert.ok(bridge.logs.some((l) => JSON.parse(l).path === "/v1/audio/speech"), "one log line per audio request");

    // An app with speech off: a clear 400 before any audio reaches Dify.
    const before = dify.requests.length;
    for (
      const call of [
        () => client.audio.transcriptions.create({ file, model: "dify" }),
        () => client.audio.speech.create({ model: "dify", input: "Hi", voice: "alloy" }),
      ]
    ) {
      const e = await call().catch((e) => e);
      assert.equal(e.status, 400);
      assert.equal(e.code, "speech_disabled");
      assert.match(e.message, /turned off/);
    }
    assert.ok(
      dify.requests.slice(before).every((r) => r.path === "/parameters" || r.path === "/info"),
      "only /info and /parameters were asked",
    );
    const unknown = await client.audio.speech.create({ model: "nope", input: "Hi", voice: "alloy" }).catch((e) => e);
    assert.equal(unknown.status, 404);
    const format = await client.audio.transcriptions.create({ file, model: "talk", response_format: "srt" })
      .catch((e) => e);
    assert.equal(format.status, 400);
    assert.equal(format.param, "response_format");
  });
});

Deno.test("http: audio routes share the chat's keys, body limit and error mapping", async () => {
  await withBridge(
    { DIFY_APPS: APPS, PROXY_API_KEYS: "sk-good", MAX_BODY_BYTES: "2000" },
    async ({ dify, bridge }) => {
      const form = (size: number, type = "audio/mpeg") => {
        const fd = new FormData();
        fd.append("model", "talk");
        fd.append("file", new File([new Uint8Array(size)], "a.mp3", { type }));
        return fd;
      };
      const post = (path: string, body: BodyInit, key = "sk-good", headers: Record<string, string> = {}) =>
        fetch(`${bridge.url}${path}`, {
          method: "POST",
          headers: { authorization: `Bearer ${key}`, ...headers },
          body,
        });
      const noKey = await post("/audio/transcriptions", form(10), "sk-bad");
      assert.equal(noKey.status, 401);
      await noKey.body?.cancel();
      const big = await post("/audio/transcriptions", form(5000));
      assert.equal(big.status, 413);
      assert.equal((await big.json()).error.code, "request_too_large");
      const webm = await post("/audio/transcriptions", form(10, "audio/webm"));
      assert.equal(webm.status, 400, "Dify's 415 for the audio type is the client's to fix");
      assert.equal((await webm.json()).error.code, "unsupported_audio_type");
      const json = await post("/audio/transcriptions", JSON.stringify({ model: "talk" }), "sk-good", {
        "content-type": "application/json",
      });
      assert.equal(json.status, 400);
      assert.match((await json.json()).error.message, /multipart\/form-data/);
      const get = await fetch(`${bridge.url}/audio/speech`, { headers: { authorization: "Bearer sk-good" } });
      assert.equal(get.status, 405);
      await get.body?.cancel();
      const pcm = await post("/audio/speech", JSON.stringify({ model: "talk", input: "x", response_format: "pcm" }));
      assert.equal(pcm.status, 400);
      assert.equal((await pcm.json()).error.param, "response_format");
      assert.equal(dify.requests.filter((r) => r.path.startsWith("/audio") || r.path.startsWith("/text")).length, 1);
    },
  );
});

Deno.test("http: DELETE /v1/conversations/{user}?dify=true also deletes the conversation at Dify, same user", async () => {
  await withBridge({ CONVERSATION_MODE: "user" }, async ({ dify, bridge }) => {
    const client = bridge.client();
    const ask = (who: string) =>
      client.chat.completions.create({ model: "dify", messages: [user(`hi from ${who}`)], user: who });
    await ask("alice");
    await ask("bob");
    const conversationOf = (who: string) => [...dify.conversations.values()].find((c) => c.user === who)?.id;
    const alice = conversationOf("alice")!;
    const bob = conversationOf("bob")!;
    assert.ok(alice && bob);
    const del = (who: string, query = "") =>
      fetch(`${bridge.url}/conversations/${who}${query}`, {
        method: "DELETE",
        headers: { authorization: "Bearer sk-test" },
      })
        .then(async (r) => ({ status: r.status, body: await r.json() }));
    const plain = await del("bob");
    assert.deepEqual(plain, { status: 200, body: { object: "conversation.deleted", user: "bob", deleted: true } });
    assert.ok(dify.conversations.has(bob), "without ?dify=true Dify keeps it");
    const forgotten = await del("alice", "?dify=true");
    assert.equal(forgotten.status, 200);
    assert.deepEqual(forgotten.body.dify_deleted, [alice]);
    assert.ok(!dify.conversations.has(alice), "deleted at Dify");
    const request = dify.requests.find((r) => r.method === "DELETE")!;
    assert.equal(request.path, `/conversations/${alice}`);
    assert.deepEqual(request.body, { user: "alice" });
    assert.deepEqual((await del("alice", "?dify=true")).body.dify_deleted, [], "nothing left to delete");
    // The next turn starts a new conversation.
    await ask("alice");
    assert.notEqual(conversationOf("alice"), alice);
  });
  await withBridge({ CONVERSATION_MODE: "user", FORGET_AT_DIFY: "true" }, async ({ dify, bridge }) => {
    await bridge.client().chat.completions.create({ model: "dify", messages: [user("hi")], user: "carol" });
    const id = [...dify.conversations.keys()][0];
    const auth = { authorization: "Bearer sk-test" };
    const kept = await fetch(`${bridge.url}/conversations/carol?dify=false`, { method: "DELETE", headers: auth });
    assert.deepEqual((await kept.json()).dify_deleted, undefined);
    assert.ok(dify.conversations.has(id), "?dify=false keeps it at Dify");
    await bridge.client().chat.completions.create({ model: "dify", messages: [user("hi")], user: "carol" });
    const bound = [...dify.conversations.values()].find((c) => c.user === "carol" && c.id !== id)!.id;
    const res = await fetch(`${bridge.url}/conversations/carol`, { method: "DELETE", headers: auth });
    assert.deepEqual((await res.json()).dify_deleted, [bound], "FORGET_AT_DIFY deletes at Dify by default");
    assert.ok(!dify.conversations.has(bound));
  });
});

Deno.test("http: deleting a stored response with ?dify=true also deletes its conversation at Dify", async () => {
  await withBridge({}, async ({ dify, bridge }) => {
    const client = bridge.client();
    const auth = { authorization: "Bearer sk-test" };
    const del = (id: string, query = "") =>
      fetch(`${bridge.url}/responses/${id}${query}`, { method: "DELETE", headers: auth }).then((r) => r.json());
    const kept = await client.responses.create({ model: "dify", input: "remember me", user: "dora" } as never);
    const keptConversation = [...dify.conversations.values()].find((c) => c.user === "dora")!.id;
    assert.deepEqual(await del(kept.id), { id: kept.id, object: "response.deleted", deleted: true });
    assert.ok(dify.conversations.has(keptConversation), "without ?dify=true Dify keeps it");
    const r = await client.responses.create({ model: "dify", input: "forget me", user: "erin" } as never);
    const conversation = [...dify.conversations.values()].find((c) => c.user === "erin")!.id;
    const gone = await del(r.id, "?dify=true");
    assert.deepEqual(gone.dify_deleted, [conversation]);
    assert.ok(!dify.conversations.has(conversation));
    assert.deepEqual(dify.requests.find((q) => q.method === "DELETE")!.body, { user: "erin" });
  });
});

// ─── Both runtimes ──────────────────────────────────────────────────────────────────────────────

for (const runtime of ["deno", "bun"] as const) {
  Deno.test(`runtime ${runtime}: reasoning chunks, a paused workflow, a required input and audio through the SDK`, async () => {
    if (runtime === "bun" && !bunAvailable()) return;
    const fake = await startFakeDify();
    const bridge = await startProcess(runtime, { DIFY_API_URL: fake.url, DIFY_APPS: APPS });
    try {
      const client = openai(bridge.url);
      const s = await streamText(client, { model: "flow", messages: [user("fixture:chatflow_reasoning_chunk")] });
      assert.ok(s.reasoning.length > 20 && !s.content.includes("<think>"));
      const paused = await streamText(client, {
        model: "flow",
        messages: [user("fixture:chatflow_paused_human_input")],
      });
      assert.match(paused.content, /waiting for human input at "Approve Refund"/);
      const missing = await client.chat.completions.create({ model: "trip", messages: [user("x")] }).catch((e) => e);
      assert.equal(missing.status, 400);
      assert.equal(missing.param, "inputs.city");
      const file = await toFile(new Uint8Array([1, 2, 3]), "q.wav", { type: "audio/wav" });
      const t = await client.audio.transcriptions.create({ file, model: "talk" });
      assert.match(t.text, /museum/);
      const speech = await client.audio.speech.create({ model: "talk", input: "Hello", voice: "alloy" });
      assert.equal(speech.headers.get("content-type"), "audio/mpeg");
      assert.deepEqual(new Uint8Array(await speech.arrayBuffer()), await ttsBytes());
    } finally {
      await bridge.stop();
      await fake.close();
    }
  });
}
