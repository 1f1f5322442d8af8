"""A very large drifted file (issue 11, item 8): bounded captures, streamed hashing and backups.

The attack: an operator (or an intruder) leaves a 500 MB file where a managed
file was. Before this was bounded, each drift run added the whole file to the
report branch (500 MB more on the git server per drift, and in the host's own
repository) and held it in memory several times over (1.5 GB RSS). Here the
same attack at 64 MiB with the default ``report.max_capture`` (1 MiB): the
cost that must not grow with the file — repository growth, peak memory — is
measured on a real ``reconciler pull`` subprocess against a real git daemon.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import Fleet, Host, git
from tests.integration.test_operate_support import operator

BIG = 64 << 20  # 64 MiB: the asymptotic cost of 500 MB, at a CI-friendly size
MAX_CAPTURE = 1 << 20  # report.max_capture's default

# A fresh process whose only child is the pull: RUSAGE_CHILDREN's ru_maxrss (KiB)
# is then the pull's own peak RSS, not that of some earlier child of pytest.
_MEASURE = """\
import resource, subprocess, sys
proc = subprocess.run(sys.argv[2:])
with open(sys.argv[1], "w") as fh:
    fh.write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024))
sys.exit(proc.returncode)
"""


def measured(host: Host, tmp_path: Path, command: str) -> tuple[int, dict, str]:
    """``reconciler COMMAND --format json`` as a subprocess: (peak RSS in bytes, its JSON,
    stderr)."""
    rss_file = tmp_path / "rss"
    argv = [sys.executable, "-m", "reconciler", command, *host.flags(command), "--format", "json"]
    env = {**os.environ, "RECONCILER_CONFIG": "/dev/null"}
    proc = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(rss_file), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr, proc.stdout[-2000:])
    return int(rss_file.read_text()), json.loads(proc.stdout), proc.stderr


def objects_size(repo: Path) -> int:
    """Bytes under ``repo``'s objects/ (loose objects and packs)."""
    return sum(p.stat().st_size for p in (repo / "objects").rglob("*") if p.is_file())


def write_random(path: Path, size: int) -> str:
    """Fill ``path`` with ``size`` incompressible bytes, 1 MiB at a time; their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        for _ in range(size // (1 << 20)):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            fh.write(chunk)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def test_a_huge_drifted_file_is_recorded_by_size_and_hash_backed_up_and_bounded(
    fleet: Fleet, make_host, tmp_path: Path
) -> None:
    host = make_host("web1")
    baseline, _, _ = measured(host, tmp_path, "pull")  # converges: renders every template
    local_repo = host.state_dir / "repo.git"
    server_before, local_before = objects_size(fleet.bare), objects_size(local_repo)
    motd = host.path("/etc/motd")
    found = write_random(motd, BIG)

    # reconciler diff: sizes and hashes, neither side loaded.
    diff_rss, shown, _ = measured(host, tmp_path, "diff")
    assert (
        "--- a/etc/motd\n+++ b/etc/motd\nbinary or large file: sizes and hashes: "
        f"{BIG} bytes sha256 {found} → "
    ) in shown["diff"]
    assert diff_rss < baseline + BIG // 2, (diff_rss, baseline)

    rss, report, stderr = measured(host, tmp_path, "pull")

    server_growth = objects_size(fleet.bare) - server_before
    local_growth = objects_size(local_repo) - local_before
    numbers = (
        f"peak RSS {rss >> 20} MiB (converging run {baseline >> 20} MiB); "
        f"growth: server {server_growth} B, local {local_growth} B"
    )
    print(numbers)
    assert {"path": "/etc/motd", "kind": "content"} in report["drift"]
    # The cost that must not grow with the file: memory and both repositories.
    assert rss < baseline + BIG // 2, numbers
    assert server_growth < MAX_CAPTURE, numbers
    assert local_growth < MAX_CAPTURE, numbers
    # Recorded by size and sha256 only, and the report says so.
    (entry,) = [u for u in report["uncaptured"] if u["path"] == "/etc/motd"]
    assert (entry["size"], entry["sha256"], entry["max_capture"]) == (BIG, found, MAX_CAPTURE)
    assert entry["note"] == (
        f"not captured: {BIG} bytes > report.max_capture 1 MiB, sha256 {found}"
    )
    tree = git("ls-tree", "-r", "-l", "reports/web1", cwd=fleet.bare).splitlines()
    sizes = {line.split("\t")[1]: int(line.split()[3]) for line in tree}
    assert "drift/etc/motd" not in sizes
    assert max(sizes.values()) <= MAX_CAPTURE, sizes
    assert fleet.report("web1")["uncaptured"] == report["uncaptured"]
    # The backup streamed: byte for byte what was found; the file repaired.
    (backup,) = host.state_dir.glob("backups/*/files/etc/motd")
    assert backup.stat().st_size == BIG
    assert file_sha256(backup) == found
    assert motd.stat().st_size < MAX_CAPTURE
    assert "Traceback" not in stderr

    # The operators' side: show says why there is no diff of content; adopt refuses.
    op = operator(fleet, tmp_path / "cache")
    show = op("show", "web1")
    assert show.code == 0, show.err
    assert f"not captured: {BIG} bytes > report.max_capture 1 MiB, sha256 {found}" in show.out
    assert "binary or large file: sizes and hashes: " in show.out
    adopt = op("adopt", "web1", "/etc/motd", "--no-push")
    assert adopt.code == 2, (adopt.out, adopt.err)
    (line,) = adopt.err.splitlines()
    assert "reports/web1: /etc/motd: cannot adopt an uncaptured file" in line
    assert "copy the file from web1 into the desired state by hand" in line

    # Rolling the repair back restores the huge file from its backup, streamed.
    rollback_rss, rolled, _ = measured(host, tmp_path, "rollback")
    assert rolled["result"] == "changed", rolled["errors"]
    assert file_sha256(motd) == found
    print(f"peak RSS: diff {diff_rss >> 20} MiB, rollback {rollback_rss >> 20} MiB")
    assert rollback_rss < baseline + BIG // 2, (rollback_rss, baseline)
