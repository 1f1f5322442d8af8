"""The state directory (SPEC §2 ``state_dir``): its lock and its host-local caches.

Host side. Takes ``state_dir``; holds the run lock, prunes old backups, keeps
the inventory cache, reads the host-local exclude file.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from reconciler.errors import ConfigError, LockError
from reconciler.host.system import atomic_write


@contextmanager
def state_lock(state_dir: Path, timeout: float) -> Iterator[None]:
    """Hold ``<state_dir>/lock`` (flock) for one run; wait up to ``timeout`` seconds.

    Raises LockError ``another run holds the lock (pid N)`` (SPEC §6).
    """
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # Root only, also when it existed before (issue #3: backups hold old contents).
    if stat.S_IMODE(os.stat(state_dir).st_mode) & 0o077:
        os.chmod(state_dir, 0o700)
    path = state_dir / "lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
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


def prune_backups(state_dir: Path, keep: int) -> None:
    """Keep the backups of the last ``keep`` runs (SPEC §2 ``backups.keep``)."""
    base = state_dir / "backups"
    try:
        runs = sorted(p for p in base.iterdir() if p.is_dir())
    except FileNotFoundError:
        return
    for old in runs[: max(0, len(runs) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


INVENTORY_CACHE = "inventory-cache.json"


def read_inventory_cache(state_dir: Path) -> dict[str, Any]:
    """Checked host files by git blob id (see inventory.inventory_problems)."""
    try:
        data = json.loads((state_dir / INVENTORY_CACHE).read_bytes())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_inventory_cache(
    state_dir: Path, cache: dict[str, Any], inventory: Any, *, changed: bool
) -> None:
    """Keep only the blobs of the current hosts/ (the cache never grows past it)."""
    if not changed:
        return
    keep = {id(f.data) for f in inventory.files.values()}
    if inventory.defaults is not None:
        keep.add(id(inventory.defaults.data))
    current = {blob: data for blob, data in cache.items() if id(data) in keep}
    atomic_write(state_dir / INVENTORY_CACHE, json.dumps(current).encode(), mode=0o600)


def read_exclude_file(path: str | None) -> list[str]:
    """Lines of the host-local exclude file (SPEC §2 ``exclude_file``); [] if absent."""
    if not path:
        return []
    try:
        return Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the exclude file: {exc.strerror}") from exc
