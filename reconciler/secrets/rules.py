"""Who may decrypt what: ``keys/`` and ``secrets.yaml`` of a Snapshot → SecretRules (SPEC §8).

Takes a :class:`~reconciler.git.snapshot.Snapshot` (a commit's tree on a
host, a working tree for operators' commands) and the
:class:`~reconciler.pipeline.inventory.Inventory` loaded from the same
snapshot; produces :class:`SecretRules`, which answers for a repository path
which rule covers it, which nodes may read it and the recipients to encrypt
it to. Everything is read through the Snapshot, never from a working tree
behind its back, so the rules are those of the commit being rendered.

* ``keys/nodes/<node>.pub`` — the node's recipient(s);
  ``keys/operators/<name>.pub`` — operators' recipients, added to every
  secret (an operator can always re-encrypt and rotate).
* ``secrets.yaml`` — a list of ``{path: <gitignore-style glob of repository
  paths>, to: [node or meta-node, …]}`` rules, first match wins (SOPS
  ``creation_rules``); meta-nodes are expanded with the inventory's
  ``members`` (the same commit's host files). Checked against
  ``repo-layout/schemas/secrets.schema.json``.

Errors are :class:`~reconciler.errors.SecretError` naming ``secrets.yaml``
(with the rule's number) or the key file, and saying what to do.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reconciler.errors import InventoryError, SecretError, did_you_mean
from reconciler.git.snapshot import Snapshot
from reconciler.pipeline.inventory import Inventory, parse_yaml, schema_problems
from reconciler.secrets.age import Recipient, parse_recipients

SECRETS_FILE = "secrets.yaml"
NODE_KEYS = "keys/nodes"
OPERATOR_KEYS = "keys/operators"
KEY_SUFFIX = ".pub"
_ADD_KEY_HINT = (
    "run 'reconciler keygen' on the host and commit the line it prints as "
    "keys/nodes/{node}.pub (or the host's ssh_host_ed25519_key.pub)"
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Rule:
    """A Rule is one entry of ``secrets.yaml``: a glob of repository paths and its readers."""

    number: int  # 1-based position in secrets.yaml, for messages
    path: str  # gitignore-style pattern on repository paths, as written
    to: tuple[str, ...]  # node and meta-node names, as written
    nodes: tuple[str, ...]  # ``to`` expanded to nodes, first-seen order

    @property
    def where(self) -> str:
        """``secrets.yaml rule 2 (templates/postgresql/**)``: how messages name the rule."""
        return f"{SECRETS_FILE} rule {self.number} ({self.path})"


@dataclass(frozen=True, slots=True, kw_only=True)
class SecretRules:
    """SecretRules are a commit's ``secrets.yaml`` rules and ``keys/`` recipients."""

    rules: tuple[Rule, ...]
    node_keys: Mapping[str, tuple[Recipient, ...]]  # node name → keys/nodes/<node>.pub
    operator_keys: Mapping[str, tuple[Recipient, ...]]  # name → keys/operators/<name>.pub
    # One compiled pathspec per rule, in rule order (not compared, not shown).
    _specs: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    def rule_for(self, repo_path: str) -> Rule | None:
        """The first rule whose ``path`` matches ``repo_path`` (e.g.
        ``templates/db/default/etc/db.pass.age``, ``hosts/web1.yaml``), or None."""
        for rule, spec in zip(self.rules, self._specs, strict=True):
            if spec.match_file(repo_path):
                return rule
        return None

    def readers(self, repo_path: str) -> tuple[str, ...]:
        """The nodes that may decrypt ``repo_path``: its rule's nodes, meta-nodes
        expanded; () when no rule matches."""
        rule = self.rule_for(repo_path)
        return rule.nodes if rule is not None else ()

    def operators(self) -> tuple[Recipient, ...]:
        """Every operator's recipient, in file-name order, duplicates dropped."""
        return _unique(r for name in sorted(self.operator_keys) for r in self.operator_keys[name])

    def recipients(self, repo_path: str) -> tuple[Recipient, ...]:
        """The recipients to encrypt ``repo_path`` to: the keys of its rule's nodes
        (rule order), then every operator's key; duplicates dropped.

        Raises SecretError when no rule matches (naming ``secrets.yaml``), when
        a node of the rule has no ``keys/nodes/<node>.pub`` (naming that file),
        or when the result would be empty (no node and no operator key).
        """
        rule = self.rule_for(repo_path)
        if rule is None:
            raise SecretError(
                f"no rule of {SECRETS_FILE} matches {repo_path}",
                where=SECRETS_FILE,
                hint=f"add a rule '- path: {repo_path}' with 'to: [nodes]' that may read it",
            )
        found: list[Recipient] = []
        for node in rule.nodes:
            keys = self.node_keys.get(node)
            if not keys:
                raise SecretError(
                    f"no key for node {node}, which {rule.where} names for {repo_path}",
                    where=f"{NODE_KEYS}/{node}{KEY_SUFFIX}",
                    hint=_ADD_KEY_HINT.format(node=node),
                )
            found.extend(keys)
        out = _unique([*found, *self.operators()])
        if not out:
            raise SecretError(
                f"{rule.where} names no node and there is no operator key: "
                f"no one could decrypt {repo_path}",
                where=SECRETS_FILE,
                hint=f"add your key as {OPERATOR_KEYS}/<name>{KEY_SUFFIX} or name nodes in 'to'",
            )
        return out


def _unique(recipients: Any) -> tuple[Recipient, ...]:
    seen: dict[str, Recipient] = {}
    for r in recipients:
        seen.setdefault(r.text, r)
    return tuple(seen.values())


def _keys(snapshot: Snapshot, directory: str) -> dict[str, tuple[Recipient, ...]]:
    """name → recipients of every ``<directory>/<name>.pub`` (other files ignored)."""
    out: dict[str, tuple[Recipient, ...]] = {}
    for name, is_dir in snapshot.listdir(directory):
        if is_dir or not name.endswith(KEY_SUFFIX) or name == KEY_SUFFIX:
            continue
        path = f"{directory}/{name}"
        out[name.removesuffix(KEY_SUFFIX)] = parse_recipients(snapshot.read(path), where=path)
    return out


def operator_recipients(snapshot: Snapshot) -> tuple[Recipient, ...]:
    """Every operator's recipient in ``keys/operators/*.pub`` of ``snapshot``, in
    file-name order, duplicates dropped; () when there is none.

    What a host encrypts its drift captures to (``report.encrypt_captures``,
    SPEC §8), read without ``secrets.yaml`` or the inventory: a capture is
    for the operators only. Raises SecretError naming the key file for a
    ``.pub`` that holds no recipient.
    """
    keys = _keys(snapshot, OPERATOR_KEYS)
    return _unique(r for name in sorted(keys) for r in keys[name])


def load_rules(
    snapshot: Snapshot, inventory: Inventory, *, unknown: list[SecretError] | None = None
) -> SecretRules:
    """The secret rules and keys of ``snapshot`` (SPEC §8), nodes named in rules
    expanded with ``inventory`` (loaded from the same snapshot).

    No ``secrets.yaml``: no rules (every secret then lacks one, which
    :meth:`SecretRules.recipients` reports). Raises SecretError naming
    ``secrets.yaml`` for a file that is not a list of ``{path, to}`` rules
    (schema, with line numbers) or a rule naming an unknown node or
    meta-node; naming the key file for a ``.pub`` that holds no recipient.

    ``unknown``: when given (``validate``, which reports every problem at
    once), each unknown name of a rule is appended to it as a SecretError and
    left out of the rule's nodes instead of raised.
    """
    import pathspec

    rules: list[Rule] = []
    specs: list[Any] = []
    try:
        raw = snapshot.read(SECRETS_FILE)
    except KeyError:
        raw = None
    if raw is not None:
        try:
            data = parse_yaml(raw, SECRETS_FILE)
        except InventoryError as exc:
            raise SecretError(str(exc)) from exc
        if data is None:
            data = []
        problems = schema_problems("secrets", data, raw, SECRETS_FILE)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise SecretError(problems[0] + more)
        known = set(inventory.files)
        for number, entry in enumerate(data, 1):
            names = tuple(entry["to"])
            nodes: list[str] = []
            for name in names:
                if name not in known:
                    error = SecretError(
                        f"rule {number} ({entry['path']}) names {name!r}, which is no node "
                        f"or meta-node{did_you_mean(name, known)}",
                        where=SECRETS_FILE,
                        hint=f"add hosts/{name}.yaml or correct the name",
                    )
                    if unknown is None:
                        raise error
                    unknown.append(error)
                    continue
                nodes.extend(n for n in inventory.members(name) if n not in nodes)
            try:
                specs.append(pathspec.GitIgnoreSpec.from_lines([entry["path"]]))
            except (ValueError, TypeError) as exc:
                raise SecretError(
                    f"rule {number}: {entry['path']!r} is not a gitignore-style pattern ({exc})",
                    where=SECRETS_FILE,
                    hint="write a glob such as templates/postgresql/**",
                ) from exc
            rules.append(Rule(number=number, path=entry["path"], to=names, nodes=tuple(nodes)))
    return SecretRules(
        rules=tuple(rules),
        node_keys=_keys(snapshot, NODE_KEYS),
        operator_keys=_keys(snapshot, OPERATOR_KEYS),
        _specs=tuple(specs),
    )
