// Load generator: N keep-alive connections, each sending one streaming POST
// after another and reading every response body to its end.
//
//   deno run -A bench/load.ts --url http://127.0.0.1:8080/v1/chat/completions \
//     --body '{"model":"dify","stream":true,"messages":[{"role":"user","content":"hi"}]}' \
//     --concurrency 32 --duration 10
//
// Options:
//   --url URL            target (127.0.0.1 / localhost only)
//   --body JSON          request body
//   --header "k: v"      extra header (repeatable)
//   --concurrency N      connections / requests in flight (default 32)
//   --duration S         stop starting requests after S seconds
//   --requests N         stop after N requests were started (either or both)
//   --marker STR         count occurrences of STR in the body bytes
//   --marker-not-next C  ...only where the next byte is not C
//   --ramp MS            open the connections spread over MS ms (default 0)
//   --grace S            hard limit after the stop for in-flight requests (default 30)
//   --parent PID         exit when that process is gone
//
// Prints one JSON object (see `Result` below) on stdout.

import { exitWithParent, flags } from "./child.ts";

import { ClientError, Connection, cpuMs, makeTarget, Marker, percentile } from "./http_client.ts";

interface Opts {
  url: string;
  body: string;
  headers: Record<string, string>;
  concurrency: number;
  duration: number;
  requests: number;
  marker?: string;
  markerNotNext?: string;
  ramp: number;
  grace: number;
  parent: number;
}

function parse(args: string[]): Opts {
  const o: Opts = {
    url: "",
    body: "{}",
    headers: {},
    concurrency: 32,
    duration: 0,
    requests: 0,
    ramp: 0,
    grace: 30,
    parent: 0,
  };
  for (const [a, v] of flags(args)) {
    switch (a) {
      case "--url":
        o.url = v();
        break;
      case "--body":
        o.body = v();
        break;
      case "--header": {
        const h = v();
        const c = h.indexOf(":");
        o.headers[h.slice(0, c).trim().toLowerCase()] = h.slice(c + 1).trim();
        break;
      }
      case "--concurrency":
        o.concurrency = Number(v());
        break;
      case "--duration":
        o.duration = Number(v());
        break;
      case "--requests":
        o.requests = Number(v());
        break;
      case "--marker":
        o.marker = v();
        break;
      case "--marker-not-next":
        o.markerNotNext = v();
        break;
      case "--ramp":
        o.ramp = Number(v());
        break;
      case "--grace":
        o.grace = Number(v());
        break;
      case "--parent":
        o.parent = Number(v());
        break;
      default:
        throw new Error(`unknown argument ${a}`);
    }
  }
  if (!o.url) throw new Error("--url is required");
  if (!(o.duration > 0) && !(o.requests > 0)) {
    throw new Error("give --duration and/or --requests (the run must be bounded)");
  }
  if (!(o.concurrency >= 1 && o.concurrency <= 10_000)) {
    throw new Error("--concurrency must be in 1..10000");
  }
  if (o.duration <= 0) o.duration = 3600; // still bounded
  if (o.requests <= 0) o.requests = Number.MAX_SAFE_INTEGER;
  return o;
}

export interface Result {
  concurrency: number;
  started: number;
  completed: number;
  errors: number;
  firstError?: string;
  statusCounts: Record<string, number>;
  /** From the first request start to the last response end. */
  elapsedMs: number;
  rps: number;
  /** Highest number of requests in flight at once (proves the concurrency). */
  maxInFlight: number;
  latencyP50Ms: number;
  latencyP99Ms: number;
  bodyBytesMin: number;
  bodyBytesMax: number;
  markers: number;
  markersPerResponseMin: number;
  markersPerResponseMax: number;
  /** CPU time of this load generator process during the run. */
  clientCpuMs: number;
  /** CPU time of this load generator process including its start-up. */
  clientCpuTotalMs: number;
  timedOut: boolean;
}

async function main() {
  const o = parse(Deno.args);
  const target = makeTarget(o.url, o.body, o.headers);
  const cpu0 = cpuMs("self");

  let started = 0;
  let completed = 0;
  let errors = 0;
  let firstError: string | undefined;
  let inFlight = 0;
  let maxInFlight = 0;
  let markers = 0;
  let mMin = Infinity;
  let mMax = 0;
  let bMin = Infinity;
  let bMax = 0;
  const statusCounts: Record<string, number> = {};
  let lat = new Float64Array(1 << 14);
  let nLat = 0;
  let stopping = false;
  const conns: Connection[] = [];

  const t0 = performance.now();
  const stopAt = t0 + o.duration * 1000;
  let tLast = t0;

  async function worker(idx: number) {
    if (o.ramp > 0) {
      await new Promise((r) => setTimeout(r, (o.ramp * idx) / o.concurrency));
    }
    const conn = new Connection(target);
    conns.push(conn);
    const marker = o.marker ? new Marker(o.marker, o.markerNotNext) : undefined;
    // Bounded: every iteration starts one of at most o.requests requests, and
    // stops at the deadline.
    while (!stopping && started < o.requests && performance.now() < stopAt) {
      started++;
      inFlight++;
      if (inFlight > maxInFlight) maxInFlight = inFlight;
      try {
        const r = await conn.request(marker);
        statusCounts[r.status] = (statusCounts[r.status] ?? 0) + 1;
        if (r.status !== 200) {
          errors++;
          firstError ??= `HTTP ${r.status}`;
        } else {
          completed++;
          if (nLat === lat.length) {
            const bigger = new Float64Array(lat.length * 2);
            bigger.set(lat);
            lat = bigger;
          }
          lat[nLat++] = r.totalMs;
          if (r.bodyBytes < bMin) bMin = r.bodyBytes;
          if (r.bodyBytes > bMax) bMax = r.bodyBytes;
          if (marker) {
            markers += r.markers;
            if (r.markers < mMin) mMin = r.markers;
            if (r.markers > mMax) mMax = r.markers;
          }
        }
        tLast = performance.now();
      } catch (err) {
        errors++;
        if (!stopping) {
          firstError ??= err instanceof ClientError ? err.message : String(err);
        }
        conn.close();
        if (!stopping) await new Promise((r) => setTimeout(r, 10));
      } finally {
        inFlight--;
      }
    }
    conn.close();
  }

  const workers = Array.from({ length: o.concurrency }, (_, i) => worker(i));
  const all = Promise.all(workers);
  // Hard limit: the deadline plus the grace period, then close every socket.
  let timedOut = false;
  let timer: ReturnType<typeof setInterval> | undefined;
  const hard = new Promise<void>((resolve) => {
    timer = setTimeout(() => {
      timedOut = true;
      stopping = true;
      for (const c of conns) c.close();
      resolve();
    }, o.duration * 1000 + o.grace * 1000);
  });
  await Promise.race([all, hard]);
  clearTimeout(timer);
  if (timedOut) await Promise.race([all, new Promise((r) => setTimeout(r, 2000))]);

  const elapsedMs = tLast - t0;
  const sample = lat.subarray(0, nLat);
  const result: Result = {
    concurrency: o.concurrency,
    started,
    completed,
    errors,
    firstError,
    statusCounts,
    elapsedMs,
    rps: elapsedMs > 0 ? (completed * 1000) / elapsedMs : 0,
    maxInFlight,
    latencyP50Ms: percentile(sample, 50),
    latencyP99Ms: percentile(sample, 99),
    bodyBytesMin: bMin === Infinity ? 0 : bMin,
    bodyBytesMax: bMax,
    markers,
    markersPerResponseMin: mMin === Infinity ? 0 : mMin,
    markersPerResponseMax: mMax,
    clientCpuMs: cpuMs("self") - cpu0,
    clientCpuTotalMs: cpuMs("self"),
    timedOut,
  };
  console.log(JSON.stringify(result));
}

if (import.meta.main) {
  if (Deno.args.includes("--parent")) exitWithParent(Number(Deno.args[Deno.args.indexOf("--parent") + 1]), 3);
  await main();
  Deno.exit(0);
}
