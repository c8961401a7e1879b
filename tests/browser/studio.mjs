// Drives the studio page the server itself serves, in headless Chromium: sign-in from
// the `#token=` link, projects created, searched, renamed and deleted (confirming the
// dialog), sign-out and sign-in by form, a refused token, another user's project
// refused. Prints what it saw as JSON. Env: SERVER (mediaplane URL), TOKEN, OTHER (a
// project of another user).
import { drive } from "./harness.mjs";

const { SERVER, TOKEN, OTHER } = process.env;
const seen = { elsewhere: [], dialogs: [] };
await drive(seen, async (page) => {
  page.on("request", (r) => {
    if (!r.url().startsWith(SERVER)) seen.elsewhere.push(r.url());
  });
  const byName = async (text) => {
    const name = await page.locator("#project-rows tr", { hasText: text }).getAttribute("data-name");
    return page.locator(`#project-rows tr[data-name="${name}"]`);
  };
  const rows = () => page.$$eval("#project-rows tr", (trs) => trs.map((tr) => tr.querySelector(".display-name").textContent));

  await page.goto(`${SERVER}/#token=${encodeURIComponent(TOKEN)}`);
  await page.waitForSelector("#projects:not([hidden])");
  seen.urlAfterLink = page.url();
  seen.stored = await page.evaluate(() => sessionStorage.getItem("mediaplane.token"));

  for (const name of ["Storyboard", "Scratch"]) {
    await page.fill("#new-project", name);
    await page.click("#create-project button");
    await page.waitForFunction((n) => [...document.querySelectorAll("#project-rows .display-name")].some((c) => c.textContent === n), name);
  }
  // By keyboard alone: from the search box, Tab to the name field, type, Enter.
  await page.focus("#search");
  await page.keyboard.press("Tab");
  seen.tabbedTo = await page.evaluate(() => document.activeElement.id);
  await page.keyboard.type("Keys");
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => [...document.querySelectorAll("#project-rows .display-name")].some((c) => c.textContent === "Keys"));
  const keys = await byName("Keys");
  await keys.getByRole("button", { name: "Rename" }).focus();
  await page.keyboard.press("Enter");
  seen.renameFocused = await page.evaluate(() => document.activeElement.getAttribute("aria-label"));
  await page.keyboard.press("Control+A");
  await page.keyboard.type("Keyboard");
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => [...document.querySelectorAll("#project-rows .display-name")].some((c) => c.textContent === "Keyboard"));
  page.once("dialog", (d) => d.accept());
  await (await byName("Keyboard")).getByRole("button", { name: "Delete" }).focus();
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => ![...document.querySelectorAll("#project-rows .display-name")].some((c) => c.textContent === "Keyboard"));

  await page.fill("#search", "story");
  seen.searched = await rows();
  await page.fill("#search", "");

  const storyboard = await byName("Storyboard");
  await storyboard.getByRole("button", { name: "Rename" }).click();
  await storyboard.locator("input").fill("Storyboard v2");
  await storyboard.getByRole("button", { name: "Save" }).click();
  await page.waitForFunction(() => [...document.querySelectorAll("#project-rows .display-name")].some((c) => c.textContent === "Storyboard v2"));

  // Dismissing the confirmation deletes nothing; accepting it deletes.
  let answer = false;
  page.on("dialog", (d) => {
    seen.dialogs.push(d.message());
    answer ? d.accept() : d.dismiss();
  });
  const scratch = await byName("Scratch");
  await scratch.getByRole("button", { name: "Delete" }).click();
  seen.afterDismiss = await rows();
  answer = true;
  await scratch.getByRole("button", { name: "Delete" }).click();
  await page.waitForFunction(() => ![...document.querySelectorAll("#project-rows .display-name")].some((c) => c.textContent === "Scratch"));
  seen.afterDelete = await rows();

  await page.click("#sign-out");
  await page.waitForSelector("#sign-in:not([hidden])");
  seen.storedAfterSignOut = await page.evaluate(() => sessionStorage.getItem("mediaplane.token"));
  await page.fill("#token", "not-a-token");
  await page.click("#sign-in-form button");
  await page.waitForSelector("#sign-in:not([hidden])");
  await page.waitForFunction(() => document.getElementById("status").textContent.includes("refused"));
  seen.refused = await page.textContent("#status");
  await page.fill("#token", TOKEN);
  await page.click("#sign-in-form button");
  await page.waitForFunction(() => document.querySelectorAll("#project-rows tr").length === 1);
  seen.afterSignIn = await rows();

  // Another user's project, opened by its URL: the API's answer, nothing of it shown.
  await page.goto(`${SERVER}/?project=${encodeURIComponent(OTHER)}`);
  await page.waitForFunction(() => document.getElementById("status").textContent.includes("NOT_FOUND"));
  seen.other = await page.textContent("#status");
  seen.otherTitle = await page.textContent("#jobs-title");
});
