"""The static import graph of jaxdefense/ has no cycle and respects the package layering.

The graph is read from the AST of every module (imports at module level and inside functions,
classes or conditionals alike; `importlib.import_module` calls are not followed):

- `import a.b.c` is an edge to the module a.b.c only, not to its parent packages;
- `from a.b import c` is an edge to the submodule a.b.c when that is a module, else to a.b;
- relative imports are resolved against the importing module's package;
- a package's __init__.py is the module named after the package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = "jaxdefense"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# importer prefix -> imported prefixes it must never name (direct edges)
FORBIDDEN = {
    "jaxdefense.data": ("jaxdefense.models", "jaxdefense.eval", "jaxdefense.train", "jaxdefense.methods"),
    "jaxdefense.methods": ("jaxdefense.train",),
    "jaxdefense.attacks": ("jaxdefense.train",),
    "jaxdefense.train": ("jaxdefense.cli", "jaxdefense.methods", "jaxdefense.attacks", "jaxdefense.eval",
                         "jaxdefense.pipeline"),
    "jaxdefense.models": ("jaxdefense.train", "jaxdefense.methods", "jaxdefense.attacks", "jaxdefense.eval"),
    "jaxdefense.rl": ("jaxdefense.train", "jaxdefense.methods", "jaxdefense.attacks", "jaxdefense.pipeline"),
}


def module_files(root: Path = ROOT, package: str = PACKAGE) -> dict[str, Path]:
    """{dotted module name: file} for every .py under root (pkg/__init__.py is `pkg`)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([package, *parts])] = path
    return out


def _is_package(name: str, files: dict[str, Path]) -> bool:
    return files[name].name == "__init__.py"


def _resolve_base(module: str, node: ast.ImportFrom, files: dict[str, Path]) -> str | None:
    """The absolute dotted name `from <base> import ...` refers to."""
    if node.level == 0:
        return node.module
    package = module if _is_package(module, files) else module.rpartition(".")[0]
    parts = package.split(".")
    if node.level - 1 > len(parts) - 1:
        return None  # beyond the top-level package
    parts = parts[: len(parts) - (node.level - 1)]
    return ".".join(parts + ([node.module] if node.module else []))


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def import_graph(files: dict[str, Path] | None = None) -> tuple[dict[str, set[str]], list[str]]:
    """({module: modules of the package it imports}, [unresolvable imports of the package])."""
    files = module_files() if files is None else files
    graph: dict[str, set[str]] = {m: set() for m in files}
    missing: list[str] = []

    def add(module, target, lineno):
        if not _within(target, PACKAGE):
            return
        if target not in files:
            missing.append(f"{module}:{lineno} imports {target}, which is not a module of {PACKAGE}")
            return
        if target != module:
            graph[module].add(target)

    for module, path in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(module, alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_base(module, node, files)
                if base is None or not _within(base, PACKAGE):
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    add(module, sub if alias.name != "*" and sub in files else base, node.lineno)
    return graph, missing


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle [m0, m1, ..., m0] per strongly connected component of more than one module."""
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []

    def strongconnect(v):  # Tarjan, iterative over each node's successors
        work = [(v, iter(sorted(graph[v])))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, succ = work[-1]
            for w in succ:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        sccs.append(set(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_cycle_in(graph, comp) for comp in sccs]


def _cycle_in(graph, comp: set[str]) -> list[str]:
    """A shortest cycle through the component's smallest module (breadth-first search)."""
    start = min(comp)
    parent = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & comp):
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start} in {sorted(comp)}")


def layering_violations(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for module in sorted(graph):
        for importer, banned in FORBIDDEN.items():
            if not _within(module, importer):
                continue
            for target in sorted(graph[module]):
                if any(_within(target, b) for b in banned):
                    out.append(f"{module} -> {target}")
    return out


# --- the checks on the package -------------------------------------------------------------


def test_every_package_import_resolves():
    _, missing = import_graph()
    assert not missing, "\n".join(missing)


def test_no_import_cycle():
    graph, _ = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layering():
    graph, _ = import_graph()
    bad = layering_violations(graph)
    assert not bad, "forbidden imports:\n" + "\n".join(bad)


# --- the graph builder itself, on a synthetic package ---------------------------------------


@pytest.fixture
def fake_pkg(tmp_path):
    def write(rel, text=""):
        path = tmp_path / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    write("__init__.py", "from jaxdefense import data\n")
    write("data/__init__.py", "from .tok import encode\nfrom . import fmt\n")
    write("data/tok.py", "import json\ndef encode():\n    import jaxdefense.models.cfg\n")
    write("data/fmt.py", "from ..models import cfg, Thing\n")
    write("models/__init__.py", "Thing = 1\n")
    write("models/cfg.py", "from jaxdefense.data.tok import encode\n")
    write("train/__init__.py", "from jaxdefense.train import *\nimport jaxdefense.nowhere\n")
    return module_files(tmp_path / PACKAGE)


def test_graph_builder_on_a_synthetic_package(fake_pkg):
    graph, missing = import_graph(fake_pkg)
    assert graph == {
        "jaxdefense": {"jaxdefense.data"},
        "jaxdefense.data": {"jaxdefense.data.tok", "jaxdefense.data.fmt"},
        # a function-level `import a.b.c` is an edge to a.b.c only
        "jaxdefense.data.tok": {"jaxdefense.models.cfg"},
        # `from ..models import cfg, Thing`: cfg is a submodule, Thing a name in the package
        "jaxdefense.data.fmt": {"jaxdefense.models.cfg", "jaxdefense.models"},
        "jaxdefense.models": set(),
        "jaxdefense.models.cfg": {"jaxdefense.data.tok"},
        "jaxdefense.train": set(),  # `from itself import *` is no edge
    }
    assert missing == ["jaxdefense.train:2 imports jaxdefense.nowhere, which is not a module of jaxdefense"]
    assert find_cycles(graph) == [["jaxdefense.data.tok", "jaxdefense.models.cfg", "jaxdefense.data.tok"]]
    assert layering_violations(graph) == [
        "jaxdefense.data.fmt -> jaxdefense.models",
        "jaxdefense.data.fmt -> jaxdefense.models.cfg",
        "jaxdefense.data.tok -> jaxdefense.models.cfg",
    ]


def test_find_cycles_reports_a_longer_cycle_and_no_acyclic_one():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"a"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
