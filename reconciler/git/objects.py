"""Loose objects read by us, checked, before libgit2 sees them: a truncated one cannot hang a run.

libgit2 1.9 inflates a loose object (``objects/ab/cdef…``) with a loop that
waits for output the zlib stream can no longer give once the file is
truncated: ``git_zstream_get_output`` treats ``Z_BUF_ERROR`` (no input left,
no progress) as "try again", so reading such an object spins at 100 % CPU
forever, inside C, where no timeout, signal handler or thread of ours can
stop it (issue 11: the report commit of every later run hung that way).
Packed objects are read by another loop that gives up when it makes no
progress ("error inflating zlib stream"): a truncated or damaged pack is an
error, never a hang.

So a repository opened by :func:`open_checked` never lets libgit2 read a
loose object: its object database is libgit2's pack backend plus
:class:`CheckedLoose`, a pygit2 ``OdbBackend`` that reads the file in Python
and hands libgit2 the object only when it is whole — the zlib stream ends
(``eof``) with nothing after it, the header ``"<type> <size>\\0"`` is well
formed, the body has that size and the SHA-1 of it all is the object's id,
as ``git fsck`` checks. Anything else raises :class:`CorruptCacheError`
naming the file (pygit2 re-raises a callback's exception as it is). The
work is bounded by the file's size: one read, one inflate (its output capped
at the size the header declares), one hash.

Writes go through libgit2's own loose backend (zlib, temp file, fsync,
rename), kept in a second object database that nothing reads from.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from pathlib import Path

import pygit2

from reconciler.errors import CorruptCacheError

HEADER_MAX = 32  # "<type> <size>\0": "commit" and a 20-digit size fit with room to spare

_TYPES = {
    b"commit": pygit2.enums.ObjectType.COMMIT,
    b"tree": pygit2.enums.ObjectType.TREE,
    b"blob": pygit2.enums.ObjectType.BLOB,
    b"tag": pygit2.enums.ObjectType.TAG,
}
_NAMES = {int(v): k for k, v in _TYPES.items()}


class CheckedLoose(pygit2.OdbBackend):
    """A CheckedLoose is the loose objects of one repository, read and checked in Python.

    ``objects`` is the repository's ``objects`` directory; ``repo`` its git
    directory (named by the errors); ``hint`` what to do about a corrupt one.
    Raises CorruptCacheError from every read of a damaged object, KeyError
    for one that is not there (libgit2 then asks the next backend).
    """

    def __init__(self, objects: Path, *, repo: str, hint: str, fsync: bool) -> None:
        super().__init__()
        self._objects = objects
        self._repo = repo
        self._hint = hint
        # libgit2's writer: the one that fsyncs (SPEC §5: no report is lost).
        self._writer = pygit2.Odb()
        self._writer.add_backend(pygit2.OdbBackendLoose(str(objects), zlib.Z_BEST_SPEED, fsync), 1)

    def _path(self, hex_id: str) -> Path:
        return self._objects / hex_id[:2] / hex_id[2:]

    def read_cb(self, oid: pygit2.Oid) -> tuple[int, bytes]:
        kind, body = read_loose(self._path(str(oid)), str(oid), repo=self._repo, hint=self._hint)
        return kind, body

    def read_header_cb(self, oid: pygit2.Oid) -> tuple[int, int]:
        # The whole object: a header read of a truncated file loops in libgit2 too.
        kind, body = self.read_cb(oid)
        return kind, len(body)

    def read_prefix_cb(self, prefix: str) -> tuple[int, bytes, pygit2.Oid]:
        hex_id = self._unique(prefix)
        kind, body = read_loose(self._path(hex_id), hex_id, repo=self._repo, hint=self._hint)
        return kind, body, pygit2.Oid(hex=hex_id)

    def exists_cb(self, oid: pygit2.Oid) -> bool:
        return self._path(str(oid)).is_file()

    def exists_prefix_cb(self, prefix: str) -> pygit2.Oid:
        return pygit2.Oid(hex=self._unique(prefix))

    def refresh_cb(self) -> None:
        return None  # every read looks at the directory afresh

    def write_cb(self, oid: pygit2.Oid, data: bytes, kind: int) -> None:
        try:
            self._writer.write(kind, data)
        except OSError as exc:
            # pygit2 raises libgit2's OS errors (ENOSPC) as OSError from this C call, as a
            # GitError from the cffi calls (an index's write_tree) that used to reach the
            # writer directly: keep the one type the callers map (git/errors.py).
            raise pygit2.GitError(str(exc)) from exc

    def _unique(self, prefix: str) -> str:
        """The one loose object whose id starts with ``prefix``; KeyError or ValueError."""
        prefix = prefix.lower()
        try:
            names = os.listdir(self._objects / prefix[:2])
        except (FileNotFoundError, NotADirectoryError):
            names = []
        found = [prefix[:2] + n for n in names if n.startswith(prefix[2:]) and len(n) == 38]
        if not found:
            raise KeyError(prefix)
        if len(found) > 1:
            raise ValueError(f"{prefix}: ambiguous object id prefix")
        return found[0]


def read_loose(path: Path, hex_id: str, *, repo: str, hint: str) -> tuple[int, bytes]:
    """(type, body) of the loose object ``hex_id`` stored at ``path``, checked whole.

    Raises KeyError when there is no such file, CorruptCacheError (``where``:
    the file) when it is truncated, not zlib, malformed, of another size than
    its header says, trailed by garbage or not the object its name says.
    """
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        raise KeyError(hex_id) from None
    except OSError as exc:
        raise _corrupt(path, f"cannot be read: {exc.strerror}", repo, hint) from exc
    inflater = zlib.decompressobj()
    try:
        head = inflater.decompress(raw, HEADER_MAX)
        name, space, rest = head.partition(b" ")
        size_text, nul, start = rest.partition(b"\0")
        if not nul and not inflater.eof and len(head) < HEADER_MAX:
            raise _corrupt(path, "truncated: the zlib stream ends early", repo, hint)
        if not (space and nul and name in _TYPES and size_text.isdigit()):
            raise _corrupt(path, "malformed object header", repo, hint)
        size = int(size_text)
        # Cap the output at the declared size (+1 to see an overrun): a bomb inflates no further.
        body = start + inflater.decompress(inflater.unconsumed_tail, size + 1 - len(start))
    except zlib.error as exc:
        raise _corrupt(path, f"not a valid zlib stream ({exc})", repo, hint) from exc
    if not inflater.eof and len(body) <= size:
        raise _corrupt(path, "truncated: the zlib stream ends early", repo, hint)
    if len(body) != size or inflater.unused_data or inflater.unconsumed_tail:
        raise _corrupt(path, f"size differs from its header ({size} bytes)", repo, hint)
    digest = hashlib.sha1(name + b" " + size_text + b"\0" + body, usedforsecurity=False)
    if digest.hexdigest() != hex_id:
        raise _corrupt(path, "content does not match its id", repo, hint)
    return int(_TYPES[name]), body


def _corrupt(path: Path, problem: str, repo: str, hint: str) -> CorruptCacheError:
    return CorruptCacheError(
        f"corrupt loose object: {problem}", repo=repo, where=str(path), hint=hint
    )


def open_checked(path: Path, *, fsync: bool, hint: str) -> pygit2.Repository:
    """The repository at ``path`` whose loose objects only :class:`CheckedLoose` reads.

    Its object database: libgit2's pack backend (fetches write packs there),
    then CheckedLoose for loose objects and for every write. Raises
    pygit2's errors as :class:`pygit2.Repository` does (the caller maps them).
    """
    raw = pygit2.Repository(str(path))
    objects = Path(raw.path) / "objects"
    odb = pygit2.Odb()
    # Higher priority first: packs, then loose objects read by us.
    odb.add_backend(pygit2.OdbBackendPack(str(objects)), 2)
    odb.add_backend(CheckedLoose(objects, repo=str(path), hint=hint, fsync=fsync), 1)
    raw.set_odb(odb)
    return raw
