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
- a **cache** (``inventory-cache.json``, ``jinja-cache/``) that is corrupt is
  rebuilt, with a warning in the log: losing it costs time, never
  correctness.

Layout::

    <state_dir>/               0700, root only (backups hold old contents)
      lock                     flock of the run in progress, holds its pid
      state.json               LocalState: applied commit, managed files
      repo.git/                bare cache of the desired-state repo + report branch
      inventory-cache.json     checked host files by git blob id (cache)
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

import fcntl
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
from reconciler.host.system import atomic_write, fsync_dir, open_regular, read_regular

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

    def read_cache(self, path: Path) -> Any:
        """A cache parsed as JSON; None when missing, unreadable or corrupt (logged)."""
        try:
            raw = read_regular(path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s: cannot read the cache (%s) — rebuilding it", path, exc.strerror)
            return None
        try:
            return json.loads(raw)
        except ValueError:
            log.warning("%s: corrupt cache — rebuilding it", path)
            return None

    def write_json(self, path: Path, data: Any, *, indent: int | None = None) -> None:
        """Write ``data`` as JSON atomically and durably, readable by root only."""
        if indent is None:
            raw = json.dumps(data, separators=(",", ":")).encode()
        else:
            raw = json.dumps(data, indent=indent).encode()
        atomic_write(path, raw, mode=0o600)

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
        except FileNotFoundError:
            return
        for old in runs[: max(0, len(runs) - keep)]:
            shutil.rmtree(old, ignore_errors=True)

    def remove_run_dir(self, run_id: str) -> None:
        """Drop ``run/<run-id>`` (the scripts' working directories) after a run."""
        shutil.rmtree(self.run_dir(run_id), ignore_errors=True)

    def read_inventory_cache(self) -> dict[str, Any]:
        """Checked host files by git blob id (see inventory.inventory_problems)."""
        data = self.read_cache(self.inventory_cache)
        return data if isinstance(data, dict) else {}

    def write_inventory_cache(
        self, cache: dict[str, Any], inventory: Any, *, changed: bool
    ) -> None:
        """Keep only the blobs of the current hosts/ (the cache never grows past it)."""
        if not changed:
            return
        keep = {id(f.data) for f in inventory.files.values()}
        if inventory.defaults is not None:
            keep.add(id(inventory.defaults.data))
        current = {blob: data for blob, data in cache.items() if id(data) in keep}
        atomic_write(self.inventory_cache, json.dumps(current).encode(), mode=0o600)


def read_hold(state_dir: StateDir) -> dict[str, Any] | None:
    """The hold left by a rollback, or None. Raises StateError when unreadable."""
    data = state_dir.read_json(
        state_dir.hold, hint="remove it to lift the hold (the next run re-applies the commit)"
    )
    return data if isinstance(data, dict) else None


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
