#!/usr/bin/env bash
# End to end on a real Kubernetes: every layout of deploy/kubernetes, applied
# as shipped through a test-only overlay, driven by the real kubelet and the
# pinned CSI sidecars with PVCs and pods.
#
# ../shared/tools/k8s brings up a single-node Kubernetes v1.36 on this host
# (no registry, no pod network). So this script:
# - builds local OCI images: filevol on a Debian root filesystem with the
#   mkfs tools (mmdebstrap, from Debian's packages), and one image per
#   sidecar from the prebuilt binaries there; imports them into containerd;
# - renders each layout through an overlay that only adapts it to this
#   cluster: local images (imagePullPolicy Never), hostNetwork with the API
#   server at 127.0.0.1:6443, node metrics moved off the controller's port,
#   one controller replica (two on one host's network would share ports),
#   and without the health-monitor sidecar, of which no binary is at hand;
#   for shared-pool, FILEVOL_ALLOW_HOST_LOCAL_LOCKS=true: its "share" is a
#   local xfs whose locks reach only this host, which the driver otherwise
#   refuses for a shared pool (every process of it runs on this one host);
# - gives the layout its pool: /var/lib/filevol (base and node-local) or
#   /mnt/filevol/pool (shared-pool), on a loop-mounted xfs;
# - runs the scenarios below and checks that deleting everything leaves
#   nothing in the pool, no mount and no loop device.
#
# Scenarios per layout: data written and read back; the pod replaced on
# the same claim (restaged, never reformatted); fsGroup; ReadWriteOncePod
# (a second pod stays pending); expansion (not in node-local, which has no
# resizer); snapshot and restore; clone; deletion. The base layout also
# refuses a CSI ephemeral inline volume (off by default). The
# ephemeral-inline layout (base with them on) runs only the inline volume
# scenarios: one made, written and gone with its pod; one larger than
# --ephemeral-max-size refused with the reason in the pod's events.
#
# The layout shared-pool-2n is shared-pool as shipped (two controller
# replicas) on two nodes: a second node joins the cluster
# (scripts/check/e2e-node2.sh says how), and after the scenarios above the
# two-node ones run (scripts/check/e2e-two-nodes.sh): a pod moving between
# nodes, a second node kept off a ReadWriteOnce volume, a ReadWriteMany
# directory written from both, a snapshot restored on the other node, the
# leader replica deleted; with E2E_FULL=1 also a node lost with a pod
# writing. The single-node shared-pool layout is the same overlay and is
# left to a run that names it.
#
# The kubelet runs with the CSIVolumeHealth feature gate, and the base
# layout shows it reading filevol's volume condition (a filesystem error
# made in a pod's volume becomes a VolumeConditionAbnormal event).
#
# Time on the 2-core machine: base about 3 minutes, shared-pool-2n about
# 6 (E2E_FULL=1: about 9), node-local about 1, plus about 40 s to build
# the images and start the cluster; the Debian root filesystem is built
# once (about 1 minute) and kept in target/e2e. Online expansion is the
# slowest step (kubelet retries node expansion on its own period).
#
# Usage: scripts/check/e2e-k8s.sh [layout...]
#   (default: base shared-pool-2n node-local ephemeral-inline)
# FILEVOL_BIN: the binary to ship (default: a release build).
# E2E_KEEP=1: leave the cluster and the pool up after a failure, to look.
# E2E_FULL=1: the long two-node scenarios too (CONTRIBUTING.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
repo=$PWD

K8S=$repo/../shared/tools/k8s
fail_or_skip() {
  if [[ ${CI:-} == true ]]; then
    echo "e2e-k8s: $1 (CI=true: failing)" >&2
    exit 1
  fi
  echo "e2e-k8s: skipped: $1" >&2
  exit 0
}
[[ $(id -u) -eq 0 ]] || fail_or_skip "needs root (a cluster, loop devices, mounts)"
[[ -x $K8S/up.sh ]] || fail_or_skip "no $K8S (the single-node Kubernetes of the shared tools)"

layouts=("$@")
((${#layouts[@]})) || layouts=(base shared-pool-2n node-local ephemeral-inline)

W=$repo/target/e2e
mkdir -p "$W/images"
export K8S_BASE=${K8S_BASE:-/tmp/k8s-test}
export KUBECONFIG=$K8S_BASE/cluster/admin.kubeconfig
export PATH=$K8S_BASE/bin:$PATH
CTR=(ctr --address /run/k8s-test/containerd.sock -n k8s.io)
log() { echo "[e2e $(date +%T)] $*"; }
# shellcheck source=scripts/check/e2e-node2.sh
source "$repo/scripts/check/e2e-node2.sh"
# shellcheck source=scripts/check/e2e-two-nodes.sh
source "$repo/scripts/check/e2e-two-nodes.sh"

# ---------- images ----------
if [[ -z ${FILEVOL_BIN:-} ]]; then
  FILEVOL_BIN=$("$repo/scripts/package/build-release.sh")
fi
# mmdebstrap builds the image's root filesystem; python3-yaml adapts the
# rendered manifests.
need=()
for p in mmdebstrap python3-yaml xz-utils socat; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if ((${#need[@]})); then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The root filesystem depends only on its package list: built once.
packages=e2fsprogs,xfsprogs,btrfs-progs,util-linux,mount
rootfs=$W/rootfs-$(echo "$packages" | sha256sum | cut -c1-12).tar
if [[ ! -f $rootfs ]]; then
  log "building the filevol root filesystem ($packages)"
  mmdebstrap --quiet --variant=essential --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    bookworm "${rootfs%.tar}.partial.tar"
  mv "${rootfs%.tar}.partial.tar" "$rootfs"
fi
python3 scripts/package/oci.py --layer "$W/filevol-layer.tar" "$FILEVOL_BIN=/usr/local/bin/filevol"
python3 scripts/package/oci.py "$W/images/filevol.tar" localhost/filevol-e2e/filevol:test \
  --entrypoint /usr/local/bin/filevol "$rootfs" "$W/filevol-layer.tar" >/dev/null

# Sidecars: a static binary each, as the images the manifests name ship them.
declare -A sidecar_tags=(
  [csi-provisioner]=v6.3.0 [csi-attacher]=v4.12.0 [csi-snapshotter]=v8.6.0
  [csi-resizer]=v2.2.1 [csi-node-driver-registrar]=v2.17.0 [livenessprobe]=v2.19.0
)
for name in "${!sidecar_tags[@]}"; do
  out=$W/images/$name.tar
  [[ -f $out && $out -nt $K8S/bin/$name.xz ]] && continue
  xz -dc "$K8S/bin/$name.xz" >"$W/$name"
  python3 scripts/package/oci.py --layer "$W/$name-layer.tar" "$W/$name=/$name"
  python3 scripts/package/oci.py "$out" "localhost/filevol-e2e/$name:${sidecar_tags[$name]}" \
    --entrypoint "/$name" "$W/$name-layer.tar" >/dev/null
  rm -f "$W/$name" "$W/$name-layer.tar"
done

# ---------- the cluster ----------
log "starting Kubernetes"
"$K8S/up.sh" >"$W/up.log" 2>&1 || { tail -20 "$W/up.log"; exit 1; }
for image in "$W"/images/*.tar; do
  "${CTR[@]}" images import "$image" >/dev/null
done
kubectl apply -k "$K8S/crds" >/dev/null
kubectl label node localhost filevol.csi.rs/pool=local --overwrite >/dev/null

# kubelet again, with the CSIVolumeHealth feature gate (alpha): it reads the
# volume condition of NodeGetVolumeStats (the v1.12 wire) and says an
# abnormal one in a VolumeConditionAbnormal event on the pod, every
# volumeStatsAggPeriod (10 s here, 1 minute by default). Same command line,
# its config with the two settings added; its pods stay.
kubelet_with_health_gate() {
  local run=/run/k8s-test cluster=${K8S_WORK:-/tmp/k8s-test/cluster} pid arg
  pid=$(cat "$run/kubelet.pid")
  local -a cmd=()
  while IFS= read -r -d '' arg; do
    [[ $arg == --config=* ]] && arg=--config=$W/kubelet-health.yaml
    cmd+=("$arg")
  done </proc/"$pid"/cmdline
  { cat "$cluster/kubelet-config.yaml"; printf '%s\n' 'featureGates: {CSIVolumeHealth: true}' 'volumeStatsAggPeriod: 10s'; } \
    >"$W/kubelet-health.yaml"
  kill "$pid"
  wait_for "the kubelet to stop" 60 sh -c "! kill -0 $pid 2>/dev/null"
  setsid "${cmd[@]}" >>"$cluster/logs/kubelet.log" 2>&1 </dev/null &
  echo $! >"$run/kubelet.pid"
  wait_for "kubelet healthz" 120 curl -fsS http://127.0.0.1:10248/healthz
  wait_for "node localhost Ready" 120 sh -c "kubectl get node localhost -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
}

pool_fs=$W/pool.img
pool_mnt=$W/pool-fs
snapshot_controller_pid=
cleanup() {
  local status=$?
  set +e
  stop_snapshot_controller
  if [[ -n ${E2E_KEEP:-} ]]; then
    echo "e2e-k8s: E2E_KEEP set: the cluster and the pool stay up" >&2
    exit "$status"
  fi
  for layout in "${layouts[@]}"; do
    [[ -f $W/$layout.yaml ]] && kubectl delete -f "$W/$layout.yaml" --ignore-not-found --wait=true --timeout=120s >/dev/null 2>&1
  done
  scheduler_resume
  node2_down
  # --wipe: the next run starts from an empty cluster, whatever this one left.
  "$K8S/down.sh" --wipe >"$W/down.log" 2>&1
  detach_pool_images
  unmount_pool
  exit "$status"
}
trap cleanup EXIT

# snapshot-controller v8.6.0, as a process beside the cluster (the layouts
# do not ship it: a cluster has one). Distributed snapshotting is what the
# node-local layout's snapshotter needs; it leaves central ones alone.
stop_snapshot_controller() {
  if [[ -n $snapshot_controller_pid ]]; then
    kill "$snapshot_controller_pid" 2>/dev/null || true
    wait "$snapshot_controller_pid" 2>/dev/null || true
    snapshot_controller_pid=
  fi
}
start_snapshot_controller() {
  stop_snapshot_controller
  # One left by a run that was stopped would label nothing for node
  # deployments and race this one.
  pkill -f "^snapshot-controller --kubeconfig=$KUBECONFIG" || true
  snapshot-controller --kubeconfig="$KUBECONFIG" --leader-election=false "$@" >>"$W/snapshot-controller.log" 2>&1 &
  snapshot_controller_pid=$!
}

# ---------- helpers ----------
ns=filevol-e2e
wait_for() { # what seconds command...
  local what=$1 t=$2 i
  shift 2
  for ((i = 0; i < t; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  echo "e2e-k8s: timed out after ${t}s waiting for $what" >&2
  return 1
}
phase() { kubectl -n "$ns" get pod "$1" -o jsonpath='{.status.phase}' 2>/dev/null; }
pod_done() { [[ $(phase "$1") == Succeeded ]]; }
pvc_bound() { [[ $(kubectl -n "$ns" get pvc "$1" -o jsonpath='{.status.phase}') == Bound ]]; }
none_left() { # [-n NAMESPACE] RESOURCE: kubectl lists none
  [[ -z $(kubectl get "$@" -o name 2>/dev/null) ]]
}
snapshot_ready() { [[ $(kubectl -n "$ns" get volumesnapshot "$1" -o jsonpath='{.status.readyToUse}') == true ]]; }

# pvc NAME CLASS SIZE [MODE] [extra spec lines]
pvc() {
  local name=$1 class=$2 size=$3 mode=${4:-ReadWriteOnce} extra=${5:-}
  kubectl -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: $name}
spec:
  accessModes: [$mode]
  storageClassName: $class
  resources: {requests: {storage: $size}}
$extra
EOF
}

json_string() { python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }

# pod NAME CLAIM SCRIPT [securityContext yaml] [NODE] : runs SCRIPT with
# the volume at /data and exits; on node NODE if given (the scheduler
# places it there: nodeSelector, not nodeName, so claims waiting for their
# first consumer are bound as usual).
pod() {
  local name=$1 claim=$2 script=$3 sc=${4:-"{}"} node=${5:-}
  local selector=
  [[ -n $node ]] && selector="nodeSelector: {kubernetes.io/hostname: $node}"
  kubectl -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name}
spec:
  hostNetwork: true
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  securityContext: $sc
  $selector
  containers:
    - name: c
      image: localhost/k8s-test/busybox:1.35
      imagePullPolicy: Never
      command: ["/bin/sh", "-c", $(json_string "$script")]
      volumeMounts: [{name: v, mountPath: /data}]
  volumes: [{name: v, persistentVolumeClaim: {claimName: $claim}}]
EOF
}

# inline_pod NAME SIZE SCRIPT : runs SCRIPT with a CSI ephemeral inline
# volume of SIZE at /data and exits.
inline_pod() {
  local name=$1 size=$2 script=$3
  kubectl -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name}
spec:
  hostNetwork: true
  restartPolicy: Never
  containers:
    - name: c
      image: localhost/k8s-test/busybox:1.35
      imagePullPolicy: Never
      command: ["/bin/sh", "-c", $(json_string "$script")]
      volumeMounts: [{name: v, mountPath: /data}]
  volumes:
    - name: v
      csi: {driver: filevol.csi.rs, fsType: ext4, volumeAttributes: {size: "$size"}}
EOF
}
# pod_events NAME [REASON]: the messages of the events of pod NAME.
# A volume kubelet watches turns abnormal (ext4 records an error, through
# the kernel's test hook): filevol's volume condition says so and kubelet,
# with CSIVolumeHealth, puts it in an event on the pod.
kubelet_reads_the_condition() { # layout
  pvc watched filevol 64Mi
  pod watcher watched 'sleep 600'
  wait_for "pod watcher running" 120 sh -c "[ \"\$(kubectl -n $ns get pod watcher -o jsonpath='{.status.phase}')\" = Running ]"
  local handle image dev
  handle=$(kubectl get pv "$(kubectl -n "$ns" get pvc watched -o jsonpath='{.spec.volumeName}')" -o jsonpath='{.spec.csi.volumeHandle}')
  image=$(pool_for "$1")/volumes/$handle/image
  dev=$(losetup -j "$image" -n -O NAME | head -n 1)
  sleep 15
  expect "$1: kubelet sees a healthy volume as such" "$(pod_events watcher VolumeConditionAbnormal)" ""
  echo 1 >"/sys/fs/ext4/$(basename "$dev")/trigger_fs_error"
  wait_for "kubelet's VolumeConditionAbnormal event" 90 event_mentions watcher filesystem_errors
  expect "$1: kubelet reports the volume condition (filesystem_errors)" \
    "$(pod_events watcher VolumeConditionAbnormal | grep -c filesystem_errors || true)" 1
  kubectl -n "$ns" delete pod watcher --wait=true --grace-period=1 >/dev/null
}

pod_events() {
  local selector=involvedObject.name=$1
  [[ -n ${2:-} ]] && selector+=,reason=$2
  kubectl -n "$ns" get events --field-selector "$selector" -o jsonpath='{.items[*].message}'
}
pool_volumes() { # layout: how many volumes its pool holds
  find "$(pool_for "$1")/volumes" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l
}
no_pool_volumes() { [[ $(pool_volumes "$1") -eq 0 ]]; }
has_event() { [[ -n $(pod_events "$@") ]]; }          # POD [REASON]
event_mentions() { pod_events "$1" | grep -q -- "$2"; } # POD TEXT

# What a pod printed. The API server cannot reach node 2's kubelet
# (scripts/check/e2e-node2.sh), so node 2's pods are read from their log
# files (the CRI format: time, stream, tag, text).
pod_output() { # NAME
  local node uid
  node=$(kubectl -n "$ns" get pod "$1" -o jsonpath='{.spec.nodeName}')
  if [[ $node == "$N2" ]]; then
    uid=$(kubectl -n "$ns" get pod "$1" -o jsonpath='{.metadata.uid}')
    cat "$D2/log-pods/${ns}_$1_$uid"/c/*.log 2>/dev/null | cut -d' ' -f4-
  else
    kubectl -n "$ns" logs "$1"
  fi
}

run_pod() { # NAME CLAIM SCRIPT [securityContext] [NODE]: runs and prints its output
  pod "$@"
  if ! wait_for "pod $1" 180 pod_done "$1"; then
    kubectl -n "$ns" describe pod "$1" | tail -20 >&2
    return 1
  fi
  pod_output "$1"
  kubectl -n "$ns" delete pod "$1" --wait=true >/dev/null
}

passed=0
expect() { # WHAT GOT WANT
  if [[ $2 != "$3" ]]; then
    echo "e2e-k8s: $1: got '$2', want '$3'" >&2
    return 1
  fi
  passed=$((passed + 1))
  log "  ok: $1"
}

# ---------- a layout ----------
pool_for() {
  case $1 in
    shared-pool*) echo /mnt/filevol/pool ;;
    *) echo /var/lib/filevol ;;
  esac
}

# The loop devices of images on the pool's filesystem (/dev/loopN each).
pool_image_devices() {
  local pool_dev number
  pool_dev=$(losetup -j "$pool_fs" -n -O MAJ:MIN 2>/dev/null | head -n 1 | tr -d ' ')
  [[ -n $pool_dev ]] || return 0
  # losetup -a names a backing file's device by its number, major * 256 +
  # minor (for minors below 256, as the pool's loop device has here).
  number=$((${pool_dev%:*} * 256 + ${pool_dev#*:}))
  losetup -a | grep -F "[$number]:" | cut -d: -f1 || true
}

# Detaches them: what a failed run left staged (a passing run leaves none,
# and checks it).
detach_pool_images() {
  pool_image_devices | xargs -r -n1 losetup -d 2>/dev/null
}

unmount_pool() {
  local m
  for m in /mnt/filevol /var/lib/filevol "$pool_mnt"; do
    if mountpoint -q "$m"; then umount "$m"; fi
  done
  losetup -j "$pool_fs" -O NAME --noheadings 2>/dev/null | xargs -r -n1 losetup -d
  rm -f "$pool_fs"
}

prepare_pool() { # layout
  unmount_pool # what a run stopped half-way may have left
  truncate -s 4G "$pool_fs"
  mkfs.xfs -q -f -m reflink=1 "$pool_fs"
  mkdir -p "$pool_mnt"
  mount -o loop "$pool_fs" "$pool_mnt"
  # Shared propagation, as a directory under a systemd host's / has: the
  # node plugin's HostToContainer mount of the pool requires it.
  case $1 in
    shared-pool*)
      mkdir -p /mnt/filevol "$pool_mnt/pool"
      mount --bind "$pool_mnt" /mnt/filevol
      mount --make-shared /mnt/filevol
      ;;
    *)
      mkdir -p /var/lib/filevol
      mount --bind "$pool_mnt" /var/lib/filevol
      mount --make-shared /var/lib/filevol
      ;;
  esac
}

release_pool() { # layout
  local layout=$1 pool
  pool=$(pool_for "$layout")
  local left
  left=$(find "$pool/volumes" "$pool/snapshots" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
  expect "$layout: nothing left in the pool" "$left" 0
  expect "$layout: no mount of a filevol volume left" \
    "$(grep -c -E 'kubernetes.io~csi|filevol.csi.rs' /proc/self/mountinfo || true)" 0
  if [[ $layout == shared-pool-2n ]]; then
    local info
    info=$(n2_mountinfo)
    expect "$layout: no mount of a filevol volume left on node 2" \
      "$(grep -c -E 'kubernetes.io~csi|filevol.csi.rs' <<<"$info" || true)" 0
  fi
  expect "$layout: no loop device on the pool left" \
    "$(losetup -a | grep -c -E "$pool_mnt|/var/lib/filevol|/mnt/filevol" || true)" 0
  unmount_pool
}

render() { # layout -> $W/$layout.yaml
  local layout=$1 src over=$W/overlay-$1
  case $layout in
    base) src=$repo/deploy/kubernetes ;;
    shared-pool-2n) src=$repo/deploy/kubernetes/overlays/shared-pool ;;
    *) src=$repo/deploy/kubernetes/overlays/$layout ;;
  esac
  rm -rf "$over"
  mkdir -p "$over"
  local controller_patch="" shared_patch=""
  if [[ $layout == shared-pool* ]]; then
    # The pool is a local xfs here, not a share: its locks reach only this
    # host, which `--topology=` refuses unless told. One host runs every
    # process, so they conflict where they need to. The shipped overlay
    # never sets this (scripts/check/check_deploy.py fails it).
    local workload
    for workload in "StatefulSet, name: filevol-controller" "DaemonSet, name: filevol-node"; do
      shared_patch+="
  - target: {kind: $workload}
    patch: |-
      - op: add
        path: /spec/template/spec/containers/0/env/-
        value: {name: FILEVOL_ALLOW_HOST_LOCAL_LOCKS, value: \"true\"}"
    done
  fi
  # One controller replica on one node (two would share the host's
  # network); on two nodes, the overlay's two.
  local replicas="
      - op: replace
        path: /spec/replicas
        value: 1"
  [[ $layout == shared-pool-2n ]] && replicas=
  if [[ $layout != node-local ]]; then
    controller_patch=$(
      cat <<EOF
  - target: {kind: StatefulSet, name: filevol-controller}
    patch: |-$replicas
      - op: add
        path: /spec/template/spec/hostNetwork
        value: true
      - op: remove
        path: /spec/template/spec/containers/5
EOF
    )
  fi
  cat >"$over/kustomization.yaml" <<EOF
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - $(realpath --relative-to="$over" "$src")
images:
  - {name: ghcr.io/filevol/filevol, newName: localhost/filevol-e2e/filevol, newTag: test}
  - {name: registry.k8s.io/sig-storage/csi-provisioner, newName: localhost/filevol-e2e/csi-provisioner}
  - {name: registry.k8s.io/sig-storage/csi-attacher, newName: localhost/filevol-e2e/csi-attacher}
  - {name: registry.k8s.io/sig-storage/csi-snapshotter, newName: localhost/filevol-e2e/csi-snapshotter}
  - {name: registry.k8s.io/sig-storage/csi-resizer, newName: localhost/filevol-e2e/csi-resizer}
  - {name: registry.k8s.io/sig-storage/csi-node-driver-registrar, newName: localhost/filevol-e2e/csi-node-driver-registrar}
  - {name: registry.k8s.io/sig-storage/livenessprobe, newName: localhost/filevol-e2e/livenessprobe}
patches:
$controller_patch$shared_patch
  - target: {kind: DaemonSet, name: filevol-node}
    patch: |-
      - op: add
        path: /spec/template/spec/hostNetwork
        value: true
      - op: replace
        path: /spec/template/spec/containers/0/args/6
        value: --metrics-address=0.0.0.0:9810
EOF
  "$K8S_BASE/bin/kubectl" kustomize "$over" >"$W/$layout.yaml"
  # Every container: local images only, and the API server where
  # in-cluster clients look for it (the service range is not routed here).
  python3 - "$W/$layout.yaml" <<'PY'
import sys, yaml
path = sys.argv[1]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
for d in docs:
    if d["kind"] in ("StatefulSet", "DaemonSet"):
        for c in d["spec"]["template"]["spec"]["containers"]:
            c["imagePullPolicy"] = "Never"
            c.setdefault("env", []).extend([
                {"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                {"name": "KUBERNETES_SERVICE_PORT", "value": "6443"},
            ])
yaml.safe_dump_all(docs, open(path, "w"))
PY
}

workloads_ready() {
  local want have
  for w in $(kubectl -n filevol get statefulset,daemonset -o name); do
    want=$(kubectl -n filevol get "$w" -o jsonpath='{.status.replicas}{.status.desiredNumberScheduled}')
    have=$(kubectl -n filevol get "$w" -o jsonpath='{.status.readyReplicas}{.status.numberReady}')
    [[ -n $want && $want == "$have" ]] || return 1
  done
  local node
  for node in $(kubectl get node -o name); do
    kubectl get csinode "${node#node/}" -o jsonpath='{.spec.drivers[*].name}' | grep -q filevol.csi.rs || return 1
  done
}

run_layout() {
  local layout=$1 started=$SECONDS
  log "== layout $layout"
  prepare_pool "$layout"
  # Node 2 sees the pool's mount as it is when its namespace is made.
  [[ $layout == shared-pool-2n ]] && node2_up
  if [[ $layout == node-local ]]; then
    start_snapshot_controller --enable-distributed-snapshotting
  else
    start_snapshot_controller
  fi
  render "$layout"
  kubectl apply -f "$W/$layout.yaml" >/dev/null
  if ! wait_for "the $layout workloads" 240 workloads_ready; then
    kubectl -n filevol get pods -o wide >&2
    kubectl -n filevol get events --sort-by=.lastTimestamp | tail -25 >&2
    return 1
  fi
  kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  wait_for "the default service account" 30 kubectl -n "$ns" get sa default

  if [[ $layout == ephemeral-inline ]]; then
    ephemeral_scenarios "$layout"
    kubectl delete namespace "$ns" --wait=true >/dev/null
    kubectl delete -f "$W/$layout.yaml" --wait=true --timeout=120s >/dev/null
    wait_for "the filevol pods to go" 120 none_left -n filevol pods
    release_pool "$layout"
    log "layout $layout passed in $((SECONDS - started)) s"
    return
  fi
  if [[ $layout == base ]]; then
    # Off by default: kubelet refuses the inline volume (the CSIDriver
    # lists only Persistent), the pod never starts, nothing is made.
    inline_pod inline-refused 64Mi 'echo started'
    wait_for "a FailedMount event of pod inline-refused" 90 has_event inline-refused FailedMount
    expect "$layout: an inline volume is refused by default" "$(phase inline-refused)" Pending
    expect "$layout: the refused inline volume made nothing" "$(pool_volumes "$layout")" 0
    kubectl -n "$ns" delete pod inline-refused --wait=true --grace-period=1 >/dev/null
  fi

  [[ $layout == base ]] && kubelet_reads_the_condition "$layout"

  # Data written and read back; then a new pod on the same claim reads it:
  # the volume was unstaged and staged again, never reformatted.
  pvc data filevol 64Mi
  run_pod writer data 'printf "filevol e2e %s\n" 42 >/data/file; sync; cat /data/file' >/dev/null
  expect "$layout: data read back by a new pod" "$(run_pod reader data 'cat /data/file')" "filevol e2e 42"
  # The database class: thick, zero-filled by CreateVolume, formatted at
  # its first stage all the same.
  pvc zeroed filevol-zero-filled 64Mi
  expect "$layout: a zero-filled volume is formatted, written and read" \
    "$(run_pod zeroed-rw zeroed 'echo zeroed >/data/z; sync; cat /data/z')" zeroed

  # fsGroup: the volume's files belong to the pod's group.
  pvc grouped filevol 64Mi
  # shellcheck disable=SC2016 # the pod's shell expands it
  expect "$layout: fsGroup applied" \
    "$(run_pod grouped grouped 'touch /data/f && echo $(stat -c %g /data) $(stat -c %g /data/f)' \
      '{runAsUser: 1000, runAsGroup: 1000, fsGroup: 2000}')" "2000 2000"

  # ReadWriteOncePod: a second pod on the claim is never started.
  pvc once filevol 64Mi ReadWriteOncePod
  pod holder once 'sleep 30'
  wait_for "pod holder running" 120 sh -c "[ \"\$(kubectl -n $ns get pod holder -o jsonpath='{.status.phase}')\" = Running ]"
  pod intruder once 'echo started'
  sleep 8
  expect "$layout: second ReadWriteOncePod pod kept out" "$(phase intruder)" Pending
  kubectl -n "$ns" delete pod holder intruder --wait=true --grace-period=1 >/dev/null

  # Expansion, online, on xfs (growing a mounted ext4 needs
  # CAP_SYS_RESOURCE, which root lacks on this machine).
  if [[ $layout != node-local ]]; then
    pvc grow filevol-xfs 320Mi
    # shellcheck disable=SC2016 # the pod's shell expands it
    pod grower grow 'i=0; while [ $i -lt 90 ]; do df -k /data | tail -1; sleep 2; i=$((i+1)); done'
    wait_for "pod grower running" 120 sh -c "[ \"\$(kubectl -n $ns get pod grower -o jsonpath='{.status.phase}')\" = Running ]"
    kubectl -n "$ns" patch pvc grow -p '{"spec":{"resources":{"requests":{"storage":"512Mi"}}}}' >/dev/null
    wait_for "the claim to grow" 150 sh -c "[ \"\$(kubectl -n $ns get pvc grow -o jsonpath='{.status.capacity.storage}')\" = 512Mi ]"
    expect "$layout: claim capacity after expansion" "$(kubectl -n "$ns" get pvc grow -o jsonpath='{.status.capacity.storage}')" 512Mi
    kubectl -n "$ns" delete pod grower --wait=true --grace-period=1 >/dev/null
  fi

  # Snapshot and restore, and a clone.
  kubectl -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap}
spec:
  volumeSnapshotClassName: filevol
  source: {persistentVolumeClaimName: data}
EOF
  wait_for "the snapshot to be ready" 120 snapshot_ready snap
  pvc restored filevol 64Mi ReadWriteOnce "  dataSource: {name: snap, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io}"
  expect "$layout: restored from the snapshot" "$(run_pod restore-reader restored 'cat /data/file')" "filevol e2e 42"
  pvc cloned filevol 64Mi ReadWriteOnce "  dataSource: {name: data, kind: PersistentVolumeClaim}"
  expect "$layout: cloned" "$(run_pod clone-reader cloned 'cat /data/file')" "filevol e2e 42"

  [[ $layout == shared-pool-2n ]] && two_node_scenarios

  # Deletion leaves nothing behind.
  kubectl -n "$ns" delete volumesnapshot --all --wait=true >/dev/null
  kubectl -n "$ns" delete pvc --all --wait=true >/dev/null
  wait_for "every PV to be deleted" 120 none_left pv
  wait_for "every snapshot content to be deleted" 120 none_left volumesnapshotcontent
  kubectl delete namespace "$ns" --wait=true >/dev/null
  kubectl delete -f "$W/$layout.yaml" --wait=true --timeout=120s >/dev/null
  wait_for "the filevol pods to go" 120 none_left -n filevol pods
  release_pool "$layout"
  [[ $layout == shared-pool-2n ]] && node2_gone
  log "layout $layout passed in $((SECONDS - started)) s"
}

# The ephemeral-inline layout: base with CSI ephemeral inline volumes on
# (1Gi each at most, 10Gi a node).
ephemeral_scenarios() { # layout
  local layout=$1
  inline_pod inline 64Mi 'echo inline >/data/f && sync && cat /data/f'
  if ! wait_for "pod inline" 180 pod_done inline; then
    kubectl -n "$ns" describe pod inline | tail -20 >&2
    return 1
  fi
  expect "$layout: an inline volume is made, written and read" "$(kubectl -n "$ns" logs inline)" inline
  kubectl -n "$ns" delete pod inline --wait=true >/dev/null
  wait_for "the inline volume to go with its pod" 60 no_pool_volumes "$layout"
  expect "$layout: the inline volume went with its pod" "$(pool_volumes "$layout")" 0
  # Larger than --ephemeral-max-size: the driver's reason reaches the pod's
  # events, and nothing is made.
  inline_pod inline-big 2Gi 'echo started'
  wait_for "the refusal of pod inline-big" 90 event_mentions inline-big --ephemeral-max-size
  expect "$layout: an inline volume over the limit is refused" "$(phase inline-big)" Pending
  expect "$layout: the refused inline volume made nothing" "$(pool_volumes "$layout")" 0
  kubectl -n "$ns" delete pod inline-big --wait=true --grace-period=1 >/dev/null
}

kubelet_with_health_gate
for layout in "${layouts[@]}"; do
  run_layout "$layout"
done
log "${#layouts[@]} layout(s) passed"
# Any failure above ends the script non-zero; a run that gets here passed
# every check.
echo "e2e-k8s: $passed passed, 0 failed"
