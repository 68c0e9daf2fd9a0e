"""Forwarding one client request to a worker, and every way it can end.

Each request the edge parses is an :class:`~cgipool.proxy.exchange.Exchange`
that passes the pipeline and is forwarded by
:class:`~cgipool.proxy.forward.ServiceProxy`.  These tests check what the
worker receives (headers dropped, X-Forwarded-*), what the client gets back
(HEAD, 204/304, streamed and chunked bodies, 502/503/504 with their JSON
bodies), the unusual turns (retries, a worker dying, a truncated body, a
client or a daemon going away) and that each request is written once to the
access log and counted once in the service's metrics.

Real sockets on 127.0.0.1: scripted workers (tests.test_proxy) and a
keep-alive client that sends one request per write, as real clients do.
Timeouts run on a :class:`~twisted.internet.task.Clock` given to the proxy.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import version as SERVER_VERSION

from cgipool.config import QueueConfig
from cgipool.proxy.forward import MAX_ATTEMPTS, response_headers
from tests.support import wait_for
from tests.test_proxy import (
    Handler,
    ProxyTestCase,
    ScriptedConnection,
    ScriptedWorker,
    dechunk,
    ok_json,
    split_response,
)

GET = b"GET /api/svc/x?q=1 HTTP/1.1\r\nHost: example.test\r\nAccept: application/json\r\n" \
      b"User-Agent: forward-test\r\nX-Forwarded-For: 6.6.6.6\r\nX_Alias: 1\r\nCookie: a=1\r\n\r\n"
_DATE = re.compile(rb"\r\nDate: [^\r]*")


class KeepAliveClient(Protocol):
    """One client connection: each request is one write, answers are collected."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: defer.Deferred[None] = defer.Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received.extend(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.closed.callback(None)

    def take(self) -> bytes:
        data, self.received = bytes(self.received), bytearray()
        return data


def complete(data: bytes, head_request: bool = False) -> bool:
    """Whether ``data`` holds one whole response."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        return False
    status = int(head.split(b" ", 2)[1])
    lower = head.lower()
    if head_request or status in (204, 304):
        return True
    match = re.search(rb"\r\ncontent-length: *(\d+)", lower)
    if match:
        return len(body) >= int(match.group(1))
    if b"transfer-encoding: chunked" in lower:
        return body.endswith(b"0\r\n\r\n")
    return False


class Recorder:
    """A service's metrics as the count stage sees them: the statuses recorded."""

    def __init__(self) -> None:
        self.statuses: list[int] = []

    def record(self, status: int, seconds: float) -> None:
        self.statuses.append(status)


class ResponseHeadersTests(SynchronousTestCase):
    """The client's headers from a worker's (forward.response_headers)."""

    def test_ours_are_added_first_unless_the_worker_sent_its_own(self) -> None:
        headers, length = response_headers([(b"X-App", b"1"), (b"Set-Cookie", b"a=1")],
                                           b"today")
        self.assertEqual(headers, [(b"Server", SERVER_VERSION), (b"Date", b"today"),
                                   (b"X-App", b"1"), (b"Set-Cookie", b"a=1")])
        self.assertIsNone(length)
        own = [(b"server", b"worker/1"), (b"DATE", b"then"), (b"Content-Length", b"7")]
        self.assertEqual(response_headers(own, b"today"), (own, 7))

    def test_one_content_length_goes_to_the_client(self) -> None:
        """The parser let through only equal duplicates: the first is kept."""
        headers, length = response_headers(
            [(b"Content-Length", b"5"), (b"content-length", b"5")], b"today")
        self.assertEqual(length, 5)
        self.assertEqual([pair for pair in headers if pair[0].lower() == b"content-length"],
                         [(b"Content-Length", b"5")])


class ForwardTestCase(ProxyTestCase):
    """ProxyTestCase with keep-alive clients, the access log and held requests
    (its start_proxy may put the proxy and the site on a Clock)."""

    async def connect(self, port: int) -> KeepAliveClient:
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                       KeepAliveClient())

        def drop() -> None:
            if client.reason is None:
                client.transport.abortConnection()

        self.addCleanup(drop)
        return client

    async def ask(self, client: KeepAliveClient, request: bytes,
                  head_request: bool = False) -> bytes:
        client.transport.write(request)
        await wait_for(lambda: complete(bytes(client.received), head_request), 5,
                       what="the response")
        return client.take()

    def access_log(self) -> str:
        """Start writing the site's access log to a new file; returns its path."""
        path = self.mktemp()
        self.site.logPath = path
        self.site.startFactory()  # opens the log file (Site.startFactory)
        self.addCleanup(self.site.stopFactory)
        return path

    def log_lines(self, path: str) -> list[bytes]:
        """Close the access log and read it (no request may follow: the site stopped)."""
        self.site.stopFactory()
        with open(path, "rb") as f:
            return f.read().splitlines()

    async def closed_port(self) -> int:
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
        number = listening.getHost().port
        await listening.stopListening()
        return number

    async def start_holding_worker(self, answer: Handler = lambda h, b, c: ok_json()
                                   ) -> tuple[ScriptedWorker, int, list[ScriptedConnection]]:
        """A worker behind the proxy that holds every request for /hold…
        unanswered (its connection is appended to the returned list) and
        answers the others with ``answer``; the proxy's metrics are a Recorder."""
        gate: list[ScriptedConnection] = []

        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes | None:
            if h.split(b" ")[1].startswith(b"/hold"):
                gate.append(c)
                return None
            return answer(h, b, c)

        worker, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        self.proxy.metrics = Recorder()
        return worker, port, gate

    async def abandon(self, port: int, request: bytes, gate: list[ScriptedConnection]) -> None:
        """Send ``request`` (for /hold…) on a new connection and leave once the
        worker holds it; returns when the proxy has ended the exchange."""
        held = len(gate)
        client = await self.connect(port)
        client.transport.write(request)
        await wait_for(lambda: len(gate) > held, 10, what="the held request")
        client.transport.loseConnection()
        await wait_for(lambda: not self.proxy.exchanges, 10, what="the exchange to end")


class ForwardedRequestTests(ForwardTestCase):
    async def test_what_the_worker_gets_is_the_same_with_or_without_keep_alive(self) -> None:
        """A ``Connection: keep-alive`` header changes neither the client's
        answer nor the request the worker gets; the prefix is stripped, the
        client's X-Forwarded-For and names with ``_`` are dropped."""
        worker, wport = await self.start_worker(lambda h, b, c: ok_json(ok=True))
        _, port = await self.start_proxy([self.worker_for(wport)])
        client = await self.connect(port)
        plain = await self.ask(client, GET)
        kept = await self.ask(client, GET.replace(b"\r\n\r\n",
                                                  b"\r\nConnection: keep-alive\r\n\r\n"))
        self.assertEqual(_DATE.sub(b"", plain), _DATE.sub(b"", kept))
        self.assertEqual(split_response(plain)[0], 200)
        (plain_head, _), (kept_head, _) = worker.requests
        self.assertEqual(plain_head, kept_head)
        lines = plain_head.split(b"\r\n")
        self.assertEqual(lines[0], b"GET /x?q=1 HTTP/1.1")
        self.assertIn(b"Host: example.test", lines)
        self.assertIn(b"X-Forwarded-For: 127.0.0.1", lines)
        self.assertIn(b"X-Forwarded-Proto: http", lines)
        self.assertIn(b"X-Forwarded-Host: example.test", lines)
        self.assertIn(b"Accept: application/json", lines)
        self.assertIn(b"Cookie: a=1", lines)
        self.assertNotIn(b"6.6.6.6", plain_head)
        self.assertNotIn(b"X_Alias", plain_head)
        self.assertNotIn(b"keep-alive", plain_head.lower())
        self.assertEqual(self.proxy.exchanges, set())
        self.assertEqual(self.pool.workers[0].in_flight, 0)
        self.assertEqual(len(worker.connections), 1)  # the worker connection was reused

    async def test_a_trusted_proxys_chain_is_extended(self) -> None:
        """Behind a trusted proxy, its X-Forwarded-For is kept and its address appended."""
        _, wport = await self.start_worker(lambda h, b, c: ok_json(head=h.decode("latin-1")))
        _, port = await self.start_proxy([self.worker_for(wport)])
        self.site.trusted_proxies = (ipaddress.ip_network("127.0.0.0/8"),)
        client = await self.connect(port)
        status, _, body = split_response(await self.ask(client, GET))
        self.assertEqual(status, 200)
        head = json.loads(body)["head"]
        self.assertIn("X-Forwarded-For: 6.6.6.6, 127.0.0.1\r\n", head)
        self.assertIn("X-Forwarded-Host: example.test", head.split("\r\n"))

    async def test_served_requests_count_for_recycling(self) -> None:
        """Each served request counts toward max_requests: the third of three
        (recycle_at=3) asks the pool to recycle the worker, once."""
        _, wport = await self.start_worker(lambda h, b, c: ok_json())
        target = self.worker_for(wport)
        target.recycle_at = 3
        _, port = await self.start_proxy([target])
        client = await self.connect(port)
        for _ in range(3):
            await self.ask(client, GET)
        self.assertEqual(target.requests, 3)
        self.assertEqual([w for w, _ in self.pool.recycled], [target])


class AnswerTests(ForwardTestCase):
    async def test_head_204_and_304_answers_have_no_body(self) -> None:
        answers = {
            b"/a": b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\nETag: \"e\"\r\n\r\n",
            b"/b": b"HTTP/1.1 204 No Content\r\nX-Done: 1\r\n\r\n",
            b"/c": b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n",
        }

        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes:
            return answers[h.split(b" ")[1]]

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        client = await self.connect(port)
        head = await self.ask(client, b"HEAD /api/svc/a HTTP/1.1\r\nHost: h\r\n\r\n",
                              head_request=True)
        status, headers, body = split_response(head)
        self.assertEqual((status, headers[b"content-length"], body), (200, [b"5000"], b""))
        status, headers, body = split_response(
            await self.ask(client, b"GET /api/svc/b HTTP/1.1\r\nHost: h\r\n\r\n"))
        self.assertEqual((status, headers[b"x-done"], body), (204, [b"1"], b""))
        self.assertNotIn(b"transfer-encoding", headers)
        status, headers, body = split_response(
            await self.ask(client, b"GET /api/svc/c HTTP/1.1\r\nHost: h\r\n\r\n"))
        self.assertEqual((status, headers[b"etag"], body), (304, [b'"e"'], b""))
        # The connection is still in step: one more request gets its own answer.
        status, headers, body = split_response(
            await self.ask(client, b"HEAD /api/svc/a HTTP/1.1\r\nHost: h\r\n\r\n", True))
        self.assertEqual((status, body), (200, b""))
        self.assertEqual(client.received, b"")

    async def test_pipelined_requests_are_answered_in_order(self) -> None:
        gate: list[ScriptedConnection] = []

        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes | None:
            if b"slow" in h:
                gate.append(c)
                return None
            return ok_json(n="fast")

        worker, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)], concurrency=4)
        client = await self.connect(port)
        client.transport.write(b"GET /api/svc/slow HTTP/1.1\r\nHost: h\r\n\r\n"
                               b"GET /api/svc/fast HTTP/1.1\r\nHost: h\r\n\r\n")
        await wait_for(lambda: gate, 2, what="the slow request")
        gate[0].transport.write(ok_json(n="slow"))
        await wait_for(lambda: bytes(client.received).count(b"HTTP/1.1 200") == 2, 5,
                       what="both answers")
        data = client.take()
        self.assertLess(data.index(b'"slow"'), data.index(b'"fast"'))
        self.assertEqual([h.split(b" ")[1] for h, _ in worker.requests], [b"/slow", b"/fast"])

    async def test_chunked_and_large_responses_are_streamed(self) -> None:
        big = os.urandom(300 * 1024)

        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes:
            if b"/chunked" in h:
                return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            if b"/big" in h:
                return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big)
            return ok_json()

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        client = await self.connect(port)
        status, headers, body = split_response(
            await self.ask(client, b"GET /api/svc/chunked HTTP/1.1\r\nHost: h\r\n\r\n"))
        self.assertEqual((status, headers[b"transfer-encoding"]), (200, [b"chunked"]))
        self.assertEqual(dechunk(body), b"hello world")
        status, headers, body = split_response(
            await self.ask(client, b"GET /api/svc/big HTTP/1.1\r\nHost: h\r\n\r\n"))
        self.assertEqual((status, headers[b"content-length"], body),
                         (200, [b"%d" % len(big)], big))
        # The connection goes on after both.
        status, _, body = split_response(await self.ask(client, GET))
        self.assertEqual(status, 200)
        self.assertEqual(self.proxy.exchanges, set())
        self.assertEqual(self.pool.workers[0].in_flight, 0)

    async def test_an_http10_client_gets_a_body_of_unknown_length_until_the_close(self) -> None:
        """A chunked worker response to an HTTP/1.0 client: no chunking (1.0
        has none), the body ends with a clean close of the connection."""
        big = os.urandom(2 << 20)

        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes:
            return (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                    b"%x\r\n%s\r\n0\r\n\r\n" % (len(big), big))

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)], site_reactor=Clock())
        client = await self.connect(port)
        client.transport.write(b"GET /api/svc/x HTTP/1.0\r\nHost: h\r\n\r\n")
        await wait_for(lambda: client.reason is not None, 10, what="the close ending the body")
        status, headers, body = split_response(client.take())
        self.assertEqual(status, 200)
        self.assertNotIn(b"transfer-encoding", headers)
        self.assertNotIn(b"content-length", headers)
        self.assertEqual(headers[b"connection"], [b"close"])
        self.assertEqual(body, big)
        self.assertIsInstance(client.reason.value, ConnectionDone)  # type: ignore[union-attr]


class FailureTests(ForwardTestCase):
    async def test_no_head_within_request_timeout_is_504_and_the_connection_goes_on(
            self) -> None:
        clock = Clock()
        _, wport = await self.start_worker(
            lambda h, b, c: None if b"/hang" in h else ok_json(ok=1))
        _, port = await self.start_proxy([self.worker_for(wport)], proxy_reactor=clock,
                                         request_timeout=0.2)
        client = await self.connect(port)
        client.transport.write(b"GET /api/svc/hang HTTP/1.1\r\nHost: h\r\n\r\n")
        await wait_for(lambda: self.proxy.exchanges and self.pool.workers[0].in_flight, 2,
                       what="the request to reach the worker")
        # Never early, at most one tick of the proxy's deadlines late.
        clock.advance(0.19)
        self.assertEqual((len(self.proxy.exchanges), self.pool.timed_out), (1, []))
        clock.advance(0.01 + self.proxy.deadlines.tick + 0.001)
        self.assertEqual(len(self.pool.timed_out), 1)
        await wait_for(lambda: complete(bytes(client.received)), 2, what="the 504")
        status, headers, body = split_response(client.take())
        self.assertEqual((status, headers[b"content-type"]), (504, [b"application/json"]))
        self.assertIn("request_timeout=0.2s", json.loads(body)["error"])
        self.assertEqual(self.pool.workers[0].in_flight, 0)
        # The next request on the same connection is answered.
        status, _, body = split_response(await self.ask(client, GET))
        self.assertEqual((status, json.loads(body)), (200, {"ok": 1}))

    async def test_refused_worker_is_retried_on_another(self) -> None:
        _, wport = await self.start_worker(lambda h, b, c: ok_json(who="good"))
        dead, good = self.worker_for(await self.closed_port(), 0), self.worker_for(wport, 1)
        pool, port = await self.start_proxy([dead, good])
        client = await self.connect(port)
        for _ in range(3):
            status, _, body = split_response(await self.ask(client, GET))
            self.assertEqual((status, json.loads(body)), (200, {"who": "good"}))
        self.assertEqual(pool.refused, [dead])
        self.assertEqual((dead.in_flight, good.in_flight), (0, 0))

    async def test_worker_dying_before_the_answer_is_retried(self) -> None:
        def dies(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            c.transport.abortConnection()

        _, dying = await self.start_worker(dies)
        good, good_port = await self.start_worker(lambda h, b, c: ok_json(who="good"))
        _, port = await self.start_proxy([self.worker_for(dying, 0),
                                          self.worker_for(good_port, 1)])
        client = await self.connect(port)
        for _ in range(3):
            status, _, body = split_response(await self.ask(client, GET))
            self.assertEqual((status, json.loads(body)), (200, {"who": "good"}))
        self.assertEqual(len(good.requests), 3)

    async def test_an_invalid_worker_response_is_502_and_not_retried(self) -> None:
        worker, wport = await self.start_worker(lambda h, b, c: b"SSH-2.0-OpenSSH\r\n\r\n")
        _, port = await self.start_proxy([self.worker_for(wport)])
        client = await self.connect(port)
        status, headers, body = split_response(await self.ask(client, GET))
        self.assertEqual((status, headers[b"content-type"]), (502, [b"application/json"]))
        error = json.loads(body)
        self.assertIn("invalid response", error["error"])
        self.assertEqual(error["service"], "svc")
        self.assertNotIn("SSH", body.decode())  # the worker's bytes are logged, not shown
        self.assertEqual(len(self.pool.failed), 1)
        self.assertEqual(len(worker.requests), 1)

    async def test_a_worker_that_keeps_dying_is_502_after_max_attempts(self) -> None:
        def dies(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            c.transport.abortConnection()

        worker, wport = await self.start_worker(dies)
        _, port = await self.start_proxy([self.worker_for(wport)])
        client = await self.connect(port)
        status, _, body = split_response(await self.ask(client, GET))
        self.assertEqual(status, 502)
        self.assertIn("closed the connection without answering", json.loads(body)["error"])
        self.assertEqual(len(worker.requests), MAX_ATTEMPTS)

    async def test_no_ready_worker_is_503_with_retry_after(self) -> None:
        _, port = await self.start_proxy([])
        client = await self.connect(port)
        status, headers, body = split_response(await self.ask(client, GET))
        self.assertEqual((status, headers[b"retry-after"]), (503, [b"1"]))
        error = json.loads(body)
        self.assertIn("no ready worker", error["error"])
        self.assertEqual((error["service"], error["state"]), ("svc", "ok"))

    async def test_a_full_queue_is_503_and_a_waiting_request_is_served_in_turn(self) -> None:
        gate: list[ScriptedConnection] = []

        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes | None:
            if b"/hold" in h:
                gate.append(c)
                return None
            return ok_json(n=1)

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)], concurrency=1,
                                         queue=QueueConfig(max=1, timeout=30))
        holder = await self.connect(port)
        holder.transport.write(b"GET /api/svc/hold HTTP/1.1\r\nHost: h\r\n\r\n")
        await wait_for(lambda: gate, 2, what="the slot to be taken")
        waiting = await self.connect(port)
        waiting.transport.write(GET)  # no free worker: it waits in the queue
        await wait_for(lambda: len(self.proxy.queue) == 1, 2, what="the queued request")
        refused = await self.connect(port)
        status, headers, body = split_response(await self.ask(refused, GET))
        self.assertEqual((status, headers[b"retry-after"]), (503, [b"1"]))
        self.assertIn("at capacity", json.loads(body)["error"])
        gate[0].transport.write(ok_json())
        await wait_for(lambda: complete(bytes(waiting.received)), 2, what="the queued answer")
        status, _, body = split_response(waiting.take())
        self.assertEqual((status, json.loads(body)), (200, {"n": 1}))
        self.assertEqual(len(self.proxy.queue), 0)

    async def test_truncated_body_cuts_the_client(self) -> None:
        """A worker that closes 90 bytes short of its Content-Length: the client
        gets what came and then a closed connection (never a complete-looking
        answer), and the worker is charged with a failure."""
        def short(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            c.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            c.transport.loseConnection()

        _, wport = await self.start_worker(short)
        _, port = await self.start_proxy([self.worker_for(wport)])
        client = await self.connect(port)
        client.transport.write(GET)
        await client.closed
        status, headers, body = split_response(client.take())
        self.assertEqual((status, headers[b"content-length"], body),
                         (200, [b"100"], b"0123456789"))
        self.assertEqual(self.pool.workers[0].in_flight, 0)
        self.assertEqual(len(self.pool.failed), 1)

    async def test_client_gone_frees_the_worker_slot(self) -> None:
        _, wport = await self.start_worker(lambda h, b, c: None)
        target = self.worker_for(wport)
        _, port = await self.start_proxy([target])
        client = await self.connect(port)
        client.transport.write(GET)
        await wait_for(lambda: target.in_flight == 1, 2, what="the request to start")
        client.transport.loseConnection()
        await wait_for(lambda: target.in_flight == 0 and not target.connections.active, 2,
                       what="the slot to be freed")
        self.assertEqual(self.proxy.exchanges, set())
        self.assertEqual(self.pool.failed, [])  # not the worker's fault

    async def test_daemon_stop_answers_503(self) -> None:
        """A request whose worker has not answered when the proxy stops gets a
        503 "shutting down" with Retry-After, and its worker slot is freed."""
        _, wport = await self.start_worker(lambda h, b, c: None)
        _, port = await self.start_proxy([self.worker_for(wport)])
        client = await self.connect(port)
        client.transport.write(GET)
        await wait_for(lambda: self.proxy.exchanges, 2, what="the request to start")
        self.proxy.stop()
        await wait_for(lambda: complete(bytes(client.received)), 2, what="the 503")
        status, headers, body = split_response(client.take())
        self.assertEqual((status, headers[b"retry-after"]), (503, [b"1"]))
        self.assertIn("shutting down", json.loads(body)["error"])
        self.assertEqual(self.pool.workers[0].in_flight, 0)

    async def test_a_response_cut_while_the_client_is_not_reading_closes_once_sent(
            self) -> None:
        """The daemon stops while a large response waits for a client that is
        not reading: what was sent reaches the client, then the connection
        closes.  The edge's timers run on a Clock that never advances, so the
        close must be the clean one, not the abort ABORT_TIMEOUT later."""
        declared, sent = 64 << 20, 16 << 20

        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            c.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % declared)
            c.transport.write(b"p" * sent)  # and the rest never comes

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)], site_reactor=Clock())
        client = await self.connect(port)
        client.transport.pauseProducing()  # the client reads nothing for now
        client.transport.write(b"GET /api/svc/x HTTP/1.1\r\nHost: h\r\n\r\n")
        await wait_for(lambda: any(e.paused_at is not None for e in self.proxy.exchanges), 10,
                       what="the client's buffer to fill")
        self.proxy.stop()
        client.transport.resumeProducing()
        await wait_for(lambda: client.reason is not None, 10,
                       what="the cut connection to close")
        status, headers, body = split_response(client.take())
        self.assertEqual((status, headers[b"content-length"]), (200, [b"%d" % declared]))
        self.assertGreater(len(body), 0)
        self.assertLess(len(body), declared)
        self.assertEqual(self.pool.workers[0].in_flight, 0)


class RecordedOnceTests(ForwardTestCase):
    """Every request is one line of the access log and one record in its
    service's metrics, whatever happened to it on the way."""

    async def test_each_outcome_is_logged_and_counted_once(self) -> None:
        def answer(h: bytes, b: bytes, c: ScriptedConnection) -> bytes | None:
            path = h.split(b" ")[1]
            if path.startswith(b"/die"):
                c.transport.abortConnection()
                return None
            if path.startswith(b"/garbage"):
                return b"SSH-2.0-OpenSSH\r\n\r\n"
            return ok_json()

        worker, port, gate = await self.start_holding_worker(answer)
        metrics = self.proxy.metrics
        log_path = self.access_log()
        client = await self.connect(port)
        for path, status in ((b"/api/svc/ok", 200), (b"/api/svc/die", 502),
                             (b"/api/svc/garbage", 502), (b"/nowhere", 404)):
            answer = await self.ask(client, b"GET %s HTTP/1.1\r\nHost: h\r\n\r\n" % path)
            self.assertEqual(split_response(answer)[0], status, path)
        # A client that leaves before its answer: 499.
        await self.abandon(port, b"GET /api/svc/hold HTTP/1.1\r\nHost: h\r\n\r\n", gate)
        await wait_for(lambda: len(metrics.statuses) == 4, 10, what="the 499 to be counted")
        self.assertEqual(metrics.statuses, [200, 502, 502, 499])  # the 404 is no service's
        self.assertEqual(len([h for h, _ in worker.requests if b"/die" in h]), MAX_ATTEMPTS)
        lines = self.log_lines(log_path)
        self.assertEqual(len(lines), 5, lines)
        for line, expected in zip(lines, (b'"GET /api/svc/ok HTTP/1.1" 200 ',
                                          b'"GET /api/svc/die HTTP/1.1" 502 ',
                                          b'"GET /api/svc/garbage HTTP/1.1" 502 ',
                                          b'"GET /nowhere HTTP/1.1" 404 ',
                                          b'"GET /api/svc/hold HTTP/1.1" 499 ')):
            self.assertIn(expected, line)

    async def test_the_log_line_does_not_depend_on_a_connection_header(self) -> None:
        _, wport = await self.start_worker(lambda h, b, c: ok_json())
        _, port = await self.start_proxy([self.worker_for(wport)])
        log_path = self.access_log()
        client = await self.connect(port)
        request = GET.replace(b"\r\n\r\n", b"\r\nReferer: http://r.test/\r\n\r\n")
        self.assertEqual(split_response(await self.ask(client, request))[0], 200)
        self.assertEqual(split_response(await self.ask(client, request.replace(
            b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n")))[0], 200)
        lines = self.log_lines(log_path)
        self.assertEqual(len(lines), 2)
        plain, kept = (re.sub(rb"\[[^]]*\]", b"[time]", line) for line in lines)
        self.assertEqual(plain, kept)
        self.assertTrue(plain.startswith(b'"127.0.0.1" '), plain)
        self.assertIn(b'"GET /api/svc/x?q=1 HTTP/1.1" 200 ', plain)
        self.assertIn(b'"http://r.test/" "forward-test"', plain)

    async def test_refusals_and_abandoned_requests_are_logged(self) -> None:
        _, port, gate = await self.start_holding_worker()
        metrics = self.proxy.metrics
        log_path = self.access_log()
        # Refused by the edge: with the request line when it was read, "-" if not.
        await self.raw(port, b"GET /api/svc/cl-te HTTP/1.1\r\nHost: h\r\nContent-Length: 1"
                             b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        await self.raw(port, b"BLAH\r\n\r\n")
        # Abandoned by their clients while the worker holds them.
        await self.abandon(port, b"GET /api/svc/hold?a=1 HTTP/1.1\r\nHost: h\r\n\r\n", gate)
        await self.abandon(port, b"POST /api/svc/hold?a=2 HTTP/1.1\r\nHost: h\r\n"
                                 b"Content-Length: 0\r\n\r\n", gate)
        await wait_for(lambda: len(metrics.statuses) == 2, 10, what="the abandoned requests")
        lines = self.log_lines(log_path)
        self.assertEqual(len(lines), 4, lines)
        self.assertIn(b'"GET /api/svc/cl-te HTTP/1.1" 400 ', lines[0])
        self.assertIn(b'"- - -" 400 ', lines[1])
        self.assertIn(b'"GET /api/svc/hold?a=1 HTTP/1.1" 499 ', lines[2])
        self.assertIn(b'"POST /api/svc/hold?a=2 HTTP/1.1" 499 ', lines[3])
        self.assertEqual(metrics.statuses, [499, 499])
