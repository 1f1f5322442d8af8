"""A corrupt state repository heals: moved aside, re-cloned, queued reports carried over (issue 11).

The red team's findings, each reproduced on a real repository in a real
state directory, against a real origin (a bare repository reached by path):
a truncated loose object made libgit2 spin forever in the report commit of
every later run; objects missing under refs that still matched the server's
failed every run (the fetch was skipped); a report ref naming a missing
object failed every run after its changes were applied, and last-run.json
was never written again. Each run here must end without a traceback, reach
last-run.json, say what it did with the repository, and leave a repository
in which the next run is healthy; unpushed reports must reach the server.
Runs are in-process (``reconcile_once``), except the one that used to hang:
a subprocess with a timeout, so that a regression fails instead of hanging.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconciler.config import AgentConfig, ReportConfig
from reconciler.errors import CorruptCacheError
from reconciler.pipeline.run import RunOptions, RunOutcome, reconcile_once
from tests.conftest import git

NODE = "web1"
REPORTS = f"refs/heads/reports/{NODE}"


class Site:
    """An origin with one node and one app, and a host (root, state dir) that pulls from it."""

    def __init__(self, base: Path) -> None:
        self.work = base / "work"
        self.origin = base / "origin.git"
        self.root = base / "root"
        self.state = base / "state"
        self.root.mkdir(parents=True)
        files = {
            f"hosts/{NODE}.yaml": "apps: [motd]\n",
            "templates/motd/app.yaml": "files: {}\n",
            "templates/motd/default/etc/motd": "hello\n",
        }
        for rel, text in files.items():
            path = self.work / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        git("init", "-q", "-b", "main", cwd=self.work)
        git("add", "-A", cwd=self.work)
        git("commit", "-q", "-m", "fleet", cwd=self.work)
        git("init", "-q", "--bare", str(self.origin))
        git("push", "-q", str(self.origin), "HEAD:refs/heads/main", cwd=self.work)

    @property
    def repo(self) -> Path:
        return self.state / "repo.git"

    def config(self, url: str | None = None) -> AgentConfig:
        return AgentConfig(
            repo=url or str(self.origin),
            node=NODE,
            root=str(self.root),
            state_dir=str(self.state),
            report=ReportConfig(heartbeat=0.0),  # every run commits a report
        )

    def pull(self, url: str | None = None) -> RunOutcome:
        return reconcile_once(self.config(url))

    def last_run(self) -> dict:
        return json.loads((self.state / "last-run.json").read_text())

    def loose(self, commit: str, what: str) -> Path:
        """The loose file of ``what`` (``commit``, ``tree``, ``report``) of a local report commit."""
        ids = {
            "commit": commit,
            "tree": self.git_dir("rev-parse", f"{commit}^{{tree}}"),
            "report": self.git_dir("rev-parse", f"{commit}:report.json"),
        }
        oid = ids[what]
        path = self.repo / "objects" / oid[:2] / oid[2:]
        assert path.is_file(), f"{what} {oid} is not a loose object"
        return path

    def git_dir(self, *args: str) -> str:
        return git("--git-dir", str(self.repo), *args).strip()

    def server_run_ids(self) -> list[str]:
        """The run ids of the reports on the server's reports/<node>, newest first."""
        commits = git("--git-dir", str(self.origin), "rev-list", REPORTS).split()
        return [
            json.loads(git("--git-dir", str(self.origin), "show", f"{c}:report.json"))["run_id"]
            for c in commits
        ]

    def drift(self, text: str) -> None:
        (self.root / "etc/motd").write_text(text)


def truncate(path: Path) -> None:
    path.chmod(0o644)
    size = path.stat().st_size
    with path.open("r+b") as f:
        f.truncate(size // 2)


def moved_aside(site: Site) -> list[Path]:
    return sorted(site.state.glob("repo.git.corrupt-*"))


def assert_healed(site: Site, outcome: RunOutcome) -> dict:
    """The run rebuilt the repository, said so, and wrote last-run.json with it."""
    rebuilt = outcome.report.cache_rebuilt
    assert rebuilt is not None, outcome.report.errors
    assert [str(p) for p in moved_aside(site)] == [rebuilt["moved_to"]]
    last = site.last_run()
    assert last["run_id"] == outcome.report.run_id  # this run reached last-run.json
    assert last["cache_rebuilt"] == dict(rebuilt)
    return dict(rebuilt)


def assert_healthy(site: Site) -> None:
    """The next run finds nothing wrong: no rebuild, no error, the report pushed."""
    outcome = site.pull()
    assert outcome.report.cache_rebuilt is None
    assert outcome.report.errors == ()
    assert outcome.result in ("ok", "changed", "drift")
    assert outcome.pushed is True
    assert site.last_run()["run_id"] == outcome.report.run_id
    assert len(moved_aside(site)) == 1


@pytest.fixture
def site(tmp_path: Path) -> Site:
    site = Site(tmp_path)
    first = site.pull()
    assert first.result == "changed" and first.pushed is True, first.report.errors
    return site


@pytest.mark.parametrize("what", ["commit", "tree", "report"])
def test_a_truncated_loose_object_is_moved_aside_not_spun_on(site: Site, what: str):
    # libgit2 inflated a truncated loose object forever: the report commit of every
    # later run hung at 100 % CPU. A subprocess with a timeout: a regression fails.
    tip = site.git_dir("rev-parse", REPORTS)
    truncate(site.loose(tip, what))
    site.drift("changed by hand\n")
    env = {**os.environ, "RECONCILER_CONFIG": "/dev/null"}
    argv = [sys.executable, "-m", "reconciler", "pull", "--repo", str(site.origin)]
    argv += ["--node", NODE, "--root", str(site.root), "--state-dir", str(site.state)]
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the run hung on a truncated loose {what}")
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "cache repository was corrupt" in proc.stdout
    rebuilt = site.last_run()["cache_rebuilt"]
    assert "corrupt loose object: truncated" in rebuilt["problem"]
    assert str(site.repo / "objects") in rebuilt["problem"]  # names the file
    assert (site.root / "etc/motd").read_text() == "hello\n"  # the drift was repaired
    assert site.last_run()["pushed"] is True
    assert_healthy(site)


def test_missing_fetched_objects_are_fetched_again(site: Site):
    # The pack went missing while refs/remotes/origin/main still matched the server:
    # the fetch was skipped and every run failed with "fetch again".
    for pack in (site.repo / "objects/pack").iterdir():
        pack.unlink()
    site.drift("changed by hand\n")
    outcome = site.pull()
    rebuilt = assert_healed(site, outcome)
    assert "refs/remotes/origin/main" in rebuilt["problem"]
    assert outcome.report.errors == () and outcome.report.source.fetched
    assert (site.root / "etc/motd").read_text() == "hello\n"
    assert outcome.pushed is True
    assert_healthy(site)


def test_a_report_ref_naming_a_missing_object_is_healed(site: Site):
    # Files were applied, then the report commit failed (NotFoundError) and
    # last-run.json was never updated again.
    (site.repo / "refs/heads/reports" / NODE).write_text("12" * 20 + "\n")
    site.drift("changed by hand\n")
    outcome = site.pull()
    rebuilt = assert_healed(site, outcome)
    assert REPORTS in rebuilt["problem"]
    assert [c.path for c in outcome.report.changes if c.applied] == ["/etc/motd"]
    assert outcome.report_commit is not None and outcome.pushed is True
    assert site.server_run_ids()[0] == outcome.report.run_id
    assert_healthy(site)


def test_queued_reports_are_carried_over_and_an_unreadable_one_is_counted(site: Site):
    # Two runs while the server is away queue two report commits; then the newer
    # one's report.json goes missing (deleted, not truncated: a regression must fail
    # here, not spin in-process): the older one is still reachable through it and
    # must reach the server after the rebuild.
    away = str(site.origin) + ".away"
    os.rename(site.origin, away)
    queued = []
    for n in (1, 2):
        site.drift(f"drift {n}\n")
        outcome = site.pull()
        assert outcome.pushed is False and outcome.report_commit is not None
        queued.append(outcome.report)
    os.rename(away, site.origin)
    newest = site.git_dir("rev-parse", REPORTS)
    site.loose(newest, "report").unlink()
    outcome = site.pull()
    rebuilt = assert_healed(site, outcome)
    assert rebuilt["reports_carried"] == 1 and rebuilt["reports_lost"] == 1
    assert not rebuilt["older_reports_unread"]
    assert outcome.pushed is True
    # The readable queued report is on the server, under this run's report.
    assert site.server_run_ids()[:2] == [outcome.report.run_id, queued[0].run_id]
    # The unreadable one stays in the moved repository for the operator.
    moved = Path(rebuilt["moved_to"])
    assert (moved / "refs/heads/reports" / NODE).read_text().strip() == newest
    assert_healthy(site)


def test_an_object_found_corrupt_mid_run_fails_that_run_once(site: Site):
    # A damaged pack reads as an error (libgit2 does not loop on packs), found by the
    # inventory: the run fails before changing anything, says why without a
    # traceback, rebuilds the repository, and the next run applies.
    pack = next((site.repo / "objects/pack").glob("*.pack"))
    blob = site.git_dir("rev-parse", f"refs/remotes/origin/main:hosts/{NODE}.yaml")
    offsets = git("--git-dir", str(site.repo), "verify-pack", "-v", str(pack.with_suffix(".idx")))
    offset = next(int(line.split()[4]) for line in offsets.splitlines() if line.startswith(blob))
    pack.chmod(0o644)
    with pack.open("r+b") as f:
        f.seek(offset + 2)  # inside the zlib stream of the host file's blob
        f.write(b"\xff\x00\xff\x00\xff\x00")
    site.drift("changed by hand\n")  # no no-op short cut
    (site.state / "inventory-cache.json").unlink()  # the host file is read, not its cache
    outcome = site.pull()
    assert outcome.result == "failed"
    assert any(f"hosts/{NODE}.yaml: cannot be read" in e for e in outcome.report.errors)
    assert_healed(site, outcome)
    assert (site.root / "etc/motd").read_text() == "changed by hand\n"  # nothing applied
    assert_healthy(site)
    assert (site.root / "etc/motd").read_text() == "hello\n"


def test_a_dry_run_names_the_corrupt_repository_and_moves_nothing(site: Site):
    for pack in (site.repo / "objects/pack").iterdir():
        pack.unlink()
    with pytest.raises(CorruptCacheError) as caught:
        reconcile_once(site.config(), RunOptions(dry_run=True))
    assert str(site.repo) in str(caught.value) and "without --dry-run" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert moved_aside(site) == [] and site.repo.is_dir()


def test_a_rollback_rebuilds_a_corrupt_repository_and_says_so(site: Site):
    from reconciler.pipeline.rollback_run import rollback_once

    site.drift("changed by hand\n")
    assert site.pull().result == "drift"  # a run with a change to roll back
    for pack in (site.repo / "objects/pack").iterdir():
        pack.unlink()
    outcome = rollback_once(site.config(), None)
    assert_healed(site, outcome)
    assert outcome.report.rollback is not None and outcome.report_commit is not None
    assert (site.root / "etc/motd").read_text() == "changed by hand\n"  # rolled back
    again = site.pull()  # held back by the rollback, with a healthy repository
    assert again.report.cache_rebuilt is None and again.pushed is True
    assert len(moved_aside(site)) == 1
