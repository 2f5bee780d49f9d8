#!/usr/bin/env bash
# What giving freed space back costs, on one xfs pool on a loop device, in
# the layout deploy/ ships (a node plugin started first, then a controller):
#
#   1. 100 staged ext4 volumes, 16 MiB written and deleted in each;
#   2. one trim pass over them (`filevol trim`: the periodic pass's work),
#      then a second with nothing freed since: wall time, the node plugin's
#      CPU and the whole machine's (the kernel's discard and punch work);
#   3. the time from a delete to the first byte given back to the pool,
#      with online discard (`discard=true`) and with a trim right after.
#
#   scripts/bench/trim.sh
# Needs root. BENCH_TRIM_VOLUMES sets the volume count (default 100).
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/lib.sh
source scripts/bench/lib.sh

bench_need_root
volumes=${BENCH_TRIM_VOLUMES:-100}
bin=$(bench_binary)

bench_work trim

bench_scratch_pool "$work" 8G
mkdir -p "$work/mnt/pool" "$work/kubelet"
common=(--pool "$work/mnt/pool" --node-id bench --kubelet-dir "$work/kubelet"
  --reserve 0 --overcommit 10 --log-level warn)
# No periodic trims during the measurement: only the passes asked for.
"$bin" serve --mode node "${common[@]}" --trim-interval 0 \
  --endpoint "unix://$work/node.sock" 2>"$work/node.log" &
bench_pids+=($!)
node_pid=$!
"$bin" serve --mode controller "${common[@]}" \
  --endpoint "unix://$work/controller.sock" 2>"$work/controller.log" &
bench_pids+=($!)
bench_wait_sockets "$work/node.sock" "$work/controller.sock"

python3 scripts/bench/trim_bench.py --filevol "$bin" \
  --node "unix://$work/node.sock" --controller "unix://$work/controller.sock" \
  --node-pid "$node_pid" --pool "$work/mnt/pool" --kubelet "$work/kubelet" \
  --volumes "$volumes"
