#!/usr/bin/env python3
"""Checks the licence of every crate `cargo metadata` lists (stdin) against
an allowlist; used by scripts/audit.sh. An SPDX expression passes when one
of its OR-alternatives uses allowed licences only."""
import json, re, sys

# Permissive licences compatible with distributing filevol under Apache-2.0.
ALLOWED = {
    "MIT", "Apache-2.0", "Apache-2.0 WITH LLVM-exception", "BSD-2-Clause",
    "BSD-3-Clause", "ISC", "Unicode-3.0", "Unicode-DFS-2016", "Unlicense", "Zlib",
}

def tokens(expr):
    # Old crates write "MIT/Apache-2.0" for "MIT OR Apache-2.0".
    expr = expr.replace("/", " OR ")
    return re.findall(r"\(|\)|[^\s()]+(?:\s+WITH\s+[^\s()]+)?", expr)

def parse(ts):
    # expr := term (OR term)* ; term := atom (AND atom)* ; atom := id | ( expr )
    def atom(i):
        if ts[i] == "(":
            v, i = expr(i + 1)
            return v, i + 1
        return ts[i] in ALLOWED, i + 1
    def term(i):
        v, i = atom(i)
        while i < len(ts) and ts[i] == "AND":
            w, i = atom(i + 1)
            v = v and w
        return v, i
    def expr(i):
        v, i = term(i)
        while i < len(ts) and ts[i] == "OR":
            w, i = term(i + 1)
            v = v or w
        return v, i
    v, i = expr(0)
    if i != len(ts):
        raise ValueError("trailing tokens")
    return v

meta = json.load(sys.stdin)
bad = []
for p in sorted(meta["packages"], key=lambda p: p["name"]):
    lic = p.get("license")
    try:
        ok = bool(lic) and parse(tokens(lic))
    except (ValueError, IndexError):
        ok = False
    if not ok:
        bad.append(f"{p['name']} {p['version']}: {lic or 'no licence field'}")
print(f"{len(meta['packages'])} crates checked")
if bad:
    print("licences not on the allowlist:", *bad, sep="\n  ")
    sys.exit(1)
