"""The client-facing edge (``EdgeProtocol``, ``EdgeSite``) in memory: a
StringTransport for the socket and a Clock for time, so every answer, timer
and pause is checked without a sleep.

The central check is a split-anywhere equivalence: however a request's bytes
are cut between reads, the answer is the same, byte for byte (Date aside).
``Transport`` and ``connect`` are the harness other edge tests use too.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from cgipool.proxy.edge import (
    ABORT_TIMEOUT,
    BODY_TIMEOUT,
    CHUNKS_FREE,
    LINGER_SECONDS,
    MIN_BODY_RATE,
    MAX_PIPELINED,
    EdgeProtocol,
    EdgeSite,
)
from cgipool.proxy.routes import Root

PEER = IPv4Address("TCP", "127.0.0.1", 1234)
IDLE = 75


@implementer(IPushProducer)
class Producer:
    """A response body's producer (a worker connection): records what it is told."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def pauseProducing(self) -> None:
        self.calls.append("pause")

    def resumeProducing(self) -> None:
        self.calls.append("resume")

    def stopProducing(self) -> None:
        self.calls.append("stop")


class Echo(Resource):
    """Answers with what it was given (its body included).  ``/svc/wait`` leaves
    the request open, ``/svc/stream`` too with a producer registered,
    ``/svc/unsized`` answers without a length."""

    isLeaf = True
    #: Read by routing (Root.lookup): the body limit of the route.
    max_body = 10 * 1024 * 1024

    def __init__(self) -> None:
        super().__init__()
        self.waiting: list[Any] = []
        self.rendered: list[bytes] = []
        self.producers: list[Producer] = []

    def render(self, request: Any) -> Any:
        target = request.upstream_target
        self.rendered.append(target)
        if target.startswith(b"/wait"):
            self.waiting.append(request)
            return NOT_DONE_YET
        if target.startswith(b"/stream"):
            producer = Producer()
            self.producers.append(producer)
            request.registerProducer(producer, True)
            self.waiting.append(request)
            return NOT_DONE_YET
        if target.startswith(b"/unsized"):
            request.write(b"no length given")
            request.finish()
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"text/plain")
        return repr((request.method, request.uri, request.path, request.clientproto,
                     target, list(request.requestHeaders.getAllRawHeaders()),
                     request.content.read())).encode()


class Transport(StringTransport):
    """A TCP transport in memory: StringTransport plus the half-close, the
    abort and the Nagle switch the edge uses, and the edge's pauses of reading
    recorded (``reading``) instead of refused once the connection is closing."""

    def __init__(self, hostAddress: Any = None, peerAddress: Any = None) -> None:
        super().__init__(hostAddress, peerAddress)
        self.write_closed = False
        self.aborted = False
        self.no_delay = False
        #: "pause" and "resume" of reading from the client, in order.
        self.reading: list[str] = []

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True

    def setTcpNoDelay(self, enabled: bool) -> None:
        self.no_delay = enabled

    def pauseProducing(self) -> None:
        self.reading.append("pause")
        self.producerState = "paused"

    def resumeProducing(self) -> None:
        self.reading.append("resume")
        self.producerState = "producing"


@dataclass
class Connection:
    """One client connection to an edge site, and what answers it."""

    protocol: EdgeProtocol
    transport: Transport
    echo: Echo
    site: EdgeSite
    clock: Clock

    def send(self, *reads: bytes) -> bytes:
        """Each of ``reads`` as one read from the client; all that was answered so far."""
        for data in reads:
            self.protocol.dataReceived(data)
        return self.transport.value()

    def pending_calls(self) -> list[float]:
        return sorted(call.getTime() for call in self.clock.getDelayedCalls() if call.active())


def connect(clock: Clock | None = None, **site_options: Any) -> Connection:
    """A client connected to an ``EdgeSite`` routing ``/svc`` to an :class:`Echo`."""
    clock = clock if clock is not None else Clock()
    echo = Echo()
    site_options.setdefault("idle_timeout", IDLE)
    site = EdgeSite(Root({"/svc": echo}), reactor=clock, **site_options)
    protocol = site.buildProtocol(PEER)
    transport = Transport(peerAddress=PEER)
    protocol.makeConnection(transport)
    return Connection(protocol, transport, echo, site, clock)


def undated(data: bytes) -> bytes:
    """``data`` without its Date header lines (formatted from the wall clock)."""
    return b"\r\n".join(line for line in data.split(b"\r\n")
                        if not line.lower().startswith(b"date:"))


def responses(raw: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """The responses in ``raw``, in order: (status, headers, body), a chunked
    body decoded; a body with neither a length nor chunks runs to the end."""
    out = []
    while raw:
        head, _, raw = raw.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        status = int(lines[0].split(b" ")[1])
        if status == 100:
            continue
        if headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size_line, _, raw = raw.partition(b"\r\n")
                size = int(size_line, 16)
                body, raw = body + raw[:size], raw[size + 2:]
                if not size:
                    break
        else:
            length = int(headers.get(b"content-length", len(raw)))
            body, raw = raw[:length], raw[length:]
        out.append((status, headers, body))
    return out


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


#: Request bytes whose answer must not depend on where reads end, and the
#: status of each answer.
REQUESTS: list[tuple[bytes, list[int]]] = [
    (b"GET /svc/a?q=1 HTTP/1.1\r\nHost: h\r\n\r\n", [200]),
    (b"GET /svc/a HTTP/1.1\r\nhost: h\r\nX-A: 1\r\nx-a:  2 \t\r\nCookie: a=b\r\n\r\n", [200]),
    (b"GET /svc HTTP/1.0\r\nHost: h\r\n\r\n", [200]),
    (b"GET /svc HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n", [200]),
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\nConnection: close, x-foo\r\nX-Foo: 1\r\n\r\n", [200]),
    (b"GET /svc/%7Ea//b HTTP/1.1\r\nHost: h\r\n\r\n", [200]),
    (b"GET /nowhere HTTP/1.1\r\nHost: h\r\n\r\n", [404]),
    (b"GET /svc/../admin HTTP/1.1\r\nHost: h\r\n\r\n", [400]),
    (b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", [200]),
    (b"GET * HTTP/1.1\r\nHost: h\r\n\r\n", [405]),
    (b"CONNECT h:443 HTTP/1.1\r\nHost: h:443\r\n\r\n", [405]),
    (b"\r\nGET /svc/a HTTP/1.1\r\nHost: h\r\n\r\n", [200]),
    # Bodies: a length, chunks with an extension and a trailer, 100-continue, LFs.
    (b"POST /svc/a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello", [200]),
    (b"POST /svc/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n", [200]),
    (b"PUT /svc/a HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\nok",
     [200]),
    (b"POST /svc/a HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\n\n\na\nb", [200]),
    # Pipelined: answered in order.
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\n\r\nGET /svc/b HTTP/1.1\r\nHost: h\r\n"
     b"Connection: close\r\n\r\n", [200, 200]),
    # Pipelined after another in the same read: checked as if it began a read.
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\n\r\nGET  /svc/b HTTP/1.1\r\nHost: h\r\n\r\n",
     [200, 400]),
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\n\r\n\r\nGET /svc/b  HTTP/1.1\r\nHost: h\r\n\r\n",
     [200, 400]),
    (b"POST /svc/a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET /svc/b HTTP/1.1 \r\n"
     b"Host: h\r\n\r\n", [200, 400]),
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\n\r\nBREW /svc/b HTTP/1.1\r\nHost: h\r\n\r\n",
     [200, 501]),
    (b"POST /svc/a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nxyzGET /svc/b HTTP/1.1\r\n"
     b"Host: h\r\n\r\n", [200, 200]),
    # Refused.
    (b"GET /svc/a HTTP/1.1\r\n\r\n", [400]),
    (b"GET /svc/a HTTP/1.1\r\nConnection: close, x-foo\r\nX-Foo: 1\r\n\r\n", [400]),
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n", [400]),
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\n folded\r\n\r\n", [400]),
    (b"GET /svc/a HTTP/1.1\r\nBad Name: 1\r\n\r\n", [400]),
    (b"GET /svc/a HTTP/1.1\r\nNoColon\r\n\r\n", [400]),
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\nX: a\x00b\r\n\r\n", [400]),
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\nX: a\rb\r\n\r\n", [400]),
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\nX: a\nb\r\n\r\n", [400]),
    (b"GET /svc/a HTTP/1.1\nHost: h\n\n", [400]),
    (b"GET /svc/\x7f HTTP/1.1\r\nHost: h\r\n\r\n", [400]),
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n", [400]),
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     [400]),
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n\r\n", [501]),
    (b"POST /svc/a HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n"
     b"\r\n0\r\n\r\n", [400]),
    (b"POST /svc/a HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999\r\n\r\n", [413]),
    (b"GET  /svc/a HTTP/1.1\r\nHost: h\r\n\r\n", [400]),
    (b"GET /svc/a  HTTP/1.1\r\nHost: h\r\n\r\n", [400]),
    (b"GET /svc/a HTTP/1.1 \r\nHost: h\r\n\r\n", [400]),
    (b"BREW /svc/a HTTP/1.1\r\nHost: h\r\n\r\n", [501]),
    (b"GET /svc/a HTTP/2.0\r\nHost: h\r\n\r\n", [505]),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", [400]),
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 20000 + b"\r\n\r\n", [431]),
    (b"GET /svc/" + b"a" * 17000 + b" HTTP/1.1\r\nHost: h\r\n\r\n", [414]),
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\n" + b"X: 1\r\n" * 501 + b"\r\n", [431]),
    (b"GET /svc/a HTTP/1.1\r\nHost: h\r\n" + (b"X-" + b"a" * 80 + b": 1\r\n") * 200 + b"\r\n",
     [431]),
]


class SplitAnywhereTests(SynchronousTestCase):
    """However the network cuts a request, the edge answers it the same."""

    def outcome(self, reads: list[bytes]) -> tuple[Any, ...]:
        """The answer to ``reads`` (Date aside), the state of the connection,
        and the timers left once the lingering and idle ones have run."""
        clock = Clock()
        clock.advance(1_000_000)
        conn = connect(clock)
        out = undated(conn.send(*reads))
        state = (conn.transport.disconnecting, conn.transport.write_closed,
                 conn.transport.aborted)
        clock.advance(LINGER_SECONDS + 1)
        clock.advance(IDLE + 1)
        return (out, state, conn.transport.disconnecting, conn.transport.aborted,
                conn.pending_calls())

    def assertSameEverywhere(self, data: bytes, cuts: range | list[int]) -> None:
        whole = self.outcome([data])
        for cut in cuts:
            self.assertEqual(self.outcome([data[:cut], data[cut:]]), whole,
                             f"{data[:60]!r} cut at {cut}")

    def test_one_read_and_two_reads_cut_at_every_offset_answer_alike(self) -> None:
        for data, _ in REQUESTS:
            if len(data) > 4096:
                continue  # below: every offset near what matters
            self.assertSameEverywhere(data, range(1, len(data)))

    def test_large_heads_cut_near_their_limits_answer_alike(self) -> None:
        """Heads over a limit (414, 431) cut at every offset of their first
        and last 100 bytes and around every 4 KiB slice and every limit, and
        every 97 bytes in between (every offset of 55 KiB would be 55,000
        connections)."""
        for data, _ in REQUESTS:
            if len(data) <= 4096:
                continue
            cuts = set(range(1, 100)) | set(range(len(data) - 100, len(data)))
            cuts |= set(range(1, len(data), 97))
            for mark in list(range(4096, len(data), 4096)) + [16384, 16384 + 64]:
                cuts |= set(range(max(1, mark - 8), min(len(data), mark + 8)))
            self.assertSameEverywhere(data, sorted(cuts))

    def test_one_byte_per_read_answers_alike(self) -> None:
        for data, _ in REQUESTS:
            self.assertEqual(self.outcome([data[i:i + 1] for i in range(len(data))]),
                             self.outcome([data]), data[:60])

    def test_the_answers_are_the_right_ones(self) -> None:
        """The equivalence above is of real answers: each request's statuses,
        and a few bodies spelt out."""
        for data, statuses in REQUESTS:
            answers = responses(self.outcome([data])[0])
            self.assertEqual([status for status, _, _ in answers], statuses, data[:60])
        out = self.outcome([REQUESTS[0][0]])[0]
        self.assertIn(b"(b'GET', b'/svc/a?q=1', b'/svc/a', b'HTTP/1.1', b'/a?q=1'", out)
        chunked = b"3;x=1\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n"
        [(data, _)] = [request for request in REQUESTS if request[0].endswith(chunked)]
        self.assertTrue(self.outcome([data])[0].endswith(b"b'abcde')"))
        [(data, _)] = [request for request in REQUESTS if b"xyzGET" in request[0]]
        answers = responses(self.outcome([data])[0])
        self.assertEqual([body[-7:] for _, _, body in answers], [b"b'xyz')", b"], b'')"])


class IdleTimerTests(SynchronousTestCase):
    """The idle timer: site.timeOut of no request in progress closes a connection."""

    def test_a_long_request_is_not_idle_and_the_timer_restarts_after_it(self) -> None:
        conn = connect()
        conn.send(b"GET /svc/wait HTTP/1.1\r\nHost: h\r\n\r\n")
        conn.clock.advance(IDLE * 3)  # longer than the idle timeout: in progress
        self.assertFalse(conn.transport.disconnecting)
        conn.echo.waiting.pop().finish()
        conn.clock.advance(IDLE - 1)
        self.assertFalse(conn.transport.disconnecting)
        conn.clock.advance(1.5)
        self.assertTrue(conn.transport.disconnecting)

    def test_an_idle_keep_alive_connection_is_closed_then_aborted(self) -> None:
        """Closed after timeOut without a request; aborted ABORT_TIMEOUT later
        when the client does not let it go."""
        conn = connect()
        answer = conn.send(b"GET /svc/a HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(status_of(answer), 200)
        conn.clock.advance(IDLE - 1)
        self.assertFalse(conn.transport.disconnecting)
        conn.clock.advance(1.5)
        self.assertTrue(conn.transport.disconnecting)
        self.assertFalse(conn.transport.aborted)
        conn.clock.advance(ABORT_TIMEOUT + 0.5)
        self.assertTrue(conn.transport.aborted)
        self.assertEqual(conn.transport.value(), answer, "closed without another word")

    def test_the_idle_timer_counts_from_the_last_answer_though_it_is_not_moved(self) -> None:
        """The idle deadline is not moved per request (a cost on every request):
        when it passes after a request answered since, the connection gets
        what is left of its timeOut from that answer, no less."""
        conn = connect()
        conn.clock.advance(IDLE - 1)
        self.assertEqual(status_of(conn.send(b"GET /svc/a HTTP/1.1\r\nHost: h\r\n\r\n")), 200)
        conn.clock.advance(IDLE - 1)  # the first deadline passed meanwhile
        self.assertFalse(conn.transport.disconnecting)
        conn.clock.advance(1.5)
        self.assertTrue(conn.transport.disconnecting)

    def test_a_connection_that_never_sends_is_closed_after_the_idle_timeout(self) -> None:
        conn = connect()
        conn.clock.advance(IDLE + 0.5)
        self.assertTrue(conn.transport.disconnecting)
        self.assertEqual(conn.transport.value(), b"")

    def test_one_timer_for_the_deadlines_and_none_left_after_close(self) -> None:
        """The edge's deadlines share the site's one timer (no callLater per
        request); a closed connection leaves nothing watched, and the timer
        goes once it has passed."""
        conn = connect()
        for _ in range(3):
            conn.send(b"GET /svc/wait HTTP/1.1\r\nHost: h\r\n\r\n")
            conn.clock.advance(10)
            conn.echo.waiting.pop().finish()
            self.assertLessEqual(len(conn.pending_calls()), 1)
            self.assertEqual(conn.site.head_deadlines.count, 1)  # this idle deadline
        conn.send(b"GET /svc/wait HTTP/1.1\r\nHost: h\r\n\r\n")
        conn.protocol.connectionLost(Exception("gone"))  # type: ignore[arg-type]
        self.assertEqual(conn.site.head_deadlines.count, 0)
        conn.clock.advance(IDLE + 1)
        self.assertEqual(conn.pending_calls(), [])
        self.assertFalse(conn.transport.disconnecting, "no deadline fired for it")


class HeadDeadlineTests(SynchronousTestCase):
    """A request head must be whole within site.header_timeout (→ 408)."""

    def test_a_head_that_does_not_arrive_in_time_is_408(self) -> None:
        conn = connect()
        timeout = conn.site.header_timeout
        conn.send(b"GET /svc/a HTTP/1.1\r\nHost: h\r\n")
        conn.clock.advance(timeout - 0.1)
        self.assertEqual(conn.transport.value(), b"")
        conn.clock.advance(conn.site.head_deadlines.tick + 0.1)
        status, headers, body = responses(conn.transport.value())[0]
        self.assertEqual(status, 408)
        self.assertEqual(headers[b"connection"], b"close")
        self.assertIn("request head", json.loads(body)["error"])
        self.assertTrue(conn.transport.write_closed)
        self.assertFalse(conn.transport.aborted, "it lingers so the client sees the 408")
        conn.clock.advance(LINGER_SECONDS + 0.1)
        self.assertTrue(conn.transport.aborted)

    def test_a_head_trickled_byte_by_byte_is_408_all_the_same(self) -> None:
        """The head deadline runs from the head's first byte: a slowloris
        sending a byte every half second does not restart it."""
        conn = connect()
        began = conn.clock.seconds()
        head = b"GET /svc/a HTTP/1.1\r\nHost: h\r\nX-Slow: " + b"a" * 1000
        for byte in range(len(head)):
            conn.send(head[byte:byte + 1])
            conn.clock.advance(0.5)
            if conn.transport.value():
                break
        self.assertEqual(status_of(conn.transport.value()), 408)
        waited = conn.clock.seconds() - began
        self.assertGreaterEqual(waited, conn.site.header_timeout)
        tick = conn.site.head_deadlines.tick
        self.assertLessEqual(waited, conn.site.header_timeout + 0.5 + tick)

    def test_the_head_deadline_ends_with_the_head(self) -> None:
        """A head that arrives in time, in pieces, is answered; the head's
        deadline does not fire later on the kept-alive connection."""
        conn = connect()
        timeout = conn.site.header_timeout
        conn.send(b"GET /svc/a HTTP/1.1\r\n")
        conn.clock.advance(timeout - 1)
        conn.send(b"Host: h\r\n\r\n")
        conn.clock.advance(timeout * 2)
        self.assertEqual([r[0] for r in responses(conn.transport.value())], [200])
        self.assertFalse(conn.transport.disconnecting)


class BodyDeadlineTests(SynchronousTestCase):
    """A body has BODY_TIMEOUT plus one second per MIN_BODY_RATE bytes received."""

    HEAD = b"POST /svc/a HTTP/1.1\r\nHost: h\r\nContent-Length: 100000\r\n\r\n"

    def test_a_body_that_does_not_come_is_408_after_body_timeout(self) -> None:
        conn = connect()
        conn.send(self.HEAD)
        conn.clock.advance(BODY_TIMEOUT - 0.1)
        self.assertEqual(conn.transport.value(), b"")
        conn.clock.advance(conn.site.head_deadlines.tick + 0.1)
        status, _, body = responses(conn.transport.value())[0]
        self.assertEqual(status, 408)
        self.assertIn(f"at least {MIN_BODY_RATE} bytes/s", json.loads(body)["error"])
        self.assertEqual(conn.echo.rendered, [], "nothing was dispatched")

    def test_bytes_received_extend_the_deadline_by_min_body_rate(self) -> None:
        conn = connect()
        conn.send(self.HEAD, b"x" * (10 * MIN_BODY_RATE))  # ten seconds of credit
        conn.clock.advance(BODY_TIMEOUT + 10 - 0.1)
        self.assertEqual(conn.transport.value(), b"")
        conn.clock.advance(conn.site.head_deadlines.tick + 0.1)
        self.assertEqual(status_of(conn.transport.value()), 408)

    def test_a_body_trickled_below_min_body_rate_is_408(self) -> None:
        """One byte a second keeps the connection no longer than about
        BODY_TIMEOUT: an idle timer restarting per byte would keep it forever."""
        conn = connect()
        conn.send(self.HEAD)
        seconds = 0
        while not conn.transport.value():
            conn.send(b"x")
            conn.clock.advance(1)
            seconds += 1
            self.assertLess(seconds, BODY_TIMEOUT + 2, "not cut in time")
        self.assertEqual(status_of(conn.transport.value()), 408)
        self.assertGreaterEqual(seconds, BODY_TIMEOUT)

    def test_a_slow_upload_at_min_body_rate_is_answered(self) -> None:
        conn = connect()
        conn.send(b"POST /svc/a HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n"
                  % (40 * MIN_BODY_RATE))
        for _ in range(40):  # twice BODY_TIMEOUT, at the minimum rate
            conn.send(b"x" * MIN_BODY_RATE)
            conn.clock.advance(1)
        self.assertEqual(status_of(conn.transport.value()), 200)
        conn.clock.advance(BODY_TIMEOUT * 2)
        self.assertEqual(len(responses(conn.transport.value())), 1)
        self.assertFalse(conn.transport.disconnecting)


class EdgeRuleTests(SynchronousTestCase):
    """Issue 13's edge rules: answers come without advancing the clock."""

    def answer(self, *reads: bytes) -> tuple[bytes, Transport]:
        conn = connect()
        return conn.send(*reads), conn.transport

    def test_an_upgrade_request_with_a_body_is_refused_not_split_in_two(self) -> None:
        """llhttp skips an upgrade request's body and parses it as the next
        request: a smuggled request.  With a body (length or chunked) such a
        request is refused, and nothing after it is answered."""
        smuggled = b"GET /svc/smuggled HTTP/1.1\r\nHost: h\r\n\r\n"
        for framing, body in ((b"Content-Length: %d\r\n" % len(smuggled), smuggled),
                              (b"Transfer-Encoding: chunked\r\n",
                               b"%x\r\n%s\r\n0\r\n\r\n" % (len(smuggled), smuggled))):
            out, transport = self.answer(
                b"POST /svc/a HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\n" + framing + b"\r\n" + body)
            self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:80])
            self.assertEqual(out.count(b"HTTP/1.1 "), 1, out)
            self.assertNotIn(b"smuggled", out)
            self.assertTrue(transport.write_closed)

    def test_every_control_character_in_a_header_value_is_400(self) -> None:
        """The edge leaves this check to llhttp (strict by default; head_problem
        checks only the target): a parser built lenient, or a change of its
        defaults, fails here.  HTAB is allowed (RFC 9110 5.5), obs-text too."""
        for byte in [*range(0x00, 0x09), *range(0x0a, 0x20), 0x7f]:
            data = b"GET /svc/a HTTP/1.1\r\nHost: h\r\nX-A: a%sb\r\n\r\n" % bytes([byte])
            out, transport = self.answer(data)
            self.assertTrue(out.startswith(b"HTTP/1.1 400 "), (byte, out[:80]))
            self.assertIn(b"application/json", out)
        for allowed in (b"\t", b"\x80", b"\xff"):
            out, _ = self.answer(b"GET /svc/a HTTP/1.1\r\nHost: h\r\nX-A: a%sb\r\n\r\n" % allowed)
            self.assertTrue(out.startswith(b"HTTP/1.1 200 "), (allowed, out[:80]))

    def test_garbage_first_bytes_are_400_without_the_head_deadline(self) -> None:
        for data in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\x00", b"\xff\xfe\x00",
                     b"\r\n\x16\x03\x01", b"G\x00T / HTTP/1.1\r\n", b"{\"json\": 1}"):
            out, transport = self.answer(data)
            # The clock never advanced: no deadline could have fired.
            self.assertTrue(out.startswith(b"HTTP/1.1 400 "), (data, out[:80]))
            self.assertIn(b"application/json", out)
            self.assertTrue(transport.write_closed, data)
        out, _ = self.answer(b"\x16\x03\x01\x02\x00")
        self.assertIn(b"not TLS", out)

    def test_garbage_split_across_reads_is_400_at_once(self) -> None:
        conn = connect()
        conn.send(b"\r\n", b"GE")
        self.assertEqual(conn.transport.value(), b"")
        self.assertTrue(conn.send(b"\x00T").startswith(b"HTTP/1.1 400 "))

    def test_a_leading_empty_line_and_a_split_request_line_still_work(self) -> None:
        for reads in ([b"\r\nGET /svc/a HTTP/1.1\r\nHost: h\r\n\r\n"],
                      [b"G", b"ET /svc/a HTTP/1.1\r\n", b"Host: h\r\n\r\n"],
                      [b"\r\n", b"GET /svc/a HTTP/1.1\r\nHost: h\r\n\r\n"]):
            out, _ = self.answer(*reads)
            self.assertTrue(out.startswith(b"HTTP/1.1 200 "), reads)

    def test_a_request_line_with_extra_spaces_is_400_however_it_is_split(self) -> None:
        """llhttp takes runs of spaces; the edge refuses them, also when the
        line arrives in pieces."""
        for reads in ([b"GET  /svc/a HTTP/1.1\r\nHost: h\r\n\r\n"],
                      [b"GET ", b" /svc/a HTTP/1.1\r\nHost: h\r\n\r\n"],
                      [b"GET /svc/a ", b" HTTP/1.1\r\n", b"Host: h\r\n\r\n"]):
            out, _ = self.answer(*reads)
            self.assertTrue(out.startswith(b"HTTP/1.1 400 "), (reads, out[:80]))
            self.assertIn(b"bad request line", out)

    def test_an_unknown_method_is_501_however_it_is_split(self) -> None:
        """501 naming the method, also when the read that shows llhttp it is
        unknown ("BR") ends before its space: the edge waits for the space (at
        most 64 bytes, within the head deadline) as one read would show it."""
        data = b"BREW /svc/a HTTP/1.1\r\nHost: h\r\n\r\n"
        for reads in ([data], [data[:1], data[1:]], [data[:2], data[2:]],
                      [data[:2], data[2:3], data[3:]], [data[:5], data[5:]]):
            out, _ = self.answer(*reads)
            self.assertTrue(out.startswith(b"HTTP/1.1 501 "), (reads, out[:80]))
            self.assertIn(b"method 'BREW' is not implemented", out)
        out, _ = self.answer(b"BR", b"\x00W")  # no token: 400 once it is seen
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:80])

    def test_a_method_prefix_that_never_ends_is_408(self) -> None:
        """Waiting for a method's space is bounded by the head deadline."""
        conn = connect()
        conn.send(b"BR")
        self.assertEqual(conn.transport.value(), b"")
        conn.clock.advance(conn.site.header_timeout + conn.site.head_deadlines.tick + 0.1)
        self.assertEqual(status_of(conn.transport.value()), 408)

    def test_a_trailing_space_in_the_request_line_is_not_called_a_bare_lf(self) -> None:
        """``HTTP/1.1 \\r\\n`` ends with CRLF: the message says the line is
        malformed, whether it is seen whole, split or pipelined."""
        line = b"GET /svc/a HTTP/1.1 \r\nHost: h\r\n\r\n"
        for reads in ([line], [line[:20], line[20:]],
                      [b"GET /svc/b HTTP/1.1\r\nHost: h\r\n\r\n" + line]):
            error = json.loads(responses(self.answer(*reads)[0])[-1][2])["error"]
            self.assertNotIn("bare LF", error, reads)
            self.assertIn("request line", error, reads)

    def test_a_malformed_request_after_a_chunked_body_in_one_read_is_400(self) -> None:
        """The pipelined request's start is found past the chunked framing."""
        out, _ = self.answer(b"POST /svc/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked"
                             b"\r\n\r\n3;x=1\r\nabc\r\n0\r\nX-T: 1\r\n\r\n"
                             b"GET  /svc/b HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual([s for s, _, _ in responses(out)], [200, 400])
        self.assertIn(b"bad request line", out)

    def test_a_bad_pipelined_start_is_not_blamed_on_the_request_before_it(self) -> None:
        """A request that begins inside a read, after another, is refused for
        its own bytes (not the read's first, the earlier request's method)."""
        for bad, status in ((b"\x16\x03\x01\x00", 400),
                            (b"BREW /svc/b HTTP/1.1\r\nHost: h\r\n\r\n", 501)):
            out, transport = self.answer(b"GET /svc/a HTTP/1.1\r\nHost: h\r\n\r\n" + bad)
            answers = responses(out)
            self.assertEqual([s for s, _, _ in answers], [200, status], bad)
            self.assertNotIn(b"GET", answers[1][2])
            self.assertTrue(transport.write_closed)

    def assertHostRefused(self, value: bytes) -> None:
        out, _ = self.answer(b"GET /svc/a HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), (value, out[:80]))
        self.assertIn(b"Host header", out)

    def test_a_host_that_is_not_host_and_port_is_400(self) -> None:
        """Empty, a list, userinfo, a path, a space, a bad port or IP literal:
        each a way for hops to disagree on the host (RFC 9112 3.2)."""
        for value in (b"", b"a, b", b"a,b", b"user@evil", b"user:pw@evil:80", b"evil/x",
                      b"evil?x", b"a b", b"a\tb", b"h:", b"h:99999", b"h:8x", b"[::g]",
                      b"[v1.x]", b"[fe80::1%25eth0]", b"::1", b"[::1"):
            self.assertHostRefused(value)

    def test_missing_or_repeated_host_in_http_1_1_is_400(self) -> None:
        for data in (b"GET /svc/a HTTP/1.1\r\n\r\n",
                     b"GET /svc/a HTTP/1.1\r\nHost: h\r\nhost: h\r\n\r\n"):
            out, _ = self.answer(data)
            self.assertTrue(out.startswith(b"HTTP/1.1 400 "), (data, out[:80]))
            self.assertIn(b"Host header", out)

    def test_valid_hosts_pass(self) -> None:
        """Names, ports, IPv4 and IPv6 literals, IDNA and escapes are not refused
        (and reach the service as sent)."""
        for value in (b"h", b"h:8080", b"example.com", b"127.0.0.1:80", b"[::1]", b"[::1]:8080",
                      b"xn--bcher-kva.example", b"a_b.local", b"%41b"):
            out, _ = self.answer(b"GET /svc/a HTTP/1.1\r\nHost: " + value + b"\r\n\r\n")
            self.assertTrue(out.startswith(b"HTTP/1.1 200 "), (value, out[:80]))
            self.assertIn(repr([(b"Host", [value])]).encode(), out)

    def test_http_1_0_may_omit_host_but_not_send_an_invalid_one(self) -> None:
        out, _ = self.answer(b"GET /svc/a HTTP/1.0\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out[:80])
        out, _ = self.answer(b"GET /svc/a HTTP/1.0\r\nHost: a b\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:80])

    def chunked(self, body: bytes) -> bytes:
        return self.answer(b"POST /svc/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
                           b"Connection: close\r\n\r\n" + body)[0]

    def test_one_byte_chunks_are_400_after_the_free_ones(self) -> None:
        out = self.chunked(b"1\r\nx\r\n" * (CHUNKS_FREE - 1) + b"0\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out[:80])  # 256 chunks: fine
        out = self.chunked(b"1\r\nx\r\n" * (CHUNKS_FREE + 50) + b"0\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:80])
        self.assertIn(b"chunked body with %d chunks" % (CHUNKS_FREE + 1), out)

    def test_one_byte_chunks_are_400_also_one_per_read(self) -> None:
        """The bound counts chunks, not reads: a chunk a read is refused alike."""
        conn = connect()
        conn.send(b"POST /svc/a HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(CHUNKS_FREE + 50):
            if conn.transport.value():
                break
            conn.send(b"1\r\nx\r\n")
        self.assertIn(b"chunked body with %d chunks" % (CHUNKS_FREE + 1),
                      conn.transport.value())

    def test_large_chunks_pass(self) -> None:
        """The chunk bound is per byte: real clients' large chunks never meet it."""
        out = self.chunked((b"2000\r\n" + b"y" * 0x2000 + b"\r\n") * 600 + b"0\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out[:80])  # 4.8 MB in 600 chunks

    def test_trailer_lines_count_as_chunks(self) -> None:
        """Each trailer line costs a callback as a chunk does: 300 are 400, two pass."""
        out = self.chunked(b"3\r\nabc\r\n0\r\n" + b"X: 1\r\n" * 300 + b"\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:80])
        out = self.chunked(b"3\r\nabc\r\n0\r\nX: 1\r\nY: 2\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 200 "), out[:80])

    def test_chunk_extensions_count_as_framing(self) -> None:
        """Extensions are bytes the parser skips unreported: bounded as framing."""
        out = self.chunked((b"1;e=" + b"v" * 900 + b"\r\nx\r\n") * 30 + b"0\r\n\r\n")
        self.assertTrue(out.startswith(b"HTTP/1.1 400 "), out[:80])
        self.assertIn(b"bytes of chunk framing", out)

    def test_a_refusal_lingers_then_aborts(self) -> None:
        """After a refusal the write side closes at once; what the client
        still sends is read and dropped (so it sees the answer, not a reset)
        until LINGER_SECONDS."""
        conn = connect()
        out = conn.send(b"GET /svc/a HTTP/1.1\r\n\r\n")
        self.assertEqual(status_of(out), 400)
        self.assertTrue(conn.transport.write_closed)
        self.assertEqual(conn.send(b"more bytes that are dropped"), out)
        self.assertFalse(conn.transport.aborted)
        conn.clock.advance(LINGER_SECONDS + 0.1)
        self.assertTrue(conn.transport.aborted)

    def test_the_protocol_is_its_transports_streaming_producer(self) -> None:
        """What backpressure rests on; and Nagle is off (an answer is one write)."""
        conn = connect()
        self.assertIs(conn.transport.producer, conn.protocol)
        self.assertTrue(conn.transport.streaming)
        self.assertTrue(conn.transport.no_delay)


class HTTP10KeepAliveTests(SynchronousTestCase):
    """HTTP/1.0 keeps its connection only when asked and when its answer has a length."""

    KEEP = b"GET /svc/a HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"

    def test_keep_alive_with_a_length_keeps_the_connection_and_says_so(self) -> None:
        conn = connect()
        [(status, headers, _)] = responses(conn.send(self.KEEP))
        self.assertEqual(status, 200)
        self.assertEqual(headers[b"connection"], b"keep-alive")
        self.assertIn(b"content-length", headers)
        self.assertFalse(conn.transport.disconnecting)
        conn.transport.clear()
        [(status, headers, body)] = responses(conn.send(
            b"GET /svc/b HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"))
        self.assertEqual((status, headers[b"connection"]), (200, b"keep-alive"))
        self.assertIn(b"b'/svc/b'", body)
        self.assertFalse(conn.transport.disconnecting)

    def test_a_second_request_without_keep_alive_is_answered_then_closed(self) -> None:
        conn = connect()
        conn.send(self.KEEP)
        answers = responses(conn.send(b"GET /svc/b HTTP/1.0\r\nHost: h\r\n\r\n"))
        self.assertEqual([(s, h[b"connection"]) for s, h, _ in answers],
                         [(200, b"keep-alive"), (200, b"close")])
        self.assertTrue(conn.transport.disconnecting)

    def test_without_keep_alive_the_connection_closes(self) -> None:
        conn = connect()
        [(status, headers, _)] = responses(conn.send(b"GET /svc/a HTTP/1.0\r\nHost: h\r\n\r\n"))
        self.assertEqual((status, headers[b"connection"]), (200, b"close"))
        self.assertTrue(conn.transport.disconnecting)

    def test_keep_alive_with_an_unknown_length_closes_to_end_the_body(self) -> None:
        """An HTTP/1.0 body without a length can only end with the connection
        (no chunked encoding in 1.0), whatever the client asked."""
        conn = connect()
        [(status, headers, body)] = responses(conn.send(
            b"GET /svc/unsized HTTP/1.0\r\nHost: h\r\nConnection: keep-alive\r\n\r\n"))
        self.assertEqual((status, headers[b"connection"], body), (200, b"close",
                                                                   b"no length given"))
        self.assertNotIn(b"transfer-encoding", headers)
        self.assertTrue(conn.transport.disconnecting)

    def test_http_1_1_without_a_length_is_chunked_and_kept(self) -> None:
        conn = connect()
        out = conn.send(b"GET /svc/unsized HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertIn(b"Transfer-Encoding: chunked\r\n", out)
        self.assertTrue(out.endswith(b"\r\n\r\nf\r\nno length given\r\n0\r\n\r\n"), out)
        self.assertFalse(conn.transport.disconnecting)


class PipeliningTests(SynchronousTestCase):
    """Requests sent before their predecessors' answers are answered in order."""

    GET = b"GET /svc/%s HTTP/1.1\r\nHost: h\r\n\r\n"

    def test_three_requests_in_one_read_are_answered_in_order(self) -> None:
        conn = connect()
        answers = responses(conn.send(self.GET % b"a" + self.GET % b"b" + self.GET % b"c"))
        self.assertEqual([(s, b.split(b", ")[4]) for s, _, b in answers],
                         [(200, b"b'/a'"), (200, b"b'/b'"), (200, b"b'/c'")])
        self.assertFalse(conn.transport.disconnecting)

    def test_requests_behind_an_unfinished_answer_wait_for_it(self) -> None:
        """Later requests are not started (nor read further) while the first
        is answered; then in order."""
        conn = connect()
        out = conn.send(self.GET % b"wait" + self.GET % b"b" + self.GET % b"c")
        self.assertEqual((out, conn.echo.rendered), (b"", [b"/wait"]))
        self.assertEqual(conn.transport.producerState, "paused")
        first = conn.echo.waiting.pop()
        first.write(b"first")
        first.finish()
        answers = responses(conn.transport.value())
        self.assertEqual(conn.echo.rendered, [b"/wait", b"/b", b"/c"])
        self.assertEqual([b if b == b"first" else b.split(b", ")[4] for _, _, b in answers],
                         [b"first", b"b'/b'", b"b'/c'"])
        self.assertEqual(conn.transport.producerState, "producing")

    def test_a_pipelined_body_is_kept_until_its_turn(self) -> None:
        conn = connect()
        conn.send(self.GET % b"wait" + b"POST /svc/p HTTP/1.1\r\nHost: h\r\n"
                  b"Content-Length: 4\r\n\r\nbody")
        self.assertEqual(conn.echo.rendered, [b"/wait"])
        conn.echo.waiting.pop().finish()
        answers = responses(conn.transport.value())
        self.assertEqual(len(answers), 2)
        self.assertTrue(answers[1][2].endswith(b"b'body')"), answers[1][2])

    def test_a_refusal_of_the_third_waits_for_the_first_two_answers(self) -> None:
        conn = connect()
        conn.send(self.GET % b"wait/1" + self.GET % b"wait/2"
                  + b"GET /svc/c HTTP/1.1\r\n\r\n")  # no Host: 400
        self.assertEqual(conn.transport.value(), b"")
        self.assertFalse(conn.transport.write_closed)
        conn.echo.waiting.pop().finish()
        self.assertEqual([s for s, _, _ in responses(conn.transport.value())], [200])
        self.assertEqual(conn.echo.rendered, [b"/wait/1", b"/wait/2"])
        self.assertFalse(conn.transport.write_closed, "the 400 waits for the second answer")
        second = conn.echo.waiting.pop()
        second.write(b"second")
        second.finish()
        answers = responses(conn.transport.value())
        self.assertEqual([s for s, _, _ in answers], [200, 200, 400])
        self.assertEqual(answers[1][2], b"second")
        self.assertEqual(answers[2][1][b"connection"], b"close")
        self.assertIn("Host header", json.loads(answers[2][2])["error"])
        self.assertTrue(conn.transport.write_closed)
        self.assertEqual(conn.echo.rendered, [b"/wait/1", b"/wait/2"], "never dispatched")

    def test_a_thousand_pipelined_requests_queue_at_most_max_pipelined(self) -> None:
        """One read of 1000 tiny requests behind an unfinished answer: at most
        MAX_PIPELINED exchanges wait (the rest of the read is held and the
        client not read: backpressure, not an error); all are answered in order."""
        conn = connect()
        exchanges: list[int] = []

        class Counted(deque):  # type: ignore[type-arg]
            def append(self, exchange: Any) -> None:
                super().append(exchange)
                exchanges.append(len(self))

        conn.protocol.queue = Counted()
        conn.send(self.GET % b"wait" + b"".join(self.GET % b"%d" % i for i in range(999)))
        self.assertEqual(max(exchanges), MAX_PIPELINED)
        self.assertEqual(conn.transport.producerState, "paused")
        self.assertEqual(conn.transport.value(), b"")
        conn.echo.waiting.pop().finish()
        answers = responses(conn.transport.value())
        self.assertEqual(len(answers), 1000)
        self.assertEqual([b.split(b", ")[4] for _, _, b in answers[1:]],
                         [b"b'/%d'" % i for i in range(999)])
        self.assertEqual(max(exchanges), MAX_PIPELINED)
        self.assertEqual(conn.transport.producerState, "producing")
        self.assertFalse(conn.transport.disconnecting)

    def test_nothing_after_a_connection_close_request_is_served(self) -> None:
        conn = connect()
        answers = responses(conn.send(b"GET /svc/a HTTP/1.1\r\nHost: h\r\nConnection: close"
                                      b"\r\n\r\n" + self.GET % b"b"))
        self.assertEqual([s for s, _, _ in answers], [200])
        self.assertEqual(conn.echo.rendered, [b"/a"])
        self.assertTrue(conn.transport.disconnecting)


class BackpressureTests(SynchronousTestCase):
    """The client stops reading: the transport pauses the protocol (its producer)."""

    def test_no_pipelined_request_starts_until_the_client_reads(self) -> None:
        conn = connect()
        conn.send(PipeliningTests.GET % b"wait" + PipeliningTests.GET % b"b")
        conn.transport.producer.pauseProducing()  # the client's buffer is full
        conn.echo.waiting.pop().finish()
        self.assertEqual(conn.echo.rendered, [b"/wait"], "the second waits")
        self.assertEqual(len(responses(conn.transport.value())), 1)
        self.assertEqual(conn.transport.producerState, "paused", "nothing more is read")
        conn.transport.producer.resumeProducing()  # it reads again
        self.assertEqual(conn.echo.rendered, [b"/wait", b"/b"])
        self.assertEqual([s for s, _, _ in responses(conn.transport.value())], [200, 200])
        self.assertEqual(conn.transport.producerState, "producing")

    def test_the_answers_producer_is_paused_and_resumed_with_the_client(self) -> None:
        conn = connect()
        conn.send(b"GET /svc/stream HTTP/1.1\r\nHost: h\r\n\r\n")
        [producer] = conn.echo.producers
        request = conn.echo.waiting.pop()
        request.write(b"part")
        conn.transport.producer.pauseProducing()
        self.assertEqual(producer.calls, ["pause"])
        conn.transport.producer.resumeProducing()
        self.assertEqual(producer.calls, ["pause", "resume"])
        request.unregisterProducer()
        request.finish()
        self.assertTrue(conn.transport.value().endswith(b"4\r\npart\r\n0\r\n\r\n"))
        conn.transport.producer.pauseProducing()
        self.assertEqual(producer.calls, ["pause", "resume"], "no longer its producer")

    def test_a_producer_registered_while_the_client_is_not_reading_starts_paused(
            self) -> None:
        conn = connect()
        conn.transport.producer.pauseProducing()
        conn.send(b"GET /svc/stream HTTP/1.1\r\nHost: h\r\n\r\n")
        [producer] = conn.echo.producers
        self.assertEqual(producer.calls, ["pause"])
        conn.transport.producer.resumeProducing()
        self.assertEqual(producer.calls, ["pause", "resume"])

    def test_the_client_going_away_stops_the_answer(self) -> None:
        """A lost connection reaches whoever answers (a CGI script, a worker
        exchange): twisted.web's notifyFinish fails."""
        conn = connect()
        conn.send(b"GET /svc/wait HTTP/1.1\r\nHost: h\r\n\r\n")
        request = conn.echo.waiting.pop()
        finished: list[Any] = []
        request.notifyFinish().addBoth(finished.append)
        conn.protocol.connectionLost(Exception("gone"))  # type: ignore[arg-type]
        self.assertEqual(len(finished), 1)
        self.assertIsInstance(finished[0].value, ConnectionError)
