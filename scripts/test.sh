#!/usr/bin/env bash
# Runs filevol's whole test suite: unit tests and the integration tests that
# start the real binary on temporary sockets and pools.
#
# It installs what the build and the tests need first (scripts/install-deps.sh,
# apt), so it works on a fresh Debian or Ubuntu machine. Tests that attach
# loop devices and mount filesystems need root; run it as root (CI does).
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/install-deps.sh

# Doc tests are left out (the crate has none): cargo would otherwise end the
# run with an empty "0 passed" summary of its own.
status=0
cargo test --locked --lib --bins --tests "$@" || status=$?

# Every test cleans up through guards; this proves it for the whole suite.
scripts/check-leaks.sh || status=1
exit "$status"
