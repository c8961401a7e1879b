// Builds the page, serves it, drives it in headless Chromium and checks what it shows.
// Env: SERVER (mediaplane URL), TOKEN, PORT (where to serve the page), SCREENSHOT.
import { build } from "esbuild";
import { launch } from "./harness.mjs";
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";

const dir = path.dirname(fileURLToPath(import.meta.url));
const { SERVER, TOKEN, PORT, SCREENSHOT } = process.env;
const bundle = await build({ entryPoints: [path.join(dir, "src/app.ts")], bundle: true, format: "esm", write: false, target: "es2022" });
const js = bundle.outputFiles[0].text;
const html = fs.readFileSync(path.join(dir, "index.html"));
const site = http.createServer((req, res) => {
  if (req.url.startsWith("/app.js")) {
    res.writeHead(200, { "content-type": "text/javascript" }).end(js);
  } else {
    res.writeHead(200, { "content-type": "text/html" }).end(html);
  }
});
await new Promise((ok) => site.listen(Number(PORT), "127.0.0.1", ok));

const browser = await launch();
let failed = false;
try {
  const page = await browser.newPage();
  page.on("console", (m) => console.log(`page: ${m.text()}`));
  await page.goto(`http://127.0.0.1:${PORT}/?server=${encodeURIComponent(SERVER)}&token=${encodeURIComponent(TOKEN)}`);
  await page.waitForFunction(() => document.getElementById("job").textContent.includes("/jobs/"), null, { timeout: 60000 });
  // The worker (driven by the Rust test) advances the job; both views follow it to the end.
  await page.waitForFunction(() => document.getElementById("grpcweb").dataset.done === "true", null, { timeout: 60000 });
  await page.waitForFunction(() => document.getElementById("sse").dataset.done === "OK", null, { timeout: 60000 });
  const seen = await page.evaluate(() => ({
    project: document.getElementById("project").textContent,
    grpcweb: document.getElementById("grpcweb").textContent,
    sse: document.getElementById("sse").textContent,
    errors: document.getElementById("errors").textContent,
  }));
  console.log(JSON.stringify(seen));
  if (SCREENSHOT) await page.screenshot({ path: SCREENSHOT });
  if (!seen.project.startsWith("projects/")) throw new Error(`no project shown: ${seen.project}`);
  if (!seen.grpcweb.startsWith("SUCCEEDED 100%")) throw new Error(`grpc-web view: ${seen.grpcweb}`);
  if (!seen.sse.startsWith("SUCCEEDED 100%")) throw new Error(`SSE view: ${seen.sse}`);
  if (seen.errors) throw new Error(`page errors: ${seen.errors}`);
} catch (e) {
  console.error(String(e));
  failed = true;
} finally {
  await browser.close();
  site.close();
}
process.exit(failed ? 1 : 0);
