"""The lean path (forward.LeanExchange): a plain GET or HEAD forwarded without a
twisted.web Request must be indistinguishable from the general path, and every
unusual turn (a retry, an error, a timeout, a streamed response, a client or a
daemon that goes away) must end exactly as the general path ends it.

Real sockets on 127.0.0.1: scripted workers (tests.test_proxy) and a keep-alive
client that sends one request per write, as real clients do, so the edge's
one-pass parser sees a whole head and offers it to the lean path.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol

from cgipool.proxy.forward import LeanExchange
from tests.support import wait_for
from tests.test_proxy import ProxyTestCase, ScriptedConnection, dechunk, ok_json, split_response

GET = b"GET /api/svc/x?q=1 HTTP/1.1\r\nHost: example.test\r\nAccept: application/json\r\n" \
      b"User-Agent: lean-test\r\nX-Forwarded-For: 6.6.6.6\r\nX_Alias: 1\r\nCookie: a=1\r\n\r\n"
_DATE = re.compile(rb"\r\nDate: [^\r]*")


class KeepAliveClient(Protocol):
    """One client connection: each request is one write, answers are collected."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received.extend(data)

    def connectionLost(self, reason: Any = None) -> None:
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


class LeanTestCase(ProxyTestCase):
    async def connect(self, port: int) -> KeepAliveClient:
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                       KeepAliveClient())
        self.addCleanup(lambda: client.transport.abortConnection())
        return client

    async def ask(self, client: KeepAliveClient, request: bytes,
                  head_request: bool = False) -> bytes:
        client.transport.write(request)
        await wait_for(lambda: complete(bytes(client.received), head_request), 5,
                       what="the response")
        return client.take()

    def spy(self) -> list[bool]:
        """What the service's lean entry answered, request by request."""
        taken: list[bool] = []
        original = self.proxy.lean

        def lean(*args: Any) -> bool:
            result = original(*args)
            taken.append(result)
            return result

        self.proxy.lean = lean  # type: ignore[method-assign]
        return taken


class SameAsTheGeneralPathTests(LeanTestCase):
    async def test_plain_get_is_lean_and_byte_for_byte_the_general_path(self) -> None:
        worker, wport = await self.start_worker(lambda h, b, c: ok_json(ok=True))
        _, port = await self.start_proxy([self.worker_for(wport)])
        taken = self.spy()
        client = await self.connect(port)
        lean = await self.ask(client, GET)
        # A Connection header keeps a request off the lean path; keep-alive changes nothing.
        general = await self.ask(client, GET.replace(b"\r\n\r\n",
                                                     b"\r\nConnection: keep-alive\r\n\r\n"))
        self.assertEqual(taken, [True])
        self.assertEqual(_DATE.sub(b"", lean), _DATE.sub(b"", general))
        self.assertEqual(split_response(lean)[0], 200)
        (lean_head, _), (general_head, _) = worker.requests
        self.assertEqual(lean_head, general_head)
        lines = lean_head.split(b"\r\n")
        self.assertEqual(lines[0], b"GET /x?q=1 HTTP/1.1")
        self.assertIn(b"X-Forwarded-For: 127.0.0.1", lines)
        self.assertIn(b"X-Forwarded-Host: example.test", lines)
        self.assertNotIn(b"6.6.6.6", lean_head)
        self.assertNotIn(b"X_Alias", lean_head)
        self.assertEqual(self.proxy.exchanges, set())
        self.assertEqual(self.pool.workers[0].in_flight, 0)

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
        taken = self.spy()
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
        self.assertEqual(split_response(
            await self.ask(client, b"HEAD /api/svc/a HTTP/1.1\r\nHost: h\r\n\r\n", True))[0],
            200)
        self.assertEqual(taken, [True] * 4)

    async def test_pipelined_request_waits_for_the_lean_one(self) -> None:
        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes | None:
            if b"slow" in h:
                reactor.callLater(0.1, c.transport.write, ok_json(n="slow"))
                return None
            return ok_json(n="fast")

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)], concurrency=4)
        client = await self.connect(port)
        client.transport.write(b"GET /api/svc/slow HTTP/1.1\r\nHost: h\r\n\r\n")
        await wait_for(lambda: self.proxy.exchanges, 2, what="the slow request")
        client.transport.write(b"GET /api/svc/fast HTTP/1.1\r\nHost: h\r\n\r\n")
        await wait_for(lambda: bytes(client.received).count(b"HTTP/1.1 200") == 2, 5,
                       what="both answers")
        data = client.take()
        self.assertLess(data.index(b'"slow"'), data.index(b'"fast"'))  # in order

    async def test_served_requests_count_for_recycling(self) -> None:
        _, wport = await self.start_worker(lambda h, b, c: ok_json())
        target = self.worker_for(wport)
        target.recycle_at = 3
        _, port = await self.start_proxy([target])
        client = await self.connect(port)
        for _ in range(3):
            await self.ask(client, GET)
        self.assertEqual(target.requests, 3)
        self.assertEqual([w for w, _ in self.pool.recycled], [target])


class PromotionTests(LeanTestCase):
    """Every case the lean path hands to ProxyExchange, with the connection
    still usable (lean again) afterwards when the client may keep it."""

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
        taken = self.spy()
        client = await self.connect(port)
        status, headers, body = split_response(
            await self.ask(client, b"GET /api/svc/chunked HTTP/1.1\r\nHost: h\r\n\r\n"))
        self.assertEqual((status, headers[b"transfer-encoding"]), (200, [b"chunked"]))
        self.assertEqual(dechunk(body), b"hello world")
        status, headers, body = split_response(
            await self.ask(client, b"GET /api/svc/big HTTP/1.1\r\nHost: h\r\n\r\n"))
        self.assertEqual((status, body), (200, big))
        status, _, body = split_response(await self.ask(client, GET))
        self.assertEqual(status, 200)
        self.assertEqual(taken, [True] * 3)  # each started lean; two were promoted
        self.assertEqual(self.proxy.exchanges, set())

    async def test_timeout_is_504_and_the_connection_goes_on(self) -> None:
        _, wport = await self.start_worker(
            lambda h, b, c: None if b"/hang" in h else ok_json(ok=1))
        _, port = await self.start_proxy([self.worker_for(wport)], request_timeout=0.2)
        client = await self.connect(port)
        status, _, body = split_response(
            await self.ask(client, b"GET /api/svc/hang HTTP/1.1\r\nHost: h\r\n\r\n"))
        self.assertEqual(status, 504)
        self.assertIn("request_timeout=0.2s", json.loads(body)["error"])
        self.assertEqual(len(self.pool.timed_out), 1)
        # The next request on the same connection is answered (the promoted
        # request left the channel's queue).
        status, _, body = split_response(await self.ask(client, GET))
        self.assertEqual((status, json.loads(body)), (200, {"ok": 1}))

    async def test_refused_worker_is_retried_on_another(self) -> None:
        closed = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
        dead_port = closed.getHost().port
        await closed.stopListening()
        _, wport = await self.start_worker(lambda h, b, c: ok_json(who="good"))
        dead, good = self.worker_for(dead_port, 0), self.worker_for(wport, 1)
        pool, port = await self.start_proxy([dead, good])
        taken = self.spy()
        client = await self.connect(port)
        for _ in range(3):
            status, _, body = split_response(await self.ask(client, GET))
            self.assertEqual((status, json.loads(body)), (200, {"who": "good"}))
        self.assertEqual(pool.refused, [dead])
        self.assertEqual((dead.in_flight, good.in_flight), (0, 0))
        self.assertIn(True, taken)

    async def test_worker_dying_before_the_answer_is_retried(self) -> None:
        def dies(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            c.transport.abortConnection()

        _, dying = await self.start_worker(dies)
        _, good = await self.start_worker(lambda h, b, c: ok_json(who="good"))
        _, port = await self.start_proxy([self.worker_for(dying, 0), self.worker_for(good, 1)])
        client = await self.connect(port)
        for _ in range(3):
            status, _, body = split_response(await self.ask(client, GET))
            self.assertEqual((status, json.loads(body)), (200, {"who": "good"}))

    async def test_every_worker_failing_is_502(self) -> None:
        _, wport = await self.start_worker(lambda h, b, c: b"SSH-2.0-OpenSSH\r\n\r\n")
        _, port = await self.start_proxy([self.worker_for(wport)])
        client = await self.connect(port)
        status, _, body = split_response(await self.ask(client, GET))
        self.assertEqual(status, 502)
        self.assertIn("invalid response", json.loads(body)["error"])
        self.assertEqual(len(self.pool.failed), 1)

    async def test_truncated_body_cuts_the_client(self) -> None:
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

    async def test_client_gone_frees_the_worker_slot(self) -> None:
        _, wport = await self.start_worker(lambda h, b, c: None)
        target = self.worker_for(wport)
        _, port = await self.start_proxy([target])
        taken = self.spy()
        client = await self.connect(port)
        client.transport.write(GET)
        await wait_for(lambda: target.in_flight == 1, 2, what="the request to start")
        client.transport.loseConnection()
        await wait_for(lambda: target.in_flight == 0 and not target.connections.active, 2,
                       what="the slot to be freed")
        self.assertEqual(taken, [True])
        self.assertEqual(self.proxy.exchanges, set())

    async def test_daemon_stop_answers_503(self) -> None:
        _, wport = await self.start_worker(lambda h, b, c: None)
        _, port = await self.start_proxy([self.worker_for(wport)])
        client = await self.connect(port)
        client.transport.write(GET)
        await wait_for(lambda: self.proxy.exchanges, 2, what="the request to start")
        (exchange,) = self.proxy.exchanges
        self.assertIsInstance(exchange, LeanExchange)
        self.proxy.stop()
        await wait_for(lambda: complete(bytes(client.received)), 2, what="the 503")
        status, headers, body = split_response(client.take())
        self.assertEqual((status, headers[b"retry-after"]), (503, [b"1"]))
        self.assertIn("shutting down", json.loads(body)["error"])


class NotLeanTests(LeanTestCase):
    """Requests the lean path must leave to the general one."""

    async def test_busy_workers_trusted_proxies_and_the_access_log(self) -> None:
        gate: list[ScriptedConnection] = []

        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes | None:
            if b"/hold" in h:
                gate.append(c)
                return None
            return ok_json(head=h.decode("latin-1"))

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)], concurrency=1)
        taken = self.spy()
        holder = await self.connect(port)
        holder.transport.write(b"GET /api/svc/hold HTTP/1.1\r\nHost: h\r\n\r\n")
        await wait_for(lambda: gate, 2, what="the slot to be taken")
        waiting = await self.connect(port)
        waiting.transport.write(GET)  # no free worker: refused by lean, queued
        await wait_for(lambda: len(self.proxy.queue) == 1, 2, what="the queued request")
        self.assertEqual(taken, [True, False])
        gate[0].transport.write(ok_json())
        await wait_for(lambda: complete(bytes(waiting.received)), 2, what="the queued answer")
        self.assertEqual(split_response(waiting.take())[0], 200)

        # A trusted proxy's own X-Forwarded-For is kept: the general path builds it.
        import ipaddress
        self.site.trusted_proxies = (ipaddress.ip_network("127.0.0.0/8"),)
        fresh = await self.connect(port)
        status, _, body = split_response(await self.ask(fresh, GET))
        self.assertIn("X-Forwarded-For: 6.6.6.6, 127.0.0.1", json.loads(body)["head"])

        # The access log has the same line for both paths.
        self.site.trusted_proxies = ()
        log_path = self.mktemp()
        self.site.logPath = log_path
        self.site.startFactory()  # opens the log file (Site.startFactory)
        self.addCleanup(self.site.stopFactory)
        logged = await self.connect(port)
        before = len(taken)
        request = GET.replace(b"\r\n\r\n", b"\r\nReferer: http://r.test/\r\n\r\n")
        self.assertEqual(split_response(await self.ask(logged, request))[0], 200)
        self.assertEqual(taken[before:], [True])
        self.assertEqual(split_response(await self.ask(logged, request.replace(
            b"\r\n\r\n", b"\r\nConnection: keep-alive\r\n\r\n")))[0], 200)
        self.assertEqual(len(taken), before + 1)  # a Connection header: the general path
        self.site.stopFactory()
        with open(log_path, "rb") as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 2)
        lean_line, general_line = (re.sub(rb"\[[^]]*\]", b"[time]", line) for line in lines)
        self.assertEqual(lean_line, general_line)
        self.assertIn(b'"GET /api/svc/x?q=1 HTTP/1.1" 200 ', lean_line)
        self.assertIn(b'"http://r.test/" "lean-test"', lean_line)

    async def test_refusals_and_abandoned_requests_are_logged(self) -> None:
        gate: list[ScriptedConnection] = []

        def handler(h: bytes, b: bytes, c: ScriptedConnection) -> bytes | None:
            if b"/hold" in h:
                gate.append(c)
                return None
            return ok_json()

        _, wport = await self.start_worker(handler)
        _, port = await self.start_proxy([self.worker_for(wport)])
        taken = self.spy()
        log_path = self.mktemp()
        self.site.logPath = log_path
        self.site.startFactory()
        self.addCleanup(self.site.stopFactory)
        # Refused by the edge: with the request line when it was read, "-" if not.
        await self.raw(port, b"GET /api/svc/cl-te HTTP/1.1\r\nHost: h\r\nContent-Length: 1"
                             b"\r\nTransfer-Encoding: chunked\r\n\r\n")
        await self.raw(port, b"BLAH\r\n\r\n")
        # Abandoned while the worker holds it: lean (GET) and general (POST) paths.
        for request, lean in ((b"GET /api/svc/hold?a=1 HTTP/1.1\r\nHost: h\r\n\r\n", True),
                              (b"POST /api/svc/hold?a=2 HTTP/1.1\r\nHost: h\r\n"
                               b"Content-Length: 0\r\n\r\n", False)):
            client = await self.connect(port)
            client.transport.write(request)
            await wait_for(lambda: len(gate) == (1 if lean else 2), 2, what="the held request")
            client.transport.loseConnection()
            await wait_for(lambda: not self.proxy.exchanges, 2, what="the exchange to end")
        self.assertEqual(taken, [True])  # the GET went the lean way
        self.site.stopFactory()
        with open(log_path, "rb") as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 4, lines)
        self.assertIn(b'"GET /api/svc/cl-te HTTP/1.1" 400 ', lines[0])
        self.assertIn(b'"- - -" 400 ', lines[1])
        self.assertIn(b'"GET /api/svc/hold?a=1 HTTP/1.1" 499 ', lines[2])
        self.assertIn(b'"POST /api/svc/hold?a=2 HTTP/1.1" 499 ', lines[3])
