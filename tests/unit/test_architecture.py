"""kvedge's internal import graph, read from the source with `ast` (its modules are read, not imported): no
import cycles, the features never import the front ends (kvedge.api, kvedge.cli), and rendering
(kvedge.report) never imports a feature. An import inside a function counts like one at the top of a
module: it runs too, only later. Relative imports are resolved; `from kvedge.a import b` is an edge to the
module kvedge.a.b where there is one, else to kvedge.a. Imports under `if TYPE_CHECKING:` never run and
do not count.

Cases that fail today are marked xfail(strict=True) with the exact cycles and edges in their reason; whoever
removes one flips its marker (an xfail that passes fails the run). Each such case has a guard beside it
that passes today: nothing beyond the listed cycles and edges, so no new one can hide behind the marker."""

from __future__ import annotations

import ast
import os
from collections import deque
from functools import lru_cache
from pathlib import Path

import pytest

import kvedge

ROOT = Path(kvedge.__file__).resolve().parent

# The features: none of them may import the front ends.
FEATURES = ["kvedge.audit", "kvedge.pcr", "kvedge.mitigate", "kvedge.server", "kvedge.llama", "kvedge.gguf",
            "kvedge.detectors", "kvedge.datasets"]
FRONT_ENDS = ["kvedge.api", "kvedge.cli"]
# What rendering may not import.
RENDERED_FEATURES = ["kvedge.audit", "kvedge.pcr", "kvedge.mitigate", "kvedge.server"]


# -- the graph ---------------------------------------------------------------------------------------------

def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its __init__.py)."""
    found = {}
    for folder, dirs, files in os.walk(ROOT):  # does not follow kvedge/_native (a link to ../native)
        dirs[:] = sorted(d for d in dirs if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                rel = (Path(folder) / f).relative_to(ROOT.parent).with_suffix("")
                parts = list(rel.parts)
                if parts[-1] == "__init__":
                    parts.pop()
                found[".".join(parts)] = Path(folder) / f
    return found


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module `name` names, or the closest package above it (`import kvedge.a.b.attr` style)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _executed(tree: ast.AST):
    """Every node of `tree`, but those under `if TYPE_CHECKING:` (imports for annotations, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _imports(module: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The kvedge modules `module` imports, anywhere in its source, with the first line that does."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    out: dict[str, int] = {}

    def add(target: str | None, line: int) -> None:
        if target is not None and target != module:
            out[target] = min(line, out.get(target, line))

    for node in _executed(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "kvedge" or alias.name.startswith("kvedge."):
                    add(_resolve(alias.name, modules), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = package[:len(package) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if not (source == "kvedge" or source.startswith("kvedge.")):
                continue
            for alias in node.names:
                # `from kvedge.a import b` imports the module kvedge.a.b when there is one, else a name of kvedge.a
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else _resolve(source, modules), node.lineno)
    return out


@lru_cache(maxsize=1)
def import_graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    return {m: _imports(m, p, modules) for m, p in modules.items()}


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _components(graph: dict[str, dict[str, int]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(w: str, work: list) -> None:
        index[w] = low[w] = len(index)
        stack.append(w)
        on_stack.add(w)
        work.append((w, iter(sorted(graph.get(w, ())))))

    for root in sorted(graph):
        if root in index:
            continue
        work: list = []
        visit(root, work)
        while work:
            node, edges = work[-1]
            for w in edges:
                if w not in index:
                    visit(w, work)
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.add(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        components.append(comp)
    return components


def _path(graph, comp: set[str], start: str, goal: str) -> list[str]:
    """The shortest import path from `start` to `goal` inside `comp` (breadth first, names in order)."""
    prev = {start: start}
    queue = deque([start])
    while queue:
        v = queue.popleft()
        if v == goal:
            break
        for w in sorted(graph.get(v, ())):
            if w in comp and w not in prev:
                prev[w] = v
                queue.append(w)
    path = [goal]
    while path[-1] != start:
        path.append(prev[path[-1]])
    return path[::-1]


def _cycles(graph: dict[str, dict[str, int]]) -> list[tuple[str, ...]]:
    """The import cycles, named so that every import that closes one is in at least one: for each edge
    inside a strongly connected component, the shortest cycle through it. Each cycle is the modules in
    import order, starting from its least name, with that name repeated at the end."""
    found = set()
    for comp in _components(graph):
        for a in comp:
            for b in graph.get(a, ()):
                if b in comp:
                    ring = _path(graph, comp, b, a)  # b ... a, and a imports b
                    i = ring.index(min(ring))
                    ring = ring[i:] + ring[:i]
                    found.add(tuple(ring + ring[:1]))
    return sorted(found)


def _cycle_text(cycle, graph=None) -> str:
    """`a:LINE -> b:LINE -> a`: each module with the line of its import of the next."""
    graph = graph or import_graph()
    return " -> ".join(f"{a}:{graph[a][b]}" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def _edges_from(packages: list[str], into: list[str]) -> list[str]:
    """Each import from a module of `packages` into a module of `into`, as `importer -> imported`."""
    graph = import_graph()
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                  if any(_within(m, p) for p in packages) and any(_within(t, p) for p in into))


def _edge_text(edge: str) -> str:
    a, b = edge.split(" -> ")
    return f"{a}:{import_graph()[a][b]} -> {b}"


# -- what fails today --------------------------------------------------------------------------------------
# What this test found when it was written (the renovation's step 1 layout). Whoever removes one deletes its
# entry here: the xfail marker of its case then goes away with it, and the guards below fail while a listed
# cycle or edge is gone but still listed, so the lists stay exact.

KNOWN_CYCLES: list[tuple[str, ...]] = []
KNOWN_FRONT_END_IMPORTS: list[str] = []
KNOWN_RENDERING_IMPORTS: list[str] = []


def _known_in(edges: list[str], package: str, side: int) -> list[str]:
    return [e for e in edges if _within(e.split(" -> ")[side], package)]


def _cases(packages: list[str], known: list[str], side: int, what: str) -> list:
    """One case per package; a package with a known offending import is an xfail naming it."""
    out = []
    for p in sorted(packages):
        mine = _known_in(known, p, side)
        out.append(pytest.param(p, marks=pytest.mark.xfail(strict=True, reason=f"{what}: {'; '.join(mine)}"))
                   if mine else p)
    return out


# -- the graph reader itself -------------------------------------------------------------------------------

def test_the_graph_reader_sees_every_kind_of_import(tmp_path):
    modules = {m: Path() for m in ("kvedge", "kvedge.a", "kvedge.a.b", "kvedge.a.c", "kvedge.d", "kvedge.e")}
    src = tmp_path / "b.py"
    src.write_text("from . import c\nimport os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                   "    from kvedge.e import T\n\ndef later():\n    from ..d import thing\n    import kvedge.a.c.attr\n")
    assert _imports("kvedge.a.b", src, modules) == {"kvedge.a.c": 1, "kvedge.d": 8}
    init = tmp_path / "__init__.py"
    init.write_text("from .b import name\nfrom kvedge import d\n")
    assert _imports("kvedge.a", init, modules) == {"kvedge.a.b": 1, "kvedge.d": 2}


def test_the_cycle_finder_names_every_cycle():
    graph = {"kvedge.a": {"kvedge.a.b": 1, "kvedge.e": 2}, "kvedge.a.b": {"kvedge.d": 1}, "kvedge.d": {"kvedge.a": 3},
             "kvedge.e": {"kvedge.a": 4}, "kvedge.c": {"kvedge.c2": 1}, "kvedge.c2": {"kvedge.c": 1, "kvedge.d": 1}}
    assert _cycles(graph) == [("kvedge.a", "kvedge.a.b", "kvedge.d", "kvedge.a"), ("kvedge.a", "kvedge.e", "kvedge.a"),
                              ("kvedge.c", "kvedge.c2", "kvedge.c")]
    assert _cycle_text(("kvedge.a", "kvedge.e", "kvedge.a"), graph) == "kvedge.a:2 -> kvedge.e:4 -> kvedge.a"
    assert _cycles({"kvedge.a": {"kvedge.d": 1}, "kvedge.d": {}}) == []


def test_the_graph_covers_the_package():
    graph = import_graph()
    for package in [*FEATURES, *FRONT_ENDS, "kvedge.report"]:
        assert package in graph, package
    assert graph["kvedge.cli.app"], "the CLI imports nothing?"


# -- cycles ------------------------------------------------------------------------------------------------

@pytest.mark.xfail(bool(KNOWN_CYCLES), strict=True,
                   reason="known import cycles: " + "; ".join(" -> ".join(c) for c in KNOWN_CYCLES))
def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(map(_cycle_text, cycles))


def test_the_import_cycles_are_the_known_ones():
    """Passes while the known cycles stand: a new cycle fails it at once, and so does a known one removed
    but still listed in KNOWN_CYCLES."""
    cycles = _cycles(import_graph())
    new = [c for c in cycles if c not in KNOWN_CYCLES]
    assert not new, "new import cycles:\n" + "\n".join(map(_cycle_text, new))
    gone = [c for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, "gone: remove from KNOWN_CYCLES:\n" + "\n".join(" -> ".join(c) for c in gone)


# -- layering ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("package", _cases(FEATURES, KNOWN_FRONT_END_IMPORTS, 0, "imports a front end"))
def test_a_feature_never_imports_the_front_ends(package):
    edges = _edges_from([package], FRONT_ENDS)
    assert not edges, f"{package} imports {' or '.join(FRONT_ENDS)}:\n" + "\n".join(map(_edge_text, edges))


@pytest.mark.parametrize("feature", _cases(RENDERED_FEATURES, KNOWN_RENDERING_IMPORTS, 1, "rendering imports it"))
def test_rendering_never_imports_a_feature(feature):
    edges = _edges_from(["kvedge.report"], [feature])
    assert not edges, f"kvedge.report imports {feature}:\n" + "\n".join(map(_edge_text, edges))


def test_the_layering_imports_are_the_known_ones():
    """As for the cycles: no offending import beyond the known ones, and none listed that is gone."""
    found = set(_edges_from(FEATURES, FRONT_ENDS)) | set(_edges_from(["kvedge.report"], RENDERED_FEATURES))
    known = set(KNOWN_FRONT_END_IMPORTS) | set(KNOWN_RENDERING_IMPORTS)
    assert not found - known, "new imports across the layers:\n" + "\n".join(map(_edge_text, sorted(found - known)))
    assert not known - found, "gone: remove from the KNOWN lists:\n" + "\n".join(sorted(known - found))
