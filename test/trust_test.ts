/**
 * Safe to expose: a client never reaches another client's conversation; a client that stops
 * reading, or a Dify that never stops, cannot make the bridge hold an answer in memory.
 */
import assert from "node:assert/strict";
import OpenAI from "openai";
import { type FakeDify, startFakeDify } from "../bench/fake_dify.ts";
import { bunAvailable, rawChat, sseData, startProcess, startRig, until, user } from "../bench/test_util.ts";

// ─── Isolation ──────────────────────────────────────────────────────────────────────────────────

Deno.test("isolation: another client key cannot read or continue a conversation by its id, by body or header", async () => {
  const rig = await startRig({ PROXY_API_KEYS: "sk-one,sk-two" });
  try {
    const one = rig.bridge.client("sk-one");
    const two = rig.bridge.client("sk-two");
    const first = await one.chat.completions.create({ model: "dify", messages: [user("the vault code is 4711")] })
      .withResponse();
    const stolen = first.response.headers.get("x-dify-conversation-id")!;
    assert.ok(stolen, "the bridge names the Dify conversation");
    const refusals: unknown[] = [];
    for (const attempt of [{ body: { conversation_id: stolen } }, { headers: { "x-dify-conversation-id": stolen } }]) {
      const error = await two.chat.completions.create(
        { model: "dify", messages: [user("what is the vault code?")], ...attempt.body } as never,
        { headers: attempt.headers },
      ).then(() => null, (e) => e);
      assert.ok(error instanceof OpenAI.NotFoundError, `refused: ${error}`);
      refusals.push(error.error);
    }
    // An id that exists nowhere gets the very same answer, but for the id it names.
    const unknown = await two.chat.completions.create(
      { model: "dify", messages: [user("hi")], conversation_id: "no-such-conversation" } as never,
    ).then(() => null, (e) => e);
    assert.ok(unknown instanceof OpenAI.NotFoundError);
    const shape = (e: unknown) => JSON.stringify(e).replaceAll(stolen, "ID").replaceAll("no-such-conversation", "ID");
    for (const refusal of refusals) assert.equal(shape(refusal), shape(unknown.error));
    assert.equal((unknown.error as { code: string }).code, "conversation_not_found");
    // Dify never heard of the second client's turns, and the first client's memory is intact.
    assert.equal(rig.fake.conversations.get(stolen)!.turns.length, 1);
    const own = await one.chat.completions.create(
      { model: "dify", messages: [user("and again")], conversation_id: stolen } as never,
    );
    assert.match(own.choices[0].message.content!, /^Turn 2 of /);
  } finally {
    await rig.close();
  }
});

Deno.test("isolation: in every conversation mode a conversation the bridge started is the starting client's alone", async () => {
  for (const mode of ["user", "off"]) {
    const rig = await startRig({ PROXY_API_KEYS: "sk-one,sk-two", CONVERSATION_MODE: mode });
    try {
      const first = await rig.bridge.client("sk-one").chat.completions.create({
        model: "dify",
        messages: [user("hello")],
        user: "alice",
      }).withResponse();
      const id = first.response.headers.get("x-dify-conversation-id")!;
      const guess = { model: "dify", messages: [user("hi")], user: "alice", conversation_id: id } as never;
      await assert.rejects(rig.bridge.client("sk-two").chat.completions.create(guess), OpenAI.NotFoundError, mode);
      const own = await rig.bridge.client("sk-one").chat.completions.create(guess);
      assert.match(own.choices[0].message.content!, /^Turn 2 of /, mode);
    } finally {
      await rig.close();
    }
  }
});

Deno.test("isolation: with no PROXY_API_KEYS (one scope) an explicit id still reaches Dify, as documented", async () => {
  const rig = await startRig();
  try {
    const first = await rig.bridge.client("sk-a").chat.completions.create({ model: "dify", messages: [user("a")] })
      .withResponse();
    const id = first.response.headers.get("x-dify-conversation-id")!;
    const other = await rig.bridge.client("sk-b").chat.completions.create(
      { model: "dify", messages: [user("b")], conversation_id: id } as never,
    );
    assert.match(other.choices[0].message.content!, /^Turn 2 of /);
  } finally {
    await rig.close();
  }
});

// ─── Bounded answers ────────────────────────────────────────────────────────────────────────────

Deno.test("bounds: past MAX_ANSWER_BYTES a stream ends with an error frame naming the limit, and Dify's task is stopped", async () => {
  const rig = await startRig({ MAX_ANSWER_BYTES: "100000" });
  try {
    const { status, text } = await rawChat(rig.bridge.url, {
      model: "dify",
      stream: true,
      messages: [user("fault:firehose:50000000")],
    });
    assert.equal(status, 200);
    const frames = sseData(text) as Record<string, { code?: string; message?: string }>[];
    const last = frames.at(-1)!;
    assert.equal(last.error?.code, "answer_too_large");
    assert.match(last.error!.message!, /MAX_ANSWER_BYTES/);
    assert.ok(!text.includes("[DONE]"));
    await until(() => rig.fake.stops.length === 1, 5000, "the stop call");
    assert.ok(rig.fake.firehoseBytes() < 16_000_000, `Dify was read on: ${rig.fake.firehoseBytes()} bytes of 50 MB`);
    // Without streaming: an HTTP error, and the task stopped too.
    const whole = await rawChat(rig.bridge.url, { model: "dify", messages: [user("fault:firehose:50000000")] });
    assert.equal(whole.status, 502);
    assert.equal(JSON.parse(whole.text).error.code, "answer_too_large");
    await until(() => rig.fake.stops.length === 2, 5000, "the second stop call");
  } finally {
    await rig.close();
  }
});

Deno.test("bounds: an upstream that sends only pings ends with the idle error; ANSWER_TIMEOUT_SECONDS ends a slow answer", async () => {
  const rig = await startRig({ UPSTREAM_IDLE_SECONDS: "0.5", KEEPALIVE_SECONDS: "0.2", ANSWER_TIMEOUT_SECONDS: "1.5" });
  try {
    // The three wait out their limits side by side.
    const [pings, quiet, slow] = await Promise.all([
      rawChat(rig.bridge.url, { model: "dify", stream: true, messages: [user("fault:forever")] }),
      rawChat(rig.bridge.url, { model: "dify", messages: [user("fault:forever")] }),
      // Events every 0.3 s keep the idle timer happy; the answer deadline still ends it.
      rawChat(rig.bridge.url, {
        model: "dify",
        stream: true,
        messages: [user("fault:slow:300 " + "word ".repeat(40))],
      }),
    ]);
    // Dify's pings still reach the client as comments, but they do not count as Dify saying something.
    assert.equal(pings.status, 200);
    assert.match(pings.text, /^: (ping|keepalive)/m);
    assert.equal((sseData(pings.text).at(-1) as { error: { code: string } }).error.code, "upstream_idle_timeout");
    assert.equal(quiet.status, 504);
    assert.equal(JSON.parse(quiet.text).error.code, "upstream_idle_timeout");
    const last = sseData(slow.text).at(-1) as { error: { code: string; message: string } };
    assert.equal(last.error.code, "answer_timeout");
    assert.match(last.error.message, /ANSWER_TIMEOUT_SECONDS/);
  } finally {
    await rig.close();
  }
});

// ─── Backpressure ───────────────────────────────────────────────────────────────────────────────

/** Sends a streaming chat on a raw connection and reads only the response head: then it reads nothing more. */
async function stalledStream(port: number, query: string): Promise<Deno.Conn> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const body = JSON.stringify({ model: "dify", stream: true, messages: [user(query)] });
  await conn.write(new TextEncoder().encode(
    `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
  ));
  const head = new Uint8Array(512);
  const n = await conn.read(head);
  assert.match(new TextDecoder().decode(head.subarray(0, n ?? 0)), /^HTTP\/1\.1 200/);
  return conn;
}

async function rssMiB(pid: number): Promise<number> {
  const status = await Deno.readTextFile(`/proc/${pid}/status`);
  return Number(/VmRSS:\s+(\d+)/.exec(status)![1]) / 1024;
}

async function healthMs(url: string): Promise<number> {
  const started = performance.now();
  const res = await fetch(url.replace(/\/v1$/, "/healthz"), { signal: AbortSignal.timeout(10_000) });
  await res.body?.cancel();
  return performance.now() - started;
}

for (const runtime of ["deno", "bun"] as const) {
  Deno.test({
    name:
      `backpressure (${runtime}): a client that stops reading stops the reading of Dify, and is dropped after UPSTREAM_IDLE_SECONDS`,
    ignore: runtime === "bun" && !bunAvailable(),
    async fn() {
      const dify = await startFakeDify();
      const proc = await startProcess(runtime, {
        DIFY_API_URL: dify.url,
        DIFY_API_KEY: "app-chat",
        UPSTREAM_IDLE_SECONDS: "1",
      });
      const conn = await stalledStream(proc.port, "fault:firehose:500000000");
      try {
        // Kernel buffers on both sides take some megabytes; then Dify is no longer read.
        let before = -1;
        await until(
          () => {
            const now = dify.firehoseBytes();
            const settled = now === before && now > 0;
            before = now;
            return settled;
          },
          10_000,
          "Dify's reads to stop",
        );
        assert.ok(dify.firehoseBytes() < 64_000_000, `read ${dify.firehoseBytes()} bytes of a 500 MB answer`);
        await until(() => dify.stops.length === 1, 10_000, "the stalled client to be dropped and the task stopped");
        await until(() => /"error":"client_stalled"/.test(proc.output()), 5000, "the log line");
      } finally {
        conn.close();
        await proc.stop();
        await dify.close();
      }
    },
  });

  Deno.test({
    name: `backpressure (${runtime}): 20 clients that never read hold the bridge's memory to about a chunk each`,
    ignore: runtime === "bun" && !bunAvailable(),
    async fn() {
      const dify: FakeDify = await startFakeDify();
      const proc = await startProcess(runtime, { DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat" });
      const conns: Deno.Conn[] = [];
      try {
        const before = await rssMiB(proc.process.pid);
        conns.push(
          ...await Promise.all(Array.from({ length: 20 }, () => stalledStream(proc.port, "fault:firehose:1000000000"))),
        );
        let read = -1;
        await until(
          () => {
            const now = dify.firehoseBytes();
            const settled = now === read;
            read = now;
            return settled;
          },
          30_000,
          "Dify's reads to stop",
        );
        // What the sockets' kernel buffers hold (megabytes each on loopback) is all Dify gave.
        assert.ok(read < 20 * 32_000_000, `read ${read} bytes of 20 GB`);
        const grown = await rssMiB(proc.process.pid) - before;
        assert.ok(grown < 100, `RSS grew by ${grown.toFixed(0)} MiB for 20 stalled streams`);
        // A bridge the stalled streams blocked would not answer at all; a loaded machine can take seconds.
        const ms = await healthMs(proc.url);
        assert.ok(ms < 5000, `/healthz answers while the streams stall (in ${ms.toFixed(0)} ms)`);
      } finally {
        for (const conn of conns) conn.close();
        await proc.stop();
        await dify.close();
      }
    },
  });
}
