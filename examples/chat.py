# The openai Python SDK on a Dify app, through the bridge (pip install openai).
#   BASE_URL=http://127.0.0.1:8000/v1 API_KEY=sk-demo MODEL=agent python chat.py
import os

from openai import OpenAI

client = OpenAI(
    base_url=os.environ.get("BASE_URL", "http://127.0.0.1:8000/v1"),
    api_key=os.environ.get("API_KEY", "sk-demo"),
)
model = os.environ.get("MODEL", "agent")

# Chat completions, streamed; an agent app's thoughts arrive as `reasoning_content`.
stream = client.chat.completions.create(model=model, stream=True, messages=[{"role": "user", "content": "Hello"}])
for chunk in stream:
    delta = chunk.choices[0].delta if chunk.choices else None
    if delta and delta.content:
        print(delta.content, end="", flush=True)
print()

# The Responses API: a second turn by previous_response_id sends Dify only the new input.
first = client.responses.create(model=model, input="What can you do?")
second = client.responses.create(
    model=model, input="And what did I ask?", previous_response_id=first.id
)
print(second.output_text)
