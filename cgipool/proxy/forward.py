"""Forwarding one client request to a worker of its service and streaming back.

The request is serialised once (method, rewritten path, filtered headers,
X-Forwarded-*, body) and may be sent more than once: to another worker when
the chosen one refused the connection (nothing was sent), or, for idempotent
methods, when the connection died before any response byte came back (a worker
killed mid-request).  Once a response has started it is never retried.
"""

from __future__ import annotations

import ipaddress
from collections import deque
from collections.abc import Iterable
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.web.http import RESPONSES
from twisted.web.http_headers import Headers, _nameEncoder
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, version as SERVER_VERSION
from zope.interface import implementer

from cgipool.credentials import CREDENTIAL_HEADERS, AdminCredentials, sets_admin_cookie
from cgipool.logtext import printable
from cgipool.proxy.balance import LeastOutstanding
from cgipool.proxy.deadlines import Deadlines
from cgipool.proxy.edge import CLIENT_TIMEOUT, http_date, response_head
from cgipool.proxy.errors import finish_with_error, set_error
from cgipool.proxy.upstream import (
    BAD_RESPONSE,
    CONNECT_FAILED,
    HOP_BY_HOP,
    NO_RESPONSE,
    REFUSED,
    StreamedRequest,
    TRUNCATED,
)
from cgipool.supervisor.pool import ServicePool
from cgipool.supervisor.worker import Worker

#: Request headers never forwarded: hop-by-hop ones, framing (regenerated),
#: ``Expect`` (the edge already answered it) and the X-Forwarded-* we set.
DROP_REQUEST_HEADERS = HOP_BY_HOP | {
    b"content-length", b"expect", b"x-forwarded-for", b"x-forwarded-proto",
    b"x-forwarded-host", b"x-real-ip",
}
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})
BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})
#: A response larger than this (or of unknown length) is streamed with
#: backpressure: the worker connection pauses while the client is slow.
STREAM_THRESHOLD = 64 * 1024
#: A request body up to this size is sent in the same write as the head; a
#: larger one (twisted.web has spooled it to a temporary file) is streamed from
#: the file with backpressure, never read whole into memory.
INLINE_BODY = 64 * 1024
MAX_ATTEMPTS = 3
#: Attempts in all.  A refused connection reached no process (and takes that
#: worker out of rotation), so it does not use up MAX_ATTEMPTS: when every worker
#: was killed at once, the request waits (bounded by queue.timeout) for a
#: replacement instead of failing with 502.  This caps the refusals.
MAX_TRIES = 10

log = Logger(namespace="cgipool.proxy")


def build_request(request: Any, target: bytes,
                  credentials: AdminCredentials | None = None) -> bytes | StreamedRequest:
    """What is sent to a worker for ``request``, with ``target`` as the path:
    the bytes, or the head and the spooled body of a large one."""
    method = request.method
    headers = request.requestHeaders
    connection = headers.getRawHeaders(b"connection")
    drop = {t.strip().lower() for v in connection for t in v.split(b",")} \
        if connection else None
    parts, host = request_head(
        method, target,
        [(name, value) for name, values in headers.getAllRawHeaders() for value in values],
        drop, credentials)
    parts.append(forwarded_block(request, host))
    content = request.content
    size = body_size(request)
    if size or method in BODY_METHODS:
        parts += (b"Content-Length: ", b"%d" % size, b"\r\n")
    parts.append(b"\r\n")
    if size > INLINE_BODY:
        return StreamedRequest(b"".join(parts), content, size)
    if size:
        parts.append(content.read())
    return b"".join(parts)


def request_head(method: bytes, target: bytes, pairs: Iterable[tuple[bytes, bytes]],
                 also_drop: set[bytes] | None = None,
                 credentials: AdminCredentials | None = None) -> tuple[list[bytes], bytes]:
    """The request line and the client's headers a worker may see, as parts to
    join, and the client's Host (b"" if none: ``Host: localhost`` is added).

    ``pairs`` are (name, value) in the client's order; hop-by-hop headers,
    framing, X-Forwarded-* and names with ``_`` are dropped, and so are the
    lower-case names in ``also_drop`` (those the client's ``Connection`` lists)
    and the admin's ``credentials`` (its session cookie, its token).
    """
    parts = [method, b" ", target, b" HTTP/1.1\r\n"]
    drop = DROP_REQUEST_HEADERS if not also_drop else DROP_REQUEST_HEADERS | also_drop
    host = b""
    for name, value in pairs:
        lname = name.lower()
        if lname in drop or b"_" in name:
            continue
        if lname in CREDENTIAL_HEADERS and credentials is not None:
            allowed = credentials.allowed(lname, value)
            if allowed is None:
                continue
            value = allowed
        if lname == b"host":
            if host or not value:
                continue  # one Host upstream: the client's (head_problem checked it)
            host = value
        parts += (name, b": ", value, b"\r\n")
    if not host:
        parts.append(b"Host: localhost\r\n")
    return parts, host


def forwarded_block(request: Any, host: bytes) -> bytes:
    """The X-Forwarded-For/-Proto/-Host lines a worker (or a CGI script) gets
    for ``request`` whose Host is ``host``: the client's own for a direct client,
    the chain extended for a trusted proxy."""
    channel = getattr(request, "channel", None)
    forwarded = client_forwarded(channel) if channel is not None else None
    if forwarded is None:
        ip = getattr(request.getClientAddress(), "host", "unknown")
        if _trusted(channel, ip):
            # A trusted proxy in front: keep its chain and append its address.
            return _forwarded_by_proxy(request, ip, host)
        forwarded = _forwarded_lines(ip, request.isSecure())
    return forwarded + b"X-Forwarded-Host: %s\r\n" % host if host else forwarded


def client_forwarded(channel: Any) -> bytes | None:
    """The X-Forwarded-For/-Proto lines for the client of an edge channel, made
    once per connection; None when the client is a trusted proxy (its own
    X-Forwarded-* are then kept and extended: see build_request)."""
    forwarded = getattr(channel, "forwarded", None)
    if forwarded is not None or not hasattr(type(channel), "forwarded"):
        return forwarded  # (another channel: build_request asks the request)
    ip = getattr(channel.getPeer(), "host", "unknown")
    if _trusted(channel, ip):
        return None
    forwarded = channel.forwarded = _forwarded_lines(ip, channel.isSecure())
    return forwarded


def _forwarded_lines(ip: str, secure: bool) -> bytes:
    """X-Forwarded-For/-Proto for a direct client (not a trusted proxy)."""
    return b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (
        ip.encode(), b"https" if secure else b"http")


def body_size(request: Any) -> int:
    """The size of a request's (spooled) body, without reading it; rewound."""
    content = request.content
    if content is None:
        return 0
    content.seek(0, 2)
    size = content.tell()
    content.seek(0)
    return size


def _trusted(channel: Any, ip: str) -> bool:
    networks = getattr(getattr(channel, "site", None), "trusted_proxies", ())
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in networks)


def _forwarded_by_proxy(request: Any, ip: str, host: bytes) -> bytes:
    """X-Forwarded-* for a request relayed by a trusted proxy: its chain plus its
    own address; its proto and host when it sent them."""
    headers = request.requestHeaders
    chain = b", ".join(headers.getRawHeaders(b"x-forwarded-for", ()))
    chain = chain + b", " + ip.encode() if chain else ip.encode()
    proto = (headers.getRawHeaders(b"x-forwarded-proto") or
             [b"https" if request.isSecure() else b"http"])[-1]
    forwarded_host = (headers.getRawHeaders(b"x-forwarded-host") or [host])[-1]
    out = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (chain, proto)
    if forwarded_host:
        out += b"X-Forwarded-Host: %s\r\n" % forwarded_host
    return out


def merge_response_headers(raw: dict[bytes, list[bytes]],
                           headers: list[tuple[bytes, bytes]]) -> int | None:
    """Add a worker's response headers to ``raw`` (a Headers' name -> values
    dict: canonical names), theirs replacing Server, Date and Content-Length;
    returns the Content-Length.  What setRawHeaders/addRawHeader do, minus their
    re-checks: parse_head accepted only token names and values without CR, LF
    or NUL.  A ``Set-Cookie`` of the admin's session cookie is dropped."""
    length = None
    encode = _nameEncoder.encode
    for name, value in headers:
        lname = name.lower()
        key = encode(name)
        if lname == b"content-length":
            length = int(value)
            raw[key] = [value]
        elif lname == b"server" or lname == b"date":
            raw[key] = [value]
        elif lname == b"set-cookie" and sets_admin_cookie(value):
            continue  # a service may not set (toss) the admin's session cookie
        else:
            values = raw.get(key)
            if values is None:
                raw[key] = [value]
            else:
                values.append(value)
    return length


class ServiceProxy(Resource):
    """The resource behind one route: forwards every request to its pool."""

    isLeaf = True

    def __init__(self, pool: ServicePool, reactor: Any, metrics: Any = None,
                 credentials: AdminCredentials | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.reactor = reactor
        #: The admin's credentials, removed from what workers see (shared, live).
        self.credentials = credentials
        #: metrics: a cgipool.metrics.ServiceMetrics (or None): one record() per request.
        self.metrics = metrics
        self.balancer = LeastOutstanding()
        #: request_timeout of every exchange, on one timer.
        self.deadlines = Deadlines(reactor)
        self.exchanges: set[ProxyExchange] = set()
        #: Requests waiting for a free worker, oldest first (bounded by queue.max).
        self.queue: deque[ProxyExchange] = deque()
        self.configure(pool.config)
        pool.capacity_added = self.dispatch
        pool.waiting = self.queue  # what pool.queue_length (the autoscaler) counts

    def configure(self, config: Any) -> None:
        """Take the limits of a (re)loaded service configuration."""
        self.timeout = config.request_timeout
        #: Read by routing (Root.lookup) before the body is received.
        self.max_body = config.max_body
        self.concurrency = config.concurrency
        self.queue_max = config.queue.max
        self.queue_timeout = config.queue.timeout

    def render(self, request: Any) -> Any:
        if request.method == b"CONNECT":
            if self.metrics is not None:  # metrics
                self.metrics.record(405, 0.0)
            return set_error(request, 405, "CONNECT is not supported")
        pool = self.pool
        if not pool.ready and not pool.accepting:
            # Nothing will be ready soon (crash loop, stopped): fail fast.
            if self.metrics is not None:  # metrics
                self.metrics.record(503, 0.0)
            return self._unavailable(request)
        data = build_request(request, request.upstream_target, self.credentials)
        exchange = ProxyExchange(self, request, data)
        exchange.attempt()
        exchange.watch()
        return NOT_DONE_YET

    def lean(self, channel: Any, method: bytes, uri: bytes, target: bytes,
             headers: list[tuple[bytes, bytes]]) -> bool:
        """Take a plain GET or HEAD from the edge's one-pass parser
        (EdgeChannel._lean) when a worker has room now; False leaves it to
        the general path (queueing, errors, trusted proxies...)."""
        if self.queue:
            return False
        worker = self.free_worker()
        if worker is None:
            return False
        forwarded = client_forwarded(channel)
        if forwarded is None:
            return False
        parts, host = request_head(method, target, headers, None, self.credentials)
        parts.append(forwarded)
        if host:
            parts += (b"X-Forwarded-Host: ", host, b"\r\n")
        parts.append(b"\r\n")
        exchange = LeanExchange(self, channel, method, uri, headers, b"".join(parts))
        # Sent first (a worker's answer or failure comes in a later reactor
        # turn), then the bookkeeping: it overlaps with the worker's work.
        exchange.send_to(worker)
        channel.begin_lean(exchange)
        exchange.watch()
        return True

    def free_worker(self, exclude: list[Worker] | tuple[()] = ()) -> Worker | None:
        """The least busy ready worker below ``concurrency``, if any."""
        ready = self.pool.ready
        worker = self.balancer.pick(ready, exclude)
        if worker is None and exclude and ready:
            # Every ready worker was tried once: a fresh connection may still work.
            worker = self.balancer.pick(ready)
        if worker is None or worker.in_flight >= self.concurrency:
            return None
        return worker

    def dispatch(self) -> None:
        """Give waiting requests to workers that have room (a slot freed, a worker joined)."""
        queue = self.queue
        while queue:
            exchange = queue[0]
            worker = self.free_worker(exchange.tried)
            if worker is None:
                break
            queue.popleft()
            exchange.dequeued()
            exchange.send_to(worker)

    def _unavailable(self, request: Any) -> bytes:
        pool = self.pool
        why = pool.why_not_ready() if hasattr(pool, "why_not_ready") else None
        return set_error(
            request, 503, f"no ready worker for service {pool.name!r}"
                          + (f" ({why})" if why else ""),
            retry_after=1, service=pool.name, state=pool.state,
        )

    def stop(self) -> None:
        """Daemon stop: abandon requests in flight and waiting."""
        for exchange in list(self.exchanges):
            exchange.abandon()
        self.queue.clear()


@implementer(IPushProducer)
class ProxyExchange:
    """One client request on its way through one or more attempts.

    A streamed response registers the exchange as the client's producer: it
    holds the worker's connection while the client's buffer is full, and
    tells the two timeouts apart (see :meth:`pauseProducing`).
    """

    __slots__ = ("proxy", "request", "data", "worker", "connection", "connecting",
                 "tried", "unreached", "started", "done", "streaming", "timer", "began",
                 "chunks", "seen", "progress_at", "wait_timer", "is_head", "paused_at")

    def __init__(self, proxy: ServiceProxy, request: Any,
                 data: bytes | StreamedRequest) -> None:
        self.proxy = proxy
        #: The twisted.web request; None for a LeanExchange until it is promoted.
        self.request = request
        self.data = data
        self.is_head = request is not None and request.method == b"HEAD"
        self.worker: Worker | None = None
        self.connection: Any = None
        self.connecting: Any = None
        self.tried: list[Worker] = []
        #: Of those, the ones whose connection was refused or failed (no process saw it).
        self.unreached = 0
        self.started = False
        self.done = False
        self.streaming = False
        #: Body pieces received so far: the stall check looks for progress.
        self.chunks = 0
        self.began: float = proxy.reactor.seconds()  # metrics: request duration
        self.wait_timer: IDelayedCall | None = None
        if request is not None:
            request.exchange = self
        proxy.exchanges.add(self)
        #: The key of this exchange in proxy.deadlines (None: not watched).
        self.timer: int | None = None
        #: After the head: body pieces seen at the last check, and when.
        self.seen = 0
        self.progress_at = 0.0
        #: Since when the client's buffer has been full (None: it is reading).
        self.paused_at: float | None = None

    def watch(self) -> None:
        """Start request_timeout (counted from ``began``).  Called once the
        request is on its way: registering it is not on the latency path."""
        if not self.done and self.timer is None:
            self.timer = self.proxy.deadlines.add(self, self.began + self.proxy.timeout)

    def attempt(self) -> None:
        proxy = self.proxy
        # A retry goes first; a new request queues behind those already waiting.
        worker = proxy.free_worker(self.tried) if self.tried or not proxy.queue else None
        if worker is not None:
            self.send_to(worker)
            return
        pool = proxy.pool
        if not pool.ready and not pool.accepting:
            self._refuse(f"{'every worker failed' if self.tried else 'no ready worker'} "
                         f"for service {pool.name!r}")
            return
        if len(proxy.queue) >= proxy.queue_max:
            self._refuse(f"service {pool.name!r} is at capacity: {proxy.queue_max} requests "
                         "are already waiting for a worker")
            return
        # Every worker is busy (or none is ready yet): wait for one, bounded.
        if self.tried:
            proxy.queue.appendleft(self)
        else:
            proxy.queue.append(self)
        self.wait_timer = proxy.reactor.callLater(proxy.queue_timeout, self.wait_timed_out)

    def send_to(self, worker: Worker) -> None:
        self.worker = worker
        self.proxy.pool.acquire(worker)  # released once, in _release
        worker.connections.send(self, self.data, self.is_head)

    def dequeued(self) -> None:
        timer, self.wait_timer = self.wait_timer, None
        if timer is not None and timer.active():
            timer.cancel()

    def wait_timed_out(self) -> None:
        self.wait_timer = None
        proxy = self.proxy
        try:
            proxy.queue.remove(self)
        except ValueError:
            return
        self._refuse(f"no worker of service {proxy.pool.name!r} was free within "
                     f"queue.timeout={proxy.queue_timeout:g}s")

    def _refuse(self, message: str) -> None:
        self._end(503)
        pool = self.proxy.pool
        finish_with_error(self.request, 503, message, retry_after=1,
                          service=pool.name, state=pool.state)

    # -- from the upstream connection -----------------------------------------------

    def response_started(self, status: int, reason: bytes,
                         headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        # request_timeout bounds the wait for the head; after it, only a body
        # that stops moving for that long is cut (downloads may take longer):
        # see deadline_passed.
        self.progress_at = self.proxy.reactor.seconds()
        request = self.request
        request.setResponseCode(status, reason or None)
        response_headers = request.responseHeaders
        length = None
        raw = getattr(response_headers, "_rawHeaders", None)
        if type(response_headers) is Headers and type(raw) is dict:
            length = merge_response_headers(raw, headers)
        else:
            length = None
            for name, value in headers:
                lname = name.lower()
                if lname == b"content-length":
                    length = int(value)
                    response_headers.setRawHeaders(name, [value])
                elif lname == b"server" or lname == b"date":
                    response_headers.setRawHeaders(name, [value])
                else:
                    response_headers.addRawHeader(name, value)
        if (length is None or length > STREAM_THRESHOLD) and request.method != b"HEAD":
            request.registerProducer(self, True)  # see pauseProducing
            self.streaming = True

    def response_data(self, data: bytes) -> None:
        self.chunks += 1
        self.request.write(data)

    def deadline_passed(self, now: float) -> None:
        """From proxy.deadlines: no head within request_timeout → 504; after the
        head, cut only a body that made no progress for request_timeout while
        the client was reading, or a client that read nothing for client_timeout."""
        self.timer = None
        if self.done:
            return
        if not self.started:
            self.timed_out()
            return
        paused_at = self.paused_at
        if paused_at is not None:
            # Held back by the client, not the worker: the client's own timeout.
            limit = self.client_limit()
            if now - paused_at >= limit:
                self.client_too_slow(now - paused_at)
                return
            due = paused_at + limit
        elif self.chunks != self.seen:
            self.seen = self.chunks
            self.progress_at = now
            due = now + self.proxy.timeout
        elif now - self.progress_at >= self.proxy.timeout:
            self.timed_out()
            return
        else:
            due = self.progress_at + self.proxy.timeout
        self.timer = self.proxy.deadlines.add(self, due)

    # -- the client's pace: IPushProducer for the client's connection -------------

    def client_limit(self) -> float:
        """client_timeout of the edge site the request came through."""
        site = getattr(getattr(self.request, "channel", None), "site", None)
        return getattr(site, "client_timeout", CLIENT_TIMEOUT)

    def pauseProducing(self) -> None:
        """The client's send buffer is full: hold the worker's connection, and
        from now the client's client_timeout runs, not the worker's
        request_timeout (a slow reader must not get a worker recycled)."""
        connection = self.connection
        if connection is not None:
            connection.transport.pauseProducing()
        if self.paused_at is not None or self.done:
            return
        now = self.paused_at = self.proxy.reactor.seconds()
        due = now + self.client_limit()
        if self.timer is not None and due < self.progress_at + self.proxy.timeout:
            # The client's limit ends before the worker's next check: move it.
            self.proxy.deadlines.remove(self, self.timer)
            self.timer = self.proxy.deadlines.add(self, due)

    def resumeProducing(self) -> None:
        """The client took some: the worker's clock starts afresh (it was held)."""
        if self.paused_at is not None:
            self.paused_at = None
            self.progress_at = self.proxy.reactor.seconds()
            self.seen = self.chunks
        connection = self.connection
        if connection is not None:
            connection.transport.resumeProducing()

    def stopProducing(self) -> None:
        connection = self.connection
        if connection is not None:
            connection.transport.stopProducing()

    def client_too_slow(self, waited: float) -> None:
        """The client took nothing of its response for client_timeout: cut its
        connection (499 in the access log).  Not the worker's fault: its slot
        is freed and nothing is counted against it."""
        request = self.request
        pool = self.proxy.pool
        self._abort_upstream()
        self._end(499)
        client = getattr(request.getClientAddress(), "host", "?")
        log.warn("{service}: client {client} too slow: took nothing of the response to "
                 "{method} {uri} for {seconds:.1f}s (client_timeout); connection closed",
                 service=pool.name, client=client, method=printable(request.method),
                 uri=printable(request.uri, 200), seconds=waited)
        site = getattr(request.channel, "site", None)
        if site is not None and site.logPath:
            request.code = 499
            site.log(request)
        request.channel.transport.abortConnection()

    def response_finished(self) -> None:
        self._release(True)  # served
        self._end(self.request.code)
        request = self.request
        if not request._disconnected and not request.finished:
            request.finish()

    def upstream_failed(self, kind: str, detail: str) -> None:
        worker = self.worker
        connection = self.connection
        self._release()
        pool = self.proxy.pool
        if worker is not None:
            self.tried.append(worker)
            if kind == REFUSED:
                pool.connection_refused(worker)
            elif kind in (BAD_RESPONSE, TRUNCATED) or (
                    # A reused connection the worker closed as we sent: a race, not a fault.
                    kind == NO_RESPONSE and not (connection is not None and connection.reused)):
                pool.request_failed(worker, kind, detail)
        unreached = kind == CONNECT_FAILED or kind == REFUSED
        if unreached:
            self.unreached += 1
        retryable = unreached or (kind == NO_RESPONSE and self.request.method in IDEMPOTENT)
        tries = len(self.tried)
        if not self.started and retryable and tries - self.unreached < MAX_ATTEMPTS \
                and tries < MAX_TRIES:
            self.attempt()
            return
        self._end(502)
        where = worker.name if worker is not None else pool.name
        request = self.request
        log.warn("{service}: {kind} from worker {worker} for {method} {uri}: {detail}",
                 service=pool.name, kind=kind, worker=where, method=printable(request.method),
                 uri=printable(request.uri, 200), detail=printable(detail))
        if self.started:
            # Part of a response went out: the client must see it cut short.
            request.channel.loseConnection()
            return
        # The client learns what went wrong, not the worker's bytes (they are logged).
        if kind == BAD_RESPONSE:
            message = f"worker {where} sent an invalid response"
        elif kind in (CONNECT_FAILED, REFUSED):
            message = f"cannot connect to worker {where}: {detail}"
        else:
            message = f"worker {where} closed the connection without answering"
        finish_with_error(request, 502, message, service=pool.name)

    # -- from the edge and the clock -----------------------------------------------

    def timed_out(self) -> None:
        self.timer = None  # type: ignore[assignment]
        if self.done:
            return
        worker = self.worker
        self._abort_upstream()
        self._end(504)
        request = self.request
        if worker is not None:
            self.proxy.pool.request_timed_out(
                worker, f"{printable(request.method)} {printable(request.uri, 200)}")
        if self.started:
            self.request.channel.loseConnection()
            return
        finish_with_error(
            self.request, 504,
            f"worker {worker.name if worker else '?'} did not answer within "
            f"request_timeout={self.proxy.timeout:g}s",
            service=self.proxy.pool.name,
        )

    def client_gone(self) -> None:
        """The client disconnected: free the worker slot now."""
        if self.done:
            return
        self._abort_upstream()
        self._end(499)

    def abandon(self) -> None:
        if self.done:
            return
        self._abort_upstream()
        self._end(503)
        if self.started:
            # Cut, not completed: the client must not take a partial body as whole.
            self.request.channel.loseConnection()
            return
        finish_with_error(self.request, 503, "the daemon is shutting down", retry_after=1)

    # -- bookkeeping -----------------------------------------------------------------

    def _abort_upstream(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.connection is not None:
            self.connection.abort()
        self._release()

    def _release(self, served: bool = False) -> None:
        """This attempt is over: free the worker slot (once), through the pool
        (``served``: the worker answered in full; the pool counts it)."""
        if self.streaming:
            self.streaming = False
            request = self.request
            if not request._disconnected:
                request.unregisterProducer()
            connection = self.connection
            if connection is not None and not connection.disconnected:
                connection.transport.resumeProducing()
        self.connection = None
        worker = self.worker
        if worker is not None:
            self.worker = None
            proxy = self.proxy
            proxy.pool.release(worker, served)
            if proxy.queue:
                proxy.dispatch()  # the freed slot goes to a waiting request

    def _end(self, status: int) -> None:
        """The exchange is over; ``status`` is what the client got (499: it left first)."""
        metrics = self.proxy.metrics
        if metrics is not None and not self.done:  # metrics: once per request
            metrics.record(status, self.proxy.reactor.seconds() - self.began)
        self.done = True
        if self.request is not None:
            self.request.exchange = None
        proxy = self.proxy
        proxy.exchanges.discard(self)
        if self.wait_timer is not None:  # still waiting in the queue
            self.dequeued()
            try:
                proxy.queue.remove(self)
            except ValueError:
                pass
        if self.timer is not None:
            proxy.deadlines.remove(self, self.timer)
            self.timer = None


class LeanExchange(ProxyExchange):
    """A plain GET or HEAD forwarded without a twisted.web Request.

    Most requests a proxy sees are a bodiless GET that arrived in one read on
    a keep-alive connection and get a small answer of known length.  For those
    the edge's one-pass parser hands over the parsed head (ServiceProxy.lean);
    the worker's request is built from it, the client's response head from
    the worker's parsed one, and the request ends with the channel's own
    requestDone: no Request, Headers, rendering, Request.write or finish in
    between.  Balancing, request_timeout, passive health, recycling and
    metrics are ProxyExchange's own code.

    Anything else *promotes* the exchange (:meth:`_promote`): the edge makes the
    twisted.web request it stands for, and ProxyExchange goes on from where
    this one is: a failure (retry, 502), a timeout (504), a daemon stop (503),
    a response to stream (no Content-Length or a large one).  So each of
    those cases has one implementation, the general one.
    """

    __slots__ = ("channel", "method", "uri", "headers", "code", "head", "sentLength")

    #: For the access log's formatter, as twisted.web's Request.
    clientproto = b"HTTP/1.1"

    def __init__(self, proxy: ServiceProxy, channel: Any, method: bytes, uri: bytes,
                 headers: list[tuple[bytes, bytes]], data: bytes) -> None:
        super().__init__(proxy, None, data)
        self.channel = channel
        self.method = method
        self.uri = uri
        #: The client's parsed headers, for a promotion.
        self.headers = headers
        self.is_head = method == b"HEAD"
        #: The response status (metrics), and its head until the first body bytes.
        self.code = 0
        self.head: bytes | None = None
        #: Body bytes sent (the access log).
        self.sentLength = 0

    def _promote(self) -> None:
        """Go on as a ProxyExchange with a twisted.web request."""
        if self.request is None:
            request = self.channel.promote(self, self.method, self.uri, self.headers)
            request.exchange = self
            self.request = request

    # -- from the upstream connection -----------------------------------------------

    def response_started(self, status: int, reason: bytes,
                         headers: list[tuple[bytes, bytes]]) -> None:
        if self.request is not None:
            super().response_started(status, reason, headers)
            return
        raw = {b"Server": [SERVER_VERSION], b"Date": [http_date()]}
        length = merge_response_headers(raw, headers)
        if not (self.is_head or status == 204 or status == 304
                or (length is not None and length <= STREAM_THRESHOLD)):
            self._promote()  # streamed with backpressure, or chunked to the client
            super().response_started(status, reason, headers)
            return
        # What Request.write and EdgeChannel.writeHeaders would send.
        self.started = True
        self.progress_at = self.proxy.reactor.seconds()
        self.code = status
        self.head = b"".join(response_head(
            b"HTTP/1.1", b"%d" % status, reason or RESPONSES.get(status, b"Unknown Status"),
            raw.items()))

    def response_data(self, data: bytes) -> None:
        if self.request is not None:
            super().response_data(data)
            return
        self.chunks += 1
        self.sentLength += len(data)
        head = self.head
        if head is not None:
            self.head = None  # head and body in one send
            data = head + data
        self.channel.transport.write(data)

    def response_finished(self) -> None:
        if self.request is not None:
            super().response_finished()
            return
        head = self.head
        if head is not None:  # no body: HEAD, 204, 304, empty
            self.head = None
            self.channel.transport.write(head)
        self._release(True)  # served
        self._end(self.code)
        channel = self.channel
        site = channel.site
        if site.logPath:
            site.log(self)  # the access log, as Request.finish writes it
        channel.requestDone(self)

    def upstream_failed(self, kind: str, detail: str) -> None:
        self._promote()
        super().upstream_failed(kind, detail)

    # -- from the edge and the clock -----------------------------------------------

    def timed_out(self) -> None:
        if not self.done:
            self._promote()
        super().timed_out()

    def abandon(self) -> None:
        if not self.done:
            self._promote()
        super().abandon()

    def connectionLost(self, reason: Any) -> None:
        """From the channel (it holds this exchange as its request)."""
        unanswered = not self.done
        self.client_gone()
        site = self.channel.site
        if unanswered and self.request is None and site.logPath:
            self.code = 499  # the client left before its answer: logged as such
            site.log(self)

    # -- what the access log formatter reads (twisted.web's combinedLogFormatter) --

    def getClientAddress(self) -> Any:
        return self.channel.getPeer()

    def getHeader(self, name: bytes) -> bytes | None:
        """The last value of request header ``name``, as Request.getHeader."""
        wanted = name.lower()
        for key, value in reversed(self.headers):
            if key.lower() == wanted:
                return value
        return None
