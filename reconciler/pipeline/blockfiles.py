"""Block files between scan and plan (SPEC §9 managed blocks): :func:`resolve`.

Converge stage. Takes the TargetState, the ActualState of the scan, the
LocalState and a System; produces the three again, with every file holding
managed blocks (pipeline/blocks.py) turned into what plan and apply compare
and write: the view of its blocks found on disk (``ActualFile.block`` and
its sha256), the whole file to write (``TargetFile.whole``). Reads only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from reconciler.errors import PathError
from reconciler.host.state import LocalState, ManagedFile
from reconciler.pipeline.blocks import BlockError, found_view, splice
from reconciler.pipeline.render import TargetFile, TargetState
from reconciler.pipeline.scan import ActualFile, host_path

if TYPE_CHECKING:
    from reconciler.host.system import System


def resolve(
    target: TargetState,
    actual: Mapping[PurePosixPath, ActualFile],
    previous: LocalState,
    root: Path,
    system: System,
    *,
    max_size: int,
) -> tuple[TargetState, dict[PurePosixPath, ActualFile], LocalState]:
    """Turn block files into what plan and apply compare and write (module docstring).

    For each destination holding blocks now, or whose record says it held some
    (the blocks that left the target state are removed from the file, the
    file stays): reads the file through ``system`` (only the inode the scan
    saw, never through a symlink, at most ``max_size`` bytes); the ActualFile
    gets the view found (``block``, its ``sha256``), the TargetFile the whole
    file to write (``whole``) and, unless metadata sets a mode, the file's own
    mode. A file whose markers are broken, too large, or not a regular file
    becomes ``unsafe`` with the reason: the plan refuses that path and writes
    nothing there. A record of the other kind (a whole file now managed as
    blocks, or the reverse) is dropped, so the switch is a desired change,
    not drift. Returns the new target, actual and previous.
    """
    files = dict(target.files)
    found = dict(actual)
    managed = dict(previous.managed)
    paths = [p for p, t in files.items() if t.blocks]
    for key, record in previous.managed.items():
        dest = PurePosixPath(key)
        wanted = files.get(dest)
        if wanted is not None and bool(wanted.blocks) != bool(record.block):
            del managed[key]  # a whole file now a block file, or the reverse
        elif record.block and wanted is None and dest in found:
            paths.append(dest)
    if not paths and len(managed) == len(previous.managed):
        return target, found, previous
    for path in paths:
        a = found[path]
        t = files.get(path)
        m = managed.get(str(path))
        blocks = t.blocks if t is not None else ()
        current = {b.marker for b in blocks}
        gone = [x for x in (m.block.split("\n") if m is not None else ()) if x not in current]
        if t is None:
            if a.kind == "missing":
                continue  # nothing to remove: the record is forgotten by the plan
            first = _first_app(m)
            t = TargetFile(
                path=path,
                content=b"",
                mode=a.mode,
                owner=None,
                group=None,
                secret=bool(m is not None and m.secret),
                policy=m.policy if m is not None else "enforce",
                app=first,
                template="",
            )
        if a.kind == "missing":
            files[path] = replace(t, whole=splice(b"", blocks, ()), unblocks=tuple(gone))
            continue
        if a.kind != "file":
            if a.kind != "unsafe":
                found[path] = replace(
                    a,
                    kind="unsafe",
                    problem=f"a {a.kind} is there; a managed block lives in a regular file — "
                    "replace it by a file, or remove block: from its metadata",
                )
            files[path] = t
            continue
        try:
            read = system.digest(host_path(root, path), expect=(a.dev, a.ino), keep=max_size)
        except (OSError, PathError) as exc:
            problem = exc.problem if isinstance(exc, PathError) else str(exc.strerror or exc)
            found[path] = replace(a, kind="unsafe", problem=f"not read: {problem}")
            files[path] = t
            continue
        if read.content is None:
            found[path] = replace(
                a,
                kind="unsafe",
                problem=f"{read.size} bytes, more than max_file_size allows for a file "
                "with managed blocks",
            )
            files[path] = t
            continue
        try:
            shown = found_view(read.content, blocks, gone)
            whole = splice(read.content, blocks, gone)
        except BlockError as exc:
            found[path] = replace(
                a,
                kind="unsafe",
                problem=f"{exc} — fix the markers by hand; reconciler does not guess "
                "where a block ends",
            )
            files[path] = t
            continue
        found[path] = replace(a, sha256=hashlib.sha256(shown).hexdigest(), block=shown)
        files[path] = replace(
            t,
            whole=whole,
            unblocks=tuple(gone),
            mode=t.mode if t.mode_set else a.mode,
        )
    # replace(): every other field of the target and the local state kept as it is.
    return replace(target, files=files), found, replace(previous, managed=managed)


def _first_app(m: ManagedFile | None) -> str:
    return m.app if m is not None else ""
