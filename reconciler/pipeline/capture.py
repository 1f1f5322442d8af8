"""Drift captures: what a drifted file held before the run repaired it (SPEC §5).

Record stage input. Takes the Plan, the TargetState and the ActualState;
produces the bytes committed beside the report, never a secret's.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from reconciler.errors import PathError
from reconciler.host.state import LocalState
from reconciler.pipeline.scan import ActualFile, host_path

if TYPE_CHECKING:
    from reconciler.host.system import System
    from reconciler.pipeline.plan import Plan
    from reconciler.pipeline.render import TargetState


def drift_captures(
    plan: Plan,
    target: TargetState,
    previous: LocalState,
    actual: Mapping[PurePosixPath, ActualFile],
    root: Path,
    system: System,
) -> dict[PurePosixPath, bytes]:
    """Content of each drifted regular file as found, before repair; never secrets (SPEC §5).

    Read through ``system``: never through a symlink, only a regular file, and
    only the inode the scan saw — a file swapped for a link to a root-only file
    between scan and capture is skipped, not captured.
    """
    from reconciler.pipeline.plan import is_secret

    out: dict[PurePosixPath, bytes] = {}
    for item in plan.drift:
        if item.kind not in ("content", "mode", "owner") or item.path in out:
            continue
        if is_secret(item.path, target, previous.managed):
            continue
        found = actual[item.path]
        if found.kind != "file":
            continue
        try:
            out[item.path] = system.read_bytes(
                host_path(root, item.path), expect=(found.dev, found.ino)
            )
        except (OSError, PathError):
            continue
    return out
