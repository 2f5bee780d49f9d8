#!/usr/bin/env bash
# The release build of filevol: `cargo build --release` with the settings
# that make it reproducible (scripts/package/release-env.sh), so this binary and
# the one in the Debian package (scripts/package/package.sh) are the same bytes.
# Every script that needs a release binary builds it here, and prints its
# path on stdout. Extra arguments go to cargo (--quiet, ...).
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/package/release-env.sh

# Named explicitly (and absolute): the path is remapped and printed, so it
# must be the one cargo uses whatever CARGO_BUILD_TARGET_DIR or a config
# file says.
target=$(realpath -m "${CARGO_TARGET_DIR:-$PWD/target}")
release_env "$PWD" "$target"
cargo build --release --locked --bin filevol --target-dir "$target" "$@" >&2
echo "$target/release/filevol"
