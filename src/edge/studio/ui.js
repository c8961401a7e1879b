// What every view uses: lookups, element building (text only: nothing from the
// server is ever parsed as HTML), the status line, and errors.
import { ApiError, token, watch } from "./api.js";

export const $ = (id) => document.getElementById(id);

export function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

export function say(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

const views = ["sign-in", "projects", "jobs", "job", "queues"];

export function show(view) {
  for (const id of views) $(id).hidden = id !== view;
  $("sign-out").hidden = view === "sign-in";
  $("nav").hidden = view === "sign-in";
}

// A refused token sends the user back to sign-in; anything else is shown.
export function failed(e) {
  if (e instanceof ApiError && e.status === 401) {
    token.clear();
    show("sign-in");
    say("Your token was refused (expired or not for this server): sign in again.", true);
    return;
  }
  say(e instanceof ApiError ? `${e.code}: ${e.message}` : String(e), true);
}

/// "3 s", "5 min", "2 h", "4 d" since `time`.
export function age(time) {
  const s = Math.max(0, (Date.now() - new Date(time).getTime()) / 1000);
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

/// An asset as a list item: a preview for images and videos, a download link, type
/// and size. `url` is a signed GET URL.
export function assetItem(asset, url) {
  const type = asset.contentType ?? "";
  let preview = "";
  if (type.startsWith("image/")) preview = el("img", { src: url, alt: asset.displayName ?? "", loading: "lazy" });
  else if (type.startsWith("video/")) preview = el("video", { src: url, controls: true, preload: "metadata" });
  const link = el("a", { href: url, textContent: asset.displayName || asset.name.split("/").pop(), download: "" });
  return el("li", { className: "asset" }, preview, link, ` ${type}, ${size(asset.sizeBytes)}`);
}

export function size(bytes) {
  const n = Number(bytes ?? 0);
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let v = n / 1024;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v.toFixed(1)} ${units[i]}`;
}

/// Follows the watch route `path`: `onEvent` gets each event that carries a job, and
/// `indicator` shows the connection (connecting…, live, reconnecting…, ended, closed).
/// The stream's final status ends it, since the browser would otherwise reconnect;
/// an error status is shown.
export function follow(path, query, indicator, onEvent) {
  const show = (state) => {
    indicator.textContent = state;
    indicator.dataset.state = state;
  };
  show("connecting…");
  const stream = watch(path, query);
  stream.onopen = () => show("live");
  stream.onerror = () => show(stream.readyState === EventSource.CLOSED ? "closed" : "reconnecting…");
  stream.onmessage = (m) => {
    const event = JSON.parse(m.data);
    if (event.job) onEvent(event);
  };
  stream.addEventListener("status", (m) => {
    const status = JSON.parse(m.data);
    stream.close();
    show(status.code === 200 ? "ended" : "closed");
    if (status.code !== 200) say(`${status.status}: ${status.message}`, true);
  });
  return stream;
}
