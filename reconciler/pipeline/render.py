"""Render stage: a Node and a Snapshot → TargetState (SPEC §1).

Takes the effective :class:`~reconciler.pipeline.inventory.Node`, the snapshot it came
from, facts and source info; produces a :class:`TargetState`: every
destination path of the node with its content, mode, owner, group, policy and
secrecy. ``templates/<app>/default/**`` is overlaid by
``templates/<app>/<state>/**``; ``.j2`` files are rendered with Jinja2
(StrictUndefined) straight from the snapshot, anything else is copied byte
for byte. Jinja2 is imported here only, so a run that renders nothing never
pays for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from reconciler.errors import InventoryError, PathError, ReconcilerError, RenderError
from reconciler.git.snapshot import GIT_FILEMODE_EXEC, GIT_FILEMODE_LINK, Snapshot, SourceInfo
from reconciler.pipeline.inventory import DEFAULT_STATE, Node, load_app_config

log = logging.getLogger(__name__)

POLICIES = ("enforce", "audit", "create-only", "ignore-drift")
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


@dataclass(frozen=True, slots=True, kw_only=True)
class AppSettings:
    """AppSettings are an app's script settings from ``app.yaml`` (SPEC §1)."""

    name: str
    state: str
    timeout: float = DEFAULT_SCRIPT_TIMEOUT
    post_always: bool = False
    on_post_failure: str = "fail"  # fail | rollback (issue #3)


@dataclass(frozen=True, slots=True, kw_only=True)
class TargetState:
    """A TargetState is every file a node should have, in app order, plus app settings."""

    node: str
    files: Mapping[PurePosixPath, TargetFile]
    apps: tuple[AppSettings, ...]


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


def _collect(snapshot: Snapshot, node: Node) -> dict[PurePosixPath, tuple[str, str, int]]:
    """dest → (app, repository path, git file mode), overlay and conflicts resolved."""
    out: dict[PurePosixPath, tuple[str, str, int]] = {}
    for app in node.apps:
        states = [DEFAULT_STATE] if app.state == DEFAULT_STATE else [DEFAULT_STATE, app.state]
        per_app: dict[PurePosixPath, tuple[str, int]] = {}
        for state in states:
            base = f"templates/{app.name}/{state}"
            seen: dict[PurePosixPath, str] = {}
            for entry in snapshot.walk(base):
                repo_path = f"{base}/{entry.path}"
                rel = entry.path[:-3] if entry.path.endswith(".j2") else entry.path
                dest = dest_path(rel, where=repo_path)
                if entry.filemode == GIT_FILEMODE_LINK:
                    raise RenderError(
                        f"{repo_path}: symlinks are not supported in templates — "
                        "commit a regular file instead"
                    )
                if dest in seen:
                    raise RenderError(
                        f"{repo_path}: {seen[dest]} produces the same destination {dest} — "
                        "keep only one of them"
                    )
                seen[dest] = repo_path
                per_app[dest] = (repo_path, entry.filemode)
        for dest, (repo_path, filemode) in sorted(per_app.items()):
            if dest in out:
                other = out[dest]
                raise InventoryError(
                    f"{repo_path}: apps {other[0]!r} ({other[1]}) and {app.name!r} of node "
                    f"{node.name} both produce {dest} — keep it in one app"
                )
            out[dest] = (app.name, repo_path, filemode)
    return out


def load_app_settings(snapshot: Snapshot, node: Node) -> tuple[AppSettings, ...]:
    """AppSettings for every app of ``node``, in node order (SPEC §1 ``scripts``)."""
    out = []
    for app in node.apps:
        scripts = load_app_config(snapshot, app.name).get("scripts", {})
        out.append(
            AppSettings(
                name=app.name,
                state=app.state,
                timeout=float(scripts.get("timeout", DEFAULT_SCRIPT_TIMEOUT)),
                post_always=bool(scripts.get("post_always", False)),
                on_post_failure=str(scripts.get("on_post_failure", "fail")),
            )
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


def _environment(snapshot: Snapshot, cache_dir: Path | None = None) -> Any:
    import jinja2

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
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RenderError(f"{path}: a .j2 template must be UTF-8 text") from exc
            return text, path, lambda: True

    cache = None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        cache = jinja2.FileSystemBytecodeCache(str(cache_dir))
    return jinja2.Environment(
        loader=SnapshotLoader(),
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        bytecode_cache=cache,
    )


def _render_error(
    exc: Exception, repo_path: str, node: str, snapshot: Snapshot, secret: bool = False
) -> RenderError:
    """Name the template and line of a Jinja2 failure, with the offending line.

    For a ``secret`` destination the source line and the exception text
    beyond its type are left out: a template may hold a literal secret, and
    the error lands in reports and logs (issue #3).
    """
    import jinja2

    where, line = repo_path, None
    if isinstance(exc, jinja2.TemplateSyntaxError):
        where, line = exc.filename or repo_path, exc.lineno
        problem = f"syntax error: {exc.message} — fix the template"
    else:
        for frame in reversed(traceback.extract_tb(exc.__traceback__)):
            if frame.filename.startswith("templates/"):
                where, line = frame.filename, frame.lineno
                break
        if isinstance(exc, jinja2.UndefinedError):
            problem = (
                f"{exc.message} (node {node}) — define it in vars or guard it with 'is defined'"
            )
        elif isinstance(exc, jinja2.TemplateNotFound):
            problem = f"template {exc.name!r} not found — paths are relative to templates/"
        else:
            problem = type(exc).__name__ if secret else f"{type(exc).__name__}: {exc}"
            problem += " — fix the template or the vars it uses"
    text = ""
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


PARALLEL_MIN_TEMPLATES = 64  # below this, forking costs more than it saves


def render_target(
    snapshot: Snapshot,
    node: Node,
    facts: Mapping[str, Any],
    *,
    cache_dir: Path | None = None,
    workers: int = 1,
    reuse: Callable[[PurePosixPath, str], bytes | None] | None = None,
) -> TargetState:
    """Render every file of ``node`` from ``snapshot``.

    ``reuse(dest, render_key)``: the content already rendered with that key,
    if the caller still has it intact (the agent: the file it wrote, unchanged
    on disk), else None. Only templates without a reusable output are
    rendered (SPEC §7: "only what changed is compiled and rendered").

    ``cache_dir``: Jinja2 bytecode cache (keyed by template name and source
    checksum), so only templates whose source changed are compiled again
    (SPEC §7: compiling is the cost to avoid). ``workers`` > 1 renders in
    that many forked processes when there are many templates (a cold run
    compiles on every core). Returns the TargetState in node app order.
    Raises RenderError (template syntax, undefined variable, missing
    include), InventoryError (two apps produce one path, bad metadata) or
    PathError (a destination that escapes the root). Nothing is written
    outside ``cache_dir``.
    """
    sources = _collect(snapshot, node)
    context = template_context(node, facts, snapshot.info)
    app_globs = {
        a.name: _compile(load_app_config(snapshot, a.name).get("files", {})) for a in node.apps
    }
    node_globs = _compile(node.files)
    metas: dict[PurePosixPath, tuple[dict[str, Any], str]] = {
        dest: _metadata(app_globs[app], node_globs, node, app, dest)
        for dest, (app, _, _) in sources.items()
    }
    jobs = [
        (dest, repo_path, bool(metas[dest][0].get("secret", False)))
        for dest, (_, repo_path, _) in sources.items()
        if repo_path.endswith(".j2")
    ]
    keys: dict[PurePosixPath, str] = {}
    rendered: dict[PurePosixPath, bytes] = {}
    if reuse is not None:
        keys = _render_keys(snapshot, context, jobs)
        todo = []
        for j in jobs:
            kept = reuse(j[0], keys[j[0]]) if keys.get(j[0]) else None
            if kept is None:
                todo.append(j)
            else:
                rendered[j[0]] = kept
        jobs = todo
    log.debug("%s: rendering %d template(s), %d reused", node.name, len(jobs), len(rendered))
    job = _RenderJob(snapshot=snapshot, context=context, node=node.name, cache_dir=cache_dir)
    if workers > 1 and len(jobs) >= PARALLEL_MIN_TEMPLATES:
        rendered.update(_render_parallel(job, jobs, workers))
    else:
        rendered.update(job.render(jobs))
    files: dict[PurePosixPath, TargetFile] = {}
    for dest, (app, repo_path, filemode) in sources.items():
        meta, where = metas[dest]
        content = rendered[dest] if dest in rendered else snapshot.read(repo_path)
        default_mode = 0o755 if filemode == GIT_FILEMODE_EXEC else 0o644
        mode = parse_mode(meta["mode"], where=where) if "mode" in meta else default_mode
        files[dest] = TargetFile(
            path=dest,
            content=content,
            mode=mode,
            owner=meta.get("owner"),
            group=meta.get("group"),
            secret=bool(meta.get("secret", False)),
            policy=meta.get("policy", "enforce"),
            app=app,
            template=repo_path,
            render_key=keys.get(dest, ""),
        )
    return TargetState(node=node.name, files=files, apps=load_app_settings(snapshot, node))


# A template that pulls in another one: its output depends on more than its own
# blob, so it is always rendered (never reused).
_PULLS_IN = re.compile(r"{%[-+]?\s*(?:include|import|extends|from)\b")
_USES_SOURCE = re.compile(r"\bsource\b")


def _render_keys(
    snapshot: Snapshot, context: Mapping[str, Any], jobs: list[Job]
) -> dict[PurePosixPath, str]:
    """Destination -> digest of what its template's output depends on ("" = always render).

    ``source`` (the commit) changes with every commit: it is part of a key only
    for templates that mention it, or every commit would render everything.
    """
    from reconciler import __version__

    rest = {k: v for k, v in context.items() if k != "source"}
    base = hashlib.sha256(
        json.dumps([__version__, rest], sort_keys=True, default=str).encode()
    ).hexdigest()
    source = json.dumps(context.get("source"), sort_keys=True, default=str)
    keys: dict[PurePosixPath, str] = {}
    for dest, repo_path, _ in jobs:
        blob = snapshot.blob_id(repo_path)
        if blob is None:
            keys[dest] = ""
            continue
        text = snapshot.read(repo_path).decode("utf-8", "replace")
        # Substring tests first: the regexes cost ~35 µs a template, 2,000 a run.
        if any(w in text for w in ("include", "import", "extends", "from")) and _PULLS_IN.search(
            text
        ):
            keys[dest] = ""
            continue
        mentions = "source" in text and _USES_SOURCE.search(text)
        parts = [base, blob, source if mentions else ""]
        keys[dest] = hashlib.sha256("\0".join(parts).encode()).hexdigest()
    return keys


Job = tuple[PurePosixPath, str, bool]  # destination, template path, secret


@dataclass(slots=True, kw_only=True)
class _RenderJob:
    """What rendering needs, in one place, so a forked worker inherits it whole."""

    snapshot: Snapshot
    context: dict[str, Any]
    node: str
    cache_dir: Path | None
    env: Any = None

    def render(self, jobs: list[Job]) -> dict[PurePosixPath, bytes]:
        """Render ``jobs`` in order; raise the first template's RenderError."""
        if self.env is None:
            self.env = _environment(self.snapshot, self.cache_dir)
        out: dict[PurePosixPath, bytes] = {}
        for dest, repo_path, secret in jobs:
            name = repo_path[len("templates/") :]
            try:
                out[dest] = self.env.get_template(name).render(self.context).encode("utf-8")
            except ReconcilerError:
                raise  # already names its file: a RenderError, or the Snapshot's refusal
            except Exception as exc:  # Jinja2 raises many types; all are the author's error
                error = _render_error(exc, repo_path, self.node, self.snapshot, secret)
                raise error from (None if secret else exc)
        return out


# A forked worker's job: set in the child only, by the pool initializer (fork
# start method: inherited, never pickled — the snapshot holds a libgit2 handle).
_worker_job: list[_RenderJob] = []


def _worker_init(job: _RenderJob) -> None:
    import signal

    # A forked worker inherits the agent's handlers (``reconciler run``: SIGTERM
    # only sets a flag). The pool stops its workers with SIGTERM: with the
    # inherited handler a worker would live on and the agent would hang in
    # join, holding the state lock. Workers take the defaults.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_DFL)
    _worker_job[:] = [job]


def _worker_render(jobs: list[Job]) -> tuple[dict[PurePosixPath, bytes], str | None]:
    try:
        return _worker_job[0].render(jobs), None
    except ReconcilerError as exc:
        return {}, str(exc)


def _render_parallel(job: _RenderJob, jobs: list[Job], workers: int) -> dict[PurePosixPath, bytes]:
    """Split ``jobs`` over ``workers`` forked processes; the first error in job order wins."""
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
    errors = [e for _, e in results if e]
    if errors:
        order = {repo_path: i for i, (_, repo_path, _) in enumerate(jobs)}
        raise RenderError(min(errors, key=lambda e: order.get(e.split(":", 1)[0], len(order))))
    out: dict[PurePosixPath, bytes] = {}
    for part, _ in results:
        out.update(part)
    return out
