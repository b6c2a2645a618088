// The page's only door to the server: every call goes through `request`, which sends the API key (when one is
// set) and turns an error response into an ApiError carrying the server's own message.

const KEY_SLOT = "kiln.apiKey"; // sessionStorage: this tab only, never sent anywhere but this server

let apiKey = sessionStorage.getItem(KEY_SLOT) || "";

export function setKey(key) {
  apiKey = key;
  if (key) sessionStorage.setItem(KEY_SLOT, key);
  else sessionStorage.removeItem(KEY_SLOT);
}

export const hasKey = () => apiKey !== "";

/** An HTTP error in the documented shape: {"error": {"message", "type", "param", "code"}, "detail"}. */
export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(error.message || (body && body.detail) || `HTTP ${status}`);
    this.status = status;
    this.code = error.code || null;
    this.param = error.param || null;
  }
}

function headers(extra = {}) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra;
}

async function failure(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    body = { detail: `HTTP ${response.status} ${response.statusText}` };
  }
  return new ApiError(response.status, body);
}

/** fetch() with the key; resolves to the Response when it is 2xx, else throws ApiError. */
export async function request(path, { method = "GET", json, form, signal } = {}) {
  const init = { method, signal, headers: headers() };
  if (json !== undefined) {
    init.body = JSON.stringify(json);
    init.headers = headers({ "Content-Type": "application/json" });
  } else if (form !== undefined) {
    init.body = form; // the browser sets the multipart boundary
  }
  const response = await fetch(path, init);
  if (!response.ok) throw await failure(response);
  return response;
}

export const getJson = async (path) => (await request(path)).json();
export const getText = async (path) => (await request(path)).text();

/** Read a `text/event-stream` body, calling onEvent(name, data) for each event (data parsed as JSON). */
export async function readEvents(response, onEvent) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let name = "message";
      const data = [];
      for (const line of block.split("\n")) {
        if (line.startsWith("event:")) name = line.slice(6).trim();
        else if (line.startsWith("data:")) data.push(line.slice(5).trimStart());
      }
      if (data.length) onEvent(name, JSON.parse(data.join("\n")));
    }
  }
}
