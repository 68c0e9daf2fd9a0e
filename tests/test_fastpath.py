"""The fast data path: deadlines on one timer, eager writes, streamed request bodies."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from cgipool.proxy.deadlines import Deadlines
from cgipool.proxy.edge import EdgeProtocol, EdgeSite, http_date
from cgipool.proxy.exchange import Exchange
from cgipool.proxy.forward import INLINE_BODY, build_request
from cgipool.proxy.upstream import StreamedRequest
from tests.support import wait_for
from tests.test_forward_paths import ForwardTestCase
from tests.test_proxy import CLOSE, ok_json, split_response


class Item:
    def __init__(self, deadlines: Deadlines | None = None, again: float | None = None) -> None:
        self.fired: list[float] = []
        self.deadlines = deadlines
        self.again = again

    def deadline_passed(self, now: float) -> None:
        self.fired.append(now)
        if self.again is not None and self.deadlines is not None:
            self.deadlines.add(self, now + self.again)
            self.again = None


class DeadlinesTests(SynchronousTestCase):
    def test_fires_never_early_and_at_most_a_tick_late(self) -> None:
        clock = Clock()
        deadlines = Deadlines(clock, tick=0.1)
        item = Item()
        deadlines.add(item, 1.03)
        clock.advance(1.02)
        self.assertEqual(item.fired, [])
        clock.advance(0.1)
        self.assertEqual(len(item.fired), 1)
        self.assertGreaterEqual(item.fired[0], 1.03)
        self.assertLessEqual(item.fired[0], 1.13 + 1e-9)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_one_timer_for_many_and_none_when_nothing_is_watched(self) -> None:
        clock = Clock()
        deadlines = Deadlines(clock)
        items = [Item() for _ in range(100)]
        keys = [deadlines.add(item, 30 + i * 0.001) for i, item in enumerate(items)]
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        for item, key in zip(items, keys):
            deadlines.remove(item, key)
        self.assertEqual(clock.getDelayedCalls(), [])
        clock.advance(60)
        self.assertFalse(any(item.fired for item in items))

    def test_an_earlier_deadline_moves_the_timer(self) -> None:
        clock = Clock()
        deadlines = Deadlines(clock)
        late, early = Item(), Item()
        deadlines.add(late, 10)
        deadlines.add(early, 1)
        clock.advance(1.2)
        self.assertEqual(len(early.fired), 1)
        self.assertEqual(late.fired, [])
        clock.advance(9)
        self.assertEqual(len(late.fired), 1)

    def test_an_item_may_watch_again_from_its_callback(self) -> None:
        clock = Clock()
        deadlines = Deadlines(clock)
        other = Item()
        item = Item(deadlines, again=5)
        deadlines.add(item, 1)
        deadlines.add(other, 3)
        clock.advance(1.1)
        clock.advance(2)
        self.assertEqual(len(other.fired), 1)
        clock.advance(4)
        self.assertEqual(len(item.fired), 2)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_keep_timer_parks_the_timer_until_it_fires_or_is_cleared(self) -> None:
        clock = Clock()
        deadlines = Deadlines(clock, keep_timer=True)
        for _ in range(3):  # come and go: one timer for all, never rescheduled
            item = Item()
            deadlines.remove(item, deadlines.add(item, clock.seconds() + 10))
            clock.advance(0.01)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        clock.advance(11)
        self.assertEqual(clock.getDelayedCalls(), [])
        deadlines.add(Item(), 20)
        deadlines.clear()
        self.assertEqual((clock.getDelayedCalls(), deadlines.count), ([], 0))

    def test_removing_twice_or_after_firing_is_harmless(self) -> None:
        clock = Clock()
        deadlines = Deadlines(clock)
        item = Item()
        key = deadlines.add(item, 1)
        clock.advance(2)
        deadlines.remove(item, key)
        deadlines.remove(item, key)
        self.assertEqual(deadlines.count, 0)


def edge_exchange(method: bytes, headers: list[tuple[bytes, bytes]],
                  body: bytes = b"") -> Exchange:
    """A real exchange, as the edge makes it, on a connection from 192.0.2.7
    (a StringTransport: nothing is sent anywhere), with ``body`` received."""
    site = EdgeSite(Resource(), reactor=Clock())
    conn = EdgeProtocol(site)
    conn.makeConnection(StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", 5555)))
    exchange = Exchange(conn, method, b"/api/x", b"HTTP/1.1", headers, True, 0.0)
    exchange.body_budget = len(body)
    if body:
        assert exchange.body_write(body)
    return exchange


class BuildRequestTests(SynchronousTestCase):
    def request(self, body: bytes) -> Exchange:
        return edge_exchange(b"POST", [(b"Host", b"example")], body)

    def test_a_small_body_goes_with_the_head(self) -> None:
        data = build_request(self.request(b"x" * INLINE_BODY), b"/")
        self.assertIsInstance(data, bytes)
        assert isinstance(data, bytes)
        self.assertTrue(data.endswith(b"\r\n\r\n" + b"x" * INLINE_BODY))
        self.assertIn(b"Content-Length: %d\r\n" % INLINE_BODY, data)

    def test_a_large_body_is_streamed_from_its_file(self) -> None:
        request = self.request(b"y" * (INLINE_BODY + 1))
        data = build_request(request, b"/")
        self.assertIsInstance(data, StreamedRequest)
        assert isinstance(data, StreamedRequest)
        self.assertTrue(data.head.endswith(b"\r\n\r\n"))
        self.assertIn(b"Content-Length: %d\r\n" % (INLINE_BODY + 1), data.head)
        self.assertIs(data.body, request.body)  # the spooled file, not a copy
        self.assertEqual(data.body.tell(), 0)  # type: ignore[union-attr]
        self.assertEqual(data.size, INLINE_BODY + 1)

    def test_the_head_names_the_target_host_and_client(self) -> None:
        """The worker's request line has the rewritten target; Host is the
        client's; X-Forwarded-* name the client; framing and the headers its
        Connection lists are dropped."""
        exchange = edge_exchange(b"GET", [
            (b"Host", b"example:81"), (b"Connection", b"X-Private"), (b"X-Private", b"1"),
            (b"Transfer-Encoding", b"chunked"), (b"Accept", b"*/*")])
        data = build_request(exchange, b"/x?y=1")
        assert isinstance(data, bytes)
        lines = data.split(b"\r\n")
        self.assertEqual(lines[0], b"GET /x?y=1 HTTP/1.1")
        for line in (b"Host: example:81", b"Accept: */*", b"X-Forwarded-For: 192.0.2.7",
                     b"X-Forwarded-Proto: http", b"X-Forwarded-Host: example:81"):
            self.assertIn(line, lines)
        for gone in (b"connection", b"x-private", b"transfer-encoding", b"content-length"):
            self.assertNotIn(gone, data.lower())
        self.assertTrue(data.endswith(b"\r\n\r\n"))

    def test_http_date_is_an_rfc_date(self) -> None:
        self.assertRegex(http_date(), rb"^[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} "
                                      rb"\d\d:\d\d:\d\d GMT$")


class EarlyAnswer(Protocol):
    """Answers 413 as soon as the request head is in, without reading the body."""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)
        self.buf = b""
        self.answered = False

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        if not self.answered and b"\r\n\r\n" in self.buf:
            self.answered = True
            self.transport.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 2\r\n\r\nno")


class StreamingTests(ForwardTestCase):
    async def test_a_large_upload_reaches_the_worker_whole(self) -> None:
        worker, wport = await self.start_worker(
            lambda h, b, c: ok_json(received=len(b), same=b == body))
        body = bytes(range(256)) * 4096 + b"end"  # 1 MiB + 3: spooled, then streamed
        _, port = await self.start_proxy([self.worker_for(wport)], max_body=2 << 20)
        raw = await self.raw(port, b"POST /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE +
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
        status, _, answer = split_response(raw)
        self.assertEqual(status, 200, raw[:300])
        self.assertIn(b'"received": %d' % len(body), answer)
        self.assertIn(b'"same": true', answer)

    async def test_an_answer_before_the_whole_body_closes_the_worker_connection(self) -> None:
        factory = Factory.forProtocol(EarlyAnswer)
        factory.connections = []  # type: ignore[attr-defined]
        listening = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(listening.stopListening)
        self.addCleanup(lambda: [c.transport.abortConnection()
                                 for c in factory.connections])  # type: ignore[attr-defined]
        worker = self.worker_for(listening.getHost().port)
        _, port = await self.start_proxy([worker], max_body=8 << 20)
        body = b"z" * (4 << 20)
        raw = await self.raw(port, b"POST /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE +
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
        status, _, answer = split_response(raw)
        self.assertEqual((status, answer), (413, b"no"))
        await wait_for(lambda: not worker.connections.active, timeout=5)
        self.assertEqual(worker.connections.idle, [])
        self.assertEqual(worker.in_flight, 0)

    async def test_a_large_response_and_empty_ones_arrive_whole(self) -> None:
        big = b"b" * (3 << 20)

        def handler(head: bytes, body: bytes, conn: Any) -> bytes:
            if head.startswith(b"GET /big"):
                return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big
            if head.startswith(b"HEAD"):
                return b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Head: 1\r\n\r\n"
            return b"HTTP/1.1 204 No Content\r\nX-Empty: 1\r\n\r\n"

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        raw = await self.raw(port, b"GET /api/svc/big HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        status, headers, body = split_response(raw)
        self.assertEqual((status, headers[b"content-length"], len(body)),
                         (200, [b"%d" % len(big)], len(big)))
        self.assertEqual(body, big)
        raw = await self.raw(port, b"HEAD /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        status, headers, body = split_response(raw)
        self.assertEqual((status, headers.get(b"x-head"), body), (200, [b"1"], b""))
        raw = await self.raw(port, b"GET /api/svc/empty HTTP/1.1\r\nHost: h\r\n" + CLOSE +
                             b"\r\n")
        status, headers, body = split_response(raw)
        self.assertEqual((status, headers.get(b"x-empty"), body), (204, [b"1"], b""))
        self.assertEqual(len(headers[b"date"]), 1)


class DeadlineSemanticsTests(ForwardTestCase):
    async def test_no_head_within_request_timeout_is_504_at_most_a_tick_late(self) -> None:
        """The proxy's clock is a Clock: the 504 is not due before
        request_timeout, and is due one tick of its deadlines after it."""
        clock = Clock()
        _, wport = await self.start_worker(lambda h, b, c: None)  # never answers
        worker = self.worker_for(wport)
        pool, port = await self.start_proxy([worker], proxy_reactor=clock, request_timeout=0.3)
        answer = defer.ensureDeferred(self.raw(
            port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n"))
        await wait_for(lambda: worker.in_flight == 1, 5, what="the request to reach the worker")
        clock.advance(0.3 - 0.001)
        self.assertEqual((pool.timed_out, len(self.proxy.exchanges)), ([], 1))
        clock.advance(0.001 + self.proxy.deadlines.tick + 0.001)
        self.assertEqual(len(pool.timed_out), 1)
        status, _, body = split_response(await answer)
        self.assertEqual(status, 504)
        self.assertIn(b"request_timeout=0.3s", body)
        self.assertEqual(worker.in_flight, 0)
        self.assertEqual(self.proxy.deadlines.count, 0)

    async def test_a_body_that_stops_moving_after_the_head_is_cut(self) -> None:
        def handler(head: bytes, body: bytes, conn: Any) -> bytes:
            return b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"  # then nothing

        _, wport = await self.start_worker(handler)
        worker = self.worker_for(wport)
        pool, port = await self.start_proxy([worker], request_timeout=0.3)
        raw = await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        status, headers, body = split_response(raw)
        # The head went out: the client sees a cut body, never a complete one.
        self.assertEqual((status, headers[b"content-length"], body), (200, [b"10"], b"abc"))
        self.assertEqual(len(pool.timed_out), 1)
        self.assertEqual(worker.in_flight, 0)
        self.assertEqual(self.proxy.deadlines.count, 0)
