// Queues (admins and workers read them; admins change them): per kind, what the queue
// holds (waiting, queued, running, the oldest queued job's age, completions and
// failures per minute) and its settings, with pause and resume and the limits set in
// place. Figures come from Postgres; the view reads them again every two seconds.
import { ApiError, call } from "./api.js";
import { $, el, failed, say } from "./ui.js";

let timer = null;
let editing = "";

export async function openQueues() {
  closeQueues();
  await load();
  timer = setInterval(() => load().catch(failed), 2000);
}

export function closeQueues() {
  clearInterval(timer);
  timer = null;
}

function seconds(d) {
  if (!d) return "—";
  const s = Number.parseFloat(d);
  if (s < 60) return `${s.toFixed(1)} s`;
  if (s < 3600) return `${(s / 60).toFixed(1)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

const limit = (n) => (n ? String(n) : "—");
const rate = (r) => (r ? `${r.jobs} per ${r.interval}` : "—");

async function load() {
  const { queues = [] } = await call("GET", "/v1/queues");
  $("queue-updated").textContent = new Date().toLocaleTimeString();
  // A row being edited is left alone until its form is sent or dismissed.
  const rows = queues.map((q) => (q.name === editing ? $(`queue-${q.name}`) : row(q)));
  $("queue-rows").replaceChildren(...rows.filter(Boolean));
  if (!queues.length) $("queue-rows").append(el("tr", {}, el("td", { colSpan: 11, textContent: "No queues yet: a kind appears once it has jobs or settings." })));
}

function row(q) {
  const kind = q.name.replace(/^queues\//, "");
  const toggle = el("button", {
    type: "button",
    textContent: q.paused ? "Resume" : "Pause",
    onclick: () => update(q, { paused: !q.paused }, ["paused"]),
  });
  const edit = el("button", { type: "button", textContent: "Limits", onclick: () => limits(q) });
  const cells = [
    el("td", {}, el("strong", { textContent: kind })),
    el("td", { className: `state ${q.paused ? "FAILED" : ""}`, textContent: q.paused ? "paused" : "active" }),
    el("td", { textContent: q.waitingJobs ?? "0" }),
    el("td", { textContent: q.queuedJobs ?? "0" }),
    el("td", { textContent: q.runningJobs ?? "0" }),
    el("td", { textContent: seconds(q.oldestQueuedAge) }),
    el("td", { textContent: `${q.completionsPerMinute ?? "0"} / ${q.failuresPerMinute ?? "0"}` }),
    el("td", { textContent: limit(q.maxRunning) }),
    el("td", { textContent: limit(q.maxRunningPerKey) }),
    el("td", { textContent: rate(q.startRate) }),
    el("td", { className: "actions" }, toggle, " ", edit),
  ];
  return el("tr", { id: `queue-${q.name}` }, ...cells);
}

// The limits of one queue, edited in its row; errors are shown on their field.
function limits(q) {
  editing = q.name;
  const field = (id, label, value) =>
    el("label", {}, `${label} `, el("input", { id, type: "number", min: 0, value: value ?? "", size: 6 }));
  const errors = el("span", { id: "limit-error", className: "field-error" });
  const form = el(
    "form",
    { className: "inline" },
    field("limit-max", "Max running", q.maxRunning ?? 0),
    field("limit-key", "Per key", q.maxRunningPerKey ?? 0),
    field("limit-rate-jobs", "Starts", q.startRate?.jobs ?? ""),
    el("label", {}, "per ", el("input", { id: "limit-rate-interval", value: q.startRate?.interval ?? "1s", size: 5, "aria-label": "Start-rate interval" })),
    el("button", { type: "submit", textContent: "Save" }),
    el("button", { type: "button", textContent: "Dismiss", onclick: () => { editing = ""; load().catch(failed); } }),
    errors,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const jobs = $("limit-rate-jobs").value.trim();
    const interval = $("limit-rate-interval").value.trim();
    errors.textContent = "";
    // The API's JSON form of a duration: seconds with an `s`.
    if (jobs && !/^\d+(\.\d+)?s$/.test(interval)) {
      errors.textContent = "start_rate.interval: seconds with an s, like 1s, 0.5s or 60s";
      return;
    }
    const body = {
      maxRunning: Number($("limit-max").value || 0),
      maxRunningPerKey: Number($("limit-key").value || 0),
      startRate: jobs ? { jobs: Number(jobs), interval } : undefined,
      etag: q.etag,
    };
    try {
      // A FieldMask in JSON (and so in a REST query) names fields in lowerCamelCase.
      await update(q, body, ["maxRunning", "maxRunningPerKey", "startRate"], true);
      editing = "";
      await load();
    } catch (e) {
      if (e instanceof ApiError && Object.keys(e.fields).length) {
        errors.textContent = Object.entries(e.fields).map(([f, d]) => `${f.replace(/^queue\./, "")}: ${d}`).join("; ");
      } else if (e instanceof ApiError) {
        errors.textContent = `${e.code}: ${e.message}`;
      } else {
        failed(e);
      }
    }
  });
  const row = $(`queue-${q.name}`);
  row.replaceChildren(el("td", { colSpan: 11 }, el("strong", { textContent: `${q.name.replace(/^queues\//, "")} ` }), form));
  $("limit-max").focus();
}

async function update(q, body, paths, raise = false) {
  try {
    const updated = await call("PATCH", `/v1/${q.name}`, {
      query: { updateMask: paths.join(",") },
      body,
    });
    say(`${updated.name}: ${updated.paused ? "paused" : "active"}.`);
    if (!raise) await load();
    return updated;
  } catch (e) {
    if (raise) throw e;
    failed(e);
  }
}
