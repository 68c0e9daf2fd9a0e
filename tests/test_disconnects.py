"""A client that leaves is known through ``request.notifyFinish()`` — twisted.web's
public surface — not its private ``_disconnected``: the dashboard's live stream
and a CGI execution touch the request of a gone client no more (a finish, an
unregistered producer or a closed connection would fail on it)."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone, ProcessDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from cgipool.admin.stream import EventStream
from cgipool.cgi import CgiExecution
from cgipool.events import EventLog
from tests.test_cgi import _Pool, _Resource


class _Channel(DummyChannel):
    closed = False

    def loseConnection(self) -> None:
        self.closed = True


def request() -> Request:
    req = Request(_Channel())
    req.method, req.uri, req.path, req.clientproto = b"GET", b"/", b"/", b"HTTP/1.1"
    req.content = None
    return req


def lose(req: Request) -> None:
    req.connectionLost(Failure(ConnectionDone()))


class EventStreamDisconnectTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.stream = EventStream(self.clock, lambda: {}, EventLog(self.clock.seconds))

    def test_a_client_cancelled_as_it_leaves_is_dropped_without_touching_its_request(
            self) -> None:
        """Klein cancels the subscription from its own notifyFinish errback, before
        ours runs: the cancel itself says the client left."""
        req = request()
        subscription: list[Any] = []
        req.notifyFinish().addErrback(lambda _: subscription[0].cancel())  # Klein's, first
        subscription.append(self.stream.subscribe(req))
        self.assertEqual(len(self.stream.clients), 1)
        lose(req)  # channel gone: an unregisterProducer now would raise
        self.assertEqual(self.stream.clients, [])
        self.failureResultOf(subscription[0])

    def test_stop_closes_live_clients_only(self) -> None:
        """Stopping the event stream closes the connections of clients still there and
        leaves alone one that already left, whose channel is gone."""
        live, gone = request(), request()
        self.stream.subscribe(live)
        self.stream.subscribe(gone).addErrback(lambda _: None)
        (live_client, gone_client) = self.stream.clients
        lose(gone)
        self.assertFalse(gone_client.connected)
        self.assertTrue(live_client.connected)
        self.stream.stop()
        self.assertEqual(self.stream.clients, [])
        self.assertTrue(live.channel.closed)  # type: ignore[union-attr]


class CgiExecutionDisconnectTests(SynchronousTestCase):
    def test_an_answer_for_a_client_that_left_does_not_finish_its_request(self) -> None:
        pool, resource = _Pool(), _Resource()
        req = request()
        execution = CgiExecution(pool, req, resource, "script-1", 0.0)  # type: ignore[arg-type]
        execution.pid = 4242
        execution.outReceived(b"Content-Type: text/plain\n\nhello")
        lose(req)
        self.assertTrue(execution.disconnected)
        execution.processEnded(Failure(ProcessDone(0)))  # finish() would raise now
        self.assertEqual((req.finished, pool.ended), (0, [(0, True)]))
