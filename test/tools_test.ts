/**
 * Tool calls over a Dify app (issue 14): TOOLS=ignore|emulate|reject, the `<tool_call>` scan of an answer,
 * OpenAI `tool_calls` and Responses `function_call` items, `<tool_response>` turns, and one Dify conversation
 * through a tool loop. The fake Dify's `tools:<script>` directive plays an LLM node that follows the format
 * (or answers badly); the openai SDK is the client.
 */
import assert from "node:assert/strict";
import { jsonSchema, stepCountIs, streamText, tool } from "ai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import {
  answerText,
  ApiError,
  buildTurn,
  ConfigError,
  fingerprint,
  loadConfig,
  offeredTools,
  parseChatRequest,
  parseResponsesRequest,
  type ScanPiece,
  TOOL_BLOCK,
  type ToolAsk,
  type ToolCall,
  ToolCallScan,
  toolResponse,
} from "../main.ts";
import {
  bunAvailable,
  openai,
  openclawRequest,
  rawChat,
  type Rig,
  sseData,
  startProcess,
  startRig,
  test,
  user,
} from "../bench/test_util.ts";
import { startFakeDify, toolDirective } from "../bench/fake_dify.ts";

const WEATHER = {
  type: "function" as const,
  function: {
    name: "get_weather",
    description: "The weather in a city",
    parameters: { type: "object", properties: { city: { type: "string" } } },
  },
};
const NAMES = new Set(["get_weather", "read_file"]);
const LIMITS = { maxMessages: 100, maxParts: 100 };

/** Scans `answer` fed in pieces of `size` characters; the content and calls it releases, and its notes. */
function scan(answer: string, size = 1, parallel = true) {
  const s = new ToolCallScan(NAMES, parallel);
  const pieces: ScanPiece[] = [];
  for (let i = 0; i < answer.length; i += size) pieces.push(...s.push(answer.slice(i, i + size)));
  pieces.push(...s.end());
  const content = pieces.filter((p): p is string => typeof p === "string").join("");
  const calls = pieces.filter((p): p is ToolCall => typeof p !== "string");
  return { content, calls, notes: s.notes };
}

/** The same scan fed whole and one character at a time must agree. */
function scanBoth(answer: string, parallel = true) {
  const whole = scan(answer, answer.length || 1, parallel);
  const bytes = scan(answer, 1, parallel);
  assert.equal(bytes.content, whole.content, `content of ${JSON.stringify(answer)}`);
  assert.deepEqual(bytes.calls.map((c) => [c.name, c.arguments]), whole.calls.map((c) => [c.name, c.arguments]));
  return whole;
}

const call = (name: string, args: unknown) => `<tool_call>\n${JSON.stringify({ name, arguments: args })}\n</tool_call>`;

// ─── The scan ────────────────────────────────────────────────────────────────────────────────────

test("tools scan: plain text flows through unchanged, and only a possible tag start is held", () => {
  const s = new ToolCallScan(NAMES, true);
  assert.deepEqual(s.push("Hello a<b "), ["Hello a<b "]);
  assert.deepEqual(s.push("x <tool"), ["x "], "a partial <tool_call> waits");
  assert.deepEqual(s.push("box>"), ["<toolbox>"], "and is released once it is not one");
  assert.deepEqual(s.end(), []);
  // Dify's moderation replaced the answer: what was held goes with it.
  assert.deepEqual(s.push('<tool_call>{"name"'), []);
  s.drop();
  assert.deepEqual(s.end(), []);
  for (const text of ["", "  \n", "plain", "a <b> c", "<tool>", "x </tool_call> y", "<think>hm</think>\nok"]) {
    const r = scanBoth(text);
    assert.equal(r.content, text);
    assert.equal(r.calls.length, 0);
  }
});

test("tools scan: a long call in many small chunks, its close tag split across them, is one call", () => {
  const long = "x".repeat(200_000);
  for (const size of [3, 4, 11]) {
    const r = scan(`Sure.\n${call("read_file", { path: long })}\nDone.`, size);
    assert.equal(r.calls.length, 1, `chunks of ${size}`);
    assert.equal(JSON.parse(r.calls[0].arguments).path, long);
    assert.equal(r.content, "Sure.\n\nDone.");
  }
});

test("tools scan: a call, with leading whitespace and after text, is a call with compact JSON arguments", () => {
  const a = scanBoth(`\n\n ${call("get_weather", { city: "Oslo" })}\n`);
  assert.equal(a.content, "", "whitespace around a call is not content");
  assert.equal(a.calls.length, 1);
  assert.equal(a.calls[0].name, "get_weather");
  assert.equal(a.calls[0].arguments, '{"city":"Oslo"}');
  assert.match(a.calls[0].id, /^call_[0-9a-f]{24}$/);
  const b = scanBoth(`Let me check.\n${call("read_file", { path: "a.txt" })}`);
  assert.equal(b.content, "Let me check.\n");
  assert.equal(b.calls[0].name, "read_file");
  const think = scanBoth(`<think>which tool?</think>\n${call("get_weather", {})}`);
  assert.equal(think.content, "<think>which tool?</think>\n");
  assert.equal(think.calls.length, 1);
  // Arguments as a JSON string (some models) are the same call; no arguments are {}.
  assert.equal(
    scanBoth(`<tool_call>{"name":"get_weather","arguments":"{\\"city\\":\\"X\\"}"}</tool_call>`).calls[0]
      .arguments,
    '{"city":"X"}',
  );
  assert.equal(scanBoth(`<tool_call>{"name":"get_weather"}</tool_call>`).calls[0].arguments, "{}");
});

test("tools scan: two calls are two; parallel_tool_calls false keeps the first and says so", () => {
  const two = `${call("get_weather", { city: "A" })}\n${call("get_weather", { city: "B" })}`;
  assert.deepEqual(scanBoth(two).calls.map((c) => c.arguments), ['{"city":"A"}', '{"city":"B"}']);
  const one = scanBoth(two, false);
  assert.deepEqual(one.calls.map((c) => c.arguments), ['{"city":"A"}']);
  assert.equal(one.content, "");
  assert.match(one.notes.join(), /parallel_tool_calls/);
});

test("tools scan: half a tag, invalid JSON, an unknown function, bad arguments are content, and the notes say why", () => {
  const cases: [string, RegExp | null][] = [
    ["Checking <tool_ca", null],
    ["<tool_c", null],
    ['<tool_call>{"name": "get_weather", "arguments": {</tool_call>', /invalid JSON/],
    ['<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', /did not offer/],
    ['<tool_call>{"arguments": {}}</tool_call>', /without a name/],
    ['<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>', /not a JSON object/],
    ['<tool_call>{"name": "get_weather", "arguments": "{oops"}</tool_call>', /not JSON/],
    ['<tool_call>{"name": "get_weather", "arguments": {', /unclosed/],
  ];
  for (const [answer, why] of cases) {
    const r = scanBoth(answer);
    assert.equal(r.content, answer, "released unchanged");
    assert.equal(r.calls.length, 0);
    if (why) assert.match(r.notes.join(), why, answer);
    else assert.deepEqual(r.notes, []);
  }
  // The notes never carry the model's text (the function name, the arguments).
  assert.ok(!scan('<tool_call>{"name": "secret_fn"}</tool_call>').notes.join().includes("secret_fn"));
  // A whole call the stop sequence cut before `</tool_call>` is still a call.
  assert.equal(scanBoth('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}').calls.length, 1);
  // A bad call after a good one is content after the call.
  const mixed = scanBoth(`${call("get_weather", {})}<tool_call>nope</tool_call>`);
  assert.equal(mixed.calls.length, 1);
  assert.equal(mixed.content, "<tool_call>nope</tool_call>");
});

// ─── Configuration and requests ─────────────────────────────────────────────────────────────────

test('tools config: TOOLS and per-app "tools"; a bad value is a ConfigError', () => {
  assert.equal(loadConfig({}).tools, "ignore");
  assert.equal(loadConfig({ TOOLS: "emulate" }).tools, "emulate");
  assert.throws(() => loadConfig({ TOOLS: "yes" }), ConfigError);
  const config = loadConfig({ DIFY_APPS: JSON.stringify({ a: { key: "app-a", tools: "emulate" }, b: "app-b" }) });
  assert.equal(config.apps.get("a")?.tools, "emulate");
  assert.equal(config.apps.get("b")?.tools, undefined);
  assert.throws(() => loadConfig({ DIFY_APPS: JSON.stringify({ a: { key: "app-a", tools: "on" } }) }), /tools must be/);
});

test("tools parse: chat and Responses tools, tool_choice and parallel_tool_calls; bad ones are 400s", () => {
  const chat = (extra: Record<string, unknown>) =>
    parseChatRequest({ model: "m", messages: [user("hi")], ...extra }, new Headers(), LIMITS).tools;
  assert.equal(chat({}), undefined);
  assert.equal(chat({ tools: [] }), undefined);
  assert.deepEqual(chat({ tools: [WEATHER], parallel_tool_calls: false }), {
    tools: [WEATHER.function],
    choice: "auto",
    parallel: false,
  });
  assert.deepEqual(
    chat({ tools: [WEATHER], tool_choice: { type: "function", function: { name: "get_weather" } } })
      ?.choice,
    { name: "get_weather" },
  );
  const flat = parseResponsesRequest(
    {
      model: "m",
      input: "x",
      tools: [{ type: "web_search" }, { type: "function", name: "f", parameters: {} }],
      tool_choice: "required",
    },
    new Headers(),
    LIMITS,
  ).tools;
  assert.deepEqual(flat, { tools: [{ name: "f", parameters: {} }], choice: "required", parallel: true });
  const bad = (body: Record<string, unknown>, param: string) =>
    assert.throws(() => chat(body), (e: unknown) => e instanceof ApiError && e.status === 400 && e.param === param);
  bad({ tools: {} }, "tools");
  bad({ tools: [{ type: "function", function: {} }] }, "tools[0].function.name");
  bad({ tools: [WEATHER], tool_choice: "sometimes" }, "tool_choice");
  bad({ tools: [WEATHER], tool_choice: { type: "function", function: { name: "other" } } }, "tool_choice");
  bad({ tools: [WEATHER], parallel_tool_calls: "no" }, "parallel_tool_calls");
});

test("tools modes: ignore and reject refuse what they cannot give, emulate offers the tools", () => {
  const ask = (choice: ToolAsk["choice"], tools = [WEATHER.function]): ToolAsk => ({ tools, choice, parallel: true });
  const refused = (f: () => unknown, param: string) =>
    assert.throws(f, (e: unknown) => e instanceof ApiError && e.code === "tools_unsupported" && e.param === param);
  assert.equal(offeredTools(ask("auto"), "ignore", "m"), undefined);
  refused(() => offeredTools(ask("required"), "ignore", "m"), "tool_choice");
  refused(() => offeredTools(ask({ name: "get_weather" }), "ignore", "m"), "tool_choice");
  refused(() => offeredTools(ask("auto"), "reject", "m"), "tools");
  refused(() => offeredTools(ask("none"), "reject", "m"), "tools");
  assert.equal(offeredTools(ask("none"), "emulate", "m"), undefined);
  assert.equal(offeredTools(ask("auto"), "emulate", "m")?.tools.length, 1);
  assert.equal(offeredTools(undefined, "reject", "m"), undefined);
});

test("tools turn: results are <tool_response> blocks named by their call; the echo fingerprints as recorded", () => {
  const calls = [{ id: "call_1", type: "function", function: { name: "get_weather", arguments: '{"city":"Oslo"}' } }];
  const messages = parseChatRequest(
    {
      model: "m",
      messages: [
        { role: "system", content: "sys" },
        user("weather?"),
        { role: "assistant", content: null, tool_calls: calls },
        { role: "tool", tool_call_id: "call_1", content: "12°C" },
        user("and you?"),
      ],
    },
    new Headers(),
    LIMITS,
  ).messages;
  const turn = buildTurn(messages, "clean", true);
  assert.equal(turn.query, `${toolResponse("get_weather", "12°C")}\n\nand you?`);
  assert.equal(
    toolResponse("get_weather", "12°C"),
    '<tool_response>{"name":"get_weather","content":"12°C"}</tool_response>',
  );
  assert.match(buildTurn(messages, "clean", false).query, /^\[tool result\] 12°C/);
  // What the bridge records for an answer that made this call is what the echo fingerprints to.
  const made: ToolCall = { id: "call_1", name: "get_weather", arguments: '{"city":"Oslo"}' };
  assert.equal(
    fingerprint(turn.system, turn.history),
    fingerprint("sys", [{ role: "user", text: "weather?" }, { role: "assistant", text: answerText("", [made]) }]),
  );
  assert.match(TOOL_BLOCK, /<tool_call>\n\{"name": <function-name>, "arguments": <args-json-object>\}\n<\/tool_call>/);
});

// ─── Over HTTP, against the fake Dify ───────────────────────────────────────────────────────────

async function withTools(env: Record<string, string>, fn: (rig: Rig) => Promise<void>): Promise<void> {
  const rig = await startRig({ TOOLS: "emulate", ...env });
  try {
    await fn(rig);
  } finally {
    await rig.close();
  }
}

/** The queries Dify got, in order. */
function queries(rig: Rig): string[] {
  return rig.fake.requests.filter((r) => r.path === "/chat-messages").map((r) => String(r.body.query));
}

/** An assistant message as the tests read it. */
type Said = { content: string | null; tool_calls?: { id: string; function: { name: string; arguments: string } }[] };

function lastLog(rig: Rig): Record<string, unknown> {
  return JSON.parse(rig.bridge.logs.at(-1)!);
}

test("tools http: the openai SDK's runTools loop, streaming and not, in one Dify conversation", async () => {
  for (const stream of [false, true]) {
    await withTools({}, async (rig) => {
      const seen: string[] = [];
      const runner = rig.client.chat.completions.runTools({
        model: "dify",
        messages: [user("weather in Oslo? tools:follow:2")],
        stream,
        tools: [{
          type: "function",
          function: {
            ...WEATHER.function,
            function: (args: string) => {
              seen.push(args);
              return `sunny, step ${JSON.parse(args).step}`;
            },
          },
        }],
      } as never) as unknown as { finalContent(): Promise<string | null> };
      assert.equal(await runner.finalContent(), "Done after 2 results: sunny, step 2", `stream: ${stream}`);
      assert.deepEqual(seen, ['{"step":1}', '{"step":2}']);
      assert.equal(rig.fake.conversations.size, 1, "one Dify conversation");
      const q = queries(rig);
      assert.equal(q.length, 3);
      assert.ok(q[0].includes("<tools>") && q[0].includes('"name":"get_weather"'), "the block goes first");
      assert.equal(q[1], toolResponse("get_weather", "sunny, step 1"), "then only each new result");
      assert.equal(q[2], toolResponse("get_weather", "sunny, step 2"));
      const inputs = rig.fake.requests.filter((r) => r.path === "/chat-messages").map((r) => r.body.inputs.tools);
      assert.deepEqual(JSON.parse(inputs[0]), [WEATHER.function], "the tools input, for apps that use it");
      const logs = rig.bridge.logs.map((l) => JSON.parse(l));
      assert.deepEqual(logs.map((l) => l.tool_calls), [1, 1, undefined]);
      assert.deepEqual(logs.map((l) => l.conversation_via), ["new", "history", "history"]);
    });
  }
});

test("tools http: a 5-step hand loop stays in one conversation; Dify gets each result alone", async () => {
  await withTools({}, async (rig) => {
    const messages: Record<string, unknown>[] = [
      { role: "system", content: "You are an agent." },
      user(
        "read five files tools:follow:5",
      ),
    ];
    const tools = [{ type: "function", function: { name: "read_file", parameters: { type: "object" } } }];
    for (let step = 1; step <= 6; step++) {
      const stream = step % 2 === 0;
      let message: { content: string | null; tool_calls?: { id: string; function: { arguments: string } }[] };
      let finish: string | null;
      if (stream) {
        const s = rig.client.chat.completions.stream({ model: "dify", messages, tools } as never);
        const done = await s.finalChatCompletion();
        message = done.choices[0].message as never;
        finish = done.choices[0].finish_reason;
      } else {
        const r = await rig.client.chat.completions.create({ model: "dify", messages, tools } as never);
        message = r.choices[0].message as never;
        finish = r.choices[0].finish_reason;
      }
      if (step === 6) {
        assert.equal(finish, "stop");
        assert.equal(message.content, "Done after 5 results: contents of file 5");
        break;
      }
      assert.equal(finish, "tool_calls", `step ${step}`);
      assert.equal(message.tool_calls?.length, 1);
      assert.equal(message.tool_calls![0].function.arguments, `{"step":${step}}`);
      messages.push(message as never, {
        role: "tool",
        tool_call_id: message.tool_calls![0].id,
        content: `contents of file ${step}`,
      });
    }
    assert.equal(rig.fake.conversations.size, 1, "one Dify conversation");
    const q = queries(rig);
    assert.equal(q.length, 6);
    assert.ok(q[0].startsWith("You are an agent.\n\n# Tools"), q[0].slice(0, 80));
    for (let i = 1; i < 6; i++) assert.equal(q[i], toolResponse("read_file", `contents of file ${i}`));
  });
});

test("tools http: a changed tool set is told again; the same set is not", async () => {
  await withTools({}, async (rig) => {
    const messages: Record<string, unknown>[] = [user("go tools:follow:3")];
    const sets = [[WEATHER], [WEATHER], [WEATHER, { type: "function", function: { name: "read_file" } }]];
    for (const tools of sets) {
      const r = await rig.client.chat.completions.create({ model: "dify", messages, tools } as never);
      const m = r.choices[0].message;
      messages.push(m as never, { role: "tool", tool_call_id: m.tool_calls![0].id, content: "ok" });
    }
    const q = queries(rig);
    assert.deepEqual(q.map((x) => x.includes("<tools>")), [true, false, true]);
    assert.ok(q[2].endsWith(toolResponse("get_weather", "ok")), "the block, then the result");
    assert.equal(rig.fake.conversations.size, 1);
  });
});

test("tools http: answers that do not follow the format are text; the log says why", async () => {
  await withTools({}, async (rig) => {
    const ask = async (script: string, extra: Record<string, unknown> = {}) => {
      const body = { model: "dify", messages: [user(`q tools:${script}`)], tools: [WEATHER], ...extra };
      const plain = await rig.client.chat.completions.create(body as never);
      const log = lastLog(rig);
      const streamed = await rig.client.chat.completions.stream(body as never).finalChatCompletion();
      assert.equal(streamed.choices[0].message.content, plain.choices[0].message.content, script);
      assert.equal(streamed.choices[0].finish_reason, plain.choices[0].finish_reason, script);
      return { message: plain.choices[0].message as unknown as Said, finish: plain.choices[0].finish_reason, log };
    };
    const half = await ask("half");
    assert.equal(half.message.content, "Checking <tool_ca");
    assert.equal(half.finish, "stop");
    const bad = await ask("badjson");
    assert.equal(bad.message.content, '<tool_call>{"name": "get_weather", "arguments": {</tool_call>');
    assert.match(String(bad.log.tool_text), /invalid JSON/);
    const unknown = await ask("unknown");
    assert.match(unknown.message.content ?? "", /no_such_tool/);
    assert.match(String(unknown.log.tool_text), /did not offer/);
    assert.ok(!JSON.stringify(unknown.log).includes("no_such_tool"), "no model text in the log");
    const after = await ask("text_then_call");
    assert.equal(after.message.content, "Let me check. ");
    assert.equal(after.finish, "tool_calls");
    assert.equal(after.message.tool_calls?.[0].function.name, "get_weather");
    const two = await ask("two");
    assert.deepEqual(two.message.tool_calls?.map((c) => c.function.arguments), ['{"step":1}', '{"step":2}']);
    assert.equal(two.message.content, null);
    const one = await ask("two", { parallel_tool_calls: false });
    assert.equal(one.message.tool_calls?.length, 1);
    assert.match(String(one.log.tool_text), /parallel_tool_calls/);
    const unclosed = await ask("unclosed");
    assert.equal(unclosed.message.tool_calls?.length, 1);
  });
});

test("tools http: the streamed chunks are OpenAI's (tool_calls deltas with index, id, type, name, arguments)", async () => {
  await withTools({}, async (rig) => {
    const res = await rawChat(rig.bridge.url, {
      model: "dify",
      messages: [user("q tools:two")],
      tools: [WEATHER],
      stream: true,
    });
    // deno-lint-ignore no-explicit-any
    const chunks = sseData(res.text).filter((f) => f !== "[DONE]") as Record<string, any>[];
    const deltas = chunks.flatMap((c) => c.choices?.[0]?.delta?.tool_calls ?? []);
    assert.equal(deltas.length, 2);
    assert.deepEqual(deltas.map((d) => d.index), [0, 1]);
    for (const d of deltas) {
      assert.equal(d.type, "function");
      assert.match(d.id, /^call_/);
      assert.equal(d.function.name, "get_weather");
    }
    assert.equal(chunks.filter((c) => c.choices?.[0]?.delta?.content).length, 0, "no content before the calls");
    assert.equal(chunks.at(-1)!.choices[0].finish_reason, "tool_calls");
  });
});

test("tools http: 400s for tool_choice required or a function without emulate, and for any tools with reject", async () => {
  const rig = await startRig({
    DIFY_APPS: JSON.stringify({ plain: "app-chat", strict: { key: "app-chat", tools: "reject" } }),
  });
  try {
    const tools = [WEATHER];
    const refused = async (body: Record<string, unknown>, param: string) => {
      const res = await rawChat(rig.bridge.url, { messages: [user("hi")], tools, ...body });
      const json = JSON.parse(res.text);
      assert.equal(res.status, 400, JSON.stringify(json));
      assert.equal(json.error.code, "tools_unsupported");
      assert.equal(json.error.param, param);
      assert.equal(json.error.type, "invalid_request_error");
    };
    await refused({ model: "plain", tool_choice: "required" }, "tool_choice");
    await refused(
      { model: "plain", tool_choice: { type: "function", function: { name: "get_weather" } } },
      "tool_choice",
    );
    await refused({ model: "strict" }, "tools");
    // Ignore: tools with auto are answered in text, as before.
    const ok = await rig.client.chat.completions.create({ model: "plain", messages: [user("hi")], tools } as never);
    assert.equal(ok.choices[0].finish_reason, "stop");
    assert.ok(!queries(rig)[0].includes("<tools>"));
    // Responses: the same refusal.
    const res = await fetch(`${rig.bridge.url}/responses`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({
        model: "plain",
        input: "hi",
        tools: [{ type: "function", name: "f" }],
        tool_choice: "required",
      }),
    });
    assert.equal(res.status, 400);
    assert.equal((await res.json()).error.code, "tools_unsupported");
  } finally {
    await rig.close();
  }
});

test("tools http: Responses function_call items, streamed in order, and the loop continues both ways", async () => {
  await withTools({}, async (rig) => {
    const tools = [{
      type: "function" as const,
      name: "get_weather",
      parameters: WEATHER.function.parameters,
      strict: false,
    }];
    // Streamed: the documented events, in order.
    const events: { type: string; [k: string]: unknown }[] = [];
    const stream = rig.client.responses.stream({ model: "dify", input: "q tools:text_then_call", tools, store: false });
    for await (const ev of stream) events.push(ev as never);
    const final = await stream.finalResponse();
    const types = events.map((e) => e.type).filter((t) => !t.startsWith("response.output_text.delta"));
    const at = types.indexOf("response.function_call_arguments.delta");
    assert.deepEqual(types.slice(at - 1, at + 3), [
      "response.output_item.added",
      "response.function_call_arguments.delta",
      "response.function_call_arguments.done",
      "response.output_item.done",
    ]);
    assert.ok(types.indexOf("response.output_text.done") < at, "the message closes before the call opens");
    assert.deepEqual(final.output.map((o) => o.type), ["message", "function_call"]);
    const fc = final.output[1] as { call_id: string; name: string; arguments: string; status: string };
    assert.equal(fc.name, "get_weather");
    assert.equal(fc.arguments, '{"step":1}');
    assert.equal(fc.status, "completed");
    // Codex's way (store: false): the whole history again, with the function_call_output.
    const next = await rig.client.responses.create({
      model: "dify",
      store: false,
      tools,
      input: [
        { role: "user", content: "q tools:text_then_call" },
        ...final.output as never[],
        { type: "function_call_output", call_id: fc.call_id, output: "rainy" },
      ],
    });
    assert.deepEqual(next.output.map((o) => o.type), ["message", "function_call"]);
    assert.equal(rig.fake.conversations.size, 1, "the echo continued the conversation");
    assert.equal(queries(rig)[1], toolResponse("get_weather", "rainy"));
    // The Agents SDK's way: previous_response_id and only the output.
    const stored = await rig.client.responses.create({ model: "dify", input: "q tools:follow", tools });
    assert.deepEqual(stored.output.map((o) => o.type), ["function_call"]);
    const call = stored.output[0] as { call_id: string };
    const done = await rig.client.responses.create({
      model: "dify",
      previous_response_id: stored.id,
      tools,
      input: [{ type: "function_call_output", call_id: call.call_id, output: "snow" }],
    });
    assert.equal(done.output_text, "Done after 1 results: snow");
  });
});

test("tools http: deno run main.ts and bun main.ts call tools end to end", async () => {
  const fake = await startFakeDify();
  try {
    for (const runtime of ["deno", "bun"] as const) {
      if (runtime === "bun" && !bunAvailable()) continue;
      const p = await startProcess(runtime, { DIFY_API_URL: fake.url, DIFY_API_KEY: "app-chat", TOOLS: "emulate" });
      try {
        const client = openai(p.url);
        const messages: Record<string, unknown>[] = [user(`${runtime} tools:follow:1`)];
        const s = await client.chat.completions.stream({ model: "dify", messages, tools: [WEATHER] } as never)
          .finalChatCompletion();
        const m = s.choices[0].message;
        assert.equal(s.choices[0].finish_reason, "tool_calls", runtime);
        messages.push(m as never, { role: "tool", tool_call_id: m.tool_calls![0].id, content: "warm" });
        const r = await client.chat.completions.create({ model: "dify", messages, tools: [WEATHER] } as never);
        assert.equal(r.choices[0].message.content, "Done after 1 results: warm", runtime);
      } finally {
        await p.stop();
      }
    }
    const convs = [...fake.conversations.values()];
    assert.equal(convs.length, bunAvailable() ? 2 : 1);
    assert.ok(convs.every((c) => c.turns.length === 2), "each runtime's loop in one conversation");
  } finally {
    await fake.close();
  }
});

test("tools http: a real OpenClaw request (12 tools) under emulate: one block, a call, then only the result", async () => {
  await withTools({ SYSTEM_PROMPT: "drop" }, async (rig) => {
    const body = await openclawRequest("cli-turn1");
    const messages = body.messages as Record<string, unknown>[];
    messages[1] = {
      ...messages[1],
      content: String(messages[1].content).replace("hi there", "read my notes tools:follow"),
    };
    const names = (body.tools as { function: { name: string } }[]).map((t) => t.function.name);
    const first = await rig.client.chat.completions.stream({ ...body, stream: true } as never).finalChatCompletion();
    const said = first.choices[0].message as unknown as Said;
    assert.equal(first.choices[0].finish_reason, "tool_calls");
    assert.equal(said.tool_calls?.[0].function.name, names[0]);
    const q0 = queries(rig)[0];
    assert.ok(names.every((n) => q0.includes(`"name":"${n}"`)), "every tool is in the block");
    assert.ok(q0.endsWith("read my notes tools:follow"), "the envelope is still cleaned");
    // As OpenClaw's second turn (cli-turn2): its internal-context message moves to the end.
    const internal = messages.pop()!;
    messages.push(said as never, { role: "tool", tool_call_id: said.tool_calls![0].id, content: "notes: buy milk" });
    messages.push(internal);
    const next = await rig.client.chat.completions.stream({ ...body, messages, stream: true } as never)
      .finalChatCompletion();
    assert.equal(next.choices[0].message.content, "Done after 1 results: notes: buy milk");
    assert.equal(queries(rig)[1], toolResponse(names[0], "notes: buy milk"));
    assert.equal(rig.fake.conversations.size, 1);
  });
});

test("tools http: the AI SDK's tool loop (streamText with tools and steps), streaming through the bridge", async () => {
  await withTools({}, async (rig) => {
    const provider = createOpenAICompatible({ name: "dify", baseURL: rig.bridge.url, apiKey: "sk-test" });
    const calls: unknown[] = [];
    const result = streamText({
      model: provider.chatModel("dify"),
      prompt: "weather in Oslo and Bergen? tools:follow:2",
      stopWhen: stepCountIs(5),
      tools: {
        get_weather: tool({
          description: "The weather in a city",
          inputSchema: jsonSchema<{ step: number }>({ type: "object", properties: { step: { type: "number" } } }),
          execute: (input) => {
            calls.push(input);
            return Promise.resolve(`cloudy ${input.step}`);
          },
        }),
      },
    });
    assert.match(await result.text, /^Done after 2 results: .*cloudy 2/);
    assert.deepEqual(calls, [{ step: 1 }, { step: 2 }]);
    assert.equal((await result.steps).length, 3);
    assert.equal(rig.fake.conversations.size, 1, "one Dify conversation");
    assert.equal(queries(rig).filter((q) => q.includes("<tools>")).length, 1);
  });
});

test("tools http: tool_choice none offers no tools, yet a result still goes back as <tool_response>", async () => {
  await withTools({}, async (rig) => {
    const messages: Record<string, unknown>[] = [user("go tools:follow:2")];
    const r = await rig.client.chat.completions.create({ model: "dify", messages, tools: [WEATHER] } as never);
    const m = r.choices[0].message as unknown as Said;
    messages.push(m, { role: "tool", tool_call_id: m.tool_calls![0].id, content: "ok" });
    const none = await rig.client.chat.completions.create(
      { model: "dify", messages, tools: [WEATHER], tool_choice: "none" } as never,
    );
    assert.equal(none.choices[0].finish_reason, "stop");
    assert.match(none.choices[0].message.content ?? "", /^<tool_call>/, "the app's call is only text now");
    assert.equal(queries(rig)[1], toolResponse("get_weather", "ok"));
    assert.equal(rig.fake.requests.filter((q) => q.path === "/chat-messages")[1].body.inputs.tools, undefined);
  });
});

test("tools http: the fake's tool:<name>:<args> directive calls a client's own tool, then says its result", async () => {
  await withTools({ SYSTEM_PROMPT: "drop" }, async (rig) => {
    // OpenClaw's real request, its 12 tools in the block: the directive picks `read` and its `path` argument.
    const body = await openclawRequest("cli-turn1");
    const messages = body.messages as Record<string, unknown>[];
    const ask = `read it ${toolDirective("read", { path: "/tmp/notes – ü.txt" })}`;
    messages[1] = { ...messages[1], content: String(messages[1].content).replace("hi there", ask) };
    const first = await rig.client.chat.completions.create({ ...body, stream: false } as never);
    const said = first.choices[0].message as unknown as Said;
    assert.equal(first.choices[0].finish_reason, "tool_calls");
    assert.equal(said.tool_calls?.length, 1);
    assert.equal(said.tool_calls![0].function.name, "read");
    assert.deepEqual(JSON.parse(said.tool_calls![0].function.arguments), { path: "/tmp/notes – ü.txt" });
    const internal = messages.pop()!;
    const content = `line one\n${"x".repeat(300)}`;
    messages.push(said as never, { role: "tool", tool_call_id: said.tool_calls![0].id, content }, internal);
    const next = await rig.client.chat.completions.stream({ ...body, messages, stream: true } as never)
      .finalChatCompletion();
    assert.equal(next.choices[0].finish_reason, "stop");
    assert.equal(next.choices[0].message.content, `Tool said: ${content.slice(0, 200)}`);
    assert.equal(queries(rig)[1], toolResponse("read", content), "only the result, in the same conversation");
    // A later turn without a result is answered as any other.
    const after = [...messages.slice(0, -1), next.choices[0].message, user("thanks"), internal];
    const third = await rig.client.chat.completions.create({ ...body, messages: after, stream: false } as never);
    assert.match(third.choices[0].message.content ?? "", /^Turn 3 of [0-9a-f]{8}: thanks$/);
    assert.equal(rig.fake.conversations.size, 1);
  });
});

test("tools http: OpenClaw on the Responses API, its internal context before the calls, stays in one conversation", async () => {
  await withTools({ SYSTEM_PROMPT: "drop" }, async (rig) => {
    // As OpenClaw 2026.9.6 (api: "openai-responses") sent them in a real run: the internal-context message stays
    // where it was, before the function_call items, while the next turn drops it.
    const wire = new URL("../testdata/responses-wire/openclaw-turn1.json", import.meta.url);
    const body = JSON.parse(await Deno.readTextFile(wire)).body;
    const [system, first, internal] = body.input as { content: { text: string }[] }[];
    const ask = {
      ...first,
      content: [{
        type: "input_text",
        text: `[Sat 2026-12-05 16:11 UTC] read it ${toolDirective("read", { path: "notes.txt" })}`,
      }],
    };
    const send = async (input: unknown[]) =>
      await rig.client.responses.create({ ...body, input, stream: false } as never);
    const one = await send([system, ask, internal]);
    const call = one.output.find((o) => o.type === "function_call")!;
    assert.equal(call.name, "read");
    const calls = [
      { type: "function_call", call_id: call.call_id, name: "read", arguments: call.arguments },
      { type: "function_call_output", call_id: call.call_id, output: "notes: buy milk" },
    ];
    const two = await send([system, ask, internal, ...calls]);
    assert.equal(two.output_text, "Tool said: notes: buy milk");
    const said = { type: "message", role: "assistant", content: [{ type: "output_text", text: two.output_text }] };
    const thanks = { ...first, content: [{ type: "input_text", text: "[Sat 2026-12-05 16:12 UTC] thanks" }] };
    const three = await send([system, ask, ...calls, said, thanks, internal]);
    assert.match(three.output_text, /^Turn 3 of [0-9a-f]{8}: thanks$/);
    assert.deepEqual(queries(rig).slice(1), [toolResponse("read", "notes: buy milk"), "thanks"]);
    assert.equal(rig.fake.conversations.size, 1, "one Dify conversation");
    assert.deepEqual(rig.bridge.logs.map((l) => JSON.parse(l).conversation_via), ["new", "history", "history"]);
  });
});
