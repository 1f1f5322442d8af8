"""The import graph of ``reconciler/``: no cycles, and package ``__init__`` files import nothing.

Read by AST, not by importing: an import inside a function (the lazy imports
that keep Jinja2 and friends off a no-op run) is an edge as much as one at
module level, because the graph is what a reader has to hold in their head
(docs/architecture.md: data flows one way, nothing reaches back into an earlier stage).
Imports under ``if TYPE_CHECKING:`` are not edges: they never run.

That a real no-op ``reconciler pull`` imports no Jinja2, jsonschema or
pathspec is checked on a real subprocess in
``tests/integration/test_noop_shortcut.py``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "reconciler"

# Known cycles, each as the sorted tuple of its modules, to be removed by the
# work named beside it. Anything else is a new cycle and fails.
ALLOWED_CYCLES: frozenset[tuple[str, ...]] = frozenset()


def module_name(path: Path) -> str:
    """``reconciler/cli/main.py`` → ``reconciler.cli.main``; a package's ``__init__`` → the package."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Every module of the package: dotted name → file."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports(tree: ast.AST, name: str, known: Mapping[str, Path]) -> Iterator[tuple[str, int]]:
    """(imported module of the package, line) for every import in ``tree``, at any depth.

    ``from reconciler.x import y`` is an edge to ``reconciler.x.y`` when that is
    a module (a subpackage's module), else to ``reconciler.x``. Relative
    imports are resolved against ``name``. The body of ``if TYPE_CHECKING:``
    is skipped (its ``else:`` is not).
    """
    package = name if known[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from imports(ast.Module(body=[child], type_ignores=[]), name, known)
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                full = f"{base}.{alias.name}"
                yield (full if full in known else base), node.lineno
        yield from imports(node, name, known)


def import_graph() -> dict[str, dict[str, int]]:
    """module → {imported module of the package → first line importing it}."""
    known = modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges: dict[str, int] = {}
        for target, line in imports(tree, name, known):
            if target in known and target != name:
                edges.setdefault(target, line)
        graph[name] = edges
    return graph


def cycles(graph: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """One cycle per back edge found by a depth-first walk, each as [a, b, …, a]."""
    found: list[list[str]] = []
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                found.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target, [*stack, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def describe(cycle: list[str], graph: Mapping[str, Mapping[str, int]]) -> str:
    """``a (a.py:12) → b (b.py:40) → a``: each step with the line that imports the next."""
    steps = []
    for here, there in zip(cycle, cycle[1:], strict=False):
        path = modules()[here].relative_to(PACKAGE.parent)
        steps.append(f"{here} ({path}:{graph[here][there]})")
    return " → ".join([*steps, cycle[-1]])


def test_the_graph_sees_lazy_imports_and_skips_type_checking_ones():
    # The test must be able to fail: a function-level import is an edge, one
    # under TYPE_CHECKING is not, and a cycle through them is found.
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from reconciler.b import X\n"
        "def f():\n"
        "    from reconciler.c import Y\n"
    )
    known = {n: Path(f"{n}.py") for n in ("reconciler.a", "reconciler.b", "reconciler.c")}
    edges = {t for t, _ in imports(ast.parse(source), "reconciler.a", known) if t in known}
    assert edges == {"reconciler.c"}
    graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "reconciler.pipeline.run" in graph, "the walk found no modules"
    assert graph["reconciler.pipeline.render"], "the walk found no edges"
    new = [c for c in cycles(graph) if tuple(sorted(set(c))) not in ALLOWED_CYCLES]
    assert not new, "import cycles:\n" + "\n".join(describe(c, graph) for c in new)


def test_package_init_files_import_nothing():
    inits = sorted(PACKAGE.rglob("__init__.py"))
    assert len(inits) >= 6, inits
    importing = [
        f"{p.relative_to(PACKAGE.parent)}:{node.lineno}"
        for p in inits
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
        if isinstance(node, ast.Import | ast.ImportFrom)
    ]
    assert not importing, f"__init__.py files must import nothing: {importing}"
