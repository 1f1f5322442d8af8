"""Our filters and tests against Ansible's own, on a table of inputs (SPEC §10, issue 15).

Each row is called through our sandboxed environment (``render._environment``,
the one every repository template renders in) and through the function of
ansible-core's filter or test plugin (imported directly: no playbook run),
and the two results must be equal. Where we differ on purpose (docs/spec.md
§10) the row says how the results are compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jinja2
import pytest

from reconciler.git.snapshot import DirSnapshot
from reconciler.pipeline.render import Decryption, RenderLimits, _environment, _Secrets

ansible_core = pytest.importorskip("ansible.plugins.filter.core")
from ansible.plugins.filter import mathstuff  # noqa: E402
from ansible.plugins.test import core as ansible_tests  # noqa: E402

ANSIBLE_FILTERS = {**ansible_core.FilterModule().filters(), **mathstuff.FilterModule().filters()}
ANSIBLE_TESTS = ansible_tests.TestModule().tests()
PLAIN_ENV = jinja2.Environment()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("repo")
    return _environment(
        DirSnapshot(Path(root)), None, RenderLimits(), _Secrets(Decryption(placeholder=True), "")
    )


def _ansible(name: str, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    func = ANSIBLE_FILTERS[name]
    if getattr(func, "jinja_pass_arg", None) is not None:  # pass_environment
        return func(PLAIN_ENV, value, *args, **kwargs)
    return func(value, *args, **kwargs)


DICT = {"b": 1, "a": [1, 2], "c": {"x": "é", "y": None}}
TEXT = "first line\nsecond: line\n\nlast"
FILTERS = [
    # name, value, args, kwargs
    ("bool", "yes", (), {}),
    ("bool", "On", (), {}),
    ("bool", "FALSE", (), {}),
    ("bool", "0", (), {}),
    ("bool", 1, (), {}),
    ("bool", True, (), {}),
    ("bool", "no", (), {}),
    ("ternary", True, ("a", "b"), {}),
    ("ternary", 0, ("a", "b"), {}),
    ("ternary", None, ("a", "b", "n"), {}),
    ("to_json", DICT, (), {}),
    ("to_json", ["ü", 1.5, None, True], (), {}),
    ("to_json", DICT, (), {"sort_keys": True}),
    ("to_nice_json", DICT, (), {}),
    ("to_nice_json", DICT, (), {"indent": 2}),
    ("to_yaml", DICT, (), {}),
    ("to_yaml", ["a", {"b": [1, 2]}, "multi\nline"], (), {}),
    ("to_nice_yaml", DICT, (), {}),
    ("to_nice_yaml", {"list": [{"a": 1, "b": "x y"}], "é": "ü"}, (), {"indent": 2}),
    ("from_json", '{"a": [1, 2.5, null, true], "b": "x"}', (), {}),
    ("from_yaml", "a: [1, 2]\nb: {c: yes, d: '3'}\n", (), {}),
    ("from_yaml", "- 1\n- two\n", (), {}),
    ("regex_replace", "hello world", ("o", "0"), {}),
    ("regex_replace", "hello world", ("^(\\w+) (\\w+)$", "\\2 \\1"), {}),
    ("regex_replace", "a.b.c", ("\\.", "-"), {"count": 1}),
    ("regex_replace", "Line1\nline2", ("^l", "L"), {"multiline": True, "ignorecase": True}),
    ("regex_replace", "abc", ("", "-"), {}),
    ("regex_replace", "abc", ("x*", "-"), {}),
    ("regex_replace", "key=value", ("(?P<k>\\w+)=(?P<v>\\w+)", "\\g<v>=\\g<k>"), {}),
    ("regex_search", "server1.example.com", ("^(\\w+)\\.",), {}),
    ("regex_search", "server1.example.com", ("^(\\w+)\\.(\\w+)", "\\2", "\\1"), {}),
    ("regex_search", "a=1", ("(?P<k>\\w)=(?P<v>\\d)", "\\g<v>"), {}),
    ("regex_search", "nothing", ("x",), {}),
    ("regex_search", "ABC", ("b",), {"ignorecase": True}),
    ("regex_findall", "a1 b2 c3", ("\\d",), {}),
    ("regex_findall", "a1 b2 c3", ("(\\w)(\\d)",), {}),
    ("regex_findall", "a1 b2 c3", ("(\\w)\\d",), {}),
    ("regex_findall", "a1 b c3", ("(\\w)(\\d)?",), {}),
    ("regex_findall", "X\nx", ("^x",), {"multiline": True, "ignorecase": True}),
    ("b64encode", "Ünïcode text", (), {}),
    ("b64encode", "?>?>", (), {"urlsafe": True}),
    ("b64decode", "w5xuw69jb2RlIHRleHQ=", (), {}),
    ("hash", "text", (), {}),
    ("hash", "text", ("md5",), {}),
    ("hash", "text", ("sha256",), {}),
    ("comment", TEXT, (), {}),
    ("comment", TEXT, ("c",), {}),
    ("comment", TEXT, ("cblock",), {}),
    ("comment", TEXT, ("xml",), {}),
    ("comment", TEXT, ("erlang",), {}),
    ("comment", "one", (), {"decoration": "; "}),
    ("comment", "one\ntwo", ("plain",), {"prefix": "#!", "prefix_count": 2, "postfix_count": 0}),
    ("comment", "one", (), {"beginning": "{", "end": "}", "newline": "\r\n"}),
    ("combine", {"a": 1, "b": {"x": 1}}, ({"b": {"y": 2}, "c": 3},), {}),
    ("combine", {"a": 1, "b": {"x": 1}}, ({"b": {"y": 2}},), {"recursive": True}),
    ("combine", {"l": [1, 2]}, ({"l": [2, 3]},), {"list_merge": "append"}),
    ("combine", {"l": [1, 2]}, ({"l": [2, 3]},), {"list_merge": "prepend"}),
    ("combine", {"l": [1, 2]}, ({"l": [2, 3]},), {"list_merge": "append_rp"}),
    ("combine", {"l": [1, 2]}, ({"l": [2, 3]},), {"list_merge": "prepend_rp"}),
    ("combine", {"l": [1, 2]}, ({"l": [2, 3]},), {"list_merge": "keep"}),
    ("combine", [{"a": 1}, {"a": 2, "b": 3}], (), {}),
    ("combine", {"a": {"b": {"c": 1, "d": 2}}}, ({"a": {"b": {"c": 9}}},), {"recursive": True}),
    ("dict2items", {"a": 1, "b": 2}, (), {}),
    ("dict2items", {"a": 1}, (), {"key_name": "k", "value_name": "v"}),
    ("items2dict", [{"key": "a", "value": 1}, {"key": "b", "value": 2}], (), {}),
    ("items2dict", [{"k": "a", "v": 1}], (), {"key_name": "k", "value_name": "v"}),
    ("quote", "it's a test", (), {}),
    ("quote", "plain", (), {}),
    ("quote", None, (), {}),
    ("unique", [1, 2, 1, 3, 2], (), {}),
    ("unique", ["a", "A", "b"], (), {}),
    ("unique", ["a", "A", "b"], (), {"case_sensitive": True}),
    ("unique", [{"a": 1}, {"a": 1}, {"b": 2}], (), {}),
    ("flatten", [1, [2, [3, [4]]], None, "null"], (), {}),
    ("flatten", [1, [2, [3, [4]]]], (), {"levels": 1}),
    ("flatten", [1, [None, 2]], (), {"skip_nulls": False}),
    ("basename", "/etc/nginx/nginx.conf", (), {}),
    ("basename", "/etc/nginx/", (), {}),
    ("dirname", "/etc/nginx/nginx.conf", (), {}),
    ("dirname", "nginx.conf", (), {}),
]
# Ansible goes through a set: its order changes with the hash seed. Ours keeps
# first-seen order (stable files); the members must be the same.
SETS = [
    ("union", [1, 2, 3], ([3, 4, 1],), {}),
    ("union", ["b", "a"], (["c", "a"],), {}),
    ("intersect", [1, 2, 3, 4], ([4, 2, 9],), {}),
    ("difference", [1, 2, 3, 4], ([4, 2],), {}),
    ("union", [{"a": 1}], ([{"a": 1}, {"b": 2}],), {}),
]


@pytest.mark.parametrize(("name", "value", "args", "kwargs"), FILTERS)
def test_filter_matches_ansible(
    env: Any, name: str, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    ours = env.call_filter(name, value, args, kwargs)
    assert ours == _ansible(name, value, args, kwargs)
    assert type(ours) is type(_ansible(name, value, args, kwargs)) or name == "from_yaml"


@pytest.mark.parametrize(("name", "value", "args", "kwargs"), SETS)
def test_set_filters_match_ansible_in_first_seen_order(
    env: Any, name: str, value: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    ours = env.call_filter(name, value, args, kwargs)
    theirs = _ansible(name, value, args, kwargs)
    assert len(ours) == len(theirs) and all(x in theirs for x in ours)
    assert ours == sorted(ours, key=lambda x: [*value, *args[0]].index(x))  # first-seen order


@pytest.mark.parametrize(
    ("hashtype", "salt", "rounds"),
    [
        ("sha512", "abcdefgh12345678", 5000),
        ("sha256", "saltsalt", 5000),
        ("md5", "sAlt1234", None),
        ("sha512", "abc", 6000),
    ],
)
def test_password_hash_with_a_salt_matches_ansible(
    env: Any, hashtype: str, salt: str, rounds: int | None
) -> None:
    kwargs: dict[str, Any] = {"salt": salt}
    if rounds:
        kwargs["rounds"] = rounds
    template = env.from_string("{{ 'secret' | password_hash(h, **kw) }}")
    ours = template.render(h=hashtype, kw=kwargs, node={"name": "n"})
    assert ours == ANSIBLE_FILTERS["password_hash"]("secret", hashtype, **kwargs)


def test_password_hash_defaults_to_ansibles_rounds() -> None:
    """Without rounds=, the rounds Ansible passes to passlib (656,000 for sha512): compared
    as numbers, since a hash at those rounds costs ~0.5 s on each side."""
    from ansible.utils.encrypt import BaseHash

    from reconciler.pipeline.filters import _IMPLICIT_ROUNDS

    for scheme, rounds in _IMPLICIT_ROUNDS.items():
        assert BaseHash.algorithms[scheme].implicit_rounds == rounds


VERSIONS = [
    ("1.2.10", "1.2.9", ">"),
    ("1.2.10", "1.2.9", "lt"),
    ("2.0", "2.0.0", "=="),
    ("2.0", "2.0.0", "<"),
    ("1.0a1", "1.0", "<"),
    ("10.4", "9.11", "ge"),
    ("1.2.3", "1.2.3", "eq"),
    ("1.2.3", "1.2.4", "!="),
    ("1.2.3", "1.2.4", "<>"),
    ("3.10", "3.9", "gt"),
    ("1.2rc1", "1.2rc2", "<="),
]


@pytest.mark.parametrize(("value", "version", "operator"), VERSIONS)
def test_version_test_matches_ansible(env: Any, value: str, version: str, operator: str) -> None:
    ours = env.call_test("version", value, (version, operator))
    assert ours == ANSIBLE_TESTS["version"](value, version, operator)


@pytest.mark.parametrize(
    ("value", "version", "operator"),
    [
        ("1.2.3", "1.2.4", "<"),
        ("1.2a1", "1.2", "<"),
        ("1.2b2", "1.2a3", ">"),
        ("1.2", "1.2.0", "=="),
    ],
)
def test_strict_version_matches_ansible(env: Any, value: str, version: str, operator: str) -> None:
    ours = env.call_test("version", value, (version, operator), {"version_type": "strict"})
    assert ours == ANSIBLE_TESTS["version"](value, version, operator, version_type="strict")
