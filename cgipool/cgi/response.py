"""The CGI response of a script (RFC 3875 section 6): where its header block
ends, and that block parsed into a status, header fields and maybe a local
redirect."""

from __future__ import annotations

import re

from cgipool.credentials import sets_admin_cookie

#: The script's header block may not be longer than this.
MAX_HEADER = 64 * 1024
#: Response fields of the script that the daemon sets itself.
DROP_RESPONSE_HEADERS = frozenset({
    b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"trailer",
    b"upgrade", b"te", b"proxy-connection",
})
#: An HTTP token (a header field name, an authorization scheme).
TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_STATUS = re.compile(rb"^([1-5][0-9][0-9])(?:[ \t]+(.*))?$")
#: A local redirect's target: origin-form, ``absolute-path [ "?" query ]`` of
#: RFC 3986 pchars (RFC 9112 3.2.1, RFC 3875 6.2.2): it becomes a request line.
_PCHAR = rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})"
_ORIGIN_FORM = re.compile(rb"(?:/" + _PCHAR + rb"*)+(?:\?(?:" + _PCHAR + rb"|[/?])*)?")
#: Any other Location (a client redirect): a URI reference's characters only
#: (RFC 3986 2: unreserved, reserved, '%'); no space, control or quote.
_URI_REFERENCE = re.compile(rb"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")


class BadCgiResponse(ValueError):
    """The script's output is not a CGI response."""


class CgiResponse:
    """The parsed header block of a script's output."""

    __slots__ = ("status", "reason", "headers", "local")

    def __init__(self, status: int, reason: bytes | None,
                 headers: list[tuple[bytes, bytes]], local: bytes | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        #: The path (and query) of a local redirect, else None.
        self.local = local


def parse_cgi_header(block: bytes) -> CgiResponse:
    """RFC 3875 section 6: the header block (without the blank line) → a response.

    :raises BadCgiResponse: no Content-Type, Location or Status field, a
        malformed line, a bad Status, or a value with a control character.
    """
    status: int | None = None
    reason: bytes | None = None
    location: bytes | None = None
    content_type = False
    headers: list[tuple[bytes, bytes]] = []
    for raw in block.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line[:1] in (b" ", b"\t"):
            raise BadCgiResponse("folded header lines are not allowed")
        name, colon, value = line.partition(b":")
        if not colon or not TOKEN.match(name):
            raise BadCgiResponse(f"not a header field: {_show(line)}")
        value = value.strip(b" \t")
        if any(c < 0x20 and c != 0x09 or c == 0x7F for c in value):
            raise BadCgiResponse(f"control character in the {_show(name)} field")
        lname = name.lower()
        if lname == b"status":
            match = _STATUS.match(value)
            if match is None or status is not None:
                raise BadCgiResponse(f"bad Status field: {_show(value)}")
            status = int(match.group(1))
            reason = match.group(2) or None
        elif lname == b"location":
            if location is not None or not value:
                raise BadCgiResponse("bad or repeated Location field")
            if not _URI_REFERENCE.fullmatch(value):
                raise BadCgiResponse(f"Location is not a valid URI: {_show(value)}")
            location = value
            headers.append((b"Location", value))
        else:
            if lname == b"content-type":
                content_type = True
            if lname not in DROP_RESPONSE_HEADERS and not (
                    lname == b"set-cookie" and sets_admin_cookie(value)):
                headers.append((name, value))
    if status is None:
        if location is not None:
            if location[:1] == b"/" and location[:2] != b"//":
                # A local redirect (RFC 3875 6.2.2): the daemon answers it itself.
                if not _ORIGIN_FORM.fullmatch(location):
                    raise BadCgiResponse("local redirect to an invalid path "
                                         f"(expected /path?query): {_show(location)}")
                return CgiResponse(302, None, [], local=location)
            status = 302  # a client redirect (an absolute URI)
        elif content_type:
            status = 200
        else:
            raise BadCgiResponse("no Content-Type, Location or Status field")
    return CgiResponse(status, reason, headers)


def _show(data: bytes, limit: int = 80) -> str:
    text = data[:limit].decode("latin-1")
    return repr(text + ("…" if len(data) > limit else ""))


def header_end(data: bytearray) -> tuple[int, int]:
    """Where the header block ends and how long the blank line is (-1 if not yet)."""
    lf = data.find(b"\n\n")
    crlf = data.find(b"\r\n\r\n")
    candidates = [(i, 2) for i in (lf,) if i >= 0] + [(i, 4) for i in (crlf,) if i >= 0]
    mixed = data.find(b"\n\r\n")
    if mixed >= 0:
        candidates.append((mixed, 3))
    if not candidates:
        return -1, 0
    return min(candidates)
