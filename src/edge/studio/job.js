// One job: its progress live (WatchJob over SSE), a timeline of its events (stored
// events replayed from its creation while they are kept), each attempt's error,
// input and result as JSON, its output assets with previews, and its pipeline: the
// jobs it depends on and the jobs that depend on it, linked, each with its state.
import { call } from "./api.js";
import { $, assetItem, el, failed, follow } from "./ui.js";

let stream = null;
let dependents = null;

export async function openJob(name) {
  const job = await call("GET", `/v1/${name}`);
  const project = name.split("/jobs/")[0];
  $("job-back").href = `?project=${encodeURIComponent(project)}`;
  $("job-timeline").replaceChildren(
    entry(job.createTime, "CREATED", `${job.kind}, priority ${job.priority ?? 0}, up to ${job.maxAttempts} attempts`),
  );
  render(job);
  closeJob();
  pipeline(job).catch(failed);
  // After sequence 1 (its creation): every stored event since, then each new one.
  let state = job.state;
  stream = follow(`/v1/${name}:watch`, { afterSequence: 1 }, $("job-live"), (event) => {
    render(event.job);
    $("job-timeline").append(describe(event));
    // Its end releases or cancels its dependents: show them as they are now.
    if (event.job.state !== state) {
      state = event.job.state;
      pipeline(event.job).catch(failed);
    }
  });
}

const link = (j) =>
  el(
    "li",
    {},
    el("a", { href: `?job=${encodeURIComponent(j.name)}`, textContent: `${j.kind} ${j.name.split("/").pop()}` }),
    " ",
    el("span", { className: `state ${j.state}`, textContent: j.state }),
  );

// Dependencies by name (read one by one: at most 100), read again whenever this job
// changes state (their ends are what release or cancel it); dependents pushed live by
// a WatchJobs stream filtered to the jobs that depend on this one.
async function pipeline(job) {
  const deps = await Promise.all(
    (job.dependsOn ?? []).map((name) =>
      call("GET", `/v1/${name}`).catch(() => ({ name, kind: "(gone)", state: "" })),
    ),
  );
  $("job-dependencies").replaceChildren(...deps.map(link));
  if (dependents) return;
  const project = job.name.split("/jobs/")[0];
  const shown = new Map();
  dependents = follow(
    `/v1/${project}/jobs:watch`,
    { filter: `depends_on = "${job.name}"` },
    $("job-dependents-live"),
    (event) => {
      shown.set(event.job.name, event.job);
      $("job-dependents").replaceChildren(...[...shown.values()].map(link));
    },
  );
}

export function closeJob() {
  stream?.close();
  stream = null;
  dependents?.close();
  dependents = null;
}

function entry(time, what, detail) {
  return el(
    "li",
    {},
    el("time", { textContent: new Date(time).toLocaleTimeString(), dateTime: time }),
    " ",
    el("strong", { textContent: what }),
    detail ? ` ${detail}` : "",
  );
}

function describe(event) {
  const j = event.job;
  const time = event.eventTime ?? j.updateTime;
  switch (event.type) {
    case "SNAPSHOT":
      return entry(time, "SNAPSHOT", `${j.state} (earlier events are no longer kept)`);
    case "PROGRESS":
      return entry(time, "PROGRESS", `${j.progressPercent ?? 0}% ${j.currentStep ?? ""} ${j.message ?? ""}`.trim());
    case "CANCEL_REQUESTED":
      return entry(time, "CANCEL REQUESTED", "");
    default: {
      const why = j.error ? `: ${j.error.message}` : "";
      const who = j.state === "RUNNING" ? ` (attempt ${j.attempt}, ${j.workerId})` : "";
      return entry(time, j.state, `${who}${why}`);
    }
  }
}

function render(j) {
  $("job-heading").textContent = `${j.kind} ${j.name.split("/").pop()}`;
  $("job-state").textContent = j.state;
  $("job-state").className = `state ${j.state}`;
  const pct = j.progressPercent ?? 0;
  $("job-progress").value = pct;
  $("job-percent").textContent = `${pct}%`;
  $("job-step").textContent = [j.currentStep, j.message].filter(Boolean).join(": ");
  const facts = [
    ["Attempt", `${j.attempt ?? 0} of ${j.maxAttempts}`],
    ["Worker", j.workerId ?? ""],
    ["Created", j.createTime],
    ["Started", j.startTime ?? ""],
    ["Ended", j.endTime ?? ""],
    ["Not before", j.scheduleTime ?? ""],
  ];
  $("job-facts").replaceChildren(
    ...facts.flatMap(([k, v]) => [el("dt", { textContent: k }), el("dd", { textContent: v })]),
  );
  $("job-error").textContent = j.error ? `${j.error.message}` : "";
  $("job-input-json").textContent = JSON.stringify(j.input ?? {}, null, 2);
  $("job-result-json").textContent = j.result ? JSON.stringify(j.result, null, 2) : "—";
  outputs(j.outputAssets ?? []);
}

let shownOutputs = "";

// Output assets with a preview: a signed GET URL, since an <img> cannot send a token.
async function outputs(names) {
  const key = names.join(",");
  if (key === shownOutputs) return;
  shownOutputs = key;
  const items = await Promise.all(
    names.map(async (name) => {
      try {
        const asset = await call("GET", `/v1/${name}`);
        const signed = await call("POST", `/v1/${name}:signUrl`, { body: { method: "GET", ttl: "3600s" } });
        return assetItem(asset, signed.url);
      } catch (e) {
        failed(e);
        return el("li", { textContent: name });
      }
    }),
  );
  $("job-outputs").replaceChildren(...items);
}
