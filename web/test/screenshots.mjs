// The screenshots in docs/ (dashboard-fleet.png, dashboard-device.png,
// dashboard-phone.png): the pages as a person sees them, against a service
// that has run with simulated devices for a while (see docs/dashboard.md).
// What the viewport shows, not the whole page.
//
// Environment (besides browser.mjs's): DEVICE (the device page to take).
import { BASE_URL, TIMEOUT, done, launch, open, shot } from "./browser.mjs";

const device = process.env.DEVICE ?? "sim-1";
const browser = await launch();
try {
  // A new page for each: a first load, as a person opening the address.
  let page = await open(browser, 1200, 760);
  await page.goto(`${BASE_URL}/#/`, { waitUntil: "load", timeout: TIMEOUT });
  await page.waitForSelector("#fleet-list tr[data-device]", { timeout: TIMEOUT });
  await shot(page, "dashboard-fleet", false);

  page = await open(browser, 1200, 1250);
  await page.goto(`${BASE_URL}/#/device/${encodeURIComponent(device)}`, { waitUntil: "load", timeout: TIMEOUT });
  await page.waitForSelector("#history[data-loaded]", { timeout: TIMEOUT });
  await page.waitForFunction(
    () =>
      document.querySelector("#live [role=status]")?.textContent === "live" &&
      [...document.querySelectorAll("#live-charts figure")].some((f) => Number(f.dataset.points) >= 10),
    { timeout: TIMEOUT },
  );
  await shot(page, "dashboard-device", false);

  page = await open(browser, 375, 812);
  await page.goto(`${BASE_URL}/#/`, { waitUntil: "load", timeout: TIMEOUT });
  await page.waitForSelector("#fleet-list tr[data-device]", { timeout: TIMEOUT });
  await shot(page, "dashboard-phone", false);
} finally {
  await browser.close();
  done();
}
