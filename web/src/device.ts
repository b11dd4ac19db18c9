// The device page: its status, a live chart per numeric field
// (WatchReadings), the history (AggregateReadings), the raw readings,
// commands and state. Everything it starts (the stream, polls, charts)
// ends with `signal`, when the page is left.

import { Code } from "@connectrpc/connect";
import { timestampDate, timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { aborted, codeOf, describe, hub } from "./api.js";
import { LIVE_MAX_FIELDS, LIVE_WINDOW_SECONDS, LiveCharts } from "./chart.js";
import { commandsSection } from "./commands.js";
import { alertBox, h, note, timeAgo } from "./dom.js";
import { GapPolicy, type Device } from "./gen/devicehub/v1/devicehub_pb.js";
import { historySection } from "./history.js";
import { readingValue, readingsSection } from "./readings.js";
import { stateSection } from "./state.js";
import { statusBadge, statusWord } from "./status.js";

/** How often the device's status line is fetched again. */
const DEVICE_POLL_MS = 2000;
/** Wait before watching again after the stream broke. */
const RECONNECT_MS = 1000;

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const onAbort = () => {
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(() => {
      signal.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal.addEventListener("abort", onAbort, { once: true });
  });
}

/** The numeric top-level keys of the device's newest reading. */
function numericFields(device: Device | undefined): string[] {
  const value = device?.lastReading && readingValue(device.lastReading);
  if (value === null || typeof value !== "object" || Array.isArray(value)) return [];
  return Object.entries(value as Record<string, unknown>)
    .filter(([, v]) => typeof v === "number")
    .map(([k]) => k)
    .slice(0, LIVE_MAX_FIELDS);
}

function summary(device: Device): HTMLElement {
  return h(
    "p",
    { class: "summary" },
    statusBadge(device.status),
    " · last seen ",
    timeAgo(device.lastSeen && timestampDate(device.lastSeen)),
    ` · ${device.readingsBuffered} readings buffered`,
  );
}

/** Readings that seed the live charts when the page opens (one ListReadings page). */
const LIVE_SEED_READINGS = 1000;

/**
 * The live charts: seeded with the device's newest readings of the last
 * LIVE_WINDOW_SECONDS (one page), then WatchReadings from the newest of
 * them on, so the seam has no gap and no duplicate. `topic` (the topic of
 * the device's newest reading) keeps its status messages, replies and
 * reported state out of the charts.
 */
function liveSection(deviceId: string, topic: string, signal: AbortSignal): HTMLElement {
  const charts = h("div", { class: "charts", id: "live-charts" });
  const status = h("p", { role: "status", class: "note" }, "connecting…");
  const section = h(
    "section",
    { "aria-labelledby": "live-title", id: "live" },
    h("h2", { id: "live-title" }, "Live"),
    status,
    charts,
  );
  const live = new LiveCharts(charts);
  signal.addEventListener("abort", () => live.dispose());

  async function seed(): Promise<bigint | undefined> {
    try {
      const page = await hub.listReadings(
        {
          deviceId,
          topicFilter: topic,
          pageSize: LIVE_SEED_READINGS,
          startTime: timestampFromMs(Date.now() - LIVE_WINDOW_SECONDS * 1000),
        },
        { signal },
      );
      const oldestFirst = [...page.readings].reverse();
      for (const reading of oldestFirst) {
        live.add(readingValue(reading), reading.receivedAt ? timestampMs(reading.receivedAt) / 1000 : 0);
      }
      return page.readings[0]?.seq;
    } catch {
      return undefined; // the watch below says what is wrong, if anything
    }
  }

  async function watch(): Promise<void> {
    // Resume after the newest reading received when the stream breaks;
    // gaps (readings evicted before they were sent) are said, not fatal.
    let afterSeq = await seed();
    while (!signal.aborted) {
      try {
        status.textContent = live.size > 0 ? "live" : "live: waiting for readings…";
        const stream = hub.watchReadings(
          { deviceId, topicFilter: topic, afterSeq, gapPolicy: GapPolicy.NOTIFY },
          { signal },
        );
        for await (const message of stream) {
          if (message.event.case === "reading") {
            const reading = message.event.value;
            afterSeq = reading.seq;
            const at = reading.receivedAt ? timestampMs(reading.receivedAt) / 1000 : Date.now() / 1000;
            live.add(readingValue(reading), at);
            if (live.size === 0) status.textContent = "live: the readings have no numeric fields";
            else if (status.textContent !== "live") status.textContent = "live";
          } else if (message.event.case === "gap") {
            status.textContent = "live (some readings were missed)";
          }
        }
      } catch (error) {
        if (aborted(error, signal)) return;
        const code = codeOf(error);
        if (code === Code.Unauthenticated || code === Code.PermissionDenied) {
          // The same token would fail again: say so and stop.
          status.replaceWith(alertBox(`Live: ${describe(error)}`));
          return;
        }
        status.textContent = `reconnecting: ${describe(error)}`;
      }
      await sleep(RECONNECT_MS, signal);
    }
  }
  void watch();
  return section;
}

export async function devicePage(main: HTMLElement, deviceId: string, signal: AbortSignal): Promise<void> {
  const header = h("div", { id: "device-summary" });
  // Status changes are announced; the summary itself (its "5 s ago"
  // changes every poll) is not live.
  const announce = h("p", { class: "visually-hidden", "aria-live": "polite" });
  main.append(
    h("p", {}, h("a", { href: "#/" }, "← Fleet")),
    h("h1", { tabindex: -1 }, deviceId),
    header,
    announce,
  );
  let device: Device | undefined;
  try {
    device = (await hub.getDevice({ deviceId }, { signal })).device;
  } catch (error) {
    if (aborted(error, signal)) return;
    if (codeOf(error) === Code.NotFound) {
      header.append(note("Not heard from yet: no readings, replies or status messages."));
    } else {
      header.append(alertBox(describe(error)));
      return;
    }
  }
  if (device) header.replaceChildren(summary(device));
  main.append(
    liveSection(deviceId, device?.lastReading?.topic ?? "", signal),
    historySection(deviceId, numericFields(device), signal),
    commandsSection(deviceId, signal),
    stateSection(deviceId, signal),
    readingsSection(deviceId, signal),
  );

  // The status line, fetched again while the page is open.
  while (!signal.aborted) {
    await sleep(DEVICE_POLL_MS, signal);
    if (signal.aborted) return;
    try {
      const fresh = (await hub.getDevice({ deviceId }, { signal })).device;
      if (!fresh) continue;
      if (device && fresh.status !== device.status) {
        announce.textContent = `${deviceId} is now ${statusWord(fresh.status)}`;
      }
      device = fresh;
      header.replaceChildren(summary(fresh));
    } catch (error) {
      if (aborted(error, signal)) return;
      // A failed refresh keeps the last status shown; the next try may work.
    }
  }
}
