"""Secrets encrypted in git, on the host (SPEC §8, issue 13): real agent runs against a
real git daemon, real age keys made by ``reconciler keygen``.

A secret for db1 renders on db1; web1 runs normally while it never reads it,
and fails cleanly — exit 1, one line, nothing written — once it does. A
drifted secret file is repaired and reported by path and hash only. The
plaintext is then looked for, byte for byte, everywhere a host sends or
keeps something: stdout and stderr at ``--debug``, the state directory
(but the backups, 0600), ``last-run.json``, the metrics file, the webhook
payloads, every object of the report branches, the fleet page.
"""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from reconciler.secrets import age
from tests.conftest import git, tree_snapshot
from tests.integration._helpers import assert_clean_error, changes, drift_kinds, imported_by_run
from tests.integration.test_notify import Recorder, recorder  # noqa: F401 - the fixture

PASSWORD = "pg-pass-8d1e0c5b7a"
SERVER_KEY = (
    b"-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIK9f3f1c0ffee\n-----END PRIVATE KEY-----\n"
)
SECRETS = (PASSWORD.encode(), b"MC4CAQAwBQYDK2VwBCIEIK9f3f1c0ffee")
KEY_DEST = "/etc/postgresql/15/main/server.key"
CONF_DEST = "/etc/vault/db.conf"


def _config(path: Path, identity: Path, metrics: Path, webhook: str) -> Path:
    path.write_text(
        f"identity: {identity}\n"
        f"metrics: {{textfile: {metrics}}}\n"
        f"report: {{webhook: {webhook}/hook, notify_on: [changed, drift, failed]}}\n"
    )
    return path


def _meta_node(payload: str, *, web1_reads: bool) -> str:
    reads = "" if web1_reads else "{% if node.name == 'db1' %}"
    end = "" if web1_reads else "{% endif %}"
    return (
        "# Meta-node of the test: both nodes run app vault; the password is db1's.\n"
        "include_nodes: [db1, web1]\napps: [vault]\nvars:\n  vault:\n    user: app\n"
        "    password: !age |\n" + textwrap.indent(payload, "      ")
    ), f"user={{{{ vault.user }}}}\n{reads}password={{{{ vault.password }}}}\n{end}"


@pytest.mark.age
def test_a_secret_for_db1_renders_there_fails_cleanly_on_web1_and_never_leaks(
    fleet,
    make_host,
    recorder: Recorder,  # noqa: F811 - test_notify's webhook receiver
    tmp_path: Path,
) -> None:
    db1, web1 = make_host("db1"), make_host("web1")
    ids = {h.node: tmp_path / f"{h.node}.age" for h in (db1, web1)}
    for host in (db1, web1):
        proc = host.run("keygen", "--out", str(ids[host.node]))  # the real command
        assert proc.returncode == 0, proc.stderr
        fleet.write(f"keys/nodes/{host.node}.pub", proc.stdout)
    operator = tmp_path / "operator.age"
    fleet.write("keys/operators/alice.pub", age.keygen(operator) + "\n")
    fleet.write(
        "secrets.yaml",
        "- path: templates/postgresql/**\n  to: [db1]\n- path: hosts/vault.yaml\n  to: [db1]\n",
    )
    to_db1 = [
        age.parse_recipient(fleet.read(p).strip(), where=p)
        for p in ("keys/nodes/db1.pub", "keys/operators/alice.pub")
    ]
    fleet.write(
        "templates/postgresql/default" + KEY_DEST + ".age",
        age.encrypt(SERVER_KEY, to_db1, armor=False),
    )
    meta, template = _meta_node(age.encrypt(PASSWORD.encode(), to_db1).decode(), web1_reads=False)
    fleet.write("hosts/vault.yaml", meta)
    fleet.write("templates/vault/default" + CONF_DEST + ".j2", template)
    fleet.commit("vault: a password for db1, and db1's TLS key")

    texts: list[tuple[str, str]] = []

    def run(host, *args: str, expect: int = 0) -> subprocess.CompletedProcess[str]:
        cfg = _config(
            tmp_path / f"{host.node}.yaml",
            ids[host.node],
            tmp_path / f"{host.node}.prom",
            recorder.url,
        )
        proc = host.run(*args, "--config", str(cfg))
        texts.append((f"{host.node} {' '.join(args)}", proc.stdout + proc.stderr))
        assert proc.returncode == expect, (args, proc.returncode, proc.stderr[-2000:])
        return proc

    # db1: decrypted and written; both destinations secret (hash only in the diff).
    diff = run(db1, "diff", "--debug").stdout
    assert KEY_DEST in diff and CONF_DEST in diff
    report = json.loads(run(db1, "pull", "--format", "json", "--debug").stdout)
    assert report["result"] == "changed"
    assert db1.path(KEY_DEST).read_bytes() == SERVER_KEY
    assert db1.path(CONF_DEST).read_text() == f"user=app\npassword={PASSWORD}\n"

    # web1 never reads the password: it needs no key for it and runs normally.
    report = json.loads(run(web1, "pull", "--format", "json").stdout)
    assert report["result"] == "changed" and web1.path(CONF_DEST).read_text() == "user=app\n"

    # Drift of a secret file on db1: repaired, reported by path and hash only.
    db1.path(KEY_DEST).write_bytes(b"tampered by hand\n")
    report = json.loads(run(db1, "pull", "--format", "json", "--debug").stdout)
    assert drift_kinds(report)[KEY_DEST] == {"content"}
    assert changes(report)[KEY_DEST]["applied"] is True
    assert db1.path(KEY_DEST).read_bytes() == SERVER_KEY
    assert not [p for p in fleet.report_files("db1") if p.startswith("drift/")]

    # Now web1's template reads it: not a recipient. Exit 1, one line, nothing written.
    meta, template = _meta_node(age.encrypt(PASSWORD.encode(), to_db1).decode(), web1_reads=True)
    fleet.write("hosts/vault.yaml", meta)
    fleet.write("templates/vault/default" + CONF_DEST + ".j2", template)
    fleet.write("templates/motd/default/etc/motd.extra", "a harmless change in the same commit\n")
    fleet.commit("vault: web1 reads the password too (a mistake)")
    before = tree_snapshot(web1.root)
    proc = run(web1, "pull", expect=1)
    assert_clean_error(proc.stderr, "hosts/vault.yaml:", "node web1", "cannot decrypt", "rekey")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    run(web1, "pull", "--debug", expect=1)  # its traceback, too, is searched below
    assert tree_snapshot(web1.root) == before, "a failed decrypt changed the disk"
    assert web1.last_run()["result"] == "failed"
    assert fleet.report("web1")["result"] == "failed"
    # db1 still renders the new commit.
    run(db1, "pull", "--debug")
    assert db1.path(CONF_DEST).read_text() == f"user=app\npassword={PASSWORD}\n"

    # A no-op run of a node that decrypts secrets never loads the age binding (SPEC §7):
    # the short cut skips render, where the only decryption happens.
    run(db1, "pull")  # settled: records taken well after the writes
    cfg = tmp_path / "db1.yaml"
    imported = imported_by_run(db1, "pull", "--config", str(cfg))
    assert not {m for m in imported if m.split(".")[0] == "pyrage"}, "a no-op run imported pyrage"
    assert "reconciler.pipeline.render" not in imported, "the run was not a no-op"

    # The fleet page, as an operator sees it.
    page = subprocess.run(
        [
            sys.executable,
            "-m",
            "reconciler",
            "fleet",
            "--repo",
            fleet.url,
            "--format",
            "html",
            "--state-dir",
            str(tmp_path / "operator-cache"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert page.returncode == 0, page.stderr
    texts.append(("fleet --format html", page.stdout + page.stderr))

    # Byte for byte: nowhere but the destination files and db1's 0600 backups.
    for what, text in texts:
        for secret in SECRETS:
            assert secret.decode() not in text, f"plaintext in the output of {what!r}"
    requests = recorder.take()
    assert requests, "no webhook was sent"
    for host in (db1, web1):
        metrics = tmp_path / f"{host.node}.prom"
        assert metrics.exists()
        files = [p for p in host.state_dir.rglob("*") if p.is_file()] + [metrics]
        for path in files:
            data = path.read_bytes()
            if path.is_relative_to(host.state_dir / "backups"):
                assert stat.S_IMODE(path.stat().st_mode) == 0o600, path  # SPEC §8
                continue
            for secret in SECRETS:
                assert secret not in data, f"plaintext in {path}"
    for request in requests:
        for secret in SECRETS:
            assert secret not in request.body, "plaintext in a webhook payload"
    report_objects = git(
        "log",
        "-p",
        "--binary",
        "refs/heads/reports/db1",
        "refs/heads/reports/web1",
        cwd=fleet.bare,
    )
    blobs = subprocess.run(
        ["git", "cat-file", "--batch-all-objects", "--batch"],
        cwd=fleet.bare,
        capture_output=True,
        check=True,
    ).stdout
    for secret in SECRETS:
        assert secret.decode() not in report_objects
        assert secret not in blobs, "plaintext in an object of the desired-state repository"
