"""The package's import graph: no cycle, and the layers import downwards only (STYLE.md, issue 24).

Every ``import``/``from ... import`` of a ``deepsim`` module counts, at module level or inside a function: a lazy
import still ties the two modules together, it only hides the tie from start-up.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import deepsim

PACKAGE_ROOT = Path(deepsim.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE_ROOT.rglob("*.py")):
        if path.relative_to(PACKAGE_ROOT).parts[0] in ("bundles", "configs"):  # data packages, no code of ours
            continue
        found[_module_name(path)] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the deepsim modules it imports (a ``from pkg import name`` counts as pkg.name if that is a module)."""
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against this module's package
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # `import deepsim.a.b` names a module; trim to one
                    target = target.rpartition(".")[0]
                if target.startswith("deepsim") and target != name:
                    graph[name].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: the components of more than one module (each such component holds a cycle)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
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
    return components


def test_the_graph_sees_known_imports():
    graph = import_graph()
    assert "deepsim.losses" in graph["deepsim.registration.objective"]
    assert "deepsim.errors" in graph["deepsim.data.datasets"]
    assert "deepsim.registration.inference" in graph["deepsim.cli"]  # a lazy import inside a function


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]


def test_package_has_no_import_cycle():
    cycles = strongly_connected(import_graph())
    assert cycles == [], f"modules that import each other in a circle: {cycles}"


@pytest.mark.parametrize("lower, upper", [
    ("deepsim.data", "deepsim.registration"),
    ("deepsim.losses", "deepsim.registration"),
    ("deepsim.losses", "deepsim.workflow"),
    ("deepsim.data", "deepsim.peers"),
])
def test_lower_layer_does_not_import_upper_layer(lower, upper):
    wrong = sorted(f"{src} -> {dst}" for src, dsts in import_graph().items() if src.startswith(lower)
                   for dst in dsts if dst == upper or dst.startswith(upper + "."))
    assert wrong == [], f"{lower} must not import {upper}: {wrong}"
