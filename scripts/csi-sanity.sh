#!/usr/bin/env bash
# Runs the upstream CSI conformance suite, csi-sanity, against filevol:
# builds the release binary, makes a temporary pool on a loop-mounted xfs
# filesystem (reflink), starts `filevol serve --mode all` on it, and runs
# csi-sanity with every optional group on (node attach limit, expansion,
# mutable parameters), then a second pass with block volumes. Cleans up
# (driver, mounts, loop devices, files) however it ends, and exits with
# csi-sanity's status.
#
# csi-sanity comes from $CSI_SANITY or PATH. Build it from
# kubernetes-csi/csi-test (tag v5.3.1 builds with Go 1.19 from its vendored
# sources: `cd cmd/csi-sanity && go build`). Without it, or without root,
# this says so and exits 0 ("skipped").
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/scratch-fs.sh
source scripts/lib/scratch-fs.sh

sanity=${CSI_SANITY:-$(command -v csi-sanity || true)}
if [[ -z $sanity || ! -x $sanity ]]; then
  echo "csi-sanity: skipped: csi-sanity is not installed (set CSI_SANITY or put it on PATH;" \
       "build it from kubernetes-csi/csi-test v5.3.1: cd cmd/csi-sanity && go build)"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "csi-sanity: skipped: needs root (loop devices and mounts)"
  exit 0
fi

cargo build --release --locked --quiet
bin=${CARGO_TARGET_DIR:-$PWD/target}/release/filevol

work=$(mktemp -d /tmp/filevol-sanity.XXXXXX)
driver=""
cleanup() {
  # Best effort from here on: a failed kill or wait must not skip the rest.
  set +e
  [[ -n $driver ]] && kill "$driver" 2>/dev/null && wait "$driver" 2>/dev/null
  # Whatever the tests left under the kubelet directory, deepest first.
  scratch_cleanup "$work"
}
trap cleanup EXIT

scratch_fs "$work" 8G
mkdir -p "$work/kubelet"
mkdir "$work/mnt/pool"
printf 'thick: "true"\n' >"$work/mutable.yaml"

"$bin" serve --mode all --endpoint "unix://$work/csi.sock" --pool "$work/mnt/pool" \
  --node-id sanity-node --kubelet-dir "$work/kubelet" --reserve 0 --overcommit 100 \
  --max-volumes-per-node 8 --log-level warn 2>"$work/filevol.log" &
driver=$!
for _ in $(seq 100); do [[ -S $work/csi.sock ]] && break; sleep 0.1; done

status=0
for access in mount block; do
  echo "== csi-sanity, $access volumes"
  "$sanity" --csi.endpoint "$work/csi.sock" \
    --csi.mountdir "$work/kubelet/mount" --csi.stagingdir "$work/kubelet/staging" \
    --csi.testvolumesize $((64 << 20)) --csi.testvolumeexpandsize $((128 << 20)) \
    --csi.testnodevolumeattachlimit \
    --csi.testvolumemutableparameters "$work/mutable.yaml" \
    --csi.testvolumeaccesstype "$access" || status=$?
done
if [[ $status -ne 0 ]]; then
  echo "csi-sanity failed; the driver's log:" >&2
  tail -n 50 "$work/filevol.log" >&2
fi
exit "$status"
