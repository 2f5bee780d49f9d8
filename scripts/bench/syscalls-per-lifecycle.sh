#!/usr/bin/env bash
# The system calls one volume lifecycle costs the driver (create,
# controller publish, stage, publish, unpublish, unstage, controller
# unpublish, delete), by layout: `strace -f -c` attached to `filevol serve`
# while `filevol bench` runs BENCH_VOLUMES lifecycles one at a time, each
# count divided by the lifecycles. The figures in README.md (Performance)
# come from here. Needs root and strace.
#   scripts/bench/syscalls-per-lifecycle.sh            # this checkout's release build
#   FILEVOL_BIN=/path/to/filevol scripts/bench/syscalls-per-lifecycle.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/lib.sh
source scripts/bench/lib.sh

[[ $(id -u) -eq 0 ]] || { echo "syscalls-per-lifecycle: needs root" >&2; exit 1; }
command -v strace >/dev/null || { echo "syscalls-per-lifecycle: needs strace" >&2; exit 1; }
volumes=${BENCH_VOLUMES:-50}
if [[ -n ${FILEVOL_BIN:-} ]]; then
  bin=$FILEVOL_BIN
else
  bin=$(scripts/package/build-release.sh --quiet)
fi
client=${BENCH_CLIENT:-$bin}

work=$(mktemp -d /tmp/filevol-syscalls.XXXXXX)
pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  scratch_cleanup "$work"
}
trap cleanup EXIT

scratch_fs "$work" 8G
mkdir -p "$work/kubelet" "$work/mnt/pool"
"$bin" serve --endpoint "unix://$work/filevol.sock" --pool "$work/mnt/pool" \
  --kubelet-dir "$work/kubelet" --node-id bench --reserve 0 --overcommit 1000 \
  --log-level warn 2>"$work/filevol.log" &
pids+=($!); server=$!
for _ in $(seq 100); do [[ -S $work/filevol.sock ]] && break; sleep 0.1; done

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
