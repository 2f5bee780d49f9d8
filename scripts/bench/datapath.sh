#!/usr/bin/env bash
# The data path beside its floors: fio jobs (first writes into never-written
# blocks, overwrites, random reads at queue depths 1, 16 and 32 with p50 and
# p99 latency; sequential I/O) in filevol volumes (raw loop, ext4, xfs; thin
# and thick) and on the pool filesystem and its block device, then pgbench
# in a volume and on the pool filesystem. What each job does and why:
# scripts/bench/datapath_bench.py. About 12 minutes; not in CI.
#
#   scripts/bench/datapath.sh
#
# Needs root; installs fio and postgresql (Debian packages) if missing. The
# pool is a directory on the filesystem of BENCH_POOL_DIR (default /var/tmp,
# the machine's disk). BENCH_RUNTIME (seconds per time-bound job, default 2),
# BENCH_RUNS (default 3) and BENCH_PHASES (default fio,pgbench) go to the
# measurements.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/lib.sh
source scripts/bench/lib.sh
bench_need_root
missing=()
command -v fio >/dev/null || missing+=(fio)
ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1 || missing+=(postgresql)
if ((${#missing[@]})); then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # Debian's package starts a cluster of its own: not one this measures.
  if [[ " ${missing[*]} " == *" postgresql "* ]]; then
    for c in /etc/postgresql/*/main; do
      if [[ -d $c ]]; then pg_ctlcluster "$(basename "$(dirname "$c")")" main stop 2>/dev/null || true; fi
    done
  fi
fi
bin=$(bench_binary)

bench_work datapath
# PostgreSQL runs as its own user, under this directory's kubelet tree.
chmod 755 "$work"
mkdir -p "$work/mnt"
base=$(mktemp -d "${BENCH_POOL_DIR:-/var/tmp}/filevol-datapath.XXXXXX")
chmod 755 "$base"
mount --bind "$base" "$work/mnt"
# A run cut short leaves its clusters running, their data directories in
# the volumes (under $work/kubelet) and the pool (under $work/mnt): an
# immediate shutdown (SIGQUIT), waited for, before anything is unmounted.
stop_postgres() {
  pkill -QUIT -f "postgres -D $work" 2>/dev/null || return 0
  local i
  for ((i = 0; i < 100; i++)); do
    pgrep -f "postgres -D $work" >/dev/null || return 0
    sleep 0.1
  done
}
trap 'stop_postgres; bench_exit; rm -rf "$base"' EXIT
mkdir -p "$work/mnt/pool" "$work/kubelet"

# The layout deploy/ ships: a node plugin first, then a controller.
common=(--pool "$work/mnt/pool" --node-id bench --kubelet-dir "$work/kubelet"
  --reserve 0 --log-level warn)
"$bin" serve --mode node "${common[@]}" --endpoint "unix://$work/node.sock" 2>"$work/node.log" &
bench_pids+=($!)
"$bin" serve --mode controller "${common[@]}" --endpoint "unix://$work/controller.sock" 2>"$work/controller.log" &
bench_pids+=($!)
bench_wait_sockets "$work/node.sock" "$work/controller.sock"

python3 scripts/bench/datapath_bench.py --filevol "$bin" \
  --node "unix://$work/node.sock" --controller "unix://$work/controller.sock" \
  --kubelet "$work/kubelet" --pool-fs "$work/mnt" --scratch "$work" \
  --runtime "${BENCH_RUNTIME:-2}" --runs "${BENCH_RUNS:-3}" --phases "${BENCH_PHASES:-fio,pgbench}"
