/**
 * `POST /v1/responses` over real HTTP: the bridge in front of the fake Dify (Dify's exact bytes), driven by
 * the official openai SDK's Responses methods, raw fetch, and the request shape of the Codex CLI.
 */
import assert from "node:assert/strict";
import OpenAI from "openai";
import type { ResponseInputItem } from "openai/resources/responses/responses";
import { type FakeDify } from "../bench/fake_dify.ts";
import {
  bunAvailable,
  errorBody,
  openai,
  type ProcessBridge,
  startProcess,
  startRig,
  turnOf,
  withBridge,
} from "../bench/test_util.ts";

const WIRE = new URL("../testdata/responses-wire/", import.meta.url);

/** The queries the fake Dify received for /chat-messages, in order. */
function queries(fake: FakeDify): string[] {
  return fake.requests.filter((r) => r.path === "/chat-messages").map((r) => String(r.body.query));
}

function conversationIds(fake: FakeDify): string[] {
  return fake.requests.filter((r) => r.path === "/chat-messages").map((r) => String(r.body.conversation_id ?? ""));
}

/** A raw SSE body's `event:` names and `data:` payloads. */
function events(text: string): { event: string; data: Record<string, unknown> }[] {
  return text.split("\n\n").filter((b) => b.startsWith("event: ")).map((block) => {
    const [event, data] = block.split("\n");
    return { event: event.slice(7), data: JSON.parse(data.slice(6)) };
  });
}

async function postResponses(url: string, body: unknown, headers: Record<string, string> = {}) {
  const res = await fetch(`${url}/responses`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer sk-test", ...headers },
    body: JSON.stringify(body),
  });
  return { status: res.status, headers: res.headers, text: await res.text() };
}

Deno.test("responses http: responses.create, not streamed — a response object with the answer and usage", async () => {
  await withBridge({}, async ({ dify, bridge }) => {
    const r = await bridge.client().responses.create({ model: "dify", input: "hello there" });
    assert.match(r.id, /^resp_[0-9a-f]{32}$/);
    assert.equal(r.object, "response");
    assert.equal(r.status, "completed");
    assert.equal(r.model, "dify");
    assert.equal(turnOf(r.output_text).query, "hello there");
    assert.equal(r.output.length, 1);
    assert.equal(r.output[0].type, "message");
    assert.ok(r.usage && r.usage.total_tokens === r.usage.input_tokens + r.usage.output_tokens);
    assert.equal(r.error, null);
    assert.equal((r as unknown as { store: boolean }).store, true);
    assert.deepEqual(queries(dify), ["hello there"]);
  });
});

Deno.test("responses http: responses.stream and create({stream: true}) — the documented events, answer intact", async () => {
  await withBridge({}, async ({ bridge }) => {
    const client = bridge.client();
    const stream = client.responses.stream({ model: "dify", input: "stream me" });
    const seen: string[] = [];
    let deltas = "";
    stream.on("response.output_text.delta", (e) => void (deltas += e.delta));
    for await (const e of stream) seen.push(e.type);
    const final = await stream.finalResponse();
    assert.equal(final.output_text, deltas);
    assert.equal(turnOf(final.output_text).query, "stream me");
    assert.deepEqual(seen.slice(0, 4), [
      "response.created",
      "response.in_progress",
      "response.output_item.added",
      "response.content_part.added",
    ]);
    assert.deepEqual(seen.slice(-4), [
      "response.output_text.done",
      "response.content_part.done",
      "response.output_item.done",
      "response.completed",
    ]);
    const raw = await client.responses.create({ model: "dify", input: "again", stream: true });
    let n = -1;
    for await (const e of raw) {
      assert.equal(e.sequence_number, n + 1);
      n = e.sequence_number;
    }
    assert.ok(n > 5);
  });
});

Deno.test("responses http: a 3-turn chain by previous_response_id sends Dify only the new input", async () => {
  await withBridge({}, async ({ dify, bridge }) => {
    const client = bridge.client();
    const r1 = await client.responses.create({ model: "dify", instructions: "Be kind.", input: "one" });
    const r2 = await client.responses.create({
      model: "dify",
      instructions: "Be kind.",
      input: "two",
      previous_response_id: r1.id,
      stream: false,
    });
    // The third turn streams.
    const s3 = client.responses.stream({ model: "dify", input: "three", previous_response_id: r2.id });
    const r3 = await s3.finalResponse();
    assert.deepEqual([r1, r2, r3].map((r) => turnOf(r.output_text).n), [1, 2, 3]);
    assert.equal(r2.previous_response_id, r1.id);
    assert.equal(queries(dify)[0], "Be kind.\n\none");
    assert.deepEqual(queries(dify).slice(1), ["two", "three"]);
    const ids = conversationIds(dify);
    assert.equal(ids[0], "");
    assert.ok(ids[1] && ids[1] === ids[2]);
  });
});

Deno.test("responses http: a 3-turn chain by full-history resend, echoing the bridge's message and reasoning items", async () => {
  await withBridge({}, async ({ dify, bridge }) => {
    const client = bridge.client();
    // The Agents SDK's session mode: the whole history, with the output items as the server sent them.
    const history: ResponseInputItem[] = [{ role: "user", content: "first" }];
    for (const [i, text] of ["first", "second", "third"].entries()) {
      if (i) history.push({ role: "user", content: text });
      const r = i === 1
        ? await client.responses.stream({ model: "dify", input: history, store: false }).finalResponse()
        : await client.responses.create({ model: "dify", input: history, store: false });
      assert.equal(turnOf(r.output_text).n, i + 1, `turn ${i + 1}: ${r.output_text}`);
      // A reasoning item the client echoes (as after an agent answer) must not break the match.
      history.push(
        { type: "reasoning", id: `rs_echo_${i}`, summary: [{ type: "summary_text", text: "thought" }] },
        ...(r.output as ResponseInputItem[]),
      );
    }
    assert.deepEqual(queries(dify), ["first", "second", "third"]);
  });
});

Deno.test("responses http: session headers name the chat; x-client-request-id never splits it", async () => {
  await withBridge({}, async ({ dify, bridge }) => {
    const client = bridge.client();
    const turn = (input: string, headers: Record<string, string>) =>
      client.responses.create({ model: "dify", input, store: false }, { headers });
    // Only the new message each time: the session id alone continues the chat.
    const a = await turn("a1", { "session-id": "thread-A", "x-client-request-id": crypto.randomUUID() });
    const b = await turn("b1", { "thread-id": "thread-B" });
    const a2 = await turn("a2", { "session-id": "thread-A", "x-client-request-id": crypto.randomUUID() });
    const b2 = await turn("b2", { "thread-id": "thread-B" });
    const c = await turn("c1", { "x-session-affinity": "3e2dd2d2-b8a2-46f3-b29d-a80decfe82d0:1" });
    const c2 = await turn("c2", { "x-session-affinity": "3e2dd2d2-b8a2-46f3-b29d-a80decfe82d0:2" });
    assert.deepEqual([a, a2, b, b2, c, c2].map((r) => turnOf(r.output_text).n), [1, 2, 1, 2, 1, 2]);
    assert.equal(turnOf(a.output_text).conv, turnOf(a2.output_text).conv);
    assert.notEqual(turnOf(a.output_text).conv, turnOf(b.output_text).conv);
    // client_metadata.session_id (Codex) in the body.
    const d = await client.responses.create(
      { model: "dify", input: "d1", client_metadata: { session_id: "D" } } as never,
    );
    const d2 = await client.responses.create(
      { model: "dify", input: "d2", client_metadata: { session_id: "D" } } as never,
    );
    assert.equal(turnOf((d2 as OpenAI.Responses.Response).output_text).n, 2);
    assert.equal(turnOf((d as OpenAI.Responses.Response).output_text).n, 1);
    // A fresh x-client-request-id per request, history resent: history matching still continues.
    const h1 = await turn("h1", { "x-client-request-id": "r1" });
    const h2 = await client.responses.create({
      model: "dify",
      input: [{ role: "user", content: "h1" }, ...(h1.output as ResponseInputItem[]), { role: "user", content: "h2" }],
    }, { headers: { "x-client-request-id": "r2" } });
    assert.equal(turnOf(h2.output_text).n, 2);
    assert.equal(queries(dify).at(-1), "h2");
  });
});

Deno.test("responses http: another client's response id is a 404, like an unknown one; GET and DELETE are scoped", async () => {
  const rig = await startRig({ PROXY_API_KEYS: "key-one,key-two" });
  try {
    const one = rig.bridge.client("key-one");
    const two = rig.bridge.client("key-two");
    const r = await one.responses.create({ model: "dify", input: "mine" });
    const got = await one.responses.retrieve(r.id);
    assert.equal(got.id, r.id);
    assert.equal(got.output_text, r.output_text);
    for (const attempt of [() => two.responses.retrieve(r.id), () => one.responses.retrieve("resp_unknown")]) {
      await assert.rejects(attempt, (e: unknown) => e instanceof OpenAI.NotFoundError);
    }
    await assert.rejects(
      () => two.responses.create({ model: "dify", input: "steal", previous_response_id: r.id }),
      (e: unknown) =>
        e instanceof OpenAI.NotFoundError && (e.error as { param?: string }).param === "previous_response_id",
    );
    await assert.rejects(() => two.responses.delete(r.id), (e: unknown) => e instanceof OpenAI.NotFoundError);
    const replay = await fetch(`${rig.bridge.url}/responses/${r.id}?stream=true`, {
      headers: { authorization: "Bearer key-one" },
    });
    assert.equal(replay.status, 400);
    assert.equal(errorBody(await replay.text()).param, "stream");
    await one.responses.delete(r.id);
    await assert.rejects(() => one.responses.retrieve(r.id), (e: unknown) => e instanceof OpenAI.NotFoundError);
    // store: false keeps nothing.
    const unstored = await one.responses.create({ model: "dify", input: "x", store: false });
    await assert.rejects(() => one.responses.retrieve(unstored.id), (e: unknown) => e instanceof OpenAI.NotFoundError);
  } finally {
    await rig.close();
  }
});

Deno.test("responses http: a response too large to keep for GET still continues by previous_response_id", async () => {
  await withBridge({}, async ({ bridge }) => {
    const client = bridge.client();
    // The echoed tools make this response object larger than one store value.
    const tools = Array.from({ length: 40 }, (_, i) => ({
      type: "function" as const,
      name: `tool_${i}`,
      description: "x".repeat(2000),
      parameters: {},
      strict: false,
    }));
    const r = await client.responses.create({ model: "dify", input: "big", tools });
    const e = await client.responses.retrieve(r.id).then(() => undefined, (e) => e);
    assert.ok(e instanceof OpenAI.NotFoundError);
    assert.match(e.message, /too large to keep/);
    const r2 = await client.responses.create({ model: "dify", input: "next", previous_response_id: r.id });
    assert.equal(turnOf(r2.output_text).n, 2);
  });
});

Deno.test("responses http: errors — before output an HTTP status, after it response.failed whose code says retry or not", async () => {
  await withBridge({}, async ({ bridge }) => {
    const client = bridge.client();
    await assert.rejects(
      () => client.responses.create({ model: "dify", input: "fault:status_400", stream: true }),
      (e: unknown) => e instanceof OpenAI.BadRequestError,
    );
    await assert.rejects(
      () => client.responses.create({ model: "dify", input: "x", background: true }),
      (e: unknown) => e instanceof OpenAI.BadRequestError && (e.error as { param?: string }).param === "background",
    );
    const bad = await postResponses(bridge.url, { model: "dify", input: 42 });
    assert.equal(bad.status, 400);
    assert.equal(errorBody(bad.text).param, "input");
    const cases: [string, string][] = [
      ["fault:midstream_error", "invalid_prompt"], // Dify said 400: a retry cannot fix it
      ["fault:eof", "server_error"], // the stream broke off: a retry may
      ["fault:reset", "server_error"],
    ];
    for (const [query, code] of cases) {
      const res = await postResponses(bridge.url, { model: "dify", input: query, stream: true });
      assert.equal(res.status, 200, query);
      const ev = events(res.text);
      assert.ok(ev.some((e) => e.event === "response.output_text.delta"), query);
      assert.deepEqual(ev.slice(-2).map((e) => e.event), ["response.failed", "error"], query);
      const failed = ev.at(-2)!.data.response as { status: string; error: { code: string } };
      assert.equal(failed.status, "failed");
      assert.equal(failed.error.code, code, query);
      assert.deepEqual(ev.map((e) => e.data.sequence_number), ev.map((_, i) => i), query);
    }
  });
});

Deno.test("responses http: agent thoughts are reasoning items before the answer (REASONING on), none when off", async () => {
  for (const reasoning of ["reasoning_content", "off"]) {
    await withBridge({ DIFY_API_KEY: "app-agent", REASONING: reasoning }, async ({ bridge }) => {
      const client = bridge.client();
      const streamed = await client.responses.stream({ model: "dify", input: "fixture:agent_with_thoughts" })
        .finalResponse();
      const whole = await client.responses.create({ model: "dify", input: "fixture:agent_with_thoughts" });
      for (const r of [streamed, whole]) {
        const types = r.output.map((o) => o.type);
        if (reasoning === "off") assert.deepEqual(types, ["message"]);
        else {
          assert.equal(types[0], "reasoning");
          assert.ok(types.includes("message"));
          const first = r.output[0];
          assert.ok(first.type === "reasoning" && first.summary[0].text.length > 0);
        }
        assert.match(r.output_text, /watercolor/);
      }
      assert.equal(streamed.output_text, whole.output_text);
    });
  }
});

Deno.test("responses http: images and files reach Dify; workflow and completion apps answer too", async () => {
  await withBridge({}, async ({ dify, bridge }) => {
    const png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";
    const r = await bridge.client().responses.create({
      model: "dify",
      input: [{
        role: "user",
        content: [
          { type: "input_text", text: "what is in these?" },
          { type: "input_image", image_url: `data:image/png;base64,${png}`, detail: "auto" },
          { type: "input_file", filename: "notes.txt", file_data: btoa("hello") },
        ],
      }],
    });
    assert.equal(turnOf(r.output_text).query, "what is in these?");
    const chat = dify.requests.find((q) => q.path === "/chat-messages")!;
    assert.deepEqual(chat.body.files.map((f: { type: string }) => f.type), ["image", "document"]);
    assert.equal(dify.requests.filter((q) => q.path === "/files/upload").length, 2);
  });
  for (const key of ["app-workflow", "app-completion"]) {
    await withBridge({ DIFY_API_KEY: key }, async ({ bridge }) => {
      const client = bridge.client();
      const r = await client.responses.create({ model: "dify", input: "run it" });
      assert.match(r.output_text, /run it/);
      const s = await client.responses.stream({ model: "dify", input: "stream it", previous_response_id: r.id })
        .finalResponse();
      assert.match(s.output_text, /stream it/);
    });
  }
});

Deno.test("responses http: GET on /v1/responses is not a route; POST to an id is 405", async () => {
  await withBridge({}, async ({ bridge }) => {
    const res = await fetch(`${bridge.url}/responses/resp_1`, {
      method: "POST",
      headers: { authorization: "Bearer x" },
    });
    assert.equal(res.status, 405);
    errorBody(await res.text());
    const get = await fetch(`${bridge.url}/responses`, { headers: { authorization: "Bearer x" } });
    assert.equal(get.status, 405);
    errorBody(await get.text());
  });
});

// ─── The Codex CLI's request shape, replayed ────────────────────────────────────────────────────

type Wire = { headers: Record<string, string>; body: Record<string, unknown> };

async function wire(name: string): Promise<Wire> {
  return JSON.parse(await Deno.readTextFile(new URL(name, WIRE)));
}

/**
 * Replays captured turns in order. A later turn's assistant items are what the bridge sent at capture
 * time: they are swapped for what the bridge under test answered, as the client would echo them.
 */
async function replay(url: string, names: string[], edit: (t: Wire) => void = () => {}): Promise<string[]> {
  const answers: Record<string, unknown>[] = [];
  const texts: string[] = [];
  for (const name of names) {
    const t = await wire(name);
    edit(t);
    let n = 0;
    const input = t.body.input as Record<string, unknown>[];
    for (const [i, item] of input.entries()) {
      if (item.role === "assistant" && (item.type ?? "message") === "message") input[i] = answers[n++];
    }
    const res = await postResponses(url, t.body, t.headers);
    assert.equal(res.status, 200, res.text.slice(0, 300));
    const last = events(res.text).at(-1)!;
    assert.equal(last.event, "response.completed");
    const output = (last.data.response as { output: Record<string, unknown>[] }).output;
    const message = output.find((o) => o.type === "message") as { content: { text: string }[] };
    answers.push(message);
    texts.push(message.content[0].text);
  }
  return texts;
}

/** Codex turn 1, then turn 2 resending the history with our answer echoed: one Dify conversation, only new text. */
async function codexTurns(url: string, fake: FakeDify) {
  const [, text2] = await replay(url, ["codex-turn1.json", "codex-turn2.json"]);
  const chats = fake.requests.filter((r) => r.path === "/chat-messages").slice(-2);
  // The environment block and the developer prompt never reach Dify's query as the question.
  assert.ok(!String(chats[0].body.query).includes("<environment_context>"));
  assert.match(String(chats[0].body.query), /say hello in five words$/);
  assert.equal(chats[1].body.query, "now say goodbye");
  assert.ok(chats[1].body.conversation_id);
  assert.equal(turnOf(text2).n, 2);
}

Deno.test("responses http: the Codex CLI's requests (developer items, environment context, 9 tools, store: false)", async () => {
  await withBridge({}, async ({ dify, bridge }) => {
    await codexTurns(bridge.url, dify);
  });
  // Without the session headers it is history matching that continues the chat.
  await withBridge({}, async ({ dify, bridge }) => {
    await replay(bridge.url, ["codex-turn1.json", "codex-turn2.json"], (t) => {
      for (const h of ["session-id", "thread-id", "x-client-request-id"]) delete t.headers[h];
      delete t.body.prompt_cache_key;
      delete t.body.client_metadata;
    });
    assert.deepEqual(conversationIds(dify).map(Boolean), [false, true]);
    assert.equal(queries(dify).at(-1), "now say goodbye");
  });
});

Deno.test("responses http: the Agents SDK's session mode (echoed reasoning and message items, no session id)", async () => {
  await withBridge({ DIFY_API_KEY: "app-agent" }, async ({ dify, bridge }) => {
    const conversations: string[] = [];
    for (const name of ["agents-session-turn1.json", "agents-session-turn2.json"]) {
      const t = await wire(name);
      const res = await postResponses(bridge.url, t.body, t.headers);
      assert.equal(res.status, 200, res.text.slice(0, 300));
      conversations.push(res.headers.get("x-dify-conversation-id") ?? "");
    }
    // Turn 2 asks Dify to continue turn 1's conversation. (The fake Dify does not know the fixture's
    // conversation and says so; the bridge then starts over with the history replayed: a third call.)
    const chats = dify.requests.filter((r) => r.path === "/chat-messages");
    assert.equal(chats[0].body.conversation_id ?? "", "");
    assert.ok(conversations[0]);
    assert.equal(chats[1].body.conversation_id, conversations[0], "turn 2 continues turn 1's conversation");
    assert.equal(chats[1].body.query, "fixture:agent_with_thoughts again");
  });
});

Deno.test("responses http: OpenClaw's openai-responses requests (envelope, internal context, no session id)", async () => {
  await withBridge({ SYSTEM_PROMPT: "drop" }, async ({ dify, bridge }) => {
    const [one, two] = await replay(bridge.url, ["openclaw-turn1.json", "openclaw-turn2.json"]);
    assert.deepEqual(queries(dify), ["hi there", "second message"]);
    assert.deepEqual([one, two].map((t) => turnOf(t).n), [1, 2]);
  });
});

for (const runtime of ["deno", "bun"] as const) {
  Deno.test(`responses http: ${runtime} main.ts serves the Codex turns and the SDK's chain`, async () => {
    if (runtime === "bun" && !bunAvailable()) return;
    const rig = await startRig();
    let proc: ProcessBridge | undefined;
    try {
      proc = await startProcess(runtime, { DIFY_API_URL: rig.fake.url, DIFY_API_KEY: "app-chat" });
      await codexTurns(proc.url, rig.fake);
      const client = openai(proc.url);
      const r1 = await client.responses.create({ model: "dify", input: "p1" });
      const r2 = await client.responses.stream({ model: "dify", input: "p2", previous_response_id: r1.id })
        .finalResponse();
      assert.equal(turnOf(r2.output_text).n, 2);
      assert.equal((await client.responses.retrieve(r2.id)).output_text, r2.output_text);
    } finally {
      await proc?.stop();
      await rig.close();
    }
  });
}

// ─── The real Codex CLI (opt-in: CODEX_BIN=/path/to/codex) ──────────────────────────────────────

/** Runs `codex exec --json` in `cwd`; returns the agent messages it printed. */
async function codexExec(bin: string, home: string, cwd: string, args: string[]): Promise<string[]> {
  const out = await new Deno.Command(bin, {
    args: ["exec", "--json", "--skip-git-repo-check", ...args],
    cwd,
    env: { CODEX_HOME: home, DIFY_BRIDGE_API_KEY: "your-proxy-key" },
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const lines = new TextDecoder().decode(out.stdout).split("\n").filter(Boolean).map((l) => JSON.parse(l));
  const thread = lines.find((l) => l.type === "thread.started")?.thread_id;
  const messages = lines.filter((l) => l.item?.type === "agent_message").map((l) => l.item.text as string);
  return [thread, ...messages];
}

Deno.test("responses http: the real Codex CLI, 3 turns of codex exec / exec resume (opt-in: CODEX_BIN)", async () => {
  const bin = Deno.env.get("CODEX_BIN");
  if (!bin) return;
  const rig = await startRig({ PROXY_API_KEYS: "your-proxy-key", SYSTEM_PROMPT: "drop" });
  const home = await Deno.makeTempDir();
  const cwd = await Deno.makeTempDir();
  try {
    await Deno.writeTextFile(
      `${home}/config.toml`,
      [
        'model = "dify"',
        'model_provider = "dify-bridge"',
        "[model_providers.dify-bridge]",
        'name = "dify-bridge"',
        `base_url = "${rig.bridge.url}"`,
        'env_key = "DIFY_BRIDGE_API_KEY"',
        'wire_api = "responses"',
      ].join("\n"),
    );
    const [thread, first] = await codexExec(bin, home, cwd, ["first prompt"]);
    const [, second] = await codexExec(bin, home, cwd, ["resume", thread, "second prompt"]);
    const [, third] = await codexExec(bin, home, cwd, ["resume", thread, "third prompt"]);
    assert.deepEqual([first, second, third].map((t) => turnOf(t).n), [1, 2, 3]);
    assert.deepEqual(queries(rig.fake), ["first prompt", "second prompt", "third prompt"]);
  } finally {
    await rig.close();
    await Deno.remove(home, { recursive: true });
    await Deno.remove(cwd, { recursive: true });
  }
});
