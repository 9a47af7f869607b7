/**
 * The streaming core, without HTTP: Dify's bytes from an in-memory reader, through DifyEvents and
 * AnswerStream, to the bytes a client reads — and the fingerprint a streamed answer leaves behind.
 */
import assert from "node:assert/strict";
import {
  AnswerPrint,
  AnswerStream,
  ChatFormat,
  type ChunkReader,
  DifyEvents,
  Exchange,
  fingerprint,
  Frames,
  newTranslation,
  pullStreamBody,
  type TranslateOptions,
} from "../main.ts";

const OPTIONS: TranslateOptions = {
  reasoning: "reasoning_content",
  reasoningNodes: false,
  origin: "http://dify",
  app: { model: "m", url: "http://dify/v1", input: "query" },
  clientKey: false,
};

/** A reader over Dify's bytes given in pieces; `gate` holds a piece back until it is opened. */
function memoryReader(pieces: (string | Promise<string>)[]): ChunkReader & { cancelled: boolean } {
  const encoder = new TextEncoder();
  let i = 0;
  const reader = {
    cancelled: false,
    async read() {
      if (reader.cancelled) throw new Error("cancelled");
      if (i >= pieces.length) return null;
      return encoder.encode(await pieces[i++]);
    },
    cancel() {
      reader.cancelled = true;
    },
  };
  return reader;
}

const message = (answer: string) =>
  `data: {"event": "message", "task_id": "t1", "conversation_id": "c1", "answer": ${JSON.stringify(answer)}}\n\n`;
const END =
  `data: {"event": "message_end", "task_id": "t1", "metadata": {"usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}}\n\n`;

function rig(pieces: (string | Promise<string>)[]) {
  const ex = new Exchange(() => performance.now());
  const t = newTranslation("chat", true);
  const format = new ChatFormat("chatcmpl-1", 1, "m", { includeUsage: true, reasoningContent: true });
  const frames = new Frames(format);
  const reader = memoryReader(pieces);
  const events = new DifyEvents(reader, t, frames, OPTIONS, ex);
  const stream = new AnswerStream(events, frames, format, ex);
  return { ex, t, reader, stream };
}

async function readAll(body: ReadableStream<Uint8Array>): Promise<string> {
  return await new Response(body).text();
}

Deno.test("stream: held until the first content, then open; closed by the format's frames and [DONE]", async () => {
  const { stream } = rig([message("Hel"), message("lo"), END]);
  assert.equal(stream.state, "holding");
  assert.equal(await stream.hold(), undefined);
  assert.equal(stream.state, "open");
  const text = await readAll(stream.body(pullStreamBody));
  const data = text.split("\n\n").filter(Boolean).map((f) => f.slice(6));
  assert.equal(data.at(-1), "[DONE]");
  const chunks = data.slice(0, -1).map((d) => JSON.parse(d));
  assert.deepEqual(chunks[0].choices[0].delta, { role: "assistant", content: "" });
  assert.equal(chunks.map((c) => c.choices[0]?.delta?.content ?? "").join(""), "Hello");
  assert.deepEqual(chunks.at(-1).usage, { prompt_tokens: 1, completion_tokens: 2, total_tokens: 3 });
  assert.equal(await stream.ended, undefined);
  assert.equal(stream.state, "closed");
});

Deno.test("stream: an error before any content is returned by hold (an HTTP status), after content it is a frame", async () => {
  const early = rig([`data: {"event": "error", "status": 429, "code": "too_many", "message": "slow down"}\n\n`]);
  const error = await early.stream.hold();
  assert.equal(error?.status, 429);
  assert.equal((await early.stream.ended)?.status, 429);

  const late = rig([message("partial"), `data: {"event": "error", "status": 400, "code": "x", "message": "bad"}\n\n`]);
  assert.equal(await late.stream.hold(), undefined);
  const text = await readAll(late.stream.body(pullStreamBody));
  assert.match(text, /"content":"partial"/);
  assert.match(text, /data: \{"error":\{"message":"Dify \(model m\): bad"/);
  assert.ok(!text.includes("[DONE]"));
});

Deno.test("stream: the keepalive commits a held answer; Dify is read only as the client reads", async () => {
  let open!: (text: string) => void;
  const later = new Promise<string>((resolve) => open = resolve);
  const { ex, stream } = rig([later, message("b"), END]);
  const held = stream.hold();
  ex.keepalive!();
  assert.equal(await held, undefined, "committed with nothing said yet");
  const reader = stream.body(pullStreamBody).getReader();
  const decoder = new TextDecoder();
  assert.match(decoder.decode((await reader.read()).value), /"role":"assistant"/);
  open(message("a"));
  let rest = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    rest += decoder.decode(value);
  }
  assert.match(rest, /"content":"a"[\s\S]*"content":"b"[\s\S]*\[DONE\]/);
});

Deno.test("stream: a client that leaves stops the reading; Dify's task is stopped once named", async () => {
  const pieces = Array.from({ length: 1000 }, (_, i) => message(`part ${i} `));
  const { ex, reader, stream } = rig(pieces);
  await stream.hold();
  const body = stream.body(pullStreamBody).getReader();
  await body.read();
  await body.cancel();
  assert.equal((await stream.ended)?.code, "client_closed");
  assert.equal(ex.upstream.signal.aborted, true);
  assert.ok(reader.cancelled || ex.upstream.signal.aborted);
});

Deno.test("answer print: a streamed answer's fingerprint equals the whole answer's, however it is split", () => {
  const answers = [
    "Hello, world",
    "  leading and trailing  \n",
    "<think>plan it</think>  The answer\n\nin  two\tparts ",
    "a<think>x</think> b <think>y</think>\n c",
    "open <think> never closed\n  here",
    "<think>x</think>  <think>y",
    "<thi not a tag <think",
    "nested <think>a<think>b</think>c</think> tail",
    "\u00a0non-breaking\u2028line\u3000ideographic ",
    "",
    "   ",
  ];
  const history = [{ role: "user", text: "hi" }, { role: "assistant", text: "<think>r</think>hello" }, {
    role: "user",
    text: "more",
  }];
  let seed = 7;
  const random = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
  for (const answer of answers) {
    const expected = fingerprint("system  prompt", [...history, { role: "assistant", text: answer }]);
    for (let round = 0; round < 40; round++) {
      const print = new AnswerPrint("system  prompt", history);
      let at = 0;
      while (at < answer.length) {
        const size = 1 + Math.floor(random() * 6);
        print.push(answer.slice(at, at + size));
        at += size;
      }
      assert.equal(print.digest(), expected, `${JSON.stringify(answer)}, round ${round}`);
    }
  }
});
