/**
 * HTTP tests in-process: the bridge (`createServer` on `Deno.serve`) in front of the fake Dify, which answers
 * with Dify's exact bytes (bench/fake_dify.ts), driven by the official openai SDK and raw fetch.
 */
import assert from "node:assert/strict";
import OpenAI from "openai";
import { DenoKvStore } from "../main.ts";
import { readFixture, startFakeDify } from "../bench/fake_dify.ts";
import {
  answerOf,
  assistant,
  BrokenStore,
  type ChatMessage,
  ChatSession,
  closedPort,
  conversationsHolding,
  countOf,
  errorBody,
  eventually,
  fixtureEvents,
  health,
  openclawRequest,
  rawChat,
  rawHttp,
  readSse,
  readUntil,
  sdkOutcome,
  sendChat,
  SlowStore,
  sseData,
  startBridge,
  startRig,
  streamText,
  streamThenAbort,
  turnOf,
  until,
  usageOf,
  user,
  withBridge,
} from "../bench/test_util.ts";

const decoder = new TextDecoder();

// ─── The bridge over HTTP ────────────────────────────────────────────────────────────────────────

Deno.test("bridge: streaming through the openai SDK — content, one id, role first, usage, [DONE]", async () => {
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

Deno.test("bridge: raw stream ends with data: [DONE] and carries no usage chunk unless asked", async () => {
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

Deno.test("bridge: stream: false aggregates the same events into one chat.completion", async () => {
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

Deno.test("bridge: Dify's bytes in 29-byte writes, old escaped JSON and new raw UTF-8 alike, give the same text", async () => {
  // Every read size from 1 to 7 bytes is the unit test's (pump); here one size over real sockets, which
  // splits characters (a write ending on a UTF-8 continuation byte) without a timer tick every few bytes.
  const SLICE = 29;
  const bytes = await readFixture("unicode_split.sse");
  const splits = Array.from({ length: Math.floor(bytes.length / SLICE) }, (_, i) => bytes[(i + 1) * SLICE])
    .filter((b) => (b & 0xc0) === 0x80).length;
  assert.ok(splits >= 5, `only ${splits} writes end inside a character`);
  const expected = answerOf(await fixtureEvents("unicode_split"));
  await withBridge({}, async ({ bridge }) => {
    const client = bridge.client();
    await Promise.all(["unicode_split", "unicode_split_legacy"].flatMap((name) => [
      streamText(client, { model: "dify", messages: [user(`fixture:${name}`)] })
        .then((s) => assert.equal(s.content, expected, `${name}, streaming`)),
      client.chat.completions.create({ model: "dify", messages: [user(`fixture:${name}`)] })
        .then((r) => assert.equal(r.choices[0].message.content, expected, `${name}, non-streaming`)),
    ]));
  }, { dify: { sliceBytes: SLICE } });
});

Deno.test("bridge: generated streams in legacy encoding, with CRLF line ends and an initial ping", async () => {
  await withBridge({}, async ({ bridge, dify }) => {
    const r = await bridge.client().chat.completions.create({ model: "dify", messages: [user("héllo 😀 wörld")] });
    assert.match(r.choices[0].message.content ?? "", /^Turn 1 of [0-9a-f]{8}: héllo 😀 wörld$/);
    assert.equal(dify.lastBody().query, "héllo 😀 wörld");
  }, { dify: { legacy: true, crlf: true, pingFirst: true } });
});

Deno.test("bridge: Dify's ping becomes an SSE comment; other events are skipped", async () => {
  await withBridge({}, async ({ bridge }) => {
    const res = await rawChat(bridge.url, { model: "dify", stream: true, messages: [user("fixture:ping_keepalive")] });
    assert.equal(res.status, 200);
    assert.equal((res.text.match(/^: ping$/gm) ?? []).length, 3);
    assert.equal(readSse(res.text).content, answerOf(await fixtureEvents("ping_keepalive")));
    const tts = await streamText(bridge.client(), { model: "dify", messages: [user("fixture:tts_autoplay")] });
    assert.equal(tts.content, answerOf(await fixtureEvents("tts_autoplay")));
  });
});

Deno.test("bridge: the query is the new user turn, text parts joined by a blank line", async () => {
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

Deno.test("bridge: an error before any content is an HTTP error the SDK raises", async () => {
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

Deno.test("bridge: an error mid-stream is a final error frame, raised by the SDK, after the partial text", async () => {
  await withBridge({}, async ({ bridge }) => {
    const res = await rawChat(bridge.url, { model: "dify", stream: true, messages: [user("fixture:error_midstream")] });
    assert.equal(res.status, 200);
    const data = sseData(res.text);
    const last = data.at(-1) as { error: { message: string; type: string; code: string } };
    assert.equal(last.error.code, "completion_request_error");
    assert.match(last.error.message, /Server Unavailable/);
    assert.ok(!data.includes("[DONE]"));
    const partial = readSse(res.text).content;
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

Deno.test("bridge: models list, one model, health, CORS preflight", async () => {
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

Deno.test("bridge: bad requests get OpenAI-shaped errors with the right status", async () => {
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

Deno.test("bridge: PROXY_API_KEYS guards every route; pass-through keys work only when it is unset", async () => {
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

Deno.test("bridge: one JSON log line per request, without keys or content unless LOG_CONTENT=1", async () => {
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

Deno.test("bridge: malformed percent-encoding in a path is a 400, not a 500", async () => {
  await withBridge({}, async ({ bridge }) => {
    for (const [method, path] of [["GET", "/models/%E0%A4"], ["DELETE", "/conversations/%"]]) {
      const res = await fetch(bridge.url + path, { method, headers: { authorization: "Bearer sk-test" } });
      assert.equal(res.status, 400, `${method} ${path}`);
      assert.equal((await res.json()).error.type, "invalid_request_error");
    }
    assert.equal(bridge.warnings.length, 0);
  });
});

// ─── Conversations: continuation ─────────────────────────────────────────────────────────────────

/** Runs a three-turn chat and checks every turn continued one Dify conversation with only the new text. */
async function threeTurnChat(stream: boolean) {
  const rig = await startRig();
  try {
    const chat = new ChatSession(rig.client, { stream, extra: { user: "alice" } });
    const a1 = await chat.say("first question");
    const a2 = await chat.say("second question");
    const a3 = await chat.say("third question");
    const t = [a1, a2, a3].map((a) => turnOf(a.content));
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

Deno.test("conversations: a three-turn chat (non-streaming) continues one Dify conversation", () =>
  threeTurnChat(false));

Deno.test("conversations: a three-turn chat (streaming) continues one Dify conversation", () => threeTurnChat(true));

Deno.test("conversations: eight chats in parallel never cross-talk", async () => {
  const rig = await startRig();
  try {
    const chats = Array.from({ length: 8 }, (_, i) => new ChatSession(rig.client, { stream: i % 2 === 0 }));
    const convs: string[][] = chats.map(() => []);
    for (let turn = 1; turn <= 3; turn++) {
      const answers = await Promise.all(chats.map((c, i) => c.say(`chat ${i} message ${turn}`)));
      answers.forEach((a, i) => {
        const t = turnOf(a.content);
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

Deno.test("conversations: two new chats with the same user stay separate", async () => {
  const rig = await startRig();
  try {
    const a = new ChatSession(rig.client, { extra: { user: "same-person" } });
    const b = new ChatSession(rig.client, { extra: { user: "same-person" } });
    const a1 = turnOf((await a.say("hello")).content);
    const b1 = turnOf((await b.say("hello")).content);
    assert.equal(a1.n, 1);
    assert.equal(b1.n, 1);
    assert.notEqual(a1.conv, b1.conv, "a new chat never joins another chat of the same user");
    const b2 = turnOf((await b.say("b again")).content);
    const a2 = turnOf((await a.say("a again")).content);
    assert.deepEqual([a2.n, a2.conv], [2, a1.conv]);
    assert.deepEqual([b2.n, b2.conv], [2, b1.conv]);
  } finally {
    await rig.close();
  }
});

Deno.test("conversations: a continued turn sends Dify only the new message, system prompt and history stay out", async () => {
  const rig = await startRig();
  try {
    const chat = new ChatSession(rig.client, { system: "You are terse." });
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

Deno.test("conversations: the Dify user stays the one the conversation started with, even if `user` changes", async () => {
  const rig = await startRig({ DEFAULT_USER: "fallback-user" });
  try {
    const chat = new ChatSession(rig.client);
    await chat.say("one", { user: "alice" });
    const a2 = await chat.say("two", { user: "mallory" });
    const a3 = await chat.say("three");
    assert.deepEqual([turnOf(a2.content).n, turnOf(a3.content).n], [2, 3]);
    assert.deepEqual(rig.fake.generateBodies().map((b) => b.user), ["alice", "alice", "alice"]);
    // Without any user, the default user is used throughout.
    const other = new ChatSession(rig.client, { stream: true });
    await other.say("x");
    await other.say("y");
    assert.deepEqual(rig.fake.generateBodies().slice(3).map((b) => b.user), ["fallback-user", "fallback-user"]);
  } finally {
    await rig.close();
  }
});

Deno.test("conversations: the response header X-Dify-Conversation-Id names the Dify conversation", async () => {
  const rig = await startRig();
  try {
    for (const stream of [false, true]) {
      const res = await rawChat(rig.bridge.url, { model: "dify", messages: [user(`header ${stream}`)], stream });
      assert.equal(res.status, 200);
      const id = res.headers.get("x-dify-conversation-id");
      assert.ok(id && rig.fake.conversations.has(id), `header ${id} is a Dify conversation`);
      const content = stream ? readSse(res.text).content : JSON.parse(res.text).choices[0].message.content;
      assert.equal(turnOf(content).conv, id.slice(0, 8));
      assert.match(res.headers.get("access-control-expose-headers") ?? "", /x-dify-conversation-id/);
    }
  } finally {
    await rig.close();
  }
});

// ─── Conversations: branching ────────────────────────────────────────────────────────────────────

Deno.test("conversations: regenerate branches into a new Dify conversation with the history replayed", async () => {
  const rig = await startRig();
  try {
    const chat = new ChatSession(rig.client);
    const a1 = await chat.say("tell me a story");
    const a2 = await chat.say("make it longer");
    const original = turnOf(a2.content);
    assert.equal(original.n, 2);
    // Regenerate: the same history as turn 2 is sent again.
    const resent = chat.messages.slice(0, -1);
    const again = await sendChat(rig.client, resent);
    const regen = turnOf(again.content);
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
    const b3 = turnOf((await sendChat(rig.client, branch)).content);
    assert.deepEqual([b3.n, b3.conv], [2, regen.conv]);
    const o3 = turnOf((await chat.say("original goes on")).content);
    assert.deepEqual([o3.n, o3.conv], [3, original.conv]);
  } finally {
    await rig.close();
  }
});

Deno.test("conversations: two chats with an identical first exchange each get their own Dify memory", async () => {
  const rig = await startRig();
  try {
    // `fault:huge_line:24` makes the fake answer 24 × "x" in a real conversation: both chats get
    // byte-identical first exchanges, like "hi" → "Hello! How can I help?".
    const a = new ChatSession(rig.client);
    const b = new ChatSession(rig.client, { stream: true });
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
    assert.deepEqual([turnOf(a3.content).n, turnOf(b3.content).n].map((n) => n >= 2), [true, true]);
    for (const conv of rig.fake.conversations.values()) {
      const text = conv.turns.map((t) => t.query).join("\n");
      assert.ok(!(text.includes("chat A") && text.includes("chat B")), "no Dify conversation holds both chats");
      assert.ok(!(text.includes("A goes") && text.includes("B goes")));
    }
    assert.deepEqual(conversationsHolding(rig.fake, "A goes on"), [a3.conversationId]);
    assert.deepEqual(conversationsHolding(rig.fake, "B goes on"), [b3.conversationId]);
  } finally {
    await rig.close();
  }
});

Deno.test("conversations: chats sharing a first exchange write side by side; their second turns, sent at once, stay apart", async () => {
  // One fingerprint key for all of them: written one after another, a busy server's writes fall
  // further and further behind (seen in the benchmark: 1,400 waiting after 8 s).
  let inFlight = 0;
  let most = 0;
  const slow = new SlowStore(new DenoKvStore(await Deno.openKv(":memory:")), () => 50);
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
    const chats = Array.from({ length: 6 }, (_, i) => new ChatSession(rig.client, { stream: i % 2 === 0 }));
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

Deno.test("conversations: a changed system prompt starts a new conversation, never an error", async () => {
  const rig = await startRig();
  try {
    const chat = new ChatSession(rig.client, { system: "Current date: 2026-11-24" });
    const a1 = turnOf((await chat.say("remember the number 7")).content);
    chat.messages[0] = { role: "system", content: "Current date: 2026-11-25" };
    const a2 = turnOf((await chat.say("which number?")).content);
    assert.equal(a2.n, 1);
    assert.notEqual(a2.conv, a1.conv);
    const body = rig.fake.lastBody();
    assert.equal(body.conversation_id, "");
    assert.ok(body.query.startsWith("Current date: 2026-11-25"), "the new system prompt leads the first query");
    assert.ok(body.query.includes("remember the number 7"), "history replayed");
    assert.equal(body.inputs.system_prompt, "Current date: 2026-11-25");
    const a3 = turnOf((await chat.say("and now?")).content);
    assert.deepEqual([a3.n, a3.conv], [2, a2.conv]);
  } finally {
    await rig.close();
  }
});

for (const mode of ["prepend", "inputs", "drop"] as const) {
  Deno.test({
    name: `conversations: SYSTEM_PROMPT=${mode} decides what reaches inputs.system_prompt and the first query`,
    async fn() {
      const rig = await startRig({ SYSTEM_PROMPT: mode });
      try {
        const chat = new ChatSession(rig.client, { system: "Speak like a pirate." });
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

// ─── Conversations: Dify forgets ─────────────────────────────────────────────────────────────────

Deno.test("conversations: when Dify forgets the conversation, the next turn replays the history and carries on", async () => {
  const rig = await startRig();
  try {
    const chat = new ChatSession(rig.client, { stream: true, extra: { user: "alice" } });
    const a1 = await chat.say("my name is Ada");
    const a2 = await chat.say("I like tea");
    const old = turnOf(a2.content);
    assert.equal(old.n, 2);
    rig.fake.forgetAll();
    const before = rig.fake.generateBodies().length;
    const a3 = await chat.say("what do I like?");
    const recovered = turnOf(a3.content);
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
    const a4 = turnOf((await chat.say("and my name?")).content);
    assert.deepEqual([a4.n, a4.conv], [2, recovered.conv]);
    const last = rig.fake.lastBody();
    assert.equal(last.query, "and my name?");
    assert.equal(last.conversation_id, a3.conversationId);
  } finally {
    await rig.close();
  }
});

// ─── Conversations: session headers and explicit ids ─────────────────────────────────────────────

Deno.test("conversations: session ids (X-Session-Id, prompt_cache_key, X-OpenWebUI-Chat-Id, metadata.chat_id)", async () => {
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
        sendChat(rig.client, [user(text)], { stream, ...how(id) });
      const s1 = turnOf((await ask(`${name}-1`, "first")).content);
      const s2 = turnOf((await ask(`${name}-1`, "second", true)).content);
      const other = turnOf((await ask(`${name}-2`, "first")).content);
      assert.equal(s1.n, 1, name);
      assert.deepEqual([s2.n, s2.conv], [2, s1.conv], `${name}: same session continues`);
      assert.equal(other.n, 1, `${name}: another session is another conversation`);
      assert.notEqual(other.conv, s1.conv);
      assert.equal(rig.fake.lastBody().query, "first");
      assert.equal(JSON.parse(rig.bridge.logs.at(-1)!).conversation_via, "new");
      const s3 = await ask(`${name}-1`, "third");
      assert.deepEqual(turnOf(s3.content).n, 3);
      assert.equal(JSON.parse(rig.bridge.logs.at(-1)!).conversation_via, "session");
    }
    // A plain request without a session id or history is a new chat.
    assert.equal(turnOf((await sendChat(rig.client, [user("first")])).content).n, 1);
  } finally {
    await rig.close();
  }
});

Deno.test("conversations: explicit ids (body conversation_id, header X-Dify-Conversation-Id); unknown id → 404", async () => {
  const rig = await startRig();
  try {
    const start = await sendChat(rig.client, [user("start")], { extra: { user: "alice" } });
    const id = start.conversationId!;
    assert.ok(rig.fake.conversations.has(id));
    // Used as given, with the user the conversation belongs to (the request names none).
    const viaBody = await sendChat(rig.client, [user("by body")], { extra: { conversation_id: id } });
    assert.deepEqual(turnOf(viaBody.content), { n: 2, conv: id.slice(0, 8), query: "by body" });
    assert.equal(viaBody.conversationId, id);
    const viaHeader = await sendChat(rig.client, [user("by header")], {
      stream: true,
      headers: { "X-Dify-Conversation-Id": id },
    });
    assert.deepEqual(turnOf(viaHeader.content), { n: 3, conv: id.slice(0, 8), query: "by header" });
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
      () => sendChat(rig.client, [user("lost")], { stream: true, extra: { conversation_id: unknown } }),
      (e: unknown) => e instanceof OpenAI.APIError && e.status === 404,
    );
    assert.equal(rig.fake.conversations.size, conversations, "no conversation was created");
  } finally {
    await rig.close();
  }
});

// ─── Conversations: user mode, off mode ──────────────────────────────────────────────────────────

Deno.test("conversations: CONVERSATION_MODE=user keeps one conversation per user; DELETE clears only that one", async () => {
  const rig = await startRig({ CONVERSATION_MODE: "user" });
  try {
    const ask = (who: string, text: string, stream = false) =>
      sendChat(rig.client, [user(text)], { stream, extra: { user: who } });
    const b1 = turnOf((await ask("bob", "b1")).content);
    const c1 = turnOf((await ask("carol", "c1", true)).content);
    assert.notEqual(b1.conv, c1.conv);
    const b2 = turnOf((await ask("bob", "b2", true)).content);
    assert.deepEqual([b2.n, b2.conv], [2, b1.conv]);
    const del = await fetch(`${rig.bridge.url}/conversations/bob`, {
      method: "DELETE",
      headers: { authorization: "Bearer sk-test" },
    });
    assert.equal(del.status, 200);
    assert.equal((await del.json()).deleted, true);
    const b3 = turnOf((await ask("bob", "b3")).content);
    assert.equal(b3.n, 1, "bob starts over after DELETE");
    assert.notEqual(b3.conv, b1.conv);
    const c2 = turnOf((await ask("carol", "c2")).content);
    assert.deepEqual([c2.n, c2.conv], [2, c1.conv], "carol is untouched");
    const b4 = turnOf((await ask("bob", "b4")).content);
    assert.deepEqual([b4.n, b4.conv], [2, b3.conv]);
  } finally {
    await rig.close();
  }
});

Deno.test("conversations: DELETE /v1/conversations/{user} needs the client's key and touches only its own mappings", async () => {
  const rig = await startRig({ CONVERSATION_MODE: "user", PROXY_API_KEYS: "key-one,key-two" });
  try {
    const one = rig.bridge.client("key-one");
    const ask = async (text: string) =>
      turnOf((await sendChat(one, [user(text)], { extra: { user: "dave" } })).content);
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
    assert.deepEqual(await ask("d2"), { n: 2, conv: first.conv, query: "d2" }, "a wrong key deletes nothing");
    assert.equal(await del("key-two"), 200);
    assert.deepEqual(
      await ask("d3"),
      { n: 3, conv: first.conv, query: "d3" },
      "another client's DELETE touches nothing",
    );
    assert.equal(await del("key-one"), 200);
    const fresh = await ask("d4");
    assert.equal(fresh.n, 1);
    assert.notEqual(fresh.conv, first.conv);
  } finally {
    await rig.close();
  }
});

Deno.test("conversations: CONVERSATION_MODE=off makes every request a new conversation with the history replayed", async () => {
  const rig = await startRig({ CONVERSATION_MODE: "off" });
  try {
    const chat = new ChatSession(rig.client, { extra: { user: "erin" } });
    const answers = [await chat.say("one"), await chat.say("two"), await chat.say("three")];
    const turns = answers.map((a) => turnOf(a.content));
    assert.deepEqual(turns.map((t) => t.n), [1, 1, 1]);
    assert.equal(new Set(turns.map((t) => t.conv)).size, 3);
    const bodies = rig.fake.generateBodies();
    assert.deepEqual(bodies.map((b) => b.conversation_id), ["", "", ""]);
    assert.ok(bodies[2].query.includes("one") && bodies[2].query.includes(answers[1].content));
  } finally {
    await rig.close();
  }
});

// ─── Conversations: client identity ──────────────────────────────────────────────────────────────

Deno.test("conversations: two clients with identical messages and the same user never share a conversation", async () => {
  const rig = await startRig();
  try {
    // Identical answers (fault:huge_line) make the two clients' requests byte-identical.
    const a = new ChatSession(rig.bridge.client("sk-client-a"), { extra: { user: "shared" } });
    const b = new ChatSession(rig.bridge.client("sk-client-b"), { extra: { user: "shared" } });
    const a1 = await a.say("hi fault:huge_line:16");
    const b1 = await b.say("hi fault:huge_line:16");
    assert.equal(a1.content, b1.content);
    assert.deepEqual(a.messages, b.messages);
    assert.notEqual(a1.conversationId, b1.conversationId);
    const a2 = await a.say("next");
    const b2 = await b.say("next");
    assert.equal(a2.conversationId, a1.conversationId, "client A continues its own conversation");
    assert.equal(b2.conversationId, b1.conversationId, "client B continues its own conversation");
    assert.equal(turnOf(a2.content).n, 2);
    assert.equal(turnOf(b2.content).n, 2);
  } finally {
    await rig.close();
  }
});

Deno.test("conversations: two models on the same Dify app never share a conversation", async () => {
  const rig = await startRig({ DIFY_APPS: JSON.stringify({ one: "app-chat", two: "app-chat" }) });
  try {
    const messages: ChatMessage[] = [user("hello")];
    const a1 = await sendChat(rig.client, messages, { extra: { model: "one" } });
    messages.push(assistant(a1.content), user("next"));
    const b = await sendChat(rig.client, messages, { extra: { model: "two" } });
    assert.equal(turnOf(b.content).n, 1, "model two starts its own conversation");
    assert.notEqual(b.conversationId, a1.conversationId);
    const a2 = await sendChat(rig.client, messages, { extra: { model: "one" } });
    assert.deepEqual(turnOf(a2.content).n, 2);
    assert.equal(a2.conversationId, a1.conversationId);
  } finally {
    await rig.close();
  }
});

// ─── Conversations: a slow or broken store ───────────────────────────────────────────────────────

Deno.test("conversations: a turn sent the instant the previous stream ends continues (write-through cache)", async () => {
  const stores: [string, (n: number) => number][] = [
    ["Deno KV", () => 0],
    ["every write 100 ms late", () => 100],
    // Turn 2 is answered before turn 1's head is durable: its check-and-set must still see it,
    // or turn 2's mapping is never stored and a later turn starts over.
    ["each chat's first write 300 ms late", (n) => n % 1000 === 0 ? 300 : 0],
  ];
  // Each store behind its own bridge, side by side: their late writes are waits, not work.
  await Promise.all(stores.map(async ([what, delay]) => {
    const kv = new DenoKvStore(await Deno.openKv(":memory:"));
    const slow = new SlowStore(kv, delay);
    const rig = await startRig({}, { store: slow });
    try {
      for (const stream of [true, false]) {
        slow.writes = 0;
        const chat = new ChatSession(rig.client, { stream });
        const turns = [];
        for (let i = 1; i <= 4; i++) turns.push(turnOf((await chat.say(`instant ${i}`)).content));
        // A later turn, once every late write has landed.
        await until(() => slow.pending === 0, 5_000, "the late writes");
        turns.push(turnOf((await chat.say("later")).content));
        assert.deepEqual(turns.map((t) => t.n), [1, 2, 3, 4, 5], `${what}, stream ${stream}`);
        assert.equal(new Set(turns.map((t) => t.conv)).size, 1);
      }
    } finally {
      await rig.close();
    }
  }));
});

Deno.test("conversations: DELETE right after an answer is not undone by that answer's late mapping write", async () => {
  const kv = new DenoKvStore(await Deno.openKv(":memory:"));
  // Mapping writes take 100 ms to land; deletes land at once.
  const slow = new SlowStore(kv, (_n, op) => op === "delete" ? 0 : 100);
  const rig = await startRig({ CONVERSATION_MODE: "user" }, { store: slow });
  try {
    const ask = async (text: string) =>
      turnOf((await sendChat(rig.client, [user(text)], { stream: true, extra: { user: "fay" } })).content);
    const first = await ask("f1");
    const del = await fetch(`${rig.bridge.url}/conversations/fay`, {
      method: "DELETE",
      headers: { authorization: "Bearer sk-test" },
    });
    assert.equal(del.status, 200);
    await del.body?.cancel();
    await until(() => slow.pending === 0, 5_000, "the answer's late mapping write");
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
    async fn() {
      for (const mode of ["history", "user"]) {
        const store = new BrokenStore(sync);
        const rig = await startRig({ CONVERSATION_MODE: mode }, { store });
        try {
          const run = async () => {
            const chat = new ChatSession(rig.client, { extra: { user: "u" } });
            const s = new ChatSession(rig.client, { stream: true });
            const answers = [
              await chat.say("one"),
              await chat.say("two"),
              await s.say("three"),
              await s.say("four"),
              await sendChat(rig.client, [user("five")], { headers: { "X-Session-Id": "sess" } }),
              await sendChat(rig.client, [user("six")], { stream: true, headers: { "X-Session-Id": "sess" } }),
            ];
            for (const a of answers) assert.equal(turnOf(a.content).n, 1, "a new conversation each time");
            const del = await fetch(`${rig.bridge.url}/conversations/u`, { method: "DELETE" });
            await del.body?.cancel();
            assert.equal(del.status, 200);
          };
          await run();
          // The answers do not wait for their writes: let them fail, then count the warnings.
          const warned = (kind: string) => rig.bridge.warnings.some((w) => w.includes(`store ${kind}:`));
          await until(() => warned("read") && warned("write"), 2_000, "the store warnings");
          const warnings = rig.bridge.warnings.length;
          assert.ok(warnings >= 2 && warnings <= 3, `one warning per failure kind: ${rig.bridge.warnings.join(" | ")}`);
          for (const kind of ["read", "write", "delete"]) {
            assert.ok(rig.bridge.warnings.filter((w) => w.includes(`store ${kind}:`)).length <= 1, kind);
          }
          assert.ok(rig.bridge.warnings.some((w) => w.includes("store read:")));
          assert.ok(rig.bridge.warnings.some((w) => w.includes("store write:")));
          assert.ok(store.calls >= 6, `the store was barely used (${store.calls} calls)`);
          assert.ok(rig.bridge.warnings.every((w) => w.includes("conversation store")), rig.bridge.warnings.join());
          const calls = store.calls;
          await run();
          await until(() => store.calls > calls, 2_000, "the store is still tried");
          // The failures just provoked would have warned by the time the requests were answered and the
          // bridge was asked for its health once more.
          assert.equal((await health(rig.bridge.url)).streams, 0);
          assert.equal(rig.bridge.warnings.length, warnings, "no new warnings for the same failures");
        } finally {
          await rig.close();
        }
      }
    },
  });
}

// ─── Conversations: OpenClaw ─────────────────────────────────────────────────────────────────────

async function openClawTwoTurns(prefix: "telegram" | "cli", difyUser: string) {
  const rig = await startRig();
  try {
    const turn1 = await openclawRequest(`${prefix}-turn1`) as { messages: ChatMessage[] };
    const turn2 = await openclawRequest(`${prefix}-turn2`) as { messages: ChatMessage[] };
    const r1 = await rawChat(rig.bridge.url, turn1);
    assert.equal(r1.status, 200, r1.text);
    const answer1 = readSse(r1.text).content;
    const t1 = turnOf(answer1);
    // Turn 2 carries back what the bridge streamed for turn 1 (the capture holds another server's answer).
    const replayed = turn2.messages.filter((m: ChatMessage) => m.role === "assistant");
    assert.equal(replayed.length, 1);
    replayed[0].content = answer1;
    const r2 = await rawChat(rig.bridge.url, turn2);
    assert.equal(r2.status, 200, r2.text);
    const answer2 = readSse(r2.text).content;
    const t2 = turnOf(answer2);
    assert.deepEqual([t2.n, t2.conv], [2, t1.conv], "turn 2 continues turn 1's Dify conversation");
    const [b1, b2] = rig.fake.generateBodies();
    assert.equal(b1.conversation_id, "");
    const system = String(turn1.messages[0].content).trim();
    assert.equal(b1.query, `${system}\n\nhi there`, "turn 1: system prompt, then only what the person typed");
    assert.equal(b2.query, "second message", "turn 2: only the new message");
    assert.equal(b2.conversation_id, r1.headers.get("x-dify-conversation-id"));
    assert.deepEqual([b1.user, b2.user], [difyUser, difyUser]);
  } finally {
    await rig.close();
  }
}

Deno.test("conversations: OpenClaw Telegram turns 1 and 2 continue one Dify conversation as telegram:123456789", () =>
  openClawTwoTurns("telegram", "telegram:123456789"));

Deno.test("conversations: OpenClaw CLI turns 1 and 2 continue one Dify conversation as the default user", () =>
  openClawTwoTurns("cli", "dify-openai"));

// ─── App types ───────────────────────────────────────────────────────────────────────────────────

const CHAT_COMPLETION_WORKFLOW_APPS = JSON.stringify({
  chat: "app-chat",
  completion: { key: "app-completion", type: "completion" },
  workflow: { key: "app-workflow", type: "workflow" },
});

Deno.test("apps: a type from DIFY_APPS picks the endpoint without asking /info", async () => {
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
    // GET /parameters (the app's input form) is asked once per app; /info never.
    const paths = env.fake.requests.filter((r) => r.path !== "/parameters").map((r) => `${r.method} ${r.path}`);
    assert.ok(!env.fake.requests.some((r) => r.path === "/info"));
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

Deno.test("apps: an unknown type is detected from GET /info once and cached", async () => {
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

Deno.test("apps: workflow apps get the text in the input variable and answer from text_chunk", async () => {
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

Deno.test("apps: workflow answers come from outputs when nothing streamed, never [object Object]", async () => {
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

Deno.test("apps: a failed workflow run is an OpenAI error, as HTTP status when nothing was streamed", async () => {
  const env = await startRig({ DIFY_API_KEY: "app-workflow" });
  const events = await fixtureEvents("workflow_run_failed");
  const reason = String((events.find((e) => e.event === "workflow_finished")!.data as { error: string }).error);
  try {
    const body = { model: "dify", messages: [user("fixture:workflow_run_failed")] };
    const plain = await rawChat(env.bridge.url, body);
    assert.ok(plain.status >= 400, `status ${plain.status}`);
    const err = errorBody(plain.text);
    assert.equal(err.code, "workflow_failed");
    assert.ok(err.message.includes(reason.slice(0, 40)), err.message);
    const streamed = await rawChat(env.bridge.url, { ...body, stream: true });
    assert.equal(streamed.status, plain.status, "streaming: still an HTTP error, nothing was streamed");
    assert.equal(errorBody(streamed.text).code, "workflow_failed");
    await assert.rejects(
      env.client.chat.completions.create(body as never),
      (e: unknown) => e instanceof OpenAI.APIError && e.status === plain.status,
    );
  } finally {
    await env.close();
  }
  // Text already streamed, then the run fails: the stream carries the text, then an error frame.
  const mini = await startFakeDify({
    script: () => [
      { event: "workflow_started", workflow_run_id: "r1", task_id: "t1", data: { id: "r1" } },
      { event: "text_chunk", workflow_run_id: "r1", task_id: "t1", data: { text: "partial " } },
      { event: "text_chunk", workflow_run_id: "r1", task_id: "t1", data: { text: "answer" } },
      {
        event: "workflow_finished",
        workflow_run_id: "r1",
        task_id: "t1",
        data: { id: "r1", status: "failed", outputs: {}, error: "node exploded", total_tokens: 3 },
      },
    ],
  });
  const bridge = await startBridge({
    DIFY_API_URL: mini.url,
    DIFY_APPS: JSON.stringify({ wf: { key: "app-x", type: "workflow" } }),
  });
  try {
    const r = await rawChat(bridge.url, { model: "wf", messages: [user("go")], stream: true });
    assert.equal(r.status, 200);
    const read = readSse(r.text);
    assert.equal(read.content, "partial answer");
    assert.equal(read.last.error?.code, "workflow_failed");
    assert.match(read.last.error!.message, /node exploded/);
    assert.ok(!read.done, "a failed stream does not end with [DONE]");
    const plain = await rawChat(bridge.url, { model: "wf", messages: [user("go")] });
    assert.ok(plain.status >= 400);
    assert.equal(errorBody(plain.text).code, "workflow_failed");
  } finally {
    await bridge.close();
    await mini.close();
  }
});

Deno.test("apps: completion apps post the text as inputs.query to /completion-messages", async () => {
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

// ─── Chatflow ────────────────────────────────────────────────────────────────────────────────────

Deno.test("chatflow: chatflow node/workflow events never leak; usage comes from message_end", async () => {
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

Deno.test("chatflow: chatflow terminal order (message_end first, workflow_finished first, none) gives the same answer", async () => {
  const raw = decoder.decode(await readFixture("chatflow.sse"));
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
  const mini = await startFakeDify({ script: (_path, body) => variants[String(body.query)] });
  const bridge = await startBridge({ DIFY_API_URL: mini.url, DIFY_API_KEY: "app-chatflow", CONVERSATION_MODE: "off" });
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

Deno.test("chatflow: a failed chatflow is an error, after the text already streamed", async () => {
  const env = await startRig({ DIFY_API_KEY: "app-chatflow" });
  const events = await fixtureEvents("chatflow_failed");
  try {
    const body = { model: "dify", messages: [user("fixture:chatflow_failed")] };
    const plain = await rawChat(env.bridge.url, body);
    assert.ok(plain.status >= 400, `status ${plain.status}`);
    assert.ok(errorBody(plain.text).message.length > 0);
    const streamed = await rawChat(env.bridge.url, { ...body, stream: true });
    // The message chunks come before the failure: the stream has started, the error is its last frame.
    assert.equal(streamed.status, 200);
    const read = readSse(streamed.text);
    assert.equal(read.content, answerOf(events), "only the message text, no node events");
    assert.ok(read.last.error, "ends with an error frame");
    assert.ok(!read.done);
  } finally {
    await env.close();
  }
});

Deno.test("chatflow: REASONING_NODES=1 shows chatflow node progress in reasoning, never in content", async () => {
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

// ─── Images and files ────────────────────────────────────────────────────────────────────────────

Deno.test("files: http(s) image_url parts go to Dify as remote_url and the bridge never fetches them", async () => {
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

Deno.test("files: data: images are uploaded with the chat's user and sent as local_file", async () => {
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
      const calls = env.fake.requests.filter((q) => q.path !== "/info" && q.path !== "/parameters");
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

Deno.test("files: file and input_file parts are uploaded with the Dify type from the file name", async () => {
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
    assert.equal(decoder.decode(byName.get("report.pdf")!.bytes), "%PDF-1.4 fake");
    assert.equal(decoder.decode(byName.get("clip.mp4")!.bytes), "mp4 fake");
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

Deno.test("files: an upload Dify rejects is a clear client error, and no chat call is made", async () => {
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
      const err = errorBody(r.text);
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

// ─── Agent thoughts and reasoning ────────────────────────────────────────────────────────────────

interface Thought {
  id: string;
  tool: string;
  tool_input: string;
  observation: string;
  thought: string;
}

async function agentFixture() {
  const events = await fixtureEvents("agent_with_thoughts");
  const thoughts = events.filter((e) => e.event === "agent_thought") as unknown as Thought[];
  const tool = thoughts.find((t) => t.tool)!;
  const observed = thoughts.find((t) => t.observation)!;
  const answer = events.filter((e) => e.event === "agent_message").map((e) => e.answer).join("");
  const file = events.find((e) => e.event === "message_file") as { url: string };
  return { events, tool, observed, answer, fileUrl: file.url };
}

Deno.test("reasoning: agent thoughts stream as reasoning_content, each thought growing once, no duplicates", async () => {
  const env = await startRig({ DIFY_API_KEY: "app-agent" });
  const { tool, observed, answer, fileUrl } = await agentFixture();
  try {
    const s = await streamText(env.client, { model: "dify", messages: [user("fixture:agent_with_thoughts")] });
    // Tool name, input and observation each appear exactly once, as lines of reasoning.
    assert.equal(countOf(s.reasoning, tool.tool_input), 1, s.reasoning);
    assert.equal(countOf(s.reasoning, observed.observation), 1, s.reasoning);
    const lines = s.reasoning.split("\n");
    assert.ok(lines.some((l) => l.includes(tool.tool) && l.includes(tool.tool_input)), "a tool line");
    assert.ok(lines.some((l) => l.includes(observed.observation)), "an observation line");
    // The final thought repeats the answer: it is not reasoning, and the answer is not doubled.
    assert.ok(!s.reasoning.includes(answer.trim().slice(0, 20)), s.reasoning);
    assert.equal(countOf(s.content, answer), 1, s.content);
    assert.ok(s.content.endsWith(answer));
    assert.ok(s.content.includes(`(${fileUrl})`), "the tool's image is in the content");
    assert.ok(!s.content.includes(tool.tool_input) && !s.content.includes(observed.observation));
    // Every reasoning delta is new text: no delta repeats an earlier one's text.
    const deltas = s.chunks.map((c) =>
      (c.choices as { delta?: { reasoning_content?: string } }[])[0]?.delta?.reasoning_content
    ).filter((d): d is string => !!d);
    assert.equal(deltas.join(""), s.reasoning);
    for (const d of deltas) assert.equal(countOf(s.reasoning, d.trim()), 1, `delta repeated: ${d}`);

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

Deno.test("reasoning: REASONING=think puts thoughts inline in <think> blocks; REASONING=off drops them", async () => {
  const { tool, observed, answer } = await agentFixture();
  const think = await startRig({ DIFY_API_KEY: "app-agent", REASONING: "think" });
  try {
    const s = await streamText(think.client, { model: "dify", messages: [user("fixture:agent_with_thoughts")] });
    assert.equal(s.reasoning, "", "no reasoning_content in think mode");
    assert.ok(s.content.startsWith("<think>"), s.content);
    assert.equal(countOf(s.content, "<think>"), countOf(s.content, "</think>"), "every block is closed");
    const inside = [...s.content.matchAll(/<think>([\s\S]*?)<\/think>/g)].map((m) => m[1]).join("\n");
    const outside = s.content.replace(/<think>[\s\S]*?<\/think>\s*/g, "");
    assert.equal(countOf(inside, tool.tool_input), 1);
    assert.equal(countOf(inside, observed.observation), 1);
    assert.equal(countOf(outside, answer), 1, "the answer once, outside the thinking");
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
    assert.equal(countOf(s.content, answer), 1);
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

Deno.test("reasoning: the New Agent's closing message is not appended again, in every REASONING mode", async () => {
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
  const mini = await startFakeDify({
    script: () => [
      thought({ tool: "search", tool_input: '{"q":"weather"}' }),
      thought({ tool: "search", tool_input: '{"q":"weather"}', observation: "sunny" }),
      { event: "message_file", ...head, id: "f-1", type: "image", belongs_to: "assistant", url: "/files/w.png" },
      { event: "agent_message", ...head, id: "m-9", answer: "It is" },
      { event: "agent_message", ...head, id: "m-9", answer: " sunny." },
      thought({ id: "th-2", position: 2, thought: "It is sunny." }),
      { event: "message", ...head, id: "m-9", answer: "It is sunny." },
      { event: "message_end", ...head, id: "m-9", metadata: { usage: { prompt_tokens: 5, completion_tokens: 3 } } },
    ],
  });
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
        assert.equal(countOf(s.content, "It is sunny."), 1, `${mode}: ${s.content}`);
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

// ─── Message files, replacements and other content events ────────────────────────────────────────

Deno.test("content: message_file URLs relative to Dify's origin are made absolute; the user's own files are not echoed", async () => {
  const head = { conversation_id: "c-1", message_id: "m-1", created_at: 1, task_id: "t-1" };
  const mini = await startFakeDify({
    script: () => [
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
    ],
  });
  const bridge = await startBridge({ DIFY_API_URL: mini.url, DIFY_API_KEY: "app-chatflow", CONVERSATION_MODE: "off" });
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

Deno.test("content: text sent as message_file events (vision quirk) is content; annotation replies and TTS join cleanly", async () => {
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

Deno.test("content: message_replace replaces the answer; streaming sends it as a separated final delta", async () => {
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
  const mini = await startFakeDify({
    script: () => [
      node("node_started", "LLM"),
      { event: "message", ...head, answer: "something rude" },
      node("node_finished", "LLM"),
      { event: "message_replace", ...head, answer: replacement, reason: "" },
      { event: "message_end", ...head, metadata: { usage: { prompt_tokens: 1, completion_tokens: 0 } } },
      { event: "workflow_finished", ...head, workflow_run_id: "w", data: { status: "succeeded", outputs: {} } },
    ],
  });
  const bridge = await startBridge({
    DIFY_API_URL: mini.url,
    DIFY_API_KEY: "app-chatflow",
    REASONING: "think",
    REASONING_NODES: "1",
    CONVERSATION_MODE: "off",
  });
  try {
    const r = await bridge.client().chat.completions.create({ model: "dify", messages: [user("x")] as never });
    assert.equal(r.choices[0].message.content, replacement);
    const s = await streamText(bridge.client(), { model: "dify", messages: [user("x")] });
    assert.ok(s.content.endsWith(replacement), s.content);
    assert.equal(countOf(s.content, "<think>"), countOf(s.content, "</think>"));
  } finally {
    await bridge.close();
    await mini.close();
  }
});

// ─── Disconnects, keepalives, timeouts ───────────────────────────────────────────────────────────

Deno.test("disconnects: a client leaving mid-stream stops the Dify task with the same user, for chat, completion and workflow", async () => {
  const env = await startRig({ DIFY_API_KEY: "", DIFY_APPS: CHAT_COMPLETION_WORKFLOW_APPS });
  try {
    const expected: Record<string, RegExp> = {
      chat: /^\/chat-messages\/([^/]+)\/stop$/,
      completion: /^\/completion-messages\/([^/]+)\/stop$/,
      workflow: /^\/workflows\/tasks\/([^/]+)\/stop$/,
    };
    for (const [model, path] of Object.entries(expected)) {
      env.fake.reset();
      const who = `leaver-${model}`;
      await streamThenAbort(env.bridge.url, {
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
    // Stopped: the bridge holds nothing open, and sent no second stop.
    await eventually(async () => (await health(env.bridge.url)).streams === 0, 5_000, "no open streams");
    assert.equal(env.fake.stops.length, 1);
  } finally {
    await env.close();
  }
});

Deno.test("disconnects: a non-streaming client that gives up also stops the Dify task", async () => {
  const env = await startRig({ DIFY_API_KEY: "", DIFY_APPS: CHAT_COMPLETION_WORKFLOW_APPS });
  try {
    for (const model of ["chat", "workflow"]) {
      env.fake.reset();
      const sent = env.fake.bytesSent();
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
      await until(() => env.fake.bytesSent() > sent, 5_000, "Dify's first events");
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

Deno.test("disconnects: keepalive comments fill Dify's silences and Dify's pings are forwarded as comments", async () => {
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
    assert.ok(countOf(r.text, ": keepalive") >= 2, "one per keepalive period");
    const read = readSse(r.text);
    assert.ok(read.done);
    assert.match(read.content, /^Turn 1 of [0-9a-f]{8}: wait for it fault:idle:1000$/);
    // The SDK reads through comments.
    const s = await streamText(env.client, { model: "dify", messages: [user("again fault:idle:500")] });
    assert.match(s.content, /: again fault:idle:500$/);

    const pings = countOf(decoder.decode(await readFixture("ping_keepalive.sse")), "event: ping");
    const p = await rawChat(env.bridge.url, {
      model: "dify",
      messages: [user("fixture:ping_keepalive")],
      stream: true,
    });
    assert.equal(countOf(p.text, ": ping\n\n"), pings, "each Dify ping becomes a `: ping` comment");
    assert.ok(!p.text.includes("event: ping"));
    assert.equal(readSse(p.text).content, answerOf(await fixtureEvents("ping_keepalive")));
  } finally {
    await env.close();
  }
});

Deno.test("disconnects: UPSTREAM_TIMEOUT_SECONDS gives a 504 before headers; UPSTREAM_IDLE_SECONDS an error frame after", async () => {
  const env = await startRig({ UPSTREAM_TIMEOUT_SECONDS: "0.3", UPSTREAM_IDLE_SECONDS: "0.3" });
  try {
    // Side by side: each waits out a limit.
    const [starts, , idle, plain] = await Promise.all([
      Promise.all(
        [true, false].map((stream) =>
          rawChat(env.bridge.url, { model: "dify", messages: [user("slow start fault:first_byte:5000")], stream })
        ),
      ),
      assert.rejects(
        streamText(env.client, { model: "dify", messages: [user("fault:first_byte:5000")] }),
        (e: unknown) => e instanceof OpenAI.APIError && e.status === 504,
      ),
      rawChat(env.bridge.url, { model: "dify", messages: [user("stall fault:idle:5000")], stream: true }),
      rawChat(env.bridge.url, { model: "dify", messages: [user("stall fault:idle:5000")] }),
    ]);
    for (const [i, r] of starts.entries()) {
      assert.equal(r.status, 504, `stream=${i === 0}: ${r.text}`);
      assert.equal(errorBody(r.text).code, "upstream_timeout");
    }
    assert.equal(idle.status, 200);
    const read = readSse(idle.text);
    assert.ok(read.content.length > 0, "content before the silence");
    assert.equal(read.last.error?.code, "upstream_idle_timeout");
    assert.ok(!read.done, "the stream ends with the error, not [DONE]");
    assert.equal(plain.status, 504);
    assert.equal(errorBody(plain.text).code, "upstream_idle_timeout");
  } finally {
    await env.close();
  }
});

Deno.test("bridge: a Dify call that goes silent past UPSTREAM_IDLE_SECONDS ends with an error and stops the task", async () => {
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

Deno.test("bridge: a client that leaves before Dify's first byte frees its slot and stops the task", async () => {
  await withBridge({ MAX_CONCURRENT_STREAMS: "1" }, async ({ bridge, dify }) => {
    const abort = new AbortController();
    const pending = fetch(`${bridge.url}/chat/completions`, {
      method: "POST",
      signal: abort.signal,
      body: JSON.stringify({ model: "dify", stream: true, user: "early", messages: [user("fault:first_byte:1500")] }),
    }).catch((e) => e);
    await until(() => dify.requests.some((q) => q.path === "/chat-messages"), 5_000, "the call to Dify");
    abort.abort();
    assert.ok((await pending) instanceof Error);
    await eventually(async () => (await health(bridge.url)).streams === 0, 10_000, "the slot freed");
    await until(() => dify.stops.length > 0, 2_000);
    assert.equal(dify.stops.length, 1);
    assert.equal(dify.stops[0].user, "early");
    const next = await bridge.client().chat.completions.create({ model: "dify", messages: [user("after")] });
    assert.match(next.choices[0].message.content ?? "", /after/);
  });
});

// ─── OpenClaw requests ───────────────────────────────────────────────────────────────────────────

Deno.test("openclaw: OpenClaw's real requests replay end to end: query `hi there`, Dify user from the sender", async () => {
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
      const body = await openclawRequest(name);
      assert.ok(Array.isArray(body.tools) && body.tool_choice, `${name} carries tools`);
      const r = await rawChat(env.bridge.url, body);
      assert.equal(r.status, 200, `${name}: ${r.text.slice(0, 300)}`);
      const read = readSse(r.text);
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

Deno.test("openclaw: an OpenClaw Telegram chat continues its conversation as the same Dify user", async () => {
  // A Dify that answers exactly what OpenClaw's capture echoes back, so turn 2 can continue turn 1.
  const answer = "Hello from fake server (reply #001).";
  const mini = await startFakeDify({
    script: (_path, body) => {
      const head = { conversation_id: String(body.conversation_id || "conv-tg"), message_id: "m", task_id: "t" };
      return [
        { event: "message", ...head, answer },
        { event: "message_end", ...head, metadata: { usage: { prompt_tokens: 3, completion_tokens: 7 } } },
      ];
    },
  });
  const bridge = await startBridge({ DIFY_API_URL: mini.url, DIFY_API_KEY: "app-chatflow", SYSTEM_PROMPT: "inputs" });
  try {
    for (const name of ["telegram-turn1", "telegram-turn2"]) {
      const r = await rawChat(bridge.url, await openclawRequest(name));
      assert.equal(r.status, 200, name);
      assert.equal(readSse(r.text).content, answer);
    }
    const [one, two] = mini.generateBodies();
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

Deno.test("openclaw: ENVELOPE=keep sends OpenClaw's text untouched", async () => {
  const env = await startRig({ SYSTEM_PROMPT: "inputs", ENVELOPE: "keep" });
  try {
    const body = await openclawRequest("telegram-turn1");
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

Deno.test("openclaw: tools, tool_choice, assistant tool_calls and tool messages are accepted and replayed as text", async () => {
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
      // A named function would be a 400 here (TOOLS=ignore): test/tools_test.ts.
      tool_choice: "auto",
    });
    assert.ok(s.content.length > 0);
    assert.match(env.fake.lastBody("/chat-messages").query, /18°C and sunny/);
  } finally {
    await env.close();
  }
});

// ─── Limits ──────────────────────────────────────────────────────────────────────────────────────

Deno.test(
  "limits: oversized bodies (declared or chunked), slow bodies, too many messages, 10,000 parts",
  async () => {
    await withBridge(
      { MAX_BODY_BYTES: "400000", BODY_TIMEOUT_SECONDS: "0.5", MAX_MESSAGES: "50" },
      async ({ dify, bridge }) => {
        const big = JSON.stringify({ model: "dify", messages: [user("x".repeat(500_000))] });
        // With a Content-Length.
        const declared = await rawChat(bridge.url, big);
        assert.equal(declared.status, 413);
        assert.equal(errorBody(declared.text, "413").code, "request_too_large");
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
        errorBody(await chunked.text(), "chunked 413");
        // Slow loris: headers promise 1000 bytes, 10 arrive, then nothing.
        const port = Number(new URL(bridge.url).port);
        const answer = await rawHttp(
          port,
          "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
            "Authorization: Bearer sk\r\nContent-Length: 1000\r\n\r\n",
          '{"model":"',
          10_000,
        );
        assert.match(answer, /^HTTP\/1\.1 408/, answer.slice(0, 200));
        const e = errorBody(
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
        assert.equal(errorBody(many.text, "messages").param, "messages");
        const parts = await rawChat(bridge.url, {
          model: "dify",
          messages: [user(Array.from({ length: 10_000 }, () => ({ type: "text", text: "x" })))],
        });
        assert.equal(parts.status, 400);
        assert.equal(errorBody(parts.text, "parts").param, "messages[0].content");
        // None of them reached Dify, and the server still answers.
        assert.equal(dify.generateBodies().length, 0);
        const ok = await rawChat(bridge.url, { model: "dify", messages: Array.from({ length: 50 }, () => user("y")) });
        assert.equal(ok.status, 200, ok.text);
        assert.equal((await health(bridge.url)).streams, 0);
      },
    );
  },
);

Deno.test(
  "limits: MAX_CONCURRENT_STREAMS — past it a 503 with Retry-After; after release, requests work again",
  async () => {
    await withBridge({ MAX_CONCURRENT_STREAMS: "2" }, async ({ dify, bridge }) => {
      const held = [1, 2].map((i) =>
        rawChat(bridge.url, { model: "dify", stream: true, messages: [user(`held ${i} fault:hold`)] })
      );
      await until(() => dify.held() >= 2, 5_000);
      assert.equal(dify.held(), 2);
      assert.equal((await health(bridge.url)).streams, 2);
      for (const stream of [true, false]) {
        const third = await rawChat(bridge.url, { model: "dify", stream, messages: [user("third")] });
        assert.equal(third.status, 503);
        assert.ok(Number(third.headers.get("retry-after")) >= 1);
        assert.equal(errorBody(third.text, "503").code, "overloaded");
      }
      // The SDK sees it as an APIError (retries are the client's choice; maxRetries is 0 here).
      const viaSdk = await sdkOutcome(bridge.client(), { model: "dify", messages: [user("sdk")] });
      assert.ok(viaSdk.error instanceof OpenAI.APIError && viaSdk.error.status === 503);
      dify.release();
      for (const res of await Promise.all(held)) {
        assert.equal(res.status, 200);
        assert.equal(sseData(res.text).at(-1), "[DONE]");
      }
      assert.equal((await health(bridge.url)).streams, 0);
      const after = await Promise.all(
        [1, 2].map((i) => bridge.client().chat.completions.create({ model: "dify", messages: [user(`after ${i}`)] })),
      );
      assert.ok(after.every((c, i) => c.choices[0].message.content?.includes(`after ${i + 1}`)));
    });
  },
);

// ─── Dify faults ─────────────────────────────────────────────────────────────────────────────────

interface DifyFault {
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

const DIFY_FAULTS: DifyFault[] = [
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

Deno.test(
  "dify faults: every failure is a clear status or error frame the SDK raises, streaming and not",
  async () => {
    await withBridge(
      // Generous: under load the fake takes a while to start a 5 MB line, which must not count as silence,
      // and forty answers side by side in one process can keep a plain error waiting past a second.
      { UPSTREAM_TIMEOUT_SECONDS: "3", UPSTREAM_IDLE_SECONDS: "2" },
      async ({ bridge }) => {
        const client = bridge.client();
        // Side by side: the timeouts among them take seconds each.
        await Promise.all(DIFY_FAULTS.flatMap((f) =>
          [true, false].map(async (stream) => {
            const what = `${f.query} stream=${stream}`;
            // The SDK's view and the raw view of the same fault, also side by side.
            const [got, raw] = await Promise.all([
              sdkOutcome(client, { model: "dify", stream, messages: [user(f.query)] }),
              f.answer ? undefined : rawChat(bridge.url, { model: "dify", stream, messages: [user(f.query)] }),
            ]);
            if (f.answer) {
              assert.equal(got.error, undefined, `${what}: ${got.error}`);
              f.answer(got.content);
              return;
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
            if (!raw) return assert.fail(what);
            if (expected) {
              assert.equal(raw.status, expected, what);
              errorBody(raw.text, what);
              if (f.retryAfter) assert.ok(Number(raw.headers.get("retry-after")) >= 1, what);
            } else {
              assert.equal(raw.status, 200, what);
              const frames = sseData(raw.text);
              const last = frames.at(-1) as { error?: { code?: string } };
              assert.ok(last?.error, `${what}: last frame ${JSON.stringify(last)}`);
              errorBody(JSON.stringify(last), what);
              assert.ok(!frames.includes("[DONE]"), what);
            }
            assert.notEqual(raw.status, 500, what);
          })
        ));
        assert.equal((await health(bridge.url)).streams, 0);
      },
    );
  },
);

Deno.test(
  "dify faults: split reads, CRLF and garbage lines keep the answer intact; a refused upload is a 400",
  async () => {
    // Every 7 bytes a separate write: multi-byte characters and line ends split across reads.
    const dify = await startFakeDify({ sliceBytes: 7, crlf: true });
    const bridge = await startBridge({ DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat" });
    try {
      const query = "fault:malformed 日本語 😀 héllo ∑";
      // Side by side: a timer tick per 7 bytes makes each answer take a while.
      await Promise.all([true, false].map(async (stream) => {
        const got = await sdkOutcome(bridge.client(), { model: "dify", stream, messages: [user(query)] });
        assert.equal(got.error, undefined, String(got.error));
        assert.match(got.content, new RegExp(`^Turn 1 of [0-9a-f]{8}: ${query}$`));
      }));
    } finally {
      await bridge.close();
      await dify.close();
    }
    // Dify refuses a file's type (415 on upload, errors.json `upload_unsupported_type`): retrying
    // cannot help, so a 400, not a 502 that OpenClaw would retry eight times.
    const refusing = await startFakeDify({ refuseUploads: true });
    const files = await startBridge({
      DIFY_API_URL: refusing.url,
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
      assert.match(errorBody(res.text, "upload 415").message, /File type not allowed/);
      assert.deepEqual(refusing.requests.filter((r) => r.method === "POST").map((r) => r.path), ["/files/upload"]);
    } finally {
      await files.close();
      await refusing.close();
    }
  },
);

Deno.test(
  "dify faults: a Dify that only pings still gets the response started; a client that leaves frees its slot",
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
      const text = await readUntil(pings, "", (t) => t.includes(": ping") || t.includes(": keepalive"));
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
      await readUntil(reader, "", (t) => t.includes('"content":"Turn"'));
      await reader.cancel();
      await until(() => dify.stops.length > 0, 3_000);
      assert.equal(dify.stops.length, 1);
      assert.ok(bridge.logs.some((l) => JSON.parse(l).error === "client_closed"));
    });
  },
);

Deno.test(
  "dify faults: unreachable Dify (refused, DNS) → 502; a pass-through key Dify rejects → 401/403",
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
          const got = await sdkOutcome(bridge.client(), { model: "dify", stream, messages: [user("hi")] });
          assert.ok(got.error instanceof OpenAI.APIError, String(got.error));
          assert.equal(got.error.status, 502, got.error.message);
          assert.match(got.error.message, /could not reach Dify for model dify/);
          assert.match(got.error.message, bridge === refused ? /refused/i : /dns|lookup|resolve/i);
        }
        assert.equal((await health(bridge.url)).streams, 0);
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
          const got = await sdkOutcome(open.client(key), { model: "any", stream, messages: [user(query)] });
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
        errorBody(r.text, String(r.status));
      }
    } finally {
      for (const b of bridges) await b.close();
      await dify.close();
    }
  },
);

// ─── Security ────────────────────────────────────────────────────────────────────────────────────

Deno.test(
  "security: a wrong or missing client key is 401 on every route (incl. DELETE, /v1/models); the right one works",
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
          assert.equal(errorBody(text, path).type, "authentication_error");
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

Deno.test(
  "security: one client can never continue or delete another's conversation, same user and messages",
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

Deno.test("security: the server fetches no URL a client supplies (images, files, ids, inputs)", async () => {
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

Deno.test("limits: BODY_TIMEOUT_SECONDS=0 means no limit: a body that pauses past the watchdog's tick is read", async () => {
  // KEEPALIVE_SECONDS=0.4 makes the watchdog tick every 100 ms: the pause below spans several ticks.
  await withBridge({ BODY_TIMEOUT_SECONDS: "0", KEEPALIVE_SECONDS: "0.4" }, async ({ bridge }) => {
    const bytes = new TextEncoder().encode(JSON.stringify({ model: "dify", messages: [user("slow but sure")] }));
    const res = await fetch(`${bridge.url}/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: "Bearer sk" },
      body: new ReadableStream<Uint8Array>({
        async start(c) {
          c.enqueue(bytes.subarray(0, 10));
          await new Promise((r) => setTimeout(r, 500));
          c.enqueue(bytes.subarray(10));
          c.close();
        },
      }),
      duplex: "half",
    } as RequestInit);
    const text = await res.text();
    assert.equal(res.status, 200, text);
  });
});
