"""The trim benchmark's measurements (run by scripts/bench/trim.sh, which
starts the driver processes on a scratch pool and cleans up).

1. N ext4 volumes are created and staged; each gets a file written, synced
   and deleted, so every volume has freed space for a trim to give back.
2. A trim pass over all of them (`filevol trim`, the same work as a periodic
   pass): wall time, the node plugin's CPU (/proc/PID/stat), the whole
   machine's busy CPU (/proc/stat: the loop devices' and filesystems'
   kernel work included), bytes given back.
3. A second pass with nothing freed since: what a periodic pass costs when
   there is nothing to do.
4. Time from a delete to the first byte given back to the pool (the image's
   st_blocks falling), with `discard=true` (online discard) and with a trim
   on demand right after the delete.
"""
import argparse
import json
import os
import subprocess
import time


def run(*argv, **kw):
    return subprocess.run(argv, check=True, capture_output=True, text=True, **kw).stdout


def client(a, endpoint, *args):
    out = run(a.filevol, "client", "--endpoint", endpoint, "--json", *args)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def create(a, name, *params):
    extra = [x for p in params for x in ("--param", p)]
    r = client(a, a.controller, "create-volume", name, "--size", f"{a.mib}Mi",
               "--fs-type", "ext4", *extra)
    return r[0]["response"]["volume"]["volumeId"]


def staging(a, vid):
    return os.path.join(a.kubelet, "plugins/kubernetes.io/csi/filevol.csi.rs", vid, "globalmount")


def stage(a, vid):
    path = staging(a, vid)
    os.makedirs(path, exist_ok=True)
    client(a, a.node, "stage", vid, "--staging-path", path, "--fs-type", "ext4")
    return path


def image(a, vid):
    return os.path.join(a.pool, "volumes", vid, "image")


def allocated(path):
    return os.stat(path).st_blocks * 512


def write(path, mib):
    block = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for _ in range(mib):
            os.write(fd, block)
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path):
    # os has no syncfs; sync(1) -f is syncfs(2).
    run("sync", "-f", path)


def cpu_of(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def busy_cpu():
    """Seconds of CPU the whole machine spent not idle (all cores)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def trim_pass(a):
    cpu0, busy0, t0 = cpu_of(a.node_pid), busy_cpu(), time.monotonic()
    out = run(a.filevol, "trim", "--endpoint", a.node, "--json")
    wall = time.monotonic() - t0
    cpu, busy = cpu_of(a.node_pid) - cpu0, busy_cpu() - busy0
    rows = json.loads(out)
    failed = [r for r in rows if r.get("error")]
    if failed:
        raise SystemExit(f"trims failed: {failed}")
    return {
        "volumes": len(rows),
        "trimmed": sum(1 for r in rows if r["trimmed"]),
        "wall_s": wall,
        "node_cpu_s": cpu,
        "machine_cpu_s": busy,
        "reclaimed_bytes": sum(r["reclaimed_bytes"] for r in rows),
    }


def first_byte(a, vid, path, after_delete):
    """Seconds from the delete of a 64 MiB file to the image's first byte
    given back."""
    f = os.path.join(path, "first-byte")
    write(f, 64)
    syncfs(path)
    before = allocated(image(a, vid))
    t0 = time.monotonic()
    os.remove(f)
    after_delete()
    while allocated(image(a, vid)) >= before:
        if time.monotonic() - t0 > 60:
            return None
        time.sleep(0.001)
    return time.monotonic() - t0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--filevol", required=True)
    p.add_argument("--node", required=True, help="the node plugin's endpoint")
    p.add_argument("--controller", required=True, help="the controller's endpoint")
    p.add_argument("--node-pid", type=int, required=True)
    p.add_argument("--pool", required=True)
    p.add_argument("--kubelet", required=True)
    p.add_argument("--volumes", type=int, default=100)
    p.add_argument("--mib", type=int, default=256)
    p.add_argument("--freed-mib", type=int, default=16)
    a = p.parse_args()

    ids = []
    for i in range(a.volumes):
        vid = create(a, f"trim-{i}")
        path = stage(a, vid)
        f = os.path.join(path, "freed")
        write(f, a.freed_mib)
        os.remove(f)
        syncfs(path)
        ids.append((vid, path))
    freed = a.volumes * a.freed_mib << 20

    first = trim_pass(a)
    second = trim_pass(a)

    online = create(a, "online", "discard=true")
    online_path = stage(a, online)
    on_demand, on_demand_path = ids[0]
    t_online = first_byte(a, online, online_path, lambda: syncfs(online_path))
    t_on_demand = first_byte(
        a, on_demand, on_demand_path,
        lambda: run(a.filevol, "trim", "--endpoint", a.node, on_demand))

    print(f"{a.volumes} staged ext4 volumes of {a.mib} MiB, {a.freed_mib} MiB written and deleted in each "
          f"({freed >> 20} MiB freed in all)\n")
    print("| pass | volumes trimmed | wall time | node plugin CPU | machine CPU (all cores) | given back |")
    print("|---|---|---|---|---|---|")
    for name, r in (("first (after the deletes)", first), ("second (nothing freed since)", second)):
        print(f"| {name} | {r['trimmed']}/{r['volumes']} | {r['wall_s']:.2f} s | {r['node_cpu_s']:.2f} s | "
              f"{r['machine_cpu_s']:.2f} s | {r['reclaimed_bytes'] / (1 << 20):.1f} MiB |")
    print()
    print("| route | delete to first byte given back |")
    print("|---|---|")

    def fmt(t):
        return "not within 60 s" if t is None else f"{t * 1000:.0f} ms"

    print(f"| `discard=true` (online discard; rm, then syncfs) | {fmt(t_online)} |")
    print(f"| `filevol trim VOLUME` right after the rm | {fmt(t_on_demand)} |")
    print("| periodic trim (default) | at the volume's next turn: within a week and 100 minutes |")

    for vid, path in ids + [(online, online_path)]:
        client(a, a.node, "unstage", vid, "--staging-path", path)
        client(a, a.controller, "delete-volume", vid)


if __name__ == "__main__":
    main()
