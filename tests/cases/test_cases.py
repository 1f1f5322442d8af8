"""Golden cases: a small desired-state repository and, per node, the files it must render.

Each directory of ``tests/cases/`` holding a ``repo/`` is a case (README.md
there says how to add one). For every node ``N`` with an ``expected/N/``
tree, ``reconciler render N --repo repo --out DIR --format json`` runs as a
real subprocess — the command authors use to look at a node's files — and:

* ``DIR`` holds exactly the files of ``expected/N/``, byte for byte;
* every file's metadata (the JSON rows, and the mode of the file written to
  ``DIR``) equals ``expected/N.meta.yaml``'s entry for it, over the defaults
  of SPEC §1 (mode ``0644``, no owner or group, not secret, policy
  ``enforce``); a case without that file expects the defaults everywhere.

The expected trees are written by hand from SPEC §1 and repo-layout/README.md,
never copied from the product's output: where they disagree, the test fails.
Templates here read no facts, so the output is the same on every machine.
"""

from __future__ import annotations

import difflib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

CASES = Path(__file__).resolve().parent
PROJECT = CASES.parents[1]
DEFAULT_META: dict[str, Any] = {
    "mode": "0644",
    "owner": None,
    "group": None,
    "secret": False,
    "policy": "enforce",
}


def case_nodes() -> list[Any]:
    """One pytest param per (case, node with an expected tree)."""
    params = []
    for case in sorted(p for p in CASES.iterdir() if (p / "repo").is_dir()):
        expected = case / "expected"
        nodes = sorted(p.name for p in expected.iterdir() if p.is_dir())
        assert nodes, f"{case}: no expected/<node>/ tree"
        params.extend(pytest.param(case, n, id=f"{case.name}/{n}") for n in nodes)
    return params


def files_below(root: Path) -> dict[str, bytes]:
    """Every regular file under ``root``: absolute destination path → content."""
    return {
        "/" + str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def content_diff(path: str, want: bytes, got: bytes) -> str:
    """A unified diff of two versions of ``path`` (text), or both reprs (binary)."""
    try:
        lines = difflib.unified_diff(
            want.decode().splitlines(keepends=True),
            got.decode().splitlines(keepends=True),
            f"expected {path}",
            f"rendered {path}",
        )
        return "".join(lines)
    except UnicodeDecodeError:
        return f"expected {want!r}\nrendered {got!r}"


def expected_meta(case: Path, node: str, paths: list[str]) -> dict[str, dict[str, Any]]:
    """Path → the five metadata keys, from ``expected/<node>.meta.yaml`` over the defaults."""
    meta_file = case / "expected" / f"{node}.meta.yaml"
    listed: dict[str, dict[str, Any]] = {}
    if meta_file.exists():
        listed = yaml.safe_load(meta_file.read_text()) or {}
        unknown = sorted(set(listed) - set(paths))
        assert not unknown, f"{meta_file}: paths the node does not render: {unknown}"
    return {p: {**DEFAULT_META, **listed.get(p, {})} for p in paths}


@pytest.mark.parametrize(("case", "node"), case_nodes())
def test_case_renders_the_expected_files_and_metadata(case: Path, node: str, tmp_path: Path):
    out = tmp_path / "out"
    env = {**os.environ, "RECONCILER_CONFIG": "/dev/null"}  # never the machine's config
    proc = subprocess.run(
        [sys.executable, "-m", "reconciler", "render", node, "--repo", str(case / "repo")]
        + ["--out", str(out), "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=PROJECT,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr

    want = files_below(case / "expected" / node)
    got = files_below(out)
    assert sorted(got) == sorted(want), "rendered paths differ from expected/" + node
    wrong = [content_diff(p, want[p], got[p]) for p in want if want[p] != got[p]]
    assert not wrong, "\n".join(wrong)

    rows = {r["path"]: r for r in json.loads(proc.stdout)["files"]}
    assert sorted(rows) == sorted(want)
    meta = expected_meta(case, node, sorted(want))
    for path, row in rows.items():
        assert {k: row[k] for k in DEFAULT_META} == meta[path], path
        written = stat.S_IMODE((out / path.lstrip("/")).stat().st_mode)
        assert f"{written:04o}" == meta[path]["mode"], f"{path}: mode of the file --out wrote"
