// The studio: sign-in, then projects (list, search, create, rename, delete).
import { ApiError, call, token } from "./api.js";

const $ = (id) => document.getElementById(id);

function say(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

function failed(e) {
  if (e instanceof ApiError && e.status === 401) {
    token.clear();
    show("sign-in");
    say("Your token was refused (expired or not for this server): sign in again.", true);
    return;
  }
  say(e instanceof ApiError ? `${e.code}: ${e.message}` : String(e), true);
}

function show(view) {
  for (const id of ["sign-in", "projects"]) $(id).hidden = id !== view;
  $("sign-out").hidden = view === "sign-in";
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

// A `#token=` fragment (the link `serve` prints) signs in and is removed at once, so
// it stays out of the history and of any bookmark.
function takeFragmentToken() {
  const fragment = new URLSearchParams(location.hash.slice(1));
  const t = fragment.get("token");
  if (!t) return;
  token.set(t);
  history.replaceState(null, "", location.pathname + location.search);
}

// Projects: the pages loaded so far, filtered in place by the search box.
let projects = [];
let nextPage = "";

async function loadProjects(more = false) {
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
  const name = el("td", { className: "display-name", textContent: p.displayName });
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

async function signedIn() {
  show("projects");
  say("");
  try {
    await loadProjects();
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
  projects = [];
  $("project-rows").replaceChildren();
  show("sign-in");
  say("Signed out.");
});
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

takeFragmentToken();
if (token.get()) signedIn();
else show("sign-in");
