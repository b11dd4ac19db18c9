// The fleet page's first render, for the benchmark
// (benches/devicehub/dashboard.rs): LOADS loads of the page, each in a new
// browser context (a first visit: no cache, no session), timed from
// navigation start to the page's `fleet-rendered` mark (the first page of
// devices is in the DOM). Each load of the fleet is followed by one of the
// baseline, the same page filtered to no device (`#/?prefix=`BASELINE_PREFIX),
// so both meet the machine at the same moments. One JSON line per load:
// {"event": "load", "kind": "fleet"|"baseline", "ms": ..., "rows": ...}.
//
// Environment (besides browser.mjs's): LOADS, BASELINE_PREFIX.
import { BASE_URL, TIMEOUT, done, emit, launch } from "./browser.mjs";

const loads = Number(process.env.LOADS ?? 10);
const baseline = process.env.BASELINE_PREFIX ?? "no-such-device-";

async function load(browser, kind, hash) {
  const context = await browser.createBrowserContext();
  try {
    const page = await context.newPage();
    await page.setViewport({ width: 1200, height: 900 });
    await page.goto(`${BASE_URL}/${hash}`, { waitUntil: "domcontentloaded", timeout: TIMEOUT });
    await page.waitForFunction(() => performance.getEntriesByName("fleet-rendered").length > 0, {
      timeout: TIMEOUT,
      polling: "mutation",
    });
    const seen = await page.evaluate(() => ({
      ms: performance.getEntriesByName("fleet-rendered")[0].startTime,
      rows: document.querySelectorAll("#fleet-list tr[data-device]").length,
      alerts: [...document.querySelectorAll("[role=alert]")].map((a) => a.textContent),
    }));
    emit("load", { kind, ...seen });
  } finally {
    await context.close();
  }
}

const browser = await launch();
try {
  // One untimed load of each first: the browser's own start-up costs.
  await load(browser, "warm-up", "#/");
  for (let i = 0; i < loads; i++) {
    await load(browser, "fleet", "#/");
    await load(browser, "baseline", `#/?prefix=${encodeURIComponent(baseline)}`);
  }
} finally {
  await browser.close();
  done();
}
