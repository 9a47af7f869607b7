// GET /metrics: what it counts, read back through a real Prometheus text-format parser (npm), its
// keys, its bounds, and its wiring in main() on both runtimes.
import assert from "node:assert/strict";
import parsePrometheus from "parse-prometheus-text-format";
import { loadConfig, Metrics, metricsFor, newTranslation, routeLabel } from "../main.ts";
import { startFakeDify } from "../bench/fake_dify.ts";
import {
  assistant,
  BrokenStore,
  bunAvailable,
  rawChat,
  startBridge,
  startProcess,
  startRig,
  user,
} from "../bench/test_util.ts";

interface Sample {
  value?: string;
  labels?: Record<string, string>;
  buckets?: Record<string, string>;
  count?: string;
  sum?: string;
}
interface Family {
  name: string;
  help: string;
  type: string;
  metrics: Sample[];
}

/** The scrape, parsed: families by name. */
function parse(text: string): Map<string, Family> {
  return new Map((parsePrometheus(text) as Family[]).map((f) => [f.name, f]));
}

async function scrape(base: string, key?: string): Promise<{ status: number; type: string | null; text: string }> {
  const res = await fetch(`${base.replace(/\/v1$/, "")}/metrics`, {
    headers: key ? { authorization: `Bearer ${key}` } : {},
  });
  return { status: res.status, type: res.headers.get("content-type"), text: await res.text() };
}

/** The value of the series whose labels include `labels` (0 if none). */
function value(f: Family | undefined, labels: Record<string, string> = {}): number {
  const found = f?.metrics.find((m) => Object.entries(labels).every(([k, v]) => m.labels?.[k] === v));
  return Number(found?.value ?? found?.count ?? 0);
}

function total(f: Family | undefined): number {
  return (f?.metrics ?? []).reduce((sum, m) => sum + Number(m.value ?? m.count ?? 0), 0);
}

Deno.test("metrics: requests, answers, latency histograms, tokens, store writes and conversations", async () => {
  const metrics = metricsFor(loadConfig({ DIFY_API_URL: "http://127.0.0.1:1/v1", DIFY_API_KEY: "app-chat" }));
  const rig = await startRig({}, { metrics });
  try {
    const first = [user("hello")];
    const stream = await rig.client.chat.completions.create({ model: "gpt-4o", messages: first, stream: true });
    let said = "";
    for await (const chunk of stream) said += chunk.choices[0]?.delta?.content ?? "";
    // The second turn continues the first (history mode), not streamed.
    const second = await rig.client.chat.completions.create({
      model: "gpt-4o",
      messages: [...first, assistant(said), user("and then?")],
    });
    assert.ok(second.choices[0].message.content);
    const bad = await rawChat(rig.bridge.url, { model: "gpt-4o" });
    assert.equal(bad.status, 400);

    const { status, type, text } = await scrape(rig.bridge.url);
    assert.equal(status, 200);
    assert.match(type ?? "", /^text\/plain; version=0\.0\.4/);
    const m = parse(text);
    const chat = "/v1/chat/completions";
    assert.equal(m.get("dify_openai_requests_total")?.type, "COUNTER");
    assert.equal(value(m.get("dify_openai_requests_total"), { route: chat, status: "200" }), 2);
    assert.equal(value(m.get("dify_openai_requests_total"), { route: chat, status: "400" }), 1);
    // Every model name goes to the catch-all app: one label, not the client's names.
    assert.equal(value(m.get("dify_openai_answers_total"), { route: chat, model: "dify", status: "200" }), 2);
    for (const name of ["dify_openai_time_to_first_byte_seconds", "dify_openai_time_to_last_byte_seconds"]) {
      const h = m.get(name);
      assert.equal(h?.type, "HISTOGRAM", name);
      // This parser folds a labelled histogram into its buckets (its _sum and _count are dropped);
      // the +Inf bucket is the count, and the buckets never decrease.
      assert.equal(h.metrics.length, 1, name);
      const buckets = Object.entries(h.metrics[0].buckets ?? {}).map(([le, n]) => [
        le === "+Inf" ? Infinity : Number(le),
        Number(n),
      ]);
      buckets.sort((a, b) => a[0] - b[0]);
      assert.equal(buckets.at(-1)?.[0], Infinity, name);
      assert.equal(buckets.at(-1)?.[1], 2, name);
      buckets.forEach(([, n], i) => assert.ok(i === 0 || n >= buckets[i - 1][1], name));
    }
    assert.match(
      text,
      /^dify_openai_time_to_last_byte_seconds_count\{route="\/v1\/chat\/completions",model="dify"\} 2$/m,
    );
    assert.ok(value(m.get("dify_openai_tokens_total"), { model: "dify", direction: "in" }) > 0);
    assert.ok(value(m.get("dify_openai_tokens_total"), { model: "dify", direction: "out" }) > 0);
    assert.equal(value(m.get("dify_openai_errors_total"), { code: "invalid_request" }), 1);
    assert.equal(value(m.get("dify_openai_conversations_total"), { outcome: "started" }), 1);
    assert.equal(value(m.get("dify_openai_conversations_total"), { outcome: "continued", via: "history" }), 1);
    assert.ok(value(m.get("dify_openai_store_writes_total"), { result: "ok" }) >= 1);
    assert.equal(value(m.get("dify_openai_store_writes_total"), { result: "failed" }), 0);
    assert.equal(m.get("dify_openai_open_streams")?.type, "GAUGE");
    assert.equal(value(m.get("dify_openai_open_streams")), 0);
  } finally {
    await rig.close();
  }
});

Deno.test("metrics: an open stream is counted while it streams", async () => {
  const metrics = new Metrics();
  const rig = await startRig({}, { metrics });
  try {
    const res = await fetch(`${rig.bridge.url}/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json", authorization: "Bearer sk-test" },
      body: JSON.stringify({ model: "m", stream: true, messages: [user("fault:slow:200 hi")] }),
    });
    assert.equal(res.status, 200);
    const reader = res.body!.getReader();
    await reader.read();
    assert.equal(value(parse((await scrape(rig.bridge.url)).text).get("dify_openai_open_streams")), 1);
    await reader.cancel();
  } finally {
    await rig.close();
  }
});

Deno.test("metrics: failed store writes are counted", async () => {
  const metrics = new Metrics();
  const fake = await startFakeDify();
  const bridge = await startBridge({ DIFY_API_URL: fake.url, DIFY_API_KEY: "app-chat" }, {
    store: new BrokenStore(false),
    metrics,
  });
  try {
    const answer = await bridge.client().chat.completions.create({ model: "m", messages: [user("hi")] });
    assert.ok(answer.choices[0].message.content);
    let failed = 0;
    for (let i = 0; i < 50 && !failed; i++) {
      failed = value(parse(metrics.text()).get("dify_openai_store_writes_total"), { result: "failed" });
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.ok(failed >= 1, metrics.text());
  } finally {
    await bridge.close();
    await fake.close();
  }
});

Deno.test("metrics: behind PROXY_API_KEYS, or only METRICS_KEY when it is set", async () => {
  const rig = await startRig({ PROXY_API_KEYS: "sk-a" }, { metrics: new Metrics() });
  try {
    assert.equal((await scrape(rig.bridge.url)).status, 401);
    assert.equal((await scrape(rig.bridge.url, "sk-b")).status, 401);
    assert.equal((await scrape(rig.bridge.url, "sk-a")).status, 200);
  } finally {
    await rig.close();
  }
  const keyed = await startRig({ PROXY_API_KEYS: "sk-a", METRICS_KEY: "scrape-me" }, { metrics: new Metrics() });
  try {
    const refused = await scrape(keyed.bridge.url, "sk-a");
    assert.equal(refused.status, 401);
    assert.equal(JSON.parse(refused.text).error.code, "invalid_api_key");
    assert.equal((await scrape(keyed.bridge.url, "scrape-me")).status, 200);
    const post = await fetch(`${keyed.bridge.url.replace(/\/v1$/, "")}/metrics`, {
      method: "POST",
      headers: { authorization: "Bearer scrape-me" },
    });
    await post.body?.cancel();
    assert.equal(post.status, 405);
  } finally {
    await keyed.close();
  }
});

Deno.test("metrics: label values are escaped, and a client cannot grow the series without bound", () => {
  const metrics = new Metrics();
  const odd = 'we"ird\\name\nwith a line feed';
  const t = newTranslation("chat", true);
  metrics.answered({ path: "/v1/chat/completions", model: odd, status: 200, ms: 12, ttft_ms: 3 }, t);
  let m = parse(metrics.text());
  assert.equal(m.get("dify_openai_answers_total")?.metrics[0].labels?.model, odd);
  for (let i = 0; i < 1500; i++) metrics.answered({ path: `/v1/x${i}`, model: `m${i}`, status: 200, ms: 1 }, t);
  m = parse(metrics.text());
  const answers = m.get("dify_openai_answers_total")!;
  assert.ok(answers.metrics.length <= 1001, `${answers.metrics.length} series`);
  assert.equal(total(answers), 1501);
  assert.equal(value(answers, { model: "other" }), 1501 - 1000);
});

Deno.test("metrics: routes are templates, never the client's paths", () => {
  assert.equal(routeLabel("/v1/chat/completions/"), "/v1/chat/completions");
  assert.equal(routeLabel("/chat/completions"), "/v1/chat/completions");
  assert.equal(routeLabel("/v1/responses/resp_123"), "/v1/responses/{id}");
  assert.equal(routeLabel("/v1/conversations/alice"), "/v1/conversations/{user}");
  assert.equal(routeLabel("/v1/models/gpt-4o"), "/v1/models");
  assert.equal(routeLabel("/health"), "/healthz");
  assert.equal(routeLabel("/wp-admin/x.php"), "other");
});

for (const runtime of ["deno", "bun"] as const) {
  Deno.test(`metrics: main() serves /metrics on ${runtime}`, async () => {
    if (runtime === "bun" && !bunAvailable()) return;
    const fake = await startFakeDify();
    const proc = await startProcess(runtime, { DIFY_API_URL: fake.url, DIFY_API_KEY: "app-chat" });
    try {
      const res = await rawChat(proc.url, { model: "m", messages: [user("hi")] });
      assert.equal(res.status, 200);
      const m = parse((await scrape(proc.url)).text);
      assert.equal(value(m.get("dify_openai_answers_total"), { model: "dify", status: "200" }), 1);
      assert.ok(value(m.get("dify_openai_tokens_total"), { direction: "out" }) > 0);
    } finally {
      await proc.stop();
      await fake.close();
    }
  });
}
