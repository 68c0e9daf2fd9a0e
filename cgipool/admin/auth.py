"""Who may read and change things through the admin pages, API and /metrics.

- Clients from ``admin.local_networks`` (loopback by default) are answered
  without credentials; anyone else needs ``admin.token`` (``Authorization:
  Bearer …``, or the session cookie set by the login form), and without a
  configured token remote clients are refused outright.
- Tokenless local access also requires the ``Host`` header to be an IP literal
  or ``localhost``: a web page on a rebinding DNS name that resolves to
  127.0.0.1 cannot use the admin through the victim's browser.
- Mutations (POST) need proof that they are not cross-site: a valid bearer
  token (browsers never add one on their own), or the ``X-CGIPool-CSRF``
  header — which a cross-site form cannot send and a cross-site ``fetch`` can
  send only after a CORS preflight that we never approve — with a matching
  ``Origin`` and ``Sec-Fetch-Site`` when the browser sends them.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from typing import Any

import attrs

from cgipool.config import AdminConfig
from cgipool.proxy.errors import set_error

SESSION_COOKIE = b"cgipool_admin"
CSRF_HEADER = b"x-cgipool-csrf"


@attrs.frozen
class Denied:
    """Why a request is refused: the status code and the JSON error message."""

    code: int
    message: str


def refuse(request: Any, denied: Denied) -> bytes:
    """The JSON answer of a refused request; a 401 also says how to authenticate."""
    if denied.code == 401:
        request.setHeader(b"www-authenticate", b'Bearer realm="cgipool admin"')
    return set_error(request, denied.code, denied.message)


def client_ip(request: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = getattr(request.getClientAddress(), "host", None)
    if host is None:
        return None
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _host_is_literal(host_header: bytes | None) -> bool:
    """``Host`` names an IP address or localhost (with an optional port)."""
    if not host_header:
        return True  # HTTP/1.0 without Host: nothing a browser would send
    host = host_header.decode("latin-1").strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    if host in ("localhost", "localhost."):
        return True
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class AdminAuth:
    """Applies the admin access rules to a twisted.web request."""

    def __init__(self, config: AdminConfig) -> None:
        self.configure(config)

    def configure(self, config: AdminConfig) -> None:
        """Take (reloaded) settings; a new token ends the sessions of the old one."""
        self.token = config.token
        self.networks = config.local_networks
        self._session = (
            hmac.new(self.token.encode(), b"cgipool-admin-session", hashlib.sha256).hexdigest()
            if self.token else None
        )

    def is_local(self, request: Any) -> bool:
        address = client_ip(request)
        return address is not None and any(address in net for net in self.networks)

    def _bearer(self, request: Any) -> bool | None:
        """True/False for a valid/invalid bearer token, None when none was sent."""
        header = request.getHeader(b"authorization")
        if header is None:
            return None
        scheme, _, value = header.strip().partition(b" ")
        if scheme.lower() != b"bearer" or self.token is None:
            return False
        return hmac.compare_digest(value.strip(), self.token.encode())

    def _cookie(self, request: Any) -> bool | None:
        value = request.getCookie(SESSION_COOKIE)
        if value is None:
            return None
        if self._session is None:
            return False
        return hmac.compare_digest(value, self._session.encode())

    def check(self, request: Any, mutation: bool = False) -> Denied | None:
        """None when the request may proceed, else why not."""
        bearer = self._bearer(request)
        cookie = self._cookie(request)
        authenticated = bearer is True or cookie is True
        if not authenticated:
            if bearer is False or (cookie is False and self.token is not None
                                   and not self.is_local(request)):
                return Denied(403, "invalid admin token")
            if not self.is_local(request):
                if self.token is None:
                    return Denied(403, "the admin interface answers local clients only "
                                       "(set admin.token in the config to allow others)")
                return Denied(401, "authentication required: send "
                                   "'Authorization: Bearer <admin.token>' or log in at /admin/login")
            if not _host_is_literal(request.getHeader(b"host")):
                return Denied(403, "unexpected Host header for tokenless local access "
                                   "(use 127.0.0.1 or localhost, or set admin.token)")
        if mutation and bearer is not True:
            return self._cross_site(request)
        return None

    def _cross_site(self, request: Any) -> Denied | None:
        if not request.getHeader(CSRF_HEADER):
            return Denied(403, "missing X-CGIPool-CSRF header: changes need it "
                               "(or an Authorization: Bearer token)")
        site = request.getHeader(b"sec-fetch-site")
        if site is not None and site not in (b"same-origin", b"none"):
            return Denied(403, "cross-site request refused")
        origin = request.getHeader(b"origin")
        if origin is not None:
            host = request.getHeader(b"host") or b""
            scheme = b"https" if request.isSecure() else b"http"
            if origin != scheme + b"://" + host:
                return Denied(403, "cross-origin request refused")
        return None

    def session_cookie(self) -> bytes | None:
        return self._session.encode() if self._session else None

    def token_matches(self, candidate: str) -> bool:
        return self.token is not None and hmac.compare_digest(
            candidate.encode(), self.token.encode())
