// Drives the page in a real headless Chromium (Debian's, through
// puppeteer-core): waits for the newest readings and live ones, sends a
// command, waits for the device's reply, and prints what it saw as one JSON
// line. tests/it/browser.rs runs it against a running service.
//
// Environment: PAGE_URL (the page, with ?service=...), CHROMIUM (default
// /usr/bin/chromium), SCREENSHOT (a PNG path, taken at the end, pass or fail),
// PROFILE_DIR (an empty directory for the browser profile).
import puppeteer from "puppeteer-core";

const { PAGE_URL, CHROMIUM = "/usr/bin/chromium", SCREENSHOT, PROFILE_DIR } = process.env;
const TIMEOUT = 30_000;

const browser = await puppeteer.launch({
  executablePath: CHROMIUM,
  headless: true,
  userDataDir: PROFILE_DIR,
  // As root in a container-like sandbox; and no calls to the outside
  // network, which is closed here.
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
let page;
try {
  page = await browser.newPage();
  page.on("console", (message) => process.stderr.write(`page console: ${message.text()}\n`));
  page.on("pageerror", (error) => process.stderr.write(`page error: ${error}\n`));
  await page.goto(PAGE_URL, { waitUntil: "load", timeout: TIMEOUT });
  await page.waitForFunction(() => document.querySelectorAll("#newest li").length >= 1, { timeout: TIMEOUT });
  await page.waitForFunction(() => document.querySelectorAll("#live li").length >= 2, { timeout: TIMEOUT });
  // Enter in a field of the form submits it, as a user may: a click at the
  // button's position could miss it, as it moves down with every live
  // reading added above it.
  await page.focus("#name");
  await page.keyboard.press("Enter");
  await page.waitForFunction(
    () => document.getElementById("reply").textContent.includes("COMMAND_STATUS"),
    { timeout: TIMEOUT },
  );
  const seen = {
    status: await page.$eval("#status", (e) => e.textContent),
    newest: await page.$$eval("#newest li", (els) => els.map((e) => e.textContent)),
    live: await page.$$eval("#live li", (els) => els.map((e) => e.textContent)),
    reply: JSON.parse(await page.$eval("#reply", (e) => e.textContent)),
  };
  process.stdout.write(JSON.stringify(seen) + "\n");
} finally {
  if (page && SCREENSHOT) await page.screenshot({ path: SCREENSHOT }).catch(() => {});
  await browser.close();
}
