"""hf_prune's import graph has no circles: lower layers never import upper ones.

The graph is built with `ast` over `hf_prune/**/*.py`, without importing anything. Every import counts, relative and
absolute, at module level and inside functions alike (an import inside a function is still a call upward). Imports
under `if TYPE_CHECKING:` are left out: they never run. `from X import a` is an edge to `X` and, when `X.a` is a module,
to `X.a`; so `from . import sibling` inside a package is an edge to the package's `__init__`. The implicit import of
a module's parent packages is not an edge (every submodule would otherwise be in a circle with its `__init__`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_prune"


def module_files(package: Path) -> dict[str, Path]:
    """`{dotted module name: file}` of every module of `package` (a package is named by its `__init__.py`)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _runtime_imports(tree: ast.AST):
    """The `Import` / `ImportFrom` nodes of `tree`, those in `if TYPE_CHECKING:` bodies left out."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph(package: Path) -> dict[str, dict[str, int]]:
    """`{module: {imported module of the same package: line of the first such import}}`."""
    modules = module_files(package)
    graph: dict[str, dict[str, int]] = {name: {} for name in modules}
    for name, path in modules.items():
        here = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                if node.level:
                    parts = here.split(".")
                    base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            for target in targets:
                if target in modules and target != name:
                    line = graph[name].get(target, node.lineno)
                    graph[name][target] = min(line, node.lineno)
    return graph


def import_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One circle per strongly connected component of more than one module, as `[m0, m1, ..., m0]` (a shortest
    circle through the component's first module, so the message names the imports to look at)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for root in sorted(graph):  # Tarjan, iterative (no recursion limit to meet)
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return [_shortest_cycle(graph, set(c), c[0]) for c in sorted(components)]


def _shortest_cycle(graph: dict[str, dict[str, int]], component: set[str], start: str) -> list[str]:
    previous = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child == start:
                    path = [start]
                    while node is not None:
                        path.append(node)
                        node = previous[node]
                    return path[::-1]
                if child in component and child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no circle through {start}")  # cannot happen in a strongly connected component


def describe_cycle(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    """`a (line 12) -> b (line 40) -> a`: each module with the line of its import of the next."""
    return " -> ".join(f"{m} (line {graph[m][n]})" for m, n in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_hf_prune_has_no_import_cycle():
    graph = import_graph(PACKAGE)
    assert "hf_prune.state" in graph and "hf_prune.export.save" in graph["hf_prune.export"]  # the graph was built
    cycles = import_cycles(graph)
    assert not cycles, "import circles in hf_prune (a lower layer imports an upper one):\n" + "\n".join(
        describe_cycle(graph, c) for c in cycles
    )


def _write_package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_a_function_level_import_closing_a_circle_is_found(tmp_path):
    package = _write_package(tmp_path, {
        "__init__.py": "",
        "low.py": "import os\n\n\ndef f():\n    from .sub.high import g  # upward\n    return g\n",
        "sub/__init__.py": "",
        "sub/high.py": "from ..low import f\n\n\ndef g():\n    return f\n",
        "other.py": "from pkg.low import f\n",
    })
    graph = import_graph(package)
    assert graph == {"pkg": {}, "pkg.low": {"pkg.sub.high": 5}, "pkg.other": {"pkg.low": 1},
                     "pkg.sub": {}, "pkg.sub.high": {"pkg.low": 1}}
    cycles = import_cycles(graph)
    assert cycles == [["pkg.low", "pkg.sub.high", "pkg.low"]]
    assert describe_cycle(graph, cycles[0]) == "pkg.low (line 5) -> pkg.sub.high (line 1) -> pkg.low"


def test_a_submodule_importing_its_package_is_a_circle_and_type_checking_imports_are_not(tmp_path):
    package = _write_package(tmp_path, {
        "__init__.py": "from .a import A\n",
        "a.py": "from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from .b import B\n\nA = 1\n",
        "b.py": "from . import a\n\nB = a.A\n",
    })
    graph = import_graph(package)
    # `from . import a` is an edge to the package (its __init__) and to `a`; the TYPE_CHECKING import is no edge
    assert graph == {"pkg": {"pkg.a": 1}, "pkg.a": {}, "pkg.b": {"pkg": 1, "pkg.a": 1}}
    assert import_cycles(graph) == []
    (package / "a.py").write_text("from . import b\n\nA = 1\n")  # now a real circle through the package
    graph = import_graph(package)
    assert import_cycles(graph) == [["pkg", "pkg.a", "pkg"]]  # the shortest circle of the component {pkg, a, b}
    assert describe_cycle(graph, ["pkg", "pkg.a", "pkg"]) == "pkg (line 1) -> pkg.a (line 1) -> pkg"


@pytest.mark.parametrize("n", [2, 3, 500])
def test_rings_of_any_length_are_found_and_chains_are_not(n):
    ring = {f"m{i}": {f"m{(i + 1) % n}": 1} for i in range(n)}
    assert import_cycles(ring) == [[f"m{i}" for i in range(n)] + ["m0"]]
    chain = {f"m{i}": ({f"m{i + 1}": 1} if i + 1 < n else {}) for i in range(n)}
    assert import_cycles(chain) == []
