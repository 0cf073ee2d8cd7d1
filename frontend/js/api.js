// The JSON API (docs/contracts.md#contract-3-http-api) and write access. Writes carry
// `Authorization: Bearer <token>` when the user pasted a token (kept in localStorage); a server started with
// --local accepts writes without one.

const BASE = "/api/v1";
const TOKEN_KEY = "hsae.writeToken";

export class ApiError extends Error {
  constructor(status, kind, detail) {
    super(detail || `HTTP ${status}`);
    this.status = status;
    this.kind = kind;
  }
}

const enc = encodeURIComponent;

export function runPath(run) {
  return `/runs/${enc(run)}`;
}

export function featurePath(run, level, index) {
  return `/runs/${enc(run)}/features/${level}/${index}`;
}

export function forestFocusPath(run, level, index) {
  return `/runs/${enc(run)}?focus=${level}:${index}`;
}

async function request(method, path, { params, body, signal } = {}) {
  const url = new URL(BASE + path, location.origin);
  for (const [k, v] of Object.entries(params || {})) {
    if (v !== null && v !== undefined && v !== "") url.searchParams.set(k, v);
  }
  const headers = { Accept: "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const token = auth.token();
  if (method !== "GET" && token) headers.Authorization = `Bearer ${token}`;
  let response;
  try {
    response = await fetch(url, {
      method, headers, signal, body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, "network", "The server could not be reached.");
  }
  const data = await response.json().catch(() => null);
  if (!response.ok) {
    throw new ApiError(response.status, data?.error ?? "http_error", data?.detail ?? `HTTP ${response.status}`);
  }
  return data;
}

const runUrl = (run) => `/runs/${enc(run)}`;
const featureUrl = (run, level, index) => `${runUrl(run)}/features/${level}/${index}`;

export const api = {
  runs: (params) => request("GET", "/runs", { params }),
  run: (run) => request("GET", runUrl(run)),
  forest: (run, params, signal) => request("GET", `${runUrl(run)}/forest`, { params, signal }),
  feature: (run, level, index, signal) => request("GET", featureUrl(run, level, index), { signal }),
  children: (run, level, index, params, signal) =>
    request("GET", `${featureUrl(run, level, index)}/children`, { params, signal }),
  position: (run, level, index, params, signal) =>
    request("GET", `${featureUrl(run, level, index)}/position`, { params, signal }),
  examples: (run, level, index, params, signal) =>
    request("GET", `${featureUrl(run, level, index)}/examples`, { params, signal }),
  exportSubtree: (run, level, index, params) =>
    request("GET", `${featureUrl(run, level, index)}/export`, { params }),
  history: (run, level, index, params) =>
    request("GET", `${featureUrl(run, level, index)}/annotation/history`, { params }),
  annotate: (run, level, index, annotation) =>
    request("PUT", `${featureUrl(run, level, index)}/annotation`, { body: annotation }),
  search: (run, params, signal) => request("GET", `${runUrl(run)}/search`, { params, signal }),
  activations: (run, text) => request("POST", `${runUrl(run)}/activations`, { body: { text } }),
  steer: (run, body) => request("POST", `${runUrl(run)}/steer`, { body }),
};

export const auth = {
  /** How the server takes writes: "local" (no token needed), "token" (bearer token), "off" (none). */
  mode: document.body.dataset.writes || "off",
  get local() {
    return this.mode === "local";
  },
  token() {
    try {
      return localStorage.getItem(TOKEN_KEY) || "";
    } catch {
      return "";
    }
  },
  setToken(token) {
    if (token) localStorage.setItem(TOKEN_KEY, token);
    else localStorage.removeItem(TOKEN_KEY);
    window.dispatchEvent(new CustomEvent("hsae:auth"));
  },
  canWrite() {
    return this.local || (this.mode === "token" && Boolean(this.token()));
  },
};
