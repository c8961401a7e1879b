// One job's page in headless Chromium, opened while the job waits for its worker: its
// progress arrives live, the timeline lists its events, the result shows as JSON and
// the output image loads through a signed URL. Env: SERVER, TOKEN, JOB. Prints `open`
// once it follows the job (the test's worker waits for it), then what it saw as JSON.
import { drive } from "./harness.mjs";

const { SERVER, TOKEN, JOB } = process.env;
const seen = { steps: [] };
await drive(seen, async (page) => {
  await page.goto(`${SERVER}/?job=${encodeURIComponent(JOB)}#token=${encodeURIComponent(TOKEN)}`);
  await page.waitForSelector("#job:not([hidden])");
  await page.waitForFunction(() => document.getElementById("job-live").dataset.state === "live");
  seen.first = await page.textContent("#job-state");
  // Each state the page shows on its way, as the stream pushes it.
  await page.exposeFunction("sawStep", (s) => seen.steps.push(s));
  await page.evaluate(() => {
    new MutationObserver(() => window.sawStep(`${document.getElementById("job-state").textContent} ${document.getElementById("job-percent").textContent} ${document.getElementById("job-step").textContent}`))
      .observe(document.getElementById("job-step"), { childList: true, characterData: true, subtree: true });
  });
  // Tells the test the page is following the job: its worker starts now.
  console.log("open");
  await page.waitForFunction(() => document.getElementById("job-state").textContent === "SUCCEEDED", null, { timeout: 60000 });
  await page.waitForFunction(() => document.getElementById("job-live").dataset.state === "ended");
  await page.waitForFunction(() => {
    const img = document.querySelector("#job-outputs img");
    return img && img.complete && img.naturalWidth > 0;
  }, null, { timeout: 10000 });
  seen.timeline = await page.$$eval("#job-timeline li strong", (s) => s.map((x) => x.textContent));
  seen.timelineText = await page.textContent("#job-timeline");
  seen.result = JSON.parse(await page.textContent("#job-result-json"));
  seen.input = JSON.parse(await page.textContent("#job-input-json"));
  seen.output = await page.textContent("#job-outputs");
  seen.back = await page.getAttribute("#job-back", "href");
});
