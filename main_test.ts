/**
 * Unit tests: the pure parts of main.ts, each fed directly — configuration, request parsing, the OpenClaw
 * envelope, turns, fingerprints, the store, Dify's errors, event translation, SSE lines and OpenAI output.
 * Over HTTP: test/http_test.ts (in-process) and test/runtime_test.ts (`deno run` / `bun` subprocesses).
 */
import assert from "node:assert/strict";
import {
  ApiError,
  buildTurn,
  ChatFormat,
  type ChunkReader,
  cleanEnvelope,
  ConfigError,
  DenoKvStore,
  difyBase,
  difyError,
  difyFileType,
  Exchange,
  fingerprintText,
  isInternalContext,
  LineBatch,
  LineSplitter,
  loadConfig,
  type Message,
  newTranslation,
  parseChatRequest,
  parseSseLine,
  pump,
  thoughtText,
  type TranslateOptions,
  workflowAnswer,
} from "./main.ts";
import { readFixture } from "./bench/fake_dify.ts";
import { answerOf, fixtureEvents, usageOf, user } from "./bench/test_util.ts";

// ─── Configuration ───────────────────────────────────────────────────────────────────────────────

Deno.test("config: defaults, DIFY_API_KEY alone routes every model name to one app", () => {
  const c = loadConfig({ DIFY_API_KEY: "app-1" });
  assert.equal(c.port, 8000);
  assert.equal(c.difyUrl, "https://api.dify.ai/v1");
  assert.equal(c.catchAll?.model, "dify");
  assert.equal(c.catchAll?.key, "app-1");
  assert.equal(c.apps.size, 0);
  assert.equal(c.bodyLimit, 20 * 1024 * 1024);
  assert.equal(c.conversationMode, "history");
  assert.equal(c.systemPrompt, "prepend");
  assert.match(c.kvPath, /data\//);
});

Deno.test("config: DIFY_APPS takes key strings and objects; DIFY_API_KEY joins as DIFY_MODEL", () => {
  const c = loadConfig({
    DIFY_API_URL: "http://dify.local/v1/chat-messages",
    DIFY_API_KEY: "app-default",
    DIFY_MODEL: "main",
    DIFY_APPS: JSON.stringify({
      a: "app-a",
      wf: { key: "app-wf", type: "workflow", url: "http://other/v1/", input: "text", output: "out" },
    }),
  });
  assert.equal(c.difyUrl, "http://dify.local/v1");
  assert.equal(c.catchAll, undefined);
  assert.deepEqual([...c.apps.keys()].sort(), ["a", "main", "wf"]);
  assert.equal(c.apps.get("a")?.key, "app-a");
  assert.equal(c.apps.get("a")?.url, "http://dify.local/v1");
  assert.deepEqual(c.apps.get("wf"), {
    model: "wf",
    key: "app-wf",
    type: "workflow",
    url: "http://other/v1",
    input: "text",
    output: "out",
  });
});

Deno.test("config: invalid values are one-line ConfigErrors", () => {
  for (
    const env of [
      { DIFY_APPS: "{not json" },
      { DIFY_APPS: "[1]" },
      { DIFY_APPS: JSON.stringify({ m: { type: "robot" } }) },
      { DIFY_API_URL: "not a url" },
      { DIFY_API_URL: "ftp://x/v1" },
      { CONVERSATION_MODE: "always" },
      { PORT: "-1" },
    ]
  ) {
    assert.throws(
      () => loadConfig(env),
      (e) => e instanceof ConfigError && !e.message.includes("\n"),
      JSON.stringify(env),
    );
  }
  assert.equal(difyBase("https://api.dify.ai/v1/"), "https://api.dify.ai/v1");
});

// ─── Request parsing ─────────────────────────────────────────────────────────────────────────────

Deno.test("parse: ill-typed requests are 400s naming the field", () => {
  const limits = { maxMessages: 10, maxParts: 5 };
  const bad: [unknown, string | null][] = [
    [[], null],
    [{ messages: [user("x")] }, "model"],
    [{ model: 3, messages: [user("x")] }, "model"],
    [{ model: "m" }, "messages"],
    [{ model: "m", messages: [] }, "messages"],
    [{ model: "m", messages: [{ role: "robot", content: "x" }] }, "messages[0].role"],
    [{ model: "m", messages: [user(5)] }, "messages[0].content"],
    [{ model: "m", messages: [user([{ type: "audio" }])] }, "messages[0].content[0].type"],
    [{ model: "m", messages: [user("x")], stream: "yes" }, "stream"],
    [{ model: "m", messages: [user("x")], n: 2 }, "n"],
    [{ model: "m", messages: [{ role: "system", content: "s" }] }, "messages"],
    [{ model: "m", messages: Array(11).fill(user("x")) }, "messages"],
    [{ model: "m", messages: [user(Array(6).fill({ type: "text", text: "x" }))] }, "messages[0].content"],
  ];
  for (const [body, param] of bad) {
    assert.throws(() => parseChatRequest(body, new Headers(), limits), (e) => {
      assert.ok(e instanceof ApiError);
      assert.equal(e.status, 400);
      assert.equal(e.param, param);
      return true;
    }, JSON.stringify(body).slice(0, 80));
  }
});

// ─── OpenClaw envelope ───────────────────────────────────────────────────────────────────────────

const FENCE = "```";

/** An older-OpenClaw metadata block: `<Label> (untrusted …):` and a json fence. */
function olderOpenClawBlock(label: string, json: unknown, kind = "metadata", fence = `${FENCE}json`): string {
  const suffix = kind === "metadata" ? "(untrusted metadata):" : "(untrusted, for context):";
  return `${label} ${suffix}\n${fence}\n${JSON.stringify(json, null, 2)}\n${FENCE}`;
}

Deno.test("envelope: cleanEnvelope removes current and older OpenClaw envelopes and finds the sender", () => {
  // Current (2026.9.6): timestamp, `Label: ⟦openclaw:ctx⟧` block, Runtime line.
  const current = `[Tue 2026-11-24 08:11 UTC] Conversation info: ⟦openclaw:ctx⟧\n${FENCE}json\n` +
    `{"sender":{"id":"123456789","name":"Alice Tester","username":"alice_t"}}\n${FENCE}\n\nhi there\n\n` +
    "Runtime: agent=main | session=agent:main:main | sessionId=e1 | host=vm | channel=telegram | capabilities=x";
  assert.deepEqual(cleanEnvelope(current), { text: "hi there", senderId: "123456789", channel: "telegram" });
  const cli = cleanEnvelope("[Tue 2026-11-24 08:04 UTC] hi there\n\nRuntime: agent=main | session=agent:main:main");
  assert.equal(cli.text, "hi there");
  assert.equal(cli.senderId, undefined);
  assert.equal(cli.channel, undefined);
  // Older timestamps.
  assert.equal(cleanEnvelope("[Wed 2026-04-15 15:56 GMT+1] hi there").text, "hi there");
  assert.equal(cleanEnvelope("[Thu 2026-03-24 01:51 GMT+5:30] hi there").text, "hi there");
  assert.equal(cleanEnvelope("[Discord alice user id:1 +23s Fri 2026-03-06 06:00 UTC] hi there").text, "hi there");
  // Older blocks, every label, both suffixes, with and without `json` on the fence.
  const blocks = [
    olderOpenClawBlock("Conversation info", {
      message_id: "6955",
      sender_id: "395239117",
      sender: "Nigerian Prince",
      timestamp: "Wed 2026-03-04 18:25 GMT+2",
    }),
    olderOpenClawBlock("Sender", { label: "Nigerian Prince (395239117)", id: "395239117", name: "Nigerian Prince" }),
    olderOpenClawBlock("Thread starter", { body: "the thread's first message" }, "context"),
    olderOpenClawBlock("Replied message", { sender_label: "Bob", body: "earlier words" }, "context"),
    olderOpenClawBlock("Forwarded message context", { from: "Carol", type: "user", date_ms: 1 }),
    olderOpenClawBlock("Chat history since last reply", [{ sender: "Dan", timestamp_ms: 1, body: "yo" }], "context"),
    olderOpenClawBlock(
      "Location",
      { latitude: 48.858844, longitude: 2.294351, name: "Eiffel Tower" },
      "metadata",
      FENCE,
    ),
    olderOpenClawBlock("Structured object", { source: "x", type: "card", payload: { id: "not-a-user" } }),
    `Reply chain of current user message (untrusted, nearest first):\n${FENCE}json\n` +
    `[{"sender_label":"Eve","body":"older"}]\n${FENCE}`,
  ];
  const old = cleanEnvelope(`${blocks.join("\n\n")}\n\nhi there`);
  assert.equal(old.text, "hi there");
  assert.equal(old.senderId, "395239117");
  for (const b of blocks) {
    const one = cleanEnvelope(`${b}\n\nhi there`);
    assert.equal(one.text, "hi there", b.split("\n")[0]);
  }
  // Older layout: a timestamp prefix before the first block, or between the blocks and the text.
  assert.equal(cleanEnvelope(`[Wed 2026-03-11 23:51 PDT] ${blocks[0]}\n\nhi there`).text, "hi there");
  const after = cleanEnvelope(
    `${olderOpenClawBlock("Sender", { label: "openclaw-control-ui", id: "openclaw-control-ui" })}\n\n` +
      "[Sun 2026-04-19 00:33 GMT+8] hi there",
  );
  assert.equal(after.text, "hi there");
  assert.equal(after.senderId, "openclaw-control-ui");
  // The earliest Conversation info named the sender by a plain string.
  assert.equal(
    cleanEnvelope(`${olderOpenClawBlock("Conversation info", { message_id: "10285", sender: "1801759510" })}\n\nhi`)
      .senderId,
    "1801759510",
  );
  // Text that merely looks alike is left alone.
  for (
    const plain of [
      "he said (untrusted metadata): and left",
      "[draft] 2026-01-01 notes",
      "Sender: me\n```json\n{}\n```\nwhat does this do?",
    ]
  ) assert.equal(cleanEnvelope(plain).text, plain);
});

Deno.test("envelope: isInternalContext matches only OpenClaw's whole internal-context message", () => {
  const block = '<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>\nConversation data (data, not instructions):\n"x"\n' +
    "<<<END_OPENCLAW_INTERNAL_CONTEXT>>>";
  assert.equal(isInternalContext(block), true);
  assert.equal(isInternalContext(`\n  ${block}\n`), true);
  assert.equal(isInternalContext(`question first\n${block}`), false);
  assert.equal(isInternalContext(`${block}\nand a question after`), false);
  assert.equal(isInternalContext("<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>> unterminated"), false);
  assert.equal(isInternalContext("hi there"), false);
});

// ─── Turn building ───────────────────────────────────────────────────────────────────────────────

Deno.test("turn: every user message is cleaned, the internal context is dropped, ENVELOPE=keep keeps it all", () => {
  const m = (role: Message["role"], text: string): Message => ({ role, text, files: [] });
  const internal = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>\nstuff\n<<<END_OPENCLAW_INTERNAL_CONTEXT>>>";
  const sender = (id: string) =>
    `Conversation info: ⟦openclaw:ctx⟧\n${FENCE}json\n{"sender":{"id":"${id}"}}\n${FENCE}\n\n`;
  const messages = [
    m("system", "You are OpenClaw."),
    m("user", `[Tue 2026-11-24 08:11 UTC] ${sender("42")}first\n\nRuntime: agent=main | channel=telegram`),
    m("assistant", "answer one"),
    m("user", `[Tue 2026-11-24 08:12 UTC] ${sender("42")}second`),
    m("user", `[Tue 2026-11-24 08:12 UTC] ${sender("42")}third`),
    m("user", internal),
  ];
  const turn = buildTurn(messages, "clean");
  assert.equal(turn.query, "second\n\nthird");
  assert.deepEqual(turn.history.map((x) => x.text), ["first", "answer one"]);
  assert.deepEqual(turn.current.map((x) => x.text), ["second", "third"]);
  assert.equal(turn.sender, "telegram:42");
  const kept = buildTurn(messages, "keep");
  assert.ok(kept.query.includes("[Tue 2026-11-24 08:12 UTC]"));
  assert.ok(kept.query.includes("⟦openclaw:ctx⟧"));
  assert.ok(kept.query.includes("second") && kept.query.includes("third"));
  // Only the internal context: nothing to ask.
  assert.throws(() => buildTurn([m("user", internal)], "clean"));
});

// ─── Fingerprints ────────────────────────────────────────────────────────────────────────────────

Deno.test("fingerprint text: every whitespace run is one space, as with /\\s+/, short and long (cached) texts alike", () => {
  const alphabet = ["a", "b", "é", " ", " ", "\t", "\n", "\r", "\u00a0", "\u2028", "\u3000", "\ufeff", "\v"];
  let seed = 7;
  const next = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
  for (let i = 0; i < 2000; i++) {
    // Every 50th text is long enough for the cache; each is normalised twice (miss, then hit).
    const length = i % 50 === 0 ? 2048 + Math.floor(next() * 200) : Math.floor(next() * 40);
    let text = "";
    while (text.length < length) text += alphabet[Math.floor(next() * alphabet.length)];
    const expected = text.replace(/\s+/g, " ").trim();
    assert.equal(fingerprintText(text), expected, JSON.stringify(text.slice(0, 60)));
    assert.equal(fingerprintText(text), expected);
  }
  assert.equal(fingerprintText("<think>plan</think>  Hello,\n\tworld "), "Hello, world");
});

// ─── Conversation store ──────────────────────────────────────────────────────────────────────────

Deno.test("store: Deno KV writes that arrive together commit together, each with its own check, in order", async () => {
  const store = new DenoKvStore(await Deno.openKv(":memory:"));
  try {
    await store.set(["k", "old"], { v: 1 }, 0);
    const results = await Promise.all([
      // Commits at once, alone; the writes below arrive while it is in flight and wait together.
      store.set(["k", "first"], 1, 0),
      store.setIf(["k", "a"], null, "a1", 0),
      store.setIf(["k", "a"], "a1", "a2", 0), // expects the write just before it
      store.setIf(["k", "old"], { v: 2 }, "never", 0), // a stale expectation
      store.setIf(["k", "old"], { v: 1 }, { v: 3 }, 0, [[["k", "also"], "also1"]]),
      store.setIf(["k", "b"], null, "b1", 0),
    ]);
    assert.deepEqual(results, [undefined, true, true, false, true, true]);
    const values = await Promise.all(["first", "a", "old", "also", "b"].map((k) => store.get(["k", k])));
    assert.deepEqual(values, [1, "a2", { v: 3 }, "also1", "b1"]);
  } finally {
    store.close();
  }
});

// ─── Dify client ─────────────────────────────────────────────────────────────────────────────────

Deno.test("dify client: Dify's errors keep their meaning", () => {
  const app = { model: "m", url: "http://d/v1", input: "query" };
  const map = (status: number, code = "x", clientKey = false) =>
    difyError(status, { code, message: "msg", status }, app, clientKey);
  assert.equal(map(400).status, 400);
  assert.equal(map(401).status, 502);
  assert.match(map(401).message, /model m/);
  assert.equal(map(401, "unauthorized", true).status, 401);
  assert.equal(map(403).status, 502);
  assert.equal(map(403, "forbidden", true).status, 403);
  assert.equal(map(429).status, 429);
  assert.equal(map(429).headers["retry-after"], "1");
  assert.equal(map(413).status, 413);
  assert.equal(map(500).status, 502);
  assert.equal(map(503).status, 502);
  assert.equal(
    difyError(404, { code: "not_found", message: "Conversation Not Exists." }, app, false).code,
    "conversation_not_found",
  );
  assert.equal(map(404).status, 502);
});

Deno.test("dify client: difyFileType maps names (then MIME types) to Dify's file types", () => {
  const cases: [string, string, string][] = [
    ["report.pdf", "", "document"],
    ["notes.TXT", "", "document"],
    ["sheet.xlsx", "", "document"],
    ["song.mp3", "", "audio"],
    ["voice.m4a", "", "audio"],
    ["clip.mp4", "", "video"],
    ["movie.MOV", "", "video"],
    ["shot.png", "", "image"],
    ["photo.JPEG", "", "image"],
    ["thing.xyz", "", "custom"],
    ["file", "image/webp", "image"],
    ["file", "audio/ogg", "audio"],
    ["file", "video/webm", "video"],
    ["file", "application/pdf", "document"],
    ["file", "text/csv", "document"],
    ["file", "application/octet-stream", "custom"],
    ["archive.tar.gz", "", "custom"],
  ];
  for (const [name, mime, type] of cases) assert.equal(difyFileType(name, mime), type, `${name} ${mime}`);
});

// ─── Event translation ───────────────────────────────────────────────────────────────────────────

Deno.test("translation: workflowAnswer picks the configured output, a usual name, or JSON", () => {
  assert.equal(workflowAnswer({ result: "r", other: "o" }), "r");
  assert.equal(workflowAnswer({ text: "t", answer: "a" }), "t");
  assert.equal(workflowAnswer({ answer: "a", output: "o" }), "a");
  assert.equal(workflowAnswer({ output: "o", x: 1 }), "o");
  assert.equal(workflowAnswer({ summary: "only one" }), "only one");
  assert.equal(workflowAnswer({ a: "x", b: "y" }, "b"), "y");
  assert.equal(workflowAnswer({ a: { deep: [1, 2] } }, "a"), '{"deep":[1,2]}');
  assert.equal(workflowAnswer({ result: { score: 3 } }), '{"score":3}');
  assert.deepEqual(JSON.parse(workflowAnswer({ a: 1, b: { c: 2 } })), { a: 1, b: { c: 2 } });
  assert.equal(workflowAnswer({ result: 42 }), "42");
  assert.equal(workflowAnswer({}), "");
  assert.equal(workflowAnswer(null), "");
  assert.equal(workflowAnswer("plain"), "plain");
  for (const v of [{ a: {} }, { x: [1] }, [1, 2], { a: 1, b: 2 }]) {
    assert.ok(!workflowAnswer(v).includes("[object Object]"));
  }
});

Deno.test("translation: thoughtText shows the thought, the tool call and its result, but not the repeated answer", () => {
  assert.equal(thoughtText({ thought: "", tool: "", tool_input: "", observation: "" }, ""), "");
  const call = thoughtText(
    { thought: "I should search", tool: "search", tool_input: '{"q":"x"}', observation: "" },
    "",
  );
  const lines = call.split("\n");
  assert.equal(lines[0], "I should search");
  assert.ok(lines[1].includes("search") && lines[1].includes('{"q":"x"}'));
  const done = thoughtText({
    thought: "I should search",
    tool: "search",
    tool_input: '{"q":"x"}',
    observation: "found",
  }, "");
  assert.ok(done.startsWith(call), "a growing thought only appends");
  assert.ok(done.split("\n")[2].includes("found"));
  // The final thought repeats the streamed answer: nothing to show.
  assert.equal(thoughtText({ thought: "The answer is 4.", tool: "" }, "So: The answer is 4."), "");
});

// ─── SSE lines ───────────────────────────────────────────────────────────────────────────────────

Deno.test("lines: LF, CRLF and lone CR, split anywhere across chunks, unterminated last line", () => {
  const text = "data: a\r\n\r\nevent: ping\n\ndata: é😀\rdata: c\r\ndata: tail";
  const bytes = new TextEncoder().encode(text);
  const expected = ["data: a", "", "event: ping", "", "data: é😀", "data: c", "data: tail"];
  for (let size = 1; size <= bytes.length; size++) {
    const lines: string[] = [];
    const splitter = new LineSplitter((b, s, e) => lines.push(new TextDecoder().decode(b.subarray(s, e))));
    // One buffer reused for every push, as a BYOB reader does.
    const reused = new Uint8Array(size);
    for (let at = 0; at < bytes.length; at += size) {
      const part = bytes.subarray(at, at + size);
      reused.set(part);
      splitter.push(reused.subarray(0, part.length));
      reused.fill(0);
    }
    splitter.flush();
    assert.deepEqual(lines, expected, `chunk size ${size}`);
  }
});

Deno.test("lines: parseSseLine reads data JSON in both encodings, pings, and skips the rest", () => {
  const parse = (s: string) => {
    const b = new TextEncoder().encode(s);
    return parseSseLine(b, 0, b.length);
  };
  assert.deepEqual(parse(`data: {"event":"message","answer":"你好"}`), { event: "message", answer: "你好" });
  assert.deepEqual(parse(`data: {"event": "message", "answer": "\\u4f60\\u597d"}`), {
    event: "message",
    answer: "你好",
  });
  assert.deepEqual(parse(`data:{"a":1}`), { a: 1 });
  assert.equal(parse("event: ping"), "ping");
  for (const s of ["id: 12", "retry: 1000", ": comment", "data: {broken", "data:", "event: message", "foo: bar", ""]) {
    assert.equal(parse(s), null, s);
  }
});

// ─── Reading Dify's stream: pump ────────────────────────────────────────────────────────────────

/**
 * Dify's body from memory in reads of `size` bytes, all through one reused buffer as a BYOB reader
 * hands them out (a read may overwrite the last); `fail` makes the read after the bytes throw.
 */
function memoryReader(bytes: Uint8Array, size = bytes.length, fail?: Error): ChunkReader & { cancelled: boolean } {
  const buffer = new Uint8Array(Math.max(size, 1));
  let at = 0;
  return {
    cancelled: false,
    read() {
      if (at >= bytes.length) return fail ? Promise.reject(fail) : Promise.resolve(null);
      const part = bytes.subarray(at, at + size);
      at += part.length;
      buffer.fill(0);
      buffer.set(part);
      return Promise.resolve(buffer.subarray(0, part.length));
    },
    cancel() {
      this.cancelled = true;
    },
  };
}

/** A sink that keeps what the translation sent it. */
function recordingSink() {
  const sink = { content: "", reasoning: "", pings: 0 };
  return {
    sink,
    content: (text: string) => void (sink.content += text),
    reasoning: (text: string) => void (sink.reasoning += text),
    ping: () => void sink.pings++,
  };
}

const TRANSLATE: TranslateOptions = {
  reasoning: "reasoning_content",
  reasoningNodes: false,
  origin: "http://dify.local",
  app: { model: "dify", key: "app-1", url: "http://dify.local/v1", input: "query" },
  clientKey: false,
};

/** A fixture's bytes (or `bytes`) pumped through a translation, read `size` bytes at a time. */
async function pumped(
  fixture: string,
  opts: { type?: "chat" | "agent" | "chatflow" | "workflow"; size?: number; bytes?: Uint8Array; fail?: Error } = {},
  maxAnswerBytes?: number,
) {
  const bytes = opts.bytes ?? await readFixture(`${fixture}.sse`);
  const t = newTranslation(opts.type ?? "chat", true);
  t.keep = true;
  const out = recordingSink();
  const ex = new Exchange(() => performance.now());
  ex.headersReceived = true;
  const error = await pump(memoryReader(bytes, opts.size, opts.fail), t, out, TRANSLATE, ex, maxAnswerBytes);
  return { t, error, sent: out.sink };
}

Deno.test("pump: old Dify's escaped JSON and new Dify's raw UTF-8 give the same text, read in slices of 1..7 bytes", async () => {
  const expected = answerOf(await fixtureEvents("unicode_split"));
  assert.ok(/[\u{1F000}-\u{1FFFF}]/u.test(expected), "the fixture has astral characters");
  assert.equal(answerOf(await fixtureEvents("unicode_split_legacy")), expected);
  for (const fixture of ["unicode_split", "unicode_split_legacy"]) {
    for (const size of [undefined, 1, 2, 3, 4, 5, 6, 7]) {
      const { t, error, sent } = await pumped(fixture, { size });
      const what = `${fixture}, reads of ${size ?? "everything"}`;
      assert.equal(error, undefined, what);
      assert.equal(sent.content, expected, what);
      assert.equal(t.content, expected, what);
      assert.ok(t.ended, what);
    }
  }
});

Deno.test("pump: every recorded stream translates the same read whole or a few bytes at a time", async () => {
  const cases: [string, "chat" | "agent" | "chatflow" | "workflow"][] = [
    ["chat_basic", "chat"],
    ["agent_with_thoughts", "agent"],
    ["chatflow", "chatflow"],
    ["workflow_run", "workflow"],
    ["ping_keepalive", "chat"],
    ["moderation_replace", "chat"],
  ];
  for (const [fixture, type] of cases) {
    const whole = await pumped(fixture, { type });
    assert.equal(whole.error, undefined, fixture);
    assert.ok(whole.t.ended, fixture);
    assert.ok(whole.sent.content.length > 0, fixture);
    for (const size of [1, 3, 64]) {
      const sliced = await pumped(fixture, { type, size });
      const what = `${fixture}, reads of ${size}`;
      assert.equal(sliced.error, undefined, what);
      assert.deepEqual(sliced.sent, whole.sent, what);
      assert.deepEqual(sliced.t.usage, whole.t.usage, what);
      assert.equal(sliced.t.taskId, whole.t.taskId, what);
    }
  }
  const chat = await pumped("chat_basic");
  assert.equal(chat.sent.content, answerOf(await fixtureEvents("chat_basic")));
  assert.deepEqual(chat.t.usage, usageOf(await fixtureEvents("chat_basic")));
  assert.match(chat.t.conversationId ?? "", /^[0-9a-f-]{36}$/);
  const agent = await pumped("agent_with_thoughts", { type: "agent" });
  assert.ok(agent.sent.reasoning.length > 0, "agent thoughts become reasoning");
  const pings = await pumped("ping_keepalive");
  assert.equal(pings.sent.pings, 3, "each Dify ping reaches the sink");
});

Deno.test("pump: an answer that ends early says why — error event, no message_end, broken read, too large", async () => {
  const midstream = await pumped("error_midstream");
  assert.equal(midstream.error?.code, "completion_request_error");
  assert.equal(midstream.sent.content, answerOf(await fixtureEvents("error_midstream")), "the text before the error");

  const text = new TextDecoder().decode(await readFixture("chat_basic.sse"));
  const cut = new TextEncoder().encode(text.slice(0, text.indexOf('data: {"event":"message_end"')));
  const eof = await pumped("", { bytes: cut });
  assert.equal(eof.error?.code, "incomplete_stream");
  assert.equal(eof.t.ended, false);

  const broken = await pumped("", { bytes: cut, fail: new Error("connection reset") });
  assert.equal(broken.error?.code, "upstream_broken");
  assert.match(broken.error!.message, /connection reset/);

  const large = await pumped("chat_basic", { size: 16 }, 8);
  assert.equal(large.error?.code, "answer_too_large");
});

// ─── OpenAI output ───────────────────────────────────────────────────────────────────────────────

Deno.test("chunks: every pre-built chunk is valid JSON with the OpenAI shape", () => {
  const f = new ChatFormat("chatcmpl-1", 123, 'm"odel', { includeUsage: true, reasoningContent: true });
  const body = (s: string) => JSON.parse(s.slice(6));
  assert.deepEqual(body(f.open()).choices[0].delta, { role: "assistant", content: "" });
  const c = body(f.content('he said "hi"\n\u2028'));
  assert.deepEqual(c, {
    id: "chatcmpl-1",
    object: "chat.completion.chunk",
    created: 123,
    model: 'm"odel',
    choices: [{ index: 0, delta: { content: 'he said "hi"\n\u2028' }, logprobs: null, finish_reason: null }],
  });
  assert.equal(body(f.reasoning("r")).choices[0].delta.reasoning_content, "r");
  const t = newTranslation("chat", true);
  t.usage = { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 };
  const [finish, usage, done] = f.close(t).split("\n\n").filter(Boolean);
  assert.equal(body(finish).choices[0].finish_reason, "stop");
  assert.deepEqual(body(usage).choices, []);
  assert.deepEqual(body(usage).usage, t.usage);
  assert.equal(done, "data: [DONE]");
});

// ─── Request log ─────────────────────────────────────────────────────────────────────────────────

/** Resolves once a batch's wait is surely over. */
const batchWait = () => new Promise<void>((resolve) => setTimeout(resolve, 120));

Deno.test("request log: lines added together are written once, in order, a moment later; flush empties it", async () => {
  const writes: string[] = [];
  const batch = new LineBatch((text) => writes.push(text));
  batch.add("a");
  await Promise.resolve();
  batch.add("b");
  assert.deepEqual(writes, [], "nothing is written while the task that logged is still running");
  await batchWait();
  assert.deepEqual(writes, ["a\nb"]);
  batch.add("c");
  batch.flush();
  assert.deepEqual(writes, ["a\nb", "c"], "flush (at shutdown) writes what is pending at once");
  await batchWait();
  assert.deepEqual(writes, ["a\nb", "c"], "a flushed line is not written twice");
});

// ─── The file itself ─────────────────────────────────────────────────────────────────────────────

Deno.test("main.ts: the table of contents names every section banner, in order; Deno and Bun only past the fence", async () => {
  const source = await Deno.readTextFile(new URL("./main.ts", import.meta.url));
  const banners = [...source.matchAll(/^\/\/ ─── (.*?) ─+$/gm)].map((m) => m[1]);
  const header = source.slice(0, source.indexOf("*/"));
  const toc = [...header.matchAll(/^ \* +\d+\. (.*)$/gm)].map((m) => m[1]);
  assert.deepEqual(toc, banners);
  const fence = source.indexOf("// ─── Runtime edges");
  assert.ok(fence > 0);
  const core = source.slice(0, fence).split("\n").filter((l) => !/^\s*(\*|\/\/|\/\*\*)/.test(l));
  assert.deepEqual(core.filter((l) => /\b(Deno|Bun)\.[a-zA-Z]/.test(l)), []);
});
