"""Rollout refs in git (SPEC §13): explicit report refspecs and the halt marker.

A real bare repository (file://) holding report branches written with the
git CLI, fetched by :func:`fetch_rollout_refs` into a real state repository:
only the nodes asked for, only the refs that moved, a vanished branch
forgotten, and the marker read back. (Hidden report refs need a real
upload-pack, libgit2's file:// does not run one: tests/integration/test_rollout.py.)
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from reconciler.config import AuthConfig
from reconciler.git.remote import Remote
from reconciler.git.repo import open_bare, refs_under
from reconciler.git.rollout import (
    FETCHED_PREFIX,
    control_marker,
    fetch_rollout_refs,
    fetched_reports,
)
from reconciler.pipeline.rollout import HaltMarker, ReportView


def _git(*args: str, cwd: Path, data: bytes | None = None) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com", "HOME": str(cwd)}
    env |= {"GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com", "PATH": "/usr/bin"}
    done = subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, input=data, env=env
    )
    return done.stdout.decode().strip()


def _branch(server: Path, ref: str, name: str, data: bytes) -> None:
    """Commit ``name`` holding ``data`` as the only file of orphan branch ``ref`` on ``server``."""
    blob = _git("hash-object", "-w", "--stdin", cwd=server, data=data)
    tree = _git("mktree", cwd=server, data=f"100644 blob {blob}\t{name}\n".encode())
    commit = _git("commit-tree", tree, "-m", ref, cwd=server)
    _git("update-ref", ref, commit, cwd=server)


def _report(node: str, commit: str) -> bytes:
    body = {"node": node, "applied_commit": commit, "result": "changed"}
    return json.dumps({**body, "finished_at": "2026-11-30T20:00:00Z"}).encode()


def test_fetch_only_the_named_report_branches_and_the_marker(tmp_path: Path) -> None:
    server = tmp_path / "server.git"
    _git("init", "-q", "--bare", str(server), cwd=tmp_path)
    for node in ("web1", "web2", "db1"):
        _branch(server, f"refs/heads/reports/{node}", "report.json", _report(node, "a" * 40))
    marker = HaltMarker(halted=True, at="2026-11-30T20:00:00Z", by="alice", reason="slow")
    _branch(server, "refs/heads/rollout/control", "rollout.json", marker.to_json())
    repo = open_bare(tmp_path / "state" / "repo.git", durable=False)
    remote = Remote.for_agent(f"file://{server}", AuthConfig())

    got = fetch_rollout_refs(repo, remote, ["web1", "gone"])
    assert got.missing == ("gone",) and not got.hidden and got.received_bytes > 0
    assert sorted(refs_under(repo, FETCHED_PREFIX)) == ["control", "reports/web1"]
    reports = fetched_reports(repo, ["web1", "gone"])
    view = ReportView.from_report_json(reports["web1"], node="web1")
    assert view is not None and view.applied_commit == "a" * 40
    held = control_marker(repo)
    assert held is not None and HaltMarker.from_json(held[1], where="rollout.json") == marker

    # Nothing moved: nothing fetched. The branch deleted on the server: forgotten here.
    assert fetch_rollout_refs(repo, remote, ["web1"]).received_bytes == 0
    _git("update-ref", "-d", "refs/heads/reports/web1", cwd=server)
    assert fetch_rollout_refs(repo, remote, ["web1"]).missing == ("web1",)
    assert fetched_reports(repo, ["web1"]) == {}


def test_an_unsigned_halt_marker_is_ignored_when_the_host_verifies(tmp_path: Path) -> None:
    from reconciler.config import AgentConfig, VerifyConfig
    from reconciler.git.rollout import FETCHED_CONTROL
    from reconciler.pipeline.admission import read_halt_marker

    repo = open_bare(tmp_path / "state" / "repo.git", durable=False)
    marker = HaltMarker(halted=True, at="2026-11-30T20:00:00Z", by="mallory", reason="stop")
    _branch(repo.path, FETCHED_CONTROL, "rollout.json", marker.to_json())
    assert read_halt_marker(repo, AgentConfig(node="w2")) == (marker, None)
    signers = tmp_path / "allowed_signers"
    signers.write_text("ops@example.com ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTheTest\n")
    verifying = AgentConfig(node="w2", verify=VerifyConfig(allowed_signers=str(signers)))
    halted, warning = read_halt_marker(repo, verifying)
    assert halted is False
    assert warning is not None and "ignored" in warning and "not signed" in warning


def test_an_unsigned_resume_on_a_signed_halt_does_not_lift_it(tmp_path: Path) -> None:
    """Whoever can push rollout/control (a host key on a server without per-ref rules)
    pushed an unsigned "resume" on top of the operator's signed halt: the host that
    verifies ignored the tip — and with it the halt, so the later waves went on. Now the
    newest trusted marker of the branch's history counts."""
    import shutil

    import pytest

    from reconciler.config import AgentConfig, VerifyConfig
    from reconciler.git.commits import Identity, signing_of, write_commit
    from reconciler.git.repo import set_ref
    from reconciler.git.rollout import FETCHED_CONTROL
    from reconciler.pipeline.admission import read_halt_marker

    if shutil.which("ssh-keygen") is None:
        pytest.skip("needs ssh-keygen")
    key = tmp_path / "signer"
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "ops", "-f", str(key)]
    subprocess.run(keygen, check=True)
    public = " ".join(key.with_name("signer.pub").read_text().split()[:2])
    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'ops@example.com namespaces="git" {public}\n')
    state = tmp_path / "state" / "repo.git"
    repo = open_bare(state, durable=False)
    for k, v in (("gpg.format", "ssh"), ("user.signingkey", str(key))):
        _git("config", k, v, cwd=state)
    _git("config", "commit.gpgsign", "true", cwd=state)
    repo = open_bare(state, durable=False)
    ops = Identity(name="Ops", email="ops@example.com")
    halt = HaltMarker(halted=True, at="2026-11-30T20:00:00Z", by="ops", reason="latency")
    signed = write_commit(
        repo, None, {"rollout.json": halt.to_json()}, "halt\n", ops, signing=signing_of(repo)
    )
    resume = HaltMarker(halted=False, at="2026-11-30T20:01:00Z", by="ops", reason="forged")
    forged = write_commit(repo, signed, {"rollout.json": resume.to_json()}, "resume\n", ops)
    set_ref(repo, FETCHED_CONTROL, forged)
    verifying = AgentConfig(node="w2", verify=VerifyConfig(allowed_signers=str(allowed)))

    marker, warning = read_halt_marker(repo, verifying)
    assert marker == halt
    assert warning is not None and forged[:12] in warning and "not signed" in warning
    assert signed[:12] in warning
    # The signed tip itself counts, and without verify the tip counts whatever it is.
    set_ref(repo, FETCHED_CONTROL, signed)
    assert read_halt_marker(repo, verifying) == (halt, None)
    set_ref(repo, FETCHED_CONTROL, forged)
    assert read_halt_marker(repo, AgentConfig(node="w2")) == (resume, None)


def test_a_halt_is_not_lifted_by_deleting_or_rewinding_the_marker_branch(tmp_path: Path) -> None:
    """The host forgot a marker branch deleted on the server and took any tip it was
    force-pushed to, so whoever could delete or rewind rollout/control lifted the
    operator's halt, signed or not. The marker now only moves forward, as the
    desired branch does (rewind protection); another location starts afresh."""
    server = tmp_path / "server.git"
    _git("init", "-q", "--bare", str(server), cwd=tmp_path)
    go = HaltMarker(halted=False, at="2026-11-30T19:00:00Z", by="ops", reason="go")
    _branch(server, "refs/heads/rollout/control", "rollout.json", go.to_json())
    first = _git("rev-parse", "refs/heads/rollout/control", cwd=server)
    halt = HaltMarker(halted=True, at="2026-11-30T20:00:00Z", by="ops", reason="latency")
    blob = _git("hash-object", "-w", "--stdin", cwd=server, data=halt.to_json())
    tree = _git("mktree", cwd=server, data=f"100644 blob {blob}\trollout.json\n".encode())
    halted = _git("commit-tree", tree, "-p", first, "-m", "halt", cwd=server)
    _git("update-ref", "refs/heads/rollout/control", halted, cwd=server)
    repo = open_bare(tmp_path / "state" / "repo.git", durable=False)
    remote = Remote.for_agent(f"file://{server}", AuthConfig())

    def marker() -> HaltMarker:
        held = control_marker(repo)
        assert held is not None
        return HaltMarker.from_json(held[1], where="rollout.json")

    assert fetch_rollout_refs(repo, remote, []).control_note is None
    assert marker() == halt
    # Rewound to the commit before the halt: the halt stays, and the host says why.
    _git("update-ref", "refs/heads/rollout/control", first, cwd=server)
    got = fetch_rollout_refs(repo, remote, [])
    assert got.control == halted and marker() == halt
    assert got.control_note is not None and "does not descend" in got.control_note
    # Deleted: the halt stays.
    _git("update-ref", "-d", "refs/heads/rollout/control", cwd=server)
    got = fetch_rollout_refs(repo, remote, [])
    assert got.control == halted and marker() == halt
    assert got.control_note is not None and "gone from the server" in got.control_note
    # A resume on top is taken.
    resume = HaltMarker(halted=False, at="2026-11-30T21:00:00Z", by="ops", reason="fixed")
    blob = _git("hash-object", "-w", "--stdin", cwd=server, data=resume.to_json())
    tree = _git("mktree", cwd=server, data=f"100644 blob {blob}\trollout.json\n".encode())
    on_top = _git("commit-tree", tree, "-p", halted, "-m", "resume", cwd=server)
    _git("update-ref", "refs/heads/rollout/control", on_top, cwd=server)
    got = fetch_rollout_refs(repo, remote, [])
    assert got.control == on_top and got.control_note is None and marker() == resume
    # Reports moved to another repository (SPEC §12): its marker branch is taken as it is.
    other = tmp_path / "shard0.git"
    _git("init", "-q", "--bare", str(other), cwd=tmp_path)
    _branch(other, "refs/heads/rollout/control", "rollout.json", halt.to_json())
    got = fetch_rollout_refs(repo, Remote.for_agent(f"file://{other}", AuthConfig()), [])
    assert got.control_note is None and marker() == halt
