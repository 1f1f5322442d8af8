"""Rollback (SPEC §3 ``rollback [RUN_ID]`` · ``backups``): a run's backups put back byte
for byte, the host then holds that commit; ``on_post_failure: rollback`` undoes an app
whose post script failed.
"""

from __future__ import annotations

import json
import time

from tests.conftest import tree_snapshot
from tests.integration._helpers import (
    assert_clean_error,
    file_changes,
    mode_of,
    pull_report,
)

APP = "templates/rb/default"


def next_second() -> None:
    """Wait for the next wall-clock second: run ids order runs by their second only."""
    time.sleep(1.0 - time.time() % 1.0 + 0.01)


def converged_rb_host(fleet, make_host):
    """Node ``rbhost`` running app ``rb`` (four files under /etc/rb), converged."""
    fleet.write("hosts/rbhost.yaml", "apps: [rb]\n")
    fleet.write(f"{APP}/etc/rb/main.conf", "listen 80\nworkers 2\n")
    fleet.write(f"{APP}/etc/rb/hook.sh", "#!/bin/sh\necho hook\n")
    fleet.write(f"{APP}/etc/rb/legacy.conf", "legacy on\n")
    fleet.write(f"{APP}/etc/rb/keep.conf", "untouched\n")
    fleet.commit("rb app")
    host = make_host("rbhost")
    pull_report(host)
    return host


def change_rb(fleet, *, chmod_only: bool = True) -> None:
    """Content, mode, a new file and a file deleted (its template removed).

    ``chmod_only=False`` changes hook.sh's content along with its mode, so the
    change is an ``update`` rather than a ``chmod``.
    """
    fleet.write(f"{APP}/etc/rb/main.conf", "listen 8080\nworkers 8\n")
    hook = "#!/bin/sh\necho hook\n" if chmod_only else "#!/bin/sh\necho hook v2\n"
    fleet.write(f"{APP}/etc/rb/hook.sh", hook, executable=True)
    fleet.remove(f"{APP}/etc/rb/legacy.conf")
    fleet.write(f"{APP}/etc/rb/added.conf", "brand new\n")
    fleet.commit("rb: new port, executable hook, legacy.conf gone, added.conf")


EXPECTED_CHANGES = {
    "/etc/rb/main.conf": "update",
    "/etc/rb/hook.sh": "chmod",
    "/etc/rb/legacy.conf": "delete",
    "/etc/rb/added.conf": "create",
}


def test_rollback_restores_every_path_byte_for_byte_and_holds_until_released(fleet, make_host):
    host = converged_rb_host(fleet, make_host)
    before = tree_snapshot(host.root)
    change_rb(fleet)
    next_second()  # see test_backups_and_rollback_follow_the_order_of_runs_within_a_second
    run = pull_report(host)
    assert {c["path"]: c["action"] for c in file_changes(run)} == EXPECTED_CHANGES
    after = tree_snapshot(host.root)
    assert after != before

    proc = host.run("rollback", "--format", "json")

    assert proc.returncode == 0, proc.stderr
    rollback = json.loads(proc.stdout)
    assert tree_snapshot(host.root) == before  # content, modes, created and deleted files
    assert mode_of(host.path("/etc/rb/hook.sh")) == 0o644
    assert not host.path("/etc/rb/added.conf").exists()
    assert host.path("/etc/rb/legacy.conf").read_text() == "legacy on\n"

    # The rollback is reported like a run, on the report branch.
    report = fleet.report("rbhost")
    assert report["run_id"] == rollback["run_id"] != run["run_id"]
    assert report["rollback"]["run_id"] == run["run_id"]
    assert {c["path"] for c in report["changes"]} == set(EXPECTED_CHANGES)
    assert {c["reason"] for c in report["changes"]} == {"rollback"}
    assert all(c["applied"] for c in report["changes"])
    assert report["errors"] == []

    # `backups` lists the run and who rolled it back.
    proc = host.run("backups", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    rows = {r["run_id"]: r for r in json.loads(proc.stdout)["backups"]}
    assert rows[run["run_id"]]["rolled_back_by"] == rollback["run_id"]
    assert rows[run["run_id"]]["paths"] == len(EXPECTED_CHANGES)
    assert rows[rollback["run_id"]]["kind"] == "rollback"
    text = host.run("backups").stdout
    assert run["run_id"] in text and f"rolled back by {rollback['run_id']}" in text

    # Held: the next runs fetch and report but do not re-apply the commit.
    for _ in range(2):
        held = pull_report(host)
        assert held["suspended"] is not None, held
        reason = held["suspended"]["reason"]
        assert "hold" in reason and run["run_id"] in reason, reason
        assert not any(c["applied"] for c in held["changes"])
        assert tree_snapshot(host.root) == before
    assert fleet.report("rbhost")["suspended"]["reason"] == reason

    released = pull_report(host, "--release-hold")
    assert released["suspended"] is None
    assert tree_snapshot(host.root) == after
    again = pull_report(host)
    assert again["result"] == "ok" and again["suspended"] is None


def test_a_new_commit_lifts_the_hold(fleet, make_host):
    host = converged_rb_host(fleet, make_host)
    change_rb(fleet, chmod_only=False)
    run = pull_report(host)
    proc = host.run("rollback", run["run_id"])
    assert proc.returncode == 0, proc.stderr
    rolled_back = tree_snapshot(host.root)
    assert pull_report(host)["suspended"] is not None
    assert tree_snapshot(host.root) == rolled_back

    # The fix arrives: the hold lifts by itself and the new commit is applied.
    fleet.write(f"{APP}/etc/rb/main.conf", "listen 8081\nworkers 8\n")
    fleet.commit("rb: the fix")
    fixed = pull_report(host)

    assert fixed["suspended"] is None
    assert host.path("/etc/rb/main.conf").read_text() == "listen 8081\nworkers 8\n"
    assert host.path("/etc/rb/added.conf").read_text() == "brand new\n"
    assert not host.path("/etc/rb/legacy.conf").exists()
    assert mode_of(host.path("/etc/rb/hook.sh")) == 0o755
    assert not (host.state_dir / "hold.json").exists()
    assert pull_report(host)["result"] == "ok"


def test_rollback_of_an_older_run_by_id_restores_only_its_paths_and_holds(fleet, make_host):
    host = converged_rb_host(fleet, make_host)
    before = tree_snapshot(host.root)
    change_rb(fleet, chmod_only=False)
    run = pull_report(host)
    fleet.write(f"{APP}/etc/rb/keep.conf", "touched later\n")
    fleet.commit("rb: keep.conf")
    later = pull_report(host)
    assert [c["path"] for c in file_changes(later)] == ["/etc/rb/keep.conf"]

    proc = host.run("rollback", run["run_id"])

    assert proc.returncode == 0, proc.stderr
    restored = tree_snapshot(host.root)
    assert restored == {**before, "etc/rb/keep.conf": restored["etc/rb/keep.conf"]}
    assert host.path("/etc/rb/keep.conf").read_text() == "touched later\n"
    # No commit arrived since the rollback: the next run must not undo it.
    held = pull_report(host)
    assert tree_snapshot(host.root) == restored, held["changes"]
    assert held["suspended"] is not None


def test_backups_and_rollback_follow_the_order_of_runs_within_a_second(fleet, make_host):
    """Runs a fraction of a second apart: `backups` lists them in the order they ran
    and `rollback` without RUN_ID takes the last one."""
    host = converged_rb_host(fleet, make_host)
    first = json.loads((host.state_dir / "last-run.json").read_text())["run_id"]
    ran = [first]
    for n in range(7):  # drift repairs: each a run with a backup, ~0.3 s apart
        host.path("/etc/rb/keep.conf").write_text(f"hand edit {n}\n")
        ran.append(pull_report(host)["run_id"])

    proc = host.run("backups", "--format", "json")

    listed = [r["run_id"] for r in json.loads(proc.stdout)["backups"] if r["kind"] == "run"]
    assert listed == [r for r in ran if r in listed], f"ran {ran}, listed {listed}"
    assert listed[-1] == ran[-1]
    proc = host.run("rollback", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rollback"]["run_id"] == ran[-1], ran
    assert host.path("/etc/rb/keep.conf").read_text() == "hand edit 6\n"


def test_rollback_of_an_unknown_run_exits_2_with_one_line(fleet, make_host):
    host = converged_rb_host(fleet, make_host)
    before = tree_snapshot(host.root)

    proc = host.run("rollback", "20990101T000000Z-dead")

    assert proc.returncode == 2
    lines = assert_clean_error(proc.stderr, "20990101T000000Z-dead")
    assert len(lines) == 1, lines
    assert tree_snapshot(host.root) == before
    assert not (host.state_dir / "hold.json").exists()
    assert pull_report(host)["suspended"] is None


def test_on_post_failure_rollback_puts_the_apps_files_back(fleet, make_host):
    fleet.write("templates/rb/app.yaml", "scripts: {on_post_failure: rollback}\n")
    host = converged_rb_host(fleet, make_host)
    before = tree_snapshot(host.root)
    change_rb(fleet, chmod_only=False)
    fleet.write(
        "scripts/post/rb/10-check",
        "#!/bin/sh\necho 'rb: config check failed: port 8080 is taken'\nexit 1\n",
        executable=True,
    )
    fleet.commit("rb: a post script that fails")

    proc = host.run("pull", "--format", "json")

    assert proc.returncode == 1, proc.stderr
    report = json.loads(proc.stdout)
    assert tree_snapshot(host.root) == before
    assert report["result"] == "failed"
    assert any("rolled back" in e and "10-check" in e for e in report["errors"]), report["errors"]
    assert "rolled back" in proc.stderr
    by_path = {c["path"]: c for c in file_changes(report)}
    assert set(by_path) == set(EXPECTED_CHANGES)
    for path, change in by_path.items():
        assert change.get("rolled_back") is True, (path, change)
        assert change["applied"] is False, (path, change)
    assert fleet.report("rbhost")["errors"] == report["errors"]


def test_rollback_never_writes_through_a_parent_symlinked_outside_the_root(
    fleet, make_host, tmp_path
):
    host = converged_rb_host(fleet, make_host)
    change_rb(fleet, chmod_only=False)
    pull_report(host)
    # Someone swaps /etc/rb for a symlink to a directory outside the root.
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("main.conf", "hook.sh", "legacy.conf", "added.conf", "victim"):
        (outside / name).write_text(f"operator's own {name}\n")
    before = tree_snapshot(outside)
    saved = host.path("/etc/rb").rename(host.root / "rb-moved")
    host.path("/etc/rb").symlink_to(outside)

    proc = host.run("rollback", "--format", "json")

    assert tree_snapshot(outside) == before, "rollback wrote outside the root"
    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "outside the root" in proc.stderr, proc.stderr
    assert tree_snapshot(saved) != {}  # the moved-away files are untouched too


def test_backups_keep_the_last_n_runs(fleet, make_host, tmp_path):
    host = converged_rb_host(fleet, make_host)
    config = tmp_path / "config.yaml"
    config.write_text("backups: {keep: 3}\n")
    ran = []
    for n in range(5):
        host.path("/etc/rb/keep.conf").write_text(f"hand edit {n}\n")
        ran.append(pull_report(host, "--config", str(config))["run_id"])

    kept = sorted(p.name for p in (host.state_dir / "backups").iterdir())

    assert kept == ran[-3:]
    # The oldest kept run can still be rolled back: it puts back the edit it repaired.
    proc = host.run("rollback", ran[-3])
    assert proc.returncode == 0, proc.stderr
    assert host.path("/etc/rb/keep.conf").read_text() == "hand edit 2\n"


def test_a_commit_that_leaves_the_nodes_target_alone_keeps_the_hold(fleet, make_host):
    """Issue 12: a commit to another node's host file must not undo web1's rollback;
    only a commit that changes this node's target lifts the hold."""
    host = converged_rb_host(fleet, make_host)
    change_rb(fleet, chmod_only=False)
    run = pull_report(host)
    proc = host.run("rollback")
    assert proc.returncode == 0, proc.stderr
    rolled_back = tree_snapshot(host.root)
    hold = json.loads((host.state_dir / "hold.json").read_text())
    assert hold["head"] == hold["commit"] == run["source"]["commit"]

    fleet.write("hosts/otherhost.yaml", "apps: [rb]\nvars: {unrelated: 1}\n")
    fleet.commit("otherhost: a node of its own")
    for _ in range(2):
        held = pull_report(host)
        assert held["suspended"] is not None, held
        assert not any(c["applied"] for c in held["changes"]), held["changes"]
        assert tree_snapshot(host.root) == rolled_back
        hold = json.loads((host.state_dir / "hold.json").read_text())
        assert hold["unchanged_at"] == held["source"]["commit"] != hold["commit"]

    # The fix, later still: it changes rbhost's target, so the hold lifts.
    fleet.write(f"{APP}/etc/rb/main.conf", "listen 8081\nworkers 8\n")
    fleet.commit("rb: the fix")
    fixed = pull_report(host)
    assert fixed["suspended"] is None
    assert host.path("/etc/rb/main.conf").read_text() == "listen 8081\nworkers 8\n"
    assert not (host.state_dir / "hold.json").exists()


POST_RELOAD = """#!/bin/sh
printf '%s' "$RECONCILER_CHANGED" > "$RECONCILER_ROOT/rb-post-changed"
echo "reloaded: $(head -n 1 "$RECONCILER_ROOT/etc/rb/main.conf")"
if [ -e "$RECONCILER_ROOT/rb-post-fails" ]; then echo 'rb: reload failed'; exit 1; fi
"""


def rolled_back_rb_host(fleet, make_host, *, fail: bool):
    """rbhost with a post script that records RECONCILER_CHANGED, its change applied
    and then rolled back; ``fail``: the post script fails during the rollback."""
    fleet.write("scripts/post/rb/10-reload", POST_RELOAD, executable=True)
    host = converged_rb_host(fleet, make_host)
    before = tree_snapshot(host.root)
    del before["rb-post-changed"]  # the post script's own record, compared on its own
    change_rb(fleet, chmod_only=False)
    pull_report(host)
    host.path("/rb-post-changed").unlink()
    if fail:
        host.path("/rb-post-fails").write_text("")
        before["rb-post-fails"] = tree_snapshot(host.root)["rb-post-fails"]
    proc = host.run("rollback", "--format", "json")
    return host, before, proc


def test_rollback_runs_the_post_scripts_of_the_apps_it_restored(fleet, make_host):
    """Issue 12: files restored, the service must reload the configuration rolled back."""
    host, before, proc = rolled_back_rb_host(fleet, make_host, fail=False)

    assert proc.returncode == 0, proc.stderr
    changed = host.path("/rb-post-changed").read_text().splitlines()
    assert sorted(changed) == sorted(EXPECTED_CHANGES), changed
    host.path("/rb-post-changed").unlink()
    assert tree_snapshot(host.root) == before
    report = json.loads(proc.stdout)
    scripts = [(s["phase"], s["app"], s["name"], s["exit_code"]) for s in report["scripts"]]
    assert scripts == [("post", "rb", "10-reload", 0)], report["scripts"]
    assert "reloaded: listen 80" in report["scripts"][0]["output_tail"]
    assert fleet.report("rbhost")["scripts"] == report["scripts"]


def test_a_post_script_failing_after_a_rollback_fails_it_and_keeps_the_files(fleet, make_host):
    host, before, proc = rolled_back_rb_host(fleet, make_host, fail=True)

    assert proc.returncode == 1, (proc.returncode, proc.stderr)
    assert "10-reload" in proc.stderr, proc.stderr
    host.path("/rb-post-changed").unlink()
    assert tree_snapshot(host.root) == before  # the rollback is not rolled back
    report = json.loads(proc.stdout)
    assert report["result"] == "failed"
    assert [s["exit_code"] for s in report["scripts"]] == [1]
    assert any("10-reload" in e for e in report["errors"]), report["errors"]
    assert all(c["applied"] for c in report["changes"])


def test_post_scripts_of_a_rollback_never_report_a_secret(fleet, make_host, tmp_path):
    """SPEC §8: a rollback's post scripts print what they like, as a run's do — here
    the password of the file the rollback put back, alone on its line and within the
    file's text. The rollback's report shows ``<redacted>`` where each was: the `!age`
    values its identity opens, and every secret file as the rollback left it."""
    from reconciler.secrets import age

    identity = tmp_path / "rbhost.age"
    to = [age.parse_recipient(age.keygen(identity), where="rbhost")]
    config = tmp_path / "rbhost.yaml"
    config.write_text(f"identity: {identity}\n")
    old, new = "pw-old-5e2b9d71c4", "pw-new-0a8c3f64d2"

    def password(value: str) -> None:
        payload = age.encrypt(value.encode(), to).decode().replace("\n", "\n      ")
        fleet.write(
            "hosts/rbhost.yaml",
            f"apps: [vault]\nvars:\n  vault:\n    password: !age |\n      {payload}\n",
        )

    fleet.write("templates/vault/default/etc/vault/db.conf.j2", "pw={{ vault.password }}\n")
    fleet.write(
        "scripts/post/vault/10-check",
        '#!/bin/sh\nconf="${RECONCILER_ROOT%/}/etc/vault/db.conf"\n'
        'echo "checking:"\ncat "$conf"\necho "value: $(cut -d= -f2 "$conf")"\n',
        executable=True,
    )
    host = make_host("rbhost")
    for change in (old, new):
        password(change)
        fleet.commit("vault: a password")
        proc = host.run("pull", "--format", "json", "--config", str(config))
        assert proc.returncode == 0, proc.stderr
    assert host.path("/etc/vault/db.conf").read_text() == f"pw={new}\n"

    proc = host.run("rollback", "--format", "json", "--config", str(config))
    assert proc.returncode == 0, proc.stderr
    assert host.path("/etc/vault/db.conf").read_text() == f"pw={old}\n"
    [check] = json.loads(proc.stdout)["scripts"]
    assert check["output_tail"] == "checking:\n<redacted>\nvalue: <redacted>"
    for text in (proc.stdout, proc.stderr, json.dumps(fleet.report("rbhost"))):
        assert old not in text and new not in text
