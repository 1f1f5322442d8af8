"""Secret text cut out of host output (SPEC §8, secrets/redact.py): the table of what a
Redaction cuts, and the journal lines of a unit that failed to start (SPEC §11) read
through a real System from real ``systemctl``/``journalctl`` executables — stand-ins
on PATH that print what a unit logging its secret would (no systemd runs here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.errors import ReconcilerError
from reconciler.host.system import OUTPUT_TAIL_BYTES, RealSystem, ScriptRun
from reconciler.pipeline.ensure import (
    PackageSettings,
    ResourceResult,
    enforce_services,
    ensure_packages,
)
from reconciler.pipeline.packages import ResourceChange, ServiceSpec
from reconciler.pipeline.render import Decryption, render_target
from reconciler.secrets import age
from reconciler.secrets.redact import MARK, Redaction
from tests.unit.helpers import FACTS, node_of, write_repo

SECRET = "s3cr3t-Pa55-7f1c"


@pytest.mark.parametrize(
    ("secrets", "text", "expected"),
    [
        ([SECRET.encode()], f"connecting with {SECRET} failed", f"connecting with {MARK} failed"),
        # A multi-line plaintext: each line, and the whole, wherever they show up.
        ([b"user = app\npassword = hunter22\n"], "read password = hunter22", f"read {MARK}"),
        ([b"user = app\npassword = hunter22\n"], "user = app", MARK),
        # Pieces shorter than MIN_CHARS are left alone: "}" would cut every brace out.
        ([b"{\n  key: abcd\n}\n"], "} done", "} done"),
        # The longest first: the line holding a value is cut whole.
        ([b"hunter22", b"password = hunter22"], "password = hunter22!", f"{MARK}!"),
        ([], "nothing to cut", "nothing to cut"),
        # Bytes that are not UTF-8 are matched as output is decoded: replaced.
        ([b"\xffsecret-bytes"], "got \ufffdsecret-bytes", f"got {MARK}"),
    ],
)
def test_redaction_cuts_every_secret_piece(secrets, text, expected):
    assert Redaction.of(secrets).apply(text) == expected


def _stand_in(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def _failing_systemctl(tmp_path: Path) -> Path:
    """A bin dir whose systemctl finds nothing to daemon-reload and fails every start."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(
        bin_dir,
        "systemctl",
        'case "$1" in show) echo no ;; start) echo "Job for x failed." >&2; exit 1 ;; esac',
    )
    return bin_dir


def _enforce_start(
    unit: str, redaction: Redaction
) -> tuple[list[ReconcilerError], list[ScriptRun]]:
    """``enforce_services`` on ``/`` for one planned start of ``unit`` (app db), with
    the systemctl and journalctl first on PATH: (its errors, its script runs)."""
    change = ResourceChange(
        kind="service", name=unit, action="start", reason="desired", app="db", apply=True
    )
    spec = ServiceSpec(unit=unit, enabled=False, running=True, on_change="none", app="db")
    scripts: list[ScriptRun] = []
    errors = enforce_services(
        [spec],
        [change],
        False,
        RealSystem(root="/"),  # no file is touched: only the stand-ins run
        Path("/"),
        ResourceResult(),
        scripts,
        redaction,
    )
    return errors, scripts


def test_journal_lines_of_a_unit_that_failed_to_start_are_redacted(tmp_path, monkeypatch):
    # systemctl: nothing to daemon-reload, and the start fails; journalctl: the unit's
    # last lines, one of them printing a secret value the run decrypted.
    bin_dir = _failing_systemctl(tmp_path)
    _stand_in(
        bin_dir,
        "journalctl",
        f"echo 'rctest[42]: starting'\necho 'rctest[42]: login as app/{SECRET} refused'",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    unit = "rctest-secret.service"
    errors, scripts = _enforce_start(unit, Redaction.of([SECRET.encode()]))
    assert [type(e).__name__ for e in errors] == ["ApplyError"]
    [run] = scripts
    assert (run.phase, run.app, run.name, run.exit_code) == ("service", "db", unit, 1)
    assert run.output_tail == f"rctest[42]: starting\nrctest[42]: login as app/{MARK} refused"
    assert all(SECRET not in str(e) for e in errors)


def test_package_manager_error_line_is_redacted(tmp_path, monkeypatch):
    # apt names the URI it failed to fetch in its E: line; a repository whose path
    # holds a token (the token an !age value of the run, templated into the
    # sources.list) would put that token into the run's error, hence the report.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(
        bin_dir,
        "apt-get",
        f"echo 'E: Failed to fetch https://apt.example.com/{SECRET}/pool/n/nginx.deb  "
        "401  Unauthorized' >&2; exit 100",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    change = ResourceChange(
        kind="package", name="nginx", action="install", reason="desired", app="web", apply=True
    )
    result = ResourceResult()
    error = ensure_packages(
        [change],
        RealSystem(root="/"),  # only the stand-in runs
        PackageSettings(manager="apt", lock_timeout=0, node="web1"),
        result,
        Redaction.of([SECRET.encode()]),
    )
    assert error is not None
    assert SECRET not in str(error)
    assert f"https://apt.example.com/{MARK}/pool" in str(error)
    assert result.done == [(change, False)]


def test_script_output_cut_inside_a_secret_leaves_no_piece_of_it(tmp_path):
    # The tail keeps the last OUTPUT_TAIL_BYTES of output: a cut that falls inside a
    # secret would leave its second half, which no needle matches, in the report.
    tail_from = 8  # the cut falls after SECRET[:8]
    filler = ("y" * 199 + "\n") * 18
    first = f"token {SECRET}" + "p" * (
        OUTPUT_TAIL_BYTES - len(SECRET[tail_from:]) - len(filler) - 1
    )
    out = f"{first}\n{filler}".encode()
    assert out[-OUTPUT_TAIL_BYTES:].startswith(SECRET[tail_from:].encode())
    (tmp_path / "out.txt").write_bytes(b"x" * 10_000 + b"\n" + out)
    script = tmp_path / "show"
    script.write_text("#!/bin/sh\ncat out.txt\nexit 1\n")
    script.chmod(0o755)
    run = RealSystem(root="/").run_script(
        phase="post", app="db", name="show", directory=tmp_path, env={}, timeout=30
    )
    tail = Redaction.of([SECRET.encode()]).apply(run.output_tail)
    assert SECRET[tail_from:] not in tail
    assert tail.splitlines()[-1] == "y" * 199  # the tail itself is still there


def test_journal_tail_of_a_failed_unit_is_bounded_like_a_scripts(tmp_path, monkeypatch):
    # journalctl -n 20 counts entries, not lines or bytes: one entry a unit logged
    # (a traceback sent whole, a long JSON line) may be many lines and many KiB. The
    # report's output_tail is "the last 4 KiB (at most 20 lines)" for every entry.
    bin_dir = _failing_systemctl(tmp_path)
    _stand_in(
        bin_dir,
        "journalctl",
        'case "$1" in --sync) exit 0 ;; esac\n'
        "i=0; while [ $i -lt 60 ]; do printf 'rctest[42]: %0500d\\n' $i; i=$((i+1)); done\n"
        "echo 'rctest[42]: the end'",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    _, scripts = _enforce_start("rctest-long.service", Redaction())
    [run] = scripts
    lines = run.output_tail.splitlines()
    assert len(run.output_tail.encode()) <= OUTPUT_TAIL_BYTES
    assert len(lines) <= 20
    assert lines[-1] == "rctest[42]: the end"
    assert all(len(line) == len("rctest[42]: ") + 500 for line in lines[:-1])  # whole lines


@pytest.fixture(scope="module")
def decrypted(tmp_path_factory: pytest.TempPathFactory) -> Redaction:
    """The Redaction a run builds (pipeline/run.py) from a real render that decrypted
    SECRET: a ``!age`` value of db1's host file, encrypted to a real age key."""
    base = tmp_path_factory.mktemp("age")
    recipient = age.parse_recipient(age.keygen(base / "db1.age"), where="db1")
    payload = age.encrypt(SECRET.encode(), [recipient]).decode().replace("\n", "\n      ")
    snap = write_repo(
        base / "repo",
        {
            "hosts/db1.yaml": f"apps: [db]\nvars:\n  db:\n    password: !age |\n      {payload}\n",
            "templates/db/default/etc/db/pass.conf.j2": "password={{ db.password }}\n",
        },
    )
    target = render_target(
        snap, node_of(snap, "db1"), FACTS, decryption=Decryption(identity=str(base / "db1.age"))
    )
    return Redaction.of(
        [*target.secret_values, *(f.content for f in target.files.values() if f.secret)]
    )


def test_a_failed_daemon_reload_line_is_redacted(tmp_path, monkeypatch, decrypted):
    # systemd says a unit file changed (NeedDaemonReload=yes); daemon-reload fails, its
    # stderr naming what systemd choked on: a unit whose Environment= holds the value.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stand_in(
        bin_dir,
        "systemctl",
        'case "$1" in show) echo yes ;; daemon-reload) '
        f"echo 'Failed to parse Environment=DB_PASSWORD={SECRET}' >&2; exit 1 ;; esac",
    )
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    errors, _ = _enforce_start("rctest-reload.service", decrypted)
    [error] = [str(e) for e in errors if "daemon-reload" in str(e)]
    assert SECRET not in error
    assert f"Environment=DB_PASSWORD={MARK}" in error
