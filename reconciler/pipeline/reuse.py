"""Work a run can skip: the no-op short cut and render reuse (SPEC §7).

Prepare stage. Takes the last run's LocalState and the disk; says whether
nothing can have changed (``still``), and hands the render stage the
bytes it wrote last time for a template whose render key is the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import stat
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from reconciler import __version__
from reconciler.config import AgentConfig
from reconciler.errors import InventoryError, PathError
from reconciler.host.state import LocalState, ManagedFile, racy_window_ns

if TYPE_CHECKING:
    from reconciler.host.system import System
    from reconciler.pipeline.render import AbsentRule, TargetState
    from reconciler.pipeline.run import RunOptions


def run_fingerprint(
    config: AgentConfig, options: RunOptions, facts: Mapping[str, Any], exclude_lines: list[str]
) -> str:
    """Everything besides the commit and the disk that a run's target depends on."""
    data = {
        "node": config.node,
        "state": options.state,
        "mode": config.mode,
        "root": config.root,
        "exclude": exclude_lines,
        "facts": facts,
        "version": __version__,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def written_output(
    system: System, root: Path, previous: LocalState, dest: PurePosixPath, render_key: str
) -> bytes | None:
    """What this host last wrote at ``dest`` for ``render_key``, if it is still intact.

    The render stage's reuse hook (render.render_target): a template whose key
    matches the record is not rendered again when the file is a regular file
    whose bytes hash to the recorded sha256 — checked on the bytes read, not
    by stat signature, so neither drift nor a racily-clean record can pass.
    Read through ``system``: never through a symlink; a file of another size
    than recorded is not read at all, and no more than the recorded size is
    ever kept in memory (a drifted file may be huge: issue 11).
    """
    record = previous.managed.get(str(dest))
    if record is None or record.render_key != render_key:
        return None
    path = os.fspath(root).rstrip("/") + str(dest)
    try:
        st = system.lstat(path)
        if st.st_size != record.size:
            return None
        found = system.digest(path, expect=(st.st_dev, st.st_ino), keep=record.size)
    except (OSError, PathError):
        return None  # missing, a symlink, not a regular file, unreadable
    return found.content if found.sha256 == record.sha256 else None


def absent_watch(
    system: System,
    root: Path,
    rules: Sequence[AbsentRule],
    *,
    node: str,
    spare: Iterable[PurePosixPath] = (),
) -> dict[str, tuple[int, int]]:
    """What the no-op short cut compares for ``absent:`` ``rules`` (scan.find_absent's
    ``watched``), taken after the apply. A stat taken within RACY_WINDOW_NS of its
    change is recorded as (-2, -2), which nothing matches: like a racily clean
    file (state.ManagedFile.settled), the next run looks again in full. So is
    the root when a pattern now lists too many entries (a post script grew the
    tree): the next run walks again and reports it. ``spare`` as for find_absent:
    the state directory changes every run and must not defeat the short cut."""
    from reconciler.pipeline.scan import find_absent

    if not rules:
        return {}
    now = time.time_ns()
    try:
        watched = find_absent(system, root, rules, node=node, spare=spare).watched
    except InventoryError:
        return {"/": (-2, -2)}
    return {k: (v if v[1] < now - racy_window_ns(v[1]) else (-2, -2)) for k, v in watched.items()}


def purge_watch(
    system: System,
    root: Path,
    target: TargetState,
    excludes: Any,
    *,
    spare: Iterable[PurePosixPath] = (),
) -> dict[str, tuple[int, int]]:
    """What the no-op short cut compares for ``purge: true`` directories (SPEC §9): every
    directory the purge walk lists (scan.find_purge_of's ``watched``), taken after the
    apply; racily recent ones as (-2, -2), as :func:`absent_watch` does."""
    from reconciler.pipeline.scan import find_purge_of

    if not any(d.purge for d in target.directories.values()):
        return {}
    now = time.time_ns()
    return {
        k: (v if v[1] < now - racy_window_ns(v[1]) else (-2, -2))
        for k, v in find_purge_of(system, root, target, excludes, spare=spare).watched.items()
    }


def still(system: System, root: Path, previous: LocalState) -> dict[str, ManagedFile] | None:
    """None when a managed path may have changed since the last run; else the records
    of the racily clean files found intact, re-recorded as settled (often empty).

    Unchanged: every managed path still has the stat signature we recorded,
    and nothing that ``absent:`` patterns looked at has changed since, and every
    ``directories:`` entry is as the last run left it and nothing was added to or
    removed from what a purge listed (SPEC §9).

    A record taken within RACY_WINDOW_NS of its file's change (an apply records
    what it just wrote) cannot be trusted by its signature alone: an edit of the
    same size in the same clock tick keeps it. As git does with its index's
    racily clean entries, such a file is hashed once, on the first run at least
    that window after it changed: when its bytes still hash to the recorded
    sha256 and its stat is the recorded one, it is unchanged, and its record,
    re-taken now, is settled (the caller saves it), so every later run trusts
    the signature. (Before, that first run after an apply rendered and scanned
    the whole node: 1.2 s against a no-op's 0.5 s at 2,000 files, issue 19.)
    A managed block file's record holds the sha256 of its blocks' view
    (``blocks.recorded_view`` of the bytes), a desired symlink's that of its
    target text (read, never followed): each is compared so.

    Each lstat goes through ``system`` (from the root, without following a
    symlink another user could have made), with plain string joins, not
    pathlib: this loop is the whole cost of a no-op run (SPEC §7), and a
    PurePosixPath per managed file doubled it. Keys are normalised absolute
    destination paths (checked when they were rendered). A parent swapped for
    a symlink cannot fake "unchanged": the walk refuses it, and what it leads
    to would have another inode and ctime than recorded anyway.
    """
    base = os.fspath(root).rstrip("/")
    lstat = system.lstat
    resettled: dict[str, ManagedFile] = {}
    for key, record in previous.managed.items():
        try:
            st = lstat(base + key)
        except (OSError, PathError):
            return None
        if (
            (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino) != record.signature()
            or st.st_mode & 0o7777 != record.mode
            or st.st_uid != record.uid
            or st.st_gid != record.gid
        ):
            return None
        if not record.settled():
            now = time.time_ns()  # before the read: what the new record vouches for
            if record.ctime_ns >= now - racy_window_ns(record.ctime_ns):
                return None  # still within the window: an edit now would keep the stat
            try:
                if record.link:  # a desired symlink: the sha256 of its target text
                    sha256 = hashlib.sha256(os.fsencode(system.readlink(base + key))).hexdigest()
                else:
                    # A block file's bytes are kept (no more than the size we wrote):
                    # its record holds the sha256 of its blocks' view.
                    keep = record.size if record.block else 0
                    found = system.digest(base + key, expect=(st.st_dev, st.st_ino), keep=keep)
                    sha256 = found.sha256
            except (OSError, PathError):
                return None
            if record.block:
                from reconciler.pipeline.blocks import recorded_view

                sha256 = recorded_view(found.content or b"", record.block)
            if sha256 != record.sha256:
                return None  # edited within the tick of our write: drift
            resettled[key] = dataclasses.replace(record, recorded_ns=now)
    # absent: (SPEC §9): a path named absent that came back (a package upgrade
    # restoring sites-enabled/default) changes a watched directory or path.
    # directories: (SPEC §9): each as the last run left it; a purged one's listing
    # (and its subdirectories') changes when an entry is added or removed below.
    for key, d in previous.directories.items():
        try:
            st = lstat(base + key)
        except (OSError, PathError):
            return None
        if (
            not stat.S_ISDIR(st.st_mode)
            or st.st_mode & 0o7777 != d.mode
            or st.st_uid != d.uid
            or st.st_gid != d.gid
        ):
            return None
    for key, seen in (*previous.absent_watch.items(), *previous.purge_watch.items()):
        try:
            st = lstat(base + key)
            stamp = (st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            stamp = (-1, -1)
        except (OSError, PathError):
            return None
        if stamp != seen:
            return None
    return resettled
