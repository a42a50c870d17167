"""The ofa_ds import graph, read from the source with `ast`: no import cycles, and no import of a module that is
not there.

Every `import` / `from ... import` anywhere in a file counts, lazy ones inside functions included: a cycle that only
a function-level import hides still ties the two modules together. `from ofa_ds.a import b` is an edge to the module
`ofa_ds.a.b` when there is one, else to `ofa_ds.a`; relative imports are resolved; importing `ofa_ds.a.b` is not an
edge to the package `ofa_ds.a` (its `__init__`). `kernels/` is installed as `ofa_ds.kernels` and is read as such.
"""
from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = {"ofa_ds": os.path.join(ROOT, "ofa_ds"), "ofa_ds.kernels": os.path.join(ROOT, "kernels")}


def _modules() -> dict[str, tuple[str, bool]]:
    """Module name -> (file, is a package __init__), for every .py file under SOURCES."""
    mods = {}
    for prefix, top in SOURCES.items():
        for dirpath, dirnames, files in os.walk(top):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            rel = os.path.relpath(dirpath, top)
            pkg = prefix if rel == "." else prefix + "." + rel.replace(os.sep, ".")
            for name in sorted(files):
                if name.endswith(".py"):
                    is_pkg = name == "__init__.py"
                    mods[pkg if is_pkg else f"{pkg}.{name[:-3]}"] = (os.path.join(dirpath, name), is_pkg)
    return mods


def _imports(module: str, path: str, is_pkg: bool, mods) -> list[tuple[str, int]]:
    """(imported ofa_ds module name, line) for every import of an ofa_ds module in one file."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    package = module if is_pkg else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub if sub in mods else base, node.lineno))
    return [(name, line) for name, line in out if name == "ofa_ds" or name.startswith("ofa_ds.")]


def _graph():
    mods = _modules()
    edges: dict[str, dict[str, int]] = {m: {} for m in mods}
    missing = []
    for m, (path, is_pkg) in mods.items():
        for name, line in _imports(m, path, is_pkg, mods):
            if name not in mods:
                missing.append(f"{os.path.relpath(path, ROOT)}:{line} imports {name}, which is not a module here")
            elif name != m:
                edges[m].setdefault(name, line)
    return mods, edges, missing


def _cycles(edges: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a list of modules, first == last) per strongly connected component of more than one module."""
    index, low, on_stack, stack, comps = {}, {}, set(), [], []

    def visit(v):  # Tarjan; the graph is small enough for recursion
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(set(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles = []
    for comp in comps:  # a shortest way back to the component's first module, by breadth-first search
        start = min(comp)
        prev, frontier = {start: None}, [start]
        while frontier and start not in [w for v in frontier for w in edges[v]]:
            nxt = []
            for v in frontier:
                for w in sorted(edges[v]):
                    if w in comp and w not in prev:
                        prev[w] = v
                        nxt.append(w)
            frontier = nxt
        last = next(v for v in frontier if start in edges[v])
        path = [start, last]
        while prev[path[-1]] is not None:
            path.append(prev[path[-1]])
        cycles.append(path[::-1])
    return cycles


def _describe(cycle: list[str], edges, mods) -> str:
    steps = [f"  {a} -> {b}  ({os.path.relpath(mods[a][0], ROOT)}:{edges[a][b]})" for a, b in zip(cycle, cycle[1:])]
    return " -> ".join(cycle) + "\n" + "\n".join(steps)


def test_graph_reads_the_package():
    mods, edges, _ = _graph()
    assert "ofa_ds.model.ofa" in mods and "ofa_ds.kernels.attention" in mods
    assert "ofa_ds.config" in edges["ofa_ds.model.ofa"]


def test_no_import_cycles():
    mods, edges, _ = _graph()
    cycles = _cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(_describe(c, edges, mods) for c in cycles)


def test_every_ofa_ds_import_names_a_module():
    _, _, missing = _graph()
    assert not missing, "\n".join(missing)
