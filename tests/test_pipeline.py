"""One pipeline for every request (issue 15, item 1): whatever carried a request
(a whole head in one read, a chunked body split byte by byte) and whatever
answers it (a worker, a CGI script, the admin, a 404), it passes the stages of
cgipool.proxy.pipeline.STAGES, in that order, each once.

The daemon here is real (a C worker pool, a CGI script, the Klein admin); the
client side is an in-memory transport fed by the test, so that "one read" and
"split across reads" are forced, not hoped for.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import TestCase

from cgipool.proxy.edge import EdgeProtocol, EdgeSite
from cgipool.proxy.exchange import Exchange
from cgipool.proxy.pipeline import STAGES, BaseStage, Pipeline
from tests.support import require_binaries, search_service, start_daemon, wait_for, write_config
from tests.test_cgi import cgi_config

MOMENTS = ("head", "request", "end")


class ClientTransport(StringTransport):
    """What an edge connection writes to, in memory (a client on 127.0.0.1)."""

    def __init__(self) -> None:
        super().__init__(peerAddress=IPv4Address("TCP", "127.0.0.1", 40000))
        self.aborted = False

    def setTcpNoDelay(self, enabled: bool) -> None:
        pass

    def loseWriteConnection(self) -> None:
        self.disconnecting = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.disconnecting = True


class Recording(BaseStage):
    """Runs ``stage`` and notes each moment it ran, for which request."""

    def __init__(self, stage: Any, seen: list[tuple[bytes, str, str]]) -> None:
        self.stage = stage
        self.name = stage.name
        self.seen = seen

    def note(self, exchange: Exchange, moment: str) -> None:
        self.seen.append((exchange.uri, self.name, moment))

    def head(self, exchange: Exchange) -> bool:
        self.note(exchange, "head")
        return bool(self.stage.head(exchange))

    def request(self, exchange: Exchange) -> None:
        self.note(exchange, "request")
        self.stage.request(exchange)

    def end(self, exchange: Exchange) -> None:
        self.note(exchange, "end")
        self.stage.end(exchange)


class Recorder(BaseStage):
    """A stage of its own, added by name: what a new concern would be."""

    name = "recorder"

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes, int]] = []

    def head(self, exchange: Exchange) -> bool:
        self.seen.append(("head", exchange.uri, exchange.code))
        return True

    def request(self, exchange: Exchange) -> None:
        self.seen.append(("request", exchange.uri, exchange.code))

    def end(self, exchange: Exchange) -> None:
        self.seen.append(("end", exchange.uri, exchange.code))


def split(data: bytes) -> Iterator[bytes]:
    """``data`` one byte per read."""
    for i in range(len(data)):
        yield data[i:i + 1]


def chunked(uri: bytes, body: bytes) -> bytes:
    """A chunked POST of ``body`` (in chunks of 3 bytes) to ``uri``."""
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 3]), body[i:i + 3])
                      for i in range(0, len(body), 3))
    return (b"POST " + uri + b" HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n" + chunks + b"0\r\n\r\n")


class PipelineCase(TestCase):
    async def daemon_site(self) -> EdgeSite:
        """A real daemon's proxy site; the admin's site (its own listener)
        follows it: :meth:`exchange` sends ``/admin/`` targets there."""
        require_binaries("search.cgi")
        path = write_config(self, cgi_config() + search_service(workers=1).replace(
            "services:\n", ""))
        daemon = await start_daemon(self, path)
        self.admin_site: EdgeSite = daemon.top.getServiceNamed("admin-web").factory
        site: EdgeSite = daemon.top.site
        self.assertIsNot(site, self.admin_site)
        return site

    def use(self, site: EdgeSite, pipeline: Pipeline) -> None:
        """``pipeline`` for the new connections of ``site`` and of the admin's."""
        site.pipeline = self.admin_site.pipeline = pipeline

    async def exchange(self, site: EdgeSite, reads: Any) -> bytes:
        """Feed ``reads`` to a new edge connection of ``site``; its answer once
        the connection is closed by the daemon."""
        reads = list(reads)
        if b"".join(reads).startswith(b"GET /admin/"):
            site = self.admin_site
        transport = ClientTransport()
        protocol = site.buildProtocol(transport.getPeer())
        self.assertIsInstance(protocol, EdgeProtocol)
        protocol.makeConnection(transport)
        for data in reads:
            protocol.dataReceived(data)
        await wait_for(lambda: transport.disconnecting, 10, what="the answer")
        protocol.connectionLost(None)
        return transport.value()


class SameStagesTests(PipelineCase):
    async def test_one_read_and_byte_by_byte_pass_the_same_stages_for_every_answerer(
            self) -> None:
        """Each request is sent twice, whole in one read and one byte per read;
        both record every stage's head, request and end, in STAGES order."""
        site = await self.daemon_site()
        requests = [
            b"GET /api/search?q=one HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            chunked(b"/api/search?q=post", b"some body bytes"),
            b"GET /cgi/test/env HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
            chunked(b"/cgi/test/env", b"a CGI body"),
            b"GET /admin/api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
            b"GET /nowhere HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        ]
        expected = [(stage.name, moment) for moment in MOMENTS for stage in STAGES]
        for raw in requests:
            answers = []
            for reads in ([raw], split(raw)):
                seen: list[tuple[bytes, str, str]] = []
                self.use(site, Pipeline([Recording(s, seen) for s in
                                         Pipeline.default().stages]))
                answer = await self.exchange(site, reads)
                self.assertEqual([(name, moment) for _, name, moment in seen], expected,
                                 raw[:40])
                answers.append(answer.split(b"\r\n", 1)[0])
            self.assertEqual(answers[0], answers[1], raw[:40])
            self.assertIn(answers[0], (b"HTTP/1.1 200 OK", b"HTTP/1.1 404 Not Found"),
                          raw[:40])

    async def test_a_refused_request_runs_the_end_stages_too(self) -> None:
        """A request the admission stage refuses skips the rest of the head
        stages and the dispatch, but is still logged and counted."""
        site = await self.daemon_site()
        seen: list[tuple[bytes, str, str]] = []
        self.use(site, Pipeline([Recording(s, seen) for s in Pipeline.default().stages]))
        answer = await self.exchange(
            site, [b"GET /api/search?q=a HTTP/1.1\r\nHost: t\r\n\r\n",
                   b"CONNECT t:443 HTTP/1.1\r\nHost: t\r\n\r\n"])
        self.assertTrue(answer.startswith(b"HTTP/1.1 200"), answer[:60])
        self.assertIn(b"HTTP/1.1 405", answer)
        connect = [(name, moment) for uri, name, moment in seen if uri == b"t:443"]
        self.assertEqual(connect, [("route", "head"), ("admission", "head")]
                         + [(stage.name, "end") for stage in STAGES])


class AddedStageTests(PipelineCase):
    async def test_a_stage_named_once_sees_worker_cgi_admin_and_refused_requests(
            self) -> None:
        """``with_stage`` adds a stage in one place; it runs for every kind of
        request, after routing and admission, before dispatch, and its end
        sees the final status."""
        site = await self.daemon_site()
        recorder = Recorder()
        self.use(site, Pipeline.default().with_stage(recorder, after="admission"))
        self.assertEqual([s.name for s in site.pipeline.stages],
                         ["route", "admission", "recorder", "dispatch", "access-log", "count"])
        await self.exchange(site, split(chunked(b"/api/search?q=x", b"body")))
        await self.exchange(site, [b"GET /cgi/test/env HTTP/1.1\r\nHost: t\r\n"
                                   b"Connection: close\r\n\r\n"])
        await self.exchange(site, [b"GET /admin/api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                   b"Connection: close\r\n\r\n"])
        # Refused by admission: the recorder, after it, sees only its end.
        await self.exchange(site, [b"GET * HTTP/1.1\r\nHost: t\r\n\r\n"])
        self.assertEqual(recorder.seen, [
            ("head", b"/api/search?q=x", 0), ("request", b"/api/search?q=x", 0),
            ("end", b"/api/search?q=x", 200),
            ("head", b"/cgi/test/env", 0), ("request", b"/cgi/test/env", 0),
            ("end", b"/cgi/test/env", 200),
            ("head", b"/admin/api/status", 0), ("request", b"/admin/api/status", 0),
            ("end", b"/admin/api/status", 200),
            ("end", b"*", 405),
        ])

    def test_stages_are_named_once_in_order(self) -> None:
        """The default pipeline is STAGES, one instance each, names unique."""
        names = [s.name for s in Pipeline.default().stages]
        self.assertEqual(names, [stage.name for stage in STAGES])
        self.assertEqual(len(set(names)), len(names))
        self.assertEqual(names, ["route", "admission", "dispatch", "access-log", "count"])

    def test_with_stage_needs_a_known_stage(self) -> None:
        with self.assertRaises(ValueError):
            Pipeline.default().with_stage(Recorder(), after="no-such-stage")



    def test_each_moment_calls_the_stages_acting_at_it_in_order(self) -> None:
        """Pipeline skips a stage's inherited no-op (it is on every request's
        path), but calls a stage written without BaseStage at all three moments,
        and keeps the order of the list at each."""
        seen: list[tuple[str, str]] = []

        class EndOnly(BaseStage):
            name = "end-only"

            def end(self, exchange: Any) -> None:
                seen.append((self.name, "end"))

        class Plain:  # meets the Stage protocol without BaseStage
            name = "plain"

            def head(self, exchange: Any) -> bool:
                seen.append((self.name, "head"))
                return True

            def request(self, exchange: Any) -> None:
                seen.append((self.name, "request"))

            def end(self, exchange: Any) -> None:
                seen.append((self.name, "end"))

        pipeline = Pipeline([EndOnly(), Plain()])
        self.assertEqual((len(pipeline.heads), len(pipeline.requests), len(pipeline.ends)),
                         (1, 1, 2))
        exchange = object()
        self.assertTrue(pipeline.head(exchange))  # type: ignore[arg-type]
        pipeline.request(exchange)  # type: ignore[arg-type]
        pipeline.end(exchange)  # type: ignore[arg-type]
        self.assertEqual(seen, [("plain", "head"), ("plain", "request"),
                                ("end-only", "end"), ("plain", "end")])
