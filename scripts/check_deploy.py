"""Cross-reference checks on rendered deploy manifests: the mistakes a
schema cannot see. Each file is checked on its own (one rendering = one
installation).

Usage:
  check_deploy.py [--filevol BIN] RENDERED.yaml...
  check_deploy.py --self-test [--filevol BIN] RENDERED.yaml
      breaks the rendering one way per class of mistake and fails unless
      every broken copy is caught.

With --filevol, the driver binary itself is asked what it advertises with
the flags each workload passes it (GetPluginCapabilities, NodeGetInfo), so
a topology flag that disagrees with the capabilities is caught as the
sidecars would meet it.

Sidecar behaviour these checks encode, at the pinned tags:
- external-provisioner v6.3.0, external-attacher v4.12.0, external-resizer
  v2.2.1, csi-snapshotter v8.6.0 (csi-lib-utils v0.24.0): `--http-endpoint`
  always serves /metrics; /healthz/leader-election only with
  `--leader-election` (csi-lib-utils leaderelection/leader_election.go:
  231-246, 53). csi-node-driver-registrar v2.17.0 serves /healthz there.
  livenessprobe v2.19.0 serves /healthz on `--health-port`.
- external-provisioner v6.3.0 fails every claim when the driver advertises
  VOLUME_ACCESSIBILITY_CONSTRAINTS and the node reports no topology keys
  (pkg/controller/topology.go:191-207).
- csi-snapshotter v8.6.0 with CSIVolumeGroupSnapshot watches the
  groupsnapshot v1 API and stalls all snapshot work until those CRDs exist
  (cmd/csi-snapshotter/main.go:285-286); it refuses leader election with
  --node-deployment, and a node deployment never sees group contents.
"""

import copy
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import yaml

DEFAULT_DRIVER = "filevol.csi.rs"

# Sidecar images whose --http-endpoint serves /metrics, and
# /healthz/leader-election with --leader-election.
LEADER_SIDECARS = (
    "csi-provisioner",
    "csi-attacher",
    "csi-snapshotter",
    "csi-resizer",
    "csi-external-health-monitor-controller",
)
# Roles only a controller needs; a privileged (node) pod must not hold them.
CONTROLLER_ROLE = re.compile(r"(attacher|resizer|health-monitor)")


def arg(args, flag):
    """The value of `--flag=value` in args, or None."""
    for a in args:
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def image_name(image):
    return image.rsplit("/", 1)[-1].split(":", 1)[0]


def image_tag(image):
    last = image.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else ""


def version(tag):
    return tuple(int(x) for x in re.findall(r"\d+", tag)[:3])


class Checker:
    def __init__(self, path, objects=None, filevol=None):
        self.path = path
        self.failures = []
        self.filevol = filevol
        if objects is None:
            with open(path) as f:
                objects = [o for o in yaml.safe_load_all(f) if o]
        self.objects = objects

    def fail(self, where, message):
        self.failures.append(f"{self.path}: {where}: {message}")

    def of_kind(self, kind):
        return [o for o in self.objects if o.get("kind") == kind]

    def named(self, kind, name, namespace=None):
        return any(
            o["metadata"]["name"] == name
            and (namespace is None or o["metadata"].get("namespace") == namespace)
            for o in self.of_kind(kind)
        )

    def workloads(self):
        for kind in ("StatefulSet", "DaemonSet", "Deployment", "Pod"):
            for o in self.of_kind(kind):
                spec = o["spec"] if kind == "Pod" else o["spec"]["template"]["spec"]
                yield f"{kind}/{o['metadata']['name']}", o, spec

    def run(self):
        drivers = [o["metadata"]["name"] for o in self.of_kind("CSIDriver")]
        driver = drivers[0] if drivers else None
        for where, obj, spec in self.workloads():
            self.pod(where, obj, spec, driver)
        if driver:
            self.classes(driver)
        self.rbac()
        self.served_classes()
        self.group_snapshot_gate()
        self.privileged_roles()
        if self.filevol:
            self.topology()
        return self.failures

    def containers(self):
        for where, obj, spec in self.workloads():
            for c in spec["containers"]:
                yield f"{where}/{c['name']}", obj, spec, c

    def probes(self, where, spec):
        """Each httpGet liveness probe must ask for a path that a container
        of the pod serves on that port, given its flags."""
        served = {}  # port -> set of paths
        named = {}
        for c in spec["containers"]:
            args = c.get("args", [])
            for p in c.get("ports", []):
                if "name" in p:
                    named[p["name"]] = p["containerPort"]
            name = image_name(c.get("image", ""))
            endpoint = arg(args, "--http-endpoint")
            if endpoint:
                port = int(endpoint.rsplit(":", 1)[1])
                paths = served.setdefault(port, set())
                if name == "csi-node-driver-registrar":
                    paths.add("/healthz")
                elif name in LEADER_SIDECARS:
                    paths.add("/metrics")
                    if "--leader-election" in args or "--leader-election=true" in args:
                        paths.add("/healthz/leader-election")
            health = arg(args, "--health-port")
            if name == "livenessprobe":
                served.setdefault(int(health or 9808), set()).add("/healthz")
            metrics = arg(args, "--metrics-address")
            if "serve" in args and metrics:
                served.setdefault(int(metrics.rsplit(":", 1)[1]), set()).add("/metrics")
        for c in spec["containers"]:
            get = c.get("livenessProbe", {}).get("httpGet")
            if not get:
                continue
            port = named.get(get["port"], get["port"])
            if get["path"] not in served.get(port, set()):
                self.fail(
                    f"{where}/{c['name']}",
                    f"liveness probe asks for {get['path']} on port {get['port']}, but the pod's flags serve "
                    f"{sorted(served.get(port, set())) or 'nothing'} there",
                )

    def pool_host_paths(self, where, spec, c):
        """The pool must never be created empty by kubelet: a hostPath of
        type DirectoryOrCreate (or none) at the pool turns a missing share
        or a wrong node into an empty pool that answers every call."""
        pool = arg(c.get("args", []), "--pool")
        if not pool:
            return
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        mount = max(
            (m for m in c.get("volumeMounts", []) if pool == m["mountPath"] or pool.startswith(m["mountPath"].rstrip("/") + "/")),
            key=lambda m: len(m["mountPath"]),
            default=None,
        )
        if mount is None:
            self.fail(f"{where}/{c['name']}", f"--pool {pool} is on no volumeMount")
            return
        host = volumes.get(mount["name"], {}).get("hostPath")
        if host is not None and host.get("type") != "Directory":
            self.fail(
                f"{where}/{c['name']}",
                f"the pool's hostPath {host.get('path')} has type {host.get('type', 'unset')}: kubelet would create it empty; use Directory",
            )

    def served_classes(self):
        images = [image_name(c.get("image", "")) for _, _, _, c in self.containers()]
        for o in self.of_kind("VolumeSnapshotClass") + self.of_kind("VolumeGroupSnapshotClass"):
            if "csi-snapshotter" not in images:
                self.fail(f"{o['kind']}/{o['metadata']['name']}", "no csi-snapshotter is deployed: snapshots would never become ready")
        for o in self.of_kind("StorageClass"):
            if o.get("allowVolumeExpansion") and "csi-resizer" not in images:
                self.fail(
                    f"StorageClass/{o['metadata']['name']}",
                    "allowVolumeExpansion is true but no csi-resizer is deployed: resizes would stay pending",
                )

    def group_snapshot_gate(self):
        gated = []
        for where, _, _, c in self.containers():
            args = c.get("args", [])
            if image_name(c.get("image", "")) != "csi-snapshotter":
                continue
            gates = arg(args, "--feature-gates") or ""
            if "CSIVolumeGroupSnapshot=true" not in gates:
                continue
            gated.append(where)
            tag = image_tag(c.get("image", ""))
            if version(tag) < (8, 6, 0):
                self.fail(where, f"the group snapshot gate is documented here for csi-snapshotter v8.6.0, not {tag}")
            if "--node-deployment" in args:
                self.fail(where, "group snapshots do not work with --node-deployment (only snapshot contents get the managed-by label)")
            v1 = [o for o in self.of_kind("VolumeGroupSnapshotClass") if o.get("apiVersion") == "groupsnapshot.storage.k8s.io/v1"]
            if not v1:
                self.fail(
                    where,
                    "CSIVolumeGroupSnapshot is on without a groupsnapshot.storage.k8s.io/v1 VolumeGroupSnapshotClass: "
                    "v8.6.0 watches the v1 API (CRDs of v8.6.0) and stalls every snapshot without it",
                )
        for o in self.of_kind("VolumeGroupSnapshotClass"):
            w = f"VolumeGroupSnapshotClass/{o['metadata']['name']}"
            if o.get("apiVersion") != "groupsnapshot.storage.k8s.io/v1":
                self.fail(w, f"{o.get('apiVersion')}: csi-snapshotter v8.6.0 serves groupsnapshot.storage.k8s.io/v1")
            if not gated:
                self.fail(w, "no csi-snapshotter runs with --feature-gates=CSIVolumeGroupSnapshot=true")

    def bound_roles(self, sa, namespace):
        for kind in ("ClusterRoleBinding", "RoleBinding"):
            for b in self.of_kind(kind):
                for s in b.get("subjects", []):
                    if s["kind"] == "ServiceAccount" and s["name"] == sa and s.get("namespace", b["metadata"].get("namespace")) == namespace:
                        yield b["roleRef"]["name"]

    def privileged_roles(self):
        for where, obj, spec in self.workloads():
            if not any(c.get("securityContext", {}).get("privileged") for c in spec["containers"]):
                continue
            sa = spec.get("serviceAccountName", "default")
            for role in self.bound_roles(sa, obj["metadata"].get("namespace")):
                if CONTROLLER_ROLE.search(role):
                    self.fail(where, f"a privileged pod runs as {sa}, which holds the controller role {role}")

    def topology(self):
        """Asks the driver binary what it advertises with each workload's
        flags: a controller that advertises VOLUME_ACCESSIBILITY_CONSTRAINTS
        needs node plugins that report topology keys."""
        controllers, nodes = [], []
        for where, _, _, c in self.containers():
            args = c.get("args", [])
            if "serve" not in args:
                continue
            mode = arg(args, "--mode") or "all"
            if mode in ("controller", "all"):
                controllers.append((where, args))
            if mode in ("node", "all"):
                nodes.append((where, args))
        advertised = {w: "VOLUME_ACCESSIBILITY_CONSTRAINTS" in ask_filevol(self.filevol, args, "identity") for w, args in controllers}
        reported = {w: "accessible_topology" in ask_filevol(self.filevol, args, "node-info") for w, args in nodes}
        for driver in self.of_kind("CSIDriver"):
            if driver["spec"].get("storageCapacity") and not any(advertised.values()):
                self.fail(
                    f"CSIDriver/{driver['metadata']['name']}",
                    "storageCapacity is true but the driver advertises no topology: on a real cluster no "
                    "CSIStorageCapacity was published for it and the scheduler held every new pod "
                    "(scripts/e2e-k8s.sh, shared-pool)",
                )
        for cw, adv in advertised.items():
            for nw, rep in reported.items():
                if adv and not rep:
                    self.fail(
                        cw,
                        f"advertises VOLUME_ACCESSIBILITY_CONSTRAINTS but {nw} reports no topology: "
                        "external-provisioner fails every claim (\"no topology key found for node\")",
                    )

    def pod(self, where, obj, spec, driver):
        namespace = obj["metadata"].get("namespace")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        sa = spec.get("serviceAccountName")
        if sa and obj.get("kind") != "Pod" and not self.named("ServiceAccount", sa, namespace):
            self.fail(where, f"serviceAccountName {sa} names no ServiceAccount in {namespace}")
        ports = []
        socket_volume = None
        for c in spec["containers"]:
            cw = f"{where}/{c['name']}"
            mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
            for m in mounts.values():
                if m["name"] not in volumes:
                    self.fail(cw, f"volumeMount {m['name']} names no volume of the pod")
            image = c.get("image", "")
            tag = image.rsplit(":", 1)[-1] if ":" in image.rsplit("/", 1)[-1] else ""
            if not tag or tag == "latest":
                self.fail(cw, f"image {image!r} is not pinned by tag")
            res = c.get("resources", {})
            if not res.get("requests") or "memory" not in res.get("limits", {}):
                self.fail(cw, "needs resource requests and a memory limit")
            if "securityContext" not in c:
                self.fail(cw, "has no securityContext")
            if obj.get("kind") != "Pod" and "livenessProbe" not in c:
                self.fail(cw, "has no livenessProbe")
            ports += [p["containerPort"] for p in c.get("ports", [])]
            args = c.get("args", [])
            is_filevol = "serve" in args
            if is_filevol:
                endpoint = next((a.split("=", 1)[1] for a in args if a.startswith("--endpoint=")), None)
                if not endpoint or not endpoint.startswith("unix://"):
                    self.fail(cw, "filevol needs --endpoint=unix:///...")
                    continue
                sock_dir = endpoint[len("unix://"):].rsplit("/", 1)[0]
                if sock_dir not in mounts:
                    self.fail(cw, f"the socket directory {sock_dir} is not a volumeMount")
                else:
                    socket_volume = mounts[sock_dir]["name"]
                name = next((a.split("=", 1)[1] for a in args if a.startswith("--driver-name=")), DEFAULT_DRIVER)
                if driver and name != driver:
                    self.fail(cw, f"driver name {name} differs from the CSIDriver {driver}")
                if "--mode=node" in args or "--mode=all" in args:
                    if not c.get("securityContext", {}).get("privileged"):
                        self.fail(cw, "the node plugin must be privileged (loop devices, mounts)")
                    kubelet = next((a.split("=", 1)[1] for a in args if a.startswith("--kubelet-dir=")), "/var/lib/kubelet")
                    for sub in ("pods", "plugins"):
                        path = f"{kubelet}/{sub}"
                        m = mounts.get(path)
                        if not m:
                            self.fail(cw, f"{path} is not mounted: kubelet's paths would not exist")
                        elif m.get("mountPropagation") != "Bidirectional":
                            self.fail(cw, f"{path} must be mountPropagation: Bidirectional")
        if len(ports) != len(set(ports)):
            self.fail(where, f"containers share a port: {sorted(ports)}")
        self.probes(where, spec)
        for c in spec["containers"]:
            if "serve" in c.get("args", []):
                self.pool_host_paths(where, spec, c)
        # Every sidecar talks to the driver's socket through the same volume.
        for c in spec["containers"]:
            for a in c.get("args", []):
                if not a.startswith("--csi-address="):
                    continue
                cw = f"{where}/{c['name']}"
                address = a.split("=", 1)[1]
                sock_dir = address.rsplit("/", 1)[0]
                mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == sock_dir), None)
                if mount is None:
                    self.fail(cw, f"--csi-address {address}: {sock_dir} is not mounted")
                elif socket_volume and mount["name"] != socket_volume:
                    self.fail(cw, f"--csi-address is on volume {mount['name']}, the driver's socket on {socket_volume}")
            for a in c.get("args", []):
                if a.startswith("--kubelet-registration-path="):
                    path = a.split("=", 1)[1]
                    host = volumes.get(socket_volume, {}).get("hostPath", {}).get("path")
                    if host is None or path != f"{host}/csi.sock":
                        self.fail(f"{where}/{c['name']}", f"registration path {path} is not the driver's socket on the host ({host}/csi.sock)")
                    if driver and f"/{driver}/" not in path:
                        self.fail(f"{where}/{c['name']}", f"registration path {path} does not name the driver {driver}")

    def classes(self, driver):
        for o in self.of_kind("StorageClass"):
            if o["provisioner"] != driver:
                self.fail(f"StorageClass/{o['metadata']['name']}", f"provisioner {o['provisioner']} is not {driver}")
        for kind in ("VolumeSnapshotClass", "VolumeGroupSnapshotClass"):
            for o in self.of_kind(kind):
                w = f"{kind}/{o['metadata']['name']}"
                if o.get("driver") != driver:
                    self.fail(w, f"driver {o.get('driver')} is not {driver}")
                if o.get("deletionPolicy") not in ("Delete", "Retain"):
                    self.fail(w, "deletionPolicy must be Delete or Retain")

    def rbac(self):
        for kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
            for b in self.of_kind(kind):
                w = f"{kind}/{b['metadata']['name']}"
                ns = b["metadata"].get("namespace")
                ref = b["roleRef"]
                if not self.named(ref["kind"], ref["name"], ns if ref["kind"] == "Role" else None):
                    self.fail(w, f"roleRef {ref['kind']}/{ref['name']} does not exist")
                for s in b.get("subjects", []):
                    if s["kind"] == "ServiceAccount" and not self.named("ServiceAccount", s["name"], s.get("namespace", ns)):
                        self.fail(w, f"subject ServiceAccount {s.get('namespace')}/{s['name']} does not exist")


def ask_filevol(binary, args, what):
    """Runs `filevol serve` with a workload's flags (paths moved into a
    temporary directory) and returns what `filevol client <what>` prints."""
    with tempfile.TemporaryDirectory() as tmp:
        keep = []
        for a in args:
            if a.split("=", 1)[0] in ("--endpoint", "--pool", "--kubelet-dir", "--metrics-address", "--node-id"):
                continue
            keep.append(a)
        os.makedirs(f"{tmp}/pool")
        os.makedirs(f"{tmp}/kubelet")
        sock = f"unix://{tmp}/csi.sock"
        cmd = [binary] + keep + [f"--endpoint={sock}", f"--pool={tmp}/pool", f"--kubelet-dir={tmp}/kubelet", "--node-id=check-node"]
        env = {k: v for k, v in os.environ.items() if not k.startswith("FILEVOL_")}
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        try:
            for _ in range(200):
                if os.path.exists(f"{tmp}/csi.sock"):
                    break
                time.sleep(0.05)
            out = subprocess.run(
                [binary, "client", f"--endpoint={sock}", "--log-level=warn", what],
                capture_output=True, text=True, timeout=30, env=env,
            )
            return out.stdout + out.stderr
        finally:
            server.terminate()
            server.wait(timeout=30)


def workload_containers(objects, kind, name):
    for o in objects:
        if o.get("kind") == kind and o["metadata"]["name"] == name:
            yield from o["spec"]["template"]["spec"]["containers"]


def container(objects, kind, name, cname):
    return next(c for c in workload_containers(objects, kind, name) if c["name"] == cname)


# Each class of mistake, made on purpose on a copy of the default rendering.
def break_probe_path(objs):
    c = container(objs, "StatefulSet", "filevol-controller", "csi-attacher")
    c["args"] = [a for a in c["args"] if a != "--leader-election"]


def break_topology(objs):
    c = container(objs, "DaemonSet", "filevol-node", "filevol")
    c["args"].append("--topology=")


def break_capacity_without_topology(objs):
    for kind, name in (("StatefulSet", "filevol-controller"), ("DaemonSet", "filevol-node")):
        container(objs, kind, name, "filevol")["args"].append("--topology=")


def break_snapshot_sidecar(objs):
    for o in objs:
        if o.get("kind") == "StatefulSet":
            spec = o["spec"]["template"]["spec"]
            spec["containers"] = [c for c in spec["containers"] if c["name"] != "csi-snapshotter"]


def break_resizer(objs):
    for o in objs:
        if o.get("kind") == "StatefulSet":
            spec = o["spec"]["template"]["spec"]
            spec["containers"] = [c for c in spec["containers"] if c["name"] != "csi-resizer"]


def break_privileged_roles(objs):
    for o in objs:
        if o.get("kind") == "DaemonSet":
            o["spec"]["template"]["spec"]["serviceAccountName"] = "filevol-controller"


def break_gate(objs):
    c = container(objs, "StatefulSet", "filevol-controller", "csi-snapshotter")
    c["args"].append("--feature-gates=CSIVolumeGroupSnapshot=true")


def break_host_path(objs):
    for o in objs:
        if o.get("kind") == "StatefulSet":
            for v in o["spec"]["template"]["spec"]["volumes"]:
                if v["name"] == "pool":
                    v["hostPath"]["type"] = "DirectoryOrCreate"


BREAKS = [
    ("a probe path the container's flags do not serve", break_probe_path, False),
    ("a topology flag that disagrees with the advertised capabilities", break_topology, True),
    ("storage capacity tracking without topology", break_capacity_without_topology, True),
    ("a snapshot class with no snapshotter", break_snapshot_sidecar, False),
    ("an expansion class with no resizer", break_resizer, False),
    ("a privileged pod holding controller roles", break_privileged_roles, False),
    ("a feature gate without its prerequisites", break_gate, False),
    ("a pool hostPath that can be created empty", break_host_path, False),
]


def self_test(path, filevol):
    with open(path) as f:
        objects = [o for o in yaml.safe_load_all(f) if o]
    clean = Checker(path, copy.deepcopy(objects), filevol).run()
    if clean:
        print("check_deploy: the rendering to break is not clean:", *clean, sep="\n  ", file=sys.stderr)
        return 1
    missed = 0
    for what, damage, needs_binary in BREAKS:
        if needs_binary and not filevol:
            print(f"check_deploy: self-test needs --filevol for: {what}", file=sys.stderr)
            missed += 1
            continue
        broken = copy.deepcopy(objects)
        damage(broken)
        found = Checker(f"{path} ({what})", broken, filevol).run()
        if not found:
            print(f"check_deploy: self-test: missed {what}", file=sys.stderr)
            missed += 1
        else:
            print(f"check_deploy: self-test: caught {what}: {found[0].split(': ', 1)[1]}")
    return 1 if missed else 0


def main(argv):
    filevol = None
    if "--filevol" in argv:
        i = argv.index("--filevol")
        filevol = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    if argv and argv[0] == "--self-test":
        return self_test(argv[1], filevol)
    failures = []
    for path in argv:
        failures += Checker(path, filevol=filevol).run()
    for f in failures:
        print(f"check_deploy: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
