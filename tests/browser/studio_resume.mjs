// A job's page whose connection drops: the test cuts it (a proxy between the browser
// and the server) while the job moves on, and the page must resume with
// Last-Event-ID and show every update it missed. Env: SERVER (the proxy), TOKEN, JOB.
// Prints `open`, then `step <text>` and `live <state>` as they change, then JSON.
import { drive } from "./harness.mjs";

const { SERVER, TOKEN, JOB } = process.env;
const seen = { live: [] };
await drive(seen, async (page) => {
  await page.exposeFunction("report", (line) => {
    if (line.startsWith("live ")) seen.live.push(line.slice(5));
    console.log(line);
  });
  await page.goto(`${SERVER}/?job=${encodeURIComponent(JOB)}#token=${encodeURIComponent(TOKEN)}`);
  await page.waitForSelector("#job:not([hidden])");
  await page.evaluate(() => {
    const watch = (id, prefix) =>
      new MutationObserver(() => window.report(`${prefix} ${document.getElementById(id).textContent}`))
        .observe(document.getElementById(id), { childList: true, characterData: true, subtree: true });
    watch("job-step", "step");
    watch("job-live", "live");
  });
  await page.waitForFunction(() => document.getElementById("job-live").dataset.state === "live");
  console.log("open");
  await page.waitForFunction(() => document.getElementById("job-state").textContent === "SUCCEEDED", null, { timeout: 40000 });
  seen.timeline = await page.$$eval("#job-timeline li", (lis) => lis.map((li) => li.textContent.replace(/^\S+ (AM|PM)? ?/, "")));
});
