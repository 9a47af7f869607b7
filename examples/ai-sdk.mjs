// The Vercel AI SDK on a Dify app, through the bridge.
//   npm i ai @ai-sdk/openai
//   BASE_URL=http://127.0.0.1:8000/v1 API_KEY=sk-demo MODEL=agent node ai-sdk.mjs
import { createOpenAI } from "@ai-sdk/openai";
import { streamText } from "ai";

const provider = createOpenAI({
  baseURL: process.env.BASE_URL ?? "http://127.0.0.1:8000/v1",
  apiKey: process.env.API_KEY ?? "sk-demo",
});
const model = process.env.MODEL ?? "agent";

// `provider(model)` speaks the Responses API (the AI SDK's default); `provider.chat(model)` chat completions.
for (const languageModel of [provider(model), provider.chat(model)]) {
  const result = streamText({ model: languageModel, prompt: "Hello" });
  for await (const text of result.textStream) process.stdout.write(text);
  console.log();
}
