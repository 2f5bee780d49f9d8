#!/usr/bin/env bash
# Data-path throughput: the same fio jobs inside a mounted filevol image
# volume and directly on the pool filesystem it lives on, with direct I/O,
# as a ratio; then again with the loop device's direct I/O turned off
# (`--loop-direct-io=false`: the image is read through the page cache).
# Needs root; installs fio (Debian package) if missing.
#   scripts/bench/datapath.sh            (BENCH_RUNTIME=15 seconds per job)
# By default the pool is a loop-mounted xfs in a file (which measures the
# loop layers against memory-speed storage); BENCH_POOL_DIR=/some/dir on a
# real disk's filesystem measures against that disk.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/lib.sh
source scripts/bench/lib.sh
bench_need_root
command -v fio >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; }

runtime=${BENCH_RUNTIME:-15}
# FILEVOL_BIN: an existing binary to use (a packaged one, or one built
# before); else the release build of this checkout.
bin=$(bench_binary)

bench_work datapath

if [[ -n ${BENCH_POOL_DIR:-} ]]; then
  mkdir -p "$work/mnt"
  base=$(mktemp -d "$BENCH_POOL_DIR/filevol-datapath.XXXXXX")
  mount --bind "$base" "$work/mnt"
  trap 'bench_exit; rm -rf "$base"' EXIT
else
  bench_scratch_pool "$work" 16G
fi
mkdir -p "$work/kubelet/staging" "$work/kubelet/pods/p"
mkdir -p "$work/mnt/pool" "$work/mnt/direct"

start() { # extra serve flags
  "$bin" serve --endpoint "unix://$work/csi.sock" --pool "$work/mnt/pool" \
    --kubelet-dir "$work/kubelet" --node-id bench --reserve 0 --log-level warn "$@" 2>>"$work/filevol.log" &
  driver=$!
  bench_pids+=("$driver")
  bench_wait_sockets "$work/csi.sock"
}
stop() { bench_stop "$driver"; }
client() { "$bin" client --endpoint "unix://$work/csi.sock" "$@" >/dev/null; }

# fio job -> MiB/s or IOPS
fio_run() { # dir name rw bs
  fio --name="$2" --directory="$1" --rw="$3" --bs="$4" --size=2G --direct=1 \
    --ioengine=libaio --iodepth=16 --numjobs=1 --time_based --runtime="$runtime" \
    --group_reporting --output-format=json >"$work/$2.json"
  python3 - "$work/$2.json" "$3" <<'PY'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
side = job["read"] if "read" in sys.argv[2] else job["write"]
print(f"{side['iops']:.0f}" if "rand" in sys.argv[2] else f"{side['bw'] / 1024:.0f}")
PY
  rm -f "$1/$2".*
}

jobs=("seq-write write 1M MiB/s" "seq-read read 1M MiB/s" "rand-read randread 4k IOPS" "rand-write randwrite 4k IOPS")
declare -A pool_result
for j in "${jobs[@]}"; do
  read -r name rw bs unit <<<"$j"
  pool_result[$name]=$(fio_run "$work/mnt/direct" "$name" "$rw" "$bs")
done

for dio in true false; do
  start --loop-direct-io="$dio"
  vol=$("$bin" client --endpoint "unix://$work/csi.sock" create-volume "datapath-$dio" --size 8Gi --fs-type ext4 |
    awk -F'"' '/volume_id/ {print $2; exit}')
  client stage "$vol" --staging-path "$work/kubelet/staging/$dio"
  client publish "$vol" --staging-path "$work/kubelet/staging/$dio" --target-path "$work/kubelet/pods/p/$dio"
  echo "| job (loop direct I/O $dio) | in the volume | on the pool filesystem | ratio |"
  echo "|---|---|---|---|"
  for j in "${jobs[@]}"; do
    read -r name rw bs unit <<<"$j"
    v=$(fio_run "$work/kubelet/pods/p/$dio" "$name" "$rw" "$bs")
    p=${pool_result[$name]}
    printf '| %s %s %s | %s | %s | %.2f |\n' "$name" "$bs" "$unit" "$v" "$p" "$(python3 -c "print($v / $p)")"
  done
  echo
  client unpublish "$vol" --target-path "$work/kubelet/pods/p/$dio"
  client unstage "$vol" --staging-path "$work/kubelet/staging/$dio"
  client delete-volume "$vol"
  stop
done
