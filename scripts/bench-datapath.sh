#!/usr/bin/env bash
# Data-path throughput: the same fio jobs inside a mounted filevol image
# volume and directly on the pool filesystem it lives on, with direct I/O,
# as a ratio; then again with the loop device's direct I/O turned off
# (`--loop-direct-io=false`: the image is read through the page cache).
# Needs root; installs fio (Debian package) if missing.
#   scripts/bench-datapath.sh            (BENCH_RUNTIME=15 seconds per job)
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) -eq 0 ]] || { echo "bench-datapath: needs root" >&2; exit 1; }
command -v fio >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio >/dev/null; }

runtime=${BENCH_RUNTIME:-15}
cargo build --release --locked --quiet
bin=$PWD/target/release/filevol

work=$(mktemp -d /tmp/filevol-datapath.XXXXXX)
driver=""
cleanup() {
  [[ -n $driver ]] && kill "$driver" 2>/dev/null && wait "$driver" 2>/dev/null
  awk -v d="$work/" 'index($5, d) == 1 {print length($5), $5}' /proc/self/mountinfo |
    sort -rn | cut -d' ' -f2- | while read -r m; do umount -l "$m" 2>/dev/null || true; done
  for f in /sys/block/loop*/loop/backing_file; do
    [[ -r $f ]] && grep -q "^$work/" "$f" 2>/dev/null &&
      losetup -d "/dev/$(basename "$(dirname "$(dirname "$f")")")" 2>/dev/null
  done
  umount "$work/mnt" 2>/dev/null || umount -l "$work/mnt" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

truncate -s 16G "$work/fs.img"
mkfs.xfs -q -m reflink=1 "$work/fs.img"
mkdir -p "$work/mnt" "$work/kubelet/staging" "$work/kubelet/pods/p"
mount -o loop "$work/fs.img" "$work/mnt"
mkdir -p "$work/mnt/pool" "$work/mnt/direct"

start() { # extra serve flags
  "$bin" serve --endpoint "unix://$work/csi.sock" --pool "$work/mnt/pool" \
    --kubelet-dir "$work/kubelet" --node-id bench --reserve 0 --log-level warn "$@" 2>>"$work/filevol.log" &
  driver=$!
  for _ in $(seq 100); do [[ -S $work/csi.sock ]] && break; sleep 0.1; done
}
stop() { kill "$driver"; wait "$driver" 2>/dev/null || true; driver=""; }
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
