"""Small helpers shared by the integration tests (no fixtures; those live in tests/conftest.py)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from tests.conftest import GIT_ENV, Fleet, Host, git
from tests.integration._service import host_argv, reconciler_env

HEX40 = re.compile(r"^[0-9a-f]{40}$")
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")


def pull_report(host: Host, *args: str, expect: int = 0) -> dict:
    """``pull --format json ARGS``; assert the exit code and return the printed report."""
    proc = host.run("pull", "--format", "json", *args)
    assert proc.returncode == expect, (proc.returncode, proc.stderr, proc.stdout[-2000:])
    return json.loads(proc.stdout)


# The package and service steps each node of the example fleet plans (templates/*/app.yaml,
# SPEC §11) in node order of its apps (motd, chrony, sshd, fleet-hosts, then its own), as
# a run under a test root reports them on every run: planned, never done there (offline).
_COMMON = (("package", "chrony"), ("package", "openssh-server"))
_OWN = {
    "web1": ("nginx", "nginx"),
    "web2": ("nginx", "nginx"),
    "db1": ("postgresql-15", "postgresql"),
    "dhcp": ("isc-dhcp-server", "isc-dhcp-server"),
}


def offline_steps(node: str | None) -> list[tuple[str, str, str]]:
    """(kind, name, action) of the package and service steps ``node`` of the example fleet
    plans under a root other than /, in report order; a node a test adds has the apps of
    hosts/_defaults.yaml only, as does None."""
    packages = [name for _, name in _COMMON]
    units = ["chrony.service", "ssh.service"]
    if node in _OWN:
        packages.append(_OWN[node][0])
        units.append(f"{_OWN[node][1]}.service")
    return [
        *(("package", name, "install") for name in packages),
        *(("service", u, action) for u in units for action in ("enable", "start")),
    ]


def file_changes(report: dict, *, defaults_only: bool = False) -> list[dict]:
    """The report's changes of destination paths, after asserting that the others are
    exactly the example fleet's planned-only package and service steps of its node
    (:func:`offline_steps`: reported, never applied under a test root); with
    ``defaults_only``, those of the apps of hosts/_defaults.yaml only (a test took the
    node's own apps away). A run that took the no-op short cut (SPEC §7) plans nothing,
    so it reports no step: that passes too, for a report of nothing else."""
    files = [c for c in report["changes"] if not c.get("kind")]
    steps = [
        (c["kind"], c["path"], c["action"], c["applied"], c.get("offline"))
        for c in report["changes"]
        if c.get("kind")
    ]
    expected = [(*s, False, True) for s in offline_steps(None if defaults_only else report["node"])]
    short_cut = not files and not report["drift"] and not report["errors"]
    assert steps == expected or (short_cut and steps == []), steps
    return files


def changes(report: dict) -> dict[str, dict]:
    """Report changes keyed by destination path."""
    return {c["path"]: c for c in report["changes"]}


def drift_kinds(report: dict) -> dict[str, set[str]]:
    """Report drift as destination path → set of kinds."""
    out: dict[str, set[str]] = {}
    for d in report["drift"]:
        out.setdefault(d["path"], set()).add(d["kind"])
    return out


def mode_of(path: Path) -> int:
    return path.lstat().st_mode & 0o7777


def report_history(fleet: Fleet, node: str) -> str:
    """``git log -p`` of reports/<node> on the server: every report and capture ever pushed."""
    return git(
        "log", "-p", "--binary", "--format=%H %s", f"refs/heads/reports/{node}", cwd=fleet.bare
    )


def all_objects_text(bare: Path) -> bytes:
    """Every blob reachable in ``bare``, concatenated: for 'this text is nowhere' checks."""
    listing = subprocess.run(
        ["git", "rev-list", "--objects", "--all"], cwd=bare, capture_output=True, check=True
    ).stdout.decode()
    ids = [line.split()[0] for line in listing.splitlines() if line.strip()]
    if not ids:
        return b""
    proc = subprocess.run(
        ["git", "cat-file", "--batch"],
        cwd=bare,
        input="\n".join(ids).encode() + b"\n",
        capture_output=True,
        check=True,
    )
    return proc.stdout


def assert_clean_error(stderr: str, *must_name: str) -> list[str]:
    """stderr holds only one-line errors (no traceback), each naming every ``must_name``."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines, "expected an error on stderr"
    for line in lines:
        for name in must_name:
            assert name in line, f"{name!r} not named in stderr line {line!r}"
    return lines


def git_stdin(*args: str, cwd: Path, stdin: str) -> str:
    """The git CLI with ``stdin`` fed to it (``mktree``)."""
    proc = subprocess.run(
        ["git", *args],
        cwd=cwd,
        env={**os.environ, **GIT_ENV},
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"git {' '.join(args)} failed: {proc.stderr}"
    return proc.stdout


def replace_tree_entry(fleet: Fleet, directory: str, entry_line: str, message: str) -> str:
    """Commit (with git plumbing) HEAD's tree plus ``entry_line`` in ``directory``; push it.

    ``entry_line`` is an ``ls-tree`` line such as ``"040000 tree <id>\\t.."``: this is
    how a tree with entries that ``git add`` refuses (``..``) gets into the repository.
    """

    def rebuild(tree: str, parts: list[str]) -> str:
        listing = git("ls-tree", tree, cwd=fleet.work).splitlines()
        if not parts:
            lines = [*listing, entry_line]
            return git_stdin("mktree", cwd=fleet.work, stdin="\n".join(lines) + "\n").strip()
        head, *rest = parts
        out = []
        for line in listing:
            meta, name = line.split("\t", 1)
            if name == head:
                mode, kind, oid = meta.split()
                line = f"{mode} {kind} {rebuild(oid, rest)}\t{name}"
            out.append(line)
        return git_stdin("mktree", cwd=fleet.work, stdin="\n".join(out) + "\n").strip()

    tree = rebuild("HEAD^{tree}", [p for p in directory.split("/") if p]).strip()
    commit = git("commit-tree", tree, "-p", "HEAD", "-m", message, cwd=fleet.work).strip()
    git("update-ref", "HEAD", commit, cwd=fleet.work)
    git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=fleet.work)
    return commit


def imported_by_run(host: Host, command: str, *args: str) -> set[str]:
    """Every module a run of ``reconciler command args`` on ``host`` imported, as
    ``python -X importtime`` lists them (the interpreter itself, not a guess);
    asserts the run exits 0 and that the list was made."""
    python, *rest = host_argv(host, command, *args)
    proc = subprocess.run(
        [python, "-X", "importtime", *rest],
        capture_output=True,
        text=True,
        env=reconciler_env(),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "reconciler.pipeline.run" in imported, "no import list: -X importtime did not work"
    return imported


def path_now(host: Host, path: str) -> str | bytes | None:
    """What a destination path holds: a link's target text, a file's bytes, or None."""
    p = host.path(path)
    if p.is_symlink():
        return os.readlink(p)
    return p.read_bytes() if p.exists() else None


def sweep_stopped_runs(
    host: Host,
    tmp_path: Path,
    points: Iterable[int],
    *,
    old: Mapping[str, str | bytes | None],
    new: Mapping[str, str | bytes | None],
    then: Callable[[Host], None] | None = None,
) -> list[int]:
    """Stop a run after each effect in ``points`` and check the crash-safety promise.

    ``host`` holds the old state, converged, with its upstream already moved to
    the new commit. For each stopping point n, a copy of the host (root, state
    dir, exclude file) runs the pull in process with ``FaultySystem(n)``, which
    stops it after its n-th effect as SIGKILL would (nothing after runs, the
    journal is left open). Then every path of ``old`` is wholly old or new
    (:func:`path_now`); the next run says it recovered exactly when a journal
    was left, converges to ``new`` without errors, ``then`` (extra checks) holds,
    and the run after changes nothing. The sweep ends at the first run that
    completes (past the last effect). Returns the points that stopped a run.
    """
    # Imported here: the integration helpers are also imported by tests that
    # only run the agent as a subprocess.
    from reconciler.host.system import FaultInjected, FaultySystem
    from reconciler.pipeline.run import reconcile_once

    stopped: list[int] = []
    for fail_after in points:
        base = tmp_path / f"k{fail_after}"
        shutil.copytree(host.root.parent, base, symlinks=True)
        h = Host(
            node=host.node,
            root=base / "root",
            state_dir=base / "state",
            exclude_file=base / "exclude",
            url=host.url,
        )
        config = h.config()
        try:
            reconcile_once(config, wrap=lambda s, n=fail_after: FaultySystem(s, n))
        except FaultInjected:
            stopped.append(fail_after)
        else:
            break  # past the last effect: every stopping point was tried
        for path in old:
            found = path_now(h, path)
            assert found in (old[path], new[path]), (fail_after, path, found)
        journaled = (h.state_dir / "journal.json").exists()
        # In process: a pull's cost without a Python start-up per stopping point.
        recovering = reconcile_once(config).report
        assert (recovering.recovered is not None) == journaled, (fail_after, recovering)
        assert recovering.errors == (), (fail_after, recovering.errors)
        assert {p: path_now(h, p) for p in new} == dict(new), fail_after
        if then is not None:
            then(h)
        # Nothing but the node's planned-only packages and services (SPEC §11).
        assert file_changes(reconcile_once(config).report.to_json()) == [], fail_after
    return stopped


@contextlib.contextmanager
def machine_lock(name: str, what: str, timeout: float = 300) -> Iterator[None]:
    """Hold the machine-wide lock ``name`` (a file in the temp dir) while a test does
    what two checkouts must not do at once: boot a container in the shared cgroup,
    install and purge real packages. Raises AssertionError naming ``what`` when
    another holder keeps it past ``timeout`` seconds."""
    with open(os.path.join(tempfile.gettempdir(), f"reconciler-test-{name}.lock"), "a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"another {what} held the lock") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def vault_password(fleet: Fleet, tmp_path: Path, secret: str) -> Path:
    """web1's desired state holding ``secret`` as the ``!age`` value ``vault.password``
    (a real age key of web1's), and the template that writes it to
    /etc/vault/db.conf; returns the agent configuration naming web1's identity.
    Nothing is committed: the caller adds what its test needs, then commits."""
    from reconciler.secrets import age

    identity = tmp_path / "web1.age"
    to = [age.parse_recipient(age.keygen(identity), where="web1")]
    config = tmp_path / "web1.yaml"
    config.write_text(f"identity: {identity}\n")
    payload = age.encrypt(secret.encode(), to).decode().replace("\n", "\n      ")
    fleet.write(
        "hosts/web1.yaml",
        f"apps: [vault]\nvars:\n  vault:\n    password: !age |\n      {payload}\n",
    )
    fleet.write("templates/vault/default/etc/vault/db.conf.j2", "pw={{ vault.password }}\n")
    return config
