// The dashboard's pure parts: no DOM, no network, so that
// test/unit.test.mjs runs them in Node: the history's bucket, JSON
// Pointers, the live charts' bounded points, the routes, form input.

import type { JsonObject } from "@bufbuild/protobuf";

/** About this many points per chart, whatever the range. */
export const HISTORY_POINTS = 500;

export const RANGES = [
  { label: "1 h", ms: 3_600_000 },
  { label: "24 h", ms: 86_400_000 },
  { label: "7 d", ms: 7 * 86_400_000 },
] as const;

/**
 * The bucket for `rangeMs` that gives ~`points` buckets: `rangeMs / points`
 * rounded to whole seconds from a second up, to whole milliseconds below,
 * and never under the service's minimum, 1 ms.
 */
export function bucketMs(rangeMs: number, points = HISTORY_POINTS): number {
  const raw = rangeMs / points;
  const rounded = raw >= 1000 ? Math.round(raw / 1000) * 1000 : Math.round(raw);
  return Math.max(1, rounded);
}

/** "7 s", "2 min 53 s", "250 ms". */
export function formatBucket(ms: number): string {
  if (ms < 1000) return `${ms} ms`;
  const s = Math.round(ms / 1000);
  if (s < 60) return `${s} s`;
  return s % 60 === 0 ? `${s / 60} min` : `${Math.floor(s / 60)} min ${s % 60} s`;
}

/** An RFC 6901 JSON Pointer to the top-level key `name`. */
export function pointer(name: string): string {
  return `/${name.replaceAll("~", "~0").replaceAll("/", "~1")}`;
}

/**
 * The newest points of one field, oldest first, at most `max` of them (and
 * `max / 2` more until the next compaction, so a push costs O(1) amortized:
 * the front is cut off in one splice, not one shift per point).
 */
export class Ring {
  readonly xs: number[] = [];
  readonly ys: number[] = [];

  constructor(
    readonly max: number,
    readonly windowSeconds: number,
  ) {}

  push(x: number, y: number): void {
    this.xs.push(x);
    this.ys.push(y);
    if (this.xs.length >= this.max + this.max / 2) this.cut(this.xs.length - this.max);
  }

  /** Drops what is older than the window before `now` (seconds) or beyond `max`. */
  trim(now: number): void {
    let old = 0;
    const since = now - this.windowSeconds;
    while (old < this.xs.length && this.xs[old]! < since) old++;
    this.cut(Math.max(old, this.xs.length - this.max));
  }

  private cut(n: number): void {
    if (n <= 0) return;
    this.xs.splice(0, n);
    this.ys.splice(0, n);
  }
}

export type Route = { name: "fleet"; prefix: string } | { name: "device"; id: string } | { name: "unknown" };

export function route(hash: string): Route {
  const path = hash.replace(/^#/, "") || "/";
  if (path === "/" || path.startsWith("/?")) {
    const query = new URLSearchParams(path.slice(2));
    return { name: "fleet", prefix: query.get("prefix") ?? "" };
  }
  const device = /^\/device\/(.+)$/.exec(path);
  if (device) {
    try {
      return { name: "device", id: decodeURIComponent(device[1]!) };
    } catch {
      return { name: "unknown" };
    }
  }
  return { name: "unknown" };
}

/** `text` as a JSON object, or why it is not one. */
export function parseObject(text: string, what: string): JsonObject {
  let value: unknown;
  try {
    value = JSON.parse(text.trim() || "{}");
  } catch (error) {
    throw new Error(`${what} is not JSON: ${(error as Error).message}`);
  }
  if (value === null || typeof value !== "object" || Array.isArray(value)) {
    throw new Error(`${what} must be a JSON object, like {"speed": 3}`);
  }
  return value as JsonObject;
}

