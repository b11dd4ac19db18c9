// Builds the dashboard into dist/: app.js (the TypeScript and its
// dependencies, minified), app.css (uPlot's styles and ours) and
// index.html. Deterministic: the same sources and the locked esbuild give
// the same bytes, which CI checks against the committed dist/. The service
// embeds these three files (src/web/dashboard.rs).
import { build } from "esbuild";
import { copyFile, mkdir, rm } from "node:fs/promises";

await rm("dist", { recursive: true, force: true });
await mkdir("dist");
await build({
  entryPoints: { app: "src/main.ts" },
  bundle: true,
  format: "esm",
  target: "es2022",
  minify: true,
  charset: "utf8",
  legalComments: "eof",
  outdir: "dist",
  logLevel: "warning",
});
await copyFile("src/index.html", "dist/index.html");
