#!/usr/bin/env bash
# What filevol's dependency tree brings in, checked:
# - advisories: `cargo audit` against the RustSec database snapshot in
#   ../shared/advisory-db (no network; the snapshot is the one CI has), any
#   vulnerability fails the run;
# - licences: every crate in Cargo.lock (all targets, build and dev
#   dependencies too) must be available under licences on the allowlist
#   below: an SPDX expression passes when one of its OR-alternatives uses
#   allowed licences only.
#
# cargo-audit is installed (pinned, --locked) when missing; it takes about
# ten minutes to compile once per machine.
set -euo pipefail
cd "$(dirname "$0")/../.."

AUDIT_VERSION=0.22.2
db=${ADVISORY_DB:-../shared/advisory-db}

if ! cargo audit --version 2>/dev/null | grep -q " $AUDIT_VERSION\$"; then
  echo "audit: installing cargo-audit $AUDIT_VERSION (once per machine)" >&2
  cargo install --quiet --locked cargo-audit --version "$AUDIT_VERSION"
fi
if [[ ! -d $db/crates ]]; then
  echo "audit: no advisory database at $db (set ADVISORY_DB)" >&2
  exit 1
fi

# Every advisory fails the run, warnings (unmaintained, unsound) too, but
# these, each looked at:
# - RUSTSEC-2021-0139 (ansi_term unmaintained), RUSTSEC-2024-0375 (atty
#   unmaintained), RUSTSEC-2021-0145 (atty: unaligned read, on Windows
#   only): clap 2 under bindgen 0.59, a build-dependency of grpcio-sys. They
#   run at build time on this crate's own inputs and are not in the binary.
ignored=(RUSTSEC-2021-0139 RUSTSEC-2024-0375 RUSTSEC-2021-0145)

echo "== advisories (cargo audit, database $db)"
cargo audit --db "$db" --no-fetch --stale --deny warnings "${ignored[@]/#/--ignore=}"

echo "== licences"
cargo metadata --locked --format-version 1 | python3 scripts/package/licences.py
