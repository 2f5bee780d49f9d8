#!/usr/bin/env bash
# Measures what the book reports about the build (docs/src/packaging.md):
# a clean release build's
# wall time (dependencies and gRPC core included) and the stripped binary's
# size, with scripts/package/build-release.sh's settings. Builds in a throwaway
# target directory so the developer's target/ is neither reused nor
# disturbed.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/package/release-env.sh

target=$(mktemp -d)
trap 'rm -rf "$target"' EXIT

cargo fetch --locked >/dev/null
release_env "$PWD" "$target"
start=$(date +%s)
CARGO_TARGET_DIR="$target" cargo build --release --locked --offline --quiet --bin filevol
end=$(date +%s)

bin="$target/release/filevol"
echo "clean release build: $((end - start)) s on $(nproc) cores"
echo "binary size: $(stat -c %s "$bin") bytes ($(du -h --apparent-size "$bin" | cut -f1))"
