"""The health probe (cgipool/health.py's HttpProbe): the request it sends, what
counts as a pass, the reason a failure gets, cancelling (health.timeout), and that
it logs nothing — in memory (StringTransport), then on real loopback sockets."""

from __future__ import annotations

from typing import Any

from twisted.internet import error, protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from cgipool.config import HealthConfig, RestartConfig
from cgipool.health import (
    CONNECT_TIMEOUT,
    BadResponse,
    HealthMonitor,
    HttpProbe,
    ProbeFailed,
    UnhealthyResponse,
    describe_failure,
    parse_head,
    probe_request,
    request_target,
)
from cgipool.supervisor.backoff import Backoff
from cgipool.supervisor.worker import Worker


class FakeConnector:
    def __init__(self) -> None:
        self.disconnected = False

    def disconnect(self) -> None:
        self.disconnected = True


class ConnectingReactor(Clock):
    """A Clock that records ``connectTCP`` calls and connects nothing itself."""

    def __init__(self) -> None:
        super().__init__()
        self.connects: list[tuple[str, int, Any, float, FakeConnector]] = []

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30,
                   bindAddress: Any = None) -> FakeConnector:
        connector = FakeConnector()
        self.connects.append((host, port, factory, timeout, connector))
        return connector


class Outcome:
    """What a probe's Deferred did."""

    def __init__(self, d: Deferred[object]) -> None:
        self.result: object = None
        self.failure: Failure | None = None
        self.fired = False
        d.addCallbacks(self._ok, self._failed)

    def _ok(self, result: object) -> None:
        self.fired, self.result = True, result

    def _failed(self, failure: Failure) -> None:
        self.fired, self.failure = True, failure

    @property
    def reason(self) -> str:
        assert self.failure is not None, f"passed with {self.result!r}"
        return describe_failure(self.failure)


class InMemoryProbeTests(TestCase):
    def start(self, path: str = "/health", port: int = 9100) -> tuple[Outcome, Any, StringTransport]:
        self.reactor = ConnectingReactor()
        d = HttpProbe(self.reactor)(port, path)
        outcome = Outcome(d)
        _, _, factory, _, self.connector = self.reactor.connects[-1]
        self.factory = factory
        self.deferred = d
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        return outcome, proto, transport

    def test_one_get_on_a_connection_of_its_own(self) -> None:
        """Plain connectTCP to the IP literal with the connect timeout, a factory
        that does not log, and a GET with Host and Connection: close."""
        _, _, transport = self.start("/?q=health", 9123)
        host, port, factory, timeout, _ = self.reactor.connects[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9123, CONNECT_TIMEOUT))
        self.assertFalse(factory.noisy)
        self.assertEqual(transport.value(),
                         b"GET /?q=health HTTP/1.1\r\nHost: 127.0.0.1:9123\r\n"
                         b"User-Agent: cgipool-health\r\nConnection: close\r\n\r\n")

    def test_the_target_is_encoded_as_a_client_would(self) -> None:
        self.assertEqual(request_target("/a b/é?x=1&y=%41#frag"), b"/a%20b/%C3%A9?x=1&y=%41")
        self.assertIn(b"Host: [::1]:9000\r\n", probe_request("::1", 9000, "/"))

    def test_a_complete_2xx_passes_after_its_body(self) -> None:
        """The body is read to its Content-Length (split reads), then the probe
        passes with the status and closes."""
        outcome, proto, transport = self.start()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Le")
        proto.dataReceived(b"ngth: 10\r\n\r\n01234")
        self.assertFalse(outcome.fired)
        proto.dataReceived(b"56789")
        self.assertEqual((outcome.fired, outcome.result, outcome.failure), (True, 200, None))
        self.assertTrue(transport.disconnecting)

    def test_a_redirect_passes_and_is_not_followed(self) -> None:
        outcome, proto, _ = self.start()
        proto.dataReceived(b"HTTP/1.1 302 Found\r\nLocation: /x\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(outcome.result, 302)
        self.assertEqual(len(self.reactor.connects), 1)

    def test_another_status_is_an_answer_but_a_wrong_one(self) -> None:
        """'HTTP 404' (what pool.why_not_ready and _answers_wrongly read), once the
        body is in."""
        for status in (404, 500, 503):
            outcome, proto, _ = self.start()
            proto.dataReceived(f"HTTP/1.1 {status} X\r\nContent-Length: 2\r\n\r\n".encode())
            self.assertFalse(outcome.fired)
            proto.dataReceived(b"no")
            self.assertTrue(outcome.failure.check(UnhealthyResponse))
            self.assertEqual(outcome.reason, f"HTTP {status}")

    def test_a_chunked_body_is_read_to_its_last_chunk_and_trailers(self) -> None:
        outcome, proto, _ = self.start()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"5;ext=1\r\nhello\r\n")
        proto.dataReceived(b"6\r\n world\r")
        proto.dataReceived(b"\n0\r\nX-Trailer: 1\r\n")
        self.assertFalse(outcome.fired)
        proto.dataReceived(b"\r\n")
        self.assertEqual(outcome.result, 200)

    def test_a_body_without_length_runs_to_the_end_of_the_connection(self) -> None:
        outcome, proto, _ = self.start()
        proto.dataReceived(b"HTTP/1.0 200 OK\r\n\r\nsome body")
        self.assertFalse(outcome.fired)
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(outcome.result, 200)

    def test_interim_answers_are_skipped(self) -> None:
        """A 1xx interim answer is not the probe's result: it reads on to the final status
        (204 here)."""
        outcome, proto, _ = self.start()
        proto.dataReceived(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n")
        self.assertEqual(outcome.result, 204)

    def test_what_is_not_http_is_an_invalid_response_not_a_wrong_answer(self) -> None:
        outcome, proto, transport = self.start()
        proto.dataReceived(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        self.assertTrue(outcome.failure.check(ProbeFailed))
        self.assertTrue(outcome.reason.startswith("invalid response: bad status line"),
                        outcome.reason)
        self.assertTrue(transport.disconnecting)
        outcome, proto, _ = self.start()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(outcome.reason, "invalid response: conflicting Content-Length headers")

    def test_the_head_is_as_strict_as_the_proxys(self) -> None:
        """Bare LF line ends, folded or nameless header lines and a bad length are
        not HTTP; a Transfer-Encoding that is not chunked last runs to the close."""
        for head in (b"HTTP/1.1 200 OK\nContent-Length: 0",
                     b"HTTP/1.1 200 OK\r\nX-A: 1\r\n folded",
                     b"HTTP/1.1 200 OK\r\n: nameless",
                     b"HTTP/1.1 200 OK\r\nContent-Length: -1",
                     b"HTTP/2 200 OK", b"HTTP/1.1 20 OK", b"HTTP/1.1 200 O\x01K"):
            with self.assertRaises(BadResponse, msg=head):
                parse_head(head)
        self.assertEqual(parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip"),
                         (200, None, False))
        self.assertEqual(parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
                                    b"Transfer-Encoding: gzip, chunked"), (200, None, True))

    def test_the_head_is_bounded(self) -> None:
        """A worker sending header lines without end fails the probe at 64 KiB with that
        reason and the buffer is freed: a probe cannot be made to grow memory."""
        outcome, proto, _ = self.start()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\n")
        for _ in range(70):
            proto.dataReceived(b"X-Padding: " + b"a" * 1000 + b"\r\n")
            if outcome.fired:
                break
        self.assertEqual(outcome.reason, "invalid response: response head over 65536 bytes")
        self.assertEqual(proto.buffer, b"")

    def test_a_connection_that_ends_early_says_when(self) -> None:
        outcome, proto, _ = self.start()
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(outcome.reason, "no response (connection closed)")
        outcome, proto, _ = self.start()
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(outcome.reason, "no response (connection lost)")
        outcome, proto, _ = self.start()
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        proto.connectionLost(Failure(error.ConnectionDone()))
        self.assertEqual(outcome.reason, "response truncated (connection closed)")

    def test_connect_failures_keep_their_reasons(self) -> None:
        """A refused or timed-out connection is reported as exactly that, so the status page
        says why a worker failed its probe."""
        for exc, reason in ((error.ConnectionRefusedError(), "connection refused"),
                            (error.TimeoutError(), "timeout")):
            self.reactor = ConnectingReactor()
            outcome = Outcome(HttpProbe(self.reactor)(9100, "/"))
            _, _, factory, _, connector = self.reactor.connects[0]
            factory.clientConnectionFailed(connector, Failure(exc))
            self.assertEqual(outcome.reason, reason)

    def test_cancel_while_connecting_stops_the_attempt(self) -> None:
        self.reactor = ConnectingReactor()
        d = HttpProbe(self.reactor)(9100, "/")
        outcome = Outcome(d)
        _, _, factory, _, connector = self.reactor.connects[0]
        d.cancel()
        self.assertEqual(outcome.reason, "timeout")
        self.assertTrue(connector.disconnected)
        factory.clientConnectionFailed(connector, Failure(error.UserError()))  # ignored

    def test_cancel_when_connected_aborts_and_ignores_what_follows(self) -> None:
        outcome, proto, transport = self.start()
        self.deferred.cancel()
        self.assertEqual(outcome.reason, "timeout")
        self.assertTrue(transport.disconnecting)
        proto.dataReceived(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertEqual(outcome.reason, "timeout")


class _Canned(protocol.Protocol):
    """Answers each connection with the factory's bytes once the request is in."""

    def dataReceived(self, data: bytes) -> None:
        self.factory.requests.append(data)  # type: ignore[attr-defined]
        answer = self.factory.answer  # type: ignore[attr-defined]
        if answer is not None:
            self.transport.write(answer)  # type: ignore[union-attr]
            if self.factory.close:  # type: ignore[attr-defined]
                self.transport.loseConnection()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self.factory.closed += 1  # type: ignore[attr-defined]


class Listener:
    """Quiet canned HTTP server on a loopback port; answer None = never answers."""

    def __init__(self, test: TestCase, answer: bytes | None, close: bool = False) -> None:
        factory = protocol.Factory.forProtocol(_Canned)
        factory.noisy = False
        factory.answer, factory.close = answer, close  # type: ignore[attr-defined]
        factory.requests, factory.closed = [], 0  # type: ignore[attr-defined]
        self.factory = factory
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]
        test.addCleanup(self.port.stopListening)

    @property
    def number(self) -> int:
        return self.port.getHost().port


class LoopbackProbeTests(TestCase):
    def setUp(self) -> None:
        self.logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    @inlineCallbacks
    def test_a_real_worker_passes_and_nothing_is_logged(self) -> Any:
        """Keep-alive answer (no Connection: close from the worker): the probe
        passes at the body's end, closes, and logs no factory line."""
        server = Listener(self, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        result = yield HttpProbe(reactor)(server.number, "/health")
        self.assertEqual(result, 200)
        self.assertTrue(server.factory.requests[0].startswith(b"GET /health HTTP/1.1\r\n"))
        self.assertEqual([e for e in self.logged if "factory" in str(e.get("log_format"))], [])
        while server.factory.closed == 0:  # our close reaches the server
            yield _sleep(0.01)

    @inlineCallbacks
    def test_a_closed_port_is_connection_refused(self) -> Any:
        server = Listener(self, None)
        port = server.number
        yield server.port.stopListening()
        try:
            yield HttpProbe(reactor)(port, "/")
        except Exception:
            reason = describe_failure(Failure())
        else:
            self.fail("passed")
        self.assertEqual(reason, "connection refused")

    @inlineCallbacks
    def test_health_timeout_cancels_a_silent_worker_and_closes_the_connection(self) -> Any:
        """The monitor's health.timeout (here 0.1 s) cancels the probe: 'timeout',
        counted as a failure, and the worker sees its connection closed."""
        server = Listener(self, None)
        worker = Worker(service="s", index=0, backoff=Backoff(RestartConfig()))
        worker.port = server.number
        failures: list[str] = []
        ended = Deferred()

        class Listening:
            def health_passed(self, w: Worker) -> None:
                ended.callback("passed")

            def health_failed(self, w: Worker, reason: str) -> None:
                failures.append(reason)
                ended.callback("failed")

            def startup_timed_out(self, w: Worker) -> None:
                ended.callback("startup timed out")

        monitor = HealthMonitor(reactor, HttpProbe(reactor), worker,  # type: ignore[arg-type]
                                HealthConfig(path="/", interval=30, timeout=0.1),
                                Listening())
        monitor.starting = False  # past readiness: a failure counts
        monitor.check_soon()
        self.assertEqual((yield ended), "failed")
        monitor.stop()
        self.assertEqual(failures, ["timeout"])
        self.assertEqual(worker.health_failures, 1)
        while server.factory.closed == 0:
            yield _sleep(0.01)


def _sleep(seconds: float) -> Deferred[None]:
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
