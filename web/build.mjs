// npm run build: bundle src/editor.js and copy the stylesheet into
// crates/otaforge-server/assets/, which the server embeds in its binary.
// Everything comes from node_modules installed from package-lock.json.
import { build } from "esbuild";
import { copyFile, mkdir, stat } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import path from "node:path";

const here = path.dirname(fileURLToPath(import.meta.url));
const assets = path.resolve(here, "../crates/otaforge-server/assets");
await mkdir(assets, { recursive: true });

// One minified IIFE bundle per page script, its licences named in a banner.
const bundle = (entry, banner) =>
  build({
    entryPoints: [path.join(here, "src", entry)],
    outfile: path.join(assets, entry),
    bundle: true,
    minify: true,
    format: "iife",
    target: ["es2020"],
    legalComments: "none",
    banner: { js: banner },
    logLevel: "warning",
  });

await bundle(
  "editor.js",
  "/* OTAForge editor bundle, built from web/ by `npm run build`. Includes CodeMirror 6 and Lezer (MIT, (c) Marijn Haverbeke and others). */",
);
await bundle(
  "webtools.js",
  "/* OTAForge browser flashing, built from web/ by `npm run build`. Includes ESP Web Tools (Apache-2.0, (c) ESPHome), esptool-js (Apache-2.0, (c) Espressif), improv-wifi-serial-sdk (Apache-2.0), Lit and Material Web (BSD-3-Clause / Apache-2.0, (c) Google). */",
);

await copyFile(path.join(here, "src/app.css"), path.join(assets, "app.css"));
await copyFile(path.join(here, "src/copy.js"), path.join(assets, "copy.js"));
await copyFile(path.join(here, "src/live.js"), path.join(assets, "live.js"));
await copyFile(path.join(here, "src/upload.js"), path.join(assets, "upload.js"));

for (const f of ["editor.js", "webtools.js", "app.css", "copy.js", "live.js", "upload.js"]) {
  const { size } = await stat(path.join(assets, f));
  console.log(`${path.relative(process.cwd(), path.join(assets, f))}  ${size} bytes`);
}
