// The queues and a pipeline in headless Chromium. Env: SERVER, TOKEN (an admin's),
// MIDDLE (a job that waits on FIRST and is waited on by LAST), FIRST, LAST.
// 1. `?queues`: the render queue's figures; pause it; a bad start rate shows its field
//    error; limits saved. Prints `paused` and `limits` as it goes (the test checks the
//    server).
// 2. `?job=FIRST`: its dependent MIDDLE, linked; prints `pipeline`, then shows FIRST
//    SUCCEEDED and MIDDLE QUEUED as the test completes FIRST; MIDDLE's page (by the
//    link) shows its dependency and its dependent LAST. Last line: what it saw, as JSON.
import { drive } from "./harness.mjs";

const { SERVER, TOKEN, FIRST, MIDDLE, LAST } = process.env;
const seen = {};
await drive(seen, async (page) => {
  await page.goto(`${SERVER}/?queues#token=${encodeURIComponent(TOKEN)}`);
  await page.waitForSelector("#queues:not([hidden])");
  const row = 'tr[id="queue-queues/render"]';
  await page.waitForSelector(row);
  seen.figures = await page.$$eval(`${row} td`, (tds) => tds.map((td) => td.textContent));
  await page.click(`${row} button:text("Pause")`);
  await page.waitForFunction((r) => document.querySelector(r)?.children[1]?.textContent === "paused", row);
  console.log("paused");
  // The limits, edited in the row with the keyboard; a bad interval first (refused by
  // the page), then too many starts (refused by the server, on its field).
  await page.click(`${row} button:text("Limits")`);
  await page.fill("#limit-max", "3");
  await page.fill("#limit-rate-jobs", "5");
  await page.fill("#limit-rate-interval", "soon");
  await page.keyboard.press("Enter");
  await page.waitForSelector("#limit-error:not(:empty)");
  seen.intervalError = await page.textContent("#limit-error");
  await page.fill("#limit-rate-interval", "2s");
  await page.fill("#limit-rate-jobs", "20000");
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => document.getElementById("limit-error")?.textContent.includes("jobs"));
  seen.fieldError = await page.textContent("#limit-error");
  await page.fill("#limit-rate-jobs", "5");
  await page.keyboard.press("Enter");
  await page.waitForFunction((r) => document.querySelector(r)?.children[7]?.textContent === "3", row);
  seen.limits = await page.$$eval(`${row} td`, (tds) => tds.map((td) => td.textContent));
  console.log("limits");

  // The first stage's page: its dependent waits; when the test completes the first
  // stage, the page shows it SUCCEEDED and, pushed, its dependent QUEUED.
  await page.goto(`${SERVER}/?job=${encodeURIComponent(FIRST)}`);
  await page.waitForSelector("#job:not([hidden])");
  await page.waitForFunction(() => document.querySelectorAll("#job-dependents li").length === 1);
  seen.firstDependents = await page.textContent("#job-dependents");
  await page.waitForFunction(() => document.getElementById("job-live").dataset.state === "live");
  await page.waitForFunction(() => document.getElementById("job-dependents-live").dataset.state === "live");
  console.log("pipeline");
  await page.waitForFunction(() => document.getElementById("job-state").textContent === "SUCCEEDED", null, { timeout: 15000 });
  await page.waitForFunction(() => document.querySelector("#job-dependents .state")?.textContent === "QUEUED", null, { timeout: 15000 });
  seen.firstDependentsAfter = await page.textContent("#job-dependents");
  // The middle stage, by its link: its dependency done, itself queued, its own
  // dependent still waiting.
  await page.click("#job-dependents a");
  await page.waitForFunction((middle) => document.getElementById("job-heading").textContent.endsWith(middle.split("/").pop()), MIDDLE);
  await page.waitForFunction(() => document.querySelectorAll("#job-dependencies li").length === 1 && document.querySelectorAll("#job-dependents li").length === 1);
  seen.state = await page.textContent("#job-state");
  seen.dependency = await page.textContent("#job-dependencies li");
  seen.dependencyHref = await page.getAttribute("#job-dependencies a", "href");
  seen.dependent = await page.textContent("#job-dependents li");
  seen.last = LAST;
});
