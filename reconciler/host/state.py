"""Local state: what the last run wrote, kept in ``<state_dir>/state.json``.

Read before scan, written after apply. For every managed path it keeps the
sha256 (never the content: chezmoi's rule, so a secret never lands in
``state_dir`` in clear), mode, owner and a stat signature, so that drift —
"a managed path whose actual state differs from what reconciler last wrote"
(SPEC vocabulary) — can be told apart from a change of the desired state.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from reconciler.errors import StateError
from reconciler.host.statedir import StateDir

STATE_VERSION = 1
RACY_WINDOW_NS = 100_000_000  # 100 ms: above the kernel's coarse clock tick
# A stamp of whole seconds comes from a filesystem with 1 s or 2 s timestamps
# (ext2/3 with small inodes, FAT, old NFS servers): the file may change until the
# end of that 2 s slot and keep the stamp, so its window is that long.
COARSE_WINDOW_NS = 2_000_000_000 + RACY_WINDOW_NS


def racy_window_ns(stamp_ns: int) -> int:
    """How long after a file's ``stamp_ns`` (its ctime, in ns) an edit can still keep
    its stat signature: RACY_WINDOW_NS, or COARSE_WINDOW_NS when the stamp has no
    sub-second part (a coarse-timestamp filesystem; on a fine one that costs one
    rehash in a billion). Git's racily clean index entries, SPEC §7."""
    return RACY_WINDOW_NS if stamp_ns % 1_000_000_000 else COARSE_WINDOW_NS


@dataclass(frozen=True, slots=True, kw_only=True)
class ManagedFile:
    """A ManagedFile is what reconciler last wrote at a path, and how it looked on disk."""

    sha256: str
    mode: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    app: str
    owner: str | None = None
    group: str | None = None
    secret: bool = False
    policy: str = "enforce"
    recorded_ns: int = 0  # wall clock when the stat was taken
    render_key: str = ""  # TargetFile.render_key of the content recorded here
    link: bool = False  # a desired symlink (SPEC §9): sha256 is that of its target text
    # Managed blocks (SPEC §9): the markers of the file's blocks, one per line;
    # sha256 is then that of the blocks' view, not of the file (pipeline/blocks.py).
    block: str = ""

    @classmethod
    def from_stat(
        cls, st: os.stat_result, *, sha256: str, app: str, recorded_ns: int, **meta: Any
    ) -> ManagedFile:
        """The record of a file reconciler wrote, from its lstat right after the write;
        ``meta``: owner, group, secret, policy, render_key."""
        return cls(
            sha256=sha256,
            mode=stat.S_IMODE(st.st_mode),
            uid=st.st_uid,
            gid=st.st_gid,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            ino=st.st_ino,
            app=app,
            recorded_ns=recorded_ns,
            **meta,
        )

    def signature(self) -> tuple[int, int, int, int]:
        """The stat signature that lets a no-change scan skip hashing."""
        return (self.size, self.mtime_ns, self.ctime_ns, self.ino)

    def settled(self) -> bool:
        """True when the signature can be trusted without hashing.

        File timestamps come from a coarse clock: an edit of the same size
        within one tick of our write keeps the same signature. Like git's
        "racily clean" index entries, a record taken less than RACY_WINDOW_NS
        after the file last changed is re-hashed on the next scan.
        """
        return self.ctime_ns < self.recorded_ns - racy_window_ns(self.ctime_ns)


@dataclass(frozen=True, slots=True, kw_only=True)
class ManagedDir:
    """A ManagedDir is how a directory of ``directories:`` (SPEC §9) looked when the last
    run left it: what later differs is drift, not a desired change."""

    mode: int
    uid: int
    gid: int
    app: str

    def to_json(self) -> list[Any]:
        """``[mode, uid, gid, app]``: compact, as state.json keeps thousands of records."""
        return [self.mode, self.uid, self.gid, self.app]

    @classmethod
    def from_json(cls, raw: Any) -> ManagedDir:
        """Parse :meth:`to_json`'s shape; TypeError for any other."""
        if (
            not isinstance(raw, list)
            or len(raw) != 4
            or not all(type(n) is int for n in raw[:3])
            or not isinstance(raw[3], str)
        ):
            raise TypeError("a directory record is not [mode, uid, gid, app]")
        return cls(mode=raw[0], uid=raw[1], gid=raw[2], app=raw[3])


def _watch(raw: Any, name: str) -> dict[str, tuple[int, int]]:
    """A watch map (destination path → [mtime_ns, ctime_ns]) from JSON; TypeError otherwise."""
    if not isinstance(raw, dict) or not all(
        isinstance(v, list) and len(v) == 2 and all(type(n) is int for n in v) for v in raw.values()
    ):
        raise TypeError(f"{name} of the wrong type")
    return {k: (v[0], v[1]) for k, v in raw.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalState:
    """LocalState is the applied commit and the managed paths of the last run."""

    node: str = ""
    applied_commit: str | None = None
    managed: Mapping[str, ManagedFile] = field(default_factory=dict)
    created_dirs: tuple[str, ...] = ()
    fingerprint: str = ""  # inputs of the last full run besides the commit (agent.py)
    excluded: tuple[str, ...] = ()  # excluded paths of the last full run
    # absent: (SPEC §9): destination path → (mtime_ns, ctime_ns), (-1, -1) for
    # missing, of what the patterns looked at after the last full run
    # (scan.find_absent): a path named absent that comes back changes one of them.
    absent_watch: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    # Packages and services the last run ensured (SPEC §11; pipeline/packages.py):
    # "package NAME" → present | absent, "service UNIT" → "enabled running" …
    resources: Mapping[str, str] = field(default_factory=dict)
    # The package database's stat ("mtime_ns ino" of dpkg's status or rpm's
    # database) after the last full run: the no-op short cut's cheap signal that a
    # package was installed or removed since (reuse.py).
    package_db: str = ""
    # directories: (SPEC §9): each managed directory as the last run left it.
    directories: Mapping[str, ManagedDir] = field(default_factory=dict)
    # purge: true (SPEC §9): every directory the purge walk listed → (mtime_ns,
    # ctime_ns) after the last full run: an entry added below changes one of them.
    purge_watch: Mapping[str, tuple[int, int]] = field(default_factory=dict)


_HINT = "move it away to start afresh (every managed path is then planned anew)"


# The JSON types of each ManagedFile field, in the order save_state writes them.
_RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "sha256": (str,),
    "mode": (int,),
    "uid": (int,),
    "gid": (int,),
    "size": (int,),
    "mtime_ns": (int,),
    "ctime_ns": (int,),
    "ino": (int,),
    "app": (str,),
    "owner": (str, type(None)),
    "group": (str, type(None)),
    "secret": (bool,),
    "policy": (str,),
    "recorded_ns": (int,),
    "render_key": (str,),
    "link": (bool,),
    "block": (str,),
}
# What save_state writes in the common case (owner and group unset): one tuple
# comparison per record on the no-op path instead of fifteen isinstance checks.
_COMMON = tuple(
    t[0] if f not in ("owner", "group") else type(None) for f, t in _RECORD_TYPES.items()
)


def _record(m: Any) -> ManagedFile:
    """A ManagedFile from its JSON; TypeError when a field is missing, unknown or of
    another type (a record of the wrong type would fail the run much later)."""
    if type(m) is not dict:
        raise TypeError(f"a record is a {type(m).__name__}")
    if tuple(map(type, m.values())) != _COMMON:
        for name, value in m.items():
            allowed = _RECORD_TYPES.get(name)
            if allowed is None:
                raise TypeError(f"unknown field {name!r}")
            if type(value) not in allowed:
                raise TypeError(f"{name} is a {type(value).__name__}")
    return ManagedFile(**m)


def load_state(state_dir: StateDir) -> LocalState:
    """Read the local state; an empty LocalState when there is none yet.

    Raises StateError when the file exists but cannot be parsed or has
    another shape than :func:`save_state` writes (``{}``, ``[]``, a record
    with a field of the wrong type), rather than silently forgetting every
    managed path (which would stop prunes). A run moves such a file aside
    (recovery.py); every other reader stops with the error.
    """
    path = state_dir.state_file
    raw = state_dir.read_json(path, hint=_HINT)
    if raw is None:
        return LocalState()
    try:
        if not isinstance(raw, dict) or not isinstance(raw.get("managed"), dict):
            raise TypeError("no managed paths")
        node, commit = raw.get("node", ""), raw.get("applied_commit")
        fingerprint = raw.get("fingerprint", "")
        dirs, excluded = raw.get("created_dirs", []), raw.get("excluded", [])
        watch = _watch(raw.get("absent_watch", {}), "absent_watch")
        purge_watch = _watch(raw.get("purge_watch", {}), "purge_watch")
        directories = raw.get("directories", {})
        if not isinstance(directories, dict):
            raise TypeError("directories of the wrong type")
        resources, package_db = raw.get("resources", {}), raw.get("package_db", "")
        if not (
            isinstance(resources, dict)
            and all(isinstance(v, str) for v in resources.values())
            and isinstance(package_db, str)
        ):
            raise TypeError("resources of the wrong type")
        if not (
            isinstance(node, str)
            and isinstance(commit, str | None)
            and isinstance(fingerprint, str)
            and isinstance(dirs, list)
            and isinstance(excluded, list)
            and all(isinstance(d, str) for d in [*dirs, *excluded])
        ):
            raise TypeError("node, commit, fingerprint or paths of the wrong type")
        return LocalState(
            node=node,
            applied_commit=commit,
            managed={p: _record(m) for p, m in raw["managed"].items()},
            created_dirs=tuple(dirs),
            fingerprint=fingerprint,
            excluded=tuple(excluded),
            absent_watch=watch,
            resources=resources,
            package_db=package_db,
            directories={k: ManagedDir.from_json(v) for k, v in directories.items()},
            purge_watch=purge_watch,
        )
    except (TypeError, AttributeError) as exc:
        raise StateError(
            f"local state has an unknown shape ({exc})", where=str(path), hint=_HINT
        ) from exc


_RECORD_FIELDS = tuple(f.name for f in fields(ManagedFile))


def save_state(state_dir: StateDir, state: LocalState) -> None:
    """Write the local state atomically, readable by its owner only.

    Compact JSON, fields by getattr rather than ``asdict`` (which
    deep-copies): at 2,000 managed files this was a third of a change run.
    """
    data = {
        "version": STATE_VERSION,
        "node": state.node,
        "applied_commit": state.applied_commit,
        "managed": {
            p: {f: getattr(m, f) for f in _RECORD_FIELDS} for p, m in sorted(state.managed.items())
        },
        "created_dirs": sorted(state.created_dirs),
        "fingerprint": state.fingerprint,
        "excluded": list(state.excluded),
        "absent_watch": {k: list(v) for k, v in sorted(state.absent_watch.items())},
    }
    if state.directories:  # only then, as for resources: a state without them stays as it was
        data["directories"] = {k: d.to_json() for k, d in sorted(state.directories.items())}
    if state.purge_watch:
        data["purge_watch"] = {k: list(v) for k, v in sorted(state.purge_watch.items())}
    if state.resources:  # only then: a state without packages stays as earlier versions wrote it
        data["resources"] = dict(sorted(state.resources.items()))
        data["package_db"] = state.package_db
    state_dir.write_json(state_dir.state_file, data)
