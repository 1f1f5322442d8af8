"""Drift captures: what a drifted file held before the run repaired it (SPEC §5).

Record stage input. Takes the Plan, the TargetState and the ActualState;
produces :class:`Captures`: the bytes committed beside the report, never a
secret's, and never more than ``report.max_capture`` of them per file — a
larger file is recorded by size and sha256 only (issue 11: a 500 MB drifted
file added 500 MB to the git server at every drift, and as much to the
host's own repository and memory).

With ``report.encrypt_captures`` (SPEC §8), :func:`seal_captures` encrypts
each capture on the host to the operators' keys of the commit run
(``keys/operators/*.pub``): committed as ``drift/<path>.age``, so the git
server never sees a host's file contents (vakap encrypts client-side
likewise).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from reconciler.errors import PathError, SecretError
from reconciler.host.state import LocalState
from reconciler.pipeline.scan import ActualFile, host_path, link_shown
from reconciler.report import ReportUncaptured

if TYPE_CHECKING:
    from reconciler.git.snapshot import Snapshot
    from reconciler.host.system import System
    from reconciler.pipeline.plan import Plan
    from reconciler.pipeline.render import TargetState


log = logging.getLogger(__name__)

AGE_SUFFIX = ".age"  # drift/<path>.age: a capture encrypted to the operators (SPEC §8)


@dataclass(frozen=True, slots=True, kw_only=True)
class Captures:
    """Captures are the drifted files of a run as found: small ones whole, large ones
    by size and sha256."""

    content: Mapping[PurePosixPath, bytes] = field(default_factory=dict)  # drift/<path>
    # report.encrypt_captures: destination path → armored age payload, drift/<path>.age
    sealed: Mapping[PurePosixPath, bytes] = field(default_factory=dict)
    uncaptured: tuple[ReportUncaptured, ...] = ()  # larger than report.max_capture, or unsealed

    def files(self) -> dict[PurePosixPath, bytes]:
        """What goes under ``drift/`` of the report commit: ``<path>`` for a plain
        capture, ``<path>.age`` for a sealed one."""
        out = dict(self.content)
        out.update({p.with_name(p.name + AGE_SUFFIX): c for p, c in self.sealed.items()})
        return out


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
        if item.path in content or item.path in uncaptured:
            continue
        found = actual[item.path]
        if found.kind == "symlink" and found.link is not None and item.kind in ("target", "type"):
            # A link found where ours was, or where a file should be: its target text
            # as read (never followed), shown as "link → target" (SPEC §9).
            content[item.path] = link_shown(found.link)
            continue
        if item.kind not in ("content", "mode", "owner"):
            continue
        if is_secret(item.path, target, previous.managed):
            continue
        if found.kind != "file":
            continue
        if found.block is not None:
            # A file holding managed blocks (SPEC §9): only its blocks are ours to
            # report; the rest of the file is the host's and stays out of reports.
            content[item.path] = found.block
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


def seal_captures(captures: Captures, snapshot: Snapshot, *, max_capture: int) -> Captures:
    """``captures`` with every content encrypted to the operators' keys of ``snapshot``
    (``keys/operators/*.pub`` of the commit run): ``report.encrypt_captures``, SPEC §8.

    Encrypted on the host, armored, so that the git server and every clone
    of the report branch hold ciphertext only; ``show``, ``log`` and
    ``adopt`` decrypt with an operator's identity. When the commit has no
    operator key, or a key file is broken, nothing falls back to plaintext:
    each drifted file is recorded by size and sha256 under ``uncaptured``
    with the reason, and a WARNING is logged — the drift is still reported
    and repaired (failing the run would page for a setting, and repeat at
    every drift, while the repair itself is sound).
    """
    if not captures.content:
        return captures
    from reconciler.secrets.age import encrypt
    from reconciler.secrets.rules import OPERATOR_KEYS, operator_recipients

    commit = snapshot.info.commit[:12] if snapshot.info.commit else "the working tree"
    try:
        recipients = operator_recipients(snapshot)
        if not recipients:
            raise SecretError(
                f"report.encrypt_captures is on and commit {commit} has no "
                f"{OPERATOR_KEYS}/*.pub to encrypt to",
                where=OPERATOR_KEYS,
                hint="commit an operator's key there (reconciler keygen prints one)",
            )
        sealed = {path: encrypt(data, recipients) for path, data in captures.content.items()}
    except SecretError as exc:
        log.warning("drift not captured: %s", exc)
        reason = exc.problem if exc.where == OPERATOR_KEYS else str(exc)
        unsealed = tuple(
            ReportUncaptured(
                path=str(path),
                size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                max_capture=max_capture,
                reason=reason,
            )
            for path, data in captures.content.items()
        )
        return Captures(uncaptured=(*captures.uncaptured, *unsealed))
    return Captures(sealed=sealed, uncaptured=captures.uncaptured)
