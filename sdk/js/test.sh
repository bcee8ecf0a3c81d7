#!/usr/bin/env bash
# The JavaScript SDK and the chat page: install (npm ci, from the lockfile), check that the
# committed generated code and page bundle are current, build, then run the Node tests and
# the headless-Chromium test against a real cim-host (target/debug/cim-host, built here
# if needed, with the components of spin.toml; CIM_HOST_BIN=PATH tests that binary instead).
#   sdk/js/test.sh            everything
#   sdk/js/test.sh node       only the Node tests (no browser needed)
set -euo pipefail
cd "$(dirname "$0")"
root="$(cd ../.. && pwd)"
what="${1:-all}"

echo "== sdk/js: npm ci"
npm ci --no-audit --no-fund --loglevel=error

echo "== sdk/js: generated code and bundle are current"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
npx buf generate ../../proto --template buf.gen.yaml -o "$tmp"
diff -u src/gen/cim_pb.ts "$tmp/src/gen/cim_pb.ts" \
  || { echo "src/gen is stale: run \`npm run generate\` in sdk/js and commit it"; exit 1; }
npx tsc -p tsconfig.web.json
node scripts/bundle.mjs --check

echo "== sdk/js: build"
npm run --silent build

echo "== sdk/js: cim-host and the components"
if [[ -z "${CIM_HOST_BIN:-}" ]]; then
  # The same build as the Rust end-to-end tests' (tests/common): a no-op after `cargo test`.
  (cd "$root" && cargo build --quiet --locked --bins -p cim-host -p cim-client -p cim-bench)
  export CIM_HOST_BIN="$root/target/debug/cim-host"
fi
echo "testing $CIM_HOST_BIN"
(cd "$root/components" && cargo build --quiet --locked --release --target wasm32-wasip2)

echo "== sdk/js: Node tests"
node --test --test-concurrency=1 test/*.test.mjs

if [[ "$what" == all ]]; then
  echo "== sdk/js: headless Chromium test"
  node --test test-browser/*.test.mjs
fi
