/**
 * Clients that never read: N streaming clients each ask for an answer of S bytes, read the response
 * head and then nothing. Measures, per runtime, how much of Dify's answers the bridge took, its peak
 * RSS, and how fast /healthz answers once the streams have stalled. Prints a markdown table.
 *
 *   deno task bench:stalled [--streams 200] [--bytes 4400000] [--runtimes deno,bun]
 */
import { startFakeDify } from "./fake_dify.ts";
import { bunAvailable, startProcess, user } from "./test_util.ts";
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
runtimes = runtimes.filter((r) => r !== "bun" || bunAvailable());

async function rssMiB(pid: number): Promise<number> {
  return Number(/VmRSS:\s+(\d+)/.exec(await Deno.readTextFile(`/proc/${pid}/status`))![1]) / 1024;
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
  const proc = await startProcess(runtime as "deno" | "bun", { DIFY_API_URL: dify.url, DIFY_API_KEY: "app-chat" });
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
  let slowest = 0;
  for (let i = 0; i < 10; i++) {
    const started = performance.now();
    await (await fetch(`http://127.0.0.1:${proc.port}/healthz`)).body?.cancel();
    slowest = Math.max(slowest, performance.now() - started);
  }
  rows.push(
    `| main.ts on ${runtime} | ${streams} × ${(bytes / 1e6).toFixed(1)} MB | ${(read / 1e6).toFixed(0)} MB of ${
      (streams * bytes * 1.1 / 1e6).toFixed(0)
    } MB | ${idle.toFixed(0)} MiB | ${peak.toFixed(0)} MiB | ${slowest.toFixed(1)} ms |`,
  );
  for (const conn of conns) conn.close();
  await proc.stop();
  await dify.close();
}
console.log("| path | stalled streams | Dify's stream taken | RSS before | peak RSS | slowest /healthz after |");
console.log("| --- | --- | ---: | ---: | ---: | ---: |");
for (const row of rows) console.log(row);
