"""Request-derived text made safe for a log line.

A request path, a header, a CGI script's stderr or a redirect target may hold
control characters (a ``%1b`` decoded into ``PATH_INFO``, a script echoing its
input).  Written raw, CR and LF forge log lines and ESC sequences drive the
terminal of whoever reads the log.  Every log field that carries such text goes
through :func:`printable`, which shows them escaped (``\\x1b``, ``\\r``, ``\\n``)
as twisted.web's access-log formatter already does for its fields.
"""

from __future__ import annotations

import re

#: C0 controls, DEL and C1 controls (0x9b is a one-byte CSI on some terminals),
#: and in decoded text the bidirectional overrides and line separators that make
#: a log line read differently from what it holds (U+202E and the like).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029"
                      "\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}


def _escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _NAMED.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def printable(value: str | bytes, limit: int | None = None) -> str:
    """``value`` (bytes read as latin-1, so every byte is shown) with control
    characters escaped; at most ``limit`` characters of it, before escaping."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return _CONTROL.sub(_escape, text)
