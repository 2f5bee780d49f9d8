# shellcheck shell=bash
# The preamble the benchmarks in scripts/bench/ share (sourced, not run, from
# the repository root): the binary under test, a work directory holding a
# throwaway pool filesystem, and a clean-up that stops the processes a
# benchmark started and removes everything under the work directory however
# the script ends. scripts/check/csi-sanity.sh makes its pools here too.
#
# A benchmark, in this order:
#   bench_need_root                        when it needs root (most do)
#   bin=$(bench_binary)                    the filevol binary to measure
#   bench_work NAME                        sets $work, cleaned up at exit
#   bench_scratch_pool "$work" SIZE [FS]   a pool filesystem at $work/mnt
#   "$bin" serve ... & bench_pids+=($!)    each process to stop at exit
#   bench_wait_sockets SOCKET...           until its sockets are there

# bench_need_root: exits unless running as root, naming the benchmark
# (bench/compare for scripts/bench/compare.sh).
bench_need_root() {
  [[ $(id -u) -eq 0 ]] && return 0
  echo "bench/$(basename "$0" .sh): needs root" >&2
  exit 1
}

# bench_binary: prints the path of the filevol binary to use: FILEVOL_BIN (a
# packaged one, or one built before), else this checkout's release build
# (scripts/package/build-release.sh, built first if needed).
bench_binary() {
  if [[ -n ${FILEVOL_BIN:-} ]]; then
    echo "$FILEVOL_BIN"
  else
    scripts/package/build-release.sh --quiet
  fi
}

# bench_work NAME: a new directory /tmp/filevol-NAME.XXXXXX in $work, and an
# EXIT trap (bench_exit) that stops every process in bench_pids and then
# removes the directory with whatever is mounted or attached under it. A
# script with more to undo sets its own trap that calls bench_exit first.
bench_pids=()
bench_work() {
  work=$(mktemp -d "/tmp/filevol-$1.XXXXXX")
  trap bench_exit EXIT
}
bench_exit() {
  # Best effort from here on: a failed kill or wait must not skip the rest.
  set +e
  local p
  for p in "${bench_pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  bench_cleanup "$work"
}

# bench_stop PID: stops one process of bench_pids now (kill, then wait) and
# takes it off the list.
bench_stop() {
  kill "$1"
  wait "$1" 2>/dev/null || true
  local p kept=()
  for p in "${bench_pids[@]}"; do [[ $p == "$1" ]] || kept+=("$p"); done
  bench_pids=("${kept[@]}")
}

# bench_wait_sockets SOCKET...: waits up to 10 s for every SOCKET to exist.
# A driver that never makes one fails at the first call through it.
bench_wait_sockets() {
  local i s ready
  for ((i = 0; i < 100; i++)); do
    ready=true
    for s in "$@"; do [[ -S $s ]] || ready=false; done
    $ready && return 0
    sleep 0.1
  done
  return 0
}

# The pool filesystem: the test kit's scratch filesystems
# (crates/kit/src/bin/scratch-pool.rs), so a script's pool is made and
# removed exactly as a Rust test's is. The tool is built on first use
# (gRPC-free, seconds once the dependencies are built).
_bench_scratch_tool() {
  if [[ -z ${_bench_scratch:-} ]]; then
    cargo build --quiet --locked -p filevol-kit --bin scratch-pool >&2
    _bench_scratch=${CARGO_TARGET_DIR:-$PWD/target}/debug/scratch-pool
  fi
  "$_bench_scratch" "$@"
}

# bench_scratch_pool WORK SIZE [FS]: a filesystem of SIZE (8G, 512M) mounted
# at WORK/mnt: xfs with reflink (the default), ext4 (no reflink) or btrfs.
bench_scratch_pool() {
  _bench_scratch_tool make "$@"
}

# bench_cleanup WORK: detaches every loop device backed by a file under WORK
# (a driver's block volumes keep the scratch filesystem busy), unmounts
# everything under WORK (deepest first), detaches the scratch filesystem's
# own device, removes it all.
bench_cleanup() {
  _bench_scratch_tool remove "$1"
}
