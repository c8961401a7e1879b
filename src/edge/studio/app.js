// The studio: sign-in, then the view the URL names: `?job=…` one job, `?project=…`
// (with its filters) that project's jobs, live; `?queues` the queues; otherwise the
// projects.
import { token } from "./api.js";
import { openAssets } from "./assets.js";
import { closeJob, openJob } from "./job.js";
import { closeJobs, openJobs } from "./jobs.js";
import { clearProjects, loadProjects } from "./projects.js";
import { closeQueues, openQueues } from "./queues.js";
import { $, failed, say, show } from "./ui.js";

// A `#token=` fragment (the link `serve` prints) signs in and is removed at once, so
// it stays out of the history and of any bookmark.
function takeFragmentToken() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const t = fragment.get("token");
  if (!t) return;
  token.set(t);
  history.replaceState(null, "", location.pathname + location.search);
}

async function signedIn() {
  say("");
  const query = new URLSearchParams(location.search);
  const project = query.get("project");
  const job = query.get("job");
  try {
    if (job) {
      show("job");
      await openJob(job);
    } else if (query.has("queues")) {
      show("queues");
      await openQueues();
    } else if (project) {
      show("jobs");
      await openJobs(project);
      await openAssets(project);
    } else {
      show("projects");
      await loadProjects();
    }
  } catch (e) {
    failed(e);
  }
}

$("sign-in-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  token.set($("token").value.trim());
  $("token").value = "";
  await signedIn();
});
$("sign-out").addEventListener("click", () => {
  token.clear();
  clearProjects();
  closeJobs();
  closeJob();
  closeQueues();
  show("sign-in");
  say("Signed out.");
});

takeFragmentToken();
if (token.get()) signedIn();
else show("sign-in");
