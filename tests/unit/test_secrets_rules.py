"""``secrets.yaml`` and ``keys/`` (SPEC §8): first match wins, meta-nodes expanded
from the same snapshot, operators always added; each error names its file.

Repositories are real directories read through DirSnapshot, and one real
commit read through GitSnapshot (what a host renders from)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from reconciler.errors import SecretError
from reconciler.git.repo import discover
from reconciler.git.snapshot import GitSnapshot, SourceInfo
from reconciler.pipeline.inventory import load_inventory
from reconciler.secrets import age
from reconciler.secrets.rules import load_rules, operator_recipients
from tests.unit.helpers import write_repo

HOSTS = {
    "hosts/web1.yaml": "apps: []\n",
    "hosts/web2.yaml": "apps: []\n",
    "hosts/db1.yaml": "apps: []\n",
    "hosts/webservers.yaml": "include_nodes: [web1, web2]\n",
    "hosts/all.yaml": "include_nodes: [webservers, db1]\n",
}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """name → a real recipient line (age X25519), made once for the module."""
    base = tmp_path_factory.mktemp("keys")
    return {n: age.keygen(base / n) for n in ("web1", "web2", "db1", "alice", "bob")}


def _files(keys: dict[str, str], rules: str, *, nodes: tuple[str, ...] = ("web1", "web2", "db1")):
    files = dict(HOSTS)
    files.update({f"keys/nodes/{n}.pub": keys[n] + "\n" for n in nodes})
    files["keys/operators/alice.pub"] = f"# Alice\n{keys['alice']}\n"
    files["keys/operators/bob.pub"] = keys["bob"] + "\n"
    files["secrets.yaml"] = rules
    return files


def _rules(tmp_path: Path, files: dict[str, str]):
    snap = write_repo(tmp_path, files)
    return load_rules(snap, load_inventory(snap))


RULES = """\
- path: templates/postgresql/**
  to: [db1]
- path: hosts/webservers.yaml
  to: [webservers]
- path: templates/**/*.age
  to: [all]
- path: templates/ops-only/**
  to: []
"""


def test_first_match_wins_meta_nodes_expand_and_operators_are_always_added(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    rules = _rules(tmp_path, _files(keys, RULES))
    ops = [keys["alice"], keys["bob"]]
    db = "templates/postgresql/default/etc/postgresql/pass.age"
    assert rules.rule_for(db).number == 1  # rule 3 matches as well: the first wins
    assert rules.readers(db) == ("db1",)
    assert [r.text for r in rules.recipients(db)] == [keys["db1"], *ops]

    assert rules.readers("hosts/webservers.yaml") == ("web1", "web2")
    assert [r.text for r in rules.recipients("hosts/webservers.yaml")] == [
        keys["web1"],
        keys["web2"],
        *ops,
    ]
    # a meta-node of meta-nodes: every member node once, in include order
    tls = "templates/nginx/default/etc/ssl/private/site.key.age"
    assert rules.readers(tls) == ("web1", "web2", "db1")
    # a rule with no node: operators only
    assert [r.text for r in rules.recipients("templates/ops-only/x")] == ops
    assert rules.rule_for("templates/nginx/default/etc/nginx.conf.j2") is None
    assert rules.readers("templates/nginx/default/etc/nginx.conf.j2") == ()


def test_a_rule_naming_an_unknown_node_names_secrets_yaml(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    with pytest.raises(SecretError) as info:
        _rules(tmp_path, _files(keys, "- path: templates/**\n  to: [web1, webservrs]\n"))
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith("secrets.yaml: rule 1 (templates/**) names 'webservrs'")
    assert "did you mean 'webservers'" in text and " — " in text


@pytest.mark.parametrize(
    ("rules", "words"),
    [
        ("path: x\nto: [db1]\n", "secrets.yaml"),  # a mapping, not a list of rules
        ("- path: x\n", "to"),  # to: missing
        ("- path: x\n  to: db1\n", "secrets.yaml:2"),  # to: not a list; the line is named
        ("- path: x\n  to: [db1]\n  from: [web1]\n", "unknown key 'from'"),
        ("- path: [x\n", "invalid YAML"),
    ],
)
def test_a_malformed_rule_names_secrets_yaml(
    tmp_path: Path, keys: dict[str, str], rules: str, words: str
) -> None:
    with pytest.raises(SecretError) as info:
        _rules(tmp_path, _files(keys, rules))
    text = str(info.value)
    assert "\n" not in text and text.startswith("secrets.yaml"), text
    assert words in text, text


def test_a_node_named_without_a_key_names_the_missing_key_file(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    rules = _rules(tmp_path, _files(keys, RULES, nodes=("web1", "db1")))
    with pytest.raises(SecretError) as info:
        rules.recipients("hosts/webservers.yaml")
    text = str(info.value)
    assert text.startswith("keys/nodes/web2.pub: no key for node web2, which secrets.yaml rule 2")
    assert "reconciler keygen" in text and "\n" not in text


def test_a_path_no_rule_matches_and_a_broken_key_file(tmp_path: Path, keys: dict[str, str]) -> None:
    rules = _rules(tmp_path / "a", _files(keys, RULES))
    with pytest.raises(SecretError) as info:
        rules.recipients("templates/nginx/default/etc/nginx.conf")
    assert str(info.value).startswith("secrets.yaml: no rule of secrets.yaml matches")
    files = _files(keys, RULES)
    files["keys/nodes/db1.pub"] = "ssh-rsa AAAAB3NzaC1yc2E host\n"
    with pytest.raises(SecretError) as info:
        _rules(tmp_path / "b", files)
    assert str(info.value).startswith("keys/nodes/db1.pub:1: ssh-rsa is not an age1")


def test_no_secrets_yaml_means_no_rules(tmp_path: Path, keys: dict[str, str]) -> None:
    files = _files(keys, "")
    del files["secrets.yaml"]
    rules = _rules(tmp_path, files)
    assert rules.rules == ()
    assert rules.rule_for("templates/x/default/a.age") is None
    assert set(rules.node_keys) == {"web1", "web2", "db1"}


def test_rules_are_read_from_the_commit_not_the_working_tree(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    work = tmp_path / "work"
    write_repo(work, _files(keys, RULES))
    subprocess.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    subprocess.run(["git", "-C", str(work), "add", "-A"], check=True)
    subprocess.run(
        ["git", "-C", str(work), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x"],
        check=True,
    )
    # Uncommitted edits: the rules the host sees are the commit's.
    (work / "secrets.yaml").write_text("- path: templates/postgresql/**\n  to: [web1]\n")
    commit = subprocess.run(
        ["git", "-C", str(work), "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    repo = discover(work)
    assert repo is not None
    snap = GitSnapshot(repo, commit, SourceInfo(url="x", branch="main", commit=commit))
    rules = load_rules(snap, load_inventory(snap))
    assert rules.readers("templates/postgresql/default/x.age") == ("db1",)


def test_operator_recipients_are_read_without_rules_or_inventory(
    tmp_path: Path, keys: dict[str, str]
) -> None:
    # What a host encrypts its drift captures to (report.encrypt_captures, SPEC §8).
    files = _files(keys, "")
    del files["secrets.yaml"]
    found = operator_recipients(write_repo(tmp_path / "a", files))
    assert [r.text for r in found] == [keys["alice"], keys["bob"]]
    bare = {k: v for k, v in files.items() if not k.startswith("keys/operators/")}
    assert operator_recipients(write_repo(tmp_path / "b", bare)) == ()
    files["keys/operators/carol.pub"] = "# nothing here\n"
    with pytest.raises(SecretError) as info:
        operator_recipients(write_repo(tmp_path / "c", files))
    assert str(info.value).startswith("keys/operators/carol.pub: holds no public key — ")
