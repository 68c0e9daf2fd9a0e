"""The admin's credentials, as the proxy must know them to keep them from workers.

Workers and CGI scripts are untrusted code (docs/hardening.md): a session cookie
or a bearer token that reached one could be replayed against the admin.  A
browser sends the session cookie to every port of the host whose path matches,
and a client may send ``Authorization: Bearer <admin token>`` to any URL, so
every request path (lean, general, CGI, local redirect) removes them:

- from ``Cookie``, the admin session cookie only (the others pass unchanged);
- ``Authorization`` when it carries the admin token (Bearer, or inside Basic).

The other way, a worker's ``Set-Cookie`` for the admin cookie's name is dropped
(:func:`sets_admin_cookie`), so a service cannot plant or overwrite it.

One instance is shared by the admin's access rules (which set the token) and
every proxy resource, so a reloaded token applies to both at once.
"""

from __future__ import annotations

import binascii
from base64 import b64decode, urlsafe_b64decode

import attrs

#: The admin session cookie's name.
SESSION_COOKIE = b"cgipool_admin"


@attrs.define
class AdminCredentials:
    """What identifies an admin; see the module docstring."""

    #: The admin token (``admin.token``), or None when there is none.
    token: bytes | None = None
    cookie_name: bytes = SESSION_COOKIE

    def scrub_cookie(self, value: bytes) -> bytes | None:
        """``value`` (a ``Cookie`` header) without the admin session cookie;
        None when nothing else is left.  Cheap when it is not there."""
        name = self.cookie_name
        if name not in value:
            return value
        kept = []
        for part in value.split(b";"):
            # A client (not a browser) may join cookies with ", ": look inside.
            pieces = [piece for piece in part.split(b",")
                      if piece.strip() and piece.strip().partition(b"=")[0].strip() != name]
            if pieces:
                kept.append(b",".join(pieces))
        if not kept:
            return None
        return b";".join(kept).strip()

    def is_admin_authorization(self, value: bytes) -> bool:
        """True when an ``Authorization`` value carries the admin token."""
        token = self.token
        if not token:
            return False
        if token in value:
            return True
        parts = value.split(None, 1)
        if len(parts) == 2 and parts[0].lower() == b"basic":
            encoded = parts[1].strip()
            encoded += b"=" * (-len(encoded) % 4)  # padding left out
            for decode in (b64decode, urlsafe_b64decode):
                try:
                    if token in decode(encoded):
                        return True
                except (binascii.Error, ValueError):
                    pass
        return False

    def allowed(self, lname: bytes, value: bytes) -> bytes | None:
        """The value a worker may see of header ``lname`` (lower case), or None
        to drop it."""
        if lname == b"cookie":
            return self.scrub_cookie(value)
        if lname == b"authorization" and self.is_admin_authorization(value):
            return None
        return value


def cookie_values(headers: list[bytes], name: bytes = SESSION_COOKIE) -> list[bytes]:
    """Every value of cookie ``name`` in ``Cookie`` header values, in order.

    A browser sends all cookies of one name it holds (``a=1; a=2``): one a
    service's page planted with ``document.cookie`` besides the admin's own.
    twisted.web keeps the last only, so the planted one would shadow the
    session; the admin looks at each.
    """
    values = []
    for header in headers:
        for part in header.split(b";"):
            key, sep, value = part.strip().partition(b"=")
            if sep and key.strip() == name:
                values.append(value.strip())
    return values


def sets_admin_cookie(value: bytes) -> bool:
    """A ``Set-Cookie`` value (from a worker or script) that would set the admin
    session cookie: browsers send cookies to every port of a host, so such a
    cookie would reach the admin's listener (cookie tossing).  Dropped."""
    return value.partition(b"=")[0].strip() == SESSION_COOKIE


#: Names of the headers :meth:`AdminCredentials.allowed` may change.
CREDENTIAL_HEADERS = frozenset({b"cookie", b"authorization"})
