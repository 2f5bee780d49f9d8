"""The data-path benchmark's measurements (run by scripts/bench/datapath.sh,
which starts the driver processes on the pool and cleans up).

Every job runs on each target in turn, three runs per target, and the
tables give the median with its ratio to the same job on a file of the pool
filesystem (the floor a user compares with):

- targets: a directory on the pool filesystem (the floor); filevol block
  volumes, thick (a raw loop device over a preallocated image: the loop
  floor) and thin (the same over a sparse image: what allocating in the
  pool costs); ext4 and xfs volumes, thin and thick (what the filesystem
  inside costs); the pool's own block device, read only, where the pool
  has one (it holds a mounted filesystem, so it is never written).
- jobs: 4 KiB random writes into never-written blocks (a new file laid out
  by fio's fallocate, or a device region never written, each block written
  once), 4 KiB random overwrites and random reads of a file written before,
  each at queue depths 1, 16 and 32 with p50 and p99 completion latency;
  sequential 1 MiB writes (of a new file) and reads at queue depth 16.
- pgbench: PostgreSQL with its data directory in a filevol ext4 volume and
  on the pool filesystem, alternating, TPS and per-transaction latency.

A new file (or region) per run and job keeps first writes first: nothing
is deleted inside a volume until the end. Every target is made first (a
zero-filled volume writes its whole size then), the machine is left to
settle, and then the runs go round the targets, so a slow spell of the
virtual disk (the host writing back what a large write left behind) falls
on one run of several targets rather than on every run of one.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import tempfile
import time

QUEUE_DEPTHS = (1, 16, 32)
FIRST_WRITE_SIZE = 256 << 20
STEADY_SIZE = 512 << 20
# Per run on a device: the steady region, then one per first-write depth.
REGION = 512 << 20
SETTLE_SECONDS = 20


def volume_size(kind, runs):
    """What the runs write into a target: 4 regions a run, and for a
    filesystem room for its own metadata."""
    gib = runs * 4 * REGION >> 30
    return f"{gib if kind == 'block' else gib + 1}Gi"


def run(*argv, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(argv)}: exit {r.returncode}\n{r.stderr}")
    return r.stdout


class Driver:
    def __init__(self, a):
        self.a = a
        self.n = 0

    def client(self, endpoint, *args):
        out = run(self.a.filevol, "client", "--endpoint", endpoint, "--json", *args)
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def volume(self, kind, thick, size, zero_fill=False):
        """Creates, stages and publishes a volume; returns (path to use, undo)."""
        a = self.a
        self.n += 1
        name = f"datapath-{self.n}-{kind}-{'thick' if thick else 'thin'}"
        # The same shape for every call: a raw device or a filesystem.
        shape = ["--block"] if kind == "block" else ["--fs-type", kind]
        args = ["create-volume", name, "--size", size, "--param", f"thick={str(thick).lower()}", *shape]
        if zero_fill:
            args += ["--param", "zeroFill=true"]
        vid = self.client(a.controller, *args)[0]["response"]["volume"]["volumeId"]
        staging = os.path.join(a.kubelet, "plugins/kubernetes.io/csi/filevol.csi.rs", vid, "globalmount")
        target = os.path.join(a.kubelet, "pods", name, "volumes/kubernetes.io~csi/data/mount")
        os.makedirs(staging, exist_ok=True)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        self.client(a.node, "stage", vid, "--staging-path", staging, *shape)
        self.client(a.node, "publish", vid, "--staging-path", staging, "--target-path", target, *shape)

        def undo():
            self.client(a.node, "unpublish", vid, "--target-path", target)
            self.client(a.node, "unstage", vid, "--staging-path", staging)
            self.client(a.controller, "delete-volume", vid)

        return target, undo


def busy_seconds():
    """CPU time the whole machine has spent busy (every core, the kernel's
    threads included: the loop workers, the filesystems' completions)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def fio(a, filename, rw, bs, depth, *, size=None, offset=0, time_based=False, readonly=False):
    """One fio job; returns (IOPS, MiB/s, p50 µs, p99 µs, machine CPU µs per I/O)."""
    argv = ["fio", "--name=job", f"--filename={filename}", f"--rw={rw}", f"--bs={bs}",
            f"--iodepth={depth}", "--direct=1", "--ioengine=libaio", "--numjobs=1",
            f"--runtime={a.runtime}", "--output-format=json", f"--offset={offset}"]
    if size:
        argv.append(f"--size={size}")
    if time_based:
        argv.append("--time_based")
    if readonly:
        argv.append("--readonly")
    # A file fio makes is laid out with fallocate, as a user's first fio run
    # is: its blocks are allocated unwritten, so every write is a first.
    argv.append("--fallocate=native")
    busy = busy_seconds()
    job = json.loads(run(*argv))["jobs"][0]
    busy = busy_seconds() - busy
    side = job["read"] if "read" in rw else job["write"]
    pct = side["clat_ns"].get("percentile", {})
    # fio's own setup and layout are in the busy time too: a little high.
    cpu = busy * 1e6 / side["total_ios"] if side["total_ios"] else 0
    return (side["iops"], side["bw"] / 1024, pct.get("50.000000", 0) / 1000, pct.get("99.000000", 0) / 1000, cpu)


def measure(a, where, device, readonly, rnd):
    """One run of every job on a target; returns {job: (iops, MiB/s, p50, p99)}."""
    out = {}

    def place(name, region):
        # A file per run and job in a directory; a region per run and job on
        # a device (4 per run: steady, then the three first-write depths).
        if device:
            return where, (rnd * 4 + region) * REGION
        return os.path.join(where, f"r{rnd}-{name}"), 0

    steady, off = place("steady", 0)
    if not readonly:
        out["seq-write"] = fio(a, steady, "write", "1M", 16, size=STEADY_SIZE, offset=off)
    ssize = None if readonly else STEADY_SIZE
    out["seq-read"] = fio(a, steady, "read", "1M", 16, size=ssize, offset=off, time_based=True, readonly=readonly)
    for d in QUEUE_DEPTHS:
        out[f"rand-read-{d}"] = fio(a, steady, "randread", "4k", d, size=ssize, offset=off, time_based=True, readonly=readonly)
    if readonly:
        return out
    for d in QUEUE_DEPTHS:
        out[f"overwrite-{d}"] = fio(a, steady, "randwrite", "4k", d, size=STEADY_SIZE, offset=off, time_based=True)
    for i, d in enumerate(QUEUE_DEPTHS):
        f, off = place(f"first-{d}", 1 + i)
        # Size-bound, each block once (fio's random map), so the job stops
        # before it could write a block twice.
        out[f"first-write-{d}"] = fio(a, f, "randwrite", "4k", d, size=FIRST_WRITE_SIZE, offset=off)
    return out


def median_of(runs):
    return tuple(statistics.median(r[i] for r in runs) for i in range(len(runs[0])))


def pool_device(pool):
    """The pool filesystem's block device, when it has one that is not a loop device."""
    src = run("findmnt", "-n", "-o", "SOURCE", "--target", pool).strip().split("[")[0]
    if not src.startswith("/dev/") or src.startswith("/dev/loop") or not os.path.exists(src):
        print(f"# the pool's block device: none to read ({src or 'no source'})", flush=True)
        return None
    try:
        os.close(os.open(src, os.O_RDONLY | os.O_DIRECT))
    except OSError as e:
        print(f"# the pool's block device: {src} cannot be opened here ({e.strerror}); its row is left out", flush=True)
        return None
    return src


def fio_phase(a, drv):
    pool_dir = os.path.join(a.pool_fs, "direct")
    os.makedirs(pool_dir, exist_ok=True)
    # (label, where, a device?, read only?)
    targets = [("pool file", pool_dir, False, False)]
    undo = [lambda: shutil.rmtree(pool_dir)]
    runs = {}
    try:
        dev = pool_device(a.pool_fs)
        if dev:
            targets.append((f"pool device {dev} (read only)", dev, True, True))
        for kind in ("block", "ext4", "xfs"):
            for thick, zero in ((True, True), (True, False), (False, False)):
                if zero and kind != "ext4":
                    continue
                label = f"{'raw loop' if kind == 'block' else kind}, {'thick' if thick else 'thin'}{', zero-filled' if zero else ''}"
                made = time.monotonic()
                where, gone = drv.volume(kind, thick, volume_size(kind, a.runs), zero)
                undo.append(gone)
                targets.append((label, where, kind == "block", False))
                print(f"# made: {label} in {time.monotonic() - made:.1f} s", flush=True)
        run("sync")
        time.sleep(SETTLE_SECONDS)
        for r in range(a.runs):
            for label, where, device, readonly in targets:
                runs.setdefault(label, []).append(measure(a, where, device, readonly, r))
            print(f"# run {r + 1} of {a.runs} done", flush=True)
    finally:
        for gone in reversed(undo):
            gone()
    return {label: {job: median_of([r[job] for r in rs]) for job in rs[0]} for label, rs in runs.items()}


def fmt_ratio(v, base):
    return f"{v / base:.2f}" if base else "-"


def report(results):
    floor = results["pool file"]
    labels = list(results)
    print()
    print("Median of the runs; ratio to the same job on the pool file; latency is p50/p99 completion in µs.")
    for title, prefix in (("4 KiB random writes into never-written blocks", "first-write"),
                          ("4 KiB random overwrites", "overwrite"),
                          ("4 KiB random reads", "rand-read")):
        print(f"\n{title}\n")
        head = " | ".join(f"QD{d} IOPS | ratio | p50/p99" for d in QUEUE_DEPTHS)
        print(f"| where | {head} |")
        print("|---" * (1 + 3 * len(QUEUE_DEPTHS)) + "|")
        for label in labels:
            cells = []
            for d in QUEUE_DEPTHS:
                m = results[label].get(f"{prefix}-{d}")
                if m is None:
                    cells.append("- | - | -")
                    continue
                base = floor[f"{prefix}-{d}"][0]
                cells.append(f"{m[0]:,.0f} | {fmt_ratio(m[0], base)} | {m[2]:.0f}/{m[3]:.0f}")
            print(f"| {label} | {' | '.join(cells)} |")
    print("\nMachine CPU per 4 KiB I/O at QD16, µs (both cores, the kernel's threads included; what bounds IOPS here)\n")
    print("| where | first write | overwrite | read |")
    print("|---|---|---|---|")
    for label in labels:
        cells = [results[label].get(f"{job}-16") for job in ("first-write", "overwrite", "rand-read")]
        print(f"| {label} | {' | '.join('-' if m is None else f'{m[4]:.1f}' for m in cells)} |")
    print("\nSequential, 1 MiB, QD16 (the write lays out a new file)\n")
    print("| where | write MiB/s | ratio | read MiB/s | ratio |")
    print("|---|---|---|---|---|")
    for label in labels:
        cells = []
        for job in ("seq-write", "seq-read"):
            m = results[label].get(job)
            cells.append("- | -" if m is None else f"{m[1]:,.0f} | {fmt_ratio(m[1], floor[job][1])}")
        print(f"| {label} | {' | '.join(cells)} |")


# pgbench


def pg_bin(name):
    base = "/usr/lib/postgresql"
    versions = sorted(os.listdir(base), key=lambda v: int(v.split(".")[0]))
    return os.path.join(base, versions[-1], "bin", name)


class Postgres:
    """A throwaway PostgreSQL cluster with its data directory in `where`."""

    def __init__(self, a, where, port):
        self.data = os.path.join(where, "pgdata")
        self.sock = tempfile.mkdtemp(prefix="pg-", dir=a.scratch)
        self.port = str(port)
        os.chmod(self.sock, 0o777)
        os.makedirs(self.data, mode=0o700)
        shutil.chown(self.data, "postgres", "postgres")
        self.as_pg(pg_bin("initdb"), "-D", self.data, "--no-sync", "-A", "trust", "-U", "postgres")
        self.as_pg(pg_bin("pg_ctl"), "-D", self.data, "-w", "-l", os.path.join(self.sock, "log"), "-o",
                   f"-c listen_addresses='' -k {self.sock} -p {self.port}", "start")

    @staticmethod
    def as_pg(*argv, cwd="/"):
        return run("runuser", "-u", "postgres", "--", *argv, cwd=cwd)

    def pgbench(self, *args, cwd="/"):
        return self.as_pg(pg_bin("pgbench"), "-h", self.sock, "-p", self.port, "-U", "postgres", *args, "postgres", cwd=cwd)

    def stop(self):
        self.as_pg(pg_bin("pg_ctl"), "-D", self.data, "-w", "-m", "fast", "stop")
        shutil.rmtree(self.sock)


def pgbench_run(a, pg):
    logs = tempfile.mkdtemp(prefix="pglog-", dir=a.scratch)
    os.chmod(logs, 0o777)
    try:
        out = pg.pgbench("-c", str(a.pg_clients), "-j", "2", "-T", str(a.pg_seconds), "-l", "--log-prefix", "tx", cwd=logs)
        tps = float(next(line for line in out.splitlines() if line.startswith("tps")).split()[2])
        lat = []
        for name in os.listdir(logs):
            with open(os.path.join(logs, name)) as f:
                # client, transaction, latency in µs, script, epoch, µs
                lat += [int(line.split()[2]) for line in f if line.strip()]
        lat.sort()
        return tps, lat[len(lat) // 2] / 1000, lat[int(len(lat) * 0.99)] / 1000
    finally:
        shutil.rmtree(logs)


def pgbench_phase(a, drv):
    pool_dir = os.path.join(a.pool_fs, "pgbench")
    os.makedirs(pool_dir)
    os.chmod(pool_dir, 0o755)
    undo = []
    clusters = {}
    try:
        thin, gone = drv.volume("ext4", False, "10Gi")
        undo.append(gone)
        filled, gone = drv.volume("ext4", True, "10Gi", zero_fill=True)
        undo.append(gone)
        run("sync")
        time.sleep(SETTLE_SECONDS)
        clusters["pool file"] = Postgres(a, pool_dir, 55432)
        clusters["ext4 volume, thin"] = Postgres(a, thin, 55433)
        clusters["ext4 volume, thick, zero-filled"] = Postgres(a, filled, 55434)
        for pg in clusters.values():
            pg.pgbench("-i", "-q", "-s", str(a.pg_scale))
        runs = {k: [] for k in clusters}
        for _ in range(a.runs):
            # Alternating, so a drift in the machine's speed hits both.
            for k, pg in clusters.items():
                runs[k].append(pgbench_run(a, pg))
    finally:
        # Each in turn, whatever the one before did: a cluster still
        # running keeps its volume from being unstaged.
        for pg in clusters.values():
            try:
                pg.stop()
            except SystemExit as e:
                print(f"# {e}", flush=True)
        for gone in reversed(undo):
            gone()
        shutil.rmtree(pool_dir)
    print(f"\npgbench (TPC-B-like, scale {a.pg_scale}, {a.pg_clients} clients, {a.pg_seconds} s a run,"
          f" median of {a.runs} alternating runs; fsync on)\n")
    print("| data directory | TPS | ratio | latency p50/p99 ms |")
    print("|---|---|---|---|")
    base = statistics.median(r[0] for r in runs["pool file"])
    for k, rs in runs.items():
        tps, p50, p99 = (statistics.median(r[i] for r in rs) for i in range(3))
        print(f"| {k} | {tps:,.0f} | {tps / base:.2f} | {p50:.2f}/{p99:.2f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--filevol", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--controller", required=True)
    p.add_argument("--kubelet", required=True)
    p.add_argument("--pool-fs", required=True, help="a directory on the pool filesystem, beside the pool")
    p.add_argument("--scratch", required=True, help="a directory for sockets and logs, removed by the caller")
    p.add_argument("--runtime", type=int, default=2, help="seconds a time-bound job runs")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--phases", default="fio,pgbench")
    p.add_argument("--pg-scale", type=int, default=20)
    p.add_argument("--pg-clients", type=int, default=8)
    p.add_argument("--pg-seconds", type=int, default=10)
    a = p.parse_args()
    drv = Driver(a)
    started = time.monotonic()
    phases = a.phases.split(",")
    if "fio" in phases:
        report(fio_phase(a, drv))
    if "pgbench" in phases:
        pgbench_phase(a, drv)
    print(f"\n({time.monotonic() - started:.0f} s)")


if __name__ == "__main__":
    main()
