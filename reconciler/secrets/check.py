"""``validate``'s secret checks (SPEC §8): who would fail to decrypt what, decided from the rules.

Takes a Snapshot (a working tree in CI), its Inventory and the effective
Nodes that render; produces problems, each ``(text, nodes it affects)``, for
``validate`` to print once with its nodes (issue 12). No identity is needed
and none is read: age does not reveal an X25519 payload's recipients (a
stanza holds an ephemeral share, not the recipient), so whether a node can
decrypt a secret is decided from ``secrets.yaml`` and ``keys/`` — the same
rules ``reconciler secret`` encrypts with. A payload encrypted by hand to
other keys than the rule's is not detected here; a run says so on the host,
and ``secret rekey`` makes it agree with the rules.

The problems, each naming the file:

* a node that reads a secret whose rule does not name it (an encrypted
  file it renders; a ``!age`` value of a host file that applies to it, which
  one of its templates reads);
* a rule naming an unknown node or meta-node;
* a node that reads secrets without ``keys/nodes/<node>.pub``;
* an encrypted file (or a host file holding ``!age`` values) that no rule
  matches; a ``.age`` file that is not an age payload;
* a plaintext file under ``templates/<app>/<state>/`` that a rule matches
  (committed by mistake).

"Reads a ``!age`` value" is decided conservatively from text, since whether
a template reads a variable is only known by rendering it with the
plaintext: a node reads the value ``vars.a.b`` of a host file of its chain
(``_defaults.yaml``, its meta-nodes', its own) when one of its ``.j2``
templates contains the word ``a`` — all ``.j2`` files of ``templates/``
when one of its templates includes or imports another — and every such value
when it renders a ``.j2.age`` template, which cannot be read without a key.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from reconciler.errors import SecretError
from reconciler.git.snapshot import GIT_FILEMODE_LINK, Snapshot
from reconciler.pipeline.inventory import APP_DEFAULTS, Inventory, Node
from reconciler.secrets.rules import NODE_KEYS, SECRETS_FILE, SecretRules, load_rules

AGE_SUFFIX = ".age"
AGE_TAG = "!age"
_INCLUDES = re.compile(r"{%-?\s*(include|import|from|extends)\b")

Problem = tuple[str, list[str]]  # (one line naming the file, the nodes it affects)


def _age_keys(snapshot: Snapshot, path: str) -> list[str]:
    """The dotted keys under ``vars`` of the ``!age`` values of host file ``path``.

    Found in the YAML node graph (composed, never constructed: no constructor
    for the tag is needed, and an alias bomb is not expanded — the inventory
    already refused one)."""
    import yaml

    raw = snapshot.read(path)
    if AGE_TAG.encode() not in raw:
        return []
    try:
        root = yaml.compose(raw, Loader=yaml.CSafeLoader)
    except yaml.YAMLError:
        return []  # the inventory names the file
    found: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            pairs = [(str(key.value), value) for key, value in node.value]
        elif isinstance(node, yaml.SequenceNode):
            # A value in a list is read through its list's name (users.0.password):
            # walking mappings only missed it, and its file's rule and readers.
            pairs = [(str(i), value) for i, value in enumerate(node.value)]
        else:
            return
        for key, value in pairs:
            name = f"{prefix}.{key}" if prefix else key
            if value.tag == AGE_TAG:
                found.append(name)
            else:
                walk(value, name)

    if path.endswith(f"/{APP_DEFAULTS}"):
        walk(root, "")  # an app's defaults.yaml is vars at the top level (SPEC §10)
    elif isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            if key.value == "vars":
                walk(value, "")
    return found


def _node_sources(snapshot: Snapshot, node: Node) -> dict[str, str]:
    """Destination-relative path → the repository path a node renders it from
    (``templates/<app>/<state>/…``; the state's file wins over default's, SPEC §1)."""
    out: dict[str, str] = {}
    for app in node.apps:
        for state in dict.fromkeys(("default", app.state)):
            base = f"templates/{app.name}/{state}"
            for entry in snapshot.walk(base):
                dest = entry.path.removesuffix(AGE_SUFFIX).removesuffix(".j2")
                out[dest] = f"{base}/{entry.path}"
    return out


def _template_texts(
    snapshot: Snapshot, paths: Iterable[str], cache: dict[str, str]
) -> Iterator[str]:
    """The text of each template of ``paths``; ``cache``: read once per validate, as
    many nodes share an app's templates."""
    for path in paths:
        if path not in cache:
            try:
                cache[path] = snapshot.read(path).decode("utf-8", "replace")
            except KeyError:
                cache[path] = ""
        yield cache[path]


def _reads(
    snapshot: Snapshot, sources: Sequence[str], names: set[str], cache: dict[str, str]
) -> set[str]:
    """Which top-level ``names`` the templates ``sources`` of a node may read."""
    if not names:
        return set()
    if any(s.endswith(".j2" + AGE_SUFFIX) for s in sources):
        return set(names)  # an encrypted template: its text is unknown here
    templates = [s for s in sources if s.endswith(".j2")]
    texts = list(_template_texts(snapshot, templates, cache))
    if any(_INCLUDES.search(t) for t in texts):
        everything = [f"templates/{e.path}" for e in snapshot.walk("templates")]
        every = (p for p in everything if p.endswith(".j2"))
        texts = list(_template_texts(snapshot, every, cache))
    joined = "\n".join(texts)
    return {n for n in names if re.search(rf"\b{re.escape(n)}\b", joined)}


def secret_problems(
    snapshot: Snapshot, inventory: Inventory, nodes: Sequence[Node], *, complete: bool = True
) -> list[Problem]:
    """Every secret problem of ``snapshot`` (see the module docstring), in a stable order.

    ``nodes``: the effective nodes that render (validate skips the others,
    whose host files already have a problem). ``complete``: False when some
    host file is invalid, so that ``inventory`` lacks it: a rule's names
    and members are then unknowable, and the checks that need them (unknown
    names, nodes a rule does not name) wait until the host files are fixed.
    Never raises for what it checks: an unusable ``secrets.yaml`` or key
    file is itself one problem, and the checks that need the rules are
    skipped then.
    """
    problems: list[Problem] = []
    unknown: list[SecretError] = []
    try:
        rules = load_rules(snapshot, inventory, unknown=unknown)
    except SecretError as exc:
        return [(str(exc), [])]
    if complete:
        problems += [(str(error), []) for error in unknown]
    encrypted = [
        f"templates/{e.path}" for e in snapshot.walk("templates") if e.path.endswith(AGE_SUFFIX)
    ]
    host_secrets = {
        f"hosts/{name}": keys
        for name, is_dir in snapshot.listdir("hosts")
        if not is_dir and name.endswith((".yaml", ".yml"))
        for keys in [_age_keys(snapshot, f"hosts/{name}")]
        if keys
    }
    for name, is_dir in snapshot.listdir("templates"):
        # Per-app defaults (SPEC §10) hold vars as host files do, !age values included.
        path = f"templates/{name}/{APP_DEFAULTS}"
        if is_dir and (APP_DEFAULTS, False) in snapshot.listdir(f"templates/{name}"):
            keys = _age_keys(snapshot, path)
            if keys:
                host_secrets[path] = keys
    problems += _unmatched(snapshot, rules, encrypted, host_secrets)
    if not encrypted and not host_secrets:
        return problems

    not_named: dict[str, list[str]] = {}  # problem text → nodes
    keyless: list[Problem] = []
    texts: dict[str, str] = {}  # template path → text, shared by the nodes
    for node in nodes:
        sources = list(_node_sources(snapshot, node).values())
        reads = [s for s in sources if s.endswith(AGE_SUFFIX)]
        for host_file in (*node.sources, *node.defaults_files):
            keys = host_secrets.get(host_file, [])
            tops = {k.split(".", 1)[0] for k in keys}
            read = _reads(snapshot, sources, tops, texts)
            if read:
                reads.append(host_file)
        for path in reads:
            rule = rules.rule_for(path)
            if rule is None:
                continue  # reported once, by _unmatched
            if complete and node.name not in rule.nodes:
                text = (
                    f"{path}: read by a node that {rule.where} does not name, so it cannot "
                    "decrypt it — add the node (or a meta-node of it) to the rule's 'to' and "
                    "run 'reconciler secret rekey', or stop it reading the secret"
                )
                not_named.setdefault(text, []).append(node.name)
        if reads and not rules.node_keys.get(node.name):
            keyless.append(
                (
                    f"{NODE_KEYS}/{node.name}.pub: missing, and node {node.name} reads "
                    f"secrets ({reads[0]}) — run 'reconciler keygen' on the host and commit "
                    f"the line it prints as {NODE_KEYS}/{node.name}.pub, then "
                    "'reconciler secret rekey'",
                    [node.name],
                )
            )
    problems += [(text, names) for text, names in not_named.items()]
    problems += keyless
    return problems


def _unmatched(
    snapshot: Snapshot,
    rules: SecretRules,
    encrypted: Sequence[str],
    host_secrets: dict[str, list[str]],
) -> list[Problem]:
    """Encrypted files and ``!age`` host files no rule matches, ``.age`` files that are
    not age, and plaintext destination files a rule matches."""
    from reconciler.secrets.age import is_age_payload

    out: list[Problem] = []
    for path in [*encrypted, *sorted(host_secrets)]:
        if rules.rule_for(path) is None:
            what = "holds !age values" if path in host_secrets else "encrypted"
            out.append(
                (
                    f"{path}: {what}, but no rule of {SECRETS_FILE} matches it, so no node "
                    f"may read it — add a rule '- path: {path}' with 'to: [the nodes that "
                    "read it]' and run 'reconciler secret rekey'",
                    [],
                )
            )
    for path in encrypted:
        if not is_age_payload(snapshot.read(path)):
            out.append(
                (
                    f"{path}: named .age but not an age payload — encrypt the plaintext with "
                    f"'reconciler secret encrypt {path.removesuffix(AGE_SUFFIX)}'",
                    [],
                )
            )
    if not rules.rules:
        return out
    for entry in snapshot.walk("templates"):
        path = f"templates/{entry.path}"
        if path.endswith(AGE_SUFFIX) or entry.path.count("/") < 2:
            continue  # encrypted, or app.yaml and the like (not a state's file)
        if entry.filemode == GIT_FILEMODE_LINK:
            continue  # a desired symlink (SPEC §9): a link target, never encrypted
        rule = rules.rule_for(path)
        if rule is not None:
            out.append(
                (
                    f"{path}: plaintext, but {rule.where} makes it a secret (committed by "
                    f"mistake?) — run 'reconciler secret encrypt {path}' and change the secret "
                    "(git history keeps the plaintext), or narrow the rule (e.g. **/*.age)",
                    [],
                )
            )
    return out
