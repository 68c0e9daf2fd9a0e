"""The proxy data path with scripted workers on real loopback sockets."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cgipool.config import QueueConfig, RestartConfig
from cgipool.proxy.edge import EdgeSite
from cgipool.proxy.forward import MAX_TRIES, ServiceProxy
from cgipool.proxy.routes import BadPath, Root, normalize_path
from cgipool.proxy.upstream import BadResponse, WorkerConnections, parse_head
from cgipool.supervisor.backoff import Backoff
from cgipool.supervisor.pool import ServicePool
from cgipool.supervisor.worker import Worker, WorkerState
from tests.fakes import service
from tests.support import wait_for

Handler = Callable[[bytes, bytes, "ScriptedConnection"], "bytes | None"]


def ok_json(**body: Any) -> bytes:
    data = json.dumps(body).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(data)) + data


class ScriptedConnection(Protocol):
    """Server side of one worker connection: parses requests, asks the handler."""

    def connectionMade(self) -> None:
        self.buf = b""
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.lower() == b"content-length":
                    length = int(value)
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4:end + 4 + length]
            self.buf = self.buf[end + 4 + length:]
            self.factory.requests.append((head, body))
            reply = self.factory.handler(head, body, self)
            if reply:
                self.transport.write(reply)


class ScriptedWorker(Factory):
    protocol = ScriptedConnection

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections: list[ScriptedConnection] = []
        self.requests: list[tuple[bytes, bytes]] = []


class StubPool:
    """Just what the proxy reads from a pool."""

    def __init__(self, workers: list[Worker], **config: Any) -> None:
        self.workers = workers
        self.ready = list(workers)
        self.config = service(**config)
        self.name = self.config.name
        self.state = "ok"
        self.refused: list[Worker] = []
        self.failed: list[tuple[Worker, str]] = []
        self.timed_out: list[tuple[Worker, str]] = []
        self.recycled: list[tuple[Worker, str]] = []
        self.waiting: Any = ()
        self.capacity_added: Any = None
        #: Whether requests may wait when no worker is ready (a worker is starting).
        self.accepting = False

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    def connection_refused(self, worker: Worker) -> None:
        self.refused.append(worker)
        if worker in self.ready:
            self.ready.remove(worker)

    def request_failed(self, worker: Worker, kind: str, detail: str) -> None:
        self.failed.append((worker, kind))

    def request_timed_out(self, worker: Worker, request: str) -> None:
        self.timed_out.append((worker, request))

    #: The real request accounting: the proxy changes no worker counter itself.
    acquire = ServicePool.acquire
    release = ServicePool.release

    def recycle(self, worker: Worker, reason: str) -> bool:
        self.recycled.append((worker, reason))
        worker.recycling = reason
        return True

    def add_ready(self, worker: Worker) -> None:
        """A worker joins the rotation (what the real pool does on a passed probe)."""
        self.ready.append(worker)
        if self.capacity_added is not None:
            self.capacity_added()


class ProxyTestCase(TestCase):
    async def start_worker(self, handler: Handler) -> tuple[ScriptedWorker, int]:
        factory = ScriptedWorker(handler)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)

        def drop() -> None:
            for conn in factory.connections:
                conn.transport.abortConnection()

        self.addCleanup(drop)
        return factory, port.getHost().port

    def worker_for(self, port: int, index: int = 0) -> Worker:
        worker = Worker("svc", index, Backoff(RestartConfig()), port=port,
                        state=WorkerState.READY, pid=1000 + index)
        worker.connections = WorkerConnections(reactor, "127.0.0.1", port)
        self.addCleanup(worker.connections.abort_all)
        return worker

    async def start_proxy(self, workers: list[Worker], proxy_reactor: Any = None,
                          site_reactor: Any = None, **config: Any) -> tuple[StubPool, int]:
        """An edge site on 127.0.0.1 routing /api/svc (and /api/svc/deeper) to
        ``workers``.  ``proxy_reactor`` (a Clock, say) runs the proxy's
        timeouts and queue, ``site_reactor`` the edge's own timers (idle, head,
        the abort after a close); both default to the real reactor."""
        self.pool = StubPool(workers, **config)
        deeper = ServiceProxy(self.pool, proxy_reactor or reactor)
        # Last: the pool's capacity hook is its.
        self.proxy = ServiceProxy(self.pool, proxy_reactor or reactor)
        root = Root({"/api/svc": self.proxy, "/api/svc/deeper": deeper})
        site = self.site = EdgeSite(root, reactor=site_reactor or reactor)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.addCleanup(self.proxy.stop)
        return self.pool, port.getHost().port

    async def raw(self, port: int, data: bytes, close_after: float | None = None,
                  close_when: Callable[[], Any] | None = None) -> bytes:
        """Send raw bytes to the proxy; collect everything until it closes.
        The client closes first ``close_after`` seconds after sending, or once
        ``close_when()`` is true (an event: the worker got the request, say)."""
        received = bytearray()
        done: defer.Deferred[None] = defer.Deferred()

        class Client(Protocol):
            def dataReceived(self, chunk: bytes) -> None:
                received.extend(chunk)

            def connectionLost(self, reason: Any) -> None:
                done.callback(None)

        proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Client())
        proto.transport.write(data)
        if close_when is not None:
            await wait_for(close_when, 10, what="the moment the client leaves")
            proto.transport.loseConnection()
        elif close_after is not None:
            reactor.callLater(close_after, proto.transport.loseConnection)
        else:
            timer = reactor.callLater(10, proto.transport.abortConnection)
            done.addBoth(lambda r: timer.cancel() if timer.active() else None)
        await done
        return bytes(received)


def split_response(raw: bytes) -> tuple[int, dict[bytes, list[bytes]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    return status, headers, body


def dechunk(body: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return out
        out += rest[:size]
        body = rest[size + 2:]


CLOSE = b"Connection: close\r\n"


class ForwardingTests(ProxyTestCase):
    async def test_prefix_stripped_query_and_method_kept(self) -> None:
        worker, wport = await self.start_worker(lambda h, b, c: ok_json(ok=True))
        _, port = await self.start_proxy([self.worker_for(wport)])
        for path, expected in [(b"/api/svc?q=x%20y", b"GET /?q=x%20y HTTP/1.1"),
                               (b"/api/svc", b"GET / HTTP/1.1"),
                               (b"/api/svc/a/b?c=1", b"GET /a/b?c=1 HTTP/1.1"),
                               (b"/api//svc/", b"GET / HTTP/1.1"),
                               (b"/api/%73vc/x", b"GET /x HTTP/1.1")]:
            raw = await self.raw(port, b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
            self.assertEqual(split_response(raw)[0], 200)
            self.assertEqual(worker.requests[-1][0].split(b"\r\n")[0], expected)

    async def test_longest_prefix_wins(self) -> None:
        """/api/svc/deeper/x goes to the /api/svc/deeper route (stripped to /x),
        not to /api/svc as /deeper/x: the longest matching route prefix wins."""
        worker, wport = await self.start_worker(lambda h, b, c: ok_json())
        _, port = await self.start_proxy([self.worker_for(wport)])
        await self.raw(port, b"GET /api/svc/deeper/x HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertEqual(worker.requests[-1][0].split(b"\r\n")[0], b"GET /x HTTP/1.1")

    async def test_headers_x_forwarded_and_hop_by_hop(self) -> None:
        worker, wport = await self.start_worker(lambda h, b, c: ok_json())
        _, port = await self.start_proxy([self.worker_for(wport)])
        await self.raw(port, (
            b"GET /api/svc HTTP/1.1\r\nHost: example.test:8080\r\n"
            b"X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Host: evil\r\nX-Real-IP: 6.6.6.6\r\n"
            b"Connection: close, X-Secret\r\nX-Secret: s\r\nKeep-Alive: 5\r\nTE: trailers\r\n"
            b"Upgrade: websocket\r\nProxy-Authorization: Basic eA==\r\nX_Alias: 1\r\n"
            b"Accept: application/json\r\nCookie: a=1\r\n\r\n"))
        head = worker.requests[-1][0].lower()
        lines = head.split(b"\r\n")
        self.assertIn(b"host: example.test:8080", lines)
        self.assertIn(b"x-forwarded-for: 127.0.0.1", lines)
        self.assertIn(b"x-forwarded-proto: http", lines)
        self.assertIn(b"x-forwarded-host: example.test:8080", lines)
        self.assertIn(b"accept: application/json", lines)
        self.assertIn(b"cookie: a=1", lines)
        for gone in (b"6.6.6.6", b"evil", b"x-secret", b"keep-alive", b"te:", b"upgrade",
                     b"proxy-authorization", b"x_alias", b"connection"):
            self.assertNotIn(gone, head)

    async def test_body_is_forwarded_with_regenerated_length(self) -> None:
        worker, wport = await self.start_worker(lambda h, b, c: ok_json(n=len(b)))
        _, port = await self.start_proxy([self.worker_for(wport)])
        raw = await self.raw(port, b"POST /api/svc HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                             + CLOSE + b"\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
        self.assertEqual(json.loads(split_response(raw)[2]), {"n": 11})
        head, body = worker.requests[-1]
        self.assertEqual(body, b"hello world")
        self.assertIn(b"Content-Length: 11", head)
        self.assertNotIn(b"chunked", head.lower())
        # An empty POST still says Content-Length: 0.
        await self.raw(port, b"POST /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertIn(b"Content-Length: 0", worker.requests[-1][0])

    async def test_keepalive_connections_are_reused(self) -> None:
        """Ten pipelined client requests are ten answers over one worker
        connection: the upstream connection is kept alive, not opened per request."""
        worker, wport = await self.start_worker(lambda h, b, c: ok_json())
        _, port = await self.start_proxy([self.worker_for(wport)])
        requests = b"".join(b"GET /api/svc?i=%d HTTP/1.1\r\nHost: h\r\n\r\n" % i for i in range(9))
        raw = await self.raw(port, requests + b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertEqual(raw.count(b"HTTP/1.1 200 OK"), 10)
        self.assertEqual(len(worker.requests), 10)
        self.assertEqual(len(worker.connections), 1)

    async def test_response_headers_filtered_and_chunked_body_rechunked(self) -> None:
        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes:
            return (b"HTTP/1.1 201 Made\r\nTransfer-Encoding: chunked\r\nConnection: X-Hop\r\n"
                    b"X-Hop: 1\r\nKeep-Alive: timeout=5\r\nX-App: yes\r\nSet-Cookie: a=1\r\n"
                    b"Set-Cookie: b=2\r\nServer: worker/1\r\n\r\n"
                    b"4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\nTrailer: x\r\n\r\n")

        worker, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        status, headers, body = split_response(
            await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n"))
        self.assertEqual(status, 201)
        self.assertEqual(headers[b"x-app"], [b"yes"])
        self.assertEqual(headers[b"set-cookie"], [b"a=1", b"b=2"])
        self.assertEqual(headers[b"server"], [b"worker/1"])
        self.assertNotIn(b"x-hop", headers)
        self.assertNotIn(b"keep-alive", headers)
        self.assertEqual(dechunk(body), b"abcdefg")

    async def test_eof_delimited_response(self) -> None:
        """A worker's HTTP/1.0 body with no length, ended by its close, reaches
        an HTTP/1.1 client whole, re-framed as chunks."""
        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            c.transport.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
            c.transport.loseConnection()

        worker, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        status, headers, body = split_response(
            await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n"))
        self.assertEqual((status, dechunk(body)), (200, b"until the end"))

    async def test_head_request_gets_headers_only(self) -> None:
        """A HEAD answer keeps the worker's Content-Length but has no body, so the
        GET pipelined after it on the same worker connection is still in step."""
        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes:
            head = b"HTTP/1.1 200 OK\r\nContent-Length: 42\r\n\r\n"
            return head if h.startswith(b"HEAD ") else head + b"x" * 42

        worker, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        raw = await self.raw(port, b"HEAD /api/svc HTTP/1.1\r\nHost: h\r\n\r\n"
                             b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 OK"))
        self.assertIn(b"Content-Length: 42", raw)
        self.assertEqual(len(worker.connections), 1)

    async def test_large_response_streams_through(self) -> None:
        """An 8 MiB body arrives whole, and the worker is then free (nothing in
        flight) with the request counted once."""
        size = 8 * 1024 * 1024

        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes:
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size

        worker, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        status, headers, body = split_response(
            await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n"))
        self.assertEqual(status, 200)
        self.assertEqual(len(body), size)
        self.assertEqual(self.pool.workers[0].in_flight, 0)
        self.assertEqual(self.pool.workers[0].requests, 1)


class ErrorTests(ProxyTestCase):
    async def error(self, port: int, request: bytes) -> tuple[int, dict[bytes, list[bytes]], Any]:
        status, headers, body = split_response(await self.raw(port, request))
        if b"transfer-encoding" in headers:
            body = dechunk(body)
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        return status, headers, json.loads(body)

    async def test_no_ready_worker_is_503_with_retry_after(self) -> None:
        _, port = await self.start_proxy([])
        status, headers, body = await self.error(
            port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertEqual(status, 503)
        self.assertEqual(headers[b"retry-after"], [b"1"])
        self.assertIn("no ready worker", body["error"])

    async def test_unknown_route_is_404_listing_routes(self) -> None:
        _, port = await self.start_proxy([])
        status, _, body = await self.error(port, b"GET /nope HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertEqual(status, 404)
        self.assertEqual(body["routes"], ["/api/svc", "/api/svc/deeper"])
        status, _, _ = await self.error(port, b"GET /api/svcx HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertEqual(status, 404)

    async def test_dot_segments_and_encoded_slashes_are_400(self) -> None:
        worker, wport = await self.start_worker(lambda h, b, c: ok_json())
        _, port = await self.start_proxy([self.worker_for(wport)])
        for path in (b"/api/svc/../../admin", b"/api/svc/%2e%2e/x", b"/api%2Fsvc", b"/api/svc/.",
                     b"http://h/api/svc"):
            status, _, body = await self.error(
                port, b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
            self.assertEqual(status, 400, path)
            self.assertIn("error", body)
        self.assertEqual(worker.requests, [])

    async def test_worker_timeout_is_504_and_frees_the_slot(self) -> None:
        worker, wport = await self.start_worker(lambda h, b, c: None)  # never answers
        _, port = await self.start_proxy([self.worker_for(wport)], request_timeout=0.2)
        status, _, body = await self.error(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertEqual(status, 504)
        self.assertIn("request_timeout=0.2s", body["error"])
        self.assertEqual(self.pool.workers[0].in_flight, 0)
        await wait_for(lambda: not self.pool.workers[0].connections.active, 2,
                       what="the timed-out upstream connection to close")

    async def test_garbage_response_is_502(self) -> None:
        """Bytes that are not an HTTP response (an SSH banner) are a 502 JSON
        error, not passed on to the client."""
        worker, wport = await self.start_worker(lambda h, b, c: b"SSH-2.0-OpenSSH\r\n\r\n")
        _, port = await self.start_proxy([self.worker_for(wport)])
        status, _, body = await self.error(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertEqual(status, 502)
        self.assertIn("invalid response", body["error"])

    async def test_connect_method_is_405(self) -> None:
        """The daemon is not a tunnel: CONNECT is refused with 405, even with no
        worker to ask."""
        _, port = await self.start_proxy([])
        status, _, _ = await self.error(port, b"CONNECT /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertEqual(status, 405)


class FailoverTests(ProxyTestCase):
    async def closed_port(self) -> int:
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
        number = port.getHost().port
        await port.stopListening()
        return number

    async def test_refused_connection_goes_to_another_worker(self) -> None:
        worker, wport = await self.start_worker(lambda h, b, c: ok_json(who="good"))
        dead = self.worker_for(await self.closed_port(), 0)
        good = self.worker_for(wport, 1)
        pool, port = await self.start_proxy([dead, good])
        for _ in range(4):
            raw = await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
            self.assertEqual(json.loads(split_response(raw)[2]), {"who": "good"})
        self.assertEqual(pool.refused, [dead])
        self.assertEqual((dead.in_flight, good.in_flight), (0, 0))

    async def test_every_worker_refusing_waits_for_a_replacement_not_502(self) -> None:
        # All workers killed at once: each refusal takes one out of rotation and
        # does not use up the retries; the request waits for a replacement.
        dead = [self.worker_for(await self.closed_port(), i) for i in range(4)]
        pool, port = await self.start_proxy(dead, queue=QueueConfig(max=8, timeout=5))
        pool.accepting = True  # the supervisor is restarting them
        good, good_port = await self.start_worker(lambda h, b, c: ok_json(who="replacement"))
        answer = defer.ensureDeferred(self.raw(
            port, b"POST /api/svc HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n"
                  + CLOSE + b"\r\nhi"))
        await wait_for(lambda: len(pool.refused) == 4, 5, what="every dead worker tried")
        self.assertFalse(answer.called, "answered before a worker was back")
        pool.add_ready(self.worker_for(good_port, 4))
        status, _, body = split_response(await answer)
        self.assertEqual((status, json.loads(body)), (200, {"who": "replacement"}))
        self.assertEqual(len(good.requests), 1)

    async def test_refusals_are_capped(self) -> None:
        """A worker that keeps refusing yet stays "ready" (a stale pool view)
        cannot keep a request looping: MAX_TRIES attempts, then 502."""
        dead = self.worker_for(await self.closed_port(), 0)
        pool, port = await self.start_proxy([dead])
        pool.connection_refused = lambda worker: pool.refused.append(worker)  # stays ready
        raw = await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertEqual(split_response(raw)[0], 502)
        self.assertEqual(len(pool.refused), MAX_TRIES)

    async def test_get_is_retried_when_a_worker_dies_before_answering(self) -> None:
        def dies(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            c.transport.abortConnection()

        _, dying_port = await self.start_worker(dies)
        good, good_port = await self.start_worker(lambda h, b, c: ok_json(who="good"))
        pool, port = await self.start_proxy([self.worker_for(dying_port, 0),
                                             self.worker_for(good_port, 1)])
        for _ in range(3):
            raw = await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
            self.assertEqual(split_response(raw)[0], 200)
        # A POST that may have reached the worker is not replayed.
        outcomes = set()
        for _ in range(4):
            raw = await self.raw(port, b"POST /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
            outcomes.add(split_response(raw)[0])
        self.assertEqual(outcomes, {200, 502})

    async def test_truncated_response_cuts_the_client_connection(self) -> None:
        def short(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            c.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            c.transport.loseConnection()

        _, wport = await self.start_worker(short)
        _, port = await self.start_proxy([self.worker_for(wport)])
        raw = await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n\r\n")
        status, headers, body = split_response(raw)
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"content-length"], [b"100"])
        self.assertEqual(body, b"0123456789")  # and then the connection closed

    async def test_client_disconnect_frees_the_worker_slot(self) -> None:
        """The client leaves once the worker holds its request (an event, not a
        delay that a slow machine could outrun): the slot and the upstream
        connection are freed."""
        worker, wport = await self.start_worker(lambda h, b, c: None)
        target = self.worker_for(wport)
        _, port = await self.start_proxy([target])
        await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n\r\n",
                       close_when=lambda: worker.requests)
        await wait_for(lambda: target.in_flight == 0 and not target.connections.active, 2,
                       what="the slot to be freed")
        self.assertEqual(len(worker.requests), 1)
        self.assertEqual(self.proxy.exchanges, set())


class RoutingUnitTests(SynchronousTestCase):
    def test_normalize(self) -> None:
        """Paths are made canonical (empty segments dropped, unreserved escapes
        decoded); dot segments and encoded slash, backslash or NUL are BadPath,
        as they could climb out of a route."""
        self.assertEqual(normalize_path(b"/a//b/"), b"/a/b/")
        self.assertEqual(normalize_path(b"/%61%2d%7E/%20"), b"/a-~/%20")
        self.assertEqual(normalize_path(b"/"), b"/")
        for bad in (b"a", b"/a/../b", b"/a/./b", b"/%2e%2E", b"/a%2fb", b"/a%5cb", b"/a%00", b"/a\\b"):
            with self.assertRaises(BadPath, msg=bad):
                normalize_path(bad)

    def test_parse_head(self) -> None:
        """A worker's head: equal duplicate lengths count once, chunked beats a
        length, keep-alive follows the version; whatever could desync the
        framing (bad version, status or name, a line without a colon, a
        negative or conflicting length) is BadResponse."""
        status, reason, keep, headers, length, chunked = parse_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\nX: y")
        self.assertEqual((status, reason, keep, length, chunked), (200, b"OK", True, 5, False))
        self.assertEqual(headers, [(b"Content-Length", b"5"), (b"X", b"y")])
        _, _, keep, _, length, chunked = parse_head(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked")
        self.assertEqual((keep, length, chunked), (True, None, True))
        self.assertFalse(parse_head(b"HTTP/1.0 200 OK")[2])
        self.assertTrue(parse_head(b"HTTP/1.0 200 OK\r\nConnection: keep-alive")[2])
        for bad in (b"HTTP/2 200 OK", b"HTTP/1.1 2000 OK", b"HTTP/1.1 200 OK\r\nno colon",
                    b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2",
                    b"HTTP/1.1 200 OK\r\nContent-Length: -1", b"HTTP/1.1 200 OK\r\nBad Name: x"):
            with self.assertRaises(BadResponse, msg=bad):
                parse_head(bad)
