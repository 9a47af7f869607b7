/**
 * Subprocess tests: main.ts as its own process, `deno run main.ts` and `bun main.ts`, in front of the fake
 * Dify — what only a real process shows: start-up, signals, shutdown, stores on disk, many connections at
 * once. Identical errors on both runtimes: errors_runtime_test.ts.
 */
import assert from "node:assert/strict";
import { startFakeDify } from "../bench/fake_dify.ts";
import {
  answerOf,
  assistant,
  type Bridge,
  bunAvailable,
  ChatSession,
  closedPort,
  fixtureEvents,
  hasContent,
  MAIN,
  openai,
  OPENCLAW_WIRE,
  type ProcessBridge,
  rawChat,
  readSse,
  readUntil,
  ROOT,
  sseData,
  startBridge,
  startProcess,
  streamText,
  tempStoreFile,
  turnOf,
  until,
  untilFingerprints,
  untilRefused,
  usageOf,
  user,
  withBridge,
  withProcess,
} from "../bench/test_util.ts";

// ─── Helpers ─────────────────────────────────────────────────────────────────────────────────────

type RuntimeName = "deno" | "bun";

const HAVE_BUN = bunAvailable();

const RUNTIMES: { rt: RuntimeName; ignore: boolean }[] = [
  { rt: "deno", ignore: false },
  { rt: "bun", ignore: !HAVE_BUN },
];

/**
 * Registers a test that runs the same body on every runtime, side by side: each waits on its own fake Dify
 * and process. A failure names its runtime; both run to their end before the test does (sanitizers on).
 * `oneAtATime` registers one test per runtime instead, for bodies that load the machine.
 */
function testEachRuntime(
  name: string,
  fn: (rt: RuntimeName) => Promise<void>,
  opts: { oneAtATime?: boolean } = {},
): void {
  if (opts.oneAtATime) {
    for (const { rt, ignore } of RUNTIMES) Deno.test({ name: `runtimes: ${name} (${rt})`, ignore, fn: () => fn(rt) });
    return;
  }
  const runtimes = RUNTIMES.filter((r) => !r.ignore).map((r) => r.rt);
  Deno.test(`runtimes: ${name} (${runtimes.join(", ")})`, async () => {
    const outcomes = await Promise.allSettled(runtimes.map((rt) => fn(rt)));
    const failures = outcomes.flatMap((o, i) => o.status === "rejected" ? [[runtimes[i], o.reason] as const] : []);
    for (const [rt, e] of failures) if (e instanceof Error) e.message = `(${rt}) ${e.message}`;
    if (failures.length === 1) throw failures[0][1];
    if (failures.length > 1) throw new AggregateError(failures.map(([, e]) => e), `${name}: failed on every runtime`);
  });
}

// ─── Answers ─────────────────────────────────────────────────────────────────────────────────────

testEachRuntime("streaming and non-streaming answers with usage, through the SDK and raw fetch", async (rt) => {
  const events = await fixtureEvents("chat_basic");
  const fx = { answer: answerOf(events), usage: usageOf(events) };
  await withProcess(rt, {}, async ({ dify, proc, client }) => {
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
    assert.equal(readSse(r.text).content, `Turn 1 of ${conv.slice(0, 8)}: hello raw fetch`);

    const n = await rawChat(proc.url, { model: "dify", messages: [user("hello again")] });
    assert.equal(n.status, 200, n.text);
    assert.match(n.headers.get("content-type") ?? "", /^application\/json/);
    const body = JSON.parse(n.text);
    assert.equal(turnOf(body.choices[0].message.content).query, "hello again");
    assert.equal(body.usage.total_tokens, body.usage.prompt_tokens + body.usage.completion_tokens);
    assert.ok(body.usage.completion_tokens > 0, JSON.stringify(body.usage));
    assert.deepEqual(dify.generateBodies().map((b) => b.response_mode), Array(4).fill("streaming"));
  });
});

testEachRuntime("three turns continue one Dify conversation", async (rt) => {
  await withProcess(rt, {}, async ({ dify, client }) => {
    const messages: { role: "user" | "assistant"; content: string }[] = [user("first question")];
    const say = async (stream: boolean) => {
      const text = stream
        ? (await streamText(client, { model: "dify", messages, user: "multi" })).content
        : (await client.chat.completions.create({ model: "dify", messages, user: "multi" })).choices[0].message
          .content ?? "";
      messages.push(assistant(text));
      return turnOf(text);
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

testEachRuntime("a client abort mid-stream stops the Dify task for the same user", async (rt) => {
  await withProcess(rt, {}, async ({ dify, proc, client }) => {
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

testEachRuntime("the OpenClaw request shape, POSTed as captured", async (rt) => {
  await withProcess(rt, { SYSTEM_PROMPT: "drop" }, async ({ dify, proc }) => {
    const body = await Deno.readTextFile(new URL("telegram-turn1.json", OPENCLAW_WIRE));
    const r = await rawChat(proc.url, body);
    assert.equal(r.status, 200, r.text);
    assert.match(r.headers.get("content-type") ?? "", /^text\/event-stream/);
    const data = sseData(r.text);
    assert.equal(data.at(-1), "[DONE]");
    assert.equal(turnOf(readSse(r.text).content).query, "hi there");
    const usage = (data.at(-2) as { usage?: Record<string, number> }).usage;
    assert.ok(usage && usage.total_tokens > 0, "include_usage is honoured");
    const sent = dify.lastBody();
    assert.equal(sent.query, "hi there");
    assert.equal(sent.user, "telegram:123456789");
  });
});

// ─── Conversations across restarts and processes ─────────────────────────────────────────────────

/** A store file for `rt` in a folder main.ts has to create: Bun's SQLite file and a Deno KV file differ. */
function storeFileFor(rt: RuntimeName) {
  return tempStoreFile(`data/conversations.${rt === "bun" ? "sqlite" : "kv"}`);
}

testEachRuntime("a restart on the same KV_PATH file continues the chat", async (rt) => {
  const dify = await startFakeDify();
  const store = await storeFileFor(rt);
  const env = { DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat", KV_PATH: store.path };
  let proc: ProcessBridge | undefined;
  try {
    proc = await startProcess(rt, env);
    const chat = new ChatSession(openai(proc.url), { stream: true, extra: { user: "restart" } });
    const t1 = turnOf((await chat.say("before the restart")).content);
    // Stopped the moment the answer arrived: shutdown waits for the conversation's write.
    const first = await proc.stop();
    assert.equal(first, 0, `SIGTERM → exit 0:\n${proc.output()}`);
    proc = undefined;
    assert.ok((await Deno.stat(store.path)).size > 0, "the store file exists");
    proc = await startProcess(rt, env);
    const again = new ChatSession(openai(proc.url), { extra: { user: "restart" } });
    again.messages = chat.messages;
    const t2 = turnOf((await again.say("after the restart")).content);
    assert.deepEqual([t2.n, t2.conv, t2.query], [2, t1.conv, "after the restart"]);
    assert.equal(dify.lastBody().query, "after the restart", "only the new message goes to Dify");
    const t3 = turnOf((await again.say("still going")).content);
    assert.deepEqual([t3.n, t3.conv], [3, t1.conv]);
    const second = await proc.stop();
    assert.equal(second, 0, `SIGTERM → exit 0:\n${proc.output()}`);
    proc = undefined;
  } finally {
    if (proc) await proc.stop();
    await dify.close();
    await store.remove();
  }
});

testEachRuntime("two processes sharing one KV_PATH file continue each other's chats", async (rt) => {
  const dify = await startFakeDify();
  const store = await storeFileFor(rt);
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
      turns.push(turnOf(text));
      messages.push(assistant(text));
      if (next) messages.push(user(next));
      // The other process reads the mapping once its durable write commits (not awaited by the answer).
      await untilFingerprints(store.path, turns.length);
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

Deno.test("two in-process bridges and a deno process on one KV file continue each other's chat", async () => {
  const fake = await startFakeDify();
  const kv = await tempStoreFile();
  const env = { DIFY_API_URL: fake.url, DIFY_API_KEY: "app-chat", KV_PATH: kv.path };
  const bridges: Bridge[] = [];
  let proc: ProcessBridge | undefined;
  try {
    bridges.push(await startBridge(env), await startBridge(env));
    proc = await startProcess("deno", env);
    const one = new ChatSession(bridges[0].client(), { extra: { user: "scale" } });
    const a1 = turnOf((await one.say("on the first bridge")).content);
    // Across processes a mapping is there once its KV write commits (the answer does not wait for it).
    await untilFingerprints(kv.path, 1);
    const two = new ChatSession(bridges[1].client(), { stream: true });
    two.messages = one.messages;
    const a2 = turnOf((await two.say("on the second bridge")).content);
    assert.deepEqual([a2.n, a2.conv], [2, a1.conv]);
    await untilFingerprints(kv.path, 2);
    const three = new ChatSession(openai(proc.url));
    three.messages = one.messages;
    const a3 = turnOf((await three.say("on the subprocess")).content);
    assert.deepEqual([a3.n, a3.conv], [3, a1.conv]);
    await untilFingerprints(kv.path, 3);
    const a4 = turnOf((await one.say("back on the first bridge")).content);
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

// ─── Shutdown ────────────────────────────────────────────────────────────────────────────────────

testEachRuntime(
  "SIGTERM: new connections are refused, the answer in flight finishes with [DONE], exit 0",
  async (rt) => {
    // BUN_CONFIG_MAX_HTTP_REQUESTS empty: on Bun the launcher re-executes main.ts and forwards SIGTERM.
    const dify = await startFakeDify();
    let proc: ProcessBridge | undefined;
    try {
      proc = await startProcess(rt, {
        DIFY_API_URL: dify.url,
        DIFY_API_KEY: "app-chat",
        BUN_CONFIG_MAX_HTTP_REQUESTS: "",
        SHUTDOWN_GRACE_SECONDS: "20",
      });
      const query = "graceful shutdown lets this answer finish word by word fault:slow:50";
      const res = await fetch(`${proc.url}/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json", authorization: "Bearer sk-test" },
        body: JSON.stringify({ model: "dify", messages: [user(query)], stream: true }),
        signal: AbortSignal.timeout(15_000),
      });
      assert.equal(res.status, 200);
      const reader = res.body!.getReader();
      const head = await readUntil(reader, "", hasContent);
      const exited = proc.stop("SIGTERM");
      assert.ok(await untilRefused(proc.port), "still accepting connections after SIGTERM");
      // The answer was still streaming while new connections were refused, and it completes.
      assert.ok(!head.includes("[DONE]"));
      const text = await readUntil(reader, head, () => false);
      const code = await exited;
      const output = proc.output();
      proc = undefined;
      assert.equal(code, 0, output);
      assert.match(output, /shutting down, letting 1 open answers finish/);
      assert.equal(sseData(text).at(-1), "[DONE]", text);
      assert.equal(turnOf(readSse(text).content).query, query);
      assert.equal(dify.stops.length, 0, "the answer was not cut short");
    } finally {
      if (proc) await proc.stop();
      await dify.close();
    }
  },
);

Deno.test(
  "lifecycle: a stream longer than SHUTDOWN_GRACE_SECONDS gets an error frame, and the process exits 0",
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
      let text = await readUntil(reader, "", (t) => t.includes('"role":"assistant"'));
      proc.process.kill("SIGTERM");
      text = await readUntil(reader, text, () => false);
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

Deno.test("lifecycle: a client that stops reading does not keep the process from exiting", async () => {
  const dify = await startFakeDify();
  const proc = await startProcess("deno", {
    DIFY_API_URL: dify.url,
    DIFY_API_KEY: "app-chat",
    SHUTDOWN_GRACE_SECONDS: "0.5",
    MAX_ANSWER_BYTES: "64000000",
  });
  const conn = await Deno.connect({ hostname: "127.0.0.1", port: proc.port });
  try {
    // A 12 MB answer to a client that reads nothing after the response head: the answer never ends
    // (the sockets' buffers take about 4 MB of it on loopback).
    const body = JSON.stringify({ model: "dify", stream: true, messages: [user("fault:huge_line:12000000")] });
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
    // The premise: the answer was stuck in the process, not delivered.
    let delivered = 0;
    const buf = new Uint8Array(1 << 20);
    for (let n = await conn.read(buf).catch(() => null); n !== null; n = await conn.read(buf).catch(() => null)) {
      delivered += n;
    }
    assert.ok(delivered < 12_000_000, `the client could read ${delivered} bytes`);
  } finally {
    conn.close();
    await proc.stop();
    await dify.close();
  }
});

Deno.test("lifecycle: invalid configuration stops start-up with exit code 1 and one line on stderr", async () => {
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

// ─── Secrets ─────────────────────────────────────────────────────────────────────────────────────

/** Everything a client can see of a response: status line, headers and body. */
async function visibleText(res: Response): Promise<string> {
  const headers = [...res.headers].map(([k, v]) => `${k}: ${v}`).join("\n");
  return `${res.status}\n${headers}\n\n${await res.text()}`;
}

/** Requests that walk the success and error paths, with secrets everywhere they could leak from. */
async function leakWalk(base: string, proxyKey: string): Promise<string[]> {
  const seen: string[] = [];
  const post = async (body: unknown, key = proxyKey, extra: Record<string, string> = {}) => {
    const res = await fetch(`${base}/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: `Bearer ${key}`, ...extra },
      body: typeof body === "string" ? body : JSON.stringify(body),
    });
    seen.push(await visibleText(res));
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
    seen.push(await visibleText(res));
  }
  return seen;
}

Deno.test(
  "security: keys and tokens never reach logs, error messages or response headers (in-process and subprocess)",
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
      const seen = await leakWalk(bridge.url, "sk-proxy-s3cr3t-1");
      // The walk really went through the error paths it names.
      const statuses = seen.map((s) => Number(s.slice(0, 3)));
      for (const status of [200, 400, 401, 404, 502]) assert.ok(statuses.includes(status), `no ${status}`);
      assert.ok(dify.requests.some((r) => r.key === "app-bad") && dify.requests.some((r) => r.key.includes("s3cr3t")));
      for (const text of [...seen, ...bridge.logs, ...bridge.warnings]) assert.doesNotMatch(text, secrets);
      assert.ok(bridge.logs.length >= 14);
      // The same walk against main.ts as a process: nothing on stdout or stderr either.
      proc = await startProcess("deno", env);
      const seenProc = await leakWalk(proc.url, "sk-proxy-s3cr3t-2");
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
          seen.push(await visibleText(res));
        }
      }
      assert.deepEqual(seen.map((s) => Number(s.slice(0, 3))), [200, 200, 401, 401, 401, 401]);
      assert.ok(dify.requests.some((r) => r.key === "app-chat-s3cr3t-pass"));
      for (const text of [...seen, ...open.logs, ...open.warnings]) assert.doesNotMatch(text, secrets);
    });
  },
);

// ─── Start-up and load ───────────────────────────────────────────────────────────────────────────

Deno.test({
  name: "runtimes: KV_PATH=https://… stops bun main.ts at start-up with one clear line (bun)",
  ignore: !HAVE_BUN,
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

testEachRuntime("1,000 concurrent streams all reach Dify at once (nothing queues), then all complete", async (rt) => {
  const total = 1000;
  // BUN_CONFIG_MAX_HTTP_REQUESTS empty counts as unset: main.ts must relaunch Bun with the limit raised,
  // or Bun's fetch holds all but 256 of these back and the fake never holds 1,000.
  await withProcess(rt, { BUN_CONFIG_MAX_HTTP_REQUESTS: "" }, async ({ dify, proc }) => {
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
      assert.equal(turnOf(readSse(text).content).query, `stream ${i} fault:hold`);
    }
  });
}, { oneAtATime: true });

Deno.test({
  name: "runtimes: a bun main.ts whose launcher is SIGKILLed stops instead of serving on as an orphan (bun)",
  ignore: !HAVE_BUN,
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
      const gone = await untilRefused(proc.port, 10_000);
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
