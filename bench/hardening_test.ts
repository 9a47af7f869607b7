/**
 * Hardening (issue 7): bad input, upstream faults, limits, secrets, lifecycle and a failing store.
 * The server must answer every request with a 200 or an OpenAI-shaped error, never a 500 or a hang,
 * and keep working afterwards.
 */
import assert from "node:assert/strict";
import OpenAI from "openai";
import { type Store } from "../main.ts";
import { type FakeDify, startFakeDify } from "./fake_dify.ts";
import { assistant, type Bridge, MAIN, rawChat, ROOT, sseData, startBridge, startProcess, user } from "./test_util.ts";

const hardeningTest = (name: string, fn: () => Promise<void>) =>
  Deno.test({ name: `hardening: ${name}`, sanitizeResources: false, sanitizeOps: false, fn });

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

/** A port nobody listens on. */
function hardeningClosedPort(): number {
  const listener = Deno.listen({ port: 0, hostname: "127.0.0.1" });
  const port = (listener.addr as Deno.NetAddr).port;
  listener.close();
  return port;
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

async function hardeningWithBridge(
  env: Record<string, string>,
  fn: (dify: FakeDify, bridge: Bridge) => Promise<void>,
  store?: Store,
) {
  const dify = await startFakeDify();
  let bridge: Bridge | undefined;
  try {
    bridge = await startBridge({ DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat", ...env }, { store });
    await fn(dify, bridge);
  } finally {
    await bridge?.close();
    await dify.close();
  }
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

hardeningTest(
  "fuzz: thousands of random and mutated bodies get a 200 or an OpenAI-shaped 4xx, never a 500 or a hang",
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
      await hardeningWithBridge({ DIFY_API_KEY: "", DIFY_APPS: JSON.stringify(apps) }, async (dify, bridge) => {
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

hardeningTest(
  "fuzz: prototype names are unknown roles and part types; deep or hostile values are never a 500",
  async () => {
    await hardeningWithBridge({}, async (_dify, bridge) => {
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

hardeningTest("fuzz: huge pathological texts (envelope, <think>, timestamps) do not stall the server", async () => {
  // Backtracking regexes (envelope timestamp and blocks, <think> stripping) once spent 15 s or more
  // of event-loop time on each of these, stalling every request; a stall shows as a timeout here.
  await hardeningWithBridge({}, async (_dify, bridge) => {
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

hardeningTest(
  "limits: oversized bodies (declared or chunked), slow bodies, too many messages, 10,000 parts",
  async () => {
    await hardeningWithBridge(
      { MAX_BODY_BYTES: "400000", BODY_TIMEOUT_SECONDS: "0.5", MAX_MESSAGES: "50" },
      async (dify, bridge) => {
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

hardeningTest(
  "limits: MAX_CONCURRENT_STREAMS — past it a 503 with Retry-After; after release, requests work again",
  async () => {
    await hardeningWithBridge({ MAX_CONCURRENT_STREAMS: "2" }, async (dify, bridge) => {
      const held = [1, 2].map((i) =>
        rawChat(bridge.url, { model: "dify", stream: true, messages: [user(`held ${i} fault:hold`)] })
      );
      for (let i = 0; i < 500 && dify.held() < 2; i++) await new Promise((r) => setTimeout(r, 10));
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

hardeningTest(
  "dify faults: every failure is a clear status or error frame the SDK raises, streaming and not",
  async () => {
    await hardeningWithBridge(
      { UPSTREAM_TIMEOUT_SECONDS: "0.5", UPSTREAM_IDLE_SECONDS: "0.5" },
      async (_dify, bridge) => {
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

hardeningTest(
  "dify faults: split reads, CRLF and garbage lines keep the answer intact; a refused upload is a 400",
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

hardeningTest(
  "dify faults: a Dify that only pings still gets the response started; a client that leaves frees its slot",
  async () => {
    await hardeningWithBridge({ KEEPALIVE_SECONDS: "0.1" }, async (dify, bridge) => {
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
      for (let i = 0; i < 300 && !dify.stops.length; i++) await new Promise((r) => setTimeout(r, 10));
      assert.equal(dify.stops.length, 1);
      assert.ok(bridge.logs.some((l) => JSON.parse(l).error === "client_closed"));
    });
  },
);

hardeningTest(
  "dify faults: unreachable Dify (refused, DNS) → 502; a pass-through key Dify rejects → 401/403",
  async () => {
    const dify = await startFakeDify();
    const bridges = await Promise.all([
      startBridge({ DIFY_API_URL: `http://127.0.0.1:${hardeningClosedPort()}/v1`, DIFY_API_KEY: "app-chat" }),
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

hardeningTest(
  "security: a wrong or missing client key is 401 on every route (incl. DELETE, /v1/models); the right one works",
  async () => {
    // Keys are compared as SHA-256 digests, every configured key, with no early exit (main.ts
    // `authenticate` / `sameBytes`): the time taken does not depend on how much of a key matched.
    await hardeningWithBridge({ PROXY_API_KEYS: "sk-proxy-one, sk-proxy-two" }, async (dify, bridge) => {
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

hardeningTest(
  "security: one client can never continue or delete another's conversation, same user and messages",
  async () => {
    for (const mode of ["history", "user"]) {
      await hardeningWithBridge(
        { PROXY_API_KEYS: "sk-alice, sk-bob", CONVERSATION_MODE: mode },
        async (dify, bridge) => {
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

hardeningTest(
  "security: keys and tokens never reach logs, error messages or response headers (in-process and subprocess)",
  async () => {
    const dify = await startFakeDify();
    const closed = hardeningClosedPort();
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
    await hardeningWithBridge({ DIFY_API_KEY: "" }, async (dify, open) => {
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

hardeningTest("security: the server fetches no URL a client supplies (images, files, ids, inputs)", async () => {
  const hits: string[] = [];
  const target = Deno.serve({ port: 0, hostname: "127.0.0.1", onListen() {} }, (req) => {
    hits.push(req.url);
    return new Response("\x89PNG", { headers: { "content-type": "image/png" } });
  });
  const url = `http://127.0.0.1:${target.addr.port}`;
  try {
    await hardeningWithBridge(
      { DIFY_APPS: JSON.stringify({ chat: "app-chat", wf: "app-workflow" }) },
      async (dify, bridge) => {
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
    await new Promise((r) => setTimeout(r, 10));
  }
  return false;
}

hardeningTest("lifecycle: SIGTERM mid-stream — the stream finishes, new connections are refused, exit 0", async () => {
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

hardeningTest(
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

hardeningTest("lifecycle: a client that stops reading does not keep the process from exiting", async () => {
  const dify = await startFakeDify();
  const proc = await startProcess("deno", {
    DIFY_API_URL: dify.url,
    DIFY_API_KEY: "app-chat",
    SHUTDOWN_GRACE_SECONDS: "0.5",
  });
  const conn = await Deno.connect({ hostname: "127.0.0.1", port: proc.port });
  try {
    // A 30 MB answer to a client that reads nothing: it stays queued in the server's socket.
    const body = JSON.stringify({ model: "dify", stream: true, messages: [user("fault:huge_line:30000000")] });
    await conn.write(new TextEncoder().encode(
      `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
    ));
    for (let i = 0; i < 1000 && !proc.output().includes('"status":200'); i++) {
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.match(proc.output(), /"status":200/);
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

hardeningTest("lifecycle: a restart between two turns on the same KV file loses no conversation", async () => {
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

hardeningTest("lifecycle: invalid configuration stops start-up with exit code 1 and one line on stderr", async () => {
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

/** A Store whose every method fails, synchronously (like bun:sqlite) or as a rejected promise (like KV). */
class HardeningBrokenStore implements Store {
  calls = 0;
  constructor(private sync: boolean) {}
  #fail(op: string): never | Promise<never> {
    this.calls++;
    const e = new Error(`${op}: the database is on fire`);
    if (this.sync) throw e;
    return Promise.reject(e);
  }
  get<T>(): Promise<T | null> {
    return this.#fail("get") as Promise<never>;
  }
  set(): Promise<void> {
    return this.#fail("set") as Promise<never>;
  }
  setIf(): Promise<boolean> {
    return this.#fail("setIf") as Promise<never>;
  }
  delete(): Promise<void> {
    return this.#fail("delete") as Promise<never>;
  }
  close(): void {
    this.calls++;
    throw new Error("close: the database is on fire");
  }
}

hardeningTest(
  "kv failing: every store call throws — requests still answer as new conversations, one warning per kind",
  async () => {
    for (const sync of [true, false]) {
      for (const mode of ["history", "user"]) {
        const store = new HardeningBrokenStore(sync);
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
          await new Promise((r) => setTimeout(r, 50));
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
