"""Who may read and change things through the admin pages, API and /metrics.

- The admin has a listener of its own (``admin.listen``), so a page any worker
  serves on the proxy's origin is cross-origin to it: the browser keeps that
  page from reading admin answers or sending the CSRF header.
- Clients from ``admin.local_networks`` (loopback by default) are answered
  without credentials; anyone else needs ``admin.token`` (``Authorization:
  Bearer …``, or a session from the login form), and without a configured
  token remote clients are refused outright.
- Sessions are random 256-bit ids the daemon holds (:class:`SessionStore`),
  bound to the client address that logged in, ending after ``session_idle``
  without use, ``session_lifetime`` after the login, at logout, and all at
  once when the token changes.  The cookie is ``Path=/admin; HttpOnly;
  SameSite=Strict`` (``Secure`` over TLS).
- Failed logins and wrong bearer tokens are limited per client
  (:class:`LoginLimiter`): 429 with ``Retry-After``.
- Tokenless local access also requires the ``Host`` header to be an IP literal
  or ``localhost``: a web page on a rebinding DNS name that resolves to
  127.0.0.1 cannot use the admin through the victim's browser.
- Mutations (POST) need proof that they are not cross-site: a valid bearer
  token (browsers never add one on their own), or the ``X-CGIPool-CSRF``
  header — which a cross-site form cannot send and a cross-site ``fetch`` can
  send only after a CORS preflight that we never approve — with a matching
  ``Origin`` and ``Sec-Fetch-Site`` when the browser sends them.
- Reads refuse what Fetch Metadata marks as a subresource load from another
  origin (``<img>``, ``<script>``, ``fetch`` from a worker's page): only the
  admin's own pages, a typed URL or a link may load admin content.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from typing import Any

import attrs

from cgipool.config import AdminConfig
from cgipool.credentials import SESSION_COOKIE, AdminCredentials, cookie_values
from cgipool.proxy.errors import set_error

CSRF_HEADER = b"x-cgipool-csrf"
#: Sessions held at once; the oldest ends when a login would exceed it.
MAX_SESSIONS = 1000
#: Failed logins (or wrong bearer tokens) from one client within
#: LOGIN_WINDOW seconds before it is refused with 429 for the rest of it.
LOGIN_FAILURES = 5
LOGIN_WINDOW = 300.0
#: Clients the limiter remembers; past that, forgotten oldest first.
MAX_TRACKED_CLIENTS = 10000


@attrs.frozen
class Denied:
    """Why a request is refused: the status code and the JSON error message."""

    code: int
    message: str
    #: Seconds until a 429 client may try again.
    retry_after: int | None = None


def refuse(request: Any, denied: Denied) -> bytes:
    """The JSON answer of a refused request; a 401 also says how to authenticate."""
    if denied.code == 401:
        request.setHeader(b"www-authenticate", b'Bearer realm="cgipool admin"')
    return set_error(request, denied.code, denied.message, denied.retry_after)


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


def client_key(request: Any) -> str:
    """Whom a session belongs to and whom the login limiter counts: the client's
    address, an IPv6 client's /64 (one host usually has the whole prefix)."""
    address = client_ip(request)
    if address is None:
        return "?"
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)


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


@attrs.define
class Session:
    """One login: who (client key) and when."""

    client: str
    created: float
    last_seen: float


class SessionStore:
    """Login sessions the daemon holds: random ids, idle and absolute expiry.

    An id is 256 random bits (``secrets``), so it cannot be guessed or derived
    from the token; the daemon forgets it at logout, on expiry, when the token
    changes and when the daemon stops, so a copied cookie dies with it.
    """

    def __init__(self, clock: Any, idle: float, lifetime: float,
                 limit: int = MAX_SESSIONS) -> None:
        self.clock = clock
        self.idle = idle
        self.lifetime = lifetime
        self.limit = limit
        self.sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self.sessions)

    def create(self, client: str) -> str:
        now = self.clock.seconds()
        self._expire(now)
        while len(self.sessions) >= self.limit:
            del self.sessions[next(iter(self.sessions))]  # the oldest login
        session_id = secrets.token_urlsafe(32)
        self.sessions[session_id] = Session(client, now, now)
        return session_id

    def valid(self, session_id: str, client: str) -> bool:
        """True for a live session of ``client`` (and it counts as used now)."""
        session = self.sessions.get(session_id)
        if session is None:
            return False
        now = self.clock.seconds()
        if self._expired(session, now):
            del self.sessions[session_id]
            return False
        if not hmac.compare_digest(session.client, client):
            return False  # a copied cookie from another address
        session.last_seen = now
        return True

    def revoke(self, session_id: str) -> bool:
        return self.sessions.pop(session_id, None) is not None

    def revoke_all(self) -> None:
        self.sessions.clear()

    def _expired(self, session: Session, now: float) -> bool:
        return (now - session.last_seen > self.idle
                or now - session.created > self.lifetime)

    def _expire(self, now: float) -> None:
        for session_id in [k for k, v in self.sessions.items() if self._expired(v, now)]:
            del self.sessions[session_id]


class LoginLimiter:
    """Failed logins per client: after LOGIN_FAILURES within LOGIN_WINDOW
    seconds, that client is refused (429) until the oldest failure is that old.

    Memory is bounded (MAX_TRACKED_CLIENTS); a success clears the client.
    """

    def __init__(self, clock: Any, failures: int = LOGIN_FAILURES,
                 window: float = LOGIN_WINDOW, limit: int = MAX_TRACKED_CLIENTS) -> None:
        self.clock = clock
        self.failures = failures
        self.window = window
        self.limit = limit
        self.recent: dict[str, list[float]] = {}

    def retry_after(self, client: str) -> int | None:
        """Seconds the client must wait, or None when it may try now."""
        times = self._recent(client)
        if len(times) < self.failures:
            return None
        return max(1, int(times[0] + self.window - self.clock.seconds() + 0.999))

    def failed(self, client: str) -> None:
        times = self._recent(client)
        if not times and len(self.recent) >= self.limit:
            del self.recent[next(iter(self.recent))]
        times.append(self.clock.seconds())
        self.recent[client] = times[-self.failures:]

    def succeeded(self, client: str) -> None:
        self.recent.pop(client, None)

    def _recent(self, client: str) -> list[float]:
        times = self.recent.get(client)
        if not times:
            return []
        now = self.clock.seconds()
        times = [t for t in times if now - t < self.window - 1e-6]  # float-safe
        if times:
            self.recent[client] = times
        else:
            del self.recent[client]
        return times


def too_many_failures(seconds: int) -> Denied:
    return Denied(429, f"too many failed logins from this address: try again in "
                       f"{seconds} s", retry_after=seconds)


class AdminAuth:
    """Applies the admin access rules to a twisted.web request."""

    def __init__(self, config: AdminConfig, clock: Any = None,
                 credentials: AdminCredentials | None = None) -> None:
        if clock is None:
            from twisted.internet import reactor as clock
        self.clock = clock
        #: Shared with the proxy resources, which keep these from workers.
        self.credentials = credentials if credentials is not None else AdminCredentials()
        self.token: str | None = None
        self.sessions = SessionStore(clock, config.session_idle, config.session_lifetime)
        self.limiter = LoginLimiter(clock)
        self.configure(config)

    def configure(self, config: AdminConfig) -> None:
        """Take (reloaded) settings; a new token ends every session."""
        if config.token != self.token:
            self.sessions.revoke_all()
        self.token = config.token
        self.credentials.token = config.token.encode() if config.token else None
        self.networks = config.local_networks
        self.sessions.idle = config.session_idle
        self.sessions.lifetime = config.session_lifetime

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

    def session_ids(self, request: Any) -> list[str]:
        """The session cookie's values (more than one when a service's page
        planted another cookie of its name: see credentials.cookie_values)."""
        headers = request.requestHeaders.getRawHeaders(b"cookie") or []
        return [v.decode("latin-1") for v in cookie_values(headers, SESSION_COOKIE) if v]

    def _cookie(self, request: Any) -> bool | None:
        """True/False for a live/unknown session, None when no cookie was sent."""
        session_ids = self.session_ids(request)
        if not session_ids:
            return None
        client = client_key(request)
        return any(self.sessions.valid(session_id, client) for session_id in session_ids)

    def check(self, request: Any, mutation: bool = False) -> Denied | None:
        """None when the request may proceed, else why not."""
        bearer = self._bearer(request)
        if bearer is not None:
            client = client_key(request)
            wait = self.limiter.retry_after(client)
            if wait is not None:
                return too_many_failures(wait)
            if bearer is False:
                self.limiter.failed(client)
        cookie = self._cookie(request)
        authenticated = bearer is True or cookie is True
        if not authenticated:
            if bearer is False:
                return Denied(403, "invalid admin token")
            if not self.is_local(request):
                if self.token is None:
                    return Denied(403, "the admin interface answers local clients only "
                                       "(set admin.token in the config to allow others)")
                if cookie is False:
                    return Denied(401, "the session has ended (expired, logged out, or "
                                       "the token changed): log in again at /admin/login")
                return Denied(401, "authentication required: send "
                                   "'Authorization: Bearer <admin.token>' or log in at /admin/login")
            if not _host_is_literal(request.getHeader(b"host")):
                return Denied(403, "unexpected Host header for tokenless local access "
                                   "(use 127.0.0.1 or localhost, or set admin.token)")
        if mutation and bearer is not True:
            return self._cross_site(request)
        if not mutation and bearer is not True:
            return self._foreign_load(request)
        return None

    def _cross_site(self, request: Any) -> Denied | None:
        if not request.getHeader(CSRF_HEADER):
            return Denied(403, "missing X-CGIPool-CSRF header: changes need it "
                               "(or an Authorization: Bearer token)")
        return self.same_origin(request)

    def same_origin(self, request: Any) -> Denied | None:
        """Refuse a request the browser says comes from another origin (for the
        login and logout forms, which cannot send the CSRF header)."""
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

    def _foreign_load(self, request: Any) -> Denied | None:
        """Fetch Metadata's resource isolation: another origin's page may link to
        the admin (a navigation) but not load or read it as a subresource."""
        site = request.getHeader(b"sec-fetch-site")
        if site is None or site in (b"same-origin", b"none"):
            return None
        if request.getHeader(b"sec-fetch-mode") == b"navigate" and request.method in (
                b"GET", b"HEAD") and request.getHeader(b"sec-fetch-dest") in (
                b"document", None):
            return None
        return Denied(403, "cross-origin request refused (the admin is loaded by its "
                           "own pages only)")

    def login(self, request: Any, candidate: str) -> tuple[str | None, Denied | None]:
        """A login attempt: the new session id, or why there is none."""
        client = client_key(request)
        wait = self.limiter.retry_after(client)
        if wait is not None:
            return None, too_many_failures(wait)
        if not self.token_matches(candidate):
            self.limiter.failed(client)
            wait = self.limiter.retry_after(client)
            if wait is not None:
                return None, too_many_failures(wait)
            return None, Denied(403, "wrong token")
        self.limiter.succeeded(client)
        return self.sessions.create(client), None

    def in_session(self, request: Any) -> bool:
        """The request came with a live session (the pages then offer a logout)."""
        return any(i in self.sessions.sessions for i in self.session_ids(request))

    def logout(self, request: Any) -> bool:
        """End the request's sessions (if it has any)."""
        return any([self.sessions.revoke(i) for i in self.session_ids(request)])

    def token_matches(self, candidate: str) -> bool:
        return self.token is not None and hmac.compare_digest(
            candidate.encode(), self.token.encode())
