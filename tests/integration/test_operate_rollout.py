"""Operators' side of a progressive rollout (issue 18, SPEC §13): ``rollout status``,
``rollout halt`` and ``rollout resume`` against the real git daemon.

Reports are crafted on the server with git plumbing (``write_report``), so each
wave's state is set exactly, without agent runs; the hosts' side of the same
marker is tested with real agent runs at the end.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.conftest import Fleet, git
from tests.integration.servers import keygen, require
from tests.integration.test_operate_support import operator, write_report

# The example fleet's four nodes: web1 the canary, then 10 % of the other three
# (ceil: one node), then everyone else (two).
ROLLOUT = """\
rollout:
  waves:
    - {name: canary, nodes: [web1]}
    - {name: ten-percent, percent: 10}
    - {name: everyone, percent: 100}
  soak: 60s
  max_failed: 0
"""


def report(commit: str | None, result: str, when: float) -> dict:
    """The report.json keys the admission check reads (SPEC §5)."""
    finished = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))
    return {"result": result, "applied_commit": commit, "finished_at": finished}


@pytest.fixture
def op(fleet, tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_AUTHOR_NAME", "Ops Laptop")
    monkeypatch.setenv("GIT_AUTHOR_EMAIL", "ops@laptop.example")
    return operator(fleet, tmp_path / "cache")


@pytest.fixture
def rolling(fleet: Fleet) -> str:
    """The commit that sets ``rollout:``: the one rolling out."""
    fleet.write("fleet.yaml", ROLLOUT)
    return fleet.commit("roll out in waves")


def control_log(fleet: Fleet) -> list[str]:
    out = git("log", "--format=%s", "refs/heads/rollout/control", cwd=fleet.bare, check=False)
    return [line for line in out.splitlines() if line]


def marker_on_server(fleet: Fleet) -> dict:
    return json.loads(git("show", "rollout/control:rollout.json", cwd=fleet.bare))


def test_status_halt_and_resume(fleet, op, rolling):
    status = op("rollout", "status", "--format", "json")
    assert status.code == 0, status.err
    data = status.json()
    assert set(data) == {
        "commit", "head", "soak_s", "max_failed", "halted", "complete", "marker", "waves"
    }  # fmt: skip
    assert data["commit"] == data["head"] == rolling
    assert (data["soak_s"], data["max_failed"], data["marker"]) == (60.0, 0, None)
    waves = data["waves"]
    assert [w["name"] for w in waves] == ["canary", "ten-percent", "everyone"]
    assert [len(w["nodes"]) for w in waves] == [1, 1, 2]
    assert waves[0]["nodes"][0] == {
        "node": "web1", "applied_commit": None, "has_commit": False, "result": "never",
        "since": None,
    }  # fmt: skip
    assert [w["state"] for w in waves] == ["admitted", "waiting", "waiting"]
    assert waves[1]["waiting_for"] == "canary"
    assert set(waves[1]) == {
        "name", "state", "reason", "waiting_for", "done", "pending", "failed", "nodes"
    }  # fmt: skip

    # The canary reports the commit, two minutes ago: past the soak, wave 2 is admitted.
    old = time.time() - 120
    write_report(fleet, "web1", report(rolling, "changed", old), when=int(old))
    second = op("rollout", "status", "--format", "json").json()["waves"]
    assert [w["state"] for w in second] == ["admitted", "admitted", "waiting"]
    assert second[0]["nodes"][0]["has_commit"] is True
    assert (second[0]["done"], second[0]["pending"], second[0]["failed"]) == (1, 0, 0)
    wave2 = second[1]["nodes"][0]["node"]

    halted = op("rollout", "halt", "--reason", "latency up on web1")
    assert halted.code == 0, halted.err
    assert "rollout halted by Ops Laptop <ops@laptop.example>" in halted.out
    assert "unsigned" in halted.out
    marker = marker_on_server(fleet)
    assert marker["halted"] is True and marker["reason"] == "latency up on web1"
    assert marker["by"] == "Ops Laptop <ops@laptop.example>"
    assert control_log(fleet) == ["rollout halt: latency up on web1"]
    # The halt holds wave 2 even though the canary succeeded; the canary stays admitted.
    data = op("rollout", "status", "--format", "json").json()
    assert data["halted"] is True
    assert [w["state"] for w in data["waves"]] == ["admitted", "halted", "halted"]
    assert data["marker"]["reason"] == "latency up on web1"
    assert data["marker"]["signed"] is False
    text = op("rollout", "status").out
    assert "HALTED by Ops Laptop <ops@laptop.example>" in text
    assert "wave 2 ten-percent: HALTED" in text and wave2 in text
    # fleet and the fleet page show the rollout in progress.
    fleet_json = op("fleet", "--format", "json").json()
    assert fleet_json["rollout"]["halted"] is True
    assert [w["state"] for w in fleet_json["rollout"]["waves"]] == ["admitted", "halted", "halted"]
    table = op("fleet").out
    assert f"rollout of {rolling[:12]}; HALTED: canary admitted (1 done, 0 pending" in table
    assert "marker: HALTED by Ops Laptop" in table
    page = op("fleet", "--format", "html").out
    assert f"Rollout of <code>{rolling[:12]}</code>" in page
    assert '<tr data-wave="ten-percent" data-state="halted">' in page
    assert "latency up on web1" in page

    resumed = op("rollout", "resume", "--reason", "fixed in the next commit", "--format", "json")
    assert resumed.code == 0, resumed.err
    assert resumed.json()["halted"] is False and resumed.json()["pushed"] is True
    assert control_log(fleet) == [
        "rollout resume: fixed in the next commit",
        "rollout halt: latency up on web1",
    ]
    states = [w["state"] for w in op("rollout", "status", "--format", "json").json()["waves"]]
    assert states == ["admitted", "admitted", "waiting"]

    # Resuming what is not halted: said, exit 0, no commit.
    again = op("rollout", "resume")
    assert again.code == 0, again.err
    assert "not halted: nothing to resume — no commit" in again.out
    assert len(control_log(fleet)) == 2


def test_a_failed_canary_halts_later_waves_and_status_without_rollout(fleet, op, rolling):
    now = time.time()
    write_report(fleet, "web1", report(rolling, "failed", now), when=int(now))
    data = op("rollout", "status", "--format", "json").json()
    assert [w["state"] for w in data["waves"]] == ["admitted", "halted", "halted"]
    assert data["halted"] is True and data["marker"] is None
    assert data["waves"][0]["failed"] == 1
    assert "max_failed" in data["waves"][1]["reason"]

    assert op("fleet", "--format", "json").json()["rollout"]["waves"][0]["failed"] == 1

    # The next commit drops rollout: — no rollout in progress; fleet keeps its shape.
    fleet.remove("fleet.yaml")
    head = fleet.commit("no more waves")
    plain = op("rollout", "status")
    assert plain.code == 0, plain.err
    assert plain.out.startswith(f"no rollout: fleet.yaml at {head[:12]}")
    assert op("rollout", "status", "--format", "json").json()["commit"] is None
    assert set(op("fleet", "--format", "json").json()) == {"nodes"}
    assert "id=rollout" not in op("fleet", "--format", "html").out


def test_the_marker_is_signed_as_git_signs_and_hosts_verify_it(fleet, op, rolling, tmp_path):
    """commit.gpgsign + gpg.format ssh in the operator's git configuration: the marker's commit
    carries an SSH signature that the hosts' own check (git/trust.py) accepts."""
    require("ssh-keygen", "openssh-client")
    key = tmp_path / "signer"
    public = keygen(key, "ops")
    op("rollout", "status")  # makes the cache
    cache = tmp_path / "cache" / "operator.git"
    for k, v in (("commit.gpgsign", "true"), ("gpg.format", "ssh"), ("user.signingkey", key)):
        git("config", k, str(v), cwd=cache)
    halted = op("rollout", "halt", "--reason", "signed halt", "--format", "json")
    assert halted.code == 0, halted.err
    assert halted.json()["signed"] is True
    commit = halted.json()["commit"]
    assert git("rev-parse", "refs/heads/rollout/control", cwd=fleet.bare).strip() == commit

    from reconciler.config import VerifyConfig
    from reconciler.git.repo import open_bare
    from reconciler.git.trust import verify_commit

    allowed = tmp_path / "allowed_signers"
    allowed.write_text(f'ops@example.com namespaces="git" {public}\n')
    repo = open_bare(Path(fleet.bare), durable=False)
    assert verify_commit(repo, commit, VerifyConfig(allowed_signers=str(allowed))) == (
        "ops@example.com"
    )
    data = op("rollout", "status", "--format", "json").json()
    assert data["marker"]["signed"] is True and data["marker"]["halted"] is True

    # A key that cannot sign: one line naming the program, nothing pushed.
    git("config", "user.signingkey", str(tmp_path / "no-such-key"), cwd=cache)
    failed = op("rollout", "resume")
    assert failed.code == 1
    assert "ssh-keygen: cannot sign the commit" in failed.err
    assert "check user.signingkey" in failed.err
    assert git("rev-parse", "refs/heads/rollout/control", cwd=fleet.bare).strip() == commit


def test_with_reports_in_shards_the_marker_lives_in_shard_zero(fleet, op):
    """SPEC §12: reports in 16 repositories; the marker goes where every host can read it,
    the repository of shard 0, and status reads it from there."""
    base = fleet.name.removesuffix(".git")
    shard0 = fleet.daemon.base / f"{base}-reports-0.git"
    git("init", "-q", "--bare", str(shard0))
    url = f"{fleet.daemon.url(base)}-reports-{{shard}}.git"
    fleet.write("fleet.yaml", ROLLOUT + f"reports: {{repo: '{url}', shards: 16}}\n")
    fleet.commit("rollout, reports in 16 shards")
    halted = op("rollout", "halt", "--reason", "sharded", "--format", "json")
    assert halted.code == 0, halted.err
    assert halted.json()["url"] == url.replace("{shard}", "0")
    assert (
        json.loads(git("show", "rollout/control:rollout.json", cwd=shard0))["reason"] == "sharded"
    )
    assert not git("for-each-ref", "refs/heads/rollout/", cwd=fleet.bare).strip()
    status = op("rollout", "status", "--format", "json").json()
    assert status["marker"]["halted"] is True and status["marker"]["reason"] == "sharded"

    # web1's report lives in its shard (sha256("web1") starts with 6): status reads it there.
    shard6 = fleet.daemon.base / f"{base}-reports-6.git"
    git("init", "-q", "--bare", str(shard6))
    now = time.time()
    write_report(fleet, "web1", report(fleet.head(), "changed", now), when=int(now))
    git("push", "-q", str(shard6), "refs/heads/reports/web1", cwd=fleet.bare)
    git("update-ref", "-d", "refs/heads/reports/web1", cwd=fleet.bare)
    canary = op("rollout", "status", "--format", "json").json()["waves"][0]
    assert (canary["done"], canary["nodes"][0]["has_commit"]) == (1, True)


# ------------------------------------------------------- with the hosts' own runs

TWO_WAVES = """\
rollout:
  waves:
    - {name: canary, nodes: [web1]}
    - {name: everyone, percent: 100}
  soak: 1s
  max_failed: 0
"""
MOTD = "templates/motd/default/etc/motd.j2"


def pulled(host, *args: str) -> dict:
    proc = host.run("pull", "--format", "json", *args)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_halt_holds_wave_two_resume_lets_it_apply_and_a_revert_rolls_out_the_same_way(
    fleet, make_host, op
):
    fleet.write("fleet.yaml", TWO_WAVES)
    first = fleet.commit("rollout: canary web1, then everyone")
    canary, waiter = make_host("web1"), make_host("web2")
    assert pulled(canary)["applied_commit"] == pulled(waiter)["applied_commit"] == first
    fleet.write(MOTD, fleet.read(MOTD) + "Wave by wave.\n")
    second = fleet.commit("motd: a new line")
    assert pulled(canary)["applied_commit"] == second

    # The canary succeeded and soaked, but the operator halted: wave 2 holds.
    assert op("rollout", "halt", "--reason", "watching web1").code == 0
    time.sleep(1.1)
    report = pulled(waiter)
    assert report["applied_commit"] == first
    assert report["rollout"]["state"] == "halted" and "watching web1" in report["rollout"]["reason"]
    assert "Wave by wave." not in waiter.path("/etc/motd").read_text()
    status = op("rollout", "status", "--format", "json").json()
    assert [w["state"] for w in status["waves"]] == ["admitted", "halted"]
    assert status["halted"] is True and status["marker"]["reason"] == "watching web1"
    wave2 = {n["node"]: n for n in status["waves"][1]["nodes"]}
    assert (wave2["web2"]["applied_commit"], wave2["web2"]["has_commit"]) == (first, False)
    assert wave2["db1"]["result"] == "never"  # no host of its own in this test

    # Resumed: the next run applies it.
    assert op("rollout", "resume", "--reason", "web1 looks fine").code == 0
    assert pulled(waiter)["applied_commit"] == second
    assert "Wave by wave." in waiter.path("/etc/motd").read_text()
    status = op("rollout", "status", "--format", "json").json()
    assert [w["state"] for w in status["waves"]] == ["admitted", "admitted"]
    assert {n["node"]: n["has_commit"] for n in status["waves"][1]["nodes"]}["web2"] is True

    # The way back is a revert commit: a forward change, through the same waves.
    git("revert", "--no-edit", "HEAD", cwd=fleet.work)
    git("push", "-q", "origin", "HEAD:refs/heads/main", cwd=fleet.work)
    revert = fleet.head()
    report = pulled(waiter)  # before the canary: held, still on the change
    assert report["applied_commit"] == second and report["rollout"]["state"] == "pending"
    assert report["rollout"]["waiting_for"] == "canary"
    assert pulled(canary)["applied_commit"] == revert
    waves = op("rollout", "status", "--format", "json").json()["waves"]
    assert waves[0]["done"] == 1  # wave 2 waits for its soak (1s: too short to assert on)
    assert {n["node"]: n["has_commit"] for n in waves[1]["nodes"]}["web2"] is False
    time.sleep(1.1)
    assert pulled(waiter)["applied_commit"] == revert
    assert "Wave by wave." not in waiter.path("/etc/motd").read_text()


def test_hosts_that_verify_ignore_an_unsigned_marker_and_obey_a_signed_one(
    fleet, make_host, op, tmp_path
):
    from tests.integration.test_signed import allowed_signers, ssh_signed_commit, verify_config

    require("ssh-keygen", "openssh-client")
    key = tmp_path / "ops"
    public = keygen(key, "ops@example.com")
    signers = str(allowed_signers(tmp_path / "signers", public))
    fleet.write("fleet.yaml", TWO_WAVES)
    ssh_signed_commit(fleet, key, "rollout: canary web1, then everyone")
    canary, waiter = make_host("web1"), make_host("web2")
    configs = {h.node: verify_config(h, allowed_signers=signers) for h in (canary, waiter)}
    for host in (canary, waiter):
        pulled(host, "--config", configs[host.node])

    # An unsigned halt: the verifying host ignores it, says so, and applies.
    fleet.write(MOTD, fleet.read(MOTD) + "Signed rollouts.\n")
    second = ssh_signed_commit(fleet, key, "motd: a signed change")
    assert pulled(canary, "--config", configs["web1"])["applied_commit"] == second
    halted = op("rollout", "halt", "--reason", "unsigned", "--format", "json")
    assert halted.code == 0 and halted.json()["signed"] is False
    time.sleep(1.1)
    proc = waiter.run("pull", "--format", "json", "--config", configs["web2"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["applied_commit"] == second
    assert "halt marker" in proc.stderr and "ignored" in proc.stderr

    # Signed with the operator's key (commit.gpgsign in git's configuration): obeyed.
    cache = tmp_path / "cache" / "operator.git"
    for k, v in (("commit.gpgsign", "true"), ("gpg.format", "ssh"), ("user.signingkey", key)):
        git("config", k, str(v), cwd=cache)
    fleet.write(MOTD, fleet.read(MOTD) + "Held by a signed halt.\n")
    third = ssh_signed_commit(fleet, key, "motd: held")
    assert pulled(canary, "--config", configs["web1"])["applied_commit"] == third
    halted = op("rollout", "halt", "--reason", "signed", "--format", "json")
    assert halted.code == 0 and halted.json()["signed"] is True
    time.sleep(1.1)
    report = pulled(waiter, "--config", configs["web2"])
    assert report["applied_commit"] == second and report["rollout"]["state"] == "halted"
    assert "warning" not in report["rollout"]

    # An unsigned resume pushed on the signed halt (any key that may push the branch): the
    # verifying host keeps to the signed halt; the operator's signed resume is recorded
    # (the unsigned tip does not make it "nothing to resume") and lifts it.
    from reconciler.git.commits import Identity, write_commit
    from reconciler.git.repo import open_bare

    server = open_bare(fleet.bare, durable=False)
    forged = _marker_bytes(by="mallory", reason="go on")
    tip = git("rev-parse", "refs/heads/rollout/control", cwd=fleet.bare).strip()
    mallory = Identity(name="Mallory", email="m@example.com")
    unsigned = write_commit(server, tip, {"rollout.json": forged}, "resume\n", mallory)
    git("update-ref", "refs/heads/rollout/control", unsigned, tip, cwd=fleet.bare)
    report = pulled(waiter, "--config", configs["web2"])
    assert report["applied_commit"] == second and report["rollout"]["state"] == "halted"
    assert unsigned[:12] in report["rollout"]["warning"]
    resumed = op("rollout", "resume", "--reason", "signed resume", "--format", "json")
    assert resumed.code == 0 and resumed.json()["pushed"] is True
    assert resumed.json()["signed"] is True
    time.sleep(1.1)
    assert pulled(waiter, "--config", configs["web2"])["applied_commit"] == third


def _marker_bytes(**fields: object) -> bytes:
    body = {"halted": False, "at": "2026-11-30T20:00:00Z", "by": "", "reason": "", **fields}
    return (json.dumps(body) + "\n").encode()
