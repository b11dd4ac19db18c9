// The device page's history: AggregateReadings over the last hour, day or
// week, in buckets that make ~500 points whatever the range, one chart per
// numeric field. The page holds one response at a time (≤ 16 fields × ~500
// buckets).

import { durationFromMs, timestampFromMs, timestampMs } from "@bufbuild/protobuf/wkt";
import { aborted, describe, hub } from "./api.js";
import { bucketMs, formatBucket, pointer, RANGES } from "./calc.js";
import { HistoryChart, type HistoryColumns } from "./chart.js";
import { alertBox, formatNumber, h, note, table } from "./dom.js";
import type { Series } from "./gen/devicehub/v1/devicehub_pb.js";

function columns(series: Series): HistoryColumns {
  const c: HistoryColumns = { starts: [], means: [], mins: [], maxes: [] };
  for (const b of series.buckets) {
    c.starts.push(b.startTime ? timestampMs(b.startTime) / 1000 : 0);
    c.means.push(b.mean);
    c.mins.push(b.min);
    c.maxes.push(b.max);
  }
  return c;
}

/** The buckets as a table, for screen readers and exact figures; built when opened. */
function bucketTable(series: Series): HTMLDetailsElement {
  const details = h("details", { class: "buckets" }, h("summary", {}, "Buckets as a table"));
  details.addEventListener(
    "toggle",
    () => {
      const cell = (value: number) => h("td", { "data-value": String(value) }, formatNumber(value));
      const rows = series.buckets.map((b) =>
        h(
          "tr",
          {},
          h(
            "td",
            { "data-value": b.startTime ? String(timestampMs(b.startTime)) : "" },
            b.startTime ? new Date(timestampMs(b.startTime)).toISOString() : "",
          ),
          h("td", { "data-value": String(b.count) }, String(b.count)),
          cell(b.min),
          cell(b.max),
          cell(b.mean),
          cell(b.first),
          cell(b.last),
        ),
      );
      details.append(
        table(`${series.field} per bucket`, ["start", "count", "min", "max", "mean", "first", "last"], rows),
      );
    },
    { once: true },
  );
  return details;
}

/**
 * The history section: range buttons and the charts of `fields` (top-level
 * keys). `signal` ends it with the page.
 */
export function historySection(deviceId: string, fields: string[], signal: AbortSignal): HTMLElement {
  const charts = h("div", { class: "charts" });
  const status = h("p", { role: "status", class: "note" });
  const buttons = RANGES.map((range) =>
    h("button", { type: "button", "aria-pressed": "false", "data-range": range.label }, range.label),
  );
  const section = h(
    "section",
    { "aria-labelledby": "history-title", id: "history" },
    h("h2", { id: "history-title" }, "History"),
    h("div", { class: "buttons", role: "group", "aria-label": "history range" }, ...buttons),
    status,
    charts,
  );
  let shown: HistoryChart[] = [];
  let request = 0;

  async function load(rangeIndex: number): Promise<void> {
    const range = RANGES[rangeIndex]!;
    buttons.forEach((b, i) => b.setAttribute("aria-pressed", String(i === rangeIndex)));
    const mine = ++request;
    const bucket = bucketMs(range.ms);
    const end = Date.now();
    status.textContent = `loading the last ${range.label}…`;
    try {
      const response = await hub.aggregateReadings(
        {
          deviceId,
          fields: fields.map(pointer),
          startTime: timestampFromMs(end - range.ms),
          endTime: timestampFromMs(end),
          bucket: durationFromMs(bucket),
        },
        { signal },
      );
      if (mine !== request) return; // a newer range was asked for meanwhile
      shown.forEach((chart) => chart.dispose());
      shown = [];
      charts.replaceChildren();
      status.textContent = `the last ${range.label} in buckets of ${formatBucket(bucket)}`;
      section.dataset.bucketMs = String(bucket);
      section.dataset.range = range.label;
      for (const series of response.series) {
        const readings = series.buckets.reduce((sum, b) => sum + Number(b.count), 0);
        const figure = h("figure", {
          class: "chart history",
          "data-field": series.field,
          "data-buckets": series.buckets.length,
          "data-readings": readings,
        });
        figure.append(
          h("figcaption", {}, `${series.field}: ${series.buckets.length} buckets, ${readings} readings`),
        );
        charts.append(figure);
        if (series.buckets.length > 0) {
          const x: [number, number] = [(end - range.ms) / 1000, end / 1000];
          shown.push(new HistoryChart(figure, series.field, columns(series), x));
        }
        figure.append(bucketTable(series));
      }
      section.dataset.loaded = String(mine);
    } catch (error) {
      if (aborted(error, signal) || mine !== request) return;
      status.textContent = "";
      charts.replaceChildren(alertBox(`History: ${describe(error)}`));
    }
  }

  buttons.forEach((button, i) => button.addEventListener("click", () => void load(i)));
  signal.addEventListener("abort", () => shown.forEach((chart) => chart.dispose()));
  if (fields.length === 0) {
    buttons.forEach((button) => (button.disabled = true));
    charts.append(note("No numeric fields in the newest reading: nothing to aggregate."));
  } else {
    void load(0);
  }
  return section;
}
