/**
 * The streamed Responses events are built from pre-serialised pieces (the response object's settings once,
 * each item's text escaped once, each delta from a per-item prefix): they must stay the very bytes the
 * object builders give — the aggregated body, the failed response — for every kind of answer.
 */
import assert from "node:assert/strict";
import { apiError, parseResponsesRequest, ResponsesFormat, type ToolCall, type Translation } from "../main.ts";
import { test } from "../bench/test_util.ts";

type Step = ["content" | "reasoning", string] | ["call", ToolCall];

/** The `data:` of each event of a stream, by event name, in order. */
function events(out: string): [string, Record<string, unknown>][] {
  return out.split("\n\n").filter(Boolean).map((block) => {
    const [event, data] = block.split("\n");
    assert.ok(event.startsWith("event: ") && data.startsWith("data: "), block);
    return [event.slice(7), JSON.parse(data.slice(6))];
  });
}

function echoOf(body: Record<string, unknown>) {
  return parseResponsesRequest({ model: "dify", input: "x", ...body }, new Headers(), { maxMessages: 9, maxParts: 9 })
    .echo;
}

const call = (n: number): ToolCall => ({ id: `call_${n}`, name: "get_weather", arguments: `{"city":"Paris ${n}"}` });

const ANSWERS: [string, Step[]][] = [
  ["plain text", [["content", "Hello"], ["content", " world"]]],
  ["escapes and non-ASCII", [["content", 'A "quoted" \\ answer,\n'], ["content", "🦕 \u2028 \u0000 é end"]]],
  ["empty answer", []],
  ["reasoning between parts", [["reasoning", "think"], ["content", "a"], ["reasoning", " more"], ["content", "b"]]],
  ["reasoning only", [["reasoning", "just thinking"]]],
  ["text then calls", [["content", "Let me look."], ["call", call(1)], ["call", call(2)]]],
  ["calls only", [["call", call(1)]]],
];

const SETTINGS: [string, Record<string, unknown>][] = [
  ["defaults", {}],
  ["store: false", { store: false }],
  ["Codex-like settings", {
    instructions: 'say "output":[]',
    metadata: { chat_id: "c1", note: '"output":[]' },
    reasoning: { effort: "high", summary: "auto" },
    tools: [{ type: "function", name: "get_weather", parameters: {} }, { type: "web_search" }],
    tool_choice: "auto",
    prompt_cache_key: "thread-1",
    text: { verbosity: "low" },
  }],
];

for (const [settingsName, settings] of SETTINGS) {
  test(`respformat: streamed events are the aggregated object's bytes (${settingsName})`, async () => {
    for (const [name, steps] of ANSWERS) {
      const echo = echoOf(settings);
      const usage = { prompt_tokens: 3, completion_tokens: 5, total_tokens: 8 };
      const t = {
        content: steps.filter((s) => s[0] === "content").map((s) => s[1]).join(""),
        reasoning: steps.filter((s) => s[0] === "reasoning").map((s) => s[1]).join(""),
        calls: steps.filter((s) => s[0] === "call").map((s) => s[1] as ToolCall),
        usage,
      } as unknown as Translation;
      const streamed = new ResponsesFormat("resp_0123abcd", 1700000000, "dify", echo, true);
      let out = streamed.open();
      for (const [kind, value] of steps) {
        out += kind === "call" ? streamed.toolCall(value) : streamed[kind](value);
      }
      out += streamed.close(t);
      const all = events(out);
      // Each event's sequence number is its place in the stream.
      assert.deepEqual(all.map(([, d]) => d.sequence_number), all.map((_, i) => i), name);
      assert.deepEqual(all.map(([, d]) => d.type), all.map(([e]) => e), name);
      const completedData = out.slice(out.lastIndexOf("\ndata: ") + 7, -2);
      const completedJson = completedData.slice(completedData.indexOf(`"response":`) + 11, -1);
      const completed = JSON.parse(completedJson);
      const aggregated = new ResponsesFormat("resp_0123abcd", 1700000000, "dify", echo, true).object(t);
      // Byte for byte: the same fields in the same order, the same escaping. (Aggregated, reasoning that came
      // between parts of the answer is one item, and the answer another: only the output differs then.)
      const split = aggregated.output.length !== completed.output.length;
      const output = split
        ? completedJson.slice(completedJson.indexOf(`"output":[`) + 10, completedJson.lastIndexOf(`],"service_tier"`))
        : undefined;
      assert.equal(
        completedJson,
        JSON.stringify({ ...aggregated, completed_at: completed.completed_at, output: split ? [] : aggregated.output })
          .replace(`"output":[]`, `"output":[${output ?? ""}]`),
        name,
      );
      assert.equal(split, name === "reasoning between parts", name);
      // `response.created` and `in_progress`: the same object before any output.
      const opening = { ...aggregated, status: "in_progress", completed_at: null, output: [], usage: null };
      for (const [event, data] of all.slice(0, 2)) {
        assert.equal(JSON.stringify(data.response), JSON.stringify(opening), `${name}: ${event}`);
      }
      // Every item's done event and every part's done event carry what the final output has.
      const done = all.filter(([e]) => e === "response.output_item.done").map(([, d]) => d.item);
      assert.deepEqual(done, completed.output, name);
      for (const [event, data] of all) {
        const item = completed.output[data.output_index as number];
        if (event === "response.content_part.done") assert.deepEqual(data.part, item.content[0], name);
        if (event === "response.output_text.done") assert.equal(data.text, item.content[0].text, name);
        if (event === "response.reasoning_summary_part.done") assert.deepEqual(data.part, item.summary[0], name);
        if (event === "response.reasoning_summary_text.done") assert.equal(data.text, item.summary[0].text, name);
        if (event.endsWith(".delta") && event !== "response.function_call_arguments.delta") {
          assert.equal(data.item_id, item.id, name);
          assert.equal(typeof data.delta, "string", name);
        }
      }
      // The deltas of each item add up to its text.
      const texts = new Map<string, string>();
      for (const [event, data] of all) {
        if (event === "response.output_text.delta" || event === "response.reasoning_summary_text.delta") {
          texts.set(data.item_id as string, (texts.get(data.item_id as string) ?? "") + data.delta);
        }
      }
      for (const item of completed.output) {
        if (item.type === "message") assert.equal(texts.get(item.id) ?? "", item.content[0].text, name);
        if (item.type === "reasoning") assert.equal(texts.get(item.id) ?? "", item.summary[0].text, name);
      }
      // Kept for GET: the same bytes again; the defaults are not kept at all.
      const kept = streamed.kept(t);
      assert.equal(ResponsesFormat.keptJson("resp_0123abcd", kept), completedJson, name);
      if (settingsName === "defaults") assert.equal(kept.e, undefined, name);
      else assert.ok(kept.e, name);
    }
    await Promise.resolve();
  });
}

test("respformat: a failure mid-answer is the failed response object, its items as far as they went", () => {
  const f = new ResponsesFormat("resp_0123abcd", 1700000000, "dify", echoOf({}), true);
  let out = f.open() + f.reasoning("hm") + f.content("par");
  out += f.error(apiError("upstream_broken", "Dify's stream broke"));
  const all = events(out);
  const failed = all.find(([e]) => e === "response.failed")![1].response as Record<string, unknown>;
  assert.equal(JSON.stringify(failed), JSON.stringify(f.final));
  assert.deepEqual((failed.output as { status?: string }[]).map((o) => o.status), [undefined, "incomplete"]);
  assert.deepEqual(all.map(([, d]) => d.sequence_number), all.map((_, i) => i));
});
