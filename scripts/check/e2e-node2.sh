# shellcheck shell=bash disable=SC2154 # ns, W, K8S_BASE, log, wait_for, expect: from e2e-k8s.sh, which sources this
# A second Kubernetes node on this host for scripts/check/e2e-k8s.sh
# (sourced, not run): node "filevol-2" joins the cluster of
# ../shared/tools/k8s beside its node "localhost".
#
# The design: node 2 is a set of namespaces this script makes, and the
# processes of a node started in them.
# - network: `ip netns` filevol-2, with the node's address 10.254.0.2 on
#   its loopback; no address is added to the host. Pods stay
#   hostNetwork (there is no pod network here), and a hostNetwork pod of
#   node 2 lives in that namespace, so the two nodes' pods bind the same
#   ports without clashing. The API server listens on the host's
#   127.0.0.1 only: a socat pair relays 127.0.0.1:6443 inside the
#   namespace to it through a UNIX socket, so the certificate's SAN and
#   the manifests' KUBERNETES_SERVICE_HOST=127.0.0.1 hold on both nodes.
# - UTS: hostname filevol-2. hostNetwork pods take their node's hostname,
#   and the CSI sidecars name themselves by it in their leader leases.
# - mount: a copy of the host's mounts (slaves of the host's), with
#   /var/lib/kubelet, /var/log/pods, /var/log/containers and
#   /run/containerd replaced by node 2's own directories. The shipped
#   DaemonSet's host paths then mean node 2's on node 2, and kubelet 2
#   runs with --root-dir=/var/lib/kubelet like any node. The pool
#   (/mnt/filevol, a shared mount on the host) stays: one filesystem on
#   both nodes' pool path, standing in for the share.
# - cgroups: cgroupRoot /filevol-2 in every hierarchy, so node 2's pods
#   are apart from node 1's /kubepods (and can be frozen as a hung node).
# Node 2's containerd has its own root, state, socket and CNI config (the
# loopback plugin, as up.sh gives node 1). Its kubelet's client
# certificate is system:node:filevol-2, signed with the cluster's CA as
# up.sh signs node 1's.
#
# The API server cannot reach kubelet 2 (it looks nodes up by hostname), so
# `kubectl logs` and `exec` do not work for node 2's pods: the scenarios
# read a pod's output from its termination message instead.
#
# Needs: K8S, K8S_BASE, W, log, wait_for (from e2e-k8s.sh).

N2=filevol-2
N2_ADDR=10.254.0.2
R2=/run/filevol-e2e/n2            # sockets, pid files, namespace files, state
D2=/var/lib/filevol-e2e/n2        # kubelet root, containerd root, pod logs
X2=$W/n2                          # configs, certificates, logs
CG2=/filevol-2                    # cgroupRoot of kubelet 2

# n2 CMD...: runs CMD in node 2's namespaces.
n2() {
  nsenter --net=/run/netns/$N2 --mount=$R2/mnt --uts=$R2/uts -- "$@"
}

n2_start() { # NAME CMD...: a process of node 2, its pid in $R2/NAME.pid
  local name=$1
  shift
  setsid nsenter --net=/run/netns/$N2 --mount=$R2/mnt --uts=$R2/uts -- "$@" \
    >>"$X2/$name.log" 2>&1 </dev/null &
  echo $! >"$R2/$name.pid"
  disown $!
}

n2_stop() { # NAME [SIGNAL]: stops a process started by n2_start
  local f=$R2/$1.pid p i
  [[ -f $f ]] || return 0
  p=$(cat "$f")
  if kill -0 "$p" 2>/dev/null; then
    kill "-${2:-TERM}" "$p" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
    kill -KILL "$p" 2>/dev/null || true
  fi
  rm -f "$f"
}

n2_ctr() { ctr --address "$R2/containerd.sock" -n k8s.io "$@"; }

# The mounts of node 2's namespace under its kubelet directory.
n2_mountinfo() { n2 cat /proc/self/mountinfo; }

node2_kubelet_config() {
  local pki=$K8S_BASE/cluster/pki
  cat >"$X2/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $N2_ADDR
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
containerRuntimeEndpoint: unix://$R2/containerd.sock
cgroupDriver: cgroupfs
cgroupRoot: $CG2
failSwapOn: false
failCgroupV1: false
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: "$pki/ca.crt"}
authorization: {mode: Webhook}
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
rotateCertificates: false
serverTLSBootstrap: false
serializeImagePulls: false
imageGCHighThresholdPercent: 95
imageGCLowThresholdPercent: 90
evictionHard: {memory.available: "200Mi", nodefs.available: "2%", imagefs.available: "2%", nodefs.inodesFree: "2%"}
EOF
}

node2_credentials() {
  local pki=$K8S_BASE/cluster/pki
  [[ -f $X2/kubelet.crt ]] || {
    openssl req -new -newkey rsa:2048 -nodes -keyout "$X2/kubelet.key" -out "$X2/kubelet.csr" \
      -subj "/O=system:nodes/CN=system:node:$N2" 2>/dev/null
    printf 'basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' >"$X2/kubelet.ext"
    openssl x509 -req -in "$X2/kubelet.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
      -days 2 -sha256 -extfile "$X2/kubelet.ext" -out "$X2/kubelet.crt" 2>/dev/null
  }
  cat >"$X2/kubelet.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:6443", certificate-authority: "$pki/ca.crt"}
users:
- name: u
  user: {client-certificate: "$X2/kubelet.crt", client-key: "$X2/kubelet.key"}
contexts:
- name: local
  context: {cluster: local, user: u}
current-context: local
EOF
}

node2_containerd_config() {
  mkdir -p "$X2/cni"
  echo '{"cniVersion": "0.4.0", "name": "filevol-2-lo", "plugins": [{"type": "loopback"}]}' \
    >"$X2/cni/10-filevol-2-lo.conflist"
  cat >"$X2/containerd.toml" <<EOF
version = 2
root = "$D2/containerd"
state = "$R2/containerd-state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "$R2/containerd.sock"
[ttrpc]
  address = "$R2/containerd.sock.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "$D2/containerd/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "localhost/k8s-test/pause:3.10"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$X2/cni"
EOF
}

# The namespaces of node 2 (see the top of this file).
node2_namespaces() {
  mkdir -p "$R2" "$D2"/{kubelet,log-pods,log-containers,containerd} "$R2/run-containerd"
  # unshare --mount=FILE binds the namespace on FILE, which must not be on
  # a shared mount: $R2 is a private mount of its own.
  mountpoint -q "$R2" || mount --bind "$R2" "$R2"
  mount --make-private "$R2"
  ip netns add $N2
  ip -n $N2 link set lo up
  # On its loopback: nothing outside the namespace needs to reach it (and
  # this kernel has no dummy interfaces).
  ip -n $N2 addr add $N2_ADDR/32 dev lo
  touch "$R2/uts" "$R2/mnt"
  unshare --uts="$R2/uts" hostname $N2
  unshare --mount="$R2/mnt" --propagation slave true
  # Node 1's kubelet and runtime directories out of node 2's sight, node
  # 2's own in their place.
  # shellcheck disable=SC2016 # the inner shell expands them
  n2 sh -euc '
    for i in 1 2 3; do
      findmnt -rn -o TARGET | grep -E "^(/var/lib/kubelet|/run/k8s-test|/run/containerd|/var/log/pods|/var/log/containers|$2)(/|$)" |
        awk "{print length, \$0}" | sort -rn | cut -d" " -f2- | while read -r m; do umount -l "$m"; done
    done
    mkdir -p /var/lib/kubelet /var/log/pods /var/log/containers /run/containerd
    mount --bind "$1/kubelet" /var/lib/kubelet
    mount --make-rshared /var/lib/kubelet
    mount --bind "$1/log-pods" /var/log/pods
    mount --bind "$1/log-containers" /var/log/containers
    mount --bind "$3" /run/containerd
  ' sh "$D2" "$K8S_BASE/containerd-root" "$R2/run-containerd"
  local h
  for h in /sys/fs/cgroup/*/; do
    [[ -d $h ]] || continue
    mkdir -p "$h${CG2#/}"
    if [[ -f ${h}cpuset.cpus ]]; then
      cat "${h}cpuset.cpus" >"$h${CG2#/}/cpuset.cpus"
      cat "${h}cpuset.mems" >"$h${CG2#/}/cpuset.mems"
    fi
  done
}

# Brings node 2 up and waits for it to be Ready. Its images are those of
# node 1 ($K8S_BASE/cluster/images and $W/images).
node2_up() {
  if [[ ! -d /sys/fs/cgroup/freezer ]]; then
    echo "e2e-k8s: node 2 needs cgroup v1's freezer hierarchy (this machine's layout, where up.sh's kubelet runs with cgroupfs)" >&2
    return 1
  fi
  node2_down # what a run that was stopped left
  log "starting node $N2"
  mkdir -p "$X2"
  node2_namespaces
  setsid socat UNIX-LISTEN:"$R2/api.sock",fork,unlink-early TCP:127.0.0.1:6443 \
    >>"$X2/relay.log" 2>&1 </dev/null &
  echo $! >"$R2/relay-host.pid"
  disown $!
  n2_start relay-node socat TCP-LISTEN:6443,bind=127.0.0.1,reuseaddr,fork UNIX-CONNECT:"$R2/api.sock"
  node2_credentials
  node2_containerd_config
  n2_start containerd containerd --config "$X2/containerd.toml"
  wait_for "node 2's containerd" 60 n2_ctr version
  local image
  for image in "$K8S_BASE"/cluster/images/{pause,busybox}.tar "$W"/images/*.tar; do
    n2_ctr images import "$image" >/dev/null
  done
  node2_kubelet_config
  n2_start kubelet kubelet --config="$X2/kubelet-config.yaml" --kubeconfig="$X2/kubelet.kubeconfig" \
    --hostname-override=$N2 --node-ip=$N2_ADDR --root-dir=/var/lib/kubelet --v=2
  wait_for "node $N2 Ready" 180 sh -c \
    "kubectl get node $N2 -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -qx True"
}

# Node 2 stops answering as a hung host does: its kubelet and its filevol
# node plugin killed, every other task of its pods frozen (the sidecars,
# the controller replica, the pods' writers), its mounts and loop devices
# left as they are.
node2_hang() {
  n2_stop kubelet KILL
  local p uts
  uts=$(n2 readlink /proc/self/ns/uts)
  for p in $(pgrep -x filevol); do
    if [[ $(readlink "/proc/$p/ns/uts") == "$uts" ]] && tr '\0' ' ' <"/proc/$p/cmdline" | grep -q -- '--mode=node'; then
      kill -KILL "$p" || true
    fi
  done
  echo FROZEN >/sys/fs/cgroup/freezer${CG2}/freezer.state
}

# The hung node 2 "reboots": every task of its pods is killed, its
# filesystems are shut down without a flush (what was not synced is lost,
# as in a power cut) and unmounted, its loop devices are gone.
node2_reboot() {
  local -
  set +e
  local devices
  devices=$(n2_loop_devices)
  # Filesystems shut down as a power cut leaves them: nothing more reaches
  # the disk, the journal is not flushed.
  # shellcheck disable=SC2016 # the inner shell expands it
  n2 sh -c 'findmnt -rn -t ext4,xfs -o TARGET | grep "^/var/lib/kubelet/" | while read -r m; do xfs_io -x -c shutdown "$m"; done'
  find "/sys/fs/cgroup/freezer$CG2" -name tasks -exec cat {} + 2>/dev/null | while read -r t; do
    kill -KILL "$t" 2>/dev/null || true
  done
  echo THAWED >/sys/fs/cgroup/freezer${CG2}/freezer.state
  n2_stop containerd KILL
  n2_kill_shims
  node2_unmount_all
  local d
  for d in $devices; do
    losetup -d "$d" 2>/dev/null || true
  done
}

# The loop devices of the pool's images mounted in node 2's namespace (its
# copy of the host's mounts holds the host's own loop mounts too, the
# pool's among them: never those).
n2_loop_devices() {
  local majmin ours
  ours=$(pool_image_devices)
  for majmin in $(n2_mountinfo | awk '$3 ~ /^7:/ {print $3}' | sort -u); do
    grep -qx "/dev/loop${majmin#7:}" <<<"$ours" && echo "/dev/loop${majmin#7:}"
  done
  true
}

n2_kill_shims() {
  local p
  for p in $(pgrep -f "containerd-shim-runc-v2 .*-address $R2/containerd.sock" || true); do
    kill -KILL "$p" 2>/dev/null || true
  done
}

# Unmounts, deepest first, what node 2's kubelet, runtime and pods mounted.
node2_unmount_all() {
  [[ -f $R2/mnt ]] && mountpoint -q "$R2/mnt" || return 0
  # shellcheck disable=SC2016 # the inner shell expands them
  n2 sh -c '
    for i in 1 2 3; do
      m=$(findmnt -rn -o TARGET | grep -E "^(/var/lib/kubelet/|$1|$2)" | awk "{print length, \$0}" | sort -rn | cut -d" " -f2-)
      [ -z "$m" ] && break
      echo "$m" | while read -r t; do umount "$t" 2>/dev/null || umount -l "$t" || true; done
    done' sh "$D2" "/run/containerd/"
}

node2_down() {
  [[ -d $R2 ]] || return 0
  # Best effort, to the end: what is already gone makes no step fail.
  local -
  set +e
  if [[ -f /sys/fs/cgroup/freezer${CG2}/freezer.state ]]; then
    echo THAWED >/sys/fs/cgroup/freezer${CG2}/freezer.state 2>/dev/null
  fi
  n2_stop kubelet
  if [[ -S $R2/containerd.sock ]]; then
    local t c
    for t in $(n2_ctr tasks ls -q 2>/dev/null); do n2_ctr tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
    sleep 1
    for t in $(n2_ctr tasks ls -q 2>/dev/null); do n2_ctr tasks delete -f "$t" >/dev/null 2>&1; done
    for c in $(n2_ctr containers ls -q 2>/dev/null); do n2_ctr containers delete "$c" >/dev/null 2>&1; done
  fi
  n2_stop containerd
  n2_kill_shims
  n2_stop relay-node
  n2_stop relay-host
  # What a run that failed left staged there goes as with a reboot.
  local devices d
  devices=$([[ -f $R2/mnt ]] && mountpoint -q "$R2/mnt" && n2_loop_devices) || true
  node2_unmount_all
  if [[ -f $R2/mnt ]] && mountpoint -q "$R2/mnt"; then
    n2 sh -c 'umount -l /var/lib/kubelet /var/log/pods /var/log/containers /run/containerd' 2>/dev/null
    umount "$R2/mnt"
  fi
  for d in $devices; do losetup -d "$d" 2>/dev/null; done
  mountpoint -q "$R2/uts" 2>/dev/null && umount "$R2/uts"
  ip netns list | grep -qw $N2 && ip netns del $N2
  mountpoint -q "$R2" && umount "$R2"
  local h
  for h in /sys/fs/cgroup/*/; do
    [[ -d $h${CG2#/} ]] && find "$h${CG2#/}" -depth -type d -exec rmdir {} \; 2>/dev/null
  done
  kubectl delete node $N2 --ignore-not-found --wait=false >/dev/null 2>&1
  rm -rf "$R2" "$D2"
  rmdir "${R2%/*}" "${D2%/*}" 2>/dev/null
  true
}

# Tears node 2 down and checks it left nothing: no process of its own, no
# process in its network namespace, no namespace, no mount.
node2_gone() {
  local pids netns left p
  pids=$(cat "$R2"/*.pid 2>/dev/null)
  netns=$(stat -L -c %i /run/netns/$N2 2>/dev/null)
  node2_down
  left=0
  for p in $pids; do kill -0 "$p" 2>/dev/null && left=$((left + 1)); done
  expect "node 2: no process of its own left" "$left" 0
  left=0
  if [[ -n $netns ]]; then
    for p in /proc/[0-9]*/ns/net; do
      [[ $(readlink "$p" 2>/dev/null) == "net:[$netns]" ]] && left=$((left + 1))
    done
  fi
  expect "node 2: no process in its network namespace left" "$left" 0
  expect "node 2: no namespace left" "$(ip netns list | grep -c "^$N2\b" || true)" 0
  expect "node 2: no mount left" "$(findmnt -rn -o TARGET | grep -c -E "^($R2|$D2)" || true)" 0
  expect "node 2: no cgroup left" "$(find /sys/fs/cgroup/*/ -maxdepth 1 -name "${CG2#/}" | wc -l)" 0
}
