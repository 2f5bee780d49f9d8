"""The measuring half of scripts/bench/snapshot-metadata.sh (standard
library only): for each driver, makes the volume and the snapshots over
CSI with `filevol client`, writes the same data into each volume's backing
file, then times GetMetadataAllocated and GetMetadataDelta and reads the
driver's /proc counters around each call."""

import argparse
import json
import os
import random
import subprocess
import time

GIB = 1 << 30
RUN = 64 * 1024


def client(filevol, endpoint, *args, timeout=3600):
    out = subprocess.run(
        [filevol, "client", "--endpoint", endpoint, "--timeout", str(timeout), "--json", *args],
        check=True, capture_output=True, text=True,
    ).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def proc(pid):
    """CPU seconds, read_bytes, rchar, VmHWM (KiB) of `pid`."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    io = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, v = line.split(":")
            io[k] = int(v)
    hwm = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
    return cpu, io["read_bytes"], io["rchar"], hwm


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def fill(path, start, length, seed):
    """Non-zero bytes (the reference driver counts zero blocks as holes)."""
    block = random.Random(seed).randbytes(4 << 20)
    fd = os.open(path, os.O_WRONLY)
    try:
        at = start
        while at < start + length:
            n = min(len(block), start + length - at)
            os.pwrite(fd, block[:n], at)
            at += n
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite(path, offsets, seed):
    block = random.Random(seed).randbytes(RUN)
    fd = os.open(path, os.O_WRONLY)
    try:
        for off in offsets:
            os.pwrite(fd, block, off)
        os.fsync(fd)
    finally:
        os.close(fd)


def measure(filevol, pid, endpoint, *call):
    drop_caches()
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5\n")  # resets VmHWM to the current RSS
    cpu0, rb0, rc0, _ = proc(pid)
    t0 = time.monotonic()
    summary = client(filevol, endpoint, *call, "--summary")[-1]
    wall = time.monotonic() - t0
    cpu1, rb1, rc1, hwm = proc(pid)
    return {
        "wall_s": wall,
        "cpu_s": cpu1 - cpu0,
        "read_bytes": rb1 - rb0,
        "rchar": rc1 - rc0,
        "peak_rss_kib": hwm,
        "runs": summary["runs"],
        "bytes": summary["bytes"],
        "messages": summary["messages"],
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--filevol", required=True)
    p.add_argument("--gib", type=int, default=16)
    p.add_argument("--driver", action="append", required=True,
                   help="name=pid=endpoint=backing-file pattern with {id}")
    a = p.parse_args()
    size = a.gib * GIB
    # 1% of the volume in 64 KiB runs at seeded, distinct, aligned offsets.
    runs = size // 100 // RUN
    offsets = sorted(random.Random(3314).sample(range(size // RUN), runs))
    offsets = [o * RUN for o in offsets]
    results = {}
    for spec in a.driver:
        name, pid, endpoint, pattern = spec.split("=", 3)
        pid = int(pid)
        for _ in range(100):
            try:
                client(a.filevol, endpoint, "identity", timeout=2)
                break
            except subprocess.CalledProcessError:
                time.sleep(0.1)
        vol = client(a.filevol, endpoint, "create-volume", "cbt", "--size", f"{a.gib}Gi",
                     "--block")[-1]["response"]["volume"]["volumeId"]
        backing = pattern.format(id=vol)
        t = time.monotonic()
        fill(backing, 0, size // 2, seed=1)
        print(f"{name}: wrote {size // 2 // GIB} GiB in {time.monotonic() - t:.0f} s", flush=True)
        snap_a = client(a.filevol, endpoint, "create-snapshot", "cbt-a", "--source", vol)[-1]
        snap_a = snap_a["response"]["snapshot"]["snapshotId"]
        rewrite(backing, offsets, seed=2)
        snap_b = client(a.filevol, endpoint, "create-snapshot", "cbt-b", "--source", vol)[-1]
        snap_b = snap_b["response"]["snapshot"]["snapshotId"]
        try:
            results[name] = {
                "allocated": measure(a.filevol, pid, endpoint, "allocated", snap_a),
                "delta": measure(a.filevol, pid, endpoint, "delta", snap_a, snap_b),
            }
        finally:
            # Through the driver, which detaches what it attached (the
            # reference driver holds a loop device per block volume).
            for snap in (snap_a, snap_b):
                client(a.filevol, endpoint, "delete-snapshot", snap)
            client(a.filevol, endpoint, "delete-volume", vol)
        print(f"{name}: {json.dumps(results[name])}", flush=True)

    print()
    print(f"{a.gib} GiB block volume, {size // 2 // GIB} GiB written; delta: {runs} runs of 64 KiB "
          f"({runs * RUN / size:.1%}) rewritten")
    print("| driver | call | time | driver CPU | read from disk | read(2) | peak RSS | runs | bytes reported |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, calls in results.items():
        for call, r in calls.items():
            print(f"| {name} | {call} | {r['wall_s']:.3f} s | {r['cpu_s']:.2f} s | "
                  f"{r['read_bytes'] / (1 << 20):,.1f} MiB | {r['rchar'] / (1 << 20):,.1f} MiB | "
                  f"{r['peak_rss_kib'] / 1024:.1f} MiB | {r['runs']:,} | {r['bytes'] / (1 << 20):,.1f} MiB |")
    names = list(results)
    if len(names) == 2:
        for call in ("allocated", "delta"):
            x = results[names[1]][call]["wall_s"] / max(results[names[0]][call]["wall_s"], 1e-9)
            print(f"{call}: {names[0]} {x:,.0f}x faster than {names[1]}")


if __name__ == "__main__":
    main()
