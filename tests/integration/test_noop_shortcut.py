"""The no-op short cut (SPEC §7) must never hide a change it skips looking at.

A run skips load, render and hashing when the commit and inputs equal the
last clean run and no managed file's stat signature moved. These tests
change exactly one of the things the short cut must notice; the last one
checks that the short cut also skips the imports (Jinja2, jsonschema,
pathspec, the age binding pyrage) of the stages it skips.
"""

from __future__ import annotations

import json
import os
import time

from tests.integration._helpers import changes, drift_kinds, imported_by_run, pull_report

# What a no-op run must not pay for (docs/field-notes.md: Jinja2 alone is most of a cold
# start): they are imported lazily, by the stages a no-op run skips.
# pyrage: a run that meets no encrypted content never loads the age binding (SPEC §8).
HEAVY = ("jinja2", "jsonschema", "pathspec", "pyrage")
# Stages a no-op run skips, imported by the stages that need them (SPEC §7: every
# module a run imports is paid for in a no-op's start-up).
SKIPPED_STAGES = (
    "reconciler.pipeline.journal",
    "reconciler.pipeline.rollback",
    "reconciler.pipeline.capture",
    "reconciler.pipeline.apply",
    "reconciler.pipeline.plan",
    "reconciler.pipeline.render",
    "reconciler.pipeline.inventory",
)


def _converged(make_host, node="web1"):
    host = make_host(node)
    pull_report(host)
    pull_report(host)  # settled: records taken well after the writes
    return host


def test_an_edit_of_the_same_size_right_after_a_run_is_still_drift(make_host):
    host = _converged(make_host)
    motd = host.path("/etc/motd")
    original = motd.read_bytes()
    pull_report(host)
    # Same size, same mtime (restored): only the content and ctime differ.
    st = motd.stat()
    edited = bytes(b ^ 0x20 if chr(b).isalpha() else b for b in original)
    motd.write_bytes(edited)
    os.utime(motd, ns=(st.st_atime_ns, st.st_mtime_ns))

    report = pull_report(host)

    assert drift_kinds(report) == {"/etc/motd": {"content"}}
    assert motd.read_bytes() == original


def test_the_first_run_after_an_apply_hashes_what_it_wrote_and_renders_nothing(make_host):
    """The apply's records are racily clean: the next run hashes those files once
    (git's racily clean index entries) instead of rendering and scanning the node,
    then settles them (issue 19: "settle" cost 2.5 x a no-op at 2,000 files)."""
    # db1: a managed block (/etc/hosts) among its files, and no absent: or purge:
    # (their watches, taken right after the apply, are looked at again in full).
    host = make_host("db1")
    pull_report(host)  # the apply: it records what it just wrote
    # As recorded within the clock tick of each write (on a loaded machine the
    # apply may record some a little later): every record racily clean.
    path = host.state_dir / "state.json"
    state = json.loads(path.read_text())
    for record in state["managed"].values():
        record["recorded_ns"] = record["ctime_ns"]
    path.write_text(json.dumps(state))
    time.sleep(0.15)  # past state.RACY_WINDOW_NS

    imported = imported_by_run(host, "pull")

    assert "reconciler.pipeline.render" not in imported, "not the no-op short cut"
    state = json.loads(path.read_text())
    assert all(r["recorded_ns"] - r["ctime_ns"] > 100_000_000 for r in state["managed"].values())
    assert pull_report(host)["changes"] == []


def test_a_changed_host_exclude_file_is_honoured_on_an_otherwise_idle_host(make_host):
    host = _converged(make_host)
    host.exclude_file.write_text("/etc/issue.net\n")

    report = pull_report(host)

    assert "/etc/issue.net" in report["excluded"]
    host.path("/etc/issue.net").write_text("local banner\n")
    report = pull_report(host)
    assert "/etc/issue.net" not in changes(report)
    assert host.path("/etc/issue.net").read_text() == "local banner\n"


def test_a_removed_managed_file_is_noticed(make_host):
    host = _converged(make_host)
    host.path("/etc/issue.net").unlink()

    report = pull_report(host)

    assert drift_kinds(report) == {"/etc/issue.net": {"missing"}}
    assert host.path("/etc/issue.net").exists()


def test_post_always_scripts_run_on_every_run(fleet, make_host, tmp_path):
    log = tmp_path / "post.log"
    fleet.write(
        "templates/motd/app.yaml",
        fleet.read("templates/motd/app.yaml") + "scripts:\n  post_always: true\n",
    )
    fleet.write(
        "scripts/post/motd/50-log",
        f'#!/bin/sh\necho "$RECONCILER_RUN_ID" >> {log}\n',
        executable=True,
    )
    fleet.commit("motd: post scripts always")
    host = make_host("web1")
    for _ in range(3):
        pull_report(host)

    assert len(log.read_text().split()) == 3


def test_a_no_op_run_imports_no_jinja2_jsonschema_or_pathspec(make_host):
    host = _converged(make_host)
    imported = imported_by_run(host, "pull")
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert heavy == [], f"a no-op run imported {heavy}"
    stages = sorted(m for m in imported if m in SKIPPED_STAGES)
    assert stages == [], f"a no-op run imported the stages it skips: {stages}"
