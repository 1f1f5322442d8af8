"""Drift captures encrypted on the host (SPEC §8, issue 13): ``report.encrypt_captures``.

The attack: whoever reads the git server (its admin, a leaked backup, every
clone of a report branch) reads every file an intruder or an operator left
on a host. With ``report.encrypt_captures: true`` the host encrypts each
capture to ``keys/operators/*.pub`` of the commit it ran, before anything
leaves it: the server holds ``drift/<path>.age`` ciphertext only, and
``show``, ``log -p`` and ``adopt`` open it with an operator's identity. Real
``reconciler pull`` subprocesses against a real git daemon; real age keys.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.secrets import age
from tests.conftest import Fleet, git
from tests.integration._helpers import all_objects_text
from tests.integration.test_operate_support import operator

PLAIN = "an intruder's line 7f3a9c-CAPTURE-MARKER\n"


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "config.yaml"
    metrics = tmp_path / "metrics.prom"
    config.write_text(f"report:\n  encrypt_captures: true\nmetrics:\n  textfile: {metrics}\n")
    return config


def _drift(make_host, tmp_path: Path):
    """web1 converged, then /etc/motd edited by hand and a run with encrypted captures."""
    host = make_host("web1")
    assert host.pull().returncode == 0
    motd = host.path("/etc/motd")
    motd.write_text(motd.read_text() + PLAIN)
    proc = host.pull("--config", str(_config(tmp_path)))
    assert proc.returncode == 0, proc.stderr
    assert PLAIN.strip() not in proc.stdout + proc.stderr
    assert PLAIN not in motd.read_text()  # repaired as ever
    # What else leaves the run: last-run.json (the webhook's payload is its report
    # without facts) and the metrics hold paths and counts, never the content.
    for record in (host.state_dir / "last-run.json", tmp_path / "metrics.prom"):
        assert "7f3a9c" not in record.read_text(), record
    return host, proc


@pytest.fixture
def alice(fleet: Fleet, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An operator's identity whose key is keys/operators/alice.pub; HOME has none."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    identity = tmp_path / "alice.age"
    fleet.write("keys/operators/alice.pub", age.keygen(identity) + "\n")
    fleet.write("keys/operators/bob.pub", age.keygen(tmp_path / "bob.age") + "\n")
    fleet.commit("operators' keys")
    return identity


def test_an_encrypted_capture_is_ciphertext_and_show_opens_it_with_the_identity(
    fleet: Fleet, make_host, tmp_path: Path, alice: Path
) -> None:
    _drift(make_host, tmp_path)
    files = fleet.report_files("web1")
    assert "drift/etc/motd.age" in files and "drift/etc/motd" not in files
    assert age.is_age_payload(fleet.report_blob("web1", "drift/etc/motd.age"))
    # Not one object of the server (report branch, every report ever) holds the bytes.
    assert PLAIN.strip().encode() not in all_objects_text(fleet.bare)
    for blob in ("report.json",):
        assert b"7f3a9c" not in fleet.report_blob("web1", blob)

    op = operator(fleet, tmp_path / "cache")
    shown = op("show", "web1", "--identity", str(alice))
    assert shown.code == 0, shown.err
    assert f"+{PLAIN}" in shown.out  # the diff desired → host, decrypted

    # The default identity (~/.config/reconciler/identity.age) is absent: one line says
    # which identity is needed; the drifted path is still listed; nothing decrypted.
    blind = op("show", "web1")
    assert blind.code == 0, blind.err
    assert "drift /etc/motd [content]" in blind.out
    assert "7f3a9c" not in blind.out
    (line,) = [ln for ln in blind.out.splitlines() if "drift/etc/motd.age" in ln]
    assert str(tmp_path / "home/.config/reconciler/identity.age") in line
    assert "no identity file" in line
    assert "--identity FILE holding the private key of keys/operators/alice.pub or bob.pub" in line

    # An identity that is no operator's: the same one line, naming it.
    stranger = tmp_path / "stranger.age"
    age.keygen(stranger)
    other = op("show", "web1", "--identity", str(stranger))
    assert other.code == 0 and "7f3a9c" not in other.out
    (line,) = [ln for ln in other.out.splitlines() if "drift/etc/motd.age" in ln]
    assert f"{stranger} is not one of them" in line

    # log -p: each report with its drift, opened alike; without the identity, the line.
    log = op("log", "web1", "-p", "--identity", str(alice))
    assert log.code == 0, log.err
    assert f"+{PLAIN}" in log.out
    blind_log = op("log", "web1", "--patch")
    assert blind_log.code == 0 and "7f3a9c" not in blind_log.out
    assert "no identity file" in blind_log.out and "drift/etc/motd.age" in blind_log.out
    # The fleet page never decrypts (a file that travels), identity or not.
    page = op("fleet", "--format", "html")
    assert page.code == 0, page.err
    assert "7f3a9c" not in page.out


def test_adopt_of_an_encrypted_capture_needs_the_identity(
    fleet: Fleet, make_host, tmp_path: Path, alice: Path
) -> None:
    _drift(make_host, tmp_path)
    op = operator(fleet, tmp_path / "cache")
    refused = op("adopt", "web1", "/etc/motd", "--no-push")
    assert refused.code == 1, (refused.out, refused.err)
    (line,) = refused.err.splitlines()
    assert line.startswith("reconciler: reports/web1: drift/etc/motd.age: ")
    assert "no identity file" in line and "keys/operators/alice.pub" in line

    adopted = op(
        "adopt", "web1", "/etc/motd", "--no-push", "--identity", str(alice), "--format", "json"
    )
    assert adopted.code == 0, adopted.err
    done = adopted.json()
    assert done["written"] == "templates/motd/default/etc/motd.j2.adopted"
    cache = tmp_path / "cache/operator.git"
    written = git("show", f"{done['commit']}:{done['written']}", cwd=cache)
    assert written.endswith(PLAIN)  # not a secret path: the plaintext goes on the branch


def test_without_operator_keys_nothing_falls_back_to_plaintext(
    fleet: Fleet, make_host, tmp_path: Path
) -> None:
    host, proc = _drift(make_host, tmp_path)
    assert "WARNING" in proc.stderr and "keys/operators/*.pub" in proc.stderr
    report = fleet.report("web1")
    assert {"path": "/etc/motd", "kind": "content"} in report["drift"]
    (entry,) = report["uncaptured"]
    assert entry["path"] == "/etc/motd"
    assert entry["reason"].startswith("report.encrypt_captures is on and commit ")
    assert entry["note"].startswith("not captured: report.encrypt_captures is on")
    assert not [f for f in fleet.report_files("web1") if f.startswith("drift/")]
    assert PLAIN.strip().encode() not in all_objects_text(fleet.bare)
    assert PLAIN.strip().encode() not in all_objects_text(host.state_dir / "repo.git")

    op = operator(fleet, tmp_path / "cache")
    adopt = op("adopt", "web1", "/etc/motd", "--no-push")
    assert adopt.code == 2, (adopt.out, adopt.err)
    assert "commit an operator key under keys/operators/" in adopt.err
