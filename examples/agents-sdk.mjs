// The OpenAI Agents SDK (npm @openai/agents) on a Dify app, through the bridge's Responses API.
//   npm i @openai/agents openai
//   BASE_URL=http://127.0.0.1:8000/v1 API_KEY=sk-demo MODEL=agent node agents-sdk.mjs
import OpenAI from "openai";
import { Agent, MemorySession, run, setDefaultOpenAIClient, setOpenAIAPI, setTracingDisabled } from "@openai/agents";

const baseURL = process.env.BASE_URL ?? "http://127.0.0.1:8000/v1";
setDefaultOpenAIClient(new OpenAI({ baseURL, apiKey: process.env.API_KEY ?? "sk-demo" }));
setOpenAIAPI("responses"); // the default; "chat_completions" works too
setTracingDisabled(true); // traces would go to OpenAI's platform

const agent = new Agent({ name: "Assistant", instructions: "Answer briefly.", model: process.env.MODEL ?? "agent" });

// A chain by previous_response_id: only the new input goes to Dify each turn.
const first = await run(agent, "What can you do?");
console.log(first.finalOutput);
const second = await run(agent, "And what did I just ask?", { previousResponseId: first.lastResponseId });
console.log(second.finalOutput);

// Session mode: the SDK resends the history (with the bridge's reasoning items); the bridge follows it.
const session = new MemorySession();
await run(agent, "Hello!", { session });
const streamed = await run(agent, "One more turn, streamed.", { session, stream: true });
for await (const text of streamed.toTextStream()) process.stdout.write(text);
await streamed.completed;
console.log();
