// Builds the dashboard into fieldsync's package (fieldsync/api/dashboard/), which the server
// serves at /dashboard/: one ES module bundle (the app, `@fieldsync/client` and Yjs), its page
// and stylesheet. The client is linked from clients/ts (a `file:` dependency, built first by
// make), which has its own copy of Yjs for its tests: the aliases make the client use this
// app's Yjs (its peer dependency) and the lib0 under it, so the bundle holds one of each.
import { copyFile, mkdir } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "..", "fieldsync", "api", "dashboard");
await mkdir(out, { recursive: true });
await build({
  entryPoints: [join(here, "src", "main.ts")],
  absWorkingDir: here, // where aliases resolve
  alias: { yjs: "yjs", lib0: "lib0" },
  bundle: true,
  format: "esm",
  target: "es2020",
  minify: true,
  sourcemap: false,
  legalComments: "none",
  outfile: join(out, "app.js"),
  logLevel: "warning",
});
for (const file of ["index.html", "style.css"]) {
  await copyFile(join(here, file), join(out, file));
}
console.log(`dashboard built into ${out}`);
