"""Operators' side, secrets (SPEC §8): encrypt, edit, rekey and show in a working tree.

Takes a working tree of the desired-state repository (like ``validate``:
files on disk, read through :class:`~reconciler.git.snapshot.DirSnapshot`),
its ``secrets.yaml`` rules and ``keys/`` (:func:`reconciler.secrets.rules.load_rules`)
and the operator's age identity; produces encrypted files (``PATH.age``,
ASCII-armored as ``age -a`` writes them) and ``!age`` values in host files,
and plaintext for the operator (``show``, ``edit``).

* Recipients are always the rule's **current** ones: the keys of the nodes
  of the first rule matching the encrypted file's repository path (the
  ``.age`` path, which is what is committed and what a host decrypts; a
  host file's path for its ``!age`` values), then every operator's key.
* Every command computes all it writes before it writes anything: a failure
  (no identity, not a recipient, a damaged payload, no rule) changes
  nothing. Writes are atomic (temp + fsync + rename), so a crash leaves the
  old file or the new one.
* Host files are edited through ruamel.yaml's round trip (comments, key
  order, quoting and the file's indentation kept, as ``push`` and
  ``suspend`` do: :mod:`reconciler.ops.hostfile`); an ``!age`` value is
  written as a literal block scalar holding the armored payload. Every edit
  is read back and must differ from the old file only in the value it set,
  and keep every comment (InventoryError otherwise).
* Plaintext is held in memory, and for ``edit`` in a 0600 file inside a
  0700 temporary directory that is removed whatever happens. It never
  reaches a message.

Errors are :class:`~reconciler.errors.SecretError` (and its subclasses from
:mod:`reconciler.secrets.age`), InventoryError for a host file the round
trip cannot keep, UsageError for a path outside the working tree; each
renders as one line naming the file and what to do.
"""

from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reconciler.errors import InventoryError, SecretError, UsageError
from reconciler.git.snapshot import DirSnapshot
from reconciler.host.system import atomic_write, fsync_dir
from reconciler.secrets.age import Identity, Recipient
from reconciler.secrets.rules import SecretRules

AGE_SUFFIX = ".age"
AGE_TAG = "!age"
HOSTS_DIR = "hosts"


@dataclass(frozen=True, slots=True, kw_only=True)
class Tree:
    """A Tree is a working tree of the desired-state repository with its secret rules."""

    root: Path  # absolute
    snapshot: DirSnapshot
    rules: SecretRules

    def repo_path(self, path: str | Path) -> str:
        """``path`` (relative to the current directory, or absolute) as a repository
        path (``templates/db/default/etc/db.pass``); UsageError outside the tree."""
        absolute = Path(os.path.abspath(path))
        try:
            rel = absolute.relative_to(self.root)
        except ValueError:
            raise UsageError(
                f"{path}: not inside the working tree {self.root} — give a path in it, "
                "or point --repo at the tree it belongs to"
            ) from None
        text = rel.as_posix()
        if text in ("", "."):
            raise UsageError(f"{path}: the working tree itself — name a file in it")
        return text

    def file(self, repo_path: str) -> Path:
        """The file on disk of ``repo_path``."""
        return self.root / repo_path

    def read(self, repo_path: str) -> bytes:
        """The bytes of ``repo_path`` (regular files only, as DirSnapshot reads them);
        SecretError naming it when it does not exist."""
        try:
            return self.snapshot.read(repo_path)
        except KeyError:
            raise SecretError(
                "no such file", where=repo_path, hint="check the path (git status)"
            ) from None


def open_tree(root: str | Path) -> Tree:
    """The working tree at ``root`` with its inventory's secret rules (SPEC §8).

    Raises UsageError when ``root`` is not a directory, InventoryError for
    invalid host files, SecretError for an invalid ``secrets.yaml`` or key file.
    """
    from reconciler.pipeline.inventory import load_inventory
    from reconciler.secrets.rules import load_rules

    path = Path(root)
    if not path.is_dir():
        raise UsageError(f"--repo {path}: not a directory — give a working tree of the repository")
    absolute = path.resolve()
    snapshot = DirSnapshot(absolute)
    return Tree(
        root=absolute, snapshot=snapshot, rules=load_rules(snapshot, load_inventory(snapshot))
    )


def _mode_of(path: Path) -> int:
    """0755 for an executable file, else 0644: all git keeps of a mode (SPEC §1)."""
    return 0o755 if path.stat().st_mode & 0o111 else 0o644


# ------------------------------------------------------------------ files


@dataclass(frozen=True, slots=True, kw_only=True)
class Written:
    """A Written is one encrypted file or ``!age`` value a command (re)wrote."""

    path: str  # repository path of the file written
    key: str = ""  # the dotted key under vars, for an !age value
    recipients: tuple[Recipient, ...] = ()

    def describe(self) -> str:
        """``hosts/db1.yaml vars.db.password (3 recipients)``."""
        what = f"{self.path} vars.{self.key}" if self.key else self.path
        return f"{what} ({len(self.recipients)} recipients)"


def encrypt_file(tree: Tree, path: str | Path) -> Written:
    """``PATH`` (plaintext in the working tree) → ``PATH.age``, plaintext removed.

    Encrypted (armored) to the recipients of the first rule matching
    ``PATH.age`` (:meth:`SecretRules.recipients`); the executable bit is
    kept (git's mode becomes the destination's, SPEC §1). The plaintext is
    removed only after ``PATH.age`` is written and fsynced. Raises
    SecretError when no rule matches, a node of the rule has no key, or
    ``PATH.age`` exists; UsageError for a path already ending in ``.age`` or
    outside ``templates/<app>/<state>/`` (the only encrypted files a host
    decrypts, SPEC §8).
    """
    from reconciler.secrets.age import encrypt

    rel = tree.repo_path(path)
    if rel.endswith(AGE_SUFFIX):
        raise UsageError(
            f"{rel}: already an encrypted file — use 'reconciler secret edit {rel}' to change it"
        )
    if not rel.startswith("templates/") or rel.count("/") < 3:
        # A host decrypts only templates/<app>/<state>/<path>.age (SPEC §8): anything
        # else encrypted would be a file no run reads, its plaintext gone.
        raise UsageError(
            f"{rel}: not a file of templates/<app>/<state>/, the only encrypted files a host "
            "decrypts — for a value of a host file use --var FILE KEY"
        )
    target = rel + AGE_SUFFIX
    if os.path.lexists(tree.file(target)):
        raise SecretError(
            "already exists; secret encrypt never overwrites an encrypted file",
            where=target,
            hint=f"change it with 'reconciler secret edit {target}', or remove it first",
        )
    recipients = tree.rules.recipients(target)
    plaintext = tree.read(rel)
    payload = encrypt(plaintext, recipients)
    source = tree.file(rel)
    atomic_write(tree.file(target), payload, mode=_mode_of(source))
    source.unlink()
    fsync_dir(source.parent)
    return Written(path=target, recipients=recipients)


def _encrypted(rel: str) -> None:
    if not rel.endswith(AGE_SUFFIX):
        raise UsageError(
            f"{rel}: not an encrypted file (.age) — encrypt it with "
            f"'reconciler secret encrypt {rel}', or name a host file's value with --var FILE KEY"
        )


def show_file(tree: Tree, path: str | Path, identity: Identity) -> bytes:
    """The plaintext of the encrypted file ``PATH`` (a ``.age`` file), opened with
    ``identity``. Raises UsageError for a file not ending in ``.age``, and the
    errors of :func:`reconciler.secrets.age.decrypt` naming the file."""
    from reconciler.secrets.age import decrypt

    rel = tree.repo_path(path)
    _encrypted(rel)
    return decrypt(tree.read(rel), (identity,), where=rel)


def editor_argv(env: Mapping[str, str] | None = None) -> list[str]:
    """The editor to run, as git picks it: ``$VISUAL``, then ``$EDITOR``, then ``vi``;
    split into words with shlex (``EDITOR="code --wait"`` works). The file
    to edit is appended by the caller."""
    env = os.environ if env is None else env
    command = env.get("VISUAL") or env.get("EDITOR") or "vi"
    try:
        words = shlex.split(command)
    except ValueError as exc:
        raise UsageError(f"$EDITOR {command!r}: cannot be split into words ({exc})") from None
    return words or ["vi"]


class _Signalled(Exception):
    """A SIGTERM or SIGHUP arrived while the editor had the plaintext copy."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextmanager
def _signals_unwind() -> Iterator[None]:
    """SIGTERM and SIGHUP raise :class:`_Signalled` inside the block (main thread only).

    Why: Python's default for both is to die on the spot, skipping every
    ``finally``, so a ``kill`` or a closed terminal while the editor ran left
    the plaintext copy in the temporary directory. Raised instead, they unwind
    through ``subprocess.run`` (which kills the editor) and the removal.
    SIGINT already unwinds (KeyboardInterrupt). The old handlers come back after.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum: int, _frame: object) -> None:
        raise _Signalled(signum)

    old = {s: signal.signal(s, unwind) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """SIGINT ignored inside the block (main thread only), the old handler back after.

    Why: Ctrl-C in the terminal reaches the editor and this process alike, and
    it is the editor's key (nano shows the cursor position, vim cancels a
    command); as a KeyboardInterrupt here it killed the editor mid-edit. git
    ignores SIGINT and SIGQUIT while its editor runs for the same reason.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def edit_plaintext(plaintext: bytes, name: str, *, where: str) -> bytes:
    """``plaintext`` after the operator's editor (:func:`editor_argv`) has run on it.

    The file is ``name`` (the secret's own name, so the editor picks its
    syntax) created 0600 in a new 0700 temporary directory, removed with the
    directory whatever happens: an error, and a SIGTERM or SIGHUP too
    (:func:`_signals_unwind`; the editor is then stopped). Ctrl-C while the
    editor runs is the editor's (:func:`_sigint_ignored`). Raises SecretError
    naming ``where`` when the editor cannot be run, exits non-zero or a
    signal ends the edit (nothing is written then).
    """
    import signal

    argv = editor_argv()
    try:
        with _signals_unwind():
            scratch = Path(tempfile.mkdtemp(prefix="reconciler-secret-"))  # 0700
            try:
                return _run_editor(argv, scratch, plaintext, name, where=where)
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
    except _Signalled as exc:
        raise SecretError(
            f"{signal.Signals(exc.signum).name} while the editor {argv[0]} ran",
            where=where,
            hint="nothing was changed and the plaintext copy was removed; run the command again",
        ) from None


def _run_editor(
    argv: list[str], scratch: Path, plaintext: bytes, name: str, *, where: str
) -> bytes:
    """The editor run on a 0600 copy of ``plaintext`` in ``scratch``; its bytes after."""
    file = scratch / (Path(name).name or "secret")
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(plaintext)
    try:
        editor = subprocess.Popen([*argv, str(file)])
    except OSError as exc:
        raise SecretError(
            f"cannot run the editor {argv[0]}: {exc.strerror or exc}",
            where=where,
            hint="set $VISUAL or $EDITOR to an editor that is installed; nothing was changed",
        ) from None
    try:
        with _sigint_ignored():  # after the fork: the editor keeps the default
            returncode = editor.wait()
    except BaseException:  # SIGTERM/SIGHUP (_signals_unwind): stop the editor
        editor.kill()
        editor.wait()
        raise
    if returncode != 0:
        raise SecretError(
            f"the editor {argv[0]} exited with status {returncode}",
            where=where,
            hint="nothing was changed; run the command again",
        )
    return file.read_bytes()


def edit_file(tree: Tree, path: str | Path, identity: Identity) -> Written | None:
    """Decrypt ``PATH.age`` with ``identity``, run the editor, re-encrypt to the
    rule's current recipients. None (nothing written) when the content is
    unchanged. Raises the errors of :func:`show_file`, :func:`edit_plaintext`
    and :meth:`SecretRules.recipients`, all before anything is written.
    """
    from reconciler.secrets.age import encrypt

    rel = tree.repo_path(path)
    plaintext = show_file(tree, rel, identity)
    recipients = tree.rules.recipients(rel)  # checked before the editor: no work lost after
    edited = edit_plaintext(plaintext, rel.removesuffix(AGE_SUFFIX), where=rel)
    if edited == plaintext:
        return None
    file = tree.file(rel)
    atomic_write(file, encrypt(edited, recipients), mode=_mode_of(file))
    return Written(path=rel, recipients=recipients)


# ------------------------------------------------------------------ host files


def read_value(prompt: str) -> bytes:
    """A secret value from the terminal without echo (getpass), or all of stdin
    when stdin is not a terminal (one trailing newline dropped, as ``echo``
    adds it). Raises SecretError for an empty value or one that is not
    UTF-8 (a ``!age`` value is text)."""
    import getpass
    import sys

    if sys.stdin.isatty():
        value = getpass.getpass(prompt).encode("utf-8")
    else:
        value = sys.stdin.buffer.read()
        value = value[:-1] if value.endswith(b"\n") else value
    if not value:
        raise SecretError("an empty value", where="stdin", hint="type or pipe the secret value")
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        raise SecretError(
            "the value is not UTF-8 text",
            where="stdin",
            hint="put binary content in an encrypted file (secret encrypt PATH) instead",
        ) from None
    return value


_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def check_key(dotted: str) -> str:
    """``dotted`` if it is a path of template names (``db.password``: what a template
    reads as ``{{ db.password }}``); UsageError (exit 2) otherwise."""
    if not _KEY.match(dotted):
        raise UsageError(
            f"{dotted!r}: not a key a template can read — letters, digits and _, "
            "dots for nesting (db.password)"
        )
    return dotted


class _Plain:
    """PyYAML loading of a host file in which ``!age`` values are ``("!age", text)`` pairs:
    the check that an edit changed only what it meant to, independent of the
    inventory's own constructor for the tag."""

    @staticmethod
    def load(text: str, path: str) -> Any:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def tagged(loader: yaml.SafeLoader, node: yaml.Node) -> tuple[str, Any]:
            return (AGE_TAG, loader.construct_scalar(node))  # type: ignore[arg-type]

        Loader.add_constructor(AGE_TAG, tagged)
        try:
            return yaml.load(text, Loader=Loader)  # noqa: S506 - SafeLoader plus one scalar tag
        except yaml.YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise InventoryError(f"{path}: invalid YAML ({problem}) — fix the syntax") from exc


class HostDoc:
    """A HostDoc is a host file loaded for a round trip that may set ``!age`` values."""

    def __init__(self, tree: Tree, rel: str) -> None:
        from ruamel.yaml import YAML
        from ruamel.yaml.error import YAMLError
        from ruamel.yaml.util import load_yaml_guess_indent

        from reconciler.ops.hostfile import _mapping_indent

        if not (rel.startswith(f"{HOSTS_DIR}/") and rel.endswith((".yaml", ".yml"))):
            raise UsageError(
                f"{rel}: not a host file — !age values live in hosts/<node>.yaml (SPEC §8)"
            )
        self.rel = rel
        self.file = tree.file(rel)
        try:
            self.text = tree.read(rel).decode("utf-8")
        except UnicodeDecodeError:
            raise InventoryError(f"{rel}: not UTF-8 text — save it as UTF-8") from None
        self.before = _Plain.load(self.text, rel)
        if self.before is not None and not isinstance(self.before, dict):
            raise InventoryError(f"{rel}: not a mapping of keys — fix the file")
        self.yaml = YAML()
        self.yaml.preserve_quotes = True
        self.yaml.width = 1 << 16
        try:
            _, sequence, offset = load_yaml_guess_indent(self.text)
            data = self.yaml.load(self.text)
        except YAMLError as exc:
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise InventoryError(
                f"{rel}: ruamel.yaml cannot read it for a round trip ({problem}) — edit it by hand"
            ) from exc
        from ruamel.yaml.comments import CommentedMap

        self.data: Any = CommentedMap() if data is None else data
        mapping = _mapping_indent(self.data)
        self.yaml.indent(mapping=mapping, sequence=sequence or mapping, offset=offset or 0)
        self.crlf = "\r\n" in self.text

    def secrets(self) -> Iterator[tuple[str, Any, Any]]:
        """Every ``!age`` value under ``vars``, in mappings and in lists: (dotted key,
        parent mapping or list, key or index); a list index is a part of the dotted
        key (``users.0.password``), as :func:`_set_in` reads it back."""

        def walk(node: Any, prefix: str) -> Iterator[tuple[str, Any, Any]]:
            if isinstance(node, dict):
                items: Any = node.items()
            elif isinstance(node, list):
                # A value in a list is one too: rekey once skipped these, leaving them
                # encrypted to the old recipients while saying all were re-encrypted.
                items = enumerate(node)
            else:
                return
            for key, value in items:
                dotted = f"{prefix}.{key}" if prefix else str(key)
                if _is_age(value):
                    yield dotted, node, key
                else:
                    yield from walk(value, dotted)

        yield from walk(self.data.get("vars"), "")

    def lookup(self, dotted: str) -> Any:
        """The ``!age`` value at ``vars.<dotted>``; SecretError naming the file otherwise."""
        node: Any = self.data.get("vars")
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                raise SecretError(
                    f"no value vars.{dotted}",
                    where=self.rel,
                    hint=f"add it with 'reconciler secret encrypt --var {self.rel} {dotted}'",
                )
            node = node[part]
        if not _is_age(node):
            raise SecretError(
                f"vars.{dotted} is not a !age value",
                where=self.rel,
                hint=f"encrypt it with 'reconciler secret encrypt --var {self.rel} {dotted}'",
            )
        return node

    def set(self, dotted: str, payload: bytes) -> None:
        """Set ``vars.<dotted>`` to ``!age`` + the armored ``payload`` (a literal block),
        making the mappings on the way; SecretError when one on the way is not one."""
        from ruamel.yaml.comments import CommentedMap

        node = self.data
        parts = ["vars", *dotted.split(".")]
        for depth, part in enumerate(parts[:-1]):
            if part not in node:
                node[part] = CommentedMap()
            node = node[part]
            if not isinstance(node, dict):
                raise SecretError(
                    f"{'.'.join(parts[: depth + 1])} is not a mapping, so it cannot hold {dotted}",
                    where=self.rel,
                    hint="choose another key",
                )
        node[parts[-1]] = tagged_value(payload)

    def dump(self, expect: Callable[[Any], Any]) -> str:
        """The edited text; InventoryError when it reads back as anything but
        ``expect(old)`` or loses a comment (a layout the round trip cannot keep)."""
        from reconciler.ops.hostfile import _comment_lines

        out = io.StringIO()
        self.yaml.dump(self.data, out)
        new = out.getvalue().replace("\r\n", "\n")
        if self.crlf:
            new = new.replace("\n", "\r\n")
        if _Plain.load(new, self.rel) != expect(self.before or {}):
            raise InventoryError(
                f"{self.rel}: the edit would change more than the value (an unusual layout "
                "the YAML round trip cannot keep) — edit the file by hand"
            )
        kept = _comment_lines(self.text.splitlines())
        lost = [c for c in kept if c not in set(_comment_lines(new.splitlines()))]
        if lost:
            raise InventoryError(
                f"{self.rel}: the edit would lose the comment {lost[0]!r} — edit the file by hand"
            )
        return new


def _is_age(value: Any) -> bool:
    from ruamel.yaml.comments import TaggedScalar

    return isinstance(value, TaggedScalar) and value.tag.value == AGE_TAG


def tagged_value(payload: bytes) -> Any:
    """An armored age payload as ruamel's ``!age |`` literal block scalar."""
    from ruamel.yaml.comments import TaggedScalar

    text = payload.decode("ascii")
    return TaggedScalar(text if text.endswith("\n") else text + "\n", style="|", tag=AGE_TAG)


def _payload_of(value: Any, *, where: str) -> bytes:
    """The bytes of a ``!age`` value; NotAgeError (via decrypt's check) when not armored age."""
    from reconciler.errors import NotAgeError
    from reconciler.secrets.age import ARMOR_BEGIN

    text = str(value.value)
    if not text.lstrip().startswith(ARMOR_BEGIN.decode("ascii")):
        raise NotAgeError(
            "a !age value that is not an ASCII-armored age payload",
            where=where,
            hint="replace it with 'reconciler secret encrypt --var'",
        )
    return text.encode("ascii", "replace")


def _unshared(data: Any) -> Any:
    """A copy of plain-loaded ``data`` in which no mapping or list is shared.

    Why not ``copy.deepcopy``: it keeps YAML aliases shared (``db: *base`` stays
    the object ``base`` is), so setting ``db.password`` in the copy set it in
    ``base`` too, and the read-back check of :meth:`HostDoc.dump` agreed with
    a round trip that had written the secret into the anchored mapping.
    """
    if isinstance(data, dict):
        return {k: _unshared(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_unshared(v) for v in data]
    return data


def _set_in(data: Any, dotted: str, value: Any) -> Any:
    """A copy of plain-loaded ``data`` with ``vars.<dotted>`` set to ``value`` and
    nothing else (aliases unshared: :func:`_unshared`)."""
    out = _unshared(data)
    node = out.setdefault("vars", {})
    parts = dotted.split(".")
    for part in parts[:-1]:
        # A list's index (rekey of a value in a list, HostDoc.secrets); else a key.
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value
    return out


def _write_host(doc: HostDoc, text: str) -> None:
    atomic_write(doc.file, text.encode("utf-8"), mode=_mode_of(doc.file))


def encrypt_var(tree: Tree, file: str | Path, dotted: str, value: bytes) -> Written:
    """Set ``vars.<dotted>`` of the host file ``FILE`` to ``value`` as a ``!age`` value,
    encrypted to the recipients of the rule matching ``FILE`` (SPEC §8). An
    existing ``!age`` value is refused (``secret edit --var`` changes it); a
    plain value is replaced. Comments and layout kept (:class:`HostDoc`).
    """
    from reconciler.secrets.age import encrypt

    rel = tree.repo_path(file)
    doc = HostDoc(tree, rel)
    if any(key == dotted for key, _, _ in doc.secrets()):
        raise SecretError(
            f"vars.{dotted} is already a !age value",
            where=rel,
            hint=f"change it with 'reconciler secret edit --var {rel} {dotted}'",
        )
    recipients = tree.rules.recipients(rel)
    payload = encrypt(value, recipients)
    doc.set(dotted, payload)
    text = doc.dump(lambda old: _set_in(old, dotted, (AGE_TAG, str(tagged_value(payload).value))))
    _write_host(doc, text)
    return Written(path=rel, key=dotted, recipients=recipients)


def show_var(tree: Tree, file: str | Path, dotted: str, identity: Identity) -> bytes:
    """The plaintext of the ``!age`` value ``vars.<dotted>`` of ``FILE``."""
    from reconciler.secrets.age import decrypt

    rel = tree.repo_path(file)
    doc = HostDoc(tree, rel)
    where = f"{rel} vars.{dotted}"
    return decrypt(_payload_of(doc.lookup(dotted), where=where), (identity,), where=where)


def edit_var(tree: Tree, file: str | Path, dotted: str, identity: Identity) -> Written | None:
    """:func:`edit_file` for the ``!age`` value ``vars.<dotted>`` of ``FILE``: decrypt,
    editor, re-encrypt to the current recipients of ``FILE``'s rule; None
    when unchanged. Comments in the host file survive."""
    from reconciler.secrets.age import decrypt, encrypt

    rel = tree.repo_path(file)
    doc = HostDoc(tree, rel)
    where = f"{rel} vars.{dotted}"
    plaintext = decrypt(_payload_of(doc.lookup(dotted), where=where), (identity,), where=where)
    recipients = tree.rules.recipients(rel)
    edited = edit_plaintext(plaintext, dotted, where=where)
    if edited == plaintext:
        return None
    payload = encrypt(edited, recipients)
    doc.set(dotted, payload)
    text = doc.dump(lambda old: _set_in(old, dotted, (AGE_TAG, str(tagged_value(payload).value))))
    _write_host(doc, text)
    return Written(path=rel, key=dotted, recipients=recipients)


# ------------------------------------------------------------------ rekey


def encrypted_files(tree: Tree) -> list[str]:
    """Every ``*.age`` file of the working tree (``.git`` skipped), sorted."""
    return sorted(e.path for e in tree.snapshot.walk("") if e.path.endswith(AGE_SUFFIX))


def host_files_with_secrets(tree: Tree) -> list[str]:
    """Every ``hosts/*.yaml`` holding an ``!age`` tag (a text check, then parsed), sorted."""
    out = []
    for name, is_dir in tree.snapshot.listdir(HOSTS_DIR):
        rel = f"{HOSTS_DIR}/{name}"
        if not is_dir and name.endswith((".yaml", ".yml")) and AGE_TAG.encode() in tree.read(rel):
            out.append(rel)
    return sorted(out)


def rekey(tree: Tree, paths: Sequence[str | Path], identity: Identity) -> list[Written]:
    """Re-encrypt to the rules' current recipients (SPEC §8: after a node joins or
    leaves a meta-node, or a key changes): each ``.age`` file and each host
    file's ``!age`` values named in ``paths``, or all of them when ``paths``
    is empty. Every payload is decrypted and re-encrypted in memory first;
    only when all succeeded is anything written, so a failure (not a
    recipient, damaged, no rule) changes nothing. The plaintext is unchanged:
    rotate a leaked secret by changing it (``secret edit``), as git history
    keeps the old ciphertext.
    """
    from reconciler.secrets.age import decrypt, encrypt

    if paths:
        chosen = [tree.repo_path(p) for p in paths]
        for rel in chosen:
            if not rel.endswith(AGE_SUFFIX) and not rel.startswith(f"{HOSTS_DIR}/"):
                _encrypted(rel)
    else:
        chosen = encrypted_files(tree) + host_files_with_secrets(tree)
    files: list[tuple[str, bytes, Written]] = []
    docs: list[tuple[HostDoc, str, list[Written]]] = []
    for rel in chosen:
        if rel.endswith(AGE_SUFFIX):
            plaintext = decrypt(tree.read(rel), (identity,), where=rel)
            recipients = tree.rules.recipients(rel)
            payload = encrypt(plaintext, recipients)
            files.append((rel, payload, Written(path=rel, recipients=recipients)))
            continue
        doc = HostDoc(tree, rel)
        found = list(doc.secrets())
        if not found:
            continue
        recipients = tree.rules.recipients(rel)
        done: list[Written] = []
        new_values: dict[str, str] = {}
        for dotted, parent, key in found:
            where = f"{rel} vars.{dotted}"
            plaintext = decrypt(_payload_of(parent[key], where=where), (identity,), where=where)
            payload = encrypt(plaintext, recipients)
            parent[key] = tagged_value(payload)
            new_values[dotted] = str(parent[key].value)
            done.append(Written(path=rel, key=dotted, recipients=recipients))

        def expect(old: Any, values: dict[str, str] = new_values) -> Any:
            for dotted, text in values.items():
                old = _set_in(old, dotted, (AGE_TAG, text))
            return old

        docs.append((doc, doc.dump(expect), done))
    written: list[Written] = []
    for rel, payload, record in files:
        file = tree.file(rel)
        atomic_write(file, payload, mode=_mode_of(file))
        written.append(record)
    for doc, text, done in docs:
        _write_host(doc, text)
        written.extend(done)
    return written
