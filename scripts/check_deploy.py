"""Cross-reference checks on rendered deploy manifests: the mistakes a
schema cannot see. Usage: check_deploy.py RENDERED.yaml... Each file is
checked on its own (one rendering = one installation)."""

import sys

import yaml

DEFAULT_DRIVER = "filevol.csi.rs"


class Checker:
    def __init__(self, path):
        self.path = path
        self.failures = []
        with open(path) as f:
            self.objects = [o for o in yaml.safe_load_all(f) if o]

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
        return self.failures

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


def main(paths):
    checked, failures = 0, []
    for path in paths:
        failures += Checker(path).run()
        checked += 1
    for f in failures:
        print(f"check_deploy: {f}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
