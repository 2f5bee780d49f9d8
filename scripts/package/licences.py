#!/usr/bin/env python3
"""filevol's dependency tree and its licences, from `cargo metadata` on stdin.

    cargo metadata --locked --format-version 1 | scripts/package/licences.py
        Checks every crate in Cargo.lock (build and dev dependencies too)
        against the allowlist: an SPDX expression passes when one of its
        OR-alternatives uses allowed licences only. scripts/check/audit.sh runs this.

    ... | scripts/package/licences.py --report FILE --collect DIR
        Also writes the dependency report (every crate with its version,
        licence and role; the C and C++ code bundled into the binary, with
        upstream versions) and copies the licence files of everything
        linked into the binary to DIR/<crate>-<version>/. scripts/package/package.sh
        runs this on vendored sources, with --filter-platform, so roles are
        those of the packaged architecture.

A crate's role: `linked` (its code is in the binary), `build` (runs while
building only: build scripts, proc macros and what they use), `dev` (tests,
benches, examples).
"""
import argparse
import json
import os
import re
import shutil
import sys

# Permissive licences compatible with distributing filevol under Apache-2.0.
ALLOWED = {
    "MIT", "Apache-2.0", "Apache-2.0 WITH LLVM-exception", "BSD-2-Clause",
    "BSD-3-Clause", "ISC", "Unicode-3.0", "Unicode-DFS-2016", "Unlicense", "Zlib",
}

LICENCE_FILE = re.compile(r"^(LICEN[CS]E|COPYING|COPYRIGHT|NOTICE|UNLICENSE)", re.I)


def tokens(expr):
    # Old crates write "MIT/Apache-2.0" for "MIT OR Apache-2.0".
    expr = expr.replace("/", " OR ")
    return re.findall(r"\(|\)|[^\s()]+(?:\s+WITH\s+[^\s()]+)?", expr)


def allowed(expr):
    # expr := term (OR term)* ; term := atom (AND atom)* ; atom := id | ( expr )
    ts = tokens(expr)

    def atom(i):
        if ts[i] == "(":
            v, i = alternatives(i + 1)
            return v, i + 1
        return ts[i] in ALLOWED, i + 1

    def term(i):
        v, i = atom(i)
        while i < len(ts) and ts[i] == "AND":
            w, i = atom(i + 1)
            v = v and w
        return v, i

    def alternatives(i):
        v, i = term(i)
        while i < len(ts) and ts[i] == "OR":
            w, i = term(i + 1)
            v = v or w
        return v, i

    v, i = alternatives(0)
    if i != len(ts):
        raise ValueError("trailing tokens")
    return v


def roles(meta):
    """Each reachable package id's role, from the resolved graph."""
    resolve = meta["resolve"]
    nodes = {n["id"]: n for n in resolve["nodes"]}
    packages = {p["id"]: p for p in meta["packages"]}
    rank = {"linked": 0, "build": 1, "dev": 2}
    role = {}

    def is_proc_macro(pid):
        return any("proc-macro" in t["kind"] for t in packages[pid]["targets"])

    def visit(pid, r):
        if pid in role and rank[role[pid]] <= rank[r]:
            return
        role[pid] = r
        for dep in nodes[pid]["deps"]:
            kinds = {k["kind"] for k in dep["dep_kinds"]}
            target = dep["pkg"]
            if None in kinds:
                # A proc macro's code runs in the compiler, not the binary.
                visit(target, "build" if r == "linked" and is_proc_macro(target) else r)
            if "build" in kinds:
                visit(target, "build" if r != "dev" else "dev")

    root = resolve["root"]
    visit(root, "linked")
    for dep in nodes[root]["deps"]:
        if "dev" in {k["kind"] for k in dep["dep_kinds"]}:
            visit(dep["pkg"], "dev")
    return role


def header_define(path, name):
    with open(path, errors="replace") as f:
        m = re.search(rf"#define\s+{name}\s+\"?([^\"\s]+)", f.read())
    return m.group(1) if m else "?"


def bundled(pkg):
    """The C and C++ code a -sys crate compiles into the binary:
    (component, upstream version, licence, licence file in the crate)."""
    root = os.path.dirname(pkg["manifest_path"])
    if pkg["name"] == "grpcio-sys":
        tp = "grpc/third_party"
        grpc = pkg["version"].split("+")[1].split("-")[0]
        absl = os.path.join(root, tp, "abseil-cpp/absl/base/config.h")
        xxh = os.path.join(root, tp, "xxhash/xxhash.h")
        pinned = f"as pinned by gRPC {grpc}"
        return [
            ("gRPC core (libgrpc_unsecure: no TLS)", grpc, "Apache-2.0", "grpc/LICENSE"),
            ("abseil-cpp", header_define(absl, "ABSL_LTS_RELEASE_VERSION") + "." +
             header_define(absl, "ABSL_LTS_RELEASE_PATCH_LEVEL"), "Apache-2.0",
             f"{tp}/abseil-cpp/LICENSE"),
            ("c-ares", header_define(os.path.join(root, tp, "cares/cares/include/ares_version.h"),
                                     "ARES_VERSION_STR"), "MIT", f"{tp}/cares/cares/LICENSE.md"),
            ("re2", pinned, "BSD-3-Clause", f"{tp}/re2/LICENSE"),
            ("upb", pinned, "BSD-3-Clause", f"{tp}/upb/LICENSE"),
            ("utf8_range", pinned, "MIT", f"{tp}/utf8_range/LICENSE"),
            ("address_sorting", pinned, "BSD-3-Clause", f"{tp}/address_sorting/LICENSE"),
            ("xxhash", ".".join(header_define(xxh, f"XXH_VERSION_{p}")
                                for p in ("MAJOR", "MINOR", "RELEASE")), "BSD-2-Clause",
             f"{tp}/xxhash/LICENSE"),
            ("grpcio-sys's C wrapper (grpc_wrap.cc)", pkg["version"], "Apache-2.0", None),
        ]
    if pkg["name"] == "libz-sys":
        return [("zlib (built from source: feature \"static\")",
                 header_define(os.path.join(root, "src/zlib/zlib.h"), "ZLIB_VERSION"),
                 "Zlib", "src/zlib/LICENSE")]
    return []


def collect(pkg, dest):
    """Copies a crate's licence files (and those of what it bundles) to
    dest/<name>-<version>/; returns how many it copied."""
    root = os.path.dirname(pkg["manifest_path"])
    out = os.path.join(dest, f"{pkg['name']}-{pkg['version']}")
    files = [f for f in sorted(os.listdir(root)) if LICENCE_FILE.match(f)]
    files += [f for (_, _, _, f) in bundled(pkg) if f]
    for f in files:
        os.makedirs(os.path.dirname(os.path.join(out, f)), exist_ok=True)
        shutil.copyfile(os.path.join(root, f), os.path.join(out, f))
    return len(files)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--report", help="write the dependency report here")
    ap.add_argument("--collect", help="copy licence files of linked crates here")
    args = ap.parse_args()

    meta = json.load(sys.stdin)
    packages = sorted(meta["packages"], key=lambda p: (p["name"], p["version"]))
    bad = []
    for p in packages:
        lic = p.get("license")
        try:
            ok = bool(lic) and allowed(lic)
        except (ValueError, IndexError):
            ok = False
        if not ok:
            bad.append(f"{p['name']} {p['version']}: {lic or 'no licence field'}")
    print(f"{len(packages)} crates checked against the licence allowlist")
    if bad:
        print("licences not on the allowlist:", *bad, sep="\n  ")
        sys.exit(1)

    if not (args.report or args.collect):
        return
    role = roles(meta)
    root = meta["resolve"]["root"]
    reached = [p for p in packages if p["id"] in role and p["id"] != root]
    linked = [p for p in reached if role[p["id"]] == "linked"]
    if args.collect:
        without = [f"{p['name']}-{p['version']}" for p in linked if collect(p, args.collect) == 0]
        if without:
            # Their licence is still stated in their Cargo.toml, and so in the report.
            print("crates that ship no licence file:", " ".join(without))
    if args.report:
        with open(args.report, "w") as f:
            counts = {r: sum(1 for p in reached if role[p["id"]] == r) for r in ("linked", "build", "dev")}
            f.write("filevol dependency report (from Cargo.lock)\n\n")
            f.write("Roles: linked = compiled into the filevol binary; build = runs only while\n"
                    "building (build scripts, proc macros); dev = tests, benches, examples.\n")
            f.write(f"{len(reached)} crates: {counts['linked']} linked, {counts['build']} build, "
                    f"{counts['dev']} dev. Every licence is on the allowlist of scripts/package/licences.py.\n\n")
            f.write(f"{'crate':<28} {'version':<24} {'role':<7} licence\n")
            for p in reached:
                f.write(f"{p['name']:<28} {p['version']:<24} {role[p['id']]:<7} {p['license']}\n")
            f.write("\nC and C++ code compiled into the binary\n\n")
            for p in linked:
                for name, version, lic, _ in bundled(p):
                    f.write(f"  {name}: {version} ({lic}), from {p['name']} {p['version']}\n")
            f.write("\ngRPC's LICENSE file also carries the MPL-2.0 text, which upstream applies to\n"
                    "its root certificate bundle (etc/roots.pem): grpcio-sys does not ship that file,\n"
                    "and the unsecure build filevol uses has no TLS.\n")
        print(f"dependency report: {args.report}")


if __name__ == "__main__":
    main()
