"""Load stage: ``hosts/*.yaml`` of a Snapshot → Inventory → effective Node.

Takes a :class:`~reconciler.git.snapshot.Snapshot`; produces an :class:`Inventory`
(every host file parsed and checked against ``repo-layout/schemas``) and,
for one node name, the effective :class:`Node` by the merge rules of SPEC §1:
``_defaults``, then every meta-node containing the node in topological order
of the include graph (ties by file name), then the node's own file.

Every host file is checked on every run, because an invalid file could be a
meta-node of any node (SPEC §6: fail closed).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import heapq
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any

import yaml

from reconciler.errors import InventoryError, SourceError, UsageError, did_you_mean
from reconciler.git.repo import valid_node_name
from reconciler.git.snapshot import Snapshot
from reconciler.secrets.age import AGE_TAG, ARMOR_BEGIN, age_marker, is_age_marker

DEFAULTS = "_defaults"
DEFAULT_STATE = "default"
STATE_FLAG = "--state"  # where a state given by ``pull``/``diff --state`` comes from


# ------------------------------------------------------------------ schemas


@cache
def _validators() -> tuple[Any, Any]:
    """The (node, app) JSON-Schema validators, built once per process."""
    import jsonschema
    from referencing import Registry, Resource

    base = resources.files("reconciler") / "schemas"
    node_schema = json.loads((base / "node.schema.json").read_text(encoding="utf-8"))
    app_schema = json.loads((base / "app.schema.json").read_text(encoding="utf-8"))
    registry: Registry[Any] = Registry().with_resources(
        [
            ("node.schema.json", Resource.from_contents(node_schema)),
            ("app.schema.json", Resource.from_contents(app_schema)),
        ]
    )
    cls = jsonschema.Draft202012Validator
    return cls(node_schema, registry=registry), cls(app_schema, registry=registry)


def _normalise(value: Any) -> Any:
    """YAML timestamps become ISO strings, so data stays JSON-shaped."""
    if isinstance(value, dict):
        return {str(k): _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_normalise(v) for v in value]
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return value


def _yaml_line(text: str, path: Iterable[str | int]) -> int | None:
    """1-based line of the YAML node (or mapping key) at ``path``, if it can be found."""
    try:
        node = yaml.compose(text, Loader=yaml.CSafeLoader)
    except yaml.YAMLError:
        return None
    if node is None:
        return None
    mark = node.start_mark
    for part in path:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if key.value == str(part):
                    mark, node = key.start_mark, value
                    break
            else:
                break
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]
            mark = node.start_mark
        else:
            break
    return int(mark.line) + 1


def _dotted(path: Iterable[str | int]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


_KINDS = {
    "object": "a mapping",
    "array": "a list",
    "string": "a string",
    "boolean": "true or false",
    "integer": "a whole number",
    "number": "a number",
    "null": "nothing",
}


def _kind(value: Any) -> str:
    """What a YAML value is, in the words of :data:`_KINDS`."""
    if isinstance(value, bool):
        return _KINDS["boolean"]
    for kind, types in (
        ("object", dict),
        ("array", list),
        ("string", str),
        ("integer", int),
        ("number", float),
    ):
        if isinstance(value, types):
            return _KINDS[kind]
    return _KINDS["null"]


def _short(value: Any) -> str:
    """A repr of ``value`` cut to about 40 characters.

    A problem message may show the value at fault, never a file: a host file
    that is really a text file (once, ``/etc/shadow`` through a symlink) must
    not come back whole in ``validate``'s output or a run's report.
    """
    import reprlib

    cut = reprlib.Repr()
    cut.maxstring = cut.maxother = 40
    cut.maxlist = cut.maxdict = 3
    cut.maxlevel = 2
    return cut.repr(value)


def _schema_message(error: Any) -> str:
    """One readable sentence for a jsonschema ValidationError, ending in what to do.

    Values are shown cut short (:func:`_short`); a wrong type names the
    kinds only, and at most three unknown keys are named.
    """
    path = list(error.absolute_path)
    where = _dotted(path)
    at = f"{where}: " if where else ""
    if error.validator == "additionalProperties":
        known = sorted(error.schema.get("properties", {}))
        extra = sorted(set(error.instance) - set(known))
        named = ", ".join(_short(k) for k in extra[:3])
        if len(extra) > 3:
            named += f" and {len(extra) - 3} more"
        elif len(extra) == 1:  # one misspelt key: offer the known key it is closest to
            named += did_you_mean(extra[0], known)
        hint = f" or use one of the known keys: {', '.join(known)}" if known else ""
        return f"{at}unknown key {named} — remove it{hint}"
    if path and path[-1] == "mode" and isinstance(error.instance, int):
        return (
            f'{where}: mode must be a quoted octal string such as "0640" — quote it '
            f"(YAML reads an unquoted mode as the number {error.instance})"
        )
    if error.validator == "pattern" and path and path[-1] == "mode":
        return (
            f'{where}: mode {_short(error.instance)} is not an octal mode such as "0640" — '
            "write three or four octal digits in quotes"
        )
    if error.validator == "oneOf" and len(path) == 2 and path[0] == "apps":
        return (
            f"{where}: an app is a name or a one-key mapping {{app: state}}, "
            f"got {_short(error.instance)} — write '- app' or '- app: state'"
        )
    if error.validator == "pattern" and isinstance(error.instance, str):
        return (
            f"{where}: {_short(error.instance)} is not a valid name or path here — "
            "see repo-layout/README.md"
        )
    if error.validator == "type":
        wanted = error.validator_value
        wanted = [wanted] if isinstance(wanted, str) else list(wanted)
        expected = " or ".join(f"{w!r} ({_KINDS.get(w, w)})" for w in wanted)
        subject = f"{where} must" if where else "the file must"
        return (
            f"{subject} be of type {expected}, not {_kind(error.instance)} — "
            "see repo-layout/README.md"
        )
    # jsonschema's own sentence, with the value at fault cut short.
    message = str(error.message).replace(repr(error.instance), _short(error.instance))
    return f"{at}{message[:200]} — see repo-layout/README.md"


@cache
def _named_validator(name: str) -> Any:
    """The JSON-Schema validator of ``reconciler/schemas/<name>.schema.json``, built once."""
    import jsonschema

    base = resources.files("reconciler") / "schemas"
    schema = json.loads((base / f"{name}.schema.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def schema_problems(name: str, data: Any, raw: bytes, path: str) -> list[str]:
    """Every way ``data`` (parsed from ``raw``, the file at repository path ``path``)
    breaks ``repo-layout/schemas/<name>.schema.json``: one line each, naming the
    file and line, ending in what to do; [] when it conforms. For files beside
    hosts/ and app.yaml that have a schema of their own (``secrets.yaml``, SPEC §8)."""
    return _schema_problems(_named_validator(name), data, raw.decode("utf-8", "replace"), path)


def _schema_problems(validator: Any, data: Any, text: str, path: str) -> list[str]:
    problems = []
    for error in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.path))):
        at = list(error.absolute_path)
        if error.validator == "additionalProperties" and isinstance(error.instance, dict):
            extra = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            at += extra[:1]  # the line of the unknown key, not of its mapping
        line = _yaml_line(text, at)
        where = f"{path}:{line}" if line else path
        problems.append(f"{where}: {_schema_message(error)}")
    return problems


# Bounds on one YAML document of the repository (host files, app.yaml). Anchors
# and aliases (``<<: *base``) are honest YAML and stay: a thousand uses of a
# small mapping is fine. What is refused is what they can be made to cost: a
# 372-byte host file of nested aliases once expanded to hundreds of millions of
# values — 20 s, 1.6 GB and a 254 MB inventory cache on every node, one more
# level 15 GB. 10,000 nodes added by aliases is far beyond the honest uses and
# costs milliseconds. Nesting is bounded too: Python's recursion limit is ~1,000
# and a 2-KB file of brackets reached it.
MAX_ALIAS_NODES = 10_000
MAX_YAML_DEPTH = 100


def _expansion_problem(root: Any) -> tuple[str, str] | None:
    """Why the composed YAML graph ``root`` must not be built and what to do, or None.

    The composer shares one node for an anchor and all its aliases; what
    later code pays for is the tree they expand to. Its size and depth are
    counted here on the graph, each mapping and sequence once (linear in the
    file), before anything is constructed. An alias inside its own anchor (a
    cycle) is refused as well: it would be an endless value.
    """
    size: dict[int, int] = {}  # id(collection) -> nodes of its expanded tree
    height: dict[int, int] = {}
    on_path: set[int] = set()
    written = 1  # nodes as written in the file: every collection once, every scalar
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        children = _children(node)
        if done:
            on_path.discard(key)
            total, tallest = 1, 0
            for child in children:
                if isinstance(child, yaml.ScalarNode):
                    total, tallest = total + 1, max(tallest, 1)
                else:
                    total, tallest = total + size[id(child)], max(tallest, height[id(child)])
            size[key], height[key] = total, tallest + 1
            if tallest >= MAX_YAML_DEPTH:
                return (
                    f"values nested deeper than {MAX_YAML_DEPTH} levels",
                    "flatten the structure",
                )
            continue
        if key in size:
            continue  # an alias of a collection already counted
        if key in on_path:
            return (
                "an alias inside its own anchor makes an endless value",
                "refer to the anchor only after its value ends",
            )
        on_path.add(key)
        stack.append((node, True))
        for child in reversed(children):
            if isinstance(child, yaml.ScalarNode):
                written += 1
            elif id(child) not in size:
                written += 1
                stack.append((child, False))
    if size.get(id(root), 1) - written > MAX_ALIAS_NODES:
        return (
            f"YAML aliases expand to more than {MAX_ALIAS_NODES:,} values",
            "write the values out, or use fewer and smaller anchors",
        )
    return None


def _children(node: Any) -> list[Any]:
    """The nodes directly inside a composed YAML node: keys and values, or items."""
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def suspension_end(until: Any) -> dt.datetime | None:
    """``suspended.until`` (SPEC §4) as an aware datetime; None when it is not a time.

    ISO 8601 as Python reads it: a date, or a date and time with ``Z`` or an
    offset; a time without either is UTC. YAML's own timestamps arrive here as
    ISO strings (:func:`_normalise`). The inventory refuses a host file whose
    ``until`` this cannot read, so a typo never suspends a node forever.
    """
    if not isinstance(until, str) or not until:
        return None
    try:
        end = dt.datetime.fromisoformat(until.replace("Z", "+00:00"))
    except ValueError:
        return None
    return end if end.tzinfo is not None else end.replace(tzinfo=dt.UTC)


class _RepoLoader(yaml.CSafeLoader):
    """The safe C loader, plus the ``!age`` tag of SPEC §8 (see :func:`_age_value`)."""

    repo_path = ""


def _age_value(loader: _RepoLoader, node: yaml.Node) -> dict[str, str]:
    """``!age`` on a scalar holding an ASCII-armored age payload (SPEC §8 encrypted values).

    Built as a JSON-shaped marker (:func:`reconciler.secrets.age.age_marker`),
    so that the inventory cache (JSON) and the render keys (a digest of the
    context) hold the ciphertext as any other value; nothing is decrypted
    here: a template that reads the value decrypts it (``pipeline/render.py``).
    Anything but an armored age payload is an InventoryError naming the file
    and line.
    """
    line = node.start_mark.line + 1
    where = f"{loader.repo_path}:{line}"
    value = node.value if isinstance(node, yaml.ScalarNode) else None
    if not isinstance(value, str) or not value.lstrip().startswith(ARMOR_BEGIN.decode()):
        raise InventoryError(
            "a !age value must be an ASCII-armored age payload (-----BEGIN AGE ENCRYPTED "
            "FILE-----), written as a block scalar (|)",
            where=where,
            hint="make it with 'reconciler secret encrypt --var' or 'age -a'",
        )
    return age_marker(value, where)


_RepoLoader.add_constructor(AGE_TAG, _age_value)


def parse_yaml(text: bytes, path: str) -> Any:
    """Parse one YAML document of the repository; InventoryError names ``path`` and line.

    The C loader composes the node graph, :func:`_expansion_problem` bounds
    what its aliases expand to (:data:`MAX_ALIAS_NODES`, :data:`MAX_YAML_DEPTH`),
    then the graph is constructed. Used for every YAML file of the desired-state
    repository: ``hosts/*.yaml``, ``app.yaml``, and the operators' host-file edits.
    """
    loader = _RepoLoader(text)
    loader.repo_path = path
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        refused = _expansion_problem(node)
        if refused is not None:
            raise InventoryError(refused[0], where=path, hint=refused[1])
        return _normalise(loader.construct_document(node))
    except UnicodeDecodeError as exc:
        raise InventoryError(f"{path}: not UTF-8 text — save it as UTF-8") from exc
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else path
        problem = getattr(exc, "problem", None) or str(exc)
        raise InventoryError(f"{where}: invalid YAML: {problem} — fix the syntax") from exc
    finally:
        loader.dispose()


# app.yaml by git blob id → its parsed and checked data. The render stage asks for
# an app's app.yaml about six times (settings, files:, when:, directories:,
# absent:, Jinja2 settings), and an agent asks again every run: one parse and
# one schema check per blob (SPEC §7). A blob id names the bytes, and the
# checks are this process's code, so a verdict cannot go stale; only valid
# files are kept (a bad one fails, naming its line, on every call). Bounded:
# emptied when full, an agent's repository changes its app.yaml rarely.
_APP_CONFIGS: dict[str, Any] = {}
_APP_CONFIGS_MAX = 512


def load_app_config(snapshot: Snapshot, app: str, *, node: str | None = None) -> Mapping[str, Any]:
    """Parse and check ``templates/<app>/app.yaml``; {} when there is none.

    Returns a fresh copy on every call (a caller may change it); the parse
    and the schema check run once per git blob (a working tree: every call).
    Raises InventoryError naming the file and line (SPEC §1 app.yaml), and
    with ``node`` the app and the node whose run read it: an app.yaml is
    shared by many nodes, and the operator reading a host's report must see
    it is this host's.
    """
    path = f"templates/{app}/app.yaml"
    blob = snapshot.blob_id(path)
    if blob is not None and blob in _APP_CONFIGS:
        return copy.deepcopy(_APP_CONFIGS[blob])
    try:
        raw = snapshot.read(path)
    except KeyError:
        return {}
    data = parse_yaml(raw, path)
    if data is None:
        return {}
    problems = _schema_problems(_validators()[1], data, raw.decode("utf-8", "replace"), path)
    if problems:
        problem, dash, hint = problems[0].partition(" — ")
        whose = f" (app {app}, node {node})" if node is not None else ""
        raise InventoryError(problem + whose + dash + hint)
    if blob is not None:
        if len(_APP_CONFIGS) >= _APP_CONFIGS_MAX:
            _APP_CONFIGS.clear()
        _APP_CONFIGS[blob] = copy.deepcopy(data)
    return data  # type: ignore[no-any-return]


# ---------------------------------------------------------------- inventory


@dataclass(frozen=True, slots=True, kw_only=True)
class HostFile:
    """A HostFile is one parsed and schema-checked file of ``hosts/``."""

    name: str
    path: str
    data: Mapping[str, Any]

    @property
    def is_meta(self) -> bool:
        """True for a meta-node (a file with ``include_nodes``)."""
        return "include_nodes" in self.data


@dataclass(frozen=True, slots=True, kw_only=True)
class Inventory:
    """An Inventory is every host file of a repository and its include graph."""

    files: Mapping[str, HostFile]
    defaults: HostFile | None = None

    @property
    def nodes(self) -> list[str]:
        """Names of nodes (not meta-nodes), sorted."""
        return sorted(n for n, f in self.files.items() if not f.is_meta)

    @property
    def meta_nodes(self) -> list[str]:
        """Names of meta-nodes, sorted."""
        return sorted(n for n, f in self.files.items() if f.is_meta)

    def members(self, name: str) -> list[str]:
        """Every node (not meta-node) that ``name`` stands for, in include order.

        A node stands for itself. Raises InventoryError for an unknown name.
        """
        if name not in self.files:
            raise InventoryError(f"hosts/{name}.yaml: no such node or meta-node")
        out: list[str] = []

        def visit(n: str) -> None:
            f = self.files[n]
            if not f.is_meta:
                if n not in out:
                    out.append(n)
                return
            for child in f.data["include_nodes"]:
                visit(child)

        visit(name)
        return out

    def containing(self, name: str) -> list[str]:
        """Meta-nodes that contain ``name`` directly or transitively, outer first.

        Order: topological order of the include graph (a meta-node after every
        meta-node that includes it), ties broken by file name (SPEC §6).
        """
        parents: dict[str, set[str]] = {}
        for meta, f in self.files.items():
            for child in f.data.get("include_nodes", ()):
                parents.setdefault(child, set()).add(meta)
        ancestors: set[str] = set()
        todo = [name]
        while todo:
            for p in parents.get(todo.pop(), ()):
                if p not in ancestors:
                    ancestors.add(p)
                    todo.append(p)
        indegree = {a: sum(1 for p in parents.get(a, ()) if p in ancestors) for a in ancestors}
        # Ties by file name (SPEC §6): "web-eu.yaml" < "web.yaml", unlike the stems.
        ready = [(self.files[a].path, a) for a, d in indegree.items() if d == 0]
        heapq.heapify(ready)
        order: list[str] = []
        while ready:
            _, meta = heapq.heappop(ready)
            order.append(meta)
            for child in self.files[meta].data["include_nodes"]:
                if child in indegree:
                    indegree[child] -= 1
                    if indegree[child] == 0:
                        heapq.heappush(ready, (self.files[child].path, child))
        return order


def _check_graph(
    files: Mapping[str, HostFile], present: set[str]
) -> list[tuple[tuple[str, ...], str]]:
    """Unknown includes and cycles among the parsed files; ``present``: every stem in hosts/.

    Each problem comes with the stems of the files it makes invalid.
    """
    problems: list[tuple[tuple[str, ...], str]] = []
    for f in files.values():
        for child in f.data.get("include_nodes", ()):
            if child in present and child not in files:
                continue  # that file has its own problem already
            if child == DEFAULTS or child not in files:
                problems.append(
                    (
                        (f.name,),
                        f"{f.path}: include_nodes: unknown node {child!r} — "
                        f"create hosts/{child}.yaml or remove it from the list",
                    )
                )
    if problems:
        return problems
    state: dict[str, int] = {}  # 1 = on the DFS stack, 2 = done

    def visit(n: str, stack: list[str]) -> None:
        state[n] = 1
        for child in files[n].data.get("include_nodes", ()):
            if state.get(child) == 1:
                cycle = [*stack[stack.index(child) :], child]
                problems.append(
                    (
                        tuple(cycle[:-1]),
                        f"{files[child].path}: include_nodes: cycle {' → '.join(cycle)} — "
                        "remove one of these includes",
                    )
                )
            elif child not in state and child in files:
                visit(child, [*stack, child])
        state[n] = 2

    for name in sorted(files):
        if name not in state:
            visit(name, [name])
    return problems


@dataclass(frozen=True, slots=True, kw_only=True)
class _Scan:
    """Every file of ``hosts/`` parsed and schema-checked, before the include graph."""

    files: Mapping[str, HostFile]  # valid files, _defaults excluded
    defaults: HostFile | None
    problems: tuple[tuple[str | None, str], ...]  # (stem or None, message)
    invalid_data: Mapping[str, Any]  # stem → data of a file that parsed but is invalid
    present: frozenset[str]


# The inventory cache keeps a host file's verdict by git blob id; a verdict
# of older, laxer checks must not stand after an upgrade (a cached
# ``until: never`` or alias bomb would skip the new checks forever). Bump this
# whenever a check of a file's content becomes stricter.
CHECKS_VERSION = "2"


@cache
def checks_key() -> str:
    """The inventory cache's key prefix: CHECKS_VERSION and a digest of the schemas
    the verdicts were checked against (``reconciler/schemas/``), so a verdict of
    other schemas (an upgrade, a local patch) is never trusted, whether or not
    CHECKS_VERSION was bumped. Reads the schema files, never imports jsonschema
    (SPEC §7: a run whose host files are all cached does not pay for it)."""
    base = resources.files("reconciler") / "schemas"
    digest = hashlib.sha256()
    for name in ("node.schema.json", "app.schema.json"):
        digest.update((base / name).read_bytes())
    return f"{CHECKS_VERSION}-{digest.hexdigest()[:16]}"


def _content_problems(data: Any, raw: bytes, path: str) -> list[str]:
    """What is wrong with one parsed host file's content, whatever its name."""
    found = _schema_problems(_validators()[0], data, raw.decode("utf-8", "replace"), path)
    if found:
        return found
    suspended = data.get("suspended") if isinstance(data, dict) else None
    if (
        isinstance(suspended, dict)
        and "until" in suspended
        and suspension_end(suspended["until"]) is None
    ):
        line = _yaml_line(raw.decode("utf-8", "replace"), ["suspended", "until"])
        found.append(
            f"{path}:{line}: suspended.until: {_short(suspended['until'])} is not a time "
            "such as 2026-12-01T00:00:00Z — write an ISO 8601 time or date (UTC unless "
            "it has an offset), or remove until: to stay suspended until resumed"
        )
    return found


def _name_problems(stem: str, data: Any, path: str) -> list[str]:
    """What is wrong with a host file for its name: checked on every run, cached or not."""
    found = []
    if stem == DEFAULTS and isinstance(data, dict) and "include_nodes" in data:
        found.append(f"{path}: include_nodes is not allowed in _defaults — move it to a meta-node")
    if stem != DEFAULTS and not stem[:1].isalnum():
        found.append(f"{path}: a node name must start with a letter or digit — rename the file")
    return found


def _scan_hosts(snapshot: Snapshot, cache: dict[str, Any] | None) -> _Scan:
    problems: list[tuple[str | None, str]] = []
    files: dict[str, HostFile] = {}
    invalid_data: dict[str, Any] = {}
    defaults: HostFile | None = None
    listing = snapshot.listdir("hosts")
    for name, is_dir in listing:
        if not is_dir and name.endswith(".yml"):
            problems.append((None, f"hosts/{name}: host files end in .yaml — rename it"))
            continue
        if is_dir or not name.endswith(".yaml"):
            continue
        path = f"hosts/{name}"
        stem = name[: -len(".yaml")]
        blob = snapshot.blob_id(path)
        key = f"{checks_key()}:{blob}" if cache is not None and blob is not None else None
        if key is not None and cache is not None and key in cache:
            data = cache[key]
            found = []
        else:
            try:
                raw = snapshot.read(path)
            except SourceError as exc:  # a working tree's symlink or FIFO: never read
                problems.append((stem, str(exc)))
                continue
            try:
                data = parse_yaml(raw, path)
            except InventoryError as exc:
                problems.append((stem, str(exc)))
                continue
            data = {} if data is None else data
            found = _content_problems(data, raw, path)
            if not found and key is not None and cache is not None:
                cache[key] = data
        found.extend(_name_problems(stem, data, path))
        if found:
            problems.extend((stem, p) for p in found)
            invalid_data[stem] = data
            continue
        host = HostFile(name=stem, path=path, data=data)
        if stem == DEFAULTS:
            defaults = host
        else:
            files[stem] = host
    return _Scan(
        files=files,
        defaults=defaults,
        problems=tuple(problems),
        invalid_data=invalid_data,
        present=frozenset(n[: -len(".yaml")] for n, d in listing if not d),
    )


_NO_HOSTS = "hosts/: missing — a desired-state repository needs hosts/<node>.yaml"


def inventory_problems(
    snapshot: Snapshot, cache: dict[str, Any] | None = None
) -> tuple[Inventory | None, list[str]]:
    """Parse and check every file of ``hosts/``; return the inventory and all problems.

    The inventory is None when any problem was found: the agent fails closed
    (SPEC §6). Used by :func:`load_inventory`; ``validate`` uses
    :func:`check_hosts`, which keeps the usable part. ``cache`` maps git blob
    ids to already checked file data: a file whose content was checked before
    is not parsed or validated again (SPEC §7: a repository of 10,000 nodes
    must not make every run slower). It is updated in place with the files
    checked now.
    """
    if not snapshot.is_dir("hosts"):
        return None, [_NO_HOSTS]
    scan = _scan_hosts(snapshot, cache)
    problems = [message for _, message in scan.problems]
    problems.extend(message for _, message in _check_graph(scan.files, set(scan.present)))
    if problems:
        return None, problems
    return Inventory(files=scan.files, defaults=scan.defaults), []


@dataclass(frozen=True, slots=True, kw_only=True)
class HostsCheck:
    """A HostsCheck is every problem of ``hosts/`` and the nodes that can still be checked."""

    inventory: Inventory  # the valid files only (every file when there is no problem)
    problems: tuple[str, ...]  # each names the node(s) its file affects, where known
    renderable: tuple[str, ...]  # nodes whose own file, meta-nodes and _defaults are valid
    nodes: tuple[str, ...] = ()  # every node file of hosts/, valid or not (YAML), sorted


def _include_list(data: Any) -> list[str] | None:
    """``include_nodes`` of possibly invalid file data, when it is a list of names."""
    if not isinstance(data, dict):
        return None
    includes = data.get("include_nodes")
    if isinstance(includes, list) and all(isinstance(c, str) for c in includes):
        return includes
    return None


def check_hosts(snapshot: Snapshot) -> HostsCheck:
    """Check every file of ``hosts/`` for ``validate``: all problems, and what is still usable.

    Unlike :func:`inventory_problems` (the agent's fail-closed rule of SPEC
    §6), this keeps the valid part of the inventory so that ``validate`` can
    render every node whose own file, meta-nodes and ``_defaults`` are valid
    and report all problems at once. A problem of a meta-node file names the
    nodes it contains (``[nodes web1, web2]``), one of a node file names that
    node, one of ``_defaults`` says every node. A file that is not even YAML
    names no node: whether it is a meta-node is unknown, so the nodes it
    might contain are still rendered.
    """
    if not snapshot.is_dir("hosts"):
        empty = Inventory(files={})
        return HostsCheck(inventory=empty, problems=(_NO_HOSTS,), renderable=())
    scan = _scan_hosts(snapshot, None)
    graph = _check_graph(scan.files, set(scan.present))
    includes: dict[str, list[str]] = {}
    for stem, f in scan.files.items():
        if f.is_meta:
            includes[stem] = list(f.data["include_nodes"])
    for stem, data in scan.invalid_data.items():
        found = _include_list(data)
        if found is not None and stem != DEFAULTS:
            includes[stem] = found
    # A set: members() tests membership for every node of a meta-node (10,000 in a big fleet).
    nodes = {s for s in scan.files if s not in includes} | {
        s for s in scan.invalid_data if s not in includes and s != DEFAULTS
    }

    def members(stem: str) -> list[str]:
        out: list[str] = []
        seen: set[str] = set()
        todo = [stem]
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            if n in includes:
                todo.extend(reversed(includes[n]))
            elif n in nodes:
                out.append(n)
        return sorted(out)

    def named(stems: Iterable[str | None], message: str) -> str:
        known = [
            s for s in stems if s is not None and (s == DEFAULTS or s in includes or s in nodes)
        ]
        if not known:
            return message  # not a host file, or not YAML: what it would contain is unknown
        if DEFAULTS in known:
            return f"{message} [every node]"
        affected = sorted({n for s in known for n in members(s)})
        if not any(s in includes for s in known):
            return f"{message} [node {', '.join(affected)}]"
        return f"{message} [nodes {', '.join(affected) or 'none'}]"

    problems = [named([stem], message) for stem, message in scan.problems]
    problems.extend(named(stems, message) for stems, message in graph)
    bad = {s for s, _ in scan.problems if s is not None} | {s for st, _ in graph for s in st}
    for stem in sorted(n for n in nodes if not valid_node_name(n)):
        # Only validate refuses these: another node's run does not depend on
        # them, and the node itself is refused by its agent's configuration.
        problems.append(
            named(
                [stem],
                f"hosts/{stem}.yaml: {stem!r} cannot be a node name: git refuses its report "
                f"branch reports/{stem} ('..', '~', '^', ':', '?', '*', '[', '\\', "
                "spaces, a trailing '.' or '.lock') — rename the file",
            )
        )
        bad.add(stem)
    blocked = nodes if DEFAULTS in bad else {n for s in bad for n in members(s)}
    usable = {s: f for s, f in scan.files.items() if s not in bad}
    inventory = Inventory(files=usable, defaults=scan.defaults)
    renderable = tuple(n for n in inventory.nodes if n not in blocked)
    return HostsCheck(
        inventory=inventory,
        problems=tuple(problems),
        renderable=renderable,
        nodes=tuple(sorted(nodes)),
    )


def load_inventory(snapshot: Snapshot, cache: dict[str, Any] | None = None) -> Inventory:
    """Parse and check every host file; raise InventoryError with the first problem.

    ``cache``: see :func:`inventory_problems`.
    """
    inventory, problems = inventory_problems(snapshot, cache)
    if inventory is None:
        more = (
            f" (and {len(problems) - 1} more problem{'s' if len(problems) > 2 else ''}; "
            "run reconciler validate)"
            if len(problems) > 1
            else ""
        )
        raise InventoryError(problems[0] + more)
    return inventory


# --------------------------------------------------------------------- node


@dataclass(frozen=True, slots=True, kw_only=True)
class AppRef:
    """An AppRef is one app of a node, in the state it runs in, and who set that."""

    name: str
    state: str
    origin: str  # host file that listed the app


@dataclass(frozen=True, slots=True, kw_only=True)
class Node:
    """A Node is the effective definition of one server after the merge of SPEC §1."""

    name: str
    state: str
    apps: tuple[AppRef, ...]
    vars: Mapping[str, Any]
    exclude: tuple[str, ...]
    files: Mapping[str, Mapping[str, Any]]
    suspended: Mapping[str, Any] | None
    meta_nodes: tuple[str, ...]
    sources: tuple[str, ...] = field(default=())
    # absent: patterns (SPEC §9), the union over the chain as for exclude, each with
    # the host file that listed it first (errors name it).
    absent: tuple[tuple[str, str], ...] = ()
    # files: pattern → the host file whose entry for it won (errors about its
    # metadata, such as a bad when:, name that file).
    files_origin: Mapping[str, str] = field(default_factory=dict)
    # templates/<app>/defaults.yaml of the node's apps that exist, in app order
    # (SPEC §10 per-app defaults): their vars lie below hosts/_defaults.yaml.
    defaults_files: tuple[str, ...] = ()


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """Mappings merge recursively; any other value in ``over`` replaces (SPEC §1 vars)."""
    out = dict(base)
    for key, value in over.items():
        if (
            isinstance(value, Mapping)
            and isinstance(out.get(key), Mapping)
            and not is_age_marker(value)
            and not is_age_marker(out[key])
        ):  # an encrypted value (SPEC §8) is one value, never merged with a mapping
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def effective_node(
    inventory: Inventory, snapshot: Snapshot, name: str, state_override: str | None = None
) -> Node:
    """Merge ``_defaults``, containing meta-nodes and ``hosts/<name>.yaml`` into a Node.

    ``state_override`` (``pull --state``) replaces the node-level state; a
    per-app state written in a host file still wins (SPEC §6). Raises
    InventoryError for an unknown node, a meta-node name, a missing app, an
    app with neither ``default/`` nor the state's directory, or a state that
    no app of the node has (a typo must not silently become ``default``) —
    UsageError instead when that state came from ``state_override``.
    """
    host = inventory.files.get(name)
    if host is None:
        raise InventoryError(
            f"hosts/{name}.yaml: node {name!r} is not defined — add hosts/{name}.yaml "
            "or set node: in the agent configuration"
        )
    if host.is_meta:
        raise InventoryError(
            f"{host.path}: {name!r} is a meta-node — --node must name a node, not a meta-node"
        )
    metas = inventory.containing(name)
    chain = [
        *([inventory.defaults] if inventory.defaults else []),
        *(inventory.files[m] for m in metas),
        host,
    ]
    state, state_origin = DEFAULT_STATE, "the built-in default"
    apps: dict[str, tuple[str | None, str]] = {}
    variables: dict[str, Any] = {}
    exclude: list[str] = []
    absent: dict[str, str] = {}
    files: dict[str, Mapping[str, Any]] = {}
    files_origin: dict[str, str] = {}
    suspended: Mapping[str, Any] | None = None
    for f in chain:
        d = f.data
        if "state" in d:
            state, state_origin = d["state"], f.path
        for item in d.get("apps", ()):
            app, app_state = (item, None) if isinstance(item, str) else next(iter(item.items()))
            previous = apps.get(app)
            if app_state is None and previous is not None:
                continue  # a plain later mention keeps an earlier explicit state
            apps[app] = (app_state, f.path if previous is None else previous[1])
        variables = deep_merge(variables, d.get("vars", {}))
        exclude.extend(p for p in d.get("exclude", ()) if p not in exclude)
        for pattern in d.get("absent", ()):
            absent.setdefault(pattern, f.path)
        files.update(d.get("files", {}))
        files_origin.update(dict.fromkeys(d.get("files", {}), f.path))
        if "suspended" in d:
            suspended = d["suspended"]
    if state_override is not None:
        state, state_origin = state_override, STATE_FLAG
    refs = tuple(
        AppRef(name=app, state=app_state or state, origin=origin)
        for app, (app_state, origin) in apps.items()
    )
    _check_apps(snapshot, name, refs, state, state_origin)
    defaults, defaults_files = app_defaults(snapshot, refs, variables)
    return Node(
        name=name,
        state=state,
        apps=refs,
        vars=deep_merge(defaults, variables),
        exclude=tuple(exclude),
        files=files,
        suspended=suspended,
        meta_nodes=tuple(metas),
        sources=tuple(f.path for f in chain),
        absent=tuple(absent.items()),
        files_origin=files_origin,
        defaults_files=defaults_files,
    )


APP_DEFAULTS = "defaults.yaml"  # templates/<app>/defaults.yaml (SPEC §10)


def load_app_defaults(snapshot: Snapshot, app: str) -> Mapping[str, Any] | None:
    """Parse ``templates/<app>/defaults.yaml``: the app's default vars; None when absent.

    The file is a mapping of vars (Ansible's ``defaults/main.yml``: no ``vars:``
    key), ``!age`` values allowed (SPEC §8). An empty file is {}. Raises
    InventoryError naming the file (and line) for invalid YAML, or for anything
    but a mapping (``repo-layout/schemas/defaults.schema.json``: checked here in
    Python, as that schema says no more than "a mapping", so that a run never
    imports jsonschema for it).
    """
    path = f"templates/{app}/{APP_DEFAULTS}"
    try:
        raw = snapshot.read(path)
    except KeyError:
        return None
    data = parse_yaml(raw, path)
    if data is None:
        return {}
    if not isinstance(data, dict) or is_age_marker(data):
        raise InventoryError(
            f"holds {_kind(data)}, not a mapping of vars",
            where=path,
            hint="write the app's default vars as 'name: value' lines at the top level",
        )
    return data


def app_defaults(
    snapshot: Snapshot, apps: Iterable[AppRef], host_vars: Mapping[str, Any]
) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The merged default vars of ``apps`` and the defaults files read, in app order.

    Deep-merged as vars are (SPEC §1). Two apps whose defaults give one var
    (at the same dotted path) different values is an InventoryError naming
    both files, unless ``host_vars`` (the merged vars of the node's host
    files, which win over every app default) sets that path: Ansible lets the
    later role win silently, which makes a var depend on the order of the
    apps; an operator would rather be told (docs/spec.md §10).
    """
    merged: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}  # leaf path → the file that set it first
    files: list[str] = []
    for app in apps:
        data = load_app_defaults(snapshot, app.name)
        if data is None:
            continue
        path = f"templates/{app.name}/{APP_DEFAULTS}"
        files.append(path)
        _merge_defaults(merged, data, (), path, origin, host_vars)
    return merged, tuple(files)


def _merge_defaults(
    into: dict[str, Any],
    data: Mapping[str, Any],
    prefix: tuple[str, ...],
    path: str,
    origin: dict[tuple[str, ...], str],
    host_vars: Mapping[str, Any],
) -> None:
    """Merge one app's defaults ``data`` into ``into`` in place (see :func:`app_defaults`)."""
    for key, value in data.items():
        at = (*prefix, key)
        if key not in into:
            into[key] = value
            origin.setdefault(at, path)
            continue
        old = into[key]
        if _is_plain_mapping(old) and _is_plain_mapping(value):
            into[key] = dict(old)
            _merge_defaults(into[key], value, at, path, origin, host_vars)
        elif old != value and not _host_sets(host_vars, at):
            # The file that set this path, or the mapping above it, first.
            first = max(
                ((p, f) for p, f in origin.items() if p == at[: len(p)]),
                key=lambda pf: len(pf[0]),
                default=((), "another app"),
            )[1]
            raise InventoryError(
                f"var {'.'.join(at)} has another value here than in {first}, and both apps "
                "are apps of the node",
                where=path,
                hint="set it once in hosts/_defaults.yaml or a host file (host files win over "
                "app defaults), or give one app's var another name",
            )


def _is_plain_mapping(value: Any) -> bool:
    """A mapping that merges key by key (an encrypted ``!age`` value is one value)."""
    return isinstance(value, Mapping) and not is_age_marker(value)


def _host_sets(host_vars: Mapping[str, Any], at: tuple[str, ...]) -> bool:
    """True when the host files' vars decide the value at dotted path ``at`` whatever
    the app defaults say: they set it to a non-mapping, or replace a mapping above it."""
    value: Any = host_vars
    for key in at:
        if not _is_plain_mapping(value) or key not in value:
            return False
        value = value[key]
        if not _is_plain_mapping(value):
            return True
    return False


def _check_apps(
    snapshot: Snapshot, node: str, apps: tuple[AppRef, ...], state: str, state_origin: str
) -> None:
    by_state: dict[str, list[AppRef]] = {}
    for app in apps:
        base = f"templates/{app.name}"
        if not snapshot.is_dir(base):
            raise InventoryError(
                f"{app.origin}: app {app.name!r} of node {node} does not exist — "
                f"create {base}/ or remove it from apps"
            )
        has_default = snapshot.is_dir(f"{base}/{DEFAULT_STATE}")
        has_state = snapshot.is_dir(f"{base}/{app.state}")
        if not (has_default or has_state):
            raise InventoryError(
                f"{app.origin}: app {app.name!r} of node {node} has neither "
                f"{base}/{DEFAULT_STATE}/ nor {base}/{app.state}/ — create one of them"
            )
        by_state.setdefault(app.state, []).append(app)
    for app_state, members in by_state.items():
        if app_state == DEFAULT_STATE:
            continue
        if not any(snapshot.is_dir(f"templates/{a.name}/{app_state}") for a in members):
            origin = state_origin if app_state == state else members[0].origin
            # A misspelt ``--state`` is the command line's fault, not the repository's:
            # bad usage (exit 2), raised before anything is changed or reported (issue 12).
            error = UsageError if origin == STATE_FLAG else InventoryError
            raise error(
                f"{origin}: state {app_state!r} of node {node}: no app of the node has a "
                f"{app_state}/ directory ({', '.join(a.name for a in members)}) — "
                "check the spelling of the state"
            )
