"""Managed blocks (SPEC §9): a region of a file that the host or a package owns.

Metadata ``block: true`` (or ``block: {marker: "# {mark} …"}``) makes a
destination a *block*: its rendered text lives between a BEGIN and an END
marker line, and every other byte of the file stays what the host has
(Ansible ``blockinfile``, Salt ``file.blockreplace``). Several apps may each
own a block of one file, under different markers.

Two stages use this module. ``render`` builds each :class:`Block` (the
marker checked, the content checked not to hold a marker line) and a
TargetFile whose ``content`` is the file's *block view*: its blocks with
their marker lines, in app order. Between scan and plan, ``blockfiles.resolve``
reads each block file through the System and makes the plan compare views,
not files: the ActualFile's ``sha256`` becomes the sha256 of the view found
on disk (its ``block``, the bytes, shown by ``diff`` and captured), and the
TargetFile gets ``whole``, the file to write (the host's bytes with the
blocks spliced in). So drift is judged on the blocks alone — an edit outside
them is not drift — while apply, the journal, recovery and rollback handle
a whole file written atomically, as for any file.

Pure functions; ``blockfiles.resolve`` applies them to the disk.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

from reconciler.errors import InventoryError, RenderError

if TYPE_CHECKING:
    from reconciler.pipeline.render import TargetFile

# The default marker names the app, so the blocks of several apps in one file
# (/etc/hosts) never collide and a reader of the file knows whose block it is;
# Ansible's is "# {mark} ANSIBLE MANAGED BLOCK".
DEFAULT_MARKER = "# {mark} reconciler {app}"
MARK = "{mark}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Block:
    """A Block is one app's rendered text and the marker lines that enclose it in a file."""

    app: str
    marker: str  # one line holding {mark} ({app} already filled in)
    content: bytes  # the rendered text, ending with a newline (or empty)
    template: str  # the repository path it was rendered from

    @property
    def begin(self) -> bytes:
        """The BEGIN marker line, without its newline."""
        return self.marker.replace(MARK, "BEGIN").encode()

    @property
    def end(self) -> bytes:
        """The END marker line, without its newline."""
        return self.marker.replace(MARK, "END").encode()

    def text(self) -> bytes:
        """The block as it reads in the file: BEGIN line, content, END line."""
        return self.begin + b"\n" + self.content + self.end + b"\n"


def block_marker(value: Any, *, app: str, where: str, dest: PurePosixPath, node: str) -> str | None:
    """The marker of ``block:`` metadata ``value`` for ``app``'s ``dest``; None for
    ``block: false``. ``{app}`` in a marker is the app's name.

    Raises InventoryError naming ``where`` (app.yaml or the host file), the
    destination and the node for a marker that is not one line, lacks
    ``{mark}``, or names it twice (SPEC §9 bad input): BEGIN and END would not
    be told apart, or a block could not be found again.
    """
    if value is False:
        return None
    marker = DEFAULT_MARKER if value is True else value.get("marker", DEFAULT_MARKER)
    marker = marker.replace("{app}", app)
    problem = None
    if "\n" in marker or "\r" in marker or "\0" in marker:
        problem = "is not a single line"
    elif marker.count(MARK) != 1:
        problem = "must hold {mark} exactly once (replaced by BEGIN and END)"
    elif not marker.strip():
        problem = "is empty"
    elif marker != marker.strip():
        problem = "has leading or trailing white space"
    if problem is not None:
        raise InventoryError(
            f"{where}: block marker {marker!r} for {dest} (node {node}) {problem} — "
            'write one line such as "# {mark} reconciler {app}"'
        )
    return marker


def check_blocks(blocks: Sequence[Block], dest: PurePosixPath, node: str) -> None:
    """Refuse blocks of one file that could not be found again (SPEC §9 bad input):
    two with the same marker (naming both apps), or rendered content holding a
    marker line of the file's blocks. Raises RenderError naming the template."""
    seen: dict[bytes, Block] = {}
    for b in blocks:
        other = seen.get(b.begin)
        if other is not None:
            raise InventoryError(
                f"{b.template}: apps {other.app!r} and {b.app!r} of node {node} both manage "
                f"the block {b.marker!r} in {dest} — give one of them another marker "
                "(block: {marker: ...})"
            )
        seen[b.begin] = b
    lines = {x for b in blocks for x in (b.begin, b.end)}
    for b in blocks:
        for number, line in enumerate(b.content.splitlines(), 1):
            if line.rstrip(b"\r") in lines:
                raise RenderError(
                    f"rendered line {number} for {dest} (node {node}) is a marker line "
                    f"of the block ({line.decode(errors='replace')!r})",
                    where=b.template,
                    hint="remove it from the template or choose another marker",
                )


def content_of(rendered: bytes) -> bytes:
    """The text a block holds: ``rendered`` with a final newline, so the END marker
    starts its own line (as Ansible adds one)."""
    return rendered if not rendered or rendered.endswith(b"\n") else rendered + b"\n"


def view(blocks: Iterable[Block]) -> bytes:
    """The desired block view of a file: each block's text, by marker (so the view
    of a file does not depend on the order of the apps that manage it)."""
    return b"".join(b.text() for b in sorted(blocks, key=lambda b: b.begin))


class BlockError(Exception):
    """The markers found in a file do not enclose one region each (BEGIN without
    END, END before BEGIN, a marker twice): reconciler does not guess."""


def _regions(lines: list[bytes], markers: Sequence[tuple[bytes, bytes]]) -> list[tuple[int, int]]:
    """Per (begin, end) marker, the line range [start, stop) of its region, or (-1, -1)
    when neither marker line is there. Raises BlockError otherwise."""
    stripped = [line.rstrip(b"\r\n") for line in lines]
    out = []
    for begin, end in markers:
        b = [i for i, s in enumerate(stripped) if s == begin]
        e = [i for i, s in enumerate(stripped) if s == end]
        name = begin.decode(errors="replace")
        if not b and not e:
            out.append((-1, -1))
            continue
        if len(b) != 1 or len(e) != 1:
            raise BlockError(f"the block {name!r} has {len(b)} BEGIN and {len(e)} END marker lines")
        if e[0] < b[0]:
            raise BlockError(f"the block {name!r} has its END marker line before its BEGIN")
        out.append((b[0], e[0] + 1))
    spans = sorted(r for r in out if r[0] >= 0)
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        if start < stop:
            raise BlockError("two managed blocks overlap")
    return out


def _region_text(lines: list[bytes], start: int, stop: int) -> bytes:
    """A region as the view compares it: its END line ends with one newline whatever
    the file has there (no newline at the end of the file, CRLF)."""
    return b"".join(lines[start : stop - 1]) + lines[stop - 1].rstrip(b"\r\n") + b"\n"


def found_view(data: bytes, blocks: Sequence[Block], gone: Sequence[str]) -> bytes:
    """The block view of ``data``: the regions of ``blocks`` then of ``gone`` (markers
    of blocks that left the target state), as found. Raises BlockError."""
    lines = data.splitlines(keepends=True)
    markers = sorted([(b.begin, b.end) for b in blocks] + [_lines(g) for g in gone])
    return b"".join(
        _region_text(lines, start, stop) for start, stop in _regions(lines, markers) if start >= 0
    )


def _lines(marker: str) -> tuple[bytes, bytes]:
    """The BEGIN and END lines of a marker."""
    return marker.replace(MARK, "BEGIN").encode(), marker.replace(MARK, "END").encode()


def splice(data: bytes, blocks: Sequence[Block], gone: Sequence[str]) -> bytes:
    """``data`` with each block's region replaced by its text, a block not found
    appended at the end (Ansible's default ``insertafter: EOF``; a final newline
    added first when the file lacks one), and the regions of ``gone`` markers
    removed. Every other byte is kept. Raises BlockError."""
    lines = data.splitlines(keepends=True)
    markers = [(b.begin, b.end) for b in blocks]
    markers += [_lines(g) for g in gone]
    regions = _regions(lines, markers)
    replacement: dict[int, tuple[int, bytes]] = {}
    appended = b""
    for i, (start, stop) in enumerate(regions):
        if i < len(blocks):
            text = blocks[i].text()
            if start < 0:
                appended += text
                continue
            last = lines[stop - 1]
            ending = last[len(last.rstrip(b"\r\n")) :]
            replacement[start] = (stop, text[:-1] + ending)  # the END line keeps its ending
        elif start >= 0:
            replacement[start] = (stop, b"")
    out: list[bytes] = []
    i = 0
    while i < len(lines):
        if i in replacement:
            stop, text = replacement[i]
            out.append(text)
            i = stop
            continue
        out.append(lines[i])
        i += 1
    body = b"".join(out)
    if appended:
        if body and not body.endswith(b"\n"):
            body += b"\n"
        body += appended
    return body


def inside(shown: bytes, block: Block) -> bytes | None:
    """The text between ``block``'s marker lines in ``shown`` (a view, as captured),
    without them; None when they are not there once each (``adopt``)."""
    try:
        lines = shown.splitlines(keepends=True)
        ((start, stop),) = _regions(lines, [(block.begin, block.end)])
    except BlockError:
        return None
    return None if start < 0 else b"".join(lines[start + 1 : stop - 1])


def removal_only(t: TargetFile) -> bool:
    """True for the TargetFile that only removes blocks which left the target state
    (blockfiles.resolve): written, never recorded as managed."""
    return not t.blocks and t.whole is not None


def markers_of(t: TargetFile) -> str:
    """What a record keeps of a block file: its markers, one per line (SPEC §9);
    "" for a whole file."""
    return "\n".join(b.marker for b in t.blocks)


def recorded_view(data: bytes, markers: str) -> str:
    """sha256 of the block view of ``data`` for a record's ``markers`` (rollback:
    the record of a file put back); of nothing when its markers are broken."""
    try:
        shown = found_view(data, (), [x for x in markers.split("\n") if x])
    except BlockError:
        shown = b"\0"  # matches no view: the next run looks at it again
    return hashlib.sha256(shown).hexdigest()
