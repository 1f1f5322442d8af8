"""Helpers for unit tests: tiny desired-state repositories as real directories.

Nothing is mocked: a repository is a directory written to ``tmp_path`` and read
through :class:`reconciler.git.snapshot.DirSnapshot`, the same class ``reconciler
render --repo DIR`` uses.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from reconciler.git.snapshot import DirSnapshot
from reconciler.host.statedir import StateDir
from reconciler.pipeline.apply import RunContext
from reconciler.pipeline.inventory import Node, effective_node, load_inventory
from reconciler.pipeline.render import TargetState, render_target

PROJECT = Path(__file__).resolve().parents[2]

FACTS: dict[str, Any] = {
    "hostname": "testhost",
    "fqdn": "testhost.example.com",
    "os_release": {"ID": "debian", "PRETTY_NAME": "Debian GNU/Linux 12 (bookworm)"},
    "kernel": "6.1.0-test",
    "arch": "x86_64",
    "cpu_count": 3,
    "mem_total_kb": 4096000,
}


def write_repo(
    base: Path, files: Mapping[str, str | bytes], *, executable: tuple[str, ...] = ()
) -> DirSnapshot:
    """Write ``files`` (repo path → content) under ``base``; return a DirSnapshot of it.

    Text content is dedented, so tests can write YAML inline. Paths listed in
    ``executable`` get mode 0755, every other file 0644.
    """
    base.mkdir(parents=True, exist_ok=True)
    for rel, content in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        data = textwrap.dedent(content).encode() if isinstance(content, str) else content
        path.write_bytes(data)
        path.chmod(0o755 if rel in executable else 0o644)
    return DirSnapshot(base)


def app_files(*apps: str) -> dict[str, str]:
    """One plain template per app in state ``default``, so apps exist."""
    return {f"templates/{app}/default/etc/{app}.conf": f"{app}\n" for app in apps}


def node_of(snapshot: DirSnapshot, name: str, state: str | None = None) -> Node:
    """The effective node ``name`` of ``snapshot``."""
    return effective_node(load_inventory(snapshot), snapshot, name, state)


def render(snapshot: DirSnapshot, name: str, facts: Mapping[str, Any] = FACTS) -> TargetState:
    """Load and render node ``name`` with fixed facts."""
    return render_target(snapshot, node_of(snapshot, name), facts)


def run_context(tmp_path: Path, root: Path, run_id: str = "r1") -> RunContext:
    """The :class:`RunContext` of an apply on node ``n`` into ``root``, state under ``tmp_path``."""
    return RunContext(
        node="n",
        state="default",
        commit="0" * 40,
        run_id=run_id,
        root=root,
        state_dir=StateDir(tmp_path / "state"),
    )
