/**
 * dify-openai — any Dify app (chatbot, agent, chatflow, workflow, completion) behind the OpenAI API: chat
 * completions, Responses, models and audio. One file, web-standard APIs only; runs on Deno 2.9 (`deno run main.ts`,
 * Deno Deploy, a gist URL) and on Bun 1.x (`bun main.ts`).
 *
 * The file reads the way a request flows, one banner per section; nothing is used above its definition except
 * across the runtime fence: the code above "Runtime edges" never names Deno or Bun and gets what differs through
 * `Deps` (`createServer`'s argument), so it is also a library (`createServer(config, deps)` → a fetch handler).
 *
 *   1. Configuration
 *   2. Errors
 *   3. Request parsing
 *   4. OpenClaw envelope
 *   5. Turn building
 *   6. Conversation store
 *   7. Dify client
 *   8. Event translation
 *   9. Server-sent event lines
 *   10. Reading Dify: the watchdog and the event reader
 *   11. Output formats
 *   12. Streaming an answer
 *   13. HTTP plumbing: bodies, responses, client keys
 *   14. Metrics
 *   15. The bridge: routes, and one answer from request to record
 *   16. Runtime edges: Deno or Bun
 *   17. main
 */

import { createHash } from "node:crypto";

// ─── Configuration ──────────────────────────────────────────────────────────────────────────────

export type AppType = "chat" | "agent" | "chatflow" | "workflow" | "completion";
const APP_TYPES: readonly AppType[] = ["chat", "agent", "chatflow", "workflow", "completion"];

/** `ignore`: tools are not offered to the app; `emulate`: offered in the `<tool_call>` format; `reject`: a 400. */
type ToolMode = "ignore" | "emulate" | "reject";
/** One Dify app, served as one OpenAI model id. */
export interface AppConfig {
  model: string;
  /** The app's Dify key; absent when clients bring their own (`Bearer app-…`). */
  key?: string;
  /** Known type, or undefined to ask Dify's `GET /info` once. */
  type?: AppType;
  /** Dify API base for this app, without a trailing slash. */
  url: string;
  /** Workflow apps: the input variable that receives the user's text. */
  input: string;
  /** Workflow apps: the output variable that holds the answer. */
  output?: string;
  /** Chatflow and workflow apps: the published workflow version to run (Dify's `workflow_id`); absent: the latest. */
  workflowId?: string;
  /** False: Dify does not name new conversations (naming costs one extra LLM call per conversation). */
  autoGenerateName?: boolean;
  /** What the client's `tools` mean for this app (`"tools"` in DIFY_APPS); absent: TOOLS. */
  tools?: ToolMode;
}

const TOOL_MODES: readonly ToolMode[] = ["ignore", "emulate", "reject"];

export interface Config {
  port: number;
  difyUrl: string;
  /** Model id → app. With `DIFY_APPS` set, a model must match one of these exactly. */
  apps: Map<string, AppConfig>;
  /** Only `DIFY_API_KEY` (or nothing) configured: every model name goes to this app. */
  catchAll?: AppConfig;
  proxyKeys: string[];
  /** `GET /metrics` is served (METRICS=on, the default). */
  metrics: boolean;
  /** The one key `GET /metrics` takes (METRICS_KEY); unset: the keys of every route. */
  metricsKey?: string;
  kvPath: string;
  bodyLimit: number;
  bodyTimeoutMs: number;
  maxMessages: number;
  maxParts: number;
  conversationMode: "history" | "user" | "off";
  systemPrompt: "prepend" | "inputs" | "drop";
  reasoning: "reasoning_content" | "think" | "off";
  reasoningNodes: boolean;
  envelope: "clean" | "keep";
  logContent: boolean;
  conversationTtlMs: number;
  keepaliveMs: number;
  upstreamTimeoutMs: number;
  upstreamIdleMs: number;
  /** Bounds one answer's text (content and reasoning, UTF-8): Dify or a man in the middle may never stop. */
  maxAnswerBytes: number;
  answerTimeoutMs: number;
  maxConcurrentStreams: number;
  shutdownGraceMs: number;
  /** Closes a connection that sends no request for this long, or never finishes one's head (0: never). */
  idleConnectionMs: number;
  defaultUser: string;
  /** Dify names each new conversation with one extra LLM call unless false (`AUTO_GENERATE_NAME`; per app too). */
  autoGenerateName: boolean;
  /** `DELETE /v1/conversations/{user}` also deletes the user's conversation at Dify (else only with `?dify=true`). */
  forgetAtDify: boolean;
  /** What the client's `tools` mean for apps that do not say (`TOOLS`). */
  tools: ToolMode;
}

/** A configuration mistake: start-up prints its message as one line and exits. */
export class ConfigError extends Error {}

type Env = Record<string, string | undefined>;

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function choice<T extends string>(env: Env, name: string, options: readonly T[], fallback: T): T {
  const raw = env[name]?.trim();
  if (!raw) return fallback;
  if ((options as readonly string[]).includes(raw)) return raw as T;
  throw new ConfigError(`${name} must be one of ${options.join(", ")} (got "${raw}")`);
}

function number(env: Env, name: string, fallback: number, min = 0): number {
  const raw = env[name]?.trim();
  if (!raw) return fallback;
  const value = Number(raw);
  if (!Number.isFinite(value) || value < min) {
    throw new ConfigError(`${name} must be a number ≥ ${min} (got "${raw}")`);
  }
  return value;
}

function flag(env: Env, name: string): boolean {
  return /^(1|true|yes|on)$/i.test(env[name]?.trim() ?? "");
}

/** A switch whose default is on: only an explicit yes or no is accepted. */
function toggle(env: Env, name: string, fallback: boolean): boolean {
  const raw = env[name]?.trim();
  if (!raw) return fallback;
  if (/^(1|true|yes|on)$/i.test(raw)) return true;
  if (/^(0|false|no|off)$/i.test(raw)) return false;
  throw new ConfigError(`${name} must be true or false (got "${raw}")`);
}

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

/** Dify's API base: a valid http(s) URL without a trailing slash or `/chat-messages`. */
export function difyBase(raw: string, name = "DIFY_API_URL"): string {
  let url: URL;
  try {
    url = new URL(raw.trim());
  } catch {
    throw new ConfigError(`${name} is not a URL: "${raw}"`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new ConfigError(`${name} must be an http(s) URL (got "${raw}")`);
  }
  return url.href.replace(/\/+$/, "").replace(/\/chat-messages$/, "");
}

function parseApps(raw: string, difyUrl: string): Map<string, AppConfig> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(raw);
  } catch (e) {
    throw new ConfigError(`DIFY_APPS is not valid JSON: ${(e as Error).message}`);
  }
  if (!isObject(parsed)) throw new ConfigError(`DIFY_APPS must be a JSON object: model id → app`);
  const apps = new Map<string, AppConfig>();
  for (const [model, spec] of Object.entries(parsed)) {
    const where = `DIFY_APPS["${model}"]`;
    const app: AppConfig = { model, url: difyUrl, input: "query" };
    if (typeof spec === "string") app.key = spec;
    else if (isObject(spec)) {
      if (spec.key !== undefined && typeof spec.key !== "string") {
        throw new ConfigError(`${where}.key must be a string`);
      }
      app.key = spec.key as string | undefined;
      if (spec.type !== undefined) {
        if (!APP_TYPES.includes(spec.type as AppType)) {
          throw new ConfigError(`${where}.type must be one of ${APP_TYPES.join(", ")}`);
        }
        app.type = spec.type as AppType;
      }
      if (spec.url !== undefined) app.url = difyBase(String(spec.url), `${where}.url`);
      if (typeof spec.input === "string") app.input = spec.input;
      if (typeof spec.output === "string") app.output = spec.output;
      if (spec.workflow_id !== undefined) {
        if (typeof spec.workflow_id !== "string" || !UUID.test(spec.workflow_id)) {
          throw new ConfigError(`${where}.workflow_id must be a workflow version id (a UUID)`);
        }
        app.workflowId = spec.workflow_id;
      }
      if (spec.auto_generate_name !== undefined) {
        if (typeof spec.auto_generate_name !== "boolean") {
          throw new ConfigError(`${where}.auto_generate_name must be true or false`);
        }
        app.autoGenerateName = spec.auto_generate_name;
      }
      if (spec.tools !== undefined) {
        if (!TOOL_MODES.includes(spec.tools as ToolMode)) {
          throw new ConfigError(`${where}.tools must be one of ${TOOL_MODES.join(", ")}`);
        }
        app.tools = spec.tools as ToolMode;
      }
    } else throw new ConfigError(`${where} must be a key string or {"key", "type"?, "url"?}`);
    apps.set(model, app);
  }
  return apps;
}

/** Builds the configuration from the environment; throws ConfigError with a one-line message. */
export function loadConfig(env: Env): Config {
  const difyUrl = difyBase(env.DIFY_API_URL?.trim() || "https://api.dify.ai/v1");
  const defaultModel = env.DIFY_MODEL?.trim() || "dify";
  const defaultKey = env.DIFY_API_KEY?.trim() || undefined;
  const apps = env.DIFY_APPS?.trim() ? parseApps(env.DIFY_APPS, difyUrl) : new Map();
  const defaultApp: AppConfig = { model: defaultModel, key: defaultKey, url: difyUrl, input: "query" };
  if (apps.size && defaultKey && !apps.has(defaultModel)) apps.set(defaultModel, defaultApp);
  const autoGenerateName = toggle(env, "AUTO_GENERATE_NAME", true);
  // Only "off" is written into the apps: on is Dify's default, and an app's own setting wins.
  if (!autoGenerateName) { for (const app of [...apps.values(), defaultApp]) app.autoGenerateName ??= false; }
  const seconds = (name: string, fallback: number) => number(env, name, fallback) * 1000;
  return {
    port: number(env, "PORT", 8000),
    difyUrl,
    apps,
    catchAll: apps.size ? undefined : defaultApp,
    proxyKeys: (env.PROXY_API_KEYS ?? "").split(",").map((k) => k.trim()).filter(Boolean),
    metrics: choice(env, "METRICS", ["on", "off"], "on") === "on",
    metricsKey: env.METRICS_KEY?.trim() || undefined,
    kvPath: env.KV_PATH?.trim() || "./data/dify-openai.kv",
    bodyLimit: number(env, "MAX_BODY_BYTES", 20 * 1024 * 1024, 1),
    bodyTimeoutMs: seconds("BODY_TIMEOUT_SECONDS", 30),
    maxMessages: number(env, "MAX_MESSAGES", 5000, 1),
    maxParts: number(env, "MAX_CONTENT_PARTS", 1000, 1),
    conversationMode: choice(env, "CONVERSATION_MODE", ["history", "user", "off"], "history"),
    systemPrompt: choice(env, "SYSTEM_PROMPT", ["prepend", "inputs", "drop"], "prepend"),
    reasoning: choice(env, "REASONING", ["reasoning_content", "think", "off"], "reasoning_content"),
    reasoningNodes: flag(env, "REASONING_NODES"),
    envelope: choice(env, "ENVELOPE", ["clean", "keep"], "clean"),
    logContent: flag(env, "LOG_CONTENT"),
    conversationTtlMs: number(env, "CONVERSATION_TTL", 30, 0) * 86_400_000,
    keepaliveMs: seconds("KEEPALIVE_SECONDS", 15),
    upstreamTimeoutMs: seconds("UPSTREAM_TIMEOUT_SECONDS", 120),
    upstreamIdleMs: seconds("UPSTREAM_IDLE_SECONDS", 300),
    maxAnswerBytes: number(env, "MAX_ANSWER_BYTES", 8 * 1024 * 1024, 1),
    // Dify's own limit on one run (APP_MAX_EXECUTION_TIME) defaults to 1200 s.
    answerTimeoutMs: seconds("ANSWER_TIMEOUT_SECONDS", 1200),
    maxConcurrentStreams: number(env, "MAX_CONCURRENT_STREAMS", 4096, 1),
    shutdownGraceMs: seconds("SHUTDOWN_GRACE_SECONDS", 10),
    idleConnectionMs: seconds("IDLE_CONNECTION_SECONDS", 60),
    defaultUser: env.DEFAULT_USER?.trim() || "dify-openai",
    autoGenerateName,
    forgetAtDify: flag(env, "FORGET_AT_DIFY"),
    tools: choice(env, "TOOLS", TOOL_MODES, "ignore"),
  };
}

// ─── Errors ─────────────────────────────────────────────────────────────────────────────────────

/** An error the client sees as OpenAI's `{"error": {message, type, param, code}}` with `status`. */
export class ApiError extends Error {
  constructor(
    public status: number,
    message: string,
    public type: string,
    public code: string | null,
    public param: string | null = null,
    public headers: Record<string, string> = {},
  ) {
    super(message);
  }
}

/**
 * Every error a client can see, by name: HTTP status and OpenAI error type. The name is the error's
 * `code`, except where Dify's own code is passed on (`more.code`).
 */
export const ERRORS = {
  // The request
  invalid_request: [400, "invalid_request_error"],
  invalid_json: [400, "invalid_request_error"],
  invalid_encoding: [400, "invalid_request_error"],
  too_many_parts: [400, "invalid_request_error"],
  unsupported_parameter: [400, "invalid_request_error"],
  missing_input: [400, "invalid_request_error"],
  speech_disabled: [400, "invalid_request_error"],
  tools_unsupported: [400, "invalid_request_error"],
  not_found: [404, "invalid_request_error"],
  model_not_found: [404, "invalid_request_error"],
  method_not_allowed: [405, "invalid_request_error"],
  request_timeout: [408, "invalid_request_error"],
  request_too_large: [413, "invalid_request_error"],
  // Keys
  invalid_api_key: [401, "authentication_error"],
  missing_dify_key: [401, "authentication_error"],
  // Conversations
  conversation_not_found: [404, "not_found_error"],
  response_not_found: [404, "not_found_error"],
  // The bridge itself
  client_closed: [499, "client_error"],
  client_stalled: [499, "client_error"],
  internal_error: [500, "server_error"],
  overloaded: [503, "server_error"],
  shutting_down: [503, "server_error"],
  // Dify said no (Dify's code is passed on): a fault retrying cannot fix stays a 4xx
  dify_invalid_request: [400, "invalid_request_error"],
  dify_unauthorized: [401, "authentication_error"],
  dify_forbidden: [403, "permission_error"],
  dify_too_large: [413, "invalid_request_error"],
  dify_rate_limited: [429, "rate_limit_error"],
  workflow_failed: [400, "invalid_request_error"],
  // Dify failed, or could not be reached
  upstream_error: [502, "upstream_error"],
  dify_key_rejected: [502, "upstream_error"],
  dify_not_found: [502, "upstream_error"],
  bad_upstream_response: [502, "upstream_error"],
  upstream_unreachable: [502, "upstream_error"],
  upstream_broken: [502, "upstream_error"],
  incomplete_stream: [502, "upstream_error"],
  answer_too_large: [502, "upstream_error"],
  answer_timeout: [504, "upstream_error"],
  upstream_timeout: [504, "upstream_error"],
  upstream_gateway_timeout: [504, "upstream_error"],
  upstream_idle_timeout: [504, "upstream_error"],
} as const satisfies Record<string, readonly [number, string]>;

export type ErrorName = keyof typeof ERRORS;

/** The catalogue's error `name`, with this occurrence's message (and param, Dify's code, headers). */
export function apiError(
  name: ErrorName,
  message: string,
  more: { param?: string | null; code?: string; headers?: Record<string, string> } = {},
): ApiError {
  const [status, type] = ERRORS[name];
  return new ApiError(status, message, type, more.code ?? name, more.param ?? null, more.headers);
}

/** The commonest error: the request is wrong; `param` names the field. */
const badRequest = (message: string, param: string | null = null, name: ErrorName = "invalid_request") =>
  apiError(name, message, { param });

export function errorJson(e: ApiError): string {
  return JSON.stringify({ error: { message: e.message, type: e.type, param: e.param, code: e.code } });
}

// ─── Request parsing ────────────────────────────────────────────────────────────────────────────

type DifyFileType = "image" | "document" | "audio" | "video" | "custom";

/** A file the user attached, before it reaches Dify. */
type InputFile =
  | { kind: "remote"; url: string; type: DifyFileType }
  | { kind: "upload"; bytes: Uint8Array; filename: string; mime: string; type: DifyFileType };

/** One call of a client's function: the assistant's in the history, or one the bridge found in an answer. */
export interface ToolCall {
  id: string;
  name: string;
  /** The arguments as a JSON text, as OpenAI sends them. */
  arguments: string;
}

/** One OpenAI message reduced to what the bridge uses: role, text, and attachments. */
export interface Message {
  role: "system" | "user" | "assistant" | "tool";
  text: string;
  files: InputFile[];
  /** An assistant message's tool calls (also in `text`, as the fingerprint sees them). */
  calls?: ToolCall[];
  /** A tool result: the call it answers (`tool_call_id`, `call_id`). */
  callId?: string;
}

/** A function the client offers in `tools`, as the Dify app is told of it. */
interface ToolSpec {
  name: string;
  description?: string;
  parameters?: unknown;
}

/** The request's tools: the functions, whether the answer must call one, and whether it may call several. */
export interface ToolAsk {
  tools: ToolSpec[];
  choice: "none" | "auto" | "required" | { name: string };
  parallel: boolean;
}

interface ChatRequest {
  model: string;
  messages: Message[];
  stream: boolean;
  includeUsage: boolean;
  user?: string;
  conversationId?: string;
  sessionId?: string;
  /** Responses API: the response this one continues (`previous_response_id`). */
  previousResponseId?: string;
  inputs: Record<string, unknown>;
  /** Functions the client offers, or a `tool_choice` that needs one; absent: neither. */
  tools?: ToolAsk;
}

const ROLES: Record<string, Message["role"]> = {
  system: "system",
  developer: "system",
  user: "user",
  assistant: "assistant",
  tool: "tool",
  function: "tool",
};

const FILE_TYPES: [DifyFileType, RegExp][] = [
  ["image", /\.(png|jpe?g|gif|webp|svg|bmp|heic)$/i],
  ["document", /\.(txt|md|mdx|markdown|pdf|html?|xlsx?|docx?|csv|eml|msg|pptx?|xml|epub|json|properties)$/i],
  ["audio", /\.(mp3|m4a|wav|amr|mpga|ogg|flac|aac)$/i],
  ["video", /\.(mp4|mov|mpeg|mpg|webm|avi|mkv)$/i],
];

/** Dify's file type for a file name (or a MIME type when the name says nothing). */
export function difyFileType(filename: string, mime = ""): DifyFileType {
  for (const [type, pattern] of FILE_TYPES) if (pattern.test(filename)) return type;
  const major = mime.split("/")[0];
  if (major === "image" || major === "audio" || major === "video") return major;
  if (mime === "application/pdf" || major === "text") return "document";
  return "custom";
}

const MIME_EXT: Record<string, string> = {
  "image/png": "png",
  "image/jpeg": "jpg",
  "image/gif": "gif",
  "image/webp": "webp",
  "application/pdf": "pdf",
  "text/plain": "txt",
};

const EXT_MIME: Record<string, string> = {
  ...Object.fromEntries(Object.entries(MIME_EXT).map(([mime, ext]) => [ext, mime])),
  jpeg: "image/jpeg",
  md: "text/markdown",
  csv: "text/csv",
  json: "application/json",
  html: "text/html",
  mp3: "audio/mpeg",
  wav: "audio/wav",
  mp4: "video/mp4",
  docx: "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
  xlsx: "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
};

/** A MIME type for a bare base64 file, from its name: Dify refuses a part without one. */
function mimeOf(filename: string): string {
  const ext = filename.slice(filename.lastIndexOf(".") + 1).toLowerCase();
  return (Object.hasOwn(EXT_MIME, ext) && EXT_MIME[ext]) || "application/octet-stream";
}

function decodeBase64(data: string, param: string): Uint8Array {
  try {
    const bin = atob(data.replace(/\s+/g, ""));
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return bytes;
  } catch {
    throw badRequest("file data is not valid base64", param);
  }
}

/** `data:<mime>;base64,<data>` → bytes and MIME type. */
function parseDataUrl(url: string, param: string): { bytes: Uint8Array; mime: string } {
  const match = /^data:([^;,]*)(;[^,]*)?,(.*)$/s.exec(url);
  if (!match || !/;base64/i.test(match[2] ?? "")) {
    throw badRequest("data: URLs must be base64-encoded (data:<mime>;base64,…)", param);
  }
  return { bytes: decodeBase64(match[3], param), mime: match[1] || "application/octet-stream" };
}

function imageFile(url: unknown, param: string): InputFile {
  if (typeof url !== "string" || !url) throw badRequest("image_url.url must be a string", param);
  if (/^https?:\/\//i.test(url)) return { kind: "remote", url, type: "image" };
  if (url.startsWith("data:")) {
    const { bytes, mime } = parseDataUrl(url, param);
    return { kind: "upload", bytes, mime, filename: `image.${MIME_EXT[mime] ?? "png"}`, type: "image" };
  }
  throw badRequest("image_url.url must be an http(s) or data: URL", param);
}

function attachedFile(part: Record<string, unknown>, param: string): InputFile {
  const spec = isObject(part.file) ? part.file : part;
  const filename = typeof spec.filename === "string" && spec.filename ? spec.filename : "file";
  const data = spec.file_data;
  if (typeof data !== "string" || !data) {
    if (typeof spec.file_url === "string" && /^https?:\/\//i.test(spec.file_url)) {
      return { kind: "remote", url: spec.file_url, type: difyFileType(filename) };
    }
    throw badRequest("file parts need file_data (base64) and a filename", param);
  }
  const { bytes, mime } = data.startsWith("data:")
    ? parseDataUrl(data, param)
    : { bytes: decodeBase64(data, param), mime: "" };
  return {
    kind: "upload",
    bytes,
    mime: mime || mimeOf(filename),
    filename,
    type: difyFileType(filename, mime),
  };
}

/** A client's value in an error message: short, whatever its size or shape. */
function preview(v: unknown): string {
  let text: string;
  try {
    text = JSON.stringify(v) ?? String(v);
  } catch {
    text = Array.isArray(v) ? "[…]" : "{…}";
  }
  return text.length > 100 ? `${text.slice(0, 100)}…` : text;
}

const unsupported = (field: string, why: string) =>
  apiError("unsupported_parameter", `\`${field}\` is not supported: ${why}`, { param: field });

/** Text and files of one message's `content` (a string, null, or an array of parts). */
function parseContent(content: unknown, param: string, maxParts: number): { text: string; files: InputFile[] } {
  if (content === null || content === undefined) return { text: "", files: [] };
  if (typeof content === "string") return { text: content, files: [] };
  if (!Array.isArray(content)) throw badRequest("content must be a string or an array of parts", param);
  if (content.length > maxParts) {
    throw badRequest(`content has ${content.length} parts; the limit is ${maxParts}`, param, "too_many_parts");
  }
  const texts: string[] = [];
  const files: InputFile[] = [];
  content.forEach((part, i) => {
    const at = `${param}[${i}]`;
    if (!isObject(part)) throw badRequest("each content part must be an object", at);
    switch (part.type) {
      case "text":
      case "input_text":
      case "output_text":
      case "refusal": {
        const text = part.text ?? part.refusal;
        if (typeof text !== "string") throw badRequest("text parts need a string `text`", at);
        texts.push(text);
        break;
      }
      case "image_url":
      case "input_image":
        files.push(imageFile(isObject(part.image_url) ? part.image_url.url : part.image_url, at));
        break;
      case "file":
      case "input_file":
        files.push(attachedFile(part, at));
        break;
      default:
        throw badRequest(`unsupported content part type ${preview(part.type)}`, `${at}.type`);
    }
  });
  return { text: texts.join("\n\n"), files };
}

/** A client's value as text: `String()` throws on `{"toString": 1}` and on arrays nested 10,000 deep. */
function valueText(v: unknown): string {
  if (typeof v === "string") return v;
  try {
    return JSON.stringify(v) ?? "";
  } catch {
    return "";
  }
}

/** Assistant tool calls as text, so replayed history keeps what the tools were asked. */
function toolCallsText(calls: unknown): string {
  if (!Array.isArray(calls)) return "";
  return calls.map((c) => {
    const fn = isObject(c) && isObject(c.function) ? c.function : {};
    return `[called tool ${valueText(fn.name ?? "?")}(${valueText(fn.arguments ?? "")})]`;
  }).join("\n");
}

/**
 * An assistant message as the fingerprint sees it: its text, then its calls. The bridge records its
 * own answers the same way, so the client's echo of an answer that called tools continues the chat.
 */
export function answerText(content: string, calls: ToolCall[] = []): string {
  return [content, toolCallsText(calls.map((c) => ({ function: c })))].filter(Boolean).join("\n");
}

/** The well-formed calls of a chat message's `tool_calls` (the text keeps them all). */
function toolCallsOf(raw: unknown): ToolCall[] {
  if (!Array.isArray(raw)) return [];
  return raw.flatMap((c) => {
    const fn = isObject(c) && isObject(c.function) ? c.function : undefined;
    if (!fn || typeof fn.name !== "string") return [];
    return [{ id: typeof c.id === "string" ? c.id : "", name: fn.name, arguments: valueText(fn.arguments ?? "") }];
  });
}

/** The function tools of a `tools` array (chat: `{type, function: {…}}`; Responses: flat); other tool types are left out. */
function toolSpecs(raw: unknown, flat: boolean): ToolSpec[] {
  if (raw === undefined || raw === null) return [];
  if (!Array.isArray(raw)) throw badRequest("`tools` must be an array", "tools");
  return raw.flatMap((tool, i) => {
    if (!isObject(tool)) throw badRequest("each tool must be an object", `tools[${i}]`);
    // Hosted tools (web_search, namespace, custom, mcp…) are the client's or OpenAI's business, not the app's.
    if (tool.type !== "function") return [];
    const fn = flat ? tool : tool.function;
    if (!isObject(fn) || typeof fn.name !== "string" || !fn.name.trim()) {
      throw badRequest(
        "a function tool needs a string `name`",
        flat ? `tools[${i}].name` : `tools[${i}].function.name`,
      );
    }
    const spec: ToolSpec = { name: fn.name };
    if (typeof fn.description === "string" && fn.description) spec.description = fn.description;
    if (fn.parameters !== undefined && fn.parameters !== null) spec.parameters = fn.parameters;
    return [spec];
  });
}

/** `tool_choice` (chat: `{type: "function", function: {name}}`; Responses: `{type: "function", name}`). */
function toolChoice(raw: unknown, flat: boolean): ToolAsk["choice"] {
  if (raw === undefined || raw === null) return "auto";
  if (raw === "none" || raw === "auto" || raw === "required") return raw;
  if (!isObject(raw)) throw badRequest('`tool_choice` must be "none", "auto", "required" or an object', "tool_choice");
  if (raw.type === "auto" || raw.type === "none" || raw.type === "required") return raw.type;
  if (raw.type === "function") {
    const name = flat ? raw.name : isObject(raw.function) ? raw.function.name : undefined;
    if (typeof name !== "string") throw badRequest("`tool_choice` names no function", "tool_choice");
    return { name };
  }
  if (raw.type === "allowed_tools") {
    const mode = raw.mode ?? (isObject(raw.allowed_tools) ? raw.allowed_tools.mode : undefined);
    return mode === "required" ? "required" : "auto";
  }
  throw unsupported("tool_choice", `a Dify app cannot be made to use the tool type ${preview(raw.type)}`);
}

/** The request's tools, or undefined when it offers no function and needs none. */
function toolAsk(body: Record<string, unknown>, flat: boolean): ToolAsk | undefined {
  const tools = toolSpecs(body.tools, flat);
  const choice = toolChoice(body.tool_choice, flat);
  const parallel = body.parallel_tool_calls;
  if (parallel !== undefined && parallel !== null && typeof parallel !== "boolean") {
    throw badRequest("`parallel_tool_calls` must be a boolean", "parallel_tool_calls");
  }
  if (typeof choice === "object" && !tools.some((t) => t.name === choice.name)) {
    throw badRequest(
      `\`tool_choice\` names ${preview(choice.name)}, which is not among the function tools`,
      "tool_choice",
    );
  }
  if (!tools.length && (choice === "auto" || choice === "none")) return undefined;
  return { tools, choice, parallel: parallel !== false };
}

/**
 * The tools this app is asked to call (TOOLS=emulate and a choice other than none), or undefined.
 * Where the app cannot give what the client needs, a 400: a forced call without emulation, any tools with reject.
 */
export function offeredTools(ask: ToolAsk | undefined, mode: ToolMode, model: string): ToolAsk | undefined {
  if (!ask) return undefined;
  if (mode === "reject" && ask.tools.length) {
    const message = `model ${model} does not call tools (TOOLS=reject): send the request without \`tools\``;
    throw apiError("tools_unsupported", message, { param: "tools" });
  }
  const forced = ask.choice === "required" || typeof ask.choice === "object";
  if (mode !== "emulate") {
    if (!forced) return undefined;
    throw apiError(
      "tools_unsupported",
      `model ${model} answers in text and does not call tools (TOOLS=${mode}): leave out \`tool_choice\` or send "auto"`,
      { param: "tool_choice" },
    );
  }
  if (!ask.tools.length && forced) throw badRequest("`tool_choice` needs function `tools`", "tool_choice");
  return ask.choice === "none" || !ask.tools.length ? undefined : ask;
}

function optionalString(body: Record<string, unknown>, name: string): string | undefined {
  const v = body[name];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "string") throw badRequest(`\`${name}\` must be a string`, name);
  return v;
}

/**
 * OpenAI fields whose caller depends on what Dify cannot do: a 400 naming the field, never an answer
 * of another shape. Fields that only tune generation (temperature, seed, …) are accepted and ignored.
 */
function refuseUnsupported(body: Record<string, unknown>): void {
  const refuse = (field: string, why: string) =>
    apiError("unsupported_parameter", `\`${field}\` is not supported: ${why}`, { param: field });
  if (body.n !== undefined && body.n !== null && body.n !== 1) {
    throw refuse("n", "a Dify app gives one answer per request (send n=1 or leave it out)");
  }
  if (body.logprobs === true) throw refuse("logprobs", "Dify does not report token log probabilities");
  if (typeof body.top_logprobs === "number" && body.top_logprobs > 0) {
    throw refuse("top_logprobs", "Dify does not report token log probabilities");
  }
  if (Array.isArray(body.modalities) && body.modalities.includes("audio")) {
    throw refuse("modalities", "a Dify app answers in text; POST /v1/audio/speech turns text into speech");
  }
  if (body.audio !== undefined && body.audio !== null) {
    throw refuse("audio", "a Dify app answers in text; POST /v1/audio/speech turns text into speech");
  }
  const format = body.response_format;
  if (format === undefined || format === null) return;
  const type = isObject(format) ? format.type : undefined;
  if (type === "json_object" || type === "json_schema") {
    throw refuse(
      "response_format",
      `a Dify app's answer cannot be held to ${type}; ask for JSON in the prompt or in the app, without response_format`,
    );
  }
  if (type !== "text") {
    throw badRequest('`response_format.type` must be "text", "json_object" or "json_schema"', "response_format");
  }
}

/** Every request body is a JSON object naming a model. */
function checkModel(body: unknown): asserts body is Record<string, unknown> & { model: string } {
  if (!isObject(body)) throw badRequest("the request body must be a JSON object");
  if (typeof body.model !== "string" || !body.model.trim()) {
    throw badRequest("`model` must be a non-empty string", "model");
  }
}

/**
 * OpenClaw's `x-session-affinity`: its session id, which may carry a trailing `:N` counter. Only a
 * counter after a UUID is stripped: `chat:42` is a whole id, and cutting it would merge chats.
 */
const AFFINITY_COUNTER = new RegExp(`^(${UUID.source.slice(1, -1)}):\\d+$`, "i");

/**
 * The client's name for this chat, from the headers and fields clients send it in. Never
 * `x-client-request-id`: in OpenAI's API that is a per-request id and would split every chat.
 */
function sessionIdOf(body: Record<string, unknown>, headers: Headers): string | undefined {
  const affinity = headers.get("x-session-affinity")?.trim();
  const clientMetadata = isObject(body.client_metadata) ? body.client_metadata : {};
  const metadata = isObject(body.metadata) ? body.metadata : {};
  const id = headers.get("x-session-id") || headers.get("session-id") || headers.get("session_id") ||
    headers.get("thread-id") || (affinity && (AFFINITY_COUNTER.exec(affinity)?.[1] ?? affinity)) ||
    (typeof clientMetadata.session_id === "string" ? clientMetadata.session_id : undefined) ||
    optionalString(body, "prompt_cache_key") || headers.get("x-openwebui-chat-id") ||
    (typeof metadata.chat_id === "string" ? metadata.chat_id : undefined);
  return id?.trim() || undefined;
}

/** Validates an OpenAI chat completion body; throws ApiError 400 naming the bad field. */
export function parseChatRequest(
  body: unknown,
  headers: Headers,
  limits: { maxMessages: number; maxParts: number },
): ChatRequest {
  checkModel(body);
  const model = body.model;
  if (!Array.isArray(body.messages) || body.messages.length === 0) {
    throw badRequest("`messages` must be a non-empty array", "messages");
  }
  if (body.messages.length > limits.maxMessages) {
    throw badRequest(`too many messages (${body.messages.length}; the limit is ${limits.maxMessages})`, "messages");
  }
  if (body.stream !== undefined && body.stream !== null && typeof body.stream !== "boolean") {
    throw badRequest("`stream` must be a boolean", "stream");
  }
  refuseUnsupported(body);
  const streamOptions = body.stream_options;
  if (streamOptions !== undefined && streamOptions !== null && !isObject(streamOptions)) {
    throw badRequest("`stream_options` must be an object", "stream_options");
  }
  const messages = body.messages.map((m, i): Message => {
    const param = `messages[${i}]`;
    if (!isObject(m)) throw badRequest("each message must be an object", param);
    // Own keys only: "constructor" or "toString" must not find Object.prototype's members.
    const role = typeof m.role === "string" && Object.hasOwn(ROLES, m.role) ? ROLES[m.role] : undefined;
    if (!role) throw badRequest(`unknown role ${preview(m.role)}`, `${param}.role`);
    const { text, files } = parseContent(m.content, `${param}.content`, limits.maxParts);
    if (role === "assistant" && m.tool_calls !== undefined) {
      const calls = toolCallsOf(m.tool_calls);
      return { role, text: [text, toolCallsText(m.tool_calls)].filter(Boolean).join("\n"), files, calls };
    }
    if (role === "tool" && typeof m.tool_call_id === "string") return { role, text, files, callId: m.tool_call_id };
    return { role, text, files };
  });
  if (!messages.some((m) => m.role === "user")) throw badRequest("`messages` has no user message", "messages");
  const inputs = body.inputs;
  if (inputs !== undefined && inputs !== null && !isObject(inputs)) {
    throw badRequest("`inputs` must be an object of Dify input variables", "inputs");
  }
  return {
    model,
    messages,
    stream: body.stream === true,
    includeUsage: isObject(streamOptions) && streamOptions.include_usage === true,
    // `safety_identifier` is OpenAI's successor to `user`: the same end-user id.
    user: optionalString(body, "user") || optionalString(body, "safety_identifier") || undefined,
    conversationId: optionalString(body, "conversation_id") || headers.get("x-dify-conversation-id") || undefined,
    sessionId: sessionIdOf(body, headers),
    inputs: (inputs as Record<string, unknown> | undefined) ?? {},
    tools: toolAsk(body, false),
  };
}

/** An audio file a client sent for transcription. */
interface AudioFile {
  bytes: Uint8Array;
  filename: string;
  mime: string;
}

/** `POST /v1/audio/transcriptions` (OpenAI's multipart form) reduced to what Dify's speech-to-text takes. */
interface TranscriptionRequest {
  model: string;
  file: AudioFile;
  /** `json` answers `{"text"}`, `text` the bare text. */
  format: "json" | "text";
  user?: string;
}

function formText(form: FormData, name: string): string | undefined {
  const v = form.get(name);
  return typeof v === "string" && v.trim() ? v.trim() : undefined;
}

/** Validates a transcription form; `language`, `prompt`, `temperature` are accepted and ignored (Dify has no use for them). */
export async function parseTranscriptionForm(form: FormData): Promise<TranscriptionRequest> {
  const model = formText(form, "model");
  if (!model) throw badRequest("`model` must be a non-empty string", "model");
  const file = form.get("file");
  if (!(file instanceof File)) throw badRequest("`file` must be an audio file part", "file");
  if (!file.size) throw badRequest("`file` is empty", "file");
  const format = formText(form, "response_format") ?? "json";
  if (format !== "json" && format !== "text") {
    throw apiError(
      "unsupported_parameter",
      `\`response_format\` ${
        preview(format)
      } is not supported: Dify's speech-to-text gives plain text (json or text), without timings`,
      { param: "response_format" },
    );
  }
  if (/^(true|1)$/i.test(formText(form, "stream") ?? "")) {
    throw apiError("unsupported_parameter", "`stream` is not supported: Dify's speech-to-text answers once", {
      param: "stream",
    });
  }
  if ([...form.getAll("include[]"), ...form.getAll("include")].includes("logprobs")) {
    throw apiError("unsupported_parameter", "`include` logprobs is not supported: Dify reports no log probabilities", {
      param: "include",
    });
  }
  const bytes = new Uint8Array(await file.arrayBuffer());
  return {
    model,
    file: { bytes, filename: file.name || "audio", mime: file.type },
    format,
    user: formText(form, "user"),
  };
}

/** `POST /v1/audio/speech` reduced to what Dify's text-to-speech takes. */
interface SpeechRequest {
  model: string;
  input: string;
  voice?: string;
  user?: string;
}

const SPEECH_FORMATS = ["mp3", "opus", "aac", "flac", "wav", "pcm"];

/**
 * Validates a speech request. Dify's model picks the audio format (the response says which), so a
 * container format is accepted whatever it names; raw `pcm` is refused: Dify's audio always has a container.
 */
export function parseSpeechRequest(body: unknown): SpeechRequest {
  if (!isObject(body)) throw badRequest("the request body must be a JSON object");
  const model = body.model;
  if (typeof model !== "string" || !model.trim()) throw badRequest("`model` must be a non-empty string", "model");
  const input = body.input;
  if (typeof input !== "string" || !input.trim()) throw badRequest("`input` must be a non-empty string", "input");
  const rawVoice = body.voice;
  const voice = typeof rawVoice === "string" ? rawVoice : isObject(rawVoice) ? rawVoice.id : undefined;
  if (rawVoice !== undefined && rawVoice !== null && typeof voice !== "string") {
    throw badRequest('`voice` must be a voice name or {"id": …}', "voice");
  }
  const format = optionalString(body, "response_format");
  if (format !== undefined && !SPEECH_FORMATS.includes(format)) {
    throw badRequest(`\`response_format\` must be one of ${SPEECH_FORMATS.join(", ")}`, "response_format");
  }
  if (format === "pcm") {
    throw apiError(
      "unsupported_parameter",
      "`response_format` pcm is not supported: Dify's speech comes in a container",
      {
        param: "response_format",
      },
    );
  }
  if (body.stream_format === "sse") {
    throw apiError("unsupported_parameter", "`stream_format` sse is not supported: the audio is streamed as it is", {
      param: "stream_format",
    });
  }
  return {
    model,
    input,
    voice: (typeof voice === "string" ? voice.trim() : "") || undefined,
    user: optionalString(body, "user") || optionalString(body, "safety_identifier") || undefined,
  };
}

/** The request's settings as every `response` object repeats them. */
export interface ResponseEcho {
  instructions: string | null;
  max_output_tokens: number | null;
  metadata: Record<string, unknown>;
  parallel_tool_calls: boolean;
  previous_response_id: string | null;
  prompt_cache_key: string | null;
  reasoning: Record<string, unknown>;
  safety_identifier: string | null;
  store: boolean;
  temperature: number;
  text: Record<string, unknown>;
  tool_choice: unknown;
  tools: unknown[];
  top_p: number;
  truncation: string;
  user: string | null;
}

/** A Responses request: the shared chat request, plus what the response object and its chain need. */
interface ResponsesRequest extends ChatRequest {
  /** False: the client keeps the history itself (Codex sends `store: false` and resends it all). */
  store: boolean;
  /** Request fields the `response` object echoes back, with OpenAI's documented defaults filled in. */
  echo: ResponseEcho;
}

/** Codex's per-turn `<environment_context>` (cwd, shell, date): for its local agent, not the user's question. */
const ENVIRONMENT_CONTEXT = /^\s*<environment_context>[\s\S]*<\/environment_context>\s*$/;

/** Optional fields of a Responses body that must have a type when present. */
function checkTypes(body: Record<string, unknown>): void {
  const kinds: [string, string][] = [
    ["stream", "boolean"],
    ["store", "boolean"],
    ["parallel_tool_calls", "boolean"],
    ["temperature", "number"],
    ["top_p", "number"],
    ["max_output_tokens", "number"],
  ];
  for (const [name, kind] of kinds) {
    const v = body[name];
    if (v !== undefined && v !== null && typeof v !== kind) throw badRequest(`\`${name}\` must be a ${kind}`, name);
  }
  for (const name of ["instructions", "previous_response_id", "user", "safety_identifier", "prompt_cache_key"]) {
    optionalString(body, name);
  }
  for (const name of ["metadata", "reasoning", "text", "client_metadata", "stream_options", "inputs"]) {
    const v = body[name];
    if (v !== undefined && v !== null && !isObject(v)) throw badRequest(`\`${name}\` must be an object`, name);
  }
  for (const name of ["tools", "include"]) {
    const v = body[name];
    if (v !== undefined && v !== null && !Array.isArray(v)) throw badRequest(`\`${name}\` must be an array`, name);
  }
}

/**
 * Responses fields whose caller depends on what a Dify app cannot do: a 400 naming the field.
 * Everything else (tools of any type, `include`, `reasoning`, sampling settings) is accepted.
 */
function refuseResponsesUnsupported(body: Record<string, unknown>): void {
  if (body.background === true) {
    throw unsupported("background", "answers are streamed or returned directly (leave out background or send false)");
  }
  if (body.n !== undefined && body.n !== null && body.n !== 1) {
    throw unsupported("n", "a Dify app gives one answer per request");
  }
  if (body.conversation !== undefined && body.conversation !== null) {
    throw unsupported("conversation", "use previous_response_id, or resend the history");
  }
  if (body.prompt !== undefined && body.prompt !== null) {
    throw unsupported("prompt", "OpenAI's stored prompt templates do not exist here; the Dify app holds the prompt");
  }
  const format = isObject(body.text) && isObject(body.text.format) ? body.text.format : undefined;
  if (format?.type === "json_schema" || format?.type === "json_object") {
    throw unsupported(
      "text.format",
      `a Dify app's answer cannot be held to ${format.type}; ask for JSON in the prompt or in the app`,
    );
  }
  if (typeof body.top_logprobs === "number" && body.top_logprobs > 0) {
    throw unsupported("top_logprobs", "Dify does not report token log probabilities");
  }
}

/** One Responses input item as a message, or null for an item that adds nothing to the chat. */
function inputItem(item: unknown, param: string, maxParts: number): Message | null {
  if (!isObject(item)) throw badRequest("each input item must be an object", param);
  const type = item.type ?? "message";
  switch (type) {
    case "message": {
      const role = typeof item.role === "string" && Object.hasOwn(ROLES, item.role) ? ROLES[item.role] : undefined;
      if (!role || role === "tool") throw badRequest(`unknown role ${preview(item.role)}`, `${param}.role`);
      const { text, files } = parseContent(item.content, `${param}.content`, maxParts);
      if (role === "user" && !files.length && ENVIRONMENT_CONTEXT.test(text)) return null;
      return { role, text, files };
    }
    // Tool calls join the answer they belong to (see `inputMessages`); their results are tool messages.
    case "function_call":
    case "custom_tool_call": {
      const args = type === "function_call" ? item.arguments : item.input;
      const call = {
        id: valueText(item.call_id ?? ""),
        name: valueText(item.name ?? "?"),
        arguments: valueText(args ?? ""),
      };
      return { role: "assistant", text: "", files: [], calls: [call] };
    }
    case "function_call_output":
    case "custom_tool_call_output": {
      const output = item.output;
      const text = Array.isArray(output)
        ? parseContent(output, `${param}.output`, maxParts).text
        : valueText(output ?? "");
      return typeof item.call_id === "string"
        ? { role: "tool", text, files: [], callId: item.call_id }
        : { role: "tool", text, files: [] };
    }
    case "item_reference":
      throw unsupported(`${param}.type`, "item references need OpenAI's item store; send the item itself");
    default:
      // Reasoning the bridge emitted, and calls of OpenAI's hosted tools, are not part of the chat's text.
      if (typeof type !== "string") throw badRequest("an input item's `type` must be a string", `${param}.type`);
      return null;
  }
}

/**
 * The input items as chat messages. An assistant answer streamed as several `message` items (split
 * by reasoning) and `function_call` items is one message again, its text then its calls, exactly as
 * the bridge recorded it, so history matching holds.
 */
function inputMessages(input: unknown[], maxParts: number): Message[] {
  const messages: Message[] = [];
  let answer: Message | undefined;
  input.forEach((item, i) => {
    const m = inputItem(item, `input[${i}]`, maxParts);
    if (!m) return;
    if (m.role === "assistant" && answer) {
      answer.text += m.text;
      answer.files.push(...m.files);
      if (m.calls) (answer.calls ??= []).push(...m.calls);
      return;
    }
    answer = m.role === "assistant" ? { ...m, files: [...m.files] } : undefined;
    messages.push(answer ?? m);
  });
  for (const m of messages) if (m.calls) m.text = answerText(m.text, m.calls);
  return messages;
}

/** Validates an OpenAI Responses body (`POST /v1/responses`); throws ApiError 400 naming the bad field. */
export function parseResponsesRequest(
  body: unknown,
  headers: Headers,
  limits: { maxMessages: number; maxParts: number },
): ResponsesRequest {
  checkModel(body);
  const model = body.model;
  checkTypes(body);
  refuseResponsesUnsupported(body);
  const input = body.input;
  let messages: Message[];
  if (typeof input === "string") messages = [{ role: "user", text: input, files: [] }];
  else if (Array.isArray(input)) {
    if (input.length > limits.maxMessages) {
      throw badRequest(`too many input items (${input.length}; the limit is ${limits.maxMessages})`, "input");
    }
    messages = inputMessages(input, limits.maxParts);
  } else throw badRequest("`input` must be a string or an array of input items", "input");
  const instructions = optionalString(body, "instructions");
  if (instructions?.trim()) messages.unshift({ role: "system", text: instructions, files: [] });
  if (!messages.some((m) => m.role === "user" || m.role === "tool")) {
    throw badRequest("`input` has no user message", "input");
  }
  const previousResponseId = optionalString(body, "previous_response_id") || undefined;
  const user = optionalString(body, "user") || undefined;
  const safetyIdentifier = optionalString(body, "safety_identifier") || undefined;
  const store = body.store !== false;
  const reasoning = isObject(body.reasoning) ? body.reasoning : {};
  const text = isObject(body.text) ? body.text : {};
  return {
    model,
    messages,
    stream: body.stream === true,
    includeUsage: true,
    user: safetyIdentifier ?? user,
    conversationId: optionalString(body, "conversation_id") || headers.get("x-dify-conversation-id") || undefined,
    sessionId: sessionIdOf(body, headers),
    inputs: (body.inputs as Record<string, unknown> | undefined) ?? {},
    tools: toolAsk(body, true),
    previousResponseId,
    store,
    echo: {
      instructions: instructions ?? null,
      max_output_tokens: (body.max_output_tokens as number | undefined) ?? null,
      metadata: isObject(body.metadata) ? body.metadata : {},
      parallel_tool_calls: body.parallel_tool_calls !== false,
      previous_response_id: previousResponseId ?? null,
      prompt_cache_key: (body.prompt_cache_key as string | undefined) ?? null,
      reasoning: { effort: reasoning.effort ?? null, summary: reasoning.summary ?? null },
      safety_identifier: safetyIdentifier ?? null,
      store,
      temperature: (body.temperature as number | undefined) ?? 1,
      text: { format: { type: "text" }, verbosity: "medium", ...text },
      tool_choice: body.tool_choice ?? "auto",
      tools: (body.tools as unknown[] | undefined) ?? [],
      top_p: (body.top_p as number | undefined) ?? 1,
      truncation: typeof body.truncation === "string" ? body.truncation : "disabled",
      user: user ?? null,
    },
  };
}

// ─── OpenClaw envelope ──────────────────────────────────────────────────────────────────────────
// OpenClaw wraps each user message in metadata meant for its own agent prompt. Dify should see
// only what the person typed, and its logs should name the person who typed it.

const INTERNAL_CONTEXT = /^\s*<<<BEGIN_OPENCLAW_INTERNAL_CONTEXT>>>[\s\S]*<<<END_OPENCLAW_INTERNAL_CONTEXT>>>\s*$/;
// Bounded repeats and a fence body that cannot run past the next fence: every envelope pattern
// stays linear on a multi-megabyte message (unbounded ones backtracked for minutes, stalling the server).
/** `[Tue 2026-11-24 08:11 UTC] `, `[Wed 2026-04-15 15:56 GMT+1] `, `[Discord alice … 06:00 UTC] `. */
const ENVELOPE_TIMESTAMP = /^\[[^\]\n]{0,200}\b\d{4}-\d{2}-\d{2} \d{1,2}:\d{2}\b[^\]\n]{0,200}\]\s*/;
/**
 * `<Label>: ⟦openclaw:ctx⟧` (current) or `<Label> (untrusted metadata):` (older; also `(untrusted, for
 * context)`, `(untrusted, nearest first)`, …) + a json fence.
 */
const ENVELOPE_BLOCK =
  /(?:^|\n)[ \t]*([A-Z][A-Za-z ]{1,60}?)(?::[ \t]*⟦openclaw:ctx⟧| \([^()\n]{0,80}\buntrusted\b[^()\n]{0,80}\):)[ \t]*\n```(?:json)?[ \t]*\n([^\n]*(?:\n(?!```)[^\n]*)*)\n```[ \t]*(?=\n|$)/g;
const ENVELOPE_RUNTIME = /(?:^|\n)Runtime: agent=[^\n]*\s*$/;

/** True for OpenClaw's trailing internal-context message: context for its agent, not a question. */
export function isInternalContext(text: string): boolean {
  return text.startsWith("<<<BEGIN_OPENCLAW", text.search(/\S/)) && INTERNAL_CONTEXT.test(text);
}

interface Envelope {
  text: string;
  senderId?: string;
  channel?: string;
}

function senderOf(json: string): { id?: string; loose?: string; channel?: string } {
  try {
    const data = JSON.parse(json);
    if (!isObject(data)) return {};
    const sender = isObject(data.sender) ? data.sender : data;
    const id = sender.id ?? sender.user_id ?? data.sender_id;
    // The earliest `Conversation info` named the sender only as a string (phone, id or username).
    const loose = typeof data.sender === "string" && data.sender.trim() ? data.sender.trim() : undefined;
    const chat = typeof data.chat_id === "string" ? data.chat_id : "";
    const channel = typeof data.channel === "string"
      ? data.channel
      : chat.includes(":")
      ? chat.slice(0, chat.indexOf(":"))
      : undefined;
    return { id: typeof id === "string" || typeof id === "number" ? String(id) : undefined, loose, channel };
  } catch {
    return {};
  }
}

/** Removes OpenClaw's timestamp, metadata blocks and `Runtime:` line; reports the sender found. */
export function cleanEnvelope(raw: string): Envelope {
  if (
    !raw.includes("openclaw") && !raw.includes("untrusted") && !raw.includes("Runtime: agent=") &&
    !ENVELOPE_TIMESTAMP.test(raw)
  ) return { text: raw };
  const found: Envelope = { text: "" };
  let text = raw.replace(ENVELOPE_TIMESTAMP, "");
  let blocks = 0;
  let loose: string | undefined;
  text = text.replace(ENVELOPE_BLOCK, (_all, _label: string, json: string) => {
    blocks++;
    const sender = senderOf(json);
    found.senderId ??= sender.id;
    loose ??= sender.loose;
    found.channel ??= sender.channel;
    return "\n";
  });
  found.senderId ??= loose;
  // Older versions put the blocks first and the timestamp after them, right before the text.
  if (blocks) text = text.trimStart().replace(ENVELOPE_TIMESTAMP, "");
  const runtime = ENVELOPE_RUNTIME.exec(text);
  if (runtime) {
    found.channel ??= /\bchannel=([\w-]+)/.exec(runtime[0])?.[1];
    text = text.slice(0, runtime.index);
  }
  found.text = text.trim();
  return found;
}

// ─── Turn building ──────────────────────────────────────────────────────────────────────────────
// OpenAI clients send the whole chat; Dify wants one new query. A turn is the user messages after
// the last assistant message; everything before it is history Dify may already hold.

/** Where one request goes: the app, the key to use, and the app's type. */
interface Route {
  app: AppConfig;
  key: string;
  /** The key came from the client (pass-through), not from configuration. */
  clientKey: boolean;
  type: AppType;
}

export interface Turn {
  system: string;
  /** Cleaned messages before the new turn, through the last assistant message (no system). */
  history: Message[];
  /** The new turn's messages as the fingerprint sees them (internal context left out). */
  current: Message[];
  /** What Dify gets as `query` (envelope cleaned unless ENVELOPE=keep). */
  query: string;
  files: InputFile[];
  /** The Dify user named by the envelope, e.g. `telegram:123456789`. */
  sender?: string;
}

/** A tool result as the `<tool_call>` format's models expect it back. */
export function toolResponse(name: string | undefined, content: string): string {
  return `<tool_response>${JSON.stringify(name === undefined ? { content } : { name, content })}</tool_response>`;
}

/** `tools`: the app is asked for calls (TOOLS=emulate), so tool results go back as `<tool_response>` blocks. */
export function buildTurn(messages: Message[], envelope: Config["envelope"], tools = false): Turn {
  // The function each call id named, for its result (unnamed when the call is not in this request: previous_response_id).
  const called = new Map(messages.flatMap((m) => m.calls?.map((c) => [c.id, c.name] as const) ?? []));
  const result = (m: Message, text: string) =>
    tools ? toolResponse(called.get(m.callId ?? ""), text) : `[tool result] ${text}`;
  let lastAssistant = -1;
  for (let i = messages.length - 1; i >= 0; i--) {
    if (messages[i].role === "assistant") {
      lastAssistant = i;
      break;
    }
  }
  const system: string[] = [];
  const history: Message[] = [];
  const current: Message[] = [];
  const query: string[] = [];
  const files: InputFile[] = [];
  let senderId: string | undefined;
  let channel: string | undefined;
  messages.forEach((m, i) => {
    if (m.role === "system") return void system.push(m.text);
    const internal = m.role === "user" && isInternalContext(m.text);
    const env = m.role === "user" && !internal ? cleanEnvelope(m.text) : { text: m.text } as Envelope;
    if (env.senderId) senderId = env.senderId;
    channel ??= env.channel;
    const cleaned: Message = { role: m.role, text: env.text, files: m.files };
    // OpenClaw's internal context is never part of the chat: its Responses tool turns resend it before
    // their calls, and the turn the bridge recorded had none.
    if (internal && i <= lastAssistant) return;
    if (i <= lastAssistant) return void history.push(cleaned);
    if (!internal) current.push(cleaned);
    files.push(...m.files);
    if (envelope === "keep") query.push(m.role === "tool" ? result(m, m.text) : m.text);
    else if (!internal && env.text) query.push(m.role === "tool" ? result(m, env.text) : env.text);
  });
  if (lastAssistant === messages.length - 1) {
    throw badRequest("the last message must come from the user: there is no new turn to answer", "messages");
  }
  const text = query.join("\n\n");
  if (!text.trim() && !files.length) throw badRequest("the new user turn has no text", "messages");
  return {
    system: system.join("\n\n"),
    history,
    current,
    query: text,
    files,
    sender: senderId ? `${channel ?? "openclaw"}:${senderId}` : undefined,
  };
}

/**
 * Removes `<think>…</think>` blocks (and the space after each). A scan, not a lazy regex: that one
 * rescans to the end for every unclosed `<think>`, quadratic on a large message.
 */
function stripThink(text: string): string {
  if (!text.includes("<think>")) return text;
  let out = "";
  let at = 0;
  for (;;) {
    const open = text.indexOf("<think>", at);
    const close = open < 0 ? -1 : text.indexOf("</think>", open + 7);
    // No block closes after this point, so none later can either.
    if (close < 0) break;
    out += text.slice(at, open);
    at = close + 8;
    while (at < text.length && /\s/.test(text[at])) at++;
  }
  return at ? out + text.slice(at) : text;
}

/** History as a compact transcript, for the first query of a conversation Dify has not seen. */
export function transcript(history: Message[]): string {
  const label = { user: "User", assistant: "Assistant", tool: "Tool", system: "System" } as const;
  return history.map((m) => `${label[m.role]}: ${stripThink(m.text).trim()}`).join("\n\n");
}

/**
 * What a Dify app's LLM is told of the client's tools: the format Hermes, Qwen and many open models
 * were trained on. `{tools}` becomes one JSON object per line.
 */
export const TOOL_BLOCK = `# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>
Function results come back within <tool_response></tool_response> XML tags.`;

/** The tool block for these functions. */
function toolBlock(tools: ToolSpec[]): string {
  const lines = tools.map((t) => JSON.stringify({ type: "function", function: t }));
  return TOOL_BLOCK.replace("{tools}", () => lines.join("\n"));
}

/** SHA-256 of a text's UTF-8 bytes: node:crypto's, built into Deno (also on Deploy) and Bun, and synchronous. */
function sha256(text: string): Buffer {
  return createHash("sha256").update(text).digest();
}

/** A stable id of a tool set: the conversation records it, and the block is sent again only when it changes. */
function toolSetHash(tools: ToolSpec[]): string {
  return createHash("sha256").update(JSON.stringify(tools)).digest("base64").slice(0, 22);
}

/** The line a turn ends with when the client needs a call now (`tool_choice` required, or a function). */
function toolDemand(choice: ToolAsk["choice"]): string {
  if (choice === "required") return "Answer with a <tool_call> now.";
  return typeof choice === "object" ? `Answer with a <tool_call> of ${choice.name} now.` : "";
}

/** The client's tools on one turn (TOOLS=emulate), and the tool set its Dify conversation had last. */
interface ToolTurn {
  ask: ToolAsk;
  hash: string;
  known?: string;
}

/**
 * The `query` for Dify: the new text, preceded on a fresh conversation by system prompt and history.
 * With tools, the tool block comes first when the conversation has not had this tool set (never on
 * every turn: OpenClaw's dozen tools are about 10 KB), and a forced `tool_choice` ends the turn.
 */
export function difyQuery(turn: Turn, fresh: boolean, systemMode: Config["systemPrompt"], tools?: ToolTurn): string {
  const parts: string[] = [];
  if (fresh && systemMode === "prepend" && turn.system.trim()) parts.push(turn.system.trim());
  if (tools && (fresh || tools.known !== tools.hash)) parts.push(toolBlock(tools.ask.tools));
  if (fresh && turn.history.length) {
    parts.push(`Conversation so far:\n\n${transcript(turn.history)}`, `Current message:\n\n${turn.query}`);
  } else parts.push(turn.query);
  if (tools && toolDemand(tools.ask.choice)) parts.push(toolDemand(tools.ask.choice));
  return parts.join("\n\n");
}

// ─── Conversation store ─────────────────────────────────────────────────────────────────────────
// Maps a chat onto the Dify conversation that remembers it. Keys are scoped by the client (a hash
// of its key) and the app, so two clients or two apps never share a conversation.

/**
 * Each whitespace run as one space. A run that already is one space is not matched: in prose that
 * is most runs, and skipping them makes OpenClaw's 48 KB system prompt about 4× faster than `\s+`.
 */
const SPACING = /\s{2,}|[^\S ]/g;

/** Long texts (OpenClaw resends a 48 KB system prompt every turn) normalised once, up to a bound. */
const fingerprintTexts = new Map<string, string>();
let fingerprintChars = 0;

/** How a message looks to the fingerprint: roles and text only, reasoning and spacing normalised. */
export function fingerprintText(text: string): string {
  if (text.length < 2048) return stripThink(text).replace(SPACING, " ").trim();
  let normal = fingerprintTexts.get(text);
  if (normal === undefined) {
    normal = stripThink(text).replace(SPACING, " ").trim();
    if (fingerprintChars > 4_000_000) {
      fingerprintTexts.clear();
      fingerprintChars = 0;
    }
    fingerprintTexts.set(text, normal);
    fingerprintChars += text.length;
  }
  return normal;
}

/**
 * A stable id for "this chat, up to here": SHA-256 over system prompt and messages (role + text).
 * The client's echo of our answer must produce the same id as the answer we stored.
 */
export function fingerprint(system: string, messages: { role: string; text: string }[]): string {
  const parts = [fingerprintText(system)];
  for (const m of messages) parts.push(m.role, fingerprintText(m.text));
  return sha256(parts.join("\u0000")).toString("base64").slice(0, 32);
}

/** How many characters at the end of `text` could be the start of `tag`. */
function partialTagAt(text: string, tag: string): number {
  // Most texts end far from any "<": no slicing then (this runs once per streamed delta).
  if (text.indexOf("<", text.length - tag.length + 1) < 0) return 0;
  for (let n = Math.min(tag.length - 1, text.length); n > 0; n--) {
    if (tag.startsWith(text.slice(-n))) return n;
  }
  return 0;
}

/**
 * The fingerprint of a chat whose last message, the answer, arrives in pieces: each piece is
 * normalised as `fingerprintText` would normalise the whole, and hashed at once, so a streamed
 * answer need not be kept. `digest()` equals `fingerprint(system, [...messages, answer])`.
 */
export class AnswerPrint {
  #hash: ReturnType<typeof createHash>;
  /** Raw text not yet hashed: a possible start of `<think>`, or a block not closed yet. */
  #held = "";
  #inThink = false;
  /** Whitespace right after a `</think>` goes with the block. */
  #afterThink = false;
  /** A whitespace run waits: it becomes one space only if text follows (trimmed at the end). */
  #space = false;
  #started = false;
  /** Deltas not scanned yet: scanned and hashed together, once per answer (or per 64 Ki characters), not per delta. */
  #raw = "";

  constructor(system: string, messages: { role: string; text: string }[], role = "assistant") {
    const parts = [fingerprintText(system)];
    for (const m of messages) parts.push(m.role, fingerprintText(m.text));
    parts.push(role, "");
    this.#hash = createHash("sha256").update(parts.join("\u0000"));
  }

  push(text: string): void {
    this.#raw += text;
    if (this.#raw.length > 65_536) this.#scanRaw();
  }

  #scanRaw(): void {
    let rest = this.#held + this.#raw;
    this.#raw = "";
    this.#held = "";
    while (rest) {
      if (this.#inThink) {
        const close = rest.indexOf("</think>", 7);
        // Unclosed so far: kept whole, since an answer that never closes it keeps it as text.
        if (close < 0) return void (this.#held = rest);
        rest = rest.slice(close + 8);
        this.#inThink = false;
        this.#afterThink = true;
        continue;
      }
      const open = rest.indexOf("<think>");
      if (open >= 0) {
        this.#plain(rest.slice(0, open));
        rest = rest.slice(open);
        this.#inThink = true;
        continue;
      }
      const partial = partialTagAt(rest, "<think>");
      this.#plain(rest.slice(0, rest.length - partial));
      this.#held = rest.slice(rest.length - partial);
      return;
    }
  }

  digest(): string {
    this.#scanRaw();
    this.#plain(this.#held);
    this.#held = "";
    return this.#hash.digest("base64").slice(0, 32);
  }

  /** Text outside think blocks: each whitespace run as one space, none at the start or the end. */
  #plain(text: string): void {
    if (this.#afterThink) {
      text = text.replace(/^\s+/, "");
      if (!text) return;
      this.#afterThink = false;
    }
    let spaced = text.replace(/\s+/g, " ");
    if (spaced.startsWith(" ")) {
      spaced = spaced.slice(1);
      if (this.#started) this.#space = true;
    }
    if (!spaced) return;
    const trailing = spaced.endsWith(" ");
    if (trailing) spaced = spaced.slice(0, -1);
    this.#hash.update(this.#space ? " " + spaced : spaced);
    this.#space = trailing;
    this.#started = true;
  }
}

type StoreKey = string[];

/** The small persistence interface both runtimes implement (Deno KV, bun:sqlite). */
export interface Store {
  get<T>(key: StoreKey): Promise<T | null>;
  set(key: StoreKey, value: unknown, ttlMs: number): Promise<void>;
  /**
   * Sets `value` only if the current value deep-equals `expected` (null: absent), and with it the
   * `also` entries, in one atomic commit. `soon`: a request is waiting on it, so commit at once.
   */
  setIf(
    key: StoreKey,
    expected: unknown,
    value: unknown,
    ttlMs: number,
    also?: [StoreKey, unknown][],
    soon?: boolean,
  ): Promise<boolean>;
  delete(key: StoreKey): Promise<void>;
  close(): void;
}

/** Dify remembers a conversation per (conversation id, user): both travel together. */
interface Binding {
  c: string;
  u: string;
}

/** A conversation this client may name: the Dify user it belongs to. */
type Owner = Pick<Binding, "u">;

/** A conversation's latest turn: only a request continuing from it may continue the conversation. */
interface Head {
  f: string;
  u: string;
  /** A request continuing it right now (in any process sharing the store), until `until` (epoch ms). */
  c?: { by: string; until: number };
}

/** True while another request holds the head: a request continuing the same chat then branches. */
function claimHeld(head: Head): boolean {
  return head.c !== undefined && head.c.until > Date.now();
}

export const storeKeys = {
  fingerprint: (client: string, app: string, fp: string): StoreKey => ["fp", client, app, fp],
  head: (client: string, app: string, conversation: string): StoreKey => ["head", client, app, conversation],
  session: (client: string, app: string, session: string): StoreKey => ["sess", client, app, session],
  user: (client: string, app: string, user: string): StoreKey => ["user", client, app, user],
  owner: (client: string, app: string, conversation: string): StoreKey => ["own", client, app, conversation],
  response: (client: string, app: string, id: string): StoreKey => ["resp", client, app, id],
  /** The tool set (`toolSetHash`) a conversation's app was last told of. */
  tools: (client: string, app: string, conversation: string): StoreKey => ["tools", client, app, conversation],
};

function sameValue(a: unknown, b: unknown): boolean {
  return JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
}

/** Store errors that pass: another process holds the file's lock (SQLite under Deno KV, and bun:sqlite). */
const RETRYABLE_STORE_ERROR = /database is (locked|busy)|SQLITE_BUSY|SQLITE_LOCKED/i;
/** Tries of one store operation that meets a retryable error; the waits double from 10 ms up to 1 s. */
const STORE_TRIES = 10;

/** `op`, tried again with a growing, jittered wait while it fails with a retryable store error. */
export async function retrying<T>(op: () => T | Promise<T>): Promise<T> {
  for (let attempt = 1;; attempt++) {
    try {
      return await op();
    } catch (e) {
      const text = `${(e as Error)?.message ?? e} ${(e as { code?: unknown })?.code ?? ""}`;
      if (attempt >= STORE_TRIES || !RETRYABLE_STORE_ERROR.test(text)) throw e;
      const ms = Math.min(1000, 5 * 2 ** attempt);
      await new Promise((resolve) => setTimeout(resolve, ms / 2 + Math.random() * ms));
    }
  }
}

/**
 * Wraps a store so that (1) a value is readable in this process the moment it is written, before
 * the slow durable write commits — a client may send its next turn the instant it sees [DONE] —
 * and (2) a failing store degrades to "no conversation found" with one warning per kind of failure.
 */
export class ConversationStore {
  private pending = new Map<string, unknown>();
  private writes = new Set<Promise<unknown>>();
  /** The last write in flight per key. */
  private queued = new Map<string, Promise<void>>();
  private warned = new Set<string>();
  /** Claims this process holds: the claimed head → its key. */
  private claims = new Map<Head, StoreKey>();

  constructor(private store: Store, private ttlMs: number, private warn: (msg: string) => void) {}

  private failed(op: string, e: unknown): void {
    const kind = `${op}: ${(e as Error)?.name ?? "Error"}`;
    if (this.warned.has(kind)) return;
    this.warned.add(kind);
    this.warn(
      `conversation store ${kind}: ${(e as Error)?.message ?? e} (further ${op} failures of this kind are not logged)`,
    );
  }

  async get<T>(key: StoreKey): Promise<T | null> {
    const id = key.join("\u0000");
    if (this.pending.has(id)) return this.pending.get(id) as T;
    try {
      return await this.store.get<T>(key);
    } catch (e) {
      this.failed("read", e);
      return null;
    }
  }

  /**
   * Visible at once in this process; durable when the returned promise settles. `op` writes
   * through the raw store it is given, never through this wrapper's `set` (that waits for `op`).
   * `ordered` (default: every visible key) are the keys whose earlier writes `op` must follow.
   */
  write(
    op: (store: Store) => Promise<unknown>,
    visible: [StoreKey, unknown][],
    ordered: StoreKey[] = visible.map(([key]) => key),
  ): Promise<void> {
    const ids = visible.map(([key, value]) => {
      const id = key.join("\u0000");
      this.pending.set(id, value);
      return [id, value] as const;
    });
    const order = ordered.map((key) => key.join("\u0000"));
    // Writes to one key run in order: turn 2's check-and-set on the head must see turn 1's head,
    // even when turn 2 was answered before turn 1's write committed. Started inside a promise, so
    // a store that throws synchronously cannot break the answer.
    const before = Promise.all(order.map((id) => this.queued.get(id)));
    const done: Promise<void> = before.then(() => op(this.store)).then(
      () => {},
      (e) => this.failed("write", e),
    ).finally(() => {
      for (const [id, value] of ids) {
        if (this.pending.get(id) === value) this.pending.delete(id);
      }
      for (const id of order) {
        if (this.queued.get(id) === done) this.queued.delete(id);
      }
      this.writes.delete(done);
    });
    for (const id of order) this.queued.set(id, done);
    this.writes.add(done);
    return done;
  }

  set(key: StoreKey, value: unknown): Promise<void> {
    return this.write((s) => s.set(key, value, this.ttlMs), [[key, value]]);
  }

  /** Moves a conversation's head from `from` to `to` (with `also`); false if another turn got there first. */
  async advance(key: StoreKey, from: Head | null, to: Head, also: [StoreKey, unknown][]): Promise<boolean> {
    try {
      const moved = await this.store.setIf(key, from, to, this.ttlMs, also);
      if (moved && from) this.claims.delete(from);
      return moved;
    } catch (e) {
      this.failed("write", e);
      return false;
    }
  }

  /**
   * Claims the conversation at `head` for one turn, for at most `ms`: a check-and-set on the head, so
   * of two requests continuing one chat, in any processes sharing the store, one wins and the other
   * branches. The claimed head is what the turn's record moves on from; null if the head moved or is held.
   */
  async claim(key: StoreKey, head: Head, ms: number): Promise<Head | null> {
    // After this process's own write of that head, or its check would meet the head before it.
    await this.queued.get(key.join("\u0000"));
    const claimed: Head = { f: head.f, u: head.u, c: { by: crypto.randomUUID(), until: Date.now() + ms } };
    try {
      if (!(await this.store.setIf(key, head, claimed, this.ttlMs, [], true))) return null;
    } catch (e) {
      this.failed("write", e);
      return null;
    }
    this.claims.set(claimed, key);
    return claimed;
  }

  /** Ends a claim: a turn that recorded nothing (failed, abandoned) leaves the head continuable as it was. */
  async release(claimed: Head): Promise<void> {
    const key = this.claims.get(claimed);
    if (!key) return;
    // After the turn's own record, which moves the head on and ends the claim with it.
    await this.queued.get(key.join("\u0000"));
    if (!this.claims.delete(claimed)) return;
    try {
      await this.store.setIf(key, claimed, { f: claimed.f, u: claimed.u }, this.ttlMs);
    } catch (e) {
      this.failed("write", e);
    }
  }

  async delete(key: StoreKey): Promise<void> {
    const id = key.join("\u0000");
    this.pending.delete(id);
    // After any write of this key still in flight, or that write would bring the value back.
    await this.queued.get(id);
    try {
      await this.store.delete(key);
    } catch (e) {
      this.failed("delete", e);
    }
  }

  /** Waits for every write still in flight (shutdown). */
  async flush(): Promise<void> {
    while (this.writes.size) await Promise.all([...this.writes]);
  }
}

/** How long a claim holds a conversation: past the answer deadline, a crashed process's claim ends. */
function claimMs(config: Config): number {
  return (config.answerTimeoutMs || config.upstreamTimeoutMs + config.upstreamIdleMs) + config.shutdownGraceMs;
}

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

/**
 * A complete response as kept for `GET /v1/responses/{id}`: only what differs between responses. Its JSON
 * is mostly the same settings and fields every time, and a store value costs by its bytes.
 */
interface KeptResponse {
  /** `created_at` and `completed_at`. */
  a: number;
  z: number;
  /** `model`. */
  m: string;
  /** The echoed request settings that differ from the defaults, as JSON; absent: all defaults. */
  e?: string;
  /** The output items as JSON, comma-separated. */
  o: string;
  n?: Usage;
}

/** A response the bridge answered: its conversation and Dify user (`previous_response_id`), and the object (GET). */
interface StoredResponse {
  c?: string;
  u: string;
  /** The whole `response` object as JSON text (as stored before `k`). */
  o?: string;
  /** The response, unless it was too large to keep. */
  k?: KeptResponse;
}

/** The largest `response` object kept for `GET /v1/responses/{id}`: a Deno KV value holds at most 64 KiB. */
const RESPONSE_OBJECT_BYTES = 60 * 1024;

function responseNotFound(id: string, param: string | null = null): ApiError {
  return apiError("response_not_found", `response ${preview(id)} not found`, { param });
}

const textEncoder = new TextEncoder();

/** What is stored for a response: always its conversation, the response too when it fits in one store value. */
function storedResponse(conversation: string | undefined, user: string, kept: KeptResponse): StoredResponse {
  const stored: StoredResponse = { u: user };
  if (conversation) stored.c = conversation;
  const chars = kept.o.length + (kept.e?.length ?? 0);
  const bytes = chars * 3 <= RESPONSE_OBJECT_BYTES ? chars : textEncoder.encode(kept.o + (kept.e ?? "")).length;
  if (bytes <= RESPONSE_OBJECT_BYTES) stored.k = kept;
  return stored;
}

/** Where a request's conversation came from; decides what is stored after the turn. */
interface Resolution {
  via: "explicit" | "response" | "session" | "history" | "user" | "new";
  conversationId?: string;
  user: string;
  /** The head this turn continues (history mode), for the check-and-set after the turn. */
  head: Head | null;
}

/** What conversation resolution needs from the server: its settings, the store, and the in-flight sets. */
interface ConversationContext {
  config: Config;
  store: ConversationStore;
  /** Conversations a request in this process is continuing right now: a twin request branches. */
  continuing: Set<string>;
}

/** The conversation a request continues (or a fresh one), in the order explicit → session → mode. */
export async function resolveConversation(
  { config, store, continuing }: ConversationContext,
  req: ChatRequest,
  turn: Turn,
  r: Route,
  client: string,
): Promise<Resolution> {
  const scope = r.app.model;
  const fallbackUser = req.user ?? turn.sender ?? config.defaultUser;
  const fresh: Resolution = { via: "new", user: fallbackUser, head: null };
  if (r.type === "workflow" || r.type === "completion") return fresh;
  if (req.conversationId) {
    // An id a client sends is a claim to check: with client keys, only a conversation this client
    // started or continued here. Open mode is one scope, and there a client may bring its own Dify key.
    const head = await store.get<Head>(storeKeys.head(client, scope, req.conversationId));
    const owner = head ?? await store.get<Owner>(storeKeys.owner(client, scope, req.conversationId));
    if (!owner && config.proxyKeys.length) {
      throw apiError("conversation_not_found", `conversation ${preview(req.conversationId)} not found`, {
        param: "conversation_id",
      });
    }
    return { via: "explicit", conversationId: req.conversationId, user: req.user ?? owner?.u ?? fallbackUser, head };
  }
  if (req.previousResponseId) {
    // Scoped like every key: another client's response id is not found, exactly like an unknown one.
    const stored = await store.get<StoredResponse>(storeKeys.response(client, scope, req.previousResponseId));
    if (!stored) throw responseNotFound(req.previousResponseId, "previous_response_id");
    return { via: "response", conversationId: stored.c, user: stored.u, head: null };
  }
  if (req.sessionId) {
    const b = await store.get<Binding>(storeKeys.session(client, scope, req.sessionId));
    return b ? { via: "session", conversationId: b.c, user: b.u, head: null } : fresh;
  }
  if (config.conversationMode === "off") return fresh;
  if (config.conversationMode === "user") {
    const b = await store.get<Binding>(storeKeys.user(client, scope, fallbackUser));
    return b ? { via: "user", conversationId: b.c, user: b.u, head: null } : fresh;
  }
  if (!turn.history.length) return fresh;
  const fp = fingerprint(turn.system, turn.history);
  const b = await store.get<Binding>(storeKeys.fingerprint(client, scope, fp));
  if (!b || continuing.has(b.c)) return fresh;
  const head = await store.get<Head>(storeKeys.head(client, scope, b.c));
  // Only the latest turn continues a conversation: a regenerate or an edit branches off.
  if (head?.f !== fp || continuing.has(b.c) || claimHeld(head)) return fresh;
  // Claimed here, after the last await: a twin request resolving at the same time branches. The
  // store's claim does the same across processes sharing it.
  continuing.add(b.c);
  const claimed = await store.claim(storeKeys.head(client, scope, b.c), head, claimMs(config));
  if (!claimed) {
    continuing.delete(b.c);
    return fresh;
  }
  return { via: "history", conversationId: b.c, user: b.u, head: claimed };
}

/** What recording a turn needs of its answer (a `Translation` has both). */
interface Answered {
  conversationId?: string;
  /** The answer's text, when it was kept (aggregated answers); streamed ones bring their `AnswerPrint`. */
  content: string;
  /** The tool calls the answer made: the client's echo of the answer carries them. */
  calls?: ToolCall[];
}

function setEach(store: ConversationStore, entries: [StoreKey, unknown][]): void {
  for (const [key, value] of entries) store.set(key, value);
}

/**
 * Stores where this chat now stands. Readable in this process at once (a client may send its next
 * turn the instant [DONE] arrives); the durable write follows in the background. `also`: entries
 * stored with the turn's record, in its write (a Responses answer: the response).
 */
export function recordTurn(
  { config, store }: ConversationContext,
  req: ChatRequest,
  turn: Turn,
  r: Route,
  client: string,
  res: Resolution,
  t: Answered,
  print?: AnswerPrint,
  also: [StoreKey, unknown][] = [],
): void {
  const conversation = t.conversationId;
  if (!conversation || r.type === "workflow" || r.type === "completion") return setEach(store, also);
  const scope = r.app.model;
  const binding: Binding = { c: conversation, u: res.user };
  if (req.sessionId) store.set(storeKeys.session(client, scope, req.sessionId), binding);
  if (config.conversationMode === "user" && !req.sessionId && !req.conversationId) {
    store.set(storeKeys.user(client, scope, res.user), binding);
  }
  // Whose conversation this is, for an explicit id later (history mode's head says it already). Without
  // client keys anyone may name any conversation: the record would only spare a client sending its `user`
  // again, for a store write on every turn.
  if (config.conversationMode !== "history") {
    if (config.proxyKeys.length) store.set(storeKeys.owner(client, scope, conversation), binding);
    return setEach(store, also);
  }
  if (print && t.calls?.length) print.push("\n" + answerText("", t.calls));
  const fp = print ? print.digest() : fingerprint(turn.system, [...turn.history, ...turn.current, {
    role: "assistant",
    text: answerText(t.content, t.calls),
  }]);
  const headKey = storeKeys.head(client, scope, conversation);
  const fpKey = storeKeys.fingerprint(client, scope, fp);
  const head: Head = { f: fp, u: res.user };
  const expected = res.conversationId === conversation ? res.head : null;
  const checked = res.via === "history" || res.via === "new";
  const ttl = config.conversationTtlMs;
  // The raw store `s`: this wrapper's `set` would queue behind this very write. Only the head (and
  // `also`) is ordered: many chats can share a fingerprint (the same first exchange), and queueing all
  // of their writes behind one another falls behind under load; the newest binding wins either way.
  // `also` rides in the head's commit: a commit, not the bytes in it, is most of a store write's cost.
  const setAlso = (s: Store) => Promise.all(also.map(([key, value]) => s.set(key, value, ttl)));
  store.write(
    async (s) => {
      if (!checked) await Promise.all([s.set(headKey, head, ttl), s.set(fpKey, binding, ttl), setAlso(s)]);
      // Another turn moved the head first: this answer's entries are still this answer's.
      else if (!await store.advance(headKey, expected, head, [[fpKey, binding], ...also])) await setAlso(s);
    },
    [[headKey, head], [fpKey, binding], ...also],
    [headKey, ...also.map(([key]) => key)],
  );
}

/** The turn is over (answered, failed or abandoned): another request may continue its conversation. */
function releaseConversation({ continuing, store }: ConversationContext, res: Resolution): void {
  if (res.via === "history" && res.conversationId) continuing.delete(res.conversationId);
  if (res.via === "history" && res.head) store.release(res.head);
}

// ─── Dify client ────────────────────────────────────────────────────────────────────────────────

const DIFY_MODES: Record<string, AppType> = {
  chat: "chat",
  "agent-chat": "agent",
  agent: "agent",
  "advanced-chat": "chatflow",
  workflow: "workflow",
  completion: "completion",
};

const difyPaths: Record<AppType, { run: string; stop: (task: string) => string }> = {
  chat: { run: "/chat-messages", stop: (t) => `/chat-messages/${t}/stop` },
  agent: { run: "/chat-messages", stop: (t) => `/chat-messages/${t}/stop` },
  chatflow: { run: "/chat-messages", stop: (t) => `/chat-messages/${t}/stop` },
  completion: { run: "/completion-messages", stop: (t) => `/completion-messages/${t}/stop` },
  workflow: { run: "/workflows/run", stop: (t) => `/workflows/tasks/${encodeURIComponent(t)}/stop` },
};

interface DifyFile {
  type: DifyFileType;
  transfer_method: "remote_url" | "local_file";
  url?: string;
  upload_file_id?: string;
}

/** The JSON body Dify's run endpoint expects for this app type. */
export function difyRequestBody(
  type: AppType,
  app: AppConfig,
  args: { query: string; user: string; conversationId?: string; inputs: Record<string, unknown>; files: DifyFile[] },
): Record<string, unknown> {
  const files = args.files.length ? { files: args.files } : {};
  if (type === "workflow") {
    return {
      inputs: { ...args.inputs, [app.input]: args.query },
      response_mode: "streaming",
      user: args.user,
      ...files,
    };
  }
  if (type === "completion") {
    return {
      inputs: { ...args.inputs, query: args.query },
      query: args.query,
      response_mode: "streaming",
      user: args.user,
      ...files,
    };
  }
  return {
    inputs: args.inputs,
    query: args.query,
    response_mode: "streaming",
    user: args.user,
    conversation_id: args.conversationId ?? "",
    ...files,
    // Sent only when off: Dify's default is on, and older builds never knew the field.
    ...(app.autoGenerateName === false ? { auto_generate_name: false } : {}),
    ...(type === "chatflow" && app.workflowId ? { workflow_id: app.workflowId } : {}),
  };
}

/** The run endpoint for this route: a workflow app pins its version in the path, a chatflow in the body. */
export function runPath(r: { type: AppType; app: AppConfig }): string {
  if (r.type === "workflow" && r.app.workflowId) return `/workflows/${r.app.workflowId}/run`;
  return difyPaths[r.type].run;
}

/**
 * Dify's `{code, message, status}` (an HTTP error or an in-stream `error` frame) as the error the
 * client gets. A fault retrying cannot fix stays a 4xx, so clients such as OpenClaw do not retry.
 */
export function difyError(status: number, body: unknown, app: AppConfig, clientKey: boolean): ApiError {
  const b = isObject(body) ? body : {};
  const code = typeof b.code === "string" ? b.code : `dify_${status}`;
  const detail = typeof b.message === "string" && b.message ? b.message : `HTTP ${status}`;
  const message = `Dify (model ${app.model}): ${detail}`;
  if (status === 401 || status === 403) {
    // The operator's key is wrong: that is the gateway's fault, not the client's credentials.
    if (!clientKey) {
      return apiError("dify_key_rejected", `${message} — the Dify key configured for model ${app.model} was rejected`, {
        code,
      });
    }
    return apiError(status === 401 ? "dify_unauthorized" : "dify_forbidden", message, { code });
  }
  if (status === 429) return apiError("dify_rate_limited", message, { code, headers: { "retry-after": "1" } });
  if (status === 413) return apiError("dify_too_large", message, { code });
  if (status === 404) {
    if (/conversation/i.test(detail)) return apiError("conversation_not_found", message);
    return apiError("dify_not_found", `${message} — check DIFY_API_URL for model ${app.model}`, { code });
  }
  if (status >= 400 && status < 500 && status !== 408 && status !== 415) {
    return apiError("dify_invalid_request", message, { code });
  }
  return apiError("upstream_error", message, { code });
}

/** What a non-SSE Dify response says, as an error: JSON envelope, HTML page, or other. */
async function unexpectedResponse(
  res: Response,
  app: AppConfig,
  clientKey: boolean,
  expected = "an event stream",
): Promise<ApiError> {
  const type = res.headers.get("content-type") ?? "";
  const text = await res.text().catch(() => "");
  let body: unknown;
  try {
    body = JSON.parse(text);
  } catch { /* not JSON */ }
  if (isObject(body) && typeof body.message === "string") {
    return difyError(res.ok ? Number(body.status) || 502 : res.status, body, app, clientKey);
  }
  if (res.ok) {
    return apiError(
      "bad_upstream_response",
      `Dify (model ${app.model}) answered ${type || "an unknown type"} where ${expected} was expected`,
    );
  }
  const what = /html/i.test(type) || /^\s*</.test(text) ? "an HTML error page (a proxy in front of Dify?)" : "an error";
  return apiError(
    res.status === 504 ? "upstream_gateway_timeout" : "upstream_error",
    `Dify (model ${app.model}) answered HTTP ${res.status} with ${what}`,
    { code: `dify_${res.status}` },
  );
}

/** Why a fetch to Dify failed, without the URL's secrets or a stack. */
function connectionError(e: unknown, app: AppConfig, signal: AbortSignal): ApiError {
  if (signal.aborted && signal.reason instanceof ApiError) return signal.reason;
  // Deno's message is just "fetch failed": the cause says what failed, after the full URL.
  const cause = (e as Error)?.cause;
  const detail = cause instanceof Error ? cause.message : (e as Error)?.message ?? String(e);
  const reason = detail.split("\n")[0].replace(/^error sending request for url \(\S*\):\s*/, "");
  return apiError(
    "upstream_unreachable",
    `could not reach Dify for model ${app.model} at ${new URL(app.url).host}: ${reason}`,
  );
}

/**
 * POSTs one file (and the `user` it belongs to) to a Dify multipart endpoint; answers the JSON body
 * when it has `field` as a string, else throws the error Dify's answer means.
 */
async function postFile(
  fetch: typeof globalThis.fetch,
  r: Route,
  path: string,
  user: string,
  file: { bytes: Uint8Array; filename: string; mime: string },
  field: string,
  signal: AbortSignal,
): Promise<string> {
  const form = new FormData();
  form.append("file", new Blob([file.bytes as BlobPart], { type: file.mime }), file.filename);
  form.append("user", user);
  let res: Response;
  try {
    res = await fetch(`${r.app.url}${path}`, {
      method: "POST",
      headers: { authorization: `Bearer ${r.key}` },
      body: form,
      signal,
    });
  } catch (e) {
    throw connectionError(e, r.app, signal);
  }
  const body = await res.json().catch(() => null);
  if (!res.ok || !isObject(body) || typeof body[field] !== "string") {
    // Here 415 is Dify refusing this file's type: the client's to fix (a 4xx), not a gateway fault.
    const status = res.status === 415 ? 400 : res.ok ? 502 : res.status;
    throw difyError(status, body, r.app, r.clientKey);
  }
  return body[field] as string;
}

function upload(
  fetch: typeof globalThis.fetch,
  r: Route,
  user: string,
  file: Extract<InputFile, { kind: "upload" }>,
  signal: AbortSignal,
): Promise<string> {
  return postFile(fetch, r, "/files/upload", user, file, "id", signal);
}

/** Client attachments as Dify file references, uploading inline data first (same `user` as the chat call). */
async function difyFiles(
  fetch: typeof globalThis.fetch,
  r: Route,
  user: string,
  files: InputFile[],
  signal: AbortSignal,
): Promise<DifyFile[]> {
  return await Promise.all(
    files.map(async (f): Promise<DifyFile> =>
      f.kind === "remote"
        ? { type: f.type, transfer_method: "remote_url", url: f.url }
        : { type: f.type, transfer_method: "local_file", upload_file_id: await upload(fetch, r, user, f, signal) }
    ),
  );
}

/** Reads a body chunk by chunk; `null` at the end. The chunk may be overwritten by the next read. */
export interface ChunkReader {
  read(): Promise<Uint8Array | null>;
  cancel(): void;
}

const CLIENT_GONE = apiError("client_closed", "client closed the request");
/** How long a call whose client has left may wait for Dify to name the task to stop. */
const GONE_GRACE_MS = 5000;

/** The limits one exchange is watched against (from the configuration). */
type ExchangeLimits = Pick<
  Config,
  "keepaliveMs" | "upstreamTimeoutMs" | "upstreamIdleMs" | "bodyTimeoutMs" | "answerTimeoutMs"
>;

/** One request's call to Dify: its abort switch, its clocks, and what the watchdog checks. */
export class Exchange {
  readonly upstream = new AbortController();
  readonly started: number;
  /** Last Dify event (or the start, while waiting for headers): pings and stray bytes do not count. */
  lastEvent: number;
  /** Last bytes handed to the client; -1 while no stream is open to it. */
  lastWrite = -1;
  headersReceived = false;
  /** Since when output has waited for a client that does not read (Dify is not read meanwhile). */
  stalledSince?: number;
  /** When the client left; the call ends as soon as Dify names the task to stop. */
  goneAt?: number;
  keepalive?: () => void;

  constructor(readonly now: () => number) {
    this.started = now();
    this.lastEvent = this.started;
  }

  abort(reason: ApiError): void {
    if (!this.upstream.signal.aborted) this.upstream.abort(reason);
  }

  /** The client left: Dify keeps generating (and billing) until its task is stopped, so read on until it is named. */
  leave(taskId: string | undefined): void {
    if (this.upstream.signal.aborted || this.goneAt !== undefined) return;
    this.goneAt = this.now();
    if (taskId) this.abort(CLIENT_GONE);
  }

  /** Why the watchdog must end this exchange now, if it must. */
  overdue(now: number, limits: ExchangeLimits): ApiError | undefined {
    const { upstreamTimeoutMs, upstreamIdleMs, answerTimeoutMs } = limits;
    if (answerTimeoutMs && now - this.started > answerTimeoutMs) {
      return apiError(
        "answer_timeout",
        `the answer took longer than ${answerTimeoutMs / 1000} s (ANSWER_TIMEOUT_SECONDS)`,
      );
    }
    if (this.goneAt !== undefined && now - this.goneAt > GONE_GRACE_MS) return CLIENT_GONE;
    if (!this.headersReceived) {
      if (upstreamTimeoutMs && now - this.started > upstreamTimeoutMs) {
        return apiError(
          "upstream_timeout",
          `Dify sent nothing within ${upstreamTimeoutMs / 1000} s (UPSTREAM_TIMEOUT_SECONDS)`,
        );
      }
    } else if (this.stalledSince !== undefined) {
      if (upstreamIdleMs && now - this.stalledSince > upstreamIdleMs) {
        return apiError(
          "client_stalled",
          `the client read nothing for ${upstreamIdleMs / 1000} s (UPSTREAM_IDLE_SECONDS)`,
        );
      }
    } else if (upstreamIdleMs && now - this.lastEvent > upstreamIdleMs) {
      return apiError(
        "upstream_idle_timeout",
        `Dify sent no event for ${upstreamIdleMs / 1000} s mid-answer (UPSTREAM_IDLE_SECONDS)`,
      );
    }
    return undefined;
  }
}

/** Opens Dify's event stream for this request; any other answer becomes the error it means. */
export async function callDify(
  fetch: typeof globalThis.fetch,
  r: Route,
  body: Record<string, unknown>,
  ex: Exchange,
): Promise<Response> {
  // Waiting for headers again (the retry after a lost conversation): the first-byte timeout
  // applies, not the idle timer still running from the first call's answer.
  ex.headersReceived = false;
  let res: Response;
  try {
    res = await fetch(`${r.app.url}${runPath(r)}`, {
      method: "POST",
      headers: { authorization: `Bearer ${r.key}`, "content-type": "application/json", accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal: ex.upstream.signal,
    });
  } catch (e) {
    throw connectionError(e, r.app, ex.upstream.signal);
  }
  ex.headersReceived = true;
  ex.lastEvent = ex.now();
  if (res.ok && res.body && /event-stream/i.test(res.headers.get("content-type") ?? "")) return res;
  throw await unexpectedResponse(res, r.app, r.clientKey);
}

/** Asks Dify to stop a task (fire and forget): it keeps generating, and billing, otherwise. */
function stopTask(fetch: typeof globalThis.fetch, r: Route, taskId: string, user: string): void {
  fetch(`${r.app.url}${difyPaths[r.type].stop(taskId)}`, {
    method: "POST",
    headers: { authorization: `Bearer ${r.key}`, "content-type": "application/json" },
    body: JSON.stringify({ user }),
    signal: AbortSignal.timeout(10_000),
  }).then((res) => res.body?.cancel(), () => {});
}

/** What the bridge needs from an app's `GET /parameters`: the inputs it requires and its speech switches. */
interface AppParameters {
  /** Input variables Dify rejects a run without (missing, null or ""), with their labels. */
  required: { variable: string; label: string }[];
  speechToText: boolean;
  textToSpeech: boolean;
}

/** Reads Dify's `/parameters` body: `user_input_form` is a list of one-key `{"<control>": {variable, required, …}}`. */
export function appParameters(body: unknown): AppParameters {
  const b = isObject(body) ? body : {};
  const required: AppParameters["required"] = [];
  for (const item of Array.isArray(b.user_input_form) ? b.user_input_form : []) {
    for (const spec of isObject(item) ? Object.values(item) : []) {
      if (!isObject(spec) || spec.required !== true || typeof spec.variable !== "string" || !spec.variable) continue;
      required.push({ variable: spec.variable, label: typeof spec.label === "string" ? spec.label : spec.variable });
    }
  }
  const on = (feature: unknown) => isObject(feature) && feature.enabled === true;
  return { required, speechToText: on(b.speech_to_text), textToSpeech: on(b.text_to_speech) };
}

/** The 400 for a run without an input the app requires (naming every one missing), or undefined. */
export function missingInputs(
  params: AppParameters | undefined,
  inputs: Record<string, unknown>,
  model: string,
): ApiError | undefined {
  const missing = (params?.required ?? []).filter(({ variable }) => {
    const v = Object.hasOwn(inputs, variable) ? inputs[variable] : undefined;
    return v === undefined || v === null || v === "";
  });
  if (!missing.length) return undefined;
  const names = missing.map((m) => m.label === m.variable ? `"${m.variable}"` : `"${m.variable}" (${m.label})`);
  return apiError(
    "missing_input",
    `the Dify app behind model ${model} requires the input variable${missing.length > 1 ? "s" : ""} ${
      names.join(", ")
    }: send ${missing.length > 1 ? "them" : "it"} in \`inputs\``,
    { param: `inputs.${missing[0].variable}` },
  );
}

/**
 * Each app's `/parameters`, asked once per app and key and kept a few minutes: republishing an app
 * can change its form. A failed read is not kept, and means "unknown" (Dify still checks the run).
 */
export class ParametersCache {
  private known = new Map<string, { at: number; value: Promise<AppParameters | undefined> }>();

  constructor(
    private fetch: typeof globalThis.fetch,
    private now: () => number,
    private ttlMs = 300_000,
  ) {}

  get(r: Route): Promise<AppParameters | undefined> {
    const id = `${r.app.url}\u0000${r.key}`;
    const hit = this.known.get(id);
    if (hit && this.now() - hit.at < this.ttlMs) return hit.value;
    // Pass-through keys are the client's: the map stays bounded whatever keys arrive.
    if (this.known.size >= 1000) this.known.clear();
    const entry = { at: this.now(), value: this.ask(r) };
    entry.value.then((p) => {
      if (!p && this.known.get(id) === entry) this.known.delete(id);
    });
    this.known.set(id, entry);
    return entry.value;
  }

  private async ask(r: Route): Promise<AppParameters | undefined> {
    try {
      const res = await this.fetch(`${r.app.url}/parameters`, {
        headers: { authorization: `Bearer ${r.key}` },
        signal: AbortSignal.timeout(10_000),
      });
      if (res.ok && /json/i.test(res.headers.get("content-type") ?? "")) return appParameters(await res.json());
      await res.body?.cancel();
    } catch { /* unknown: Dify still validates the run */ }
    return undefined;
  }
}

const DIFY_AUDIO_TYPES: [RegExp, string][] = [
  [/^audio\/(mpeg|mp3|mpeg3|x-mpeg-3|x-mp3)$|\.mp3$/i, "audio/mp3"],
  [/^audio\/(m4a|x-m4a)$|\.m4a$/i, "audio/m4a"],
  [/^audio\/(wav|x-wav|wave|vnd\.wave)$|\.wav$/i, "audio/wav"],
  [/^audio\/amr$|\.amr$/i, "audio/amr"],
  [/^audio\/mpga$|\.mpga$/i, "audio/mpga"],
];

/**
 * The part type Dify's speech-to-text accepts for this file. Dify checks the part's type, not its name,
 * and takes only audio/mp3, m4a, wav, amr and mpga (not the usual audio/mpeg); anything else goes as sent.
 */
export function difyAudioType(filename: string, mime: string): string {
  const type = mime.split(";")[0].trim().toLowerCase();
  for (const [pattern, difyType] of DIFY_AUDIO_TYPES) if (pattern.test(type)) return difyType;
  if (type && type !== "application/octet-stream") return type;
  for (const [pattern, difyType] of DIFY_AUDIO_TYPES) if (pattern.test(filename)) return difyType;
  return type || "application/octet-stream";
}

/** Dify's speech-to-text (`POST /audio-to-text`) for one audio file: the text it heard. */
export function transcribe(
  fetch: typeof globalThis.fetch,
  r: Route,
  user: string,
  file: AudioFile,
  signal: AbortSignal,
): Promise<string> {
  const part = { ...file, mime: difyAudioType(file.filename, file.mime) };
  return postFile(fetch, r, "/audio-to-text", user, part, "text", signal);
}

/** Dify's text-to-speech (`POST /text-to-audio`): its audio response, to be streamed on as it arrives. */
export async function speak(
  fetch: typeof globalThis.fetch,
  r: Route,
  args: { text: string; voice?: string; user: string },
  signal: AbortSignal,
): Promise<Response> {
  let res: Response;
  try {
    res = await fetch(`${r.app.url}/text-to-audio`, {
      method: "POST",
      headers: { authorization: `Bearer ${r.key}`, "content-type": "application/json" },
      body: JSON.stringify({ text: args.text, user: args.user, ...(args.voice ? { voice: args.voice } : {}) }),
      signal,
    });
  } catch (e) {
    throw connectionError(e, r.app, signal);
  }
  const type = res.headers.get("content-type") ?? "";
  if (res.ok && res.body && !/json|^text\/|html/i.test(type)) return res;
  throw await unexpectedResponse(res, r.app, r.clientKey, "audio");
}

/**
 * Deletes a conversation at Dify, under the `user` Dify holds it for: true once it is gone, false if
 * Dify did not have it (deleted before, or never there). Newer Dify answers 204, older 200.
 */
export async function deleteDifyConversation(
  fetch: typeof globalThis.fetch,
  r: Route,
  conversationId: string,
  user: string,
  signal: AbortSignal,
): Promise<boolean> {
  let res: Response;
  try {
    res = await fetch(`${r.app.url}/conversations/${encodeURIComponent(conversationId)}`, {
      method: "DELETE",
      headers: { authorization: `Bearer ${r.key}`, "content-type": "application/json" },
      body: JSON.stringify({ user }),
      signal,
    });
  } catch (e) {
    throw connectionError(e, r.app, signal);
  }
  const body = await res.json().catch(() => null);
  if (res.ok) return true;
  if (res.status === 404) return false;
  throw difyError(res.status, body, r.app, r.clientKey);
}

// ─── Event translation ──────────────────────────────────────────────────────────────────────────
// Dify's events in, OpenAI's content and reasoning out. The state machine is shared by streaming
// and aggregated responses; a sink decides what to do with each delta.

// TOOLS=emulate: the app's LLM asks for calls in `TOOL_BLOCK`'s format; `ToolCallScan` finds them in the answer.
const CALL_OPEN = "<tool_call>";
const CALL_CLOSE = "</tool_call>";

/** What the scan releases: text for the client, or a call. */
export type ScanPiece = string | ToolCall;

/** A call's JSON as a call of one of `names`, or why it is not one (for the log: no content in it). */
function parsedToolCall(body: string, names: ReadonlySet<string>): ToolCall | string {
  let v: unknown;
  try {
    v = JSON.parse(body);
  } catch {
    return "invalid JSON in <tool_call>";
  }
  if (!isObject(v) || typeof v.name !== "string") return "a <tool_call> without a name";
  if (!names.has(v.name)) return "a <tool_call> of a function the client did not offer";
  let args = v.arguments ?? v.parameters ?? {};
  if (typeof args === "string") {
    try {
      args = JSON.parse(args);
    } catch {
      return "<tool_call> arguments that are not JSON";
    }
  }
  if (!isObject(args)) return "<tool_call> arguments that are not a JSON object";
  const id = `call_${crypto.randomUUID().replaceAll("-", "").slice(0, 24)}`;
  return { id, name: v.name, arguments: JSON.stringify(args) };
}

/**
 * `between`: at the start or after a call — whitespace waits, since a call may follow (then it is
 * dropped). `text`: content flows, except an end that could still become `<tool_call>`. `call`: inside
 * a call, held until `</tool_call>`.
 */
type ScanState = "between" | "text" | "call";

/**
 * Finds the `<tool_call>{"name", "arguments"}</tool_call>` blocks in an answer as it streams. Text
 * before a call is content; text that turns out not to be a call (half a tag, invalid JSON, a function
 * the client did not offer) is released unchanged, and `notes` says why for the log.
 */
export class ToolCallScan {
  #state: ScanState = "between";
  #held = "";
  /** The held text's last characters: where a close tag split across chunks begins. */
  #tail = "";
  #calls = 0;
  /** Some text was pushed (a workflow's final outputs must not repeat it). */
  pushed = false;
  readonly notes: string[] = [];

  constructor(private names: ReadonlySet<string>, private parallel: boolean) {}

  push(text: string): ScanPiece[] {
    if (text) this.pushed = true;
    const out: ScanPiece[] = [];
    // A long call arrives in many small chunks: look for its end in the new text only (and the
    // held tail), so a call's bytes are scanned once, not once per chunk.
    if (this.#state === "call" && !(this.#tail + text).includes(CALL_CLOSE)) {
      this.#tail = (this.#tail + text).slice(1 - CALL_CLOSE.length);
      this.#held += text;
      return out;
    }
    let rest = this.#held + text;
    this.#held = "";
    while (rest) {
      if (this.#state === "call") {
        const close = rest.indexOf(CALL_CLOSE);
        if (close < 0) return this.#hold(rest, out);
        this.#call(rest.slice(0, close), true, out);
        rest = rest.slice(close + CALL_CLOSE.length);
        this.#state = "between";
      } else if (this.#state === "between") {
        const body = rest.trimStart();
        if (body.startsWith(CALL_OPEN)) {
          rest = body.slice(CALL_OPEN.length);
          this.#state = "call";
        } else if (CALL_OPEN.startsWith(body)) return this.#hold(rest, out);
        else this.#state = "text";
      } else {
        const open = rest.indexOf(CALL_OPEN);
        if (open < 0) {
          const partial = partialTagAt(rest, CALL_OPEN);
          if (rest.length > partial) out.push(rest.slice(0, rest.length - partial));
          return this.#hold(rest.slice(rest.length - partial), out);
        }
        if (open) out.push(rest.slice(0, open));
        rest = rest.slice(open + CALL_OPEN.length);
        this.#state = "call";
      }
    }
    return out;
  }

  /** The answer is over: what is still held is released, a call that was never closed still counted if whole. */
  end(): ScanPiece[] {
    const held = this.#held;
    this.#held = "";
    this.#tail = "";
    const out: ScanPiece[] = [];
    if (this.#state === "call") this.#call(held, false, out);
    // Whitespace after the last call is not an answer; before anything else it is part of one.
    else if (held && (held.trim() || !this.#calls)) out.push(held);
    this.#state = "text";
    return out;
  }

  /** The answer so far was replaced (Dify's moderation): what is held goes with it. */
  drop(): void {
    this.#held = "";
    this.#state = "text";
  }

  #hold(text: string, out: ScanPiece[]): ScanPiece[] {
    this.#held = text;
    this.#tail = text.slice(1 - CALL_CLOSE.length);
    return out;
  }

  #call(body: string, closed: boolean, out: ScanPiece[]): void {
    const call = parsedToolCall(body.trim(), this.names);
    if (typeof call === "string") {
      this.notes.push(closed ? call : `an unclosed <tool_call> (${call})`);
      out.push(CALL_OPEN + body + (closed ? CALL_CLOSE : ""));
    } else if (this.#calls && !this.parallel) this.notes.push("a second call left out (parallel_tool_calls: false)");
    else {
      this.#calls++;
      out.push(call);
    }
  }
}

/** Where translated deltas go: SSE chunks for a stream, nothing extra for an aggregate. */
export interface Sink {
  content(text: string): void;
  reasoning(text: string): void;
  ping(): void;
  /** A complete call of one of the client's functions (TOOLS=emulate). */
  toolCall?(call: ToolCall): void;
}

/** A form a paused workflow waits on: where it is and what it asks. */
interface HumanForm {
  node: string;
  title: string;
  content: string;
  actions: string[];
}

/** Everything known about one answer while Dify streams it. */
export interface Translation {
  type: AppType;
  stream: boolean;
  /**
   * Exactly the content the client has been sent (or will get, when aggregated) — or, when `keep`
   * is false, only its last characters: a streamed answer is not held in memory.
   */
  content: string;
  reasoning: string;
  /** Whole texts are kept (an aggregate, a format that repeats them at the end, LOG_CONTENT). */
  keep: boolean;
  /** Also receives every piece of content (the streamed answer's fingerprint). */
  tap?: (text: string) => void;
  /** UTF-8 bytes of content and reasoning so far, against MAX_ANSWER_BYTES. */
  bytes: number;
  usage?: Usage;
  conversationId?: string;
  taskId?: string;
  error?: ApiError;
  /** A terminal event arrived (message_end, or workflow_finished on workflow-based apps). */
  ended: boolean;
  /** Reasoning text already emitted per agent thought id. */
  thoughts: Map<string, string>;
  thinkOpen: boolean;
  workflowTokens?: number;
  /** The `agent_message` text alone: content also holds file links and `<think>` blocks. */
  agentText?: string;
  /** The LLM node whose `reasoning_chunk`s came last: another node's reasoning starts a new paragraph. */
  reasoningNode?: string;
  /** The human-input forms Dify announced (`human_input_required`), for the paused workflow's answer. */
  forms?: HumanForm[];
  /** The workflow paused for human input: the answer ended there, cleanly (the request log says so). */
  paused?: { nodes: string[]; run?: string };
  /** The client's functions were offered: the answer's text is scanned for `<tool_call>` blocks. */
  scan?: ToolCallScan;
  /** The calls found, in order. */
  calls?: ToolCall[];
}

export function newTranslation(type: AppType, stream: boolean, keep = !stream): Translation {
  return {
    type,
    stream,
    content: "",
    reasoning: "",
    keep,
    bytes: 0,
    ended: false,
    thoughts: new Map(),
    thinkOpen: false,
  };
}

/** What a translation that does not keep its texts remembers of them: enough to see how one ends. */
const TEXT_TAIL = 16;

/** UTF-8 length of a text, without encoding it. */
function utf8Length(text: string): number {
  let n = text.length;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    // Two bytes below U+0800, three above; a surrogate pair (two units) is four.
    if (c >= 0x80) n += c < 0x800 || (c >= 0xd800 && c <= 0xdfff) ? 1 : 2;
  }
  return n;
}

/** `bytes`: what the text adds to the answer's size (text the tool scan held was counted as it came). */
function addContent(t: Translation, text: string, bytes = utf8Length(text)): void {
  t.content = t.keep ? t.content + text : (t.content + text).slice(-TEXT_TAIL);
  t.bytes += bytes;
  t.tap?.(text);
}

/** What the tool scan released: content, and calls for the client. */
function emitScanned(t: Translation, sink: Sink, pieces: ScanPiece[]): void {
  for (const piece of pieces) {
    if (typeof piece === "string") {
      addContent(t, piece, 0);
      sink.content(piece);
    } else {
      (t.calls ??= []).push(piece);
      sink.toolCall?.(piece);
    }
  }
}

export interface TranslateOptions {
  reasoning: Config["reasoning"];
  reasoningNodes: boolean;
  origin: string;
  app: AppConfig;
  clientKey: boolean;
}

/** Ends an open inline `<think>` block (REASONING=think) before anything else is said. */
function closeThink(t: Translation, sink: Sink): void {
  if (!t.thinkOpen) return;
  t.thinkOpen = false;
  addContent(t, "\n</think>\n\n");
  sink.content("\n</think>\n\n");
}

function emitContent(t: Translation, sink: Sink, text: string): void {
  if (!text) return;
  closeThink(t, sink);
  if (t.scan) {
    // Counted as it comes: a call that never closes is held, and must still meet MAX_ANSWER_BYTES.
    t.bytes += utf8Length(text);
    return emitScanned(t, sink, t.scan.push(text));
  }
  addContent(t, text);
  sink.content(text);
}

function emitReasoning(t: Translation, sink: Sink, text: string, mode: Config["reasoning"]): void {
  if (!text || mode === "off") return;
  t.reasoning = t.keep ? t.reasoning + text : (t.reasoning + text).slice(-TEXT_TAIL);
  if (mode === "reasoning_content") {
    t.bytes += utf8Length(text);
    return sink.reasoning(text);
  }
  if (!t.thinkOpen) {
    t.thinkOpen = true;
    text = "<think>\n" + text;
  }
  addContent(t, text);
  sink.content(text);
}

/** An agent thought as reasoning text: the thought, then the tool call and its result. */
export function thoughtText(ev: Record<string, unknown>, answer: string): string {
  const lines: string[] = [];
  const thought = typeof ev.thought === "string" ? ev.thought.trim() : "";
  // The last iteration's thought repeats the answer already streamed as agent_message.
  if (thought && !answer.includes(thought)) lines.push(thought);
  if (typeof ev.tool === "string" && ev.tool) lines.push(`🔧 ${ev.tool}: ${String(ev.tool_input ?? "")}`);
  if (typeof ev.observation === "string" && ev.observation) lines.push(`↳ ${ev.observation}`);
  return lines.join("\n");
}

function absoluteUrl(url: string, origin: string): string {
  return /^[a-z][a-z0-9+.-]*:/i.test(url) ? url : origin + (url.startsWith("/") ? "" : "/") + url;
}

/** The answer a workflow produced: the configured output, a usual name, or all outputs as JSON. */
export function workflowAnswer(outputs: unknown, key?: string): string {
  if (!isObject(outputs)) return typeof outputs === "string" ? outputs : outputs == null ? "" : JSON.stringify(outputs);
  const names = key ? [key] : ["text", "answer", "result", "output"];
  for (const name of names) {
    const v = outputs[name];
    if (typeof v === "string") return v;
    if (v !== undefined && v !== null) return JSON.stringify(v);
  }
  const values = Object.values(outputs);
  if (values.length === 1 && typeof values[0] === "string") return values[0];
  return values.length ? JSON.stringify(outputs) : "";
}

function usageOf(raw: unknown): Usage | undefined {
  if (!isObject(raw)) return undefined;
  const prompt = Number(raw.prompt_tokens) || 0;
  const completion = Number(raw.completion_tokens) || 0;
  return {
    prompt_tokens: prompt,
    completion_tokens: completion,
    total_tokens: Number(raw.total_tokens) || prompt + completion,
  };
}

/** A `human_input_required` event's form (or a `workflow_paused` reason, whose keys vary between builds). */
function humanForm(d: Record<string, unknown>): HumanForm {
  const text = (v: unknown) => typeof v === "string" ? v.trim() : "";
  const actions = Array.isArray(d.actions) ? d.actions : [];
  return {
    node: text(d.node_id),
    title: text(d.node_title),
    content: text(d.form_content),
    actions: actions.map((a) => isObject(a) ? text(a.title) || text(a.id) : "").filter(Boolean),
  };
}

/** The answer's closing words when a workflow pauses for a person: what it waits for, and where. */
function pausedText(forms: HumanForm[]): string {
  const asks = forms.map((f) => {
    const where = f.title ? `"${f.title}"` : f.node ? `node ${f.node}` : "a form";
    const actions = f.actions.length ? ` (${f.actions.join(" / ")})` : "";
    return `${where}${f.content ? `: ${f.content}` : ""}${actions}`;
  });
  const what = asks.length ? ` at ${asks.join("; ")}` : "";
  return `⏸ This app is waiting for human input${what}. It continues once that is answered in Dify.`;
}

/** Applies one parsed Dify event to the translation, sending deltas to the sink. */
export function applyDifyEvent(t: Translation, ev: Record<string, unknown>, sink: Sink, o: TranslateOptions): void {
  if (t.taskId === undefined && typeof ev.task_id === "string") t.taskId = ev.task_id;
  if (t.conversationId === undefined && typeof ev.conversation_id === "string" && ev.conversation_id) {
    t.conversationId = ev.conversation_id;
  }
  switch (ev.event) {
    case "message":
    case "agent_message": {
      const answer = ev.answer;
      if (typeof answer !== "string" || !answer) return;
      // The New Agent closes with one `message` holding the whole answer it already streamed.
      if (ev.event === "message" && t.type === "agent" && answer === t.agentText) return;
      if (ev.event === "agent_message") t.agentText = (t.agentText ?? "") + answer;
      return emitContent(t, sink, answer);
    }
    case "text_chunk": {
      const data = ev.data;
      if (isObject(data) && typeof data.text === "string") emitContent(t, sink, data.text);
      return;
    }
    case "message_file": {
      // Some Dify versions send ordinary answer text as message_file events.
      if (typeof ev.answer === "string") return emitContent(t, sink, ev.answer);
      if (ev.belongs_to === "user" || typeof ev.url !== "string") return;
      const url = absoluteUrl(ev.url, o.origin);
      const md = ev.type === "image" ? `![image](${url})` : `[file](${url})`;
      return emitContent(t, sink, (t.content && !t.content.endsWith("\n") ? "\n\n" : "") + md + "\n\n");
    }
    case "message_replace": {
      const answer = typeof ev.answer === "string" ? ev.answer : "";
      if (!t.stream) {
        // The replacement is the whole answer, including any <think> block or tool call it replaced.
        t.content = answer;
        t.bytes += utf8Length(answer);
        t.thinkOpen = false;
        t.scan?.drop();
        t.calls = undefined;
        return;
      }
      // Deltas already sent cannot be taken back: the replacement follows, clearly set apart.
      return emitContent(t, sink, t.content ? `\n\n---\n\n${answer}` : answer);
    }
    case "agent_thought": {
      const id = typeof ev.id === "string" ? ev.id : String(ev.position ?? "");
      const text = thoughtText(ev, t.agentText ?? t.content);
      const before = t.thoughts.get(id) ?? "";
      if (text === before || !text) return;
      t.thoughts.set(id, text);
      const fresh = text.startsWith(before) ? text.slice(before.length) : "\n" + text;
      const sep = !before && t.reasoning && !t.reasoning.endsWith("\n") ? "\n" : "";
      return emitReasoning(t, sink, sep + fresh, o.reasoning);
    }
    case "node_started":
    case "node_finished": {
      if (!o.reasoningNodes || !isObject(ev.data)) return;
      const d = ev.data;
      const title = String(d.title ?? d.node_type ?? "node");
      const line = ev.event === "node_started"
        ? `▶ ${title}\n`
        : d.status === "failed"
        ? `✗ ${title}: ${String(d.error ?? "failed")}\n`
        : `✓ ${title}\n`;
      return emitReasoning(t, sink, line, o.reasoning);
    }
    case "workflow_finished": {
      const d = isObject(ev.data) ? ev.data : {};
      if (typeof d.total_tokens === "number") t.workflowTokens = d.total_tokens;
      if (d.status === "failed") {
        t.error ??= apiError(
          "workflow_failed",
          `Dify (model ${o.app.model}) workflow failed: ${String(d.error ?? "unknown error")}`,
        );
        return;
      }
      if (t.type === "workflow") {
        if (!t.content && !t.scan?.pushed) emitContent(t, sink, workflowAnswer(d.outputs, o.app.output));
        t.ended = true;
      } else if (t.type === "chatflow") t.ended = true;
      return;
    }
    case "reasoning_chunk": {
      // Chatflow and workflow LLM nodes with separated reasoning: deltas per node, then one is_final.
      const d = isObject(ev.data) ? ev.data : {};
      const node = typeof d.node_id === "string" ? d.node_id : "";
      if (typeof d.reasoning === "string" && d.reasoning) {
        const sep = node !== t.reasoningNode && t.reasoning && !t.reasoning.endsWith("\n") ? "\n\n" : "";
        t.reasoningNode = node;
        emitReasoning(t, sink, sep + d.reasoning, o.reasoning);
      }
      // The node's thinking is over: an inline <think> block ends now, not with the first answer delta.
      if (d.is_final === true) closeThink(t, sink);
      return;
    }
    case "human_input_required": {
      if (isObject(ev.data)) (t.forms ??= []).push(humanForm(ev.data));
      return;
    }
    case "workflow_paused": {
      // Dify ends the stream here (no message_end): a complete answer that says what it waits for.
      const d = isObject(ev.data) ? ev.data : {};
      const nodes = Array.isArray(d.paused_nodes) ? d.paused_nodes.map(String) : [];
      const reasons = Array.isArray(d.reasons) ? d.reasons.filter(isObject).map(humanForm) : [];
      const forms = t.forms?.length
        ? t.forms
        : reasons.length
        ? reasons
        : nodes.map((node) => humanForm({ node_id: node }));
      const run = typeof d.workflow_run_id === "string" ? d.workflow_run_id : undefined;
      t.paused = { nodes: nodes.length ? nodes : forms.map((f) => f.node), run };
      closeThink(t, sink);
      const gap = t.content && !t.content.endsWith("\n") ? "\n\n" : "";
      emitContent(t, sink, gap + pausedText(forms));
      t.ended = true;
      return;
    }
    case "message_end": {
      const meta = isObject(ev.metadata) ? ev.metadata : {};
      t.usage = usageOf(meta.usage) ?? t.usage;
      t.ended = true;
      return;
    }
    case "error": {
      const status = Number(ev.status) || 500;
      t.error ??= difyError(status, ev, o.app, o.clientKey);
      return;
    }
    case "ping":
      return sink.ping();
  }
  // Every other event (workflow_started, tts_*, iteration_*, …) carries nothing for the answer;
  // human_input_form_filled and _timeout come only on a resumed stream, which the bridge never opens.
}

/** Closes an open `<think>` block and settles the final usage. */
export function finishTranslation(t: Translation, sink: Sink): void {
  closeThink(t, sink);
  if (t.scan) emitScanned(t, sink, t.scan.end());
  if (!t.usage && t.workflowTokens !== undefined) {
    t.usage = { prompt_tokens: 0, completion_tokens: t.workflowTokens, total_tokens: t.workflowTokens };
  }
}

// ─── Server-sent event lines ────────────────────────────────────────────────────────────────────

const LF = 0x0a;
const CR = 0x0d;
const MAX_LINE_BYTES = 64 * 1024 * 1024;

/**
 * Splits a byte stream into lines without decoding it first: UTF-8 never uses the bytes of CR or
 * LF inside a multi-byte character, so a line found in bytes is always whole text.
 *
 * - `\n`, `\r\n` and a lone `\r` each end a line; a `\r` at the end of one chunk followed by `\n`
 *   at the start of the next is one line end, not two.
 * - The caller may overwrite a chunk after `push` returns (a reused BYOB buffer): an unfinished line
 *   is copied out.
 * - `flush` hands over an unterminated last line.
 */
export class LineSplitter {
  /** An unfinished line's pieces, joined once when it ends: regrowing one buffer per read is quadratic. */
  #carry: Uint8Array[] | null = null;
  #carryBytes = 0;
  #skipLf = false;

  constructor(
    private onLine: (bytes: Uint8Array, start: number, end: number) => void,
    private maxLineBytes = MAX_LINE_BYTES,
  ) {}

  push(chunk: Uint8Array): void {
    let start = 0;
    const n = chunk.length;
    if (this.#skipLf && n && chunk[0] === LF) start = 1;
    this.#skipLf = false;
    // Dify ends its lines with LF alone: then the runtime's own search finds them, not a loop per byte.
    if (chunk.indexOf(CR, start) < 0) {
      for (let i = chunk.indexOf(LF, start); i >= 0; i = chunk.indexOf(LF, start)) {
        if (this.#carry) this.#emitCarry(chunk.subarray(start, i));
        else this.onLine(chunk, start, i);
        start = i + 1;
      }
      if (start < n) this.#keep(chunk.subarray(start));
      return;
    }
    for (let i = start; i < n; i++) {
      const b = chunk[i];
      if (b !== LF && b !== CR) continue;
      if (this.#carry) {
        this.#emitCarry(chunk.subarray(start, i));
      } else this.onLine(chunk, start, i);
      if (b === CR) {
        if (i + 1 === n) this.#skipLf = true;
        else if (chunk[i + 1] === LF) i++;
      }
      start = i + 1;
    }
    if (start < n) this.#keep(chunk.subarray(start));
  }

  flush(): void {
    if (this.#carry) this.#emitCarry(new Uint8Array(0));
  }

  #keep(rest: Uint8Array): void {
    this.#carryBytes += rest.length;
    if (this.#carryBytes > this.maxLineBytes) throw new Error(`an event line is over ${this.maxLineBytes} bytes`);
    (this.#carry ??= []).push(rest.slice());
  }

  #emitCarry(tail: Uint8Array): void {
    this.#keep(tail);
    const pieces = this.#carry!;
    let line = pieces[0];
    if (pieces.length > 1) {
      line = new Uint8Array(this.#carryBytes);
      let at = 0;
      for (const piece of pieces) {
        line.set(piece, at);
        at += piece.length;
      }
    }
    this.#carry = null;
    this.#carryBytes = 0;
    this.onLine(line, 0, line.length);
  }
}

const utf8 = new TextDecoder();

/** `data:` → the event's JSON object; `event: ping` → a ping; anything else (id:, retry:, comments) → null. */
export function parseSseLine(bytes: Uint8Array, start: number, end: number): Record<string, unknown> | "ping" | null {
  if (end - start < 5) return null;
  // "data:"
  if (
    bytes[start] === 0x64 && bytes[start + 1] === 0x61 && bytes[start + 2] === 0x74 && bytes[start + 3] === 0x61 &&
    bytes[start + 4] === 0x3a
  ) {
    let from = start + 5;
    if (bytes[from] === 0x20) from++;
    if (from >= end) return null;
    try {
      const value = JSON.parse(utf8.decode(bytes.subarray(from, end)));
      return isObject(value) ? value : null;
    } catch {
      return null;
    }
  }
  // "event: ping"
  if (bytes[start] === 0x65 && end - start >= 11 && utf8.decode(bytes.subarray(start, end)).trim() === "event: ping") {
    return "ping";
  }
  return null;
}

// ─── Reading Dify: the watchdog and the event reader ─────────────────────────────────────────────
// One timer serves every open exchange: a per-event timer reset would cost more than the events.

/** Something due at `at` (the watchdog's clock): see `Watchdog.deadline`. */
interface Deadline {
  at: number;
  expire: () => void;
}

export class Watchdog {
  private open = new Set<Exchange>();
  private deadlines = new Set<Deadline>();
  private timer: ReturnType<typeof setInterval> | undefined;
  private tickMs: number;

  constructor(private limits: ExchangeLimits, private now: () => number) {
    const shortest = Math.min(
      limits.keepaliveMs || Infinity,
      limits.upstreamTimeoutMs || Infinity,
      limits.upstreamIdleMs || Infinity,
      limits.bodyTimeoutMs || Infinity,
    );
    this.tickMs = Math.max(10, Math.min(1000, Number.isFinite(shortest) ? shortest / 4 : 1000));
  }

  get size(): number {
    return this.open.size;
  }

  get exchanges(): Iterable<Exchange> {
    return this.open;
  }

  add(ex: Exchange): void {
    this.open.add(ex);
    this.wake();
  }

  /** The tick stops itself once nothing is left to watch: a request costs no timer of its own. */
  delete(ex: Exchange): void {
    this.open.delete(ex);
  }

  /** Calls `expire` about `ms` from now (to a tick) unless the returned cancel runs first. */
  deadline(ms: number, expire: () => void): () => void {
    const d: Deadline = { at: this.now() + ms, expire };
    this.deadlines.add(d);
    this.wake();
    return () => void this.deadlines.delete(d);
  }

  private wake(): void {
    this.timer ??= setInterval(() => this.tick(), this.tickMs);
  }

  private tick(): void {
    if (!this.open.size && !this.deadlines.size) {
      clearInterval(this.timer);
      this.timer = undefined;
      return;
    }
    const now = this.now();
    for (const d of this.deadlines) {
      if (now < d.at) continue;
      this.deadlines.delete(d);
      d.expire();
    }
    const { keepaliveMs } = this.limits;
    for (const ex of this.open) {
      const overdue = ex.overdue(now, this.limits);
      if (overdue) ex.abort(overdue);
      if (keepaliveMs && ex.keepalive && now - Math.max(ex.lastWrite, ex.started) >= keepaliveMs) ex.keepalive();
    }
  }
}

/**
 * Dify's event stream for one answer, read one chunk at a time into its translation. Whoever
 * needs output drives it: the hold before a stream commits, the client's reads after, or a loop
 * to the end for `stream: false`.
 */
export class DifyEvents {
  #lines: LineSplitter;
  #sawEvent = false;
  #over = false;
  #reading?: Promise<boolean>;
  /** Why the answer ended early, once `next` has returned false (undefined: it completed). */
  outcome?: ApiError;

  constructor(
    private reader: ChunkReader,
    readonly t: Translation,
    sink: Sink,
    o: TranslateOptions,
    private ex: Exchange,
    private maxAnswerBytes = Infinity,
  ) {
    // One event can be as large as the answer (workflow outputs), escaped: up to 6 bytes per character.
    const maxLine = Math.min(MAX_LINE_BYTES, 6 * maxAnswerBytes + 65_536);
    this.#lines = new LineSplitter((bytes, start, end) => {
      const ev = parseSseLine(bytes, start, end);
      if (ev === "ping") sink.ping();
      else if (ev) {
        this.#sawEvent = true;
        applyDifyEvent(t, ev, sink, o);
      }
    }, maxLine);
  }

  /**
   * Reads and translates one chunk; false once the answer is over, complete or not (see `outcome`).
   * A call while a read is in flight shares it: the hold, the writing loop and a client gone take turns.
   */
  next(): Promise<boolean> {
    return this.#reading ??= this.#next();
  }

  async #next(): Promise<boolean> {
    if (this.#over) return false;
    const { t, ex } = this;
    try {
      const chunk = await this.reader.read();
      if (!chunk) {
        this.#lines.flush();
        return this.#end();
      }
      this.#sawEvent = false;
      this.#lines.push(chunk);
      if (this.#sawEvent) ex.lastEvent = ex.now();
      if (t.bytes > this.maxAnswerBytes) {
        ex.abort(apiError("answer_too_large", `the answer is over ${this.maxAnswerBytes} bytes (MAX_ANSWER_BYTES)`));
      } else if (ex.goneAt !== undefined && t.taskId) ex.abort(CLIENT_GONE);
      if (t.error || ex.upstream.signal.aborted) return this.#end();
      return true;
    } catch (e) {
      const reason = ex.upstream.signal.reason;
      this.outcome = reason instanceof ApiError ? reason : t.error ??
        apiError("upstream_broken", `the connection to Dify broke mid-answer: ${(e as Error)?.message ?? e}`);
      this.#over = true;
      return false;
    } finally {
      this.#reading = undefined;
    }
  }

  /** Reads to the end of the answer; the error it ended with, if any. */
  async drain(): Promise<ApiError | undefined> {
    while (await this.next());
    return this.outcome;
  }

  #end(): false {
    this.#over = true;
    const { t, ex } = this;
    const reason = ex.upstream.signal.reason;
    if (reason instanceof ApiError) this.outcome = reason;
    else if (t.error) this.outcome = t.error;
    else if (!t.ended) {
      this.outcome = apiError(
        "incomplete_stream",
        `Dify's stream ended before the answer was complete (${t.bytes} bytes of answer received, no message_end)`,
      );
    }
    return false;
  }
}

/** Reads Dify's event stream to its end into the translation; the error it ended with, if any. */
export function pump(
  reader: ChunkReader,
  t: Translation,
  sink: Sink,
  o: TranslateOptions,
  ex: Exchange,
  maxAnswerBytes?: number,
): Promise<ApiError | undefined> {
  return new DifyEvents(reader, t, sink, o, ex, maxAnswerBytes).drain();
}

// ─── Output formats ─────────────────────────────────────────────────────────────────────────────
// One translated answer, written the way the client's API wants it. A route picks the format; the
// streaming core below knows nothing of chunks or events.

/** How one answer is written for the client: the frames of a stream, or one JSON object (`stream: false`). */
interface AnswerFormat {
  /** Frames that open a committed stream (chat: the role chunk). */
  open(): string;
  content(text: string): string;
  reasoning(text: string): string;
  /** The frames of one whole call of a client's function (chat: a `tool_calls` delta; Responses: a `function_call` item). */
  toolCall(call: ToolCall): string;
  /** Frames that end a complete answer (chat: the finish chunk, usage when asked, `[DONE]`). */
  close(t: Translation): string;
  /** The frames for an error once the stream is committed; before that, errors are HTTP statuses. */
  error(e: ApiError): string;
  /** The whole answer as one JSON body. */
  object(t: Translation): unknown;
  /** `close` repeats the whole text (`t.content`, `t.reasoning`), so a stream must keep it. */
  readonly keepsText?: boolean;
}

const CHUNK_TAIL = `},"logprobs":null,"finish_reason":null}]}\n\n`;
const NO_USAGE: Usage = { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 };

const SSE_DONE = "data: [DONE]\n\n";

export function errorFrame(e: ApiError): string {
  return `data: ${errorJson(e)}\n\n`;
}

/** A chat `tool_calls` entry; streamed, each is one whole delta with its `index` (the SDKs join deltas by it). */
function chatToolCall(call: ToolCall) {
  return { id: call.id, type: "function", function: { name: call.name, arguments: call.arguments } };
}

/** An answer that called tools ends with `tool_calls`: that is how clients know to run them. */
function finishReason(t: Translation): "tool_calls" | "stop" {
  return t.calls?.length ? "tool_calls" : "stop";
}

/** Chat completions: pre-built chunk text, so each delta costs one JSON.stringify and a concat. */
export class ChatFormat implements AnswerFormat {
  private head: string;
  private envelope: string;
  private calls = 0;

  constructor(
    private id: string,
    private created: number,
    private model: string,
    private options: { includeUsage: boolean; reasoningContent: boolean },
  ) {
    this.envelope = `{"id":"${id}","object":"chat.completion.chunk","created":${created},"model":${
      JSON.stringify(model)
    },`;
    this.head = `data: ${this.envelope}"choices":[{"index":0,"delta":{`;
  }
  open(): string {
    return this.head + `"role":"assistant","content":""` + CHUNK_TAIL;
  }
  content(text: string): string {
    return this.head + `"content":` + JSON.stringify(text) + CHUNK_TAIL;
  }
  reasoning(text: string): string {
    return this.head + `"reasoning_content":` + JSON.stringify(text) + CHUNK_TAIL;
  }
  toolCall(call: ToolCall): string {
    return this.head + `"tool_calls":` + JSON.stringify([{ index: this.calls++, ...chatToolCall(call) }]) + CHUNK_TAIL;
  }
  close(t: Translation): string {
    const finish = this.head + `},"logprobs":null,"finish_reason":"${finishReason(t)}"}]}\n\n`;
    if (!this.options.includeUsage) return finish + SSE_DONE;
    return finish + `data: ${this.envelope}"choices":[],"usage":${JSON.stringify(t.usage ?? NO_USAGE)}}\n\n` + SSE_DONE;
  }
  error(e: ApiError): string {
    return errorFrame(e);
  }
  /** The aggregated `chat.completion` object. */
  object(t: Translation) {
    const calls = t.calls ?? [];
    // As OpenAI answers a call without words: content null.
    const message: Record<string, unknown> = {
      role: "assistant",
      content: calls.length && !t.content ? null : t.content,
    };
    if (this.options.reasoningContent && t.reasoning) message.reasoning_content = t.reasoning;
    if (calls.length) message.tool_calls = calls.map(chatToolCall);
    return {
      id: this.id,
      object: "chat.completion",
      created: this.created,
      model: this.model,
      choices: [{ index: 0, message, logprobs: null, finish_reason: finishReason(t) }],
      usage: t.usage ?? NO_USAGE,
    };
  }
}

/** One output item of a Responses answer as it streams: the answer's text, or agent reasoning. */
interface OutputItem {
  kind: "message" | "reasoning" | "function_call";
  id: string;
  index: number;
  text: string;
  /** A `function_call` item's call. */
  call?: ToolCall;
  /** `"item_id":…,"output_index":…,` — the start of every event about this item. */
  at: string;
  /** What a delta frame of this item has between its sequence number and its text. */
  deltaAt?: string;
  /** The complete item's JSON, once its `output_item.done` is written: `response.completed` repeats it. */
  done?: string;
}

/** Server-side failures a retry cannot fix: the same answer would be as large, or as slow, again. */
const FINAL_SERVER_ERRORS = new Set(["answer_too_large", "answer_timeout"]);

/**
 * The code of a failed response, as clients read it: Codex resends the request 5 more times after
 * `server_error` or `rate_limit_exceeded`, so only what a retry may fix (a 5xx, a 429) says so.
 */
function failedCode(e: ApiError): "server_error" | "rate_limit_exceeded" | "invalid_prompt" {
  if (e.status === 429) return "rate_limit_exceeded";
  return e.status >= 500 && !FINAL_SERVER_ERRORS.has(e.code ?? "") ? "server_error" : "invalid_prompt";
}

function responseUsage(u: Usage = NO_USAGE) {
  return {
    input_tokens: u.prompt_tokens,
    input_tokens_details: { cached_tokens: 0 },
    output_tokens: u.completion_tokens,
    output_tokens_details: { reasoning_tokens: 0 },
    total_tokens: u.total_tokens,
  };
}

function outputText(text: string) {
  return { type: "output_text", annotations: [], logprobs: [], text };
}

function summaryText(text: string) {
  return { type: "summary_text", text };
}

/** A `function_call` output item; its arguments are empty until it is done, as OpenAI streams it. */
function functionCallItem(id: string, call: ToolCall, status: "in_progress" | "completed" | "incomplete") {
  const args = status === "in_progress" ? "" : call.arguments;
  return { id, type: "function_call", status, arguments: args, call_id: call.id, name: call.name };
}

let defaultSettings: ResponseEcho | undefined;

/** The settings a response echoes when the request leaves them all out: the parser's own defaults. */
function defaultEcho(): ResponseEcho {
  return defaultSettings ??= parseResponsesRequest({ model: "m", input: "x" }, new Headers(), {
    maxMessages: 1,
    maxParts: 1,
  }).echo;
}

let defaultSettingsJson: string | undefined;

/** The echoed settings that differ from the defaults, as JSON (undefined: none); `json`: the settings' own JSON. */
function echoChanges(echo: ResponseEcho, json: string): string | undefined {
  if (json === (defaultSettingsJson ??= JSON.stringify(defaultEcho()))) return undefined;
  const defaults = defaultEcho() as unknown as Record<string, unknown>;
  let changed: Record<string, unknown> | undefined;
  for (const [key, value] of Object.entries(echo)) {
    const d = defaults[key];
    if (value === d || (typeof value === "object" && JSON.stringify(value) === JSON.stringify(d))) continue;
    (changed ??= {})[key] = value;
  }
  return changed && JSON.stringify(changed);
}

/** The start of a delta frame, up to its sequence number, and its end after the text, by the kind of its item. */
const DELTA_HEADS = {
  message: `event: response.output_text.delta\ndata: {"type":"response.output_text.delta","sequence_number":`,
  reasoning:
    `event: response.reasoning_summary_text.delta\ndata: {"type":"response.reasoning_summary_text.delta","sequence_number":`,
};
const DELTA_TAILS = { message: `,"logprobs":[]}\n\n`, reasoning: "}\n\n" };

/**
 * The Responses API (`POST /v1/responses`): `event:` + `data:` frames in the documented order, each
 * with the next `sequence_number`. Agent reasoning is a `reasoning` item (a summary, which Codex
 * shows) and the answer a `message` item; when reasoning comes between parts of the answer, the
 * open item is closed and a new one opened, so no event names an item that is not open.
 */
export class ResponsesFormat implements AnswerFormat {
  private sequence = 0;
  private items: OutputItem[] = [];
  private current?: OutputItem;
  /** The response object as `error` or `object` built it. */
  final?: ReturnType<ResponsesFormat["response"]>;
  /** The output items of the complete response as `response.completed` carried them (JSON, comma-separated). */
  private outputJson?: string;
  /** `completed_at`, once the response is complete. */
  private completedAt?: number;
  /** The echoed settings' JSON, serialised once per response. */
  private settingsJson?: string;
  /** The response object's JSON from `"incomplete_details"` to its `"output":[`. */
  private middle?: string;

  constructor(
    private id: string,
    private created: number,
    private model: string,
    private echo: ResponseEcho,
    /** REASONING=reasoning_content: reasoning is an output item (with `think` it is inline in the text). */
    private reasoningItems: boolean,
  ) {}

  open(): string {
    const response = this.responseJson("in_progress", "");
    return this.frame("response.created", `"response":${response}`) +
      this.frame("response.in_progress", `"response":${response}`);
  }
  content(text: string): string {
    return this.delta("message", text);
  }
  reasoning(text: string): string {
    return this.delta("reasoning", text);
  }
  /** A `function_call` item, whole: added, its arguments (one delta), done. */
  toolCall(call: ToolCall): string {
    let frames = this.end();
    const index = this.items.length;
    const id = `fc_${this.id.slice(this.id.indexOf("_") + 1)}_${index}`;
    const at = `"item_id":"${id}","output_index":${index},`;
    const item: OutputItem = { kind: "function_call", id, index, text: "", at, call };
    this.items.push(item);
    const args = JSON.stringify(call.arguments);
    frames += this.frame(
      "response.output_item.added",
      `"output_index":${index},"item":${JSON.stringify(this.item(item, "in_progress"))}`,
    );
    frames += this.frame("response.function_call_arguments.delta", `${at}"delta":${args}`);
    frames += this.frame(
      "response.function_call_arguments.done",
      `${at}"name":${JSON.stringify(call.name)},"arguments":${args}`,
    );
    item.done = JSON.stringify(this.item(item, "completed"));
    return frames + this.frame("response.output_item.done", `"output_index":${index},"item":${item.done}`);
  }
  close(t: Translation): string {
    // An empty answer is still a message, as in the aggregated object; an answer that calls tools need not be.
    let frames = this.end();
    if (!this.items.some((i) => i.kind !== "reasoning")) frames += this.start("message") + this.end();
    this.outputJson = this.items.map((i) => i.done ?? JSON.stringify(this.item(i, "completed"))).join(",");
    return frames +
      this.frame("response.completed", `"response":${this.responseJson("completed", this.outputJson, t.usage)}`);
  }
  error(e: ApiError): string {
    const output = this.items.map((i) => this.item(i, i === this.current ? "incomplete" : "completed"));
    this.final = this.response("failed", output, undefined, { code: failedCode(e), message: e.message });
    return this.frame("response.failed", `"response":${JSON.stringify(this.final)}`) +
      this.frame(
        "error",
        `"code":${JSON.stringify(e.code)},"message":${JSON.stringify(e.message)},"param":${JSON.stringify(e.param)}`,
      );
  }
  /** The complete response as kept for `GET /v1/responses/{id}` (`keptJson` writes it again). */
  kept(t: Translation): KeptResponse {
    this.outputJson ??= JSON.stringify(this.object(t).output).slice(1, -1);
    const kept: KeptResponse = { a: this.created, z: this.completedAt!, m: this.model, o: this.outputJson };
    const changes = echoChanges(this.echo, this.settingsJson ??= JSON.stringify(this.echo));
    if (changes) kept.e = changes;
    if (t.usage) kept.n = t.usage;
    return kept;
  }
  /** A kept response's JSON: the same bytes as its `response.completed` event, or its aggregated body. */
  static keptJson(id: string, k: KeptResponse): string {
    const echo = k.e ? { ...defaultEcho(), ...JSON.parse(k.e) } : defaultEcho();
    const format = new ResponsesFormat(id, k.a, k.m, echo, false);
    format.completedAt = k.z;
    return format.responseJson("completed", k.o, k.n);
  }
  object(t: Translation) {
    // Built once: the stored copy and the client's body are the same object.
    if (this.final) return this.final;
    const output: unknown[] = [];
    const suffix = this.id.slice(this.id.indexOf("_") + 1);
    if (this.reasoningItems && t.reasoning) {
      output.push({ id: `rs_${suffix}_0`, type: "reasoning", summary: [summaryText(t.reasoning)] });
    }
    if (t.content || !t.calls?.length) {
      output.push({
        id: `msg_${suffix}_${output.length}`,
        type: "message",
        status: "completed",
        content: [outputText(t.content)],
        role: "assistant",
      });
    }
    for (const call of t.calls ?? []) output.push(functionCallItem(`fc_${suffix}_${output.length}`, call, "completed"));
    this.final = this.response("completed", output, t.usage);
    return this.final;
  }

  /** The `response` object with every field the SDKs type, the request's settings echoed. */
  private response(
    status: "in_progress" | "completed" | "failed",
    output: unknown[],
    usage?: Usage,
    error: { code: string; message: string } | null = null,
  ) {
    return {
      id: this.id,
      object: "response" as const,
      created_at: this.created,
      status,
      background: false,
      completed_at: status === "completed" ? (this.completedAt ??= Math.floor(Date.now() / 1000)) : null,
      error,
      incomplete_details: null,
      ...this.echo,
      max_tool_calls: null,
      model: this.model,
      output,
      service_tier: "default",
      top_logprobs: 0,
      usage: status === "in_progress" ? null : responseUsage(usage),
    };
  }

  /**
   * `response`'s JSON (the same fields in the same order) around output items already in JSON: their
   * text is not serialised again, and the echoed settings only once per response.
   */
  private responseJson(status: "in_progress" | "completed", output: string, usage?: Usage): string {
    const completedAt = status === "completed" ? (this.completedAt ??= Math.floor(Date.now() / 1000)) : null;
    this.middle ??= `"incomplete_details":null,${(this.settingsJson ??= JSON.stringify(this.echo)).slice(1, -1)},` +
      `"max_tool_calls":null,"model":${JSON.stringify(this.model)},"output":[`;
    const usageJson = status === "in_progress" ? "null" : JSON.stringify(responseUsage(usage));
    return `{"id":${JSON.stringify(this.id)},"object":"response","created_at":${this.created},"status":"${status}",` +
      `"background":false,"completed_at":${completedAt},"error":null,${this.middle}${output}],` +
      `"service_tier":"default","top_logprobs":0,"usage":${usageJson}}`;
  }

  private frame(type: string, fields: string): string {
    return `event: ${type}\ndata: {"type":"${type}","sequence_number":${this.sequence++},${fields}}\n\n`;
  }

  /** A delta frame: opens the item first if another kind is open. */
  private delta(kind: "message" | "reasoning", text: string): string {
    const opening = this.current?.kind === kind ? "" : this.end() + this.start(kind);
    const item = this.current!;
    item.text += text;
    return opening + DELTA_HEADS[kind] + this.sequence++ + item.deltaAt + JSON.stringify(text) + DELTA_TAILS[kind];
  }

  /** `output_item.added` and the item's first (empty) part. */
  private start(kind: OutputItem["kind"]): string {
    const index = this.items.length;
    const id = `${kind === "message" ? "msg" : "rs"}_${this.id.slice(this.id.indexOf("_") + 1)}_${index}`;
    const at = `"item_id":"${id}","output_index":${index},`;
    const deltaAt = `,${at}"${kind === "message" ? "content" : "summary"}_index":0,"delta":`;
    const item: OutputItem = { kind, id, index, text: "", at, deltaAt };
    this.items.push(item);
    this.current = item;
    const added = this.frame(
      "response.output_item.added",
      `"output_index":${index},"item":${JSON.stringify(this.item(item, "in_progress"))}`,
    );
    if (kind === "message") {
      return added +
        this.frame(
          "response.content_part.added",
          `${item.at}"content_index":0,"part":${JSON.stringify(outputText(""))}`,
        );
    }
    return added +
      this.frame(
        "response.reasoning_summary_part.added",
        `${item.at}"summary_index":0,"part":${JSON.stringify(summaryText(""))}`,
      );
  }

  /** The `…done` events of the open item, if one is open. */
  private end(): string {
    const item = this.current;
    if (!item) return "";
    this.current = undefined;
    // The text is escaped once: the part, the item and `response.completed` carry the same JSON.
    const text = JSON.stringify(item.text);
    let frames: string;
    if (item.kind === "message") {
      const part = `{"type":"output_text","annotations":[],"logprobs":[],"text":${text}}`;
      frames = this.frame("response.output_text.done", `${item.at}"content_index":0,"text":${text},"logprobs":[]`) +
        this.frame("response.content_part.done", `${item.at}"content_index":0,"part":${part}`);
      item.done = `{"id":"${item.id}","type":"message","status":"completed","content":[${part}],"role":"assistant"}`;
    } else {
      const part = `{"type":"summary_text","text":${text}}`;
      frames = this.frame("response.reasoning_summary_text.done", `${item.at}"summary_index":0,"text":${text}`) +
        this.frame("response.reasoning_summary_part.done", `${item.at}"summary_index":0,"part":${part}`);
      item.done = `{"id":"${item.id}","type":"reasoning","summary":[${part}]}`;
    }
    return frames + this.frame("response.output_item.done", `"output_index":${item.index},"item":${item.done}`);
  }

  private item(item: OutputItem, status: "in_progress" | "completed" | "incomplete") {
    if (item.call) return functionCallItem(item.id, item.call, status);
    if (item.kind === "reasoning") {
      return { id: item.id, type: "reasoning", summary: status === "in_progress" ? [] : [summaryText(item.text)] };
    }
    const content = status === "in_progress" ? [] : [outputText(item.text)];
    return { id: item.id, type: "message", status, content, role: "assistant" };
  }
}

// ─── Streaming an answer ────────────────────────────────────────────────────────────────────────

/** Output frames not yet written, built by the answer's format from translated deltas. */
export class Frames implements Sink {
  text: string;

  constructor(private format: AnswerFormat) {
    this.text = format.open();
  }
  content(text: string): void {
    this.text += this.format.content(text);
  }
  reasoning(text: string): void {
    this.text += this.format.reasoning(text);
  }
  toolCall(call: ToolCall): void {
    this.text += this.format.toolCall(call);
  }
  ping(): void {
    this.text += ": ping\n\n";
  }
  take(): string {
    const text = this.text;
    this.text = "";
    return text;
  }
}

/**
 * `holding`: nothing sent yet — an early Dify error can still be an HTTP status. `open`: the
 * response is out and Dify is read as the client takes the answer. `closed`: ended, or the client left.
 */
type StreamState = "holding" | "open" | "closed";

/** Where a streamed answer's bytes go: the response body, as the runtime makes it (see `Runtime.streamBody`). */
interface BodyWriter {
  /** Queues bytes; the promise, if any, settles when the client has taken enough to make room for more. */
  write(bytes: Uint8Array): Promise<void> | void;
  /** A write now would not wait: keepalives go only into an empty pipe. */
  ready(): boolean;
  close(): void;
  /** Ends the body abruptly (the client is not reading: a polite end would never be read either). */
  error(reason: ApiError): void;
}

/** Makes a response body that calls `start` with its writer once the runtime wants bytes, and `cancel` if the client leaves. */
type StreamBody = (start: (writer: BodyWriter) => void, cancel: () => void) => ReadableStream<Uint8Array>;

/** A standard pull stream (Deno): one chunk queued at most; the next pull means the client took it. */
export const pullStreamBody: StreamBody = (start, cancel) => {
  let room: (() => void) | undefined;
  const free = () => {
    const resolve = room;
    room = undefined;
    resolve?.();
  };
  return new ReadableStream<Uint8Array>({
    start(c) {
      start({
        write(bytes) {
          c.enqueue(bytes);
          if ((c.desiredSize ?? 1) <= 0) return new Promise<void>((resolve) => room = resolve);
        },
        ready: () => (c.desiredSize ?? 0) > 0,
        close() {
          try {
            c.close();
          } catch { /* the client is gone */ }
        },
        error(reason) {
          try {
            c.error(reason);
          } catch { /* the client is gone */ }
          free();
        },
      });
    },
    pull: free,
    cancel() {
      free();
      cancel();
    },
  });
};

/**
 * The life of one streamed answer. Held until the answer says something, fails, or the keepalive
 * time passes; then open: one loop writes the frames and reads Dify again only once the client has
 * taken them, so a client that stops reading stops the reading of Dify and holds one chunk at most;
 * then closed by the format's closing frames, an error frame, or the client leaving.
 */
export class AnswerStream {
  #state: StreamState = "holding";
  #frames: Frames;
  #commit!: () => void;
  #committed = new Promise<boolean>((resolve) => this.#commit = () => resolve(true));
  #writer?: BodyWriter;
  /** The writing loop waits for the client to take what it was sent. */
  #waitingForClient = false;
  #end!: (error: ApiError | undefined) => void;
  /** Settles once the answer is over and nothing more will be written: the error it ended with, if any. */
  readonly ended = new Promise<ApiError | undefined>((resolve) => this.#end = resolve);

  constructor(private events: DifyEvents, frames: Frames, private format: AnswerFormat, private ex: Exchange) {
    this.#frames = frames;
    ex.keepalive = () => this.#keepalive();
    ex.upstream.signal.addEventListener("abort", () => this.#aborted(), { once: true });
  }

  get state(): StreamState {
    return this.#state;
  }

  /**
   * Reads Dify until the answer says something, ends, or the keepalive time passes. Returns the
   * error to answer with as an HTTP status when the answer failed before saying anything;
   * otherwise the stream is open and `body` is ready.
   */
  async hold(): Promise<ApiError | undefined> {
    const t = this.events.t;
    while (this.#state === "holding") {
      const more = await Promise.race([this.events.next(), this.#committed]);
      if (this.#state !== "holding") break;
      if (!more && this.events.outcome && !t.bytes) {
        this.#state = "closed";
        this.#end(this.events.outcome);
        return this.events.outcome;
      }
      if (!more || t.bytes || t.ended) this.#state = "open";
    }
    // The client left while the answer was held: it gets nothing, `ended` settles when Dify's task is stopped.
    return this.#state === "closed" ? CLIENT_GONE : undefined;
  }

  /** The response body, written by one loop: frames out, then Dify read again once the client took them. */
  body(make: StreamBody): ReadableStream<Uint8Array> {
    return make((writer) => {
      this.#writer = writer;
      this.#run(writer);
    }, () => this.leave());
  }

  /** The client is gone: nothing more is written; Dify's task is stopped as soon as it is named. */
  leave(): void {
    if (this.#state === "closed") return;
    this.#state = "closed";
    this.ex.stalledSince = undefined;
    this.ex.leave(this.events.t.taskId);
    // Nobody reads for the client any more: read on until Dify names its task (or the watchdog's grace ends).
    (async () => {
      while (!this.ex.upstream.signal.aborted && await this.events.next());
      this.#end(this.events.outcome ?? CLIENT_GONE);
    })();
  }

  /** One loop, one await per step (every await costs a turn of the event loop's microtasks, per chunk). */
  async #run(writer: BodyWriter): Promise<void> {
    const ex = this.ex;
    while (this.#state === "open") {
      const text = this.#frames.take();
      if (!text) {
        const more = await this.events.next();
        if (this.#state !== "open") return;
        if (!more) return this.#close(writer);
        continue;
      }
      let room: Promise<void> | void;
      try {
        room = writer.write(textEncoder.encode(text));
      } catch {
        return this.leave();
      }
      ex.lastWrite = ex.now();
      if (!room) continue;
      // Dify is not read again until the client takes this: if it never does, the watchdog drops it.
      ex.stalledSince = ex.lastWrite;
      this.#waitingForClient = true;
      await room;
      this.#waitingForClient = false;
      ex.stalledSince = undefined;
    }
  }

  /** Dify's answer is over: the format's closing frames, or an error frame after what was said. */
  #close(writer: BodyWriter): void {
    const error = this.events.outcome;
    let text = this.#frames.take();
    if (!error) {
      finishTranslation(this.events.t, this.#frames);
      text += this.#frames.take() + this.format.close(this.events.t);
    } else if (error.code !== "client_closed") text += this.format.error(error);
    this.#state = "closed";
    try {
      writer.write(textEncoder.encode(text));
      writer.close();
    } catch { /* the client is gone */ }
    this.#end(error);
  }

  /** A limit, the watchdog or shutdown ended the call while the loop waits for a client that does not read. */
  #aborted(): void {
    if (this.#state !== "open" || !this.#waitingForClient) return;
    const reason = this.ex.upstream.signal.reason as ApiError;
    this.#state = "closed";
    this.ex.stalledSince = undefined;
    this.#writer?.error(reason);
    this.#end(reason);
  }

  /** The watchdog's call when nothing was written for KEEPALIVE_SECONDS. */
  #keepalive(): void {
    if (this.#state === "holding") {
      this.#state = "open";
      this.#commit();
      return;
    }
    const writer = this.#writer;
    if (this.#state !== "open" || !writer?.ready()) return;
    try {
      writer.write(textEncoder.encode(": keepalive\n\n"));
      this.ex.lastWrite = this.ex.now();
    } catch { /* the loop will see the client is gone */ }
  }
}

// ─── HTTP plumbing: bodies, responses, client keys ──────────────────────────────────────────────

interface LogEntry {
  [field: string]: unknown;
}

/** CORS on every response: what a browser checks on the answer itself (the rest only on the preflight). */
const CORS_HEADERS: Readonly<Record<string, string>> = {
  "access-control-allow-origin": "*",
  "access-control-expose-headers": "x-dify-conversation-id, x-request-id",
};
/** A preflight's answer (`OPTIONS`): which methods and headers a browser may send, for a day. */
const PREFLIGHT_HEADERS: Readonly<Record<string, string>> = {
  ...CORS_HEADERS,
  "access-control-allow-methods": "GET, POST, DELETE, OPTIONS",
  "access-control-allow-headers":
    "authorization, content-type, x-session-id, session-id, session_id, thread-id, x-session-affinity, x-client-request-id, x-dify-conversation-id, x-openwebui-chat-id, openai-organization, openai-project, x-stainless-arch, x-stainless-lang, x-stainless-os, x-stainless-package-version, x-stainless-retry-count, x-stainless-runtime, x-stainless-runtime-version, x-stainless-timeout",
  "access-control-max-age": "86400",
};

const SSE_HEADERS: Readonly<Record<string, string>> = {
  "content-type": "text/event-stream; charset=utf-8",
  "cache-control": "no-cache",
  "x-accel-buffering": "no",
  ...CORS_HEADERS,
};

export function jsonResponse(status: number, body: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json", ...CORS_HEADERS, ...headers },
  });
}

function errorResponse(e: ApiError, headers: Record<string, string> = {}): Response {
  return new Response(errorJson(e), {
    status: e.status,
    headers: { "content-type": "application/json", ...CORS_HEADERS, ...e.headers, ...headers },
  });
}

/** Starts a time limit: calls `expire` after `ms` unless the returned cancel runs first. */
type DeadlineClock = (ms: number, expire: () => void) => () => void;

const strictUtf8 = new TextDecoder("utf-8", { fatal: true });

function parseJsonBytes(bytes: Uint8Array): unknown {
  let text: string;
  try {
    text = strictUtf8.decode(bytes);
  } catch {
    throw badRequest("the request body is not valid UTF-8", null, "invalid_encoding");
  }
  try {
    return JSON.parse(text);
  } catch (e) {
    throw badRequest(`the request body is not valid JSON: ${(e as Error).message}`, null, "invalid_json");
  }
}

function bodyTimeout(timeoutMs: number): ApiError {
  return apiError("request_timeout", `request body not received within ${timeoutMs / 1000} s`);
}

/** A chunked body's bytes, failing with `tooBig()` as soon as they pass `limit`. */
async function readCapped(reader: ReadableStreamDefaultReader<Uint8Array>, limit: number, tooBig: () => ApiError) {
  const chunks: Uint8Array[] = [];
  let size = 0;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    size += value.length;
    if (size > limit) throw tooBig();
    chunks.push(value);
  }
  if (chunks.length === 1) return chunks[0];
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const c of chunks) {
    bytes.set(c, at);
    at += c.length;
  }
  return bytes;
}

/** A request body's bytes, within the size limit and the time limit. */
async function readBody(req: Request, limit: number, timeoutMs: number, deadline: DeadlineClock): Promise<Uint8Array> {
  const tooBig = () => apiError("request_too_large", `request body is over ${limit} bytes (MAX_BODY_BYTES)`);
  const length = req.headers.get("content-length");
  if (Number(length) > limit) throw tooBig();
  // With a declared length the runtime holds the body to it, so one read does (fewer crossings
  // than a loop, and no stream object is made); a chunked body is counted as it arrives.
  let reader: ReadableStreamDefaultReader<Uint8Array> | undefined;
  if (length === null) {
    if (!req.body) throw badRequest("the request has no body");
    reader = req.body.getReader();
  } else if (Number(length) === 0) throw badRequest("the request has no body");
  let cancel = () => {};
  // BODY_TIMEOUT_SECONDS=0 means no limit, as every other *_SECONDS=0 does.
  const late = new Promise<never>((_, reject) => {
    if (timeoutMs > 0) cancel = deadline(timeoutMs, () => reject(bodyTimeout(timeoutMs)));
  });
  const read = reader ? readCapped(reader, limit, tooBig) : req.arrayBuffer().then((buffer) => new Uint8Array(buffer));
  try {
    return await Promise.race([read, late]);
  } catch (e) {
    reader?.cancel().catch(() => {});
    if (e instanceof ApiError) throw e;
    throw badRequest("the request body could not be read");
  } finally {
    cancel();
  }
}

/** Reads a request body within the size limit and the time limit, as JSON. */
export async function readJsonBody(
  req: Request,
  limit: number,
  timeoutMs: number,
  deadline: DeadlineClock,
): Promise<unknown> {
  return parseJsonBytes(await readBody(req, limit, timeoutMs, deadline));
}

/** Reads a `multipart/form-data` body (an audio upload) within the size limit and the time limit. */
async function readFormBody(
  req: Request,
  limit: number,
  timeoutMs: number,
  deadline: DeadlineClock,
): Promise<FormData> {
  const type = req.headers.get("content-type") ?? "";
  if (!/^multipart\/form-data\s*;/i.test(type)) {
    throw badRequest("the request body must be multipart/form-data (with `file` and `model`)");
  }
  const bytes = await readBody(req, limit, timeoutMs, deadline);
  try {
    return await new Response(bytes as BodyInit, { headers: { "content-type": type } }).formData();
  } catch {
    throw badRequest("the multipart/form-data body could not be parsed");
  }
}

/** Equal digests, compared without an early exit. */
function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  let diff = a.length ^ b.length;
  for (let i = 0; i < a.length && i < b.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

function bearerToken(req: Request): string | undefined {
  const header = req.headers.get("authorization");
  if (header) {
    const match = /^\s*bearer\s+(\S+)\s*$/i.exec(header);
    return match ? match[1] : undefined;
  }
  return req.headers.get("x-api-key")?.trim() || undefined;
}

/** The server: a plain `(Request) => Response` handler plus what shutdown needs. */

/** The request's path, or "" when its target is no URL (Bun passes `CONNECT host:port` through). */
/** Paths by request URL: most requests name one of a few URLs, and a lookup costs less than a parse. */
const requestPaths = new Map<string, string>();

function requestPath(url: string): string {
  let path = requestPaths.get(url);
  if (path !== undefined) return path;
  try {
    path = new URL(url).pathname;
  } catch {
    path = "";
  }
  if (requestPaths.size >= 256) requestPaths.clear();
  requestPaths.set(url, path);
  return path;
}

/** A percent-encoded path segment; malformed encoding is the client's 400, not a 500. */
function pathPart(segment: string): string {
  try {
    return decodeURIComponent(segment);
  } catch {
    throw badRequest(`malformed percent-encoding in the path: ${preview(segment)}`);
  }
}

function methodNotAllowed(allowed: string): ApiError {
  return apiError("method_not_allowed", `method not allowed; use ${allowed}`, { headers: { allow: allowed } });
}

// ─── Metrics ────────────────────────────────────────────────────────────────────────────────────
// What `GET /metrics` shows, in Prometheus' text format. Counting costs a map lookup or two per
// request; the text is only built when scraped.

/** Upper bounds, in seconds, of the latency histograms' buckets. */
const LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300];
/** The most label sets one metric keeps: some label values come from clients (models, error codes). */
const MAX_SERIES = 1000;
const OVERFLOW = "other";

/** A label value as the text format writes it: backslash, double quote and line feed escaped. */
function labelValue(v: string): string {
  return v.replace(/[\\"\n]/g, (c) => (c === "\n" ? "\\n" : `\\${c}`));
}

/** One metric: its series by label values; a series holds a counter's value, or a histogram's cells. */
class MetricFamily {
  readonly #series: { values: string[]; cells: number[] }[] = [];
  /** The series by their label values, one map level per label: counting builds no key string. */
  readonly #index = new Map<string, unknown>();

  constructor(
    readonly name: string,
    readonly help: string,
    readonly labels: string[],
    /** A histogram's bucket bounds; none: a counter. */
    readonly buckets?: number[],
  ) {}

  /** A histogram's cells: the count per bucket (not cumulative), then the overflow bucket, the sum and the count. */
  #cells(values: string[]): number[] {
    const last = values.length - 1;
    let found: Map<string, unknown> | undefined = this.#index;
    for (let i = 0; i < last && found; i++) found = found.get(values[i]) as Map<string, unknown> | undefined;
    const cells = found?.get(values[last]) as number[] | undefined;
    if (cells) return cells;
    const full = this.#series.length >= MAX_SERIES;
    if (full && values.some((v) => v !== OVERFLOW)) return this.#cells(values.map(() => OVERFLOW));
    return this.#newSeries(values);
  }

  #newSeries(values: string[]): number[] {
    let level = this.#index;
    const last = values.length - 1;
    for (let i = 0; i < last; i++) {
      let next = level.get(values[i]) as Map<string, unknown> | undefined;
      if (!next) level.set(values[i], next = new Map());
      level = next;
    }
    const cells: number[] = new Array(this.buckets ? this.buckets.length + 3 : 1).fill(0);
    this.#series.push({ values, cells });
    level.set(values[last], cells);
    return cells;
  }

  add(values: string[], n = 1): void {
    this.#cells(values)[0] += n;
  }

  observe(values: string[], value: number): void {
    const bounds = this.buckets!;
    const cells = this.#cells(values);
    let i = 0;
    while (i < bounds.length && value > bounds[i]) i++;
    cells[i]++;
    cells[bounds.length + 1] += value;
    cells[bounds.length + 2]++;
  }

  render(): string {
    const type = this.buckets ? "histogram" : "counter";
    let text = `# HELP ${this.name} ${this.help}\n# TYPE ${this.name} ${type}\n`;
    for (const { values, cells } of this.#series) {
      const labels = this.labels.map((l, i) => `${l}="${labelValue(values[i])}"`);
      if (!this.buckets) {
        text += `${this.name}{${labels.join(",")}} ${cells[0]}\n`;
        continue;
      }
      let cumulative = 0;
      for (let i = 0; i <= this.buckets.length; i++) {
        cumulative += cells[i];
        const le = i < this.buckets.length ? String(this.buckets[i]) : "+Inf";
        text += `${this.name}_bucket{${[...labels, `le="${le}"`].join(",")}} ${cumulative}\n`;
      }
      const n = this.buckets.length;
      text += `${this.name}_sum{${labels.join(",")}} ${cells[n + 1]}\n${this.name}_count{${labels.join(",")}} ${
        cells[n + 2]
      }\n`;
    }
    return text;
  }
}

/** The route a request path counts under: a known route's template, or `other` (paths are the client's). */
export function routeLabel(pathname: string): string {
  const path = pathname.replace(/\/+$/, "").replace(/^\/v1(?=\/|$)/, "") || "/";
  if (path === "/health") return "/healthz";
  if (["/", "/healthz", "/metrics"].includes(path)) return path;
  if (["/chat/completions", "/responses", "/models", "/audio/transcriptions", "/audio/speech"].includes(path)) {
    return `/v1${path}`;
  }
  if (path.startsWith("/responses/")) return "/v1/responses/{id}";
  if (path.startsWith("/models/")) return "/v1/models";
  if (path.startsWith("/conversations/")) return "/v1/conversations/{user}";
  return OVERFLOW;
}

/** What an answer's log entry says, as the metrics read it. */
interface AnsweredEntry {
  path?: unknown;
  model?: unknown;
  status?: unknown;
  ms?: unknown;
  ttft_ms?: unknown;
  conversation_via?: unknown;
  recovered?: unknown;
}

/** The bridge's counters and histograms, bumped by the server as requests are answered. */
export class Metrics {
  #requests = new MetricFamily(
    "dify_openai_requests_total",
    "HTTP requests by route and response status.",
    ["route", "status"],
  );
  #answers = new MetricFamily(
    "dify_openai_answers_total",
    "Answers (chat completions, responses) by route, model and status; a stream that failed after it began counts under its error's status.",
    ["route", "model", "status"],
  );
  #firstByte = new MetricFamily(
    "dify_openai_time_to_first_byte_seconds",
    "From the request to the first byte of the answer's content (stream: false: to the whole answer).",
    ["route", "model"],
    LATENCY_BUCKETS,
  );
  #lastByte = new MetricFamily(
    "dify_openai_time_to_last_byte_seconds",
    "From the request to the answer's last byte.",
    ["route", "model"],
    LATENCY_BUCKETS,
  );
  #errors = new MetricFamily(
    "dify_openai_errors_total",
    "Errors by code: Dify's own (dify_<status> when Dify names none) and the bridge's (upstream_timeout, invalid_request_error, ...).",
    ["code"],
  );
  #tokens = new MetricFamily(
    "dify_openai_tokens_total",
    "Tokens Dify reported per model: in = prompt, out = completion.",
    ["model", "direction"],
  );
  #storeWrites = new MetricFamily(
    "dify_openai_store_writes_total",
    "Conversation store writes by operation and result (ok, failed).",
    ["op", "result"],
  );
  #conversations = new MetricFamily(
    "dify_openai_conversations_total",
    "Answered turns by conversation: started (new), continued (found by history, user, session, explicit id or response id), recovered (Dify had lost it: started again with the history).",
    ["outcome", "via"],
  );
  /** Answers in flight (the server sets it). */
  openStreams: () => number = () => 0;
  /** Route labels by request path (a bounded memo: paths are the client's). */
  #routes = new Map<string, string>();

  /** `model` as a label: the served model ids, or any name the catch-all app answers to. */
  constructor(private modelLabel: (model: string) => string = (model) => model) {}

  /** `handler`, with every request counted by route and status. */
  counted(handler: (req: Request) => Promise<Response>): (req: Request) => Promise<Response> {
    return async (req) => {
      const res = await handler(req);
      this.#requests.add([this.#route(requestPath(req.url)), String(res.status)]);
      return res;
    };
  }

  /** One answer is over (its log line is written): its status, times, tokens, error and conversation. */
  answered(entry: AnsweredEntry, t: Translation, error?: ApiError): void {
    const route = this.#route(String(entry.path ?? ""));
    const model = this.modelLabel(String(entry.model ?? ""));
    this.#answers.add([route, model, String(entry.status ?? error?.status ?? 200)]);
    if (typeof entry.ttft_ms === "number") this.#firstByte.observe([route, model], entry.ttft_ms / 1000);
    if (typeof entry.ms === "number") this.#lastByte.observe([route, model], entry.ms / 1000);
    if (error) this.#errors.add([error.code ?? error.type]);
    if (t.usage) {
      this.#tokens.add([model, "in"], t.usage.prompt_tokens || 0);
      this.#tokens.add([model, "out"], t.usage.completion_tokens || 0);
    }
    if (typeof entry.conversation_via === "string") {
      const via = entry.conversation_via;
      const outcome = entry.recovered ? "recovered" : via === "new" ? "started" : "continued";
      this.#conversations.add([outcome, via]);
    }
  }

  #route(pathname: string): string {
    let route = this.#routes.get(pathname);
    if (route === undefined) {
      if (this.#routes.size >= 256) this.#routes.clear();
      this.#routes.set(pathname, route = routeLabel(pathname));
    }
    return route;
  }

  /** A request failed before any answer: its error, by code. */
  failed(error: ApiError): void {
    this.#errors.add([error.code ?? error.type]);
  }

  /** `store`, with its writes counted (a check-and-set that lost to another writer is not a failure). */
  countWrites(store: Store): Store {
    const count = <T>(op: string, write: () => Promise<T>): Promise<T> => {
      let pending: Promise<T>;
      try {
        pending = write();
      } catch (e) {
        pending = Promise.reject(e);
      }
      return pending.then((value) => {
        this.#storeWrites.add([op, "ok"]);
        return value;
      }, (e) => {
        this.#storeWrites.add([op, "failed"]);
        throw e;
      });
    };
    return {
      get: <T>(key: StoreKey) => store.get<T>(key),
      set: (key, value, ttlMs) => count("set", () => store.set(key, value, ttlMs)),
      setIf: (key, expected, value, ttlMs, also, soon) =>
        count("set_if", () => store.setIf(key, expected, value, ttlMs, also, soon)),
      delete: (key) => count("delete", () => store.delete(key)),
      close: () => store.close(),
    };
  }

  /** Everything counted, in Prometheus' text exposition format (0.0.4). */
  text(): string {
    const open = "# HELP dify_openai_open_streams Answers in flight.\n# TYPE dify_openai_open_streams gauge\n" +
      `dify_openai_open_streams ${this.openStreams()}\n`;
    const families = [
      this.#requests,
      this.#answers,
      this.#firstByte,
      this.#lastByte,
      this.#errors,
      this.#tokens,
      this.#storeWrites,
      this.#conversations,
    ];
    return open + families.map((f) => f.render()).join("");
  }

  /**
   * `GET /metrics`: with METRICS_KEY set, only that key; otherwise the keys of every route
   * (`authenticate` throws for a wrong one).
   */
  respond(req: Request, metricsKey: string | undefined, authenticate: (req: Request) => unknown): Response {
    if (req.method !== "GET" && req.method !== "HEAD") throw methodNotAllowed("GET");
    if (metricsKey) {
      const token = bearerToken(req);
      if (!token || !sameBytes(sha256(token), sha256(metricsKey))) {
        throw apiError(
          "invalid_api_key",
          token ? "invalid metrics key" : "missing metrics key: send Authorization: Bearer <METRICS_KEY>",
          {
            headers: { "www-authenticate": "Bearer" },
          },
        );
      }
    } else authenticate(req);
    return new Response(req.method === "HEAD" ? null : this.text(), {
      headers: { "content-type": "text/plain; version=0.0.4; charset=utf-8", "cache-control": "no-store" },
    });
  }
}

/** Metrics whose model label is a served model id, or the catch-all app's for any other name (names are the client's). */
export function metricsFor(config: Config): Metrics {
  const fallback = config.catchAll?.model ?? OVERFLOW;
  return new Metrics((model) => (config.apps.has(model) ? model : fallback));
}

// ─── The bridge: routes, and one answer from request to record ───────────────────────────────────

export interface Deps {
  store: ConversationStore;
  /** One JSON line per request. */
  log: (line: string) => void;
  warn: (message: string) => void;
  fetch: typeof fetch;
  /** How Dify's body is read: a BYOB reader on Deno, the default reader on Bun. */
  bodyReader: (body: ReadableStream<Uint8Array>) => ChunkReader;
  /** How a streamed answer's body is made: a pull stream on Deno, a direct stream on Bun. */
  streamBody?: StreamBody;
  now: () => number;
  /** Counts for `GET /metrics` (none: no such route). */
  metrics?: Metrics;
}

const NO_SINK: Sink = { content() {}, reasoning() {}, ping() {} };

/** What a route hands the answer: the parsed request, who asks, and how the answer is written. */
interface Ask {
  request: ChatRequest;
  /** The client's id: a hash of its key. */
  client: string;
  token?: string;
  entry: LogEntry;
  format: AnswerFormat;
  /** Entries a complete answer stores in its turn's record write (Responses: the response, unless `store: false`). */
  kept?: (r: Route, res: Resolution, t: Translation) => [StoreKey, unknown][];
}

export function createServer(config: Config, deps: Deps) {
  const watchdog = new Watchdog(config, deps.now);
  const watchdogDeadline: DeadlineClock = (ms, expire) => watchdog.deadline(ms, expire);
  const proxyDigests = config.proxyKeys.map(sha256);
  const detected = new Map<string, Promise<AppType>>();
  /** The served model ids; with only DIFY_API_KEY, the one name every model routes to. */
  const modelIds = config.catchAll ? [config.catchAll.model] : [...config.apps.keys()];
  const conversations: ConversationContext = { config, store: deps.store, continuing: new Set() };
  const parameters = new ParametersCache(deps.fetch, deps.now);
  let active = 0;
  if (deps.metrics) deps.metrics.openStreams = () => active;

  /** Accepted tokens → client id, so a hash is computed once per key rather than per request. */
  const accepted = new Map<string, string>();

  /** The caller's identity (a hash of its key), after checking it against PROXY_API_KEYS. */
  function authenticate(req: Request): { client: string; token?: string } {
    const token = bearerToken(req);
    const known = accepted.get(token ?? "");
    if (known) return { client: known, token };
    const digest = sha256(token ?? "");
    if (config.proxyKeys.length) {
      let ok = false;
      for (const d of proxyDigests) ok = sameBytes(d, digest) || ok;
      if (!token || !ok) {
        throw apiError(
          "invalid_api_key",
          token ? "invalid API key" : "missing API key: send Authorization: Bearer <key>",
          {
            headers: { "www-authenticate": "Bearer" },
          },
        );
      }
    }
    const client = digest.subarray(0, 12).toString("base64url");
    if (accepted.size >= 10_000) accepted.clear();
    accepted.set(token ?? "", client);
    return { client, token };
  }

  function findApp(model: string): AppConfig {
    const app = config.apps.get(model) ?? config.catchAll;
    if (!app) {
      throw apiError(
        "model_not_found",
        `The model ${preview(model)} does not exist. Available: ${[...config.apps.keys()].join(", ")}`,
        { param: "model" },
      );
    }
    return app;
  }

  async function appType(app: AppConfig, key: string): Promise<AppType> {
    if (app.type) return app.type;
    const id = `${app.url}\u0000${key}`;
    let found = detected.get(id);
    if (!found) {
      found = (async () => {
        try {
          const res = await deps.fetch(`${app.url}/info`, {
            headers: { authorization: `Bearer ${key}` },
            signal: AbortSignal.timeout(10_000),
          });
          const info = res.ok ? await res.json() : await res.body?.cancel();
          const type = isObject(info) ? DIFY_MODES[String(info.mode)] : undefined;
          if (type) return type;
        } catch { /* unknown: treat as a chat app and ask again next time */ }
        detected.delete(id);
        return "chat" as AppType;
      })();
      detected.set(id, found);
    }
    return await found;
  }

  async function route(model: string, token: string | undefined): Promise<Route> {
    const app = findApp(model);
    let key = app.key;
    const clientKey = !key;
    if (!key && !config.proxyKeys.length && token?.startsWith("app-")) key = token;
    if (!key) {
      throw apiError(
        "missing_dify_key",
        `no Dify key for model ${model}: configure DIFY_API_KEY / DIFY_APPS, or send your Dify app key as Authorization: Bearer app-…`,
      );
    }
    return { app, key, clientKey, type: await appType(app, key) };
  }

  /** `POST /v1/chat/completions`. */
  async function chat(req: Request, entry: LogEntry): Promise<Response> {
    const id = `chatcmpl-${crypto.randomUUID().replaceAll("-", "")}`;
    entry.id = id;
    const { client, token } = authenticate(req);
    const body = await readJsonBody(req, config.bodyLimit, config.bodyTimeoutMs, watchdogDeadline);
    const request = parseChatRequest(body, req.headers, config);
    const format = new ChatFormat(id, Math.floor(Date.now() / 1000), request.model, {
      includeUsage: request.includeUsage,
      reasoningContent: config.reasoning === "reasoning_content",
    });
    return await answer(req, { request, client, token, entry, format });
  }

  /** `POST /v1/responses`: the same answer, written as the Responses API's events and objects. */
  async function responses(req: Request, entry: LogEntry): Promise<Response> {
    const id = `resp_${crypto.randomUUID().replaceAll("-", "")}`;
    entry.id = id;
    const { client, token } = authenticate(req);
    const body = await readJsonBody(req, config.bodyLimit, config.bodyTimeoutMs, watchdogDeadline);
    const request = parseResponsesRequest(body, req.headers, config);
    const format = new ResponsesFormat(
      id,
      Math.floor(Date.now() / 1000),
      request.model,
      request.echo,
      config.reasoning === "reasoning_content",
    );
    // `store: false` (Codex) keeps nothing: the client resends its history, as OpenAI's API expects.
    const kept = (r: Route, res: Resolution, t: Translation): [StoreKey, unknown][] => [
      [storeKeys.response(client, r.app.model, id), storedResponse(t.conversationId, res.user, format.kept(t))],
    ];
    return await answer(req, { request, client, token, entry, format, kept: request.store ? kept : undefined });
  }

  /** `GET` or `DELETE /v1/responses/{id}`: a response this bridge stored for this client. */
  async function storedResponseRoute(req: Request, id: string): Promise<Response> {
    const { client, token } = authenticate(req);
    if (req.method === "GET" && new URL(req.url).searchParams.get("stream") === "true") {
      throw unsupported("stream", "a stored response is returned whole; its events are not replayed");
    }
    const keys = modelIds.map((scope) => storeKeys.response(client, scope, id));
    const values = await Promise.all(keys.map((key) => deps.store.get<StoredResponse>(key)));
    const found = values.findIndex(Boolean);
    const stored = values[found];
    if (!stored) throw responseNotFound(id);
    if (req.method === "DELETE") {
      // Forgetting for real (`?dify=true`, FORGET_AT_DIFY): the Dify conversation holding the text goes first.
      const atDify = forgetsAtDify(req) && stored.c !== undefined;
      const gone = atDify && await deleteAtDify(req, modelIds[found], token, { c: stored.c!, u: stored.u });
      await deps.store.delete(keys[found]);
      const dify = atDify ? { dify_deleted: gone ? [stored.c] : [] } : {};
      return jsonResponse(200, { id, object: "response.deleted", deleted: true, ...dify });
    }
    const json = stored.k ? ResponsesFormat.keptJson(id, stored.k) : stored.o;
    if (json === undefined) {
      const why = `was over ${RESPONSE_OBJECT_BYTES} bytes, too large to keep (it can still be continued)`;
      throw apiError("response_not_found", `response ${preview(id)} ${why}`);
    }
    return new Response(json, { headers: { "content-type": "application/json", ...CORS_HEADERS } });
  }

  /**
   * One non-streaming Dify call on a client's behalf (audio, delete): aborted when the client
   * leaves, or when Dify says nothing for UPSTREAM_TIMEOUT_SECONDS. `idle` re-arms the limit
   * (UPSTREAM_IDLE_SECONDS) for each read of a streamed answer.
   */
  function difyCall(req: Request) {
    const ac = new AbortController();
    const gone = () => ac.abort(CLIENT_GONE);
    req.signal?.addEventListener("abort", gone, { once: true });
    const limit = (ms: number, name: "upstream_timeout" | "upstream_idle_timeout", setting: string) =>
      ms
        ? watchdogDeadline(ms, () => ac.abort(apiError(name, `Dify sent nothing within ${ms / 1000} s (${setting})`)))
        : () => {};
    let cancel = limit(config.upstreamTimeoutMs, "upstream_timeout", "UPSTREAM_TIMEOUT_SECONDS");
    return {
      signal: ac.signal,
      idle() {
        cancel();
        cancel = limit(config.upstreamIdleMs, "upstream_idle_timeout", "UPSTREAM_IDLE_SECONDS");
      },
      done() {
        cancel();
        req.signal?.removeEventListener("abort", gone);
      },
    };
  }

  /** A clear 400 when the app has this speech feature off: newer Dify skips its own check when a voice is named. */
  async function requireSpeech(r: Route, feature: "speechToText" | "textToSpeech"): Promise<void> {
    const p = await parameters.get(r);
    if (!p || p[feature]) return;
    const what = feature === "speechToText" ? "speech to text" : "text to speech";
    throw apiError(
      "speech_disabled",
      `the Dify app behind model ${r.app.model} has ${what} turned off: enable it in the app's Features in Dify`,
      { param: "model" },
    );
  }

  /** `POST /v1/audio/transcriptions`: OpenAI's multipart form → Dify's `/audio-to-text`. */
  async function transcription(req: Request, entry: LogEntry): Promise<Response> {
    const { token } = authenticate(req);
    const form = await readFormBody(req, config.bodyLimit, config.bodyTimeoutMs, watchdogDeadline);
    const ask = await parseTranscriptionForm(form);
    entry.model = ask.model;
    const r = await route(ask.model, token);
    await requireSpeech(r, "speechToText");
    const release = takeSlot();
    const call = difyCall(req);
    try {
      const text = await transcribe(deps.fetch, r, ask.user ?? config.defaultUser, ask.file, call.signal);
      if (ask.format === "json") return jsonResponse(200, { text });
      return new Response(text, { headers: { "content-type": "text/plain; charset=utf-8", ...CORS_HEADERS } });
    } finally {
      call.done();
      release();
    }
  }

  /** `POST /v1/audio/speech`: Dify's `/text-to-audio`, streamed back as it arrives, with Dify's audio type. */
  async function speech(req: Request, entry: LogEntry): Promise<Response> {
    const { token } = authenticate(req);
    const ask = parseSpeechRequest(await readJsonBody(req, config.bodyLimit, config.bodyTimeoutMs, watchdogDeadline));
    entry.model = ask.model;
    const r = await route(ask.model, token);
    await requireSpeech(r, "textToSpeech");
    const release = takeSlot();
    const call = difyCall(req);
    const end = () => {
      call.done();
      release();
    };
    let upstream: ReadableStreamDefaultReader<Uint8Array>;
    let type: string;
    try {
      const user = ask.user ?? config.defaultUser;
      const audio = await speak(deps.fetch, r, { text: ask.input, voice: ask.voice, user }, call.signal);
      type = audio.headers.get("content-type") || "audio/mpeg";
      upstream = audio.body!.getReader();
    } catch (e) {
      end();
      throw e;
    }
    // Pull-driven: Dify's audio is read only as fast as the client takes it.
    const body = new ReadableStream<Uint8Array>({
      async pull(c) {
        call.idle();
        try {
          const { value, done } = await upstream.read();
          if (!done) return c.enqueue(value);
          c.close();
        } catch (e) {
          c.error(e);
        }
        end();
      },
      cancel() {
        upstream.cancel().catch(() => {});
        end();
      },
    });
    return new Response(body, { headers: { "content-type": type, "cache-control": "no-cache", ...CORS_HEADERS } });
  }

  /**
   * `DELETE /v1/conversations/{user}`: forgets the user's running conversation (CONVERSATION_MODE=user),
   * and with `?dify=true` (or FORGET_AT_DIFY) deletes it at Dify too, under the Dify user it was held for.
   */
  async function forget(req: Request, user: string): Promise<Response> {
    const { client, token } = authenticate(req);
    const atDify = forgetsAtDify(req);
    const deleted: string[] = [];
    await Promise.all(modelIds.map(async (scope) => {
      const key = storeKeys.user(client, scope, user);
      const bound = atDify ? await deps.store.get<Binding>(key) : null;
      // At Dify first: if that fails, the binding stays, so that asking again can finish the job.
      if (bound && await deleteAtDify(req, scope, token, bound)) deleted.push(bound.c);
      await deps.store.delete(key);
    }));
    const dify = atDify ? { dify_deleted: deleted } : {};
    return jsonResponse(200, { object: "conversation.deleted", user, deleted: true, ...dify });
  }

  /** Whether a DELETE also deletes at Dify: `?dify=true` or `?dify=false`, else FORGET_AT_DIFY. */
  function forgetsAtDify(req: Request): boolean {
    const asked = new URLSearchParams(req.url.split("?")[1]?.split("#")[0] ?? "").get("dify");
    return asked === null ? config.forgetAtDify : /^(1|true|yes|on)$/i.test(asked);
  }

  /** Deletes a conversation at Dify (app `scope`, under its Dify user); true if Dify had it. */
  async function deleteAtDify(req: Request, scope: string, token: string | undefined, held: Binding): Promise<boolean> {
    const call = difyCall(req);
    try {
      return await deleteDifyConversation(deps.fetch, await route(scope, token), held.c, held.u, call.signal);
    } finally {
      call.done();
    }
  }

  /** A concurrency slot for one answer; the returned function gives it back (once). */
  function takeSlot(): () => void {
    if (active >= config.maxConcurrentStreams) {
      throw apiError(
        "overloaded",
        `too many concurrent requests (MAX_CONCURRENT_STREAMS=${config.maxConcurrentStreams}); retry shortly`,
        { headers: { "retry-after": "1" } },
      );
    }
    active++;
    let held = true;
    return () => {
      if (held) active--;
      held = false;
    };
  }

  /**
   * Opens Dify's event stream for this turn. Dify may have lost the conversation (deleted,
   * expired, another Dify): then the turn starts over with the history replayed.
   */
  async function openDify(
    ask: Ask,
    r: Route,
    turn: Turn,
    res: Resolution,
    ex: Exchange,
    tools?: ToolTurn,
  ): Promise<{ upstream: Response; res: Resolution }> {
    const inputs: Record<string, unknown> = { ...ask.request.inputs };
    if (config.systemPrompt !== "drop" && turn.system.trim()) inputs.system_prompt ??= turn.system;
    // For apps that place the tools in their own prompt; an app without such an input ignores it.
    if (tools) inputs.tools ??= JSON.stringify(tools.ask.tools);
    // An input the app requires is missing: the client's 400, before a file or a run reaches Dify.
    const query = difyQuery(turn, !res.conversationId, config.systemPrompt);
    const sent = difyRequestBody(r.type, r.app, { query, user: res.user, inputs, files: [] }).inputs;
    const missing = missingInputs(await parameters.get(r), sent as Record<string, unknown>, r.app.model);
    if (missing) throw missing;
    const files = await difyFiles(deps.fetch, r, res.user, turn.files, ex.upstream.signal);
    const body = (resolution: Resolution) =>
      difyRequestBody(r.type, r.app, {
        query: difyQuery(turn, !resolution.conversationId, config.systemPrompt, tools),
        user: resolution.user,
        conversationId: resolution.conversationId,
        inputs,
        files,
      });
    try {
      return { upstream: await callDify(deps.fetch, r, body(res), ex), res };
    } catch (e) {
      const lost = res.conversationId;
      if (!(e instanceof ApiError) || e.code !== "conversation_not_found" || res.via === "explicit" || !lost) throw e;
      deps.store.delete(storeKeys.head(ask.client, r.app.model, lost));
      releaseConversation(conversations, res);
      const fresh: Resolution = { via: "new", user: res.user, head: null };
      ask.entry.recovered = true;
      return { upstream: await callDify(deps.fetch, r, body(fresh), ex), res: fresh };
    }
  }

  /** The client's tools on this turn, with the tool set the continued conversation had last. */
  async function toolTurnOf(ask: ToolAsk, res: Resolution, r: Route, client: string): Promise<ToolTurn> {
    const known = res.conversationId
      ? await deps.store.get<string>(storeKeys.tools(client, r.app.model, res.conversationId))
      : null;
    return { ask, hash: toolSetHash(ask.tools), known: known ?? undefined };
  }

  /** The conversation now has this tool set (the block went with this turn), unless it already had. */
  function recordToolSet(tools: ToolTurn, res: Resolution, conversation: string, r: Route, client: string): void {
    if (tools.known === tools.hash && res.conversationId === conversation) return;
    deps.store.set(storeKeys.tools(client, r.app.model, conversation), tools.hash);
  }

  /** The request's log line, once its answer is over. */
  function logAnswer(entry: LogEntry, ex: Exchange, t: Translation, turn: Turn, error: ApiError | undefined): void {
    entry.status = error?.status ?? 200;
    entry.ms = Math.round(deps.now() - ex.started);
    if (t.usage) {
      entry.prompt_tokens = t.usage.prompt_tokens;
      entry.completion_tokens = t.usage.completion_tokens;
    }
    if (error) entry.error = error.code;
    if (t.paused) entry.paused = t.paused;
    if (t.calls?.length) entry.tool_calls = t.calls.length;
    // Why text that looked like a call was not one: the app's LLM may not follow the format.
    if (t.scan?.notes.length) entry.tool_text = t.scan.notes;
    if (config.logContent) {
      entry.query = turn.query;
      entry.answer = t.content;
    }
    deps.log(JSON.stringify(entry));
    deps.metrics?.answered(entry, t, error);
  }

  /**
   * One answer, in named steps: route → resolve the conversation → open Dify's stream (recovering
   * a lost conversation) → stream or aggregate → record the turn, free the slot, log.
   */
  async function answer(req: Request, ask: Ask): Promise<Response> {
    const { request, entry, client } = ask;
    entry.model = request.model;
    entry.stream = request.stream;
    const r = await route(request.model, ask.token);
    entry.app_type = r.type;
    const toolMode = r.app.tools ?? config.tools;
    const tools = offeredTools(request.tools, toolMode, r.app.model);
    // Results go back in the format the app was told, even on a turn that offers no tools (`tool_choice: "none"`).
    const turn = buildTurn(request.messages, config.envelope, toolMode === "emulate");
    const release = takeSlot();
    const ex = new Exchange(deps.now);
    watchdog.add(ex);
    const keep = !request.stream || config.logContent || ask.format.keepsText === true;
    const t = newTranslation(r.type, request.stream, keep);
    if (tools) t.scan = new ToolCallScan(new Set(tools.tools.map((f) => f.name)), tools.parallel);
    let toolTurn: ToolTurn | undefined;
    // A streamed answer is not kept: its fingerprint for the next turn is made as it streams.
    const print = !keep && config.conversationMode === "history" && r.type !== "workflow" && r.type !== "completion"
      ? new AnswerPrint(turn.system, [...turn.history, ...turn.current])
      : undefined;
    if (print) t.tap = (text) => print.push(text);
    let stream: AnswerStream | undefined = undefined;
    const clientGone = () => stream ? stream.leave() : ex.leave(t.taskId);
    // Deno makes `req.signal` on first use, with an async op per request: a streamed answer over
    // before the watchdog's next tick never needs it (once open, its body hears of a client gone
    // from its cancel). An aggregated answer has no body to tell, so it listens from the start.
    let watching = false;
    const watch = () => {
      watching = true;
      if (req.signal?.aborted) clientGone();
      else req.signal?.addEventListener("abort", clientGone, { once: true });
    };
    const unwatch = request.stream ? watchdog.deadline(0, watch) : () => {};
    if (!request.stream) watch();
    let res: Resolution = { via: "new", user: "", head: null };
    /** The exchange is over: a complete turn is recorded, and what it held is freed. */
    const settle = (error: unknown) => {
      unwatch();
      if (watching) req.signal?.removeEventListener("abort", clientGone);
      watchdog.delete(ex);
      if (!error) recordTurn(conversations, request, turn, r, client, res, t, print, ask.kept?.(r, res, t));
      if (!error && toolTurn && t.conversationId) recordToolSet(toolTurn, res, t.conversationId, r, client);
      releaseConversation(conversations, res);
      release();
    };
    let upstream: Response;
    try {
      res = await resolveConversation(conversations, request, turn, r, client);
      toolTurn = tools && await toolTurnOf(tools, res, r, client);
      ({ upstream, res } = await openDify(ask, r, turn, res, ex, toolTurn));
    } catch (e) {
      settle(e);
      throw e;
    }
    entry.conversation_via = res.via;
    const reader = deps.bodyReader(upstream.body!);
    // Whatever ends the call early (client gone, a limit, shutdown), Dify keeps generating and
    // billing until its task is stopped.
    ex.upstream.signal.addEventListener("abort", () => {
      reader.cancel();
      if (t.taskId) stopTask(deps.fetch, r, t.taskId, res.user);
    }, { once: true });
    const options = translateOptions(r);
    const headers: Record<string, string> = { "x-request-id": String(entry.id) };

    if (!request.stream) {
      const error = await new DifyEvents(reader, t, NO_SINK, options, ex, config.maxAnswerBytes).drain();
      if (!error) finishTranslation(t, NO_SINK);
      settle(error);
      entry.ttft_ms = Math.round(deps.now() - ex.started);
      logAnswer(entry, ex, t, turn, error);
      if (error) return errorResponse(error, headers);
      if (t.conversationId) headers["x-dify-conversation-id"] = t.conversationId;
      return jsonResponse(200, ask.format.object(t), headers);
    }

    const frames = new Frames(ask.format);
    const events = new DifyEvents(reader, t, frames, options, ex, config.maxAnswerBytes);
    stream = new AnswerStream(events, frames, ask.format, ex);
    stream.ended.then((error) => {
      settle(error);
      logAnswer(entry, ex, t, turn, error);
    });
    const error = await stream.hold();
    if (error) return errorResponse(error, headers);
    entry.ttft_ms = Math.round(deps.now() - ex.started);
    if (t.conversationId) headers["x-dify-conversation-id"] = t.conversationId;
    return new Response(stream.body(deps.streamBody ?? pullStreamBody), { headers: { ...SSE_HEADERS, ...headers } });
  }

  /** Dify origins by app URL: parsed once, not per answer. */
  const origins = new Map<string, string>();

  function translateOptions(r: Route): TranslateOptions {
    let origin = origins.get(r.app.url);
    if (origin === undefined) origins.set(r.app.url, origin = new URL(r.app.url).origin);
    return {
      reasoning: config.reasoning,
      reasoningNodes: config.reasoningNodes,
      origin,
      app: r.app,
      clientKey: r.clientKey,
    };
  }

  async function handler(req: Request): Promise<Response> {
    const pathname = requestPath(req.url);
    const path = pathname.replace(/\/+$/, "").replace(/^\/v1(?=\/|$)/, "") || "/";
    const entry: LogEntry = { t: new Date().toISOString(), method: req.method, path: pathname };
    try {
      if (!pathname) throw badRequest(`the request target is not a path: ${preview(req.url)}`);
      if (req.method === "OPTIONS") return new Response(null, { status: 204, headers: PREFLIGHT_HEADERS });
      if (path === "/healthz" || path === "/health") {
        if (req.method !== "GET" && req.method !== "HEAD") throw methodNotAllowed("GET");
        return jsonResponse(200, { status: "ok", streams: active });
      }
      if (path === "/metrics" && deps.metrics) return deps.metrics.respond(req, config.metricsKey, authenticate);
      if (path === "/chat/completions") {
        if (req.method !== "POST") throw methodNotAllowed("POST");
        const response = await chat(req, entry);
        return response;
      }
      if (path === "/responses") {
        if (req.method !== "POST") throw methodNotAllowed("POST");
        return await responses(req, entry);
      }
      if (path.startsWith("/responses/")) {
        if (req.method !== "GET" && req.method !== "DELETE") throw methodNotAllowed("GET, DELETE");
        return await storedResponseRoute(req, pathPart(path.slice("/responses/".length)));
      }
      if (path === "/models" || path.startsWith("/models/")) {
        if (req.method !== "GET") throw methodNotAllowed("GET");
        authenticate(req);
        return models(pathPart(path.slice("/models/".length)));
      }
      if (path === "/audio/transcriptions" || path === "/audio/speech") {
        if (req.method !== "POST") throw methodNotAllowed("POST");
        const response = await (path === "/audio/speech" ? speech(req, entry) : transcription(req, entry));
        entry.status = response.status;
        deps.log(JSON.stringify(entry));
        return response;
      }
      if (path.startsWith("/conversations/")) {
        if (req.method !== "DELETE") throw methodNotAllowed("DELETE");
        return await forget(req, pathPart(path.slice("/conversations/".length)));
      }
      if (path === "/") {
        if (req.method !== "GET" && req.method !== "HEAD") throw methodNotAllowed("GET");
        const endpoints = [
          "/v1/chat/completions",
          "/v1/responses",
          "/v1/models",
          "/v1/audio/transcriptions",
          "/v1/audio/speech",
        ];
        return jsonResponse(200, { name: "dify-openai", endpoints });
      }
      throw apiError("not_found", `unknown route ${req.method} ${pathname}`);
    } catch (e) {
      const error = e instanceof ApiError
        ? e
        : apiError("internal_error", `internal error: ${(e as Error)?.message ?? e}`);
      if (!(e instanceof ApiError)) {
        deps.warn(`unexpected error on ${req.method} ${pathname}: ${(e as Error)?.stack ?? e}`);
      }
      deps.metrics?.failed(error);
      if (path === "/chat/completions" || path === "/responses" || path.startsWith("/audio/")) {
        entry.status = error.status;
        entry.error = error.code;
        deps.log(JSON.stringify(entry));
      }
      return errorResponse(error, entry.id ? { "x-request-id": String(entry.id) } : {});
    }
  }

  function models(id: string): Response {
    const model = (name: string) => ({ id: name, object: "model", created: 0, owned_by: "dify" });
    if (!id) return jsonResponse(200, { object: "list", data: modelIds.map(model) });
    if (config.catchAll || config.apps.has(id)) return jsonResponse(200, model(id));
    throw apiError("model_not_found", `The model ${preview(id)} does not exist`, { param: "model" });
  }

  return {
    handler: deps.metrics ? deps.metrics.counted(handler) : handler,
    get active() {
      return active;
    },
    /** Ends every open answer with an error frame (shutdown grace is over). */
    abortAll() {
      const reason = apiError("shutting_down", "the server is shutting down");
      for (const ex of watchdog.exchanges) ex.abort(reason);
    },
  };
}

// ─── Runtime edges: Deno or Bun ─────────────────────────────────────────────────────────────────
// Everything that differs between the two runtimes lives here: serving, environment, signals,
// storage and how Dify's body is read. The handler above is a plain (Request) => Response.

/** A reader over any stream's default reader (Bun's chunks are already large). */
function defaultReader(body: ReadableStream<Uint8Array>): ChunkReader {
  const reader = body.getReader();
  return {
    async read() {
      const { value, done } = await reader.read();
      return done ? null : value;
    },
    cancel: () => void reader.cancel().catch(() => {}),
  };
}

/** Bun's direct stream controller: `write` returns a promise while the socket is full. */
interface DirectController {
  write(data: Uint8Array): number | Promise<number>;
  close(error?: Error): void;
}

/**
 * Bun: a direct stream (`type: "direct"`), whose writes wait while the client is not reading. Bun
 * calls `pull` once; the body stays open until the promise it returns settles.
 */
const directStreamBody: StreamBody = (start, cancel) => {
  let gone = false;
  const source = {
    type: "direct",
    pull: (c: DirectController) =>
      new Promise<void>((done) => {
        let pending: Promise<unknown> | undefined;
        start({
          write(bytes) {
            // After the client left, Bun's writes return at once: the loop must not spin on them.
            if (gone) throw CLIENT_GONE;
            const written = c.write(bytes);
            if (!(written instanceof Promise)) return;
            pending = written;
            return written.then(() => void (pending = undefined));
          },
          ready: () => !pending && !gone,
          close() {
            c.close();
            done();
          },
          error(reason) {
            c.close(reason);
            done();
          },
        });
      }),
    cancel() {
      gone = true;
      cancel();
    },
  };
  return new ReadableStream(source as unknown as UnderlyingDefaultSource<Uint8Array>);
};

/** One reused 4 KiB buffer for every read: fewer allocations and crossings per event on Deno. */
export function byobReader(body: ReadableStream<Uint8Array>): ChunkReader {
  let reader: ReadableStreamBYOBReader;
  try {
    reader = body.getReader({ mode: "byob" });
  } catch {
    return defaultReader(body);
  }
  let buffer = new ArrayBuffer(4096);
  return {
    async read() {
      const { value, done } = await reader.read(new Uint8Array(buffer));
      if (done || !value) return null;
      buffer = value.buffer as ArrayBuffer;
      return value;
    },
    cancel: () => void reader.cancel().catch(() => {}),
  };
}

interface Served {
  port: number;
  /** Stops accepting; resolves when in-flight responses have finished. */
  shutdown(): Promise<void>;
}

/** How the runtime serves: the port, the idle-connection limit, and where its warnings go. */
interface ServeOptions {
  port: number;
  /** `Config.idleConnectionMs`: 0 keeps idle connections open. */
  idleConnectionMs: number;
  /** `Config.keepaliveMs`: how quiet a streaming answer can be. */
  keepaliveMs: number;
  warn: (message: string) => void;
}

type Handler = (req: Request) => Promise<Response>;

export interface Runtime {
  name: "deno" | "bun";
  env(): Env;
  serve(options: ServeOptions, handler: Handler, onListen: (port: number) => void): Served;
  onSignal(signal: "SIGTERM" | "SIGINT", listener: () => void): void;
  openStore(path: string, env: Env): Promise<Store>;
  bodyReader(body: ReadableStream<Uint8Array>): ChunkReader;
  streamBody: StreamBody;
  exit(code: number): never;
}

interface BunServer {
  port: number;
  stop(closeActive?: boolean): Promise<void> | void;
  /** This request's connection idle limit in seconds (0: none), replacing `idleTimeout`. */
  timeout(req: Request, seconds: number): void;
}

interface BunLike {
  serve(options: {
    port: number;
    hostname?: string;
    idleTimeout?: number;
    maxRequestBodySize?: number;
    development?: boolean;
    fetch(req: Request, server: BunServer): Promise<Response>;
    error?(e: unknown): Response;
  }): BunServer;
}

interface ProcessLike {
  env: Env;
  on(signal: string, listener: () => void): void;
  exit(code: number): never;
}

function dirOf(path: string): string {
  const i = path.lastIndexOf("/");
  return i > 0 ? path.slice(0, i) : "";
}

/** A write waiting for the next grouped commit; `expected` is checked only when `checked`. */
interface KvWrite {
  key: StoreKey;
  checked: boolean;
  expected: unknown;
  value: unknown;
  ttlMs: number;
  also: [StoreKey, unknown][];
  done: (ok: boolean) => void;
  fail: (e: unknown) => void;
}

/**
 * Writes per grouped commit, within Deno KV's per-commit limits (checks, mutations, bytes): a commit's
 * fixed cost is most of a small write's, so under load the more writes share one, the cheaper each is.
 */
const KV_BATCH = 64;
/** Writes per commit that read their expected value first: `getMany` takes 10 keys. */
const KV_READS = 10;
/** Value characters per commit, roughly (`roughChars`): a commit holds at most 800 KB, and a character up to 3 bytes. */
const KV_COMMIT_CHARS = 200_000;
/** How long a write waits for others to share its commit. */
const KV_GROUP_MS = 25;

/** A stored value's size as a commit counts it, roughly: the store's values are flat records of short fields. */
function roughChars(v: unknown): number {
  if (typeof v === "string") return v.length;
  if (!isObject(v)) return 16;
  let n = 16;
  for (const x of Object.values(v)) n += typeof x === "string" ? x.length : 16;
  return n;
}

/**
 * Store writes, grouped: a write waits up to KV_GROUP_MS (and while a commit is in flight) for
 * others, and they commit together. A commit on a file costs a disk sync or a transaction and
 * ~0.25 ms of CPU, most of a store's cost under load and still much of it one request at a time.
 */
class WriteGroup {
  #waiting: KvWrite[] = [];
  #committing = false;
  #timer: ReturnType<typeof setTimeout> | undefined;

  /** `commit` takes from the front of `waiting` the writes that can share one commit, and settles each. */
  constructor(private commit: (waiting: KvWrite[]) => Promise<void>) {}

  /** A plain write, grouped. */
  set(key: StoreKey, value: unknown, ttlMs: number): Promise<void> {
    return this.#add(key, false, null, value, ttlMs, []).then(() => {});
  }

  /** `Store.setIf`, grouped; `soon` commits without waiting for others (with those already waiting). */
  setIf(
    key: StoreKey,
    expected: unknown,
    value: unknown,
    ttlMs: number,
    also: [StoreKey, unknown][],
    soon = false,
  ): Promise<boolean> {
    return this.#add(key, true, expected, value, ttlMs, also, soon);
  }

  #add(
    key: StoreKey,
    checked: boolean,
    expected: unknown,
    value: unknown,
    ttlMs: number,
    also: [StoreKey, unknown][],
    soon = false,
  ): Promise<boolean> {
    return new Promise((done, fail) => {
      this.#waiting.push({ key, checked, expected, value, ttlMs, also, done, fail });
      if (soon) {
        clearTimeout(this.#timer);
        this.#timer = setTimeout(() => this.#drain(), 0);
      } else this.#timer ??= setTimeout(() => this.#drain(), KV_GROUP_MS);
    });
  }

  async #drain(): Promise<void> {
    this.#timer = undefined;
    if (this.#committing) return;
    this.#committing = true;
    try {
      while (this.#waiting.length) await this.commit(this.#waiting);
    } finally {
      this.#committing = false;
    }
  }
}

/** Adds a write's value and its `also` entries to an atomic operation. */
function setAll(op: Deno.AtomicOperation, w: KvWrite): void {
  const options = w.ttlMs ? { expireIn: w.ttlMs } : undefined;
  op.set(w.key, w.value, options);
  for (const [k, v] of w.also) op.set(k, v, options);
}

/** A store whose writes go through one WriteGroup: Deno KV's and SQLite's differ only in reads and commits. */
abstract class GroupedStore implements Store {
  protected abstract readonly writes: WriteGroup;
  abstract get<T>(key: StoreKey): Promise<T | null>;
  abstract delete(key: StoreKey): Promise<void>;
  abstract close(): void;
  set(key: StoreKey, value: unknown, ttlMs: number): Promise<void> {
    return this.writes.set(key, value, ttlMs);
  }
  setIf(
    key: StoreKey,
    expected: unknown,
    value: unknown,
    ttlMs: number,
    also: [StoreKey, unknown][] = [],
    soon = false,
  ): Promise<boolean> {
    return this.writes.setIf(key, expected, value, ttlMs, also, soon);
  }
}

export class DenoKvStore extends GroupedStore {
  protected readonly writes = new WriteGroup((waiting) => this.#commit(this.#nextBatch(waiting)));

  constructor(private kv: Deno.Kv) {
    super();
  }
  async get<T>(key: StoreKey): Promise<T | null> {
    return (await retrying(() => this.kv.get<T>(key))).value;
  }
  async delete(key: StoreKey): Promise<void> {
    await retrying(() => this.kv.delete(key));
  }
  close(): void {
    this.kv.close();
  }

  /** The next writes that can share a commit: a check must not depend on a write before it in it. */
  #nextBatch(waiting: KvWrite[]): KvWrite[] {
    const batch: KvWrite[] = [];
    const written = new Set<string>();
    let reads = 0;
    let chars = 0;
    for (const w of waiting) {
      const id = JSON.stringify(w.key);
      if (batch.length === KV_BATCH || (w.checked && written.has(id))) break;
      const read = w.checked && w.expected !== null;
      const size = roughChars(w.value) + w.also.reduce((n, [, v]) => n + roughChars(v), 0);
      if (batch.length && ((read && reads === KV_READS) || chars + size > KV_COMMIT_CHARS)) break;
      if (read) reads++;
      chars += size;
      batch.push(w);
      written.add(id);
      for (const [k] of w.also) written.add(JSON.stringify(k));
    }
    waiting.splice(0, batch.length);
    return batch;
  }

  async #commit(batch: KvWrite[]): Promise<void> {
    try {
      const op = this.kv.atomic();
      // "Absent" needs no read: a null versionstamp checks it inside the commit.
      const read = batch.filter((w) => w.checked && w.expected !== null);
      const current = read.length ? await this.kv.getMany(read.map((w) => w.key)) : [];
      const stale = new Set(read.filter((w, i) => !sameValue(current[i].value, w.expected)));
      read.forEach((w, i) => stale.has(w) || op.check(current[i]));
      const going = batch.filter((w) => !stale.has(w));
      for (const w of going) {
        if (w.checked && w.expected === null) op.check({ key: w.key, versionstamp: null });
        setAll(op, w);
      }
      if (going.length && !(await op.commit()).ok) throw new Error("a check failed");
      for (const w of batch) w.done(!stale.has(w));
    } catch {
      // A check that another writer made fail, or a limit: each write on its own, in order.
      for (const w of batch) await this.#commitOne(w);
    }
  }

  async #commitOne(w: KvWrite): Promise<void> {
    try {
      w.done(
        await retrying(async () => {
          const op = this.kv.atomic();
          if (w.checked) {
            const current = await this.kv.get(w.key);
            if (!sameValue(current.value, w.expected)) return false;
            op.check(current);
          }
          setAll(op, w);
          return (await op.commit()).ok;
        }),
      );
    } catch (e) {
      w.fail(e);
    }
  }
}

/** SQLite through bun:sqlite, in WAL mode so several Bun processes can share one file. */
export class SqliteStore extends GroupedStore {
  // deno-lint-ignore no-explicit-any
  private constructor(private db: any, private sweeper: ReturnType<typeof setInterval>) {
    super();
  }

  static async open(path: string): Promise<SqliteStore> {
    const specifier = "bun:sqlite"; // a variable, so Deno never tries to resolve it
    const { Database } = await import(specifier);
    const db = new Database(path, { create: true });
    // busy_timeout before WAL: two processes opening the file at once would otherwise see SQLITE_BUSY.
    db.exec("PRAGMA busy_timeout = 5000;");
    db.exec("PRAGMA journal_mode = WAL;");
    db.exec("PRAGMA synchronous = NORMAL;");
    db.exec("CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v TEXT NOT NULL, exp INTEGER)");
    const sweep = () => db.query("DELETE FROM kv WHERE exp IS NOT NULL AND exp < ?").run(Date.now());
    sweep();
    const sweeper = setInterval(sweep, 600_000);
    (sweeper as { unref?: () => void }).unref?.();
    return new SqliteStore(db, sweeper);
  }

  private read(k: string): unknown {
    const row = this.db.query("SELECT v, exp FROM kv WHERE k = ?").get(k) as { v: string; exp: number | null } | null;
    if (!row || (row.exp !== null && row.exp < Date.now())) return null;
    return JSON.parse(row.v);
  }

  private write(k: string, value: unknown, ttlMs: number): void {
    this.db.query(
      "INSERT INTO kv (k, v, exp) VALUES (?, ?, ?) ON CONFLICT(k) DO UPDATE SET v = excluded.v, exp = excluded.exp",
    )
      .run(k, JSON.stringify(value), ttlMs ? Date.now() + ttlMs : null);
  }

  get<T>(key: StoreKey): Promise<T | null> {
    return retrying(() => this.read(JSON.stringify(key)) as T | null);
  }

  protected readonly writes = new WriteGroup((waiting) => this.#commit(waiting.splice(0)));

  async #commit(batch: KvWrite[]): Promise<void> {
    try {
      const applied = await retrying(() => this.#transaction(batch));
      batch.forEach((w, i) => w.done(applied[i]));
    } catch (e) {
      for (const w of batch) w.fail(e);
    }
  }

  /** One transaction for the whole batch: each write's check sees the writes before it. */
  #transaction(batch: KvWrite[]): boolean[] {
    try {
      this.db.exec("BEGIN IMMEDIATE");
      const applied = batch.map((w) => {
        const k = JSON.stringify(w.key);
        if (w.checked && !sameValue(this.read(k), w.expected)) return false;
        this.write(k, w.value, w.ttlMs);
        for (const [key, v] of w.also) this.write(JSON.stringify(key), v, w.ttlMs);
        return true;
      });
      this.db.exec("COMMIT");
      return applied;
    } catch (e) {
      try {
        this.db.exec("ROLLBACK");
      } catch { /* no transaction was open */ }
      throw e;
    }
  }
  delete(key: StoreKey): Promise<void> {
    return retrying(() => void this.db.query("DELETE FROM kv WHERE k = ?").run(JSON.stringify(key)));
  }
  close(): void {
    clearInterval(this.sweeper);
    this.db.close();
  }
}

/** First wait before serving again after Deno's accept loop died, and the most it backs off to. */
const SERVE_AGAIN_MIN_MS = 50;
const SERVE_AGAIN_MAX_MS = 2000;
/** Serving this long without another failure ends an incident: the next failure is logged again. */
const SERVE_AGAIN_STABLE_MS = 10_000;

/** Serving; waiting to serve again after the accept loop died; stopped for good (shutdown). */
type ServeLoopState = "serving" | "waiting" | "stopped";

/**
 * `Deno.serve`, served again when its accept loop dies. Out of file descriptors (EMFILE), Deno's
 * `finished` rejects and nothing accepts any more, though the process lives on; serving again on
 * the same port works once descriptors free up. Until then new connections are refused, and each
 * try backs off. Requests already accepted are answered by the server that accepted them.
 */
export class DenoServeLoop implements Served {
  #state: ServeLoopState = "serving";
  #server: Deno.HttpServer<Deno.NetAddr>;
  #warn: (message: string) => void;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #waitMs = SERVE_AGAIN_MIN_MS;
  /** When the current incident's last failure happened (0: no incident). */
  #failedAt = 0;
  readonly port: number;

  constructor(
    options: ServeOptions,
    private handler: Handler,
    onListen: (port: number) => void,
    private serve: typeof Deno.serve = Deno.serve,
  ) {
    this.#warn = options.warn;
    this.#server = this.#open(options.port, onListen);
    this.port = this.#server.addr.port;
  }

  get state(): ServeLoopState {
    return this.#state;
  }

  #open(port: number, onListen: (port: number) => void = () => {}): Deno.HttpServer<Deno.NetAddr> {
    const server = this.serve({ port, onListen: ({ port }) => onListen(port) }, this.handler);
    server.finished.then(() => {}, (e) => this.#lost(server, e));
    return server;
  }

  #lost(server: Deno.HttpServer<Deno.NetAddr>, e: unknown): void {
    if (this.#state === "stopped" || server !== this.#server) return;
    const now = Date.now();
    if (!this.#failedAt || now - this.#failedAt > SERVE_AGAIN_STABLE_MS) {
      this.#waitMs = SERVE_AGAIN_MIN_MS;
      this.#warn(
        `stopped accepting connections (${(e as Error)?.message ?? e}); serving again as soon as it can. ` +
          `Raise the open-file limit (ulimit -n) or close idle connections in front of this server.`,
      );
    } else this.#waitMs = Math.min(this.#waitMs * 2, SERVE_AGAIN_MAX_MS);
    this.#failedAt = now;
    this.#wait();
  }

  #wait(): void {
    this.#state = "waiting";
    this.#timer = setTimeout(() => this.#retry(), this.#waitMs);
  }

  #retry(): void {
    if (this.#state === "stopped") return;
    try {
      this.#server = this.#open(this.port);
      this.#state = "serving";
    } catch {
      this.#waitMs = Math.min(this.#waitMs * 2, SERVE_AGAIN_MAX_MS);
      this.#wait();
    }
  }

  async shutdown(): Promise<void> {
    this.#state = "stopped";
    clearTimeout(this.#timer);
    await this.#server.shutdown().catch(() => {});
  }
}

function denoRuntime(): Runtime {
  return {
    name: "deno",
    env: () => Deno.env.toObject(),
    serve: (options, handler, onListen) => new DenoServeLoop(options, handler, onListen),
    onSignal(signal, listener) {
      try {
        Deno.addSignalListener(signal, listener);
      } catch { /* Deno Deploy has no signals: it drains instances itself */ }
    },
    async openStore(path, env) {
      // On Deno Deploy the managed KV is the default; elsewhere a local file (or KV Connect URL).
      if (env.DENO_DEPLOYMENT_ID && !env.KV_PATH) return new DenoKvStore(await Deno.openKv());
      if (path !== ":memory:" && !/^https?:\/\//.test(path) && dirOf(path)) {
        await Deno.mkdir(dirOf(path), { recursive: true });
      }
      return new DenoKvStore(await Deno.openKv(path));
    },
    bodyReader: byobReader,
    streamBody: pullStreamBody,
    exit: (code) => Deno.exit(code),
  };
}

function bunRuntime(bun: BunLike, proc: ProcessLike): Runtime {
  return {
    name: "bun",
    env: () => ({ ...proc.env }),
    serve({ port, idleConnectionMs, keepaliveMs, warn }, handler, onListen) {
      // Bun's limit is whole seconds up to 255, checked in 4 s steps. It counts quiet time on the
      // connection, also while an answer is being worked on: none while the handler runs (Dify may
      // think for minutes); while a stream is sent, keepalives must come well within the limit.
      const seconds = idleConnectionMs && Math.max(idleConnectionMs, keepaliveMs + 5000) / 1000;
      const idle = Math.min(255, Math.ceil(seconds));
      const server = bun.serve({
        port,
        idleTimeout: idle,
        maxRequestBodySize: Number.MAX_SAFE_INTEGER,
        // Never Bun's development error page (a stack, file paths and source lines) to a client.
        development: false,
        fetch: !idle ? handler : async (req, server) => {
          server.timeout(req, 0);
          const res = await handler(req);
          server.timeout(req, idle);
          return res;
        },
        // The last resort, should the handler ever throw: its own catch answers every error it knows.
        error(e) {
          warn(`unexpected error outside the handler: ${(e as Error)?.stack ?? e}`);
          return errorResponse(apiError("internal_error", "internal error"));
        },
      });
      queueMicrotask(() => onListen(server.port));
      return { port: server.port, shutdown: async () => void await server.stop(false) };
    },
    onSignal: (signal, listener) => proc.on(signal, listener),
    async openStore(path) {
      if (/^https?:\/\//.test(path)) {
        throw new ConfigError("KV_PATH as a KV Connect URL works on Deno only; on Bun use a file path or :memory:");
      }
      if (path !== ":memory:" && dirOf(path)) {
        const fs = "node:fs/promises";
        await (await import(fs)).mkdir(dirOf(path), { recursive: true });
      }
      return await SqliteStore.open(path);
    },
    // Bun's fetch bodies refuse BYOB readers, and hand over large chunks anyway.
    bodyReader: defaultReader,
    // Bun up to 1.3 pulls a standard stream as fast as it can, buffering what the client has not
    // taken; 1.4.5 bounds it, but a stalled client still costs more than direct writes that wait.
    streamBody: directStreamBody,
    exit: (code) => proc.exit(code),
  };
}

interface BunSpawn {
  spawn(cmd: string[], opts: { env: Env; stdio: string[] }): {
    exited: Promise<number>;
    kill(signal?: string): void;
  };
}

type LauncherProcess = ProcessLike & {
  execPath: string;
  argv: string[];
  pid: number;
  ppid: number;
  kill(pid: number, signal: string): void;
};

/**
 * The relaunched child stops (draining, as on SIGTERM) once its launcher is gone: a launcher killed
 * with SIGKILL cannot pass a signal on, and the child would go on serving the port as an orphan.
 */
function followLauncher(proc: LauncherProcess): void {
  const launcher = Number(proc.env.DIFY_OPENAI_LAUNCHER);
  if (!launcher) return;
  const timer = setInterval(() => {
    if (proc.ppid === launcher) return;
    clearInterval(timer);
    proc.kill(proc.pid, "SIGTERM");
  }, 1000);
  (timer as { unref?: () => void }).unref?.();
}

/**
 * Bun's fetch holds only 256 requests open unless BUN_CONFIG_MAX_HTTP_REQUESTS is set when Bun
 * starts (setting it from inside the script is too late), and every streaming answer holds one.
 * So without it, Bun runs this file again as a child with the limit raised, passing signals on.
 * Returns true when this process was only the launcher.
 */
async function relaunchWithFetchLimit(bun: BunSpawn, proc: LauncherProcess) {
  if (proc.env.BUN_CONFIG_MAX_HTTP_REQUESTS) {
    followLauncher(proc);
    return false;
  }
  const child = bun.spawn([proc.execPath, ...proc.argv.slice(1)], {
    env: { ...proc.env, BUN_CONFIG_MAX_HTTP_REQUESTS: "16384", DIFY_OPENAI_LAUNCHER: String(proc.pid) },
    stdio: ["inherit", "inherit", "inherit"],
  });
  for (const signal of ["SIGTERM", "SIGINT", "SIGHUP"]) {
    proc.on(signal, () => {
      try {
        child.kill(signal);
      } catch { /* already gone */ }
    });
  }
  proc.exit(await child.exited);
  return true;
}

/** The runtime this file is running on, detected once. */
function currentRuntime(): Runtime {
  const g = globalThis as { Bun?: BunLike; process?: ProcessLike };
  return g.Bun && g.process ? bunRuntime(g.Bun, g.process) : denoRuntime();
}

// ─── main ───────────────────────────────────────────────────────────────────────────────────────

/** How long a log line may wait for others: a busy server writes its lines in a few large writes, not one per request. */
const LOG_BATCH_MS = 50;

/**
 * Log lines written together, `LOG_BATCH_MS` after the first of a batch: a request's line goes out
 * after its answer's last bytes rather than before them, and a busy server makes one write per batch.
 */
export class LineBatch {
  #lines: string[] = [];

  constructor(private write: (text: string) => void) {}

  add(line: string): void {
    if (this.#lines.push(line) === 1) setTimeout(() => this.flush(), LOG_BATCH_MS);
  }

  flush(): void {
    if (!this.#lines.length) return;
    const text = this.#lines.join("\n");
    this.#lines = [];
    this.write(text);
  }
}

export async function main(rt: Runtime = currentRuntime()): Promise<void> {
  const fail = (message: string): never => {
    console.error(`dify-openai: ${message}`);
    return rt.exit(1);
  };
  const env = rt.env();
  let config: Config;
  try {
    config = loadConfig(env);
  } catch (e) {
    return void fail(e instanceof ConfigError ? e.message : String(e));
  }
  let store: Store;
  try {
    store = await rt.openStore(config.kvPath, env);
  } catch (e) {
    return void fail(
      e instanceof ConfigError
        ? e.message
        : `cannot open the conversation store at KV_PATH=${config.kvPath}: ${(e as Error).message}`,
    );
  }
  const warn = (message: string) =>
    console.error(JSON.stringify({ t: new Date().toISOString(), level: "warn", message }));
  const metrics = config.metrics ? metricsFor(config) : undefined;
  const counted = metrics ? metrics.countWrites(store) : store;
  const conversations = new ConversationStore(counted, config.conversationTtlMs, warn);
  const requestLog = new LineBatch((text) => console.log(text));
  const server = createServer(config, {
    metrics,
    store: conversations,
    log: (line) => requestLog.add(line),
    warn,
    fetch: (input, init) => fetch(input, init),
    bodyReader: (body) => rt.bodyReader(body),
    streamBody: rt.streamBody,
    now: () => performance.now(),
  });
  if (!config.proxyKeys.length) {
    warn("PROXY_API_KEYS is not set: anyone who can reach this server can use it");
  }
  const { idleConnectionMs, keepaliveMs } = config;
  const serveOptions = { port: config.port, idleConnectionMs, keepaliveMs, warn };
  const served = rt.serve(serveOptions, server.handler, (port) => {
    const models = config.catchAll ? `every model name → ${config.catchAll.model}` : [...config.apps.keys()].join(", ");
    console.error(
      `dify-openai on ${rt.name}: http://localhost:${port}/v1 (${models}; conversations: ${config.conversationMode}, store: ${config.kvPath})`,
    );
  });
  let stopping = false;
  const stop = async () => {
    if (stopping) return;
    stopping = true;
    console.error(
      `dify-openai: shutting down, letting ${server.active} open answers finish (up to ${
        config.shutdownGraceMs / 1000
      } s)`,
    );
    const grace = setTimeout(() => server.abortAll(), config.shutdownGraceMs);
    // A client that stops reading holds its connection, and with it the graceful shutdown, open
    // forever: a second after the grace, stop waiting for it.
    const stuck = new Promise<void>((resolve) => setTimeout(resolve, config.shutdownGraceMs + 1000));
    await Promise.race([served.shutdown().catch(() => {}), stuck]);
    clearTimeout(grace);
    // A store that hangs must not hold the exit: writes still pending after 5 s are given up.
    const flushed = conversations.flush();
    await Promise.race([flushed, new Promise((resolve) => setTimeout(resolve, 5000))]);
    try {
      store.close();
    } catch { /* exiting anyway */ }
    requestLog.flush();
    rt.exit(0);
  };
  rt.onSignal("SIGTERM", stop);
  rt.onSignal("SIGINT", stop);
}

if (import.meta.main) {
  const g = globalThis as { Bun?: BunSpawn; process?: LauncherProcess };
  if (!(g.Bun && g.process && await relaunchWithFetchLimit(g.Bun, g.process))) await main();
}
