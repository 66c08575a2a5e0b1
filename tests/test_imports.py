"""The project's module graph has no cycles, and no module imports a higher layer.

Every .py file under ngkernels/, training/ and benchmarks/ is parsed with `ast` (nothing is imported). Every
import statement counts: at module level, inside functions, under `if TYPE_CHECKING:`, and relative imports
resolved against the importing module. An edge goes to the project module the statement names: `import a.b`
-> a.b; `from a.b import c` -> a.b.c when that is a module, else a.b (c is a name defined in a.b). The parent
packages Python runs on the way (a/__init__.py for `import a.b`) are not edges: a package's __init__ that
imports its own submodules would otherwise make every submodule that imports a sibling part of a cycle.

The layer order is data (LAYERS below, lowest first). A module may import its own layer or lower ones; within
a layer only the cycle check applies. Every module must belong to a layer, so a new module directly under
training/ is placed on purpose (add it to LAYERS).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ngkernels", "training", "benchmarks")

# lowest first; "a.b" names one module (or package __init__), "a.b.*" everything below the package a.b
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("ngkernels: the ops", ("ngkernels", "ngkernels.*")),
    ("training core: config, sampling, models, rewards and their helpers", (
        "training", "training.config", "training.registry", "training.prompts", "training.sampling",
        "training.models", "training.models.*", "training.rewards", "training.rewards.*", "training.toy",
        "training.toy.*", "training.tracking", "training.checkpoint", "training.guards")),
    ("methods", ("training.methods", "training.methods.*")),
    ("the loop, its logging and its command line", (
        "training.loop", "training.step_metrics", "training.grids", "training.timing", "training.__main__")),
    ("analysis and benchmarks", ("training.analysis", "training.analysis.*", "benchmarks", "benchmarks.*")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that `name` (file `path`) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    out = set()

    def nearest(dotted: str) -> str | None:  # `import a.b.c` where only a.b is a module of ours
        parts = dotted.split(".")
        for n in range(len(parts), 0, -1):
            candidate = ".".join(parts[:n])
            if candidate in modules:
                return candidate
        return None

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    out.add(nearest(alias.name))
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against the importing module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                out.add(submodule if submodule in modules else nearest(source))
    out.discard(None)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def layer_of(module: str) -> int | None:
    for index, (_, patterns) in enumerate(LAYERS):
        for pattern in patterns:
            if module == pattern or (pattern.endswith(".*") and module.startswith(pattern[:-1])):
                return index
    return None


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each with one cycle through it."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
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
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [cycle_through(graph, set(c)) for c in components]


def describe(cycle: list[str], graph: dict[str, set[str]]) -> str:
    """The cycle, plus every other module caught in the same strongly connected component."""
    members = {cycle[0]}
    for _ in range(len(graph)):  # modules reachable from and reaching the cycle
        members |= {w for v in members for w in graph[v] if cycle[0] in _reach(graph, w)}
    others = sorted(members - set(cycle))
    return " -> ".join(cycle) + (f"   (same cycle also through {others})" if others else "")


def _reach(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = {start}, [start]
    while todo:
        for w in graph[todo.pop()]:
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


def cycle_through(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One explicit cycle a -> b -> ... -> a inside a strongly connected component (breadth-first)."""
    start = min(component)
    parents, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return list(reversed(path)) + [start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_the_parser_sees_every_kind_of_import():
    """The graph builder itself: a function-level import, a TYPE_CHECKING import and a relative import."""
    graph = import_graph()
    assert "training.loop" in graph["training.__main__"]  # imported inside main()
    assert "training.config" in graph["training.models"]  # under TYPE_CHECKING
    assert "ngkernels.functional" in graph["ngkernels"]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert layer_of("training.models.toy") == 1 and layer_of("training.analysis.study.run") == 4
    assert layer_of("training.unplaced_module") is None  # "training" names the package __init__ only


def test_every_module_has_a_layer():
    unplaced = sorted(m for m in import_graph() if layer_of(m) is None)
    assert not unplaced, f"modules outside every layer of tests/test_imports.py LAYERS (add them there): {unplaced}"


def test_no_import_cycles():
    graph = import_graph()
    cycles = find_cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join("  " + describe(c, graph) for c in cycles)


def test_no_module_imports_a_higher_layer():
    graph = import_graph()
    upward = [f"  {m} ({LAYERS[layer_of(m)][0]}) imports {d} ({LAYERS[layer_of(d)][0]})"
              for m in sorted(graph) for d in sorted(graph[m])
              if layer_of(m) is not None and layer_of(d) is not None and layer_of(d) > layer_of(m)]
    assert not upward, "imports of a higher layer:\n" + "\n".join(upward)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_is_parsed(package):
    assert any(m == package or m.startswith(package + ".") for m in import_graph())
