// A project's assets: listed with previews and sizes, uploaded by drag and drop (or a
// file picker) straight to storage through a signed PUT URL with a progress bar, and
// downloaded through signed GET URLs (an <img> or a link cannot send a token).
import { call } from "./api.js";
import { $, assetItem, el, failed, say, size } from "./ui.js";

let project = "";

export async function openAssets(name) {
  project = name;
  await listAssets();
}

async function listAssets() {
  const page = await call("GET", `/v1/${project}/assets`, { query: { pageSize: 100 } });
  const assets = page.assets ?? [];
  const items = await Promise.all(assets.map(item));
  $("asset-list").replaceChildren(...items);
  $("asset-count").textContent = `${assets.length}${page.nextPageToken ? "+" : ""}`;
}

async function item(asset) {
  if (asset.state !== "READY") {
    return el("li", { className: "asset" }, `${asset.displayName || asset.name.split("/").pop()} (${asset.state})`);
  }
  const signed = await call("POST", `/v1/${asset.name}:signUrl`, { body: { method: "GET", ttl: "3600s" } });
  const li = assetItem(asset, signed.url);
  li.dataset.name = asset.name;
  return li;
}

/// Uploads one file: a PENDING asset, a signed PUT URL, then the bytes (XMLHttpRequest,
/// for its upload progress events), declaring their SHA-256 when the file is small
/// enough to hash in memory.
async function upload(file) {
  const bar = el("progress", { max: 100, value: 0 });
  const row = el("li", { className: "upload" }, `${file.name} `, bar);
  $("uploads").append(row);
  try {
    const asset = await call("POST", `/v1/${project}/assets`, {
      body: { displayName: file.name, contentType: file.type || "application/octet-stream" },
      query: { requestId: crypto.randomUUID() },
    });
    const signed = await call("POST", `/v1/${asset.name}:signUrl`, { body: { method: "PUT", ttl: "3600s" } });
    const headers = {};
    if (file.size <= 64 * 1024 * 1024) {
      const digest = await crypto.subtle.digest("SHA-256", await file.arrayBuffer());
      headers["x-mediaplane-sha256"] = [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
    }
    await new Promise((resolve, reject) => {
      const xhr = new XMLHttpRequest();
      xhr.open("PUT", signed.url);
      for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
      xhr.upload.onprogress = (e) => {
        if (e.lengthComputable) bar.value = Math.round((100 * e.loaded) / e.total);
      };
      xhr.onload = () => {
        if (xhr.status >= 200 && xhr.status < 300) return resolve();
        let message = xhr.statusText;
        try {
          message = JSON.parse(xhr.responseText).error.message;
        } catch {}
        reject(new Error(message));
      };
      xhr.onerror = () => reject(new Error("the upload was cut off"));
      xhr.send(file);
    });
    bar.value = 100;
    row.append(` done, ${size(file.size)}`);
    say(`Uploaded ${file.name}.`);
    await listAssets();
  } catch (e) {
    row.append(` failed: ${e.message}`);
    failed(e);
  }
}

const zone = $("drop-zone");
zone.addEventListener("dragover", (e) => {
  e.preventDefault();
  zone.classList.add("over");
});
zone.addEventListener("dragleave", () => zone.classList.remove("over"));
zone.addEventListener("drop", (e) => {
  e.preventDefault();
  zone.classList.remove("over");
  for (const file of e.dataTransfer.files) upload(file);
});
$("asset-file").addEventListener("change", () => {
  for (const file of $("asset-file").files) upload(file);
  $("asset-file").value = "";
});
