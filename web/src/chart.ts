// Charts (uPlot, on canvas): the live chart of each numeric top-level field
// of a device's readings, and the history chart of AggregateReadings'
// buckets. uPlot sets its styles through element.style, which the service's
// CSP (style-src 'self') allows; nothing here uses inline style attributes.

import uPlot from "uplot";
import { Ring } from "./calc.js";
import { h } from "./dom.js";

/** Points kept per live field: at 100 readings/s, the last 30 s; at 1/s, 10 minutes. */
export const LIVE_MAX_POINTS = 3000;
/** Seconds of live points kept, whatever the rate. */
export const LIVE_WINDOW_SECONDS = 600;
/** Live fields charted at most (as many as AggregateReadings takes). */
export const LIVE_MAX_FIELDS = 16;

const HEIGHT = 170;
const COLORS = ["#1f5fbf", "#b34700", "#2e7d32", "#7b1fa2", "#00838f", "#ad1457"];

/** Sizes `plot` to its figure's width, now and whenever that changes. */
function fitWidth(plot: uPlot, container: HTMLElement): ResizeObserver {
  const observer = new ResizeObserver(() => {
    const width = Math.max(200, container.clientWidth);
    if (width !== plot.width) plot.setSize({ width, height: HEIGHT });
  });
  observer.observe(container);
  return observer;
}

function timeAxisOptions(label: string, series: uPlot.Series[], x?: [number, number]): uPlot.Options {
  return {
    width: 600,
    height: HEIGHT,
    scales: { x: x ? { time: true, range: x } : { time: true } },
    axes: [{}, { label, size: 60 }],
    series: [{ label: "time" }, ...series],
    cursor: { drag: { x: false, y: false } },
  };
}

interface LiveField {
  ring: Ring;
  plot: uPlot;
  element: HTMLElement;
  resize: ResizeObserver;
  /** Points received in all (the test counter, `data-points`). */
  received: number;
  dirty: boolean;
}

/**
 * A chart per numeric top-level field of live readings. Readings are added
 * as they arrive; drawing happens at most once per animation frame for all
 * of them, so 100 readings/s cost 100 pushes and ~60 redraws, and a hidden
 * tab (no frames) only fills the bounded rings.
 */
export class LiveCharts {
  private readonly fields = new Map<string, LiveField>();
  private frame = 0;

  constructor(private readonly container: HTMLElement) {}

  /** Adds the numeric top-level values of `json`, received at `seconds`. */
  add(json: unknown, seconds: number): void {
    if (json === null || typeof json !== "object" || Array.isArray(json)) return;
    for (const [name, value] of Object.entries(json as Record<string, unknown>)) {
      if (typeof value !== "number" || !Number.isFinite(value)) continue;
      const field = this.fields.get(name) ?? this.create(name);
      if (!field) continue;
      field.ring.push(seconds, value);
      field.received++;
      field.dirty = true;
    }
    if (!this.frame) this.frame = requestAnimationFrame(() => this.draw());
  }

  get size(): number {
    return this.fields.size;
  }

  private create(name: string): LiveField | undefined {
    if (this.fields.size >= LIVE_MAX_FIELDS) return undefined;
    const element = h("figure", {
      class: "chart live",
      "data-field": name,
      "data-points": 0,
      "aria-label": `live ${name}`,
    });
    element.append(h("figcaption", {}, `${name} (live)`));
    this.container.append(element);
    const color = COLORS[this.fields.size % COLORS.length]!;
    const plot = new uPlot(
      timeAxisOptions(name, [{ label: name, stroke: color, width: 1.5, points: { show: false } }]),
      [[], []],
      element,
    );
    const field: LiveField = {
      ring: new Ring(LIVE_MAX_POINTS, LIVE_WINDOW_SECONDS),
      plot,
      element,
      resize: fitWidth(plot, element),
      received: 0,
      dirty: false,
    };
    this.fields.set(name, field);
    return field;
  }

  private draw(): void {
    this.frame = 0;
    for (const field of this.fields.values()) {
      if (!field.dirty) continue;
      field.dirty = false;
      const newest = field.ring.xs[field.ring.xs.length - 1] ?? 0;
      field.ring.trim(newest);
      field.plot.setData([field.ring.xs, field.ring.ys]);
      field.element.dataset.points = String(field.received);
      field.element.dataset.shown = String(field.ring.xs.length);
    }
  }

  dispose(): void {
    if (this.frame) cancelAnimationFrame(this.frame);
    for (const field of this.fields.values()) {
      field.resize.disconnect();
      field.plot.destroy();
    }
    this.fields.clear();
  }
}

/** One field's buckets, as columns: start (seconds), mean, min, max. */
export interface HistoryColumns {
  starts: number[];
  means: number[];
  mins: number[];
  maxes: number[];
}

/** A history chart: mean, with min and max, per bucket. */
export class HistoryChart {
  private readonly plot: uPlot;
  private readonly resize: ResizeObserver;

  /** `range`: the requested start and end (seconds), the chart's x axis whatever the data covers. */
  constructor(
    readonly element: HTMLElement,
    field: string,
    columns: HistoryColumns,
    range: [number, number],
  ) {
    const band = { stroke: "#8a8a8a", width: 1, dash: [4, 3], points: { show: false } };
    this.plot = new uPlot(
      timeAxisOptions(field, [
        { label: "mean", stroke: COLORS[0], width: 1.5, points: { show: false } },
        { label: "min", ...band },
        { label: "max", ...band },
      ], range),
      [columns.starts, columns.means, columns.mins, columns.maxes],
      element,
    );
    this.resize = fitWidth(this.plot, element);
  }

  dispose(): void {
    this.resize.disconnect();
    this.plot.destroy();
  }
}
