// The dashboard in a real browser, against a running service with
// simulated devices (tests/it/dashboard.rs starts them and answers the
// waits): the fleet lists the devices online; the keyboard reaches a
// device's page; its live chart receives points; a command's reply
// appears; after the test kills the simulator, the fleet shows the devices
// offline without a reload; the history chart's buckets are reported for
// the test to compare with its own AggregateReadings call; the page fits a
// phone's width. Screenshots of each page go to SHOTS.
//
// Environment (besides browser.mjs's): DEVICES (the simulated ids,
// comma-separated), DEVICE (the one whose page is opened).
import { BASE_URL, TIMEOUT, done, emit, launch, open, problems, shot, waitFor } from "./browser.mjs";

const devices = process.env.DEVICES.split(",");
const device = process.env.DEVICE;

/** Each listed device's row: id, status and newest values. */
const rows = (page) =>
  page.$$eval("#fleet-list tr[data-device]", (trs) =>
    trs.map((tr) => ({
      device: tr.dataset.device,
      status: tr.dataset.status,
      statusText: tr.cells[1].textContent.trim(),
      values: tr.cells[3].textContent,
    })),
  );

function statusesAre(page, status) {
  return page.waitForFunction(
    (ids, status) =>
      ids.every((id) => document.querySelector(`#fleet-list tr[data-device="${id}"]`)?.dataset.status === status),
    { timeout: TIMEOUT },
    devices,
    status,
  );
}

const browser = await launch();
let page;
try {
  page = await open(browser);
  const loaded = Date.now();
  await page.goto(`${BASE_URL}/`, { waitUntil: "load", timeout: TIMEOUT });
  await statusesAre(page, "online");
  emit("fleet", { rows: await rows(page), url: page.url() });
  await shot(page, "dashboard-fleet");

  // Keyboard: Tab from the top reaches the first device's link; Enter opens it.
  let focused = "";
  for (let i = 0; i < 40 && !focused.includes("#/device/"); i++) {
    await page.keyboard.press("Tab");
    focused = await page.evaluate(() => document.activeElement?.getAttribute("href") ?? "");
  }
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => location.hash.startsWith("#/device/"), { timeout: TIMEOUT });
  emit("keyboard", { focused, hash: await page.evaluate(() => location.hash) });

  // The device's page: live points arrive and keep arriving.
  await page.goto(`${BASE_URL}/#/device/${encodeURIComponent(device)}`, { waitUntil: "load", timeout: TIMEOUT });
  const points = () =>
    page.$$eval("#live-charts figure", (fs) => Object.fromEntries(fs.map((f) => [f.dataset.field, Number(f.dataset.points)])));
  await page.waitForFunction(
    () => [...document.querySelectorAll("#live-charts figure")].some((f) => Number(f.dataset.points) >= 2),
    { timeout: TIMEOUT },
  );
  const first = await points();
  await page.waitForFunction(
    (before) =>
      [...document.querySelectorAll("#live-charts figure")].some(
        (f) => Number(f.dataset.points) > (before[f.dataset.field] ?? 0),
      ),
    { timeout: TIMEOUT },
    first,
  );
  const later = await points();

  // A command and its reply: Enter in the form's first field submits it.
  await page.focus("#command-form input[name=command]");
  await page.keyboard.press("Enter");
  await page.waitForFunction(() => document.getElementById("command-reply").textContent.includes("COMMAND_STATUS"), {
    timeout: TIMEOUT,
  });
  const reply = JSON.parse(await page.$eval("#command-reply", (e) => e.textContent));
  const shown = await page.$$eval("#live-charts figure", (fs) =>
    Object.fromEntries(fs.map((f) => [f.dataset.field, Number(f.dataset.shown)])),
  );
  emit("device", { first, later, shown, reply });
  await shot(page, "dashboard-device");

  // State: a change against a stale version is ABORTED, shown as a
  // message; against the version shown, it applies.
  const version = "#desired-form input[name=expected_version]";
  const shownVersion = await page.$eval(version, (i) => i.value);
  await page.$eval("#desired-form textarea", (t) => (t.value = '{"label": "from the dashboard"}'));
  await page.$eval(version, (i) => (i.value = "1"));
  await page.click("#desired-form button[type=submit]");
  await page.waitForSelector("#state [role=alert]", { timeout: TIMEOUT });
  const stale = await page.$eval("#state [role=alert]", (e) => e.textContent);
  await page.$eval(version, (i, v) => (i.value = v), shownVersion);
  await page.click("#desired-form button[type=submit]");
  await page.waitForFunction(
    () => document.querySelector('#state pre[data-side="desired"]')?.textContent.includes("from the dashboard"),
    { timeout: TIMEOUT },
  );
  emit("state", { stale, shownVersion, version: await page.$eval("#state", (e) => e.dataset.version) });

  // A device never heard from: said so, and "no state yet", not errors.
  await page.goto(`${BASE_URL}/#/device/nobody`, { waitUntil: "load", timeout: TIMEOUT });
  await page.waitForFunction(() => document.querySelector("#state-view")?.textContent.includes("No state yet"), {
    timeout: TIMEOUT,
  });
  emit("unknown", {
    summary: await page.$eval("#device-summary", (e) => e.textContent),
    alerts: await page.$$eval("main [role=alert]", (as) => as.map((a) => a.textContent)),
  });

  // The fleet, left open while the test kills the simulator: the devices
  // turn offline on the page, by its own polling.
  await page.goto(`${BASE_URL}/#/`, { waitUntil: "load", timeout: TIMEOUT });
  await statusesAre(page, "online");
  await waitFor("kill");
  const killed = Date.now();
  await statusesAre(page, "offline");
  emit("offline", {
    rows: await rows(page),
    seconds: (Date.now() - killed) / 1000,
    announced: await page.$$eval(".changes li", (lis) => lis.map((li) => li.textContent)),
  });

  // History, now that no reading arrives: the page's buckets, from the
  // table under each chart, for the test to compare with its own call.
  await page.goto(`${BASE_URL}/#/device/${encodeURIComponent(device)}`, { waitUntil: "load", timeout: TIMEOUT });
  await page.waitForFunction(() => document.getElementById("history")?.dataset.loaded, { timeout: TIMEOUT });
  await page.$$eval("#history details.buckets", (ds) => ds.forEach((d) => (d.open = true)));
  const history = await page.$eval("#history", (section) => ({
    bucketMs: Number(section.dataset.bucketMs),
    range: section.dataset.range,
    alerts: [...section.querySelectorAll("[role=alert]")].map((a) => a.textContent),
    series: [...section.querySelectorAll("figure.history")].map((f) => ({
      field: f.dataset.field,
      buckets: Number(f.dataset.buckets),
      readings: Number(f.dataset.readings),
      canvas: !!f.querySelector("canvas"),
      rows: [...f.querySelectorAll("details.buckets tbody tr")].map((tr) => {
        const [start, ...cells] = tr.cells;
        const [count, min, max, mean, first, last] = cells.map((c) => Number(c.dataset.value));
        return { start: Number(start.dataset.value), count, min, max, mean, first, last };
      }),
    })),
  }));
  emit("history", history);

  // A phone's width: nothing wider than the screen but the tables' own
  // scrolling boxes.
  const widths = {};
  await page.setViewport({ width: 375, height: 800 });
  for (const [name, hash] of [["device", `#/device/${encodeURIComponent(device)}`], ["fleet", "#/"]]) {
    await page.goto(`${BASE_URL}/${hash}`, { waitUntil: "load", timeout: TIMEOUT });
    await page.waitForSelector(name === "fleet" ? "#fleet-list tr[data-device]" : "#history[data-loaded]", {
      timeout: TIMEOUT,
    });
    widths[name] = await page.evaluate(() => document.documentElement.scrollWidth);
    await shot(page, `dashboard-phone-${name}`);
  }
  emit("phone", { widths, ...(await problems(page)), loadedSeconds: (Date.now() - loaded) / 1000 });
} finally {
  await browser.close();
  done();
}
