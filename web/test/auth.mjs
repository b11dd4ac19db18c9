// The dashboard with auth on (tests/it/dashboard.rs): without a token and
// with a bad one the page shows UNAUTHENTICATED as a message, with a token
// that lacks the scope PERMISSION_DENIED, and with a good token the
// devices; the token is kept in sessionStorage, never in the address.
//
// Environment (besides browser.mjs's): BAD_TOKEN, NARROW_TOKEN (valid, no
// readings:read), GOOD_TOKEN.
import { BASE_URL, TIMEOUT, done, emit, launch, open, problems, shot } from "./browser.mjs";

const { BAD_TOKEN, NARROW_TOKEN, GOOD_TOKEN } = process.env;

const alerts = (page) => page.$$eval("[role=alert]", (as) => as.map((a) => a.textContent));

async function useToken(page, token) {
  await page.type("#token", token);
  await page.keyboard.press("Enter");
}

const browser = await launch();
try {
  const page = await open(browser);
  await page.goto(`${BASE_URL}/`, { waitUntil: "load", timeout: TIMEOUT });
  await page.waitForSelector("main [role=alert]", { timeout: TIMEOUT });
  emit("none", { alerts: await alerts(page) });

  await useToken(page, BAD_TOKEN);
  await page.waitForFunction(() => document.querySelector("main [role=alert]")?.textContent.includes("UNAUTHENTICATED"), {
    timeout: TIMEOUT,
  });
  emit("bad", { alerts: await alerts(page), state: await page.$eval("#token-state", (e) => e.textContent) });
  await shot(page, "dashboard-auth-error");

  await useToken(page, NARROW_TOKEN);
  await page.waitForFunction(() => document.querySelector("main [role=alert]")?.textContent.includes("PERMISSION_DENIED"), {
    timeout: TIMEOUT,
  });
  emit("narrow", { alerts: await alerts(page) });

  await useToken(page, GOOD_TOKEN);
  await page.waitForSelector("#fleet-list tr[data-device]", { timeout: TIMEOUT });
  emit("good", {
    alerts: await alerts(page),
    devices: await page.$$eval("#fleet-list tr[data-device]", (trs) => trs.map((tr) => tr.dataset.device)),
    url: page.url(),
    stored: await page.evaluate(() => sessionStorage.getItem("devicehub.token")),
    ...(await problems(page)),
  });
} finally {
  await browser.close();
  done();
}
