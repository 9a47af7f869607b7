/**
 * What a stored Responses answer costs the store, and that the cheaper paths keep what GET and
 * `previous_response_id` need: the response rides in its turn's record write (one write, like a chat
 * turn's), it is the very JSON the stream's `response.completed` carried, and every way a turn is
 * recorded (a lost head race, a chain, `off` mode, a workflow app, Bun's SQLite store) still keeps it.
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import OpenAI from "openai";
import { apiError, DenoKvStore, ResponsesFormat, type Store, type Translation } from "../main.ts";
import {
  bunAvailable,
  eventually,
  openai,
  type ProcessBridge,
  startProcess,
  startRig,
  test,
  turnOf,
  withBridge,
} from "../bench/test_util.ts";

type StoreKey = Parameters<Store["get"]>[0];

/** One store write as the store was asked for it: the keys it sets, checked or not. */
interface Write {
  op: "set" | "setIf";
  keys: StoreKey[];
}

/** Deno KV in memory, recording every write; `loseRaces`: every check-and-set fails (another turn got there first). */
class RecordingStore implements Store {
  writes: Write[] = [];
  /** The last value written per key (JSON of the key). */
  values = new Map<string, unknown>();
  #inFlight: Promise<unknown>[] = [];
  constructor(private inner: Store, private loseRaces = false) {}
  static async open(loseRaces = false): Promise<RecordingStore> {
    return new RecordingStore(new DenoKvStore(await Deno.openKv(":memory:")), loseRaces);
  }
  get<T>(key: StoreKey): Promise<T | null> {
    return this.inner.get<T>(key);
  }
  set(key: StoreKey, value: unknown, ttlMs: number): Promise<void> {
    this.writes.push({ op: "set", keys: [key] });
    this.values.set(JSON.stringify(key), value);
    return this.#track(this.inner.set(key, value, ttlMs));
  }
  setIf(
    key: StoreKey,
    expected: unknown,
    value: unknown,
    ttlMs: number,
    also: [StoreKey, unknown][] = [],
    soon?: boolean,
  ): Promise<boolean> {
    this.writes.push({ op: "setIf", keys: [key, ...also.map(([k]) => k)] });
    for (const [k, v] of [[key, value] as [StoreKey, unknown], ...also]) this.values.set(JSON.stringify(k), v);
    if (this.loseRaces) return Promise.resolve(false);
    return this.#track(this.inner.setIf(key, expected, value, ttlMs, also, soon));
  }
  delete(key: StoreKey): Promise<void> {
    return this.#track(this.inner.delete(key));
  }
  #track<T>(p: Promise<T>): Promise<T> {
    this.#inFlight.push(p);
    return p;
  }
  /** Every write asked for so far has committed (or failed). */
  async landed(): Promise<void> {
    await Promise.allSettled(this.#inFlight);
  }
  close(): void {
    this.inner.close();
  }
  /** The writes that set a key of this kind (`resp`, `head`, `fp`, …). */
  writing(kind: string): Write[] {
    return this.writes.filter((w) => w.keys.some((k) => k[0] === kind));
  }
}

async function post(url: string, path: string, body: unknown): Promise<string> {
  const res = await fetch(`${url}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json", authorization: "Bearer sk-test" },
    body: JSON.stringify(body),
  });
  const text = await res.text();
  assert.equal(res.status, 200, text);
  return text;
}

/** The `response` JSON exactly as the stream's `response.completed` event carried it. */
function completedJson(sse: string): string {
  const block = sse.split("\n\n").find((b) => b.startsWith("event: response.completed\n"));
  assert.ok(block, sse.slice(-500));
  const data = block.slice(block.indexOf("\ndata: ") + 7);
  const prefix = /^\{"type":"response\.completed","sequence_number":\d+,"response":/.exec(data);
  assert.ok(prefix, data.slice(0, 200));
  return data.slice(prefix[0].length, -1);
}

async function getText(url: string, id: string): Promise<{ status: number; text: string }> {
  const res = await fetch(`${url}/responses/${id}`, { headers: { authorization: "Bearer sk-test" } });
  return { status: res.status, text: await res.text() };
}

test("respcost: a stored response rides in its turn's record write — as many store writes as a chat turn", async () => {
  const store = await RecordingStore.open();
  await withBridge({}, async ({ bridge }) => {
    await post(bridge.url, "/chat/completions", {
      model: "dify",
      stream: true,
      messages: [{ role: "user", content: "c" }],
    });
    await eventually(() => Promise.resolve(store.writes.length > 0), 5_000, "the chat turn's record");
    const chatWrites = store.writes.length;
    store.writes = [];
    const sse = await post(bridge.url, "/responses", { model: "dify", stream: true, input: "r" });
    await eventually(() => Promise.resolve(store.writing("resp").length > 0), 5_000, "the response's write");
    const id = JSON.parse(completedJson(sse)).id;
    assert.equal(store.writes.length, chatWrites, JSON.stringify(store.writes));
    const [write] = store.writing("resp");
    assert.equal(write.op, "setIf");
    assert.deepEqual(write.keys.map((k) => k[0]).sort(), ["fp", "head", "resp"]);
    assert.equal(write.keys.find((k) => k[0] === "resp")!.at(-1), id);
    // Kept small: the parts that differ between responses, not the JSON (a default request echoes no settings).
    const kept = store.values.get(JSON.stringify(write.keys.find((k) => k[0] === "resp"))) as Record<string, unknown>;
    assert.deepEqual(Object.keys(kept).sort(), ["c", "k", "u"]);
    assert.equal((kept.k as { e?: string }).e, undefined);
    assert.ok(JSON.stringify(kept).length < completedJson(sse).length / 2, JSON.stringify(kept));
    // GET answers the very bytes the stream ended with, written again from those parts.
    const got = await getText(bridge.url, id);
    assert.equal(got.status, 200);
    assert.equal(got.text, completedJson(sse));
    // Not streamed: the body and the stored copy are the same response.
    const whole = await post(bridge.url, "/responses", { model: "dify", input: "r2" });
    assert.deepEqual(JSON.parse((await getText(bridge.url, JSON.parse(whole).id)).text), JSON.parse(whole));
  }, { store });
});

test("respcost: a turn that loses the head's check-and-set still stores its response", async () => {
  const store = await RecordingStore.open(true);
  await withBridge({}, async ({ bridge }) => {
    const client = bridge.client();
    const r = await client.responses.stream({ model: "dify", input: "raced" }).finalResponse();
    await eventually(() => Promise.resolve(store.writing("resp").length === 2), 5_000, "the response written alone");
    assert.deepEqual(store.writing("resp").map((w) => w.op), ["setIf", "set"]);
    // Past the pending copy: the store itself has it.
    await eventually(async () => (await getText(bridge.url, r.id)).status === 200, 5_000, "GET after the write");
    assert.equal((await client.responses.retrieve(r.id)).output_text, r.output_text);
    const next = await client.responses.create({ model: "dify", input: "next", previous_response_id: r.id });
    assert.equal(turnOf(next.output_text).n, 2);
  }, { store });
});

test("respcost: chains, CONVERSATION_MODE=off, session ids and a workflow app keep every response", async () => {
  const cases: [string, Record<string, string>, Record<string, unknown>][] = [
    ["history", {}, {}],
    ["off", { CONVERSATION_MODE: "off" }, {}],
    ["user", { CONVERSATION_MODE: "user" }, { user: "alice" }],
    ["session", {}, { prompt_cache_key: "chat-7" }],
    ["workflow", { DIFY_API_KEY: "app-workflow" }, {}],
  ];
  for (const [name, env, extra] of cases) {
    await withBridge(env, async ({ bridge }) => {
      const client = bridge.client();
      const r1 = await client.responses.stream({ model: "dify", input: "one", ...extra }).finalResponse();
      const r2 = await client.responses.stream({ model: "dify", input: "two", previous_response_id: r1.id, ...extra })
        .finalResponse();
      if (name !== "workflow") assert.equal(turnOf(r2.output_text).n, 2, name);
      for (const r of [r1, r2]) {
        const got = await client.responses.retrieve(r.id);
        assert.equal(got.output_text, r.output_text, name);
        assert.equal(got.status, "completed", name);
      }
    });
  }
});

test("respcost: a response stored whole by an earlier version is still served as it was", async () => {
  const store = await RecordingStore.open();
  await withBridge({}, async ({ bridge }) => {
    const client = createHash("sha256").update("sk-test").digest().subarray(0, 12).toString("base64url");
    const json = JSON.stringify({ id: "resp_old", object: "response", status: "completed", output: [] });
    await store.set(["resp", client, "dify", "resp_old"], { c: "conv-old", u: "alice", o: json }, 0);
    const got = await getText(bridge.url, "resp_old");
    assert.equal(got.status, 200);
    assert.equal(got.text, json);
  }, { store });
});

test("respcost: store: false writes no response; DELETE right after the stream is not undone by its write", async () => {
  const store = await RecordingStore.open();
  await withBridge({}, async ({ bridge }) => {
    const client = bridge.client();
    const unstored = await client.responses.stream({ model: "dify", input: "x", store: false }).finalResponse();
    await eventually(() => Promise.resolve(store.writing("head").length > 0), 5_000, "the turn's record");
    assert.equal(store.writing("resp").length, 0);
    assert.equal((await getText(bridge.url, unstored.id)).status, 404);
    for (let i = 0; i < 5; i++) {
      const sse = await post(bridge.url, "/responses", { model: "dify", stream: true, input: `gone ${i}` });
      const id = JSON.parse(completedJson(sse)).id;
      // At once: the record's write may still be in flight.
      const del = await fetch(`${bridge.url}/responses/${id}`, {
        method: "DELETE",
        headers: { authorization: "Bearer sk-test" },
      });
      assert.equal(del.status, 200, await del.text());
      assert.equal((await getText(bridge.url, id)).status, 404);
    }
    // After every write has landed, nothing came back.
    await eventually(() => Promise.resolve(store.writing("resp").length === 5), 5_000, "the 5 responses' writes");
    await store.landed();
    const keys = store.writing("resp").flatMap((w) => w.keys.filter((k) => k[0] === "resp"));
    assert.equal(keys.length, 5);
    for (const key of keys) assert.equal(await store.get(key), null);
  }, { store });
});

test("respcost: response.completed reuses each item's done JSON; echoed settings cannot confuse where output goes", async () => {
  const echo = {
    instructions: 'say "output":[] twice',
    max_output_tokens: null,
    metadata: { output: "[]", note: '"output":[]' },
    parallel_tool_calls: true,
    previous_response_id: null,
    prompt_cache_key: null,
    reasoning: { effort: null, summary: null },
    safety_identifier: null,
    store: true,
    temperature: 1,
    text: { format: { type: "text" }, verbosity: "medium" },
    tool_choice: "auto",
    tools: [{
      type: "function",
      name: "output",
      description: '"output":[]',
      parameters: { output: [] },
      strict: false,
    }],
    top_p: 1,
    truncation: "disabled",
    user: null,
  };
  const f = new ResponsesFormat("resp_abc", 1700000000, "dify", echo, true);
  const answer = 'A "quoted" \\ answer,\n"output":[] 🦕 \u2028 end';
  let out = f.open() + f.reasoning('thinking "hard"\n') + f.content(answer.slice(0, 10)) + f.content(answer.slice(10));
  const t = { content: answer, reasoning: 'thinking "hard"\n', usage: undefined } as unknown as Translation;
  out += f.close(t);
  const completed = JSON.parse(completedJson(out));
  assert.deepEqual(completed.metadata, echo.metadata);
  assert.equal(completed.instructions, echo.instructions);
  assert.deepEqual(completed.tools, echo.tools);
  assert.deepEqual(completed.output.map((o: { type: string }) => o.type), ["reasoning", "message"]);
  assert.equal(completed.output[1].content[0].text, answer);
  assert.equal(completed.output[0].summary[0].text, 'thinking "hard"\n');
  const done = out.split("\n\n").filter((b) => b.startsWith("event: response.output_item.done\n"))
    .map((b) => JSON.parse(b.slice(b.indexOf("\ndata: ") + 7)).item);
  assert.deepEqual(completed.output, done);
  // Kept for GET as its parts (the settings that differ from the defaults), written again byte for byte.
  const kept = f.kept(t);
  assert.deepEqual(Object.keys(JSON.parse(kept.e!)).sort(), ["instructions", "metadata", "tools"]);
  assert.equal(ResponsesFormat.keptJson("resp_abc", kept), completedJson(out));
  // The SDK's own reader takes these bytes in order.
  const client = new OpenAI({
    apiKey: "sk-test",
    baseURL: "http://sdk.invalid/v1",
    fetch: () => Promise.resolve(new Response(out, { headers: { "content-type": "text/event-stream" } })),
  });
  const final = await client.responses.stream({ model: "dify", input: "x" }).finalResponse();
  assert.equal(final.output_text, answer);
  // An error after output: the failed response is still the object `final`.
  const g = new ResponsesFormat("resp_def", 1700000000, "dify", echo, true);
  g.open();
  g.content("partial");
  g.error(apiError("upstream_broken", "Dify's stream broke"));
  assert.equal(g.final?.status, "failed");
});

for (const runtime of ["deno", "bun"] as const) {
  test(`respcost: ${runtime} main.ts keeps streamed responses for GET and chains, in history and off mode`, async () => {
    if (runtime === "bun" && !bunAvailable()) return;
    const rig = await startRig();
    const procs: ProcessBridge[] = [];
    try {
      for (const mode of ["history", "off"]) {
        const proc = await startProcess(runtime, {
          DIFY_API_URL: rig.fake.url,
          DIFY_API_KEY: "app-chat",
          CONVERSATION_MODE: mode,
        });
        procs.push(proc);
        const client = openai(proc.url);
        const r1 = await client.responses.stream({ model: "dify", input: "p1" }).finalResponse();
        const r2 = await client.responses.stream({ model: "dify", input: "p2", previous_response_id: r1.id })
          .finalResponse();
        assert.equal(turnOf(r2.output_text).n, 2, mode);
        for (const r of [r1, r2]) assert.equal((await client.responses.retrieve(r.id)).output_text, r.output_text);
      }
    } finally {
      for (const p of procs) await p.stop();
      await rig.close();
    }
  });
}
