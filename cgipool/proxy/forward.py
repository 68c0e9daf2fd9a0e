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
from collections.abc import Iterable, Set as AbstractSet
from typing import Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import version as SERVER_VERSION
from zope.interface import implementer

from cgipool.credentials import CREDENTIAL_HEADERS, AdminCredentials, sets_admin_cookie
from cgipool.logtext import printable
from cgipool.proxy.balance import LeastOutstanding
from cgipool.proxy.deadlines import Deadlines
from cgipool.proxy.edge import CLIENT_TIMEOUT
from cgipool.proxy.errors import set_error
from cgipool.proxy.exchange import Exchange
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


def build_request(exchange: Exchange, target: bytes,
                  credentials: AdminCredentials | None = None) -> bytes | StreamedRequest:
    """What is sent to a worker for ``exchange``, with ``target`` as the path:
    the bytes, or the head and the spooled body of a large one."""
    method = exchange.method
    parts, host = request_head(method, target, exchange.headers,
                               exchange.connection_listed(), credentials)
    parts.append(forwarded_block(exchange, host))
    size = exchange.body_size
    if size or method in BODY_METHODS:
        parts += (b"Content-Length: ", b"%d" % size, b"\r\n")
    parts.append(b"\r\n")
    if size > INLINE_BODY:
        return StreamedRequest(b"".join(parts), exchange.rewound_body(), size)
    if size:
        parts.append(exchange.rewound_body().read())  # type: ignore[union-attr]
    return b"".join(parts)


def request_head(method: bytes, target: bytes, pairs: Iterable[tuple[bytes, bytes]],
                 also_drop: AbstractSet[bytes] | None = None,
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


def _exchange_of(request: Any) -> Exchange:
    """The exchange behind ``request``: itself, or a twisted.web request's
    (rendered through cgipool.proxy.webbridge)."""
    if isinstance(request, Exchange):
        return request
    return request.channel.exchange  # type: ignore[no-any-return]


def forwarded_block(request: Any, host: bytes) -> bytes:
    """The X-Forwarded-For/-Proto/-Host lines a worker (or a CGI script) gets
    for ``request`` (an exchange, or a twisted.web request for one) whose Host
    is ``host``: the client's own for a direct client, the chain extended for
    a trusted proxy."""
    exchange = _exchange_of(request)
    forwarded = client_forwarded(exchange.conn)
    if forwarded is None:
        # A trusted proxy in front: keep its chain and append its address.
        return _forwarded_by_proxy(exchange, getattr(exchange.conn.peer, "host", "unknown"),
                                   host)
    return forwarded + b"X-Forwarded-Host: %s\r\n" % host if host else forwarded


def client_forwarded(conn: Any) -> bytes | None:
    """The X-Forwarded-For/-Proto lines for the client of an edge connection,
    made once per connection; None when the client is a trusted proxy (its own
    X-Forwarded-* are then kept and extended)."""
    forwarded = conn.forwarded
    if forwarded is not None:
        return forwarded  # type: ignore[no-any-return]
    ip = getattr(conn.peer, "host", "unknown")
    if _trusted(conn.site, ip):
        return None
    forwarded = conn.forwarded = _forwarded_lines(ip, conn.secure)
    return forwarded  # type: ignore[no-any-return]


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
    return size  # type: ignore[no-any-return]


def _trusted(site: Any, ip: str) -> bool:
    networks = getattr(site, "trusted_proxies", ())
    if not networks:
        return False
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(address in net for net in networks)


def _forwarded_by_proxy(exchange: Exchange, ip: str, host: bytes) -> bytes:
    """X-Forwarded-* for a request relayed by a trusted proxy: its chain plus its
    own address; its proto and host when it sent them."""
    chain = b", ".join(exchange.header_values(b"x-forwarded-for"))
    chain = chain + b", " + ip.encode() if chain else ip.encode()
    proto = (exchange.header_values(b"x-forwarded-proto") or
             [b"https" if exchange.isSecure() else b"http"])[-1]
    forwarded_host = (exchange.header_values(b"x-forwarded-host") or [host])[-1]
    out = b"X-Forwarded-For: %s\r\nX-Forwarded-Proto: %s\r\n" % (chain, proto)
    if forwarded_host:
        out += b"X-Forwarded-Host: %s\r\n" % forwarded_host
    return out


def response_headers(headers: list[tuple[bytes, bytes]],
                     date: bytes) -> tuple[list[tuple[bytes, bytes]], int | None]:
    """The client's response headers from a worker's (``parse_head`` accepted
    only token names and values without CR, LF or NUL, and removed hop-by-hop
    ones): ours (``Server``, ``Date``) unless the worker sent its own, and the
    Content-Length.  A ``Set-Cookie`` of the admin's session cookie is dropped."""
    length = None
    server = dated = False
    out: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            if length is not None:
                continue
            length = int(value)
        elif lname == b"server":
            server = True
        elif lname == b"date":
            dated = True
        elif lname == b"set-cookie" and sets_admin_cookie(value):
            continue  # a service may not set (toss) the admin's session cookie
        out.append((name, value))
    if not dated:
        out.insert(0, (b"Date", date))
    if not server:
        out.insert(0, (b"Server", SERVER_VERSION))
    return out, length


class ServiceProxy(Resource):
    """What answers the requests of one route: forwards each to its pool.

    A twisted.web ``Resource`` only so that routing (``Root``) holds it with
    the other routes; requests come through :meth:`handle` (the pipeline's
    dispatch stage), never through twisted.web's rendering.
    """

    isLeaf = True

    def __init__(self, pool: ServicePool, reactor: Any, metrics: Any = None,
                 credentials: AdminCredentials | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.reactor = reactor
        #: The admin's credentials, removed from what workers see (shared, live).
        self.credentials = credentials
        #: a cgipool.metrics.ServiceMetrics (or None): the pipeline's count stage
        #: records each request of this route in it.
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

    def handle(self, client: Exchange) -> None:
        """Forward ``client``'s request: to a free worker now, or after a wait
        in the queue; 503 at once when nothing will be ready soon."""
        pool = self.pool
        if not pool.ready and not pool.accepting:
            # Nothing will be ready soon (crash loop, stopped): fail fast.
            why = pool.why_not_ready() if hasattr(pool, "why_not_ready") else None
            client.error(503, f"no ready worker for service {pool.name!r}"
                              + (f" ({why})" if why else ""),
                         retry_after=1, service=pool.name, state=pool.state)
            return
        data = build_request(client, client.upstream_target, self.credentials)
        exchange = ProxyExchange(self, client, data)
        # Sent first (a worker's answer or failure comes in a later reactor
        # turn), then the bookkeeping: it overlaps with the worker's work.
        exchange.attempt()
        exchange.watch()

    def render(self, request: Any) -> bytes:
        # Only reached when a twisted.web request is rendered on this resource
        # outside the edge (never in the daemon).
        return set_error(request, 500, "a service route is answered by the edge pipeline")

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

    def stop(self) -> None:
        """Daemon stop: abandon requests in flight and waiting."""
        for exchange in list(self.exchanges):
            exchange.abandon()
        self.queue.clear()


@implementer(IPushProducer)
class ProxyExchange:
    """One client request on its way to a worker, through one or more attempts.

    A response streamed to the client (no length, or over STREAM_THRESHOLD)
    registers the exchange as the producer of the client's answer: it holds
    the worker's connection while the client's buffer is full, and tells the
    two timeouts apart (see :meth:`pauseProducing`).
    """

    __slots__ = ("proxy", "client", "data", "worker", "connection", "connecting",
                 "tried", "unreached", "started", "done", "streaming", "timer", "began",
                 "chunks", "seen", "progress_at", "wait_timer", "is_head", "paused_at")

    def __init__(self, proxy: ServiceProxy, client: Exchange,
                 data: bytes | StreamedRequest) -> None:
        self.proxy = proxy
        #: The client's exchange (the edge's): what is answered.
        self.client = client
        self.data = data
        self.is_head = client.method == b"HEAD"
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
        self.began: float = proxy.reactor.seconds()
        self.wait_timer: IDelayedCall | None = None
        client.handler = self
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
        self._end()
        pool = self.proxy.pool
        self.client.error(503, message, retry_after=1, service=pool.name, state=pool.state)

    # -- from the upstream connection -----------------------------------------------

    def response_started(self, status: int, reason: bytes,
                         headers: list[tuple[bytes, bytes]]) -> None:
        self.started = True
        # request_timeout bounds the wait for the head; after it, only a body
        # that stops moving for that long is cut (downloads may take longer):
        # see deadline_passed.
        self.progress_at = self.proxy.reactor.seconds()
        client = self.client
        out, length = response_headers(headers, client.conn.site.date())
        client.respond(status, reason or None, out, length)
        if (length is None or length > STREAM_THRESHOLD) and not self.is_head:
            client.register_producer(self)  # see pauseProducing
            self.streaming = True

    def response_data(self, data: bytes) -> None:
        self.chunks += 1
        self.client.write(data)

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

    # -- the client's pace: IPushProducer for the client's answer -----------------

    def client_limit(self) -> float:
        """client_timeout of the edge site the request came through."""
        return float(getattr(self.client.conn.site, "client_timeout", CLIENT_TIMEOUT))

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
        client = self.client
        pool = self.proxy.pool
        self._abort_upstream()
        self._end()
        log.warn("{service}: client {client} too slow: took nothing of the response to "
                 "{method} {uri} for {seconds:.1f}s (client_timeout); connection closed",
                 service=pool.name, client=getattr(client.conn.peer, "host", "?"),
                 method=printable(client.method), uri=printable(client.uri, 200),
                 seconds=waited)
        client.code = 499
        client.cut(abort=True)

    def response_finished(self) -> None:
        self._release(True)  # served
        self._end()
        self.client.finish()

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
        client = self.client
        retryable = unreached or (kind == NO_RESPONSE and client.method in IDEMPOTENT)
        tries = len(self.tried)
        if not self.started and retryable and tries - self.unreached < MAX_ATTEMPTS \
                and tries < MAX_TRIES:
            self.attempt()
            return
        self._end()
        where = worker.name if worker is not None else pool.name
        log.warn("{service}: {kind} from worker {worker} for {method} {uri}: {detail}",
                 service=pool.name, kind=kind, worker=where, method=printable(client.method),
                 uri=printable(client.uri, 200), detail=printable(detail))
        if self.started:
            # Part of a response went out: the client must see it cut short.
            client.code = 502
            client.cut()
            return
        # The client learns what went wrong, not the worker's bytes (they are logged).
        if kind == BAD_RESPONSE:
            message = f"worker {where} sent an invalid response"
        elif kind in (CONNECT_FAILED, REFUSED):
            message = f"cannot connect to worker {where}: {detail}"
        else:
            message = f"worker {where} closed the connection without answering"
        client.error(502, message, service=pool.name)

    # -- from the edge and the clock -----------------------------------------------

    def timed_out(self) -> None:
        self.timer = None
        if self.done:
            return
        worker = self.worker
        self._abort_upstream()
        self._end()
        client = self.client
        if worker is not None:
            self.proxy.pool.request_timed_out(
                worker, f"{printable(client.method)} {printable(client.uri, 200)}")
        if self.started:
            client.code = 504
            client.cut()
            return
        client.error(
            504, f"worker {worker.name if worker else '?'} did not answer within "
                 f"request_timeout={self.proxy.timeout:g}s",
            service=self.proxy.pool.name,
        )

    def client_gone(self) -> None:
        """The client disconnected: free the worker slot now."""
        if self.done:
            return
        self._abort_upstream()
        self._end()

    def abandon(self) -> None:
        if self.done:
            return
        self._abort_upstream()
        self._end()
        client = self.client
        if self.started:
            # Cut, not completed: the client must not take a partial body as whole.
            client.code = 503
            client.cut()
            return
        client.error(503, "the daemon is shutting down", retry_after=1)

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
            self.client.unregister_producer()
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

    def _end(self) -> None:
        """The exchange is over for the proxy (the client's answer is the edge's:
        logged and counted by the pipeline's end stages)."""
        self.done = True
        client = self.client
        if client.handler is self:
            client.handler = None
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
