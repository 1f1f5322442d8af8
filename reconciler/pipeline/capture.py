"""Drift captures: what a drifted file held before the run repaired it (SPEC §5).

Record stage input. Takes the Plan, the TargetState and the ActualState;
produces :class:`Captures`: the bytes committed beside the report, never a
secret's, and never more than ``report.max_capture`` of them per file — a
larger file is recorded by size and sha256 only (issue 11: a 500 MB drifted
file added 500 MB to the git server at every drift, and as much to the
host's own repository and memory).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from reconciler.errors import PathError
from reconciler.host.state import LocalState
from reconciler.pipeline.scan import ActualFile, host_path
from reconciler.report import ReportUncaptured

if TYPE_CHECKING:
    from reconciler.host.system import System
    from reconciler.pipeline.plan import Plan
    from reconciler.pipeline.render import TargetState


@dataclass(frozen=True, slots=True, kw_only=True)
class Captures:
    """Captures are the drifted files of a run as found: small ones whole, large ones
    by size and sha256."""

    content: Mapping[PurePosixPath, bytes] = field(default_factory=dict)  # drift/<path>
    uncaptured: tuple[ReportUncaptured, ...] = ()  # larger than report.max_capture


def drift_captures(
    plan: Plan,
    target: TargetState,
    previous: LocalState,
    actual: Mapping[PurePosixPath, ActualFile],
    root: Path,
    system: System,
    *,
    max_capture: int,
) -> Captures:
    """Content of each drifted regular file as found, before repair; never secrets (SPEC §5).

    A file of more than ``max_capture`` bytes (``report.max_capture``) is not
    captured: its size and sha256 go in the report instead. One whose scan
    found it larger is not read again (the scan hashed it); one that grew past
    the bound since is hashed as it is read, a chunk at a time — memory stays
    within ``max_capture`` plus a chunk whatever the file's size.

    Read through ``system``: never through a symlink, only a regular file, and
    only the inode the scan saw — a file swapped for a link to a root-only file
    between scan and capture is skipped, not captured.
    """
    from reconciler.pipeline.plan import is_secret

    content: dict[PurePosixPath, bytes] = {}
    uncaptured: dict[PurePosixPath, ReportUncaptured] = {}
    for item in plan.drift:
        if item.kind not in ("content", "mode", "owner"):
            continue
        if item.path in content or item.path in uncaptured:
            continue
        if is_secret(item.path, target, previous.managed):
            continue
        found = actual[item.path]
        if found.kind != "file":
            continue
        if found.size > max_capture and found.sha256 is not None:
            size, sha256 = found.size, found.sha256
        else:
            try:
                read = system.digest(
                    host_path(root, item.path), expect=(found.dev, found.ino), keep=max_capture
                )
            except (OSError, PathError):
                continue
            if read.content is not None:
                content[item.path] = read.content
                continue
            size, sha256 = read.size, read.sha256
        uncaptured[item.path] = ReportUncaptured(
            path=str(item.path), size=size, sha256=sha256, max_capture=max_capture
        )
    return Captures(content=content, uncaptured=tuple(uncaptured.values()))
