"""Render stage: a Node and a Snapshot → TargetState (SPEC §1).

Takes the effective :class:`~reconciler.pipeline.inventory.Node`, the snapshot it came
from, facts and source info; produces a :class:`TargetState`: every
destination path of the node with its content, mode, owner, group, policy and
secrecy. ``templates/<app>/default/**`` is overlaid by
``templates/<app>/<state>/**``; ``.j2`` files are rendered with Jinja2
(StrictUndefined) straight from the snapshot, anything else is copied byte
for byte. Jinja2 is imported here only, so a run that renders nothing never
pays for it.

A repository is untrusted input (SPEC §10 "Sandbox and bounds"; issue 11):
templates render in Jinja2's SandboxedEnvironment, so they reach their
context and filters, never Python (``cycler.__init__.__globals__.os`` is
refused); each template is bounded in time by ``render_timeout``, its
output by ``max_file_size`` (:class:`RenderLimits`) and the memory it keeps
by :func:`memory_bound`, and the operations that make a huge value in one
step (``'x' * 10**10``, ``10**(10**10)``, ``"%9999999999d"|format``,
``.ljust(N)``, ``|center(N)``, ``|indent(N)``, ``.replace``, ``|join``,
``~``, ``{% set %}`` blocks, macros, ``|batch``, ``lipsum(N)``) are refused
before they allocate it. The sandbox, the bounds and the quiet errors of secret
templates hold on every path that renders a repository's templates: the
agent's run (in process or in forked workers), ``diff``, ``render``,
``validate``, ``impact``, ``show`` and ``adopt`` all come here.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sized
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import FrameType, TracebackType
from typing import Any, cast

from reconciler.config import DEFAULT_MAX_FILE_SIZE, DEFAULT_RENDER_TIMEOUT, format_size
from reconciler.errors import InventoryError, PathError, ReconcilerError, RenderError
from reconciler.git.snapshot import GIT_FILEMODE_EXEC, GIT_FILEMODE_LINK, Snapshot, SourceInfo
from reconciler.pipeline.blocks import Block, block_marker, check_blocks, content_of, view
from reconciler.pipeline.inventory import DEFAULT_STATE, Inventory, Node, load_app_config
from reconciler.pipeline.jinja_settings import DEFAULT as DEFAULT_SETTINGS
from reconciler.pipeline.jinja_settings import (
    EXTENSIONS,
    HEADER,
    SALT,
    JinjaSettings,
    app_settings,
    fleet_settings,
    split_header,
)
from reconciler.pipeline.packages import PackageSpec, ServiceSpec, check_resources, parse_resources
from reconciler.pipeline.renderkeys import NODES, Fleet, UnknownNodes, analyse_ast, render_keys
from reconciler.secrets.age import is_age_marker, marker_parts

log = logging.getLogger(__name__)

POLICIES = ("enforce", "audit", "create-only", "ignore-drift")
AGE_SUFFIX = ".age"  # an encrypted file or template (SPEC §8)


def is_template(repo_path: str) -> bool:
    """True for a file rendered with Jinja2: ``x.j2``, or ``x.j2.age`` decrypted first."""
    return repo_path.removesuffix(AGE_SUFFIX).endswith(".j2")


DEFAULT_SCRIPT_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetFile:
    """A TargetFile is the content, mode and owner that a destination path should have."""

    path: PurePosixPath  # absolute destination path as the host sees it, e.g. /etc/motd
    content: bytes
    mode: int  # permission bits, e.g. 0o644
    owner: str | None
    group: str | None
    secret: bool
    policy: str  # one of POLICIES
    app: str
    template: str  # repository path it came from, e.g. templates/motd/default/etc/motd.j2
    # For a .j2 template that includes no other template: a digest of everything
    # its output depends on (its blob, the context, reconciler's version), so a
    # later run can reuse what it wrote instead of rendering again. "" otherwise.
    render_key: str = ""
    # A desired symlink (SPEC §9): its target text, never followed; ``content`` then
    # holds the same text as bytes and ``mode`` is 0o777 (what lstat shows of a link).
    link: str | None = None
    # Managed blocks (SPEC §9, pipeline/blocks.py): the blocks this file holds, in
    # app order; ``content`` is then their view (each block with its marker lines).
    blocks: tuple[Block, ...] = ()
    mode_set: bool = True  # False: a block file keeps the mode the host gave it
    # Set between scan and plan (blockfiles.resolve): the whole file to write
    # (the host's bytes with the blocks spliced in), and the markers of blocks
    # that left the target state, removed from it.
    whole: bytes | None = None
    unblocks: tuple[str, ...] = ()

    def shown(self) -> bytes:
        """What ``diff`` and ``show`` display as this path's desired side: its content,
        or ``link → target`` for a symlink (scan.link_shown)."""
        from reconciler.pipeline.scan import link_shown

        return self.content if self.link is None else link_shown(self.link)

    def written(self) -> bytes:
        """The bytes a write puts at this path: the whole file for a block file."""
        return self.content if self.whole is None else self.whole


@dataclass(frozen=True, slots=True, kw_only=True)
class AppSettings:
    """AppSettings are an app's script settings from ``app.yaml`` (SPEC §1)."""

    name: str
    state: str
    timeout: float = DEFAULT_SCRIPT_TIMEOUT
    post_always: bool = False
    on_post_failure: str = "fail"  # fail | rollback (issue #3)
    packages: tuple[PackageSpec, ...] = ()  # SPEC §11, in app.yaml order
    services: tuple[ServiceSpec, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class AbsentRule:
    """An AbsentRule is one ``absent:`` pattern: paths that must not exist (SPEC §9)."""

    pattern: str  # an absolute destination path or glob (scan.absent_match)
    app: str  # the app whose app.yaml lists it, or HOST_APP for a host file's
    origin: str  # the file that lists it: hosts/<file>.yaml or templates/<app>/app.yaml


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetDir:
    """A TargetDir is a directory a node should have, with the mode and owner it should
    have and whether what it holds that the node does not manage is purged (SPEC §9)."""

    path: PurePosixPath  # absolute destination path, e.g. /etc/nginx/conf.d
    mode: int | None  # permission bits, None: not enforced (made 0755)
    owner: str | None  # None: not enforced
    group: str | None
    purge: bool
    app: str  # the app whose app.yaml declares it
    origin: str  # templates/<app>/app.yaml


# Directories a purge may never empty (docs/spec.md §9 "Directories as built"): a purge
# of one of these would delete what packages installed there, not stray files of one
# app. Every directory of depth one (/etc, /usr, /var, /home, …) is refused too.
PROTECTED_FROM_PURGE = frozenset(
    {
        "/usr/bin",
        "/usr/include",
        "/usr/lib",
        "/usr/lib64",
        "/usr/libexec",
        "/usr/local",
        "/usr/sbin",
        "/usr/share",
        "/usr/src",
        "/var/backups",
        "/var/cache",
        "/var/lib",
        "/var/local",
        "/var/log",
        "/var/mail",
        "/var/opt",
        "/var/spool",
        "/var/tmp",
        "/etc/default",
        "/etc/init.d",
        "/etc/pam.d",
        "/etc/security",
        "/etc/ssl",
        "/etc/systemd",
    }
)


# The app a host file's absent: deletions are reported under: not an app name
# (names are [A-Za-z0-9_.-]), so it has no scripts and never meets a real app.
HOST_APP = "(node)"


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetState:
    """A TargetState is every file a node should have, in app order, plus app settings
    and the paths that must not exist."""

    node: str
    files: Mapping[PurePosixPath, TargetFile]
    apps: tuple[AppSettings, ...]
    absent: tuple[AbsentRule, ...] = ()
    # directories: of the node's apps (SPEC §9), by path.
    directories: Mapping[PurePosixPath, TargetDir] = field(default_factory=dict)
    # Every plaintext this render decrypted (SPEC §8): kept in memory only, so that host
    # output can be redacted (secrets/redact.py); never written, never reported.
    secret_values: tuple[bytes, ...] = field(default=(), repr=False)


def _encrypted(repo_path: str) -> bool:
    """True for an encrypted file or template of SPEC §8 (``x.age``, ``x.j2.age``)."""
    return repo_path.endswith(AGE_SUFFIX)


def dest_path(relative: str, *, where: str) -> PurePosixPath:
    """Turn a path below a state directory into an absolute destination path.

    Refuses empty, ``.`` and ``..`` components and NUL bytes: such a path
    could escape the root (SPEC §4). Raises PathError naming ``where``.
    """
    parts = relative.split("/")
    if not relative or any(p in ("", ".", "..") or "\0" in p for p in parts):
        raise PathError(
            f"{where}: destination /{relative} escapes or is not a plain path — rename the template"
        )
    return PurePosixPath("/", *parts)


def _compile(patterns: Mapping[str, Mapping[str, Any]]) -> list[tuple[Any, Mapping[str, Any]]]:
    """gitignore-style globs of ``files:`` compiled once: [(spec, metadata)]."""
    if not patterns:
        return []  # pathspec is imported only when there is a glob to match (SPEC §7)
    import pathspec

    return [(pathspec.GitIgnoreSpec.from_lines([p]), v) for p, v in patterns.items()]


def parse_mode(text: str, *, where: str) -> int:
    """``"0640"`` → 0o640; PathError naming ``where`` for anything else (SPEC §6)."""
    try:
        mode = int(text, 8)
    except (TypeError, ValueError):
        mode = -1
    if not 0 <= mode <= 0o7777:
        raise InventoryError(f'{where}: mode {text!r} is not an octal mode such as "0640"')
    return mode


# A ``[VAR]`` segment part of a template's path (SPEC §9 "One template, many files").
_ITEM_VAR = re.compile(r"\[([^\]/]*)\]")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")

# dest → (VAR, key): the item a destination of a ``[VAR]`` path was made for.
Items = dict[PurePosixPath, tuple[str, str]]


def _expand(rel: str, repo_path: str, node: Node) -> list[tuple[str, tuple[str, str] | None]]:
    """``rel`` once per key of the mapping its ``[VAR]`` names, the key in place of
    ``[VAR]`` (SPEC §9): [(relative path, (VAR, key))]; [(rel, None)] without one.

    VAR is a top-level var of ``node``; one VAR per path (it may appear in more than
    one segment: ``[sites]/[sites].conf``). Raises RenderError naming ``repo_path``,
    the node and what to do when VAR is not an identifier, is undefined, is not a
    mapping (or is a ``!age`` value), or a key is not a plain file name.
    """
    names = set(_ITEM_VAR.findall(rel))
    if not names:
        return [(rel, None)]
    on = f"(node {node.name})"
    bad = sorted(n for n in names if not _IDENTIFIER.match(n))
    if bad:
        raise RenderError(
            f"[{bad[0]}] is not a var name {on}",
            where=repo_path,
            hint="name a top-level var made of letters, digits and _, such as [nginx_sites]",
        )
    if len(names) > 1:
        raise RenderError(
            f"more than one [VAR] in one path ({', '.join(sorted(names))}) {on}",
            where=repo_path,
            hint="use one mapping per path; nest the values in its items instead",
        )
    var = names.pop()
    if var not in node.vars:
        raise RenderError(
            f"[{var}] names var {var!r}, which node {node.name} does not define",
            where=repo_path,
            hint=f"define {var}: as a mapping in the node's host file (or {{}} for no file)",
        )
    mapping = node.vars[var]
    if not isinstance(mapping, Mapping) or is_age_marker(mapping):
        what = "a !age value" if is_age_marker(mapping) else type(mapping).__name__
        raise RenderError(
            f"[{var}] needs a mapping, but var {var!r} of node {node.name} is {what}",
            where=repo_path,
            hint=f"make {var}: a mapping of file name → item (its keys name the files)",
        )
    out: list[tuple[str, tuple[str, str] | None]] = []
    names_seen: dict[str, object] = {}
    for key in mapping:
        text = key if isinstance(key, str) else None
        if isinstance(key, int) and not isinstance(key, bool):
            text = str(key)
        if text is None or text in ("", ".", "..") or "/" in text or "\0" in text:
            raise RenderError(
                f"key {key!r} of var {var!r} (node {node.name}) is not a file name",
                where=repo_path,
                hint="use keys that are plain file names: no /, not empty, . or .., no NUL",
            )
        if text in names_seen:
            raise RenderError(
                f"keys {names_seen[text]!r} and {key!r} of var {var!r} (node {node.name}) "
                f"both name the file {text!r}",
                where=repo_path,
                hint="keep only one of them",
            )
        names_seen[text] = key
        out.append((rel.replace(f"[{var}]", text), (var, text)))
    return out


def _item(mapping: Mapping[Any, Any], key: str) -> Any:
    """The item of file name ``key`` in ``mapping`` (a YAML key may be an int: its file
    name is its str, :func:`_expand`)."""
    if key in mapping:
        return mapping[key]
    return next(v for k, v in mapping.items() if str(k) == key)


def _collect(
    snapshot: Snapshot,
    node: Node,
    items: Items | None = None,
    *,
    block: Callable[[str, PurePosixPath], bool] | None = None,
    shared: dict[PurePosixPath, list[tuple[str, str, int]]] | None = None,
) -> dict[PurePosixPath, tuple[str, str, int]]:
    """dest → (app, repository path, git file mode), overlay and conflicts resolved.

    A path with a ``[VAR]`` segment is one destination per key of the mapping VAR
    (:func:`_expand`); ``items``, when given, is filled with dest → (VAR, key) for
    each of them (SPEC §9). ``block(app, dest)``: whether metadata makes that
    destination a managed block; a destination that several apps manage as
    blocks is kept for the first app here and listed in ``shared`` for the
    later ones (SPEC §9: one file, several apps' blocks). Two apps producing
    one path otherwise is an InventoryError naming both.
    """
    out: dict[PurePosixPath, tuple[str, str, int]] = {}
    made: Items = {}
    for app in node.apps:
        states = [DEFAULT_STATE] if app.state == DEFAULT_STATE else [DEFAULT_STATE, app.state]
        per_app: dict[PurePosixPath, tuple[str, int]] = {}
        for state in states:
            base = f"templates/{app.name}/{state}"
            seen: dict[PurePosixPath, str] = {}
            for entry in snapshot.walk(base):
                repo_path = f"{base}/{entry.path}"
                if entry.filemode == GIT_FILEMODE_LINK:
                    # A committed symlink is a desired symlink (SPEC §9): never
                    # rendered nor decrypted, so a ".j2" or ".age" name would be
                    # ambiguous (is the link named with or without it?): refused.
                    _check_link(snapshot, repo_path, node.name)
                    rel = entry.path
                else:
                    rel = entry.path.removesuffix(AGE_SUFFIX)  # SPEC §8: x.age → x, x.j2.age → x
                    rel = rel[:-3] if rel.endswith(".j2") else rel
                for one, item in _expand(rel, repo_path, node):
                    dest = dest_path(one, where=repo_path)
                    if dest in seen:
                        raise RenderError(
                            f"{repo_path}: {seen[dest]} produces the same destination {dest}"
                            f"{f' (node {node.name})' if item or dest in made else ''} — "
                            "keep only one of them"
                        )
                    seen[dest] = repo_path
                    per_app[dest] = (repo_path, entry.filemode)
                    if item is not None:
                        made[dest] = item
                    else:
                        made.pop(dest, None)  # a later state's literal file replaces it
        for dest, (repo_path, filemode) in sorted(per_app.items()):
            if dest in out:
                other = out[dest]
                blocks = (block(other[0], dest), block(app.name, dest)) if block else (0, 0)
                if all(blocks) and shared is not None:
                    shared.setdefault(dest, []).append((app.name, repo_path, filemode))
                    continue
                how = " (one as a managed block, one as a whole file)" if any(blocks) else ""
                raise InventoryError(
                    f"{repo_path}: apps {other[0]!r} ({other[1]}) and {app.name!r} of node "
                    f"{node.name} both produce {dest}{how} — keep it in one app, or make "
                    "each a block: with its own marker"
                )
            out[dest] = (app.name, repo_path, filemode)
    if items is not None:
        items.update((dest, made[dest]) for dest in out if dest in made)
    return out


def _check_link(snapshot: Snapshot, repo_path: str, node: str) -> None:
    """Refuse a committed symlink that cannot be a desired one (SPEC §9 bad input):
    a name ending in ``.j2``, an empty target text, or one holding NUL (which no
    symlink on disk can hold). Raises RenderError naming the file and the node."""
    if repo_path.endswith((".j2", AGE_SUFFIX)):
        suffix = ".j2" if repo_path.endswith(".j2") else AGE_SUFFIX
        raise RenderError(
            f"a symlink named {suffix} (node {node}); links are never rendered or decrypted",
            where=repo_path,
            hint=f"rename it without {suffix}, or commit a file instead of a link",
        )
    text = snapshot.read_link(repo_path)
    if not text or b"\0" in text:
        what = "an empty target" if not text else "a target holding NUL"
        raise RenderError(
            f"a symlink with {what} (node {node})",
            where=repo_path,
            hint="commit the link with the path it should point to (git mode 120000)",
        )


def link_target(snapshot: Snapshot, repo_path: str) -> str:
    """The target text of the committed symlink ``repo_path`` as the host's readlink(2)
    would return it (bytes that are not UTF-8 kept with surrogateescape)."""
    return os.fsdecode(snapshot.read_link(repo_path))


def load_app_settings(snapshot: Snapshot, node: Node) -> tuple[AppSettings, ...]:
    """AppSettings for every app of ``node``, in node order (SPEC §1 ``scripts``, §11
    ``packages``/``services``). Raises InventoryError for a bad app.yaml or apps that
    contradict each other on a package or a service."""
    out = []
    for app in node.apps:
        data = load_app_config(snapshot, app.name, node=node.name)
        scripts = data.get("scripts", {})
        packages, services = parse_resources(data, app=app.name, node=node.name)
        out.append(
            AppSettings(
                name=app.name,
                state=app.state,
                timeout=float(scripts.get("timeout", DEFAULT_SCRIPT_TIMEOUT)),
                post_always=bool(scripts.get("post_always", False)),
                on_post_failure=str(scripts.get("on_post_failure", "fail")),
                packages=packages,
                services=services,
            )
        )
    check_resources(
        [p for a in out for p in a.packages], [s for a in out for s in a.services], node=node.name
    )
    return tuple(out)


def _metadata(
    app_globs: list[tuple[Any, Mapping[str, Any]]],
    node_globs: list[tuple[Any, Mapping[str, Any]]],
    node: Node,
    app: str,
    dest: PurePosixPath,
) -> tuple[dict[str, Any], str]:
    """Metadata of ``dest``: app.yaml globs in order, then the node's ``files:``."""
    meta: dict[str, Any] = {}
    where = f"templates/{app}/app.yaml"
    rel = str(dest).lstrip("/")
    for spec, values in app_globs:
        if spec.match_file(rel):
            meta.update(values)
    for spec, values in node_globs:
        if spec.match_file(rel):
            meta.update(values)
            where = f"files: of node {node.name}"
    return meta, where


@dataclass(frozen=True, slots=True, kw_only=True)
class Decryption:
    """Decryption says how a render opens the secrets it meets (SPEC §8).

    ``identity``: the identity file to decrypt with (the agent's ``identity``
    key); None: none, so a secret a template reads fails the render naming
    it. ``placeholder``: a secret renders as ``<secret: sha256 prefix of its
    ciphertext>`` instead of being decrypted (operators' ``render``,
    ``validate``, ``impact`` without a key); the identity is then not read.
    """

    identity: str | None = None
    placeholder: bool = False


class _Secrets:
    """The secrets one render meets: the identity loaded at the first need (a node
    whose templates read no secret never needs a key), each plaintext decrypted
    once, and ``reads``, the secrets read since the caller last cleared it (the
    taint of SPEC §8: every destination whose template read one is secret)."""

    def __init__(self, decryption: Decryption, node: str) -> None:
        self.decryption = decryption
        self.node = node
        self.reads: set[str] = set()
        self._identities: Any = None
        self._plain: dict[tuple[str, bytes], bytes] = {}

    def open(self, payload: bytes, where: str, *, what: str = "it") -> bytes:
        """The plaintext of ``payload`` (read at ``where``: a repository path, or a
        host file and line for a ``!age`` value); recorded in :attr:`reads`.
        Raises SecretError naming ``where``, the node and what to do."""
        from reconciler.errors import NotRecipientError, SecretError
        from reconciler.secrets import age

        self.reads.add(where)
        if self.decryption.placeholder:
            return f"<secret: {hashlib.sha256(payload).hexdigest()[:12]}>".encode()
        key = (where, payload)
        if key in self._plain:
            return self._plain[key]
        on = f"node {self.node} cannot decrypt {what}" if self.node else f"cannot decrypt {what}"
        try:
            if self._identities is None:
                if self.decryption.identity is None:
                    raise SecretError(
                        "no identity to decrypt with",
                        where="identity",
                        hint="set identity: in the agent configuration",
                    )
                self._identities = (age.load_identity(self.decryption.identity),)
            plain = age.decrypt(payload, self._identities, where=where)
        except SecretError as exc:
            # One line naming the repository path, the node and what to do (SPEC §8),
            # whichever step failed: the identity file, or the payload.
            detail = exc.problem if exc.where == where else f"{exc.where}: {exc.problem}"
            hint = exc.hint
            if isinstance(exc, NotRecipientError) and self.node:
                # On a host, what to do names this node's key file and rule (SPEC §8).
                hint = (
                    f"check that keys/nodes/{self.node}.pub holds this identity's public key "
                    f"and that the secrets.yaml rule matching it names {self.node}, then run "
                    "'reconciler secret rekey' and push"
                )
            raise type(exc)(f"{on}: {detail}", where=where, hint=hint) from None
        self._plain[key] = plain
        return plain

    def plaintexts(self) -> list[bytes]:
        """Every plaintext decrypted so far (none with placeholders)."""
        return list(self._plain.values())


class _SecretValue:
    """A ``!age`` value in a template's context: decrypted when a template reads it.

    The sandbox's attribute, item and name lookups hand templates the
    plaintext ``str`` (:func:`_environment`); this object is what a template
    meets only inside a container it walks itself (``.items()``, a loop), so
    it behaves as that ``str`` for printing, comparing, ``len``, ``in`` and
    ``+``. ``repr`` never decrypts (a debug log of the context shows no secret).
    """

    __slots__ = ("_payload", "_where", "_secrets")

    def __init__(self, payload: bytes, where: str, secrets: _Secrets) -> None:
        self._payload = payload
        self._where = where
        self._secrets = secrets

    def text(self) -> str:
        """The plaintext, as UTF-8 text; SecretError naming the value when it is not."""
        plain = self._secrets.open(self._payload, self._where, what="this !age value")
        try:
            return plain.decode("utf-8")
        except UnicodeDecodeError:
            from reconciler.errors import SecretError

            raise SecretError(
                "a !age value must decrypt to UTF-8 text",
                where=self._where,
                hint="encrypt text, or put binary content in an encrypted file (.age)",
            ) from None

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return f"<!age value of {self._where}>"

    def __len__(self) -> int:
        return len(self.text())

    def __bool__(self) -> bool:
        return bool(self.text())

    def __eq__(self, other: object) -> bool:
        return self.text() == (other.text() if isinstance(other, _SecretValue) else other)

    def __hash__(self) -> int:
        return hash(self.text())

    def __contains__(self, item: object) -> bool:
        return isinstance(item, str) and item in self.text()

    def __iter__(self) -> Any:
        return iter(self.text())

    def __getitem__(self, key: Any) -> str:
        return self.text()[key]

    def __add__(self, other: Any) -> Any:
        return self.text() + other

    def __radd__(self, other: Any) -> Any:
        return other + self.text()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.text(), name)


def _with_secrets(value: Any, secrets: _Secrets) -> Any:
    """``value`` with every ``!age`` marker replaced by a :class:`_SecretValue`;
    containers copied only where they hold one."""
    if is_age_marker(value):
        payload, where = marker_parts(value)
        return _SecretValue(payload, where, secrets)
    if isinstance(value, dict):
        items = {k: _with_secrets(v, secrets) for k, v in value.items()}
        return items if any(items[k] is not value[k] for k in items) else value
    if isinstance(value, list):
        seq = [_with_secrets(v, secrets) for v in value]
        return seq if any(a is not b for a, b in zip(seq, value, strict=True)) else value
    return value


def _plain(value: Any) -> Any:
    """What a template gets for a looked-up value: a ``!age`` value's plaintext."""
    return value.text() if isinstance(value, _SecretValue) else value


def _opened(value: Any) -> Any:
    """``value`` with every ``!age`` value in it read as its plaintext (recorded: the
    taint), containers copied only where they hold one: what a filter of
    ``pipeline/filters.py`` walks (``to_json`` of a mapping holding a secret)."""
    if isinstance(value, _SecretValue):
        return value.text()
    if isinstance(value, dict):
        items = {k: _opened(v) for k, v in value.items()}
        return items if any(items[k] is not value[k] for k in items) else value
    if isinstance(value, list):
        seq = [_opened(v) for v in value]
        return seq if any(a is not b for a, b in zip(seq, value, strict=True)) else value
    return value


def template_context(node: Node, facts: Mapping[str, Any], info: SourceInfo) -> dict[str, Any]:
    """The Jinja2 context of SPEC §1: vars at top level, plus node, facts and source."""
    context = dict(node.vars)
    context["node"] = {
        "name": node.name,
        "state": node.state,
        "apps": [a.name for a in node.apps],
        "meta_nodes": list(node.meta_nodes),
    }
    context["facts"] = dict(facts)
    context["source"] = {"url": info.url, "branch": info.branch, "commit": info.commit}
    return context


@dataclass(frozen=True, slots=True, kw_only=True)
class RenderLimits:
    """RenderLimits bound the rendering of one template (SPEC §10 "Sandbox and bounds").

    ``render_timeout``: seconds one template may take, compiling included
    (SPEC §2, default 30s); ``max_file_size``: bytes of one rendered file,
    and characters of any one string a template builds on the way (SPEC
    §2, default 64 MiB). 0 turns a bound off.
    """

    render_timeout: float = DEFAULT_RENDER_TIMEOUT
    max_file_size: int = DEFAULT_MAX_FILE_SIZE


# A number a template computes has at most this many bits (~19,700 decimal
# digits; Python prints no more than 4,300): 10**10**10 or squaring in a loop
# would otherwise take minutes and gigabytes in one C call, which no timer can
# interrupt.
MAX_INT_BITS = 1 << 16

# Compiled by the sandbox: code compiled for the plain Environment (before
# issue 11) or for other intercepted operators must never be loaded. Bump the
# number when the compiled code changes.
_CACHE_PATTERN = "__sandbox2_%s.cache"


class _TooLarge(Exception):
    """A template was about to make a value, or output, beyond a bound."""

    def __init__(self, what: str, bound: str, hint: str) -> None:
        super().__init__(f"{what} is more than {bound}")
        self.what, self.bound, self.hint = what, bound, hint


class _Interrupted(BaseException):
    """SIGALRM during a render found it past a bound: ``kind`` is "time" or
    "memory". A BaseException, so that no ``except Exception`` in Jinja2
    (constant folding while compiling) or in a filter swallows it."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


# How often a render's time and memory are looked at (SIGALRM), seconds.
TICK_S = 0.05
# How much a template may grow the renderer's resident memory: no one value
# is larger than max_file_size, but a loop may keep 100,000 of them. 16 x
# max_file_size (1 GiB at the default), never below 256 MiB, which no sane
# template approaches while Python's allocator noise stays far below it.
MEMORY_FACTOR = 16
MEMORY_FLOOR = 256 << 20


def memory_bound(limits: RenderLimits) -> int:
    """Bytes a template's render may add to resident memory; 0 = no bound."""
    if not limits.max_file_size:
        return 0
    return max(MEMORY_FACTOR * limits.max_file_size, MEMORY_FLOOR)


def _resident() -> int | None:
    """This process's resident memory in bytes (Linux ``/proc/self/statm``), or None."""
    try:
        fd = os.open("/proc/self/statm", os.O_RDONLY)
        try:
            fields = os.read(fd, 128).split()
        finally:
            os.close(fd)
        return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True, slots=True, kw_only=True)
class _Bounds:
    """The size checks of the sandbox: each raises _TooLarge before the value is made."""

    max_chars: int  # max_file_size, or 0 for no bound
    max_items: int  # Jinja2's MAX_RANGE: no list a template builds is longer than range()

    def chars(self, n: int) -> None:
        """A string or bytes of ``n`` characters is about to be made."""
        if self.max_chars and n > self.max_chars:
            raise _TooLarge(
                f"a text of {n:,} characters",
                f"max_file_size ({format_size(self.max_chars)})",
                "make the template produce less, or raise max_file_size",
            )

    def items(self, n: int) -> None:
        """A list or tuple of ``n`` items is about to be made."""
        if n > self.max_items:
            raise _TooLarge(
                f"a list of {n:,} items",
                f"the sandbox's bound of {self.max_items:,} items (as for range())",
                "make the template build shorter lists",
            )

    def bits(self, n: int) -> None:
        """A number of about ``n`` bits is about to be computed."""
        if n > MAX_INT_BITS:
            raise _TooLarge(
                f"a number of {n:,} bits",
                f"the sandbox's bound of {MAX_INT_BITS:,} bits",
                "make the template compute smaller numbers",
            )

    def sequence(self, value: Any, n: int) -> None:
        """``value`` (str, bytes, list, tuple) is about to be made ``n`` long."""
        if isinstance(value, str | bytes):
            self.chars(n)
        elif isinstance(value, list | tuple):
            self.items(n)

    def binop(self, operator: str, left: Any, right: Any) -> None:
        """``left OPERATOR right`` for the intercepted ``*``, ``**``, ``+``, ``%``.

        Runs for every one of these operators a template evaluates: concrete
        type checks only (no ABCs), numbers first.
        """
        if operator == "+":
            if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
                self.sequence(left, len(left) + len(right))
        elif operator == "*":
            if isinstance(left, int):
                if isinstance(right, int):
                    self.bits(left.bit_length() + right.bit_length())
                elif isinstance(right, _SEQUENCES):
                    self.sequence(right, len(right) * left)
            elif isinstance(right, int) and isinstance(left, _SEQUENCES):
                self.sequence(left, len(left) * right)
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                self.bits(left.bit_length() * right)
        elif operator == "%" and isinstance(left, str | bytes):
            self.percent(left, right)

    def percent(self, fmt: str | bytes, args: Any) -> None:
        """``fmt % args`` (and ``|format``): no field wider or more precise than the bound.

        A ``*`` width or precision comes from the arguments: any integer
        argument beyond the bound is refused then.
        """
        text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
        if "%" not in text:
            return
        star = False
        for width, precision in _PERCENT_FIELD.findall(text):
            for number in (width, precision):
                if number == "*":
                    star = True
                elif number:
                    self.chars(int(number))
        if star:
            values = args if isinstance(args, tuple) else (args,)
            for value in values:
                if isinstance(value, int):
                    self.chars(value)

    def spec(self, format_spec: str) -> None:
        """A ``str.format`` field spec (nested fields already substituted): width, precision."""
        for number in _DIGITS.findall(format_spec):
            self.chars(int(number))

    def method(self, func: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        """A call of a str or bytes method that can grow its string."""
        owner = getattr(func, "__self__", None)
        if not isinstance(owner, str | bytes):
            return
        name = getattr(func, "__name__", "")
        first = args[0] if args else None
        if name in ("ljust", "rjust", "center", "zfill") and isinstance(first, int):
            self.chars(first)
        elif name == "expandtabs":
            size = first if isinstance(first, int) else kwargs.get("tabsize", 8)
            if isinstance(size, int):
                tab = "\t" if isinstance(owner, str) else b"\t"
                self.chars(len(owner) + owner.count(tab) * size)  # type: ignore[arg-type]
        elif name == "replace" and len(args) >= 2:
            self.replace(owner, args[0], args[1])
        elif name == "join" and isinstance(first, list | tuple):
            self.joined(owner, first)

    def joined(self, separator: Any, items: list[Any] | tuple[Any, ...]) -> None:
        """``separator.join(items)`` (and ``|join``, ``~``): the sum of the parts."""
        size = len(separator) * len(items) if isinstance(separator, Sized) else 0
        for item in items:
            if isinstance(item, str | bytes):
                size += len(item)
        self.chars(size)

    def replace(self, text: Any, old: Any, new: Any) -> None:
        """``text.replace(old, new)``: at most count(old) × len(new) more."""
        if isinstance(new, Sized) and (
            (isinstance(text, str) and isinstance(old, str))
            or (isinstance(text, bytes) and isinstance(old, bytes))
        ):
            self.chars(len(text) + text.count(old) * len(new))  # type: ignore[arg-type]


_SEQUENCES = (str, bytes, list, tuple)  # the values that * and + can make huge

# A printf-style field: %[(name)][flags][width][.precision]type
_PERCENT_FIELD = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


# Compiled templates an environment keeps in memory (Jinja2's default is 400).
# A node's templates are distinct and each renders once a run, so what is worth
# keeping is what many of them include or import: a few dozen. 400 compiled
# templates of 40 lines held ~16 MiB in each render worker of a cold run
# (peak RSS 80 → 64 MiB at 2,000 files; SPEC §7 "peak RSS ≤ 60 MB", issue 19).
COMPILED_KEPT = 50


def _environment(
    snapshot: Snapshot,
    cache_dir: Path | None,
    limits: RenderLimits,
    secrets: _Secrets,
    fleet: Fleet | None = None,
    *,
    on_parse: Callable[[str, str, Any], None] | None = None,
    settings: JinjaSettings = DEFAULT_SETTINGS,
) -> Any:
    """The sandboxed Jinja2 environment every repository template renders in (SPEC §10).

    ``secrets`` opens ``.age`` templates (never kept in the bytecode cache: its
    compiled code would hold the plaintext on disk) and ``!age`` values, which
    name, attribute and item lookups hand to templates as plaintext (SPEC §8).
    ``fleet`` answers the global ``nodes(NAME)`` (SPEC §10 "Other nodes"): plain
    lists and dicts, another node's ``!age`` values unreadable (None: one of
    ``snapshot``'s own). ``on_parse(path, source, ast)`` sees every template
    parsed to be compiled (the render keys' analysis, renderkeys.analyse_ast).
    ``settings``: trim_blocks, lstrip_blocks, keep_trailing_newline and the
    allowed extensions (``pipeline/jinja_settings.py``); code compiled with
    other settings is cached under other names. The loader drops a
    template's ``#jinja2:`` first line (the caller chose ``settings`` from it).
    """
    import functools

    import jinja2
    import markupsafe
    from jinja2.compiler import CodeGenerator, optimizeconst
    from jinja2.runtime import Context
    from jinja2.sandbox import MAX_RANGE, SandboxedEnvironment, SandboxedFormatter

    bounds = _Bounds(max_chars=limits.max_file_size, max_items=MAX_RANGE)
    fleet = Fleet(snapshot) if fleet is None else fleet

    headers: dict[str, str] = {}  # repository path → the #jinja2: line the loader dropped

    class SnapshotLoader(jinja2.BaseLoader):
        """Templates by name relative to ``templates/``, read from the snapshot."""

        def get_source(
            self, environment: jinja2.Environment, template: str
        ) -> tuple[str, str, Any]:
            pieces = jinja2.loaders.split_template_path(template)  # refuses ".."
            path = "templates/" + "/".join(pieces)
            try:
                data = snapshot.read(path)
            except KeyError:
                raise jinja2.TemplateNotFound(template) from None
            encrypted = path.endswith(AGE_SUFFIX)
            if encrypted:
                data = secrets.open(data, path)
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                if encrypted:
                    raise RenderError(
                        f"{path}: a .j2.age template must decrypt to UTF-8 text — "
                        "encrypt the text of the template"
                    ) from None
                raise RenderError(f"{path}: a .j2 template must be UTF-8 text") from exc
            # The #jinja2: line is not part of the output (SPEC §10); the caller read
            # and checked it to choose this environment. An included template's is
            # dropped unread: it is compiled with the settings of the one including it.
            if text.startswith(HEADER):
                cut = text.find("\n") + 1 if "\n" in text else len(text)
                headers[path], text = text[:cut], text[cut:]
            # An encrypted template is loaded again at every use, so that each
            # destination that includes it is seen reading a secret (the taint).
            return text, path, (lambda: not encrypted)

        def load(
            self,
            environment: jinja2.Environment,
            name: str,
            globals: Any = None,  # noqa: A002 - Jinja2's name
        ) -> Any:
            if not name.endswith(AGE_SUFFIX):
                return super().load(environment, name, globals)
            # BaseLoader.load without the bytecode cache: no plaintext on disk.
            source, filename, uptodate = self.get_source(environment, name)
            code = environment.compile(source, name, filename)
            return environment.template_class.from_code(
                environment, code, environment.make_globals(globals), uptodate
            )

    class SecretContext(Context):
        """Top-level names: a ``!age`` value is handed over as its plaintext."""

        def resolve_or_missing(self, key: str) -> Any:
            return _plain(super().resolve_or_missing(key))

    class BoundedFormatter(SandboxedFormatter):
        """``str.format`` in the sandbox, refusing a field wider than the bound."""

        def format_field(self, value: Any, format_spec: str) -> Any:
            bounds.spec(format_spec)
            return super().format_field(value, format_spec)

    class BoundedCodeGenerator(CodeGenerator):
        """Jinja2's code, but ``a ~ b`` calls :meth:`BoundedSandbox.concat_bounded`:
        Jinja2 joins with its own ``str_join``, which no environment hook sees."""

        @optimizeconst
        def visit_Concat(self, node: Any, frame: Any) -> None:
            self.write("environment.concat_bounded((")
            for arg in node.nodes:
                self.visit(arg, frame)
                self.write(", ")
            self.write("))")

    class BoundedSandbox(SandboxedEnvironment):
        """Jinja2's sandbox, plus the size checks of :class:`_Bounds`."""

        code_generator_class = BoundedCodeGenerator
        context_class = SecretContext

        def _parse(self, source: str, name: str | None, filename: str | None) -> Any:
            ast = super()._parse(source, name, filename)
            if on_parse is not None and filename:
                # The analysis sees the template's text as committed, first line
                # included (renderkeys reads a #jinja2: line), as its own parse does.
                on_parse(filename, headers.get(filename, "") + source, ast)
            return ast

        def getitem(self, obj: Any, argument: Any) -> Any:
            return _plain(super().getitem(_plain(obj), argument))

        def getattr(self, obj: Any, attribute: str) -> Any:
            return _plain(super().getattr(_plain(obj), attribute))

        def concat_bounded(self, values: tuple[Any, ...]) -> str:
            # str_join's result (autoescape is off: never Markup), checked first.
            parts = [str(value) for value in values]
            bounds.joined("", parts)
            return "".join(parts)

        @staticmethod
        def concat(parts: Any) -> str:
            # What {% set x %}…{% endset %}, a macro's or a caller()'s output is
            # joined with: doubling a string through a block is checked too.
            parts = parts if isinstance(parts, list) else list(parts)
            bounds.joined("", parts)
            return "".join(parts)

        # Intercepted operators are also never folded at compile time, where
        # 10**10**10 would hang the compiler.
        intercepted_binops = frozenset({"*", "**", "+", "%"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            bounds.binop(operator, left, right)
            return self.binop_table[operator](left, right)

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
            bounds.method(__obj, args, kwargs)
            return super().call(__context, __obj, *args, **kwargs)

        def wrap_str_format(self, value: Any) -> Any:
            wrapped = super().wrap_str_format(value)
            owner = getattr(value, "__self__", None)
            if wrapped is None or isinstance(owner, markupsafe.Markup):
                return wrapped  # autoescape is off: no Markup reaches here in practice
            formatter = BoundedFormatter(self)
            by_map = value.__name__ == "format_map"

            def bounded_format(*args: Any, **kwargs: Any) -> str:
                if by_map:
                    if kwargs or len(args) != 1:
                        raise TypeError("format_map() takes exactly one argument")
                    kwargs, args = args[0], ()
                return str(formatter.vformat(str(owner), args, kwargs))

            return functools.update_wrapper(bounded_format, value)

    def checked(name: str, check: Callable[..., None]) -> None:
        """Filter ``name`` runs ``check`` with its arguments first."""
        original = env.filters[name]

        @functools.wraps(original)
        def bounded_filter(*args: Any, **kwargs: Any) -> Any:
            check(*args, **kwargs)
            return original(*args, **kwargs)

        env.filters[name] = bounded_filter

    def center(value: Any, width: Any = 80) -> None:
        if isinstance(width, int):
            bounds.chars(width + len(str(value)))

    def indent(s: Any, width: Any = 4, *_: Any, **__: Any) -> None:
        lines = str(s).count("\n") + 1
        bounds.chars(len(str(s)) + lines * (width if isinstance(width, int) else len(str(width))))

    def batch(value: Any, linecount: Any, fill_with: Any = None) -> None:
        if fill_with is not None and isinstance(linecount, int):
            bounds.items(linecount)

    def format_filter(value: Any, *args: Any, **kwargs: Any) -> None:
        bounds.percent(str(value), kwargs or args)

    def replace(eval_ctx: Any, s: Any, old: Any, new: Any, count: Any = None) -> None:
        bounds.replace(str(s), str(old), str(new))

    def join(eval_ctx: Any, value: Any, d: Any = "", attribute: Any = None) -> None:
        if attribute is None and isinstance(value, list | tuple):
            bounds.joined(str(d), value)

    cache = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        pattern = _CACHE_PATTERN
        if settings.digest():  # other settings compile the same source to other code
            tag = hashlib.sha256(settings.digest().encode()).hexdigest()[:16]
            pattern = _CACHE_PATTERN.replace("%s", f"{tag}_%s")
        cache = jinja2.FileSystemBytecodeCache(str(cache_dir), pattern)
    env = BoundedSandbox(
        loader=SnapshotLoader(),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=settings.keep_trailing_newline is True,
        trim_blocks=settings.trim_blocks,
        lstrip_blocks=settings.lstrip_blocks,
        extensions=[EXTENSIONS[name] for name in settings.extensions],
        autoescape=False,
        bytecode_cache=cache,
        cache_size=COMPILED_KEPT,
        **dict(settings.lexer),
    )
    from reconciler.pipeline import filters

    filters.install(env, chars=bounds.chars, items=bounds.items, plain=_opened)
    checked("center", center)
    checked("indent", indent)
    checked("batch", batch)
    checked("format", format_filter)
    checked("replace", replace)
    checked("join", join)
    lipsum = cast(Callable[..., Any], env.globals["lipsum"])

    @functools.wraps(lipsum)
    def bounded_lipsum(n: int = 5, html: bool = True, min: int = 20, max: int = 100) -> Any:
        if isinstance(n, int) and isinstance(max, int):
            bounds.chars(n * max)  # max words of at least one character each
        return lipsum(n, html, min, max)

    env.globals["lipsum"] = bounded_lipsum

    def nodes(name: str) -> list[dict[str, Any]]:
        """The nodes of node or meta-node ``name``, sorted by name (SPEC §10)."""
        return fleet.value(name)

    env.globals[NODES] = nodes
    return env


class _Alarm:
    """render_timeout and the memory bound as SIGALRM in the rendering thread.

    Renders happen in the main thread (of the agent, of a command, or of a
    forked worker): ``setitimer(ITIMER_REAL)`` ticks every TICK_S while a
    template renders, and its handler raises :class:`_Interrupted` between
    two bytecodes of the template's code once the template has taken
    ``render_timeout`` or grown resident memory by :func:`memory_bound`.
    Whatever handler and timer were there before (a caller's own alarm)
    are put back, the remaining time counted down. Outside the main thread
    a signal handler cannot be set: there only the size checks bound a
    render. Used as a context manager around a batch of templates,
    :meth:`limit` around each one.
    """

    def __init__(self, limits: RenderLimits) -> None:
        self.seconds = limits.render_timeout
        self.memory = memory_bound(limits)
        self.tick = min(TICK_S, self.seconds) if self.seconds > 0 else TICK_S
        self.usable = (self.seconds > 0 or self.memory > 0) and (
            threading.current_thread() is threading.main_thread()
        )
        self.armed = False
        self.deadline = 0.0  # monotonic seconds
        self.base = 0  # resident bytes when the template started
        self.previous_handler: Any = None
        self.previous_timer = (0.0, 0.0)
        self.started = 0.0

    def _fire(self, signum: int, frame: FrameType | None) -> None:
        if not self.armed:  # a signal delivered just after disarming is ignored
            return
        if self.seconds > 0 and time.monotonic() >= self.deadline:
            self.armed = False
            raise _Interrupted("time")
        if self.memory:
            resident = _resident()
            if resident is not None and resident - self.base > self.memory:
                self.armed = False
                raise _Interrupted("memory")

    def __enter__(self) -> _Alarm:
        if self.usable:
            self.started = time.monotonic()
            self.previous_handler = signal.signal(signal.SIGALRM, self._fire)
            # Restart interrupted system calls (SA_RESTART): a tick must not
            # fail a read of libgit2 or of a file with EINTR; the handler
            # still runs at the next bytecode.
            signal.siginterrupt(signal.SIGALRM, False)
            self.previous_timer = signal.setitimer(signal.ITIMER_REAL, 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.usable:
            return
        self.armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        handler = self.previous_handler
        signal.signal(signal.SIGALRM, signal.SIG_DFL if handler is None else handler)
        delay, interval = self.previous_timer
        if delay > 0:  # an earlier caller's alarm: what was left of it, at least a tick
            left = max(delay - (time.monotonic() - self.started), 1e-6)
            signal.setitimer(signal.ITIMER_REAL, left, interval)

    def limit(self) -> _Armed:
        """Context manager: the timer runs for one template."""
        return _Armed(self)


class _Armed:
    """The timer of an _Alarm, running for one template."""

    def __init__(self, alarm: _Alarm) -> None:
        self.alarm = alarm

    def __enter__(self) -> None:
        alarm = self.alarm
        if alarm.usable:
            alarm.deadline = time.monotonic() + alarm.seconds
            alarm.base = (_resident() or 0) if alarm.memory else 0
            alarm.armed = True
            signal.setitimer(signal.ITIMER_REAL, alarm.tick, alarm.tick)

    def __exit__(self, *exc: object) -> None:
        if self.alarm.usable:
            self.alarm.armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)


def _template_line(tb: TracebackType | None) -> tuple[str, int] | None:
    """The innermost template and line a traceback passes through (not rewritten by Jinja2)."""
    found = None
    while tb is not None:
        template = tb.tb_frame.f_globals.get("__jinja_template__")
        if template is not None and template.filename:
            found = (template.filename, template.get_corresponding_lineno(tb.tb_lineno))
        tb = tb.tb_next
    return found


def _render_error(
    exc: BaseException,
    repo_path: str,
    node: str,
    snapshot: Snapshot,
    secret: bool = False,
    limits: RenderLimits | None = None,
) -> RenderError:
    """Name the template, line and kind of a failure, with the offending line.

    ``secret``: the destination is ``secret: true`` (SPEC §1). Its error
    names the template, the line and the kind of error only ("undefined
    variable", "template not found", "syntax error", "render timeout", …):
    never text of the template, its variables or its output, because a
    template may hold a literal secret and the error lands in reports,
    last-run.json, the webhook and logs (issues #3 and 11). The secrets
    of SPEC §8 will make every template that read a secret value
    ``secret`` here as well.
    """
    import jinja2
    from jinja2.exceptions import SecurityError

    from reconciler.pipeline.filters import FilterError

    where, line = repo_path, None
    text = ""
    if isinstance(exc, jinja2.TemplateSyntaxError):
        where, line = exc.filename or repo_path, exc.lineno
        detail = "" if secret else f": {exc.message}"
        problem = f"syntax error{detail} — fix the template"
    else:
        if isinstance(exc, _Interrupted):
            where, line = _template_line(exc.__traceback__) or (repo_path, None)
        else:
            for frame in reversed(traceback.extract_tb(exc.__traceback__)):
                if frame.filename.startswith("templates/"):
                    where, line = frame.filename, frame.lineno
                    break
        on = f" (node {node})" if node else ""  # render_problems names the nodes itself
        if isinstance(exc, _Interrupted) and exc.kind == "time":
            seconds = limits.render_timeout if limits else 0
            problem = (
                f"render timeout: took longer than render_timeout ({seconds:g}s){on} — "
                "make the template do less work, or raise render_timeout"
            )
        elif isinstance(exc, _Interrupted):
            bound = format_size(memory_bound(limits or RenderLimits()))
            problem = (
                f"memory bound: the render grew memory by more than {bound} "
                f"({MEMORY_FACTOR} × max_file_size, at least {format_size(MEMORY_FLOOR)}){on} "
                "— make the template keep fewer values, or raise max_file_size"
            )
        elif isinstance(exc, _TooLarge):
            what = "value too large: more than" if secret else f"{exc.what} is more than"
            problem = f"{what} {exc.bound}{on} — {exc.hint}"
        elif isinstance(exc, SecurityError):
            detail = "" if secret else f": {exc.message}"
            problem = (
                f"sandbox refusal{detail}{on} — a template reads its vars, node, facts "
                "and source; it may not reach Python"
            )
        elif isinstance(exc, jinja2.UndefinedError):
            detail = "" if secret else f": {exc.message}"
            problem = (
                f"undefined variable{detail}{on} — define it in vars or guard it with 'is defined'"
            )
        elif isinstance(exc, FilterError):
            problem = "a filter refused its input" if secret else str(exc)
            problem += f"{on} — fix the template or the vars it uses"
        elif isinstance(exc, UnknownNodes):
            detail = "" if secret else f" {exc.name!r}"
            problem = (
                f"nodes(){detail}: no such node or meta-node in hosts/{on} — "
                "name a node or meta-node of hosts/ (a file hosts/<name>.yaml)"
            )
        elif isinstance(exc, jinja2.TemplateNotFound):
            detail = "" if secret else f" {exc.name!r}"
            problem = f"template{detail} not found{on} — paths are relative to templates/"
        else:
            problem = type(exc).__name__ if secret else f"{type(exc).__name__}: {exc}"
            problem += f"{on} — fix the template or the vars it uses"
    if line and not where.endswith(AGE_SUFFIX):
        try:  # Jinja2 counted lines without the #jinja2: first line (the loader drops it)
            if snapshot.read(where).startswith(HEADER.encode()):
                line += 1
        except (KeyError, ReconcilerError):
            pass
    if line and not secret:
        try:
            source_line = snapshot.read(where).decode("utf-8").splitlines()[line - 1].strip()
            text = f' [line {line}: "{source_line[:120]}"]'
        except (KeyError, IndexError, UnicodeDecodeError, ReconcilerError):
            pass
    prefix = f"{where}:{line}" if line else where
    if where != repo_path:
        text += f" (included from {repo_path})"
    return RenderError(f"{prefix}: {problem}{text}")


class _NotExpression(Exception):
    """A ``when:`` value that is not a non-empty string."""


def _when_error(
    exc: BaseException, expr: Any, dest: PurePosixPath, where: str, node: str
) -> RenderError:
    """One line for a ``when:`` that cannot decide (SPEC §9 bad input): the file and
    entry that set it, the destination, the node, the kind of failure and what to do."""
    import jinja2
    from jinja2.exceptions import SecurityError

    hint = "fix the expression"
    if isinstance(exc, _NotExpression):
        kind = "is not a Jinja2 expression in a string"
        hint = "write it as a quoted string, e.g. when: \"facts.os_release.ID == 'debian'\""
    elif isinstance(exc, jinja2.TemplateSyntaxError):
        kind = f"syntax error: {exc.message}"
    elif isinstance(exc, SecurityError):
        kind = f"sandbox refusal: {exc.message}"
        hint = "an expression reads vars, node, facts and source; it may not reach Python"
    elif isinstance(exc, jinja2.UndefinedError):
        kind = f"undefined variable: {exc.message}"
        hint = "define it in vars or guard it with 'is defined'"
    elif isinstance(exc, _Interrupted):
        kind = f"{'render timeout' if exc.kind == 'time' else 'memory bound'} passed"
        hint = "make the expression do less work"
    elif isinstance(exc, _TooLarge):
        kind = f"{exc.what} is more than {exc.bound}"
        hint = exc.hint
    else:
        kind = f"{type(exc).__name__}: {exc}"
    return RenderError(f"when: {expr!r} for {dest} (node {node}): {kind}", where=where, hint=hint)


def _conditions(
    snapshot: Snapshot, node: Node, sources: Mapping[PurePosixPath, tuple[str, str, int]]
) -> dict[PurePosixPath, tuple[Any, str]]:
    """dest → (its ``when:`` value, the file that set it) for every destination with one.

    The same glob-on-destination matching and precedence as the other metadata
    (:func:`_metadata`): ``app.yaml`` entries in order, then the node's
    ``files:``; the last match wins. The file is ``templates/<app>/app.yaml``
    or the host file whose ``files:`` entry won (SPEC §9 bad input names it).
    """

    def rules(
        patterns: Mapping[str, Mapping[str, Any]], origin: Callable[[str], str]
    ) -> list[tuple[Any, Any, str]]:
        if not any("when" in v for v in patterns.values()):
            return []  # pathspec only for a when: to match (SPEC §7)
        import pathspec

        return [
            (pathspec.GitIgnoreSpec.from_lines([p]), v["when"], f"{origin(p)} (files: {p})")
            for p, v in patterns.items()
            if "when" in v
        ]

    node_rules = rules(node.files, lambda p: node.files_origin.get(p, f"hosts/{node.name}.yaml"))
    app_rules = {
        a.name: rules(
            load_app_config(snapshot, a.name, node=node.name).get("files", {}),
            lambda _, a=a.name: f"templates/{a}/app.yaml",  # type: ignore[misc]
        )
        for a in node.apps
    }
    out: dict[PurePosixPath, tuple[Any, str]] = {}
    if not node_rules and not any(app_rules.values()):
        return out
    for dest, (app, _, _) in sources.items():
        rel = str(dest).lstrip("/")
        for spec, expr, where in (*app_rules[app], *node_rules):
            if spec.match_file(rel):
                out[dest] = (expr, where)
    return out


def _jinja_settings(
    snapshot: Snapshot, node: Node, sources: Mapping[PurePosixPath, tuple[str, str, int]]
) -> dict[PurePosixPath, JinjaSettings]:
    """dest → its app's Jinja2 settings (``fleet.yaml``'s ``jinja:`` under the app's
    ``app.yaml``'s, SPEC §10), for the destinations whose settings are not the
    defaults. Raises InventoryError naming ``fleet.yaml`` or the ``app.yaml`` and line."""
    fleet = fleet_settings(snapshot)
    apps = {
        a.name: app_settings(fleet, load_app_config(snapshot, a.name, node=node.name))
        for a in node.apps
    }
    return {
        dest: apps[app]
        for dest, (app, _, _) in sources.items()
        if apps.get(app, DEFAULT_SETTINGS) != DEFAULT_SETTINGS
    }


def _prepare(
    snapshot: Snapshot,
    node: Node,
    facts: Mapping[str, Any],
    shared: dict[PurePosixPath, list[tuple[str, str, int]]] | None = None,
) -> tuple[
    Items,
    dict[PurePosixPath, tuple[str, str, int]],
    dict[str, Any],
    Callable[[str, PurePosixPath], tuple[dict[str, Any], str]],
]:
    """What :func:`render_target` and :func:`render_problems` both start from:
    ``node``'s ``[VAR]`` items, its sources (dest → (app, repo path, filemode)),
    its template context, and its metadata lookup ``(app, dest) → (meta, where)``
    (:func:`_metadata`); ``shared`` is filled as :func:`_collect` says.
    Raises as :func:`_collect` and ``load_app_config`` do."""
    items: Items = {}
    app_globs = {
        a.name: _compile(load_app_config(snapshot, a.name, node=node.name).get("files", {}))
        for a in node.apps
    }
    node_globs = _compile(node.files)

    def metadata(app: str, dest: PurePosixPath) -> tuple[dict[str, Any], str]:
        return _metadata(app_globs[app], node_globs, node, app, dest)

    def block(app: str, dest: PurePosixPath) -> bool:
        return metadata(app, dest)[0].get("block", False) is not False

    sources = _collect(snapshot, node, items, block=block, shared=shared)
    context = template_context(node, facts, snapshot.info)
    return items, sources, context, metadata


PARALLEL_MIN_TEMPLATES = 64  # below this, forking costs more than it saves


def render_target(
    snapshot: Snapshot,
    node: Node,
    facts: Mapping[str, Any],
    *,
    cache_dir: Path | None = None,
    workers: int = 1,
    reuse: Callable[[PurePosixPath, str], bytes | None] | None = None,
    limits: RenderLimits = RenderLimits(),
    decryption: Decryption = Decryption(),
    inventory: Inventory | None = None,
    analyses: dict[str, Any] | None = None,
) -> TargetState:
    """Render every file of ``node`` from ``snapshot``.

    Secrets (SPEC §8), opened as ``decryption`` says: ``<path>.age`` is
    decrypted to ``<path>``, ``<path>.j2.age`` decrypted then rendered, and a
    ``!age`` value of ``vars`` decrypted when a template reads it. Each of
    these destinations is ``secret`` whatever the metadata says, and is never
    reused (its render key is ""). A secret that cannot be opened raises
    SecretError naming it and the node, before anything is written.

    ``reuse(dest, render_key)``: the content already rendered with that key,
    if the caller still has it intact (the agent: the file it wrote, unchanged
    on disk), else None. Only templates without a reusable output are
    rendered (SPEC §7: "only what changed is compiled and rendered").

    ``cache_dir``: Jinja2 bytecode cache (keyed by template name and source
    checksum), so only templates whose source changed are compiled again
    (SPEC §7: compiling is the cost to avoid). ``workers`` > 1 renders in
    that many forked processes when there are many templates (a cold run
    compiles on every core). ``limits``: each template's render_timeout and
    max_file_size (SPEC §10); every template renders in the sandbox.
    ``inventory``: the commit's, for ``nodes(NAME)`` (SPEC §10; loaded from
    ``snapshot`` at the first call when None). ``analyses``: with ``reuse``,
    the cache of what each template reads, by blob id
    (:func:`renderkeys.render_keys` updates it; the caller keeps it).
    Returns the TargetState in node app order. Raises RenderError (template
    syntax, undefined variable, missing include, sandbox refusal, a bound
    passed, ``nodes()`` of an unknown name), InventoryError (two apps produce one path, bad metadata) or
    PathError (a destination that escapes the root). Nothing is written
    outside ``cache_dir``.
    """
    shared: dict[PurePosixPath, list[tuple[str, str, int]]] = {}
    items, sources, context, metadata = _prepare(snapshot, node, facts, shared)
    metas: dict[PurePosixPath, tuple[dict[str, Any], str]] = {
        dest: metadata(app, dest) for dest, (app, _, _) in sources.items()
    }
    secrets = _Secrets(decryption, node.name)
    settings = _jinja_settings(snapshot, node, sources)
    job = _RenderJob(
        snapshot=snapshot,
        context=context,
        node=node.name,
        cache_dir=cache_dir,
        limits=limits,
        secrets=secrets,
        items=items,
        fleet=Fleet(snapshot, inventory),
        settings=settings,
    )
    for dest in job.unwanted(_conditions(snapshot, node, sources)):
        # when: false (SPEC §9): not in the target state, so never rendered, and
        # pruned like any path that leaves it when it was managed before.
        del sources[dest], metas[dest]
    jobs = [
        (dest, repo_path, bool(metas[dest][0].get("secret", False)) or _encrypted(repo_path))
        for dest, (_, repo_path, _) in sources.items()
        if is_template(repo_path)
    ]
    keys: dict[PurePosixPath, str | None] = {}
    rendered: dict[PurePosixPath, bytes] = {}
    every = jobs
    cache: dict[str, Any] = {} if analyses is None else analyses
    memo: dict[str, Any] = {}  # shared by both passes: the second computes only unknowns

    def make_keys(parse: bool) -> dict[PurePosixPath, str | None]:
        from reconciler import __version__

        made = render_keys(
            snapshot,
            context,
            every,
            items=items,
            analyses=cache,
            fleet=job.fleet,
            version=__version__,
            parse=parse,
            memo=memo,
        )
        for dest, jinja in settings.items():
            # Its app's Jinja2 settings shape its output too (SPEC §10): a change of
            # fleet.yaml's or app.yaml's jinja: renders what it affects again. (A
            # #jinja2: line is in the template's blob, already in the key.)
            if made.get(dest):
                made[dest] = hashlib.sha256(f"{made[dest]}\0{jinja.digest()}".encode()).hexdigest()
        return made

    if reuse is not None:
        # Templates this host has not analysed yet get no key now (None): they
        # render, and the parse that compiles them says what they read.
        keys = make_keys(parse=False)
        todo = []
        for j in jobs:
            key = keys.get(j[0])
            kept = reuse(j[0], key) if key else None
            if kept is None:
                todo.append(j)
            else:
                rendered[j[0]] = kept
        jobs = todo
    log.debug("%s: rendering %d template(s), %d reused", node.name, len(jobs), len(rendered))
    opened: list[bytes] = []  # plaintexts decrypted in forked workers
    if workers > 1 and len(jobs) >= PARALLEL_MIN_TEMPLATES:
        done, tainted, opened = _render_parallel(job, jobs, workers)
        rendered.update(done)
    else:
        done, failed = job.render(jobs)
        if failed:
            raise failed[1]
        rendered.update(done)
        tainted = job.tainted
    if reuse is not None and None in keys.values():
        for path, found in job.analysed.items():
            blob = snapshot.blob_id(path)
            if blob is not None:
                cache[blob] = found
        # Parses only what the render did not (its bytecode was cached).
        keys = make_keys(parse=True)
    for dest in tainted:
        keys[dest] = ""  # rendered from a secret: never reused, so never untainted
    files: dict[PurePosixPath, TargetFile] = {}
    parts: dict[PurePosixPath, list[tuple[Block, dict[str, Any], bool]]] = {}
    for dest, (app, repo_path, filemode) in sources.items():
        meta, where = metas[dest]
        if filemode == GIT_FILEMODE_LINK:
            # A desired symlink: its "content" is its target text, so its sha256
            # (state, journal, plan) is that of the text; mode and owner metadata
            # do not apply to a link (docs/spec.md §9).
            if meta.get("block", False) is not False:
                raise InventoryError(
                    f"{where}: block: for {dest} (node {node.name}), which {repo_path} "
                    "makes a symlink — a managed block lives in a regular file; remove "
                    "block: for it or commit a file"
                )
            target_text = link_target(snapshot, repo_path)
            files[dest] = TargetFile(
                path=dest,
                content=os.fsencode(target_text),
                mode=0o777,
                owner=None,
                group=None,
                secret=False,
                policy=meta.get("policy", "enforce"),
                app=app,
                template=repo_path,
                link=target_text,
            )
            continue
        if dest in rendered:
            content = rendered[dest]
        elif _encrypted(repo_path):
            content = secrets.open(snapshot.read(repo_path), repo_path)
        else:
            content = snapshot.read(repo_path)
        default_mode = 0o755 if filemode == GIT_FILEMODE_EXEC else 0o644
        if _encrypted(repo_path):
            # An encrypted file is private unless its metadata says otherwise, as
            # agenix and sops-nix write theirs (0400): a TLS key must not land
            # world-readable because nobody wrote `mode:` next to it.
            default_mode &= 0o700
        mode = parse_mode(meta["mode"], where=where) if "mode" in meta else default_mode
        marker = block_marker(
            meta.get("block", False), app=app, where=where, dest=dest, node=node.name
        )
        if marker is not None:
            # A managed block (SPEC §9): assembled with the other apps' blocks of the
            # same file below; the file around them is read and spliced between scan
            # and plan (blockfiles.py).
            secret = bool(meta.get("secret", False)) or _encrypted(repo_path) or dest in tainted
            block = Block(app=app, marker=marker, content=content_of(content), template=repo_path)
            parts.setdefault(dest, []).append((block, meta, secret))
            continue
        files[dest] = TargetFile(
            path=dest,
            content=content,
            mode=mode,
            owner=meta.get("owner"),
            group=meta.get("group"),
            secret=bool(meta.get("secret", False)) or _encrypted(repo_path) or dest in tainted,
            policy=meta.get("policy", "enforce"),
            app=app,
            template=repo_path,
            render_key=keys.get(dest) or "",
        )
    for dest, extra in shared.items():
        for app, repo_path, _ in extra:
            parts.setdefault(dest, []).extend(
                _shared_block(job, secrets, snapshot, node, dest, app, repo_path, metadata)
            )
    files.update(_block_files(parts, node))
    absent = absent_rules(snapshot, node)
    check_absent(absent, files, node.name)
    return TargetState(
        node=node.name,
        files=files,
        apps=load_app_settings(snapshot, node),
        absent=absent,
        directories=directory_targets(snapshot, node, files),
        secret_values=(*opened, *secrets.plaintexts()),
    )


def _shared_block(
    job: _RenderJob,
    secrets: _Secrets,
    snapshot: Snapshot,
    node: Node,
    dest: PurePosixPath,
    app: str,
    repo_path: str,
    metadata: Callable[[str, PurePosixPath], tuple[dict[str, Any], str]],
) -> list[tuple[Block, dict[str, Any], bool]]:
    """The block of a later app in a file that an earlier app's block already names
    (SPEC §9, ``_collect``'s ``shared``): its ``when:``, its render, its marker."""
    if job.unwanted(_conditions(snapshot, node, {dest: (app, repo_path, 0)})):
        return []
    meta, where = metadata(app, dest)
    marker = block_marker(meta.get("block", False), app=app, where=where, dest=dest, node=node.name)
    assert marker is not None  # _collect shares block destinations only
    secret = bool(meta.get("secret", False)) or _encrypted(repo_path)
    if is_template(repo_path):
        done, failed = job.render([(dest, repo_path, secret)])
        if failed is not None:
            raise failed[1]
        content = done[dest]
        secret = secret or dest in job.tainted
    elif _encrypted(repo_path):
        content = secrets.open(snapshot.read(repo_path), repo_path)
    else:
        content = snapshot.read(repo_path)
    block = Block(app=app, marker=marker, content=content_of(content), template=repo_path)
    return [(block, meta, secret)]


def _block_files(
    parts: Mapping[PurePosixPath, list[tuple[Block, dict[str, Any], bool]]], node: Node
) -> dict[PurePosixPath, TargetFile]:
    """One TargetFile per file holding managed blocks (SPEC §9): its blocks in node app
    order, its content their view; mode, owner and group from the first block whose
    metadata sets them (unset: the host's, 0644 for a new file), secret if any is."""
    order = {a.name: i for i, a in enumerate(node.apps)}
    out = {}
    for dest, got in parts.items():
        got = sorted(got, key=lambda p: order.get(p[0].app, len(order)))
        blocks = tuple(b for b, _, _ in got)
        check_blocks(blocks, dest, node.name)
        metas = [m for _, m, _ in got]
        mode = next((m["mode"] for m in metas if "mode" in m), None)
        first = blocks[0]
        out[dest] = TargetFile(
            path=dest,
            content=view(blocks),
            mode=0o644 if mode is None else parse_mode(mode, where=first.template),
            owner=next((m["owner"] for m in metas if "owner" in m), None),
            group=next((m["group"] for m in metas if "group" in m), None),
            secret=any(secret for _, _, secret in got),
            policy=metas[0].get("policy", "enforce"),
            app=first.app,
            template=first.template,
            blocks=blocks,
            mode_set=mode is not None,
        )
    return out


def directory_targets(
    snapshot: Snapshot, node: Node, files: Mapping[PurePosixPath, TargetFile]
) -> dict[PurePosixPath, TargetDir]:
    """The ``directories:`` of ``node``'s apps' ``app.yaml`` (SPEC §9), by path.

    The schema has already refused a relative path, one with ``.``, ``..``
    or an empty component, ``/`` itself and a mode that is not an octal
    string. Raises InventoryError (one line naming the app.yaml, the node
    and what to do) for a directory that is also a file or symlink of the
    target state or lies below one, a directory two apps declare, and
    ``purge: true`` on a directory of depth one (``/etc``, ``/usr``, …) or
    of :data:`PROTECTED_FROM_PURGE` — a purge there would delete what
    packages installed, and no peer would stop it (Puppet allows anything).
    """
    out: dict[PurePosixPath, TargetDir] = {}
    for app in node.apps:
        origin = f"templates/{app.name}/app.yaml"
        for text, meta in (
            load_app_config(snapshot, app.name, node=node.name).get("directories", {}).items()
        ):
            path = PurePosixPath(text)
            where = f"{origin}: directories: {text}"
            other = out.get(path)
            if other is not None:
                raise InventoryError(
                    f"{where}: also declared by {other.origin} (node {node.name}) — "
                    "declare each directory in one app"
                )
            clash = next((p for p in (path, *path.parents) if p in files), None)
            if clash is not None:
                what = "a symlink" if files[clash].link is not None else "a file"
                problem = "is" if clash == path else f"lies below {clash}, which is"
                raise InventoryError(
                    f"{where}: {problem} also {what} of node {node.name} "
                    f"({files[clash].template}) — keep one of them"
                )
            purge = bool(meta.get("purge", False))
            if purge and (len(path.parts) <= 2 or text in PROTECTED_FROM_PURGE):
                raise InventoryError(
                    f"{where}: purge: true would delete what packages installed in {text} "
                    f"(node {node.name}) — purge a directory the app owns, such as "
                    "/etc/nginx/conf.d, or set purge: false"
                )
            out[path] = TargetDir(
                path=path,
                mode=parse_mode(meta["mode"], where=where) if "mode" in meta else None,
                owner=meta.get("owner"),
                group=meta.get("group"),
                purge=purge,
                app=app.name,
                origin=origin,
            )
    return out


def absent_rules(snapshot: Snapshot, node: Node) -> tuple[AbsentRule, ...]:
    """The ``absent:`` patterns of ``node``: its host files' (union over the node and its
    meta-nodes, as ``exclude``) then each app's ``app.yaml``'s, in node app order
    (SPEC §9). Raises InventoryError for a bad app.yaml."""
    rules = [AbsentRule(pattern=p, app=HOST_APP, origin=o) for p, o in node.absent]
    for app in node.apps:
        for pattern in load_app_config(snapshot, app.name, node=node.name).get("absent", ()):
            rules.append(
                AbsentRule(pattern=pattern, app=app.name, origin=f"templates/{app.name}/app.yaml")
            )
    return tuple(rules)


def check_absent(
    rules: tuple[AbsentRule, ...], files: Mapping[PurePosixPath, TargetFile], node: str
) -> None:
    """Refuse an ``absent:`` pattern that names a path the same node renders (SPEC §9 bad
    input: it would be written and deleted by every run). Raises InventoryError naming
    the file that lists it, the node and the template."""
    from reconciler.pipeline.scan import absent_match

    for rule in rules:
        for dest, t in files.items():
            if absent_match(rule.pattern, dest):
                raise InventoryError(
                    f"{rule.origin}: absent: {rule.pattern} names {dest}, which node {node} "
                    f"renders from {t.template} — remove it from absent: or remove the template"
                )


MAX_RENDER_PROBLEMS = 20  # per node: each failed template may have cost a render_timeout


def render_problems(
    snapshot: Snapshot,
    node: Node,
    facts: Mapping[str, Any],
    *,
    limits: RenderLimits = RenderLimits(),
    most: int = MAX_RENDER_PROBLEMS,
    decryption: Decryption = Decryption(placeholder=True),
    inventory: Inventory | None = None,
) -> tuple[ReconcilerError, ...]:
    """Every template of ``node`` that fails to render, for ``reconciler validate``.

    :func:`render_target` stops at a node's first error, as a run must;
    ``validate`` reports them all (issue 12): each template is rendered and
    each failure kept, in node app order, at most ``most`` of them (a failure
    can cost a whole ``render_timeout``). The errors name the template and
    line but not the node, so one template failing on many nodes reads the
    same on each and the caller names the nodes once. An error before any
    template renders (two apps produce one path, bad app.yaml) is the only
    one returned. () when every template renders.
    """
    shared: dict[PurePosixPath, list[tuple[str, str, int]]] = {}
    try:
        items, sources, context, metadata = _prepare(snapshot, node, facts, shared)
        secret = {
            dest: bool(metadata(app, dest)[0].get("secret")) or _encrypted(repo_path)
            for dest, (app, repo_path, _) in sources.items()
            if is_template(repo_path)
        }
        settings = _jinja_settings(snapshot, node, sources)
    except ReconcilerError as exc:
        return (exc,)
    jobs = [(dest, sources[dest][1], flag) for dest, flag in secret.items()]
    later = [  # the later apps' blocks of a file several apps manage blocks of (SPEC §9)
        (dest, repo_path, bool(metadata(app, dest)[0].get("secret")) or _encrypted(repo_path))
        for dest, extra in shared.items()
        for app, repo_path, _ in extra
        if is_template(repo_path)
    ]
    job = _RenderJob(
        snapshot=snapshot,
        context=context,
        node="",
        cache_dir=None,
        limits=limits,
        secrets=_Secrets(decryption, ""),
        items=items,
        fleet=Fleet(snapshot, inventory),
        settings=settings,
    )
    errors: list[ReconcilerError] = []
    while jobs and len(errors) < most:
        _, failed = job.render(jobs)
        if failed is None:
            break
        errors.append(failed[1])
        jobs = jobs[[j[0] for j in jobs].index(failed[0]) + 1 :]  # go on after the failure
    for one in later:  # one at a time: their destinations repeat those of ``jobs``
        if len(errors) >= most:
            break
        _, failed = job.render([one])
        if failed is not None:
            errors.append(failed[1])
    return tuple(errors)


Job = tuple[PurePosixPath, str, bool]  # destination, template path, secret


@dataclass(slots=True, kw_only=True)
class _RenderJob:
    """What rendering needs, in one place, so a forked worker inherits it whole."""

    snapshot: Snapshot
    context: dict[str, Any]
    node: str
    cache_dir: Path | None
    limits: RenderLimits
    secrets: _Secrets
    # What nodes(NAME) answers from (SPEC §10 "Other nodes"), memoised for the run.
    fleet: Fleet
    env: Any = None
    # Destinations whose template read a secret (SPEC §8 taint), filled by render().
    tainted: set[PurePosixPath] = field(default_factory=set)
    # dest → (VAR, key) for a destination of a [VAR] path: its template sees that
    # item as ``item`` and its key as ``item_key`` (SPEC §9).
    items: Items = field(default_factory=dict)
    # The context with its !age values as _SecretValue objects, made at first render.
    _live: dict[str, Any] | None = None
    # Repository path → what the template reads (renderkeys.Analysis.to_json), for
    # each template this job parsed to compile it: the render keys' cache, filled
    # at no extra parse (SPEC §10).
    analysed: dict[str, Any] = field(default_factory=dict)
    # dest → the Jinja2 settings of its app (fleet.yaml's jinja: under app.yaml's,
    # SPEC §10); a destination not here has the defaults. A template's #jinja2:
    # line is read over them when it renders.
    settings: Mapping[PurePosixPath, JinjaSettings] = field(default_factory=dict)
    # One environment per distinct settings, made at first need: templates
    # compiled in it are reused by every destination with those settings.
    _envs: dict[JinjaSettings, Any] = field(default_factory=dict)

    def render(
        self, jobs: list[Job]
    ) -> tuple[dict[PurePosixPath, bytes], tuple[PurePosixPath, ReconcilerError] | None]:
        """Render ``jobs`` in order until one fails: (outputs, (its destination, its error) or None).

        Each template is bounded by ``limits`` (SPEC §10): its output is
        streamed and given up as soon as it passes
        ``max_file_size``, instead of being built whole first.
        """
        self._ready()
        out: dict[PurePosixPath, bytes] = {}
        reads = self.secrets.reads
        with _Alarm(self.limits) as alarm:
            for dest, repo_path, secret in jobs:
                reads.clear()
                try:
                    with alarm.limit():
                        out[dest] = self._render_one(
                            repo_path, self._context(dest), self.settings.get(dest)
                        )
                except ReconcilerError as exc:  # names its file: the Snapshot's refusal
                    return out, (dest, exc)
                except (Exception, _Interrupted) as exc:  # Jinja2 raises many types
                    secret = secret or bool(reads)  # it read a secret: no text of it
                    error = _render_error(
                        exc, repo_path, self.node, self.snapshot, secret, self.limits
                    )
                    error.__cause__ = None if secret else exc
                    error.__suppress_context__ = True
                    return out, (dest, error)
                finally:
                    if reads:
                        self.tainted.add(dest)
        return out, None

    def unwanted(self, conditions: Mapping[PurePosixPath, tuple[Any, str]]) -> list[PurePosixPath]:
        """The destinations whose ``when:`` is false (SPEC §9), in ``conditions`` order.

        Each expression is compiled once and evaluated in the sandbox of the
        templates, with the template context (vars, node, facts, source; a
        ``!age`` value read as plaintext) and the same bounds (SPEC §10).
        The result counts as ``{% if %}`` would count it (Python truthiness);
        an undefined name fails as in a template (StrictUndefined). Raises
        RenderError naming the file that set it, the destination and the node:
        a value that is not a string, a syntax error, an undefined variable,
        a sandbox refusal, a bound passed.
        """
        if not conditions:
            return []
        self._ready()
        compiled: dict[str, Any] = {}
        out = []
        with _Alarm(self.limits) as alarm:
            for dest, (expr, where) in conditions.items():
                try:
                    if not isinstance(expr, str) or not expr.strip():
                        raise _NotExpression()
                    with alarm.limit():
                        if expr not in compiled:
                            compiled[expr] = self.env.compile_expression(
                                expr, undefined_to_none=False
                            )
                        wanted = bool(compiled[expr](**self._context(dest)))
                except (Exception, _Interrupted) as exc:  # Jinja2 raises many types
                    raise _when_error(exc, expr, dest, where, self.node) from None
                if not wanted:
                    out.append(dest)
        return out

    def _ready(self) -> None:
        """Make the sandbox environment and the live context at first need."""
        if self.env is None:
            self.env = _environment(
                self.snapshot,
                self.cache_dir,
                self.limits,
                self.secrets,
                self.fleet,
                on_parse=self._parsed,
            )
        if self._live is None:
            self._live = _with_secrets(self.context, self.secrets)

    def _parsed(self, path: str, source: str, ast: Any) -> None:
        """Keep what the template at ``path`` reads, from the AST parsed to compile it
        (never for an encrypted one: its reader is never reused)."""
        if not path.endswith(AGE_SUFFIX):
            self.analysed[path] = analyse_ast(ast, source).to_json()

    def _context(self, dest: PurePosixPath) -> dict[str, Any]:
        """The live context for ``dest``: with ``item``/``item_key`` for a [VAR] path."""
        assert self._live is not None
        if dest not in self.items:
            return self._live
        var, key = self.items[dest]
        return {**self._live, "item": _item(self._live[var], key), "item_key": key}

    def _environment_for(
        self, repo_path: str, base: JinjaSettings | None
    ) -> tuple[Any, JinjaSettings, bool]:
        """(environment, settings, source ends with a newline) for one template: ``base``
        (its app's settings) under its own ``#jinja2:`` line (SPEC §10)."""
        data = self.snapshot.read(repo_path)
        if _encrypted(repo_path):
            data = self.secrets.open(data, repo_path)
        header: dict[str, Any] = {}
        if data.startswith(HEADER.encode()):
            try:
                header, _ = split_header(
                    data.decode("utf-8", "replace"), where=repo_path, node=self.node
                )
            except RenderError:
                if not _encrypted(repo_path):
                    raise
                raise RenderError(  # a secret template's text is never shown
                    f"{repo_path}:1: #jinja2: header: not valid (node {self.node}) — "
                    "see the #jinja2: keys and values in repo-layout/README.md"
                ) from None
        settings = (base or DEFAULT_SETTINGS).over(header)
        ends = data.endswith(b"\n")
        if settings == DEFAULT_SETTINGS:
            return self.env, settings, ends
        env = self._envs.get(settings)
        if env is None:
            # A parse with other delimiters or line prefixes (a #jinja2: line) reads
            # what the templates it includes say under those: not what they read as
            # their own destinations. Their analyses come from the default parse.
            lexed = any(key != "newline_sequence" for key, _ in settings.lexer)
            env = self._envs[settings] = _environment(
                self.snapshot,
                self.cache_dir,
                self.limits,
                self.secrets,
                self.fleet,
                on_parse=None if lexed else self._parsed,
                settings=settings,
            )
        return env, settings, ends

    def _render_one(
        self, repo_path: str, context: dict[str, Any], base: JinjaSettings | None = None
    ) -> bytes:
        """One template's output, streamed and given up past max_file_size.

        What ``Template.render`` does (its root render function, errors
        rewritten to template lines by ``handle_exception``), with the size
        counted chunk by chunk: ``Template.generate`` would add a generator
        per chunk, ~15 % of a warm render. ``base``: its app's Jinja2
        settings, under the template's own ``#jinja2:`` line.
        """
        env, settings, ends = self._environment_for(repo_path, base)
        template = env.get_template(repo_path[len("templates/") :])
        limit = self.limits.max_file_size or sys.maxsize
        chunks: list[str] = []
        append = chunks.append
        size = 0
        stream = template.root_render_func(template.new_context(context))
        try:
            for chunk in stream:
                size += len(chunk)  # characters: at most the bytes they encode to
                if size > limit:
                    break
                append(chunk)
        except Exception:
            env.handle_exception()  # raises it again, traceback in template lines
        finally:
            stream.close()
        if settings.keep_trailing_newline == SALT and ends:
            # Salt's rule: rendered without keep_trailing_newline, then one newline
            # added when the template's source ends with one.
            chunks.append("\n")
            size += 1
        data = "".join(chunks).encode("utf-8")
        if size > limit or len(data) > limit:
            raise _TooLarge(
                "the output",
                f"max_file_size ({format_size(limit)})",
                "make the template produce less, or raise max_file_size",
            )
        return data


# A forked worker's job: set in the child only, by the pool initializer (fork
# start method: inherited, never pickled — the snapshot holds a libgit2 handle).
_worker_job: list[_RenderJob] = []


def _worker_init(job: _RenderJob) -> None:
    # A forked worker inherits the agent's handlers (``reconciler run``: SIGTERM
    # only sets a flag). The pool stops its workers with SIGTERM: with the
    # inherited handler a worker would live on and the agent would hang in
    # join, holding the state lock. Workers take the defaults. (SIGALRM is
    # the render timer's, set per batch by _Alarm.)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    _worker_job[:] = [job]


def _worker_render(
    jobs: list[Job],
) -> tuple[
    dict[PurePosixPath, bytes],
    tuple[PurePosixPath, str] | None,
    set[PurePosixPath],
    dict[str, Any],
    list[bytes],
]:
    job = _worker_job[0]
    out, failed = job.render(jobs)
    # The error goes back as its text (a RenderError made with keywords does
    # not unpickle), with the destination that failed: never parsed. The
    # destinations that read a secret go back too (the taint, SPEC §8), and
    # what the templates it parsed read (the render keys' cache), and the
    # plaintexts it decrypted (the parent redacts host output with them).
    return (
        out,
        (failed[0], str(failed[1])) if failed else None,
        job.tainted,
        job.analysed,
        job.secrets.plaintexts(),
    )


def _render_parallel(
    job: _RenderJob, jobs: list[Job], workers: int
) -> tuple[dict[PurePosixPath, bytes], set[PurePosixPath], list[bytes]]:
    """Split ``jobs`` over ``workers`` forked processes; the first error in job order wins.
    Returns the rendered bytes, the destinations that read a secret, and the plaintexts
    the workers decrypted (for redaction, secrets/redact.py).

    Each worker bounds its templates as the agent does (:class:`_Alarm` in
    the worker's main thread).
    """
    import gc
    import multiprocessing

    chunks = [jobs[i::workers] for i in range(workers)]
    # Everything alive now (a big inventory: 10,000 parsed host files) goes to
    # the permanent generation: the workers' garbage collections, frequent
    # while Jinja2 compiles, no longer walk it, and it stays shared after the
    # fork instead of being copied page by page (CPython's advice for fork).
    gc.freeze()
    context = multiprocessing.get_context("fork")
    try:
        with context.Pool(workers, initializer=_worker_init, initargs=(job,)) as pool:
            results = pool.map(_worker_render, chunks)
            pool.close()  # workers exit on their own; terminate() at the end finds none
            pool.join()
    finally:
        gc.unfreeze()  # the agent lives on: its garbage must stay collectable
    failures = [failed for _, failed, _, _, _ in results if failed]
    if failures:
        order = {dest: i for i, (dest, _, _) in enumerate(jobs)}
        raise RenderError(min(failures, key=lambda f: order[f[0]])[1])
    out: dict[PurePosixPath, bytes] = {}
    tainted: set[PurePosixPath] = set()
    opened: list[bytes] = []
    for part, _, read, analysed, plain in results:
        out.update(part)
        tainted |= read
        job.analysed.update(analysed)
        opened.extend(plain)
    return out, tainted, opened
