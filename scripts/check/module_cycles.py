#!/usr/bin/env python3
"""Finds import circles between the modules of a crate (scripts/check/layers.sh).

A module is a file under the crate's src/ (`mod.rs` and `lib.rs` name their
directory). Module A imports B when A's code, outside comments and its
`#[cfg(test)] mod tests`, names `crate::B...` or `super::B...`. A parent and
its own children may import each other (that is how a Rust module tree
works); any other circle, however long, is reported, and the exit status
is 1. The reading is textual, which is enough for code that rustfmt keeps
one `use` per path.

    scripts/check/module_cycles.py crates/core/src src
"""

import re
import sys
from pathlib import Path

CRATE = re.compile(r"crate::([a-z_][a-z0-9_:]*)")
SUPER = re.compile(r"super::(?:\{([^}]*)\}|([a-z_][a-z0-9_]*))")
WORD = re.compile(r"\b([a-z_][a-z0-9_]*)\b")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] in ("mod", "lib"):
        parts.pop()
    return "::".join(parts)


def related(a: str, b: str) -> bool:
    """Whether one of the two modules contains the other."""
    return a == b or not a or not b or a.startswith(b + "::") or b.startswith(a + "::")


def imports(root: Path) -> dict[str, set[str]]:
    sources = {module_name(root, p): p.read_text() for p in sorted(root.rglob("*.rs"))}
    names = set(sources)
    edges: dict[str, set[str]] = {m: set() for m in sources}
    for module, text in sources.items():
        if module.split("::")[-1] == "tests":
            continue
        cut = text.find("#[cfg(test)]\nmod tests")
        if cut >= 0:
            text = text[:cut]
        parent = module.rpartition("::")[0]
        for line in text.splitlines():
            if line.lstrip().startswith("//"):
                continue
            for path in CRATE.findall(line):
                parts = path.split("::")
                for k in range(len(parts), 0, -1):
                    target = "::".join(parts[:k])
                    if target in names:
                        if not related(module, target):
                            edges[module].add(target)
                        break
            for group, single in SUPER.findall(line):
                for word in WORD.findall(group or single):
                    target = f"{parent}::{word}" if parent else word
                    if target in names and not related(module, target):
                        edges[module].add(target)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main() -> int:
    sys.setrecursionlimit(10_000)
    status = 0
    for root in map(Path, sys.argv[1:]):
        for component in circles(imports(root)):
            print(f"module_cycles: {root}: import circle: {' <-> '.join(component)}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
