/**
 * Fuzz: a thousand seeded random and mutated chat requests against the bridge in-process, and hostile
 * shapes made by hand — a 200 or an OpenAI-shaped 4xx every time, never a 500, a hang or a stall. A failing
 * case reproduces from its seed and index.
 */
import assert from "node:assert/strict";
import { assistant, errorBody, health, rawChat, sseData, user, withBridge } from "../bench/test_util.ts";

// ─── Random bodies ───────────────────────────────────────────────────────────────────────────────

function seededRandom(seed: number) {
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

type SeededRandom = ReturnType<typeof seededRandom>;

const FUZZ_MODELS = ["dify", "agent", "flow", "wf", "comp"];

const FUZZ_FIELDS = [
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

const FUZZ_ROLES = [
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

const FUZZ_PART_TYPES = [
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

const FUZZ_WORDS = [
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
function fuzzPathological(r: SeededRandom): string {
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

function fuzzString(r: SeededRandom): string {
  if (r.chance(0.004)) return "x".repeat(1_000_000 + r.int(1_000_000));
  if (r.chance(0.006)) return fuzzPathological(r);
  const words: string[] = [];
  for (let i = r.int(6); i >= 0; i--) words.push(r.chance(0.5) ? r.pick(FUZZ_WORDS) : String(r.int(1e6)));
  return words.join(" ");
}

/** 10,000 levels of arrays, `[[[…]]]`: a marker in the value, swapped for the raw text when sent. */
const FUZZ_DEEP_MARK = "\u0001deep\u0001";

const FUZZ_DEEP_TEXT = "[".repeat(10_000) + "]".repeat(10_000);

function fuzzDeep(): unknown {
  return FUZZ_DEEP_MARK;
}

/** A body value as JSON text with the deep-nesting markers expanded. */
function fuzzJson(value: unknown): string {
  return JSON.stringify(value).replaceAll(JSON.stringify(FUZZ_DEEP_MARK), FUZZ_DEEP_TEXT);
}

function fuzzValue(r: SeededRandom, depth = 0): unknown {
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
      return fuzzString(r);
    case 6:
      return [];
    case 7:
      return {};
    case 8:
      // Own keys named like Object.prototype's members (an object literal's __proto__ is not a key).
      return JSON.parse('{"toString":1,"valueOf":"x","__proto__":{"polluted":true},"constructor":[]}');
    case 9:
      return fuzzDeep();
    case 10:
    case 11:
      return Array.from({ length: r.int(4) }, () => fuzzValue(r, depth + 1));
    default:
      return Object.fromEntries(
        Array.from({ length: r.int(4) }, () => [fuzzString(r), fuzzValue(r, depth + 1)]),
      );
  }
}

function fuzzPart(r: SeededRandom, hitUrl: string): unknown {
  if (r.chance(0.05)) return fuzzValue(r);
  const type = r.pick(FUZZ_PART_TYPES);
  const part: Record<string, unknown> = { type };
  if (r.chance(0.8)) part.text = r.chance(0.85) ? fuzzString(r) : fuzzValue(r);
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
    part.image_url = r.chance(0.8) ? { url: r.chance(0.9) ? url : fuzzValue(r) } : url;
  }
  if (type.includes("file") || r.chance(0.1)) {
    const file: Record<string, unknown> = { filename: r.pick(["a.pdf", "notes.txt", "x", "", "run.exe"]) };
    if (r.chance(0.5)) file.file_data = r.pick(["aGVsbG8=", "data:text/plain;base64,aGVsbG8=", "%%%", ""]);
    else file.file_url = r.pick([`${hitUrl}/doc.pdf`, "file:///etc/passwd", 42]);
    Object.assign(part, r.chance(0.7) ? { file } : file);
  }
  return part;
}

function fuzzContent(r: SeededRandom, hitUrl: string): unknown {
  switch (r.int(10)) {
    case 0:
      return null;
    case 1:
      return fuzzValue(r);
    case 2:
      return [];
    case 3:
      return r.chance(0.1)
        ? Array.from({ length: 10_000 }, () => ({ type: "text", text: "x" }))
        : Array.from({ length: 1 + r.int(4) }, () => fuzzPart(r, hitUrl));
    case 4:
      return [{ type: "text", text: fuzzString(r) }];
    default:
      return fuzzString(r);
  }
}

function fuzzMessage(r: SeededRandom, hitUrl: string): unknown {
  if (r.chance(0.04)) return fuzzValue(r);
  const m: Record<string, unknown> = { role: r.chance(0.05) ? fuzzValue(r) : r.pick(FUZZ_ROLES) };
  if (r.chance(0.95)) m.content = fuzzContent(r, hitUrl);
  if (m.role === "assistant" && r.chance(0.3)) {
    m.tool_calls = r.chance(0.5)
      ? [{ id: "c1", type: "function", function: { name: fuzzValue(r), arguments: fuzzValue(r) } }]
      : fuzzValue(r);
  }
  if (r.chance(0.05)) m.name = fuzzValue(r);
  return m;
}

/** One random request body: JSON text, or bytes for the mutations JSON cannot express. */
function fuzzBody(r: SeededRandom, hitUrl: string): string | Uint8Array {
  const body: Record<string, unknown> = {
    model: r.pick(FUZZ_MODELS),
    messages: [user(`hello ${r.int(1e9)}`)],
  };
  if (r.chance(0.5)) body.stream = true;
  for (let i = 1 + r.int(3); i > 0; i--) {
    switch (r.int(8)) {
      case 0:
        body[r.pick(FUZZ_FIELDS)] = fuzzValue(r);
        break;
      case 1:
        delete body[r.pick(FUZZ_FIELDS)];
        break;
      case 2:
      case 3:
        body.messages = Array.from({ length: r.int(5) }, () => fuzzMessage(r, hitUrl));
        if (r.chance(0.7)) (body.messages as unknown[]).push(user(fuzzString(r)));
        break;
      case 4:
        body.messages = [...Array.isArray(body.messages) ? body.messages : [], fuzzMessage(r, hitUrl)];
        break;
      case 5:
        body.n = r.pick([0, 1, 2, 3, "1", 1.0, -1, null]);
        break;
      case 6:
        body.stream_options = r.pick([{ include_usage: true }, { include_usage: "yes" }, "usage", [], null]);
        break;
      default:
        body[r.pick(FUZZ_FIELDS)] = r.pick([
          null,
          "",
          [],
          {},
          fuzzDeep(),
          { toString: 1 },
          fuzzString(r),
        ]);
    }
  }
  if (r.chance(0.04)) body.messages = Array.from({ length: 5_001 }, () => user("x"));
  if (r.chance(0.03)) return fuzzJson(r.pick([null, 1, "text", [], [body], true, fuzzDeep()]));
  const json = fuzzJson(body);
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

// ─── The tests ────────────────────────────────────────────────────────────────────────────────────────

Deno.test(
  "fuzz: a thousand random and mutated bodies get a 200 or an OpenAI-shaped 4xx, never a 500 or a hang",
  async () => {
    const SEED = 7_2026;
    // Enough for every rare shape to come up several times (megabyte strings, pathological texts, 10,000 parts,
    // 5,001 messages) and the common ones (deep nesting, raw byte mutations, non-objects) a hundred or so.
    const COUNT = 1000;
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
      await withBridge({ DIFY_API_KEY: "", DIFY_APPS: JSON.stringify(apps) }, async ({ dify, bridge }) => {
        const r = seededRandom(SEED);
        const bodies = Array.from({ length: COUNT }, () => fuzzBody(r, hitUrl));
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
              errorBody(text, context);
            }
          }
        };
        await Promise.all(Array.from({ length: 16 }, worker));
        // Both outcomes really happened: the fuzz reached Dify and was also refused.
        assert.ok((statuses.get(200) ?? 0) > COUNT / 20, `statuses: ${JSON.stringify([...statuses])}`);
        assert.ok((statuses.get(400) ?? 0) > COUNT / 4, `statuses: ${JSON.stringify([...statuses])}`);
        assert.ok(dify.generateBodies().length > 0);
        assert.equal((await health(bridge.url)).streams, 0);
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

Deno.test(
  "fuzz: prototype names are unknown roles and part types; deep or hostile values are never a 500",
  async () => {
    await withBridge({}, async ({ bridge }) => {
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
        const e = errorBody(res.text, body.slice(0, 100));
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

Deno.test("fuzz: huge pathological texts (envelope, <think>, timestamps) do not stall the server", async () => {
  // Backtracking regexes (envelope timestamp and blocks, <think> stripping) once spent 15 s or more
  // of event-loop time on each of these, stalling every request; a stall shows as a timeout here.
  await withBridge({}, async ({ bridge }) => {
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
