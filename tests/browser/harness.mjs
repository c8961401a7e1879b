// What the browser scripts share: headless Chromium as the tests run it, and the frame
// of a run: a fresh page whose errors are collected in `seen.pageErrors` and whose
// console goes to stderr; `seen` printed as JSON on the last line of stdout; exit 1
// when a step failed.
import { chromium } from "playwright-core";

export function launch() {
  return chromium.launch({
    executablePath: "/usr/bin/chromium",
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"],
  });
}

export async function drive(seen, steps) {
  seen.pageErrors = [];
  const browser = await launch();
  let failed = false;
  try {
    const page = await browser.newPage();
    page.on("pageerror", (e) => seen.pageErrors.push(String(e)));
    page.on("console", (m) => console.error(`page: ${m.text()}`));
    await steps(page);
  } catch (e) {
    console.error(String(e));
    failed = true;
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(seen));
  process.exit(failed ? 1 : 0);
}
