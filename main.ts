/**
 * dify-openai — any Dify app (chatbot, agent, chatflow, workflow, completion) behind the OpenAI
 * chat completions API. One file, web-standard APIs only; runs on Deno 2.9 (`deno run main.ts`,
 * Deno Deploy, a gist URL) and on Bun 1.x (`bun main.ts`).
 *
 * The file reads the way a request flows: configuration → request parsing → OpenClaw envelope →
 * turn building → conversation store → Dify client → event translation → streaming → HTTP routes →
 * runtime edges → main.
 */

import { createHash } from "node:crypto";

// ─── Configuration ──────────────────────────────────────────────────────────────────────────────

export type AppType = "chat" | "agent" | "chatflow" | "workflow" | "completion";
const APP_TYPES: readonly AppType[] = ["chat", "agent", "chatflow", "workflow", "completion"];

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
}

export interface Config {
  port: number;
  difyUrl: string;
  /** Model id → app. With `DIFY_APPS` set, a model must match one of these exactly. */
  apps: Map<string, AppConfig>;
  /** Only `DIFY_API_KEY` (or nothing) configured: every model name goes to this app. */
  catchAll?: AppConfig;
  proxyKeys: string[];
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
  maxConcurrentStreams: number;
  shutdownGraceMs: number;
  defaultUser: string;
}

/** A configuration mistake: start-up prints its message as one line and exits. */
export class ConfigError extends Error {}

type Env = Record<string, string | undefined>;

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
  const seconds = (name: string, fallback: number) => number(env, name, fallback) * 1000;
  return {
    port: number(env, "PORT", 8000),
    difyUrl,
    apps,
    catchAll: apps.size ? undefined : defaultApp,
    proxyKeys: (env.PROXY_API_KEYS ?? "").split(",").map((k) => k.trim()).filter(Boolean),
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
    maxConcurrentStreams: number(env, "MAX_CONCURRENT_STREAMS", 4096, 1),
    shutdownGraceMs: seconds("SHUTDOWN_GRACE_SECONDS", 10),
    defaultUser: env.DEFAULT_USER?.trim() || "dify-openai",
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
  // The bridge itself
  client_closed: [499, "client_error"],
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

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

// ─── Request parsing ────────────────────────────────────────────────────────────────────────────

/** A file the user attached, before it reaches Dify. */
export type InputFile =
  | { kind: "remote"; url: string; type: DifyFileType }
  | { kind: "upload"; bytes: Uint8Array; filename: string; mime: string; type: DifyFileType };

export type DifyFileType = "image" | "document" | "audio" | "video" | "custom";

/** One OpenAI message reduced to what the bridge uses: role, text, and attachments. */
export interface Message {
  role: "system" | "user" | "assistant" | "tool";
  text: string;
  files: InputFile[];
}

export interface ChatRequest {
  model: string;
  messages: Message[];
  stream: boolean;
  includeUsage: boolean;
  user?: string;
  conversationId?: string;
  sessionId?: string;
  inputs: Record<string, unknown>;
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

/** Assistant tool calls as text, so replayed history keeps what the tools were asked. */
function toolCallsText(calls: unknown): string {
  if (!Array.isArray(calls)) return "";
  return calls.map((c) => {
    const fn = isObject(c) && isObject(c.function) ? c.function : {};
    return `[called tool ${valueText(fn.name ?? "?")}(${valueText(fn.arguments ?? "")})]`;
  }).join("\n");
}

function optionalString(body: Record<string, unknown>, name: string): string | undefined {
  const v = body[name];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "string") throw badRequest(`\`${name}\` must be a string`, name);
  return v;
}

/** Validates an OpenAI chat completion body; throws ApiError 400 naming the bad field. */
export function parseChatRequest(
  body: unknown,
  headers: Headers,
  limits: { maxMessages: number; maxParts: number },
): ChatRequest {
  if (!isObject(body)) throw badRequest("the request body must be a JSON object");
  const model = body.model;
  if (typeof model !== "string" || !model.trim()) throw badRequest("`model` must be a non-empty string", "model");
  if (!Array.isArray(body.messages) || body.messages.length === 0) {
    throw badRequest("`messages` must be a non-empty array", "messages");
  }
  if (body.messages.length > limits.maxMessages) {
    throw badRequest(`too many messages (${body.messages.length}; the limit is ${limits.maxMessages})`, "messages");
  }
  if (body.stream !== undefined && body.stream !== null && typeof body.stream !== "boolean") {
    throw badRequest("`stream` must be a boolean", "stream");
  }
  if (body.n !== undefined && body.n !== null && body.n !== 1) {
    throw badRequest("only n=1 is supported: a Dify app gives one answer per request", "n");
  }
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
      return { role, text: [text, toolCallsText(m.tool_calls)].filter(Boolean).join("\n"), files };
    }
    return { role, text, files };
  });
  if (!messages.some((m) => m.role === "user")) throw badRequest("`messages` has no user message", "messages");
  const metadata = isObject(body.metadata) ? body.metadata : {};
  const inputs = body.inputs;
  if (inputs !== undefined && inputs !== null && !isObject(inputs)) {
    throw badRequest("`inputs` must be an object of Dify input variables", "inputs");
  }
  const sessionId = headers.get("x-session-id") ?? optionalString(body, "prompt_cache_key") ??
    headers.get("x-openwebui-chat-id") ?? (typeof metadata.chat_id === "string" ? metadata.chat_id : undefined);
  return {
    model,
    messages,
    stream: body.stream === true,
    includeUsage: isObject(streamOptions) && streamOptions.include_usage === true,
    user: optionalString(body, "user") || undefined,
    conversationId: optionalString(body, "conversation_id") || headers.get("x-dify-conversation-id") || undefined,
    sessionId: sessionId || undefined,
    inputs: (inputs as Record<string, unknown> | undefined) ?? {},
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

export interface Envelope {
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

export function buildTurn(messages: Message[], envelope: Config["envelope"]): Turn {
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
    if (i < lastAssistant) return void history.push(cleaned);
    if (i === lastAssistant) return void history.push(cleaned);
    if (!internal) current.push(cleaned);
    files.push(...m.files);
    if (envelope === "keep") query.push(m.role === "tool" ? `[tool result] ${m.text}` : m.text);
    else if (!internal && env.text) query.push(m.role === "tool" ? `[tool result] ${env.text}` : env.text);
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

/** History as a compact transcript, for the first query of a conversation Dify has not seen. */
export function transcript(history: Message[]): string {
  const label = { user: "User", assistant: "Assistant", tool: "Tool", system: "System" } as const;
  return history.map((m) => `${label[m.role]}: ${stripThink(m.text).trim()}`).join("\n\n");
}

/** The `query` for Dify: the new text, preceded on a fresh conversation by system prompt and history. */
export function difyQuery(turn: Turn, fresh: boolean, systemMode: Config["systemPrompt"]): string {
  if (!fresh) return turn.query;
  const parts: string[] = [];
  if (systemMode === "prepend" && turn.system.trim()) parts.push(turn.system.trim());
  if (turn.history.length) {
    parts.push(`Conversation so far:\n\n${transcript(turn.history)}`, `Current message:\n\n${turn.query}`);
  } else parts.push(turn.query);
  return parts.join("\n\n");
}

// ─── Conversation store ─────────────────────────────────────────────────────────────────────────
// Maps a chat onto the Dify conversation that remembers it. Keys are scoped by the client (a hash
// of its key) and the app, so two clients or two apps never share a conversation.

type StoreKey = string[];

/** The small persistence interface both runtimes implement (Deno KV, bun:sqlite). */
export interface Store {
  get<T>(key: StoreKey): Promise<T | null>;
  set(key: StoreKey, value: unknown, ttlMs: number): Promise<void>;
  /**
   * Sets `value` only if the current value deep-equals `expected` (null: absent), and with it the
   * `also` entries, in one atomic commit.
   */
  setIf(
    key: StoreKey,
    expected: unknown,
    value: unknown,
    ttlMs: number,
    also?: [StoreKey, unknown][],
  ): Promise<boolean>;
  delete(key: StoreKey): Promise<void>;
  close(): void;
}

/** Dify remembers a conversation per (conversation id, user): both travel together. */
export interface Binding {
  c: string;
  u: string;
}

/** A conversation's latest turn: only a request continuing from it may continue the conversation. */
interface Head {
  f: string;
  u: string;
}

export const storeKeys = {
  fingerprint: (client: string, app: string, fp: string): StoreKey => ["fp", client, app, fp],
  head: (client: string, app: string, conversation: string): StoreKey => ["head", client, app, conversation],
  session: (client: string, app: string, session: string): StoreKey => ["sess", client, app, session],
  user: (client: string, app: string, user: string): StoreKey => ["user", client, app, user],
};

function sameValue(a: unknown, b: unknown): boolean {
  return JSON.stringify(a ?? null) === JSON.stringify(b ?? null);
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

/** Writes per grouped commit: within Deno KV's per-commit limits (and `getMany`'s 10 keys). */
const KV_BATCH = 10;
/** How long a write waits for others to share its commit. */
const KV_GROUP_MS = 10;

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

  /** `Store.setIf`, grouped. */
  setIf(
    key: StoreKey,
    expected: unknown,
    value: unknown,
    ttlMs: number,
    also: [StoreKey, unknown][],
  ): Promise<boolean> {
    return this.#add(key, true, expected, value, ttlMs, also);
  }

  #add(
    key: StoreKey,
    checked: boolean,
    expected: unknown,
    value: unknown,
    ttlMs: number,
    also: [StoreKey, unknown][],
  ): Promise<boolean> {
    return new Promise((done, fail) => {
      this.#waiting.push({ key, checked, expected, value, ttlMs, also, done, fail });
      this.#timer ??= setTimeout(() => this.#drain(), KV_GROUP_MS);
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

export class DenoKvStore implements Store {
  #writes = new WriteGroup((waiting) => this.#commit(this.#nextBatch(waiting)));

  constructor(private kv: Deno.Kv) {}
  async get<T>(key: StoreKey): Promise<T | null> {
    return (await this.kv.get<T>(key)).value;
  }
  set(key: StoreKey, value: unknown, ttlMs: number): Promise<void> {
    return this.#writes.set(key, value, ttlMs);
  }
  setIf(
    key: StoreKey,
    expected: unknown,
    value: unknown,
    ttlMs: number,
    also: [StoreKey, unknown][] = [],
  ): Promise<boolean> {
    return this.#writes.setIf(key, expected, value, ttlMs, also);
  }
  async delete(key: StoreKey): Promise<void> {
    await this.kv.delete(key);
  }
  close(): void {
    this.kv.close();
  }

  /** The next writes that can share a commit: a check must not depend on a write before it in it. */
  #nextBatch(waiting: KvWrite[]): KvWrite[] {
    const batch: KvWrite[] = [];
    const written = new Set<string>();
    for (const w of waiting) {
      const id = JSON.stringify(w.key);
      if (batch.length === KV_BATCH || (w.checked && written.has(id))) break;
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
      const op = this.kv.atomic();
      if (w.checked) {
        const current = await this.kv.get(w.key);
        if (!sameValue(current.value, w.expected)) return w.done(false);
        op.check(current);
      }
      setAll(op, w);
      w.done((await op.commit()).ok);
    } catch (e) {
      w.fail(e);
    }
  }
}

/** SQLite through bun:sqlite, in WAL mode so several Bun processes can share one file. */
export class SqliteStore implements Store {
  // deno-lint-ignore no-explicit-any
  private constructor(private db: any, private sweeper: ReturnType<typeof setInterval>) {}

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
    return Promise.resolve(this.read(JSON.stringify(key)) as T | null);
  }
  set(key: StoreKey, value: unknown, ttlMs: number): Promise<void> {
    return this.#writes.set(key, value, ttlMs);
  }
  setIf(key: StoreKey, expected: unknown, value: unknown, ttlMs: number, also: [StoreKey, unknown][] = []) {
    return this.#writes.setIf(key, expected, value, ttlMs, also);
  }

  #writes = new WriteGroup((waiting) => this.#commit(waiting.splice(0)));

  /** One transaction for the whole batch: each write's check sees the writes before it. */
  #commit(batch: KvWrite[]): Promise<void> {
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
      batch.forEach((w, i) => w.done(applied[i]));
    } catch (e) {
      try {
        this.db.exec("ROLLBACK");
      } catch { /* no transaction was open */ }
      for (const w of batch) w.fail(e);
    }
    return Promise.resolve();
  }
  delete(key: StoreKey): Promise<void> {
    this.db.query("DELETE FROM kv WHERE k = ?").run(JSON.stringify(key));
    return Promise.resolve();
  }
  close(): void {
    clearInterval(this.sweeper);
    this.db.close();
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
      return await this.store.setIf(key, from, to, this.ttlMs, also);
    } catch (e) {
      this.failed("write", e);
      return false;
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

/** SHA-256 of a text's UTF-8 bytes: node:crypto's, built into Deno (also on Deploy) and Bun, and synchronous. */
function sha256(text: string): Buffer {
  return createHash("sha256").update(text).digest();
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

/** Where a request's conversation came from; decides what is stored after the turn. */
export interface Resolution {
  via: "explicit" | "session" | "history" | "user" | "new";
  conversationId?: string;
  user: string;
  /** The head this turn continues (history mode), for the check-and-set after the turn. */
  head: Head | null;
}

/** What conversation resolution needs from the server: its settings, the store, and the in-flight sets. */
export interface ConversationContext {
  config: Config;
  store: ConversationStore;
  /** Conversations a request in this process is continuing right now: a twin request branches. */
  continuing: Set<string>;
  /** Turns whose fingerprint is still being hashed, after their answer went out: lookups wait for them. */
  recording: Set<Promise<void>>;
}

/** The conversation a request continues (or a fresh one), in the order explicit → session → mode. */
export async function resolveConversation(
  { config, store, continuing, recording }: ConversationContext,
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
    const head = await store.get<Head>(storeKeys.head(client, scope, req.conversationId));
    return { via: "explicit", conversationId: req.conversationId, user: req.user ?? head?.u ?? fallbackUser, head };
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
  // A client may send its next turn the instant [DONE] arrives, before the last turn is hashed.
  if (recording.size) await Promise.all(recording);
  const fp = fingerprint(turn.system, turn.history);
  const b = await store.get<Binding>(storeKeys.fingerprint(client, scope, fp));
  if (!b || continuing.has(b.c)) return fresh;
  const head = await store.get<Head>(storeKeys.head(client, scope, b.c));
  // Only the latest turn continues a conversation: a regenerate or an edit branches off.
  if (head?.f !== fp || continuing.has(b.c)) return fresh;
  // Claimed here, after the last await: a twin request resolving at the same time branches.
  continuing.add(b.c);
  return { via: "history", conversationId: b.c, user: b.u, head };
}

/**
 * Stores where this chat now stands, without holding the answer: a lookup in this process waits
 * for it (`recording`), and the store's own write-through cache covers the durable write.
 */
export function recordTurn(...args: Parameters<typeof storeTurn>): Promise<void> {
  const { recording } = args[0];
  // storeTurn cannot fail: the store reports and swallows its own errors.
  const done: Promise<void> = storeTurn(...args).finally(() => recording.delete(done));
  recording.add(done);
  return done;
}

async function storeTurn(
  { config, store }: ConversationContext,
  req: ChatRequest,
  turn: Turn,
  r: Route,
  client: string,
  res: Resolution,
  t: Translation,
) {
  const conversation = t.conversationId;
  if (!conversation || r.type === "workflow" || r.type === "completion") return;
  const scope = r.app.model;
  const binding: Binding = { c: conversation, u: res.user };
  if (req.sessionId) store.set(storeKeys.session(client, scope, req.sessionId), binding);
  if (config.conversationMode === "user" && !req.sessionId && !req.conversationId) {
    store.set(storeKeys.user(client, scope, res.user), binding);
  }
  if (config.conversationMode !== "history") return;
  const answer: Message = { role: "assistant", text: t.content, files: [] };
  const fp = fingerprint(turn.system, [...turn.history, ...turn.current, answer]);
  const headKey = storeKeys.head(client, scope, conversation);
  const fpKey = storeKeys.fingerprint(client, scope, fp);
  const head: Head = { f: fp, u: res.user };
  const expected = res.conversationId === conversation ? res.head : null;
  const checked = res.via === "history" || res.via === "new";
  const ttl = config.conversationTtlMs;
  // The raw store `s`: this wrapper's `set` would queue behind this very write. Only the head is
  // ordered: many chats can share a fingerprint (the same first exchange), and queueing all of
  // their writes behind one another falls behind under load; the newest binding wins either way.
  store.write(
    async (s) => {
      if (checked) await store.advance(headKey, expected, head, [[fpKey, binding]]);
      else await Promise.all([s.set(headKey, head, ttl), s.set(fpKey, binding, ttl)]);
    },
    [[headKey, head], [fpKey, binding]],
    [headKey],
  );
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

export const difyPaths: Record<AppType, { run: string; stop: (task: string) => string }> = {
  chat: { run: "/chat-messages", stop: (t) => `/chat-messages/${t}/stop` },
  agent: { run: "/chat-messages", stop: (t) => `/chat-messages/${t}/stop` },
  chatflow: { run: "/chat-messages", stop: (t) => `/chat-messages/${t}/stop` },
  completion: { run: "/completion-messages", stop: (t) => `/completion-messages/${t}/stop` },
  workflow: { run: "/workflows/run", stop: (t) => `/workflows/tasks/${encodeURIComponent(t)}/stop` },
};

export interface DifyFile {
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
  };
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
async function unexpectedResponse(res: Response, app: AppConfig, clientKey: boolean): Promise<ApiError> {
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
      `Dify (model ${app.model}) answered ${type || "an unknown type"} where an event stream was expected`,
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

/** Where one request goes: the app, the key to use, and the app's type. */
interface Route {
  app: AppConfig;
  key: string;
  /** The key came from the client (pass-through), not from configuration. */
  clientKey: boolean;
  type: AppType;
}

async function upload(
  fetch: typeof globalThis.fetch,
  r: Route,
  user: string,
  file: Extract<InputFile, { kind: "upload" }>,
  signal: AbortSignal,
) {
  const form = new FormData();
  form.append("file", new Blob([file.bytes as BlobPart], { type: file.mime }), file.filename);
  form.append("user", user);
  let res: Response;
  try {
    res = await fetch(`${r.app.url}/files/upload`, {
      method: "POST",
      headers: { authorization: `Bearer ${r.key}` },
      body: form,
      signal,
    });
  } catch (e) {
    throw connectionError(e, r.app, signal);
  }
  const body = await res.json().catch(() => null);
  if (!res.ok || !isObject(body) || typeof body.id !== "string") {
    // Here 415 is Dify refusing this file's type: the client's to fix (a 4xx), not a gateway fault.
    const status = res.status === 415 ? 400 : res.ok ? 502 : res.status;
    throw difyError(status, body, r.app, r.clientKey);
  }
  return body.id;
}

/** Client attachments as Dify file references, uploading inline data first (same `user` as the chat call). */
export async function difyFiles(
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
    res = await fetch(`${r.app.url}${difyPaths[r.type].run}`, {
      method: "POST",
      headers: { authorization: `Bearer ${r.key}`, "content-type": "application/json", accept: "text/event-stream" },
      body: JSON.stringify(body),
      signal: ex.upstream.signal,
    });
  } catch (e) {
    throw connectionError(e, r.app, ex.upstream.signal);
  }
  ex.headersReceived = true;
  ex.lastUpstream = ex.now();
  if (res.ok && res.body && /event-stream/i.test(res.headers.get("content-type") ?? "")) return res;
  throw await unexpectedResponse(res, r.app, r.clientKey);
}

/** Asks Dify to stop a task (fire and forget): it keeps generating, and billing, otherwise. */
export function stopTask(fetch: typeof globalThis.fetch, r: Route, taskId: string, user: string): void {
  fetch(`${r.app.url}${difyPaths[r.type].stop(taskId)}`, {
    method: "POST",
    headers: { authorization: `Bearer ${r.key}`, "content-type": "application/json" },
    body: JSON.stringify({ user }),
    signal: AbortSignal.timeout(10_000),
  }).then((res) => res.body?.cancel(), () => {});
}

// ─── Event translation ──────────────────────────────────────────────────────────────────────────
// Dify's events in, OpenAI's content and reasoning out. The state machine is shared by streaming
// and aggregated responses; a sink decides what to do with each delta.

export interface Usage {
  prompt_tokens: number;
  completion_tokens: number;
  total_tokens: number;
}

/** Where translated deltas go: SSE chunks for a stream, nothing extra for an aggregate. */
export interface Sink {
  content(text: string): void;
  reasoning(text: string): void;
  ping(): void;
}

/** Everything known about one answer while Dify streams it. */
export interface Translation {
  type: AppType;
  stream: boolean;
  /** Exactly the content the client has been sent (or will get, when aggregated). */
  content: string;
  reasoning: string;
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
}

export function newTranslation(type: AppType, stream: boolean): Translation {
  return { type, stream, content: "", reasoning: "", ended: false, thoughts: new Map(), thinkOpen: false };
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
  t.content += "\n</think>\n\n";
  sink.content("\n</think>\n\n");
}

function emitContent(t: Translation, sink: Sink, text: string): void {
  if (!text) return;
  closeThink(t, sink);
  t.content += text;
  sink.content(text);
}

function emitReasoning(t: Translation, sink: Sink, text: string, mode: Config["reasoning"]): void {
  if (!text || mode === "off") return;
  t.reasoning += text;
  if (mode === "reasoning_content") return sink.reasoning(text);
  if (!t.thinkOpen) {
    t.thinkOpen = true;
    text = "<think>\n" + text;
  }
  t.content += text;
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
        // The replacement is the whole answer, including any <think> block it replaced.
        t.content = answer;
        t.thinkOpen = false;
        return;
      }
      // Deltas already sent cannot be taken back: the replacement follows, clearly set apart.
      return emitContent(t, sink, t.content ? `\n\n---\n\n${answer}` : answer);
    }
    case "agent_thought": {
      const id = typeof ev.id === "string" ? ev.id : String(ev.position ?? "");
      const text = thoughtText(ev, t.content);
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
        if (!t.content) emitContent(t, sink, workflowAnswer(d.outputs, o.app.output));
        t.ended = true;
      } else if (t.type === "chatflow") t.ended = true;
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
  // Every other event (workflow_started, tts_*, iteration_*, …) carries nothing for the answer.
}

/** Closes an open `<think>` block and settles the final usage. */
export function finishTranslation(t: Translation, sink: Sink): void {
  closeThink(t, sink);
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

  constructor(private onLine: (bytes: Uint8Array, start: number, end: number) => void) {}

  push(chunk: Uint8Array): void {
    let start = 0;
    const n = chunk.length;
    if (this.#skipLf && n && chunk[0] === LF) start = 1;
    this.#skipLf = false;
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
    if (this.#carryBytes > MAX_LINE_BYTES) throw new Error(`an event line is over ${MAX_LINE_BYTES} bytes`);
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

// ─── Exchanges: one Dify call, watched for silence ──────────────────────────────────────────────
// One timer serves every open exchange: a per-event timer reset would cost more than the events.

/** Reads a body chunk by chunk; `null` at the end. The chunk may be overwritten by the next read. */
export interface ChunkReader {
  read(): Promise<Uint8Array | null>;
  cancel(): void;
}

const CLIENT_GONE = apiError("client_closed", "client closed the request");
/** How long a call whose client has left may wait for Dify to name the task to stop. */
const GONE_GRACE_MS = 5000;

/** One request's call to Dify: its abort switch, its clocks, and what the watchdog checks. */
export class Exchange {
  readonly upstream = new AbortController();
  readonly started: number;
  /** Last byte from Dify (or the start, while waiting for headers). */
  lastUpstream: number;
  /** Last byte to the client; -1 while no stream is open to it. */
  lastWrite = -1;
  headersReceived = false;
  /** When the client left; the call ends as soon as Dify names the task to stop. */
  goneAt?: number;
  keepalive?: () => void;
  onTimeout?: () => void;

  constructor(readonly now: () => number) {
    this.started = now();
    this.lastUpstream = this.started;
  }

  abort(reason: ApiError): void {
    if (!this.upstream.signal.aborted) this.upstream.abort(reason);
  }
}

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

  constructor(
    private cfg: Pick<Config, "keepaliveMs" | "upstreamTimeoutMs" | "upstreamIdleMs" | "bodyTimeoutMs">,
    private now: () => number,
  ) {
    const shortest = Math.min(
      cfg.keepaliveMs || Infinity,
      cfg.upstreamTimeoutMs || Infinity,
      cfg.upstreamIdleMs || Infinity,
      cfg.bodyTimeoutMs || Infinity,
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
    const { keepaliveMs, upstreamTimeoutMs, upstreamIdleMs } = this.cfg;
    for (const ex of this.open) {
      if (!ex.headersReceived) {
        if (upstreamTimeoutMs && now - ex.started > upstreamTimeoutMs) {
          ex.abort(
            apiError(
              "upstream_timeout",
              `Dify sent nothing within ${upstreamTimeoutMs / 1000} s (UPSTREAM_TIMEOUT_SECONDS)`,
            ),
          );
        }
      } else if (upstreamIdleMs && now - ex.lastUpstream > upstreamIdleMs) {
        ex.abort(
          apiError(
            "upstream_idle_timeout",
            `Dify went silent for ${upstreamIdleMs / 1000} s mid-answer (UPSTREAM_IDLE_SECONDS)`,
          ),
        );
      }
      if (ex.goneAt !== undefined && now - ex.goneAt > GONE_GRACE_MS) ex.abort(CLIENT_GONE);
      if (keepaliveMs && ex.keepalive && now - Math.max(ex.lastWrite, ex.started) >= keepaliveMs) ex.keepalive();
    }
  }
}

/**
 * Reads Dify's event stream to its end into the translation. `afterRead` runs once per upstream
 * read, so a stream sends one output chunk per read of Dify's body, not one per event.
 */
export async function pump(
  reader: ChunkReader,
  t: Translation,
  sink: Sink,
  o: TranslateOptions,
  ex: Exchange,
  afterRead: () => void,
): Promise<ApiError | undefined> {
  const lines = new LineSplitter((bytes, start, end) => {
    const ev = parseSseLine(bytes, start, end);
    if (ev === "ping") sink.ping();
    else if (ev) applyDifyEvent(t, ev, sink, o);
  });
  try {
    for (;;) {
      const chunk = await reader.read();
      if (!chunk) break;
      ex.lastUpstream = ex.now();
      lines.push(chunk);
      if (ex.goneAt !== undefined && t.taskId) ex.abort(CLIENT_GONE);
      afterRead();
      if (t.error) break;
    }
    lines.flush();
  } catch (e) {
    const reason = ex.upstream.signal.reason;
    if (reason instanceof ApiError) return reason;
    return t.error ??
      apiError("upstream_broken", `the connection to Dify broke mid-answer: ${(e as Error)?.message ?? e}`);
  }
  if (ex.upstream.signal.reason instanceof ApiError) return ex.upstream.signal.reason;
  if (t.error) return t.error;
  if (!t.ended) {
    return apiError(
      "incomplete_stream",
      `Dify's stream ended before the answer was complete (${t.content.length} characters received, no message_end)`,
    );
  }
  return undefined;
}

// ─── OpenAI output ──────────────────────────────────────────────────────────────────────────────

const textEncoder = new TextEncoder();

const CHUNK_TAIL = `},"logprobs":null,"finish_reason":null}]}\n\n`;

/** Pre-built chunk text for one completion: each delta costs one JSON.stringify and a concat. */
export class ChunkFormat {
  private head: string;
  private envelope: string;

  constructor(id: string, created: number, model: string) {
    this.envelope = `{"id":"${id}","object":"chat.completion.chunk","created":${created},"model":${
      JSON.stringify(model)
    },`;
    this.head = `data: ${this.envelope}"choices":[{"index":0,"delta":{`;
  }
  role(): string {
    return this.head + `"role":"assistant","content":""` + CHUNK_TAIL;
  }
  content(text: string): string {
    return this.head + `"content":` + JSON.stringify(text) + CHUNK_TAIL;
  }
  reasoning(text: string): string {
    return this.head + `"reasoning_content":` + JSON.stringify(text) + CHUNK_TAIL;
  }
  finish(): string {
    return this.head + `},"logprobs":null,"finish_reason":"stop"}]}\n\n`;
  }
  usage(usage: Usage): string {
    return `data: ${this.envelope}"choices":[],"usage":${JSON.stringify(usage)}}\n\n`;
  }
}

export const SSE_DONE = "data: [DONE]\n\n";

export function errorFrame(e: ApiError): string {
  return `data: ${errorJson(e)}\n\n`;
}

/** The aggregated `chat.completion` object for `stream: false`. */
export function completionObject(id: string, created: number, model: string, t: Translation, reasoning: boolean) {
  const message: Record<string, unknown> = { role: "assistant", content: t.content };
  if (reasoning && t.reasoning) message.reasoning_content = t.reasoning;
  return {
    id,
    object: "chat.completion",
    created,
    model,
    choices: [{ index: 0, message, logprobs: null, finish_reason: "stop" }],
    usage: t.usage ?? { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 },
  };
}

// ─── HTTP plumbing: bodies, responses, client keys ──────────────────────────────────────────────

interface LogEntry {
  [field: string]: unknown;
}

const CORS_HEADERS: Readonly<Record<string, string>> = {
  "access-control-allow-origin": "*",
  "access-control-allow-methods": "GET, POST, DELETE, OPTIONS",
  "access-control-allow-headers":
    "authorization, content-type, x-session-id, x-dify-conversation-id, x-openwebui-chat-id, openai-organization, openai-project, x-stainless-arch, x-stainless-lang, x-stainless-os, x-stainless-package-version, x-stainless-retry-count, x-stainless-runtime, x-stainless-runtime-version, x-stainless-timeout",
  "access-control-expose-headers": "x-dify-conversation-id, x-request-id",
  "access-control-max-age": "86400",
};

export function jsonResponse(status: number, body: unknown, headers: Record<string, string> = {}): Response {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json", ...CORS_HEADERS, ...headers },
  });
}

export function errorResponse(e: ApiError, headers: Record<string, string> = {}): Response {
  return new Response(errorJson(e), {
    status: e.status,
    headers: { "content-type": "application/json", ...CORS_HEADERS, ...e.headers, ...headers },
  });
}

/** Starts a time limit: calls `expire` after `ms` unless the returned cancel runs first. */
export type DeadlineClock = (ms: number, expire: () => void) => () => void;

/** Reads a request body within the size limit and the time limit, as JSON. */
export async function readJsonBody(
  req: Request,
  limit: number,
  timeoutMs: number,
  deadline: DeadlineClock,
): Promise<unknown> {
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
  const late = new Promise<never>((_, reject) => {
    cancel = deadline(timeoutMs, () => reject(bodyTimeout(timeoutMs)));
  });
  const read = reader ? readCapped(reader, limit, tooBig) : req.arrayBuffer().then((buffer) => new Uint8Array(buffer));
  try {
    return parseJsonBytes(await Promise.race([read, late]));
  } catch (e) {
    reader?.cancel().catch(() => {});
    if (e instanceof ApiError) throw e;
    throw badRequest("the request body could not be read");
  } finally {
    cancel();
  }
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

// ─── The bridge: routes, and one chat completion from request to answer ─────────────────────────

export interface Deps {
  store: ConversationStore;
  /** One JSON line per request. */
  log: (line: string) => void;
  warn: (message: string) => void;
  fetch: typeof fetch;
  /** How Dify's body is read: a BYOB reader on Deno, the default reader on Bun. */
  bodyReader: (body: ReadableStream<Uint8Array>) => ChunkReader;
  now: () => number;
}

const NO_SINK: Sink = { content() {}, reasoning() {}, ping() {} };

export function createServer(config: Config, deps: Deps) {
  const watchdog = new Watchdog(config, deps.now);
  const watchdogDeadline: DeadlineClock = (ms, expire) => watchdog.deadline(ms, expire);
  const proxyDigests = config.proxyKeys.map(sha256);
  const detected = new Map<string, Promise<AppType>>();
  const continuing = new Set<string>();
  /** The served model ids; with only DIFY_API_KEY, the one name every model routes to. */
  const modelIds = config.catchAll ? [config.catchAll.model] : [...config.apps.keys()];
  const conversations: ConversationContext = { config, store: deps.store, continuing, recording: new Set() };
  let active = 0;

  /** Accepted tokens → client id, so a hash is computed once per key rather than per request. */
  const accepted = new Map<string, string>();

  /** The caller's identity (a hash of its key), after checking it against PROXY_API_KEYS. */
  async function authenticate(req: Request): Promise<{ client: string; token?: string }> {
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

  async function chat(req: Request, entry: LogEntry): Promise<Response> {
    entry.id = `chatcmpl-${crypto.randomUUID().replaceAll("-", "")}`;
    const { client, token } = await authenticate(req);
    const body = await readJsonBody(req, config.bodyLimit, config.bodyTimeoutMs, watchdogDeadline);
    const chatReq = parseChatRequest(body, req.headers, config);
    entry.model = chatReq.model;
    entry.stream = chatReq.stream;
    const r = await route(chatReq.model, token);
    entry.app_type = r.type;
    const turn = buildTurn(chatReq.messages, config.envelope);
    if (active >= config.maxConcurrentStreams) {
      throw apiError(
        "overloaded",
        `too many concurrent requests (MAX_CONCURRENT_STREAMS=${config.maxConcurrentStreams}); retry shortly`,
        { headers: { "retry-after": "1" } },
      );
    }
    active++;
    let released = false;
    const release = () => {
      if (!released) active--;
      released = true;
    };
    try {
      const response = await answer(req, chatReq, turn, r, client, entry, release);
      return response;
    } catch (e) {
      release();
      throw e;
    }
  }

  async function answer(
    req: Request,
    chatReq: ChatRequest,
    turn: Turn,
    r: Route,
    client: string,
    entry: LogEntry,
    release: () => void,
  ): Promise<Response> {
    const ex = new Exchange(deps.now);
    watchdog.add(ex);
    const t = newTranslation(r.type, chatReq.stream);
    const clientGone = () => {
      if (ex.upstream.signal.aborted || ex.goneAt !== undefined) return;
      ex.goneAt = ex.now();
      // Dify keeps generating (and billing) after a disconnect: its task must be stopped. Until
      // an event names the task, keep reading (the watchdog gives up after a few seconds).
      if (t.taskId) ex.abort(CLIENT_GONE);
    };
    req.signal?.addEventListener("abort", clientGone, { once: true });
    let res = await resolveConversation(conversations, chatReq, turn, r, client);
    /** This turn's record, once the answer is complete. */
    let recorded: Promise<void> | undefined;
    const done = () => {
      req.signal?.removeEventListener("abort", clientGone);
      watchdog.delete(ex);
      if (res.via === "history" && res.conversationId) {
        const continued = res.conversationId;
        // Until the turn is recorded, a twin request would still find the old head and continue it too.
        if (recorded) recorded.then(() => continuing.delete(continued));
        else continuing.delete(continued);
      }
      release();
    };
    let upstream: Response;
    try {
      const files = await difyFiles(deps.fetch, r, res.user, turn.files, ex.upstream.signal);
      const inputs: Record<string, unknown> = { ...chatReq.inputs };
      if (config.systemPrompt !== "drop" && turn.system.trim()) inputs.system_prompt ??= turn.system;
      const request = (resolution: Resolution) =>
        difyRequestBody(r.type, r.app, {
          query: difyQuery(turn, !resolution.conversationId, config.systemPrompt),
          user: resolution.user,
          conversationId: resolution.conversationId,
          inputs,
          files,
        });
      try {
        upstream = await callDify(deps.fetch, r, request(res), ex);
      } catch (e) {
        // Dify lost the conversation (deleted, expired, another Dify): start over with the history replayed.
        if (
          !(e instanceof ApiError) || e.code !== "conversation_not_found" || res.via === "explicit" ||
          !res.conversationId
        ) throw e;
        const lost = res.conversationId!;
        deps.store.delete(storeKeys.head(client, r.app.model, lost));
        if (res.via === "history") continuing.delete(lost);
        res = { via: "new", user: res.user, head: null };
        entry.recovered = true;
        upstream = await callDify(deps.fetch, r, request(res), ex);
      }
    } catch (e) {
      done();
      throw e;
    }
    entry.conversation_via = res.via;
    const id = entry.id as string;
    const created = Math.floor(Date.now() / 1000);
    const options: TranslateOptions = {
      reasoning: config.reasoning,
      reasoningNodes: config.reasoningNodes,
      origin: new URL(r.app.url).origin,
      app: r.app,
      clientKey: r.clientKey,
    };
    const finish = (status: number, error?: ApiError) => {
      done();
      entry.status = status;
      entry.ms = Math.round(deps.now() - ex.started);
      if (t.usage) {
        entry.prompt_tokens = t.usage.prompt_tokens;
        entry.completion_tokens = t.usage.completion_tokens;
      }
      if (error) entry.error = error.code;
      if (config.logContent) {
        entry.query = turn.query;
        entry.answer = t.content;
      }
      deps.log(JSON.stringify(entry));
    };
    const reader = deps.bodyReader(upstream.body!);
    // Whatever ends the call early (client gone, timeout, shutdown), Dify keeps generating and
    // billing until its task is stopped.
    const cancelUpstream = () => {
      reader.cancel();
      if (t.taskId) stopTask(deps.fetch, r, t.taskId, res.user);
    };
    ex.upstream.signal.addEventListener("abort", cancelUpstream, { once: true });
    const headers: Record<string, string> = { "x-request-id": id };

    if (!chatReq.stream) {
      const error = await pump(reader, t, NO_SINK, options, ex, () => {});
      req.signal?.removeEventListener("abort", clientGone);
      if (error) {
        finish(error.status, error);
        return errorResponse(error, headers);
      }
      finishTranslation(t, NO_SINK);
      recorded = recordTurn(conversations, chatReq, turn, r, client, res, t);
      if (t.conversationId) headers["x-dify-conversation-id"] = t.conversationId;
      entry.ttft_ms = entry.ms;
      finish(200);
      return jsonResponse(
        200,
        completionObject(id, created, chatReq.model, t, config.reasoning === "reasoning_content"),
        headers,
      );
    }

    // Streaming: hold the response until the answer starts (an early Dify error can still be an
    // HTTP error) or until the keepalive time passes with nothing to say.
    const format = new ChunkFormat(id, created, chatReq.model);
    let controller!: ReadableStreamDefaultController<Uint8Array>;
    let closed = false;
    const body = new ReadableStream<Uint8Array>({
      start(c) {
        controller = c;
      },
      cancel() {
        closed = true;
        clientGone();
      },
    });
    /** Queues text for the client; `at` is when (a read's own timestamp saves a clock call per read). */
    const write = (text: string, at = ex.now()) => {
      if (closed) return;
      try {
        controller.enqueue(textEncoder.encode(text));
        // Bytes queued before the response is returned have not reached the client: Dify's pings
        // must not keep postponing the keepalive that commits the response.
        if (committed) ex.lastWrite = at;
      } catch {
        closed = true;
      }
    };
    let pending = format.role();
    const sink: Sink = {
      content: (text) => void (pending += format.content(text)),
      reasoning: (text) => void (pending += format.reasoning(text)),
      ping: () => void (pending += ": ping\n\n"),
    };
    let decide!: () => void;
    const decided = new Promise<void>((resolve) => decide = resolve);
    let committed = false;
    ex.keepalive = () => {
      if (!committed) return decide();
      write(": keepalive\n\n");
    };
    const flushed = () => {
      if (!committed && (t.content || t.reasoning || t.error || t.ended)) decide();
      if (pending && (committed || !t.error || t.content || t.reasoning)) {
        write(pending, ex.lastUpstream);
        pending = "";
      }
    };
    const pumped = pump(reader, t, sink, options, ex, flushed).then(async (error) => {
      req.signal?.removeEventListener("abort", clientGone);
      // A broken connection or a timeout is no Dify `error` event: record it, so that an answer that
      // said nothing yet still becomes an HTTP error status below.
      if (error) t.error ??= error;
      decide();
      await decided;
      if (!committed) return finish(error?.status ?? 200, error);
      if (error) {
        if (error.status !== 499) write(errorFrame(error));
      } else {
        finishTranslation(t, sink);
        pending += format.finish();
        if (chatReq.includeUsage) {
          pending += format.usage(t.usage ?? { prompt_tokens: 0, completion_tokens: 0, total_tokens: 0 });
        }
        write(pending + SSE_DONE);
      }
      if (!closed) {
        closed = true;
        try {
          controller.close();
        } catch { /* the client is gone */ }
      }
      // After the close: recording the turn, bookkeeping and the log line must not hold the
      // answer's last bytes.
      if (!error) recorded = recordTurn(conversations, chatReq, turn, r, client, res, t);
      finish(error ? error.status : 200, error);
    });
    await decided;
    if (t.error && !t.content && !t.reasoning) {
      // Nothing was said yet: the client gets the error as an HTTP status.
      await pumped;
      return errorResponse(t.error, headers);
    }
    committed = true;
    entry.ttft_ms = Math.round(deps.now() - ex.started);
    if (pending && !t.error) {
      write(pending);
      pending = "";
    }
    if (t.conversationId) headers["x-dify-conversation-id"] = t.conversationId;
    return new Response(body, {
      headers: {
        "content-type": "text/event-stream; charset=utf-8",
        "cache-control": "no-cache",
        "x-accel-buffering": "no",
        ...CORS_HEADERS,
        ...headers,
      },
    });
  }

  async function handler(req: Request): Promise<Response> {
    const url = new URL(req.url);
    const path = url.pathname.replace(/\/+$/, "").replace(/^\/v1(?=\/|$)/, "") || "/";
    const entry: LogEntry = { t: new Date().toISOString(), method: req.method, path: url.pathname };
    try {
      if (req.method === "OPTIONS") return new Response(null, { status: 204, headers: CORS_HEADERS });
      if (path === "/healthz" || path === "/health") {
        if (req.method !== "GET" && req.method !== "HEAD") throw methodNotAllowed("GET");
        return jsonResponse(200, { status: "ok", streams: active });
      }
      if (path === "/chat/completions") {
        if (req.method !== "POST") throw methodNotAllowed("POST");
        const response = await chat(req, entry);
        return response;
      }
      if (path === "/models" || path.startsWith("/models/")) {
        if (req.method !== "GET") throw methodNotAllowed("GET");
        await authenticate(req);
        return models(pathPart(path.slice("/models/".length)));
      }
      if (path.startsWith("/conversations/")) {
        if (req.method !== "DELETE") throw methodNotAllowed("DELETE");
        const { client } = await authenticate(req);
        const user = pathPart(path.slice("/conversations/".length));
        await Promise.all(modelIds.map((scope) => deps.store.delete(storeKeys.user(client, scope, user))));
        return jsonResponse(200, { object: "conversation.deleted", user, deleted: true });
      }
      if (path === "/") {
        return jsonResponse(200, { name: "dify-openai", endpoints: ["/v1/chat/completions", "/v1/models"] });
      }
      throw apiError("not_found", `unknown route ${req.method} ${url.pathname}`);
    } catch (e) {
      const error = e instanceof ApiError
        ? e
        : apiError("internal_error", `internal error: ${(e as Error)?.message ?? e}`);
      if (!(e instanceof ApiError)) {
        deps.warn(`unexpected error on ${req.method} ${url.pathname}: ${(e as Error)?.stack ?? e}`);
      }
      if (path === "/chat/completions") {
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
    handler,
    get active() {
      return active;
    },
    /** Settles once every answered turn is recorded (its store write started): shutdown. */
    recorded: async () => void await Promise.all(conversations.recording),
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
export function defaultReader(body: ReadableStream<Uint8Array>): ChunkReader {
  const reader = body.getReader();
  return {
    async read() {
      const { value, done } = await reader.read();
      return done ? null : value;
    },
    cancel: () => void reader.cancel().catch(() => {}),
  };
}

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

export interface Runtime {
  name: "deno" | "bun";
  env(): Env;
  serve(port: number, handler: (req: Request) => Promise<Response>, onListen: (port: number) => void): Served;
  onSignal(signal: "SIGTERM" | "SIGINT", listener: () => void): void;
  openStore(path: string, env: Env): Promise<Store>;
  bodyReader(body: ReadableStream<Uint8Array>): ChunkReader;
  exit(code: number): never;
}

interface BunLike {
  serve(options: {
    port: number;
    hostname?: string;
    idleTimeout?: number;
    maxRequestBodySize?: number;
    fetch(req: Request): Promise<Response>;
  }): { port: number; stop(closeActive?: boolean): Promise<void> | void };
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

function denoRuntime(): Runtime {
  return {
    name: "deno",
    env: () => Deno.env.toObject(),
    serve(port, handler, onListen) {
      const server = Deno.serve({ port, onListen: ({ port }) => onListen(port) }, handler);
      return { port: server.addr.port, shutdown: () => server.shutdown() };
    },
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
    exit: (code) => Deno.exit(code),
  };
}

function bunRuntime(bun: BunLike, proc: ProcessLike): Runtime {
  return {
    name: "bun",
    env: () => ({ ...proc.env }),
    serve(port, handler, onListen) {
      // idleTimeout 0: Bun would otherwise close a quiet stream after 10 s; keepalives cover idling.
      const server = bun.serve({ port, idleTimeout: 0, maxRequestBodySize: Number.MAX_SAFE_INTEGER, fetch: handler });
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
export function currentRuntime(): Runtime {
  const g = globalThis as { Bun?: BunLike; process?: ProcessLike };
  return g.Bun && g.process ? bunRuntime(g.Bun, g.process) : denoRuntime();
}

// ─── main ───────────────────────────────────────────────────────────────────────────────────────

/**
 * Log lines written together once the current task is done: a request's line goes out after
 * its answer's last bytes rather than before them, and a busy server makes one write per batch.
 */
export class LineBatch {
  #lines: string[] = [];

  constructor(private write: (text: string) => void) {}

  add(line: string): void {
    if (this.#lines.push(line) === 1) setTimeout(() => this.flush(), 0);
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
  const conversations = new ConversationStore(store, config.conversationTtlMs, warn);
  const requestLog = new LineBatch((text) => console.log(text));
  const server = createServer(config, {
    store: conversations,
    log: (line) => requestLog.add(line),
    warn,
    fetch: (input, init) => fetch(input, init),
    bodyReader: (body) => rt.bodyReader(body),
    now: () => performance.now(),
  });
  if (!config.proxyKeys.length) {
    warn("PROXY_API_KEYS is not set: anyone who can reach this server can use it");
  }
  const served = rt.serve(config.port, server.handler, (port) => {
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
    const flushed = server.recorded().then(() => conversations.flush());
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
