"""Facts: what this host is, for the template context and the report (SPEC §1, §5, §10).

Read-only; takes the local facts directory (``facts_dir``), produces a
JSON-shaped mapping with at least ``hostname``, ``fqdn``, ``os_release``,
``kernel``, ``arch``, ``cpu_count`` and ``mem_total_kb``, plus ``local``:
what the operator put in ``facts_dir`` (:func:`local_facts`).
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import select
import signal
import socket
import stat
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reconciler.errors import FactsError


def _fqdn(hostname: str) -> str:
    # getaddrinfo reads /etc/hosts first and never does a reverse lookup,
    # unlike socket.getfqdn, so a host with a dead resolver does not stall.
    try:
        infos = socket.getaddrinfo(hostname, None, flags=socket.AI_CANONNAME)
    except OSError:
        return hostname
    for info in infos:
        if info[3]:
            return info[3]
    return hostname


def _mem_total_kb() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def gather_facts(
    facts_dir: str | None = None, *, redact: Callable[[str], str] | None = None
) -> dict[str, Any]:
    """Return this host's facts; every key is present even when a source is missing.

    ``local``: the local facts of ``facts_dir`` (:func:`local_facts`; {} for
    None or a missing directory). Raises FactsError as :func:`local_facts` does,
    the stderr line it quotes passed through ``redact``.
    """
    hostname = socket.gethostname().split(".")[0]
    try:
        os_release = dict(platform.freedesktop_os_release())
    except OSError:
        os_release = {}
    return {
        "hostname": hostname,
        "fqdn": _fqdn(socket.gethostname()),
        "os_release": os_release,
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpu_count": os.cpu_count() or 1,
        "mem_total_kb": _mem_total_kb(),
        "local": local_facts(facts_dir, redact=redact),
    }


# Local facts (SPEC §10), as Ansible's /etc/ansible/facts.d: files an operator
# (or a package) drops on a host to tell its templates what only the host knows.
FACT_DATA_SUFFIXES = (".yaml", ".json")
# An executable fact runs on every run (the no-op short cut compares facts), so
# it must be quick; one that hangs must not hold the run's lock for ever.
FACT_TIMEOUT = 10.0  # seconds, per executable
MAX_FACT_SIZE = 1 << 20  # bytes of one file, or of one executable's output
# What an executable fact runs with: no shell, no inherited environment (the
# agent's may hold RECONCILER_* settings; the output must not depend on how
# the agent was started), stdin /dev/null, cwd the facts directory.
FACT_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LC_ALL": "C.UTF-8",
}


def _others_could_write(st: os.stat_result) -> str | None:
    """Why a user other than root and us could change this file or directory, or None.

    Facts go into templates that root renders and writes anywhere, and an
    executable fact runs as root: one that another user can change is a way
    for any local user to root (the rule of ``host/system.only_we_could_make``).
    """
    if st.st_uid not in (0, os.geteuid()):
        return f"owned by uid {st.st_uid}"
    if st.st_mode & 0o002:
        return "world-writable"
    if st.st_mode & 0o020 and st.st_gid not in (0, os.getegid()):
        return f"writable by group {st.st_gid}"
    return None


def _check_parents(base: Path) -> None:
    """Refuse ``base`` when a directory above it (as named, and once symlinks are
    resolved) is one another user could write: they could rename ``base`` away and
    put a directory of their own, with an executable in it, in its place.

    The rule of OpenSSH's ``StrictModes`` and sudo's for their files: every
    ancestor owned by root (or us) and writable by nobody else; a sticky
    directory owned by root (``/tmp``) is accepted, since nobody can rename an
    entry there that is not theirs. Raises FactsError naming the directory.
    """
    seen: set[str] = set()
    for start in (Path(os.path.abspath(base)), Path(os.path.realpath(base))):
        for parent in start.parents:
            if str(parent) in seen:
                continue
            seen.add(str(parent))
            try:
                st = os.stat(parent)
            except OSError as exc:
                raise FactsError(f"cannot read: {exc.strerror}", where=str(parent)) from exc
            why = _others_could_write(st)
            if why is None or (st.st_mode & stat.S_ISVTX and st.st_uid == 0 and "owned" not in why):
                continue
            raise FactsError(
                f"facts_dir lies in {parent}, which is {why}: another user could put a "
                "directory of their own in its place",
                where=str(base),
                hint="keep facts_dir under directories only root can write "
                "(the default /etc/reconciler/facts.d)",
            )


def _refuse(path: str, why: str) -> FactsError:
    return FactsError(
        f"local fact source is {why}: another user could change what root's templates read",
        where=path,
        hint="make it owned by root and writable by root only (chmod go-w)",
    )


def local_facts(
    facts_dir: str | None,
    *,
    timeout: float = FACT_TIMEOUT,
    redact: Callable[[str], str] | None = None,
) -> dict[str, Any]:
    """``facts.local``: name → value of each source in ``facts_dir`` (SPEC §10).

    Sources, by file name (``name`` = the name without its last extension):
    an executable regular file (any x bit) is run — no shell, argv
    ``[path]``, environment :data:`FACT_ENV`, at most ``timeout`` seconds
    (:data:`FACT_TIMEOUT`), stdout JSON of at most :data:`MAX_FACT_SIZE` bytes; a
    non-executable ``*.json`` or ``*.yaml`` file is parsed. Each value must
    be a mapping. Hidden files (``.name``) and other names (``README``,
    ``x.dpkg-old``, ``x~``) are ignored, as run-parts ignores them.
    A missing directory (or None) is no local facts: {}.

    An executable that fails is a FactsError quoting its last stderr line,
    passed through ``redact`` first (SPEC §8: the agent's run gives the secret
    text the host holds; called only then, and before the line is cut to 200
    characters, so no half of a secret is left).

    Read as given, never under ``root``: facts describe the machine the agent
    runs on, as its configuration and ``exclude_file`` do.

    Raises FactsError naming the source, for: a directory or source another
    user could write (not owned by root or us, or world- or group-writable),
    invalid JSON/YAML, a value that is not a mapping, two sources of one
    name, an executable that exits non-zero, times out, prints too much or
    prints no JSON mapping; a ``*.yml`` file (rename to ``.yaml``, as for
    host files).
    """
    if facts_dir is None:
        return {}
    base = Path(facts_dir)
    try:
        st = os.stat(base)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise FactsError(f"cannot read: {exc.strerror}", where=str(base)) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise FactsError(
            "facts_dir is not a directory", where=str(base), hint="make it a directory"
        )
    why = _others_could_write(st)
    if why is not None:
        raise _refuse(str(base), why)
    _check_parents(base)
    found: dict[str, Any] = {}
    origin: dict[str, str] = {}
    for entry in sorted(os.scandir(base), key=lambda e: e.name):
        if entry.name.startswith(".") or entry.is_dir(follow_symlinks=False):
            continue
        path = str(base / entry.name)
        try:
            st = os.stat(path)
        except OSError as exc:
            raise FactsError(f"cannot read: {exc.strerror}", where=path) from exc
        runs = stat.S_ISREG(st.st_mode) and bool(st.st_mode & 0o111)
        name, dot, suffix = entry.name.rpartition(".")
        if not dot:
            name, suffix = entry.name, ""
        if not runs and f".{suffix}" == ".yml":
            raise FactsError("local fact files end in .yaml", where=path, hint="rename it to .yaml")
        if not runs and f".{suffix}" not in FACT_DATA_SUFFIXES:
            continue
        why = _others_could_write(st)
        if why is not None:
            raise _refuse(path, why)
        if name in origin:
            raise FactsError(
                f"a second source of facts.local.{name} (the first is {origin[name]})",
                where=path,
                hint="rename or remove one of them",
            )
        value = _run_fact(path, timeout, redact) if runs else _read_fact(path, suffix)
        if not isinstance(value, dict):
            raise FactsError(
                f"gives {type(value).__name__}, not a mapping",
                where=path,
                hint='make it a mapping, e.g. {"rack": "r12"}',
            )
        found[name], origin[name] = value, path
    return found


def _read_fact(path: str, suffix: str) -> Any:
    """A ``.json`` or ``.yaml`` fact file's value (regular file, bounded, never a FIFO)."""
    import yaml

    from reconciler.host.system import open_regular
    from reconciler.pipeline.inventory import _normalise

    try:
        fd = open_regular(path)
    except OSError as exc:
        raise FactsError(f"cannot read: {exc.strerror or exc}", where=path) from exc
    try:
        data = os.read(fd, MAX_FACT_SIZE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_FACT_SIZE:
        raise FactsError(
            f"larger than {MAX_FACT_SIZE >> 20} MiB", where=path, hint="keep local facts small"
        )
    try:
        if suffix == "json":
            return json.loads(data)
        # JSON-shaped as host files are (dates as ISO text, keys as text): the run's
        # fingerprint and the report dump facts as JSON with sorted keys.
        return _normalise(yaml.load(data, Loader=yaml.CSafeLoader))
    except (ValueError, yaml.YAMLError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = getattr(exc, "lineno", None) or (mark.line + 1 if mark is not None else None)
        where = f"{path}:{line}" if line else path
        kind = "JSON" if suffix == "json" else "YAML"
        raise FactsError(f"invalid {kind}", where=where, hint="fix the syntax") from exc


def _run_fact(path: str, timeout: float, redact: Callable[[str], str] | None) -> Any:
    """Run an executable fact (see :func:`local_facts`); its stdout parsed as JSON."""
    try:
        proc = subprocess.Popen(
            [path],
            cwd=os.path.dirname(path),
            env=FACT_ENV,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,  # its own process group: a timeout ends its children too
        )
    except OSError as exc:
        raise FactsError(
            f"cannot run: {exc.strerror or exc}",
            where=path,
            hint="give it a #! line, or clear its executable bit if it is a data file",
        ) from exc
    out, err, timed_out, too_big = _collect(proc, timeout)
    if timed_out or too_big:
        with contextlib.suppress(ProcessLookupError):  # the group may be gone already
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    if timed_out:
        raise FactsError(
            f"did not finish within {timeout:g}s",
            where=path,
            hint="make it faster (it runs on every run), or write its result to a .json file",
        )
    if too_big:
        raise FactsError(
            f"printed more than {MAX_FACT_SIZE >> 20} MiB", where=path, hint="print less"
        )
    if proc.returncode != 0:
        tail = err.decode("utf-8", "replace").strip().splitlines()
        last = tail[-1] if tail else ""
        if last and redact is not None:
            last = redact(last)
        said = f": {last[:200]}" if last else ""
        raise FactsError(
            f"exited with status {proc.returncode}{said}",
            where=path,
            hint="run it by hand to see why, and fix it or remove it",
        )
    try:
        return json.loads(out)
    except ValueError as exc:
        raise FactsError(
            "printed no JSON", where=path, hint="print one JSON object on stdout"
        ) from exc


def _collect(proc: subprocess.Popen[bytes], timeout: float) -> tuple[bytes, bytes, bool, bool]:
    """(stdout, stderr tail, timed out, too big) of ``proc``, read within the deadline
    and the size bound: ``communicate`` would keep whatever it prints in memory."""
    assert proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout
    out, err = bytearray(), bytearray()
    streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    try:
        while streams:
            left = deadline - time.monotonic()
            if left <= 0:
                return bytes(out), bytes(err), True, False
            ready, _, _ = select.select(list(streams), [], [], left)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    del streams[fd]
                    continue
                buf = streams[fd]
                buf += chunk
                if buf is out and len(out) > MAX_FACT_SIZE:
                    return bytes(out), bytes(err), False, True
                if buf is err and len(err) > 4096:
                    del err[:-4096]  # the tail is what an error shows
        return bytes(out), bytes(err), False, False
    finally:
        proc.stdout.close()
        proc.stderr.close()
