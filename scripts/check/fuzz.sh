#!/usr/bin/env bash
# Runs each cargo-fuzz target for a while (default 60 s each) on its corpus
# in fuzz/corpus/<target>. A crash leaves its input in
# fuzz/artifacts/<target>/: fix the bug, then keep the input in
# fuzz/regressions/<target>/, where the corpus replay test
# (tests/integration/fuzz_corpus.rs) runs it in CI on every build.
#   scripts/check/fuzz.sh [seconds] [target...]
# Needs cargo-fuzz (`cargo install cargo-fuzz`). Without a nightly
# toolchain the targets build with coverage instrumentation only
# (`--sanitizer none`, through RUSTC_BOOTSTRAP=1 for cargo-fuzz's flags).
set -euo pipefail
cd "$(dirname "$0")/../.."

seconds=${1:-60}
shift || true
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(requests mountinfo sysfs metadata mkfs_options block_ranges)
command -v cargo-fuzz >/dev/null || { echo "fuzz: install cargo-fuzz first (cargo install cargo-fuzz)" >&2; exit 1; }

toolchain_args=()
if ! rustc --version | grep -q nightly; then
  export RUSTC_BOOTSTRAP=1
  toolchain_args=(--sanitizer none)
fi

status=0
for t in "${targets[@]}"; do
  echo "== fuzz $t for ${seconds}s"
  mkdir -p "fuzz/corpus/$t"
  # Work on a copy: the committed corpus stays small and reviewed.
  work=$(mktemp -d)
  cp -r "fuzz/corpus/$t/." "$work/"
  cargo fuzz run "${toolchain_args[@]}" --fuzz-dir fuzz "$t" "$work" -- \
    -max_total_time="$seconds" -rss_limit_mb=2048 -print_final_stats=1 || status=$?
  rm -rf "$work"
done
exit "$status"
