#!/usr/bin/env python3
"""Checks the house rules of the source layout (see ARCHITECTURE.md).

    python ci/check_layout.py

- No import circle between the modules of ``src/`` (siblings under a common
  parent, from ``use crate::...`` and ``use super::...``; test modules aside)
  nor between the modules of ``python/rsepoll``.
- No source file in ``src/`` over 700 lines, tests (``tests.rs``,
  ``proptests.rs``) aside, and no ``impl`` block over 500 lines.
- No ``#[cfg(...)]`` that selects a platform outside ``src/sys/`` (the load
  generator in ``src/bench/`` aside).

Prints each breach and exits with status 1 if there is any.
"""

from __future__ import annotations

import ast
import pathlib
import re
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
SRC = ROOT / "src"
PACKAGE = ROOT / "python" / "rsepoll"
MAX_FILE_LINES = 700
MAX_IMPL_LINES = 500
TEST_FILES = {"tests.rs", "proptests.rs"}
USE = re.compile(r"^\s*(?:pub(?:\([a-z]+\))? )?use ((?:crate|super)::[\w:]+)", re.M)
PLATFORM_CFG = re.compile(r"#\[cfg\([^\]]*\b(unix|windows|target_os|target_family)\b")


def rust_module(path: pathlib.Path) -> tuple[str, ...]:
    parts = path.relative_to(SRC).with_suffix("").parts
    return parts[:-1] if parts[-1] in ("mod", "lib") else parts


def without_tests(text: str) -> str:
    """The file up to its test module, if it has one at the end."""
    match = re.search(r"^#\[cfg\((all\()?test\b[^\n]*\n(pub(\(crate\))? )?mod tests", text, re.M)
    return text[: match.start()] if match else text


def rust_edges(modules: dict[tuple[str, ...], pathlib.Path]) -> set[tuple[tuple, tuple]]:
    edges = set()
    for module, path in modules.items():
        if path.name in TEST_FILES:
            continue
        text = without_tests(path.read_text())
        for used in USE.findall(text):
            parts = used.split("::")
            if parts[0] == "crate":
                target = tuple(parts[1:])
            else:
                base = list(module)
                while parts and parts[0] == "super":
                    base = base[:-1]
                    parts = parts[1:]
                target = tuple(base) + tuple(parts)
            while target and target not in modules:
                target = target[:-1]
            if target and target != module:
                edges.add((module, target))
    return edges


def sibling_graph(edges: set) -> dict:
    """Each edge between the two children of the modules' common parent."""
    graph: dict = {}
    for a, b in edges:
        common = 0
        while common < min(len(a), len(b)) and a[common] == b[common]:
            common += 1
        if common == len(a) or common == len(b):
            continue  # a module and its own descendant
        graph.setdefault(a[: common + 1], set()).add(b[: common + 1])
    return graph


def cycles(graph: dict) -> list[list]:
    """The strongly connected components of more than one node (Tarjan)."""
    index: dict = {}
    low: dict = {}
    stack: list = []
    found: list = []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def python_graph() -> dict:
    graph: dict = {}
    for path in PACKAGE.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module] if node.module else [a.name for a in node.names]
                for target in targets:
                    if (PACKAGE / f"{target}.py").exists() and target != path.stem:
                        graph.setdefault(path.stem, set()).add(target)
    return graph


def impl_sizes(text: str):
    """(first line, length) of each top-level impl block."""
    lines = text.split("\n")
    for number, line in enumerate(lines):
        if re.match(r"^impl\b", line):
            end = number
            while end < len(lines) and lines[end] != "}":
                end += 1
            yield number + 1, end - number + 1


def main() -> int:
    breaches = []
    files = sorted(SRC.rglob("*.rs"))
    modules = {rust_module(path): path for path in files}
    for component in cycles(sibling_graph(rust_edges(modules))):
        names = ", ".join("::".join(m) for m in component)
        breaches.append(f"import circle in src/: {names}")
    for component in cycles(python_graph()):
        breaches.append(f"import circle in python/rsepoll: {', '.join(component)}")
    for path in files:
        relative = path.relative_to(ROOT)
        text = path.read_text()
        if path.name not in TEST_FILES:
            count = text.count("\n")
            if count > MAX_FILE_LINES:
                breaches.append(f"{relative}: {count} lines (at most {MAX_FILE_LINES})")
            for line, size in impl_sizes(without_tests(text)):
                if size > MAX_IMPL_LINES:
                    breaches.append(f"{relative}:{line}: an impl of {size} lines")
        platform_code = "sys" in relative.parts or "bench" in relative.parts
        if not platform_code and path.name not in TEST_FILES:
            for number, line in enumerate(without_tests(text).split("\n"), 1):
                if PLATFORM_CFG.search(line):
                    breaches.append(f"{relative}:{number}: a platform #[cfg] outside src/sys/")
    for breach in breaches:
        print(breach)
    print(f"layout: {len(files)} Rust files, {len(breaches)} breach(es)")
    return 1 if breaches else 0


if __name__ == "__main__":
    sys.exit(main())
