// The API as the studio calls it: every request with the user's token (kept in localStorage),
// every error as the server's own `error` message, and a job's event stream read with fetch()
// (EventSource cannot send an Authorization header).

// Beside the studio's files (`<root>/studio/`): the page works at `/` and, behind a proxy that
// serves the server under a path of its own, at `/<path>/`.
export const BASE = new URL("../v1/dreamina", import.meta.url).pathname;
const TOKEN_KEY = "dreamserve.token";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function token() {
  return localStorage.getItem(TOKEN_KEY) || "";
}

export function setToken(value) {
  if (value) localStorage.setItem(TOKEN_KEY, value);
  else localStorage.removeItem(TOKEN_KEY);
}

// A path segment: account ids (`REGION:name`) and job ids hold ':' and '@'.
export const seg = (value) => encodeURIComponent(value);

async function errorOf(reply) {
  let message = `${reply.status} ${reply.statusText}`;
  try {
    const body = await reply.json();
    if (body && typeof body.error === "string") message = body.error;
  } catch {
    // not JSON (a proxy's page): the status line says what happened
  }
  return new ApiError(reply.status, message);
}

// `options.json`: a body sent as JSON; `options.body` + `options.type`: a raw body (an upload).
export async function api(method, path, options = {}) {
  const headers = { Authorization: `Bearer ${options.token ?? token()}` };
  let body;
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(options.json);
  } else if (options.body !== undefined) {
    headers["Content-Type"] = options.type;
    body = options.body;
  }
  let reply;
  try {
    reply = await fetch(BASE + path, { method, headers, body, signal: options.signal });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError(0, `The server cannot be reached (${error.message})`);
  }
  if (!reply.ok) throw await errorOf(reply);
  return reply.json();
}

export const get = (path, options) => api("GET", path, options);
export const post = (path, json) => api("POST", path, { json });
export const del = (path) => api("DELETE", path);

export function query(params) {
  const search = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== undefined && value !== null && value !== "") search.set(key, value);
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

// Read GET /images/<jobid>/events: `onRecord(record, event)` for every `progress` and the final
// `done`; resolves with the last record when the stream ends. Comments (keep-alives) are skipped.
export async function streamJob(jobid, onRecord, signal) {
  const reply = await fetch(`${BASE}/images/${seg(jobid)}/events`, {
    headers: { Authorization: `Bearer ${token()}`, Accept: "text/event-stream" },
    signal,
  });
  if (!reply.ok) throw await errorOf(reply);
  const reader = reply.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let last = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let event = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith(":")) continue;
        const colon = line.indexOf(":");
        const field = colon < 0 ? line : line.slice(0, colon);
        const text = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
        if (field === "event") event = text;
        else if (field === "data") data.push(text);
      }
      if (data.length) {
        last = JSON.parse(data.join("\n"));
        onRecord(last, event);
      }
    }
  }
  return last;
}
