"""Secrets (SPEC §1 ``secret``, §5, §6): a secret file's content never leaves the host.

Not in the report branch (report.json, drift captures, any object pushed),
not in what any command prints (text, JSON, dry-run, diff, status, verbose
and debug logs), not in ``last-run.json`` or ``state.json`` — whether the
value came from the repository or was typed on the host. The state dir itself
is private to its owner.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.conftest import git
from tests.integration._agent import run
from tests.integration._helpers import assert_clean_error, changes, drift_kinds, vault_password

KEYS = "templates/chrony/default/etc/chrony/chrony.keys"
DEST = "/etc/chrony/chrony.keys"
REPO_V1 = "SECRET-3f9a71c2e5d8-repo-v1"
REPO_V2 = "SECRET-3f9a71c2e5d8-repo-v2"
LOCAL = "SECRET-local-9be04d7a16"
ALL = (REPO_V1, REPO_V2, LOCAL)


def keys_file(secret: str) -> str:
    return f"# chrony keys\n1 SHA256 HEX:{secret}\n"


def objects(repo: Path, ids: set[str] | None = None) -> bytes:
    """The content of objects ``ids`` (default: every object, reachable or not) of ``repo``."""
    if ids is None:
        listing = git("cat-file", "--batch-all-objects", "--batch-check=%(objectname)", cwd=repo)
        ids = set(listing.split())
    if not ids:
        return b""
    proc = subprocess.run(
        ["git", "cat-file", "--batch"],
        cwd=repo,
        input="\n".join(sorted(ids)).encode() + b"\n",
        capture_output=True,
        check=True,
    )
    return proc.stdout


def reachable(repo: Path, *refs: str) -> set[str]:
    out = git("rev-list", "--objects", *refs, cwd=repo)
    return {line.split()[0] for line in out.splitlines() if line.strip()}


class Seen:
    """Everything a command printed, to search for secrets at the end."""

    def __init__(self, host) -> None:
        self.host = host
        self.texts: list[tuple[str, str]] = []

    def run(self, *argv: str, expect: int | None = 0) -> subprocess.CompletedProcess[str]:
        proc = self.host.run(*argv)
        if expect is not None:
            assert proc.returncode == expect, (argv, proc.returncode, proc.stderr)
        self.texts.append((" ".join(argv), proc.stdout + proc.stderr))
        return proc

    def look(self) -> str:
        """Every read-only view of the pending run; returns the text diff."""
        diff = self.run("diff").stdout
        self.run("diff", "--format", "json", "--verbose")
        self.run("pull", "--dry-run", "--verbose")
        self.run("pull", "--dry-run", "--format", "json", "--debug")
        return diff

    def status(self) -> None:
        self.run("status")
        self.run("status", "--format", "json")
        state_dir = self.host.state_dir
        for name in ("last-run.json", "state.json"):
            if (state_dir / name).exists():
                self.texts.append((name, (state_dir / name).read_text()))

    def pull(self, *args: str, expect: int = 0) -> dict | None:
        proc = self.run("pull", *args, expect=expect)
        return json.loads(proc.stdout) if "json" in args else None


def assert_private(state_dir: Path) -> None:
    """state_dir 0700; last-run.json, state.json and every backup readable by the owner only."""
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700
    for name in ("last-run.json", "state.json"):
        assert stat.S_IMODE((state_dir / name).stat().st_mode) == 0o600, name
    backups = [p for p in (state_dir / "backups").rglob("*") if p.is_file()]
    assert backups, "no backups kept"
    for path in backups:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode & 0o077 == 0, f"{path.relative_to(state_dir)} has mode {mode:04o}"


def test_secret_content_never_leaves_the_host_across_apply_drift_and_change(fleet, make_host):
    fleet.write(KEYS, keys_file(REPO_V1))
    fleet.commit("chrony: a real key")
    host = make_host("web1")
    seen = Seen(host)

    # First apply.
    diff = seen.look()
    assert DEST in diff and "sha256:" in diff
    seen.pull("--verbose")
    assert host.path(DEST).read_text() == keys_file(REPO_V1)
    seen.status()

    # Drift: someone puts another secret in the file by hand.
    host.path(DEST).write_text(keys_file(LOCAL))
    diff = seen.look()
    assert DEST in diff and "sha256:" in diff
    report = seen.pull("--format", "json", "--debug")
    assert drift_kinds(report)[DEST] == {"content"}
    assert changes(report)[DEST]["applied"] is True
    assert host.path(DEST).read_text() == keys_file(REPO_V1)
    seen.status()

    # A desired change of the secret.
    fleet.write(KEYS, keys_file(REPO_V2))
    fleet.commit("chrony: rotate the key")
    diff = seen.look()
    assert DEST in diff and "sha256:" in diff
    seen.pull("--debug")
    assert host.path(DEST).read_text() == keys_file(REPO_V2)
    seen.status()

    # Drift again, seen by a text run with every log line.
    host.path(DEST).write_text(keys_file(LOCAL))
    seen.pull("--verbose", "--debug", "--detailed-exitcode", expect=3)
    seen.status()

    for what, text in seen.texts:
        for secret in ALL:
            assert secret not in text, f"{secret} in the output of {what!r}"

    # Nothing under the report branch, in history or objects, holds any of them.
    bare = fleet.bare
    assert git("for-each-ref", "--format=%(refname)", "refs/heads/reports/", cwd=bare).split()
    history = git("log", "-p", "--binary", "refs/heads/reports/web1", cwd=bare)
    not_main = set(
        git("cat-file", "--batch-all-objects", "--batch-check=%(objectname)", cwd=bare).split()
    ) - reachable(bare, "refs/heads/main")
    assert not_main, "the report branch added no object"
    assert REPO_V2.encode() in objects(bare, reachable(bare, "refs/heads/main"))  # the probe works
    for secret in ALL:
        assert secret not in history
        assert secret.encode() not in objects(bare, reachable(bare, "refs/heads/reports/web1"))
        assert secret.encode() not in objects(bare, not_main)
    # The value typed on the host is nowhere in the repository, nor in the local one.
    assert LOCAL not in git("log", "-p", "--all", cwd=bare)
    assert LOCAL.encode() not in objects(bare)
    assert LOCAL.encode() not in objects(host.state_dir / "repo.git")
    # In the state dir only the backups (owner-only) hold it, never state or reports.
    for path in host.state_dir.rglob("*"):
        if path.is_file() and "backups" not in path.relative_to(host.state_dir).parts:
            assert LOCAL.encode() not in path.read_bytes(), path
    assert_private(host.state_dir)


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_state_dir_and_backups_are_private_whatever_the_umask(fleet, make_host, umask):
    host = make_host("web1")
    first = run(host, "pull", umask=umask)
    assert first.returncode == 0, first.stderr
    host.path(DEST).write_text(keys_file(LOCAL))
    host.path("/etc/motd").write_text("edited\n")
    host.path("/etc/motd").chmod(0o666)
    second = run(host, "pull", umask=umask)
    assert second.returncode == 0, second.stderr
    assert_private(host.state_dir)
    # Created destination directories are 0755 whatever the umask (SPEC §6).
    assert stat.S_IMODE(host.path("/etc/chrony").stat().st_mode) == 0o755
    assert oct(os.stat(host.path(DEST)).st_mode & 0o7777) == oct(0o640)


@pytest.mark.parametrize("flags", [(), ("--debug", "--format", "json")])
def test_undefined_variable_in_a_secret_template_names_the_line_not_the_secret(
    fleet, make_host, flags
):
    host = make_host("web1")
    assert host.pull().returncode == 0
    literal = "SECRET-literal-c41d09e7"
    fleet.remove(KEYS)
    fleet.write(
        KEYS + ".j2",
        "# chrony keys\n1 SHA256 HEX:{{ key_prefix }}" + literal + "\n2 SHA256 HEX:ABCD\n",
    )
    fleet.commit("chrony: keys from a template, with a typo")

    proc = host.run("pull", *flags)
    diff = host.run("diff", *flags)

    assert proc.returncode == 1
    assert diff.returncode == 1
    for out in (proc, diff):
        assert literal not in out.stdout + out.stderr
        assert "Traceback" not in out.stderr or "--debug" in flags
        errors = [line for line in out.stderr.splitlines() if "chrony.keys.j2" in line]
        assert errors, out.stderr
        assert f"{KEYS}.j2:2" in errors[0], errors[0]
    if not flags:
        assert_clean_error(proc.stderr, f"{KEYS}.j2:2")
    assert host.path(DEST).read_text() != ""  # the old file stays


def test_a_state_dir_made_world_readable_by_hand_is_made_private_again(fleet, make_host):
    host = make_host("web1")
    host.state_dir.mkdir(mode=0o755)
    host.state_dir.chmod(0o755)  # e.g. made by a provisioning script before the first run
    assert run(host, "pull").returncode == 0
    host.path("/etc/motd").write_text("edited\n")
    assert run(host, "pull").returncode == 0
    assert_private(host.state_dir)


def test_diff_of_a_secret_path_being_pruned_shows_no_content(fleet, make_host):
    # A secret file leaves the desired state: the plan deletes it. The diff must
    # still show hashes only (the secret flag comes from the last run's record).
    host = make_host("web1")
    seen = Seen(host)
    fleet.write(KEYS, keys_file(REPO_V1))
    fleet.commit("chrony keys")
    seen.pull()
    assert REPO_V1 in host.path(DEST).read_text()
    fleet.remove(KEYS)
    fleet.commit("chrony keys gone")

    diff = seen.look()

    assert DEST in diff and "secret" in diff, diff
    for argv, text in seen.texts:
        assert REPO_V1 not in text, f"secret leaked by `{argv}`"


def test_script_output_that_prints_a_secret_is_redacted_in_the_report(fleet, make_host):
    """A post script that prints the secret file it checks: its output tail in the
    report and the JSON printed show ``<redacted>`` where the secret was (SPEC §8;
    secrets/redact.py), never the secret."""
    fleet.write(KEYS, keys_file(REPO_V1))
    fleet.write(
        "scripts/post/chrony/90-show-keys",
        '#!/bin/sh\necho "checking keys:"\ncat "${RECONCILER_ROOT%/}/etc/chrony/chrony.keys"\n',
        executable=True,
    )
    fleet.commit("chrony: a real key, and a script that shows it")
    host = make_host("web1")
    proc = host.run("pull", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert REPO_V1 not in proc.stdout + proc.stderr
    report = json.loads(proc.stdout)
    [show] = [s for s in report["scripts"] if s["name"] == "90-show-keys"]
    assert show["output_tail"] == "checking keys:\n<redacted>"  # the file whole: one mark
    assert REPO_V1 not in json.dumps(fleet.report("web1"))


def test_a_package_databases_error_line_is_redacted(fleet, make_host, tmp_path, monkeypatch):
    """SPEC §8, §11: the line a failing dpkg-query prints is quoted in the run's error;
    the run has decrypted its secrets by then (host resources are read after the
    render), so a line holding one shows ``<redacted>`` there. dpkg-query is a
    stand-in on PATH: the real one's database is under the test's root."""
    secret = "pw-dpkg-61f0c2a9e4"
    config = vault_password(fleet, tmp_path, secret)
    fleet.write("templates/vault/app.yaml", "packages: [vault-client]\n")
    fleet.commit("vault: a password and its client")
    host = make_host("web1")
    (host.root / "var/lib/dpkg").mkdir(parents=True)
    (host.root / "var/lib/dpkg/status").write_text("")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg-query").write_text(
        "#!/bin/sh\necho \"dpkg-query: error: parsing file 'status' near line 3 "
        f"package 'vault-client': Description: pw={secret}\" >&2\nexit 2\n"
    )
    (bin_dir / "dpkg-query").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")

    proc = host.run("pull", "--format", "json", "--config", str(config))
    assert proc.returncode == 1
    [error] = json.loads(proc.stdout)["errors"]
    assert "Description: <redacted>" in error, error
    for text in (proc.stdout, proc.stderr, json.dumps(fleet.report("web1"))):
        assert secret not in text
