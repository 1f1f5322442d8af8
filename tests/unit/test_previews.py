"""Previews of the SPEC §9 kinds where no host disk is at hand: ``impact`` (a real git
repository, the CLI in-process) and the fleet page (rendered from reports' changes)."""

from __future__ import annotations

import io
import json
import os
import subprocess
from pathlib import Path

from reconciler.cli.main import main
from reconciler.ops.fleet import FleetRow
from reconciler.ops.page import MAX_CHANGES_SHOWN, fleet_page
from reconciler.report import ReportChange


def _run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--config", "/dev/null"], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


def _commit(root: Path, message: str) -> None:
    for args in (("add", "-A"), ("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm")):
        subprocess.run(
            ["git", *args, *([message] if "commit" in args else [])],
            cwd=root,
            check=True,
            capture_output=True,
        )


def test_impact_shows_links_as_link_to_target_and_absent_patterns_gained_or_lost(tmp_path):
    root = tmp_path / "repo"
    sites = root / "templates/nginx/default/etc/nginx"
    (sites / "sites-enabled").mkdir(parents=True)
    (sites / "sites-available").mkdir()
    (sites / "sites-available/a").write_text("server a\n")
    os.symlink("../sites-available/a", sites / "sites-enabled/a")
    (root / "hosts").mkdir()
    (root / "hosts/web1.yaml").write_text("apps: [nginx]\nabsent: [/etc/motd.dpkg-dist]\n")
    (root / "hosts/db1.yaml").write_text("apps: []\n")
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=root, check=True)
    _commit(root, "old")
    (sites / "sites-enabled/a").unlink()
    os.symlink("../sites-available/b", sites / "sites-enabled/a")  # retargeted
    os.symlink("../sites-available/a", sites / "sites-enabled/c")  # created
    (root / "templates/nginx/app.yaml").write_text("absent: [/etc/nginx/sites-enabled/default]\n")
    (root / "hosts/web1.yaml").write_text("apps: [nginx]\n")
    _commit(root, "new")

    code, out, err = _run("impact", "--repo", str(root))
    assert code == 0, err
    assert "web1: 1 added, 1 changed, 2 absent pattern(s)\n" in out, out
    assert "  + /etc/nginx/sites-enabled/c\n" in out
    assert "-link → ../sites-available/a\n+link → ../sites-available/b\n" in out, out
    assert "  absent: /etc/nginx/sites-enabled/default (new; templates/nginx/app.yaml)\n" in out, (
        out
    )
    assert "  absent: /etc/motd.dpkg-dist (dropped; hosts/web1.yaml)\n" in out, out
    assert "unchanged: db1\n" in out

    code, out, err = _run("impact", "--repo", str(root), "--format", "json")
    assert code == 0, err
    (node,) = json.loads(out)["nodes"]
    assert node["absent"] == [
        {
            "pattern": "/etc/nginx/sites-enabled/default",
            "change": "new",
            "origin": "templates/nginx/app.yaml",
        },
        {"pattern": "/etc/motd.dpkg-dist", "change": "dropped", "origin": "hosts/web1.yaml"},
    ]

    # Only a pattern changes: the node is impacted all the same.
    (root / "hosts/web1.yaml").write_text("apps: [nginx]\nabsent: [/etc/x.dpkg-old]\n")
    _commit(root, "absent only")
    code, out, err = _run("impact", "--repo", str(root), "--stat")
    assert code == 0, err
    assert "web1: 1 absent pattern(s)\n" in out, out


def _row(node: str, changed: int) -> FleetRow:
    return FleetRow(
        node=node,
        result="changed",
        last_run="2026-11-30T12:00:00Z",
        age_s=60,
        commit="0" * 40,
        behind=0,
        changed=changed,
        drifted=0,
        stale=False,
        suspended=None,
    )


def test_the_page_lists_each_nodes_last_changes_with_deletes_and_links_readable():
    changes = [
        ReportChange(
            path="/etc/nginx/sites-enabled/default",
            action="delete",
            reason="desired",
            applied=True,
            app="(node)",
            detail="absent: /etc/nginx/sites-enabled/*",
        ),
        ReportChange(
            path="/etc/nginx/sites-enabled/a",
            action="create",
            reason="desired",
            applied=True,
            app="nginx",
            detail="link → ../sites-available/a",
        ),
        ReportChange(path="/etc/motd", action="update", reason="drift", applied=False, app="motd"),
    ]
    many = [
        ReportChange(path=f"/srv/f{i}", action="create", reason="desired", applied=True, app="a")
        for i in range(MAX_CHANGES_SHOWN + 7)
    ]
    page = fleet_page(
        [_row("web1", 3), _row("db1", len(many)), _row("idle", 0)],
        meta_nodes={},
        drift={},
        title="Fleet",
        subtitle="",
        changes={"web1": changes, "db1": many},
    )
    assert "<h2>Last changes, per node</h2>" in page
    assert '<a href="#changes-web1">changes</a>' in page
    assert "changes-idle" not in page
    assert (
        "<li><code>/etc/nginx/sites-enabled/default</code> <strong>delete</strong> (desired) · "
        "(node) — <code>absent: /etc/nginx/sites-enabled/*</code></li>"
    ) in page, page
    assert (
        "<li><code>/etc/nginx/sites-enabled/a</code> <strong>create</strong> (desired) · nginx"
        " — <code>link → ../sites-available/a</code></li>"
    ) in page
    assert "<code>/etc/motd</code> <strong>update</strong> (drift, not applied) · motd</li>" in page
    assert f"<code>/srv/f{MAX_CHANGES_SHOWN - 1}</code>" in page
    assert f"<code>/srv/f{MAX_CHANGES_SHOWN}</code>" not in page
    assert "… and 7 more: reconciler show db1" in page
