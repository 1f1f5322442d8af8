"""Render only what changed (SPEC §7, issue #7): a template whose inputs did not change
since this host wrote its output is not rendered again — and reuse never serves a
stale or drifted file.

Inputs of a template's output (SPEC §10, per variable): its own blob and the blobs of
the templates it includes, imports or extends, and the top-level values they read
(vars, ``node``, ``facts``, ``source``). Unit tests of the rules: test_render_keys.py.
"""

from __future__ import annotations

import re

from tests.integration._helpers import file_changes, pull_report

APP = "templates/rr/default"
COUNT = 10


def rendered_count(stderr: str) -> tuple[int, int]:
    """(rendered, reused) from the render stage's debug line."""
    m = re.search(r"rr1: rendering (\d+) template\(s\), (\d+) reused", stderr)
    assert m, stderr[-3000:]
    return int(m.group(1)), int(m.group(2))


def setup(fleet, make_host):
    fleet.write("hosts/rr1.yaml", "apps: [rr]\nvars: {port: 80}\n")
    for i in range(COUNT):
        fleet.write(
            f"{APP}/etc/rr/f{i}.conf.j2", f"file {i} of {{{{ node.name }}}} port={{{{ port }}}}\n"
        )
    fleet.write(f"{APP}/etc/rr/commit.j2", "built from {{ source.commit }}\n")
    fleet.write(f"{APP}/etc/rr/with-header.conf.j2", "{% include '_lib/rr-header.j2' %}body\n")
    fleet.write("templates/_lib/rr-header.j2", "# header v1\n")
    fleet.commit("rr app")
    host = make_host("rr1")
    pull_report(host)
    return host


def pull_debug(host):
    proc = host.run("pull", "--debug")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_one_template_changed_is_the_only_one_rendered(fleet, make_host):
    host = setup(fleet, make_host)
    # A commit that changes nothing of rr1's: what is rendered anyway (templates
    # that read source, here and in the default apps). A template including
    # another is reused now (per-variable keys, SPEC §10): it was always rendered.
    fleet.write("README.rr", "unrelated\n")
    fleet.commit("unrelated")
    always, reused = rendered_count(pull_debug(host).stderr)
    assert reused >= COUNT + 1 and always >= 1

    fleet.write(f"{APP}/etc/rr/f3.conf.j2", "file 3 changed port={{ port }}\n")
    head = fleet.commit("rr: f3 changed")
    proc = pull_debug(host)

    assert rendered_count(proc.stderr) == (always + 1, reused - 1)
    assert host.path("/etc/rr/f3.conf").read_text() == "file 3 changed port=80\n"
    assert host.path("/etc/rr/f4.conf").read_text() == "file 4 of rr1 port=80\n"
    assert host.path("/etc/rr/commit").read_text() == f"built from {head}\n"


def test_a_vars_change_renders_only_the_templates_that_read_it(fleet, make_host):
    host = setup(fleet, make_host)
    fleet.write("README.rr", "unrelated\n")
    fleet.commit("unrelated")
    always, reused = rendered_count(pull_debug(host).stderr)
    fleet.write("hosts/rr1.yaml", "apps: [rr]\nvars: {port: 8080}\n")
    fleet.commit("rr1: port 8080")

    proc = pull_debug(host)

    # Before per-variable keys, nothing was reused; now only the readers of port
    # render again (SPEC §10), the header template and the default apps are reused.
    assert rendered_count(proc.stderr) == (always + COUNT, reused - COUNT)
    for i in range(COUNT):
        assert host.path(f"/etc/rr/f{i}.conf").read_text() == f"file {i} of rr1 port=8080\n"


def test_a_change_to_an_included_template_reaches_the_including_one(fleet, make_host):
    host = setup(fleet, make_host)
    fleet.write("templates/_lib/rr-header.j2", "# header v2\n")
    fleet.commit("rr header v2")

    pull_debug(host)

    assert host.path("/etc/rr/with-header.conf").read_text() == "# header v2\nbody\n"


def test_a_drifted_file_is_never_reused_as_the_desired_content(fleet, make_host):
    host = setup(fleet, make_host)
    # Same size, other bytes: only the content hash tells it apart.
    good = host.path("/etc/rr/f5.conf").read_text()
    host.path("/etc/rr/f5.conf").write_text(good.replace("rr1", "XX1"))
    fleet.write(f"{APP}/etc/rr/f3.conf.j2", "file 3 changed port={{ port }}\n")
    fleet.commit("rr: f3 changed")

    report = pull_report(host)

    assert host.path("/etc/rr/f5.conf").read_text() == good
    assert [d["path"] for d in report["drift"]] == ["/etc/rr/f5.conf"]
    again = pull_report(host)
    assert again["result"] == "ok" and file_changes(again) == []
