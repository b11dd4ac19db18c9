// What the dashboard's browser scripts share: Debian's headless Chromium
// through puppeteer-core, a page that reports its errors and any Content
// Security Policy violation, and the line protocol with the Rust test that
// drives them (tests/it/dashboard.rs, benches/devicehub/dashboard.rs):
// each result is one JSON line on stdout; `waitFor(name)` prints
// {"event": name} and waits for a line on stdin before going on.
//
// Environment: BASE_URL (the service, http://127.0.0.1:PORT), CHROMIUM
// (default /usr/bin/chromium), PROFILE_DIR (an empty directory for the
// browser profile), SHOTS (a directory for screenshots).
import { createInterface } from "node:readline";
import puppeteer from "puppeteer-core";

export const { BASE_URL, CHROMIUM = "/usr/bin/chromium", PROFILE_DIR, SHOTS } = process.env;
export const TIMEOUT = 30_000;

const lines = createInterface({ input: process.stdin });
const waiting = [];
lines.on("line", (line) => waiting.shift()?.(line));

/** Lets the process end: stdin is no longer read. */
export function done() {
  lines.close();
}

export function emit(event, data = {}) {
  process.stdout.write(JSON.stringify({ event, ...data }) + "\n");
}

/** Says `event` and waits for the test to answer (a line on stdin). */
export function waitFor(event, data = {}) {
  const answer = new Promise((resolve) => waiting.push(resolve));
  emit(event, data);
  return answer;
}

export async function launch() {
  return puppeteer.launch({
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
}

/** A page that logs its console and errors to stderr and counts CSP violations and errors. */
export async function open(browser, width = 1200, height = 900) {
  const page = await browser.newPage();
  await page.setViewport({ width, height });
  page.errors = [];
  page.on("console", (message) => process.stderr.write(`page console: ${message.text()}\n`));
  page.on("pageerror", (error) => {
    page.errors.push(String(error));
    process.stderr.write(`page error: ${error}\n`);
  });
  await page.evaluateOnNewDocument(() => {
    window.__cspViolations = [];
    document.addEventListener("securitypolicyviolation", (e) =>
      window.__cspViolations.push(`${e.violatedDirective} ${e.blockedURI}`),
    );
  });
  return page;
}

/** The CSP violations the page saw, and its uncaught errors. */
export async function problems(page) {
  return {
    csp: await page.evaluate(() => window.__cspViolations),
    errors: page.errors,
  };
}

/** A screenshot `name`.png in SHOTS: the whole page, or (`fullPage: false`) what the viewport shows. */
export async function shot(page, name, fullPage = true) {
  if (SHOTS) await page.screenshot({ path: `${SHOTS}/${name}.png`, fullPage });
}
