#!/usr/bin/env bash
# The system calls one volume lifecycle costs the driver (create,
# controller publish, stage, publish, unpublish, unstage, controller
# unpublish, delete), by layout: `strace -f -c` attached to `filevol serve`
# while `filevol bench` runs BENCH_VOLUMES lifecycles one at a time, each
# count divided by the lifecycles. The figures in docs/src/performance.md
# come from here. Needs root and strace.
#   scripts/bench/syscalls-per-lifecycle.sh            # this checkout's release build
#   FILEVOL_BIN=/path/to/filevol scripts/bench/syscalls-per-lifecycle.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/lib.sh
source scripts/bench/lib.sh

bench_need_root
command -v strace >/dev/null || { echo "bench/syscalls-per-lifecycle: needs strace" >&2; exit 1; }
volumes=${BENCH_VOLUMES:-50}
bin=$(bench_binary)
client=${BENCH_CLIENT:-$bin}

bench_work syscalls

bench_scratch_pool "$work" 8G
mkdir -p "$work/kubelet" "$work/mnt/pool"
"$bin" serve --endpoint "unix://$work/filevol.sock" --pool "$work/mnt/pool" \
  --kubelet-dir "$work/kubelet" --node-id bench --reserve 0 --overcommit 1000 \
  --log-level warn 2>"$work/filevol.log" &
bench_pids+=($!); server=$!
bench_wait_sockets "$work/filevol.sock"

for kind in dir block image; do
  case $kind in
    dir) args=(--param layout=dir) ;;
    block) args=(--block) ;;
    image) args=(--fs-type ext4) ;;
  esac
  strace -f -c -o "$work/strace-$kind.txt" -p "$server" 2>/dev/null &
  tracer=$!
  sleep 0.5
  "$client" bench --endpoint "unix://$work/filevol.sock" --kubelet-dir "$work/kubelet" \
    --volumes "$volumes" --concurrency 1 "${args[@]}" >/dev/null
  kill -INT "$tracer"; wait "$tracer" || true
done

python3 - "$work" "$volumes" <<'EOF'
import re, sys
work, volumes = sys.argv[1], int(sys.argv[2])
per = {}
for kind in ("dir", "block", "image"):
    counts = {}
    for line in open(f"{work}/strace-{kind}.txt"):
        f = line.split()
        # % time, seconds, usecs/call, calls, [errors], syscall
        if len(f) >= 5 and re.fullmatch(r"[\d.]+", f[0]) and f[-1] != "total":
            calls = int(f[3])
            errors = int(f[4]) if len(f) == 6 else 0
            counts[f[-1]] = (calls, errors)
    per[kind] = counts
names = sorted({n for c in per.values() for n in c},
               key=lambda n: -max(per[k].get(n, (0, 0))[0] for k in per))
def cell(kind, name):
    calls, errors = per[kind].get(name, (0, 0))
    if not calls:
        return ""
    s = f"{calls / volumes:.1f}"
    return s + (f" ({errors / volumes:.1f} failed)" if errors else "")
print(f"| system call, per lifecycle ({volumes} lifecycles, concurrency 1) | dir | block | image (ext4) |")
print("|---|---|---|---|")
for kind_total in ("total",):
    print("| **all** | " + " | ".join(f"{sum(c for c, _ in per[k].values()) / volumes:.1f}" for k in per) + " |")
for n in names:
    print(f"| {n} | " + " | ".join(cell(k, n) for k in per) + " |")
EOF
