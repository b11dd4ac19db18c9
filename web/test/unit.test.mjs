// Unit tests of the dashboard's pure parts (src/calc.ts), in Node's test
// runner: esbuild compiles the TypeScript in memory, and the module is
// imported from a data: URL. `npm test` runs them (scripts/test.sh does).
import assert from "node:assert/strict";
import { test } from "node:test";
import { build } from "esbuild";

const built = await build({
  entryPoints: [new URL("../src/calc.ts", import.meta.url).pathname],
  bundle: true,
  format: "esm",
  platform: "neutral",
  write: false,
  logLevel: "error",
});
const calc = await import(`data:text/javascript;base64,${Buffer.from(built.outputFiles[0].text).toString("base64")}`);

test("the history's bucket gives ~500 points, in whole seconds from a second up", () => {
  assert.deepEqual(
    calc.RANGES.map((r) => calc.bucketMs(r.ms)),
    [7_000, 173_000, 1_210_000],
  );
  for (const range of calc.RANGES) {
    const buckets = range.ms / calc.bucketMs(range.ms);
    assert.ok(buckets > 490 && buckets < 520, `${range.label}: ${buckets}`);
  }
  assert.equal(calc.bucketMs(60_000), 120, "under a second: whole milliseconds");
  assert.equal(calc.bucketMs(100), 1, "never under 1 ms");
  assert.equal(calc.bucketMs(1), 1);
  assert.equal(calc.formatBucket(7_000), "7 s");
  assert.equal(calc.formatBucket(173_000), "2 min 53 s");
  assert.equal(calc.formatBucket(1_200_000), "20 min");
  assert.equal(calc.formatBucket(120), "120 ms");
});

test("fields become RFC 6901 JSON Pointers", () => {
  assert.equal(calc.pointer("temperature"), "/temperature");
  assert.equal(calc.pointer("a/b~c"), "/a~1b~0c");
  assert.equal(calc.pointer(""), "/");
});

test("the live ring keeps at most max points (plus half until it compacts) and the window", () => {
  const ring = new calc.Ring(100, 60);
  for (let i = 0; i < 1000; i++) {
    ring.push(i, i * 2);
    assert.ok(ring.xs.length < 150, `${ring.xs.length} at ${i}`);
  }
  ring.trim(999);
  assert.equal(ring.xs.length, 61, "the last 60 s, both ends included");
  assert.equal(ring.xs[0], 939);
  assert.equal(ring.ys[0], 1878);
  assert.deepEqual(ring.xs.slice(-2), [998, 999]);
  const dense = new calc.Ring(100, 600);
  for (let i = 0; i < 500; i++) dense.push(i / 100, i);
  dense.trim(5);
  assert.equal(dense.xs.length, 100, "at most max after a trim");
  assert.equal(dense.ys[0], 400);
});

test("routes", () => {
  assert.deepEqual(calc.route(""), { name: "fleet", prefix: "" });
  assert.deepEqual(calc.route("#/"), { name: "fleet", prefix: "" });
  assert.deepEqual(calc.route("#/?prefix=green%20house-"), { name: "fleet", prefix: "green house-" });
  assert.deepEqual(calc.route("#/device/sim-1"), { name: "device", id: "sim-1" });
  assert.deepEqual(calc.route("#/device/a%2Fb%C3%A9"), { name: "device", id: "a/bé" });
  assert.deepEqual(calc.route("#/device/%E0%A4%A"), { name: "unknown" });
  assert.deepEqual(calc.route("#/device/"), { name: "unknown" });
  assert.deepEqual(calc.route("#main"), { name: "unknown" });
});

test("parameters and patches must be JSON objects", () => {
  assert.deepEqual(calc.parseObject(' {"speed": 3} ', "Parameters"), { speed: 3 });
  assert.deepEqual(calc.parseObject("", "Parameters"), {});
  assert.throws(() => calc.parseObject("[1]", "Parameters"), /must be a JSON object/);
  assert.throws(() => calc.parseObject("null", "The patch"), /The patch must be a JSON object/);
  assert.throws(() => calc.parseObject("{nope", "Parameters"), /Parameters is not JSON/);
});
