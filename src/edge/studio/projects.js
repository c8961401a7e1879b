// Projects: list, search, create, rename, delete. A project's name opens its jobs.
import { call } from "./api.js";
import { $, el, failed, say } from "./ui.js";

// Projects: the pages loaded so far, filtered in place by the search box.
let projects = [];
let nextPage = "";

export async function loadProjects(more = false) {
  const page = await call("GET", "/v1/projects", {
    query: { pageSize: 100, pageToken: more ? nextPage : "" },
  });
  projects = more ? projects.concat(page.projects ?? []) : page.projects ?? [];
  nextPage = page.nextPageToken ?? "";
  $("more-projects").hidden = !nextPage;
  renderProjects();
}

function renderProjects() {
  const needle = $("search").value.trim().toLowerCase();
  const shown = projects.filter(
    (p) => !needle || p.displayName.toLowerCase().includes(needle) || p.name.includes(needle),
  );
  $("project-rows").replaceChildren(...shown.map(projectRow));
  if (!projects.length) say("No projects yet: create one.");
}

function projectRow(p) {
  const link = el("a", { href: `?project=${encodeURIComponent(p.name)}`, textContent: p.displayName });
  const name = el("td", { className: "display-name" }, link);
  const rename = el("button", { type: "button", textContent: "Rename" });
  rename.addEventListener("click", () => startRename(p, name));
  const remove = el("button", { type: "button", className: "danger", textContent: "Delete" });
  remove.addEventListener("click", () => deleteProject(p));
  const row = el(
    "tr",
    {},
    name,
    el("td", { className: "mono", textContent: p.name }),
    el("td", { textContent: new Date(p.createTime).toLocaleString() }),
    el("td", { className: "actions" }, rename, " ", remove),
  );
  row.dataset.name = p.name;
  return row;
}

function startRename(p, cell) {
  const input = el("input", { value: p.displayName, required: true, maxLength: 200 });
  input.setAttribute("aria-label", "New name");
  const form = el("form", { className: "inline" }, input, el("button", { type: "submit", textContent: "Save" }));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      // The etag makes a rename lost to someone else's change fail, not overwrite it.
      const updated = await call("PATCH", `/v1/${p.name}`, {
        query: { updateMask: "displayName" },
        body: { displayName: input.value, etag: p.etag },
      });
      projects = projects.map((q) => (q.name === updated.name ? updated : q));
      renderProjects();
      say(`Renamed to ${updated.displayName}.`);
    } catch (e) {
      failed(e);
    }
  });
  cell.replaceChildren(form);
  input.focus();
}

async function deleteProject(p) {
  if (!confirm(`Delete project "${p.displayName}" with all its jobs and assets? This cannot be undone.`)) return;
  try {
    await call("DELETE", `/v1/${p.name}`, { query: { etag: p.etag } });
    projects = projects.filter((q) => q.name !== p.name);
    renderProjects();
    say(`Deleted ${p.displayName}.`);
  } catch (e) {
    failed(e);
  }
}


export function clearProjects() {
  projects = [];
  $("project-rows").replaceChildren();
}

$("search").addEventListener("input", renderProjects);
$("more-projects").addEventListener("click", () => loadProjects(true).catch(failed));
$("create-project").addEventListener("submit", async (event) => {
  event.preventDefault();
  try {
    const created = await call("POST", "/v1/projects", {
      body: { displayName: $("new-project").value },
      query: { requestId: crypto.randomUUID() },
    });
    $("new-project").value = "";
    projects = [created, ...projects];
    renderProjects();
    say(`Created ${created.displayName}.`);
  } catch (e) {
    failed(e);
  }
});
