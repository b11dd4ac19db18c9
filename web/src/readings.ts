// The device page's raw readings: ListReadings, newest first, a page of 50
// at a time, with the tokens of the pages visited kept for "previous".

import { toJson } from "@bufbuild/protobuf";
import { timestampDate, ValueSchema } from "@bufbuild/protobuf/wkt";
import { aborted, describe, hub } from "./api.js";
import { alertBox, compactJson, formatTime, h, note, table } from "./dom.js";
import type { Reading } from "./gen/devicehub/v1/devicehub_pb.js";

export const READINGS_PAGE_SIZE = 50;
/**
 * Calls per page at most: one ListReadings call looks at a bounded number of
 * buffered readings and may return a short page with a token, so a page
 * follows tokens until it is full; bounded so a device with few readings
 * among many does not keep the page busy.
 */
const MAX_CALLS_PER_PAGE = 20;

/** The reading's JSON (or its size, when it is not JSON). */
export function readingValue(reading: Reading): unknown {
  return reading.json ? toJson(ValueSchema, reading.json) : undefined;
}

function row(reading: Reading): HTMLTableRowElement {
  const value = readingValue(reading);
  return h(
    "tr",
    {},
    h("td", {}, String(reading.seq)),
    h("td", {}, formatTime(reading.receivedAt && timestampDate(reading.receivedAt))),
    h("td", {}, reading.topic),
    h("td", { class: "mono" }, value === undefined ? `${reading.payload.length} bytes` : compactJson(value)),
  );
}

export function readingsSection(deviceId: string, signal: AbortSignal): HTMLElement {
  // tokens[i]: the token of page i (""; the first); the current page is `at`.
  const tokens = [""];
  let at = 0;
  let next = "";
  const body = h("div", {});
  const position = h("span", { class: "note", "aria-live": "polite" });
  const newest = h("button", { type: "button" }, "Newest");
  const previous = h("button", { type: "button" }, "Previous page");
  const following = h("button", { type: "button" }, "Next page");
  const section = h(
    "section",
    { "aria-labelledby": "readings-title", id: "readings" },
    h("h2", { id: "readings-title" }, "Readings"),
    body,
    h("div", { class: "buttons" }, newest, previous, following, position),
  );

  async function show(page: number): Promise<void> {
    try {
      const readings: Reading[] = [];
      let token = tokens[page]!;
      for (let call = 0; call < MAX_CALLS_PER_PAGE; call++) {
        const response = await hub.listReadings(
          { deviceId, pageSize: READINGS_PAGE_SIZE - readings.length, pageToken: token },
          { signal },
        );
        readings.push(...response.readings);
        token = response.nextPageToken;
        if (!token || readings.length >= READINGS_PAGE_SIZE) break;
      }
      at = page;
      next = token;
      tokens.length = page + 1;
      if (next) tokens.push(next);
      body.replaceChildren(
        readings.length === 0
          ? note("No readings buffered for this device.")
          : table(`readings of ${deviceId}, newest first`, ["seq", "received", "topic", "payload"], readings.map(row)),
      );
      section.dataset.rows = String(readings.length);
      position.textContent = `page ${page + 1}`;
      previous.disabled = page === 0;
      following.disabled = !next;
    } catch (error) {
      if (aborted(error, signal)) return;
      body.replaceChildren(alertBox(`Readings: ${describe(error)}`));
    }
  }

  newest.addEventListener("click", () => void show(0));
  previous.addEventListener("click", () => void show(Math.max(0, at - 1)));
  following.addEventListener("click", () => {
    if (next) void show(at + 1);
  });
  previous.disabled = true;
  following.disabled = true;
  void show(0);
  return section;
}
