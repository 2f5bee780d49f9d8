#!/usr/bin/env bash
# filevol beside the reference driver, csi-driver-host-path, in one run on
# one machine: `filevol bench` drives each over its socket with the same
# load (whole lifecycles at concurrency 16: directory volumes, then block
# volumes) and reports lifecycles per second and the driver's peak RSS, and
# the ratios the README quotes.
#
# The reference driver is not part of this repository: build
# kubernetes-csi/csi-driver-host-path v1.15.0 yourself (with Go 1.19 from
# its vendored sources: `cd cmd/hostpathplugin && go build`) and point
# HOSTPATH_PLUGIN at the binary. Needs root (mounts, loop devices).
#   HOSTPATH_PLUGIN=/path/to/hostpathplugin scripts/bench-compare.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/scratch-fs.sh
source scripts/lib/scratch-fs.sh

hostpath=${HOSTPATH_PLUGIN:-}
if [[ -z $hostpath || ! -x $hostpath ]]; then
  echo "bench-compare: skipped: set HOSTPATH_PLUGIN to a csi-driver-host-path v1.15.0 hostpathplugin binary"
  exit 0
fi
[[ $(id -u) -eq 0 ]] || { echo "bench-compare: needs root" >&2; exit 1; }

volumes=${BENCH_VOLUMES:-200}
concurrency=${BENCH_CONCURRENCY:-16}
# FILEVOL_BIN: an existing binary to use (a packaged one, or one built
# before); else the release build of this checkout.
if [[ -n ${FILEVOL_BIN:-} ]]; then
  bin=$FILEVOL_BIN
else
  bin=$(scripts/build-release.sh --quiet)
fi

work=$(mktemp -d /tmp/filevol-compare.XXXXXX)
pids=()
cleanup() {
  # Best effort from here on: a failed kill or wait must not skip the rest.
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
  scratch_cleanup "$work"
}
trap cleanup EXIT

# Both drivers keep their volumes on the same xfs filesystem.
scratch_fs "$work" 32G
mkdir -p "$work/kubelet"
mkdir -p "$work/mnt/pool" "$work/mnt/hostpath"

"$bin" serve --endpoint "unix://$work/filevol.sock" --pool "$work/mnt/pool" \
  --kubelet-dir "$work/kubelet" --node-id bench --reserve 0 --overcommit 1000 \
  --log-level warn 2>"$work/filevol.log" &
pids+=($!); filevol_pid=$!
"$hostpath" --endpoint "unix://$work/hostpath.sock" --nodeid bench \
  --statedir "$work/mnt/hostpath" --enable-attach -v=0 2>"$work/hostpath.log" &
pids+=($!); hostpath_pid=$!
for _ in $(seq 100); do [[ -S $work/filevol.sock && -S $work/hostpath.sock ]] && break; sleep 0.1; done

bench() { # socket pid extra-args... -> JSON
  "$bin" bench --json --endpoint "unix://$work/$1" --pid "$2" --kubelet-dir "$work/kubelet" \
    --volumes "$volumes" --concurrency "$concurrency" "${@:3}"
}
field() { python3 -c "import json,sys; print(json.load(sys.stdin)$1)"; }

echo "| volumes | filevol lifecycles/s | host-path lifecycles/s | ratio |"
echo "|---|---|---|---|"
for kind in dir block; do
  if [[ $kind == dir ]]; then f_args=(--param layout=dir); h_args=(); else f_args=(--block); h_args=(--block); fi
  f=$(bench filevol.sock "$filevol_pid" "${f_args[@]}")
  h=$(bench hostpath.sock "$hostpath_pid" "${h_args[@]}")
  fr=$(field "['lifecycles_per_second']" <<<"$f")
  hr=$(field "['lifecycles_per_second']" <<<"$h")
  for r in "$f" "$h"; do
    errors=$(field "['errors']" <<<"$r")
    [[ $errors == "{}" ]] || echo "errors: $errors" >&2
  done
  printf '| %s (concurrency %s, %s each) | %.1f | %.1f | %.1fx |\n' "$kind" "$concurrency" "$volumes" "$fr" "$hr" \
    "$(python3 -c "print($fr / $hr)")"
done
f_rss=$(awk '/VmHWM/ {print $2}' "/proc/$filevol_pid/status")
h_rss=$(awk '/VmHWM/ {print $2}' "/proc/$hostpath_pid/status")
printf '\n| peak RSS after both runs | filevol %.1f MiB | host-path %.1f MiB | %.2f |\n' \
  "$(python3 -c "print($f_rss/1024)")" "$(python3 -c "print($h_rss/1024)")" "$(python3 -c "print($f_rss/$h_rss)")"
