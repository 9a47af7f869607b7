// Minimal HTTP/1.1 keep-alive client on raw TCP sockets, used by the load
// generator (bench/load.ts) and by the latency client in bench/bench.ts.
//
// Why not fetch(): the load generator shares 2 cores with the servers under
// test, so it must cost as little CPU per request as possible. This client
// writes one pre-encoded request, de-chunks the response in place without
// copying or decoding it, and only scans the body bytes for a marker when asked.

export interface Target {
  hostname: string;
  port: number;
  /** Pre-encoded request (request line, headers and body). */
  request: Uint8Array;
}

export function makeTarget(
  url: string,
  body: string,
  headers: Record<string, string> = {},
): Target {
  const u = new URL(url);
  if (u.protocol !== "http:") throw new Error(`only http: URLs: ${url}`);
  if (u.hostname !== "127.0.0.1" && u.hostname !== "localhost") {
    throw new Error(`refusing non-loopback target ${u.hostname}`);
  }
  const bodyBytes = new TextEncoder().encode(body);
  const lines = [
    `POST ${u.pathname}${u.search} HTTP/1.1`,
    `host: ${u.host}`,
    `content-type: application/json`,
    `accept: text/event-stream`,
    `content-length: ${bodyBytes.length}`,
  ];
  for (const [k, v] of Object.entries(headers)) lines.push(`${k}: ${v}`);
  const head = new TextEncoder().encode(lines.join("\r\n") + "\r\n\r\n");
  const request = new Uint8Array(head.length + bodyBytes.length);
  request.set(head, 0);
  request.set(bodyBytes, head.length);
  return { hostname: "127.0.0.1", port: Number(u.port || 80), request };
}

/** Streaming byte-pattern matcher (KMP) over the de-chunked body. A match of
 * `pattern` counts only if the byte after it is not `notNext` (if given). */
export class Marker {
  private readonly pat: Uint8Array;
  private readonly fail: Int32Array;
  private readonly notNext: number;
  private j = 0;
  private pending = false;
  count = 0;

  constructor(pattern: string, notNext?: string) {
    this.pat = new TextEncoder().encode(pattern);
    this.notNext = notNext ? notNext.charCodeAt(0) : -1;
    const p = this.pat;
    this.fail = new Int32Array(p.length);
    for (let i = 1, k = 0; i < p.length; i++) {
      while (k > 0 && p[i] !== p[k]) k = this.fail[k - 1];
      if (p[i] === p[k]) k++;
      this.fail[i] = k;
    }
  }

  reset() {
    this.j = 0;
    this.pending = false;
    this.count = 0;
  }

  /** Feeds bytes; returns true if a (confirmed) match ended in this slice. */
  feed(buf: Uint8Array, start: number, end: number): boolean {
    const p = this.pat;
    let hit = false;
    for (let i = start; i < end; i++) {
      const c = buf[i];
      if (this.pending) {
        this.pending = false;
        if (c !== this.notNext) {
          this.count++;
          hit = true;
        }
      }
      let j = this.j;
      while (j > 0 && c !== p[j]) j = this.fail[j - 1];
      if (c === p[j]) j++;
      if (j === p.length) {
        if (this.notNext < 0) {
          this.count++;
          hit = true;
        } else this.pending = true;
        j = this.fail[j - 1];
      }
      this.j = j;
    }
    return hit;
  }
}

const enum S {
  Head,
  Length,
  ChunkSize,
  ChunkExt,
  ChunkSizeLF,
  ChunkData,
  ChunkDataCR,
  ChunkDataLF,
  Trailer,
  UntilClose,
  Done,
}

export interface ResponseInfo {
  status: number;
  /** Body bytes after de-chunking. */
  bodyBytes: number;
  /** ms from sending the request to the end of the response. */
  totalMs: number;
  /** ms from sending the request to the read that completed the first marker
   * (NaN if no marker was given or it never matched). */
  firstMarkerMs: number;
  /** ms from sending the request to the first response byte. */
  firstByteMs: number;
  markers: number;
  keepAlive: boolean;
}

export class ClientError extends Error {}

/** One keep-alive connection; `request()` sends the target's request and reads
 * the whole response. */
export class Connection {
  private conn: Deno.TcpConn | null = null;
  private readonly buf: Uint8Array;

  constructor(readonly target: Target, bufSize = 16 * 1024) {
    this.buf = new Uint8Array(bufSize);
  }

  get connected(): boolean {
    return this.conn !== null;
  }

  async connect(): Promise<void> {
    if (this.conn) return;
    const c = await Deno.connect({
      hostname: this.target.hostname,
      port: this.target.port,
      transport: "tcp",
    });
    c.setNoDelay(true);
    this.conn = c;
  }

  close(): void {
    const c = this.conn;
    this.conn = null;
    if (c) {
      try {
        c.close();
      } catch { /* already closed */ }
    }
  }

  async request(marker?: Marker): Promise<ResponseInfo> {
    if (!this.conn) await this.connect();
    const conn = this.conn!;
    const buf = this.buf;
    marker?.reset();
    const t0 = performance.now();
    let off = 0;
    const req = this.target.request;
    while (off < req.length) off += await conn.write(req.subarray(off));

    let state = S.Head;
    let status = 0;
    let keepAlive = true;
    let remaining = 0; // Length / ChunkData
    let chunkSize = 0;
    let bodyBytes = 0;
    let firstByteMs = NaN;
    let firstMarkerMs = NaN;
    // Header parsing: collect raw header bytes until CRLFCRLF.
    let headParts: Uint8Array[] = [];
    let crlf = 0; // how many of \r\n\r\n matched so far
    let trailerLineLen = 0;
    let now = 0;
    /** Body bytes buf[from, to): counted, and watched for the first marker (e.g. first content). */
    const body = (from: number, to: number) => {
      if (marker && marker.feed(buf, from, to) && Number.isNaN(firstMarkerMs)) firstMarkerMs = now - t0;
      bodyBytes += to - from;
    };

    while (state !== S.Done) {
      const n = await conn.read(buf);
      if (n === null) {
        if (state === S.UntilClose) {
          state = S.Done;
          keepAlive = false;
          break;
        }
        this.close();
        throw new ClientError(`connection closed by server (state ${state})`);
      }
      now = performance.now();
      if (Number.isNaN(firstByteMs)) firstByteMs = now - t0;
      let i = 0;
      while (i < n && state !== S.Done) {
        switch (state) {
          case S.Head: {
            const start = i;
            while (i < n) {
              const c = buf[i++];
              if ((c === 13 && (crlf === 0 || crlf === 2)) || (c === 10 && (crlf === 1 || crlf === 3))) {
                crlf++;
                if (crlf === 4) break;
              } else crlf = c === 13 ? 1 : 0;
            }
            headParts.push(buf.slice(start, i));
            if (crlf === 4) {
              const head = parseHead(headParts);
              headParts = [];
              status = head.status;
              keepAlive = head.keepAlive;
              if (head.chunked) state = S.ChunkSize;
              else if (head.length >= 0) {
                remaining = head.length;
                state = remaining === 0 ? S.Done : S.Length;
              } else if (status === 204 || status === 304) state = S.Done;
              else state = S.UntilClose;
            }
            break;
          }
          case S.Length: {
            const take = Math.min(remaining, n - i);
            body(i, i + take);
            remaining -= take;
            i += take;
            if (remaining === 0) state = S.Done;
            break;
          }
          case S.UntilClose: {
            body(i, n);
            i = n;
            break;
          }
          case S.ChunkSize: {
            const c = buf[i++];
            if (c >= 48 && c <= 57) chunkSize = chunkSize * 16 + (c - 48);
            else if (c >= 97 && c <= 102) chunkSize = chunkSize * 16 + (c - 87);
            else if (c >= 65 && c <= 70) chunkSize = chunkSize * 16 + (c - 55);
            else if (c === 13) state = S.ChunkSizeLF;
            else if (c === 59 || c === 32 || c === 9) state = S.ChunkExt;
            else throw this.fail(`bad chunk size byte ${c}`);
            break;
          }
          case S.ChunkExt: {
            if (buf[i++] === 13) state = S.ChunkSizeLF;
            break;
          }
          case S.ChunkSizeLF: {
            if (buf[i++] !== 10) throw this.fail("bad chunk size line");
            if (chunkSize === 0) {
              state = S.Trailer;
              trailerLineLen = 0;
            } else {
              remaining = chunkSize;
              state = S.ChunkData;
            }
            chunkSize = 0;
            break;
          }
          case S.ChunkData: {
            const take = Math.min(remaining, n - i);
            body(i, i + take);
            remaining -= take;
            i += take;
            if (remaining === 0) state = S.ChunkDataCR;
            break;
          }
          case S.ChunkDataCR: {
            if (buf[i++] !== 13) throw this.fail("missing CR after chunk");
            state = S.ChunkDataLF;
            break;
          }
          case S.ChunkDataLF: {
            if (buf[i++] !== 10) throw this.fail("missing LF after chunk");
            state = S.ChunkSize;
            break;
          }
          case S.Trailer: {
            // Trailer section ends with an empty line.
            const c = buf[i++];
            if (c === 10) {
              if (trailerLineLen === 0) state = S.Done;
              trailerLineLen = 0;
            } else if (c !== 13) trailerLineLen++;
            break;
          }
        }
      }
      if (state === S.Done && i < n) {
        throw this.fail(`${n - i} unexpected bytes after the response`);
      }
    }
    const totalMs = performance.now() - t0;
    if (!keepAlive) this.close();
    return {
      status,
      bodyBytes,
      totalMs,
      firstByteMs,
      firstMarkerMs,
      markers: marker?.count ?? 0,
      keepAlive,
    };
  }

  private fail(msg: string): ClientError {
    this.close();
    return new ClientError(msg);
  }
}

const latin1 = new TextDecoder("latin1");

function parseHead(parts: Uint8Array[]) {
  let total = 0;
  for (const p of parts) total += p.length;
  const all = new Uint8Array(total);
  let o = 0;
  for (const p of parts) {
    all.set(p, o);
    o += p.length;
  }
  const text = latin1.decode(all);
  const lines = text.split("\r\n");
  const m = /^HTTP\/1\.([01]) (\d{3})/.exec(lines[0]);
  if (!m) throw new ClientError(`bad status line: ${lines[0].slice(0, 80)}`);
  let keepAlive = m[1] === "1";
  let chunked = false;
  let length = -1;
  for (let k = 1; k < lines.length; k++) {
    const line = lines[k];
    const colon = line.indexOf(":");
    if (colon <= 0) continue;
    const name = line.slice(0, colon).trim().toLowerCase();
    const value = line.slice(colon + 1).trim().toLowerCase();
    if (name === "transfer-encoding") chunked = value.includes("chunked");
    else if (name === "content-length") length = Number(value);
    else if (name === "connection") {
      if (value.includes("close")) keepAlive = false;
      else if (value.includes("keep-alive")) keepAlive = true;
    }
  }
  return { status: Number(m[2]), keepAlive, chunked, length };
}

/** Percentile (0..100) of an unsorted sample; sorts a copy. */
export function percentile(values: ArrayLike<number>, p: number): number {
  const a = Float64Array.from(values as ArrayLike<number>).filter((x) => !Number.isNaN(x));
  if (a.length === 0) return NaN;
  a.sort();
  const rank = Math.min(a.length - 1, Math.max(0, Math.ceil((p / 100) * a.length) - 1));
  return a[rank];
}

/** utime+stime of a process in ms, from /proc/<pid>/stat. */
export function cpuMs(pid: number | "self", clkTck = 100): number {
  const stat = Deno.readTextFileSync(`/proc/${pid}/stat`);
  // Fields after the parenthesised command name; utime/stime are fields 14/15.
  const rest = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  const utime = Number(rest[11]);
  const stime = Number(rest[12]);
  return ((utime + stime) * 1000) / clkTck;
}

/** VmRSS and VmHWM of a process in KiB, from /proc/<pid>/status. */
export function memKiB(pid: number | "self"): { rss: number; hwm: number } {
  const status = Deno.readTextFileSync(`/proc/${pid}/status`);
  const rss = /VmRSS:\s+(\d+) kB/.exec(status);
  const hwm = /VmHWM:\s+(\d+) kB/.exec(status);
  return { rss: rss ? Number(rss[1]) : NaN, hwm: hwm ? Number(hwm[1]) : NaN };
}
