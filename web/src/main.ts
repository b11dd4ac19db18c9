// The dashboard: a single page, routed by the address's hash (`#/` the
// fleet, `#/?prefix=sim-` filtered, `#/device/<id>` a device), over
// gRPC-Web to the service that serves it. Each page gets an AbortSignal
// that ends its streams, polls and charts when another page is shown.

import "uplot/dist/uPlot.min.css";
import "./app.css";
import { setToken, token } from "./api.js";
import { devicePage } from "./device.js";
import { route } from "./calc.js";
import { alertBox, h } from "./dom.js";
import { fleetPage } from "./fleet.js";

const main = document.getElementById("main")!;
const problems = document.getElementById("problems")!;
let page = new AbortController();

function show(focus: boolean): void {
  page.abort();
  page = new AbortController();
  const signal = page.signal;
  problems.replaceChildren();
  main.replaceChildren();
  const current = route(location.hash);
  switch (current.name) {
    case "fleet":
      document.title = "Fleet · devicehub";
      fleetPage(main, current.prefix, signal);
      break;
    case "device":
      document.title = `${current.id} · devicehub`;
      void devicePage(main, current.id, signal);
      break;
    default:
      document.title = "Not found · devicehub";
      main.append(
        h("h1", { tabindex: -1 }, "Not found"),
        h("p", {}, "Nothing here. ", h("a", { href: "#/" }, "Go to the fleet.")),
      );
  }
  // After a navigation, focus the new page's heading, as a page load would.
  if (focus) main.querySelector<HTMLElement>("h1")?.focus();
}

function tokenArea(): void {
  const form = document.getElementById("token-form") as HTMLFormElement;
  const input = document.getElementById("token") as HTMLInputElement;
  const state = document.getElementById("token-state")!;
  const describe = () => (state.textContent = token() ? "a token is set" : "no token");
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setToken(input.value.trim());
    input.value = "";
    describe();
    show(false);
  });
  document.getElementById("token-clear")!.addEventListener("click", () => {
    setToken("");
    input.value = "";
    describe();
    show(false);
  });
  describe();
}

// Anything that escapes the pages' own handling is shown, never a blank page.
function report(message: string): void {
  problems.replaceChildren(alertBox(`Something went wrong: ${message}`));
}
window.addEventListener("error", (event) => report(event.message));
window.addEventListener("unhandledrejection", (event) => report(String(event.reason)));

// The skip link focuses the content without touching the hash (the route).
document.getElementById("skip")!.addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});

tokenArea();
window.addEventListener("hashchange", () => show(true));
show(false);
