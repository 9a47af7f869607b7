/**
 * Clients that never read: N streaming clients each ask for an answer of S bytes, read the response
 * head and then nothing. Measures, per runtime, how much of Dify's answers the bridge took, its peak
 * RSS, and how fast /healthz answers once the streams have stalled. Prints a markdown table.
 *
 *   deno task bench:stalled [--streams 200] [--bytes 4400000] [--runtimes deno,bun]
 *
 * `--runtimes` also takes Bun's floor, the least a Bun bridge holds: `bench/stalled_bun_proxy.ts` copying Dify's
 * bytes untranslated, `bun-fetch` (fetch into a direct stream, main.ts's shape), `bun-pull` (fetch into a pull
 * stream), `bun-node` (node:http, paused until read, into a direct stream).
 */
import { startFakeDify } from "./fake_dify.ts";
import { bunAvailable, closedPort, startProcess, user } from "./test_util.ts";
import { flags } from "./child.ts";

let streams = 200;
let bytes = 4_400_000;
let runtimes = ["deno", "bun"];
for (const [flag, value] of flags(Deno.args)) {
  if (flag === "--streams") streams = Number(value());
  else if (flag === "--bytes") bytes = Number(value());
  else if (flag === "--runtimes") runtimes = value().split(",");
  else throw new Error(`unknown flag ${flag}`);
}
runtimes = runtimes.filter((r) => !r.startsWith("bun") || bunAvailable());

async function rssMiB(pid: number): Promise<number> {
  return Number(/VmRSS:\s+(\d+)/.exec(await Deno.readTextFile(`/proc/${pid}/status`))![1]) / 1024;
}

const BUN_FLOORS: Record<string, string> = { "bun-fetch": "fetch", "bun-pull": "pull", "bun-node": "node" };

/** A Bun floor (`bench/stalled_bun_proxy.ts`) in a subprocess, as `startProcess` starts main.ts. */
async function startFloor(mode: string, env: Record<string, string>) {
  const port = closedPort();
  const process = new Deno.Command("bun", {
    args: [new URL("./stalled_bun_proxy.ts", import.meta.url).pathname],
    env: { ...env, PORT: String(port), MODE: mode, BUN_CONFIG_MAX_HTTP_REQUESTS: "2048" },
    stdin: "null",
    stdout: "null",
    stderr: "null",
  }).spawn();
  for (let i = 0;; i++) {
    try {
      await (await fetch(`http://127.0.0.1:${port}/healthz`)).body?.cancel();
      break;
    } catch (e) {
      if (i > 300) throw e;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
  return {
    port,
    process,
    async stop() {
      process.kill("SIGKILL");
      await process.status;
    },
  };
}

async function stalled(port: number): Promise<Deno.Conn> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const body = JSON.stringify({ model: "dify", stream: true, messages: [user(`fault:firehose:${bytes}`)] });
  await conn.write(new TextEncoder().encode(
    `POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: ${body.length}\r\n\r\n${body}`,
  ));
  await conn.read(new Uint8Array(512));
  return conn;
}

const rows: string[] = [];
for (const runtime of runtimes) {
  const dify = await startFakeDify();
  const env = { DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat" };
  const proc = BUN_FLOORS[runtime]
    ? await startFloor(BUN_FLOORS[runtime], env)
    : await startProcess(runtime as "deno" | "bun", env);
  const conns: Deno.Conn[] = [];
  const idle = await rssMiB(proc.process.pid);
  let peak = idle;
  for (let i = 0; i < streams; i += 20) {
    conns.push(...await Promise.all(Array.from({ length: Math.min(20, streams - i) }, () => stalled(proc.port))));
    peak = Math.max(peak, await rssMiB(proc.process.pid));
  }
  let read = -1;
  for (;;) {
    await new Promise((r) => setTimeout(r, 500));
    peak = Math.max(peak, await rssMiB(proc.process.pid));
    if (dify.firehoseBytes() === read) break;
    read = dify.firehoseBytes();
  }
  // What stays once every stream has stalled (the peak also counts garbage not yet collected).
  await new Promise((r) => setTimeout(r, 2000));
  const settled = await rssMiB(proc.process.pid);
  let slowest = 0;
  for (let i = 0; i < 10; i++) {
    const started = performance.now();
    await (await fetch(`http://127.0.0.1:${proc.port}/healthz`)).body?.cancel();
    slowest = Math.max(slowest, performance.now() - started);
  }
  const label = BUN_FLOORS[runtime] ? `Bun floor: ${runtime}` : `main.ts on ${runtime}`;
  rows.push(
    `| ${label} | ${streams} × ${(bytes / 1e6).toFixed(1)} MB | ${(read / 1e6).toFixed(0)} MB of ${
      (streams * bytes * 1.1 / 1e6).toFixed(0)
    } MB | ${idle.toFixed(0)} MiB | ${peak.toFixed(0)} MiB | ${settled.toFixed(0)} MiB | ${
      ((settled - idle) * 1024 / streams).toFixed(0)
    } KiB | ${slowest.toFixed(1)} ms |`,
  );
  for (const conn of conns) conn.close();
  await proc.stop();
  await dify.close();
}
console.log(
  "| path | stalled streams | Dify's stream taken | RSS before | peak RSS | settled RSS | per stream | slowest /healthz after |",
);
console.log("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |");
for (const row of rows) console.log(row);
