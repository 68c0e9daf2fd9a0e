"""A lean HTTP/1.1 client for the tools, on the proxy's own upstream connections.

The tools talk to one daemon at one address, so they reuse
:class:`cgipool.proxy.upstream.WorkerConnections`: keep-alive connections, a
request is one write of prebuilt bytes and the response is parsed in place.
:class:`HttpClient` wraps it in a Deferred-per-request API for the one-off
requests of ``status``, ``smoke-test`` and ``wait-ready``; the load generator
drives ``WorkerConnections`` directly.
"""

from __future__ import annotations

import ipaddress
import json
import os
import time
import urllib.parse
from typing import Any

import attrs
from twisted.internet.defer import Deferred, ensureDeferred
from twisted.internet.task import deferLater

from cgipool.proxy.upstream import (
    BAD_RESPONSE,
    CONNECT_FAILED,
    NO_RESPONSE,
    REFUSED as UPSTREAM_REFUSED,
    TRUNCATED,
    WorkerConnections,
)

DEFAULT_URL = "http://127.0.0.1:8080"
STATUS_PATH = "/admin/api/status"
#: The environment variable the tools read the admin token from (not an option:
#: a command line is visible to every user in ``ps``).
TOKEN_VARIABLE = "CGIPOOL_ADMIN_TOKEN"
#: The daemon's own paths, the only ones the token is sent to.
ADMIN_PATHS = ("/admin", "/metrics")
START_HINT = "start it with `make start-bg`"

#: Error kinds as the tools report them.
REFUSED = "connection refused"
CLOSED = "connection reset/closed"
TIMEOUT = "timeout"
BAD = "bad response"
CONNECT = "connect failed"
BAD_BODY = "bad body"


class UsageError(Exception):
    """A bad command-line value; the message says which and why."""


class RequestError(Exception):
    """A request that got no complete HTTP response."""

    def __init__(self, kind: str, detail: str = "") -> None:
        super().__init__(kind, detail)
        self.kind = kind
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail})" if self.detail and self.detail != self.kind \
            else self.kind


class NotRunning(Exception):
    """Nothing listens at the URL."""

    def __init__(self, url: str, detail: str = REFUSED) -> None:
        super().__init__(url, detail)
        self.url = url
        self.detail = detail

    def __str__(self) -> str:
        return f"cgipool is not running at {self.url}: {self.detail} — {START_HINT}"


class StatusError(Exception):
    """Something answered at the URL, but not a cgipool status document."""


def classify(kind: str, detail: str) -> str:
    """Map an upstream failure kind (and its text) to a tool error kind."""
    if kind == UPSTREAM_REFUSED:
        return REFUSED
    if kind == CONNECT_FAILED:
        text = detail.lower()
        if "refused" in text:
            return REFUSED
        if "timeout" in text or "timed out" in text:
            return TIMEOUT
        return CONNECT
    if kind in (NO_RESPONSE, TRUNCATED):
        return CLOSED
    if kind == BAD_RESPONSE:
        return BAD
    return kind


# -- targets ---------------------------------------------------------------------


@attrs.frozen
class Target:
    """Where the daemon is: the address to connect to and how to name it."""

    url: str
    #: The address to connect to (``localhost`` is connected as 127.0.0.1).
    host: str
    port: int
    #: The ``Host`` header.
    authority: str
    #: A path prefix from the URL ('' or '/something').
    prefix: str = ""
    #: The admin token (``$CGIPOOL_ADMIN_TOKEN``), sent to /admin and /metrics only:
    #: never to a worker service.
    token: str | None = attrs.field(default=None, repr=False)

    @property
    def is_loopback(self) -> bool:
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def request(self, path: str, method: str = "GET") -> bytes:
        """The complete bytes of a bodyless request for ``path``.

        A POST carries the admin API's CSRF header (a command-line tool is no
        cross-site page) and an empty body.
        """
        check_path(path)
        extra = "X-CGIPool-CSRF: 1\r\nContent-Length: 0\r\n" if method == "POST" else ""
        admin = _is_admin_path(path)
        if self.token and admin:
            extra += f"Authorization: Bearer {self.token}\r\n"
        # A service may negotiate (HTML for a browser, JSON for an API client):
        # the tools ask for what a plain client gets; an example says what that is.
        accept = "application/json" if admin else "*/*"
        return (f"{method} {self.prefix}{path} HTTP/1.1\r\n"
                f"Host: {self.authority}\r\n"
                f"User-Agent: cgipool-tools\r\n"
                f"{extra}"
                f"Accept: {accept}\r\n\r\n").encode("ascii")


def _is_admin_path(path: str) -> bool:
    base = path.split("?", 1)[0]
    return any(base == p or base.startswith(p + "/") for p in ADMIN_PATHS)


def url_from_config(path: str) -> str | None:
    """The proxy's URL from a pool configuration: its first TCP listener (a
    wildcard address read as loopback), or None when the file cannot be read or
    listens on no TCP address.  So the tools follow an edited ``listen``
    without being told its port."""
    from cgipool.config import ConfigError, listen_address, load

    try:
        config = load(path, check_executables=False)
    except (ConfigError, OSError):
        return None
    for listen in config.listen:
        try:
            address = listen_address(listen)
        except ValueError:
            continue
        if address is None:
            continue
        host = address.host
        if host in ("", "0.0.0.0", "::"):  # every address: loopback of its family
            host = "::1" if address.family == 6 else "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{address.port}"
    return None


def resolve_url(url: str | None, config: str | None) -> str:
    """``--url`` if given, else the proxy's URL from ``--config`` (when that file
    is there and valid), else DEFAULT_URL."""
    if url is not None:
        return url
    if config is not None and os.path.exists(config):
        found = url_from_config(config)
        if found is not None:
            return found
    return DEFAULT_URL


def parse_url(url: str) -> Target:
    """Parse ``--url``: ``http://HOST[:PORT][/prefix]``."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as e:
        raise UsageError(f"bad --url {url!r}: {e}") from None
    if parts.scheme != "http":
        raise UsageError(f"bad --url {url!r}: expected http://HOST:PORT")
    host = parts.hostname
    if not host or parts.username is not None or parts.password is not None:
        raise UsageError(f"bad --url {url!r}: expected http://HOST:PORT")
    if parts.query or parts.fragment:
        raise UsageError(f"bad --url {url!r}: no query or fragment allowed")
    if not all(33 <= ord(c) < 127 for c in parts.path):
        raise UsageError(f"bad --url {url!r}: the path must be plain ASCII")
    if port is None:
        port = 80
    if port == 0:
        raise UsageError(f"bad --url {url!r}: port 0")
    connect = "127.0.0.1" if host.lower() == "localhost" else host
    shown = f"[{host}]" if ":" in host else host
    authority = shown if port == 80 else f"{shown}:{port}"
    prefix = parts.path.rstrip("/")
    token = os.environ.get(TOKEN_VARIABLE) or None
    if token is not None and not all(33 <= ord(c) < 127 for c in token):
        raise UsageError(f"bad ${TOKEN_VARIABLE}: printable ASCII without spaces expected")
    return Target(f"http://{authority}{prefix}", connect, port, authority, prefix, token)


def require_loopback(target: Target) -> None:
    """Load tools target 127.0.0.1 only (the workplace rule)."""
    if not target.is_loopback:
        raise UsageError(
            f"refusing to load-test {target.authority}: load tools may only target "
            f"loopback addresses (127.0.0.1, ::1 or localhost), "
            f"e.g. --url http://127.0.0.1:8080")


def check_path(path: str) -> str:
    """A request path: starts with '/', printable ASCII, no spaces."""
    if not path.startswith("/"):
        raise UsageError(f"bad path {path!r}: must start with '/'")
    if len(path) > 4096:
        raise UsageError(f"bad path {path[:40]!r}...: longer than 4096 characters")
    if not all(33 <= ord(c) < 127 for c in path):
        raise UsageError(f"bad path {path!r}: use printable ASCII without spaces "
                         f"(percent-encode the rest)")
    return path


# -- one-off requests ------------------------------------------------------------


@attrs.frozen
class Response:
    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: Seconds from sending to the end of the response.
    elapsed: float

    def header(self, name: bytes) -> bytes | None:
        name = name.lower()
        for key, value in self.headers:
            if key.lower() == name:
                return value
        return None

    def json(self) -> Any:
        """The body as JSON; raises ValueError when it is not."""
        return json.loads(self.body)


class _OneShot:
    """An exchange (see :mod:`cgipool.proxy.upstream`) that fires a Deferred."""

    __slots__ = ("client", "deferred", "connection", "connecting", "status", "reason",
                 "headers", "chunks", "started", "timer", "done")

    def __init__(self, client: HttpClient, timeout: float) -> None:
        self.client = client
        self.deferred: Deferred[Response] = Deferred(lambda _: self.cancel())
        self.connection: Any = None
        self.connecting: Any = None
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.started = time.perf_counter()
        self.timer = client.reactor.callLater(timeout, self.time_out, timeout)
        self.done = False

    def response_started(self, status: int, reason: bytes,
                         headers: list[tuple[bytes, bytes]]) -> None:
        self.status, self.reason, self.headers = status, reason, headers

    def response_data(self, data: bytes) -> None:
        self.chunks.append(data)

    def response_finished(self) -> None:
        if self._end():
            self.deferred.callback(Response(
                self.status, self.reason, self.headers, b"".join(self.chunks),
                time.perf_counter() - self.started))

    def upstream_failed(self, kind: str, detail: str) -> None:
        if self._end():
            self.deferred.errback(RequestError(classify(kind, detail), detail))

    def time_out(self, timeout: float) -> None:
        self.timer = None
        self._abort()
        if self._end():
            self.deferred.errback(RequestError(TIMEOUT, f"no response within {timeout:g} s"))

    def cancel(self) -> None:
        self._abort()
        self._end()

    def _abort(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.connection is not None:
            self.connection.abort()
            self.connection = None

    def _end(self) -> bool:
        if self.done:
            return False
        self.done = True
        self.client.pending.discard(self)
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None
        return True


class HttpClient:
    """GET requests to one daemon over keep-alive connections.

    The daemon's own pages (``/admin…``, ``/metrics``) are on the admin's
    listener: asked for at the proxy's URL, the daemon answers with a redirect
    there, which the client follows once and then remembers, so every tool
    finds the admin from the proxy's URL alone (and works when given the
    admin's URL, or with ``admin.listen: same``).
    """

    def __init__(self, reactor: Any, target: Target, timeout: float = 5.0) -> None:
        self.reactor = reactor
        self.target = target
        self.timeout = timeout
        self.connections = self._connections(target)
        #: The admin's listener once a redirect named it (else the target's).
        self.admin: Target | None = None
        self.admin_connections: WorkerConnections | None = None
        self.pending: set[_OneShot] = set()

    def _connections(self, target: Target) -> WorkerConnections:
        return WorkerConnections(self.reactor, target.host, target.port,
                                 max_idle=8, connect_timeout=self.timeout)

    def get(self, path: str, timeout: float | None = None,
            method: str = "GET") -> Deferred[Response]:
        """GET (or ``method``) ``path``; fails with :class:`RequestError`."""
        if _is_admin_path(path):
            return ensureDeferred(self._admin_get(path, timeout, method))
        return self._send(self.target, self.connections, path, timeout, method)

    def _send(self, target: Target, connections: WorkerConnections, path: str,
              timeout: float | None, method: str) -> Deferred[Response]:
        data = target.request(path, method)
        exchange = _OneShot(self, self.timeout if timeout is None else timeout)
        self.pending.add(exchange)
        connections.send(exchange, data)
        return exchange.deferred

    async def _admin_get(self, path: str, timeout: float | None, method: str) -> Response:
        if self.admin is not None and self.admin_connections is not None:
            return await self._send(self.admin, self.admin_connections, path, timeout, method)
        response = await self._send(self.target, self.connections, path, timeout, method)
        admin = admin_target(response, self.target)
        if admin is None:
            return response
        self.admin, self.admin_connections = admin, self._connections(admin)
        return await self._send(admin, self.admin_connections, path, timeout, method)

    @property
    def admin_url(self) -> str:
        """Where the admin is (the target's URL until a redirect said otherwise)."""
        return (self.admin or self.target).url

    async def close(self) -> None:
        """Close every connection and wait until they are gone."""
        for exchange in list(self.pending):
            exchange.cancel()
        await close_connections(self.reactor, self.connections)
        if self.admin_connections is not None:
            await close_connections(self.reactor, self.admin_connections)


def admin_target(response: Response, target: Target) -> Target | None:
    """The admin listener a daemon's redirect names (a 307 from ``/admin…`` to
    another ``http://`` origin on the same kind of address), or None."""
    if response.status not in (301, 302, 303, 307, 308):
        return None
    location = (response.header(b"location") or b"").decode("latin-1")
    try:
        parts = urllib.parse.urlsplit(location)
    except ValueError:
        return None
    if parts.scheme != "http" or not parts.netloc:
        return None
    try:
        admin = parse_url(f"http://{parts.netloc}")
    except UsageError:
        return None
    if (admin.host, admin.port) == (target.host, target.port):
        return None
    return attrs.evolve(admin, token=target.token)


async def close_connections(reactor: Any, connections: WorkerConnections,
                            grace: float = 2.0) -> None:
    """Close idle connections, abort busy ones, and wait until every one is lost."""
    connections.close()
    for conn in list(connections.active):
        if conn.exchange is not None:
            conn.abort()
    deadline = reactor.seconds() + grace
    aborted = False
    while connections.active or connections.connecting:
        if reactor.seconds() > deadline:
            if aborted:
                break  # nothing more to do; the reactor reaps them eventually
            connections.abort_all()
            aborted = True
            deadline = reactor.seconds() + grace
        await sleep(reactor, 0.005)


def sleep(reactor: Any, seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def fetch_status(client: HttpClient, timeout: float | None = None) -> dict[str, Any]:
    """The daemon's status document.

    :raises NotRunning: nothing listens at the URL.
    :raises StatusError: something else went wrong (with a one-line message).
    """
    url = client.target.url
    try:
        response = await client.get(STATUS_PATH, timeout)
    except RequestError as e:
        if e.kind == REFUSED:
            raise NotRunning(url) from None
        raise StatusError(f"no status from cgipool at {url}: {e}") from None
    admin = getattr(client, "admin_url", url)
    if response.status != 200:
        hint = ""
        if response.status in (401, 403):
            hint = (f" (set ${TOKEN_VARIABLE} to the admin token)"
                    if not client.target.token else f" (is ${TOKEN_VARIABLE} right?)")
        raise StatusError(f"GET {admin}{STATUS_PATH} answered {response.status}: "
                          f"{excerpt(response.body)}{hint}")
    try:
        status = response.json()
    except ValueError:
        raise StatusError(f"GET {admin}{STATUS_PATH} did not answer JSON: "
                          f"{excerpt(response.body)}") from None
    if not isinstance(status, dict) or not isinstance(status.get("services"), list):
        raise StatusError(f"GET {admin}{STATUS_PATH} is not a cgipool status document: "
                          f"{excerpt(response.body)}")
    return status


# -- printing untrusted text -----------------------------------------------------


def clean(value: Any, width: int | None = None) -> str:
    """``value`` as one line of printable text: control characters escaped,
    at most ``width`` characters (an ellipsis marks the cut)."""
    text = "-" if value is None else str(value)
    if not text.isprintable():
        text = "".join(c if c.isprintable() else _escape(c) for c in text)
    if width is not None and len(text) > width:
        text = text[:max(width - 1, 0)] + "…"
    return text


def _escape(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def excerpt(body: bytes, width: int = 120) -> str:
    """The start of a response body, for one line of output."""
    if not body:
        return "(empty body)"
    return clean(body[:width * 4].decode("utf-8", "replace").strip(), width)
