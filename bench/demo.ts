/**
 * `deno task demo`: dify-openai without a Dify. Starts the project's fake Dify on loopback with four apps
 * (chat, an agent that shows its thoughts, a chatflow, a workflow), then `deno run main.ts` in front of it,
 * prints the base URL, a key and a curl line, and shows a short tour through the openai SDK: a streamed
 * answer, an agent's reasoning and a three-turn conversation. It keeps serving until Ctrl-C.
 *
 *   deno task demo               PORT=8000 by default (`--port 9000` or PORT=9000 to change it)
 *   deno task demo --no-tour     just serve
 */
import OpenAI from "openai";
import { startFakeDify } from "./fake_dify.ts";

const MAIN = new URL("../main.ts", import.meta.url).pathname;
const KEY = "sk-demo";
const APPS = {
  chat: { key: "app-demo-chat", type: "chat" },
  agent: { key: "app-demo-agent", type: "agent" },
  chatflow: { key: "app-demo-chatflow", type: "chatflow" },
  workflow: { key: "app-demo-workflow", type: "workflow" },
};

// ─── The fake Dify's demo answers ───────────────────────────────────────────────────────────────

/** Turns answered so far, per Dify conversation. */
const turns = new Map<string, number>();

/** A friendly sentence in a few words at a time, as a model streams it. */
function deltas(text: string): string[] {
  return text.match(/\S+\s*/g) ?? [text];
}

function reply(app: string, query: string, turn: number): string {
  const said = query.length > 160 ? `${query.slice(0, 160)}…` : query;
  return [
    `Hello from the ${app} app! You asked: “${said}”.`,
    ...turn > 1 ? [`This is turn ${turn} of our conversation: I remember the earlier ones.`] : [],
    "This answer comes from a fake Dify on your machine, streamed through dify-openai.",
    "Point DIFY_API_URL at your Dify to get real ones.",
  ].join(" ");
}

/** Dify's events for one answer of the app behind `key`, in Dify's framing and order. */
function demoAnswer(path: string, body: Record<string, unknown>, key: string): Record<string, unknown>[] {
  const task_id = crypto.randomUUID();
  const message_id = crypto.randomUUID();
  const created_at = Math.floor(Date.now() / 1000);
  const usage = (text: string) => ({
    prompt_tokens: 12,
    completion_tokens: deltas(text).length,
    total_tokens: 12 + deltas(text).length,
  });
  if (path === "/workflows/run") {
    const inputs = (body.inputs ?? {}) as Record<string, unknown>;
    const text = reply("workflow", String(inputs.query ?? ""), 1);
    const run = { workflow_run_id: task_id, task_id };
    return [
      { event: "workflow_started", ...run, data: { id: task_id, created_at } },
      ...deltas(text).map((t) => ({ event: "text_chunk", ...run, data: { text: t } })),
      {
        event: "workflow_finished",
        ...run,
        data: { id: task_id, status: "succeeded", outputs: { answer: text }, total_tokens: usage(text).total_tokens },
      },
    ];
  }
  const conversation_id = typeof body.conversation_id === "string" && body.conversation_id
    ? body.conversation_id
    : crypto.randomUUID();
  const turn = (turns.get(conversation_id) ?? 0) + 1;
  turns.set(conversation_id, turn);
  const head = { conversation_id, message_id, created_at, task_id };
  const query = String(body.query ?? "");
  const end = (text: string) => ({ event: "message_end", ...head, id: message_id, metadata: { usage: usage(text) } });
  if (key.includes("agent")) {
    const text = reply("agent", query, turn);
    const thought = { event: "agent_thought", ...head, id: message_id, position: 1, message_files: [] };
    const tool_input = JSON.stringify({ query });
    return [
      {
        ...thought,
        thought: "The user wants an answer; let me look it up first.",
        tool: "",
        tool_input: "",
        observation: "",
      },
      {
        ...thought,
        thought: "The user wants an answer; let me look it up first.",
        tool: "web_search",
        tool_input,
        observation: "",
      },
      {
        ...thought,
        thought: "The user wants an answer; let me look it up first.",
        tool: "web_search",
        tool_input,
        observation: "3 results, the first says this is a demo.",
      },
      ...deltas(text).map((answer) => ({ event: "agent_message", ...head, id: message_id, answer })),
      end(text),
    ];
  }
  const app = key.includes("chatflow") ? "chatflow" : "chat";
  const text = reply(app, query, turn);
  const messages = deltas(text).map((answer) => ({ event: "message", ...head, id: message_id, answer }));
  if (app === "chat") return [...messages, end(text)];
  const run = { ...head, workflow_run_id: task_id };
  const node = (event: string, status: string) => ({
    event,
    ...run,
    data: { id: "llm", node_id: "llm", node_type: "llm", title: "LLM", status },
  });
  return [
    { event: "workflow_started", ...run, data: { id: task_id, created_at } },
    node("node_started", "running"),
    ...messages,
    node("node_finished", "succeeded"),
    end(text),
    { event: "workflow_finished", ...run, data: { id: task_id, status: "succeeded", outputs: { answer: text } } },
  ];
}

// ─── Start both, print how to reach them ────────────────────────────────────────────────────────

function flag(name: string): string | undefined {
  const i = Deno.args.findIndex((a) => a === `--${name}` || a.startsWith(`--${name}=`));
  if (i < 0) return undefined;
  return Deno.args[i].includes("=") ? Deno.args[i].split("=")[1] : Deno.args[i + 1] ?? "";
}

const port = Number(flag("port") ?? Deno.env.get("PORT") ?? 8000);
const fake = await startFakeDify({ script: demoAnswer, scriptPaceMs: 40 });
const bridge = new Deno.Command(Deno.execPath(), {
  args: ["run", "--allow-net", "--allow-env", "--unstable-kv", MAIN],
  env: {
    PORT: String(port),
    DIFY_API_URL: fake.url,
    DIFY_API_KEY: "",
    DIFY_APPS: JSON.stringify(APPS),
    PROXY_API_KEYS: KEY,
    KV_PATH: ":memory:",
    REASONING: "reasoning_content",
  },
  stdin: "null",
  stdout: "null",
  stderr: "inherit",
}).spawn();

async function stop(code: number): Promise<never> {
  try {
    bridge.kill("SIGTERM");
  } catch { /* already gone */ }
  await bridge.status;
  await fake.close();
  Deno.exit(code);
}
for (const signal of ["SIGINT", "SIGTERM"] as const) Deno.addSignalListener(signal, () => void stop(0));
bridge.status.then((s) => {
  console.error(`the bridge stopped (exit ${s.code}): is port ${port} free? Try --port 9000.`);
  void stop(1);
});

const base = `http://127.0.0.1:${port}/v1`;
for (let i = 0;; i++) {
  try {
    const res = await fetch(`http://127.0.0.1:${port}/healthz`);
    await res.body?.cancel();
    if (res.ok) break;
  } catch { /* not up yet */ }
  if (i > 200) await stop(1);
  await new Promise((r) => setTimeout(r, 50));
}

const body = JSON.stringify({ model: "agent", stream: true, messages: [{ role: "user", content: "Hello!" }] });
console.log(`
dify-openai demo: the bridge at ${base}, in front of a fake Dify on loopback.

  base URL  ${base}
  API key   ${KEY}
  models    chat, agent (thinks out loud: reasoning_content), chatflow, workflow

  curl -N ${base}/chat/completions \\
    -H "Authorization: Bearer ${KEY}" -H "Content-Type: application/json" \\
    -d '${body}'

Any OpenAI client works the same: base URL ${base}, key ${KEY}. Ctrl-C stops the demo.
`);

// ─── The tour: streaming, reasoning, a three-turn conversation ──────────────────────────────────

if (!Deno.args.includes("--no-tour")) {
  const client = new OpenAI({ baseURL: base, apiKey: KEY });
  const out = (s: string) => Deno.stdout.writeSync(new TextEncoder().encode(s));
  const messages: { role: "user" | "assistant"; content: string }[] = [];
  const questions: [string, string][] = [
    ["agent", "What can you do?"],
    ["agent", "And do you remember what I asked?"],
    ["agent", "Great, one more turn to be sure."],
  ];
  out("A three-turn conversation with the agent, through the openai SDK (reasoning in brackets):\n");
  for (const [model, question] of questions) {
    messages.push({ role: "user", content: question });
    out(`\n> ${question}\n`);
    const stream = await client.chat.completions.create({ model, messages, stream: true });
    let answer = "";
    let thinking = false;
    for await (const chunk of stream) {
      const delta = chunk.choices[0]?.delta as { content?: string; reasoning_content?: string } | undefined;
      if (delta?.reasoning_content) {
        out(thinking ? delta.reasoning_content : `[${delta.reasoning_content}`);
        thinking = true;
      }
      if (delta?.content) {
        if (thinking) out("]\n");
        thinking = false;
        answer += delta.content;
        out(delta.content);
      }
    }
    out("\n");
    messages.push({ role: "assistant", content: answer });
  }
  out(`\nThe bridge keeps serving at ${base} (key ${KEY}). Ctrl-C stops it.\n`);
}
