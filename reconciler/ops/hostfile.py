"""Operators' side, host-file edits: ``state:`` and ``suspended:`` of ``hosts/<name>.yaml``.

Takes a host file's text; produces the same text with one top-level key set,
added or removed — for ``push NODE STATE``, ``suspend`` and ``resume``
(:mod:`reconciler.ops.change` commits it).

The edit goes through ruamel.yaml's round-trip mode, which keeps comments,
key order, quoting, flow and block styles and long lines; the writer is set
to the file's own indentation (mapping indent from where the first nested
mapping's keys stand, sequence indent and dash offset from ruamel's own
guess) and its line ending, so an unchanged line is written back as it was
(every example host file round-trips byte for byte). ruamel keeps the
comment lines *before* a key with the value that precedes them; an edit
that adds or removes a key moves them along so that they stay above the key
they were written for. The new value's scalar style is chosen for PyYAML,
the YAML 1.1 loader of the inventory: ``yes`` or ``1.0`` as a state are
double-quoted. Every edit is re-parsed by the inventory's parser and must
differ from the old file in exactly the one key it meant to change
(InventoryError otherwise).
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from reconciler.errors import InventoryError, UsageError
from reconciler.pipeline.inventory import parse_yaml

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # node.schema.json $defs/name


class _Doc:
    """A _Doc is a host file loaded for a round trip: the document and a writer set to its layout."""

    def __init__(self, text: str, path: str) -> None:
        from ruamel.yaml import YAML
        from ruamel.yaml.comments import CommentedMap
        from ruamel.yaml.error import YAMLError
        from ruamel.yaml.util import load_yaml_guess_indent

        self.path = path
        self.before = parse_yaml(text.encode(), path)  # the inventory's own verdict first
        if self.before is not None and not isinstance(self.before, dict):
            raise InventoryError(f"{path}: not a mapping of keys — fix the file")
        self.yaml = YAML()  # round-trip mode
        self.yaml.preserve_quotes = True
        self.yaml.width = 1 << 16  # never fold a line the file has on one line
        try:
            _, sequence, offset = load_yaml_guess_indent(text)
            data = self.yaml.load(text)
        except YAMLError as exc:  # PyYAML read it: a YAML 1.1/1.2 difference
            problem = getattr(exc, "problem", None) or type(exc).__name__
            raise InventoryError(
                f"{path}: ruamel.yaml cannot read it for a round trip ({problem}) — edit it by hand"
            ) from exc
        self.comments_only = data is None  # empty, or only comments: nothing to round-trip
        self.data: Any = CommentedMap() if data is None else data
        mapping = _mapping_indent(self.data)
        self.yaml.indent(mapping=mapping, sequence=sequence or mapping, offset=offset or 0)
        self.crlf = "\r\n" in text
        self.text = text
        # ruamel drops the comment lines above a flow-mapping document: keep them as they are.
        self.prefix = ""
        if not self.comments_only and self.data.fa.flow_style():
            self.prefix = "".join(text.splitlines(keepends=True)[: self.data.lc.line])

    def dump(self) -> str:
        out = io.StringIO()
        self.yaml.dump(self.data, out)
        new = out.getvalue()
        if self.comments_only and self.data:
            prefix = self.text if not self.text or self.text.endswith("\n") else self.text + "\n"
            new = prefix + new
        new = (self.prefix + new).replace("\r\n", "\n")  # the writer's "\n", then the file's
        return new.replace("\n", "\r\n") if self.crlf else new

    def lines_of(self, key: str) -> range:
        """Line numbers (0-based) from top-level ``key`` up to the next top-level key."""
        keys = list(self.data)
        start = self.data.lc.key(key)[0]
        after = keys.index(key) + 1
        end = self.data.lc.key(keys[after])[0] if after < len(keys) else len(self.text.splitlines())
        return range(start, end)

    def checked(
        self,
        new: str,
        expect: Callable[[dict[str, Any]], dict[str, Any]],
        *,
        dropped: range = range(0),
    ) -> str:
        """``new`` if it parses to ``expect(old)`` and keeps every comment line; else InventoryError.

        Comments on the ``dropped`` lines (a replaced or removed block) may
        go; every other comment of the old text must still be there: the
        round trip must never lose one silently (ruamel drops, for one,
        comments inside a flow mapping).
        """
        after = parse_yaml(new.encode(), self.path) or {}
        if after != expect(dict(self.before or {})):
            raise InventoryError(
                f"{self.path}: the edit would change more than intended (an unusual layout "
                "the YAML round trip cannot keep) — edit the file by hand"
            )
        old = self.text.splitlines()
        kept = Counter(_comment_lines(line for i, line in enumerate(old) if i not in dropped))
        lost = kept - Counter(_comment_lines(new.splitlines()))
        if lost:
            raise InventoryError(
                f"{self.path}: the edit would lose the comment {next(iter(lost))!r} (a layout "
                "the YAML round trip cannot keep) — edit the file by hand"
            )
        return new


def _comment_lines(lines: Iterable[str]) -> list[str]:
    """The comments of ``lines``, whole-line and end-of-line, stripped.

    A ``#`` starts a comment at the start of a line or after a blank,
    outside quotes (YAML's rule; escapes inside quotes are not followed:
    this is a safety net, and a false alarm only refuses an edit).
    """
    found = []
    for line in lines:
        quote = ""
        for i, char in enumerate(line):
            if quote:
                quote = "" if char == quote else quote
            elif char in "'\"" and (i == 0 or line[i - 1] in " \t[{,:-"):
                quote = char
            elif char == "#" and (i == 0 or line[i - 1] in " \t"):
                found.append(line[i:].strip())
                break
    return found


def _mapping_indent(data: Any) -> int:
    """Columns a nested block mapping is indented by in this file (2 when none says)."""
    from ruamel.yaml.comments import CommentedMap

    for value in data.values() if isinstance(data, dict) else ():
        if isinstance(value, CommentedMap) and len(value) and not value.fa.flow_style():
            column = int(value.lc.col)
            if column > 0:
                return column
    return 2


class _Tail:
    """A _Tail is where ruamel keeps the comment and blank lines after a value's last line.

    ``own`` is the rest of that last line (an end-of-line comment, or just
    the newline); ``after`` the whole lines that follow, up to the next key.
    ruamel keeps them in one of two places: the post-comment slot of the
    deepest last item (its token holds ``own`` + ``after``), or the ``end``
    list of a block sequence whose last item is a flow collection (whole
    lines only).
    """

    def __init__(self, slots: list[Any], index: int, *, end: bool, ends_itself: bool) -> None:
        self.slots, self.index, self.end = slots, index, end
        self.ends_itself = ends_itself  # a literal or folded block scalar writes its own newline

    def get(self) -> tuple[str, str]:
        if self.end:
            return "", "".join(str(t.value) for t in self.slots)
        token = self.slots[self.index]
        if token is None:
            return "", ""
        own, newline, after = str(token.value).partition("\n")
        return own + newline, after

    def put(self, own: str, after: str) -> None:
        if self.end:
            self.slots[:] = [_comment(after)] if after else []
            return
        token = self.slots[self.index]
        if token is None and not after:
            return
        if token is None:
            self.slots[self.index] = _comment(("" if self.ends_itself else "\n") + after)
        else:
            token.value = (own or "\n") + after  # in place: a flow value shares its token


def _tail(parent: Any, key: Any) -> _Tail:
    """The :class:`_Tail` of ``parent[key]``.

    The slot of a mapping key itself holds what follows ``key:`` on its own
    line; what follows a block collection is on its deepest last item, or in
    its ``end`` list.
    """
    from ruamel.yaml.comments import CommentedMap, CommentedSeq
    from ruamel.yaml.scalarstring import FoldedScalarString, LiteralScalarString

    value = parent[key]
    if isinstance(value, CommentedMap | CommentedSeq) and len(value) and not value.fa.flow_style():
        end = getattr(value.ca, "end", None)
        if end:
            return _Tail(end, 0, end=True, ends_itself=True)
        last = next(reversed(value)) if isinstance(value, CommentedMap) else len(value) - 1
        return _tail(value, last)
    slot = 2 if isinstance(parent, CommentedMap) else 0  # ruamel's post-comment index
    slots = parent.ca.items.setdefault(key, [None, None, None, None])
    block = isinstance(value, LiteralScalarString | FoldedScalarString)
    return _Tail(slots, slot, end=False, ends_itself=block)


def _comment(value: str) -> Any:
    from ruamel.yaml.error import CommentMark
    from ruamel.yaml.tokens import CommentToken

    return CommentToken(value, CommentMark(0), None)


def _take_lines_after(parent: Any, key: Any) -> str:
    """Detach the whole lines of comments and blank lines after ``parent[key]``; return them.

    The end-of-line comment of the value's last line stays where it is.
    """
    tail = _tail(parent, key)
    own, after = tail.get()
    tail.put(own, "")
    return after


def _add_lines_after(parent: Any, key: Any, lines: str) -> None:
    """Append comment and blank lines (whole lines) after ``parent[key]``."""
    tail = _tail(parent, key)
    own, after = tail.get()
    tail.put(own, after + lines)


def _ends_with_blank_line(parent: Any, key: Any) -> bool:
    own, after = _tail(parent, key).get()
    return (own + after).endswith("\n\n") or (bool(after) and not after.strip(" \n"))


def _drop_trailing_blank_lines(parent: Any, key: Any) -> None:
    tail = _tail(parent, key)
    own, after = tail.get()
    lines = after.splitlines(keepends=True)
    while lines and not lines[-1].strip():
        lines.pop()
    tail.put(own, "".join(lines))


def _scalar(value: str) -> Any:
    """``value`` as a scalar that PyYAML (YAML 1.1) reads back as the same string.

    Plain when it is a name that reads as itself; double-quoted otherwise
    (``1.0``, ``yes``, ``on``).
    """
    import yaml
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString, PlainScalarString

    try:
        plain = yaml.safe_load(value)
    except yaml.YAMLError:
        plain = None
    if plain == value and NAME.match(value):
        return PlainScalarString(value)
    return DoubleQuotedScalarString(value)


def set_state_text(text: str, state: str, *, path: str) -> str:
    """Set the top-level ``state:`` of a host file, keeping everything else.

    An existing value is replaced where it is (its end-of-line comment
    stays); a missing key is inserted before the first top-level key, or
    after ``include_nodes`` when that comes first, with the comments above
    the next key kept above it. Block and flow mappings alike. Raises
    InventoryError when the result would differ from the old file in
    anything but ``state``, UsageError for a STATE that is not a valid name
    (SPEC §1, §6 ``push``).
    """
    if not NAME.match(state):
        raise UsageError(f"state {state!r}: not a valid state name — letters, digits, . _ -")
    doc = _Doc(text, path)
    data = doc.data
    if "state" in data:
        data["state"] = _scalar(state)
    else:
        keys = list(data)
        at = 1 if keys and keys[0] == "include_nodes" else 0
        moved = _take_lines_after(data, keys[0]) if at and not data.fa.flow_style() else ""
        data.insert(at, "state", _scalar(state))
        _add_lines_after(data, "state", moved)
    return doc.checked(doc.dump(), lambda d: {**d, "state": state})


def _block(reason: str, until: str | None) -> Any:
    from ruamel.yaml.comments import CommentedMap
    from ruamel.yaml.scalarstring import DoubleQuotedScalarString

    block = CommentedMap(reason=DoubleQuotedScalarString(reason))
    if until:
        block["until"] = DoubleQuotedScalarString(until)
    return block


def set_suspended_text(text: str, reason: str, until: str | None, *, path: str) -> str:
    """Add or replace the top-level ``suspended:`` block of a host file (SPEC §1, §4).

    A new block goes at the end of the file after a blank line; an existing
    one is replaced where it is, the comments after it kept. Raises
    InventoryError when anything else would change, UsageError for an empty
    reason.
    """
    if not reason.strip():
        raise UsageError("--reason: must not be empty — say why the node is suspended")
    doc = _Doc(text, path)
    data = doc.data
    block = _block(reason, until)
    dropped = range(0)
    if "suspended" in data:
        dropped = doc.lines_of("suspended")
        after = _take_lines_after(data, "suspended")
        data["suspended"] = block
        _add_lines_after(data, "suspended", after)
    else:
        last = next(reversed(data)) if len(data) else None
        if last is not None and not data.fa.flow_style() and not _ends_with_blank_line(data, last):
            _add_lines_after(data, last, "\n")  # a blank line before the new block
        data["suspended"] = block
    expected = {"reason": reason, **({"until": until} if until else {})}
    return doc.checked(doc.dump(), lambda d: {**d, "suspended": expected}, dropped=dropped)


def remove_suspended_text(text: str, *, path: str) -> str:
    """Remove the top-level ``suspended:`` block; the inverse of :func:`set_suspended_text`.

    Returns ``text`` unchanged when there is no such block. The comment
    lines after the block stay (above the key that follows); blank lines
    left at the end of the file are dropped.
    """
    doc = _Doc(text, path)
    data = doc.data
    if "suspended" not in data:
        return text
    keys = list(data)
    at = keys.index("suspended")
    dropped = doc.lines_of("suspended")
    after = _take_lines_after(data, "suspended") if not data.fa.flow_style() else ""
    del data["suspended"]
    if at > 0:
        _add_lines_after(data, keys[at - 1], after)
        if at == len(keys) - 1:
            _drop_trailing_blank_lines(data, keys[at - 1])
    elif after.strip():
        raise InventoryError(
            f"{path}: comments follow suspended:, the first key — remove the block by hand"
        )
    return doc.checked(
        doc.dump(), lambda d: {k: v for k, v in d.items() if k != "suspended"}, dropped=dropped
    )
