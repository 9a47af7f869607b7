// LangChain.js on a Dify app, through the bridge.
//   npm i @langchain/openai @langchain/core
//   BASE_URL=http://127.0.0.1:8000/v1 API_KEY=sk-demo MODEL=agent node langchain.mjs
import { ChatOpenAI } from "@langchain/openai";

const llm = new ChatOpenAI({
  model: process.env.MODEL ?? "agent",
  apiKey: process.env.API_KEY ?? "sk-demo",
  configuration: { baseURL: process.env.BASE_URL ?? "http://127.0.0.1:8000/v1" },
});
for await (const chunk of await llm.stream("Hello")) process.stdout.write(chunk.text);
console.log();
