"""Cross-reference checks on rendered deploy manifests: the mistakes a
schema cannot see. Each file is checked on its own (one rendering = one
installation).

Usage:
  check_deploy.py [--filevol BIN] [--allow-unadvertised-snapshot-metadata] RENDERED.yaml...
  check_deploy.py --self-test [--filevol BIN] [--allow-...] RENDERED.yaml...
      breaks the renderings one way per class of mistake (each on the first
      rendering it applies to) and fails unless every broken copy is caught.

--allow-unadvertised-snapshot-metadata: with --filevol, a
csi-snapshot-metadata sidecar beside a filevol that does not advertise
SNAPSHOT_METADATA_SERVICE is printed as a warning instead of failing. The
binary is asked with a pool in a temporary directory of this machine, so
the answer also depends on that filesystem (a pool that cannot reflink gets
no SnapshotMetadata service), not only on the binary and the flags.

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
- csi-snapshot-metadata v1.1.0 (external-snapshot-metadata,
  pkg/sidecar/sidecar.go): --port (gRPC, TLS, default 50051),
  --http-endpoint (default :8080) serving /health and /metrics, --tls-cert
  and --tls-key (files), --audience (else read from the
  SnapshotMetadataService named after the driver, pkg/internal/server/grpc/
  auth.go:71-83). It exits unless the driver advertises
  SNAPSHOT_METADATA_SERVICE (pkg/internal/runtime/runtime.go:199-218), or
  when its HTTP port is taken. Per call it reviews the client's token
  (tokenreviews create), checks the client may get volumesnapshots in the
  namespace (subjectaccessreviews create), and reads the VolumeSnapshot,
  its VolumeSnapshotContent and VolumeSnapshotClass (snapshotter secrets).
  The SnapshotMetadataService (cbt.storage.k8s.io/v1beta1 from v1.0.0,
  cluster-scoped) needs spec.address, spec.audience and spec.caCert
  (base64); kubernetes-validate has no schema for it, so it is checked here.
"""

import base64
import binascii
import copy
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
# The Kubernetes API calls csi-snapshot-metadata v1.1.0 makes, all
# cluster-wide: (group, resource, verb).
SNAPSHOT_METADATA_RULES = (
    ("authentication.k8s.io", "tokenreviews", "create"),
    ("authorization.k8s.io", "subjectaccessreviews", "create"),
    ("snapshot.storage.k8s.io", "volumesnapshots", "get"),
    ("snapshot.storage.k8s.io", "volumesnapshotcontents", "get"),
    ("snapshot.storage.k8s.io", "volumesnapshotclasses", "get"),
    ("snapshot.storage.k8s.io", "volumesnapshotclasses", "list"),
)
# Read unless the sidecar is given --audience.
SNAPSHOT_METADATA_AUDIENCE_RULE = ("cbt.storage.k8s.io", "snapshotmetadataservices", "get")
SNAPSHOT_METADATA_API = "cbt.storage.k8s.io/v1beta1"

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


def socket_path(address):
    """A sidecar's --csi-address or filevol's --endpoint as a path."""
    return address[len("unix://"):] if address.startswith("unix://") else address


def on_volume(c, path):
    """(volume name, path inside the volume) of a path in container c, by
    its deepest volumeMount; None when no mount holds it."""
    mount = max(
        (m for m in c.get("volumeMounts", []) if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")),
        key=lambda m: len(m["mountPath"]),
        default=None,
    )
    if mount is None:
        return None
    return mount["name"], path[len(mount["mountPath"].rstrip("/")):].lstrip("/")


def endpoint_port(endpoint):
    return int(endpoint.rsplit(":", 1)[1])


def listening(c):
    """The TCP ports a container listens on by its flags (and the defaults
    of the flags it leaves out where a default listens)."""
    args = c.get("args", [])
    name = image_name(c.get("image", ""))
    ports = []
    endpoint = arg(args, "--http-endpoint")
    if name == "csi-snapshot-metadata":
        ports.append(endpoint_port(endpoint or ":8080"))
        ports.append(int(arg(args, "--port") or 50051))
    elif endpoint:
        ports.append(endpoint_port(endpoint))
    if name == "livenessprobe":
        ports.append(int(arg(args, "--health-port") or 9808))
    metrics = arg(args, "--metrics-address")
    if "serve" in args and metrics:
        ports.append(endpoint_port(metrics))
    return ports


class Checker:
    def __init__(self, path, objects=None, filevol=None, unadvertised_ok=False):
        self.path = path
        self.failures = []
        self.warnings = []
        self.filevol = filevol
        # With --filevol: a csi-snapshot-metadata sidecar beside a filevol
        # that does not advertise SNAPSHOT_METADATA_SERVICE is a warning, not
        # a failure (--allow-unadvertised-snapshot-metadata).
        self.unadvertised_ok = unadvertised_ok
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
        self.snapshot_metadata(driver)
        self.lock_refusal()
        self.ephemeral_modes()
        if self.filevol:
            self.topology()
        return self.failures

    def containers(self):
        for where, obj, spec in self.workloads():
            for c in spec["containers"]:
                yield f"{where}/{c['name']}", obj, spec, c

    def probes(self, where, spec):
        """Each httpGet liveness or readiness probe must ask for a path that
        a container of the pod serves on that port, given its flags."""
        served = {}  # port -> set of paths
        named = {}
        for c in spec["containers"]:
            args = c.get("args", [])
            for p in c.get("ports", []):
                if "name" in p:
                    named[p["name"]] = p["containerPort"]
            name = image_name(c.get("image", ""))
            endpoint = arg(args, "--http-endpoint")
            if name == "csi-snapshot-metadata":
                paths = served.setdefault(endpoint_port(endpoint or ":8080"), set())
                paths.add("/health")
                if "--disable-metrics" not in args and "--disable-metrics=true" not in args:
                    paths.add("/metrics")
            elif endpoint:
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
            for kind in ("liveness", "readiness"):
                get = c.get(f"{kind}Probe", {}).get("httpGet")
                if not get:
                    continue
                port = named.get(get["port"], get["port"])
                if get["path"] not in served.get(port, set()):
                    self.fail(
                        f"{where}/{c['name']}",
                        f"{kind} probe asks for {get['path']} on port {get['port']}, but the pod's flags serve "
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

    def allows(self, sa, namespace, group, resource, verb):
        """Whether ServiceAccount namespace/sa may do verb on resource
        cluster-wide: a ClusterRoleBinding to a ClusterRole with that rule."""
        for b in self.of_kind("ClusterRoleBinding"):
            if not any(
                s["kind"] == "ServiceAccount" and s["name"] == sa and s.get("namespace") == namespace
                for s in b.get("subjects", [])
            ):
                continue
            for role in self.of_kind("ClusterRole"):
                if role["metadata"]["name"] != b["roleRef"]["name"]:
                    continue
                for rule in role.get("rules", []):
                    if (
                        group in rule.get("apiGroups", []) or "*" in rule.get("apiGroups", [])
                    ) and (
                        resource in rule.get("resources", []) or "*" in rule.get("resources", [])
                    ) and (verb in rule.get("verbs", []) or "*" in rule.get("verbs", [])):
                        return True
        return False

    def snapshot_metadata(self, driver):
        """The external-snapshot-metadata sidecar, its Service, its RBAC and
        the SnapshotMetadataService that advertises it, as each refers to
        the others."""
        services = self.of_kind("SnapshotMetadataService")
        sidecars = [
            (where, obj, spec, c)
            for where, obj, spec, c in self.containers()
            if image_name(c.get("image", "")) == "csi-snapshot-metadata"
        ]
        for o in services:
            w = f"SnapshotMetadataService/{o['metadata']['name']}"
            if o.get("apiVersion") != SNAPSHOT_METADATA_API:
                self.fail(w, f"{o.get('apiVersion')}: csi-snapshot-metadata v1.0.0 and later read {SNAPSHOT_METADATA_API}")
            if o["metadata"].get("namespace"):
                self.fail(w, "SnapshotMetadataService is cluster-scoped: no namespace")
            if driver and o["metadata"]["name"] != driver:
                self.fail(w, f"its name must be the CSI driver's, {driver}: clients and the sidecar look it up by that name")
            spec = o.get("spec") or {}
            unknown = sorted(set(spec) - {"address", "audience", "caCert"})
            if unknown:
                self.fail(w, f"unknown spec fields {unknown} (the v1beta1 CRD has address, audience, caCert)")
            for field in ("address", "audience", "caCert"):
                if not isinstance(spec.get(field), str) or not spec.get(field):
                    self.fail(w, f"spec.{field} is required and must be a non-empty string")
            try:
                base64.b64decode(spec.get("caCert") or "", validate=True)
            except (binascii.Error, ValueError):
                self.fail(w, "spec.caCert is not base64 (the CRD's format: byte; the base64 of the PEM CA certificate)")
            if not sidecars:
                self.fail(w, "no csi-snapshot-metadata sidecar is deployed: clients would find no server at its address")
        if sidecars and not services:
            self.fail(sidecars[0][0], "no SnapshotMetadataService advertises this sidecar: clients cannot find it")
        for where, obj, spec, c in sidecars:
            args = c.get("args", [])
            namespace = obj["metadata"].get("namespace")
            tag = image_tag(c.get("image", ""))
            if version(tag) < (1, 0, 0):
                self.fail(where, f"{tag}: before v1.0.0 the sidecar reads cbt.storage.k8s.io/v1alpha1, this layout serves v1beta1")
            # TLS: each file on a Secret volume, under a key the Secret has.
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            for flag, key in (("--tls-cert", "tls.crt"), ("--tls-key", "tls.key")):
                path = arg(args, flag)
                if not path:
                    self.fail(where, f"{flag} is not set: the gRPC server needs TLS")
                    continue
                found = on_volume(c, path)
                secret = volumes.get(found[0], {}).get("secret") if found else None
                if secret is None:
                    self.fail(where, f"{flag} {path} is on no Secret volume of the container")
                    continue
                items = secret.get("items")
                keys = [i["path"] for i in items] if items else [key]
                if found[1] not in keys:
                    self.fail(
                        where,
                        f"{flag} {path} names {found[1]!r} in Secret {secret.get('secretName')}, which holds {keys}"
                        + ("" if items else " (a kubernetes.io/tls Secret, as kubectl and cert-manager make it)"),
                    )
            # The Service that reaches the gRPC port.
            grpc_port = int(arg(args, "--port") or 50051)
            named = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
            labels = obj["spec"]["template"]["metadata"].get("labels", {}) if obj.get("kind") != "Pod" else obj["metadata"].get("labels", {})
            reaching = []
            for svc in self.of_kind("Service"):
                selector = svc["spec"].get("selector") or {}
                if svc["metadata"].get("namespace") != namespace or not selector:
                    continue
                if any(labels.get(k) != v for k, v in selector.items()):
                    continue
                for p in svc["spec"].get("ports", []):
                    target = p.get("targetPort", p["port"])
                    if named.get(target, target) == grpc_port:
                        reaching.append((svc["metadata"]["name"], p["port"]))
            if not reaching:
                self.fail(
                    where,
                    f"no Service in {namespace} selects this pod ({labels}) with a targetPort that is the gRPC --port {grpc_port}",
                )
            addresses = {
                f"{name}.{namespace}{suffix}:{port}"
                for name, port in reaching
                for suffix in ("", ".svc", ".svc.cluster.local")
            }
            for o in services:
                address = (o.get("spec") or {}).get("address")
                if reaching and address not in addresses:
                    self.fail(
                        f"SnapshotMetadataService/{o['metadata']['name']}",
                        f"address {address} is not the sidecar's Service: {' or '.join(sorted(addresses))}",
                    )
                audience = arg(args, "--audience")
                if audience and audience != (o.get("spec") or {}).get("audience"):
                    self.fail(where, f"--audience {audience} differs from the SnapshotMetadataService's: clients' tokens would be refused")
            # RBAC for the calls the sidecar makes.
            sa = spec.get("serviceAccountName", "default")
            needed = list(SNAPSHOT_METADATA_RULES)
            if not arg(args, "--audience"):
                needed.append(SNAPSHOT_METADATA_AUDIENCE_RULE)
            for group, resource, verb in needed:
                if not self.allows(sa, namespace, group, resource, verb):
                    self.fail(
                        where,
                        f"ServiceAccount {namespace}/{sa} may not {verb} {resource}.{group or 'core'} cluster-wide "
                        "(a ClusterRoleBinding to a ClusterRole with that rule)",
                    )
            # The driver must advertise the service, or the sidecar exits.
            if self.filevol:
                for c2 in spec["containers"]:
                    a2 = c2.get("args", [])
                    if "serve" not in a2 or (arg(a2, "--mode") or "all") not in ("controller", "all"):
                        continue
                    if "SNAPSHOT_METADATA_SERVICE" in ask_filevol(self.filevol, a2, "identity"):
                        continue
                    message = (
                        f"{self.filevol} with the flags of {c2['name']} (its pool a temporary directory here) does not "
                        "advertise SNAPSHOT_METADATA_SERVICE: csi-snapshot-metadata exits at start "
                        "(runtime.go:199-218 at v1.1.0)"
                    )
                    if self.unadvertised_ok:
                        self.warnings.append(f"{self.path}: {where}: {message}")
                    else:
                        self.fail(where, message)

    def lock_refusal(self):
        """No shipped workload lifts the refusal of a shared pool whose locks
        may stay on one host (`--allow-host-local-locks`): on a real cluster
        the driver must find out that the share does not fence across nodes
        (src/pool/lock_reach.rs)."""
        for where, _, _, c in self.containers():
            if any(a.split("=", 1)[0] == "--allow-host-local-locks" for a in c.get("args", [])):
                self.fail(where, "passes --allow-host-local-locks: a share whose locks stay on one host would then fence nothing")
            if any(e.get("name") == "FILEVOL_ALLOW_HOST_LOCAL_LOCKS" for e in c.get("env", [])):
                self.fail(where, "sets FILEVOL_ALLOW_HOST_LOCAL_LOCKS: a share whose locks stay on one host would then fence nothing")

    def ephemeral_modes(self):
        """The CSIDriver lists the Ephemeral lifecycle mode exactly where the
        node plugins make CSI ephemeral inline volumes (`--ephemeral-inline`,
        off by default): without the mode kubelet refuses every inline
        volume itself and the flag is dead; with the mode and without the
        flag every pod with one stays in ContainerCreating
        (FAILED_PRECONDITION from the node plugin)."""
        for d in self.of_kind("CSIDriver"):
            # Kubernetes' default when the field is left out.
            listed = "Ephemeral" in d["spec"].get("volumeLifecycleModes", ["Persistent"])
            for where, _, _, c in self.containers():
                args = c.get("args", [])
                if "serve" not in args or (arg(args, "--mode") or "all") not in ("node", "all"):
                    continue
                on = "--ephemeral-inline" in args or any(
                    e.get("name") == "FILEVOL_EPHEMERAL_INLINE" and str(e.get("value", "")).lower() in ("true", "1", "yes", "on")
                    for e in c.get("env", [])
                )
                if listed and not on:
                    self.fail(
                        where,
                        f"CSIDriver/{d['metadata']['name']} lists the Ephemeral lifecycle mode but this node "
                        "plugin does not make ephemeral inline volumes (no --ephemeral-inline): every pod with "
                        "one would stay in ContainerCreating",
                    )
                if on and not listed:
                    self.fail(
                        where,
                        f"passes --ephemeral-inline but CSIDriver/{d['metadata']['name']} does not list the "
                        "Ephemeral lifecycle mode: kubelet refuses every inline volume before it reaches the driver",
                    )

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
                    "(scripts/check/e2e-k8s.sh, shared-pool)",
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
        socket_served = None  # (volume, path inside it) of the driver's socket
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
                    socket_served = on_volume(c, endpoint[len("unix://"):])
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
        # The pod's containers share one network namespace: two listeners on
        # one port and the second exits ("address already in use").
        owner = {}
        for c in spec["containers"]:
            for port in listening(c):
                if port in owner and owner[port] != c["name"]:
                    self.fail(f"{where}/{c['name']}", f"its flags listen on port {port}, which {owner[port]} listens on")
                owner.setdefault(port, c["name"])
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
                elif socket_served and on_volume(c, socket_path(address)) != socket_served:
                    self.fail(
                        cw,
                        f"--csi-address {address} is {on_volume(c, socket_path(address))[1]} on volume "
                        f"{mount['name']}, the driver serves {socket_served[1]} there",
                    )
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
        for kind in ("ClusterRoleBinding", "RoleBinding"):
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
        # The pool here is a local temporary directory, not the share a
        # shared-pool workload mounts: its locks reach only this host, which
        # `--topology=` refuses. One process on one host asks what the flags
        # advertise, so the refusal is lifted for it alone, by environment
        # (a flag would clash with one a workload might carry).
        server_env = dict(env, FILEVOL_ALLOW_HOST_LOCAL_LOCKS="true")
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=server_env)
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


def break_lock_refusal(objs):
    container(objs, "DaemonSet", "filevol-node", "filevol")["args"].append("--allow-host-local-locks")


def break_ephemeral_mode(objs):
    for o in objs:
        if o.get("kind") == "CSIDriver":
            o["spec"]["volumeLifecycleModes"].append("Ephemeral")


def break_ephemeral_flag(objs):
    container(objs, "DaemonSet", "filevol-node", "filevol")["args"].append("--ephemeral-inline")


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


def snapshot_metadata_sidecar(objs):
    return container(objs, "StatefulSet", "filevol-controller", "csi-snapshot-metadata")


def break_snapshot_metadata_port(objs):
    # Left at its default :8080, which csi-provisioner holds.
    c = snapshot_metadata_sidecar(objs)
    c["args"] = [a for a in c["args"] if not a.startswith("--http-endpoint=")]


def break_snapshot_metadata_socket(objs):
    # The right volume, a socket the driver does not serve.
    c = snapshot_metadata_sidecar(objs)
    c["args"] = [a + "k" if a.startswith("--csi-address=") else a for a in c["args"]]


def break_snapshot_metadata_tls(objs):
    c = snapshot_metadata_sidecar(objs)
    c["args"] = [a.replace("tls.key", "tls.pem") if a.startswith("--tls-key=") else a for a in c["args"]]


def break_snapshot_metadata_rbac(objs):
    for o in objs:
        if o.get("kind") == "ClusterRole" and any("tokenreviews" in r.get("resources", []) for r in o.get("rules", [])):
            o["rules"] = [r for r in o["rules"] if "tokenreviews" not in r.get("resources", [])]


def break_snapshot_metadata_address(objs):
    for o in objs:
        if o.get("kind") == "SnapshotMetadataService":
            host, port = o["spec"]["address"].rsplit(":", 1)
            o["spec"]["address"] = f"{host}:{int(port) + 1}"


def break_snapshot_metadata_service(objs):
    for o in objs:
        if o.get("kind") == "Service" and any(
            p.get("targetPort") == "snapshot-meta" for p in o["spec"].get("ports", [])
        ):
            o["spec"]["selector"]["app.kubernetes.io/component"] = "node"


def break_snapshot_metadata_name(objs):
    for o in objs:
        if o.get("kind") == "SnapshotMetadataService":
            o["metadata"]["name"] = "filevol"


def deploys_snapshot_metadata(objs):
    return any(o.get("kind") == "SnapshotMetadataService" for o in objs)


# (what, damage, needs --filevol, which renderings it applies to: None for
# the first one given, else a predicate on the objects)
BREAKS = [
    ("a probe path the container's flags do not serve", break_probe_path, False),
    ("a topology flag that disagrees with the advertised capabilities", break_topology, True),
    ("storage capacity tracking without topology", break_capacity_without_topology, True),
    ("a lifted refusal of locks that stay on one host", break_lock_refusal, False),
    ("an Ephemeral lifecycle mode no node plugin serves", break_ephemeral_mode, False),
    ("ephemeral volumes on in the node plugin, off in the CSIDriver", break_ephemeral_flag, False),
    ("a snapshot class with no snapshotter", break_snapshot_sidecar, False),
    ("an expansion class with no resizer", break_resizer, False),
    ("a privileged pod holding controller roles", break_privileged_roles, False),
    ("a feature gate without its prerequisites", break_gate, False),
    ("a pool hostPath that can be created empty", break_host_path, False),
    ("a snapshot-metadata HTTP port another sidecar holds", break_snapshot_metadata_port, False, deploys_snapshot_metadata),
    ("a snapshot-metadata socket the driver does not serve", break_snapshot_metadata_socket, False, deploys_snapshot_metadata),
    ("a TLS key path the Secret volume does not hold", break_snapshot_metadata_tls, False, deploys_snapshot_metadata),
    ("a snapshot-metadata role without tokenreviews", break_snapshot_metadata_rbac, False, deploys_snapshot_metadata),
    ("a SnapshotMetadataService address that is not the Service", break_snapshot_metadata_address, False, deploys_snapshot_metadata),
    ("a SnapshotMetadataService not named after the driver", break_snapshot_metadata_name, False, deploys_snapshot_metadata),
    ("a Service that does not select the controller pods", break_snapshot_metadata_service, False, deploys_snapshot_metadata),
]


def self_test(paths, filevol, unadvertised_ok=False):
    """Each break runs on the first rendering it applies to; every rendering
    given must be clean first. A break that applies to none of them is
    reported and skipped (validate-deploy without kubectl renders no
    overlay)."""
    renderings = []
    for path in paths:
        with open(path) as f:
            objects = [o for o in yaml.safe_load_all(f) if o]
        checker = Checker(path, copy.deepcopy(objects), filevol, unadvertised_ok)
        clean = checker.run()
        for w in checker.warnings:
            print(f"check_deploy: warning: {w}", file=sys.stderr)
        if clean:
            print("check_deploy: the rendering to break is not clean:", *clean, sep="\n  ", file=sys.stderr)
            return 1
        renderings.append((path, objects))
    missed = 0
    for what, damage, needs_binary, *applies in BREAKS:
        if needs_binary and not filevol:
            print(f"check_deploy: self-test needs --filevol for: {what}", file=sys.stderr)
            missed += 1
            continue
        target = next((r for r in renderings if not applies or applies[0](r[1])), None)
        if target is None:
            print(f"check_deploy: self-test: skipped (no rendering it applies to): {what}", file=sys.stderr)
            continue
        path, objects = target
        broken = copy.deepcopy(objects)
        damage(broken)
        found = Checker(f"{path} ({what})", broken, filevol, unadvertised_ok).run()
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
    unadvertised_ok = "--allow-unadvertised-snapshot-metadata" in argv
    argv = [a for a in argv if a != "--allow-unadvertised-snapshot-metadata"]
    if argv and argv[0] == "--self-test":
        return self_test(argv[1:], filevol, unadvertised_ok)
    failures = []
    for path in argv:
        checker = Checker(path, filevol=filevol, unadvertised_ok=unadvertised_ok)
        failures += checker.run()
        for w in checker.warnings:
            print(f"check_deploy: warning: {w}", file=sys.stderr)
    for f in failures:
        print(f"check_deploy: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
