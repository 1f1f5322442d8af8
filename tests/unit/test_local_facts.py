"""Local facts (SPEC §10): ``facts_dir``'s ``*.yaml``, ``*.json`` and executables
become ``facts.local.<name>``; a failing or unsafe source is one error naming it.

Real directories, real files, real executables run as subprocesses.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import pytest

from reconciler.cli.main import main
from reconciler.errors import FactsError
from reconciler.pipeline.facts import gather_facts, local_facts
from tests.unit.helpers import write_repo


def _facts_dir(base: Path, files: dict[str, str], executable: tuple[str, ...] = ()) -> Path:
    base.mkdir(mode=0o755)
    os.chmod(base, 0o755)  # whatever the umask
    for name, text in files.items():
        path = base / name
        path.write_text(text)
        os.chmod(path, 0o755 if name in executable else 0o644)
    return base


def test_yaml_json_and_executables_become_facts_local_by_name(tmp_path):
    d = _facts_dir(
        tmp_path / "facts.d",
        {
            "rack.yaml": "row: 3\nslot: [1, 2]\n",
            "owner.json": '{"team": "storage", "oncall": true}',
            "disks.sh": '#!/bin/sh\necho \'{"count": 2, "path": "\'"$PATH"\'"}\'\n',
            "README": "not a fact\n",
            ".hidden.yaml": "[broken\n",
            "old.json.dpkg-old": "{",
        },
        executable=("disks.sh",),
    )
    assert local_facts(str(d)) == {
        "rack": {"row": 3, "slot": [1, 2]},
        "owner": {"team": "storage", "oncall": True},
        "disks": {
            "count": 2,
            "path": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        },
    }
    assert gather_facts(str(d))["local"]["rack"]["row"] == 3
    assert local_facts(str(tmp_path / "missing")) == {} == gather_facts()["local"]


def test_a_yaml_fact_with_dates_or_number_keys_stays_json_shaped(tmp_path):
    # A date (YAML timestamp) or mixed int/str keys made the run's fingerprint and
    # the report (json.dumps, sort_keys) fail with a traceback: read as host files are.
    d = _facts_dir(
        tmp_path / "facts.d", {"hw.yaml": "bought: 2024-05-01\nports: {80: a, web: b}\n"}
    )
    facts = gather_facts(str(d))
    assert facts["local"] == {"hw": {"bought": "2024-05-01", "ports": {"80": "a", "web": "b"}}}
    json.dumps(facts, sort_keys=True)


@pytest.mark.parametrize(
    ("files", "executable", "problem"),
    [
        pytest.param(
            {"bad.sh": "#!/bin/sh\necho 'no disk here' >&2\nexit 3\n"},
            ("bad.sh",),
            "bad.sh: exited with status 3: no disk here — run it by hand",
            id="exit-status",
        ),
        pytest.param(
            {"bad.sh": "#!/bin/sh\necho not json\n"},
            ("bad.sh",),
            "bad.sh: printed no JSON — print one JSON object on stdout",
            id="not-json",
        ),
        pytest.param(
            {"bad.sh": "#!/bin/sh\nexec sleep 30\n"},
            ("bad.sh",),
            "bad.sh: did not finish within 0.5s — make it faster",
            id="timeout",
        ),
        pytest.param({"bad.json": '{"a": '}, (), "bad.json:1: invalid JSON", id="invalid-json"),
        pytest.param({"bad.yaml": "a: [1\n"}, (), "bad.yaml:2: invalid YAML", id="invalid-yaml"),
        pytest.param({"bad.yaml": "- 1\n"}, (), "bad.yaml: gives list, not a mapping", id="list"),
        pytest.param({"bad.yml": "a: 1\n"}, (), "bad.yml: local fact files end in .yaml", id="yml"),
        pytest.param(
            {"bad.json": "{}", "bad.yaml": "{}"},
            (),
            "bad.yaml: a second source of facts.local.bad",
            id="same-name",
        ),
    ],
)
def test_a_failing_source_is_one_error_naming_it(tmp_path, files, executable, problem):
    d = _facts_dir(tmp_path / "facts.d", files, executable)
    with pytest.raises(FactsError) as caught:
        local_facts(str(d), timeout=0.5)
    message = str(caught.value)
    assert message.startswith(f"{d}/"), message
    assert problem in message, message
    assert "\n" not in message


def test_a_world_writable_source_or_directory_is_refused(tmp_path):
    d = _facts_dir(tmp_path / "facts.d", {"rack.yaml": "row: 3\n"})
    os.chmod(d / "rack.yaml", 0o646)
    with pytest.raises(FactsError, match=r"rack.yaml: local fact source is world-writable"):
        local_facts(str(d))
    os.chmod(d / "rack.yaml", 0o644)
    os.chmod(d, 0o777)
    with pytest.raises(
        FactsError, match=r"facts.d: local fact source is world-writable: .*chmod go-w"
    ):
        local_facts(str(d))


def test_a_facts_dir_inside_a_directory_others_could_write_is_refused(tmp_path):
    # Another user could rename facts.d away and put their own, with an executable
    # in it, in its place: refused as OpenSSH's StrictModes refuses such a parent.
    shared = tmp_path / "shared"
    shared.mkdir()
    d = _facts_dir(shared / "facts.d", {"rack.yaml": "row: 3\n"})
    os.chmod(shared, 0o777)
    with pytest.raises(FactsError, match=r"facts.d: facts_dir lies in .*shared, which is world-"):
        local_facts(str(d))
    os.chmod(shared, 0o775)
    os.chown(shared, os.geteuid(), 12345)  # a group other than root's or ours
    with pytest.raises(FactsError, match=r"which is writable by group 12345"):
        local_facts(str(d))
    # Reached through a symlink: the directories of the link's target count too.
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(FactsError, match=r"which is writable by group 12345"):
        local_facts(str(link))
    # A sticky directory owned by root (/tmp) is safe: nobody renames what is not theirs.
    os.chmod(shared, 0o1777)
    if os.geteuid() == 0:
        assert local_facts(str(d)) == {"rack": {"row": 3}}
    os.chmod(shared, 0o755)
    assert local_facts(str(d)) == {"rack": {"row": 3}}


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_an_executable_another_user_owns_is_never_run(tmp_path):
    marker = tmp_path / "ran"
    d = _facts_dir(
        tmp_path / "facts.d", {"x.sh": f"#!/bin/sh\ntouch {marker}\necho '{{}}'\n"}, ("x.sh",)
    )
    os.chown(d / "x.sh", 65534, 65534)  # nobody: could rewrite it and be root
    with pytest.raises(FactsError, match="owned by uid 65534"):
        local_facts(str(d))
    assert not marker.exists()


def test_render_uses_facts_local_and_a_failing_source_writes_nothing(tmp_path):
    write_repo(
        tmp_path / "repo",
        {
            "hosts/n.yaml": "apps: [motd]\n",
            "templates/motd/default/etc/motd.j2": "rack {{ facts.local.rack.row }}\n",
        },
    )
    d = _facts_dir(tmp_path / "facts.d", {"rack.yaml": "row: 3\n"})
    out = tmp_path / "out"
    argv = ["render", "n", "--repo", str(tmp_path / "repo"), "--config", "/dev/null"]
    assert main([*argv, "--facts-dir", str(d), "--out", str(out)], io.StringIO()) == 0
    assert (out / "etc/motd").read_text() == "rack 3\n"

    (d / "broken.sh").write_text("#!/bin/sh\nexit 1\n")
    os.chmod(d / "broken.sh", 0o755)
    err = io.StringIO()
    code = main([*argv, "--facts-dir", str(d), "--out", str(tmp_path / "out2")], io.StringIO(), err)
    assert code == 1
    assert err.getvalue().splitlines() == [
        f"reconciler: {d}/broken.sh: exited with status 1 — run it by hand to see why, "
        "and fix it or remove it"
    ]
    assert not (tmp_path / "out2").exists()


def test_a_rollback_report_carries_local_facts_and_a_broken_source_does_not_stop_it(tmp_path):
    from reconciler.pipeline.rollback_run import _facts

    d = _facts_dir(tmp_path / "facts.d", {"rack.yaml": "row: 3\n"})
    assert _facts(str(d))["local"] == {"rack": {"row": 3}}
    (d / "bad.json").write_text("{")
    assert _facts(str(d))["local"] == {}  # the rollback goes on; its report has none
