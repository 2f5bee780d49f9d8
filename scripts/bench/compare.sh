#!/usr/bin/env bash
# filevol beside the reference driver, csi-driver-host-path, in one run on
# one machine: `filevol bench` drives each over its socket with the same
# load (whole lifecycles at concurrency 16: directory volumes, then block
# volumes; then filevol's ext4 image volumes, which the reference has no
# counterpart of) and reports lifecycles per second, the CPU each lifecycle
# cost (the driver with the tools it forked, the load generator, the rest
# of the machine: kernel threads), the driver's peak RSS, and the ratios
# the book quotes (docs/src/performance.md).
#
# This machine's speed drifts by about 2x within an hour, so the load runs
# BENCH_RUNS times (default 3), each run measuring both drivers back to
# back, and the ratio is the median of the runs' ratios. CPU per lifecycle
# is the stable figure.
#
# The reference driver is not part of this repository. By default the
# prebuilt csi-driver-host-path v1.18.0 in ../shared/tools/ is used; point
# HOSTPATH_PLUGIN at another hostpathplugin binary to use that one. Under CI
# (CI=true) a missing reference is a failure, not a skip. Needs root
# (mounts, loop devices).
#   scripts/bench/compare.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/lib.sh
source scripts/bench/lib.sh

hostpath=${HOSTPATH_PLUGIN:-../shared/tools/hostpathplugin}
if [[ ! -x $hostpath ]]; then
  echo "bench/compare: no hostpathplugin at $hostpath: set HOSTPATH_PLUGIN to a csi-driver-host-path hostpathplugin binary" >&2
  [[ ${CI:-} == true ]] && exit 1
  exit 0
fi
bench_need_root

volumes=${BENCH_VOLUMES:-200}
concurrency=${BENCH_CONCURRENCY:-16}
runs=${BENCH_RUNS:-3}
# FILEVOL_BIN: an existing binary to use (a packaged one, or one built
# before); else the release build of this checkout. BENCH_CLIENT: the
# binary whose `bench` drives the load (default: the same one), so an older
# driver can be measured by today's load generator.
bin=$(bench_binary)
client=${BENCH_CLIENT:-$bin}

bench_work compare

# Both drivers keep their volumes on the same xfs filesystem.
bench_scratch_pool "$work" 32G
mkdir -p "$work/kubelet"
mkdir -p "$work/mnt/pool" "$work/mnt/hostpath"

"$bin" serve --endpoint "unix://$work/filevol.sock" --pool "$work/mnt/pool" \
  --kubelet-dir "$work/kubelet" --node-id bench --reserve 0 --overcommit 1000 \
  --log-level warn 2>"$work/filevol.log" &
bench_pids+=($!); filevol_pid=$!
"$hostpath" --endpoint "unix://$work/hostpath.sock" --nodeid bench \
  --statedir "$work/mnt/hostpath" --enable-attach -v=0 2>"$work/hostpath.log" &
bench_pids+=($!); hostpath_pid=$!
bench_wait_sockets "$work/filevol.sock" "$work/hostpath.sock"

bench() { # socket pid extra-args... -> JSON
  "$client" bench --json --endpoint "unix://$work/$1" --pid "$2" --kubelet-dir "$work/kubelet" \
    --volumes "$volumes" --concurrency "$concurrency" "${@:3}"
}

# One JSON line per measurement: {kind, driver, run, report}.
results=$work/results.jsonl
# Image volumes last, so the peak RSS after the runs the reference has a
# counterpart of can be read before them.
for kinds in "dir block" image; do
for run in $(seq "$runs"); do
  for kind in $kinds; do
    case $kind in
      dir) f_args=(--param layout=dir); h_args=() ;;
      block) f_args=(--block); h_args=(--block) ;;
      image) f_args=(--fs-type ext4); h_args=() ;;
    esac
    for driver in filevol hostpath; do
      [[ $kind == image && $driver == hostpath ]] && continue
      if [[ $driver == filevol ]]; then
        r=$(bench filevol.sock "$filevol_pid" "${f_args[@]}")
      else
        r=$(bench hostpath.sock "$hostpath_pid" "${h_args[@]}")
      fi
      python3 -c 'import json,sys; print(json.dumps({"kind": sys.argv[1], "driver": sys.argv[2], "run": int(sys.argv[3]), "report": json.loads(sys.stdin.read())}))' \
        "$kind" "$driver" "$run" <<<"$r" >>"$results"
    done
  done
done
if [[ $kinds != image ]]; then
  f_rss_shared=$(awk '/VmHWM/ {print $2}' "/proc/$filevol_pid/status")
  h_rss_shared=$(awk '/VmHWM/ {print $2}' "/proc/$hostpath_pid/status")
fi
done

python3 - "$results" "$filevol_pid" "$hostpath_pid" "$volumes" "$concurrency" "$f_rss_shared" "$h_rss_shared" <<'EOF'
import json, statistics, sys

path, filevol_pid, hostpath_pid, volumes, concurrency, f_shared, h_shared = sys.argv[1:]
rows = [json.loads(line) for line in open(path)]
failed = [r for r in rows if r["report"]["errors"]]
for r in failed:
    print(f"errors ({r['driver']}, {r['kind']}, run {r['run']}): {r['report']['errors']}", file=sys.stderr)

def hwm(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

def cpu(r, who):
    c = r["report"].get("cpu_ms_per_lifecycle") or {}
    v = c.get(who)
    return "-" if v is None else f"{v:.2f}"

print(f"| {volumes} lifecycles at concurrency {concurrency} | run | filevol lifecycles/s | host-path lifecycles/s | ratio | CPU ms per lifecycle, filevol: driver / client / rest | host-path: driver / client / rest |")
print("|---|---|---|---|---|---|---|")
for kind in ("dir", "block", "image"):
    ratios = []
    for run in sorted({r["run"] for r in rows}):
        f = next(r for r in rows if r["kind"] == kind and r["driver"] == "filevol" and r["run"] == run)
        h = next((r for r in rows if r["kind"] == kind and r["driver"] == "hostpath" and r["run"] == run), None)
        fr = f["report"]["lifecycles_per_second"]
        if h:
            hr = h["report"]["lifecycles_per_second"]
            ratios.append(fr / hr)
            hcols = (f"{hr:.1f}", f"{fr / hr:.1f}x", f"{cpu(h, 'server')} / {cpu(h, 'client')} / {cpu(h, 'other')}")
        else:
            hcols = ("-", "-", "-")
        print(f"| {kind} | {run} | {fr:.1f} | {hcols[0]} | {hcols[1]} | {cpu(f, 'server')} / {cpu(f, 'client')} / {cpu(f, 'other')} | {hcols[2]} |")
    if ratios:
        print(f"| {kind} | median | | | **{statistics.median(ratios):.1f}x** | | |")
    else:
        rates = [r["report"]["lifecycles_per_second"] for r in rows if r["kind"] == kind]
        print(f"| {kind} | median | **{statistics.median(rates):.1f}** | | | | |")
f_rss, h_rss = hwm(filevol_pid), hwm(hostpath_pid)
f_shared, h_shared = int(f_shared) / 1024, int(h_shared) / 1024
print("\n| peak RSS of the driver | filevol | host-path | ratio |")
print("|---|---|---|---|")
print(f"| after the dir and block runs | {f_shared:.1f} MiB | {h_shared:.1f} MiB | {f_shared / h_shared:.2f} |")
print(f"| after the image runs too | {f_rss:.1f} MiB | | |")
sys.exit(1 if failed else 0)
EOF
