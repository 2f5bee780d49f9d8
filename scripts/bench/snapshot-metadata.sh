#!/usr/bin/env bash
# Changed-block tracking, filevol beside the reference driver
# (csi-driver-host-path's SnapshotMetadata service, a byte-by-byte compare)
# on the same data, on one xfs pool (reflink) on a loop device:
#
#   1. a 16 GiB block volume in each driver, its first half written (8 GiB);
#   2. snapshot A;
#   3. 1% of the volume's blocks rewritten in scattered 64 KiB runs (2,621
#      runs at the same seeded offsets in both), snapshot B;
#   4. GetMetadataAllocated(A) and GetMetadataDelta(A, B), each after
#      dropping the page cache, read to the end by `filevol client`, which
#      checks every message against the spec.
#
# For each call: wall time, the driver's CPU time, bytes it read from disk
# (/proc/PID/io read_bytes) and through read(2) (rchar), its peak RSS during
# the call (VmHWM after resetting it), and the ranges returned.
#
#   HOSTPATH_PLUGIN=../shared/tools/hostpathplugin scripts/bench/snapshot-metadata.sh
# Needs root. BENCH_CBT_GIB sets the volume size (default 16).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/lib.sh
source scripts/bench/lib.sh

hostpath=${HOSTPATH_PLUGIN:-../shared/tools/hostpathplugin}
[[ -x $hostpath ]] || { echo "bench/snapshot-metadata: no reference driver at $hostpath (set HOSTPATH_PLUGIN)" >&2; exit 1; }
bench_need_root
gib=${BENCH_CBT_GIB:-16}
bin=$(bench_binary)

bench_work cbt

# Room for two volumes' data, their snapshots' rewritten blocks, and the
# reference driver's fallocated (fully allocated) volume.
bench_scratch_pool "$work" "$((gib * 3 + 8))G"
mkdir -p "$work/mnt/pool" "$work/mnt/hostpath"

"$bin" serve --mode controller --pool "$work/mnt/pool" --node-id bench \
  --endpoint "unix://$work/filevol.sock" --log-level warn 2>"$work/filevol.log" &
bench_pids+=($!)
filevol_pid=$!
"$hostpath" --endpoint "unix://$work/hostpath.sock" --nodeid bench \
  --statedir "$work/mnt/hostpath" --enable-snapshot-metadata \
  --v=0 2>"$work/hostpath.log" &
bench_pids+=($!)
hostpath_pid=$!

python3 scripts/bench/cbt_bench.py \
  --filevol "$bin" --gib "$gib" \
  --driver "filevol=$filevol_pid=unix://$work/filevol.sock=$work/mnt/pool/volumes/{id}/image" \
  --driver "hostpath v1.18.0=$hostpath_pid=unix://$work/hostpath.sock=$work/mnt/hostpath/{id}"
