/**
 * In-process fake of Dify's Service API for tests and benchmarks.
 *
 * Real HTTP (`Deno.serve` on 127.0.0.1, random port) that answers with Dify's exact bytes: fixtures from
 * `testdata/dify-wire/` are replayed verbatim, and generated streams follow Dify's framing and key order
 * (see Dify's Service API reference, §3–§5). Behaviour is steered by the app key (auth errors, app mode) and by
 * directives embedded in the query text (`fixture:<name>`, `fault:<name>[:<n>]`).
 *
 * Keys: `app-bad` → 401, `app-gone` → 403 (also `app-abnormal`, `app-disabled`, `app-archived`), any other
 * `app-…` is valid. The mode comes from the key: `chatflow` → advanced-chat, `agent` → agent-chat,
 * `workflow` → workflow, `completion` → completion, else chat.
 *
 * Directives (chat: in `query`; completion: `inputs.query`/`query`; workflow: any string in `inputs`), combinable:
 *   fixture:<name>            replay `<name>.sse` (or `<name>.json` as application/json) byte for byte
 *   fault:http_<scenario>     errors.json `http.<scenario>` (status, raw_modern, headers)
 *   fault:status_<code>       Dify-shaped {"code","message","status"} with that status
 *   fault:html502 | html504 | json_instead | error200
 *   fault:midstream_error | eof | reset      cut after the 3rd answer delta (error frame / clean EOF / broken body)
 *   fault:first_byte:<ms> | idle:<ms> | slow:<ms> | hold | forever
 *   fault:malformed | huge_line[:<n>] | workflow_no_chunks | workflow_outputs_object
 *   fault:firehose:<n>        an answer of <n> bytes in 1 KB message events, made only as the bridge reads
 *                             (`firehoseBytes()` counts what it took): shows backpressure
 *   tools:<script>[:<n>]      (chat family; anywhere in the conversation) an LLM asked for `<tool_call>`s: see
 *                             `toolsAnswer` at the end of this file; streamed 3 characters per message event
 *   tool:<name>:<args>        (chat family) one call of the client's tool <name> with <args> (base64url of a JSON
 *                             object), then `Tool said: <result>` once a `<tool_response>` came back: `toolAnswer`
 * Generated answers: chat family `Turn <n> of <conv id[0:8]>: <query[0:200]>`, completion `Completion: <text>`,
 * workflow `Workflow: <inputs.query or first string input>`.
 *
 * Web-standard and Deno APIs only.
 */

// ---------------------------------------------------------------------------------------------------------------
// Public types
// ---------------------------------------------------------------------------------------------------------------

export interface RecordedRequest {
  method: string;
  /** Path without the `/v1` prefix and without the query, e.g. "/chat-messages", "/info". */
  path: string;
  /** Raw query string without the leading "?" ("" if none). */
  search: string;
  /** Request headers, lower-cased names. */
  headers: Record<string, string>;
  /** The bearer token sent ("" if none or not a Bearer header). */
  key: string;
  /** Parsed JSON body; for multipart uploads {user, filename, contentType, size, bytes}; otherwise null. */
  // deno-lint-ignore no-explicit-any
  body: any;
  /** The body decoded as UTF-8 text ("" for multipart uploads and empty bodies). */
  rawBody: string;
}

export interface FakeConversation {
  id: string;
  key: string;
  user: string;
  turns: {
    query: string;
    answer: string;
    inputs: Record<string, unknown>;
    files: unknown[];
  }[];
}

export interface FakeDifyOptions {
  /** Write every response body in slices of at most this many bytes, with a setTimeout(0) yield between slices. */
  sliceBytes?: number;
  /** Generated streams use Python json.dumps encoding and the pre-1.13 chatflow order (no initial ping). */
  legacy?: boolean;
  /** Generated streams start with "event: ping\n\n". */
  pingFirst?: boolean;
  /** Generated streams use "\r\n" line endings. */
  crlf?: boolean;
  /**
   * Scripted answers, for event orders the generator does not make: every run request (chat, completion,
   * workflow) is recorded, then answered with these events as one event stream (or this raw SSE text),
   * whatever its directives. `key` is the app key the bridge sent.
   */
  script?: (path: string, body: Record<string, unknown>, key: string) => Record<string, unknown>[] | string;
  /** Scripted answers send one event every this many milliseconds, as a model streams its tokens. */
  scriptPaceMs?: number;
  /** Every file upload is refused as Dify refuses a type it does not allow (errors.json `upload_unsupported_type`). */
  refuseUploads?: boolean;
}

export interface FakeUpload {
  user: string;
  filename: string;
  contentType: string;
  size: number;
  key: string;
}

export interface FakeDify {
  /** Base URL including "/v1", e.g. "http://127.0.0.1:54321/v1". */
  url: string;
  /** "http://127.0.0.1:54321" */
  origin: string;
  requests: RecordedRequest[];
  stops: { path: string; taskId: string; user: string }[];
  conversations: Map<string, FakeConversation>;
  uploads: Map<string, FakeUpload>;
  // deno-lint-ignore no-explicit-any
  lastBody(path?: string): any;
  // deno-lint-ignore no-explicit-any
  generateBodies(): any[];
  forgetAll(): void;
  release(): void;
  held(): number;
  /** Body bytes the fake has handed to its streamed answers so far (all of them, unlike `firehoseBytes`). */
  bytesSent(): number;
  /** Bytes `fault:firehose` answers have handed to their readers so far. */
  firehoseBytes(): number;
  reset(): void;
  close(): Promise<void>;
}

// ---------------------------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------------------------

function resolveFixturesDir(): URL {
  let override: string | undefined;
  try {
    override = Deno.env.get("DIFY_WIRE_DIR");
  } catch {
    // no --allow-env: use the default location
  }
  if (override) {
    const dir = override.endsWith("/") ? override : override + "/";
    if (/^[a-z][a-z0-9+.-]*:/i.test(dir) && !/^[a-z]:[\\/]/i.test(dir)) {
      return new URL(dir);
    }
    const abs = dir.startsWith("/") ? dir : `${Deno.cwd()}/${dir}`;
    return new URL("file://" + abs.split("/").map(encodeURIComponent).join("/"));
  }
  return new URL("../testdata/dify-wire/", import.meta.url);
}

/** Directory holding the Dify wire fixtures (`$DIFY_WIRE_DIR` overrides the default `testdata/dify-wire/`). */
export const FIXTURES_DIR: URL = resolveFixturesDir();

const fixtureCache = new Map<string, Promise<Uint8Array<ArrayBuffer>>>();

function loadFixture(file: string): Promise<Uint8Array<ArrayBuffer>> {
  let p = fixtureCache.get(file);
  if (!p) {
    p = Deno.readFile(new URL(file, FIXTURES_DIR));
    fixtureCache.set(file, p);
    p.catch(() => fixtureCache.delete(file));
  }
  return p;
}

/** Bytes of a file in the fixtures dir ("chat_basic.sse"; a bare name without extension tries ".sse"). */
export async function readFixture(name: string): Promise<Uint8Array> {
  try {
    return (await loadFixture(name)).slice();
  } catch (e) {
    if (!name.includes(".")) return (await loadFixture(name + ".sse")).slice();
    throw e;
  }
}

interface ErrorScenario {
  status: number;
  body: { code: string; message: string; status: number };
  raw_modern: string;
  raw_legacy: string;
  headers?: Record<string, string>;
}
export interface ErrorsJson {
  http: Record<string, ErrorScenario>;
  stream: Record<string, { event: Record<string, unknown>; sse: string }>;
}

let errorsPromise: Promise<ErrorsJson> | undefined;

/** errors.json from the fixtures dir, parsed (cached). */
export function readErrorsJson(): Promise<ErrorsJson> {
  if (!errorsPromise) {
    errorsPromise = loadFixture("errors.json").then((b) => JSON.parse(new TextDecoder().decode(b)) as ErrorsJson);
    errorsPromise.catch(() => errorsPromise = undefined);
  }
  return errorsPromise;
}

// ---------------------------------------------------------------------------------------------------------------
// Encoders
// ---------------------------------------------------------------------------------------------------------------

function pyFloat(n: number): string {
  if (Number.isNaN(n)) return "NaN";
  if (!Number.isFinite(n)) return n > 0 ? "Infinity" : "-Infinity";
  if (Number.isInteger(n)) {
    return Math.abs(n) < 1e21 ? String(n) : BigInt(n).toString();
  }
  // Shortest round-trip digits (same as Python's repr), re-laid out Python-style.
  const neg = n < 0;
  const [mant, expStr] = Math.abs(n).toExponential().split("e");
  const exp = Number(expStr);
  const digits = mant.replace(".", "");
  let s: string;
  if (exp >= -4 && exp < 16) {
    if (exp < 0) s = "0." + "0".repeat(-exp - 1) + digits;
    else if (digits.length <= exp + 1) {
      s = digits + "0".repeat(exp + 1 - digits.length) + ".0";
    } else s = digits.slice(0, exp + 1) + "." + digits.slice(exp + 1);
  } else {
    const m = digits.length > 1 ? digits[0] + "." + digits.slice(1) : digits;
    s = `${m}e${exp < 0 ? "-" : "+"}${String(Math.abs(exp)).padStart(2, "0")}`;
  }
  return neg ? "-" + s : s;
}

// deno-lint-ignore no-control-regex
const PY_ESCAPE = /[\\"\u0000-\u001f\u007f-\uffff]/g;
const PY_SHORT: Record<string, string> = {
  '"': '\\"',
  "\\": "\\\\",
  "\n": "\\n",
  "\r": "\\r",
  "\t": "\\t",
  "\b": "\\b",
  "\f": "\\f",
};

function pyStr(s: string): string {
  return '"' +
    s.replace(PY_ESCAPE, (c) => PY_SHORT[c] ?? "\\u" + c.charCodeAt(0).toString(16).padStart(4, "0")) +
    '"';
}

/**
 * Python `json.dumps(value)` with default settings: `", "` / `": "` separators, every non-ASCII character
 * escaped as lower-case `\uXXXX` (astral characters as surrogate pairs), Python float repr.
 */
export function pyJsonDumps(value: unknown): string {
  if (value === null || value === undefined) return "null";
  switch (typeof value) {
    case "string":
      return pyStr(value);
    case "number":
      return pyFloat(value);
    case "bigint":
      return value.toString();
    case "boolean":
      return value ? "true" : "false";
    case "object": {
      const v = value as { toJSON?: () => unknown };
      if (typeof v.toJSON === "function") return pyJsonDumps(v.toJSON());
      if (Array.isArray(value)) {
        return "[" + value.map((x) => pyJsonDumps(x === undefined || typeof x === "function" ? null : x)).join(", ") +
          "]";
      }
      const parts: string[] = [];
      for (const [k, x] of Object.entries(value as Record<string, unknown>)) {
        if (
          x === undefined || typeof x === "function" || typeof x === "symbol"
        ) continue;
        parts.push(pyStr(k) + ": " + pyJsonDumps(x));
      }
      return "{" + parts.join(", ") + "}";
    }
    default:
      return "null";
  }
}

const te = new TextEncoder();
const td = new TextDecoder();

// ---------------------------------------------------------------------------------------------------------------
// Small helpers
// ---------------------------------------------------------------------------------------------------------------

type Mode = "chat" | "agent-chat" | "advanced-chat" | "workflow" | "completion";
type Endpoint = "chat" | "completion" | "workflow";
type Json = Record<string, unknown>;

const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const GENERATE_PATHS = new Set(["/chat-messages", "/completion-messages", "/workflows/run"]);

function modeForKey(key: string): Mode {
  const k = key.toLowerCase();
  if (k.includes("chatflow")) return "advanced-chat";
  if (k.includes("agent")) return "agent-chat";
  if (k.includes("workflow")) return "workflow";
  if (k.includes("completion")) return "completion";
  return "chat";
}

function isObject(v: unknown): v is Json {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Split into word deltas keeping the spaces: "Turn 1 of x" → ["Turn", " 1", " of", " x"]. */
function splitWords(s: string): string[] {
  const parts: string[] = s.match(/\s*\S+/g) ?? [];
  const used = parts.reduce((n, p) => n + p.length, 0);
  if (used < s.length) {
    if (parts.length) parts[parts.length - 1] += s.slice(used);
    else parts.push(s);
  }
  return parts;
}

function countWords(s: string): number {
  return s.split(/\s+/).filter(Boolean).length;
}

function truncateChars(s: string, n: number): string {
  if (s.length <= n) return s;
  return Array.from(s).slice(0, n).join("");
}

function nowSec(): number {
  return Math.floor(Date.now() / 1000);
}

/** werkzeug's code + description per status, for `fault:status_<code>`. */
const HTTP_ERRORS: Record<number, [string, string]> = {
  400: ["bad_request", "The browser (or proxy) sent a request that this server could not understand."],
  401: [
    "unauthorized",
    "The server could not verify that you are authorized to access the URL requested. You either supplied the wrong credentials (e.g. a bad password), or your browser doesn't understand how to supply the credentials required.",
  ],
  403: [
    "forbidden",
    "You don't have the permission to access the requested resource. It is either read-protected or not readable by the server.",
  ],
  404: [
    "not_found",
    "The requested URL was not found on the server. If you entered the URL manually please check your spelling and try again.",
  ],
  405: ["method_not_allowed", "The method is not allowed for the requested URL."],
  408: [
    "request_timeout",
    "The server closed the network connection because the browser didn't finish the request within the specified time.",
  ],
  409: [
    "conflict",
    "A conflict happened while processing the request. The resource might have been modified while the request was being processed.",
  ],
  413: ["request_entity_too_large", "The data value transmitted exceeds the capacity limit."],
  415: ["unsupported_media_type", "The server does not support the media type transmitted in the request."],
  422: ["unprocessable_entity", "The request was well-formed but was unable to be followed due to semantic errors."],
  429: ["too_many_requests", "This user has exceeded an allotted request count. Try again later."],
  500: [
    "internal_server_error",
    "The server encountered an internal error and was unable to complete your request. Either the server is overloaded or there is an error in the application.",
  ],
  501: ["not_implemented", "The server does not support the action requested by the browser."],
  502: ["bad_gateway", "The proxy server received an invalid response from an upstream server."],
  503: [
    "service_unavailable",
    "The server is temporarily unable to service your request due to maintenance downtime or capacity problems. Please try again later.",
  ],
  504: ["gateway_timeout", "The connection to an upstream server timed out."],
};

const NGINX_502 = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n" +
  "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

const NGINX_504 = "<html>\r\n<head><title>504 Gateway Time-out</title></head>\r\n<body>\r\n" +
  "<center><h1>504 Gateway Time-out</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n";

const MIDSTREAM_ERROR_MESSAGE =
  "[openai] Server Unavailable Error, Error code: 503 - {'error': {'message': 'The server is overloaded or not ready yet.', 'type': 'server_error', 'param': None, 'code': None}}";

const SSE_HEADERS = { "content-type": "text/event-stream; charset=utf-8" };
const JSON_HEADERS = { "content-type": "application/json" };

const BLOCKED_EXTENSIONS = new Set(["exe", "bat", "cmd", "com", "scr", "msi", "dll"]);

// ---------------------------------------------------------------------------------------------------------------
// Directives
// ---------------------------------------------------------------------------------------------------------------

const DIRECTIVE_RE = /\b(fixture|fault):([a-z0-9_]+)(?::(\d+))?/g;

interface Directives {
  fixture?: string;
  faults: Map<string, number | undefined>;
}

function parseDirectives(text: string): Directives {
  const d: Directives = { faults: new Map() };
  for (const m of text.matchAll(DIRECTIVE_RE)) {
    if (m[1] === "fixture") d.fixture ??= m[2];
    else if (!d.faults.has(m[2])) {
      d.faults.set(m[2], m[3] === undefined ? undefined : Number(m[3]));
    }
  }
  return d;
}

const STREAM_FAULTS = new Set([
  "midstream_error",
  "eof",
  "reset",
  "first_byte",
  "idle",
  "malformed",
  "huge_line",
  "hold",
  "slow",
  "forever",
  "workflow_no_chunks",
  "workflow_outputs_object",
  "firehose",
]);

interface Plan {
  firstByteMs?: number;
  hold: boolean;
  slowMs?: number;
  idleMs?: number;
  cut?: "eof" | "reset" | "error";
  forever: boolean;
  malformed: boolean;
  hugeLine?: number;
  workflowNoChunks: boolean;
  workflowOutputsObject: boolean;
  firehose?: number;
}

function planFrom(f: Map<string, number | undefined>): Plan {
  return {
    firstByteMs: f.has("first_byte") ? f.get("first_byte") ?? 1000 : undefined,
    hold: f.has("hold"),
    slowMs: f.has("slow") ? f.get("slow") ?? 100 : undefined,
    idleMs: f.has("idle") ? f.get("idle") ?? 1000 : undefined,
    cut: f.has("reset") ? "reset" : f.has("eof") ? "eof" : f.has("midstream_error") ? "error" : undefined,
    forever: f.has("forever"),
    malformed: f.has("malformed"),
    hugeLine: f.has("huge_line") ? f.get("huge_line") ?? 5_000_000 : undefined,
    workflowNoChunks: f.has("workflow_no_chunks"),
    workflowOutputsObject: f.has("workflow_outputs_object"),
    firehose: f.has("firehose") ? f.get("firehose") ?? 10_000_000 : undefined,
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Per-request stream context and body writer
// ---------------------------------------------------------------------------------------------------------------

type Timer = ReturnType<typeof setTimeout>;

class StreamCtx {
  aborted = false;
  stopped = false;
  readonly taskIds = new Set<string>();
  #sleepers = new Set<{ done: () => void; onStop: boolean }>();
  #abortHooks = new Set<() => void>();

  constructor(
    readonly state: State,
    readonly taskId: string,
    readonly endpoint: Endpoint | "none",
    readonly key: string,
    readonly user: string,
  ) {}

  /** Resolves after `ms`, or early when the client goes away (or, if `onStop`, when stop is called). */
  sleep(ms: number, onStop = true): Promise<void> {
    if (this.aborted || (onStop && this.stopped)) return Promise.resolve();
    return new Promise<void>((resolve) => {
      const timers = this.state.timers;
      const entry = {
        onStop,
        done: () => {
          clearTimeout(id);
          timers.delete(id);
          this.#sleepers.delete(entry);
          resolve();
        },
      };
      const id: Timer = setTimeout(entry.done, ms);
      timers.add(id);
      this.#sleepers.add(entry);
    });
  }

  onAbort(fn: () => void): () => void {
    this.#abortHooks.add(fn);
    return () => this.#abortHooks.delete(fn);
  }

  abort(): void {
    if (this.aborted) return;
    this.aborted = true;
    for (const s of [...this.#sleepers]) s.done();
    for (const fn of [...this.#abortHooks]) fn();
    this.#abortHooks.clear();
  }

  stop(): void {
    this.stopped = true;
    for (const s of [...this.#sleepers]) if (s.onStop) s.done();
  }

  /** Watch the request signal while no response has been returned yet (hold, first_byte, blocking waits). */
  watch(signal: AbortSignal): () => void {
    if (signal.aborted) {
      this.abort();
      return () => {};
    }
    const fn = () => this.abort();
    signal.addEventListener("abort", fn, { once: true });
    return () => signal.removeEventListener("abort", fn);
  }
}

class Out {
  readonly stream: ReadableStream<Uint8Array>;
  done = false;
  #ctrl!: ReadableStreamDefaultController<Uint8Array>;

  constructor(readonly ctx: StreamCtx, readonly sliceBytes: number | undefined) {
    this.stream = new ReadableStream<Uint8Array>({
      start: (c) => {
        this.#ctrl = c;
      },
      cancel: () => {
        this.done = true;
        ctx.abort();
      },
    });
    // Client gone or server closing: end the body so the connection (and server.shutdown) can finish.
    ctx.onAbort(() => this.close());
  }

  #enqueue(b: Uint8Array): boolean {
    if (this.done || this.ctx.aborted) return false;
    try {
      this.#ctrl.enqueue(b);
      this.ctx.state.bytesSent += b.length;
      return true;
    } catch {
      this.done = true;
      this.ctx.abort();
      return false;
    }
  }

  /** Write one chunk (copied, so cached fixture buffers are never handed out). False once the client is gone. */
  async write(chunk: string | Uint8Array): Promise<boolean> {
    const bytes = typeof chunk === "string" ? te.encode(chunk) : chunk;
    const n = this.sliceBytes;
    if (!n || n <= 0) return this.#enqueue(bytes.slice());
    for (let off = 0; off < bytes.length; off += n) {
      if (!this.#enqueue(bytes.slice(off, off + n))) return false;
      await this.ctx.sleep(0, false);
    }
    return !this.done && !this.ctx.aborted;
  }

  close(): void {
    if (this.done) return;
    this.done = true;
    try {
      this.#ctrl.close();
    } catch {
      // already closed or errored
    }
  }

  fail(reason: unknown): void {
    if (this.done) return;
    this.done = true;
    try {
      this.#ctrl.error(reason);
    } catch {
      // already closed or errored
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------------------------

interface Frame {
  text: string | Uint8Array;
  /** Text delta carried by this frame (message / agent_message / text_chunk / message_file-with-answer). */
  answer?: string;
  /** message_replace: the complete replacement answer. */
  replace?: string;
  /** Part of the terminal group (message_end, workflow_finished, final agent_thought). */
  terminal?: boolean;
  /** task_id found in a fixture frame. */
  taskId?: string;
}

interface Enc {
  eol: string;
  legacy: boolean;
  data(obj: unknown): string;
  ping(): string;
}

function makeEnc(legacy: boolean, crlf: boolean): Enc {
  const eol = crlf ? "\r\n" : "\n";
  return {
    eol,
    legacy,
    data: (obj) => `data: ${legacy ? pyJsonDumps(obj) : JSON.stringify(obj)}${eol}${eol}`,
    ping: () => `event: ping${eol}${eol}`,
  };
}

/** Split a fixture into Dify's per-yield frames and note the answer deltas / terminal events. */
function fixtureFrames(bytes: Uint8Array): Frame[] {
  const frames: Frame[] = [];
  let start = 0;
  for (let i = 0; i + 1 < bytes.length; i++) {
    let end = -1;
    if (bytes[i] === 0x0a && bytes[i + 1] === 0x0a) end = i + 2;
    else if (
      bytes[i] === 0x0d && bytes[i + 1] === 0x0a && bytes[i + 2] === 0x0d &&
      bytes[i + 3] === 0x0a
    ) end = i + 4;
    if (end > 0) {
      frames.push(describeFrame(bytes.subarray(start, end)));
      start = end;
      i = end - 1;
    }
  }
  if (start < bytes.length) frames.push(describeFrame(bytes.subarray(start)));
  return frames;
}

function describeFrame(bytes: Uint8Array): Frame {
  const f: Frame = { text: bytes };
  const m = /^data: ?(.*)$/m.exec(td.decode(bytes));
  if (!m) return f;
  try {
    const o = JSON.parse(m[1]);
    if (!isObject(o)) return f;
    const ev = o.event;
    if (typeof o.task_id === "string") f.taskId = o.task_id;
    if (
      (ev === "message" || ev === "agent_message" || ev === "message_file") &&
      typeof o.answer === "string"
    ) {
      f.answer = o.answer;
    } else if (
      ev === "text_chunk" && isObject(o.data) && typeof o.data.text === "string"
    ) f.answer = o.data.text;
    else if (ev === "message_replace" && typeof o.answer === "string") {
      f.replace = o.answer;
    } else if (
      ev === "message_end" || ev === "workflow_finished" || ev === "error"
    ) f.terminal = true;
  } catch {
    // not JSON: plain frame
  }
  return f;
}

/** Number of frames to send before cutting: after the n-th non-empty answer (or the last one there is). */
function cutIndex(frames: Frame[], n: number): number {
  let seen = 0;
  let lastAnswer = -1;
  for (let i = 0; i < frames.length; i++) {
    if (frames[i].answer) {
      seen++;
      lastAnswer = i;
      if (seen === n) return i + 1;
    }
  }
  if (lastAnswer >= 0) return lastAnswer + 1;
  const t = frames.findIndex((f) => f.terminal);
  return t >= 0 ? t : Math.max(0, frames.length - 1);
}

interface Gen {
  mode: Mode;
  enc: Enc;
  pingFirst: boolean;
  taskId: string;
  messageId: string;
  conversationId: string;
  createdAt: number;
  chunks: string[];
  trailingEmpty: boolean;
  answer: string;
  promptTokens: number;
  user: string;
  query: string;
  inputs: Json;
  dialogueCount: number;
  endUserId: string;
  appId: string;
  workflowId: string;
  workflowRunId: string;
  outputs: Json;
  noChunks: boolean;
}

function usageObj(prompt: number, completion: number, stopped: boolean, legacy = false): Json {
  const u: Json = {
    prompt_tokens: prompt,
    prompt_unit_price: "0",
    prompt_price_unit: "0.001",
    prompt_price: "0",
    completion_tokens: completion,
    completion_unit_price: "0",
    completion_price_unit: "0.001",
    completion_price: "0",
    total_tokens: prompt + completion,
    total_price: "0",
    currency: "USD",
    latency: 0.5,
  };
  if (!legacy) {
    u.time_to_first_token = stopped ? null : 0.1;
    u.time_to_generate = stopped ? null : 0.4;
  }
  return u;
}

const NODE_START = "1795488011234";
const NODE_LLM = "1795488025678";
const NODE_ANSWER = "answer";
const NODE_END = "1795488033333";

interface GenResult {
  frames: Frame[];
  /** Terminal frames sent when the stop endpoint ends the stream early. */
  stop: (completionTokens: number, partial: string) => Frame[];
}

function buildStream(g: Gen): GenResult {
  const { enc } = g;
  const frames: Frame[] = [];
  const chunks = g.chunks;
  const completion = chunks.filter((c) => c !== "").length;
  const usage = usageObj(g.promptTokens, completion, false, enc.legacy);
  const chatHead = () =>
    g.mode === "completion" ? { message_id: g.messageId, created_at: g.createdAt, task_id: g.taskId } : {
      conversation_id: g.conversationId,
      message_id: g.messageId,
      created_at: g.createdAt,
      task_id: g.taskId,
    };
  const chatEvent = (event: string, rest: Json) => ({ event, ...chatHead(), ...rest });
  // Legacy (<= 1.8.0) message_end: metadata holds only `usage` (no TTFT fields); chat-type apps send no `files`.
  const messageEnd = (completionTokens: number, stopped: boolean, files: unknown) => {
    const usage = usageObj(g.promptTokens, completionTokens, stopped, enc.legacy);
    if (!enc.legacy) {
      return chatEvent("message_end", {
        id: g.messageId,
        metadata: { annotation_reply: null, retriever_resources: [], usage },
        files,
      });
    }
    if (g.mode === "advanced-chat") return chatEvent("message_end", { id: g.messageId, metadata: { usage }, files });
    return chatEvent("message_end", { id: g.messageId, metadata: { usage } });
  };
  const push = (obj: unknown, extra: Partial<Frame> = {}) => frames.push({ text: enc.data(obj), ...extra });

  if (g.mode === "chat" || g.mode === "completion") {
    if (g.pingFirst) frames.push({ text: enc.ping() });
    const all = g.trailingEmpty ? [...chunks, ""] : chunks;
    for (const c of all) {
      push(chatEvent("message", { id: g.messageId, answer: c, from_variable_selector: null }), { answer: c });
    }
    push(messageEnd(completion, false, null), { terminal: true });
    return { frames, stop: (n) => [{ text: enc.data(messageEnd(n, true, null)), terminal: true }] };
  }

  if (g.mode === "agent-chat") {
    if (g.pingFirst) frames.push({ text: enc.ping() });
    const thoughtId = crypto.randomUUID();
    const thought = (text: string) =>
      chatEvent("agent_thought", {
        id: thoughtId,
        position: 1,
        thought: text,
        observation: "",
        tool: "",
        tool_labels: {},
        tool_input: "",
        message_files: [],
      });
    push(thought(""));
    const all = g.trailingEmpty ? [...chunks, ""] : chunks;
    for (const c of all) {
      push(chatEvent("agent_message", { id: g.messageId, answer: c }), { answer: c });
    }
    push(thought(g.answer), { terminal: true });
    push(messageEnd(completion, false, null), { terminal: true });
    return {
      frames,
      stop: (n, partial) => [
        { text: enc.data(thought(partial)), terminal: true },
        { text: enc.data(messageEnd(n, true, null)), terminal: true },
      ],
    };
  }

  // Workflow-based apps (advanced-chat and workflow).
  const legacy = enc.legacy;
  const isChatflow = g.mode === "advanced-chat";
  const wfEvent = (event: string, data: Json) =>
    isChatflow
      ? { event, ...chatHead(), workflow_run_id: g.workflowRunId, data }
      : { event, workflow_run_id: g.workflowRunId, task_id: g.taskId, data };
  const sysInputs: Json = {
    ...g.inputs,
    "sys.files": [],
    "sys.user_id": g.user,
    "sys.app_id": g.appId,
    "sys.workflow_id": g.workflowId,
    "sys.workflow_run_id": g.workflowRunId,
  };
  if (isChatflow) {
    sysInputs["sys.query"] = g.query;
    sysInputs["sys.dialogue_count"] = g.dialogueCount;
  }
  const parallel = { parallel_id: null, parallel_start_node_id: null, parent_parallel_id: null };
  let index = 0;
  let prev: string | null = null;
  const node = (nodeId: string, nodeType: string, title: string) => {
    const execId = crypto.randomUUID();
    const idx = legacy ? ++index : 1;
    const pred = legacy ? prev : null;
    prev = nodeId;
    const base = { id: execId, node_id: nodeId, node_type: nodeType, title, index: idx, predecessor_node_id: pred };
    const started: Json = legacy
      ? {
        ...base,
        inputs: null,
        created_at: g.createdAt,
        extras: {},
        ...parallel,
        parent_parallel_start_node_id: null,
        iteration_id: null,
        loop_id: null,
        parallel_run_id: null,
        agent_strategy: null,
      }
      : {
        ...base,
        inputs: null,
        inputs_truncated: false,
        created_at: g.createdAt,
        extras: {},
        iteration_id: null,
        loop_id: null,
        agent_strategy: null,
      };
    const finished = (inputs: Json, processData: Json, outputs: Json, execMeta: Json | null): Json =>
      legacy
        ? {
          ...base,
          inputs,
          process_data: processData,
          outputs,
          status: "succeeded",
          error: null,
          elapsed_time: 0.1,
          execution_metadata: execMeta,
          created_at: g.createdAt,
          finished_at: g.createdAt,
          files: [],
          ...parallel,
          parent_parallel_start_node_id: null,
          iteration_id: null,
          loop_id: null,
        }
        : {
          ...base,
          inputs,
          inputs_truncated: false,
          process_data: processData,
          process_data_truncated: false,
          outputs,
          outputs_truncated: false,
          status: "succeeded",
          error: null,
          elapsed_time: 0.1,
          execution_metadata: execMeta,
          created_at: g.createdAt,
          finished_at: g.createdAt,
          files: [],
          iteration_id: null,
          loop_id: null,
        };
    return { started, finished };
  };
  const workflowFinished = (status: string, outputs: Json, error: string | null, totalTokens: number) =>
    wfEvent("workflow_finished", {
      id: g.workflowRunId,
      workflow_id: g.workflowId,
      status,
      outputs,
      error,
      elapsed_time: 0.5,
      total_tokens: totalTokens,
      total_steps: 3,
      created_by: { id: g.endUserId, user: g.user },
      created_at: g.createdAt,
      finished_at: g.createdAt,
      exceptions_count: 0,
      files: [],
    });

  if (g.pingFirst || !legacy) frames.push({ text: enc.ping() });
  const startedData: Json = {
    id: g.workflowRunId,
    workflow_id: g.workflowId,
    inputs: sysInputs,
    created_at: g.createdAt,
  };
  if (!legacy) startedData.reason = "initial";
  push(wfEvent("workflow_started", startedData));
  const start = node(NODE_START, "start", "User Input");
  push(wfEvent("node_started", start.started));
  push(wfEvent("node_finished", start.finished(sysInputs, {}, sysInputs, null)));
  const llm = node(NODE_LLM, "llm", "LLM");
  push(wfEvent("node_started", llm.started));
  if (!g.noChunks) {
    const all = g.trailingEmpty ? [...chunks, ""] : chunks;
    for (const c of all) {
      if (isChatflow) {
        push(
          chatEvent("message", { id: g.messageId, answer: c, from_variable_selector: [NODE_LLM, "text"] }),
          { answer: c },
        );
      } else {
        push(wfEvent("text_chunk", { text: c, from_variable_selector: [NODE_LLM, "text"] }), { answer: c });
      }
    }
  }
  const execMeta = { total_tokens: usage.total_tokens, total_price: "0", currency: "USD" };
  push(
    wfEvent(
      "node_finished",
      llm.finished(
        {},
        { model_mode: "chat", prompts: [{ role: "user", text: g.query, files: [] }], usage, finish_reason: "stop" },
        { text: g.answer, reasoning_content: "", usage, finish_reason: "stop" },
        execMeta,
      ),
    ),
  );
  const last = isChatflow ? node(NODE_ANSWER, "answer", "Answer") : node(NODE_END, "end", "Output");
  push(wfEvent("node_started", last.started));
  push(wfEvent("node_finished", last.finished({}, {}, g.outputs, null)));
  const totalTokens = usage.total_tokens as number;
  if (isChatflow) {
    const me = { text: enc.data(messageEnd(completion, false, [])), terminal: true };
    const wf = { text: enc.data(workflowFinished("succeeded", g.outputs, null, totalTokens)), terminal: true };
    if (legacy) frames.push(wf, me);
    else frames.push(me, wf);
    return {
      frames,
      stop: (n) => [
        { text: enc.data(workflowFinished("stopped", {}, "Stopped by user.", g.promptTokens + n)), terminal: true },
        { text: enc.data(messageEnd(n, true, [])), terminal: true },
      ],
    };
  }
  push(workflowFinished("succeeded", g.outputs, null, totalTokens), { terminal: true });
  return {
    frames,
    stop: (n) => [{
      text: enc.data(workflowFinished("stopped", {}, "Stopped by user.", g.promptTokens + n)),
      terminal: true,
    }],
  };
}

/** Interleave SSE noise a robust parser must ignore; one real frame switches to CRLF endings. */
function malform(frames: Frame[]): Frame[] {
  const garbage: { text: string; prefix?: boolean }[] = [
    { text: "data: {not json\n\n" },
    { text: "id: 42\n", prefix: true },
    { text: "retry: 1000\n\n" },
    { text: ": a comment\n\n" },
    { text: "event: ping\n\n" },
    { text: "data:\n\n" },
    { text: "foo: bar\n\n" },
  ];
  const out: Frame[] = [];
  let crlfDone = false;
  let dataSeen = 0;
  let pendingPrefix = "";
  const emit = (f: Frame) => {
    let text = f.text;
    const str = typeof text === "string" ? text : td.decode(text);
    if (!crlfDone && str.startsWith("data: ") && ++dataSeen === 2) {
      text = str.replace(/\r?\n/g, "\r\n");
      crlfDone = true;
    }
    if (pendingPrefix) {
      text = pendingPrefix +
        (typeof text === "string" ? text : td.decode(text));
      pendingPrefix = "";
    }
    out.push({ ...f, text });
  };
  const addGarbage = () => {
    const g = garbage.shift();
    if (!g) return;
    if (g.prefix) pendingPrefix += g.text;
    else out.push({ text: g.text });
  };
  for (let i = 0; i < frames.length; i++) {
    if (i === frames.length - 1) {
      while (garbage.length) addGarbage();
    }
    emit(frames[i]);
    if (i < frames.length - 1) addGarbage();
  }
  if (pendingPrefix) out.push({ text: pendingPrefix + "\n" });
  return out;
}

// ---------------------------------------------------------------------------------------------------------------
// Server state
// ---------------------------------------------------------------------------------------------------------------

interface HeldEntry {
  resolve: (why: "release" | "abort" | "close") => void;
}

class State {
  requests: RecordedRequest[] = [];
  stops: { path: string; taskId: string; user: string }[] = [];
  conversations = new Map<string, FakeConversation>();
  uploads = new Map<string, FakeUpload>();
  timers = new Set<Timer>();
  streams = new Set<StreamCtx>();
  /** Running streams by task id (a fixture replay also answers to the task_id inside its bytes). */
  tasks = new Map<string, Set<StreamCtx>>();
  pumps = new Set<Promise<void>>();
  heldSet = new Set<HeldEntry>();
  ids = new Map<string, string>();
  closing = false;
  /** Bytes the firehose streams have handed over. */
  firehoseBytes = 0;

  /** Bytes every streamed answer has handed over. */
  bytesSent = 0;

  constructor(readonly opts: FakeDifyOptions) {}

  /** A stable synthetic UUID per label (app ids, workflow ids, end-user ids). */
  idFor(label: string): string {
    let id = this.ids.get(label);
    if (!id) {
      id = crypto.randomUUID();
      this.ids.set(label, id);
    }
    return id;
  }

  newCtx(taskId: string, endpoint: Endpoint | "none", key: string, user: string): StreamCtx {
    const ctx = new StreamCtx(this, taskId, endpoint, key, user);
    this.streams.add(ctx);
    if (endpoint !== "none") this.addTask(ctx, taskId);
    return ctx;
  }

  addTask(ctx: StreamCtx, taskId: string): void {
    let set = this.tasks.get(taskId);
    if (!set) this.tasks.set(taskId, set = new Set());
    set.add(ctx);
    ctx.taskIds.add(taskId);
  }

  dropCtx(ctx: StreamCtx): void {
    this.streams.delete(ctx);
    for (const id of ctx.taskIds) {
      const set = this.tasks.get(id);
      set?.delete(ctx);
      if (set && !set.size) this.tasks.delete(id);
    }
    ctx.taskIds.clear();
  }

  track(p: Promise<void>): void {
    this.pumps.add(p);
    p.finally(() => this.pumps.delete(p));
  }

  hold(ctx: StreamCtx): Promise<"release" | "abort" | "close"> {
    if (this.closing) return Promise.resolve("close");
    return new Promise((resolve) => {
      const entry: HeldEntry = {
        resolve: (why) => {
          this.heldSet.delete(entry);
          off();
          resolve(why);
        },
      };
      const off = ctx.onAbort(() => entry.resolve("abort"));
      this.heldSet.add(entry);
    });
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Responses
// ---------------------------------------------------------------------------------------------------------------

/** A complete body (sliced through a stream when sliceBytes is set). */
function bytesResponse(state: State, status: number, headers: Record<string, string>, body: Uint8Array | string) {
  const bytes = typeof body === "string" ? te.encode(body) : body.slice();
  if (status === 204 || status === 205 || status === 304) {
    return new Response(null, { status, headers });
  }
  if (!state.opts.sliceBytes) return new Response(bytes, { status, headers });
  const ctx = state.newCtx(crypto.randomUUID(), "none", "", "");
  const out = new Out(ctx, state.opts.sliceBytes);
  state.track((async () => {
    try {
      await out.write(bytes);
      out.close();
    } finally {
      state.dropCtx(ctx);
    }
  })());
  return new Response(out.stream, { status, headers });
}

async function scenario(state: State, name: string): Promise<Response> {
  const errors = await readErrorsJson();
  const sc = errors.http[name];
  if (!sc) {
    return fakeProblem(state, `unknown errors.json scenario http.${name}`);
  }
  return bytesResponse(state, sc.status, { ...JSON_HEADERS, ...(sc.headers ?? {}) }, sc.raw_modern);
}

function difyError(state: State, status: number, code: string, message: string): Response {
  return bytesResponse(state, status, JSON_HEADERS, JSON.stringify({ code, message, status }));
}

/** A test-authoring mistake (unknown fixture, unknown fault): loud 500 so the test cannot pass by accident. */
function fakeProblem(state: State, message: string): Response {
  console.error(`fake_dify: ${message}`);
  return difyError(state, 500, "fake_dify_error", message);
}

function jsonResponse(state: State, status: number, obj: unknown): Response {
  return bytesResponse(state, status, JSON_HEADERS, JSON.stringify(obj));
}

// ---------------------------------------------------------------------------------------------------------------
// Request parsing and auth
// ---------------------------------------------------------------------------------------------------------------

type AuthResult = { ok: true; key: string; mode: Mode } | {
  ok: false;
  scenario: string;
};

function bearerToken(header: string | null): string {
  if (!header) return "";
  const h = header.trim();
  const sp = h.search(/\s/);
  if (sp < 0 || h.slice(0, sp).toLowerCase() !== "bearer") return "";
  return h.slice(sp).trim();
}

function checkAuth(header: string | null): AuthResult {
  if (header === null) {
    return { ok: false, scenario: "missing_authorization_header" };
  }
  const h = header.trim();
  const sp = h.search(/\s/);
  if (sp < 0) return { ok: false, scenario: "missing_authorization_header" };
  if (h.slice(0, sp).toLowerCase() !== "bearer") {
    return { ok: false, scenario: "wrong_auth_scheme" };
  }
  const key = h.slice(sp).trim();
  switch (key) {
    case "app-bad":
      return { ok: false, scenario: "invalid_api_key" };
    case "app-gone":
      return { ok: false, scenario: "app_not_found" };
    case "app-abnormal":
      return { ok: false, scenario: "app_status_abnormal" };
    case "app-disabled":
      return { ok: false, scenario: "app_api_disabled" };
    case "app-archived":
      return { ok: false, scenario: "workspace_archived" };
  }
  if (!key.startsWith("app-") || key.length <= 4) {
    return { ok: false, scenario: "invalid_api_key" };
  }
  return { ok: true, key, mode: modeForKey(key) };
}

function isJsonType(ct: string | null): boolean {
  const mime = (ct ?? "").split(";")[0].trim().toLowerCase();
  return mime === "application/json" ||
    (mime.startsWith("application/") && mime.endsWith("+json"));
}

interface Incoming {
  req: Request;
  rec: RecordedRequest;
  raw: Uint8Array;
  form?: FormData;
}

/** Parse the JSON body the way Flask's get_json() does for Dify's decorators: 415 / 400 or the object. */
async function jsonBody(state: State, inc: Incoming): Promise<Json | Response> {
  if (!isJsonType(inc.req.headers.get("content-type"))) {
    return await scenario(state, "wrong_content_type");
  }
  if (!isObject(inc.rec.body)) {
    return await scenario(state, "invalid_json_body");
  }
  return inc.rec.body;
}

// ---------------------------------------------------------------------------------------------------------------
// Handlers
// ---------------------------------------------------------------------------------------------------------------

async function handleInfo(state: State, inc: Incoming, what: "info" | "parameters"): Promise<Response> {
  const auth = checkAuth(inc.req.headers.get("authorization"));
  if (!auth.ok) return await scenario(state, auth.scenario);
  if (what === "info") {
    return jsonResponse(state, 200, {
      name: `Fake ${auth.mode}`,
      description: "",
      tags: [],
      mode: auth.mode,
      author_name: "test",
    });
  }
  if (speechApp(auth.key)) {
    return bytesResponse(state, 200, JSON_HEADERS, await readFixture("parameters_required_speech.json"));
  }
  // Optional: a workflow app's text input is whatever the bridge is configured to fill (`input`),
  // so only the `speech` fixture above requires an input.
  const form = auth.mode === "workflow" || auth.mode === "completion"
    ? [{ paragraph: { label: "Query", variable: "query", required: false, default: "" } }]
    : [];
  return jsonResponse(state, 200, {
    opening_statement: "",
    suggested_questions: [],
    suggested_questions_after_answer: { enabled: false },
    speech_to_text: { enabled: false },
    text_to_speech: { enabled: false, voice: "", language: "", autoPlay: "disabled" },
    retriever_resource: { enabled: false },
    annotation_reply: { enabled: false },
    more_like_this: { enabled: false },
    user_input_form: form,
    sensitive_word_avoidance: { enabled: false },
    file_upload: {
      image: { enabled: true, number_limits: 3, detail: "high", transfer_methods: ["remote_url", "local_file"] },
    },
    system_parameters: {
      file_size_limit: 15,
      image_file_size_limit: 10,
      audio_file_size_limit: 50,
      video_file_size_limit: 100,
      workflow_file_upload_limit: 10,
    },
  });
}

async function handleStop(state: State, inc: Incoming, kind: Endpoint, taskId: string): Promise<Response> {
  const auth = checkAuth(inc.req.headers.get("authorization"));
  if (!auth.ok) return await scenario(state, auth.scenario);
  const body = await jsonBody(state, inc);
  if (body instanceof Response) return body;
  const user = body.user;
  if (user === undefined || user === null || user === "") {
    return await scenario(state, "missing_user");
  }
  const userStr = String(user);
  if (
    kind === "chat" &&
    !["chat", "agent-chat", "advanced-chat"].includes(auth.mode)
  ) {
    return await scenario(state, "not_chat_app");
  }
  if (kind === "completion" && auth.mode !== "completion") {
    return await scenario(state, "completion_on_non_completion_app");
  }
  if (kind === "workflow" && auth.mode !== "workflow") {
    return await scenario(state, "not_workflow_app");
  }
  state.stops.push({ path: inc.rec.path, taskId, user: userStr });
  for (const ctx of state.tasks.get(taskId) ?? []) {
    if (ctx.endpoint === kind && ctx.key === auth.key && (kind === "workflow" || ctx.user === userStr)) ctx.stop();
  }
  return jsonResponse(state, 200, { result: "success" });
}

async function handleUpload(state: State, inc: Incoming): Promise<Response> {
  const auth = checkAuth(inc.req.headers.get("authorization"));
  if (!auth.ok) return await scenario(state, auth.scenario);
  if (state.opts.refuseUploads) return await scenario(state, "upload_unsupported_type");
  const form = inc.form;
  if (!form) return await scenario(state, "upload_no_file");
  const user = form.get("user");
  const userStr = typeof user === "string" && user !== "" ? user : "DEFAULT-USER";
  const file = form.get("file");
  if (!(file instanceof File)) return await scenario(state, "upload_no_file");
  const fileCount = [...form.values()].filter((v) => v instanceof File).length;
  if (fileCount > 1) return await scenario(state, "upload_too_many_files");
  if (!file.type) return await scenario(state, "upload_unsupported_type");
  const dot = file.name.lastIndexOf(".");
  const ext = dot >= 0 ? file.name.slice(dot + 1).toLowerCase() : "";
  if (BLOCKED_EXTENSIONS.has(ext)) {
    return difyError(state, 400, "invalid_param", `File extension '.${ext}' is not allowed for security reasons`);
  }
  const limitMb = file.type.startsWith("image/")
    ? 10
    : file.type.startsWith("audio/")
    ? 50
    : file.type.startsWith("video/")
    ? 100
    : 15;
  if (file.size > limitMb * 1024 * 1024) {
    return await scenario(state, "upload_file_too_large");
  }
  const id = crypto.randomUUID();
  state.uploads.set(id, { user: userStr, filename: file.name, contentType: file.type, size: file.size, key: auth.key });
  return jsonResponse(state, 201, {
    id,
    name: file.name,
    size: file.size,
    extension: ext,
    mime_type: file.type,
    created_by: state.idFor(`user:${auth.key}:${userStr}`),
    created_at: nowSec(),
  });
}

async function handleDeleteConversation(state: State, inc: Incoming, id: string): Promise<Response> {
  const auth = checkAuth(inc.req.headers.get("authorization"));
  if (!auth.ok) return await scenario(state, auth.scenario);
  const body = await jsonBody(state, inc);
  if (body instanceof Response) return body;
  const user = typeof body.user === "string" && body.user !== "" ? body.user : "DEFAULT-USER";
  const conv = state.conversations.get(id);
  if (!conv || conv.key !== auth.key || conv.user !== user) {
    return await scenario(state, "conversation_not_exists");
  }
  state.conversations.delete(id);
  return new Response(null, { status: 204 });
}

const CHAT_MODES: Mode[] = ["chat", "agent-chat", "advanced-chat"];

async function handleGenerate(state: State, inc: Incoming, endpoint: Endpoint): Promise<Response> {
  // 1. auth, 2. JSON body, 3. user, 4. app mode, 5. schema.
  const auth = checkAuth(inc.req.headers.get("authorization"));
  if (!auth.ok) return await scenario(state, auth.scenario);
  const body = await jsonBody(state, inc);
  if (body instanceof Response) return body;
  if (body.user === undefined || body.user === null || body.user === "") {
    return await scenario(state, "missing_user");
  }
  const user = String(body.user);
  const mode = auth.mode;
  if (endpoint === "chat" && !CHAT_MODES.includes(mode)) {
    return await scenario(state, "not_chat_app");
  }
  if (endpoint === "workflow" && mode !== "workflow") {
    return await scenario(state, "not_workflow_app");
  }
  if (endpoint === "completion" && mode !== "completion") {
    return await scenario(state, "completion_on_non_completion_app");
  }
  if (!isObject(body.inputs)) {
    return await scenario(state, "inputs_missing_modern");
  }
  const inputs = body.inputs;
  const rm = body.response_mode;
  if (
    rm !== undefined && rm !== null && rm !== "blocking" && rm !== "streaming"
  ) {
    return await scenario(state, "response_mode_invalid_modern");
  }
  const streaming = rm === "streaming";

  // Directive text.
  const stringInputs = Object.values(inputs).filter((v): v is string => typeof v === "string");
  const query = typeof body.query === "string" ? body.query : "";
  let directiveText: string;
  let sourceText: string;
  if (endpoint === "chat") {
    directiveText = sourceText = query;
  } else if (endpoint === "completion") {
    const iq = typeof inputs.query === "string" ? inputs.query : "";
    directiveText = `${iq}\n${query}`;
    sourceText = iq || query || stringInputs[0] || "";
  } else {
    directiveText = stringInputs.join("\n");
    sourceText = typeof inputs.query === "string" ? inputs.query : stringInputs[0] ?? "";
  }
  const dir = parseDirectives(directiveText);

  // Synchronous HTTP faults (before any conversation/message row exists, like Dify's 429).
  for (const [name, arg] of dir.faults) {
    if (name.startsWith("http_")) return await scenario(state, name.slice(5));
    if (name.startsWith("status_")) {
      const status = Number(name.slice(7));
      if (!Number.isInteger(status) || status < 200 || status > 599) {
        return fakeProblem(state, `fault:${name}: status must be 200..599`);
      }
      const [code, message] = HTTP_ERRORS[status] ??
        ["unknown", `HTTP ${status}`];
      return difyError(state, status, code, message);
    }
    if (name === "html502" || name === "html504") {
      const page = name === "html502" ? NGINX_502 : NGINX_504;
      return bytesResponse(state, Number(name.slice(4)), { "content-type": "text/html", server: "nginx" }, page);
    }
    if (name === "json_instead") {
      return bytesResponse(state, 200, JSON_HEADERS, await loadFixture("blocking_chat.json"));
    }
    if (name === "error200") {
      return bytesResponse(state, 200, JSON_HEADERS, '{"code":"invalid_param","message":"boom","status":400}');
    }
    if (!STREAM_FAULTS.has(name)) {
      return fakeProblem(state, `unknown directive fault:${name}${arg ?? ""}`);
    }
  }

  if (mode === "agent-chat" && !streaming) {
    return await scenario(state, "agent_chat_blocking");
  }
  if (endpoint === "chat" && query === "") {
    return await scenario(state, "query_empty");
  }

  // Conversation lookup (chat family).
  let conv: FakeConversation | undefined;
  if (endpoint === "chat") {
    const raw = body.conversation_id;
    const cid = typeof raw === "string" ? raw.trim() : raw === undefined || raw === null ? "" : String(raw);
    if (cid) {
      conv = state.conversations.get(cid);
      if (!conv || conv.key !== auth.key || conv.user !== user) {
        return await scenario(state, "conversation_not_exists");
      }
    }
  }

  // Files: local_file uploads must exist and belong to this user.
  const files = Array.isArray(body.files) ? body.files : [];
  for (const f of files) {
    if (isObject(f) && f.transfer_method === "local_file") {
      const up = typeof f.upload_file_id === "string" ? state.uploads.get(f.upload_file_id) : undefined;
      if (!up || up.user !== user) {
        return difyError(state, 400, "invalid_param", "Invalid upload file");
      }
    }
  }

  // Fixture existence is checked before any state changes.
  let fixtureBytes: Uint8Array | undefined;
  let fixtureIsJson = false;
  if (dir.fixture) {
    try {
      fixtureBytes = await loadFixture(`${dir.fixture}.sse`);
    } catch {
      try {
        fixtureBytes = await loadFixture(`${dir.fixture}.json`);
        fixtureIsJson = true;
      } catch {
        return fakeProblem(state, `unknown fixture ${dir.fixture} (no .sse or .json in ${FIXTURES_DIR.href})`);
      }
    }
  }

  // Create / advance the conversation.
  let turn: FakeConversation["turns"][number] | undefined;
  let turnNo = 0;
  if (endpoint === "chat") {
    if (!conv) {
      conv = { id: crypto.randomUUID(), key: auth.key, user, turns: [] };
      state.conversations.set(conv.id, conv);
    }
    turn = { query, answer: "", inputs, files };
    conv.turns.push(turn);
    turnNo = conv.turns.length;
  }

  const plan = planFrom(dir.faults);
  const taskId = crypto.randomUUID();
  const ctx = state.newCtx(taskId, endpoint, auth.key, user);

  // Pre-response waits: hold, then first_byte.
  if (plan.hold || plan.firstByteMs !== undefined) {
    const unwatch = ctx.watch(inc.req.signal);
    try {
      if (plan.hold) {
        const why = await state.hold(ctx);
        if (why !== "release") {
          state.dropCtx(ctx);
          return difyError(state, 503, "fake_dify_closed", `held request ended: ${why}`);
        }
      }
      if (plan.firstByteMs !== undefined) {
        await ctx.sleep(plan.firstByteMs, false);
      }
    } finally {
      unwatch();
    }
    if (ctx.aborted) {
      state.dropCtx(ctx);
      return difyError(state, 503, "fake_dify_closed", "client went away");
    }
  }

  // Fixture replay.
  if (fixtureBytes) {
    if (fixtureIsJson) {
      state.dropCtx(ctx);
      if (turn) turn.answer = blockingAnswer(fixtureBytes);
      return bytesResponse(state, 200, JSON_HEADERS, fixtureBytes);
    }
    const errors = await readErrorsJson();
    const frames = fixtureFrames(fixtureBytes);
    const fixtureTask = frames.find((f) => f.taskId)?.taskId;
    if (fixtureTask) state.addTask(ctx, fixtureTask);
    return startStream(
      state,
      ctx,
      frames,
      () => [],
      plan,
      turn,
      { text: errors.stream.invoke_error?.sse ?? "", terminal: true },
    );
  }

  // Generated answer.
  let answer: string;
  if (endpoint === "chat") {
    answer = `Turn ${turnNo} of ${conv?.id.slice(0, 8)}: ${truncateChars(query, 200)}`;
  } else if (endpoint === "completion") {
    answer = `Completion: ${truncateChars(sourceText, 200)}`;
  } else answer = `Workflow: ${sourceText}`;
  const scripted = endpoint === "chat" && conv ? toolsAnswer(conv, inputs) ?? toolAnswer(conv) : undefined;
  if (scripted !== undefined) answer = scripted;
  let chunks = scripted === undefined ? splitWords(answer) : answer.match(/[\s\S]{1,3}/g) ?? [];
  let trailingEmpty = mode === "chat" || mode === "completion" ||
    mode === "agent-chat";
  if (plan.hugeLine !== undefined) {
    answer = "x".repeat(plan.hugeLine);
    chunks = [answer];
    trailingEmpty = false;
  }
  let outputs: Json = mode === "workflow" ? { result: answer } : { answer, files: [] };
  let noChunks = false;
  if (mode === "workflow" && plan.workflowOutputsObject) {
    outputs = { a: 1, b: { c: 2 } };
    noChunks = true;
  } else if (mode === "workflow" && plan.workflowNoChunks) {
    outputs = { answer };
    noChunks = true;
  }
  const promptTokens = countWords(endpoint === "chat" ? query : sourceText) +
    10;
  const messageId = crypto.randomUUID();
  const createdAt = nowSec();
  const workflowRunId = crypto.randomUUID();

  if (!streaming) {
    return await blockingResponse(state, ctx, inc.req.signal, plan, {
      mode,
      taskId,
      messageId,
      conversationId: conv?.id ?? "",
      createdAt,
      chunks: noChunks ? [] : chunks,
      answer,
      outputs,
      promptTokens,
      workflowRunId,
      workflowId: state.idFor(`workflow:${auth.key}`),
    }, turn);
  }

  const gen = buildStream({
    mode,
    enc: makeEnc(!!state.opts.legacy, !!state.opts.crlf),
    pingFirst: !!state.opts.pingFirst,
    taskId,
    messageId,
    conversationId: conv?.id ?? "",
    createdAt,
    chunks,
    trailingEmpty,
    answer,
    promptTokens,
    user,
    query: endpoint === "chat" ? query : sourceText,
    inputs,
    dialogueCount: turnNo,
    endUserId: state.idFor(`user:${auth.key}:${user}`),
    appId: state.idFor(`app:${auth.key}`),
    workflowId: state.idFor(`workflow:${auth.key}`),
    workflowRunId,
    outputs,
    noChunks,
  });
  const frames = plan.malformed ? malform(gen.frames) : gen.frames;
  const enc = makeEnc(!!state.opts.legacy, !!state.opts.crlf);
  const errHead: Json = mode === "workflow"
    ? { event: "error", workflow_run_id: workflowRunId }
    : mode === "completion"
    ? { event: "error", message_id: messageId, created_at: createdAt }
    : { event: "error", conversation_id: conv?.id ?? "", message_id: messageId, created_at: createdAt };
  const errorFrame: Frame = {
    text: enc.data({ ...errHead, code: "completion_request_error", status: 400, message: MIDSTREAM_ERROR_MESSAGE }),
    terminal: true,
  };
  if (plan.forever) return startForever(state, ctx, enc);
  if (plan.firehose !== undefined) {
    const head = { conversation_id: conv?.id ?? "", message_id: messageId, created_at: createdAt, task_id: taskId };
    return startFirehose(state, ctx, enc, head, plan.firehose);
  }
  return startStream(state, ctx, frames, gen.stop, plan, turn, errorFrame);
}

function blockingAnswer(bytes: Uint8Array): string {
  try {
    const o = JSON.parse(td.decode(bytes));
    return isObject(o) && typeof o.answer === "string" ? o.answer : "";
  } catch {
    return "";
  }
}

interface BlockingSpec {
  mode: Mode;
  taskId: string;
  messageId: string;
  conversationId: string;
  createdAt: number;
  chunks: string[];
  answer: string;
  outputs: Json;
  promptTokens: number;
  workflowRunId: string;
  workflowId: string;
}

async function blockingResponse(
  state: State,
  ctx: StreamCtx,
  signal: AbortSignal,
  plan: Plan,
  b: BlockingSpec,
  turn: FakeConversation["turns"][number] | undefined,
): Promise<Response> {
  let answer = b.answer;
  let sent = b.chunks.filter((c) => c !== "").length;
  const needsWait = plan.slowMs !== undefined || plan.idleMs !== undefined ||
    plan.forever;
  if (needsWait) {
    const unwatch = ctx.watch(signal);
    try {
      if (plan.idleMs !== undefined) await ctx.sleep(plan.idleMs);
      if (plan.forever) {
        await new Promise<void>((resolve) => {
          const tick = () => {
            if (ctx.aborted || ctx.stopped) resolve();
            else ctx.sleep(50).then(tick);
          };
          tick();
        });
        answer = "";
        sent = 0;
      } else if (plan.slowMs !== undefined) {
        let acc = "";
        let n = 0;
        for (const c of b.chunks) {
          await ctx.sleep(plan.slowMs);
          if (ctx.aborted || ctx.stopped) break;
          acc += c;
          if (c) n++;
        }
        if (ctx.stopped) {
          answer = acc;
          sent = n;
        }
      }
    } finally {
      unwatch();
    }
  }
  state.dropCtx(ctx);
  if (ctx.aborted) {
    return difyError(state, 503, "fake_dify_closed", "client went away");
  }
  if (turn) turn.answer = answer;
  if (plan.cut === "error") {
    return difyError(state, 400, "completion_request_error", MIDSTREAM_ERROR_MESSAGE);
  }
  const usage = usageObj(b.promptTokens, sent, ctx.stopped);
  let obj: Json;
  if (b.mode === "workflow") {
    obj = {
      task_id: b.taskId,
      workflow_run_id: b.workflowRunId,
      data: {
        id: b.workflowRunId,
        workflow_id: b.workflowId,
        status: ctx.stopped ? "stopped" : "succeeded",
        outputs: ctx.stopped ? {} : b.outputs,
        error: ctx.stopped ? "Stopped by user." : null,
        elapsed_time: 0.5,
        total_tokens: usage.total_tokens,
        total_steps: 3,
        created_at: b.createdAt,
        finished_at: b.createdAt,
      },
    };
  } else {
    obj = { event: "message", task_id: b.taskId, id: b.messageId, message_id: b.messageId };
    if (b.mode !== "completion") obj.conversation_id = b.conversationId;
    obj.mode = b.mode;
    obj.answer = answer;
    obj.metadata = { annotation_reply: null, retriever_resources: [], usage };
    obj.created_at = b.createdAt;
  }
  const bytes = te.encode(pyJsonDumps(obj));
  if (plan.cut === "eof" || plan.cut === "reset") {
    const cutCtx = state.newCtx(crypto.randomUUID(), "none", "", "");
    const out = new Out(cutCtx, state.opts.sliceBytes);
    state.track((async () => {
      try {
        await out.write(bytes.subarray(0, Math.floor(bytes.length / 2)));
        if (plan.cut === "reset") {
          out.fail("fake_dify: fault:reset (intentional connection reset)");
        } else out.close();
      } finally {
        state.dropCtx(cutCtx);
      }
    })());
    return new Response(out.stream, { status: 200, headers: JSON_HEADERS });
  }
  return bytesResponse(state, 200, JSON_HEADERS, bytes);
}

/**
 * Runs `write` as a tracked background task feeding `out`, and answers with its stream. A failure
 * breaks the client's body (as a dying Dify would) and is printed, so a test never hangs silently.
 */
function runStream(state: State, ctx: StreamCtx, out: Out, what: string, write: () => Promise<void>): Response {
  state.track((async () => {
    try {
      await write();
    } catch (e) {
      console.error(`fake_dify: ${what} failed`, e);
      out.fail(e);
    } finally {
      state.dropCtx(ctx);
    }
  })());
  return new Response(out.stream, { status: 200, headers: SSE_HEADERS });
}

function startForever(state: State, ctx: StreamCtx, enc: Enc): Response {
  const out = new Out(ctx, state.opts.sliceBytes);
  return runStream(state, ctx, out, "forever stream", async () => {
    while (!ctx.aborted && !ctx.stopped && !state.closing) {
      if (!(await out.write(enc.ping()))) break;
      await ctx.sleep(50);
    }
    out.close();
  });
}

/** A pull-driven answer: each frame is made when the bridge reads, so what it took is what it asked for. */
function startFirehose(state: State, ctx: StreamCtx, enc: Enc, head: Json, bytes: number): Response {
  const delta = "x".repeat(1000);
  let sent = 0;
  const stream = new ReadableStream<Uint8Array>({
    pull(c) {
      if (ctx.aborted || ctx.stopped || state.closing || sent >= bytes) {
        c.enqueue(te.encode(enc.data({ event: "message_end", ...(head as Record<string, Json>), metadata: {} })));
        state.dropCtx(ctx);
        return c.close();
      }
      const chunk = te.encode(enc.data({ event: "message", ...(head as Record<string, Json>), answer: delta }));
      sent += delta.length;
      state.firehoseBytes += chunk.length;
      c.enqueue(chunk);
    },
    cancel() {
      ctx.abort();
      state.dropCtx(ctx);
    },
  }, { highWaterMark: 0 });
  return new Response(stream, { status: 200, headers: SSE_HEADERS });
}

function startStream(
  state: State,
  ctx: StreamCtx,
  frames: Frame[],
  stopFrames: (completionTokens: number, partial: string) => Frame[],
  plan: Plan,
  turn: FakeConversation["turns"][number] | undefined,
  errorFrame: Frame,
): Response {
  const out = new Out(ctx, state.opts.sliceBytes);
  const cutAt = plan.cut ? cutIndex(frames, 3) : -1;
  const idleAt = plan.idleMs !== undefined ? cutIndex(frames, 2) : -1;
  let sentAnswers = 0;
  let partial = "";
  const write = async (f: Frame): Promise<boolean> => {
    if (f.replace !== undefined) partial = f.replace;
    if (f.answer) {
      sentAnswers++;
      partial += f.answer;
    }
    if (turn) turn.answer = partial;
    return await out.write(f.text);
  };
  return runStream(state, ctx, out, "stream", async () => {
    for (let i = 0;; i++) {
      if (i === cutAt) {
        if (plan.cut === "error") await write(errorFrame);
        if (plan.cut === "reset") {
          out.fail("fake_dify: fault:reset (intentional connection reset)");
        } else out.close();
        return;
      }
      if (i >= frames.length) break;
      const delay = i === idleAt ? plan.idleMs ?? 0 : plan.slowMs && i > 0 ? plan.slowMs : 0;
      if (delay > 0) await ctx.sleep(delay);
      if (ctx.aborted) return;
      if (ctx.stopped) {
        for (const f of stopFrames(sentAnswers, partial)) {
          if (!(await write(f))) return;
        }
        break;
      }
      if (!(await write(frames[i]))) return;
    }
    out.close();
  });
}

// ---------------------------------------------------------------------------------------------------------------
// Router
// ---------------------------------------------------------------------------------------------------------------

async function readIncoming(req: Request, url: URL, path: string): Promise<Incoming> {
  const raw = req.body ? new Uint8Array(await req.arrayBuffer()) : new Uint8Array(0);
  const ct = req.headers.get("content-type") ?? "";
  const headers: Record<string, string> = {};
  req.headers.forEach((v, k) => headers[k.toLowerCase()] = v);
  const rec: RecordedRequest = {
    method: req.method,
    path,
    search: url.search.startsWith("?") ? url.search.slice(1) : url.search,
    headers,
    key: bearerToken(req.headers.get("authorization")),
    body: null,
    rawBody: "",
  };
  const inc: Incoming = { req, rec, raw };
  if (ct.toLowerCase().startsWith("multipart/form-data")) {
    try {
      const form = await new Response(raw, { headers: { "content-type": ct } })
        .formData();
      inc.form = form;
      const file = form.get("file");
      const user = form.get("user");
      const bytes = file instanceof File ? new Uint8Array(await file.arrayBuffer()) : new Uint8Array(0);
      rec.body = {
        user: typeof user === "string" ? user : "",
        filename: file instanceof File ? file.name : "",
        contentType: file instanceof File ? file.type : "",
        size: bytes.length,
        bytes,
      };
    } catch {
      rec.body = null;
    }
  } else if (raw.length) {
    rec.rawBody = td.decode(raw);
    try {
      rec.body = JSON.parse(rec.rawBody);
    } catch {
      rec.body = null;
    }
  }
  return inc;
}

type Run = (s: State, inc: Incoming) => Promise<Response>;

function route(method: string, path: string): { allow: string[]; run?: Run } {
  const one = (want: string, run: Run) => ({ allow: [want], run: method === want ? run : undefined });
  if (path === "/info") return one("GET", (s, i) => handleInfo(s, i, "info"));
  if (path === "/parameters") {
    return one("GET", (s, i) => handleInfo(s, i, "parameters"));
  }
  if (path === "/chat-messages") {
    return one("POST", (s, i) => handleGenerate(s, i, "chat"));
  }
  if (path === "/completion-messages") {
    return one("POST", (s, i) => handleGenerate(s, i, "completion"));
  }
  if (path === "/workflows/run") {
    return one("POST", (s, i) => handleGenerate(s, i, "workflow"));
  }
  if (path === "/files/upload") return one("POST", handleUpload);
  if (/^\/workflows\/[0-9a-f-]{36}\/run$/i.test(path)) {
    return one("POST", (s, i) => handleGenerate(s, i, "workflow"));
  }
  if (path === "/audio-to-text") return one("POST", handleAudioToText);
  if (path === "/text-to-audio") return one("POST", handleTextToAudio);
  const stops: [RegExp, Endpoint][] = [
    [/^\/chat-messages\/([^/]+)\/stop$/, "chat"],
    [/^\/completion-messages\/([^/]+)\/stop$/, "completion"],
    [/^\/workflows\/tasks\/([^/]+)\/stop$/, "workflow"],
  ];
  for (const [re, kind] of stops) {
    const m = path.match(re);
    if (m) {
      const taskId = decodeURIComponent(m[1]);
      return one("POST", (s, i) => handleStop(s, i, kind, taskId));
    }
  }
  const conv = path.match(/^\/conversations\/([^/]+)$/);
  if (conv && UUID_RE.test(conv[1])) {
    const id = conv[1];
    return one("DELETE", (s, i) => handleDeleteConversation(s, i, id));
  }
  return { allow: [] };
}

/** `opts.script`'s answer to a run request, as an event stream. */
function scriptedAnswer(state: State, inc: Incoming, path: string): Response {
  const out = state.opts.script!(path, isObject(inc.rec.body) ? inc.rec.body : {}, inc.rec.key);
  const frames = typeof out === "string" ? [out] : out.map((e) => `data: ${JSON.stringify(e)}\n\n`);
  const pace = state.opts.scriptPaceMs;
  if (!pace) return bytesResponse(state, 200, SSE_HEADERS, frames.join(""));
  const ctx = state.newCtx(crypto.randomUUID(), "none", inc.rec.key, "");
  const body = new Out(ctx, state.opts.sliceBytes);
  state.track((async () => {
    try {
      for (const frame of frames) {
        if (!await body.write(frame)) break;
        await ctx.sleep(pace, false);
      }
      body.close();
    } finally {
      state.dropCtx(ctx);
    }
  })());
  return new Response(body.stream, { headers: SSE_HEADERS });
}

async function handle(state: State, req: Request): Promise<Response> {
  const url = new URL(req.url);
  const p = url.pathname;
  const underV1 = p === "/v1" || p.startsWith("/v1/");
  const path = underV1 ? p.slice(3) || "/" : p;
  const inc = await readIncoming(req, url, path);
  state.requests.push(inc.rec);
  if (state.closing) {
    return difyError(state, 503, "fake_dify_closed", "fake Dify is shutting down");
  }
  if (state.opts.script && req.method === "POST" && GENERATE_PATHS.has(path)) return scriptedAnswer(state, inc, path);
  const r = underV1 ? route(req.method, path) : { allow: [] };
  if (r.run) return await r.run(state, inc);
  if (r.allow.length) {
    const res = await scenario(state, "method_not_allowed");
    res.headers.set("allow", [...r.allow, "OPTIONS"].join(", "));
    return res;
  }
  return await scenario(state, "route_not_found");
}

// ---------------------------------------------------------------------------------------------------------------
// Entry point
// ---------------------------------------------------------------------------------------------------------------

/** Start a fake Dify on 127.0.0.1 with a random port. */
export async function startFakeDify(opts: FakeDifyOptions = {}): Promise<FakeDify> {
  await readErrorsJson(); // fail fast if the fixtures are missing
  const state = new State(opts);
  const server = Deno.serve(
    { port: 0, hostname: "127.0.0.1", onListen() {} },
    async (req) => {
      try {
        return await handle(state, req);
      } catch (e) {
        console.error("fake_dify: handler failed", e);
        try {
          return await scenario(state, "internal_server_error");
        } catch {
          return new Response("internal error", { status: 500 });
        }
      }
    },
  );
  const origin = `http://127.0.0.1:${server.addr.port}`;
  let closed: Promise<void> | undefined;
  return {
    url: `${origin}/v1`,
    origin,
    requests: state.requests,
    stops: state.stops,
    conversations: state.conversations,
    uploads: state.uploads,
    lastBody(path?: string) {
      for (let i = state.requests.length - 1; i >= 0; i--) {
        const r = state.requests[i];
        if (
          path === undefined ? r.method === "POST" && GENERATE_PATHS.has(r.path) : r.path === path
        ) return r.body;
      }
      return undefined;
    },
    generateBodies() {
      return state.requests.filter((r) => r.method === "POST" && GENERATE_PATHS.has(r.path)).map((r) => r.body);
    },
    forgetAll() {
      state.conversations.clear();
    },
    release() {
      for (const h of [...state.heldSet]) h.resolve("release");
    },
    held() {
      return state.heldSet.size;
    },
    bytesSent() {
      return state.bytesSent;
    },
    firehoseBytes() {
      return state.firehoseBytes;
    },
    reset() {
      state.requests.length = 0;
      state.stops.length = 0;
    },
    close() {
      closed ??= (async () => {
        state.closing = true;
        for (const h of [...state.heldSet]) h.resolve("close");
        for (const ctx of [...state.streams]) ctx.abort();
        await Promise.allSettled([...state.pumps]);
        for (const t of state.timers) clearTimeout(t);
        state.timers.clear();
        await server.shutdown();
      })();
      return closed;
    },
  };
}

// ---------------------------------------------------------------------------------------------------------------
// Speech: /audio-to-text and /text-to-audio, and /parameters with a required input
// ---------------------------------------------------------------------------------------------------------------

/**
 * A key containing `speech` is an app with speech-to-text and text-to-speech on, whose `/parameters`
 * is `parameters_required_speech.json` (a chatflow requiring the input `city`). Any other app has speech off.
 */
function speechApp(key: string): boolean {
  return key.toLowerCase().includes("speech");
}

/** Part types Dify's speech-to-text takes (it checks the part's Content-Type, not the file name). */
const AUDIO_TYPES = new Set(["audio/mp3", "audio/m4a", "audio/x-m4a", "audio/wav", "audio/amr", "audio/mpga"]);

async function handleAudioToText(state: State, inc: Incoming): Promise<Response> {
  const auth = checkAuth(inc.req.headers.get("authorization"));
  if (!auth.ok) return await scenario(state, auth.scenario);
  const file = inc.form?.get("file");
  if (!(file instanceof File)) {
    return difyError(
      state,
      400,
      "bad_request",
      "The browser (or proxy) sent a request that this server could not understand.",
    );
  }
  if (!speechApp(auth.key)) return await scenario(state, "audio_speech_to_text_disabled");
  if (!AUDIO_TYPES.has(file.type)) return await scenario(state, "audio_unsupported_type");
  if (file.size > 30 * 1024 * 1024) return await scenario(state, "audio_too_large");
  return bytesResponse(state, 200, JSON_HEADERS, await readFixture("audio_to_text.json"));
}

/** The MP3 bytes Dify streamed as `tts_message` audio in `tts_autoplay.sse`, one chunk per frame. */
export async function ttsAudioChunks(): Promise<Uint8Array[]> {
  const text = td.decode(await readFixture("tts_autoplay.sse"));
  const chunks: Uint8Array[] = [];
  for (const line of text.split("\n")) {
    if (!line.startsWith("data: ")) continue;
    const ev = JSON.parse(line.slice(6));
    if (ev.event !== "tts_message" || !ev.audio) continue;
    chunks.push(Uint8Array.from(atob(ev.audio), (c) => c.charCodeAt(0)));
  }
  return chunks;
}

async function handleTextToAudio(state: State, inc: Incoming): Promise<Response> {
  const auth = checkAuth(inc.req.headers.get("authorization"));
  if (!auth.ok) return await scenario(state, auth.scenario);
  const body = await jsonBody(state, inc);
  if (body instanceof Response) return body;
  if (!speechApp(auth.key)) return await scenario(state, "audio_tts_not_enabled");
  if (!body.text && !body.message_id) return difyError(state, 400, "invalid_param", "Text is required");
  // A streaming TTS provider: chunked audio/mpeg, one write per audio chunk.
  const chunks = await ttsAudioChunks();
  const stream = new ReadableStream<Uint8Array>({
    pull(c) {
      const next = chunks.shift();
      if (next) c.enqueue(next);
      else c.close();
    },
  });
  return new Response(stream, { status: 200, headers: { "content-type": "audio/mpeg" } });
}

// ---------------------------------------------------------------------------------------------------------------
// Tool calls: an LLM node told of the client's tools (the bridge's TOOLS=emulate)
// ---------------------------------------------------------------------------------------------------------------

const TOOLS_DIRECTIVE = /\btools:([a-z_]+)(?::(\d+))?/;

/**
 * The answer of a conversation that carries `tools:<script>[:<n>]` in any of its queries, or undefined.
 * The function called is the first in the `tools` input (a JSON list of {name, …}); `arguments` is
 * `{"step": k}`, k = the tool results the conversation has had + 1.
 *   follow[:n]     calls until the conversation has had n results (default 1), then `Done after <k> results: <last>`
 *   text_then_call `Let me check. ` and a call          two     two calls (steps k and k+1)
 *   half           `Checking <tool_ca` (half a tag)       badjson a call whose JSON does not parse
 *   unknown        a call of `no_such_tool`               unclosed a whole call without `</tool_call>`
 */
function toolsAnswer(conv: FakeConversation, inputs: Json): string | undefined {
  const queries = conv.turns.map((t) => t.query);
  const found = queries.map((q) => TOOLS_DIRECTIVE.exec(q)).find(Boolean);
  if (!found) return undefined;
  let name = "none_offered";
  try {
    const tools = JSON.parse(String(inputs.tools ?? "[]"));
    if (Array.isArray(tools) && typeof tools[0]?.name === "string") name = tools[0].name;
  } catch { /* no tools input: the call names none_offered */ }
  const results = queries.flatMap((q) =>
    [...q.matchAll(/<tool_response>(\{[\s\S]*?)<\/tool_response>/g)].map((m) => m[1])
  );
  const call = (fn: string, step: number) =>
    `<tool_call>\n${pyJsonDumps({ name: fn, arguments: { step } })}\n</tool_call>`;
  const step = results.length + 1;
  switch (found[1]) {
    case "follow": {
      if (results.length < Number(found[2] ?? 1)) return call(name, step);
      let last = results.at(-1) ?? "";
      try {
        last = String(JSON.parse(last).content);
      } catch { /* not JSON: as it came */ }
      return `Done after ${results.length} results: ${last}`;
    }
    case "text_then_call":
      return `Let me check. ${call(name, step)}`;
    case "two":
      return `${call(name, step)}\n${call(name, step + 1)}`;
    case "half":
      return "Checking <tool_ca";
    case "badjson":
      return `<tool_call>{"name": "${name}", "arguments": {</tool_call>`;
    case "unknown":
      return call("no_such_tool", step);
    case "unclosed":
      return `<tool_call>${pyJsonDumps({ name, arguments: { step } })}`;
    default:
      return `unknown tools script ${found[1]}`;
  }
}

const TOOL_DIRECTIVE = /\btool:([A-Za-z0-9_.-]+):([A-Za-z0-9_-]+)/;

/**
 * The answer of a conversation that carries `tool:<name>:<base64url JSON args>` in any of its queries, or undefined:
 * a real client's real tool (OpenClaw's `read`, Codex's `shell`) with the arguments it takes. Until a
 * `<tool_response>` came back, one call of that tool; to a query with results, `Tool said: <the last result's
 * content, first 200 chars>`; later turns get the generated answer.
 */
function toolAnswer(conv: FakeConversation): string | undefined {
  const queries = conv.turns.map((t) => t.query);
  const found = queries.map((q) => TOOL_DIRECTIVE.exec(q)).find(Boolean);
  if (!found) return undefined;
  const resultsIn = (q: string) => [...q.matchAll(/<tool_response>(\{[\s\S]*?)<\/tool_response>/g)].map((m) => m[1]);
  const last = resultsIn(queries.at(-1) ?? "").at(-1);
  if (last === undefined) {
    if (queries.some((q) => resultsIn(q).length > 0)) return undefined;
    let args: unknown;
    try {
      args = JSON.parse(new TextDecoder().decode(base64UrlBytes(found[2])));
    } catch {
      return `tool directive: arguments are not base64url JSON: ${found[2]}`;
    }
    return `<tool_call>\n${pyJsonDumps({ name: found[1], arguments: args })}\n</tool_call>`;
  }
  let content = last;
  try {
    const parsed = JSON.parse(last).content;
    content = typeof parsed === "string" ? parsed : JSON.stringify(parsed);
  } catch { /* not JSON: as it came */ }
  return `Tool said: ${content.slice(0, 200)}`;
}

/** base64url (with or without padding) → bytes. */
function base64UrlBytes(text: string): Uint8Array {
  const b64 = text.replaceAll("-", "+").replaceAll("_", "/");
  return Uint8Array.from(atob(b64 + "=".repeat((4 - b64.length % 4) % 4)), (c) => c.charCodeAt(0));
}

/** The `tool:` directive that makes the fake LLM call `name` with `args` (for tests and real-client runs). */
export function toolDirective(name: string, args: Record<string, unknown>): string {
  const b64 = btoa(String.fromCharCode(...new TextEncoder().encode(JSON.stringify(args))));
  return `tool:${name}:${b64.replaceAll("+", "-").replaceAll("/", "_").replace(/=+$/, "")}`;
}
