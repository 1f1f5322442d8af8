"""Prune (SPEC §4 step 5–6, §6): a path gone from the target is deleted, backed up, dirs tidied."""

from __future__ import annotations

from tests.integration._helpers import file_changes, mode_of, pull_report

PG = "/etc/postgresql/15/main"


def test_removed_app_is_deleted_with_backups_and_its_created_dirs_pruned(fleet, make_host):
    host = make_host("db1")
    # /etc/postgresql exists before reconciler: it must survive the prune.
    host.path("/etc/postgresql").mkdir(parents=True)
    assert host.pull().returncode == 0
    hba = host.path(f"{PG}/pg_hba.conf").read_bytes()
    conf = host.path(f"{PG}/postgresql.conf").read_bytes()
    fleet.write(
        "hosts/db1.yaml",
        fleet.read("hosts/db1.yaml").replace("apps:\n  - postgresql\n", "apps: []\n"),
    )
    fleet.commit("db1: postgresql moves to db2")

    report = pull_report(host)

    # Its packages stay (an app leaving a node removes none: state: absent does).
    by_path = {c["path"]: c for c in file_changes(report, defaults_only=True)}
    # /etc/motd lists the node's apps, so it is updated too.
    assert set(by_path) == {f"{PG}/pg_hba.conf", f"{PG}/postgresql.conf", "/etc/motd"}
    assert "apps:   motd, chrony, sshd, fleet-hosts\n" in host.path("/etc/motd").read_text()
    for change in (by_path[f"{PG}/pg_hba.conf"], by_path[f"{PG}/postgresql.conf"]):
        assert (change["action"], change["reason"], change["applied"]) == (
            "delete",
            "desired",
            True,
        )
    assert not host.path(f"{PG}/pg_hba.conf").exists()
    assert not host.path("/etc/postgresql/15").exists()  # created by reconciler, now empty
    assert host.path("/etc/postgresql").is_dir()  # was there before: kept

    backups = host.state_dir / "backups" / report["run_id"] / "files"
    assert (backups / PG.lstrip("/") / "pg_hba.conf").read_bytes() == hba
    assert mode_of(backups / PG.lstrip("/") / "pg_hba.conf") == 0o600  # root only (issue #3)
    assert (backups / PG.lstrip("/") / "postgresql.conf").read_bytes() == conf

    # Pruned paths are no longer managed: the next run is a no-op.
    assert file_changes(pull_report(host), defaults_only=True) == []


def test_removed_template_file_is_deleted_and_its_nonempty_dir_kept(fleet, make_host):
    host = make_host("web1")
    assert host.pull().returncode == 0
    before = host.path("/etc/nginx/conf.d/app.conf").read_bytes()
    fleet.remove("templates/nginx/production/etc/nginx/conf.d/app.conf.j2")
    fleet.commit("nginx: no app upstream")

    report = pull_report(host)

    assert [(c["path"], c["action"], c["reason"]) for c in file_changes(report)] == [
        ("/etc/nginx/conf.d/app.conf", "delete", "desired")
    ]
    assert not host.path("/etc/nginx/conf.d/app.conf").exists()
    assert host.path("/etc/nginx/conf.d/default.conf").is_file()
    backup = host.state_dir / "backups" / report["run_id"] / "files/etc/nginx/conf.d/app.conf"
    assert backup.read_bytes() == before
