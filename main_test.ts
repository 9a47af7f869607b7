/**
 * dify-openai tests: a fake Dify that emits Dify's exact bytes (bench/fake_dify.ts) on one side,
 * the official openai SDK and raw fetch on the other.
 */
import assert from "node:assert/strict";
import OpenAI from "openai";
import {
  ApiError,
  type AppConfig,
  buildTurn,
  ChatFormat,
  cleanEnvelope,
  ConfigError,
  DenoKvStore,
  difyBase,
  difyError,
  difyFileType,
  fingerprintText,
  isInternalContext,
  LineBatch,
  LineSplitter,
  loadConfig,
  type Message,
  newTranslation,
  parseChatRequest,
  parseSseLine,
  type Store,
  thoughtText,
  workflowAnswer,
} from "./main.ts";
import { type FakeDify, readErrorsJson, readFixture, startFakeDify } from "./bench/fake_dify.ts";
import {
  answerOf,
  assistant,
  type Bridge,
  BrokenStore,
  bunAvailable,
  closedPort,
  fixtureEvents,
  MAIN,
  openai,
  type ProcessBridge,
  rawChat,
  ROOT,
  sleep,
  sseData,
  startBridge,
  startProcess,
  startRig,
  streamText,
  test,
  until,
  usageOf,
  user,
  withBridge,
} from "./bench/test_util.ts";

/** Real OpenClaw 2026.9.6 request bodies (testdata/openclaw-wire). */
const OPENCLAW_WIRE = new URL("./testdata/openclaw-wire/", import.meta.url);

// ─── Configuration ──────────────────────────────────────────────────────────────────────────────

test("config: defaults, DIFY_API_KEY alone routes every model name to one app", () => {
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

test("config: DIFY_APPS takes key strings and objects; DIFY_API_KEY joins as DIFY_MODEL", () => {
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

test("config: invalid values are one-line ConfigErrors", () => {
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

// ─── Wire pieces ────────────────────────────────────────────────────────────────────────────────

test("fingerprint text: every whitespace run is one space, as with /\\s+/, short and long (cached) texts alike", () => {
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

test("request log: lines added in one task are written once, in order, after the task; flush empties it", async () => {
  const writes: string[] = [];
  const batch = new LineBatch((text) => writes.push(text));
  batch.add("a");
  batch.add("b");
  assert.deepEqual(writes, [], "nothing is written while the task that logged is still running");
  await sleep(20);
  assert.deepEqual(writes, ["a\nb"]);
  batch.add("c");
  batch.flush();
  assert.deepEqual(writes, ["a\nb", "c"], "flush (at shutdown) writes what is pending at once");
  await sleep(20);
  assert.deepEqual(writes, ["a\nb", "c"], "a flushed line is not written twice");
});

test("lines: LF, CRLF and lone CR, split anywhere across chunks, unterminated last line", () => {
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

test("lines: parseSseLine reads data JSON in both encodings, pings, and skips the rest", () => {
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

test("chunks: every pre-built chunk is valid JSON with the OpenAI shape", () => {
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

test("parse: ill-typed requests are 400s naming the field", () => {
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

test("errors: Dify's errors keep their meaning", () => {
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

// ─── The bridge over HTTP ───────────────────────────────────────────────────────────────────────

test("bridge: streaming through the openai SDK — content, one id, role first, usage, [DONE]", async () => {
  await withBridge({}, async ({ bridge }) => {
    const { content, usage, chunks } = await streamText(bridge.client(), {
      model: "whatever-name",
      messages: [user("fixture:chat_basic")],
      stream_options: { include_usage: true },
    });
    assert.equal(content, answerOf(await fixtureEvents("chat_basic")));
    assert.deepEqual(usage, usageOf(await fixtureEvents("chat_basic")));
    assert.equal(new Set(chunks.map((c) => c.id)).size, 1);
    assert.ok(chunks.every((c) => c.object === "chat.completion.chunk" && c.model === "whatever-name"));
    const roles = chunks.filter((c) => (c.choices as { delta: { role?: string } }[])[0]?.delta?.role);
    assert.equal(roles.length, 1);
    assert.equal(roles[0], chunks[0]);
    const finishes = chunks.filter((c) => (c.choices as { finish_reason?: string }[])[0]?.finish_reason === "stop");
    assert.equal(finishes.length, 1);
    assert.deepEqual(chunks.at(-1)?.choices, []);
  });
});

test("bridge: raw stream ends with data: [DONE] and carries no usage chunk unless asked", async () => {
  await withBridge({}, async ({ bridge }) => {
    const res = await rawChat(bridge.url, { model: "dify", stream: true, messages: [user("fixture:chat_basic")] });
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type") ?? "", /^text\/event-stream/);
    const data = sseData(res.text);
    assert.equal(data.at(-1), "[DONE]");
    assert.ok(!data.some((d) => typeof d === "object" && d !== null && "usage" in d));
    assert.ok(res.headers.get("x-dify-conversation-id"));
  });
});

test("bridge: stream: false aggregates the same events into one chat.completion", async () => {
  await withBridge({}, async ({ bridge }) => {
    const r = await bridge.client().chat.completions.create({ model: "dify", messages: [user("fixture:chat_basic")] });
    assert.equal(r.object, "chat.completion");
    assert.equal(r.choices.length, 1);
    assert.equal(r.choices[0].message.role, "assistant");
    assert.equal(r.choices[0].message.content, answerOf(await fixtureEvents("chat_basic")));
    assert.equal(r.choices[0].finish_reason, "stop");
    assert.deepEqual(r.usage, usageOf(await fixtureEvents("chat_basic")));
  });
});

test("bridge: old Dify's escaped JSON and new Dify's raw UTF-8 give the same text, split anywhere", async () => {
  const expected = answerOf(await fixtureEvents("unicode_split"));
  assert.ok(/[\u{1F000}-\u{1FFFF}]/u.test(expected));
  for (const sliceBytes of [undefined, 7]) {
    await withBridge({}, async ({ bridge }) => {
      for (const name of ["unicode_split", "unicode_split_legacy"]) {
        const { content } = await streamText(bridge.client(), { model: "dify", messages: [user(`fixture:${name}`)] });
        assert.equal(content, expected, `${name}, slices of ${sliceBytes}`);
      }
    }, { dify: { sliceBytes } });
  }
});

test("bridge: generated streams in legacy encoding, with CRLF line ends and an initial ping", async () => {
  await withBridge({}, async ({ bridge, dify }) => {
    const r = await bridge.client().chat.completions.create({ model: "dify", messages: [user("héllo 😀 wörld")] });
    assert.match(r.choices[0].message.content ?? "", /^Turn 1 of [0-9a-f]{8}: héllo 😀 wörld$/);
    assert.equal(dify.lastBody().query, "héllo 😀 wörld");
  }, { dify: { legacy: true, crlf: true, pingFirst: true } });
});

test("bridge: Dify's ping becomes an SSE comment; other events are skipped", async () => {
  await withBridge({}, async ({ bridge }) => {
    const res = await rawChat(bridge.url, { model: "dify", stream: true, messages: [user("fixture:ping_keepalive")] });
    assert.equal(res.status, 200);
    assert.equal((res.text.match(/^: ping$/gm) ?? []).length, 3);
    const content = sseData(res.text).filter((d) => typeof d === "object")
      .map((d) => ((d as { choices: { delta: { content?: string } }[] }).choices[0]?.delta?.content ?? "")).join("");
    assert.equal(content, answerOf(await fixtureEvents("ping_keepalive")));
    const tts = await streamText(bridge.client(), { model: "dify", messages: [user("fixture:tts_autoplay")] });
    assert.equal(tts.content, answerOf(await fixtureEvents("tts_autoplay")));
  });
});

test("bridge: the query is the new user turn, text parts joined by a blank line", async () => {
  await withBridge({ CONVERSATION_MODE: "off" }, async ({ bridge, dify }) => {
    await bridge.client().chat.completions.create({
      model: "dify",
      user: "alice",
      messages: [
        { role: "system", content: "be brief" },
        user("old question"),
        assistant("old answer"),
        user([{ type: "text", text: "part one" }, { type: "text", text: "part two" }]),
        user("second message"),
      ] as never,
    });
    const body = dify.lastBody();
    assert.equal(body.user, "alice");
    assert.equal(body.response_mode, "streaming");
    assert.match(body.query, /part one\n\npart two\n\nsecond message$/);
    assert.equal(body.inputs.system_prompt, "be brief");
  });
});

test("bridge: an error before any content is an HTTP error the SDK raises", async () => {
  await withBridge({}, async ({ bridge }) => {
    const client = bridge.client();
    for (const stream of [true, false]) {
      await assert.rejects(
        client.chat.completions.create({
          model: "dify",
          stream,
          messages: [user("fault:http_completion_request_error")],
        }),
        (e) => e instanceof OpenAI.APIError && e.status === 400,
      );
      await assert.rejects(
        client.chat.completions.create({
          model: "dify",
          stream,
          messages: [user("fault:http_too_many_requests_concurrency")],
        }),
        (e) => e instanceof OpenAI.APIError && e.status === 429,
      );
      await assert.rejects(
        client.chat.completions.create({ model: "dify", stream, messages: [user("fault:http_internal_server_error")] }),
        (e) => e instanceof OpenAI.APIError && e.status === 502,
      );
    }
  });
});

test("bridge: an error mid-stream is a final error frame, raised by the SDK, after the partial text", async () => {
  await withBridge({}, async ({ bridge }) => {
    const res = await rawChat(bridge.url, { model: "dify", stream: true, messages: [user("fixture:error_midstream")] });
    assert.equal(res.status, 200);
    const data = sseData(res.text);
    const last = data.at(-1) as { error: { message: string; type: string; code: string } };
    assert.equal(last.error.code, "completion_request_error");
    assert.match(last.error.message, /Server Unavailable/);
    assert.ok(!data.includes("[DONE]"));
    const partial = data.slice(0, -1).map((d) =>
      (d as { choices: { delta: { content?: string } }[] }).choices[0].delta.content ?? ""
    )
      .join("");
    assert.equal(partial, answerOf(await fixtureEvents("error_midstream")));
    let seen = "";
    await assert.rejects(async () => {
      const stream = await bridge.client().chat.completions.create({
        model: "dify",
        stream: true,
        messages: [user("fixture:error_midstream")],
      });
      for await (const chunk of stream) seen += chunk.choices[0]?.delta?.content ?? "";
    }, (e) => e instanceof OpenAI.APIError && /Server Unavailable/.test(e.message));
    assert.equal(seen, partial);
  });
});

test("bridge: models list, one model, health, CORS preflight", async () => {
  const dify = await startFakeDify();
  const bridge = await startBridge({
    DIFY_API_URL: dify.url,
    DIFY_APPS: JSON.stringify({ alpha: "app-chat", beta: { key: "app-agent", type: "agent" } }),
  });
  try {
    const client = bridge.client();
    const list = await client.models.list();
    assert.deepEqual(list.data.map((m) => m.id).sort(), ["alpha", "beta"]);
    assert.ok(list.data.every((m) => m.object === "model" && m.owned_by === "dify"));
    assert.equal((await client.models.retrieve("beta")).id, "beta");
    await assert.rejects(client.models.retrieve("gamma"), (e) => e instanceof OpenAI.NotFoundError);
    const health = await fetch(bridge.url.replace("/v1", "/healthz"));
    assert.equal(health.status, 200);
    assert.equal((await health.json()).status, "ok");
    const pre = await fetch(`${bridge.url}/chat/completions`, {
      method: "OPTIONS",
      headers: { origin: "http://x", "access-control-request-method": "POST" },
    });
    await pre.body?.cancel();
    assert.equal(pre.status, 204);
    assert.equal(pre.headers.get("access-control-allow-origin"), "*");
    assert.match(pre.headers.get("access-control-allow-headers") ?? "", /authorization/);
    // With DIFY_APPS, model ids must match exactly.
    await assert.rejects(
      client.chat.completions.create({ model: "gamma", messages: [user("hi")] as never }),
      (e) => e instanceof OpenAI.NotFoundError && (e.error as { code?: string })?.code === "model_not_found",
    );
    const r = await client.chat.completions.create({ model: "alpha", messages: [user("hi")] as never });
    assert.match(r.choices[0].message.content ?? "", /^Turn 1/);
    assert.equal(dify.lastBody("/chat-messages").query, "hi");
  } finally {
    await bridge.close();
    await dify.close();
  }
});

test("bridge: bad requests get OpenAI-shaped errors with the right status", async () => {
  await withBridge({ MAX_BODY_BYTES: "1000" }, async ({ bridge }) => {
    const cases: [number, RequestInit, string][] = [
      [400, { method: "POST", body: "{not json" }, "/chat/completions"],
      [400, { method: "POST", body: JSON.stringify({ messages: [user("x")] }) }, "/chat/completions"],
      [400, { method: "POST", body: JSON.stringify({ model: "m", messages: [assistant("x")] }) }, "/chat/completions"],
      [
        413,
        { method: "POST", body: JSON.stringify({ model: "m", messages: [user("x".repeat(2000))] }) },
        "/chat/completions",
      ],
      [405, { method: "GET" }, "/chat/completions"],
      [404, { method: "GET" }, "/nothing-here"],
    ];
    for (const [status, init, path] of cases) {
      const res = await fetch(bridge.url + path, { ...init, headers: { "content-type": "application/json" } });
      const body = await res.json();
      assert.equal(res.status, status, `${init.method} ${path} ${String(init.body).slice(0, 40)}`);
      assert.equal(typeof body.error.message, "string");
      assert.equal(typeof body.error.type, "string");
      assert.ok("code" in body.error && "param" in body.error);
    }
  });
});

test("bridge: PROXY_API_KEYS guards every route; pass-through keys work only when it is unset", async () => {
  const dify = await startFakeDify();
  const guarded = await startBridge({ DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat", PROXY_API_KEYS: "k1, k2" });
  const open = await startBridge({ DIFY_API_URL: dify.url });
  try {
    for (const key of [undefined, "wrong", "app-chat"]) {
      for (
        const [method, path] of [["GET", "/models"], ["POST", "/chat/completions"], ["DELETE", "/conversations/u"]]
      ) {
        const res = await fetch(guarded.url + path, {
          method,
          headers: key ? { authorization: `Bearer ${key}` } : {},
          body: method === "POST" ? JSON.stringify({ model: "dify", messages: [user("hi")] }) : undefined,
        });
        assert.equal(res.status, 401, `${method} ${path} with ${key}`);
        assert.equal((await res.json()).error.type, "authentication_error");
      }
    }
    const ok = await guarded.client("k2").chat.completions.create({ model: "dify", messages: [user("hi")] as never });
    assert.match(ok.choices[0].message.content ?? "", /^Turn 1/);
    // No configured key: the client's own Dify app key is used, scoped to that client.
    const mine = await open.client("app-agent-mine").chat.completions.create({
      model: "any",
      messages: [user("yo")] as never,
    });
    assert.match(mine.choices[0].message.content ?? "", /yo/);
    assert.equal(dify.requests.at(-1)?.key, "app-agent-mine");
    await assert.rejects(
      open.client("sk-not-dify").chat.completions.create({ model: "any", messages: [user("yo")] as never }),
      (e) => e instanceof OpenAI.AuthenticationError,
    );
    // A rejected pass-through key is the client's to fix: 401, not 502.
    await assert.rejects(
      open.client("app-bad").chat.completions.create({ model: "any", messages: [user("yo")] as never }),
      (e) => e instanceof OpenAI.AuthenticationError,
    );
  } finally {
    await guarded.close();
    await open.close();
    await dify.close();
  }
});

test("bridge: one JSON log line per request, without keys or content unless LOG_CONTENT=1", async () => {
  for (const logContent of ["", "1"]) {
    await withBridge({ PROXY_API_KEYS: "secret-proxy-key", LOG_CONTENT: logContent }, async ({ bridge }) => {
      const client = bridge.client("secret-proxy-key");
      const streamed = await streamText(client, { model: "dify", messages: [user("private words")] });
      const whole = await client.chat.completions.create({ model: "dify", messages: [user("more private words")] });
      const bad = await rawChat(bridge.url, { model: "dify", messages: [] }, {
        authorization: "Bearer secret-proxy-key",
      });
      assert.equal(bad.status, 400);
      assert.equal(bridge.logs.length, 3);
      const entries = bridge.logs.map((l) => JSON.parse(l));
      assert.deepEqual(entries.map((e) => e.status), [200, 200, 400]);
      // Each line carries the id the client saw: the completion id, or X-Request-Id on an error.
      assert.deepEqual(entries.map((e) => e.id), [streamed.chunks[0].id, whole.id, bad.headers.get("x-request-id")]);
      assert.equal(new Set(entries.map((e) => e.id)).size, 3);
      assert.ok(
        entries.slice(0, 2).every((e) => e.model === "dify" && typeof e.ms === "number" && e.prompt_tokens > 0),
      );
      assert.ok(typeof entries[0].ttft_ms === "number");
      const all = bridge.logs.join("\n") + bridge.warnings.join("\n");
      assert.ok(!all.includes("secret-proxy-key"));
      assert.ok(!all.includes("app-chat"));
      assert.equal(all.includes("private words"), logContent === "1");
    });
  }
});

test("bridge: a Dify call that goes silent past UPSTREAM_IDLE_SECONDS ends with an error and stops the task", async () => {
  await withBridge({ UPSTREAM_IDLE_SECONDS: "0.3", KEEPALIVE_SECONDS: "0" }, async ({ bridge, dify }) => {
    const res = await rawChat(bridge.url, {
      model: "dify",
      stream: true,
      user: "ida",
      messages: [user("fault:idle:3000")],
    });
    const last = sseData(res.text).at(-1) as { error: { code: string } };
    assert.equal(last.error.code, "upstream_idle_timeout");
    await until(() => dify.stops.length > 0, 2_000);
    assert.equal(dify.stops.length, 1);
    assert.equal(dify.stops[0].user, "ida");
    assert.equal(dify.stops[0].path, `/chat-messages/${dify.stops[0].taskId}/stop`);
  });
});

// ═══ conversations ══════════════════════════════════════════════════════════════════════════════

// ─── helpers ────────────────────────────────────────────────────────────────────────────────────

type ConvMessage = { role: string; content: unknown };

/** `Turn <n> of <conv8>: …` → n and conv8 (throws on any other answer). */
function convTurnOf(answer: string): { n: number; conv: string } {
  const m = /^Turn (\d+) of ([0-9a-f]{8}):/.exec(answer);
  assert.ok(m, `not a fake Dify chat answer: ${JSON.stringify(answer.slice(0, 120))}`);
  return { n: Number(m[1]), conv: m[2] };
}

interface ConvAnswer {
  content: string;
  /** The response header X-Dify-Conversation-Id. */
  conversationId: string | null;
}

/** One chat completion through the SDK, streaming or not, with the conversation header. */
async function convAsk(
  client: OpenAI,
  messages: ConvMessage[],
  opts: { stream?: boolean; extra?: Record<string, unknown>; headers?: Record<string, string> } = {},
): Promise<ConvAnswer> {
  const body = { model: "dify", messages, ...opts.extra } as Record<string, unknown>;
  const options = opts.headers ? { headers: opts.headers } : undefined;
  if (!opts.stream) {
    const { data, response } = await client.chat.completions.create(body as never, options).withResponse();
    const completion = data as unknown as { choices: { message: { content: string } }[] };
    return {
      content: completion.choices[0].message.content,
      conversationId: response.headers.get("x-dify-conversation-id"),
    };
  }
  const { data, response } = await client.chat.completions.create({ ...body, stream: true } as never, options)
    .withResponse();
  let content = "";
  for await (const chunk of data as unknown as AsyncIterable<{ choices: { delta?: { content?: string } }[] }>) {
    for (const c of chunk.choices) content += c.delta?.content ?? "";
  }
  return { content, conversationId: response.headers.get("x-dify-conversation-id") };
}

/** A client-side chat that resends its whole history each turn, as OpenAI clients do. */
class ConvChat {
  messages: ConvMessage[] = [];
  constructor(
    private client: OpenAI,
    private opts: { stream?: boolean; extra?: Record<string, unknown>; system?: string } = {},
  ) {
    if (opts.system) this.messages.push({ role: "system", content: opts.system });
  }
  async say(text: string, extra: Record<string, unknown> = {}): Promise<ConvAnswer> {
    this.messages.push(user(text));
    const answer = await convAsk(this.client, this.messages, {
      stream: this.opts.stream,
      extra: { ...this.opts.extra, ...extra },
    });
    this.messages.push(assistant(answer.content));
    return answer;
  }
}

/** Which fake Dify conversation holds a turn whose query includes `text`. */
function convHolding(fake: FakeDify, text: string): string[] {
  return [...fake.conversations.values()].filter((c) => c.turns.some((t) => t.query.includes(text))).map((c) => c.id);
}

/** Deno KV on a fresh temporary file, for restarts and scale-out. */
async function convTempKv(): Promise<{ path: string; remove(): Promise<void> }> {
  const dir = await Deno.makeTempDir({ prefix: "conv_kv_" });
  return { path: `${dir}/conversations.kv`, remove: () => Deno.remove(dir, { recursive: true }).catch(() => {}) };
}

/** Waits until the KV file holds `turns` history fingerprints (each is written after its turn's head). */
async function convDurable(path: string, turns: number): Promise<void> {
  const kv = await Deno.openKv(path);
  try {
    for (const deadline = Date.now() + 10_000; Date.now() < deadline; await sleep(5)) {
      let n = 0;
      for await (const _ of kv.list({ prefix: ["fp"] })) n++;
      if (n >= turns) return;
    }
    throw new Error(`the KV file never got ${turns} fingerprints`);
  } finally {
    kv.close();
  }
}

/** Runs a three-turn chat and checks every turn continued one Dify conversation with only the new text. */
async function convThreeTurns(stream: boolean) {
  const rig = await startRig();
  try {
    const chat = new ConvChat(rig.client, { stream, extra: { user: "alice" } });
    const a1 = await chat.say("first question");
    const a2 = await chat.say("second question");
    const a3 = await chat.say("third question");
    const t = [a1, a2, a3].map((a) => convTurnOf(a.content));
    assert.deepEqual(t.map((x) => x.n), [1, 2, 3]);
    assert.equal(new Set(t.map((x) => x.conv)).size, 1, "all three turns in one Dify conversation");
    for (const a of [a1, a2, a3]) {
      assert.ok(a.conversationId, "X-Dify-Conversation-Id is set");
      assert.ok(a.conversationId.startsWith(t[0].conv));
    }
    const bodies = rig.fake.generateBodies();
    assert.deepEqual(bodies.map((b) => b.query), ["first question", "second question", "third question"]);
    assert.deepEqual(bodies.map((b) => b.conversation_id), ["", a1.conversationId, a1.conversationId]);
    assert.deepEqual(bodies.map((b) => b.user), ["alice", "alice", "alice"]);
    assert.equal(rig.fake.conversations.size, 1);
  } finally {
    await rig.close();
  }
}

// ─── history mode: continuation ─────────────────────────────────────────────────────────────────

test("conversations: a three-turn chat (non-streaming) continues one Dify conversation", () => convThreeTurns(false));

test("conversations: a three-turn chat (streaming) continues one Dify conversation", () => convThreeTurns(true));

test("conversations: eight chats in parallel never cross-talk", async () => {
  const rig = await startRig();
  try {
    const chats = Array.from({ length: 8 }, (_, i) => new ConvChat(rig.client, { stream: i % 2 === 0 }));
    const convs: string[][] = chats.map(() => []);
    for (let turn = 1; turn <= 3; turn++) {
      const answers = await Promise.all(chats.map((c, i) => c.say(`chat ${i} message ${turn}`)));
      answers.forEach((a, i) => {
        const t = convTurnOf(a.content);
        assert.equal(t.n, turn, `chat ${i} turn ${turn}: ${a.content}`);
        assert.ok(a.content.endsWith(`chat ${i} message ${turn}`));
        convs[i].push(t.conv);
      });
    }
    for (const c of convs) assert.equal(new Set(c).size, 1, "one Dify conversation per chat");
    assert.equal(new Set(convs.map((c) => c[0])).size, 8, "eight different Dify conversations");
    assert.equal(rig.fake.conversations.size, 8);
    for (const conv of rig.fake.conversations.values()) {
      const owner = /^chat (\d+) /.exec(conv.turns[0].query)![1];
      assert.deepEqual(conv.turns.map((t) => t.query), [1, 2, 3].map((n) => `chat ${owner} message ${n}`));
    }
  } finally {
    await rig.close();
  }
});

test("conversations: two new chats with the same user stay separate", async () => {
  const rig = await startRig();
  try {
    const a = new ConvChat(rig.client, { extra: { user: "same-person" } });
    const b = new ConvChat(rig.client, { extra: { user: "same-person" } });
    const a1 = convTurnOf((await a.say("hello")).content);
    const b1 = convTurnOf((await b.say("hello")).content);
    assert.equal(a1.n, 1);
    assert.equal(b1.n, 1);
    assert.notEqual(a1.conv, b1.conv, "a new chat never joins another chat of the same user");
    const b2 = convTurnOf((await b.say("b again")).content);
    const a2 = convTurnOf((await a.say("a again")).content);
    assert.deepEqual([a2.n, a2.conv], [2, a1.conv]);
    assert.deepEqual([b2.n, b2.conv], [2, b1.conv]);
  } finally {
    await rig.close();
  }
});

test("conversations: a continued turn sends Dify only the new message, system prompt and history stay out", async () => {
  const rig = await startRig();
  try {
    const chat = new ConvChat(rig.client, { system: "You are terse." });
    await chat.say("what is 2+2?");
    // Two user messages after the last assistant message: both are the new turn.
    chat.messages.push(user("and also"));
    await chat.say("what is 3+3?");
    const [first, second] = rig.fake.generateBodies();
    assert.equal(first.conversation_id, "");
    assert.equal(second.conversation_id, rig.fake.conversations.keys().next().value);
    assert.equal(second.query, "and also\n\nwhat is 3+3?");
    assert.ok(!second.query.includes("2+2"), "no history resent");
    assert.ok(!second.query.includes("terse"), "no system prompt resent in the query");
  } finally {
    await rig.close();
  }
});

test("conversations: the Dify user stays the one the conversation started with, even if `user` changes", async () => {
  const rig = await startRig({ DEFAULT_USER: "fallback-user" });
  try {
    const chat = new ConvChat(rig.client);
    await chat.say("one", { user: "alice" });
    const a2 = await chat.say("two", { user: "mallory" });
    const a3 = await chat.say("three");
    assert.deepEqual([convTurnOf(a2.content).n, convTurnOf(a3.content).n], [2, 3]);
    assert.deepEqual(rig.fake.generateBodies().map((b) => b.user), ["alice", "alice", "alice"]);
    // Without any user, the default user is used throughout.
    const other = new ConvChat(rig.client, { stream: true });
    await other.say("x");
    await other.say("y");
    assert.deepEqual(rig.fake.generateBodies().slice(3).map((b) => b.user), ["fallback-user", "fallback-user"]);
  } finally {
    await rig.close();
  }
});

test("conversations: the response header X-Dify-Conversation-Id names the Dify conversation", async () => {
  const rig = await startRig();
  try {
    for (const stream of [false, true]) {
      const res = await rawChat(rig.bridge.url, { model: "dify", messages: [user(`header ${stream}`)], stream });
      assert.equal(res.status, 200);
      const id = res.headers.get("x-dify-conversation-id");
      assert.ok(id && rig.fake.conversations.has(id), `header ${id} is a Dify conversation`);
      const content = stream
        ? sseData(res.text).filter((d) => d !== "[DONE]").map((d) =>
          ((d as { choices: { delta: { content?: string } }[] }).choices[0]?.delta.content) ?? ""
        ).join("")
        : JSON.parse(res.text).choices[0].message.content;
      assert.equal(convTurnOf(content).conv, id.slice(0, 8));
      assert.match(res.headers.get("access-control-expose-headers") ?? "", /x-dify-conversation-id/);
    }
  } finally {
    await rig.close();
  }
});

// ─── branching: regenerate, identical first exchanges, changed system prompt ────────────────────

test("conversations: regenerate branches into a new Dify conversation with the history replayed", async () => {
  const rig = await startRig();
  try {
    const chat = new ConvChat(rig.client);
    const a1 = await chat.say("tell me a story");
    const a2 = await chat.say("make it longer");
    const original = convTurnOf(a2.content);
    assert.equal(original.n, 2);
    // Regenerate: the same history as turn 2 is sent again.
    const resent = chat.messages.slice(0, -1);
    const again = await convAsk(rig.client, resent);
    const regen = convTurnOf(again.content);
    assert.equal(regen.n, 1, "a regenerate starts a new Dify conversation");
    assert.notEqual(regen.conv, original.conv);
    const replay = rig.fake.lastBody().query as string;
    assert.equal(rig.fake.lastBody().conversation_id, "");
    assert.ok(replay.includes("tell me a story") && replay.includes(a1.content), "history replayed");
    assert.ok(replay.endsWith("make it longer"));
    // The original conversation saw exactly its two turns.
    const originalConv = [...rig.fake.conversations.values()].find((c) => c.id.startsWith(original.conv))!;
    assert.deepEqual(originalConv.turns.map((t) => t.query), ["tell me a story", "make it longer"]);
    // Both branches continue their own conversation.
    const branch = [...resent, assistant(again.content), user("branch goes on")];
    const b3 = convTurnOf((await convAsk(rig.client, branch)).content);
    assert.deepEqual([b3.n, b3.conv], [2, regen.conv]);
    const o3 = convTurnOf((await chat.say("original goes on")).content);
    assert.deepEqual([o3.n, o3.conv], [3, original.conv]);
  } finally {
    await rig.close();
  }
});

test("conversations: two chats with an identical first exchange each get their own Dify memory", async () => {
  const rig = await startRig();
  try {
    // `fault:huge_line:24` makes the fake answer 24 × "x" in a real conversation: both chats get
    // byte-identical first exchanges, like "hi" → "Hello! How can I help?".
    const a = new ConvChat(rig.client);
    const b = new ConvChat(rig.client, { stream: true });
    const first = "hi fault:huge_line:24";
    const a1 = await a.say(first);
    const b1 = await b.say(first);
    assert.equal(a1.content, "x".repeat(24));
    assert.equal(b1.content, a1.content);
    assert.notEqual(a1.conversationId, b1.conversationId);
    const a2 = await a.say("only in chat A");
    const b2 = await b.say("only in chat B");
    assert.notEqual(a2.conversationId, b2.conversationId, "the second turns land in different conversations");
    const a3 = await a.say("A goes on");
    const b3 = await b.say("B goes on");
    assert.equal(a3.conversationId, a2.conversationId, "chat A continues its conversation");
    assert.equal(b3.conversationId, b2.conversationId, "chat B continues its conversation");
    assert.deepEqual([convTurnOf(a3.content).n, convTurnOf(b3.content).n].map((n) => n >= 2), [true, true]);
    for (const conv of rig.fake.conversations.values()) {
      const text = conv.turns.map((t) => t.query).join("\n");
      assert.ok(!(text.includes("chat A") && text.includes("chat B")), "no Dify conversation holds both chats");
      assert.ok(!(text.includes("A goes") && text.includes("B goes")));
    }
    assert.deepEqual(convHolding(rig.fake, "A goes on"), [a3.conversationId]);
    assert.deepEqual(convHolding(rig.fake, "B goes on"), [b3.conversationId]);
  } finally {
    await rig.close();
  }
});

test("conversations: chats sharing a first exchange write side by side; their second turns, sent at once, stay apart", async () => {
  // One fingerprint key for all of them: written one after another, a busy server's writes fall
  // further and further behind (seen in the benchmark: 1,400 waiting after 8 s).
  let inFlight = 0;
  let most = 0;
  const slow = new ConvSlowStore(new DenoKvStore(await Deno.openKv(":memory:")), () => 50);
  const setIf = slow.setIf.bind(slow);
  slow.setIf = async (...args) => {
    most = Math.max(most, ++inFlight);
    try {
      return await setIf(...args);
    } finally {
      inFlight--;
    }
  };
  const rig = await startRig({}, { store: slow });
  try {
    const chats = Array.from({ length: 6 }, (_, i) => new ConvChat(rig.client, { stream: i % 2 === 0 }));
    const firsts = await Promise.all(chats.map((c) => c.say("hi fault:huge_line:24")));
    assert.ok(firsts.every((a) => a.content === "x".repeat(24)), "identical first exchanges");
    await until(() => inFlight === 0 && most > 0, 2000, "the first turns' writes");
    assert.equal(most, chats.length, "every chat's write was in flight at once");
    const seconds = await Promise.all(chats.map((c, i) => c.say(`only in chat ${i}`)));
    assert.equal(new Set(seconds.map((a) => a.conversationId)).size, chats.length, "each chat has its own memory");
  } finally {
    await rig.close();
  }
});

test("conversations: a changed system prompt starts a new conversation, never an error", async () => {
  const rig = await startRig();
  try {
    const chat = new ConvChat(rig.client, { system: "Current date: 2026-11-24" });
    const a1 = convTurnOf((await chat.say("remember the number 7")).content);
    chat.messages[0] = { role: "system", content: "Current date: 2026-11-25" };
    const a2 = convTurnOf((await chat.say("which number?")).content);
    assert.equal(a2.n, 1);
    assert.notEqual(a2.conv, a1.conv);
    const body = rig.fake.lastBody();
    assert.equal(body.conversation_id, "");
    assert.ok(body.query.startsWith("Current date: 2026-11-25"), "the new system prompt leads the first query");
    assert.ok(body.query.includes("remember the number 7"), "history replayed");
    assert.equal(body.inputs.system_prompt, "Current date: 2026-11-25");
    const a3 = convTurnOf((await chat.say("and now?")).content);
    assert.deepEqual([a3.n, a3.conv], [2, a2.conv]);
  } finally {
    await rig.close();
  }
});

// ─── system prompt modes ────────────────────────────────────────────────────────────────────────

for (const mode of ["prepend", "inputs", "drop"] as const) {
  Deno.test({
    name: `conversations: SYSTEM_PROMPT=${mode} decides what reaches inputs.system_prompt and the first query`,
    sanitizeResources: false,
    sanitizeOps: false,
    async fn() {
      const rig = await startRig({ SYSTEM_PROMPT: mode });
      try {
        const chat = new ConvChat(rig.client, { system: "Speak like a pirate." });
        await chat.say("hello there");
        await chat.say("again");
        const [first, second] = rig.fake.generateBodies();
        if (mode === "prepend") assert.equal(first.query, "Speak like a pirate.\n\nhello there");
        else assert.equal(first.query, "hello there");
        assert.equal(second.query, "again");
        for (const body of [first, second]) {
          if (mode === "drop") assert.ok(!("system_prompt" in body.inputs), "no system_prompt input");
          else assert.equal(body.inputs.system_prompt, "Speak like a pirate.");
        }
        assert.equal(first.conversation_id, "");
        assert.ok(rig.fake.conversations.has(second.conversation_id), "turn 2 continues the conversation");
      } finally {
        await rig.close();
      }
    },
  });
}

// ─── Dify forgets; restarts; scale-out ──────────────────────────────────────────────────────────

test("conversations: when Dify forgets the conversation, the next turn replays the history and carries on", async () => {
  const rig = await startRig();
  try {
    const chat = new ConvChat(rig.client, { stream: true, extra: { user: "alice" } });
    const a1 = await chat.say("my name is Ada");
    const a2 = await chat.say("I like tea");
    const old = convTurnOf(a2.content);
    assert.equal(old.n, 2);
    rig.fake.forgetAll();
    const before = rig.fake.generateBodies().length;
    const a3 = await chat.say("what do I like?");
    const recovered = convTurnOf(a3.content);
    assert.equal(recovered.n, 1);
    assert.notEqual(recovered.conv, old.conv);
    const [lost, replay] = rig.fake.generateBodies().slice(before);
    assert.equal(lost.conversation_id, a1.conversationId, "first tried the known conversation");
    assert.equal(lost.query, "what do I like?");
    assert.equal(replay.conversation_id, "");
    assert.equal(replay.user, "alice");
    for (const part of ["my name is Ada", a1.content, "I like tea", a2.content]) {
      assert.ok(replay.query.includes(part), `replayed history holds ${JSON.stringify(part)}`);
    }
    assert.ok(replay.query.endsWith("what do I like?"));
    assert.equal(a3.conversationId?.slice(0, 8), recovered.conv);
    assert.ok(rig.bridge.logs.some((l) => JSON.parse(l).recovered === true));
    // The new mapping was stored: the next turn continues the new conversation with only its text.
    const a4 = convTurnOf((await chat.say("and my name?")).content);
    assert.deepEqual([a4.n, a4.conv], [2, recovered.conv]);
    const last = rig.fake.lastBody();
    assert.equal(last.query, "and my name?");
    assert.equal(last.conversation_id, a3.conversationId);
  } finally {
    await rig.close();
  }
});

test("conversations: a bridge restarted on the same KV file continues the chat", async () => {
  const fake = await startFakeDify();
  const kv = await convTempKv();
  const env = { DIFY_API_URL: fake.url, DIFY_API_KEY: "app-chat", KV_PATH: kv.path };
  let bridge: Bridge | undefined;
  try {
    bridge = await startBridge(env);
    const chat = new ConvChat(bridge.client());
    const a1 = convTurnOf((await chat.say("before the restart")).content);
    await bridge.close();
    bridge = undefined;
    bridge = await startBridge(env);
    const chat2 = new ConvChat(bridge.client());
    chat2.messages = chat.messages;
    const a2 = convTurnOf((await chat2.say("after the restart")).content);
    assert.deepEqual([a2.n, a2.conv], [2, a1.conv]);
    assert.equal(fake.lastBody().query, "after the restart");
    const a3 = convTurnOf((await chat2.say("still going")).content);
    assert.deepEqual([a3.n, a3.conv], [3, a1.conv]);
  } finally {
    await bridge?.close();
    await fake.close();
    await kv.remove();
  }
});

test("conversations: a second bridge and a second process on the same KV file continue the chat", async () => {
  const fake = await startFakeDify();
  const kv = await convTempKv();
  const env = { DIFY_API_URL: fake.url, DIFY_API_KEY: "app-chat", KV_PATH: kv.path };
  const bridges: Bridge[] = [];
  let proc: Awaited<ReturnType<typeof startProcess>> | undefined;
  try {
    bridges.push(await startBridge(env), await startBridge(env));
    proc = await startProcess("deno", env);
    const one = new ConvChat(bridges[0].client(), { extra: { user: "scale" } });
    const a1 = convTurnOf((await one.say("on the first bridge")).content);
    // Across processes a mapping is there once its KV write commits (the answer does not wait for it).
    await convDurable(kv.path, 1);
    const two = new ConvChat(bridges[1].client(), { stream: true });
    two.messages = one.messages;
    const a2 = convTurnOf((await two.say("on the second bridge")).content);
    assert.deepEqual([a2.n, a2.conv], [2, a1.conv]);
    await convDurable(kv.path, 2);
    const three = new ConvChat(new OpenAI({ baseURL: proc.url, apiKey: "sk-test", maxRetries: 0 }));
    three.messages = one.messages;
    const a3 = convTurnOf((await three.say("on the subprocess")).content);
    assert.deepEqual([a3.n, a3.conv], [3, a1.conv]);
    await convDurable(kv.path, 3);
    const a4 = convTurnOf((await one.say("back on the first bridge")).content);
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

// ─── session headers and explicit ids ───────────────────────────────────────────────────────────

test("conversations: session ids (X-Session-Id, prompt_cache_key, X-OpenWebUI-Chat-Id, metadata.chat_id)", async () => {
  const rig = await startRig();
  try {
    const ways: [string, (id: string) => { extra?: Record<string, unknown>; headers?: Record<string, string> }][] = [
      ["X-Session-Id", (id) => ({ headers: { "X-Session-Id": id } })],
      ["prompt_cache_key", (id) => ({ extra: { prompt_cache_key: id } })],
      ["X-OpenWebUI-Chat-Id", (id) => ({ headers: { "X-OpenWebUI-Chat-Id": id } })],
      ["metadata.chat_id", (id) => ({ extra: { metadata: { chat_id: id } } })],
    ];
    for (const [name, how] of ways) {
      // Each request carries only its own new message: the session id alone links the turns.
      const ask = (id: string, text: string, stream = false) =>
        convAsk(rig.client, [user(text)], { stream, ...how(id) });
      const s1 = convTurnOf((await ask(`${name}-1`, "first")).content);
      const s2 = convTurnOf((await ask(`${name}-1`, "second", true)).content);
      const other = convTurnOf((await ask(`${name}-2`, "first")).content);
      assert.equal(s1.n, 1, name);
      assert.deepEqual([s2.n, s2.conv], [2, s1.conv], `${name}: same session continues`);
      assert.equal(other.n, 1, `${name}: another session is another conversation`);
      assert.notEqual(other.conv, s1.conv);
      assert.equal(rig.fake.lastBody().query, "first");
      assert.equal(JSON.parse(rig.bridge.logs.at(-1)!).conversation_via, "new");
      const s3 = await ask(`${name}-1`, "third");
      assert.deepEqual(convTurnOf(s3.content).n, 3);
      assert.equal(JSON.parse(rig.bridge.logs.at(-1)!).conversation_via, "session");
    }
    // A plain request without a session id or history is a new chat.
    assert.equal(convTurnOf((await convAsk(rig.client, [user("first")])).content).n, 1);
  } finally {
    await rig.close();
  }
});

test("conversations: explicit ids (body conversation_id, header X-Dify-Conversation-Id); unknown id → 404", async () => {
  const rig = await startRig();
  try {
    const start = await convAsk(rig.client, [user("start")], { extra: { user: "alice" } });
    const id = start.conversationId!;
    assert.ok(rig.fake.conversations.has(id));
    // Used as given, with the user the conversation belongs to (the request names none).
    const viaBody = await convAsk(rig.client, [user("by body")], { extra: { conversation_id: id } });
    assert.deepEqual(convTurnOf(viaBody.content), { n: 2, conv: id.slice(0, 8) });
    assert.equal(viaBody.conversationId, id);
    const viaHeader = await convAsk(rig.client, [user("by header")], {
      stream: true,
      headers: { "X-Dify-Conversation-Id": id },
    });
    assert.deepEqual(convTurnOf(viaHeader.content), { n: 3, conv: id.slice(0, 8) });
    const bodies = rig.fake.generateBodies();
    assert.deepEqual(bodies.map((b) => b.user), ["alice", "alice", "alice"]);
    assert.deepEqual(bodies.map((b) => b.query), ["start", "by body", "by header"]);
    assert.equal(JSON.parse(rig.bridge.logs.at(-1)!).conversation_via, "explicit");
    // An explicit id Dify does not know is an error, not a silent new conversation.
    const conversations = rig.fake.conversations.size;
    const unknown = crypto.randomUUID();
    const ways: [Record<string, unknown>, Record<string, string>][] = [
      [{ conversation_id: unknown }, {}],
      [{}, { "x-dify-conversation-id": unknown }],
    ];
    for (const [extra, headers] of ways) {
      const res = await rawChat(rig.bridge.url, { model: "dify", messages: [user("lost")], ...extra }, headers);
      assert.equal(res.status, 404, res.text);
      assert.equal(JSON.parse(res.text).error.code, "conversation_not_found");
    }
    await assert.rejects(
      () => convAsk(rig.client, [user("lost")], { stream: true, extra: { conversation_id: unknown } }),
      (e: unknown) => e instanceof OpenAI.APIError && e.status === 404,
    );
    assert.equal(rig.fake.conversations.size, conversations, "no conversation was created");
  } finally {
    await rig.close();
  }
});

// ─── user mode, off mode ────────────────────────────────────────────────────────────────────────

test("conversations: CONVERSATION_MODE=user keeps one conversation per user; DELETE clears only that one", async () => {
  const rig = await startRig({ CONVERSATION_MODE: "user" });
  try {
    const ask = (who: string, text: string, stream = false) =>
      convAsk(rig.client, [user(text)], { stream, extra: { user: who } });
    const b1 = convTurnOf((await ask("bob", "b1")).content);
    const c1 = convTurnOf((await ask("carol", "c1", true)).content);
    assert.notEqual(b1.conv, c1.conv);
    const b2 = convTurnOf((await ask("bob", "b2", true)).content);
    assert.deepEqual([b2.n, b2.conv], [2, b1.conv]);
    const del = await fetch(`${rig.bridge.url}/conversations/bob`, {
      method: "DELETE",
      headers: { authorization: "Bearer sk-test" },
    });
    assert.equal(del.status, 200);
    assert.equal((await del.json()).deleted, true);
    const b3 = convTurnOf((await ask("bob", "b3")).content);
    assert.equal(b3.n, 1, "bob starts over after DELETE");
    assert.notEqual(b3.conv, b1.conv);
    const c2 = convTurnOf((await ask("carol", "c2")).content);
    assert.deepEqual([c2.n, c2.conv], [2, c1.conv], "carol is untouched");
    const b4 = convTurnOf((await ask("bob", "b4")).content);
    assert.deepEqual([b4.n, b4.conv], [2, b3.conv]);
  } finally {
    await rig.close();
  }
});

test("conversations: DELETE /v1/conversations/{user} needs the client's key and touches only its own mappings", async () => {
  const rig = await startRig({ CONVERSATION_MODE: "user", PROXY_API_KEYS: "key-one,key-two" });
  try {
    const one = rig.bridge.client("key-one");
    const ask = async (text: string) =>
      convTurnOf((await convAsk(one, [user(text)], { extra: { user: "dave" } })).content);
    const del = async (key: string) => {
      const res = await fetch(`${rig.bridge.url}/conversations/dave`, {
        method: "DELETE",
        headers: { authorization: `Bearer ${key}` },
      });
      await res.body?.cancel();
      return res.status;
    };
    const first = await ask("d1");
    assert.equal(await del("wrong-key"), 401);
    assert.deepEqual(await ask("d2"), { n: 2, conv: first.conv }, "a wrong key deletes nothing");
    assert.equal(await del("key-two"), 200);
    assert.deepEqual(await ask("d3"), { n: 3, conv: first.conv }, "another client's DELETE touches nothing");
    assert.equal(await del("key-one"), 200);
    const fresh = await ask("d4");
    assert.equal(fresh.n, 1);
    assert.notEqual(fresh.conv, first.conv);
  } finally {
    await rig.close();
  }
});

test("conversations: CONVERSATION_MODE=off makes every request a new conversation with the history replayed", async () => {
  const rig = await startRig({ CONVERSATION_MODE: "off" });
  try {
    const chat = new ConvChat(rig.client, { extra: { user: "erin" } });
    const answers = [await chat.say("one"), await chat.say("two"), await chat.say("three")];
    const turns = answers.map((a) => convTurnOf(a.content));
    assert.deepEqual(turns.map((t) => t.n), [1, 1, 1]);
    assert.equal(new Set(turns.map((t) => t.conv)).size, 3);
    const bodies = rig.fake.generateBodies();
    assert.deepEqual(bodies.map((b) => b.conversation_id), ["", "", ""]);
    assert.ok(bodies[2].query.includes("one") && bodies[2].query.includes(answers[1].content));
  } finally {
    await rig.close();
  }
});

// ─── client identity ────────────────────────────────────────────────────────────────────────────

test("conversations: two clients with identical messages and the same user never share a conversation", async () => {
  const rig = await startRig();
  try {
    // Identical answers (fault:huge_line) make the two clients' requests byte-identical.
    const a = new ConvChat(rig.bridge.client("sk-client-a"), { extra: { user: "shared" } });
    const b = new ConvChat(rig.bridge.client("sk-client-b"), { extra: { user: "shared" } });
    const a1 = await a.say("hi fault:huge_line:16");
    const b1 = await b.say("hi fault:huge_line:16");
    assert.equal(a1.content, b1.content);
    assert.deepEqual(a.messages, b.messages);
    assert.notEqual(a1.conversationId, b1.conversationId);
    const a2 = await a.say("next");
    const b2 = await b.say("next");
    assert.equal(a2.conversationId, a1.conversationId, "client A continues its own conversation");
    assert.equal(b2.conversationId, b1.conversationId, "client B continues its own conversation");
    assert.equal(convTurnOf(a2.content).n, 2);
    assert.equal(convTurnOf(b2.content).n, 2);
  } finally {
    await rig.close();
  }
});

test("conversations: two models on the same Dify app never share a conversation", async () => {
  const rig = await startRig({ DIFY_APPS: JSON.stringify({ one: "app-chat", two: "app-chat" }) });
  try {
    const messages: ConvMessage[] = [user("hello")];
    const a1 = await convAsk(rig.client, messages, { extra: { model: "one" } });
    messages.push(assistant(a1.content), user("next"));
    const b = await convAsk(rig.client, messages, { extra: { model: "two" } });
    assert.equal(convTurnOf(b.content).n, 1, "model two starts its own conversation");
    assert.notEqual(b.conversationId, a1.conversationId);
    const a2 = await convAsk(rig.client, messages, { extra: { model: "one" } });
    assert.deepEqual(convTurnOf(a2.content).n, 2);
    assert.equal(a2.conversationId, a1.conversationId);
  } finally {
    await rig.close();
  }
});

// ─── the write-through cache and a broken store ─────────────────────────────────────────────────

test("conversations: Deno KV writes that arrive together commit together, each with its own check, in order", async () => {
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

/** Deno KV whose durable writes land late, like a slow or remote KV: write n waits `delayMs(n)`. */
class ConvSlowStore implements Store {
  writes = 0;
  constructor(private inner: Store, private delayMs: (n: number, op: string) => number) {}
  private wait(op = "set") {
    return sleep(this.delayMs(this.writes++, op));
  }
  get<T>(key: string[]) {
    return this.inner.get<T>(key);
  }
  async set(key: string[], value: unknown, ttlMs: number) {
    await this.wait();
    await this.inner.set(key, value, ttlMs);
  }
  async setIf(key: string[], expected: unknown, value: unknown, ttlMs: number, also?: [string[], unknown][]) {
    await this.wait();
    return await this.inner.setIf(key, expected, value, ttlMs, also);
  }
  async delete(key: string[]) {
    await this.wait("delete");
    await this.inner.delete(key);
  }
  close() {
    this.inner.close();
  }
}

test("conversations: a turn sent the instant the previous stream ends continues (write-through cache)", async () => {
  const stores: [string, number, (n: number) => number][] = [
    ["Deno KV", 0, () => 0],
    ["every write 100 ms late", 100, () => 100],
    // Turn 2 is answered before turn 1's head is durable: its check-and-set must still see it,
    // or turn 2's mapping is never stored and a later turn starts over.
    ["each chat's first write 300 ms late", 300, (n) => n % 1000 === 0 ? 300 : 0],
  ];
  for (const [what, late, delay] of stores) {
    const kv = new DenoKvStore(await Deno.openKv(":memory:"));
    const slow = new ConvSlowStore(kv, delay);
    const rig = await startRig({}, { store: slow });
    try {
      for (const stream of [true, false]) {
        slow.writes = 0;
        const chat = new ConvChat(rig.client, { stream });
        const turns = [];
        for (let i = 1; i <= 4; i++) turns.push(convTurnOf((await chat.say(`instant ${i}`)).content));
        // A later turn, once every late write has landed.
        await sleep(late + 50);
        turns.push(convTurnOf((await chat.say("later")).content));
        assert.deepEqual(turns.map((t) => t.n), [1, 2, 3, 4, 5], `${what}, stream ${stream}`);
        assert.equal(new Set(turns.map((t) => t.conv)).size, 1);
      }
    } finally {
      await rig.close();
    }
  }
});

test("conversations: DELETE right after an answer is not undone by that answer's late mapping write", async () => {
  const kv = new DenoKvStore(await Deno.openKv(":memory:"));
  // Mapping writes take 100 ms to land; deletes land at once.
  const slow = new ConvSlowStore(kv, (_n, op) => op === "delete" ? 0 : 100);
  const rig = await startRig({ CONVERSATION_MODE: "user" }, { store: slow });
  try {
    const ask = async (text: string) =>
      convTurnOf((await convAsk(rig.client, [user(text)], { stream: true, extra: { user: "fay" } })).content);
    const first = await ask("f1");
    const del = await fetch(`${rig.bridge.url}/conversations/fay`, {
      method: "DELETE",
      headers: { authorization: "Bearer sk-test" },
    });
    assert.equal(del.status, 200);
    await del.body?.cancel();
    await sleep(200);
    const next = await ask("f2");
    assert.equal(next.n, 1, "the deleted conversation stays deleted");
    assert.notEqual(next.conv, first.conv);
  } finally {
    await rig.close();
  }
});

for (const sync of [false, true]) {
  Deno.test({
    name: `conversations: a store that ${
      sync ? "throws" : "rejects"
    } on every call still answers, warning once per kind`,
    sanitizeResources: false,
    sanitizeOps: false,
    async fn() {
      for (const mode of ["history", "user"]) {
        const store = new BrokenStore(sync);
        const rig = await startRig({ CONVERSATION_MODE: mode }, { store });
        try {
          const run = async () => {
            const chat = new ConvChat(rig.client, { extra: { user: "u" } });
            const s = new ConvChat(rig.client, { stream: true });
            const answers = [
              await chat.say("one"),
              await chat.say("two"),
              await s.say("three"),
              await s.say("four"),
              await convAsk(rig.client, [user("five")], { headers: { "X-Session-Id": "sess" } }),
              await convAsk(rig.client, [user("six")], { stream: true, headers: { "X-Session-Id": "sess" } }),
            ];
            for (const a of answers) assert.equal(convTurnOf(a.content).n, 1, "a new conversation each time");
            const del = await fetch(`${rig.bridge.url}/conversations/u`, { method: "DELETE" });
            await del.body?.cancel();
            assert.equal(del.status, 200);
          };
          await run();
          // Let the unawaited writes fail, then count the warnings.
          await sleep(20);
          const warnings = rig.bridge.warnings.length;
          assert.ok(warnings >= 2 && warnings <= 3, `one warning per failure kind: ${rig.bridge.warnings.join(" | ")}`);
          for (const kind of ["read", "write", "delete"]) {
            assert.ok(rig.bridge.warnings.filter((w) => w.includes(`store ${kind}:`)).length <= 1, kind);
          }
          assert.ok(rig.bridge.warnings.some((w) => w.includes("store read:")));
          assert.ok(rig.bridge.warnings.some((w) => w.includes("store write:")));
          const calls = store.calls;
          await run();
          await sleep(20);
          assert.ok(store.calls > calls, "the store is still tried");
          assert.equal(rig.bridge.warnings.length, warnings, "no new warnings for the same failures");
        } finally {
          await rig.close();
        }
      }
    },
  });
}

// ─── OpenClaw ───────────────────────────────────────────────────────────────────────────────────

async function convOpenClaw(prefix: "telegram" | "cli", difyUser: string) {
  const rig = await startRig();
  try {
    const turn1 = JSON.parse(await Deno.readTextFile(new URL(`${prefix}-turn1.json`, OPENCLAW_WIRE)));
    const turn2 = JSON.parse(await Deno.readTextFile(new URL(`${prefix}-turn2.json`, OPENCLAW_WIRE)));
    const r1 = await rawChat(rig.bridge.url, turn1);
    assert.equal(r1.status, 200, r1.text);
    const answer1 = sseData(r1.text).filter((d) => d !== "[DONE]").map((d) =>
      (d as { choices: { delta?: { content?: string } }[] }).choices[0]?.delta?.content ?? ""
    ).join("");
    const t1 = convTurnOf(answer1);
    // Turn 2 carries back what the bridge streamed for turn 1 (the capture holds another server's answer).
    const replayed = turn2.messages.filter((m: ConvMessage) => m.role === "assistant");
    assert.equal(replayed.length, 1);
    replayed[0].content = answer1;
    const r2 = await rawChat(rig.bridge.url, turn2);
    assert.equal(r2.status, 200, r2.text);
    const answer2 = sseData(r2.text).filter((d) => d !== "[DONE]").map((d) =>
      (d as { choices: { delta?: { content?: string } }[] }).choices[0]?.delta?.content ?? ""
    ).join("");
    const t2 = convTurnOf(answer2);
    assert.deepEqual([t2.n, t2.conv], [2, t1.conv], "turn 2 continues turn 1's Dify conversation");
    const [b1, b2] = rig.fake.generateBodies();
    assert.equal(b1.conversation_id, "");
    const system = turn1.messages[0].content.trim();
    assert.equal(b1.query, `${system}\n\nhi there`, "turn 1: system prompt, then only what the person typed");
    assert.equal(b2.query, "second message", "turn 2: only the new message");
    assert.equal(b2.conversation_id, r1.headers.get("x-dify-conversation-id"));
    assert.deepEqual([b1.user, b2.user], [difyUser, difyUser]);
  } finally {
    await rig.close();
  }
}

test("conversations: OpenClaw Telegram turns 1 and 2 continue one Dify conversation as telegram:123456789", () =>
  convOpenClaw("telegram", "telegram:123456789"));

test("conversations: OpenClaw CLI turns 1 and 2 continue one Dify conversation as the default user", () =>
  convOpenClaw("cli", "dify-openai"));

// ═══ content ════════════════════════════════════════════════════════════════════════════════════

// ─── helpers (prefixed: this file is merged into main_test.ts later) ────────────────────────────

const contentDecoder = new TextDecoder();

function contentCount(haystack: string, needle: string): number {
  return needle ? haystack.split(needle).length - 1 : 0;
}

/** A Dify stand-in that answers every POST with the SSE text `respond` returns, recording bodies. */
function contentMiniDify(
  respond: (path: string, body: Record<string, unknown>) => string,
): { url: string; origin: string; bodies: Record<string, unknown>[]; close(): Promise<void> } {
  const bodies: Record<string, unknown>[] = [];
  const server = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen() {} }, async (req) => {
    const path = new URL(req.url).pathname.replace(/^\/v1/, "");
    if (req.method === "GET" && path === "/info") return Response.json({ mode: "advanced-chat" });
    const body = await req.json().catch(() => ({}));
    bodies.push(body);
    return new Response(respond(path, body), { headers: { "content-type": "text/event-stream; charset=utf-8" } });
  });
  const origin = `http://127.0.0.1:${server.addr.port}`;
  return { url: `${origin}/v1`, origin, bodies, close: () => server.shutdown() };
}

function contentSse(events: Record<string, unknown>[]): string {
  return events.map((e) => `data: ${JSON.stringify(e)}\n\n`).join("");
}

/** The JSON error a non-2xx answer carries. */
function contentError(text: string): { message: string; code: string; type: string } {
  return JSON.parse(text).error;
}

/** An SSE body from the bridge, read back: joined content / reasoning, the last frame, and [DONE]. */
function contentRead(text: string) {
  const frames = sseData(text);
  let content = "";
  let reasoning = "";
  for (const f of frames) {
    const delta = (f as { choices?: { delta?: { content?: string; reasoning_content?: string } }[] }).choices?.[0]
      ?.delta;
    content += delta?.content ?? "";
    reasoning += delta?.reasoning_content ?? "";
  }
  const data = frames.filter((f) => f !== "[DONE]") as { error?: { code: string; message: string } }[];
  return { frames, content, reasoning, last: data[data.length - 1], done: frames.includes("[DONE]") };
}

/** Streams with raw fetch and aborts as soon as some non-empty content (or `until`) arrived. */
async function contentAbortMidStream(url: string, body: Record<string, unknown>, until = /"content":"[^"]/) {
  const ac = new AbortController();
  const res = await fetch(`${url}/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer sk-test" },
    body: JSON.stringify({ ...body, stream: true }),
    signal: ac.signal,
  });
  assert.equal(res.status, 200);
  const reader = res.body!.getReader();
  let text = "";
  while (!until.test(text)) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`stream ended before ${until}: ${text}`);
    text += contentDecoder.decode(value, { stream: true });
  }
  ac.abort();
  await reader.cancel().catch(() => {});
  return text;
}

// ─── App types ──────────────────────────────────────────────────────────────────────────────────

test("content: a type from DIFY_APPS picks the endpoint without asking /info", async () => {
  const env = await startRig({
    DIFY_API_KEY: "",
    DIFY_APPS: JSON.stringify({
      wf: { key: "app-workflow", type: "workflow" },
      cmp: { key: "app-completion", type: "completion" },
      flow: { key: "app-chatflow", type: "chatflow" },
      ag: { key: "app-agent", type: "agent" },
    }),
  });
  try {
    const answers: Record<string, string> = {};
    for (const model of ["wf", "cmp", "flow", "ag"]) {
      const r = await env.client.chat.completions.create({ model, messages: [user(`hello ${model}`)] as never });
      answers[model] = r.choices[0].message.content ?? "";
    }
    const paths = env.fake.requests.map((r) => `${r.method} ${r.path}`);
    assert.deepEqual(paths, [
      "POST /workflows/run",
      "POST /completion-messages",
      "POST /chat-messages",
      "POST /chat-messages",
    ]);
    assert.equal(answers.wf, "Workflow: hello wf");
    assert.equal(answers.cmp, "Completion: hello cmp");
    assert.match(answers.flow, /^Turn 1 of [0-9a-f]{8}: hello flow$/);
    assert.match(answers.ag, /^Turn 1 of [0-9a-f]{8}: hello ag$/);
  } finally {
    await env.close();
  }
});

test("content: an unknown type is detected from GET /info once and cached", async () => {
  const env = await startRig({ DIFY_API_KEY: "app-workflow" });
  try {
    // Concurrent first requests share one detection.
    const first = await Promise.all(
      [1, 2, 3].map((i) => env.client.chat.completions.create({ model: "dify", messages: [user(`q${i}`)] as never })),
    );
    for (const [i, r] of first.entries()) assert.equal(r.choices[0].message.content, `Workflow: q${i + 1}`);
    const streamed = await streamText(env.client, { model: "any-name", messages: [user("q4")] });
    assert.equal(streamed.content, "Workflow: q4");
    const infos = env.fake.requests.filter((r) => r.path === "/info");
    assert.equal(infos.length, 1, "one /info request for four chat requests");
    assert.equal(infos[0].key, "app-workflow");
    assert.equal(env.fake.requests.filter((r) => r.path === "/workflows/run").length, 4);
    assert.equal(env.fake.requests.filter((r) => r.path === "/chat-messages").length, 0);
  } finally {
    await env.close();
  }
  // Keys brought by the client are detected per key.
  const fake = await startFakeDify();
  const bridge = await startBridge({ DIFY_API_URL: fake.url });
  try {
    const c = await bridge.client("app-completion").chat.completions.create({
      model: "x",
      messages: [user("one")] as never,
    });
    assert.equal(c.choices[0].message.content, "Completion: one");
    const f = await bridge.client("app-chatflow").chat.completions.create({
      model: "x",
      messages: [user("two")] as never,
    });
    assert.match(f.choices[0].message.content ?? "", /^Turn 1 of [0-9a-f]{8}: two$/);
    await bridge.client("app-completion").chat.completions.create({ model: "x", messages: [user("three")] as never });
    assert.deepEqual(fake.requests.filter((r) => r.path === "/info").map((r) => r.key), [
      "app-completion",
      "app-chatflow",
    ]);
  } finally {
    await bridge.close();
    await fake.close();
  }
});

test("content: workflow apps get the text in the input variable and answer from text_chunk", async () => {
  const env = await startRig({
    DIFY_API_KEY: "",
    DIFY_APPS: JSON.stringify({
      wf: { key: "app-workflow", type: "workflow" },
      wfq: { key: "app-workflow-2", type: "workflow", input: "question" },
    }),
  });
  try {
    const r = await env.client.chat.completions.create({ model: "wf", messages: [user("what is dify")] as never });
    assert.equal(r.choices[0].message.content, "Workflow: what is dify");
    let body = env.fake.lastBody("/workflows/run");
    assert.equal(body.inputs.query, "what is dify");
    assert.equal(body.response_mode, "streaming");
    assert.equal(body.query, undefined, "a workflow run has no top-level query");
    assert.equal(body.conversation_id, undefined, "a workflow run has no conversation");

    const s = await streamText(env.client, { model: "wfq", messages: [user("per-app input")] });
    assert.equal(s.content, "Workflow: per-app input");
    body = env.fake.lastBody("/workflows/run");
    assert.equal(body.inputs.question, "per-app input");
    assert.equal(body.inputs.query, undefined);

    // The recorded fixture: text_chunks are the answer, workflow_finished is not repeated.
    const events = await fixtureEvents("workflow_run");
    const chunks = events.filter((e) => e.event === "text_chunk").map((e) => (e.data as { text: string }).text)
      .join("");
    const total = (events.find((e) => e.event === "workflow_finished")!.data as { total_tokens: number })
      .total_tokens;
    for (const stream of [false, true]) {
      const out = stream
        ? await streamText(env.client, {
          model: "wf",
          messages: [user("fixture:workflow_run")],
          stream_options: { include_usage: true },
        })
        : await env.client.chat.completions.create({ model: "wf", messages: [user("fixture:workflow_run")] as never })
          .then((x) => ({ content: x.choices[0].message.content, usage: x.usage }));
      assert.equal(out.content, chunks, `stream=${stream}`);
      assert.equal(out.usage?.total_tokens, total, "usage falls back to the workflow's total_tokens");
    }
  } finally {
    await env.close();
  }
});

test("content: workflow answers come from outputs when nothing streamed, never [object Object]", async () => {
  const env = await startRig({
    DIFY_API_KEY: "",
    DIFY_APPS: JSON.stringify({
      wf: { key: "app-workflow", type: "workflow" },
      wfb: { key: "app-workflow-b", type: "workflow", output: "b" },
    }),
  });
  try {
    for (const stream of [false, true]) {
      const ask = async (model: string, text: string) =>
        stream
          ? (await streamText(env.client, { model, messages: [user(text)] })).content
          : (await env.client.chat.completions.create({ model, messages: [user(text)] as never })).choices[0]
            .message.content;
      // outputs {answer: "..."} and no text_chunk
      assert.equal(await ask("wf", "fault:workflow_no_chunks hi"), "Workflow: fault:workflow_no_chunks hi");
      // outputs {a: 1, b: {c: 2}}: no usual name → all outputs as JSON
      const all = await ask("wf", "fault:workflow_outputs_object");
      assert.ok(!String(all).includes("[object Object]"));
      assert.deepEqual(JSON.parse(String(all)), { a: 1, b: { c: 2 } });
      // the per-app output key picks one value, an object as JSON
      const b = await ask("wfb", "fault:workflow_outputs_object");
      assert.deepEqual(JSON.parse(String(b)), { c: 2 });
    }
  } finally {
    await env.close();
  }
});

test("content: a failed workflow run is an OpenAI error, as HTTP status when nothing was streamed", async () => {
  const env = await startRig({ DIFY_API_KEY: "app-workflow" });
  const events = await fixtureEvents("workflow_run_failed");
  const reason = String((events.find((e) => e.event === "workflow_finished")!.data as { error: string }).error);
  try {
    const body = { model: "dify", messages: [user("fixture:workflow_run_failed")] };
    const plain = await rawChat(env.bridge.url, body);
    assert.ok(plain.status >= 400, `status ${plain.status}`);
    const err = contentError(plain.text);
    assert.equal(err.code, "workflow_failed");
    assert.ok(err.message.includes(reason.slice(0, 40)), err.message);
    const streamed = await rawChat(env.bridge.url, { ...body, stream: true });
    assert.equal(streamed.status, plain.status, "streaming: still an HTTP error, nothing was streamed");
    assert.equal(contentError(streamed.text).code, "workflow_failed");
    await assert.rejects(
      env.client.chat.completions.create(body as never),
      (e: unknown) => e instanceof OpenAI.APIError && e.status === plain.status,
    );
  } finally {
    await env.close();
  }
  // Text already streamed, then the run fails: the stream carries the text, then an error frame.
  const mini = await contentMiniDify(() =>
    contentSse([
      { event: "workflow_started", workflow_run_id: "r1", task_id: "t1", data: { id: "r1" } },
      { event: "text_chunk", workflow_run_id: "r1", task_id: "t1", data: { text: "partial " } },
      { event: "text_chunk", workflow_run_id: "r1", task_id: "t1", data: { text: "answer" } },
      {
        event: "workflow_finished",
        workflow_run_id: "r1",
        task_id: "t1",
        data: { id: "r1", status: "failed", outputs: {}, error: "node exploded", total_tokens: 3 },
      },
    ])
  );
  const bridge = await startBridge({
    DIFY_API_URL: mini.url,
    DIFY_APPS: JSON.stringify({ wf: { key: "app-x", type: "workflow" } }),
  });
  try {
    const r = await rawChat(bridge.url, { model: "wf", messages: [user("go")], stream: true });
    assert.equal(r.status, 200);
    const read = contentRead(r.text);
    assert.equal(read.content, "partial answer");
    assert.equal(read.last.error?.code, "workflow_failed");
    assert.match(read.last.error!.message, /node exploded/);
    assert.ok(!read.done, "a failed stream does not end with [DONE]");
    const plain = await rawChat(bridge.url, { model: "wf", messages: [user("go")] });
    assert.ok(plain.status >= 400);
    assert.equal(contentError(plain.text).code, "workflow_failed");
  } finally {
    await bridge.close();
    await mini.close();
  }
});

test("content: completion apps post the text as inputs.query to /completion-messages", async () => {
  const env = await startRig({ DIFY_API_KEY: "app-completion" });
  try {
    const r = await env.client.chat.completions.create({
      model: "dify",
      messages: [user("translate this")] as never,
      user: "u-7",
    });
    assert.equal(r.choices[0].message.content, "Completion: translate this");
    const body = env.fake.lastBody("/completion-messages");
    assert.equal(body.inputs.query, "translate this");
    assert.equal(body.user, "u-7");
    assert.equal(body.conversation_id, undefined);
    const events = await fixtureEvents("completion_basic");
    const s = await streamText(env.client, {
      model: "dify",
      messages: [user("fixture:completion_basic")],
      stream_options: { include_usage: true },
    });
    assert.equal(s.content, answerOf(events));
    assert.equal(s.usage?.total_tokens, usageOf(events).total_tokens);
  } finally {
    await env.close();
  }
});

// ─── Chatflow ───────────────────────────────────────────────────────────────────────────────────

test("content: chatflow node/workflow events never leak; usage comes from message_end", async () => {
  const env = await startRig({ DIFY_API_KEY: "app-chatflow" });
  try {
    for (const fixture of ["chatflow", "chatflow_pre113_order"]) {
      const events = await fixtureEvents(fixture);
      const expected = answerOf(events);
      const s = await streamText(env.client, {
        model: "dify",
        messages: [user(`fixture:${fixture}`)],
        stream_options: { include_usage: true },
      });
      assert.equal(s.content, expected, fixture);
      assert.equal(s.reasoning, "", "no node progress without REASONING_NODES");
      assert.equal(s.usage?.total_tokens, usageOf(events).total_tokens, fixture);
      const r = await env.client.chat.completions.create({
        model: "dify",
        messages: [user(`fixture:${fixture}`)] as never,
      });
      assert.equal(r.choices[0].message.content, expected, fixture);
      assert.equal(r.usage?.total_tokens, usageOf(events).total_tokens);
    }
  } finally {
    await env.close();
  }
});

test("content: chatflow terminal order (message_end first, workflow_finished first, none) gives the same answer", async () => {
  const raw = contentDecoder.decode(await readFixture("chatflow.sse"));
  const frames = raw.split("\n\n").filter(Boolean).map((f) => f + "\n\n");
  const end = frames.findIndex((f) => f.includes('"event":"message_end"'));
  const wf = frames.findIndex((f) => f.includes('"event":"workflow_finished"'));
  assert.ok(end >= 0 && wf === end + 1, "chatflow.sse: message_end then workflow_finished");
  const swapped = [...frames];
  [swapped[end], swapped[wf]] = [swapped[wf], swapped[end]];
  const noEnd = frames.filter((_, i) => i !== end);
  const variants: Record<string, string> = {
    modern: frames.join(""),
    legacy: swapped.join(""),
    no_message_end: noEnd.join(""),
  };
  const mini = await contentMiniDify((_path, body) => variants[String(body.query)]);
  const bridge = await startBridge({ DIFY_API_URL: mini.url, DIFY_API_KEY: "app-flow", CONVERSATION_MODE: "off" });
  const events = await fixtureEvents("chatflow");
  const workflowTotal = (events.find((e) => e.event === "workflow_finished")!.data as { total_tokens: number })
    .total_tokens;
  try {
    const results: Record<string, { content: string; total?: number }> = {};
    for (const name of Object.keys(variants)) {
      const s = await streamText(bridge.client(), {
        model: "dify",
        messages: [user(name)],
        stream_options: { include_usage: true },
      });
      const r = await bridge.client().chat.completions.create({ model: "dify", messages: [user(name)] as never });
      assert.equal(r.choices[0].message.content, s.content, name);
      assert.equal(r.usage?.total_tokens, s.usage?.total_tokens, name);
      results[name] = { content: s.content, total: s.usage?.total_tokens };
    }
    assert.equal(results.modern.content, answerOf(events));
    assert.deepEqual(results.legacy, results.modern);
    assert.equal(results.modern.total, usageOf(events).total_tokens);
    assert.equal(results.no_message_end.content, results.modern.content);
    assert.equal(results.no_message_end.total, workflowTotal, "without message_end: the workflow's total_tokens");
  } finally {
    await bridge.close();
    await mini.close();
  }
});

test("content: a failed chatflow is an error, after the text already streamed", async () => {
  const env = await startRig({ DIFY_API_KEY: "app-chatflow" });
  const events = await fixtureEvents("chatflow_failed");
  try {
    const body = { model: "dify", messages: [user("fixture:chatflow_failed")] };
    const plain = await rawChat(env.bridge.url, body);
    assert.ok(plain.status >= 400, `status ${plain.status}`);
    assert.ok(contentError(plain.text).message.length > 0);
    const streamed = await rawChat(env.bridge.url, { ...body, stream: true });
    // The message chunks come before the failure: the stream has started, the error is its last frame.
    assert.equal(streamed.status, 200);
    const read = contentRead(streamed.text);
    assert.equal(read.content, answerOf(events), "only the message text, no node events");
    assert.ok(read.last.error, "ends with an error frame");
    assert.ok(!read.done);
  } finally {
    await env.close();
  }
});

test("content: REASONING_NODES=1 shows chatflow node progress in reasoning, never in content", async () => {
  const env = await startRig({ DIFY_API_KEY: "app-chatflow", REASONING_NODES: "1" });
  try {
    const events = await fixtureEvents("chatflow");
    const titles = events.filter((e) => e.event === "node_started").map((e) => (e.data as { title: string }).title);
    assert.ok(titles.length >= 3);
    const s = await streamText(env.client, { model: "dify", messages: [user("fixture:chatflow")] });
    assert.equal(s.content, answerOf(events));
    for (const title of titles) assert.ok(s.reasoning.includes(title), `reasoning names node ${title}`);
    for (const title of titles) assert.ok(!s.content.includes(title));
    const r = await env.client.chat.completions.create({
      model: "dify",
      messages: [user("fixture:chatflow")] as never,
    });
    const message = r.choices[0].message as unknown as { content: string; reasoning_content?: string };
    assert.equal(message.content, answerOf(events));
    assert.equal(message.reasoning_content, s.reasoning);
  } finally {
    await env.close();
  }
});

// ─── Images and files ───────────────────────────────────────────────────────────────────────────

test("content: http(s) image_url parts go to Dify as remote_url and the bridge never fetches them", async () => {
  let hits = 0;
  const images = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen() {} }, () => {
    hits++;
    return new Response(new Uint8Array([0x89, 0x50, 0x4e, 0x47]), { headers: { "content-type": "image/png" } });
  });
  const base = `http://127.0.0.1:${images.addr.port}`;
  const env = await startRig();
  try {
    const r = await env.client.chat.completions.create({
      model: "dify",
      messages: [user([
        { type: "text", text: "what is in these?" },
        { type: "image_url", image_url: { url: `${base}/cat.png`, detail: "high" } },
        { type: "input_image", image_url: `${base}/dog.jpg` },
      ])] as never,
    });
    assert.match(r.choices[0].message.content ?? "", /what is in these\?$/);
    const body = env.fake.lastBody("/chat-messages");
    assert.equal(body.query, "what is in these?");
    assert.deepEqual(body.files, [
      { type: "image", transfer_method: "remote_url", url: `${base}/cat.png` },
      { type: "image", transfer_method: "remote_url", url: `${base}/dog.jpg` },
    ]);
    assert.equal(env.fake.requests.filter((q) => q.path === "/files/upload").length, 0);
    assert.equal(hits, 0, "the bridge never fetches a client's URL");
  } finally {
    await env.close();
    await images.shutdown();
  }
});

test("content: data: images are uploaded with the chat's user and sent as local_file", async () => {
  const env = await startRig();
  const png = new Uint8Array([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a, 1, 2, 3, 250]);
  const dataUrl = `data:image/png;base64,${btoa(String.fromCharCode(...png))}`;
  try {
    for (const who of ["alice", undefined]) {
      env.fake.reset();
      const s = await streamText(env.client, {
        model: "dify",
        messages: [user([{ type: "text", text: "describe" }, { type: "image_url", image_url: { url: dataUrl } }])],
        ...(who ? { user: who } : {}),
      });
      assert.match(s.content, /describe$/);
      const calls = env.fake.requests.filter((q) => q.path !== "/info");
      assert.deepEqual(calls.map((q) => q.path), ["/files/upload", "/chat-messages"], "upload, then the chat call");
      const upload = calls[0];
      const chat = calls[1].body;
      assert.equal(upload.body.user, chat.user, "the upload and the chat call name the same user");
      if (who) assert.equal(chat.user, who);
      assert.equal(upload.body.contentType, "image/png");
      assert.deepEqual([...upload.body.bytes], [...png], "the decoded bytes reach Dify");
      assert.equal(chat.files.length, 1);
      const [file] = chat.files;
      assert.equal(file.type, "image");
      assert.equal(file.transfer_method, "local_file");
      assert.ok(env.fake.uploads.has(file.upload_file_id), "upload_file_id is the id Dify returned");
      assert.equal(env.fake.uploads.get(file.upload_file_id)!.user, chat.user);
    }
  } finally {
    await env.close();
  }
});

test("content: file and input_file parts are uploaded with the Dify type from the file name", async () => {
  const env = await startRig();
  const b64 = (s: string) => btoa(s);
  try {
    const parts = [
      { type: "text", text: "read these" },
      { type: "file", file: { filename: "report.pdf", file_data: b64("%PDF-1.4 fake") } },
      { type: "input_file", filename: "song.mp3", file_data: b64("ID3 fake") },
      { type: "file", file: { filename: "clip.mp4", file_data: `data:video/mp4;base64,${b64("mp4 fake")}` } },
      { type: "input_file", filename: "shot.png", file_data: b64("png fake") },
      { type: "file", file: { filename: "thing.xyz", file_data: b64("who knows") } },
    ];
    const r = await env.client.chat.completions.create({
      model: "dify",
      messages: [user(parts)] as never,
      user: "bob",
    });
    assert.match(r.choices[0].message.content ?? "", /read these$/);
    const uploads = env.fake.requests.filter((q) => q.path === "/files/upload").map((q) => q.body);
    assert.deepEqual(uploads.map((u) => u.filename).sort(), [
      "clip.mp4",
      "report.pdf",
      "shot.png",
      "song.mp3",
      "thing.xyz",
    ]);
    for (const u of uploads) assert.equal(u.user, "bob");
    const byName = new Map(uploads.map((u) => [u.filename, u]));
    assert.equal(contentDecoder.decode(byName.get("report.pdf")!.bytes), "%PDF-1.4 fake");
    assert.equal(contentDecoder.decode(byName.get("clip.mp4")!.bytes), "mp4 fake");
    const chat = env.fake.lastBody("/chat-messages");
    assert.equal(chat.user, "bob");
    const types = Object.fromEntries(
      chat.files.map((f: { type: string; transfer_method: string; upload_file_id: string }) => {
        assert.equal(f.transfer_method, "local_file");
        return [env.fake.uploads.get(f.upload_file_id)!.filename, f.type];
      }),
    );
    assert.deepEqual(types, {
      "report.pdf": "document",
      "song.mp3": "audio",
      "clip.mp4": "video",
      "shot.png": "image",
      "thing.xyz": "custom",
    });
  } finally {
    await env.close();
  }
});

test("content: an upload Dify rejects is a clear client error, and no chat call is made", async () => {
  const env = await startRig();
  try {
    const body = {
      model: "dify",
      messages: [user([{ type: "text", text: "run it" }, {
        type: "file",
        file: { filename: "setup.exe", file_data: btoa("MZ") },
      }])],
    };
    for (const stream of [false, true]) {
      const r = await rawChat(env.bridge.url, { ...body, stream });
      assert.equal(r.status, 400, r.text);
      const err = contentError(r.text);
      assert.equal(err.type, "invalid_request_error");
      assert.match(err.message, /not allowed/, "Dify's reason reaches the client");
      assert.match(err.message, /dify/i);
    }
    assert.equal(env.fake.requests.filter((q) => q.path === "/chat-messages").length, 0);
    // Malformed base64 is the client's mistake, caught before Dify.
    const bad = await rawChat(env.bridge.url, {
      model: "dify",
      messages: [user([{ type: "image_url", image_url: { url: "data:image/png;base64,@@@" } }])],
    });
    assert.equal(bad.status, 400);
    assert.equal(env.fake.requests.filter((q) => q.path === "/files/upload").length, 2);
  } finally {
    await env.close();
  }
});

// ─── Agent thoughts ─────────────────────────────────────────────────────────────────────────────

interface ContentThought {
  id: string;
  tool: string;
  tool_input: string;
  observation: string;
  thought: string;
}

async function contentAgentFixture() {
  const events = await fixtureEvents("agent_with_thoughts");
  const thoughts = events.filter((e) => e.event === "agent_thought") as unknown as ContentThought[];
  const tool = thoughts.find((t) => t.tool)!;
  const observed = thoughts.find((t) => t.observation)!;
  const answer = events.filter((e) => e.event === "agent_message").map((e) => e.answer).join("");
  const file = events.find((e) => e.event === "message_file") as { url: string };
  return { events, tool, observed, answer, fileUrl: file.url };
}

test("content: agent thoughts stream as reasoning_content, each thought growing once, no duplicates", async () => {
  const env = await startRig({ DIFY_API_KEY: "app-agent" });
  const { tool, observed, answer, fileUrl } = await contentAgentFixture();
  try {
    const s = await streamText(env.client, { model: "dify", messages: [user("fixture:agent_with_thoughts")] });
    // Tool name, input and observation each appear exactly once, as lines of reasoning.
    assert.equal(contentCount(s.reasoning, tool.tool_input), 1, s.reasoning);
    assert.equal(contentCount(s.reasoning, observed.observation), 1, s.reasoning);
    const lines = s.reasoning.split("\n");
    assert.ok(lines.some((l) => l.includes(tool.tool) && l.includes(tool.tool_input)), "a tool line");
    assert.ok(lines.some((l) => l.includes(observed.observation)), "an observation line");
    // The final thought repeats the answer: it is not reasoning, and the answer is not doubled.
    assert.ok(!s.reasoning.includes(answer.trim().slice(0, 20)), s.reasoning);
    assert.equal(contentCount(s.content, answer), 1, s.content);
    assert.ok(s.content.endsWith(answer));
    assert.ok(s.content.includes(`(${fileUrl})`), "the tool's image is in the content");
    assert.ok(!s.content.includes(tool.tool_input) && !s.content.includes(observed.observation));
    // Every reasoning delta is new text: no delta repeats an earlier one's text.
    const deltas = s.chunks.map((c) =>
      (c.choices as { delta?: { reasoning_content?: string } }[])[0]?.delta?.reasoning_content
    ).filter((d): d is string => !!d);
    assert.equal(deltas.join(""), s.reasoning);
    for (const d of deltas) assert.equal(contentCount(s.reasoning, d.trim()), 1, `delta repeated: ${d}`);

    const r = await env.client.chat.completions.create({
      model: "dify",
      messages: [user("fixture:agent_with_thoughts")] as never,
    });
    const message = r.choices[0].message as unknown as { content: string; reasoning_content?: string };
    assert.equal(message.content, s.content);
    assert.equal(message.reasoning_content, s.reasoning);
  } finally {
    await env.close();
  }
});

test("content: REASONING=think puts thoughts inline in <think> blocks; REASONING=off drops them", async () => {
  const { tool, observed, answer } = await contentAgentFixture();
  const think = await startRig({ DIFY_API_KEY: "app-agent", REASONING: "think" });
  try {
    const s = await streamText(think.client, { model: "dify", messages: [user("fixture:agent_with_thoughts")] });
    assert.equal(s.reasoning, "", "no reasoning_content in think mode");
    assert.ok(s.content.startsWith("<think>"), s.content);
    assert.equal(contentCount(s.content, "<think>"), contentCount(s.content, "</think>"), "every block is closed");
    const inside = [...s.content.matchAll(/<think>([\s\S]*?)<\/think>/g)].map((m) => m[1]).join("\n");
    const outside = s.content.replace(/<think>[\s\S]*?<\/think>\s*/g, "");
    assert.equal(contentCount(inside, tool.tool_input), 1);
    assert.equal(contentCount(inside, observed.observation), 1);
    assert.equal(contentCount(outside, answer), 1, "the answer once, outside the thinking");
    assert.ok(!outside.includes(tool.tool_input));
    const r = await think.client.chat.completions.create({
      model: "dify",
      messages: [user("fixture:agent_with_thoughts")] as never,
    });
    const message = r.choices[0].message as unknown as { content: string; reasoning_content?: string };
    assert.equal(message.content, s.content);
    assert.equal(message.reasoning_content, undefined);
  } finally {
    await think.close();
  }
  const off = await startRig({ DIFY_API_KEY: "app-agent", REASONING: "off" });
  try {
    const s = await streamText(off.client, { model: "dify", messages: [user("fixture:agent_with_thoughts")] });
    assert.equal(s.reasoning, "");
    assert.ok(!s.content.includes("<think>"));
    assert.ok(!s.content.includes(tool.tool_input) && !s.content.includes(observed.observation));
    assert.equal(contentCount(s.content, answer), 1);
    const r = await off.client.chat.completions.create({
      model: "dify",
      messages: [user("fixture:agent_with_thoughts")] as never,
    });
    const message = r.choices[0].message as unknown as { content: string; reasoning_content?: string };
    assert.equal(message.reasoning_content, undefined);
    assert.equal(message.content, s.content);
  } finally {
    await off.close();
  }
});

// ─── Message files, replacements and other content events ──────────────────────────────────────

test("content: message_file URLs relative to Dify's origin are made absolute; the user's own files are not echoed", async () => {
  const head = { conversation_id: "c-1", message_id: "m-1", created_at: 1, task_id: "t-1" };
  const mini = await contentMiniDify(() =>
    contentSse([
      { event: "message_file", ...head, id: "f-0", type: "image", belongs_to: "user", url: "/files/mine.png?s=1" },
      { event: "message", ...head, id: "m-1", answer: "Here you go." },
      {
        event: "message_file",
        ...head,
        id: "f-1",
        type: "image",
        belongs_to: "assistant",
        url: "/files/tools/a.png?sign=x",
      },
      { event: "message_file", ...head, id: "f-2", type: "document", belongs_to: "assistant", url: "files/b.pdf" },
      {
        event: "message_file",
        ...head,
        id: "f-3",
        type: "image",
        belongs_to: "assistant",
        url: "https://cdn.example.com/c.png",
      },
      { event: "message_end", ...head, id: "m-1", metadata: { usage: { prompt_tokens: 1, completion_tokens: 2 } } },
    ])
  );
  const bridge = await startBridge({ DIFY_API_URL: mini.url, DIFY_API_KEY: "app-x", CONVERSATION_MODE: "off" });
  try {
    const s = await streamText(bridge.client(), { model: "dify", messages: [user("draw")] });
    assert.ok(s.content.startsWith("Here you go."), s.content);
    assert.ok(s.content.includes(`![image](${mini.origin}/files/tools/a.png?sign=x)`), s.content);
    assert.ok(s.content.includes(`(${mini.origin}/files/b.pdf)`), s.content);
    assert.ok(s.content.includes("(https://cdn.example.com/c.png)"), "absolute URLs stay as they are");
    assert.ok(!s.content.includes("mine.png"), "the user's own upload is not echoed back");
    assert.ok(!s.content.includes("](/files"), "no relative link left");
    const r = await bridge.client().chat.completions.create({ model: "dify", messages: [user("draw")] as never });
    assert.equal(r.choices[0].message.content, s.content);
  } finally {
    await bridge.close();
    await mini.close();
  }
});

test("content: text sent as message_file events (vision quirk) is content; annotation replies and TTS join cleanly", async () => {
  const env = await startRig();
  try {
    for (const fixture of ["vision_message_file_quirk", "annotation_reply", "tts_autoplay"]) {
      const events = await fixtureEvents(fixture);
      const expected = answerOf(events);
      assert.ok(expected.length > 5, fixture);
      const s = await streamText(env.client, {
        model: "dify",
        messages: [user(`fixture:${fixture}`)],
        stream_options: { include_usage: true },
      });
      assert.equal(s.content, expected, fixture);
      assert.equal(s.usage?.total_tokens, usageOf(events).total_tokens, fixture);
      const r = await env.client.chat.completions.create({
        model: "dify",
        messages: [user(`fixture:${fixture}`)] as never,
      });
      assert.equal(r.choices[0].message.content, expected, fixture);
    }
    // The TTS audio never leaks into the text.
    const tts = await fixtureEvents("tts_autoplay");
    const audio = tts.filter((e) => e.event === "tts_message").map((e) => String(e.audio));
    const s = await streamText(env.client, { model: "dify", messages: [user("fixture:tts_autoplay")] });
    for (const a of audio) assert.ok(!s.content.includes(a.slice(0, 12)));
    // The user's image in the vision quirk is not echoed as a link.
    const v = await streamText(env.client, { model: "dify", messages: [user("fixture:vision_message_file_quirk")] });
    assert.ok(!v.content.includes("bike.jpg"), v.content);
  } finally {
    await env.close();
  }
});

test("content: message_replace replaces the answer; streaming sends it as a separated final delta", async () => {
  const env = await startRig();
  const events = await fixtureEvents("moderation_replace");
  const original = events.filter((e) => e.event === "message").map((e) => String(e.answer)).join("");
  const replacement = String(events.find((e) => e.event === "message_replace")!.answer);
  try {
    const r = await env.client.chat.completions.create({
      model: "dify",
      messages: [user("fixture:moderation_replace")] as never,
    });
    assert.equal(r.choices[0].message.content, replacement, "non-streaming: exactly the replacement");

    const s = await streamText(env.client, { model: "dify", messages: [user("fixture:moderation_replace")] });
    const deltas = s.chunks.map((c) => (c.choices as { delta?: { content?: string } }[])[0]?.delta?.content)
      .filter((d): d is string => !!d);
    const last = deltas[deltas.length - 1];
    assert.equal(deltas.slice(0, -1).join(""), original, "the original deltas, as streamed");
    assert.ok(last.endsWith(replacement), last);
    const separator = last.slice(0, last.length - replacement.length);
    assert.ok(/\n\s*\S*\s*\n/.test(separator), `clearly separated: ${JSON.stringify(separator)}`);
    assert.equal(s.content, original + last);
  } finally {
    await env.close();
  }
  // In think mode a replacement while a <think> block is open leaves no dangling tag.
  const head = { conversation_id: "c-r", message_id: "m-r", created_at: 1, task_id: "t-r" };
  const node = (event: string, title: string) => ({
    event,
    ...head,
    workflow_run_id: "w",
    data: { id: title, node_type: "llm", title, status: "succeeded" },
  });
  const mini = await contentMiniDify(() =>
    contentSse([
      node("node_started", "LLM"),
      { event: "message", ...head, answer: "something rude" },
      node("node_finished", "LLM"),
      { event: "message_replace", ...head, answer: replacement, reason: "" },
      { event: "message_end", ...head, metadata: { usage: { prompt_tokens: 1, completion_tokens: 0 } } },
      { event: "workflow_finished", ...head, workflow_run_id: "w", data: { status: "succeeded", outputs: {} } },
    ])
  );
  const bridge = await startBridge({
    DIFY_API_URL: mini.url,
    DIFY_API_KEY: "app-flow",
    REASONING: "think",
    REASONING_NODES: "1",
    CONVERSATION_MODE: "off",
  });
  try {
    const r = await bridge.client().chat.completions.create({ model: "dify", messages: [user("x")] as never });
    assert.equal(r.choices[0].message.content, replacement);
    const s = await streamText(bridge.client(), { model: "dify", messages: [user("x")] });
    assert.ok(s.content.endsWith(replacement), s.content);
    assert.equal(contentCount(s.content, "<think>"), contentCount(s.content, "</think>"));
  } finally {
    await bridge.close();
    await mini.close();
  }
});

test("content: unicode_split and unicode_split_legacy give identical content for every slice size 1..7", async () => {
  const expected = answerOf(await fixtureEvents("unicode_split"));
  assert.equal(answerOf(await fixtureEvents("unicode_split_legacy")), expected);
  assert.ok(/[\u{1F000}-\u{1FFFF}]/u.test(expected), "the fixture has astral characters");
  // A one-byte slice costs a timer tick per byte in the fake: the sizes run side by side, and the
  // legacy fixture (all ASCII: \uXXXX escapes) only at a few sizes, since no code point can split.
  const one = async (sliceBytes: number) => {
    const env = await startRig({}, { dify: sliceBytes ? { sliceBytes } : {} });
    try {
      const fixtures = [0, 3, 7].includes(sliceBytes) ? ["unicode_split", "unicode_split_legacy"] : ["unicode_split"];
      const runs = fixtures.map(async (fixture) => {
        const s = await streamText(env.client, { model: "dify", messages: [user(`fixture:${fixture}`)] });
        assert.equal(s.content, expected, `${fixture}, slices of ${sliceBytes}`);
      });
      if (sliceBytes === 0 || sliceBytes === 5) {
        runs.push(
          env.client.chat.completions.create({ model: "dify", messages: [user("fixture:unicode_split")] as never })
            .then((r) => assert.equal(r.choices[0].message.content, expected, `non-streaming, ${sliceBytes}`)),
        );
      }
      await Promise.all(runs);
    } finally {
      await env.close();
    }
  };
  await Promise.all([0, 1, 2, 3, 4, 5, 6, 7].map(one));
});

// ─── Disconnects, keepalives, timeouts ──────────────────────────────────────────────────────────

const CONTENT_APPS = JSON.stringify({
  chat: "app-chat",
  completion: { key: "app-completion", type: "completion" },
  workflow: { key: "app-workflow", type: "workflow" },
});

test("content: a client leaving mid-stream stops the Dify task with the same user, for chat, completion and workflow", async () => {
  const env = await startRig({ DIFY_API_KEY: "", DIFY_APPS: CONTENT_APPS });
  try {
    const expected: Record<string, RegExp> = {
      chat: /^\/chat-messages\/([^/]+)\/stop$/,
      completion: /^\/completion-messages\/([^/]+)\/stop$/,
      workflow: /^\/workflows\/tasks\/([^/]+)\/stop$/,
    };
    for (const [model, path] of Object.entries(expected)) {
      env.fake.reset();
      const who = `leaver-${model}`;
      await contentAbortMidStream(env.bridge.url, {
        model,
        user: who,
        messages: [user("tell me a long story fault:slow:50")],
      });
      await until(() => env.fake.stops.length > 0, 5_000, `${model} stop call`);
      const [stop] = env.fake.stops;
      assert.match(stop.path, path, model);
      assert.equal(stop.user, who, `${model}: the stop call names the same user`);
      assert.match(stop.taskId, /^[0-9a-f-]{36}$/, "the task id Dify streamed");
      const run = env.fake.requests.find((q) => q.method === "POST" && !q.path.endsWith("/stop"))!;
      assert.equal(run.body.user, who);
      await until(() => env.bridge.logs.length > 0, 5_000, "the request's log line");
      const entry = JSON.parse(env.bridge.logs[env.bridge.logs.length - 1]);
      assert.equal(entry.status, 499, `${model}: logged as a client close`);
      env.bridge.logs.length = 0;
    }
    // Stopped: no second stop, and the bridge holds nothing open.
    await sleep(100);
    assert.equal(env.fake.stops.length, 1);
    const health = await fetch(env.bridge.url.replace(/\/v1$/, "/healthz")).then((r) => r.json());
    assert.equal(health.streams, 0);
  } finally {
    await env.close();
  }
});

test("content: a non-streaming client that gives up also stops the Dify task", async () => {
  const env = await startRig({ DIFY_API_KEY: "", DIFY_APPS: CONTENT_APPS });
  try {
    for (const model of ["chat", "workflow"]) {
      env.fake.reset();
      const ac = new AbortController();
      const pending = fetch(`${env.bridge.url}/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: "Bearer sk-test" },
        body: JSON.stringify({ model, user: "quitter", messages: [user("long answer fault:slow:100")] }),
        signal: ac.signal,
      }).catch((e) => e);
      // Let Dify's first events (with the task id) reach the bridge, then leave.
      await until(
        () => env.fake.requests.some((q) => q.path === "/chat-messages" || q.path === "/workflows/run"),
        5_000,
        "the run",
      );
      await sleep(250);
      ac.abort();
      assert.ok((await pending) instanceof Error);
      await until(() => env.fake.stops.length > 0, 5_000, `${model} stop call`);
      assert.equal(env.fake.stops[0].user, "quitter");
      assert.match(env.fake.stops[0].path, model === "chat" ? /^\/chat-messages\// : /^\/workflows\/tasks\//);
    }
  } finally {
    await env.close();
  }
});

test("content: keepalive comments fill Dify's silences and Dify's pings are forwarded as comments", async () => {
  const env = await startRig({ KEEPALIVE_SECONDS: "0.2" });
  try {
    const r = await rawChat(env.bridge.url, {
      model: "dify",
      messages: [user("wait for it fault:idle:1000")],
      stream: true,
    });
    assert.equal(r.status, 200);
    const firstContent = r.text.search(/"content":"[^"]/);
    const keepalive = r.text.indexOf(": keepalive\n\n");
    assert.ok(firstContent > 0, r.text);
    assert.ok(keepalive > firstContent, "a keepalive comment arrives during the silence after content started");
    assert.ok(keepalive < r.text.indexOf("data: [DONE]"));
    assert.ok(contentCount(r.text, ": keepalive") >= 2, "one per keepalive period");
    const read = contentRead(r.text);
    assert.ok(read.done);
    assert.match(read.content, /^Turn 1 of [0-9a-f]{8}: wait for it fault:idle:1000$/);
    // The SDK reads through comments.
    const s = await streamText(env.client, { model: "dify", messages: [user("again fault:idle:500")] });
    assert.match(s.content, /: again fault:idle:500$/);

    const pings = contentCount(contentDecoder.decode(await readFixture("ping_keepalive.sse")), "event: ping");
    const p = await rawChat(env.bridge.url, {
      model: "dify",
      messages: [user("fixture:ping_keepalive")],
      stream: true,
    });
    assert.equal(contentCount(p.text, ": ping\n\n"), pings, "each Dify ping becomes a `: ping` comment");
    assert.ok(!p.text.includes("event: ping"));
    assert.equal(contentRead(p.text).content, answerOf(await fixtureEvents("ping_keepalive")));
  } finally {
    await env.close();
  }
});

test("content: UPSTREAM_TIMEOUT_SECONDS gives a 504 before headers; UPSTREAM_IDLE_SECONDS an error frame after", async () => {
  const env = await startRig({ UPSTREAM_TIMEOUT_SECONDS: "0.3", UPSTREAM_IDLE_SECONDS: "0.3" });
  try {
    for (const stream of [true, false]) {
      const r = await rawChat(env.bridge.url, {
        model: "dify",
        messages: [user("slow start fault:first_byte:5000")],
        stream,
      });
      assert.equal(r.status, 504, `stream=${stream}: ${r.text}`);
      assert.equal(contentError(r.text).code, "upstream_timeout");
    }
    await assert.rejects(
      streamText(env.client, { model: "dify", messages: [user("fault:first_byte:5000")] }),
      (e: unknown) => e instanceof OpenAI.APIError && e.status === 504,
    );
    const idle = await rawChat(env.bridge.url, {
      model: "dify",
      messages: [user("stall fault:idle:5000")],
      stream: true,
    });
    assert.equal(idle.status, 200);
    const read = contentRead(idle.text);
    assert.ok(read.content.length > 0, "content before the silence");
    assert.equal(read.last.error?.code, "upstream_idle_timeout");
    assert.ok(!read.done, "the stream ends with the error, not [DONE]");
    const plain = await rawChat(env.bridge.url, { model: "dify", messages: [user("stall fault:idle:5000")] });
    assert.equal(plain.status, 504);
    assert.equal(contentError(plain.text).code, "upstream_idle_timeout");
  } finally {
    await env.close();
  }
});

// ─── OpenClaw ───────────────────────────────────────────────────────────────────────────────────

const CONTENT_FENCE = "```";

/** An older-OpenClaw metadata block: `<Label> (untrusted …):` and a json fence. */
function contentOldBlock(label: string, json: unknown, kind = "metadata", fence = `${CONTENT_FENCE}json`): string {
  const suffix = kind === "metadata" ? "(untrusted metadata):" : "(untrusted, for context):";
  return `${label} ${suffix}\n${fence}\n${JSON.stringify(json, null, 2)}\n${CONTENT_FENCE}`;
}

test("content: cleanEnvelope removes current and older OpenClaw envelopes and finds the sender", () => {
  // Current (2026.9.6): timestamp, `Label: ⟦openclaw:ctx⟧` block, Runtime line.
  const current = `[Tue 2026-11-24 08:11 UTC] Conversation info: ⟦openclaw:ctx⟧\n${CONTENT_FENCE}json\n` +
    `{"sender":{"id":"123456789","name":"Alice Tester","username":"alice_t"}}\n${CONTENT_FENCE}\n\nhi there\n\n` +
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
    contentOldBlock("Conversation info", {
      message_id: "6955",
      sender_id: "395239117",
      sender: "Nigerian Prince",
      timestamp: "Wed 2026-03-04 18:25 GMT+2",
    }),
    contentOldBlock("Sender", { label: "Nigerian Prince (395239117)", id: "395239117", name: "Nigerian Prince" }),
    contentOldBlock("Thread starter", { body: "the thread's first message" }, "context"),
    contentOldBlock("Replied message", { sender_label: "Bob", body: "earlier words" }, "context"),
    contentOldBlock("Forwarded message context", { from: "Carol", type: "user", date_ms: 1 }),
    contentOldBlock("Chat history since last reply", [{ sender: "Dan", timestamp_ms: 1, body: "yo" }], "context"),
    contentOldBlock(
      "Location",
      { latitude: 48.858844, longitude: 2.294351, name: "Eiffel Tower" },
      "metadata",
      CONTENT_FENCE,
    ),
    contentOldBlock("Structured object", { source: "x", type: "card", payload: { id: "not-a-user" } }),
    `Reply chain of current user message (untrusted, nearest first):\n${CONTENT_FENCE}json\n` +
    `[{"sender_label":"Eve","body":"older"}]\n${CONTENT_FENCE}`,
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
    `${contentOldBlock("Sender", { label: "openclaw-control-ui", id: "openclaw-control-ui" })}\n\n` +
      "[Sun 2026-04-19 00:33 GMT+8] hi there",
  );
  assert.equal(after.text, "hi there");
  assert.equal(after.senderId, "openclaw-control-ui");
  // The earliest Conversation info named the sender by a plain string.
  assert.equal(
    cleanEnvelope(`${contentOldBlock("Conversation info", { message_id: "10285", sender: "1801759510" })}\n\nhi`)
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

test("content: isInternalContext matches only OpenClaw's whole internal-context message", () => {
  const block = '<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>\nConversation data (data, not instructions):\n"x"\n' +
    "<<<END_OPENCLAW_INTERNAL_CONTEXT>>>";
  assert.equal(isInternalContext(block), true);
  assert.equal(isInternalContext(`\n  ${block}\n`), true);
  assert.equal(isInternalContext(`question first\n${block}`), false);
  assert.equal(isInternalContext(`${block}\nand a question after`), false);
  assert.equal(isInternalContext("<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>> unterminated"), false);
  assert.equal(isInternalContext("hi there"), false);
});

test("content: every user message is cleaned, the internal context is dropped, ENVELOPE=keep keeps it all", () => {
  const m = (role: Message["role"], text: string): Message => ({ role, text, files: [] });
  const internal = "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>\nstuff\n<<<END_OPENCLAW_INTERNAL_CONTEXT>>>";
  const sender = (id: string) =>
    `Conversation info: ⟦openclaw:ctx⟧\n${CONTENT_FENCE}json\n{"sender":{"id":"${id}"}}\n${CONTENT_FENCE}\n\n`;
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

/** A real OpenClaw 2026.9.6 request body from testdata/openclaw-wire. */
async function contentWire(name: string): Promise<Record<string, unknown>> {
  return JSON.parse(await Deno.readTextFile(new URL(`${name}.json`, OPENCLAW_WIRE)));
}

test("content: OpenClaw's real requests replay end to end: query `hi there`, Dify user from the sender", async () => {
  const env = await startRig({ SYSTEM_PROMPT: "inputs" });
  try {
    const expectations: Record<string, { query: RegExp; user: string }> = {
      "telegram-turn1": { query: /^hi there$/, user: "telegram:123456789" },
      "cli-turn1": { query: /^hi there$/, user: "dify-openai" },
      // Replayed alone, turn 2 is a new conversation: the history goes along as a transcript.
      "telegram-turn2": {
        query:
          /^Conversation so far:\n\nUser: hi there\n\nAssistant: Hello from fake server \(reply #001\)\.\n\nCurrent message:\n\nsecond message$/,
        user: "telegram:123456789",
      },
      "cli-turn2": { query: /Current message:\n\nsecond message$/, user: "dify-openai" },
      "retry-after-500": { query: /fail check/, user: "dify-openai" },
    };
    for (const [name, want] of Object.entries(expectations)) {
      const body = await contentWire(name);
      assert.ok(Array.isArray(body.tools) && body.tool_choice, `${name} carries tools`);
      const r = await rawChat(env.bridge.url, body);
      assert.equal(r.status, 200, `${name}: ${r.text.slice(0, 300)}`);
      const read = contentRead(r.text);
      assert.ok(read.done, name);
      const usage = (read.frames.filter((f) => f !== "[DONE]").at(-1) as { usage?: { total_tokens: number } }).usage;
      assert.ok(usage && usage.total_tokens > 0, `${name}: include_usage honoured`);
      const sent = env.fake.lastBody("/chat-messages");
      assert.match(sent.query, want.query, name);
      assert.equal(sent.user, want.user, name);
      for (const leak of ["⟦openclaw:ctx⟧", "<<<BEGIN_OPENCLAW", "Runtime: agent=", "[Tue 2026-11-24"]) {
        assert.ok(!sent.query.includes(leak), `${name}: ${leak} leaked into the query`);
      }
      assert.ok(String(sent.inputs.system_prompt).includes("OpenClaw"), `${name}: SYSTEM_PROMPT=inputs`);
    }
  } finally {
    await env.close();
  }
});

test("content: an OpenClaw Telegram chat continues its conversation as the same Dify user", async () => {
  // A Dify that answers exactly what OpenClaw's capture echoes back, so turn 2 can continue turn 1.
  const answer = "Hello from fake server (reply #001).";
  const mini = await contentMiniDify((_path, body) => {
    const head = { conversation_id: String(body.conversation_id || "conv-tg"), message_id: "m", task_id: "t" };
    return contentSse([
      { event: "message", ...head, answer },
      { event: "message_end", ...head, metadata: { usage: { prompt_tokens: 3, completion_tokens: 7 } } },
    ]);
  });
  const bridge = await startBridge({ DIFY_API_URL: mini.url, DIFY_API_KEY: "app-tg", SYSTEM_PROMPT: "inputs" });
  try {
    for (const name of ["telegram-turn1", "telegram-turn2"]) {
      const r = await rawChat(bridge.url, await contentWire(name));
      assert.equal(r.status, 200, name);
      assert.equal(contentRead(r.text).content, answer);
    }
    const [one, two] = mini.bodies;
    assert.equal(one.query, "hi there");
    assert.equal(one.conversation_id, "");
    assert.equal(two.query, "second message", "turn 2 sends only the new text");
    assert.equal(two.conversation_id, "conv-tg", "in turn 1's conversation");
    assert.equal(one.user, "telegram:123456789");
    assert.equal(two.user, one.user, "the same Dify user");
  } finally {
    await bridge.close();
    await mini.close();
  }
});

test("content: ENVELOPE=keep sends OpenClaw's text untouched", async () => {
  const env = await startRig({ SYSTEM_PROMPT: "inputs", ENVELOPE: "keep" });
  try {
    const body = await contentWire("telegram-turn1");
    const raw = (body.messages as { role: string; content: unknown }[])[1].content as string;
    const r = await rawChat(env.bridge.url, body);
    assert.equal(r.status, 200);
    const sent = env.fake.lastBody("/chat-messages");
    assert.ok(sent.query.startsWith(raw), "the user's message exactly as OpenClaw wrote it");
    assert.ok(sent.query.includes("⟦openclaw:ctx⟧") && sent.query.includes("Runtime: agent="));
  } finally {
    await env.close();
  }
});

test("content: tools, tool_choice, assistant tool_calls and tool messages are accepted and replayed as text", async () => {
  const env = await startRig({ CONVERSATION_MODE: "history", SYSTEM_PROMPT: "inputs" });
  const tools = [{
    type: "function",
    function: { name: "get_weather", description: "weather", parameters: { type: "object", properties: {} } },
  }];
  try {
    const messages = [
      { role: "system", content: "be brief" },
      user("weather in Paris?"),
      {
        role: "assistant",
        content: null,
        tool_calls: [{
          id: "call_1",
          type: "function",
          function: { name: "get_weather", arguments: '{"city":"Paris"}' },
        }],
      },
      { role: "tool", tool_call_id: "call_1", content: "18°C and sunny" },
      assistant("It is 18°C and sunny."),
      user("and tomorrow?"),
    ];
    const r = await env.client.chat.completions.create({
      model: "dify",
      messages,
      tools,
      tool_choice: "auto",
      parallel_tool_calls: false,
    } as never);
    assert.match(r.choices[0].message.content ?? "", /and tomorrow\?$/);
    assert.equal((r.choices[0].message as { tool_calls?: unknown }).tool_calls, undefined, "Dify runs its own tools");
    const sent = env.fake.lastBody("/chat-messages");
    assert.match(sent.query, /get_weather/);
    assert.match(sent.query, /\{"city":"Paris"\}/);
    assert.match(sent.query, /18°C and sunny/);
    assert.match(sent.query, /Current message:\n\nand tomorrow\?$/);
    assert.ok(!sent.query.includes("call_1"), "ids are noise for Dify");
    // A turn that ends with a tool result (the client ran a tool) is still answered.
    const s = await streamText(env.client, {
      model: "dify",
      messages: messages.slice(0, 4),
      tools,
      tool_choice: { type: "function", function: { name: "get_weather" } },
    });
    assert.ok(s.content.length > 0);
    assert.match(env.fake.lastBody("/chat-messages").query, /18°C and sunny/);
  } finally {
    await env.close();
  }
});

// ─── Pure helpers ───────────────────────────────────────────────────────────────────────────────

test("content: difyFileType maps names (then MIME types) to Dify's file types", () => {
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

test("content: workflowAnswer picks the configured output, a usual name, or JSON", () => {
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

test("content: thoughtText shows the thought, the tool call and its result, but not the repeated answer", () => {
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

test("content: the New Agent's closing message is not appended again, in every REASONING mode", async () => {
  const head = { conversation_id: "c-9", message_id: "m-9", created_at: 1, task_id: "t-9" };
  const thought = (rest: Record<string, unknown>) => ({
    event: "agent_thought",
    ...head,
    id: "th-1",
    position: 1,
    thought: "",
    observation: "",
    tool: "",
    tool_input: "",
    ...rest,
  });
  const mini = await contentMiniDify(() =>
    contentSse([
      thought({ tool: "search", tool_input: '{"q":"weather"}' }),
      thought({ tool: "search", tool_input: '{"q":"weather"}', observation: "sunny" }),
      { event: "message_file", ...head, id: "f-1", type: "image", belongs_to: "assistant", url: "/files/w.png" },
      { event: "agent_message", ...head, id: "m-9", answer: "It is" },
      { event: "agent_message", ...head, id: "m-9", answer: " sunny." },
      thought({ id: "th-2", position: 2, thought: "It is sunny." }),
      { event: "message", ...head, id: "m-9", answer: "It is sunny." },
      { event: "message_end", ...head, id: "m-9", metadata: { usage: { prompt_tokens: 5, completion_tokens: 3 } } },
    ])
  );
  try {
    for (const mode of ["reasoning_content", "think", "off"]) {
      const bridge = await startBridge({
        DIFY_API_URL: mini.url,
        DIFY_APPS: JSON.stringify({ agent: { key: "app-new-agent", type: "agent" } }),
        REASONING: mode,
        CONVERSATION_MODE: "off",
      });
      try {
        const s = await streamText(bridge.client(), { model: "agent", messages: [user("weather?")] });
        assert.equal(contentCount(s.content, "It is sunny."), 1, `${mode}: ${s.content}`);
        assert.ok(s.content.includes(`![image](${mini.origin}/files/w.png)`), mode);
        const r = await bridge.client().chat.completions.create({
          model: "agent",
          messages: [user("weather?")] as never,
        });
        assert.equal(r.choices[0].message.content, s.content, mode);
      } finally {
        await bridge.close();
      }
    }
  } finally {
    await mini.close();
  }
});

// ═══ hardening ══════════════════════════════════════════════════════════════════════════════════

// ─── Helpers ────────────────────────────────────────────────────────────────────────────────────

/** mulberry32: a small seeded PRNG, so a failing fuzz case reproduces from its seed and index. */
function hardeningRng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  return {
    next,
    int,
    chance: (p: number) => next() < p,
    pick: <T>(xs: readonly T[]): T => xs[int(xs.length)],
  };
}
type HardeningRng = ReturnType<typeof hardeningRng>;

/** Asserts an OpenAI-shaped error body: `{"error": {message, type, param, code}}`. */
function hardeningAssertErrorShape(text: string, context: string) {
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch {
    assert.fail(`${context}: error body is not JSON: ${text.slice(0, 200)}`);
  }
  const e = (body as { error?: Record<string, unknown> }).error;
  assert.ok(e && typeof e === "object", `${context}: no error object in ${text.slice(0, 200)}`);
  assert.equal(typeof e.message, "string", context);
  assert.equal(typeof e.type, "string", context);
  assert.ok("param" in e && (e.param === null || typeof e.param === "string"), `${context}: param`);
  assert.ok("code" in e && (e.code === null || typeof e.code === "string"), `${context}: code`);
  return e as { message: string; type: string; param: string | null; code: string | null };
}

async function hardeningHealthy(bridgeUrl: string) {
  const res = await fetch(bridgeUrl.replace(/\/v1$/, "") + "/healthz");
  const body = await res.json();
  assert.equal(res.status, 200);
  assert.equal(body.status, "ok");
  return body as { status: string; streams: number };
}

/** What a chat completion through the SDK came to: an answer, or the APIError it raised (and when). */
async function hardeningSdk(client: OpenAI, body: Record<string, unknown>) {
  let content = "";
  try {
    if (body.stream) {
      const stream = await client.chat.completions.create(body as never) as unknown as AsyncIterable<
        { choices: { delta: { content?: string } }[] }
      >;
      try {
        for await (const chunk of stream) for (const c of chunk.choices) content += c.delta?.content ?? "";
      } catch (e) {
        return { content, error: e, midStream: true };
      }
    } else {
      const done = await client.chat.completions.create(body as never) as {
        choices: { message: { content: string } }[];
      };
      content = done.choices[0].message.content;
    }
  } catch (e) {
    return { content, error: e, midStream: false };
  }
  return { content, error: undefined, midStream: false };
}

// ─── Fuzz ───────────────────────────────────────────────────────────────────────────────────────

const HARDENING_FUZZ_MODELS = ["dify", "agent", "flow", "wf", "comp"];
const HARDENING_FUZZ_FIELDS = [
  "model",
  "messages",
  "stream",
  "stream_options",
  "n",
  "user",
  "tools",
  "tool_choice",
  "metadata",
  "inputs",
  "conversation_id",
  "prompt_cache_key",
  "temperature",
  "max_tokens",
];
const HARDENING_FUZZ_ROLES = [
  "user",
  "user",
  "user",
  "assistant",
  "system",
  "developer",
  "tool",
  "function",
  "robot",
  "",
  "USER",
  "constructor",
  "__proto__",
  "toString",
  "hasOwnProperty",
  "valueOf",
];
const HARDENING_FUZZ_PART_TYPES = [
  "text",
  "text",
  "input_text",
  "output_text",
  "refusal",
  "image_url",
  "input_image",
  "file",
  "input_file",
  "audio",
  "video_url",
  "",
  "constructor",
  "__proto__",
];
const HARDENING_FUZZ_WORDS = [
  "hello",
  "héllo",
  "日本語",
  "🙂",
  "a\u0000b",
  "\u2028",
  "<think>x</think>",
  "\\",
  '"',
  "\r\n",
  "   ",
];

/** Strings the server's text processing could spend quadratic time on, at ~0.2–0.8 MB. */
function hardeningFuzzPathological(r: HardeningRng): string {
  const n = 10_000 + r.int(30_000);
  switch (r.int(6)) {
    case 0:
      return "[" + "2026-01-01 10:00 ".repeat(n);
    case 1:
      return "\nAb (untrusted metadata):\n```json\n".repeat(n);
    case 2:
      return "Conversation info: ⟦openclaw:ctx⟧\n```json\n{".repeat(n);
    case 3:
      return "<think>".repeat(n * 2);
    case 4:
      return "openclaw\nRuntime: agent=" + " ".repeat(n * 20) + "x";
    default:
      return "<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>" + "<<<END_OPENCLAW_INTERNAL_CONTEXT>>> x".repeat(n);
  }
}

function hardeningFuzzString(r: HardeningRng): string {
  if (r.chance(0.004)) return "x".repeat(1_000_000 + r.int(1_000_000));
  if (r.chance(0.006)) return hardeningFuzzPathological(r);
  const words: string[] = [];
  for (let i = r.int(6); i >= 0; i--) words.push(r.chance(0.5) ? r.pick(HARDENING_FUZZ_WORDS) : String(r.int(1e6)));
  return words.join(" ");
}

/** 10,000 levels of arrays, `[[[…]]]`: a marker in the value, swapped for the raw text when sent. */
const HARDENING_FUZZ_DEEP_MARK = "\u0001deep\u0001";
const HARDENING_FUZZ_DEEP_TEXT = "[".repeat(10_000) + "]".repeat(10_000);
function hardeningFuzzDeep(): unknown {
  return HARDENING_FUZZ_DEEP_MARK;
}

/** A body value as JSON text with the deep-nesting markers expanded. */
function hardeningFuzzJson(value: unknown): string {
  return JSON.stringify(value).replaceAll(JSON.stringify(HARDENING_FUZZ_DEEP_MARK), HARDENING_FUZZ_DEEP_TEXT);
}

function hardeningFuzzValue(r: HardeningRng, depth = 0): unknown {
  switch (r.int(depth > 2 ? 9 : 14)) {
    case 0:
      return null;
    case 1:
      return r.chance(0.5);
    case 2:
      return r.pick([0, -1, 1, 2, 1.5, 1e308, -0, 2 ** 53 + 1]);
    case 3:
      return "";
    case 4:
    case 5:
      return hardeningFuzzString(r);
    case 6:
      return [];
    case 7:
      return {};
    case 8:
      // Own keys named like Object.prototype's members (an object literal's __proto__ is not a key).
      return JSON.parse('{"toString":1,"valueOf":"x","__proto__":{"polluted":true},"constructor":[]}');
    case 9:
      return hardeningFuzzDeep();
    case 10:
    case 11:
      return Array.from({ length: r.int(4) }, () => hardeningFuzzValue(r, depth + 1));
    default:
      return Object.fromEntries(
        Array.from({ length: r.int(4) }, () => [hardeningFuzzString(r), hardeningFuzzValue(r, depth + 1)]),
      );
  }
}

function hardeningFuzzPart(r: HardeningRng, hitUrl: string): unknown {
  if (r.chance(0.05)) return hardeningFuzzValue(r);
  const type = r.pick(HARDENING_FUZZ_PART_TYPES);
  const part: Record<string, unknown> = { type };
  if (r.chance(0.8)) part.text = r.chance(0.85) ? hardeningFuzzString(r) : hardeningFuzzValue(r);
  if (type.includes("image") || r.chance(0.1)) {
    const url = r.pick([
      `${hitUrl}/image.png`,
      "data:image/png;base64,iVBORw0KGgo=",
      "data:image/png;base64,!!!not base64!!!",
      "data:image/png,plain",
      "data:;base64,AAAA",
      "ftp://example.com/x.png",
      "",
    ]);
    part.image_url = r.chance(0.8) ? { url: r.chance(0.9) ? url : hardeningFuzzValue(r) } : url;
  }
  if (type.includes("file") || r.chance(0.1)) {
    const file: Record<string, unknown> = { filename: r.pick(["a.pdf", "notes.txt", "x", "", "run.exe"]) };
    if (r.chance(0.5)) file.file_data = r.pick(["aGVsbG8=", "data:text/plain;base64,aGVsbG8=", "%%%", ""]);
    else file.file_url = r.pick([`${hitUrl}/doc.pdf`, "file:///etc/passwd", 42]);
    Object.assign(part, r.chance(0.7) ? { file } : file);
  }
  return part;
}

function hardeningFuzzContent(r: HardeningRng, hitUrl: string): unknown {
  switch (r.int(10)) {
    case 0:
      return null;
    case 1:
      return hardeningFuzzValue(r);
    case 2:
      return [];
    case 3:
      return r.chance(0.1)
        ? Array.from({ length: 10_000 }, () => ({ type: "text", text: "x" }))
        : Array.from({ length: 1 + r.int(4) }, () => hardeningFuzzPart(r, hitUrl));
    case 4:
      return [{ type: "text", text: hardeningFuzzString(r) }];
    default:
      return hardeningFuzzString(r);
  }
}

function hardeningFuzzMessage(r: HardeningRng, hitUrl: string): unknown {
  if (r.chance(0.04)) return hardeningFuzzValue(r);
  const m: Record<string, unknown> = { role: r.chance(0.05) ? hardeningFuzzValue(r) : r.pick(HARDENING_FUZZ_ROLES) };
  if (r.chance(0.95)) m.content = hardeningFuzzContent(r, hitUrl);
  if (m.role === "assistant" && r.chance(0.3)) {
    m.tool_calls = r.chance(0.5)
      ? [{ id: "c1", type: "function", function: { name: hardeningFuzzValue(r), arguments: hardeningFuzzValue(r) } }]
      : hardeningFuzzValue(r);
  }
  if (r.chance(0.05)) m.name = hardeningFuzzValue(r);
  return m;
}

/** One random request body: JSON text, or bytes for the mutations JSON cannot express. */
function hardeningFuzzBody(r: HardeningRng, hitUrl: string): string | Uint8Array {
  const body: Record<string, unknown> = {
    model: r.pick(HARDENING_FUZZ_MODELS),
    messages: [user(`hello ${r.int(1e9)}`)],
  };
  if (r.chance(0.5)) body.stream = true;
  for (let i = 1 + r.int(3); i > 0; i--) {
    switch (r.int(8)) {
      case 0:
        body[r.pick(HARDENING_FUZZ_FIELDS)] = hardeningFuzzValue(r);
        break;
      case 1:
        delete body[r.pick(HARDENING_FUZZ_FIELDS)];
        break;
      case 2:
      case 3:
        body.messages = Array.from({ length: r.int(5) }, () => hardeningFuzzMessage(r, hitUrl));
        if (r.chance(0.7)) (body.messages as unknown[]).push(user(hardeningFuzzString(r)));
        break;
      case 4:
        body.messages = [...Array.isArray(body.messages) ? body.messages : [], hardeningFuzzMessage(r, hitUrl)];
        break;
      case 5:
        body.n = r.pick([0, 1, 2, 3, "1", 1.0, -1, null]);
        break;
      case 6:
        body.stream_options = r.pick([{ include_usage: true }, { include_usage: "yes" }, "usage", [], null]);
        break;
      default:
        body[r.pick(HARDENING_FUZZ_FIELDS)] = r.pick([
          null,
          "",
          [],
          {},
          hardeningFuzzDeep(),
          { toString: 1 },
          hardeningFuzzString(r),
        ]);
    }
  }
  if (r.chance(0.04)) body.messages = Array.from({ length: 5_001 }, () => user("x"));
  if (r.chance(0.03)) return hardeningFuzzJson(r.pick([null, 1, "text", [], [body], true, hardeningFuzzDeep()]));
  const json = hardeningFuzzJson(body);
  if (!r.chance(0.12)) return json;
  // Raw-text mutations: what JSON.stringify cannot produce.
  const bytes = new TextEncoder().encode(json);
  switch (r.int(6)) {
    case 0:
      return new TextEncoder().encode(json.replace(/^\{/, `{"n":${r.pick(["NaN", "Infinity", "-Infinity"])},`));
    case 1:
      return bytes.subarray(0, r.int(bytes.length));
    case 2: {
      const bad = r.pick([[0xff], [0xc3, 0x28], [0xed, 0xa0, 0x80], [0xf8, 0x88, 0x80, 0x80, 0x80], [0xc0, 0xaf]]);
      const at = json.indexOf("hello");
      const cut = at > 0 ? at : r.int(bytes.length);
      return new Uint8Array([...bytes.subarray(0, cut), ...bad, ...bytes.subarray(cut)]);
    }
    case 3:
      return new TextEncoder().encode(json + r.pick(["}", " garbage", "\u0000", ",{}"]));
    case 4:
      return new TextEncoder().encode("\ufeff" + json);
    default:
      return new Uint8Array(0);
  }
}

test(
  "hardening: fuzz: thousands of random and mutated bodies get a 200 or an OpenAI-shaped 4xx, never a 500 or a hang",
  async () => {
    const SEED = 7_2026;
    const COUNT = 3000;
    let hits = 0;
    const hitServer = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen() {} }, () => {
      hits++;
      return new Response("no");
    });
    const hitUrl = `http://127.0.0.1:${hitServer.addr.port}`;
    const apps = {
      dify: "app-chat",
      agent: "app-agent",
      flow: "app-chatflow",
      wf: "app-workflow",
      comp: "app-completion",
    };
    try {
      await withBridge({ DIFY_API_KEY: "", DIFY_APPS: JSON.stringify(apps) }, async ({ dify, bridge }) => {
        const r = hardeningRng(SEED);
        const bodies = Array.from({ length: COUNT }, () => hardeningFuzzBody(r, hitUrl));
        const statuses = new Map<number, number>();
        let next = 0;
        const worker = async () => {
          while (next < bodies.length) {
            const i = next++;
            const raw = bodies[i];
            const context = `seed ${SEED} #${i}: ${
              typeof raw === "string" ? raw.slice(0, 160) : new TextDecoder().decode(raw.subarray(0, 160))
            }`;
            let res: Response;
            let text: string;
            try {
              res = await fetch(`${bridge.url}/chat/completions`, {
                method: "POST",
                headers: { "content-type": "application/json", authorization: "Bearer sk-fuzz" },
                body: raw as BodyInit,
                signal: AbortSignal.timeout(20_000),
              });
              text = await res.text();
            } catch (e) {
              throw new Error(`${context}: no answer (${(e as Error).name}: ${(e as Error).message})`);
            }
            statuses.set(res.status, (statuses.get(res.status) ?? 0) + 1);
            if (res.status === 200) {
              if ((res.headers.get("content-type") ?? "").includes("event-stream")) {
                assert.equal(sseData(text).at(-1), "[DONE]", `${context}: stream did not end with [DONE]`);
              } else assert.equal(JSON.parse(text).object, "chat.completion", context);
            } else {
              assert.ok(
                res.status >= 400 && res.status < 500,
                `${context}: status ${res.status}: ${text.slice(0, 300)}`,
              );
              hardeningAssertErrorShape(text, context);
            }
          }
        };
        await Promise.all(Array.from({ length: 16 }, worker));
        // Both outcomes really happened: the fuzz reached Dify and was also refused.
        assert.ok((statuses.get(200) ?? 0) > COUNT / 20, `statuses: ${JSON.stringify([...statuses])}`);
        assert.ok((statuses.get(400) ?? 0) > COUNT / 4, `statuses: ${JSON.stringify([...statuses])}`);
        assert.ok(dify.generateBodies().length > 0);
        const health = await hardeningHealthy(bridge.url);
        assert.equal(health.streams, 0);
        assert.deepEqual(bridge.warnings.filter((w) => w.includes("unexpected error")), []);
        assert.equal(({} as Record<string, unknown>).polluted, undefined, "Object.prototype was polluted");
        // Still answers normally afterwards.
        const ok = await bridge.client().chat.completions.create({ model: "dify", messages: [user("still here")] });
        assert.match(ok.choices[0].message.content ?? "", /still here/);
      });
      assert.equal(hits, 0, "the server fetched a URL the client supplied");
    } finally {
      await hitServer.shutdown();
    }
  },
);

test(
  "hardening: fuzz: prototype names are unknown roles and part types; deep or hostile values are never a 500",
  async () => {
    await withBridge({}, async ({ bridge }) => {
      const deep = "[".repeat(10_000) + "]".repeat(10_000);
      const cases: [string, string][] = [
        ...["constructor", "__proto__", "toString", "hasOwnProperty", "valueOf", "robot"].map((
          role,
        ): [string, string] => [
          JSON.stringify({ model: "dify", messages: [user("hi"), { role, content: "x" }] }),
          "messages[1].role",
        ]),
        ...["constructor", "__proto__", "toString", "audio"].map((type): [string, string] => [
          JSON.stringify({ model: "dify", messages: [user([{ type, text: "x" }])] }),
          "messages[0].content[0].type",
        ]),
        [`{"model":"dify","messages":[{"role":${deep},"content":"x"}]}`, "messages[0].role"],
        [`{"model":"dify","messages":[{"role":"user","content":[{"type":${deep}}]}]}`, "messages[0].content[0].type"],
        [`{"model":"dify","messages":${deep}}`, "messages[0]"],
        [`{"model":${deep},"messages":[{"role":"user","content":"x"}]}`, "model"],
      ];
      for (const [body, param] of cases) {
        const res = await rawChat(bridge.url, body);
        assert.equal(res.status, 400, `${body.slice(0, 100)}: ${res.text.slice(0, 200)}`);
        const e = hardeningAssertErrorShape(res.text, body.slice(0, 100));
        assert.equal(e.param, param, body.slice(0, 100));
        assert.ok(e.message.length < 1000, "the error message echoes a bounded preview of the value");
      }
      // Hostile shapes in fields the bridge reads but does not validate strictly still answer.
      const hostile = [
        {
          model: "dify",
          messages: [user("q"), {
            role: "assistant",
            content: "a",
            tool_calls: [{ function: { name: { toString: 1 }, arguments: JSON.parse(deep) } }],
          }, user("next")],
        },
        { model: "dify", messages: [user("q")], inputs: { deep: JSON.parse(deep), toString: 1 } },
        { model: "dify", messages: [user("q")], metadata: { chat_id: { toString: 1 } } },
      ];
      for (const body of hostile) {
        const res = await rawChat(bridge.url, body);
        assert.equal(res.status, 200, `${JSON.stringify(body).slice(0, 120)}: ${res.text.slice(0, 300)}`);
      }
      assert.deepEqual(bridge.warnings, []);
    });
  },
);

test("hardening: fuzz: huge pathological texts (envelope, <think>, timestamps) do not stall the server", async () => {
  // Backtracking regexes (envelope timestamp and blocks, <think> stripping) once spent 15 s or more
  // of event-loop time on each of these, stalling every request; a stall shows as a timeout here.
  await withBridge({}, async ({ bridge }) => {
    const texts = [
      "[" + "2026-01-01 10:00 ".repeat(40_000),
      "\nAb (untrusted metadata):\n```json\n".repeat(40_000),
      "Conversation info: ⟦openclaw:ctx⟧\n```json\n{".repeat(40_000),
      "<think>".repeat(200_000),
    ];
    for (const text of texts) {
      for (const messages of [[user(text)], [user("q"), assistant(text), user("next")]]) {
        const res = await fetch(`${bridge.url}/chat/completions`, {
          method: "POST",
          headers: { "content-type": "application/json", authorization: "Bearer sk" },
          body: JSON.stringify({ model: "dify", messages }),
          signal: AbortSignal.timeout(10_000),
        });
        const body = await res.text();
        assert.equal(res.status, 200, body.slice(0, 200));
      }
    }
  });
});

// ─── Limits ─────────────────────────────────────────────────────────────────────────────────────

/** Sends raw HTTP over a new TCP connection; returns what the server answered (or "" at `waitMs`). */
async function hardeningRawHttp(port: number, head: string, body: string, waitMs: number): Promise<string> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await conn.write(new TextEncoder().encode(head + body));
    const buf = new Uint8Array(65536);
    let text = "";
    const deadline = Date.now() + waitMs;
    while (Date.now() < deadline) {
      const timer = new Promise<null>((resolve) => setTimeout(() => resolve(null), deadline - Date.now()));
      const read = conn.read(buf).catch(() => null);
      const n = await Promise.race([read, timer]);
      if (n === null) break;
      text += new TextDecoder().decode(buf.subarray(0, n));
      if (/\r\n\r\n[\s\S]*\}/.test(text)) break;
    }
    return text;
  } finally {
    try {
      conn.close();
    } catch { /* closed by the server */ }
  }
}

test(
  "hardening: limits: oversized bodies (declared or chunked), slow bodies, too many messages, 10,000 parts",
  async () => {
    await withBridge(
      { MAX_BODY_BYTES: "400000", BODY_TIMEOUT_SECONDS: "0.5", MAX_MESSAGES: "50" },
      async ({ dify, bridge }) => {
        const big = JSON.stringify({ model: "dify", messages: [user("x".repeat(500_000))] });
        // With a Content-Length.
        const declared = await rawChat(bridge.url, big);
        assert.equal(declared.status, 413);
        assert.equal(hardeningAssertErrorShape(declared.text, "413").code, "request_too_large");
        // Chunked, no Content-Length: counted while reading.
        const bytes = new TextEncoder().encode(big);
        const chunked = await fetch(`${bridge.url}/chat/completions`, {
          method: "POST",
          headers: { "content-type": "application/json", authorization: "Bearer sk" },
          body: new ReadableStream<Uint8Array>({
            start(c) {
              for (let i = 0; i < bytes.length; i += 10_000) c.enqueue(bytes.slice(i, i + 10_000));
              c.close();
            },
          }),
          duplex: "half",
        } as RequestInit);
        assert.equal(chunked.status, 413);
        hardeningAssertErrorShape(await chunked.text(), "chunked 413");
        // Slow loris: headers promise 1000 bytes, 10 arrive, then nothing.
        const port = Number(new URL(bridge.url).port);
        const answer = await hardeningRawHttp(
          port,
          "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
            "Authorization: Bearer sk\r\nContent-Length: 1000\r\n\r\n",
          '{"model":"',
          10_000,
        );
        assert.match(answer, /^HTTP\/1\.1 408/, answer.slice(0, 200));
        const e = hardeningAssertErrorShape(
          answer.slice(answer.indexOf("\r\n\r\n") + 4).replace(/^[0-9a-f]+\r\n/, ""),
          "408",
        );
        assert.equal(e.code, "request_timeout");
        // Too many messages; a content array of 10,000 parts (the default MAX_CONTENT_PARTS is 1000).
        const many = await rawChat(bridge.url, {
          model: "dify",
          messages: Array.from({ length: 51 }, () => user("x")),
        });
        assert.equal(many.status, 400);
        assert.equal(hardeningAssertErrorShape(many.text, "messages").param, "messages");
        const parts = await rawChat(bridge.url, {
          model: "dify",
          messages: [user(Array.from({ length: 10_000 }, () => ({ type: "text", text: "x" })))],
        });
        assert.equal(parts.status, 400);
        assert.equal(hardeningAssertErrorShape(parts.text, "parts").param, "messages[0].content");
        // None of them reached Dify, and the server still answers.
        assert.equal(dify.generateBodies().length, 0);
        const ok = await rawChat(bridge.url, { model: "dify", messages: Array.from({ length: 50 }, () => user("y")) });
        assert.equal(ok.status, 200, ok.text);
        assert.equal((await hardeningHealthy(bridge.url)).streams, 0);
      },
    );
  },
);

test(
  "hardening: limits: MAX_CONCURRENT_STREAMS — past it a 503 with Retry-After; after release, requests work again",
  async () => {
    await withBridge({ MAX_CONCURRENT_STREAMS: "2" }, async ({ dify, bridge }) => {
      const held = [1, 2].map((i) =>
        rawChat(bridge.url, { model: "dify", stream: true, messages: [user(`held ${i} fault:hold`)] })
      );
      await until(() => dify.held() >= 2, 5_000);
      assert.equal(dify.held(), 2);
      assert.equal((await hardeningHealthy(bridge.url)).streams, 2);
      for (const stream of [true, false]) {
        const third = await rawChat(bridge.url, { model: "dify", stream, messages: [user("third")] });
        assert.equal(third.status, 503);
        assert.ok(Number(third.headers.get("retry-after")) >= 1);
        assert.equal(hardeningAssertErrorShape(third.text, "503").code, "overloaded");
      }
      // The SDK sees it as an APIError (retries are the client's choice; maxRetries is 0 here).
      const viaSdk = await hardeningSdk(bridge.client(), { model: "dify", messages: [user("sdk")] });
      assert.ok(viaSdk.error instanceof OpenAI.APIError && viaSdk.error.status === 503);
      dify.release();
      for (const res of await Promise.all(held)) {
        assert.equal(res.status, 200);
        assert.equal(sseData(res.text).at(-1), "[DONE]");
      }
      assert.equal((await hardeningHealthy(bridge.url)).streams, 0);
      const after = await Promise.all(
        [1, 2].map((i) => bridge.client().chat.completions.create({ model: "dify", messages: [user(`after ${i}`)] })),
      );
      assert.ok(after.every((c, i) => c.choices[0].message.content?.includes(`after ${i + 1}`)));
    });
  },
);

// ─── Dify faults ────────────────────────────────────────────────────────────────────────────────

interface HardeningFault {
  query: string;
  /** HTTP status the client gets when the fault comes before any content. */
  status?: number;
  /** The fault comes mid-answer: a stream ends with an error frame; `stream: false` gets this status. */
  midStream?: number;
  message?: RegExp;
  retryAfter?: boolean;
  /** No error: the answer (or its length) that must arrive intact. */
  answer?: (content: string) => void;
}

const HARDENING_FAULTS: HardeningFault[] = [
  { query: "fault:status_401", status: 502, message: /model dify.*rejected/ },
  { query: "fault:status_403", status: 502, message: /model dify.*rejected/ },
  { query: "fault:status_404", status: 502, message: /DIFY_API_URL for model dify/ },
  { query: "fault:status_413", status: 413 },
  { query: "fault:status_415", status: 502 },
  { query: "fault:status_429", status: 429, retryAfter: true },
  { query: "fault:status_500", status: 502 },
  { query: "fault:status_503", status: 502 },
  { query: "fault:http_completion_request_error", status: 400 },
  { query: "fault:html502", status: 502, message: /HTML error page/ },
  { query: "fault:json_instead", status: 502, message: /where an event stream was expected/ },
  { query: "fault:error200", status: 400, message: /boom/ },
  { query: "fault:first_byte:5000", status: 504, message: /UPSTREAM_TIMEOUT_SECONDS/ },
  { query: "fault:reset", midStream: 502 },
  { query: "fault:eof", midStream: 502, message: /message_end/ },
  { query: "fault:idle:5000", midStream: 504, message: /UPSTREAM_IDLE_SECONDS/ },
  { query: "fault:midstream_error", midStream: 400 },
  {
    query: "fault:malformed and more words",
    answer: (c) => assert.match(c, /^Turn 1 of [0-9a-f]{8}: fault:malformed and more words$/),
  },
  { query: "fault:huge_line:5000000", answer: (c) => assert.ok(c.length === 5_000_000 && /^x+$/.test(c)) },
];

test(
  "hardening: dify faults: every failure is a clear status or error frame the SDK raises, streaming and not",
  async () => {
    await withBridge(
      { UPSTREAM_TIMEOUT_SECONDS: "0.5", UPSTREAM_IDLE_SECONDS: "0.5" },
      async ({ bridge }) => {
        const client = bridge.client();
        for (const f of HARDENING_FAULTS) {
          for (const stream of [true, false]) {
            const what = `${f.query} stream=${stream}`;
            const got = await hardeningSdk(client, { model: "dify", stream, messages: [user(f.query)] });
            if (f.answer) {
              assert.equal(got.error, undefined, `${what}: ${got.error}`);
              f.answer(got.content);
              continue;
            }
            // The SDK raises: the error never shows up as the answer.
            assert.ok(got.error instanceof OpenAI.APIError, `${what}: ${got.error ?? "no error"}`);
            const e = got.error as InstanceType<typeof OpenAI.APIError>;
            if (f.message) assert.match(e.message, f.message, what);
            const expected = f.status ?? (stream ? undefined : f.midStream);
            if (expected) {
              assert.equal(e.status, expected, `${what}: ${e.message}`);
              assert.equal(got.midStream, false, what);
            } else {
              // Mid-answer: the partial text arrived, then the error frame ended the stream.
              assert.ok(got.midStream && got.content.length > 0, `${what}: midStream=${got.midStream}`);
            }
            // The raw view of the same: an OpenAI-shaped body, a Retry-After where asked; a stream that
            // ends with the error frame and no [DONE].
            const raw = await rawChat(bridge.url, { model: "dify", stream, messages: [user(f.query)] });
            if (expected) {
              assert.equal(raw.status, expected, what);
              hardeningAssertErrorShape(raw.text, what);
              if (f.retryAfter) assert.ok(Number(raw.headers.get("retry-after")) >= 1, what);
            } else {
              assert.equal(raw.status, 200, what);
              const frames = sseData(raw.text);
              const last = frames.at(-1) as { error?: { code?: string } };
              assert.ok(last?.error, `${what}: last frame ${JSON.stringify(last)}`);
              hardeningAssertErrorShape(JSON.stringify(last), what);
              assert.ok(!frames.includes("[DONE]"), what);
            }
            assert.notEqual(raw.status, 500, what);
          }
        }
        assert.equal((await hardeningHealthy(bridge.url)).streams, 0);
      },
    );
  },
);

test(
  "hardening: dify faults: split reads, CRLF and garbage lines keep the answer intact; a refused upload is a 400",
  async () => {
    // Every 7 bytes a separate write: multi-byte characters and line ends split across reads.
    const dify = await startFakeDify({ sliceBytes: 7, crlf: true });
    const bridge = await startBridge({ DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat" });
    try {
      const query = "fault:malformed 日本語 😀 héllo ∑";
      for (const stream of [true, false]) {
        const got = await hardeningSdk(bridge.client(), { model: "dify", stream, messages: [user(query)] });
        assert.equal(got.error, undefined, String(got.error));
        assert.match(got.content, new RegExp(`^Turn 1 of [0-9a-f]{8}: ${query}$`));
      }
    } finally {
      await bridge.close();
      await dify.close();
    }
    // Dify refuses a file's type (415 on upload, errors.json `upload_unsupported_type`): retrying
    // cannot help, so a 400, not a 502 that OpenClaw would retry eight times.
    const uploads: string[] = [];
    const refusing = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen() {} }, (req) => {
      uploads.push(new URL(req.url).pathname);
      return Response.json({ code: "unsupported_file_type", message: "File type not allowed.", status: 415 }, {
        status: 415,
      });
    });
    const files = await startBridge({
      DIFY_API_URL: `http://127.0.0.1:${refusing.addr.port}/v1`,
      DIFY_APPS: JSON.stringify({ dify: { key: "app-chat", type: "chat" } }),
    });
    try {
      const res = await rawChat(files.url, {
        model: "dify",
        messages: [
          user([{ type: "text", text: "see" }, { type: "file", file: { filename: "a.xyz", file_data: "aGk=" } }]),
        ],
      });
      assert.equal(res.status, 400, res.text);
      assert.match(hardeningAssertErrorShape(res.text, "upload 415").message, /File type not allowed/);
      assert.deepEqual(uploads, ["/v1/files/upload"]);
    } finally {
      await files.close();
      await refusing.shutdown();
    }
  },
);

test(
  "hardening: dify faults: a Dify that only pings still gets the response started; a client that leaves frees its slot",
  async () => {
    await withBridge({ KEEPALIVE_SECONDS: "0.1" }, async ({ dify, bridge }) => {
      // Dify pings every 50 ms and says nothing: the keepalive still commits the response, so the
      // client sees headers and keepalive comments instead of waiting for a first byte.
      const pinging = await fetch(`${bridge.url}/chat/completions`, {
        method: "POST",
        headers: { authorization: "Bearer sk" },
        body: JSON.stringify({ model: "dify", stream: true, messages: [user("fault:forever")] }),
        signal: AbortSignal.timeout(10_000),
      });
      assert.equal(pinging.status, 200);
      const pings = pinging.body!.getReader();
      const text = await hardeningReadUntil(pings, "", (t) => t.includes(": ping") || t.includes(": keepalive"));
      assert.match(text, /"role":"assistant"/);
      await pings.cancel();
      // A client that leaves mid-answer: Dify's task is stopped and the slot is free again.
      const slow = await fetch(`${bridge.url}/chat/completions`, {
        method: "POST",
        headers: { authorization: "Bearer sk" },
        body: JSON.stringify({ model: "dify", stream: true, messages: [user("fault:slow:200 a b c d e f g h i j")] }),
        signal: AbortSignal.timeout(10_000),
      });
      const reader = slow.body!.getReader();
      await hardeningReadUntil(reader, "", (t) => t.includes('"content":"Turn"'));
      await reader.cancel();
      await until(() => dify.stops.length > 0, 3_000);
      assert.equal(dify.stops.length, 1);
      assert.ok(bridge.logs.some((l) => JSON.parse(l).error === "client_closed"));
    });
  },
);

test(
  "hardening: dify faults: unreachable Dify (refused, DNS) → 502; a pass-through key Dify rejects → 401/403",
  async () => {
    const dify = await startFakeDify();
    const bridges = await Promise.all([
      startBridge({ DIFY_API_URL: `http://127.0.0.1:${closedPort()}/v1`, DIFY_API_KEY: "app-chat" }),
      startBridge({ DIFY_API_URL: "http://nonexistent.invalid/v1", DIFY_API_KEY: "app-chat" }),
      startBridge({ DIFY_API_URL: dify.url }),
    ]);
    const [refused, dns, open] = bridges;
    try {
      for (const bridge of [refused, dns]) {
        for (const stream of [true, false]) {
          const got = await hardeningSdk(bridge.client(), { model: "dify", stream, messages: [user("hi")] });
          assert.ok(got.error instanceof OpenAI.APIError, String(got.error));
          assert.equal(got.error.status, 502, got.error.message);
          assert.match(got.error.message, /could not reach Dify for model dify/);
          assert.match(got.error.message, bridge === refused ? /refused/i : /dns|lookup|resolve/i);
        }
        assert.equal((await hardeningHealthy(bridge.url)).streams, 0);
      }
      // Pass-through: the client's own key was rejected — the client's to fix, so its status.
      const cases: [string, string, number][] = [
        ["app-chat", "fault:status_401", 401],
        ["app-chat", "fault:status_403", 403],
        ["app-bad", "hi", 401],
        ["app-gone", "hi", 403],
      ];
      for (const [key, query, status] of cases) {
        for (const stream of [true, false]) {
          const got = await hardeningSdk(open.client(key), { model: "any", stream, messages: [user(query)] });
          assert.ok(got.error instanceof OpenAI.APIError, `${key} ${query}`);
          assert.equal(got.error.status, status, `${key} ${query} stream=${stream}: ${got.error.message}`);
        }
      }
      // Faults that would repeat on every retry are never a bare 500 (OpenClaw retries those 8 times).
      const repeat = await Promise.all([
        rawChat(open.url, { model: "any", messages: [user("hi")] }, { authorization: "Bearer app-bad" }),
        rawChat(open.url, { model: "any", messages: [user("hi")] }, { authorization: "Bearer not-a-dify-key" }),
        rawChat(open.url, { model: "any", messages: [user("fault:http_missing_user")] }, {
          authorization: "Bearer app-chat",
        }),
        rawChat(open.url, { model: "any", messages: [] }),
      ]);
      for (const r of repeat) {
        assert.ok(r.status >= 400 && r.status < 500, `${r.status} ${r.text}`);
        hardeningAssertErrorShape(r.text, String(r.status));
      }
    } finally {
      for (const b of bridges) await b.close();
      await dify.close();
    }
  },
);

// ─── Security ───────────────────────────────────────────────────────────────────────────────────

test(
  "hardening: security: a wrong or missing client key is 401 on every route (incl. DELETE, /v1/models); the right one works",
  async () => {
    // Keys are compared as SHA-256 digests, every configured key, with no early exit (main.ts
    // `authenticate` / `sameBytes`): the time taken does not depend on how much of a key matched.
    await withBridge({ PROXY_API_KEYS: "sk-proxy-one, sk-proxy-two" }, async ({ dify, bridge }) => {
      const routes: [string, string, unknown?][] = [
        ["POST", "/v1/chat/completions", { model: "dify", messages: [user("hi")] }],
        ["POST", "/chat/completions", { model: "dify", messages: [user("hi")] }],
        ["GET", "/v1/models"],
        ["GET", "/v1/models/dify"],
        ["GET", "/models"],
        ["DELETE", "/v1/conversations/alice"],
        ["DELETE", "/conversations/alice"],
      ];
      const wrong: Record<string, string>[] = [
        {},
        { authorization: "Bearer sk-wrong-key-9f8e" },
        { authorization: "Bearer sk-proxy-one-but-longer" },
        { authorization: "Bearer sk-proxy-on" },
        { authorization: "Bearer SK-PROXY-ONE" },
        { authorization: "Basic sk-proxy-one" },
        { authorization: "Bearer " },
        { "x-api-key": "sk-wrong-key-9f8e" },
        { authorization: "Bearer sk-proxy-one, sk-proxy-two" },
      ];
      const origin = bridge.url.replace(/\/v1$/, "");
      const call = (method: string, path: string, body: unknown, headers: Record<string, string>) =>
        fetch(origin + path, {
          method,
          headers: { "content-type": "application/json", ...headers },
          body: body === undefined ? undefined : JSON.stringify(body),
        });
      for (const [method, path, body] of routes) {
        for (const headers of wrong) {
          const res = await call(method, path, body, headers);
          const text = await res.text();
          assert.equal(res.status, 401, `${method} ${path} ${JSON.stringify(headers)}`);
          assert.equal(hardeningAssertErrorShape(text, path).type, "authentication_error");
          assert.ok(!text.includes("sk-wrong-key") && !text.includes("sk-proxy"), text);
        }
        const right: Record<string, string>[] = [{ authorization: "Bearer sk-proxy-one" }, {
          "x-api-key": "sk-proxy-two",
        }];
        for (const headers of right) {
          const res = await call(method, path, body, headers);
          await res.body?.cancel();
          assert.equal(res.status, 200, `${method} ${path} ${JSON.stringify(headers)}`);
        }
      }
      // Only the accepted requests reached Dify.
      assert.equal(dify.generateBodies().length, 4);
    });
  },
);

test(
  "hardening: security: one client can never continue or delete another's conversation, same user and messages",
  async () => {
    for (const mode of ["history", "user"]) {
      await withBridge(
        { PROXY_API_KEYS: "sk-alice, sk-bob", CONVERSATION_MODE: mode },
        async ({ dify, bridge }) => {
          const alice = bridge.client("sk-alice");
          const bob = bridge.client("sk-bob");
          const ask = async (client: OpenAI, messages: unknown[], headers: Record<string, string> = {}) => {
            const c = await client.chat.completions.create(
              { model: "dify", user: "same-user", messages } as never,
              { headers },
            ) as { choices: { message: { content: string } }[] };
            const content = c.choices[0].message.content;
            const [, turn, conv] = /^Turn (\d+) of ([0-9a-f]{8})/.exec(content) ?? [];
            return { content, turn: Number(turn), conv };
          };
          const a1 = await ask(alice, [user("hello")]);
          assert.equal(a1.turn, 1);
          // Bob sends exactly what Alice's next turn will look like, under the same `user`.
          const next = [user("hello"), assistant(a1.content), user("next")];
          const b1 = await ask(bob, next);
          assert.equal(b1.turn, 1, `${mode}: Bob landed in Alice's conversation: ${b1.content}`);
          assert.notEqual(b1.conv, a1.conv);
          // Bob deletes "his" conversation for that user: Alice's is untouched.
          const del = await fetch(`${bridge.url}/conversations/same-user`, {
            method: "DELETE",
            headers: { authorization: "Bearer sk-bob" },
          });
          assert.equal(del.status, 200);
          await del.body?.cancel();
          const a2 = await ask(alice, next);
          assert.deepEqual([a2.turn, a2.conv], [2, a1.conv], `${mode}: ${a2.content}`);
          // The same session id from two clients: two conversations.
          const s1 = await ask(alice, [user("in a session")], { "x-session-id": "shared-session" });
          const s2 = await ask(bob, [user("in a session")], { "x-session-id": "shared-session" });
          const s3 = await ask(bob, [user("in a session again")], { "x-session-id": "shared-session" });
          assert.notEqual(s2.conv, s1.conv);
          assert.deepEqual([s3.turn, s3.conv], [2, s2.conv]);
          const aliceConv = [...dify.conversations.values()].find((c) => c.id.startsWith(a1.conv))!;
          assert.deepEqual(aliceConv.turns.map((t) => t.query), ["hello", "next"]);
        },
      );
    }
  },
);

/** Everything a client can see of a response: status line, headers and body. */
async function hardeningVisible(res: Response): Promise<string> {
  const headers = [...res.headers].map(([k, v]) => `${k}: ${v}`).join("\n");
  return `${res.status}\n${headers}\n\n${await res.text()}`;
}

/** Requests that walk the success and error paths, with secrets everywhere they could leak from. */
async function hardeningLeakWalk(base: string, proxyKey: string): Promise<string[]> {
  const seen: string[] = [];
  const post = async (body: unknown, key = proxyKey, extra: Record<string, string> = {}) => {
    const res = await fetch(`${base}/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${key}`, ...extra },
      body: typeof body === "string" ? body : JSON.stringify(body),
    });
    seen.push(await hardeningVisible(res));
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
    seen.push(await hardeningVisible(res));
  }
  return seen;
}

test(
  "hardening: security: keys and tokens never reach logs, error messages or response headers (in-process and subprocess)",
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
      const seen = await hardeningLeakWalk(bridge.url, "sk-proxy-s3cr3t-1");
      // The walk really went through the error paths it names.
      const statuses = seen.map((s) => Number(s.slice(0, 3)));
      for (const status of [200, 400, 401, 404, 502]) assert.ok(statuses.includes(status), `no ${status}`);
      assert.ok(dify.requests.some((r) => r.key === "app-bad") && dify.requests.some((r) => r.key.includes("s3cr3t")));
      for (const text of [...seen, ...bridge.logs, ...bridge.warnings]) assert.doesNotMatch(text, secrets);
      assert.ok(bridge.logs.length >= 14);
      // The same walk against main.ts as a process: nothing on stdout or stderr either.
      proc = await startProcess("deno", env);
      const seenProc = await hardeningLeakWalk(proc.url, "sk-proxy-s3cr3t-2");
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
          seen.push(await hardeningVisible(res));
        }
      }
      assert.deepEqual(seen.map((s) => Number(s.slice(0, 3))), [200, 200, 401, 401, 401, 401]);
      assert.ok(dify.requests.some((r) => r.key === "app-chat-s3cr3t-pass"));
      for (const text of [...seen, ...open.logs, ...open.warnings]) assert.doesNotMatch(text, secrets);
    });
  },
);

test("hardening: security: the server fetches no URL a client supplies (images, files, ids, inputs)", async () => {
  const hits: string[] = [];
  const target = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen() {} }, (req) => {
    hits.push(req.url);
    return new Response("\x89PNG", { headers: { "content-type": "image/png" } });
  });
  const url = `http://127.0.0.1:${target.addr.port}`;
  try {
    await withBridge(
      { DIFY_APPS: JSON.stringify({ chat: "app-chat", wf: "app-workflow" }) },
      async ({ dify, bridge }) => {
        for (const model of ["chat", "wf"]) {
          const res = await rawChat(bridge.url, {
            model,
            user: `${url}/user`,
            metadata: { chat_id: `${url}/chat` },
            inputs: { link: `${url}/input` },
            messages: [user([
              { type: "text", text: `look at ${url}/text` },
              { type: "image_url", image_url: { url: `${url}/image.png` } },
              { type: "input_image", image_url: `${url}/input-image.png` },
              { type: "file", file: { filename: "doc.pdf", file_url: `${url}/doc.pdf` } },
            ])],
          }, { "x-dify-conversation-id": "", "x-session-id": `${url}/session` });
          assert.equal(res.status, 200, res.text);
          // Dify got the links to fetch itself, as remote_url files.
          const files = (dify.lastBody() as { files: { transfer_method: string; url: string }[] }).files;
          assert.deepEqual(files.map((f) => [f.transfer_method, f.url]), [
            ["remote_url", `${url}/image.png`],
            ["remote_url", `${url}/input-image.png`],
            ["remote_url", `${url}/doc.pdf`],
          ]);
        }
        const bad = await rawChat(bridge.url, { model: `${url}/model`, messages: [user("hi")] });
        assert.equal(bad.status, 404);
      },
    );
    assert.deepEqual(hits, []);
  } finally {
    await target.shutdown();
  }
});

// ─── Lifecycle ──────────────────────────────────────────────────────────────────────────────────

/** Reads an SSE response until `until` matches what arrived so far, or its end; fails after 15 s. */
async function hardeningReadUntil(
  reader: ReadableStreamDefaultReader<Uint8Array>,
  sofar: string,
  until: (text: string) => boolean,
): Promise<string> {
  const decoder = new TextDecoder();
  let text = sofar;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`stream stalled; so far: ${text.slice(-300)}`)), 15_000);
  });
  try {
    while (!until(text)) {
      const { value, done } = await Promise.race([reader.read(), timeout]);
      if (done) break;
      text += decoder.decode(value, { stream: true });
    }
  } finally {
    clearTimeout(timer);
  }
  return text;
}

/** True once nothing accepts TCP connections on the port. */
async function hardeningRefuses(port: number): Promise<boolean> {
  for (let i = 0; i < 200; i++) {
    try {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port });
      conn.close();
    } catch (e) {
      if (e instanceof Deno.errors.ConnectionRefused) return true;
      throw e;
    }
    await sleep(10);
  }
  return false;
}

test("hardening: lifecycle: SIGTERM mid-stream — the stream finishes, new connections are refused, exit 0", async () => {
  const dify = await startFakeDify();
  const proc = await startProcess("deno", {
    DIFY_API_URL: dify.url,
    DIFY_API_KEY: "app-chat",
    SHUTDOWN_GRACE_SECONDS: "20",
  });
  try {
    const words = "one two three four five six seven eight nine ten eleven twelve";
    const res = await fetch(`${proc.url}/chat/completions`, {
      method: "POST",
      headers: { authorization: "Bearer sk" },
      body: JSON.stringify({ model: "dify", stream: true, messages: [user(`fault:slow:100 ${words}`)] }),
      signal: AbortSignal.timeout(15_000),
    });
    assert.equal(res.status, 200);
    const reader = res.body!.getReader();
    let text = await hardeningReadUntil(reader, "", (t) => t.includes('"content":"Turn"'));
    proc.process.kill("SIGTERM");
    assert.ok(await hardeningRefuses(proc.port), "still accepting connections after SIGTERM");
    // The answer was still streaming while new connections were refused, and it completes.
    assert.ok(!text.includes("[DONE]"));
    text = await hardeningReadUntil(reader, text, () => false);
    const frames = sseData(text) as { choices?: { delta: { content?: string } }[] }[];
    assert.equal(frames.at(-1), "[DONE]");
    const content = frames.slice(0, -1).map((f) => f.choices?.[0]?.delta.content ?? "").join("");
    assert.match(content, new RegExp(`^Turn 1 of [0-9a-f]{8}: fault:slow:100 ${words}$`));
    assert.equal(await proc.stop(), 0);
    assert.match(proc.output(), /shutting down/);
  } finally {
    await proc.stop();
    await dify.close();
  }
});

test(
  "hardening: lifecycle: a stream longer than SHUTDOWN_GRACE_SECONDS gets an error frame, and the process exits 0",
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
      let text = await hardeningReadUntil(reader, "", (t) => t.includes('"role":"assistant"'));
      proc.process.kill("SIGTERM");
      text = await hardeningReadUntil(reader, text, () => false);
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

test("hardening: lifecycle: a client that stops reading does not keep the process from exiting", async () => {
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

test("hardening: lifecycle: a restart between two turns on the same KV file loses no conversation", async () => {
  const dify = await startFakeDify();
  const dir = await Deno.makeTempDir();
  const env = { DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat", KV_PATH: `${dir}/conversations.kv` };
  try {
    const first = await startProcess("deno", env);
    let a1: string;
    try {
      const c = await new OpenAI({ baseURL: first.url, apiKey: "sk", maxRetries: 0 }).chat.completions.create({
        model: "dify",
        messages: [user("remember me")],
      });
      a1 = c.choices[0].message.content ?? "";
    } finally {
      // Stopped the moment the answer arrived.
      assert.equal(await first.stop(), 0);
    }
    const second = await startProcess("deno", env);
    try {
      const c = await new OpenAI({ baseURL: second.url, apiKey: "sk", maxRetries: 0 }).chat.completions.create({
        model: "dify",
        messages: [user("remember me"), assistant(a1), user("still there?")],
      });
      const conv = /^Turn 1 of ([0-9a-f]{8})/.exec(a1)?.[1];
      assert.ok(conv, a1);
      assert.equal(c.choices[0].message.content, `Turn 2 of ${conv}: still there?`);
    } finally {
      assert.equal(await second.stop(), 0);
    }
  } finally {
    await dify.close();
    await Deno.remove(dir, { recursive: true });
  }
});

test("hardening: lifecycle: invalid configuration stops start-up with exit code 1 and one line on stderr", async () => {
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

// ─── A failing store ────────────────────────────────────────────────────────────────────────────

test(
  "hardening: kv failing: every store call throws — requests still answer as new conversations, one warning per kind",
  async () => {
    for (const sync of [true, false]) {
      for (const mode of ["history", "user"]) {
        const store = new BrokenStore(sync);
        const dify = await startFakeDify();
        const bridge = await startBridge(
          { DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat", CONVERSATION_MODE: mode },
          { store },
        );
        const what = `sync=${sync} mode=${mode}`;
        try {
          const client = bridge.client();
          for (let i = 0; i < 3; i++) {
            const first = await client.chat.completions.create({
              model: "dify",
              user: "u",
              messages: [user(`hi ${i}`)],
            });
            const a1 = first.choices[0].message.content ?? "";
            assert.match(a1, /^Turn 1 of /, what);
            // The next turn cannot be found again: a new conversation, with the history replayed.
            const body = { model: "dify", user: "u", messages: [user(`hi ${i}`), assistant(a1), user("and?")] };
            const second = i % 2
              ? (await client.chat.completions.create(body)).choices[0].message.content
              : await (async () => {
                const res = await rawChat(bridge.url, { ...body, stream: true }, { "x-session-id": `s${i}` });
                assert.equal(res.status, 200, `${what}: ${res.text}`);
                const frames = sseData(res.text) as { choices?: { delta: { content?: string } }[] }[];
                assert.equal(frames.at(-1), "[DONE]", what);
                return frames.slice(0, -1).map((f) => f.choices?.[0]?.delta.content ?? "").join("");
              })();
            assert.match(second ?? "", /^Turn 1 of /, `${what}: ${second}`);
          }
          const del = await fetch(`${bridge.url}/conversations/u`, {
            method: "DELETE",
            headers: { authorization: "Bearer sk" },
          });
          assert.equal(del.status, 200, what);
          await del.body?.cancel();
          assert.ok(store.calls >= 6, `${what}: the store was barely used (${store.calls} calls)`);
          // Each kind of failure is reported once, however many requests hit it.
          await sleep(50);
          const storeWarnings = bridge.warnings.filter((w) => w.includes("conversation store"));
          assert.deepEqual(bridge.warnings, storeWarnings, what);
          assert.equal(new Set(storeWarnings.map((w) => w.split(":")[0] + w.split(":")[1])).size, storeWarnings.length);
          assert.ok(storeWarnings.some((w) => w.includes("read")), `${what}: ${storeWarnings}`);
          assert.ok(storeWarnings.some((w) => w.includes("write")), `${what}: ${storeWarnings}`);
          assert.ok(storeWarnings.length <= 4, `${what}: ${storeWarnings.join("\n")}`);
          assert.equal((await hardeningHealthy(bridge.url)).streams, 0);
        } finally {
          await bridge.close().catch(() => {});
          await dify.close();
        }
      }
    }
  },
);

// ═══ runtimes ═══════════════════════════════════════════════════════════════════════════════════

type RuntimesName = "deno" | "bun";

const RUNTIMES_HAVE_BUN = bunAvailable();
const RUNTIMES: { rt: RuntimesName; ignore: boolean }[] = [
  { rt: "deno", ignore: false },
  { rt: "bun", ignore: !RUNTIMES_HAVE_BUN },
];

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
    await sleep(100);
  }
  return false;
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
  const events = await fixtureEvents("chat_basic");
  const fx = { answer: answerOf(events), usage: usageOf(events) };
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
  const down = `http://127.0.0.1:${closedPort()}/v1`;
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
      await sleep(250);
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

runtimesTest("the OpenClaw request shape, POSTed as captured", async (rt) => {
  await runtimesWith(rt, { SYSTEM_PROMPT: "drop" }, async ({ dify, proc }) => {
    const body = await Deno.readTextFile(new URL("telegram-turn1.json", OPENCLAW_WIRE));
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

test("bridge: a client that leaves before Dify's first byte frees its slot and stops the task", async () => {
  await withBridge({ MAX_CONCURRENT_STREAMS: "1" }, async ({ bridge, dify }) => {
    const abort = new AbortController();
    const pending = fetch(`${bridge.url}/chat/completions`, {
      method: "POST",
      signal: abort.signal,
      body: JSON.stringify({ model: "dify", stream: true, user: "early", messages: [user("fault:first_byte:1500")] }),
    }).catch((e) => e);
    await sleep(200);
    abort.abort();
    assert.ok((await pending) instanceof Error);
    const health = async () => (await (await fetch(bridge.url.replace("/v1", "/healthz"))).json()).streams;
    for (let i = 0; i < 200 && (await health()) !== 0; i++) await sleep(50);
    assert.equal(await health(), 0);
    await until(() => dify.stops.length > 0, 2_000);
    assert.equal(dify.stops.length, 1);
    assert.equal(dify.stops[0].user, "early");
    const next = await bridge.client().chat.completions.create({ model: "dify", messages: [user("after")] });
    assert.match(next.choices[0].message.content ?? "", /after/);
  });
});

test("bridge: malformed percent-encoding in a path is a 400, not a 500", async () => {
  await withBridge({}, async ({ bridge }) => {
    for (const [method, path] of [["GET", "/models/%E0%A4"], ["DELETE", "/conversations/%"]]) {
      const res = await fetch(bridge.url + path, { method, headers: { authorization: "Bearer sk-test" } });
      assert.equal(res.status, 400, `${method} ${path}`);
      assert.equal((await res.json()).error.type, "invalid_request_error");
    }
    assert.equal(bridge.warnings.length, 0);
  });
});
