// A page that uses mediaplane the way a studio front end would: a generated
// TypeScript client over grpc-web, and EventSource over SSE with no library.
import { createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcWebTransport } from "@connectrpc/connect-web";
import { ProjectsService } from "../gen/mediaplane/v1/projects_pb";
import { JobsService, Job_State } from "../gen/mediaplane/v1/jobs_pb";

const params = new URLSearchParams(location.search);
const server = params.get("server")!;
const token = params.get("token")!;
const el = (id: string) => document.getElementById(id)!;

const auth: Interceptor = (next) => async (req) => {
  req.header.set("authorization", `Bearer ${token}`);
  return next(req);
};
const transport = createGrpcWebTransport({ baseUrl: server, interceptors: [auth] });
const projects = createClient(ProjectsService, transport);
const jobs = createClient(JobsService, transport);

function show(prefix: string, state: string, percent: number, step: string) {
  (el(`${prefix}-bar`) as HTMLProgressElement).value = percent;
  el(prefix).textContent = `${state} ${percent}% ${step}`.trim();
}

async function main() {
  const project = await projects.createProject({ project: { displayName: "from the browser" } });
  el("project").textContent = project.name;
  const job = await jobs.createJob({ parent: project.name, job: { kind: "browser-render" } });
  el("job").textContent = job.name;

  // grpc-web server streaming.
  (async () => {
    for await (const event of jobs.watchJob({ name: job.name })) {
      const j = event.job!;
      show("grpcweb", Job_State[j.state], j.progressPercent, j.currentStep);
    }
    el("grpcweb").dataset.done = "true";
  })().catch((e) => (el("errors").textContent += `grpc-web: ${e}`));

  // Server-Sent Events: EventSource cannot send headers, so the token is a query parameter.
  const events = new EventSource(`${server}/v1/${job.name}:watch?access_token=${encodeURIComponent(token)}`);
  events.onmessage = (e) => {
    const j = JSON.parse(e.data).job;
    show("sse", j.state, j.progressPercent, j.currentStep);
  };
  events.addEventListener("status", (e) => {
    el("sse").dataset.done = JSON.parse((e as MessageEvent).data).status;
    events.close();
  });
}

main().catch((e) => (el("errors").textContent += String(e)));
