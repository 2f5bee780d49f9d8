"""Checks the Nomad jobs in deploy/nomad: they parse as HCL, run filevol
with the driver name of the CSIDriver, put the socket in the plugin's
mount_dir, and give the node plugin the privileges and the staging base
directory it needs. Usage: check_nomad.py FILE.nomad.hcl..."""

import sys

import hcl2

DRIVER = "filevol.csi.rs"


def tasks(doc):
    for job in doc.get("job", []):
        for job_name, job_body in job.items():
            for group in job_body.get("group", []):
                for _, group_body in group.items():
                    for task in group_body.get("task", []):
                        for task_name, body in task.items():
                            yield f"{job_name}/{task_name}", body


def check(path):
    failures = []
    with open(path) as f:
        doc = hcl2.load(f)
    found = False
    for where, task in tasks(doc):
        plugin = (task.get("csi_plugin") or [None])[0]
        if not plugin:
            continue
        found = True
        config = task["config"][0]
        args = config.get("args", [])
        if plugin["id"] != DRIVER:
            failures.append(f"{where}: csi_plugin id {plugin['id']} is not {DRIVER}")
        endpoint = next((a.split("=", 1)[1] for a in args if a.startswith("--endpoint=")), "")
        if endpoint != f"unix://{plugin['mount_dir']}/csi.sock":
            failures.append(f"{where}: --endpoint {endpoint} is not in mount_dir {plugin['mount_dir']}")
        mode = next((a.split("=", 1)[1] for a in args if a.startswith("--mode=")), "all")
        if plugin["type"] not in (mode, "monolith" if mode == "all" else None):
            failures.append(f"{where}: plugin type {plugin['type']} but --mode={mode}")
        if plugin["type"] in ("node", "monolith"):
            if not config.get("privileged"):
                failures.append(f"{where}: the node plugin must be privileged")
            base = plugin.get("stage_publish_base_dir")
            kubelet = next((a.split("=", 1)[1] for a in args if a.startswith("--kubelet-dir=")), None)
            if base is None or kubelet != base:
                failures.append(f"{where}: --kubelet-dir {kubelet} must equal stage_publish_base_dir {base}")
    if not found:
        failures.append("no task with a csi_plugin block")
    return [f"{path}: {f}" for f in failures]


if __name__ == "__main__":
    problems = [p for path in sys.argv[1:] for p in check(path)]
    for p in problems:
        print(f"check_nomad: {p}", file=sys.stderr)
    sys.exit(1 if problems else 0)
