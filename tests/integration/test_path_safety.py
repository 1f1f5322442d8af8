"""Path safety (SPEC §4 "nothing is ever written outside root", §6 Symlinks): symlinks,
directories and FIFOs planted under the root never carry a write elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from tests.conftest import tree_snapshot
from tests.integration._agent import run
from tests.integration._helpers import changes, drift_kinds, pull_report

NGINX_PATHS = ("/etc/nginx/nginx.conf", "/etc/nginx/conf.d/default.conf")


def outside_dir(path: Path) -> Path:
    """A directory outside the root holding an operator's own files."""
    (path / "conf.d").mkdir(parents=True)
    (path / "nginx.conf").write_text("operator's own nginx.conf\n")
    (path / "conf.d" / "keep.conf").write_text("# keep me\n")
    (path / "conf.d" / "keep.conf").chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("link", "when"),
    [("absolute", "before the first run"), ("relative", "after a converged run")],
)
def test_a_parent_symlinked_outside_the_root_is_refused_and_nothing_is_written_there(
    make_host, tmp_path, link, when
):
    host = make_host("web2")
    if link == "absolute":
        outside = outside_dir(tmp_path / "outside-dir")
        target = str(outside)
    else:  # <root>/etc/nginx -> ../../outside, i.e. <root>/../outside
        outside = outside_dir(host.root.parent / "outside")
        target = "../../outside"
    if when == "after a converged run":
        pull_report(host)
        shutil.rmtree(host.path("/etc/nginx"))
    host.path("/etc").mkdir(exist_ok=True)
    host.path("/etc/nginx").symlink_to(target)
    assert host.path("/etc/nginx/nginx.conf").resolve() == outside / "nginx.conf"
    before = tree_snapshot(outside)

    for _ in range(2):  # and the next run too
        proc = host.run("pull", "--format", "json")

        assert proc.returncode == 1, proc.stderr
        assert tree_snapshot(outside) == before
        assert host.path("/etc/nginx").is_symlink()
        for path in NGINX_PATHS:
            lines = [line for line in proc.stderr.splitlines() if path in line]
            assert lines, f"{path} not named on stderr: {proc.stderr}"
            assert "outside the root" in lines[0], lines[0]
    # The other apps still converge.
    assert host.path("/etc/motd").is_file()
    assert host.path("/var/www/html/index.html").is_file()


def converged(make_host, node: str = "web2"):
    host = make_host(node)
    pull_report(host)
    return host


def test_a_destination_symlinked_to_a_file_outside_is_type_drift_replaced_in_enforce_only(
    make_host, tmp_path
):
    host = converged(make_host)
    good = host.path("/etc/motd").read_bytes()
    outside = tmp_path / "precious"
    outside.write_text("precious, not reconciler's\n")
    outside.chmod(0o600)
    host.path("/etc/motd").unlink()
    host.path("/etc/motd").symlink_to(outside)

    audit = pull_report(host, "--mode", "audit")

    assert drift_kinds(audit)["/etc/motd"] == {"type"}
    assert changes(audit)["/etc/motd"]["applied"] is False
    assert os.readlink(host.path("/etc/motd")) == str(outside)
    assert outside.read_text() == "precious, not reconciler's\n"

    enforce = pull_report(host)

    assert drift_kinds(enforce)["/etc/motd"] == {"type"}
    assert changes(enforce)["/etc/motd"]["applied"] is True
    assert not host.path("/etc/motd").is_symlink()
    assert host.path("/etc/motd").read_bytes() == good
    assert outside.read_text() == "precious, not reconciler's\n"
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600
    assert pull_report(host)["result"] == "ok"


def test_a_directory_where_a_file_belongs_is_replaced_and_kept_in_the_backups(make_host):
    host = converged(make_host)
    good = host.path("/etc/motd").read_bytes()
    host.path("/etc/motd").unlink()
    planted = host.path("/etc/motd")
    (planted / "sub").mkdir(parents=True)
    (planted / "notes.txt").write_text("someone's notes\n")
    (planted / "sub" / "deeper.bin").write_bytes(bytes(range(256)))
    before = tree_snapshot(planted)

    report = pull_report(host)

    assert drift_kinds(report)["/etc/motd"] == {"type"}
    assert changes(report)["/etc/motd"]["applied"] is True
    assert host.path("/etc/motd").is_file()
    assert host.path("/etc/motd").read_bytes() == good
    kept = host.state_dir / "backups" / report["run_id"] / "files" / "etc" / "motd"
    assert kept.is_dir(), sorted(os.listdir(kept.parent))
    assert tree_snapshot(kept) == before
    assert pull_report(host)["result"] == "ok"


def test_a_fifo_at_a_destination_is_replaced_without_hanging(make_host):
    host = converged(make_host)
    good = host.path("/etc/motd").read_bytes()
    host.path("/etc/motd").unlink()
    os.mkfifo(host.path("/etc/motd"))

    proc = run(host, "pull", "--format", "json", timeout=30)

    assert proc.returncode == 0, proc.stderr
    assert drift_kinds(json.loads(proc.stdout))["/etc/motd"] == {"type"}
    assert host.path("/etc/motd").is_file()
    assert host.path("/etc/motd").read_bytes() == good
    assert pull_report(host)["result"] == "ok"


def test_a_fifo_at_the_exclude_file_fails_the_run_naming_it_without_hanging(make_host):
    """Issue 11: a FIFO put at the exclude file held the run at its first open, for
    ever. It is refused at once; the run changes nothing (it cannot know what the
    file protects) and says which file and what to do."""
    host = make_host("db1")
    os.mkfifo(host.exclude_file)

    proc = run(host, "pull", timeout=30)  # a regression times out rather than hangs

    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"reconciler: {host.exclude_file}: cannot read the exclude file: not a regular file but a FIFO"
        " — make it a regular file, one pattern a line, or remove it"
    )
    assert tree_snapshot(host.root) == {}
