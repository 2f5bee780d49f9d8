# shellcheck shell=bash disable=SC2154 # ns, W, K8S_BASE, log, wait_for, expect: from e2e-k8s.sh, which sources this
# The two-node scenarios of scripts/check/e2e-k8s.sh (sourced, not run):
# the shared-pool overlay as shipped (two controller replicas, the node
# DaemonSet on both nodes) on node "localhost" (node 1, the host's) and
# node "filevol-2" (node 2, scripts/check/e2e-node2.sh), one pool on both.
#
# CI runs the short form: a pod moves between nodes; a second node is kept
# off a ReadWriteOnce volume; a ReadWriteMany directory volume written from
# both nodes at once; a snapshot taken on one node restored on the other;
# the leader replica deleted. E2E_FULL=1 adds the lost node: node 2 hangs
# with a pod writing, the out-of-service taint moves the pod to node 1,
# which never mounts the volume while node 2's device exists; node 2
# "reboots" and every acknowledged write is there.
#
# Needs: the helpers of e2e-k8s.sh and e2e-node2.sh.

N1=localhost

# pod_on NAME NODE CLAIM SCRIPT: `pod` on node NODE.
pod_on() { pod "$1" "$3" "$4" "{}" "$2"; }

running() { [[ $(phase "$1") == Running ]]; }
output_has() { pod_output "$1" | grep -q -- "$2"; } # POD TEXT

wait_running() { # POD
  if ! wait_for "pod $1 running" 180 running "$1"; then
    kubectl -n "$ns" describe pod "$1" | tail -20 >&2
    return 1
  fi
}

pv_of() { kubectl -n "$ns" get pvc "$1" -o jsonpath='{.spec.volumeName}'; }
volume_of() { kubectl get pv "$(pv_of "$1")" -o jsonpath='{.spec.csi.volumeHandle}'; }

# The nodes a claim's volume is attached to, as NODE=attached, sorted.
attachments_of() { # CLAIM
  kubectl get volumeattachment -o jsonpath="{range .items[?(@.spec.source.persistentVolumeName==\"$(pv_of "$1")\")]}{.spec.nodeName}={.status.attached}{'\n'}{end}" |
    sort | xargs
}
attached_to() { [[ $(attachments_of "$1") == "$2" ]]; } # CLAIM WANT

# How many mounts of volume ID each node has: a mount of its loop device
# (by device number) or of its files (by path).
mounts_on() { # NODE ID
  local info image majmins
  if [[ $1 == "$N2" ]]; then info=$(n2_mountinfo); else info=$(cat /proc/self/mountinfo); fi
  image=$(pool_for shared-pool)/volumes/$2/image
  majmins=$(losetup -j "$image" -n -O MAJ:MIN 2>/dev/null | tr -d ' ' | paste -sd'|')
  echo "$info" | awk -v id="$2" -v mm="^(${majmins:-none})\$" \
    '$3 ~ mm || index($0, id) {n++} END {print n + 0}'
}
autoclear_of() { # ID: the autoclear flags of the devices of its image
  local d
  for d in $(losetup -j "$(pool_for shared-pool)/volumes/$1/image" -n -O NAME 2>/dev/null); do
    cat "/sys/block/${d#/dev/}/loop/autoclear"
  done | xargs
}
loops_of() { # ID: how many loop devices serve its image
  losetup -j "$(pool_for shared-pool)/volumes/$1/image" -n -O NAME 2>/dev/null | wc -l
}

# 1. A pod moves from node 1 to node 2 with its data; the attachment moves
# with it and node 1 keeps nothing.
two_nodes_move() {
  local id
  pvc move filevol 64Mi
  pod_on mover-1 $N1 move 'echo moved 42 >/data/f; sync; cat /data/f; sleep 3600'
  wait_running mover-1
  id=$(volume_of move)
  expect "pod on node 1 attached there" "$(attachments_of move)" "$N1=true"
  kubectl -n "$ns" delete pod mover-1 --wait=true >/dev/null
  pod_on mover-2 "$N2" move 'cat /data/f; sleep 3600'
  wait_running mover-2
  wait_for "mover-2's output" 30 output_has mover-2 moved
  expect "node 2 reads node 1's data" "$(pod_output mover-2)" "moved 42"
  expect "the attachment moved to node 2" "$(attachments_of move)" "$N2=true"
  expect "node 1 has no mount of the volume left" "$(mounts_on $N1 "$id")" 0
  expect "node 2 has it mounted" "$(($(mounts_on "$N2" "$id") > 0))" 1
  expect "one loop device of the image" "$(loops_of "$id")" 1
  kubectl -n "$ns" delete pod mover-2 --wait=true >/dev/null
}

# 2. While a pod on node 1 uses a ReadWriteOnce volume, a pod on node 2
# never gets it: the attach is refused and the pod waits, saying why.
two_nodes_single_writer() {
  local id pv
  pvc solo filevol 64Mi
  pod_on holder $N1 solo 'echo held >/data/f; sync; sleep 3600'
  wait_running holder
  id=$(volume_of solo)
  pod_on intruder "$N2" solo 'echo started'
  wait_for "intruder's FailedAttachVolume event" 90 event_mentions intruder Multi-Attach
  expect "the second node's pod waits" "$(phase intruder)" Pending
  expect "the volume stays attached to node 1 only" "$(attachments_of solo)" "$N1=true"
  expect "node 2 has no mount of the volume" "$(mounts_on "$N2" "$id")" 0
  # The attach-detach controller keeps it from calling the driver; a
  # VolumeAttachment made by hand reaches the driver, which refuses it.
  pv=$(pv_of solo)
  kubectl apply -f - >/dev/null <<EOF
apiVersion: storage.k8s.io/v1
kind: VolumeAttachment
metadata: {name: filevol-e2e-intruder}
spec:
  attacher: filevol.csi.rs
  nodeName: $N2
  source: {persistentVolumeName: $pv}
EOF
  wait_for "the driver's answer to a second attach" 60 sh -c \
    "kubectl get volumeattachment filevol-e2e-intruder -o jsonpath='{.status.attachError.message}' | grep -q 'single-node access mode'"
  expect "the driver refuses a second node's attach" \
    "$(kubectl get volumeattachment filevol-e2e-intruder -o jsonpath='{.status.attached}')" false
  kubectl delete volumeattachment filevol-e2e-intruder --wait=true >/dev/null
  expect "the holder still runs" "$(phase holder)" Running
  kubectl -n "$ns" delete pod holder intruder --wait=true >/dev/null
}

# 3. A ReadWriteMany directory volume written from both nodes at once.
two_nodes_shared_dir() {
  pvc shared filevol-shared 64Mi ReadWriteMany
  # shellcheck disable=SC2016 # the pod's shell expands them
  local script='echo $NODE >/data/$NODE; i=0; until [ -f /data/$OTHER ] || [ $i -ge 120 ]; do sleep 1; i=$((i+1)); done; ls /data | tr "\n" " "; echo; sleep 3600'
  pod_on rwx-1 $N1 shared "NODE=$N1 OTHER=$N2; $script"
  pod_on rwx-2 "$N2" shared "NODE=$N2 OTHER=$N1; $script"
  wait_running rwx-1
  wait_running rwx-2
  wait_for "rwx-1 to see node 2's file" 150 output_has rwx-1 "$N2"
  wait_for "rwx-2 to see node 1's file" 150 output_has rwx-2 $N1
  expect "node 1 sees both nodes' files" "$(pod_output rwx-1 | xargs)" "$N2 $N1"
  expect "node 2 sees both nodes' files" "$(pod_output rwx-2 | xargs)" "$N2 $N1"
  expect "attached to both nodes" "$(attachments_of shared)" "$N2=true $N1=true"
  kubectl -n "$ns" delete pod rwx-1 rwx-2 --wait=true >/dev/null
}

# 6. A snapshot of a volume staged (and written) on node 1, restored and
# read on node 2.
two_nodes_snapshot() {
  pvc snapsrc filevol 64Mi
  pod_on snap-writer $N1 snapsrc 'echo snap 7 >/data/f; sync; sleep 3600'
  wait_running snap-writer
  kubectl -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: snap2n}
spec:
  volumeSnapshotClassName: filevol
  source: {persistentVolumeClaimName: snapsrc}
EOF
  wait_for "the snapshot to be ready" 120 snapshot_ready snap2n
  pvc restored2n filevol 64Mi ReadWriteOnce "  dataSource: {name: snap2n, kind: VolumeSnapshot, apiGroup: snapshot.storage.k8s.io}"
  expect "node 2 reads the snapshot taken on node 1" "$(run_pod snap-reader restored2n 'cat /data/f' '{}' "$N2")" "snap 7"
  kubectl -n "$ns" delete pod snap-writer --wait=true >/dev/null
}

# The holders of the controller sidecars' leases (every lease in the
# driver's namespace), as NAME=HOLDER.
lease_holders() {
  kubectl -n filevol get lease -o jsonpath='{range .items[*]}{.metadata.name}={.spec.holderIdentity}{"\n"}{end}' | sort
}
lease_holder() { # LEASE
  kubectl -n filevol get lease "$1" -o jsonpath='{.spec.holderIdentity}'
}
# Which node a sidecar's identity (its hostname) is.
node_of_identity() { case $1 in "$N2"*) echo "$N2" ;; *) echo "$N1" ;; esac; }
leases_held_on() { # NODE LEASE...: every lease held by NODE
  local node=$1 l
  shift
  for l in "$@"; do [[ $(node_of_identity "$(lease_holder "$l")") == "$node" ]] || return 1; done
}
# The scheduler of ../shared/tools/k8s, stopped and resumed.
scheduler_pause() { kill -STOP "$(cat /run/k8s-test/kube-scheduler.pid)"; }
scheduler_resume() { kill -CONT "$(cat /run/k8s-test/kube-scheduler.pid)" 2>/dev/null || true; }

# The identity (hostname) of NODE's sidecars.
identity_of() { if [[ $1 == "$N2" ]]; then echo "$N2"; else hostname; fi; }
# Who provisioned each claim: the identity in its ProvisioningSucceeded
# event's source (DRIVER_IDENTITY_UUID).
provisioned_by() { # CLAIM...
  local c
  for c in "$@"; do
    kubectl -n "$ns" get events --field-selector "involvedObject.uid=$(claim_uid "$c"),reason=ProvisioningSucceeded" \
      -o jsonpath='{.items[*].source.component}' | cut -d' ' -f1 | cut -d_ -f2
  done | xargs
}
claim_uid() { kubectl -n "$ns" get pvc "$1" -o jsonpath='{.metadata.uid}'; }
provisioning_failures() { # CLAIM...
  local c
  for c in "$@"; do
    kubectl -n "$ns" get events --field-selector "involvedObject.uid=$(claim_uid "$c"),reason=ProvisioningFailed" -o name
  done | wc -l
}
claims_bound() { local c; for c in "$@"; do pvc_bound "$c" || return 1; done; }

# Immediate provisioning of claims CLAIM... for NODE (the scheduler's
# annotation set by hand: no pod needed).
pvcs_for() { # NODE CLAIM...
  local node=$1 c
  shift
  for c in "$@"; do
    kubectl -n "$ns" apply -f - >/dev/null <<EOF
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: $c
  annotations: {volume.kubernetes.io/selected-node: $node}
spec:
  accessModes: [ReadWriteOnce]
  storageClassName: filevol
  resources: {requests: {storage: 16Mi}}
EOF
  done
}

# 4. The replica holding the leases is deleted: claims made meanwhile are
# provisioned by the other, each once.
two_nodes_failover() {
  local leases holder node other pod before after
  mapfile -t leases < <(lease_holders | cut -d= -f1)
  expect "the sidecars' leases exist" "$((${#leases[@]} >= 3))" 1
  holder=$(lease_holder "${leases[0]}")
  node=$(node_of_identity "$holder")
  if [[ $node == "$N1" ]]; then other=$N2; else other=$N1; fi
  pod=$(kubectl -n filevol get pod -l app.kubernetes.io/component=controller \
    --field-selector spec.nodeName="$node" -o jsonpath='{.items[0].metadata.name}')
  log "  leader $holder (pod $pod on $node)"
  before=$(pool_volumes shared-pool)
  # The replacement is held unscheduled while the scheduler is stopped:
  # the gap lasts until it resumes. (Cordoning cannot keep it off: the
  # controller tolerates every taint, and the StatefulSet brings the same
  # pod name, and with it the same lease identity, straight back.)
  scheduler_pause
  kubectl -n filevol delete pod "$pod" --wait=true >/dev/null
  pvcs_for "$other" fo-1 fo-2 fo-3
  wait_for "the claims made during the failover" 90 claims_bound fo-1 fo-2 fo-3
  wait_for "every lease on $other" 60 leases_held_on "$other" "${leases[@]}"
  expect "every lease taken over by $other" "$(leases_held_on "$other" "${leases[@]}" && echo yes)" yes
  expect "the claims provisioned by the replica on $other" "$(provisioned_by fo-1 fo-2 fo-3)" \
    "$(identity_of "$other") $(identity_of "$other") $(identity_of "$other")"
  after=$(pool_volumes shared-pool)
  expect "three claims, three volumes (none twice)" "$((after - before))" 3
  expect "no provisioning of them failed" "$(provisioning_failures fo-1 fo-2 fo-3)" 0
  scheduler_resume
  wait_for "both controller replicas back" 180 workloads_ready
  kubectl -n "$ns" delete pvc fo-1 fo-2 fo-3 --wait=true >/dev/null
}

# 5. Node 2 is lost while its pod writes; node 1 never mounts the volume
# while node 2's device exists; after node 2's "reboot" node 1 does, with
# every acknowledged write.
two_nodes_lost() {
  local id image last found
  pvc lost filevol 64Mi
  kubectl cordon $N1 >/dev/null
  kubectl -n "$ns" apply -f - >/dev/null <<'EOF'
apiVersion: apps/v1
kind: StatefulSet
metadata: {name: lost}
spec:
  replicas: 1
  serviceName: lost
  selector: {matchLabels: {app: lost}}
  template:
    metadata: {labels: {app: lost}}
    spec:
      hostNetwork: true
      terminationGracePeriodSeconds: 1
      containers:
        - name: c
          image: localhost/k8s-test/busybox:1.35
          imagePullPolicy: Never
          command:
            - /bin/sh
            - -c
            - |
              if [ -f /data/log ]; then
                echo "found $(grep -c '^rec ' /data/log) last $(tail -n 1 /data/log)"
                exec sleep 3600
              fi
              i=0
              while :; do
                i=$((i+1)); echo "rec $i" >>/data/log; sync; echo "ack $i"; sleep 0.2
              done
          volumeMounts: [{name: v, mountPath: /data}]
      volumes: [{name: v, persistentVolumeClaim: {claimName: lost}}]
EOF
  wait_running lost-0
  kubectl uncordon $N1 >/dev/null
  id=$(volume_of lost)
  image=$(pool_for shared-pool)/volumes/$id/image
  expect "the writer runs on node 2" "$(kubectl -n "$ns" get pod lost-0 -o jsonpath='{.spec.nodeName}')" "$N2"
  wait_for "acknowledged writes" 30 output_has lost-0 "ack 10"
  local leases
  mapfile -t leases < <(lease_holders | cut -d= -f1)
  expect "the sidecars' leases exist" "$((${#leases[@]} >= 3))" 1
  node2_hang
  # The container runtime's shim (not frozen) writes out what the writer
  # printed before it froze.
  sleep 2
  last=$(pod_output lost-0 | grep '^ack ' | tail -n 1 | cut -d' ' -f2)
  log "  node 2 hung after ack $last"
  # The leader replica was on node 2 and hangs with it: the replica on
  # node 1 takes the leases over and serves claims made meanwhile.
  local before after
  before=$(pool_volumes shared-pool)
  pvcs_for "$N1" fo-4 fo-5
  wait_for "the claims made while node 2 hangs" 120 claims_bound fo-4 fo-5
  wait_for "every lease on node 1" 60 leases_held_on "$N1" "${leases[@]}"
  expect "every lease taken over from the lost node" "$(leases_held_on "$N1" "${leases[@]}" && echo yes)" yes
  expect "the claims provisioned by the replica on node 1" "$(provisioned_by fo-4 fo-5)" \
    "$(identity_of "$N1") $(identity_of "$N1")"
  after=$(pool_volumes shared-pool)
  expect "two claims, two volumes (none twice)" "$((after - before))" 2
  kubectl -n "$ns" delete pvc fo-4 fo-5 --wait=true >/dev/null
  wait_for "node 2 NotReady" 120 sh -c \
    "kubectl get node $N2 -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qvx True"
  kubectl taint node "$N2" node.kubernetes.io/out-of-service=nodeshutdown:NoExecute >/dev/null
  wait_for "lost-0 recreated on node 1" 120 sh -c \
    "[ \"\$(kubectl -n $ns get pod lost-0 -o jsonpath='{.spec.nodeName}')\" = $N1 ]"
  wait_for "node 1's refusal in lost-0's events" 180 event_mentions lost-0 "for another node"
  expect "lost-0 waits while node 2's device exists" "$(phase lost-0)" Pending
  expect "node 2's device was never set to detach" "$(autoclear_of "$id")" 0
  expect "node 1 has no mount of the volume while node 2's device exists" "$(mounts_on "$N1" "$id")" 0
  node2_reboot
  expect "node 2's devices are gone" "$(loops_of "$id")" 0
  wait_running lost-0
  wait_for "lost-0's count" 30 output_has lost-0 found
  found=$(pod_output lost-0)
  log "  node 1 found: $found"
  local count lastrec
  count=$(echo "$found" | awk '{print $2}')
  lastrec=$(echo "$found" | awk '{print $5}')
  expect "every acknowledged write is there" "$((lastrec >= last))" 1
  expect "no record lost or torn" "$count" "$lastrec"
  kubectl -n "$ns" delete statefulset lost --wait=true >/dev/null
  kubectl -n "$ns" delete pod lost-0 --wait=true --ignore-not-found >/dev/null
  wait_for "the volume unstaged on node 1" 120 sh -c "[ \$(losetup -j '$image' -n | wc -l) -eq 0 ]"
  expect "fsck of the volume is clean" "$(e2fsck -fn "$image" >/dev/null 2>&1; echo $?)" 0
  kubectl -n "$ns" delete pvc lost --wait=true >/dev/null
  # Node 2 joins again, fresh.
  kubectl taint node "$N2" node.kubernetes.io/out-of-service- >/dev/null
  node2_down
  node2_up
  wait_for "the filevol pods on node 2 again" 240 workloads_ready
}

two_node_scenarios() {
  two_nodes_move
  two_nodes_single_writer
  two_nodes_shared_dir
  two_nodes_snapshot
  two_nodes_failover
  if [[ -n ${E2E_FULL:-} ]]; then
    # The lost node takes the leader with it: once more if it is not there.
    [[ $(node_of_identity "$(lease_holder "$(lease_holders | head -n 1 | cut -d= -f1)")") == "$N2" ]] ||
      two_nodes_failover
    two_nodes_lost
  fi
}
