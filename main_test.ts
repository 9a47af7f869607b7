/**
 * dify-openai tests: a fake Dify that emits Dify's exact bytes (bench/fake_dify.ts) on one side,
 * the official openai SDK and raw fetch on the other.
 */
import assert from "node:assert/strict";
import OpenAI from "openai";
import {
  ApiError,
  ChunkFormat,
  ConfigError,
  difyBase,
  difyError,
  LineSplitter,
  loadConfig,
  parseChatRequest,
  parseSseLine,
} from "./main.ts";
import { readFixture, startFakeDify } from "./bench/fake_dify.ts";
import { assistant, rawChat, sseData, startBridge, streamText, user } from "./bench/test_util.ts";

const test = (name: string, fn: () => Promise<void> | void) =>
  Deno.test({ name, sanitizeResources: false, sanitizeOps: false, fn });

/** The answer text a fixture carries: its `message` / `agent_message` deltas joined. */
async function fixtureAnswer(name: string): Promise<string> {
  const text = new TextDecoder().decode(await readFixture(`${name}.sse`));
  return text.split("\n").filter((l) => l.startsWith("data: ")).map((l) => JSON.parse(l.slice(6)))
    .filter((e) => e.event === "message" || e.event === "agent_message").map((e) => e.answer).join("");
}

async function fixtureUsage(name: string) {
  const text = new TextDecoder().decode(await readFixture(`${name}.sse`));
  const end = text.split("\n").filter((l) => l.startsWith("data: ")).map((l) => JSON.parse(l.slice(6)))
    .find((e) => e.event === "message_end");
  const u = end.metadata.usage;
  return { prompt_tokens: u.prompt_tokens, completion_tokens: u.completion_tokens, total_tokens: u.total_tokens };
}

/** A fake Dify and a bridge in front of it, closed after `fn`. */
async function withBridge(
  env: Record<string, string>,
  fn: (
    ctx: { dify: Awaited<ReturnType<typeof startFakeDify>>; bridge: Awaited<ReturnType<typeof startBridge>> },
  ) => Promise<void>,
  difyOptions: Parameters<typeof startFakeDify>[0] = {},
) {
  const dify = await startFakeDify(difyOptions);
  const bridge = await startBridge({ DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat", ...env });
  try {
    await fn({ dify, bridge });
  } finally {
    await bridge.close();
    await dify.close();
  }
}

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
  const f = new ChunkFormat("chatcmpl-1", 123, 'm"odel');
  const body = (s: string) => JSON.parse(s.slice(6));
  assert.deepEqual(body(f.role()).choices[0].delta, { role: "assistant", content: "" });
  const c = body(f.content('he said "hi"\n\u2028'));
  assert.deepEqual(c, {
    id: "chatcmpl-1",
    object: "chat.completion.chunk",
    created: 123,
    model: 'm"odel',
    choices: [{ index: 0, delta: { content: 'he said "hi"\n\u2028' }, logprobs: null, finish_reason: null }],
  });
  assert.equal(body(f.reasoning("r")).choices[0].delta.reasoning_content, "r");
  assert.equal(body(f.finish()).choices[0].finish_reason, "stop");
  assert.deepEqual(body(f.usage({ prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 })).choices, []);
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
    assert.equal(content, await fixtureAnswer("chat_basic"));
    assert.deepEqual(usage, await fixtureUsage("chat_basic"));
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
    assert.equal(r.choices[0].message.content, await fixtureAnswer("chat_basic"));
    assert.equal(r.choices[0].finish_reason, "stop");
    assert.deepEqual(r.usage, await fixtureUsage("chat_basic"));
  });
});

test("bridge: old Dify's escaped JSON and new Dify's raw UTF-8 give the same text, split anywhere", async () => {
  const expected = await fixtureAnswer("unicode_split");
  assert.ok(/[\u{1F000}-\u{1FFFF}]/u.test(expected));
  for (const sliceBytes of [undefined, 7]) {
    await withBridge({}, async ({ bridge }) => {
      for (const name of ["unicode_split", "unicode_split_legacy"]) {
        const { content } = await streamText(bridge.client(), { model: "dify", messages: [user(`fixture:${name}`)] });
        assert.equal(content, expected, `${name}, slices of ${sliceBytes}`);
      }
    }, { sliceBytes });
  }
});

test("bridge: generated streams in legacy encoding, with CRLF line ends and an initial ping", async () => {
  await withBridge({}, async ({ bridge, dify }) => {
    const r = await bridge.client().chat.completions.create({ model: "dify", messages: [user("héllo 😀 wörld")] });
    assert.match(r.choices[0].message.content ?? "", /^Turn 1 of [0-9a-f]{8}: héllo 😀 wörld$/);
    assert.equal(dify.lastBody().query, "héllo 😀 wörld");
  }, { legacy: true, crlf: true, pingFirst: true });
});

test("bridge: Dify's ping becomes an SSE comment; other events are skipped", async () => {
  await withBridge({}, async ({ bridge }) => {
    const res = await rawChat(bridge.url, { model: "dify", stream: true, messages: [user("fixture:ping_keepalive")] });
    assert.equal(res.status, 200);
    assert.equal((res.text.match(/^: ping$/gm) ?? []).length, 3);
    const content = sseData(res.text).filter((d) => typeof d === "object")
      .map((d) => ((d as { choices: { delta: { content?: string } }[] }).choices[0]?.delta?.content ?? "")).join("");
    assert.equal(content, await fixtureAnswer("ping_keepalive"));
    const tts = await streamText(bridge.client(), { model: "dify", messages: [user("fixture:tts_autoplay")] });
    assert.equal(tts.content, await fixtureAnswer("tts_autoplay"));
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
    assert.equal(partial, await fixtureAnswer("error_midstream"));
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
      await streamText(client, { model: "dify", messages: [user("private words")] });
      await client.chat.completions.create({ model: "dify", messages: [user("more private words")] });
      await assert.rejects(client.chat.completions.create({ model: "dify", messages: [] }));
      assert.equal(bridge.logs.length, 3);
      const entries = bridge.logs.map((l) => JSON.parse(l));
      assert.deepEqual(entries.map((e) => e.status), [200, 200, 400]);
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
    const res = await rawChat(bridge.url, { model: "dify", stream: true, user: "ida", messages: [user("fault:idle:3000")] });
    const last = sseData(res.text).at(-1) as { error: { code: string } };
    assert.equal(last.error.code, "upstream_idle_timeout");
    for (let i = 0; i < 100 && !dify.stops.length; i++) await new Promise((r) => setTimeout(r, 20));
    assert.equal(dify.stops.length, 1);
    assert.equal(dify.stops[0].user, "ida");
    assert.equal(dify.stops[0].path, `/chat-messages/${dify.stops[0].taskId}/stop`);
  });
});
