#!/usr/bin/env bash
# Runs the upstream CSI conformance suite, csi-sanity, against filevol.
#
# For each pool filesystem the README promises conformance on, xfs (reflink:
# group snapshots advertised) and ext4 (no reflink: not advertised), it
# makes a temporary loop-mounted pool, starts `filevol serve --mode all` on
# it, and runs csi-sanity twice, with mount and with block volumes, every
# optional group turned on (node attach limit, expansion, mutable
# parameters). Cleans up (driver, mounts, loop devices, files) however it
# ends.
#
# The target is 0 failed and 0 skipped in every pass, but for the group
# snapshot specs on ext4 (skipped because the capability is, rightly, not
# advertised there); the one spec upstream marks pending is not run by
# csi-sanity at all. A pass with a failure, another skip or more than that
# one pending spec fails the script.
#
# The CSI v1.13 health calls are off for it (--volume-health=false): this
# csi-sanity is built against spec v1.12, and its capability specs fail on
# any value they do not know ("Unknown capability: 16", the v1.13
# GET_VOLUME_HEALTH). The v1.12 volume condition stays on, so its specs
# see VOLUME_CONDITION. Switching one wire off for a client that objects
# is what the flag is for (docs/src/health.md).
#
# csi-sanity comes from $CSI_SANITY, else ../shared/tools/csi-sanity (the
# prebuilt one beside this checkout). Without it, or without root, the
# script says it did not run and exits 0, except under CI (CI=true), where
# a conformance run that did not happen is a failure.
set -euo pipefail
cd "$(dirname "$0")/../.."
# shellcheck source=scripts/bench/lib.sh
source scripts/bench/lib.sh

not_run() {
  if [[ ${CI:-} == true ]]; then
    echo "csi-sanity: FAILED: $1 (CI=true: a conformance run that did not happen fails)" >&2
    exit 1
  fi
  echo "csi-sanity: NOT RUN: $1"
  exit 0
}

sanity=${CSI_SANITY:-../shared/tools/csi-sanity}
[[ -x $sanity ]] || not_run "no csi-sanity at $sanity (set CSI_SANITY)"
[[ $(id -u) -eq 0 ]] || not_run "needs root (loop devices and mounts)"

# FILEVOL_BIN: an existing binary to use (a packaged one, or one built
# before); else the release build of this checkout.
if [[ -n ${FILEVOL_BIN:-} ]]; then
  bin=$FILEVOL_BIN
else
  bin=$(scripts/package/build-release.sh --quiet)
fi

work=$(mktemp -d /tmp/filevol-sanity.XXXXXX)
driver=""
stop_driver() {
  if [[ -n $driver ]]; then
    kill "$driver" 2>/dev/null || true
    wait "$driver" 2>/dev/null || true
    driver=""
  fi
}
# shellcheck disable=SC2317 # the EXIT trap runs it; shellcheck 0.9 takes it for dead code
cleanup() {
  # Best effort from here on: a failed kill or wait must not skip the rest.
  set +e
  stop_driver
  # Whatever the tests left under the kubelet directory, deepest first.
  bench_cleanup "$work"
}
trap cleanup EXIT
printf 'thick: "true"\n' >"$work/mutable.yaml"

# check_summary LOG EXPECTED: the pass's ginkgo summary line must say 0
# failed and at most one pending, and the skipped specs must be exactly
# EXPECTED, "COUNT:REASON" (empty: none): COUNT of them, each skipped for
# REASON.
check_summary() {
  local text line passed failed pending skipped reasons want_count want_reason got_count other
  text=$(sed 's/\x1b\[[0-9;]*m//g' "$1")
  line=$(grep -E '[0-9]+ Passed \| [0-9]+ Failed \| [0-9]+ Pending \| [0-9]+ Skipped' <<<"$text" | tail -n 1)
  if [[ -z $line ]]; then
    echo "csi-sanity: no summary line in its output" >&2
    return 1
  fi
  read -r passed failed pending skipped < <(sed -E 's/.* ([0-9]+) Passed \| ([0-9]+) Failed \| ([0-9]+) Pending \| ([0-9]+) Skipped.*/\1 \2 \3 \4/' <<<"$line")
  echo "csi-sanity summary: $passed passed, $failed failed, $pending pending, $skipped skipped"
  # Ginkgo names each skipped spec's reason once: "  [SKIPPED] <reason>".
  reasons=$(sed -nE 's/^ *\[SKIPPED\] (.*)$/\1/p' <<<"$text" | grep -v '^in \[' || true)
  if [[ -n $reasons ]]; then
    echo "skipped because: $(sort -u <<<"$reasons" | paste -sd ';')"
  fi
  if ((failed > 0 || pending > 1)); then
    return 1
  fi
  want_count=${2%%:*}
  want_reason=${2#*:}
  [[ -n $2 ]] || want_count=0
  got_count=$(grep -cxF -- "$want_reason" <<<"$reasons" || true)
  other=$(grep -vxF -- "$want_reason" <<<"$reasons" | grep -v '^$' || true)
  if ((skipped != want_count)) || [[ -n $other ]] ||
    { ((skipped > 0)) && ((got_count != skipped)); }; then
    echo "expected ${want_count} skipped (${want_reason:-none}), got $skipped (reason lines: $got_count${other:+; other reasons: $other}): the target is no other skip" >&2
    return 1
  fi
}

# The only skips a pool explains: on ext4, which cannot reflink, filevol
# does not advertise GROUP_CONTROLLER_SERVICE, and csi-sanity skips the
# group snapshot specs for exactly that reason.
declare -A expected_skips=(
  [xfs]=""
  [ext4]="6:GroupControllerService not supported"
)

status=0
for fs in xfs ext4; do
  pass_dir=$work/$fs
  mkdir -p "$pass_dir"
  bench_scratch_pool "$pass_dir" 8G "$fs"
  mkdir -p "$pass_dir/kubelet" "$pass_dir/mnt/pool"
  "$bin" serve --mode all --endpoint "unix://$pass_dir/csi.sock" --pool "$pass_dir/mnt/pool" \
    --node-id sanity-node --kubelet-dir "$pass_dir/kubelet" --reserve 0 --overcommit 100 \
    --max-volumes-per-node 8 --volume-health=false --log-level warn 2>"$pass_dir/filevol.log" &
  driver=$!
  for _ in $(seq 100); do [[ -S $pass_dir/csi.sock ]] && break; sleep 0.1; done
  for access in mount block; do
    echo "== csi-sanity, $fs pool, $access volumes"
    pass_status=0
    # --ginkgo.v names every spec as it runs, and why a skipped one was.
    "$sanity" --ginkgo.v --csi.endpoint "$pass_dir/csi.sock" \
      --csi.mountdir "$pass_dir/kubelet/mount" --csi.stagingdir "$pass_dir/kubelet/staging" \
      --csi.testvolumesize $((64 << 20)) --csi.testvolumeexpandsize $((128 << 20)) \
      --csi.testnodevolumeattachlimit \
      --csi.testvolumemutableparameters "$work/mutable.yaml" \
      --csi.testvolumeaccesstype "$access" >"$pass_dir/$access.log" 2>&1 || pass_status=$?
    cat "$pass_dir/$access.log"
    check_summary "$pass_dir/$access.log" "${expected_skips[$fs]}" || pass_status=1
    if [[ $pass_status -ne 0 ]]; then
      echo "csi-sanity FAILED on the $fs pool with $access volumes; the driver's log:" >&2
      tail -n 50 "$pass_dir/filevol.log" >&2
      status=1
    fi
  done
  stop_driver
done
exit "$status"
