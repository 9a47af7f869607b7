/**
 * The hot path's shortcuts keep their promises: one read of Dify in flight however many ask, a
 * streamed fingerprint hashed in large pieces, commits grouped within Deno KV's limits, CORS
 * headers split between the preflight and the answer, and no per-turn store write that nothing reads.
 */
import assert from "node:assert/strict";
import {
  AnswerPrint,
  type ChunkReader,
  DenoKvStore,
  DifyEvents,
  Exchange,
  fingerprint,
  LineSplitter,
  newTranslation,
  type Store,
  type TranslateOptions,
} from "../main.ts";
import { rawChat, startRig, user } from "../bench/test_util.ts";

const OPTIONS: TranslateOptions = {
  reasoning: "reasoning_content",
  reasoningNodes: false,
  origin: "http://dify",
  app: { model: "m", url: "http://dify/v1", input: "query" },
  clientKey: false,
};

Deno.test("denoperf: concurrent DifyEvents.next calls share one read of Dify", async () => {
  let reads = 0;
  let release!: () => void;
  const gate = new Promise<void>((resolve) => release = resolve);
  const bytes = new TextEncoder().encode(`data: {"event": "message", "task_id": "t", "answer": "hi"}\n\n`);
  const reader: ChunkReader = {
    async read() {
      reads++;
      if (reads > 1) return null;
      await gate;
      return bytes;
    },
    cancel() {},
  };
  const t = newTranslation("chat", false);
  const events = new DifyEvents(reader, t, { content() {}, reasoning() {}, ping() {} }, OPTIONS, new Exchange(() => 0));
  const a = events.next();
  const b = events.next();
  assert.equal(a, b, "the same read");
  release();
  assert.deepEqual(await Promise.all([a, b]), [true, true]);
  assert.equal(reads, 1);
  assert.equal(t.content, "hi");
  assert.equal(await events.next(), false, "a new read once the first settled");
  assert.equal(reads, 2);
});

Deno.test("denoperf: a streamed fingerprint over 64 Ki characters, in small deltas, equals the whole answer's", () => {
  const system = "be brief";
  const messages = [{ role: "user", text: "tell me everything" }];
  const pieces: string[] = [];
  for (let i = 0; i < 20_000; i++) {
    pieces.push(i % 97 === 0 ? ` <thi` : i % 97 === 1 ? `nk>x</think>  a<b ` : ` word${i}\n`);
  }
  const print = new AnswerPrint(system, messages);
  for (const p of pieces) print.push(p);
  const answer = pieces.join("");
  assert.ok(answer.length > 65_536 * 2);
  assert.equal(print.digest(), fingerprint(system, [...messages, { role: "assistant", text: answer }]));
});

Deno.test("denoperf: grouped KV commits hold every write, past the batch size and the commit byte bound", async () => {
  const kv = await Deno.openKv(":memory:");
  const store = new DenoKvStore(kv);
  try {
    const big = "x".repeat(50_000);
    const writes: Promise<unknown>[] = [];
    for (let i = 0; i < 150; i++) {
      if (i % 3 === 0) writes.push(store.set(["big", `${i}`], { o: big, u: "u" }, 60_000));
      else {writes.push(
          store.setIf(["head", `${i}`], null, { f: `f${i}`, u: "u" }, 60_000, [[["fp", `${i}`], { c: `c${i}` }]]),
        );}
    }
    const results = await Promise.all(writes);
    assert.ok(results.every((r) => r === undefined || r === true), "every check-and-set won");
    for (let i = 0; i < 150; i++) {
      if (i % 3 === 0) assert.equal(((await store.get<{ o: string }>(["big", `${i}`]))?.o ?? "").length, 50_000);
      else {
        assert.deepEqual(await store.get(["head", `${i}`]), { f: `f${i}`, u: "u" });
        assert.deepEqual(await store.get(["fp", `${i}`]), { c: `c${i}` });
      }
    }
    // A head already there: the check-and-set from "absent" loses, in a group as alone.
    assert.equal(await store.setIf(["head", "1"], null, { f: "other", u: "u" }, 60_000), false);
  } finally {
    store.close();
  }
});

Deno.test("denoperf: the preflight names methods and headers; an answer carries only origin and exposed headers", async () => {
  const rig = await startRig();
  try {
    const pre = await fetch(`${rig.bridge.url}/chat/completions`, { method: "OPTIONS" });
    await pre.body?.cancel();
    assert.equal(pre.status, 204);
    assert.equal(pre.headers.get("access-control-allow-origin"), "*");
    assert.match(pre.headers.get("access-control-allow-headers") ?? "", /authorization/);
    assert.match(pre.headers.get("access-control-allow-methods") ?? "", /POST/);
    for (const stream of [true, false]) {
      const r = await rawChat(rig.bridge.url, { model: "dify", stream, messages: [user("hello")] });
      assert.equal(r.status, 200);
      assert.equal(r.headers.get("access-control-allow-origin"), "*");
      assert.match(r.headers.get("access-control-expose-headers") ?? "", /x-dify-conversation-id/);
      assert.equal(r.headers.get("access-control-allow-headers"), null, "preflight only");
    }
  } finally {
    await rig.close();
  }
});

Deno.test("denoperf: without client keys, CONVERSATION_MODE=off writes nothing per turn; with them, the owner", async () => {
  for (const keys of ["", "sk-a"]) {
    const env: Record<string, string> = { CONVERSATION_MODE: "off" };
    if (keys) env.PROXY_API_KEYS = keys;
    const kv = new DenoKvStore(await Deno.openKv(":memory:"));
    const written: string[] = [];
    const store: Store = {
      get: (key) => kv.get(key),
      set: (key, value, ttl) => (written.push(key[0]), kv.set(key, value, ttl)),
      setIf: (
        key,
        expected,
        value,
        ttl,
        also,
        soon,
      ) => (written.push(key[0]), kv.setIf(key, expected, value, ttl, also, soon)),
      delete: (key) => kv.delete(key),
      close: () => kv.close(),
    };
    const rig = await startRig(env, { store });
    try {
      const client = rig.bridge.client(keys || "sk-test");
      const first = await client.chat.completions.create({ model: "dify", messages: [user("one")] }).withResponse();
      const id = first.response.headers.get("x-dify-conversation-id");
      assert.ok(id);
      // An explicit id continues the conversation either way (without keys nothing is checked).
      const again = await client.chat.completions.create({
        model: "dify",
        messages: [user("two")],
        // @ts-expect-error: Dify's conversation id, an extension of the request
        conversation_id: id,
      });
      assert.ok(again.choices[0].message.content);
      assert.equal(rig.fake.lastBody("/chat-messages").conversation_id, id);
    } finally {
      await rig.close();
    }
    // Closed: every write the turns made has been flushed.
    assert.deepEqual(written, keys ? ["own", "own"] : []);
  }
});

Deno.test("denoperf: lines split alike whatever the chunking, LF-only chunks (the fast search) or CR and CRLF", () => {
  const text = "data: a\n\ndata: é😀\r\n\r\nevent: ping\rdata: b\n" + "x".repeat(300) + "\ndata: last";
  const want = text.split(/\r\n|\r|\n/);
  const bytes = new TextEncoder().encode(text);
  let seed = 7;
  const random = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  for (let round = 0; round < 300; round++) {
    const lines: string[] = [];
    const splitter = new LineSplitter((b, s, e) => lines.push(new TextDecoder().decode(b.subarray(s, e))));
    for (let at = 0; at < bytes.length;) {
      const size = 1 + Math.floor(random() * (round % 2 ? 8 : 64));
      // A reused buffer, as the BYOB reader hands over: the splitter must copy what it keeps.
      const chunk = new Uint8Array(64);
      const piece = bytes.subarray(at, at + size);
      chunk.set(piece);
      splitter.push(chunk.subarray(0, piece.length));
      chunk.fill(0x21);
      at += size;
    }
    splitter.flush();
    assert.deepEqual(lines, want, `round ${round}`);
  }
});
