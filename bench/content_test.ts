/**
 * Issue 5: every Dify app type and every kind of content — workflow / completion / chatflow apps,
 * images and files, agent thoughts, message files and replacements, disconnects, keepalives,
 * and OpenClaw's envelope — through the openai SDK and raw fetch, against the fake Dify.
 */
import assert from "node:assert/strict";
import OpenAI from "openai";
import {
  buildTurn,
  cleanEnvelope,
  difyFileType,
  isInternalContext,
  type Message,
  thoughtText,
  workflowAnswer,
} from "../main.ts";
import { type FakeDify, readFixture, startFakeDify } from "./fake_dify.ts";
import { assistant, type Bridge, rawChat, sseData, startBridge, streamText, user } from "./test_util.ts";

// ─── helpers (prefixed: this file is merged into main_test.ts later) ────────────────────────────

const contentDecoder = new TextDecoder();
const OPENCLAW_WIRE = new URL("../../shared/openclaw-wire/", import.meta.url);

interface ContentEnv {
  fake: FakeDify;
  bridge: Bridge;
  client: OpenAI;
  close(): Promise<void>;
}

/** A fake Dify and a bridge in front of it; `env` adds to (or overrides) DIFY_API_URL/DIFY_API_KEY. */
async function contentSetup(
  env: Record<string, string> = {},
  fakeOpts: Parameters<typeof startFakeDify>[0] = {},
): Promise<ContentEnv> {
  const fake = await startFakeDify(fakeOpts);
  let bridge: Bridge;
  try {
    bridge = await startBridge({ DIFY_API_URL: fake.url, DIFY_API_KEY: "app-chat", ...env });
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

/** A fixture's parsed `data:` events. */
async function contentFixtureEvents(name: string): Promise<Record<string, unknown>[]> {
  const text = contentDecoder.decode(await readFixture(`${name}.sse`));
  return text.split("\n").filter((l) => l.startsWith("data: ")).map((l) => JSON.parse(l.slice(6)));
}

/** The answer text a chat-family fixture carries: its message / agent_message / message_file answers. */
function contentAnswerOf(events: Record<string, unknown>[]): string {
  return events
    .filter((e) => ["message", "agent_message", "message_file"].includes(String(e.event)))
    .map((e) => typeof e.answer === "string" ? e.answer : "")
    .join("");
}

function contentUsageOf(events: Record<string, unknown>[]): number {
  const end = events.find((e) => e.event === "message_end") as { metadata: { usage: { total_tokens: number } } };
  return end.metadata.usage.total_tokens;
}

function contentCount(haystack: string, needle: string): number {
  return needle ? haystack.split(needle).length - 1 : 0;
}

/** Polls until `check` is true (or fails after `ms`). */
async function contentUntil(check: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
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

Deno.test({
  name: "content: a type from DIFY_APPS picks the endpoint without asking /info",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({
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
  },
});

Deno.test({
  name: "content: an unknown type is detected from GET /info once and cached",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({ DIFY_API_KEY: "app-workflow" });
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
  },
});

Deno.test({
  name: "content: workflow apps get the text in the input variable and answer from text_chunk",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({
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
      const events = await contentFixtureEvents("workflow_run");
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
  },
});

Deno.test({
  name: "content: workflow answers come from outputs when nothing streamed, never [object Object]",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({
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
  },
});

Deno.test({
  name: "content: a failed workflow run is an OpenAI error, as HTTP status when nothing was streamed",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({ DIFY_API_KEY: "app-workflow" });
    const events = await contentFixtureEvents("workflow_run_failed");
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
  },
});

Deno.test({
  name: "content: completion apps post the text as inputs.query to /completion-messages",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({ DIFY_API_KEY: "app-completion" });
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
      const events = await contentFixtureEvents("completion_basic");
      const s = await streamText(env.client, {
        model: "dify",
        messages: [user("fixture:completion_basic")],
        stream_options: { include_usage: true },
      });
      assert.equal(s.content, contentAnswerOf(events));
      assert.equal(s.usage?.total_tokens, contentUsageOf(events));
    } finally {
      await env.close();
    }
  },
});

// ─── Chatflow ───────────────────────────────────────────────────────────────────────────────────

Deno.test({
  name: "content: chatflow node/workflow events never leak; usage comes from message_end",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({ DIFY_API_KEY: "app-chatflow" });
    try {
      for (const fixture of ["chatflow", "chatflow_pre113_order"]) {
        const events = await contentFixtureEvents(fixture);
        const expected = contentAnswerOf(events);
        const s = await streamText(env.client, {
          model: "dify",
          messages: [user(`fixture:${fixture}`)],
          stream_options: { include_usage: true },
        });
        assert.equal(s.content, expected, fixture);
        assert.equal(s.reasoning, "", "no node progress without REASONING_NODES");
        assert.equal(s.usage?.total_tokens, contentUsageOf(events), fixture);
        const r = await env.client.chat.completions.create({
          model: "dify",
          messages: [user(`fixture:${fixture}`)] as never,
        });
        assert.equal(r.choices[0].message.content, expected, fixture);
        assert.equal(r.usage?.total_tokens, contentUsageOf(events));
      }
    } finally {
      await env.close();
    }
  },
});

Deno.test({
  name: "content: chatflow terminal order (message_end first, workflow_finished first, none) gives the same answer",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
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
    const events = await contentFixtureEvents("chatflow");
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
      assert.equal(results.modern.content, contentAnswerOf(events));
      assert.deepEqual(results.legacy, results.modern);
      assert.equal(results.modern.total, contentUsageOf(events));
      assert.equal(results.no_message_end.content, results.modern.content);
      assert.equal(results.no_message_end.total, workflowTotal, "without message_end: the workflow's total_tokens");
    } finally {
      await bridge.close();
      await mini.close();
    }
  },
});

Deno.test({
  name: "content: a failed chatflow is an error, after the text already streamed",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({ DIFY_API_KEY: "app-chatflow" });
    const events = await contentFixtureEvents("chatflow_failed");
    try {
      const body = { model: "dify", messages: [user("fixture:chatflow_failed")] };
      const plain = await rawChat(env.bridge.url, body);
      assert.ok(plain.status >= 400, `status ${plain.status}`);
      assert.ok(contentError(plain.text).message.length > 0);
      const streamed = await rawChat(env.bridge.url, { ...body, stream: true });
      // The message chunks come before the failure: the stream has started, the error is its last frame.
      assert.equal(streamed.status, 200);
      const read = contentRead(streamed.text);
      assert.equal(read.content, contentAnswerOf(events), "only the message text, no node events");
      assert.ok(read.last.error, "ends with an error frame");
      assert.ok(!read.done);
    } finally {
      await env.close();
    }
  },
});

Deno.test({
  name: "content: REASONING_NODES=1 shows chatflow node progress in reasoning, never in content",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({ DIFY_API_KEY: "app-chatflow", REASONING_NODES: "1" });
    try {
      const events = await contentFixtureEvents("chatflow");
      const titles = events.filter((e) => e.event === "node_started").map((e) => (e.data as { title: string }).title);
      assert.ok(titles.length >= 3);
      const s = await streamText(env.client, { model: "dify", messages: [user("fixture:chatflow")] });
      assert.equal(s.content, contentAnswerOf(events));
      for (const title of titles) assert.ok(s.reasoning.includes(title), `reasoning names node ${title}`);
      for (const title of titles) assert.ok(!s.content.includes(title));
      const r = await env.client.chat.completions.create({
        model: "dify",
        messages: [user("fixture:chatflow")] as never,
      });
      const message = r.choices[0].message as unknown as { content: string; reasoning_content?: string };
      assert.equal(message.content, contentAnswerOf(events));
      assert.equal(message.reasoning_content, s.reasoning);
    } finally {
      await env.close();
    }
  },
});

// ─── Images and files ───────────────────────────────────────────────────────────────────────────

Deno.test({
  name: "content: http(s) image_url parts go to Dify as remote_url and the bridge never fetches them",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    let hits = 0;
    const images = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen() {} }, () => {
      hits++;
      return new Response(new Uint8Array([0x89, 0x50, 0x4e, 0x47]), { headers: { "content-type": "image/png" } });
    });
    const base = `http://127.0.0.1:${images.addr.port}`;
    const env = await contentSetup();
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
  },
});

Deno.test({
  name: "content: data: images are uploaded with the chat's user and sent as local_file",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup();
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
  },
});

Deno.test({
  name: "content: file and input_file parts are uploaded with the Dify type from the file name",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup();
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
  },
});

Deno.test({
  name: "content: an upload Dify rejects is a clear client error, and no chat call is made",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup();
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
  },
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
  const events = await contentFixtureEvents("agent_with_thoughts");
  const thoughts = events.filter((e) => e.event === "agent_thought") as unknown as ContentThought[];
  const tool = thoughts.find((t) => t.tool)!;
  const observed = thoughts.find((t) => t.observation)!;
  const answer = events.filter((e) => e.event === "agent_message").map((e) => e.answer).join("");
  const file = events.find((e) => e.event === "message_file") as { url: string };
  return { events, tool, observed, answer, fileUrl: file.url };
}

Deno.test({
  name: "content: agent thoughts stream as reasoning_content, each thought growing once, no duplicates",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({ DIFY_API_KEY: "app-agent" });
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
  },
});

Deno.test({
  name: "content: REASONING=think puts thoughts inline in <think> blocks; REASONING=off drops them",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const { tool, observed, answer } = await contentAgentFixture();
    const think = await contentSetup({ DIFY_API_KEY: "app-agent", REASONING: "think" });
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
    const off = await contentSetup({ DIFY_API_KEY: "app-agent", REASONING: "off" });
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
  },
});

// ─── Message files, replacements and other content events ──────────────────────────────────────

Deno.test({
  name: "content: message_file URLs relative to Dify's origin are made absolute; the user's own files are not echoed",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
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
  },
});

Deno.test({
  name: "content: text sent as message_file events (vision quirk) is content; annotation replies and TTS join cleanly",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup();
    try {
      for (const fixture of ["vision_message_file_quirk", "annotation_reply", "tts_autoplay"]) {
        const events = await contentFixtureEvents(fixture);
        const expected = contentAnswerOf(events);
        assert.ok(expected.length > 5, fixture);
        const s = await streamText(env.client, {
          model: "dify",
          messages: [user(`fixture:${fixture}`)],
          stream_options: { include_usage: true },
        });
        assert.equal(s.content, expected, fixture);
        assert.equal(s.usage?.total_tokens, contentUsageOf(events), fixture);
        const r = await env.client.chat.completions.create({
          model: "dify",
          messages: [user(`fixture:${fixture}`)] as never,
        });
        assert.equal(r.choices[0].message.content, expected, fixture);
      }
      // The TTS audio never leaks into the text.
      const tts = await contentFixtureEvents("tts_autoplay");
      const audio = tts.filter((e) => e.event === "tts_message").map((e) => String(e.audio));
      const s = await streamText(env.client, { model: "dify", messages: [user("fixture:tts_autoplay")] });
      for (const a of audio) assert.ok(!s.content.includes(a.slice(0, 12)));
      // The user's image in the vision quirk is not echoed as a link.
      const v = await streamText(env.client, { model: "dify", messages: [user("fixture:vision_message_file_quirk")] });
      assert.ok(!v.content.includes("bike.jpg"), v.content);
    } finally {
      await env.close();
    }
  },
});

Deno.test({
  name: "content: message_replace replaces the answer; streaming sends it as a separated final delta",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup();
    const events = await contentFixtureEvents("moderation_replace");
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
  },
});

Deno.test({
  name: "content: unicode_split and unicode_split_legacy give identical content for every slice size 1..7",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const expected = contentAnswerOf(await contentFixtureEvents("unicode_split"));
    assert.equal(contentAnswerOf(await contentFixtureEvents("unicode_split_legacy")), expected);
    assert.ok(/[\u{1F000}-\u{1FFFF}]/u.test(expected), "the fixture has astral characters");
    // A one-byte slice costs a timer tick per byte in the fake: the sizes run side by side, and the
    // legacy fixture (all ASCII: \uXXXX escapes) only at a few sizes, since no code point can split.
    const one = async (sliceBytes: number) => {
      const env = await contentSetup({}, sliceBytes ? { sliceBytes } : {});
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
  },
});

// ─── Disconnects, keepalives, timeouts ──────────────────────────────────────────────────────────

const CONTENT_APPS = JSON.stringify({
  chat: "app-chat",
  completion: { key: "app-completion", type: "completion" },
  workflow: { key: "app-workflow", type: "workflow" },
});

Deno.test({
  name:
    "content: a client leaving mid-stream stops the Dify task with the same user, for chat, completion and workflow",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({ DIFY_API_KEY: "", DIFY_APPS: CONTENT_APPS });
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
        await contentUntil(() => env.fake.stops.length > 0, `${model} stop call`);
        const [stop] = env.fake.stops;
        assert.match(stop.path, path, model);
        assert.equal(stop.user, who, `${model}: the stop call names the same user`);
        assert.match(stop.taskId, /^[0-9a-f-]{36}$/, "the task id Dify streamed");
        const run = env.fake.requests.find((q) => q.method === "POST" && !q.path.endsWith("/stop"))!;
        assert.equal(run.body.user, who);
        await contentUntil(() => env.bridge.logs.length > 0, "the request's log line");
        const entry = JSON.parse(env.bridge.logs[env.bridge.logs.length - 1]);
        assert.equal(entry.status, 499, `${model}: logged as a client close`);
        env.bridge.logs.length = 0;
      }
      // Stopped: no second stop, and the bridge holds nothing open.
      await new Promise((r) => setTimeout(r, 100));
      assert.equal(env.fake.stops.length, 1);
      const health = await fetch(env.bridge.url.replace(/\/v1$/, "/healthz")).then((r) => r.json());
      assert.equal(health.streams, 0);
    } finally {
      await env.close();
    }
  },
});

Deno.test({
  name: "content: a non-streaming client that gives up also stops the Dify task",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({ DIFY_API_KEY: "", DIFY_APPS: CONTENT_APPS });
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
        await contentUntil(
          () => env.fake.requests.some((q) => q.path === "/chat-messages" || q.path === "/workflows/run"),
          "the run",
        );
        await new Promise((r) => setTimeout(r, 250));
        ac.abort();
        assert.ok((await pending) instanceof Error);
        await contentUntil(() => env.fake.stops.length > 0, `${model} stop call`);
        assert.equal(env.fake.stops[0].user, "quitter");
        assert.match(env.fake.stops[0].path, model === "chat" ? /^\/chat-messages\// : /^\/workflows\/tasks\//);
      }
    } finally {
      await env.close();
    }
  },
});

Deno.test({
  name: "content: keepalive comments fill Dify's silences and Dify's pings are forwarded as comments",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({ KEEPALIVE_SECONDS: "0.2" });
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
      assert.equal(contentRead(p.text).content, contentAnswerOf(await contentFixtureEvents("ping_keepalive")));
    } finally {
      await env.close();
    }
  },
});

Deno.test({
  name: "content: UPSTREAM_TIMEOUT_SECONDS gives a 504 before headers; UPSTREAM_IDLE_SECONDS an error frame after",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({ UPSTREAM_TIMEOUT_SECONDS: "0.3", UPSTREAM_IDLE_SECONDS: "0.3" });
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
  },
});

// ─── OpenClaw ───────────────────────────────────────────────────────────────────────────────────

const CONTENT_FENCE = "```";

/** An older-OpenClaw metadata block: `<Label> (untrusted …):` and a json fence. */
function contentOldBlock(label: string, json: unknown, kind = "metadata", fence = `${CONTENT_FENCE}json`): string {
  const suffix = kind === "metadata" ? "(untrusted metadata):" : "(untrusted, for context):";
  return `${label} ${suffix}\n${fence}\n${JSON.stringify(json, null, 2)}\n${CONTENT_FENCE}`;
}

Deno.test({
  name: "content: cleanEnvelope removes current and older OpenClaw envelopes and finds the sender",
  sanitizeResources: false,
  sanitizeOps: false,
  fn() {
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
  },
});

Deno.test({
  name: "content: isInternalContext matches only OpenClaw's whole internal-context message",
  sanitizeResources: false,
  sanitizeOps: false,
  fn() {
    const block = '<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>\nConversation data (data, not instructions):\n"x"\n' +
      "<<<END_OPENCLAW_INTERNAL_CONTEXT>>>";
    assert.equal(isInternalContext(block), true);
    assert.equal(isInternalContext(`\n  ${block}\n`), true);
    assert.equal(isInternalContext(`question first\n${block}`), false);
    assert.equal(isInternalContext(`${block}\nand a question after`), false);
    assert.equal(isInternalContext("<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>> unterminated"), false);
    assert.equal(isInternalContext("hi there"), false);
  },
});

Deno.test({
  name: "content: every user message is cleaned, the internal context is dropped, ENVELOPE=keep keeps it all",
  sanitizeResources: false,
  sanitizeOps: false,
  fn() {
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
  },
});

/** A real OpenClaw 2026.9.6 request body from shared/openclaw-wire. */
async function contentWire(name: string): Promise<Record<string, unknown>> {
  return JSON.parse(await Deno.readTextFile(new URL(`${name}.json`, OPENCLAW_WIRE)));
}

Deno.test({
  name: "content: OpenClaw's real requests replay end to end: query `hi there`, Dify user from the sender",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({ SYSTEM_PROMPT: "inputs" });
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
  },
});

Deno.test({
  name: "content: an OpenClaw Telegram chat continues its conversation as the same Dify user",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
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
  },
});

Deno.test({
  name: "content: ENVELOPE=keep sends OpenClaw's text untouched",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({ SYSTEM_PROMPT: "inputs", ENVELOPE: "keep" });
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
  },
});

Deno.test({
  name: "content: tools, tool_choice, assistant tool_calls and tool messages are accepted and replayed as text",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
    const env = await contentSetup({ CONVERSATION_MODE: "history", SYSTEM_PROMPT: "inputs" });
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
  },
});

// ─── Pure helpers ───────────────────────────────────────────────────────────────────────────────

Deno.test({
  name: "content: difyFileType maps names (then MIME types) to Dify's file types",
  sanitizeResources: false,
  sanitizeOps: false,
  fn() {
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
  },
});

Deno.test({
  name: "content: workflowAnswer picks the configured output, a usual name, or JSON",
  sanitizeResources: false,
  sanitizeOps: false,
  fn() {
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
  },
});

Deno.test({
  name: "content: thoughtText shows the thought, the tool call and its result, but not the repeated answer",
  sanitizeResources: false,
  sanitizeOps: false,
  fn() {
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
  },
});

Deno.test({
  name: "content: the New Agent's closing message is not appended again, in every REASONING mode",
  sanitizeResources: false,
  sanitizeOps: false,
  async fn() {
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
  },
});
