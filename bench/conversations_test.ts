/**
 * Issue 4: conversations that follow the chat — history fingerprints, session headers, explicit
 * ids, user mode, restarts, Dify losing conversations, scale-out on one KV file, and a broken store.
 *
 * The fake Dify answers `Turn <n> of <conv8>: <query>`, so an answer proves which Dify conversation
 * it came from and how many turns that conversation has seen.
 */
import assert from "node:assert/strict";
// deno-lint-ignore no-import-prefix -- the project imports the SDK by specifier (no import map)
import OpenAI from "npm:openai@^6";
import { DenoKvStore, type Store } from "../main.ts";
import { type FakeDify, startFakeDify } from "./fake_dify.ts";
import {
  assistant,
  type Bridge,
  type BridgeOptions,
  rawChat,
  sseData,
  startBridge,
  startProcess,
  user,
} from "./test_util.ts";

// ─── helpers ────────────────────────────────────────────────────────────────────────────────────

type ConvMessage = { role: string; content: unknown };

interface ConvRig {
  fake: FakeDify;
  bridge: Bridge;
  client: OpenAI;
  close(): Promise<void>;
}

/** A fake Dify (chat app) and a bridge in front of it. */
async function convRig(env: Record<string, string> = {}, opts: BridgeOptions = {}): Promise<ConvRig> {
  const fake = await startFakeDify();
  let bridge: Bridge;
  try {
    bridge = await startBridge({ DIFY_API_URL: fake.url, DIFY_API_KEY: "app-chat", ...env }, opts);
  } catch (e) {
    await fake.close();
    throw e;
  }
  return {
    fake,
    bridge,
    client: bridge.client(),
    async close() {
      await bridge.close();
      await fake.close();
    },
  };
}

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

const convSleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Deno KV on a fresh temporary file, for restarts and scale-out. */
async function convTempKv(): Promise<{ path: string; remove(): Promise<void> }> {
  const dir = await Deno.makeTempDir({ prefix: "conv_kv_" });
  return { path: `${dir}/conversations.kv`, remove: () => Deno.remove(dir, { recursive: true }).catch(() => {}) };
}

/** Waits until the KV file holds `turns` history fingerprints (each is written after its turn's head). */
async function convDurable(path: string, turns: number): Promise<void> {
  const kv = await Deno.openKv(path);
  try {
    for (const deadline = Date.now() + 10_000; Date.now() < deadline; await convSleep(5)) {
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
  const rig = await convRig();
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

Deno.test({
  name: "conversations: a three-turn chat (non-streaming) continues one Dify conversation",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: () => convThreeTurns(false),
});

Deno.test({
  name: "conversations: a three-turn chat (streaming) continues one Dify conversation",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: () => convThreeTurns(true),
});

Deno.test({
  name: "conversations: eight chats in parallel never cross-talk",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig();
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
  },
});

Deno.test({
  name: "conversations: two new chats with the same user stay separate",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig();
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
  },
});

Deno.test({
  name: "conversations: a continued turn sends Dify only the new message, system prompt and history stay out",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig();
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
  },
});

Deno.test({
  name: "conversations: the Dify user stays the one the conversation started with, even if `user` changes",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig({ DEFAULT_USER: "fallback-user" });
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
  },
});

Deno.test({
  name: "conversations: the response header X-Dify-Conversation-Id names the Dify conversation",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig();
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
  },
});

// ─── branching: regenerate, identical first exchanges, changed system prompt ────────────────────

Deno.test({
  name: "conversations: regenerate branches into a new Dify conversation with the history replayed",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig();
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
  },
});

Deno.test({
  name: "conversations: two chats with an identical first exchange each get their own Dify memory",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig();
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
  },
});

Deno.test({
  name: "conversations: a changed system prompt starts a new conversation, never an error",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig();
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
  },
});

// ─── system prompt modes ────────────────────────────────────────────────────────────────────────

for (const mode of ["prepend", "inputs", "drop"] as const) {
  Deno.test({
    name: `conversations: SYSTEM_PROMPT=${mode} decides what reaches inputs.system_prompt and the first query`,
    sanitizeResources: false,
    sanitizeOps: false,
    async fn() {
      const rig = await convRig({ SYSTEM_PROMPT: mode });
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

Deno.test({
  name: "conversations: when Dify forgets the conversation, the next turn replays the history and carries on",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig();
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
  },
});

Deno.test({
  name: "conversations: a bridge restarted on the same KV file continues the chat",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
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
  },
});

Deno.test({
  name: "conversations: a second bridge and a second process on the same KV file continue the chat",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
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
  },
});

// ─── session headers and explicit ids ───────────────────────────────────────────────────────────

Deno.test({
  name: "conversations: session ids (X-Session-Id, prompt_cache_key, X-OpenWebUI-Chat-Id, metadata.chat_id)",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig();
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
  },
});

Deno.test({
  name: "conversations: explicit ids (body conversation_id, header X-Dify-Conversation-Id); unknown id → 404",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig();
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
  },
});

// ─── user mode, off mode ────────────────────────────────────────────────────────────────────────

Deno.test({
  name: "conversations: CONVERSATION_MODE=user keeps one conversation per user; DELETE clears only that one",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig({ CONVERSATION_MODE: "user" });
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
  },
});

Deno.test({
  name: "conversations: DELETE /v1/conversations/{user} needs the client's key and touches only its own mappings",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig({ CONVERSATION_MODE: "user", PROXY_API_KEYS: "key-one,key-two" });
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
  },
});

Deno.test({
  name: "conversations: CONVERSATION_MODE=off makes every request a new conversation with the history replayed",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig({ CONVERSATION_MODE: "off" });
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
  },
});

// ─── client identity ────────────────────────────────────────────────────────────────────────────

Deno.test({
  name: "conversations: two clients with identical messages and the same user never share a conversation",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig();
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
  },
});

Deno.test({
  name: "conversations: two models on the same Dify app never share a conversation",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const rig = await convRig({ DIFY_APPS: JSON.stringify({ one: "app-chat", two: "app-chat" }) });
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
  },
});

// ─── the write-through cache and a broken store ─────────────────────────────────────────────────

/** Deno KV whose durable writes land late, like a slow or remote KV: write n waits `delayMs(n)`. */
class ConvSlowStore implements Store {
  writes = 0;
  constructor(private inner: Store, private delayMs: (n: number, op: string) => number) {}
  private wait(op = "set") {
    return convSleep(this.delayMs(this.writes++, op));
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

Deno.test({
  name: "conversations: a turn sent the instant the previous stream ends continues (write-through cache)",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
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
      const rig = await convRig({}, { store: slow });
      try {
        for (const stream of [true, false]) {
          slow.writes = 0;
          const chat = new ConvChat(rig.client, { stream });
          const turns = [];
          for (let i = 1; i <= 4; i++) turns.push(convTurnOf((await chat.say(`instant ${i}`)).content));
          // A later turn, once every late write has landed.
          await convSleep(late + 50);
          turns.push(convTurnOf((await chat.say("later")).content));
          assert.deepEqual(turns.map((t) => t.n), [1, 2, 3, 4, 5], `${what}, stream ${stream}`);
          assert.equal(new Set(turns.map((t) => t.conv)).size, 1);
        }
      } finally {
        await rig.close();
      }
    }
  },
});

Deno.test({
  name: "conversations: DELETE right after an answer is not undone by that answer's late mapping write",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const kv = new DenoKvStore(await Deno.openKv(":memory:"));
    // Mapping writes take 100 ms to land; deletes land at once.
    const slow = new ConvSlowStore(kv, (_n, op) => op === "delete" ? 0 : 100);
    const rig = await convRig({ CONVERSATION_MODE: "user" }, { store: slow });
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
      await convSleep(200);
      const next = await ask("f2");
      assert.equal(next.n, 1, "the deleted conversation stays deleted");
      assert.notEqual(next.conv, first.conv);
    } finally {
      await rig.close();
    }
  },
});

/** A store that fails every call: synchronously (a broken driver) or as a rejected promise. */
class ConvBrokenStore implements Store {
  calls = 0;
  constructor(private sync: boolean) {}
  private fail(): never {
    this.calls++;
    throw new Error("store is down");
  }
  private op<T>(): Promise<T> {
    if (this.sync) this.fail();
    return Promise.resolve().then(() => this.fail());
  }
  get<T>(): Promise<T | null> {
    return this.op();
  }
  set(): Promise<void> {
    return this.op();
  }
  setIf(): Promise<boolean> {
    return this.op();
  }
  delete(): Promise<void> {
    return this.op();
  }
  close() {}
}

for (const sync of [false, true]) {
  Deno.test({
    name: `conversations: a store that ${
      sync ? "throws" : "rejects"
    } on every call still answers, warning once per kind`,
    sanitizeResources: false,
    sanitizeOps: false,
    async fn() {
      for (const mode of ["history", "user"]) {
        const store = new ConvBrokenStore(sync);
        const rig = await convRig({ CONVERSATION_MODE: mode }, { store });
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
          await convSleep(20);
          const warnings = rig.bridge.warnings.length;
          assert.ok(warnings >= 2 && warnings <= 3, `one warning per failure kind: ${rig.bridge.warnings.join(" | ")}`);
          for (const kind of ["read", "write", "delete"]) {
            assert.ok(rig.bridge.warnings.filter((w) => w.includes(`store ${kind}:`)).length <= 1, kind);
          }
          assert.ok(rig.bridge.warnings.some((w) => w.includes("store read:")));
          assert.ok(rig.bridge.warnings.some((w) => w.includes("store write:")));
          const calls = store.calls;
          await run();
          await convSleep(20);
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

const CONV_OPENCLAW = "/work/shared/openclaw-wire/";

async function convOpenClaw(prefix: "telegram" | "cli", difyUser: string) {
  const rig = await convRig();
  try {
    const turn1 = JSON.parse(await Deno.readTextFile(`${CONV_OPENCLAW}${prefix}-turn1.json`));
    const turn2 = JSON.parse(await Deno.readTextFile(`${CONV_OPENCLAW}${prefix}-turn2.json`));
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

Deno.test({
  name: "conversations: OpenClaw Telegram turns 1 and 2 continue one Dify conversation as telegram:123456789",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: () => convOpenClaw("telegram", "telegram:123456789"),
});

Deno.test({
  name: "conversations: OpenClaw CLI turns 1 and 2 continue one Dify conversation as the default user",
  sanitizeResources: false,
  sanitizeOps: false,
  fn: () => convOpenClaw("cli", "dify-openai"),
});
