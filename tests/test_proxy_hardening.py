"""Proxy hardening: worker responses that must not reach the client as they are,
and responses that must not be cut or completed wrongly (one test per case)."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from cgipool.proxy.edge import EdgeSite
from cgipool.proxy.forward import ServiceProxy
from cgipool.proxy.routes import Root
from tests.support import wait_for
from tests.test_proxy import CLOSE, ProxyTestCase, ScriptedConnection, StubPool, ok_json


class UpstreamResponseTests(ProxyTestCase):
    async def test_bare_lf_in_reason_phrase_is_not_copied_to_the_client(self) -> None:
        """A worker must not be able to inject header lines / framing into the
        client response: the reason phrase is copied verbatim (bare LF inside)."""
        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes:
            return (b"HTTP/1.1 200 OK\nSet-Cookie: injected=1\nContent-Length: 0\n\n"
                    b"HTTP/1.1 200 Smuggled\r\nContent-Length: 2\r\n\r\nhi")

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        raw = await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        status_line = raw.split(b"\r\n", 1)[0]
        self.assertNotIn(b"\n", status_line)
        self.assertNotIn(b"injected", raw)

    async def test_many_interim_responses_in_one_read(self) -> None:
        """2000 '100 Continue' heads in one packet: once a RecursionError; now a
        bounded loop that gives up with 502 after MAX_INTERIM of them."""
        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes:
            return b"HTTP/1.1 100 Continue\r\n\r\n" * 2000 + ok_json(ok=True)

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        raw = await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        errors = self.flushLoggedErrors(RecursionError)
        self.assertEqual(errors, [])
        self.assertTrue(raw.startswith(b"HTTP/1.1 502 "), raw[:100])
        self.assertIn(b"invalid response", raw)

    async def test_a_few_interim_responses_then_the_answer(self) -> None:
        """Three 100 Continue heads before the real answer (below MAX_INTERIM)
        are skipped, not taken for the response: the client gets the 200."""
        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes:
            return b"HTTP/1.1 100 Continue\r\n\r\n" * 3 + ok_json(ok=True)

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        raw = await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:100])

    async def test_eof_delimited_body_cut_by_reset_is_not_a_complete_response(self) -> None:
        """A close-delimited body that ends with a RST (worker crashed mid-body)
        must not be passed off as complete: the client gets the part that came,
        then a cut, never the terminating chunk.  The worker's bytes go straight
        into its socket before the abort (no delay to hope the write went out
        first: a delayed abort on a slow machine could drop them unsent and
        test a 502 instead)."""
        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            head = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npartial"
            self.assertEqual(c.transport.getHandle().send(head), len(head))
            c.transport.abortConnection()  # RST: SO_LINGER 0 when the socket closes

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        raw = await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:100])
        self.assertIn(b"partial", raw)
        # Re-chunked to an HTTP/1.1 client: a clean terminating chunk means "complete".
        self.assertNotIn(b"\r\n0\r\n\r\n", raw)


    async def test_response_without_content_type_is_not_labelled_html(self) -> None:
        """twisted.web adds its default 'Content-Type: text/html' to any worker
        response that has none (EdgeRequest keeps defaultContentType): a plain
        body echoed by a worker becomes HTML in the browser."""
        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes:
            body = b"<script>alert(1)</script>"
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        raw = await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertNotIn(b"content-type", raw.split(b"\r\n\r\n", 1)[0].lower())

    async def test_idle_connection_that_got_stray_bytes_is_not_handed_out_again(self) -> None:
        """Bytes on an idle connection make it loseConnection(), but it stays in
        the idle list until connectionLost (a later reactor turn): a request
        dispatched in between is written to a closing connection whose answer
        is never read (NO_RESPONSE -> 502 for a POST the worker did receive)."""
        worker, wport = await self.start_worker(lambda h, b, c: ok_json())
        w = self.worker_for(wport)
        _, port = await self.start_proxy([w])
        await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertEqual(len(w.connections.idle), 1)
        conn = w.connections.idle[0]
        conn.dataReceived(b"HTTP/1.1 200 OK\r\n")  # the worker is confused

        class Recorder:
            connection = connecting = None
            outcome: list[Any] = []

            def response_started(self, *a: Any) -> None: pass
            def response_data(self, d: bytes) -> None: pass
            def response_finished(self) -> None: self.outcome.append("finished")
            def upstream_failed(self, kind: str, detail: str) -> None:
                self.outcome.append(kind)

        ex = Recorder()
        # Same reactor turn: the next request for this worker takes an idle connection.
        w.connections.send(ex, b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n")
        await wait_for(lambda: ex.outcome, 5, what="an outcome")
        self.assertEqual(ex.outcome, ["finished"],
                         f"worker received {len(worker.requests)} requests")


    async def test_abandon_on_daemon_stop_does_not_append_json_to_a_started_response(self) -> None:
        """ProxyExchange.abandon() (daemon stop after the drain timeout) once
        called finish_with_error even when the response had started: the JSON
        error went into the middle of the body and the response was finished
        cleanly, a 'complete' corrupted body.  The stop comes once the client
        has the first chunk (an event, not a delay a slow machine could outrun
        and turn into a plain 503 before any response)."""
        from tests.test_hostile_edge import Recorder

        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            c.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            # ...and the rest never comes (a long download, a slow worker)

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                       Recorder())
        self.addCleanup(client.transport.abortConnection)
        client.transport.write(b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        await wait_for(lambda: b"hello" in client.received, 10, what="the response to start")
        self.proxy.stop()  # what ProxyService.stopService does
        await wait_for(lambda: client.closed, 10, what="the cut connection")
        raw = bytes(client.received)
        self.assertNotIn(b"shutting down", raw)
        self.assertNotIn(b"\r\n0\r\n\r\n", raw)


    async def test_request_timeout_does_not_cut_a_response_that_is_streaming(self) -> None:
        """request_timeout bounds the wait for the head, then only a body that
        stops moving: a worker that answered at once and streams its body for
        longer than request_timeout (a download) is not cut mid-body.  The
        proxy's timers run on a Clock advanced 0.1 s once each byte has reached
        the client, so a slow machine cannot make a byte late (the stall that is
        cut: ClientTimeoutClockTests.test_a_stalled_worker_is_cut_by_request_timeout)."""
        from tests.test_hostile_edge import Recorder

        workers: list[ScriptedConnection] = []

        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            c.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
            workers.append(c)

        clock = Clock()
        _, wport = await self.start_worker(handler)
        pool, port = await self.start_proxy([self.worker_for(wport)], proxy_reactor=clock,
                                            request_timeout=0.35)
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                       Recorder())
        self.addCleanup(client.transport.abortConnection)
        client.transport.write(b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        def exchange() -> Any:
            return next(iter(self.proxy.exchanges), None)

        # (A short body's head may wait for the body: progress is watched at
        # the proxy, each byte one more piece of its exchange.)
        await wait_for(lambda: exchange() is not None and exchange().started, 10,
                       what="the worker's head at the proxy")
        for sent in range(1, 6):  # a byte every 0.1 s: 0.6 s in all, past request_timeout
            clock.advance(0.1)
            workers[0].transport.write(b"x")
            await wait_for(lambda: exchange() is not None and exchange().chunks == sent, 10,
                           what=f"byte {sent} of the body at the proxy")
        clock.advance(0.1)
        workers[0].transport.write(b"x")  # the last: the response is complete
        await wait_for(lambda: client.closed, 10, what="the end of the response")
        self.assertTrue(bytes(client.received).endswith(b"\r\n\r\nxxxxxx"), client.received)
        self.assertEqual(pool.timed_out, [])


class RootRouteTests(ProxyTestCase):
    async def test_root_route_sends_an_origin_form_target(self) -> None:
        """Config accepts route '/', but '/x' is forwarded as 'GET x HTTP/1.1'."""
        worker, wport = await self.start_worker(lambda h, b, c: ok_json())
        w = self.worker_for(wport)
        pool = StubPool([w])
        proxy = ServiceProxy(pool, reactor)
        self.addCleanup(proxy.stop)
        site = EdgeSite(Root({"/": proxy}), reactor=reactor)
        lport = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(lport.stopListening)
        await self.raw(lport.getHost().port,
                       b"GET /hello?x=1 HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertEqual(worker.requests[-1][0].split(b"\r\n")[0], b"GET /hello?x=1 HTTP/1.1")


class BodyLimitTests(ProxyTestCase):
    """``max_body`` per route: 413 before the body is read, nothing forwarded."""

    async def test_content_length_above_the_limit_is_refused_before_the_body(self) -> None:
        worker, wport = await self.start_worker(lambda h, b, c: ok_json())
        _, port = await self.start_proxy([self.worker_for(wport)], max_body=100)
        raw = await self.raw(port, b"POST /api/svc HTTP/1.1\r\nHost: h\r\n"
                                   b"Content-Length: 101\r\n\r\n" + b"x" * 101)
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw[:80])
        head, _, body = raw.partition(b"\r\n\r\n")
        self.assertIn(b"connection: close", head.lower())
        self.assertIn("limit of 100 bytes", json.loads(body)["error"])
        self.assertEqual(worker.requests, [])

    async def test_expect_continue_gets_413_and_no_100(self) -> None:
        """Expect: 100-continue with a length above max_body: a 413 at once and
        no 100 Continue, so the client never sends the 5 GB body."""
        worker, wport = await self.start_worker(lambda h, b, c: ok_json())
        _, port = await self.start_proxy([self.worker_for(wport)], max_body=100)
        raw = await self.raw(port, b"PUT /api/svc HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\n"
                                   b"Content-Length: 5000000000\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw[:80])
        self.assertNotIn(b"100 Continue", raw)
        self.assertEqual(worker.requests, [])

    async def test_chunked_body_growing_past_the_limit_is_refused(self) -> None:
        """A chunked body has no length to check up front: a 413 once the chunks
        pass max_body, and the worker never sees the request."""
        worker, wport = await self.start_worker(lambda h, b, c: ok_json())
        _, port = await self.start_proxy([self.worker_for(wport)], max_body=100)
        chunk = b"40\r\n" + b"y" * 64 + b"\r\n"
        raw = await self.raw(port, b"POST /api/svc HTTP/1.1\r\nHost: h\r\n"
                                   b"Transfer-Encoding: chunked\r\n\r\n" + chunk * 3 + b"0\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw[:80])
        self.assertEqual(worker.requests, [])

    async def test_body_at_the_limit_is_forwarded_whole(self) -> None:
        """max_body is inclusive: exactly 100 bytes under a limit of 100 reach
        the worker, every byte."""
        worker, wport = await self.start_worker(lambda h, b, c: ok_json())
        _, port = await self.start_proxy([self.worker_for(wport)], max_body=100)
        raw = await self.raw(port, b"POST /api/svc HTTP/1.1\r\nHost: h\r\nContent-Length: 100\r\n"
                                   + CLOSE + b"\r\n" + b"z" * 100)
        self.assertTrue(raw.startswith(b"HTTP/1.1 200 "), raw[:80])
        self.assertEqual(worker.requests[-1][1], b"z" * 100)

    async def test_admin_paths_have_a_small_limit(self) -> None:
        """A path no service route owns (/admin/…, the daemon's own) keeps the
        64 KiB default whatever a service's max_body: 70,000 bytes are a 413."""
        _, wport = await self.start_worker(lambda h, b, c: ok_json())
        _, port = await self.start_proxy([self.worker_for(wport)], max_body=10**9)
        raw = await self.raw(port, b"POST /admin/api/x HTTP/1.1\r\nHost: h\r\n"
                                   b"Content-Length: 70000\r\n\r\n")
        self.assertTrue(raw.startswith(b"HTTP/1.1 413 "), raw[:80])

    async def test_keep_alive_after_a_refusal_is_not_served(self) -> None:
        """A pipelined request after the refused one is never routed."""
        worker, wport = await self.start_worker(lambda h, b, c: ok_json())
        _, port = await self.start_proxy([self.worker_for(wport)], max_body=10)
        raw = await self.raw(port, b"POST /api/svc HTTP/1.1\r\nHost: h\r\nContent-Length: 11\r\n"
                                   b"\r\nxxxxxxxxxxxGET /api/svc HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(raw.count(b"HTTP/1.1 "), 1)
        self.assertEqual(worker.requests, [])


class _Upstream:
    """The worker connection an exchange holds: records pauses and aborts."""

    def __init__(self) -> None:
        self.transport = self
        self.paused = False
        self.aborted = False
        self.disconnected = False
        self.reused = False

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False

    def stopProducing(self) -> None:
        self.aborted = True

    def abort(self) -> None:
        self.aborted = self.disconnected = True


class _Connections:
    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, exchange: Any, data: Any, is_head: bool) -> None:
        exchange.connection = _Upstream()
        self.sent.append(exchange)


class ClientTimeoutClockTests(SynchronousTestCase):
    """client_timeout governs a client that does not read; request_timeout only
    the worker (the edge protocol on a StringTransport, and a Clock)."""

    def start(self, request_timeout: float = 5, client_timeout: float = 20) -> tuple[Any, ...]:
        from cgipool.config import RestartConfig
        from cgipool.supervisor.backoff import Backoff
        from cgipool.supervisor.worker import Worker, WorkerState
        from tests.test_edge_protocol import Transport

        clock = Clock()
        clock.advance(1000)
        worker = Worker("svc", 0, Backoff(RestartConfig()), port=1, state=WorkerState.READY,
                        pid=1000)
        worker.connections = _Connections()  # type: ignore[assignment]
        pool = StubPool([worker], request_timeout=request_timeout)
        proxy = ServiceProxy(pool, clock)
        site = EdgeSite(Root({"/api/svc": proxy}), reactor=clock, client_timeout=client_timeout)
        peer = IPv4Address("TCP", "127.0.0.1", 1234)
        protocol = site.buildProtocol(peer)
        transport = Transport(peerAddress=peer)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        exchange = worker.connections.sent[0]  # type: ignore[attr-defined]
        upstream = exchange.connection
        exchange.response_started(200, b"OK", [])  # no length: streamed with backpressure
        exchange.response_data(b"x" * 1000)
        self.assertIn(b"\r\n\r\n3e8\r\nxxx", transport.value())
        return clock, transport, exchange, upstream, pool, worker

    def run_for(self, clock: Clock, seconds: float) -> None:
        for _ in range(int(seconds * 10)):
            clock.advance(0.1)

    def test_a_client_that_does_not_read_is_cut_by_client_timeout(self) -> None:
        clock, transport, exchange, upstream, pool, worker = self.start()
        transport.producer.pauseProducing()  # the client's send buffer is full
        self.assertTrue(upstream.paused, "the worker connection is held")
        self.run_for(clock, 19)  # far past request_timeout=5
        self.assertFalse(transport.aborted)
        self.assertEqual(pool.timed_out, [])
        self.run_for(clock, 1.5)
        self.assertTrue(transport.aborted, "cut after client_timeout")
        self.assertTrue(upstream.aborted)
        self.assertEqual((pool.timed_out, pool.failed, pool.recycled), ([], [], []))
        self.assertEqual(worker.in_flight, 0)
        self.assertEqual(exchange.client.code, 499)  # the access log's "client left"
        self.assertNotIn(b"0\r\n\r\n", transport.value(), "not completed")

    def test_a_client_timeout_shorter_than_request_timeout_applies(self) -> None:
        clock, transport, exchange, upstream, pool, worker = self.start(
            request_timeout=30, client_timeout=2)
        transport.producer.pauseProducing()
        self.run_for(clock, 1.5)
        self.assertFalse(transport.aborted)
        self.run_for(clock, 1)
        self.assertTrue(transport.aborted)
        self.assertEqual(pool.timed_out, [])

    def test_a_stalled_worker_is_cut_by_request_timeout(self) -> None:
        clock, transport, exchange, upstream, pool, worker = self.start()
        # The client reads; the worker sends nothing more: cut once a check finds
        # no progress for request_timeout (checks every request_timeout: < 2×).
        self.run_for(clock, 4)
        self.assertEqual(pool.timed_out, [])
        self.run_for(clock, 7)
        self.assertEqual(len(pool.timed_out), 1)
        self.assertTrue(transport.disconnecting)
        self.assertNotIn(b"0\r\n\r\n", transport.value(), "cut, not completed")

    def test_the_workers_clock_restarts_when_the_client_reads_again(self) -> None:
        clock, transport, exchange, upstream, pool, worker = self.start()
        transport.producer.pauseProducing()
        self.run_for(clock, 15)
        transport.producer.resumeProducing()
        self.assertFalse(upstream.paused)
        self.run_for(clock, 4)
        self.assertEqual(pool.timed_out, [])  # held by the client, not stalled
        self.run_for(clock, 2)
        self.assertEqual(len(pool.timed_out), 1)  # then silent for request_timeout


class ClientTimeoutTests(ProxyTestCase):
    async def test_slow_client_cut_by_client_timeout_not_request_timeout(self) -> None:
        """Real sockets: a client that stops reading a 40 MB download is cut after
        client_timeout (0.5 s), not by request_timeout (10 s): the cut is logged as
        the client's ("too slow"), no request timed out; the worker is not blamed
        and its slot is free.  The waits are bounds below request_timeout, not
        speed targets (the timers are checked on a Clock in ClientTimeoutClockTests)."""
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        size = 40 * 1024 * 1024

        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes:
            return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"z" * size

        _, wport = await self.start_worker(handler)
        target = self.worker_for(wport)
        pool, port = await self.start_proxy([target], request_timeout=10)
        self.site.client_timeout = 0.5
        received = bytearray()

        class Reader(Protocol):
            closed = False

            def dataReceived(self, data: bytes) -> None:
                received.extend(data)

            def connectionLost(self, reason: Any = None) -> None:
                self.closed = True

        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Reader())
        self.addCleanup(client.transport.abortConnection)
        client.transport.write(b"GET /api/svc HTTP/1.1\r\nHost: h\r\n\r\n")
        await wait_for(lambda: received, 5, what="the first bytes")
        client.transport.pauseProducing()  # stop reading
        await wait_for(lambda: any("too slow" in (e.get("log_format") or "") for e in logged),
                       8, what="the client cut by client_timeout")
        await wait_for(lambda: target.in_flight == 0, 5, what="the worker slot freed")
        self.assertEqual((pool.timed_out, pool.failed), ([], []))
        client.transport.resumeProducing()
        await wait_for(lambda: client.closed, 5, what="the cut connection")
        self.assertLess(len(received), size)
