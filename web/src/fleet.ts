// The fleet page: every device (ListDevices, a page at a time, by id
// prefix) with its status, when it was last heard from and its newest
// values. The page holds one page of devices.
//
// Live status changes by polling: the visible page is fetched again every
// 2 s. A WatchReadings stream without a device filter would carry every
// reading of every device to show the status of 50 of them, far heavier
// than one small ListDevices call; and status messages are not readings.

import { timestampDate } from "@bufbuild/protobuf/wkt";
import { aborted, describe, hub } from "./api.js";
import { alertBox, field, formatNumber, h, note, table, timeAgo } from "./dom.js";
import type { Device, DeviceStatus } from "./gen/devicehub/v1/devicehub_pb.js";
import { readingValue } from "./readings.js";
import { statusBadge, statusWord } from "./status.js";

export const FLEET_PAGE_SIZE = 50;
/** How often the visible page is fetched again, for status changes. */
export const FLEET_POLL_MS = 2000;
/** Newest values shown per device. */
const VALUES_SHOWN = 4;
/** Status changes listed in the announcements. */
const CHANGES_SHOWN = 5;

export function deviceHref(id: string): string {
  return `#/device/${encodeURIComponent(id)}`;
}

/** A few top-level numbers and strings of the device's newest reading. */
export function newestValues(device: Device): string {
  const reading = device.lastReading;
  if (!reading) return "—";
  const value = readingValue(reading);
  if (value === undefined) return `${reading.payload.length} bytes`;
  if (value === null || typeof value !== "object") return String(value);
  if (Array.isArray(value)) return `[${value.length} items]`;
  const shown: string[] = [];
  for (const [key, v] of Object.entries(value as Record<string, unknown>)) {
    if (typeof v === "number") shown.push(`${key} ${formatNumber(v)}`);
    else if (typeof v === "string" || typeof v === "boolean") shown.push(`${key} ${String(v).slice(0, 40)}`);
    if (shown.length === VALUES_SHOWN) break;
  }
  return shown.join(" · ") || "—";
}

/** The cells that change between polls; the link cell stays, and with it keyboard focus. */
function fillRow(row: HTMLTableRowElement, device: Device, now: number): void {
  const cells = row.cells;
  cells[1]!.replaceChildren(statusBadge(device.status));
  cells[2]!.replaceChildren(timeAgo(device.lastSeen && timestampDate(device.lastSeen), now));
  cells[3]!.textContent = newestValues(device);
  cells[4]!.textContent = String(device.readingsBuffered);
  row.dataset.status = statusWord(device.status);
}

function newRow(device: Device, now: number): HTMLTableRowElement {
  const row = h(
    "tr",
    { "data-device": device.deviceId },
    h("th", { scope: "row" }, h("a", { href: deviceHref(device.deviceId) }, device.deviceId)),
    h("td", {}),
    h("td", {}),
    h("td", { class: "mono values" }),
    h("td", { class: "num" }),
  );
  fillRow(row, device, now);
  return row;
}

export function fleetPage(main: HTMLElement, initialPrefix: string, signal: AbortSignal): void {
  const prefix = h("input", {
    name: "prefix",
    type: "search",
    value: initialPrefix,
    autocomplete: "off",
    spellcheck: "false",
  });
  const filter = h(
    "form",
    { class: "inline", role: "search" },
    field("Device id starts with", prefix),
    h("button", { type: "submit" }, "Filter"),
  );
  const list = h("div", { id: "fleet-list" });
  const problem = h("div", {});
  const position = h("span", { class: "note" });
  const previous = h("button", { type: "button", disabled: true }, "Previous page");
  const following = h("button", { type: "button", disabled: true }, "Next page");
  const changes = h("ul", { class: "changes", "aria-live": "polite", "aria-label": "status changes" });
  main.append(
    h("h1", { tabindex: -1 }, "Fleet"),
    filter,
    problem,
    list,
    h("div", { class: "buttons" }, previous, following, position),
    h("h2", { class: "small" }, "Status changes since this page opened"),
    changes,
  );

  // tokens[i]: the token of page i (""; the first); the page shown is `at`.
  let tokens = [""];
  let at = 0;
  let rows = new Map<string, HTMLTableRowElement>();
  let statuses = new Map<string, DeviceStatus>();
  let poll = 0;
  let generation = 0;
  let rendered = false;

  function announce(device: Device): void {
    const item = h("li", {}, `${device.deviceId} is now ${statusWord(device.status)}`);
    changes.prepend(item);
    while (changes.childElementCount > CHANGES_SHOWN) changes.lastElementChild?.remove();
  }

  function render(devices: Device[]): void {
    const now = Date.now();
    const ids = devices.map((d) => d.deviceId);
    const same = ids.length === rows.size && ids.every((id) => rows.has(id));
    if (same) {
      for (const device of devices) fillRow(rows.get(device.deviceId)!, device, now);
    } else {
      rows = new Map(devices.map((d) => [d.deviceId, newRow(d, now)]));
      list.replaceChildren(
        devices.length === 0
          ? note(prefix.value ? `No device id starts with “${prefix.value}”.` : "No devices heard from yet.")
          : table("devices", ["device", "status", "last seen", "newest values", "buffered"], [...rows.values()]),
      );
    }
    for (const device of devices) {
      const before = statuses.get(device.deviceId);
      if (before !== undefined && before !== device.status) announce(device);
    }
    statuses = new Map(devices.map((d) => [d.deviceId, d.status]));
    list.dataset.devices = String(devices.length);
    if (!rendered) {
      rendered = true;
      // For the first-render benchmark: navigation start to this mark.
      performance.mark("fleet-rendered");
    }
  }

  async function load(): Promise<void> {
    clearTimeout(poll);
    const mine = generation;
    try {
      const response = await hub.listDevices(
        { pageSize: FLEET_PAGE_SIZE, pageToken: tokens[at]!, deviceIdPrefix: prefix.value },
        { signal },
      );
      if (mine !== generation) return; // the filter or page changed meanwhile
      problem.replaceChildren();
      render(response.devices);
      tokens.length = at + 1;
      if (response.nextPageToken) tokens.push(response.nextPageToken);
      previous.disabled = at === 0;
      following.disabled = tokens.length <= at + 1;
      const first = at * FLEET_PAGE_SIZE;
      position.textContent = response.devices.length
        ? `devices ${first + 1}–${first + response.devices.length}, page ${at + 1}`
        : "";
    } catch (error) {
      if (aborted(error, signal) || mine !== generation) return;
      // Keep what was shown (stale), and say why it is not refreshed; the
      // same message again is left alone, not announced every poll.
      const message = describe(error);
      if (problem.textContent !== message) problem.replaceChildren(alertBox(message));
    }
    if (!signal.aborted) poll = window.setTimeout(() => void load(), FLEET_POLL_MS);
  }

  function go(page: number): void {
    generation++;
    at = page;
    void load();
  }

  let typing = 0;
  function refilter(): void {
    clearTimeout(typing);
    tokens = [""];
    statuses = new Map();
    // The filter goes into the address (replaceState: no new history entry,
    // no re-render), so a reload or a shared link keeps it.
    const hash = prefix.value ? `#/?prefix=${encodeURIComponent(prefix.value)}` : "#/";
    history.replaceState(null, "", hash);
    go(0);
  }
  prefix.addEventListener("input", () => {
    clearTimeout(typing);
    typing = window.setTimeout(refilter, 250);
  });
  filter.addEventListener("submit", (event) => {
    event.preventDefault();
    refilter();
  });
  previous.addEventListener("click", () => go(Math.max(0, at - 1)));
  following.addEventListener("click", () => go(at + 1));
  signal.addEventListener("abort", () => {
    clearTimeout(poll);
    clearTimeout(typing);
  });
  go(0);
}
