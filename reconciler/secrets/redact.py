"""Secret text cut out of host output before it reaches a report (SPEC §8).

Scripts and services print what they like: a post script that ``cat``s the
file it validates, a unit whose failed start logs its connection string.
That output is a report's ``output_tail`` (a script's, or the last journal
lines of a unit that failed, SPEC §11) and the text of the run's error. SPEC
§8: no secret reaches a report, a log line or an error. A :class:`Redaction`
holds the secret text one run knows — every plaintext it decrypted (``.age``
files, ``!age`` values) and every line of its ``secret`` destinations — and
replaces each occurrence in such output by :data:`MARK`. The way CI systems
mask their secret variables in job logs (GitLab, GitHub Actions): by value,
wherever it shows up.

Pure: takes text, gives text; holds plaintext in memory only, as the render
that decrypted it does.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

MARK = "<redacted>"
# Shorter pieces of a secret file ("}", "[main]", "on") would cut ordinary words out of
# every line of output; a secret value that short is no secret worth the name.
MIN_CHARS = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class Redaction:
    """A Redaction is the secret text one run knows, longest first, to cut out of output."""

    needles: tuple[str, ...] = ()

    @classmethod
    def of(cls, secrets: Iterable[bytes]) -> Redaction:
        """From plaintexts (bytes, decoded as output is: UTF-8, errors replaced): each one
        whole and each of its lines, stripped, at least MIN_CHARS characters long."""
        found: set[str] = set()
        for secret in secrets:
            text = secret.decode("utf-8", "replace")
            for piece in (text, *text.splitlines()):
                piece = piece.strip()
                if len(piece) >= MIN_CHARS:
                    found.add(piece)
        # Longest first: a line holding a value is cut whole, not around the value.
        return cls(needles=tuple(sorted(found, key=lambda n: (-len(n), n))))

    def apply(self, text: str) -> str:
        """``text`` with every needle replaced by MARK."""
        for needle in self.needles:
            if needle in text:
                text = text.replace(needle, MARK)
        return text
