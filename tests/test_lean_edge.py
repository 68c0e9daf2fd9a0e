"""The edge's one-pass head parser and parked idle timer behave as twisted.web's
line-by-line path and TimeoutMixin do (in memory: StringTransport and Clock)."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from cgipool.proxy.edge import EdgeChannel, EdgeSite
from cgipool.proxy.routes import Root


class Echo(Resource):
    """Answers with what it was given; ``/svc/wait`` leaves the request open."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []

    def render(self, request: Any) -> Any:
        if request.upstream_target.startswith(b"/wait"):
            self.waiting.append(request)
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain")
        return repr((request.method, request.uri, request.path, request.clientproto,
                     request.upstream_target,
                     list(request.requestHeaders.getAllRawHeaders()))).encode()


class Transport(StringTransport):
    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()


def connect(clock: Clock, fast: bool = True) -> tuple[EdgeChannel, StringTransport, Echo]:
    echo = Echo()
    site = EdgeSite(Root({"/svc": echo}), reactor=clock, idle_timeout=75)
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
    if not fast:
        channel._fast_head = lambda data: False  # type: ignore[method-assign]
    transport = Transport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
    channel.makeConnection(transport)
    return channel, transport, echo


HEADS = [
    b"GET /svc/a?q=1 HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\nhost: h\r\nX-A: 1\r\nx-a:  2 \t\r\nCookie: a=b\r\n\r\n",
    b"GET /svc HTTP/1.0\r\nHost: h\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\nConnection: close, x-foo\r\nX-Foo: 1\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
    b"GET /svc/%7Ea//b HTTP/1.1\r\n\r\n",
    b"GET /nowhere HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /svc/../admin HTTP/1.1\r\nHost: h\r\n\r\n",
    b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n",
    # Hostile or unusual: all left to the line-by-line path.
    b"GET /svc/a HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\nBad Name: 1\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\nNoColon\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\nX: a\x00b\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\nX: a\rb\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\nX: a\nb\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\nContent-Length: x\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"GET  /svc/a HTTP/1.1\r\n\r\n",
    b"GET /svc/a HTTP/2.0\r\n\r\n",
    b"\r\nGET /svc/a HTTP/1.1\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\n\r\nGET /svc/b HTTP/1.1\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\nX: " + b"a" * 20000 + b"\r\n\r\n",
    b"GET /svc/" + b"a" * 17000 + b" HTTP/1.1\r\n\r\n",
    b"GET /svc/a HTTP/1.1\r\n" + b"X: 1\r\n" * 501 + b"\r\n",
    b"GET /svc/a HTTP/1.1\r\n" + (b"X-" + b"a" * 80 + b": 1\r\n") * 200 + b"\r\n",
]


class FastHeadTests(SynchronousTestCase):
    def exchange(self, data: bytes, fast: bool) -> tuple[Any, ...]:
        clock = Clock()
        clock.advance(1_000_000)
        channel, transport, _ = connect(clock, fast)
        channel.dataReceived(data)
        out = transport.value()
        clock.advance(3)  # lingering refusals end
        clock.advance(76)
        return (out, transport.disconnecting, transport.write_closed, transport.aborted,
                sorted(c.getTime() for c in clock.getDelayedCalls() if c.active()))

    def test_same_answers_as_line_by_line(self) -> None:
        for head in HEADS:
            fast = self.exchange(head, True)
            slow = self.exchange(head, False)
            # Date is formatted per second on a real clock: mask it.
            self.assertEqual(_undated(fast[0]), _undated(slow[0]), head[:80])
            self.assertEqual(fast[1:], slow[1:], head[:80])

    def test_whole_head_one_packet_takes_the_fast_path(self) -> None:
        clock = Clock()
        channel, transport, _ = connect(clock)
        taken = []
        original = channel._fast_head

        def spy(data: bytes) -> bool:
            taken.append(original(data))
            return taken[-1]
        channel._fast_head = spy  # type: ignore[method-assign]
        channel.dataReceived(HEADS[0])
        channel.dataReceived(HEADS[1])
        self.assertEqual(taken, [True, True])
        self.assertEqual(transport.value().count(b"HTTP/1.1 200 OK"), 2)


def _undated(data: bytes) -> bytes:
    return b"\r\n".join(line for line in data.split(b"\r\n")
                        if not line.lower().startswith(b"date:"))


class ParkedIdleTimerTests(SynchronousTestCase):
    def test_a_long_request_is_not_idle_and_the_timer_restarts_after_it(self) -> None:
        clock = Clock()
        channel, transport, echo = connect(clock)
        self.assertEqual(len(clock.getDelayedCalls()), 1)
        channel.dataReceived(b"GET /svc/wait HTTP/1.1\r\nHost: h\r\n\r\n")
        clock.advance(200)  # longer than idle_timeout: the request is in progress
        self.assertFalse(transport.disconnecting)
        echo.waiting.pop().finish()
        clock.advance(74)
        self.assertFalse(transport.disconnecting)
        clock.advance(1.5)
        self.assertTrue(transport.disconnecting)

    def test_the_same_call_is_reused_and_nothing_is_left_after_close(self) -> None:
        clock = Clock()
        channel, transport, echo = connect(clock)
        call = clock.getDelayedCalls()[0]
        for _ in range(3):
            channel.dataReceived(b"GET /svc/wait HTTP/1.1\r\nHost: h\r\n\r\n")
            clock.advance(10)
            echo.waiting.pop().finish()
            self.assertEqual(clock.getDelayedCalls(), [call])
            self.assertEqual(call.getTime(), clock.seconds() + 75)
        channel.dataReceived(b"GET /svc/wait HTTP/1.1\r\nHost: h\r\n\r\n")
        channel.connectionLost(Exception("gone"))  # type: ignore[arg-type]
        self.assertEqual([c for c in clock.getDelayedCalls() if c.active()], [])

    def test_idle_connection_times_out(self) -> None:
        clock = Clock()
        channel, transport, echo = connect(clock)
        channel.dataReceived(b"GET /svc/a HTTP/1.1\r\nHost: h\r\n\r\n")
        clock.advance(74)
        self.assertFalse(transport.disconnecting)
        clock.advance(2)
        self.assertTrue(transport.disconnecting)


class EdgeRuleTests(SynchronousTestCase):
    """Issue 13's edge rules in memory: answers come without advancing the clock."""

    def answer(self, data: bytes, fast: bool = True) -> tuple[bytes, Clock, Transport]:
        clock = Clock()
        channel, transport, echo = connect(clock, fast)
        echo.max_body = 10 * 1024 * 1024  # type: ignore[attr-defined]
        channel.dataReceived(data)
        return transport.value(), clock, transport  # type: ignore[return-value]

    def test_garbage_first_bytes_are_400_without_the_head_deadline(self) -> None:
        for data in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\x00", b"\xff\xfe\x00",
                     b"\r\n\x16\x03\x01", b"G\x00T / HTTP/1.1\r\n", b"{\"json\": 1}"):
            for fast in (True, False):
                out, clock, transport = self.answer(data, fast)
                # Clock never advanced: no deadline could have fired.
                self.assertTrue(out.startswith(b"HTTP/1.1 400 "), (data, out[:80]))
                self.assertIn(b"application/json", out)
                self.assertTrue(transport.write_closed, data)
        out, _, _ = self.answer(b"\x16\x03\x01\x02\x00")
        self.assertIn(b"not TLS", out)

    def test_garbage_split_across_reads_is_400_at_once(self) -> None:
        clock = Clock()
        channel, transport, _ = connect(clock)
        channel.dataReceived(b"\r\n")
        channel.dataReceived(b"GE")
        self.assertEqual(transport.value(), b"")
        channel.dataReceived(b"\x00T")
        self.assertTrue(transport.value().startswith(b"HTTP/1.1 400 "))

    def test_a_leading_empty_line_and_a_split_request_line_still_work(self) -> None:
        for parts in ([b"\r\nGET /svc/a HTTP/1.1\r\nHost: h\r\n\r\n"],
                      [b"G", b"ET /svc/a HTTP/1.1\r\n", b"Host: h\r\n\r\n"],
                      [b"\r\n", b"GET /svc/a HTTP/1.1\r\nHost: h\r\n\r\n"]):
            clock = Clock()
            channel, transport, _ = connect(clock)
            for part in parts:
                channel.dataReceived(part)
            self.assertTrue(transport.value().startswith(b"HTTP/1.1 200 "), parts)

    def host(self, value: bytes) -> list[bytes]:
        """What both parsers answer for a GET with ``Host: value``."""
        return [self.answer(b"GET /svc/a HTTP/1.1\r\nHost: " + value + b"\r\n\r\n", fast)[0]
                for fast in (True, False)]

    def assertHostRefused(self, value: bytes) -> None:
        for out in self.host(value):
            self.assertTrue(out.startswith(b"HTTP/1.1 400 "), (value, out[:80]))
            self.assertIn(b"Host header", out)

    def test_empty_host_is_400(self) -> None:
        self.assertHostRefused(b"")

    def test_host_list_is_400(self) -> None:
        self.assertHostRefused(b"a, b")
        self.assertHostRefused(b"a,b")

    def test_host_with_userinfo_is_400(self) -> None:
        self.assertHostRefused(b"user@evil")
        self.assertHostRefused(b"user:pw@evil:80")

    def test_host_with_a_path_is_400(self) -> None:
        self.assertHostRefused(b"evil/x")
        self.assertHostRefused(b"evil?x")

    def test_host_with_a_space_is_400(self) -> None:
        self.assertHostRefused(b"a b")
        self.assertHostRefused(b"a\tb")

    def test_host_with_a_bad_port_or_literal_is_400(self) -> None:
        for value in (b"h:", b"h:99999", b"h:8x", b"[::g]", b"[v1.x]", b"[fe80::1%25eth0]",
                      b"::1", b"[::1"):
            self.assertHostRefused(value)

    def test_valid_hosts_pass(self) -> None:
        for value in (b"h", b"h:8080", b"example.com", b"127.0.0.1:80", b"[::1]", b"[::1]:8080",
                      b"xn--bcher-kva.example", b"a_b.local", b"%41b"):
            for out in self.host(value):
                self.assertTrue(out.startswith(b"HTTP/1.1 200 "), (value, out[:80]))
                self.assertIn(repr([(b"Host", [value])]).encode(), out)

    def test_http_1_0_with_an_invalid_host_is_400(self) -> None:
        out, _, _ = self.answer(b"GET /svc/a HTTP/1.0\r\nHost: a b\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:80])

    def chunked(self, body: bytes) -> bytes:
        return self.answer(b"POST /svc/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                           b"Connection: close\r\n\r\n" + body)[0]

    def test_one_byte_chunks_are_400_after_the_free_ones(self) -> None:
        from cgipool.proxy.edge import CHUNKS_FREE

        out = self.chunked(b"1\r\nx\r\n" * (CHUNKS_FREE - 1) + b"0\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out[:80])  # 256 chunks: fine
        out = self.chunked(b"1\r\nx\r\n" * (CHUNKS_FREE + 50) + b"0\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:80])
        self.assertIn(b"chunked body with 257 chunks", out)

    def test_large_chunks_pass(self) -> None:
        out = self.chunked((b"2000\r\n" + b"y" * 0x2000 + b"\r\n") * 600 + b"0\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out[:80])  # 4.8 MB in 600 chunks

    def test_trailer_lines_count_as_chunks(self) -> None:
        out = self.chunked(b"3\r\nabc\r\n0\r\n" + b"X: 1\r\n" * 300 + b"\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:80])
        out = self.chunked(b"3\r\nabc\r\n0\r\nX: 1\r\nY: 2\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out[:80])

    def test_chunk_extensions_count_as_framing(self) -> None:
        out = self.chunked((b"1;e=" + b"v" * 900 + b"\r\nx\r\n") * 30 + b"0\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:80])
        self.assertIn(b"bytes of chunk framing", out)
