"""The proxy's request accounting goes through the pool (acquire / release):
the proxy changes no worker counter itself (ARCHITECTURE.md, Ownership rules)."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cgipool.config import RestartConfig
from cgipool.proxy.edge import EdgeSite
from cgipool.proxy.forward import ServiceProxy
from cgipool.proxy.routes import Root
from cgipool.proxy.upstream import BAD_RESPONSE, REFUSED
from cgipool.supervisor.backoff import Backoff
from cgipool.supervisor.worker import Worker, WorkerState
from tests.test_edge_protocol import Transport
from tests.test_proxy import CLOSE, StubPool


class RecordingPool(StubPool):
    """A StubPool (the real acquire/release) that records every call."""

    def __init__(self, workers: list[Worker], **config: Any) -> None:
        super().__init__(workers, **config)
        self.calls: list[tuple[Any, ...]] = []

    def acquire(self, worker: Worker) -> None:
        self.calls.append(("acquire", worker.index))
        super().acquire(worker)

    def release(self, worker: Worker, served: bool) -> None:
        self.calls.append(("release", worker.index, served))
        super().release(worker, served)


class _Upstream:
    """The worker connection an exchange holds (nothing is sent anywhere)."""

    def __init__(self) -> None:
        self.transport = self
        self.disconnected = False
        self.reused = False

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass

    def abort(self) -> None:
        self.disconnected = True


class _Connections:
    """A worker's connections: records the exchanges sent to it."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def send(self, exchange: Any, data: Any, is_head: bool) -> None:
        exchange.connection = _Upstream()
        self.sent.append(exchange)


class RequestAccountingTests(SynchronousTestCase):
    """Every acquire is matched by one release, served or not, for a bodiless
    GET and a POST alike (one edge parser and one pipeline for both)."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.workers = []
        for index in range(2):
            worker = Worker("svc", index, Backoff(RestartConfig()), port=1 + index,
                            state=WorkerState.READY, pid=1000 + index)
            worker.connections = _Connections()
            self.workers.append(worker)
        self.pool = RecordingPool(self.workers[:1])
        self.proxy = ServiceProxy(self.pool, self.clock)
        site = EdgeSite(Root({"/api/svc": self.proxy}), reactor=self.clock)
        self.channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 1234))
        self.transport = Transport(peerAddress=IPv4Address("TCP", "127.0.0.1", 1234))
        self.channel.makeConnection(self.transport)

    def send(self, head: bytes) -> Any:
        self.channel.dataReceived(head + b"Host: h\r\n" + CLOSE + b"\r\n")
        sent = [e for w in self.workers for e in w.connections.sent]
        return sent[-1]

    def answer(self, exchange: Any) -> None:
        exchange.response_started(200, b"OK", [(b"Content-Length", b"2")])
        exchange.response_data(b"ok")
        exchange.response_finished()

    def test_a_served_request_is_acquired_and_released_as_served(self) -> None:
        self.answer(self.send(b"GET /api/svc HTTP/1.1\r\n"))
        self.assertEqual(self.pool.calls, [("acquire", 0), ("release", 0, True)])
        self.assertEqual((self.workers[0].requests, self.workers[0].in_flight), (1, 0))
        self.assertIn(b"200 OK", self.transport.value())

    def test_a_served_request_with_a_body_is_accounted_the_same(self) -> None:
        exchange = self.send(b"POST /api/svc HTTP/1.1\r\nContent-Length: 0\r\n")
        self.assertEqual(exchange.client.method, b"POST")
        self.answer(exchange)
        self.assertEqual(self.pool.calls, [("acquire", 0), ("release", 0, True)])
        self.assertEqual((self.workers[0].requests, self.workers[0].in_flight), (1, 0))

    def test_a_failed_request_is_released_not_served(self) -> None:
        self.send(b"GET /api/svc HTTP/1.1\r\n").upstream_failed(BAD_RESPONSE, "garbage")
        self.assertEqual(self.pool.calls, [("acquire", 0), ("release", 0, False)])
        self.assertEqual((self.workers[0].requests, self.workers[0].in_flight), (0, 0))
        self.assertEqual(self.pool.failed, [(self.workers[0], BAD_RESPONSE)])
        self.assertIn(b"502", self.transport.value())

    def test_a_retried_request_releases_each_attempt_once(self) -> None:
        self.pool.ready.append(self.workers[1])
        first = self.send(b"GET /api/svc HTTP/1.1\r\n")
        refused = first.worker
        first.upstream_failed(REFUSED, "connection refused")
        self.answer(first)  # the same exchange, now on the other worker
        other = 1 - refused.index
        self.assertEqual(self.pool.calls, [
            ("acquire", refused.index), ("release", refused.index, False),
            ("acquire", other), ("release", other, True)])
        self.assertEqual([(w.requests, w.in_flight) for w in self.workers],
                         [(1, 0) if w.index == other else (0, 0) for w in self.workers])

    def test_an_abandoned_request_is_released_not_served(self) -> None:
        self.send(b"GET /api/svc HTTP/1.1\r\n")
        self.proxy.stop()  # the daemon stops with the request in flight
        self.assertEqual(self.pool.calls, [("acquire", 0), ("release", 0, False)])
        self.assertEqual(self.workers[0].in_flight, 0)
        self.assertIn(b"503", self.transport.value())

    def test_a_client_gone_releases_its_worker(self) -> None:
        self.send(b"GET /api/svc HTTP/1.1\r\n")
        self.transport.loseConnection()
        self.channel.connectionLost(Exception("gone"))
        self.assertEqual(self.pool.calls, [("acquire", 0), ("release", 0, False)])
