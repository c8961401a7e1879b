// The REST edge of this server, with the signed-in token. Errors come back as the
// edge's JSON envelope; `ApiError` carries its status name and message.
const KEY = "mediaplane.token";

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (t) => sessionStorage.setItem(KEY, t),
  clear: () => sessionStorage.removeItem(KEY),
};

export class ApiError extends Error {
  constructor(status, code, message, details = []) {
    super(message);
    this.status = status;
    this.code = code;
    this.details = details;
  }

  /// `google.rpc.BadRequest` field violations: field path -> description.
  get fields() {
    const out = {};
    for (const d of this.details) {
      for (const v of d.fieldViolations ?? []) out[v.field] = v.description;
    }
    return out;
  }
}

export async function call(method, path, { query, body } = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query ?? {})) {
    if (v !== undefined && v !== "") url.searchParams.set(k, v);
  }
  const headers = { authorization: `Bearer ${token.get() ?? ""}` };
  if (body !== undefined) headers["content-type"] = "application/json";
  const response = await fetch(url, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  const json = text ? JSON.parse(text) : {};
  if (!response.ok) {
    const e = json.error ?? {};
    throw new ApiError(response.status, e.status ?? "UNKNOWN", e.message ?? response.statusText, e.details ?? []);
  }
  return json;
}

/// A server-sent event stream of `path` (a watch route). EventSource cannot send
/// headers, so the token goes in the query, which the server accepts on watch
/// routes only. It reconnects by itself, resuming with `Last-Event-ID`.
export function watch(path, query = {}) {
  const url = new URL(path, location.origin);
  for (const [k, v] of Object.entries(query)) {
    if (v !== undefined && v !== "") url.searchParams.set(k, v);
  }
  url.searchParams.set("access_token", token.get() ?? "");
  return new EventSource(url);
}
