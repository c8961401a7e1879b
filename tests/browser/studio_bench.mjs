// The studio page under load, for `cargo bench --bench studio`: opens a project's jobs
// page, times its first load, then for RUN_SECS records when each progress tag
// (`current_step`) first shows in a row, by the page's own clock, and how busy the
// main thread was (Chromium's TaskDuration). Env: SERVER, TOKEN, PROJECT, RUN_SECS.
// Prints `ready` once the table is loaded, then JSON.
import { launch } from "./harness.mjs";

const { SERVER, TOKEN, PROJECT, RUN_SECS } = process.env;
const browser = await launch();
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
const cdp = await page.context().newCDPSession(page);
await cdp.send("Performance.enable");
await page.goto(`${SERVER}/#token=${encodeURIComponent(TOKEN)}`);
await page.waitForSelector("#projects:not([hidden])");
const start = Date.now();
await page.goto(`${SERVER}/?project=${encodeURIComponent(PROJECT)}`);
await page.waitForFunction(() => document.querySelectorAll("#job-rows tr").length >= 1000, null, { timeout: 60000 });
const firstLoadMs = Date.now() - start;
await page.evaluate(() => {
  window.tagSeen = {};
  new MutationObserver(() => {
    const now = Date.now();
    for (const row of document.querySelectorAll("#job-rows tr[data-state=RUNNING]")) {
      const tag = row.children[5].textContent;
      if (tag && !(tag in window.tagSeen)) window.tagSeen[tag] = now;
    }
  }).observe(document.getElementById("job-rows"), { childList: true });
});
const metric = async (name) => (await cdp.send("Performance.getMetrics")).metrics.find((m) => m.name === name).value;
console.log("ready");
const busyBefore = await metric("TaskDuration");
const t0 = Date.now();
await page.waitForTimeout(Number(RUN_SECS) * 1000);
const busy = (await metric("TaskDuration")) - busyBefore;
const seconds = (Date.now() - t0) / 1000;
const tags = await page.evaluate(() => window.tagSeen);
await browser.close();
console.log(JSON.stringify({ firstLoadMs, mainThreadBusy: busy / seconds, tags }));
