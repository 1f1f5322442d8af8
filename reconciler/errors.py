"""The whole exception hierarchy of reconciler.

Every error a user can cause or meet is one of these; the CLI prints
``str(error)`` as one line on stderr and exits with ``error.exit_code``
(SPEC §3). Third-party errors (pygit2, Jinja2, YAML, OSError) are converted in
the stage that imports the library, with ``raise … from exc``; libgit2's in one
place, :func:`reconciler.git.errors.map_git_errors`.

::

    ReconcilerError                 exit 1 unless stated; .where .problem .hint
    ├── UsageError                  exit 2: bad command line
    ├── ConfigError                 exit 2: bad agent configuration (SPEC §2)
    ├── SourceError                 fetch, push or trust failed (SPEC §4 steps 1–2)
    │   ├── UntrustedCommitError    a commit refused by the trust checks
    │   └── RemoteError             a fetch or push failed; ``refused`` when retrying cannot help
    ├── CorruptCacheError           a cache repository is corrupt (an object truncated or
    │                               missing); ``.repo`` is the one to move aside and re-clone
    ├── InventoryError              hosts/ or app.yaml invalid (SPEC §1, §6)
    ├── RenderError                 a template failed to render
    ├── FactsError                  a local fact source of ``facts_dir`` failed (SPEC §10)
    ├── PathError                   a destination escapes the root or is unusable; .path
    │   └── UnsafePathError         a parent leaves the root, is a symlink we may not follow,
    │                               or is not a directory; a symlink or another inode where
    │                               a file is read (host/system.py)
    ├── ApplyError                  a write, delete, chmod, chown or restore failed; .path
    ├── ScriptError                 a pre/post script failed or timed out; the command,
    │                               exit status and last output, like invoke's UnexpectedExit
    ├── LockError                   another run holds the state_dir lock
    ├── SecretError                 an age identity, recipient, key file or secrets.yaml rule
    │   │                           is unusable (SPEC §8); reconciler/secrets/
    │   ├── NotRecipientError       no identity held opens the payload (not a recipient)
    │   ├── CorruptSecretError      an age payload truncated or altered
    │   └── NotAgeError             data that is not an age payload at all
    ├── StateError                  a file of the state directory is unreadable
    └── ConfigExistsError           ``init``: a configuration is already there (never overwritten)

Messages read ``"{where}: {problem} — {what to do}"``: an error raised with
``where=`` and ``hint=`` keeps the three parts as attributes and renders
them so; one raised with a single message renders it as given.
Errors travel as values until the edge that prints them: a run collects
them (``Plan.errors``, ``ApplyResult.errors``), the report renders them into
its ``errors`` strings (SPEC §5), and code that needs to know *which path*
failed reads ``.path``, never the text.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import PurePosixPath


class ReconcilerError(Exception):
    """Base of every error reconciler reports to a user; carries its exit code.

    ``where`` (a file, a path, a node), ``problem`` and ``hint`` (what to do)
    are kept apart so that code can act on them without parsing the text.
    """

    exit_code: int = 1

    def __init__(self, problem: str = "", *, where: str | None = None, hint: str | None = None):
        self.problem = problem
        self.where = where
        self.hint = hint
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.where}: {self.problem}" if self.where else self.problem
        return f"{text} — {self.hint}" if self.hint else text


class UsageError(ReconcilerError):
    """The command line is wrong (SPEC §3: exit 2)."""

    exit_code = 2


class ConfigError(ReconcilerError):
    """The agent configuration is wrong (SPEC §2: unknown keys, wrong types; exit 2)."""

    exit_code = 2


class SourceError(ReconcilerError):
    """Fetching, reading or pushing the desired-state repository failed."""


class UntrustedCommitError(SourceError):
    """A fetched commit was refused by a trust check (rewind, signature; SPEC §4 step 2)."""


class RemoteError(SourceError):
    """A fetch or push failed (SPEC §4 step 1, §5).

    ``refused`` says why trying again cannot help: ``"auth"`` (the server
    refused our credentials), ``"certificate"`` (we refused its TLS
    certificate), ``"checks"`` (our own checks refused: host key,
    credentials), ``"rejected"`` (the server rejected a ref update:
    permissions, non-fast-forward); None for a failure another try may get
    past (a reset connection, a busy server, a timeout). ``detail`` is the
    failure alone — libgit2's text, the server's reasons, or our refusal's
    line — for callers that say the rest themselves; ``rejected`` maps each
    refused ref to the server's reason.
    """

    def __init__(
        self,
        message: str,
        *,
        detail: str = "",
        refused: str | None = None,
        rejected: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.detail = detail or message
        self.refused = refused
        self.rejected: Mapping[str, str] = dict(rejected or {})


class CorruptCacheError(ReconcilerError):
    """A git repository kept as a cache of a remote is corrupt (issue 11).

    Not a SourceError: code that falls back on a failed fetch or lookup
    (``except SourceError``) must not take a damaged repository for a
    missing commit or an unreachable server.

    An object is truncated, fails its checksum or is missing though a ref or
    another object names it. ``repo`` is the repository's git directory: a
    cache of the server (the agent's ``<state_dir>/repo.git``, an operator's
    cache), so moving it aside and fetching again repairs it; the agent does
    that itself (:mod:`reconciler.git.cache`).
    """

    def __init__(
        self, problem: str, *, repo: str, where: str | None = None, hint: str | None = None
    ):
        self.repo = repo
        super().__init__(problem, where=where or repo, hint=hint)


class InventoryError(ReconcilerError):
    """A host file or app.yaml is invalid, or a node cannot be resolved (SPEC §1, §6)."""


class RenderError(ReconcilerError):
    """A template could not be rendered (syntax, undefined variable, bad include)."""


class FactsError(ReconcilerError):
    """A local fact source (SPEC §10 ``facts_dir``) is unusable: not JSON or YAML, not a
    mapping, an executable that fails, hangs or prints too much, or a file or
    directory another user could write."""


class _PathBound(ReconcilerError):
    """An error about one destination path: ``.path``, which is also its ``where``."""

    def __init__(
        self,
        problem: str = "",
        *,
        path: PurePosixPath | None = None,
        where: str | None = None,
        hint: str | None = None,
    ):
        self.path = path
        super().__init__(
            problem, where=where if where is not None or path is None else str(path), hint=hint
        )


class PathError(_PathBound):
    """A destination path escapes the root or cannot be written safely (SPEC §6)."""


class UnsafePathError(PathError):
    """A path under the root that cannot be reached safely (SPEC §4 "nothing is ever
    written outside root", §6 Symlinks): a parent is a symlink leading outside the
    root or one another user could have made, or is not a directory; or a file
    that cannot be read or changed safely: a symlink, not a regular file, or
    another inode than the scan saw.

    ``problem`` is the reason without the path (the plan prefixes its own);
    ``blocker`` is the parent (relative to the root, no leading slash) that is a
    file or device where a directory belongs, else None.
    """

    def __init__(
        self,
        where: str,
        problem: str,
        *,
        blocker: str | None = None,
        hint: str = "remove it or exclude the path",
    ) -> None:
        super().__init__(problem, where=where, hint=hint)
        self.hint: str = hint
        self.blocker = blocker


class ApplyError(_PathBound):
    """A change could not be applied to disk; ``.path`` names the destination, if one."""


class ScriptError(ReconcilerError):
    """A pre or post script exited non-zero or timed out.

    Like invoke's ``UnexpectedExit``, it carries the command (``phase``,
    ``app``, ``name``: ``scripts/<phase>/<app>/<name>`` in the repository),
    how it ended (``exited``: its exit status, or ``timed_out`` after ``duration_s`` seconds)
    and the tail of its output; the message shows the last non-empty line
    (at most 200 characters). ``hint`` says what the failure meant for the
    run (SPEC §4 step 6: later apps not applied, the app rolled back).
    """

    def __init__(
        self,
        *,
        phase: str,
        app: str,
        name: str,
        exited: int | None,
        timed_out: bool = False,
        duration_s: float = 0.0,
        output_tail: str = "",
        hint: str | None = None,
    ):
        self.phase = phase
        self.app = app
        self.name = name
        self.exited = exited  # the script's exit status; ``exit_code`` is the CLI's
        self.timed_out = timed_out
        self.duration_s = duration_s
        self.output_tail = output_tail
        how = f"timed out after {duration_s:.0f}s" if timed_out else f"exited {exited}"
        last = self.last_lines(1)
        tail = f" — last output: {last[0][:200]!r}" if last else ""
        super().__init__(how + tail, where=f"scripts/{phase}/{app}/{name}", hint=hint)

    def last_lines(self, count: int = 10) -> list[str]:
        """The last ``count`` lines of the script's output tail (none when it printed nothing)."""
        lines = self.output_tail.strip().splitlines()
        return lines[-count:] if count > 0 else []


class LockError(ReconcilerError):
    """Another run holds the lock of the state directory (SPEC §6)."""


class SecretError(ReconcilerError):
    """An age identity, recipient, key file, payload or ``secrets.yaml`` rule is unusable
    (SPEC §8). ``where`` names the file (a repository path, an identity file);
    the message never holds a secret's plaintext or an identity's key."""


class NotRecipientError(SecretError):
    """No identity we hold opens an age payload: this node (or operator) is not one of
    its recipients, or holds a different key than ``keys/`` says (SPEC §8)."""


class CorruptSecretError(SecretError):
    """An age payload is truncated, altered or badly armored (SPEC §8)."""


class NotAgeError(SecretError):
    """Data expected to be an age payload is not one (no age header, no age armor)."""


class StateError(ReconcilerError):
    """A file of the state directory exists but cannot be read or parsed (SPEC §2)."""


class ConfigExistsError(ReconcilerError):
    """``reconciler init`` found a configuration where it would write one (exit 1):
    it never overwrites one (issue 12)."""


def did_you_mean(name: object, known: Iterable[str]) -> str:
    """`` (did you mean 'vars'?)`` for a misspelt key close to one of ``known``, else "".

    ``name`` is the key as written (any YAML scalar); ``known`` the keys
    accepted there. The closest one of :func:`difflib.get_close_matches`
    (its default 0.6 ratio: ``var`` → ``vars``, ``intervall`` → ``interval``)
    is offered, as git's "did you mean" does for a misspelt command.
    """
    import difflib  # only on an error path

    if not isinstance(name, str):
        return ""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
