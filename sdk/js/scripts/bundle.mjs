// Bundles the chat page (web/chat.ts and the SDK) into host/web/chat.js, which the host
// embeds and serves at /chat.js, so `cargo run` needs no npm. `--check`: fail if the
// committed bundle differs from a fresh build (CI).
import { build } from "esbuild";
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "../../../host/web/chat.js");
const result = await build({
  entryPoints: [join(here, "../web/chat.ts")],
  bundle: true,
  format: "iife",
  target: "es2020",
  minify: true,
  legalComments: "none",
  charset: "utf8",
  write: false,
  banner: { js: "// Generated from sdk/js/web/chat.ts by `npm run bundle` in sdk/js; do not edit." },
});
const fresh = result.outputFiles[0].text;
if (process.argv.includes("--check")) {
  let committed = "";
  try {
    committed = readFileSync(out, "utf8");
  } catch {}
  if (committed !== fresh) {
    console.error("host/web/chat.js is not what `npm run bundle` in sdk/js builds: run it and commit the result");
    process.exit(1);
  }
  console.log("host/web/chat.js is up to date");
} else {
  writeFileSync(out, fresh);
  console.log(`wrote ${out} (${fresh.length} bytes)`);
}
