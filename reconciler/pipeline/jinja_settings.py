"""Render stage, part of it: the Jinja2 settings of SPEC §10 and where each comes from.

Takes ``fleet.yaml`` (the repository's default), an app's ``app.yaml``
(wins per key) and a template's first line ``#jinja2: key: value, …``
(Ansible's convention; wins for that template); produces one
:class:`JinjaSettings` per template, which ``pipeline/render.py`` turns
into a sandboxed environment (one per distinct settings, cached for the
run). Imports no Jinja2: reading settings costs a no-op run nothing.
"""

from __future__ import annotations

import ast
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from typing import TYPE_CHECKING, Any

from reconciler.errors import InventoryError, RenderError
from reconciler.git.snapshot import Snapshot

if TYPE_CHECKING:
    from reconciler.git.shards import ReportsLocation

# The extensions a repository may turn on (SPEC §10): an allow-list of names,
# never a dotted import path from the repository (that would import any module).
EXTENSIONS = {"do": "jinja2.ext.do", "loopcontrols": "jinja2.ext.loopcontrols"}
SALT = "salt"  # keep_trailing_newline: Salt's rule
HEADER = "#jinja2:"
FLEET_FILE = "fleet.yaml"


@dataclass(frozen=True, slots=True, kw_only=True)
class JinjaSettings:
    """JinjaSettings are the lexer and extension settings one template is compiled with.

    ``trim_blocks``, ``lstrip_blocks``: Jinja2's (default off, SPEC §10);
    ``keep_trailing_newline``: True (default), False, or ``"salt"`` (render
    without it, then add one newline when the template's source ends with one:
    Salt's rule); ``extensions``: names of :data:`EXTENSIONS`, sorted.
    """

    trim_blocks: bool = False
    lstrip_blocks: bool = False
    keep_trailing_newline: bool | str = True
    extensions: tuple[str, ...] = ()
    # Ansible's other #jinja2: keys (delimiters, line prefixes, newline_sequence),
    # as sorted (key, value) pairs: a first line only, never fleet.yaml or app.yaml.
    lexer: tuple[tuple[str, Any], ...] = ()

    def over(self, values: Mapping[str, Any]) -> JinjaSettings:
        """These settings with the keys of ``values`` (already checked) replaced."""
        if not values:
            return self
        changes = {k: v for k, v in values.items() if k not in LEXER_KEYS}
        lexer = {k: v for k, v in values.items() if k in LEXER_KEYS}
        if lexer:
            changes["lexer"] = tuple(sorted({**dict(self.lexer), **lexer}.items()))
        if "extensions" in changes:
            changes["extensions"] = tuple(sorted(set(changes["extensions"])))
        return replace(self, **changes)

    def digest(self) -> str:
        """ "" for the defaults, else a stable text of the settings (render keys, cache names)."""
        if self == DEFAULT:
            return ""
        return json.dumps(
            [
                self.trim_blocks,
                self.lstrip_blocks,
                self.keep_trailing_newline,
                self.extensions,
                self.lexer,
            ]
        )


DEFAULT = JinjaSettings()
_BOOL_KEYS = ("trim_blocks", "lstrip_blocks")
# The keys Ansible's #jinja2: line takes besides those (its TemplateOverrides fields).
LEXER_KEYS = (
    "block_start_string",
    "block_end_string",
    "variable_start_string",
    "variable_end_string",
    "comment_start_string",
    "comment_end_string",
    "line_statement_prefix",
    "line_comment_prefix",
    "newline_sequence",
)
HEADER_KEYS = ("trim_blocks", "lstrip_blocks", "keep_trailing_newline", *LEXER_KEYS)
_NEWLINES = ("\n", "\r\n", "\r")


@functools.cache
def _fleet_validator() -> Any:
    import jsonschema

    base = resources.files("reconciler") / "schemas"
    schema = json.loads((base / "fleet.schema.json").read_text(encoding="utf-8"))
    return jsonschema.Draft202012Validator(schema)


def load_fleet(snapshot: Snapshot) -> Mapping[str, Any]:
    """Parse and check ``fleet.yaml``; {} when there is none.

    Raises InventoryError naming the file and line (an unknown key, a wrong
    type: SPEC §10 bad input; schema ``fleet.schema.json``)."""
    from reconciler.pipeline.inventory import _schema_problems, parse_yaml

    try:
        raw = snapshot.read(FLEET_FILE)
    except KeyError:
        return {}
    data = parse_yaml(raw, FLEET_FILE)
    if data is None:
        return {}
    problems = _schema_problems(
        _fleet_validator(), data, raw.decode("utf-8", "replace"), FLEET_FILE
    )
    if problems:
        raise InventoryError(problems[0])
    return data  # type: ignore[no-any-return]


def fleet_reports(
    snapshot: Snapshot, report_repo: str | None, *, config_where: str = "report.repo"
) -> ReportsLocation:
    """Where reports go at this commit (SPEC §12): ``reports:`` of its ``fleet.yaml``,
    ``report_repo`` (the agent configuration's ``report.repo``) winning over its URL.

    Reads the file with the repository's YAML loader only, never the schema
    (jsonschema stays unloaded on a no-op run, SPEC §7); the values that
    matter are checked by :func:`reconciler.git.shards.reports_location`, the
    rest of the file by :func:`load_fleet` when templates render. Raises
    InventoryError naming ``fleet.yaml``, ConfigError naming ``config_where``.
    """
    from reconciler.git.shards import reports_location
    from reconciler.pipeline.inventory import parse_yaml

    try:
        raw = snapshot.read(FLEET_FILE)
    except KeyError:
        raw = b""
    data = parse_yaml(raw, FLEET_FILE) if raw else None
    if data is not None and not isinstance(data, Mapping):
        raise InventoryError(f"{FLEET_FILE}: expected a mapping of settings")
    return reports_location(data or {}, report_repo, config_where=config_where)


def fleet_settings(snapshot: Snapshot) -> JinjaSettings:
    """The repository's default settings: ``jinja:`` of ``fleet.yaml`` over the built-in ones."""
    return DEFAULT.over(load_fleet(snapshot).get("jinja", {}))


def app_settings(fleet: JinjaSettings, app_config: Mapping[str, Any]) -> JinjaSettings:
    """An app's settings: its ``app.yaml``'s ``jinja:`` (schema-checked) over ``fleet``'s."""
    return fleet.over(app_config.get("jinja", {}))


def split_header(text: str, *, where: str, node: str) -> tuple[dict[str, Any], str]:
    """A template's ``#jinja2:`` first line, read as Ansible reads it: (its settings, the text
    without that line); ({}, text) when there is none.

    Ansible's syntax (``ansible/_internal/_templating/_jinja_bits.py``):
    comma-separated ``key: value`` pairs, each value a Python literal
    (``True``, ``False``, ``'salt'``, ``'[%'``). Keys: ``trim_blocks``,
    ``lstrip_blocks``, ``keep_trailing_newline`` and Ansible's lexer keys
    (:data:`LEXER_KEYS`: delimiters, line prefixes, ``newline_sequence``).
    Raises RenderError naming ``where`` (the template), line 1, the node
    and what to do: a pair without ``:``, an unknown key, a value of the
    wrong type, start strings that are not distinct, no newline.
    """
    if not text.startswith(HEADER):
        return {}, text
    on = f" (node {node})" if node else ""

    def bad(problem: str, hint: str) -> RenderError:
        return RenderError(f"{where}:1: #jinja2: header: {problem}{on} — {hint}")

    eol = text.find("\n")
    if eol == -1:
        raise bad("no newline after it", "put the template's text on the lines below it")
    values: dict[str, Any] = {}
    for pair in text[len(HEADER) : eol].split(","):
        if ":" not in pair:
            raise bad(
                f"{pair.strip()!r} is not a 'key: value' pair",
                "write it as '#jinja2: trim_blocks: True, lstrip_blocks: True'",
            )
        key, raw = (part.strip() for part in pair.split(":", 1))
        if key not in HEADER_KEYS:
            raise bad(f"unknown key {key!r}", f"use {', '.join(HEADER_KEYS)}")
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # reported below as a wrong value, naming it
        if key in LEXER_KEYS:
            values[key] = _lexer_value(key, value, raw, bad)
            continue
        if not isinstance(value, bool) and not (key == "keep_trailing_newline" and value == SALT):
            allowed = "True, False or 'salt'" if key == "keep_trailing_newline" else "True or False"
            raise bad(f"{key}: {raw!r} is not {allowed}", f"use {allowed}")
        values[key] = value
    starts = [
        values.get(f"{kind}_start_string", default)
        for kind, default in (("block", "{%"), ("variable", "{{"), ("comment", "{#"))
    ]
    if len(set(starts)) < 3:
        raise bad("block, variable and comment start strings must differ", "choose three")
    return values, text[eol + 1 :]


def _lexer_value(key: str, value: Any, raw: str, bad: Any) -> Any:
    """A lexer key's value, checked as Ansible's TemplateOverrides types it."""
    if key == "newline_sequence":
        if value not in _NEWLINES:
            raise bad(
                f"newline_sequence: {raw!r} is not one of '\\n', '\\r\\n', '\\r'", "use '\\n'"
            )
        return value
    if key.startswith("line_") and value is None:
        return None
    if not isinstance(value, str) or not value:
        raise bad(f"{key}: {raw!r} is not a quoted, non-empty string", f"write {key}: '[%'")
    return value
