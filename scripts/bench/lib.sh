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

# The pool filesystem. Every script goes through these two functions only,
# so their bodies can change (to a helper shared with the Rust test kit)
# without touching a caller.

# bench_scratch_pool WORK SIZE [FS]: a filesystem of SIZE (truncate syntax)
# mounted at WORK/mnt: xfs with reflink (the default) or ext4 (no reflink).
bench_scratch_pool() {
  truncate -s "$2" "$1/fs.img"
  case ${3:-xfs} in
    xfs) mkfs.xfs -q -m reflink=1 "$1/fs.img" ;;
    ext4) mkfs.ext4 -q -F "$1/fs.img" ;;
    *) echo "bench_scratch_pool: unknown filesystem $3" >&2; return 1 ;;
  esac
  mkdir -p "$1/mnt"
  mount -o loop "$1/fs.img" "$1/mnt"
}

# bench_cleanup WORK: detaches every loop device backed by a file under WORK
# (a driver's block volumes, attached on the scratch filesystem, keep it
# busy: detached first, while their paths still read as under WORK),
# unmounts everything under WORK (deepest first), detaches the scratch
# filesystem's own device, removes it all.
bench_cleanup() {
  _bench_detach_under "$1"
  awk -v d="$1/" 'index($5, d) == 1 {print length($5), $5}' /proc/self/mountinfo |
    sort -rn | cut -d' ' -f2- | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  _bench_detach_under "$1"
  rm -rf "$1"
}
# Part of bench_cleanup: detaches the loop devices backed by files under $1.
_bench_detach_under() {
  local f
  for f in /sys/block/loop*/loop/backing_file; do
    [[ -r $f ]] && grep -q "^$1/" "$f" 2>/dev/null &&
      losetup -d "/dev/$(basename "$(dirname "$(dirname "$f")")")" 2>/dev/null
  done
  return 0
}
