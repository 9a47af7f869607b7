// The openai Node SDK on a Dify app, through the bridge: chat completions and the Responses API.
//   npm i openai
//   BASE_URL=http://127.0.0.1:8000/v1 API_KEY=sk-demo MODEL=agent node openai.mjs
import OpenAI from "openai";

const client = new OpenAI({
  baseURL: process.env.BASE_URL ?? "http://127.0.0.1:8000/v1",
  apiKey: process.env.API_KEY ?? "sk-demo",
});
const model = process.env.MODEL ?? "agent";

// Chat completions, streamed: an agent app's thoughts arrive as `reasoning_content` deltas.
const stream = await client.chat.completions.create({
  model,
  stream: true,
  messages: [{ role: "user", content: "Hello" }],
});
for await (const chunk of stream) process.stdout.write(chunk.choices[0]?.delta?.content ?? "");
console.log();

// The Responses API, streamed; the next turn names the previous response and Dify gets only the new input.
const first = client.responses.stream({ model, input: "What can you do?" });
for await (const event of first) if (event.type === "response.output_text.delta") process.stdout.write(event.delta);
const { id } = await first.finalResponse();
const second = await client.responses.create({ model, input: "What did I just ask?", previous_response_id: id });
console.log(`\n${second.output_text}`);
