"""The agent's report branch against another writer (issue 11, item 13), on real bare
repositories in temp dirs: a tip dated in the future does not stop heartbeats;
a server branch that lost what this host pushed is noticed once, recorded,
continued from, and posted to the webhook."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from reconciler.config import ReportConfig
from reconciler.git import reports as git_reports
from reconciler.git.repo import open_bare, ref_target, set_ref, walk
from reconciler.git.reports import (
    LostReports,
    lost_reports_ref,
    notice_lost_reports,
    pushed_report_ref,
    remote_report_ref,
    report_parent,
    report_ref,
)
from reconciler.ops.fleet import FleetRow
from reconciler.pipeline.notify import send_webhook
from reconciler.pipeline.record import history_lost
from reconciler.report import Report, ReportSource, commit_report

A = "a" * 40
NOW = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def quiet_report() -> Report:
    """The same converged report, run after run: only the heartbeat makes it a commit."""
    return Report(
        node="web1",
        run_id="R",
        started_at="2026-11-30T10:00:00Z",
        finished_at="2026-11-30T10:00:01Z",
        source=ReportSource(url="git://h/fleet.git", branch="main", commit=A, fetched=True),
        applied_commit=A,
        mode="enforce",
        result="ok",
    )


def test_a_report_tip_dated_in_the_future_does_not_hold_heartbeats_back(tmp_path: Path):
    repo = open_bare(tmp_path / "repo.git", durable=False)
    report = quiet_report()
    first = commit_report(repo, report, {}, heartbeat_s=3600, now=NOW)
    assert first is not None
    assert commit_report(repo, report, {}, heartbeat_s=3600, now=NOW + HOUR / 2) is None
    assert commit_report(repo, report, {}, heartbeat_s=3600, now=NOW + 2 * HOUR) is not None

    # A tip ten years ahead: another writer's fast-forward, or this host's clock
    # before NTP set it right. It must not be the measure of the last report.
    tip = ref_target(repo, report_ref("web1"))
    parent = report_parent(repo, "web1")
    assert parent is not None and parent.report_json is not None
    future = int((NOW + dt.timedelta(days=3650)).timestamp())
    ahead = git_reports.commit_report(
        repo,
        "web1",
        report_json=parent.report_json,
        captures={},
        message="web1: ok",
        when=future,
        parent=tip,
    )

    beat = commit_report(repo, report, {}, heartbeat_s=3600, now=NOW + 3 * HOUR)
    assert beat is not None and list(walk(repo, beat))[1] == ahead
    # Dated by this host's clock: the next quiet run measures from it again.
    assert commit_report(repo, report, {}, heartbeat_s=3600, now=NOW + 3.5 * HOUR) is None
    # A small skew ahead (an NTP step) is still a fine measure.
    skewed = git_reports.commit_report(
        repo,
        "web1",
        report_json=json.dumps(report.to_json()).encode(),
        captures={},
        message="web1: ok",
        when=int((NOW + 4 * HOUR).timestamp()) + 60,
        parent=beat,
    )
    assert skewed
    assert commit_report(repo, report, {}, heartbeat_s=3600, now=NOW + 4 * HOUR) is None


def _commit(repo, n: int, parent: str | None) -> str:
    data = json.dumps({"node": "web1", "n": n}).encode()
    return git_reports.commit_report(
        repo, "web1", report_json=data, captures={}, message=f"r{n}", when=1_000 + n, parent=parent
    )


def _pushed(repo, tip: str) -> None:
    """What push_reports records after a push the server took."""
    set_ref(repo, remote_report_ref("web1"), tip)
    set_ref(repo, pushed_report_ref("web1"), tip)


def test_a_server_branch_that_lost_what_this_host_pushed_is_noticed_once_and_kept(
    tmp_path: Path,
):
    repo = open_bare(tmp_path / "repo.git", durable=True)
    first = _commit(repo, 1, None)
    second = _commit(repo, 2, first)
    _pushed(repo, second)
    assert notice_lost_reports(repo, "web1", now=5_000) is None
    # Another writer went on from what we pushed (a fast-forward): nothing is lost.
    onward = _commit(repo, 3, second)
    set_ref(repo, remote_report_ref("web1"), onward)
    assert notice_lost_reports(repo, "web1", now=5_000) is None

    # Force-pushed: the server's branch is a forged history without ours.
    forged = _commit(repo, 9, None)
    set_ref(repo, report_ref("web1"), second)
    set_ref(repo, remote_report_ref("web1"), forged)
    lost = notice_lost_reports(repo, "web1", now=6_000)
    assert lost == LostReports(pushed=second, server=forged, noticed_at=6_000)
    record = ref_target(repo, lost_reports_ref("web1"))
    assert record is not None and second in set(walk(repo, record))  # the erased history, kept
    # Noticed once: later runs find the same record, none is written again.
    assert notice_lost_reports(repo, "web1", now=7_000) == lost
    assert ref_target(repo, lost_reports_ref("web1")) == record
    # Not fought: the next report goes on the server's tip, ours not replayed.
    parent = report_parent(repo, "web1")
    assert parent is not None and parent.commit == forged
    after = _commit(repo, 4, forged)
    _pushed(repo, after)
    assert notice_lost_reports(repo, "web1", now=8_000) == lost  # still the latest on record

    # Reset behind what we pushed (an old copy restored): lost too, and both records kept.
    set_ref(repo, remote_report_ref("web1"), forged)
    again = notice_lost_reports(repo, "web1", now=9_000)
    assert again == LostReports(pushed=after, server=forged, noticed_at=9_000)
    kept = set(walk(repo, ref_target(repo, lost_reports_ref("web1")) or ""))
    assert {second, after, record} <= kept


def test_the_report_says_history_lost_for_one_heartbeat_and_its_commit_message_too(
    tmp_path: Path,
):
    repo = open_bare(tmp_path / "repo.git", durable=True)
    tip = _commit(repo, 1, None)
    _pushed(repo, tip)
    set_ref(repo, remote_report_ref("web1"), _commit(repo, 9, None))
    shown = history_lost(repo, "web1", now=NOW, heartbeat_s=3600)
    assert shown is not None and shown["pushed"] == tip
    assert shown["noticed_at"] == "2026-11-30T10:00:00Z"
    assert history_lost(repo, "web1", now=NOW + HOUR / 2, heartbeat_s=3600) == shown
    assert history_lost(repo, "web1", now=NOW + HOUR, heartbeat_s=3600) is None

    report = dataclasses.replace(quiet_report(), history_lost=shown)
    assert report.commit_message() == (
        f"web1: ok at aaaaaaa (0 changed, 0 drifted) — history lost: the server's "
        f"reports/web1 no longer holds {tip[:12]}"
    )
    assert Report.from_json(report.to_json()) == report
    assert report.significant() != quiet_report().significant()
    assert "history_lost" not in quiet_report().to_json()


def test_a_report_saying_history_lost_is_posted_to_the_webhook_whatever_notify_on():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append(json.loads(body))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        settings = ReportConfig(webhook=f"http://127.0.0.1:{server.server_port}/hook")
        assert send_webhook(settings, quiet_report()) is None and received == []  # ok: not news
        lost = {"pushed": A, "server": None, "noticed_at": "2026-11-30T10:00:00Z"}
        report = dataclasses.replace(quiet_report(), history_lost=lost)
        assert send_webhook(settings, report) is None
        assert [r["report"]["history_lost"] for r in received] == [lost]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_fleet_calls_a_report_dated_in_the_future_stale():
    """A forged finished_at years ahead must not keep a dead node looking fresh forever."""

    def row(finished_at: str) -> FleetRow:
        report = dataclasses.replace(quiet_report(), finished_at=finished_at)
        return FleetRow.of_report(
            report,
            node="web1",
            report_commit=A,
            behind=0,
            now=NOW,
            stale_after_s=3600,
            desired=None,
            defined=True,
        )

    assert not row("2026-11-30T09:59:00Z").stale
    assert not row("2026-11-30T10:01:00Z").stale  # a small skew between clocks
    assert row("2036-11-30T10:00:00Z").stale
    assert row("2026-11-30T08:00:00Z").stale
