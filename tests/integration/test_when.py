"""``when:`` end to end (SPEC §9): real git daemon, real pulls, real files.

A file whose ``when:`` is true is written; when it turns false the file leaves
the target state and is pruned with a backup and reported; a ``when:`` that
cannot be evaluated is one line naming the file and the node, exit 1, and
nothing on disk changes.
"""

from __future__ import annotations

from tests.conftest import Fleet, Host
from tests.integration._helpers import assert_clean_error, file_changes

NODE = "cond"
CONF = "/etc/cond/extra.conf"


def _host_file(enabled: str, when: str = "extra.enabled") -> str:
    return (
        f"apps: [cond]\nvars: {{extra: {{enabled: {enabled}}}}}\n"
        f"files:\n  {CONF}: {{when: '{when}'}}\n"
    )


def _prepare(fleet: Fleet, make_host) -> Host:
    fleet.write(f"hosts/{NODE}.yaml", _host_file("true"))
    fleet.write("templates/cond/default/etc/cond/extra.conf.j2", "extra {{ extra.enabled }}\n")
    fleet.write("templates/cond/default/etc/cond/base.conf", "base\n")
    fleet.commit("cond: a conditional file")
    return make_host(NODE)


def test_a_file_whose_when_turns_false_is_pruned_with_a_backup(fleet, make_host):
    host = _prepare(fleet, make_host)
    code, first = host.pull_json()
    assert code == 0, first
    assert host.path(CONF).read_text() == "extra True\n"

    fleet.write(f"hosts/{NODE}.yaml", _host_file("false"))
    fleet.commit("cond: extra off")
    code, second = host.pull_json()
    assert code == 0, second
    assert [(c["path"], c["action"]) for c in file_changes(second)] == [(CONF, "delete")]
    assert not host.path(CONF).exists() and host.path("/etc/cond/base.conf").exists()
    backup = host.state_dir / "backups" / second["run_id"] / "files" / CONF.lstrip("/")
    assert backup.read_text() == "extra True\n"


def test_a_bad_when_is_one_line_exit_1_and_changes_nothing(fleet, make_host):
    host = _prepare(fleet, make_host)
    assert host.pull().returncode == 0
    fleet.write(f"hosts/{NODE}.yaml", _host_file("false", when="extra.nope =="))
    fleet.write("templates/cond/default/etc/cond/base.conf", "base 2\n")
    fleet.commit("cond: a broken when")
    proc = host.pull()
    assert proc.returncode == 1, proc
    lines = assert_clean_error(proc.stderr, f"hosts/{NODE}.yaml", f"node {NODE}")
    assert len(lines) == 1, lines
    assert "syntax error" in lines[0], lines
    assert host.path(CONF).read_text() == "extra True\n"
    assert host.path("/etc/cond/base.conf").read_text() == "base\n"
