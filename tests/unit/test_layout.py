"""The package's layout rules, checked over the source by AST (docs/architecture.md: one owner per resource).

Every pygit2 call lives in ``reconciler/git/``: only modules there import
pygit2 or catch its errors, and libgit2's errors are translated in one
place (``reconciler/git/errors.py``, ``map_git_errors``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "reconciler"
MODULES = sorted(PACKAGE.rglob("*.py"))


def _rel(path: Path) -> str:
    return path.relative_to(PACKAGE.parent).as_posix()


def _imports_pygit2(tree: ast.AST) -> list[int]:
    """Line numbers of every ``import pygit2…`` / ``from pygit2… import …``, lazy ones included."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(a.name == "pygit2" or a.name.startswith("pygit2.") for a in node.names):
                lines.append(node.lineno)
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and (node.module == "pygit2" or node.module.startswith("pygit2."))
        ):
            lines.append(node.lineno)
    return lines


def _catches_git_error(tree: ast.AST) -> list[int]:
    """Line numbers of ``except`` clauses that name ``GitError`` (bare or as an attribute)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler) and node.type is not None:
            for name in ast.walk(node.type):
                if (isinstance(name, ast.Attribute) and name.attr == "GitError") or (
                    isinstance(name, ast.Name) and name.id == "GitError"
                ):
                    lines.append(node.lineno)
    return lines


def test_the_layout_test_sees_every_module():
    assert len(MODULES) > 30, MODULES  # a moved package would make the tests below vacuous
    assert PACKAGE / "git" / "errors.py" in MODULES


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_pygit2_is_imported_only_under_reconciler_git(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = _imports_pygit2(tree)
    if path.parent == PACKAGE / "git":
        return
    assert not found, (
        f"{_rel(path)} imports pygit2 at line(s) {found}: move it into reconciler/git/"
    )


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_git_errors_are_caught_only_in_map_git_errors(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = _catches_git_error(tree)
    if path == PACKAGE / "git" / "errors.py":
        assert found, "map_git_errors no longer catches pygit2.GitError"
        return
    assert not found, f"{_rel(path)} catches GitError at line(s) {found}: use map_git_errors()"


def test_the_checks_can_fail():
    # The detectors find what they look for, lazy imports and tuples of exceptions included.
    sample = ast.parse(
        "def f():\n"
        "    import pygit2.enums\n"
        "    from pygit2 import Repository\n"
        "    try:\n"
        "        pass\n"
        "    except (KeyError, pygit2.GitError):\n"
        "        pass\n"
    )
    assert _imports_pygit2(sample) == [2, 3]
    assert _catches_git_error(sample) == [6]


def _imports_module(tree: ast.AST, name: str) -> list[int]:
    """Line numbers of every import of ``name`` (or a submodule), lazy ones included."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(a.name == name or a.name.startswith(f"{name}.") for a in node.names):
                lines.append(node.lineno)
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and (node.module == name or node.module.startswith(f"{name}."))
        ):
            lines.append(node.lineno)
    return lines


def test_the_age_binding_is_imported_only_by_secrets_age_and_only_lazily():
    # SPEC §8: one module maps pyrage's errors; SPEC §7: a no-op run never loads it,
    # so no import at module level (tests/integration/test_noop_shortcut.py runs one).
    owner = PACKAGE / "secrets" / "age.py"
    for path in MODULES:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found = _imports_module(tree, "pyrage")
        if path != owner:
            assert found == [], f"{_rel(path)}:{found[0]}: pyrage outside reconciler/secrets/age.py"
            continue
        assert found, "secrets/age.py no longer imports pyrage: update this test"
        top = [n.lineno for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
        assert not set(found) & set(top), f"{_rel(path)}: pyrage imported at module level"
