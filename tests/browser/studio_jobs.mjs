// A project's jobs on the studio page, in headless Chromium: the table follows the
// stream while a worker (driven by the Rust test) runs jobs; a job is created from the
// form (bad input shown on its field first); filters go into the URL and survive a
// reload; a job is cancelled from its row and one retried from a selection.
// Assets: one dropped on the drop zone, one chosen with the file picker; the preview
// and the download go through signed URLs.
// Env: SERVER, TOKEN, PROJECT, PNG (base64). Prints what it saw as JSON.
import { drive } from "./harness.mjs";

const { SERVER, TOKEN, PROJECT, PNG } = process.env;
const seen = {};
// Waits on the live page allow a minute: under the whole suite on two cores a worker step
// has taken over 20 s; the page still has to get there, only later.
const row = (page, kind, state) =>
  page.waitForFunction(
    ([k, s]) => [...document.querySelectorAll("#job-rows tr")].some((r) => r.children[2].textContent === k && r.dataset.state === s),
    [kind, state],
    { timeout: 60000 },
  );
await drive(seen, async (page) => {
  await page.goto(`${SERVER}/?project=${encodeURIComponent(PROJECT)}#token=${encodeURIComponent(TOKEN)}`);
  await page.waitForSelector("#jobs:not([hidden])");
  await page.waitForFunction(() => document.getElementById("live").dataset.state === "live");
  await row(page, "render", "QUEUED");
  await row(page, "doomed", "FAILED");
  seen.title = await page.textContent("#jobs-title");

  // A running job (`mediaplane worker` running a long command), cancelled from its row:
  // the worker learns it at its next heartbeat, stops the command, and the row follows.
  await page.waitForFunction(() =>
    [...document.querySelectorAll("#job-rows tr")].some((r) => r.children[2].textContent === "film" && r.children[5].textContent === "rolling"),
    null, { timeout: 60000 });
  await page.locator("#job-rows tr", { hasText: "film" }).getByRole("button", { name: "Cancel" }).click();
  await row(page, "film", "CANCELLED");

  // Bad input is refused on its field, by the page and by the server.
  await page.fill("#job-kind", "paint");
  await page.fill("#job-input", "{not json");
  await page.click("#create-job button[type=submit]");
  seen.inputError = await page.textContent("#job-input-error");
  await page.fill("#job-input", '{"prompt": "a fox"}');
  await page.fill("#job-kind", "Not A Kind!");
  await page.click("#create-job button[type=submit]");
  await page.waitForFunction(() => document.getElementById("job-kind-error").textContent !== "");
  seen.kindError = await page.textContent("#job-kind-error");
  await page.fill("#job-kind", "paint");
  await page.click("#create-job button[type=submit]");
  // The worker takes it, reports, completes: every step arrives through the stream.
  await page.waitForFunction(() =>
    [...document.querySelectorAll("#job-rows tr")].some((r) => r.children[2].textContent === "paint" && r.children[5].textContent === "color"),
    null, { timeout: 60000 });
  await row(page, "paint", "SUCCEEDED");

  // A filter goes into the URL and survives a reload.
  await page.selectOption("#filter-state", "FAILED");
  await page.waitForFunction(() => location.search.includes("state=FAILED"));
  await page.reload();
  await page.waitForFunction(() => document.getElementById("live").dataset.state === "live");
  await row(page, "doomed", "FAILED");
  seen.filteredState = await page.inputValue("#filter-state");
  seen.filteredKinds = await page.$$eval("#job-rows tr", (trs) => trs.map((r) => r.children[2].textContent));

  // Back to all; cancel one from its row, retry one from a selection.
  await page.selectOption("#filter-state", "");
  await row(page, "render", "QUEUED");
  await page.locator("#job-rows tr", { hasText: "render" }).getByRole("button", { name: "Cancel" }).click();
  await row(page, "render", "CANCELLED");
  await page.locator("#job-rows tr", { hasText: "doomed" }).locator("input[type=checkbox]").check();
  await page.click("#retry-selected");
  await row(page, "doomed", "SUCCEEDED");
  seen.status = await page.textContent("#status");

  // Drag and drop: a DataTransfer holding a file, dropped on the zone.
  await page.evaluate((b64) => {
    const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
    const data = new DataTransfer();
    data.items.add(new File([bytes], "frame.png", { type: "image/png" }));
    document.getElementById("drop-zone").dispatchEvent(new DragEvent("drop", { dataTransfer: data, bubbles: true, cancelable: true }));
  }, PNG);
  await page.waitForFunction(() => {
    const img = document.querySelector("#asset-list img");
    return img && img.complete && img.naturalWidth > 0;
  }, null, { timeout: 60000 });
  // The file picker.
  await page.setInputFiles("#asset-file", { name: "notes.txt", mimeType: "text/plain", buffer: Buffer.from("storyboard notes\n") });
  await page.waitForFunction(() => document.querySelectorAll("#asset-list li.asset a").length === 2, null, { timeout: 60000 });
  seen.uploads = await page.$$eval("#uploads li", (lis) => lis.map((li) => li.textContent.trim()));
  seen.assets = await page.$$eval("#asset-list li", (lis) => lis.map((li) => li.textContent.trim()));
  // Screenshots at a desktop's and a phone's width, light and dark, as test output.
  const shots = process.env.SHOTS;
  if (shots) {
    for (const [name, width, height, scheme] of [["desktop", 1280, 900, "light"], ["phone", 390, 844, "light"], ["desktop-dark", 1280, 900, "dark"]]) {
      await page.setViewportSize({ width, height });
      await page.emulateMedia({ colorScheme: scheme });
      await page.screenshot({ path: `${shots}/studio-${name}.png`, fullPage: true });
    }
    seen.phoneOverflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  }
  seen.downloaded = await page.evaluate(async () => {
    const link = [...document.querySelectorAll("#asset-list a")].find((a) => a.textContent === "notes.txt");
    return await (await fetch(link.href)).text();
  });
});
