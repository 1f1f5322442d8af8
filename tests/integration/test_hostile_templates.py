"""Hostile templates through a real ``reconciler pull`` (issue 11, SPEC §10 "Sandbox and bounds").

The render stage's own tests (tests/unit/test_render_sandbox.py) cover every
attack in process and in forked workers; these show the same through the
agent: the configuration keys reach the run, the error travels to stderr,
last-run.json and the report on the server without the secret, and the old
files stay.
"""

from __future__ import annotations

import json
import time

from tests.integration._helpers import assert_clean_error

KEYS = "templates/chrony/default/etc/chrony/chrony.keys"  # secret: true (app.yaml)
SECRET = "SECRET_PW_1111"


def test_a_secret_templates_error_names_line_and_kind_nowhere_its_text(fleet, make_host):
    host = make_host("web1")
    assert host.pull().returncode == 0
    fleet.remove(KEYS)
    fleet.write(KEYS + ".j2", "# chrony keys\n{% include '" + SECRET + "' %}\n")
    fleet.commit("chrony: keys from a template that is not there")

    proc = host.run("pull")
    status = host.run("status", "--format", "json")

    assert proc.returncode == 1
    assert_clean_error(proc.stderr, f"{KEYS}.j2:2", "template not found")
    last_run = (host.state_dir / "last-run.json").read_text()
    report = json.dumps(fleet.report("web1"))
    assert f"{KEYS}.j2:2" in last_run and f"{KEYS}.j2:2" in report
    for where, text in [
        ("stderr", proc.stdout + proc.stderr),
        ("last-run.json", last_run),
        ("report.json", report),
        ("status", status.stdout + status.stderr),
    ]:
        assert SECRET not in text, f"the secret leaked into {where}"
    assert host.path("/etc/chrony/chrony.keys").read_text() != ""  # the old file stays


def test_an_endless_template_ends_the_run_at_render_timeout_and_runs_nothing(
    fleet, make_host, tmp_path
):
    marker = tmp_path / "MARKER"
    host = make_host("web1")
    fleet.write(
        "templates/motd/default/etc/motd.j2",
        "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}\n",
    )
    fleet.commit("motd: a sandbox escape")
    escape = host.run("pull")
    fleet.remove("templates/motd/default/etc/motd.j2")
    fleet.write(
        "templates/motd/default/etc/issue.j2",
        "{% for i in range(10**5) %}{% for j in range(10**5) %}{% endfor %}{% endfor %}\n",
    )
    fleet.commit("motd: an endless loop")
    started = time.monotonic()
    loop = host.run("pull", "--render-timeout", "1s")
    took = time.monotonic() - started

    assert not marker.exists()
    assert escape.returncode == 1
    assert_clean_error(escape.stderr, "templates/motd/default/etc/motd.j2:1", "sandbox")
    assert loop.returncode == 1
    assert took < 30  # unbounded: never
    assert_clean_error(loop.stderr, "templates/motd/default/etc/issue.j2:1", "render_timeout (1s)")
    assert not host.path("/etc/issue").exists()
