"""Per-variable render keys and ``nodes()`` (SPEC §10 "Render only what changed", "Other nodes").

Render stage, before anything renders. Takes a Snapshot, a node's template
context and the templates to render; produces each destination's render key:
a digest of what its output can depend on — the blobs of its template and of
every template it includes, imports or extends, the values of the top-level
names those templates read, its ``[VAR]`` item, and what ``nodes(NAME)``
returns for each NAME they call it with. A key that equals the one this host
recorded when it wrote the file lets the agent reuse that file instead of
rendering again (``reuse.written_output``), so changing one var renders only
the templates that read it (SPEC §7: ≤ 2 × the floor).

What a template reads is found in its Jinja2 AST (:func:`analyse`), cached
by blob id in the state directory's ``template-cache.json``: a run whose
templates were analysed before parses nothing, and a no-op run never comes
here (nor imports Jinja2). The analysis is sound by falling back: a template
that can reach a name the AST does not show reads "everything"
(:data:`DYNAMIC_NAMES`), one whose includes are not literal names, or that
does not parse, is always rendered. docs/spec.md §10 lists the rules.

:class:`Fleet` is what ``nodes(NAME)`` answers from: the other nodes' merged
definitions of the same commit, computed at the first call for a name and
memoised for the run (a 10,000-node repository costs nothing to a node whose
templates never call it).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from reconciler.errors import InventoryError
from reconciler.secrets.age import is_age_marker

if TYPE_CHECKING:
    from reconciler.git.snapshot import Snapshot
    from reconciler.pipeline.inventory import Inventory

# Bump when what analyse() records changes: older cache entries are then ignored.
# 3: a #jinja2: line with delimiters is always rendered, and no analysis comes from
# a parse with other delimiters (version 2 entries may hold one: never trusted).
ANALYSIS_VERSION = 3

# Names through which a template can read a top-level name that its AST does
# not show: ``self`` (the template reference: blocks, and with ``extends``
# the child's), ``varargs``/``kwargs`` (a macro's extra arguments: values a
# caller chose, possibly in another template), and the names Ansible-style
# helpers use to read a var by a computed name (``vars[name]``,
# ``lookup('vars', name)``, ``query``/``q``, ``hostvars``, ``context``).
# Reading any of them puts the whole context in the key.
DYNAMIC_NAMES = frozenset(
    {"self", "varargs", "kwargs", "context", "vars", "lookup", "query", "q", "hostvars"}
)
NODES = "nodes"  # the global of SPEC §10 "Other nodes"
# Filters that read the context themselves (``pass_context``), and what they read:
# ``password_hash`` derives its salt from the node's name (pipeline/filters.py).
FILTER_READS: dict[str, tuple[str, ...]] = {"password_hash": ("node",)}

# Ansible's per-template header (``#jinja2: trim_blocks: True``): the keys that
# change only whitespace, never which names a template reads. Any other key
# (delimiters, say) makes the AST read here unreliable — names and includes
# alike (an include written ``[% include %]`` is text to the default lexer) —
# so such a template is always rendered.
_HEADER = re.compile(r"#jinja2:([^\n]*)")
_WHITESPACE_KEYS = frozenset(
    {"trim_blocks", "lstrip_blocks", "keep_trailing_newline", "newline_sequence"}
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Analysis:
    """An Analysis is what one template's text reads, as far as its AST shows.

    ``names``: every name it loads (a superset of the top-level names it reads,
    with no global left out: a var may shadow ``range``); ``includes``: template
    names (relative to ``templates/``) it includes, imports or extends;
    ``whole``: it can read names dynamically (:data:`DYNAMIC_NAMES`), so
    its key holds the whole context; ``always``: never reused (an include
    by a computed name, a syntax error, a ``#jinja2:`` key beyond the
    whitespace ones); ``nodes``: the literal NAMEs of its ``nodes(NAME)`` calls, None
    when it uses ``nodes`` any other way.
    """

    names: tuple[str, ...] = ()
    includes: tuple[str, ...] = ()
    whole: bool = False
    always: bool = False
    nodes: tuple[str, ...] | None = ()

    def to_json(self) -> dict[str, Any]:
        """The cache's form (``template-cache.json``)."""
        return {
            "v": ANALYSIS_VERSION,
            "names": list(self.names),
            "includes": list(self.includes),
            "whole": self.whole,
            "always": self.always,
            "nodes": None if self.nodes is None else list(self.nodes),
        }

    @classmethod
    def from_json(cls, data: Any) -> Analysis | None:
        """An entry of the cache, or None when it is not one of this version's."""
        try:
            if data["v"] != ANALYSIS_VERSION:
                return None
            nodes = data["nodes"]
            return cls(
                names=tuple(str(n) for n in data["names"]),
                includes=tuple(str(n) for n in data["includes"]),
                whole=bool(data["whole"]),
                always=bool(data["always"]),
                nodes=None if nodes is None else tuple(str(n) for n in nodes),
            )
        except (KeyError, TypeError):
            return None


class _AnyName(dict[str, Any]):
    """Filters or tests for analysing: every name is one (a dummy), so that the
    analysis depends on no filter set — an unknown one fails when rendered."""

    def get(self, key: str, default: Any = None) -> Any:
        return super().get(key, _dummy)

    def __contains__(self, key: object) -> bool:
        return True


def _dummy(*args: Any, **kwargs: Any) -> None:
    """What every filter and test is while a template is analysed (never called)."""


def _analysis_environment() -> Any:
    """A Jinja2 environment to parse with: every extension a template may use, any
    filter or test name, and no globals, so that ``find_undeclared_variables``
    reports every name read."""
    import jinja2

    env = jinja2.Environment(extensions=["jinja2.ext.do", "jinja2.ext.loopcontrols"])
    env.globals.clear()
    env.filters = _AnyName()
    env.tests = _AnyName()
    return env


def analyse(text: str, env: Any) -> Analysis:
    """What template ``text`` reads (:class:`Analysis`); ``env`` from
    :func:`_analysis_environment`. Never raises: a template that does not parse is
    ``always`` rendered (and its render names the syntax error)."""
    import jinja2

    try:
        ast = env.parse(text)
    except (jinja2.TemplateError, RecursionError):
        return Analysis(always=True)
    return analyse_ast(ast, text)


def analyse_ast(ast: Any, text: str) -> Analysis:
    """What a parsed template reads: ``ast`` (Jinja2's, of ``text``).

    One walk of the AST, no code generation (Jinja2's own
    ``find_undeclared_variables`` generates the code: as costly as
    compiling, and the render hands over the AST it parses to compile,
    so a cold run pays nothing more). ``names`` is every name the AST
    loads, locals included (a loop variable, a macro parameter): a
    superset of what it reads from the context, so a var that happens to
    share a local's name is in the key too — never one too few.
    ``includes`` in the order ``jinja2.meta.find_referenced_templates``
    gives them (depth first, in source order).

    One walk, not Jinja2's ``find_all`` once per node type plus
    ``find_referenced_templates``: five walks of every AST cost about an
    eighth of a cold run's CPU (SPEC §7, issue 19).
    """
    from jinja2 import nodes as jn

    whole = False
    header = _HEADER.match(text)
    if header is not None:
        keys = {part.split(":", 1)[0].strip() for part in header.group(1).split(",")}
        if not keys <= _WHITESPACE_KEYS:
            return Analysis(always=True)
    includes: list[str | None] = []
    names: set[str] = set()
    literal: list[str] = []
    called = loads = 0
    node_class, name_class, call_class, filter_class = jn.Node, jn.Name, jn.Call, jn.Filter
    referencing = (jn.Extends, jn.FromImport, jn.Import, jn.Include)
    stack: list[Any] = [ast]
    while stack:
        node = stack.pop()
        if isinstance(node, name_class):
            if node.ctx == "load":
                names.add(node.name)
                if node.name in DYNAMIC_NAMES:
                    whole = True
                elif node.name == NODES:
                    loads += 1
        elif isinstance(node, call_class):
            if isinstance(node.node, name_class) and node.node.name == NODES:
                arg = node.args[0] if len(node.args) == 1 else None
                plain = not node.kwargs and node.dyn_args is None and node.dyn_kwargs is None
                if plain and isinstance(arg, jn.Const) and isinstance(arg.value, str):
                    literal.append(arg.value)
                    called += 1
        elif isinstance(node, filter_class):
            names.update(FILTER_READS.get(node.name, ()))
        elif isinstance(node, referencing):
            includes.extend(_referenced(node, jn))
        # Children in reverse, so that they pop in source order (depth first, as
        # Jinja2's find_all walks): the includes keep their order.
        children: list[Any] = []
        for field_name in node.fields:
            value = getattr(node, field_name, None)
            if isinstance(value, list):
                children.extend(v for v in value if isinstance(v, node_class))
            elif isinstance(value, node_class):
                children.append(value)
        children.reverse()
        stack.extend(children)
    return Analysis(
        names=tuple(sorted(names)),
        includes=tuple(i for i in includes if i is not None),
        whole=whole,
        always=None in includes,
        # ``nodes`` passed around, or called with a computed name: which nodes it
        # reads is not known before rendering.
        nodes=tuple(sorted(set(literal))) if loads == called else None,
    )


def _referenced(node: Any, jn: Any) -> list[str | None]:
    """The template names an extends/import/include ``node`` names, None for one that
    is computed: ``jinja2.meta.find_referenced_templates`` for one node."""
    template = node.template
    if not isinstance(template, jn.Const):
        if not isinstance(template, jn.Tuple | jn.List):
            return [None]
        # A constant that is not a string names nothing; anything computed is None.
        out: list[str | None] = []
        for item in template.items:
            if not isinstance(item, jn.Const):
                out.append(None)
            elif isinstance(item.value, str):
                out.append(item.value)
        return out
    if isinstance(template.value, str):
        return [template.value]
    if isinstance(node, jn.Include) and isinstance(template.value, tuple | list):
        return [t for t in template.value if isinstance(t, str)]
    return [None]


class UnknownNodes(Exception):
    """``nodes(NAME)`` named no node or meta-node of the commit (SPEC §10 bad input)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class Fleet:
    """The nodes of one commit as ``nodes(NAME)`` returns them (SPEC §10 "Other nodes").

    Each node is ``{"name", "state", "apps", "vars"}``: the merged definition
    of SPEC §1 (``inventory.effective_node``), apps as names, ``!age`` values
    kept as their markers here and made unreadable in what a template gets
    (:meth:`value`). Computed at the first need for each name and memoised
    (one run, one commit); the inventory is loaded from the snapshot at the
    first call when none is given.
    """

    def __init__(self, snapshot: Snapshot, inventory: Inventory | None = None) -> None:
        self._snapshot = snapshot
        self._inventory = inventory
        self._nodes: dict[str, dict[str, Any]] = {}
        self._digests: dict[str, str] = {}

    def _members(self, name: str) -> list[str]:
        from reconciler.pipeline.inventory import load_inventory

        if self._inventory is None:
            self._inventory = load_inventory(self._snapshot)
        if not isinstance(name, str) or name not in self._inventory.files:
            raise UnknownNodes(str(name))
        return sorted(self._inventory.members(name))

    def _node(self, name: str) -> dict[str, Any]:
        from reconciler.pipeline.inventory import effective_node

        if name not in self._nodes:
            assert self._inventory is not None
            node = effective_node(self._inventory, self._snapshot, name)
            self._nodes[name] = {
                "name": node.name,
                "state": node.state,
                "apps": [a.name for a in node.apps],
                "vars": node.vars,
            }
        return self._nodes[name]

    def raw(self, name: str) -> list[dict[str, Any]]:
        """The nodes NAME stands for, sorted by name, ``!age`` markers in place
        (shared: never hand this to a template). Raises UnknownNodes."""
        return [self._node(n) for n in self._members(name)]

    def digest(self, name: str) -> str:
        """sha256 of :meth:`raw` (the ciphertext of a ``!age`` value, never a plaintext)."""
        if name not in self._digests:
            text = json.dumps(self.raw(name), sort_keys=True, default=str)
            self._digests[name] = hashlib.sha256(text.encode()).hexdigest()
        return self._digests[name]

    def value(self, name: str) -> list[dict[str, Any]]:
        """What ``nodes(NAME)`` returns to a template: a fresh copy of plain lists,
        dicts and scalars (a template that changes it changes nothing another sees),
        each ``!age`` value a Jinja2 StrictUndefined that fails when read."""
        import jinja2

        def copy(value: Any, where: str) -> Any:
            if is_age_marker(value):
                return jinja2.StrictUndefined(
                    hint=f"{where} is a !age value of another node: nodes() never decrypts it"
                )
            if isinstance(value, Mapping):
                return {k: copy(v, f"{where}.{k}") for k, v in value.items()}
            if isinstance(value, list):
                return [copy(v, f"{where}[{i}]") for i, v in enumerate(value)]
            return value

        return [
            {
                "name": n["name"],
                "state": n["state"],
                "apps": list(n["apps"]),
                "vars": copy(n["vars"], f"nodes({name!r}) {n['name']} vars"),
            }
            for n in self.raw(name)
        ]


Job = tuple[PurePosixPath, str, bool]  # destination, template path, secret (render.Job)


def render_keys(
    snapshot: Snapshot,
    context: Mapping[str, Any],
    jobs: Iterable[Job],
    *,
    items: Mapping[PurePosixPath, tuple[str, str]],
    analyses: dict[str, Any],
    fleet: Fleet,
    version: str,
    settings: Any = None,
    parse: bool = True,
    memo: dict[str, Any] | None = None,
) -> dict[PurePosixPath, str | None]:
    """Destination → digest of what its template's output depends on ("" = always render).

    ``context``: the node's template context (vars, ``node``, ``facts``,
    ``source``; ``!age`` values as their markers: their ciphertext goes in
    the digest, never a plaintext). ``items``: dest → (VAR, key) of a
    ``[VAR]`` destination, whose ``item`` and ``item_key`` count as read.
    ``analyses``: blob id → :meth:`Analysis.to_json`, the cache: entries for
    templates analysed now are added, and when every key is known those of
    templates no job reached any more are removed. ``parse``: analyse a
    template the cache lacks (parse it); False: its destinations' key is None,
    unknown — they render, and the render's own parse fills the cache
    (``render._environment``'s ``on_parse``), so a cold run parses each
    template once, in the workers. ``fleet`` answers the
    ``nodes(NAME)`` calls; ``version``: reconciler's, ``settings``: anything
    else every template's output depends on (JSON-able). An encrypted
    template, one that includes an encrypted one, one that is ``always``
    (:class:`Analysis`), one calling ``nodes`` with a computed or unknown
    name: "". Never raises for a template's content (its render will).

    ``memo``: a dict the caller passes to every pass over the same jobs and
    context within one render (render.render_target: a pass without parsing
    before the render, one with after it when some key was unknown). A later
    pass keeps the keys and template walks the earlier one knew and computes
    only the unknown ones: at 2,000 templates with one changed, the second
    pass walked all 2,000 again (issue 19's profile of a changed template).
    """
    env: list[Any] = []  # the parsing environment, made at the first need
    state = {} if memo is None else memo
    used: set[str] = state.setdefault("used", set())
    closures: dict[str, tuple[list[str], Analysis] | None | bool] = state.setdefault("closures", {})
    for unknown in [p for p, found in closures.items() if found is False]:
        del closures[unknown]  # not known without parsing then: this pass may parse
    values: dict[str, str] = state.setdefault("values", {})
    known: dict[PurePosixPath, str | None] = state.setdefault("keys", {})

    def analysis(path: str, blob: str) -> Analysis | None:
        found = Analysis.from_json(analyses.get(blob))
        if found is None and parse:
            if not env:
                env.append(_analysis_environment())
            text = snapshot.read(path).decode("utf-8", "replace")
            found = analyse(text, env[0])
            analyses[blob] = found.to_json()
        return found

    def closure(path: str) -> tuple[list[str], Analysis] | None | bool:
        """(path:blob of each template reached, their union), None = always render,
        False = not known without parsing."""
        if path in closures:
            return closures[path]
        parts: list[str] = []
        names: set[str] = set()
        called: set[str] | None = set()
        whole = False
        seen: set[str] = set()
        todo = [path]
        result: tuple[list[str], Analysis] | None | bool = None
        while todo:
            one = todo.pop()
            if one in seen:
                continue
            seen.add(one)
            if one.endswith(".age"):
                break  # an encrypted template: its reader is tainted, never reused
            blob = snapshot.blob_id(one)
            if blob is None:
                break  # missing (``ignore missing``), or a working tree: no content key
            used.add(blob)
            parts.append(f"{one}:{blob}")
            found = analysis(one, blob)
            if found is None:
                result = False
                break
            if found.always:
                break
            names.update(found.names)
            whole = whole or found.whole
            called = None if called is None or found.nodes is None else called | set(found.nodes)
            todo.extend(f"templates/{name}" for name in found.includes)
        else:
            union = Analysis(
                names=tuple(sorted(names)),
                whole=whole,
                nodes=None if called is None else tuple(sorted(called)),
            )
            result = (sorted(parts), union)
        closures[path] = result
        return result

    def value(name: str, where: Mapping[str, Any]) -> str:
        if name not in where:
            return "-"
        if where is not context:
            return json.dumps(where[name], sort_keys=True, default=str)
        if name not in values:
            text = json.dumps(context[name], sort_keys=True, default=str)
            values[name] = hashlib.sha256(text.encode()).hexdigest()
        return values[name]

    base = json.dumps([version, ANALYSIS_VERSION, settings], sort_keys=True, default=str)
    # Where the Jinja2 settings of SPEC §10 live (``jinja:`` of fleet.yaml, of the
    # app's app.yaml): their blobs are in the key, whatever the settings are.
    fleet_yaml = f"fleet.yaml:{snapshot.blob_id('fleet.yaml')}"
    app_yaml: dict[str, str] = {}
    keys: dict[PurePosixPath, str | None] = {}
    for dest, repo_path, _ in jobs:
        if known.get(dest) is not None:
            keys[dest] = known[dest]  # an earlier pass of this render knew it
            continue
        found = closure(repo_path)
        if found is None or found is True:
            keys[dest] = ""
            continue
        if found is False:
            keys[dest] = None
            continue
        blobs, union = found
        own: Mapping[str, Any] = context
        if dest in items:
            var, key = items[dest]
            own = {**context, "item": _item(context[var], key), "item_key": key}
        names = set(own) if union.whole else set(union.names)
        if dest in items:
            names |= {"item", "item_key"}
        app = repo_path.split("/", 2)[1]
        if app not in app_yaml:
            app_yaml[app] = f"app.yaml:{snapshot.blob_id(f'templates/{app}/app.yaml')}"
        parts = [base, fleet_yaml, app_yaml[app], *blobs]
        parts += [
            f"{n}={value(n, own if n in ('item', 'item_key') else context)}" for n in sorted(names)
        ]
        if NODES not in context:  # a var named nodes shadows the global: it is in names
            if union.nodes is None:
                keys[dest] = ""
                continue
            try:
                parts += [f"nodes({n!r})={fleet.digest(n)}" for n in union.nodes]
            except (UnknownNodes, InventoryError):
                keys[dest] = ""  # rendering it names the problem
                continue
        keys[dest] = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    known.update(keys)
    if None not in keys.values():
        for blob in [b for b in analyses if b not in used]:
            del analyses[blob]  # the cache never grows past this node's templates
    return keys


def _item(mapping: Mapping[Any, Any], key: str) -> Any:
    """The item of file name ``key`` (a YAML key may be an int: render._item)."""
    if key in mapping:
        return mapping[key]
    return next(v for k, v in mapping.items() if str(k) == key)
