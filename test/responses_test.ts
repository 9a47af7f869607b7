/**
 * The Responses API (`POST /v1/responses`): request parsing and the event stream, fed straight to the
 * official openai SDK (its `responses.stream()` accumulator is the strictest real reader of the order).
 */
import assert from "node:assert/strict";
import OpenAI from "openai";
import {
  ApiError,
  apiError,
  buildTurn,
  fingerprint,
  newTranslation,
  parseChatRequest,
  parseResponsesRequest,
  type ResponseEcho,
  ResponsesFormat,
  type Translation,
} from "../main.ts";

const LIMITS = { maxMessages: 100, maxParts: 10 };

function parse(body: Record<string, unknown>, headers: Record<string, string> = {}) {
  return parseResponsesRequest({ model: "dify", ...body }, new Headers(headers), LIMITS);
}

function refused(body: Record<string, unknown>, param: string) {
  assert.throws(() => parse(body), (e: unknown) => {
    assert.ok(e instanceof ApiError, String(e));
    assert.equal(e.status, 400);
    assert.equal(e.param, param);
    return true;
  });
}

const text = (t: string) => [{ type: "input_text", text: t }];

Deno.test("responses parse: a string input is one user message, with OpenAI's defaults echoed", () => {
  const r = parse({ input: "hello" });
  assert.deepEqual(r.messages, [{ role: "user", text: "hello", files: [] }]);
  assert.equal(r.stream, false);
  assert.equal(r.store, true);
  assert.equal(r.previousResponseId, undefined);
  assert.equal(r.sessionId, undefined);
  assert.equal(r.echo.tool_choice, "auto");
  assert.deepEqual(r.echo.tools, []);
  assert.equal(r.echo.temperature, 1);
  assert.equal(r.echo.top_p, 1);
  assert.equal(r.echo.truncation, "disabled");
  assert.deepEqual(r.echo.text, { format: { type: "text" }, verbosity: "medium" });
  assert.deepEqual(r.echo.reasoning, { effort: null, summary: null });
  assert.equal(r.echo.instructions, null);
});

Deno.test("responses parse: instructions and system/developer items are the system prompt", () => {
  const r = parse({
    instructions: "Be brief.",
    input: [
      { role: "developer", content: "Dev rules." },
      { type: "message", role: "system", content: text("System rules.") },
      { role: "user", content: "hi" },
    ],
  });
  assert.deepEqual(r.messages.map((m) => [m.role, m.text]), [
    ["system", "Be brief."],
    ["system", "Dev rules."],
    ["system", "System rules."],
    ["user", "hi"],
  ]);
  const turn = buildTurn(r.messages, "clean");
  assert.equal(turn.system, "Be brief.\n\nDev rules.\n\nSystem rules.");
  assert.equal(turn.query, "hi");
});

Deno.test("responses parse: a Codex turn — environment context left out of the query, every tool accepted", () => {
  const r = parse(
    {
      input: [
        { type: "message", role: "developer", content: text("You are Codex…") },
        { type: "message", role: "developer", content: text("Skills…") },
        {
          type: "message",
          role: "user",
          content: text("<environment_context>\n  <cwd>/tmp/x</cwd>\n  <shell>bash</shell>\n</environment_context>"),
        },
        { type: "message", role: "user", content: text("say hi") },
      ],
      tools: [
        { type: "function", name: "shell", parameters: {} },
        { type: "namespace", name: "mcp", tools: [{ type: "function", name: "x" }] },
        { type: "web_search" },
      ],
      tool_choice: "auto",
      parallel_tool_calls: false,
      store: false,
      stream: true,
      include: ["reasoning.encrypted_content"],
      reasoning: { summary: "auto" },
      prompt_cache_key: "thread-1",
      client_metadata: { session_id: "thread-1" },
    },
  );
  const turn = buildTurn(r.messages, "clean");
  assert.equal(turn.query, "say hi");
  assert.equal(turn.system, "You are Codex…\n\nSkills…");
  assert.equal(r.store, false);
  assert.equal(r.stream, true);
  assert.equal(r.echo.tools.length, 3);
  assert.deepEqual(r.echo.reasoning, { effort: null, summary: "auto" });
  assert.equal(r.sessionId, "thread-1");
});

Deno.test("responses parse: function calls and their output are text in the replayed history", () => {
  const r = parse({
    input: [
      { role: "user", content: "weather?" },
      { type: "function_call", call_id: "c1", name: "get_weather", arguments: '{"city":"Oslo"}' },
      { type: "function_call_output", call_id: "c1", output: "12°C" },
      { role: "assistant", content: [{ type: "output_text", text: "It is 12°C." }] },
      { role: "user", content: "thanks" },
    ],
  });
  assert.deepEqual(r.messages.map((m) => [m.role, m.text]), [
    ["user", "weather?"],
    ["assistant", '[called tool get_weather({"city":"Oslo"})]'],
    ["tool", "12°C"],
    ["assistant", "It is 12°C."],
    ["user", "thanks"],
  ]);
});

Deno.test("responses parse: echoed message and reasoning items fingerprint as the answer the bridge recorded", () => {
  // What the bridge recorded after turn 1: history + current + the answer's text (t.content).
  const answer = "Part one. Part two.";
  const recorded = fingerprint("Rules.", [{ role: "user", text: "q1" }, { role: "assistant", text: answer }]);
  // Codex resume / Agents SDK session mode: the items the bridge emitted come back, ids and all,
  // the answer split in two message items around a reasoning item.
  const r = parse({
    instructions: "Rules.",
    input: [
      { role: "user", content: "q1" },
      { type: "reasoning", id: "rs_1_0", summary: [{ type: "summary_text", text: "thinking" }] },
      {
        type: "message",
        id: "msg_1_1",
        role: "assistant",
        status: "completed",
        content: [{ type: "output_text", text: "Part one.", annotations: [] }],
      },
      { type: "reasoning", id: "rs_1_2", summary: [{ type: "summary_text", text: "more" }], encrypted_content: null },
      {
        type: "message",
        id: "msg_1_3",
        role: "assistant",
        status: "completed",
        content: [{ type: "output_text", text: " Part two.", annotations: [], logprobs: [] }],
      },
      { role: "user", content: "q2" },
    ],
  });
  const turn = buildTurn(r.messages, "clean");
  assert.equal(fingerprint(turn.system, turn.history), recorded);
  assert.equal(turn.query, "q2");
});

Deno.test("responses parse: session ids from every header and field clients use; never x-client-request-id", () => {
  const session = (headers: Record<string, string>, body: Record<string, unknown> = {}) =>
    parse({ input: "x", ...body }, headers).sessionId;
  assert.equal(session({ "x-session-id": "a" }), "a");
  assert.equal(session({ "session-id": "b" }), "b");
  assert.equal(session({ "session_id": "c" }), "c");
  assert.equal(session({ "thread-id": "d" }), "d");
  const uuid = "3e2dd2d2-b8a2-46f3-b29d-a80decfe82d0";
  assert.equal(session({ "x-session-affinity": `${uuid}:3` }), uuid);
  assert.equal(session({ "x-session-affinity": uuid }), uuid);
  assert.equal(session({ "x-session-affinity": "chat:42" }), "chat:42", "only a counter after a UUID is stripped");
  assert.equal(session({}, { client_metadata: { session_id: "e" } }), "e");
  assert.equal(session({}, { prompt_cache_key: "f" }), "f");
  assert.equal(session({ "x-openwebui-chat-id": "g" }), "g");
  assert.equal(session({}, { metadata: { chat_id: "h" } }), "h");
  assert.equal(session({ "x-client-request-id": "per-request" }), undefined);
  // Codex: the same thread id everywhere, x-client-request-id included.
  assert.equal(
    session({ "session-id": "t", "thread-id": "t", "x-client-request-id": "t" }, { prompt_cache_key: "t" }),
    "t",
  );
  // Chat completions reads the same names.
  const chat = parseChatRequest(
    { model: "m", messages: [{ role: "user", content: "x" }] },
    new Headers({ "session-id": "s1", "x-client-request-id": "r" }),
    LIMITS,
  );
  assert.equal(chat.sessionId, "s1");
});

Deno.test("responses parse: user, safety_identifier, previous_response_id, store", () => {
  const r = parse({ input: "x", user: "u1", previous_response_id: "resp_abc", store: false });
  assert.equal(r.user, "u1");
  assert.equal(r.previousResponseId, "resp_abc");
  assert.equal(r.echo.previous_response_id, "resp_abc");
  assert.equal(r.store, false);
  assert.equal(parse({ input: "x", user: "u1", safety_identifier: "s1" }).user, "s1");
});

Deno.test("responses parse: images and files in input parts", () => {
  const r = parse({
    input: [{
      role: "user",
      content: [
        { type: "input_text", text: "what is this" },
        { type: "input_image", image_url: "https://example.com/a.png", detail: "auto" },
        { type: "input_file", filename: "a.txt", file_data: btoa("hello") },
      ],
    }],
  });
  assert.equal(r.messages[0].text, "what is this");
  assert.equal(r.messages[0].files.length, 2);
  assert.equal(r.messages[0].files[0].kind, "remote");
  assert.equal(r.messages[0].files[1].kind, "upload");
});

Deno.test("responses parse: what a client relies on and Dify cannot do is a 400 naming the field", () => {
  refused({ input: "x", background: true }, "background");
  refused({ input: "x", n: 2 }, "n");
  // A forced call is the app's tool mode's business (test/tools_test.ts); a hosted tool is never the app's.
  refused({ input: "x", tool_choice: { type: "web_search" } }, "tool_choice");
  refused({ input: "x", tool_choice: { type: "function", name: "f" } }, "tool_choice");
  refused({ input: "x", text: { format: { type: "json_schema", name: "s", schema: {} } } }, "text.format");
  refused({ input: "x", text: { format: { type: "json_object" } } }, "text.format");
  refused({ input: "x", top_logprobs: 3 }, "top_logprobs");
  refused({ input: "x", conversation: "conv_1" }, "conversation");
  refused({ input: "x", prompt: { id: "pmpt_1" } }, "prompt");
  refused({ input: [{ type: "item_reference", id: "msg_1" }] }, "input[0].type");
  refused({ input: 5 }, "input");
  refused({}, "input");
  refused({ input: "x", stream: "yes" }, "stream");
  refused({ input: "x", tools: {} }, "tools");
  refused({ input: "x", instructions: 3 }, "instructions");
  refused({ input: [{ role: "robot", content: "x" }] }, "input[0].role");
  refused({ input: [{ role: "assistant", content: "only me" }] }, "input");
  refused({ model: "", input: "x" }, "model");
  // Accepted: tuning knobs and tools of any type.
  parse({
    input: "x",
    background: false,
    temperature: 0.2,
    max_output_tokens: 10,
    truncation: "auto",
    tool_choice: "none",
  });
});

// ─── The event stream ───────────────────────────────────────────────────────────────────────────

const ECHO: ResponseEcho = parse({ input: "x" }).echo;

function translation(content: string, reasoning = ""): Translation {
  const t = newTranslation("chat", true);
  t.content = content;
  t.reasoning = reasoning;
  t.usage = { prompt_tokens: 5, completion_tokens: 7, total_tokens: 12 };
  return t;
}

interface Frame {
  event: string;
  data: Record<string, unknown>;
}

function frames(text: string): Frame[] {
  return text.trim().split("\n\n").map((block) => {
    const [event, data] = block.split("\n");
    assert.ok(event.startsWith("event: ") && data.startsWith("data: "), block);
    const parsed = JSON.parse(data.slice(6));
    assert.equal(parsed.type, event.slice(7));
    return { event: event.slice(7), data: parsed };
  });
}

/** Drives a format as the streaming core does: open, deltas in order, then close or error. */
function run(deltas: ["content" | "reasoning", string][], end: ApiError | "close" = "close") {
  const f = new ResponsesFormat("resp_abc", 1700000000, "dify", ECHO, true);
  let out = f.open();
  const t = translation("");
  for (const [kind, text] of deltas) {
    out += kind === "content" ? f.content(text) : f.reasoning(text);
    if (kind === "content") t.content += text;
    else t.reasoning += text;
  }
  out += end === "close" ? f.close(t) : f.error(end);
  return { format: f, text: out, frames: frames(out) };
}

const OPENED = ["response.created", "response.in_progress"];

/** The events of one `message` item with `deltas` text deltas. */
function messageEvents(deltas: number): string[] {
  return [
    "response.output_item.added",
    "response.content_part.added",
    ...Array(deltas).fill("response.output_text.delta"),
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
  ];
}

/** The events of one `reasoning` item with `deltas` summary deltas. */
function reasoningEvents(deltas: number): string[] {
  return [
    "response.output_item.added",
    "response.reasoning_summary_part.added",
    ...Array(deltas).fill("response.reasoning_summary_text.delta"),
    "response.reasoning_summary_text.done",
    "response.reasoning_summary_part.done",
    "response.output_item.done",
  ];
}

/** The openai SDK's own stream reader over these bytes: throws on any event out of order. */
async function sdkStream(body: string) {
  const client = new OpenAI({
    apiKey: "sk-test",
    baseURL: "http://sdk.invalid/v1",
    fetch: () => Promise.resolve(new Response(body, { headers: { "content-type": "text/event-stream" } })),
  });
  const stream = client.responses.stream({ model: "dify", input: "x" });
  const events: string[] = [];
  for await (const e of stream) events.push(e.type);
  return { events, final: await stream.finalResponse() };
}

Deno.test("responses format: the documented event order, with increasing sequence numbers", async () => {
  const { frames: f, text } = run([["content", "Hel"], ["content", "lo"]]);
  assert.deepEqual(f.map((x) => x.event), [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
  ]);
  assert.deepEqual(f.map((x) => x.data.sequence_number), f.map((_, i) => i));
  const done = f.find((x) => x.event === "response.output_text.done")!.data;
  assert.equal(done.text, "Hello");
  const completed = f.at(-1)!.data.response as Record<string, unknown>;
  assert.equal(completed.status, "completed");
  assert.equal(completed.id, "resp_abc");
  assert.deepEqual(completed.usage, {
    input_tokens: 5,
    input_tokens_details: { cached_tokens: 0 },
    output_tokens: 7,
    output_tokens_details: { reasoning_tokens: 0 },
    total_tokens: 12,
  });
  const { events, final } = await sdkStream(text);
  assert.equal(events.length, f.length);
  assert.equal(final.output_text, "Hello");
  assert.equal(final.status, "completed");
});

Deno.test("responses format: reasoning is its own item, closed before the answer; interleaved thoughts split items", async () => {
  const { frames: f, text } = run([["reasoning", "think"], ["reasoning", "ing"], ["content", "A"], [
    "reasoning",
    "more",
  ], ["content", "B"]]);
  assert.deepEqual(f.map((x) => x.event), [
    ...OPENED,
    ...reasoningEvents(2),
    ...messageEvents(1),
    ...reasoningEvents(1),
    ...messageEvents(1),
    "response.completed",
  ]);
  assert.deepEqual(f.map((x) => x.data.sequence_number), f.map((_, i) => i));
  const { final } = await sdkStream(text);
  assert.deepEqual(final.output.map((o) => o.type), ["reasoning", "message", "reasoning", "message"]);
  assert.equal(final.output_text, "AB");
  const first = final.output[0];
  assert.ok(first.type === "reasoning");
  assert.deepEqual(first.summary, [{ type: "summary_text", text: "thinking" }]);
  // Echoed back next turn, the items parse to the one answer the bridge recorded.
  const next = parse({ input: [{ role: "user", content: "q" }, ...final.output, { role: "user", content: "q2" }] });
  assert.deepEqual(next.messages.map((m) => [m.role, m.text]), [["user", "q"], ["assistant", "AB"], ["user", "q2"]]);
});

Deno.test("responses format: an empty answer is still a message item", async () => {
  const { frames: f, text } = run([]);
  assert.deepEqual(f.map((x) => x.event), [...OPENED, ...messageEvents(0), "response.completed"]);
  const { final } = await sdkStream(text);
  assert.equal(final.output_text, "");
});

Deno.test("responses format: an error after output is response.failed, then error; its code tells retryable from final", () => {
  const cases: [ApiError, string][] = [
    [apiError("upstream_broken", "Dify's stream broke"), "server_error"],
    [apiError("upstream_idle_timeout", "Dify went quiet"), "server_error"],
    [apiError("dify_rate_limited", "slow down", { code: "rate_limit" }), "rate_limit_exceeded"],
    [apiError("dify_invalid_request", "quota exceeded", { code: "provider_quota_exceeded" }), "invalid_prompt"],
    [apiError("workflow_failed", "node failed"), "invalid_prompt"],
    [apiError("answer_too_large", "over MAX_ANSWER_BYTES"), "invalid_prompt"],
  ];
  for (const [error, code] of cases) {
    const { frames: f, format } = run([["content", "partial"]], error);
    assert.deepEqual(f.slice(-2).map((x) => x.event), ["response.failed", "error"]);
    assert.deepEqual(f.map((x) => x.data.sequence_number), f.map((_, i) => i));
    const response = f.at(-2)!.data.response as Record<string, unknown>;
    assert.equal(response.status, "failed");
    assert.deepEqual(response.error, { code, message: error.message });
    const output = response.output as { status: string; content: { text: string }[] }[];
    assert.equal(output[0].status, "incomplete");
    assert.equal(output[0].content[0].text, "partial");
    assert.equal(f.at(-1)!.data.code, error.code);
    assert.equal(f.at(-1)!.data.message, error.message);
    assert.equal(format.final?.status, "failed");
  }
});

Deno.test("responses format: object() is the whole response, every field the SDK types, reasoning first", () => {
  const f = new ResponsesFormat("resp_xyz", 1700000000, "dify", ECHO, true);
  const o = f.object(translation("Answer", "Thought")) as Record<string, unknown>;
  for (
    const field of [
      "id",
      "object",
      "created_at",
      "status",
      "error",
      "incomplete_details",
      "instructions",
      "metadata",
      "model",
      "output",
      "parallel_tool_calls",
      "temperature",
      "tool_choice",
      "tools",
      "top_p",
      "usage",
      "text",
      "truncation",
      "store",
      "previous_response_id",
      "reasoning",
    ]
  ) assert.ok(field in o, field);
  assert.equal(o.object, "response");
  assert.equal(o.status, "completed");
  assert.equal(o.error, null);
  assert.deepEqual((o.output as { type: string }[]).map((i) => i.type), ["reasoning", "message"]);
  const noReasoning = new ResponsesFormat("resp_xyz", 1, "dify", ECHO, false).object(translation("A", "T")) as {
    output: unknown[];
  };
  assert.equal(noReasoning.output.length, 1);
});
