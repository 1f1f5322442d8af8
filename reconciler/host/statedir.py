"""The state directory (SPEC §2 ``state_dir``): one owner for every file in it.

Host side. A :class:`StateDir` names each artifact the agent keeps between
runs, holds the run lock, and reads every JSON file with one error policy:

- a **record** (``state.json``, ``journal.json``, ``owed.json``,
  ``hold.json``, ``last-run.json``, ``agent.json``, a backup's
  ``manifest.json``) that is missing reads as ``None``; one that exists but
  cannot be read or parsed is a :class:`~reconciler.errors.StateError`
  naming the file and what to do — never a traceback, and never silently
  empty (an empty ``state.json`` would forget every managed path and stop
  prunes; an empty ``owed.json`` would skip a reload);
- a **cache** (``inventory-cache.json``, ``template-cache.json``, ``jinja-cache/``) that is corrupt is
  rebuilt, with a warning in the log: losing it costs time, never
  correctness; a cache that cannot be written (a full disk) is skipped.

A run does not stop at a corrupt record for ever: it moves the file aside
(:meth:`StateDir.set_aside`, ``<name>.corrupt-<UTC time>``, kept for
inspection) and carries on the safe way for that file — recovery.py says
how for each. A write that fails (``ENOSPC``, ``EIO``, a directory where
the file belongs) is a StateError naming the file, never a bare OSError.

Layout::

    <state_dir>/               0700, root only (backups hold old contents)
      lock                     flock of the run in progress, holds its pid
      state.json               LocalState: applied commit, managed files
      repo.git/                bare cache of the desired-state repo + report branch
      repo.git.corrupt-<time>/ a corrupt repo.git moved aside (reconciler.git.cache)
      inventory-cache.json     checked host files by git blob id (cache)
      template-cache.json      what each template reads, by git blob id (cache)
      jinja-cache/             compiled templates by blob id (cache)
      journal.json             manifest of the run in progress (crash safety)
      journal.log              app phases the run in progress reached
      owed.json                post scripts interrupted runs still owe
      hold.json                a rollback's hold on a commit
      last-run.json            the last run's report, for ``status``
      agent.json               the running agent's pid and next run
      run/<run-id>/            scripts' working directories during a run
      backups/<run-id>/        a run's manifest.json and files/ (rollback)
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from reconciler.errors import ConfigError, LockError, StateError
from reconciler.host.system import (
    aside_path,
    atomic_write,
    fsync_dir,
    make_private_dirs,
    open_regular,
    read_regular,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


@dataclass(frozen=True, slots=True)
class StateDir:
    """A StateDir is the agent's state directory: the path of each file in it."""

    path: Path

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> StateDir:
        """The StateDir at ``path``, made absolute (scripts run elsewhere; SPEC §4)."""
        return cls(Path(os.path.abspath(path)))

    # ------------------------------------------------------------ the files

    @property
    def lock_file(self) -> Path:
        return self.path / "lock"

    @property
    def state_file(self) -> Path:
        return self.path / "state.json"

    @property
    def repo(self) -> Path:
        return self.path / "repo.git"

    @property
    def inventory_cache(self) -> Path:
        return self.path / "inventory-cache.json"

    @property
    def template_cache(self) -> Path:
        return self.path / "template-cache.json"

    @property
    def jinja_cache(self) -> Path:
        return self.path / "jinja-cache"

    @property
    def journal(self) -> Path:
        return self.path / "journal.json"

    @property
    def journal_log(self) -> Path:
        return self.path / "journal.log"

    @property
    def owed(self) -> Path:
        return self.path / "owed.json"

    @property
    def hold(self) -> Path:
        return self.path / "hold.json"

    @property
    def last_run(self) -> Path:
        return self.path / "last-run.json"

    @property
    def agent_file(self) -> Path:
        return self.path / "agent.json"

    @property
    def reports_location(self) -> Path:
        # The report repository repo.git's fetched report tip and pushed marker
        # describe (SPEC §12): a move of the reports location is noticed by it.
        return self.path / "reports-location.json"

    @property
    def backups(self) -> Path:
        return self.path / "backups"

    def run_dir(self, run_id: str) -> Path:
        """``run/<run-id>``: the scripts' working directories of one run."""
        return self.path / "run" / run_id

    def backup_dir(self, run_id: str) -> Path:
        """``backups/<run-id>``: the manifest and ``files/`` of one run."""
        return self.backups / run_id

    def manifest(self, run_id: str) -> Path:
        """``backups/<run-id>/manifest.json``."""
        return self.backup_dir(run_id) / MANIFEST

    def backup_file(self, run_id: str, dest: PurePosixPath) -> Path:
        """Where the previous content of destination ``dest`` is kept for ``run_id``."""
        return self.backup_dir(run_id).joinpath("files", *dest.parts[1:])

    # ------------------------------------------------------------ policy

    def ensure(self) -> None:
        """Create the directory (0700); make an existing one root-only too (issue #3)."""
        self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        if stat.S_IMODE(os.stat(self.path).st_mode) & 0o077:
            os.chmod(self.path, 0o700)

    def read_bytes(self, path: Path, *, hint: str) -> bytes | None:
        """A record's bytes; None when it does not exist.

        Raises StateError ``"{path}: cannot read it ({reason}) — {hint}"``.
        """
        try:
            return read_regular(path)  # never blocks on a FIFO, never another user's link
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(
                f"cannot read it ({exc.strerror or exc})", where=str(path), hint=hint
            ) from exc

    def read_json(self, path: Path, *, hint: str) -> Any:
        """A record parsed as JSON; None when it does not exist.

        Raises StateError naming the file, the problem and ``hint`` (what the
        operator should do) when it cannot be read or is not JSON.
        """
        raw = self.read_bytes(path, hint=hint)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError as exc:
            raise StateError(f"not valid JSON ({exc})", where=str(path), hint=hint) from exc

    def write_bytes(self, path: Path, raw: bytes) -> None:
        """Write a record atomically and durably, readable by root only.

        Raises StateError ``"{path}: cannot write it ({reason}) — {hint}"``:
        on a full disk the hint says to free space and that the next run
        finishes and reports this one (its journal stays; recovery.py).
        The old content of ``path`` is untouched when the write fails.
        """
        try:
            atomic_write(path, raw, mode=0o600)
        except OSError as exc:
            raise self.write_error(path, exc) from exc

    def write_error(self, path: Path, exc: OSError) -> StateError:
        """The StateError for a failed write of ``path`` in the state directory."""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = (
                f"free space on the filesystem of {self.path} (df {self.path}); "
                "the next run finishes and reports this one"
            )
        else:
            hint = f"check {self.path} and its filesystem, then run again"
        return StateError(f"cannot write it ({exc.strerror or exc})", where=str(path), hint=hint)

    def write_json(self, path: Path, data: Any, *, indent: int | None = None) -> None:
        """Write ``data`` as JSON atomically and durably, readable by root only.

        Raises StateError as :meth:`write_bytes` does.
        """
        if indent is None:
            raw = json.dumps(data, separators=(",", ":")).encode()
        else:
            raw = json.dumps(data, indent=indent).encode()
        self.write_bytes(path, raw)

    def write_cache(self, path: Path, raw: bytes) -> bool:
        """Write a cache file; never raises (a cache that cannot be kept costs time only).

        Whatever is in its place and is not a regular file (a directory) is
        moved aside first. Returns False, with a warning in the log, when it
        could not be written (a full disk).
        """
        try:
            if path.is_dir() and not path.is_symlink():
                self.set_aside(path)
            atomic_write(path, raw, mode=0o600)
        except (OSError, StateError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else exc.problem
            log.warning("%s: cannot write the cache (%s) — going on without it", path, reason)
            return False
        return True

    def set_aside(self, path: Path) -> Path:
        """Move a corrupt file (or whatever is in its place) to ``<name>.corrupt-<UTC time>``
        beside it, durably; the new path. Kept for the operator to inspect, never
        read again. Raises StateError when it cannot be moved.
        """
        aside = aside_path(path)
        try:
            os.rename(path, aside)
            fsync_dir(path.parent)
        except OSError as exc:
            raise StateError(
                f"cannot move it aside ({exc.strerror or exc})",
                where=str(path),
                hint=f"move it away by hand (mv {path} {aside})",
            ) from exc
        return aside

    def ensure_dir(self, path: Path) -> None:
        """Make the directory ``path`` of the state directory (0700) if missing.

        Something else in its place (a file where ``backups/`` or
        ``jinja-cache/`` belongs) is moved aside, with a warning: those
        directories are ours; a symlink to a directory (an operator's choice of
        disk) is kept. Raises StateError when it cannot be made.
        """
        if path.is_dir():
            return
        try:
            if os.path.lexists(path):
                aside = self.set_aside(path)
                log.warning("%s: not a directory — moved to %s", path, aside.name)
            make_private_dirs(path)
        except OSError as exc:
            raise self.write_error(path, exc) from exc

    def remove(self, path: Path) -> bool:
        """Remove a record durably; True if it existed."""
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        fsync_dir(path.parent)
        return True

    # ------------------------------------------------------------ the lock

    @contextmanager
    def lock(self, timeout: float) -> Iterator[None]:
        """Hold ``lock`` (flock) for one run; wait up to ``timeout`` seconds.

        Creates the directory first (:meth:`ensure`). Raises LockError
        ``another run holds the lock (pid N)`` (SPEC §6).
        """
        self.ensure()
        path = self.lock_file
        try:
            fd = open_regular(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(
                f"cannot open the lock ({exc.strerror or exc})",
                where=str(path),
                hint="remove it; the next run makes it again",
            ) from exc
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                        raise LockError(
                            f"{path}: another run holds the lock (pid {holder}) — "
                            "wait for it or raise lock_timeout"
                        ) from None
                    time.sleep(0.1)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------ upkeep

    def prune_backups(self, keep: int) -> None:
        """Keep the backups of the last ``keep`` runs (SPEC §2 ``backups.keep``)."""
        try:
            runs = sorted(p for p in self.backups.iterdir() if p.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return  # none kept (a file in its place is moved aside by the next change)
        for old in runs[: max(0, len(runs) - keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def remove_run_dir(self, run_id: str) -> None:
        """Drop ``run/<run-id>`` (the scripts' working directories) after a run."""
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)

    def read_inventory_cache(self) -> dict[str, Any]:
        """Checked host files by git blob id (see inventory.inventory_problems).

        The file is ``sha256:<hex of the rest>\\n`` then the JSON mapping: the
        inventory trusts an entry without checking it again, so an entry
        changed by anyone but :meth:`write_inventory_cache` (a bad sector,
        an edit) must not be trusted — it would fail every run (issue 11).
        A file whose digest or shape is wrong is rebuilt, with a warning.
        """
        return self._read_checked_cache(self.inventory_cache)

    def _read_checked_cache(self, path: Path) -> dict[str, Any]:
        """A ``sha256:<hex>\\n{json}`` cache: the mapping, or {} (a warning) when damaged."""
        try:
            raw = read_regular(path)  # never blocks on a FIFO
        except FileNotFoundError:
            return {}
        except OSError as exc:
            log.warning("%s: cannot read the cache (%s) — rebuilding it", path, exc.strerror)
            return {}
        head, _, body = raw.partition(b"\n")
        if head != b"sha256:" + hashlib.sha256(body).hexdigest().encode():
            if not _plain_json_object(raw):  # an older version's format is no damage
                log.warning("%s: corrupt cache (checksum) — rebuilding it", path)
            return {}
        try:
            data = json.loads(body)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
            log.warning("%s: corrupt cache — rebuilding it", path)
            return {}
        return data

    def write_inventory_cache(
        self, cache: dict[str, Any], inventory: Any, *, changed: bool
    ) -> None:
        """Keep only the blobs of the current hosts/ (the cache never grows past it).

        Never raises (:meth:`write_cache`).
        """
        if not changed:
            return
        keep = {id(f.data) for f in inventory.files.values()}
        if inventory.defaults is not None:
            keep.add(id(inventory.defaults.data))
        current = {blob: data for blob, data in cache.items() if id(data) in keep}
        body = json.dumps(current).encode()
        head = b"sha256:" + hashlib.sha256(body).hexdigest().encode()
        self.write_cache(self.inventory_cache, head + b"\n" + body)

    def read_template_cache(self) -> dict[str, Any]:
        """What each template reads, by git blob id (``renderkeys.Analysis``), checked
        as :meth:`read_inventory_cache` checks its cache: a damaged file is rebuilt."""
        return self._read_checked_cache(self.template_cache)

    def write_template_cache(self, cache: dict[str, Any], *, changed: bool) -> None:
        """Keep ``cache`` (the render stage prunes it to the node's templates) when it
        ``changed``. Never raises (:meth:`write_cache`)."""
        if not changed:
            return
        body = json.dumps(cache, sort_keys=True).encode()
        head = b"sha256:" + hashlib.sha256(body).hexdigest().encode()
        self.write_cache(self.template_cache, head + b"\n" + body)


_HOLD_HINT = "remove it to lift the hold (the next run re-applies the commit)"


def _plain_json_object(raw: bytes) -> bool:
    try:
        return isinstance(json.loads(raw), dict)
    except ValueError:
        return False


def read_hold(state_dir: StateDir) -> dict[str, Any] | None:
    """The hold left by a rollback, or None.

    Keys (rollback.py writes them): ``commit`` (40 hex: the commit not to
    re-apply), ``rolled_back_run``, ``rollback_run``, ``since`` (ISO 8601
    UTC), ``head`` (the branch head fetched at rollback time: it and its
    ancestors existed before the rollback and never lift it; absent from a
    hold rebuilt by recovery) and ``unchanged_at`` (the last newer commit a
    run found to leave this node's target as held; issue 12).

    Raises StateError when unreadable or not an object naming a ``commit``
    (a run rebuilds it then: recovery.py).
    """
    data = state_dir.read_json(state_dir.hold, hint=_HOLD_HINT)
    if data is None:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("commit"), str):
        raise StateError("a hold without a commit", where=str(state_dir.hold), hint=_HOLD_HINT)
    return data


def keep_hold(state_dir: StateDir, *, unchanged_at: str) -> None:
    """Record in the hold that commit ``unchanged_at`` leaves this node's target as
    held, so later runs of that commit stay held without rendering it again.
    No hold: nothing. Raises StateError when the hold cannot be read."""
    hold = read_hold(state_dir)
    if hold is None or hold.get("unchanged_at") == unchanged_at:
        return
    state_dir.write_json(state_dir.hold, {**hold, "unchanged_at": unchanged_at}, indent=None)


def release_hold(state_dir: StateDir) -> bool:
    """Lift the hold; True if there was one."""
    return state_dir.remove(state_dir.hold)


def read_exclude_file(path: str | None) -> list[str]:
    """Lines of the host-local exclude file (SPEC §2 ``exclude_file``); [] if absent.

    Raises ConfigError when it cannot be read — a FIFO or a device put there
    included (read without blocking: ``open_regular``): the run changes
    nothing rather than run without the paths it protects.
    """
    if not path:
        return []
    try:
        raw = read_regular(path)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read the exclude file: {exc.strerror or exc} — "
            "make it a regular file, one pattern a line, or remove it"
        ) from exc
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: the exclude file is not UTF-8 text ({exc.reason} at byte {exc.start}) — "
            "make it a regular file, one pattern a line, or remove it"
        ) from exc
