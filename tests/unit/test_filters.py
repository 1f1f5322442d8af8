"""The filters and tests of SPEC §10 in the real render stage: bounds, sandbox, secrets, errors.

Their meaning is checked against Ansible in test_filters_ansible.py; here,
what a hostile or mistaken template meets: every filter that can make a
value larger than its input stops at ``max_file_size`` (never after making
it), ``from_yaml`` builds no Python object, a ``!age`` value passed through a
filter makes the file secret, an unknown filter or a ``mandatory`` variable
is one line naming the template and line, and ``password_hash`` is stable.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest

from reconciler.errors import RenderError
from reconciler.pipeline.render import Decryption, RenderLimits, render_target
from reconciler.secrets import age
from tests.unit.helpers import FACTS, node_of, write_repo

T = "templates/a/default/etc/x.j2"
SMALL = RenderLimits(render_timeout=5, max_file_size=64 * 1024)


def _render(tmp_path: Path, template: str, *, node: str = "n", limits: RenderLimits = SMALL):
    snap = write_repo(
        tmp_path / "repo",
        {T: template, "hosts/n.yaml": "apps: [a]\n", "hosts/m.yaml": "apps: [a]\n"},
    )
    return render_target(snap, node_of(snap, node), FACTS, limits=limits)


def _error(tmp_path: Path, template: str) -> str:
    with pytest.raises(RenderError) as info:
        _render(tmp_path, template)
    message = str(info.value)
    assert "\n" not in message and T in message and " — " in message
    return message


@pytest.mark.parametrize(
    "attack",
    [
        pytest.param("{% set s = 'x' * 60000 %}{{ ([s] * 1000) | to_json }}", id="to_json"),
        pytest.param("{% set s = 'x' * 60000 %}{{ ([s] * 1000) | to_nice_json }}", id="nice_json"),
        pytest.param("{% set s = 'x' * 60000 %}{{ ([s] * 1000) | to_yaml }}", id="to_yaml"),
        pytest.param("{% set s = 'x' * 60000 %}{{ {'a': [s] * 1000} | to_nice_yaml }}", id="yaml"),
        pytest.param("{{ ('x' * 60000) | regex_replace('', 'yyyyyyyy') }}", id="regex_replace"),
        pytest.param("{{ ('x' * 60000) | regex_replace('(x)', '\\\\1\\\\1') }}", id="backrefs"),
        pytest.param("{{ ('x' * 20000) | regex_findall('(?=(x*))') | length }}", id="findall"),
        pytest.param("{{ ('x' * 60000) | b64encode }}", id="b64encode"),
        pytest.param("{{ 'x' | comment(prefix_count=10 ** 9) }}", id="comment-count"),
        pytest.param("{{ ('\\n' * 60000) | comment(decoration='xxxxxxxx') }}", id="comment-lines"),
        pytest.param("{% set l = [1] * 1000 %}{{ ([l] * 1000) | flatten | length }}", id="flatten"),
    ],
)
def test_a_filter_stops_at_the_bound_before_making_the_value(tmp_path: Path, attack: str) -> None:
    message = _error(tmp_path, attack)
    assert "max_file_size" in message or "items" in message


_UNDER_RLIMIT = """
import resource, sys
resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
from pathlib import Path
from reconciler.errors import RenderError
from reconciler.pipeline.render import RenderLimits, render_target
from tests.unit.helpers import FACTS, node_of, write_repo
from tests.unit.test_filters import T
base = Path(sys.argv[1])
for i, template in enumerate(sys.argv[2:]):
    snap = write_repo(base / str(i), {T: template, "hosts/n.yaml": "apps: [a]\\n"})
    try:
        render_target(snap, node_of(snap, "n"), FACTS, limits=RenderLimits(max_file_size=65536))
        print("rendered")
    except RenderError as exc:
        print(exc)
"""


def test_a_filter_never_allocates_what_its_output_does_not_hold(tmp_path: Path) -> None:
    # Gigabytes made in one C call (a list of 10**9 empty postfixes, an indent of
    # 10**10 spaces) are never seen by the memory bound's tick: on a host they meet
    # the OOM killer. Under a 2 GiB address-space limit here, they fail at the bound.
    import subprocess
    import sys

    attacks = [
        "{{ 'x' | comment(postfix='', newline='', postfix_count=10 ** 9) | length }}",
        "{{ [[1]] | to_json(indent=10 ** 10) | length }}",
        "{{ [[1]] | to_nice_json(indent=10 ** 10) | length }}",
        # one match expanded to 32,000 copies of 65,000 characters: 2 GB in one call
        "{{ ('x' * 65000) | regex_replace('(.+)', '\\\\1' * 32000) | length }}",
    ]
    run = subprocess.run(
        [sys.executable, "-c", _UNDER_RLIMIT, str(tmp_path), *attacks],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    comment, *json_lines = run.stdout.splitlines()
    assert comment == "rendered", run.stdout  # its output is empty: nothing to refuse
    assert len(json_lines) == 3 and all("max_file_size" in x for x in json_lines), run.stdout


@pytest.mark.parametrize(
    "escape",
    [
        "{{ '!!python/object/apply:os.system [\"touch MARKER\"]' | from_yaml }}",
        "{{ '!!python/name:os.system' | from_yaml }}",
        "{{ ('x' | regex_search('x')).__class__.__mro__[1].__subclasses__() }}",
        "{{ (d | combine({})).__class__.__init__.__globals__ }}",
    ],
)
def test_filters_open_no_way_out(tmp_path: Path, escape: str) -> None:
    message = _error(tmp_path, "{% set d = {} %}" + escape)
    assert not (tmp_path / "MARKER").exists()
    assert "sandbox refusal" in message or "could not determine a constructor" in message


def test_an_unknown_filter_or_test_is_an_error_naming_it(tmp_path: Path) -> None:
    assert "No filter named 'to_toml'" in _error(tmp_path, "a\n{{ {} | to_toml }}\n")
    assert f"{T}:2" in _error(tmp_path, "a\n{{ {} | to_toml }}\n")
    assert "No test named 'semver'" in _error(tmp_path, "{{ '1' is semver }}")


def test_mandatory_names_the_variable_and_the_line(tmp_path: Path) -> None:
    message = _error(tmp_path, "ok\n{{ listen | mandatory }}\n")
    assert f"{T}:2" in message and "Mandatory variable 'listen' not defined." in message
    message = _error(tmp_path, "{{ listen | mandatory('set listen in vars') }}")
    assert "set listen in vars" in message


def test_password_hash_is_stable_per_node_and_template(tmp_path: Path) -> None:
    template = "{{ 'pw' | password_hash('sha512', rounds=5000) }}\n"
    first = _render(tmp_path / "1", template).files[PurePosixPath("/etc/x")].content
    again = _render(tmp_path / "2", template).files[PurePosixPath("/etc/x")].content
    other = _render(tmp_path / "3", template, node="m").files[PurePosixPath("/etc/x")].content
    assert first == again != other
    assert first.startswith(b"$6$") and len(first.split(b"$")[2]) == 16  # 5000: implicit
    from passlib.hash import sha512_crypt

    assert sha512_crypt.verify("pw", first.decode().strip())


def test_a_secret_through_a_filter_makes_the_file_secret(tmp_path: Path) -> None:
    key = tmp_path / "n.age"
    recipient = age.parse_recipient(age.keygen(key), where="n")
    payload = age.encrypt(b"s3cr3t", [recipient]).decode()
    value = "!age |\n" + "".join(f"      {line}\n" for line in payload.splitlines())
    snap = write_repo(
        tmp_path / "repo",
        {
            T: "{{ creds | to_json }} {{ creds | dict2items | items2dict | to_yaml }}",
            "templates/a/default/etc/plain.j2": "{{ creds | length }}\n",
            "hosts/n.yaml": f"apps: [a]\nvars:\n  creds:\n    user: u\n    pw: {value}",
        },
    )
    files = render_target(
        snap, node_of(snap, "n"), FACTS, decryption=Decryption(identity=str(key))
    ).files
    out = files[PurePosixPath("/etc/x")]
    assert out.content.startswith(b'{"user": "u", "pw": "s3cr3t"}') and out.secret
    assert not files[PurePosixPath("/etc/plain")].secret


@pytest.mark.parametrize(
    "expression",
    [
        "nodes('m') | to_json",
        "nodes('m')[0].vars | to_nice_yaml",
        "nodes('m')[0].vars | combine({'x': 1}) | to_nice_json",
        "nodes('m')[0].vars | dict2items | items2dict | to_yaml",
        "nodes('m')[0].vars.pw | b64encode",
        "nodes('m')[0].vars.pw | hash('sha256')",
        "nodes('m')[0].vars.pw | regex_replace('a', 'b')",
        "nodes('m')[0].vars.pw | bool",
        "[nodes('m')[0].vars.pw] | unique",
        "nodes('m')[0].vars.pw | password_hash(rounds=5000)",
        "[[nodes('m')[0].vars.pw]] | flatten",
    ],
)
def test_another_nodes_secret_stays_unreadable_through_filters(
    tmp_path: Path, expression: str
) -> None:
    key = tmp_path / "m.age"
    recipient = age.parse_recipient(age.keygen(key), where="m")
    payload = age.encrypt(b"s3cr3t", [recipient]).decode()
    value = "!age |\n" + "".join(f"    {line}\n" for line in payload.splitlines())
    snap = write_repo(
        tmp_path / "repo",
        {
            T: "{{ " + expression + " }}\n",
            "hosts/n.yaml": "apps: [a]\n",
            "hosts/m.yaml": f"apps: []\nvars:\n  pw: {value}",
        },
    )
    with pytest.raises(RenderError) as info:
        render_target(snap, node_of(snap, "n"), FACTS, limits=SMALL)
    message = str(info.value)
    assert "nodes() never decrypts it" in message and "s3cr3t" not in message
    assert "BEGIN AGE" not in message


TEST_LIST = ["192.24.2.1", "host.fqdn", "::1", "192.168.32.0/24", "fe80::100/10", True, ""]


@pytest.mark.parametrize(
    ("value", "query", "expected"),
    [  # the examples of ansible.utils' ipaddr documentation (not in ansible-core)
        (TEST_LIST, "", ["192.24.2.1", "::1", "192.168.32.0/24", "fe80::100/10"]),
        (TEST_LIST, "ipv4", ["192.24.2.1", "192.168.32.0/24"]),
        (TEST_LIST, "ipv6", ["::1", "fe80::100/10"]),
        (TEST_LIST, "public", ["192.24.2.1"]),
        (TEST_LIST, "private", ["192.168.32.0/24", "fe80::100/10"]),
        ("192.24.2.1", "address", "192.24.2.1"),
        ("192.168.32.0/24", "net", "192.168.32.0/24"),
        ("192.168.32.1/24", "host", "192.168.32.1/24"),
        ("192.168.32.0/24", "host", False),
        ("192.0.2.5/24", "netmask", "255.255.255.0"),
        ("192.0.2.5/24", "broadcast", "192.0.2.255"),
        ("192.0.2.5/24", "network", "192.0.2.0"),
        ("192.0.2.5/24", "prefix", 24),
        ("192.0.2.5/24", "size", 256),
        ("192.168.0.0/24", "5", "192.168.0.5/24"),
        ("192.168.0.0/24", "-1", "192.168.0.255/24"),
        ("192.0.2.1", "revdns", "1.2.0.192.in-addr.arpa."),
        ("not an address", "", False),
    ],
)
def test_ipaddr_answers_as_ansible_utils_documents(
    value: object, query: str, expected: object
) -> None:
    from reconciler.pipeline.filters import ipaddr

    assert ipaddr(value, query) == expected
