"""Managed blocks end to end (SPEC §9): a real git daemon, real pulls, real files.

A block (metadata ``block:``) is the only part of a file reconciler owns: the
first run appends it to the host's file (or creates the file), the next run
leaves the file alone (same inode and mtime), an edit outside the block is
not drift and is never written over, an edit inside is drift of kind
``content``, captured as the block found and repaired; ``diff`` and
``--dry-run`` show the block's diff and change nothing; a block that leaves
the target state is removed from the file, which stays; ``rollback`` puts the
old file back; bad input is one line, exit 1, nothing changed; and a run
stopped after any effect leaves the file wholly old or new.
"""

from __future__ import annotations

import os
import time

import pytest

from tests.conftest import Fleet, Host, git
from tests.integration._helpers import (
    assert_clean_error,
    changes,
    drift_kinds,
    file_changes,
    imported_by_run,
    pull_report,
    sweep_stopped_runs,
)

NODE = "blk"
HOSTS = "/etc/hosts"
PACKAGE = b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n"


def _node(hosts: str = "[web1, web2]", apps: str = "[net]", files: str = "") -> str:
    return f"apps: {apps}\nvars:\n  fleet_hosts: {hosts}\n" + (f"files:\n{files}" if files else "")


@pytest.fixture
def host(fleet: Fleet, make_host) -> Host:
    fleet.write(f"hosts/{NODE}.yaml", _node())
    fleet.write("templates/net/app.yaml", "files:\n  /etc/hosts: {block: true}\n")
    fleet.write(
        "templates/net/default/etc/hosts.j2",
        "{% for h in fleet_hosts %}10.0.0.{{ loop.index }}\t{{ h }}\n{% endfor %}",
    )
    fleet.commit("net: the fleet's hosts as a managed block of /etc/hosts")
    h = make_host(NODE)
    h.path(HOSTS).parent.mkdir(parents=True, exist_ok=True)
    h.path(HOSTS).write_bytes(PACKAGE)
    os.chmod(h.path(HOSTS), 0o640)
    return h


BLOCK = b"# BEGIN reconciler net\n10.0.0.1\tweb1\n10.0.0.2\tweb2\n# END reconciler net\n"


def test_a_block_is_appended_left_alone_repaired_removed_and_rolled_back(fleet, host):
    hosts = host.path(HOSTS)
    first = pull_report(host)
    assert hosts.read_bytes() == PACKAGE + BLOCK
    assert os.stat(hosts).st_mode & 0o7777 == 0o640  # the host's mode kept
    assert changes(first)[HOSTS]["action"] == "update"
    before = os.stat(hosts)

    second = pull_report(host)
    assert file_changes(second) == [] and second["drift"] == []
    after = os.stat(hosts)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)

    # An edit outside the block (another tool adds a line, drops the final newline
    # of its own text): not drift, never written over.
    edited = b"192.168.1.9\tprinter\n" + PACKAGE + BLOCK + b"# local note"
    hosts.write_bytes(edited)
    time.sleep(0.2)  # past the racily-clean window (state.RACY_WINDOW_NS) of the record
    outside = os.stat(hosts)
    third = pull_report(host)
    assert file_changes(third) == [] and third["drift"] == [], third
    assert hosts.read_bytes() == edited
    assert os.stat(hosts).st_ino == outside.st_ino
    # That run recorded the new stat signature: the next one is the no-op short
    # cut again (nothing loaded, nothing rendered: SPEC §7).
    imported = imported_by_run(host, "pull")
    assert "reconciler.pipeline.render" not in imported, "not the no-op short cut"

    # An edit inside: drift of kind content, captured as the block found, repaired,
    # and the text outside kept byte for byte.
    hosts.write_bytes(edited.replace(b"10.0.0.2\tweb2", b"6.6.6.6\tweb2"))
    diff = host.run("diff")
    assert "-6.6.6.6\tweb2" in diff.stdout and "+10.0.0.2\tweb2" in diff.stdout, diff
    assert "printer" not in diff.stdout and "localhost" not in diff.stdout, diff.stdout
    dry = host.pull("--dry-run")
    assert dry.returncode == 0 and HOSTS in dry.stdout and "reconciler net" in dry.stdout, dry
    assert b"6.6.6.6" in hosts.read_bytes()  # the dry run changed nothing
    repaired = pull_report(host)
    assert drift_kinds(repaired) == {HOSTS: {"content"}}, repaired
    assert hosts.read_bytes() == edited
    captured = fleet.report_blob(NODE, "drift/etc/hosts")
    assert captured == BLOCK.replace(b"10.0.0.2\tweb2", b"6.6.6.6\tweb2")

    # Markers broken on the host (a second BEGIN): refused, not guessed at.
    hosts.write_bytes(b"# BEGIN reconciler net\n" + edited)
    code, broken = host.pull_json()
    assert code == 1 and any("BEGIN" in e and HOSTS in e for e in broken["errors"]), broken
    assert hosts.read_bytes() == b"# BEGIN reconciler net\n" + edited
    hosts.write_bytes(edited)

    # A desired change, then its rollback: the old file comes back whole.
    fleet.write(f"hosts/{NODE}.yaml", _node("[web1, web2, web3]"))
    fleet.commit("blk: web3")
    changed = pull_report(host)
    assert b"10.0.0.3\tweb3\n# END" in hosts.read_bytes(), changed
    rolled = host.run("rollback", "--format", "json")
    assert rolled.returncode == 0, rolled.stderr
    assert hosts.read_bytes() == edited

    # The block leaves the target state: its region is removed, the file stays.
    fleet.write(f"hosts/{NODE}.yaml", _node(apps="[]"))
    fleet.commit("blk: no net app")
    gone = pull_report(host, "--release-hold")
    assert HOSTS in {c["path"] for c in gone["changes"]}, gone
    assert hosts.read_bytes() == b"192.168.1.9\tprinter\n" + PACKAGE + b"# local note"
    assert file_changes(pull_report(host)) == []


def test_a_missing_file_is_created_holding_the_block_and_two_apps_share_a_file(fleet, make_host):
    fleet.write(
        f"hosts/{NODE}.yaml",
        _node(apps="[net, extra]", files='  /etc/hosts: {mode: "0644"}\n'),
    )
    fleet.write("templates/net/app.yaml", "files:\n  /etc/hosts: {block: true}\n")
    fleet.write(
        "templates/net/default/etc/hosts.j2",
        "{% for h in fleet_hosts %}10.0.0.{{ loop.index }}\t{{ h }}\n{% endfor %}",
    )
    fleet.write(
        "templates/extra/app.yaml",
        'files:\n  /etc/hosts: {block: {marker: "## {mark} extra hosts"}}\n',
    )
    fleet.write("templates/extra/default/etc/hosts", "10.9.9.9\tbackup")
    fleet.commit("two apps, two blocks of /etc/hosts")
    h = make_host(NODE)
    pull_report(h)
    text = h.path(HOSTS).read_bytes()
    assert text == BLOCK + b"## BEGIN extra hosts\n10.9.9.9\tbackup\n## END extra hosts\n"
    assert os.stat(h.path(HOSTS)).st_mode & 0o7777 == 0o644
    assert file_changes(pull_report(h)) == []

    # One app leaves: only its block goes.
    fleet.write(f"hosts/{NODE}.yaml", _node(apps="[net]"))
    fleet.commit("no extra")
    pull_report(h)
    assert h.path(HOSTS).read_bytes() == BLOCK

    # The same marker in two apps: one line naming both apps, nothing changed.
    fleet.write(f"hosts/{NODE}.yaml", _node(apps="[net, extra]"))
    fleet.write(
        "templates/extra/app.yaml",
        'files:\n  /etc/hosts: {block: {marker: "# {mark} reconciler net"}}\n',
    )
    fleet.commit("extra: net marker")
    proc = h.pull()
    assert proc.returncode == 1, proc
    lines = assert_clean_error(proc.stderr, "'net'", "'extra'", f"node {NODE}")
    assert len(lines) == 1, lines
    assert h.path(HOSTS).read_bytes() == BLOCK


def test_bad_block_input_is_one_line_exit_1_and_changes_nothing(fleet, host):
    pull_report(host)
    bad = [
        ('{block: {marker: "# {mark}\\n x"}}', "x\n", "not a single line"),
        ('{block: {marker: "# managed"}}', "x\n", "{mark}"),
        ("{block: true}", "a\n# END reconciler net\n", "marker line"),
        ("{block: true}", None, "symlink"),
    ]
    for meta, template, named in bad:
        fleet.write("templates/net/app.yaml", f"files:\n  /etc/hosts: {meta}\n")
        source = fleet.work / "templates/net/default/etc/hosts.j2"
        source.unlink()
        if template is None:
            (fleet.work / "templates/net/default/etc/hosts").symlink_to("hosts.real")
        else:
            source.write_text(template)
        fleet.commit(f"a bad block: {named}")
        proc = host.pull()
        assert proc.returncode == 1, proc
        lines = assert_clean_error(proc.stderr, f"node {NODE}")
        assert len(lines) == 1 and named in lines[0], lines
        assert host.path(HOSTS).read_bytes() == PACKAGE + BLOCK
        if template is None:
            (fleet.work / "templates/net/default/etc/hosts").unlink()
            source.write_text("x\n")


# A run stopped by FaultInjected abandons its open journal log as a killed process would.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_run_stopped_after_any_effect_leaves_the_block_file_old_or_new(fleet, host, tmp_path):
    """Every effect of a run that edits a block is a point where it may die: each
    file is then wholly old or new; the next run converges, says it recovered, and
    the one after finds nothing to do."""
    old_commit = fleet.head()
    git("push", "-q", "-f", "origin", f"{old_commit}:refs/heads/main", cwd=fleet.work)
    pull_report(host)
    fleet.write(f"hosts/{NODE}.yaml", _node("[web1, db1]"))
    new_commit = fleet.commit("blk: db1 instead of web2")
    old = PACKAGE + BLOCK
    new = PACKAGE + BLOCK.replace(b"web2", b"db1")
    assert host.path(HOSTS).read_bytes() == old
    git("push", "-q", "-f", "origin", f"{new_commit}:refs/heads/main", cwd=fleet.work)
    stopped = sweep_stopped_runs(host, tmp_path, range(40), old={HOSTS: old}, new={HOSTS: new})
    assert len(stopped) >= 3, stopped


def test_a_line_added_to_the_file_after_planning_is_kept_by_the_block_write(fleet, host):
    """The file is spliced again when it is written, not only when the run is
    planned: a line another writer adds in between (here the app's own pre script,
    which runs after planning and before the app's files) stays in the file, beside
    the block, instead of being overwritten with the planned bytes."""
    fleet.write(
        "scripts/pre/net/10-add-host",
        '#!/bin/sh\nprintf "10.9.9.9\\tadded-by-pre\\n" >> "$RECONCILER_ROOT/etc/hosts"\n',
        executable=True,
    )
    fleet.commit("net: a pre script that adds a host line")
    report = pull_report(host)
    assert HOSTS in {c["path"] for c in report["changes"]}
    assert host.path(HOSTS).read_bytes() == PACKAGE + b"10.9.9.9\tadded-by-pre\n" + BLOCK
    assert report["errors"] == []
    assert [c for c in pull_report(host)["changes"] if c["path"] == HOSTS] == []
