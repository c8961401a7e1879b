// A project's jobs, live: WatchJobs over SSE (resumed with Last-Event-ID when the
// connection drops), filters kept in the URL, jobs created, cancelled and retried one
// by one or on a selection.
import { ApiError, call } from "./api.js";
import { $, age, el, failed, follow, say } from "./ui.js";

let project = "";
let stream = null;
const jobs = new Map();
const selected = new Set();
let drawing = false;

export async function openJobs(name) {
  project = name;
  const p = await call("GET", `/v1/${name}`);
  $("jobs-title").textContent = p.displayName;
  const q = new URLSearchParams(location.search);
  $("filter-state").value = q.get("state") ?? "";
  $("filter-kind").value = q.get("kind") ?? "";
  $("filter-label").value = q.get("label") ?? "";
  subscribe();
}

// Ages move on without events: refresh them every few seconds.
setInterval(() => {
  for (const [name, row] of rows) {
    const job = jobs.get(name);
    if (job) row.children[7].textContent = age(job.createTime);
  }
}, 5000);

export function closeJobs() {
  stream?.close();
  stream = null;
  jobs.clear();
  rows.clear();
  changed.clear();
  selected.clear();
}

/// The WatchJobs filter the controls describe (values are quoted; a quote in one is
/// refused before it gets that far).
function filter() {
  const parts = [];
  const state = $("filter-state").value;
  if (state) parts.push(`state = ${state}`);
  const kind = $("filter-kind").value.trim();
  if (kind) parts.push(`kind = "${kind}"`);
  const label = $("filter-label").value.trim();
  if (label) {
    const [k, v = ""] = label.split("=", 2);
    parts.push(`labels.${k.trim()} = "${v.trim()}"`);
  }
  return parts.join(" AND ");
}

function subscribe() {
  closeJobs();
  draw();
  for (const id of ["filter-kind", "filter-label"]) {
    if ($(id).value.includes('"')) {
      say("Filters cannot contain quotes.", true);
      return;
    }
  }
  // WatchJobs never ends OK; an error (the project deleted, a bad filter) is final.
  stream = follow(`/v1/${project}/jobs:watch`, { filter: filter() }, $("live"), (event) => {
    jobs.set(event.job.name, event.job);
    changed.add(event.job.name);
    redraw();
  });
}

// Many events can arrive in one frame: draw once per frame, rebuilding only the rows
// of jobs that changed, and reordering only when a job is new to the view.
const rows = new Map();
const changed = new Set();

function redraw() {
  if (drawing) return;
  drawing = true;
  requestAnimationFrame(() => {
    drawing = false;
    draw();
  });
}

function draw() {
  let reorder = false;
  for (const name of changed) {
    const job = jobs.get(name);
    const row = jobRow(job);
    const old = rows.get(name);
    rows.set(name, row);
    if (old) old.replaceWith(row);
    else reorder = true;
  }
  changed.clear();
  if (reorder || rows.size !== $("job-rows").children.length) {
    const order = [...jobs.values()].sort((a, b) => (a.createTime < b.createTime ? 1 : -1));
    $("job-rows").replaceChildren(...order.map((j) => rows.get(j.name)));
  }
  showSelection();
}

function showSelection() {
  $("selection").textContent = selected.size ? `${selected.size} selected` : "";
}

function jobRow(j) {
  const id = j.name.split("/").pop();
  const pick = el("input", { type: "checkbox", checked: selected.has(j.name) });
  pick.setAttribute("aria-label", `Select ${id}`);
  pick.addEventListener("change", () => {
    pick.checked ? selected.add(j.name) : selected.delete(j.name);
    showSelection();
  });
  const pct = j.progressPercent ?? 0;
  const actions = el("td", { className: "actions" });
  if (j.state === "QUEUED" || j.state === "RUNNING") actions.append(button("Cancel", () => act([j.name], "cancel")));
  if (j.state === "FAILED" || j.state === "CANCELLED") actions.append(button("Retry", () => act([j.name], "retry")));
  const row = el(
    "tr",
    {},
    el("td", {}, pick),
    // The end of an id tells jobs apart (its start is the creation time).
    el("td", { className: "mono" }, el("a", { href: `?job=${encodeURIComponent(j.name)}`, textContent: `…${id.slice(-8)}`, title: id })),
    el("td", { textContent: j.kind }),
    el("td", { className: `state ${j.state}`, textContent: j.state }),
    el("td", {}, el("progress", { max: 100, value: pct }), ` ${pct}%`),
    el("td", { textContent: j.currentStep ?? "" }),
    el("td", { textContent: j.attempt ?? 0 }),
    el("td", { textContent: age(j.createTime), title: j.createTime }),
    actions,
  );
  row.dataset.name = j.name;
  row.dataset.state = j.state;
  return row;
}

function button(text, onclick) {
  const b = el("button", { type: "button", textContent: text });
  b.addEventListener("click", onclick);
  return b;
}

/// Cancels or retries `names`; what changed arrives through the stream.
async function act(names, verb) {
  const errors = [];
  for (const name of names) {
    try {
      await call("POST", `/v1/${name}:${verb}`, { body: {} });
    } catch (e) {
      errors.push(`${name.split("/").pop()}: ${e.message}`);
    }
  }
  if (errors.length) say(errors.join("; "), true);
  else say(`${verb === "cancel" ? "Cancelled" : "Retried"} ${names.length} job${names.length > 1 ? "s" : ""}.`);
}

function bulk(verb, fits) {
  const names = [...selected].filter((n) => fits(jobs.get(n)?.state));
  if (!names.length) return say(`Nothing selected can be ${verb === "cancel" ? "cancelled" : "retried"}.`, true);
  if (verb === "cancel" && !confirm(`Cancel ${names.length} job${names.length > 1 ? "s" : ""}?`)) return;
  selected.clear();
  for (const box of document.querySelectorAll("#job-rows input[type=checkbox]")) box.checked = false;
  showSelection();
  act(names, verb);
}

// Filters go into the URL, so a reload or a shared link shows the same view.
$("job-filters").addEventListener("change", () => {
  const q = new URLSearchParams({ project });
  for (const [key, id] of [["state", "filter-state"], ["kind", "filter-kind"], ["label", "filter-label"]]) {
    const v = $(id).value.trim();
    if (v) q.set(key, v);
  }
  history.replaceState(null, "", `?${q}`);
  subscribe();
});
$("job-filters").addEventListener("submit", (event) => event.preventDefault());
$("cancel-selected").addEventListener("click", () =>
  bulk("cancel", (s) => s === "WAITING" || s === "QUEUED" || s === "RUNNING"),
);
$("retry-selected").addEventListener("click", () => bulk("retry", (s) => s === "FAILED" || s === "CANCELLED"));

// Creating a job: the input must be a JSON object; the server's own field errors
// are shown on their fields too.
$("create-job").addEventListener("submit", async (event) => {
  event.preventDefault();
  for (const f of ["kind", "input", "priority", "schedule", "depends"]) $(`job-${f}-error`).textContent = "";
  let input;
  try {
    input = JSON.parse($("job-input").value || "{}");
    if (typeof input !== "object" || input === null || Array.isArray(input)) throw new Error("must be a JSON object");
  } catch (e) {
    $("job-input-error").textContent = `Input: ${e.message}`;
    return;
  }
  const job = { kind: $("job-kind").value.trim(), input, priority: Number($("job-priority").value || 0) };
  if ($("job-schedule").value) job.scheduleTime = new Date($("job-schedule").value).toISOString();
  const depends = $("job-depends").value.split(/\s+/).filter(Boolean);
  if (depends.length) job.dependsOn = depends;
  try {
    const created = await call("POST", `/v1/${project}/jobs`, { body: job, query: { requestId: crypto.randomUUID() } });
    say(`Created ${created.name.split("/").pop()}.`);
  } catch (e) {
    const fields = e instanceof ApiError ? e.fields : {};
    const map = {
      "job.kind": "kind",
      "job.input": "input",
      "job.priority": "priority",
      "job.schedule_time": "schedule",
      "job.depends_on": "depends",
    };
    let shown = false;
    for (const [field, why] of Object.entries(fields)) {
      const key = Object.keys(map).find((k) => field === k || field.startsWith(`${k}.`) || field.startsWith(`${k}[`));
      if (key) {
        $(`job-${map[key]}-error`).textContent = why;
        shown = true;
      }
    }
    if (!shown && e instanceof ApiError && /dependency/.test(e.message)) {
      $("job-depends-error").textContent = `${e.code}: ${e.message}`;
      shown = true;
    }
    if (!shown) failed(e);
  }
});
