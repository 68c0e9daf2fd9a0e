"""The daemon itself under hostile conditions: one named test per case.

SIGPIPE (clients that vanish while we write), EMFILE (out of descriptors),
SIGKILL of the daemon (covered in test_integration, listed in
docs/hardening.md), many idle clients.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
from typing import Any

import psutil
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import SkipTest, TestCase

from tests.browser import start_daemon_process
from tests.support import (
    get_json,
    http_client,
    require_binaries,
    search_service,
    sleep,
    wait_for,
)
from tests.test_proxy import CLOSE, ProxyTestCase, ScriptedConnection, split_response

SEARCH = "\nservices:\n" + search_service(workers=1, concurrency=16)


class VanishingClientTests(ProxyTestCase):
    async def test_client_gone_while_a_large_response_streams_no_sigpipe(self) -> None:
        """Writes to a closed client socket (EPIPE, never SIGPIPE) end that exchange
        only: the worker connection is dropped and the next client is served."""
        def big(h: bytes, b: bytes, c: ScriptedConnection) -> bytes:
            if b"small" in h:
                return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            return b"HTTP/1.1 200 OK\r\nContent-Length: 8000000\r\n\r\n" + b"x" * 8_000_000

        _, wport = await self.start_worker(big)
        worker = self.worker_for(wport)
        _, port = await self.start_proxy([worker])
        received = bytearray()

        class Reader(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.extend(data)
                if len(received) > 100_000:
                    self.transport.abortConnection()  # gone mid-body: RST

        proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Reader())
        proto.transport.write(b"GET /api/svc/big HTTP/1.1\r\nHost: h\r\n\r\n")
        await wait_for(lambda: worker.in_flight == 0 and len(received) > 100_000, 5,
                       what="the exchange to end when its client vanished")
        raw = await self.raw(port, b"GET /api/svc/small HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertEqual(split_response(raw)[2], b"ok")


def accept_queue(port: int) -> int | None:
    """Connections waiting in the accept queue of the loopback listener on ``port``
    (the rx_queue of a LISTEN socket in /proc/net/tcp), None if there is none."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == "0A" and local == f"0100007F:{port:04X}":
                return int(queues.split(":")[1], 16)
    return None


def closed_by_peer(s: socket.socket) -> bool:
    """Whether the other end closed (or reset) the non-blocking client ``s``; not
    while it is open or still connecting (its SYN dropped by a full queue)."""
    try:
        return s.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError as e:
        return e.errno != errno.ENOTCONN


class DescriptorTests(TestCase):
    timeout = 60

    async def test_out_of_descriptors_pauses_accepting_without_a_busy_loop(self) -> None:
        """EMFILE on accept: twisted's reserved descriptor accepts and closes the
        excess connection, so nothing stays in the listener's accept queue while
        the daemon is out of descriptors: its listening socket is not left readable
        (level-triggered, that is the busy loop); once clients leave, service
        resumes.  The busy loop is seen in the kernel's queue, not in the CPU
        seconds the daemon burns over a sleep (which depend on the machine)."""
        require_binaries("search.cgi")
        if shutil.which("prlimit") is None:
            raise SkipTest("prlimit (util-linux) is needed to lower the daemon's fd limit")
        daemon = await start_daemon_process(self, SEARCH,
                                            wrapper=["prlimit", "--nofile=96:96", "--"])
        process = psutil.Process(daemon.pid)
        clients = []
        for _ in range(150):  # more than the daemon has descriptors for
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", daemon.port))
            clients.append(s)
        try:
            # Out of descriptors (the accept loop reaches the limit, on a busy
            # machine not at once).
            await wait_for(lambda: process.num_fds() >= 90, 10,
                           what="the daemon to run out of descriptors")
            # The excess is accepted and closed (the kernel retries the SYNs the full
            # queue dropped, so all of them arrive in a few seconds) ...
            await wait_for(lambda: sum(map(closed_by_peer, clients)) >= 150 - 96, 30,
                           what="the connections over the limit closed by the daemon")
            # ... and none is left waiting, although the daemon is still out of them.
            await wait_for(lambda: accept_queue(daemon.port) == 0, 30,
                           what="an empty accept queue (else: a busy loop)")
            self.assertGreaterEqual(process.num_fds(), 90)
            self.assertTrue(process.is_running())
        finally:
            for s in clients:
                s.close()

        async def serves() -> bool:
            try:
                code, _ = await get_json(http_client(self, persistent=False),
                                         f"{daemon.url}/api/search?q=after")
            except Exception:
                return False
            return code == 200

        deadline = reactor.seconds() + 20
        while not await serves():
            self.assertLess(reactor.seconds(), deadline,
                            "the daemon serves again once descriptors are free")
            await sleep(0.1)


class NonReadingClientTests(ProxyTestCase):
    def test_client_that_pipelines_and_never_reads_does_not_grow_the_daemon(self) -> None:
        """3,000 pipelined GETs, none of the answers read: unbounded buffering
        would be 150 MB of 50 KB answers; the edge starts no further request
        while the client's socket is full, and goes on when it drains.  In
        memory (a StringTransport that pauses its producer, the edge protocol,
        past 64 KiB unread, as a socket whose send buffer is full does), with
        bounds that do not depend on the machine: what is buffered for the
        client never passes 64 KiB plus one answer, and at most one request is
        being answered at a time.  (The daemon's RSS after a sleep would
        measure the whole test run, not the edge.)  On real sockets:
        test_pipelined_answers_resume_when_a_slow_client_reads_again."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.web.resource import Resource
        from twisted.web.server import NOT_DONE_YET

        from cgipool.proxy.edge import EdgeSite
        from cgipool.proxy.routes import Root
        from tests.test_edge_protocol import Transport

        socket_buffer = 65536
        answer_size = 50_000

        class FullSocket(Transport):
            full = False
            most = 0

            def write(self, data: bytes) -> None:
                super().write(data)
                self.most = max(self.most, len(self.value()))
                if len(self.value()) > socket_buffer and not self.full:
                    self.full = True
                    self.producer.pauseProducing()

            def drain(self) -> None:
                self.clear()
                self.full = False
                self.producer.resumeProducing()

        rendered: list[Any] = []
        clock = Clock()

        class Worker(Resource):
            """Answers 50 KB a moment later, as the proxy does when the worker has."""

            isLeaf = True

            def render(self, request: Any) -> Any:
                rendered.append(request)

                def answer() -> None:
                    request.write(b"y" * answer_size)
                    request.finish()
                clock.callLater(0, answer)
                return NOT_DONE_YET

        site = EdgeSite(Root({"/svc": Worker()}), reactor=clock)
        peer = IPv4Address("TCP", "127.0.0.1", 1234)
        protocol = site.buildProtocol(peer)
        transport = FullSocket(peerAddress=peer)
        protocol.makeConnection(transport)
        protocol.dataReceived(b"GET /svc/a HTTP/1.1\r\nHost: h\r\n\r\n" * 3000)

        def in_progress() -> int:
            return sum(1 for request in rendered if not request.finished)

        for _ in range(100):
            clock.advance(0)  # the answers come; the client reads none
            self.assertLessEqual(in_progress(), 1)
        self.assertTrue(transport.full)
        self.assertLess(len(rendered), 50, "the edge stopped taking requests")
        self.assertEqual(transport.producerState, "paused", "and reading from the client")
        answered = transport.value().count(b"HTTP/1.1 200 OK")
        self.assertEqual(answered, len(rendered))
        drains = 0
        while transport.full:  # the client reads again, a socket's worth at a time
            transport.drain()
            drains += 1
            clock.advance(0)
            self.assertLessEqual(in_progress(), 1)
            answered += transport.value().count(b"HTTP/1.1 200 OK")
            self.assertLess(drains, 3000, "no progress")
        self.assertEqual((len(rendered), answered), (3000, 3000))
        self.assertLessEqual(transport.most, socket_buffer + answer_size + 1024,
                             "buffered for the client: at most a socket and one answer")
        self.assertEqual(transport.producerState, "producing")
        self.assertEqual(len(protocol.queue), 0)

    async def test_pipelined_answers_resume_when_a_slow_client_reads_again(self) -> None:
        body = b"z" * 50_000
        worker, wport = await self.start_worker(
            lambda h, b, c: b"HTTP/1.1 200 OK\r\nContent-Length: 50000\r\n\r\n" + body)
        _, port = await self.start_proxy([self.worker_for(wport)], concurrency=4)
        received = bytearray()

        class Slow(Protocol):
            def connectionMade(self) -> None:
                self.transport.pauseProducing()

            def dataReceived(self, data: bytes) -> None:
                received.extend(data)

        proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Slow())
        self.addCleanup(proto.transport.abortConnection)
        proto.transport.write(b"GET /api/svc HTTP/1.1\r\nHost: h\r\n\r\n" * 200)
        # Answers are on their way to a client that reads none of them.
        await wait_for(lambda: len(worker.requests) >= 2, 10, what="the first answers")
        self.assertEqual(received, b"")
        proto.transport.resumeProducing()  # now it reads
        await wait_for(lambda: received.count(b"HTTP/1.1 200 OK") == 200, 20,
                       what="all 200 pipelined answers")


class LogBoundTests(TestCase):
    """The daemon log and the access log rotate by size with `logs.keep` old files."""

    timeout = 60

    def setUp(self) -> None:
        require_binaries("search.cgi")

    async def test_access_log_under_load_keeps_at_most_keep_files_and_the_newest_lines(
            self) -> None:
        from tests.support import start_daemon, write_config

        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        access = os.path.join(folder, "access.log")
        config = f'access_log: {access}\nlogs: {{max_bytes: "16K", keep: 2}}\n' + SEARCH
        daemon = await start_daemon(self, write_config(self, config))
        received = bytearray()

        class Reader(Protocol):
            def dataReceived(self, data: bytes) -> None:
                received.extend(data)

        proto = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port), Reader())
        self.addCleanup(proto.transport.abortConnection)
        requests = b"".join(b"GET /api/search?q=n%d HTTP/1.1\r\nHost: h\r\n\r\n" % n
                            for n in range(2000))
        proto.transport.write(requests + b"GET /api/search?q=last HTTP/1.1\r\nHost: h\r\n"
                              + CLOSE + b"\r\n")
        await wait_for(lambda: received.count(b"HTTP/1.1 200 ") == 2001, 30,
                       what="2,001 answers")
        names = sorted(n for n in os.listdir(folder))
        self.assertEqual(names, ["access.log", "access.log.1", "access.log.2"])
        for name in names:
            self.assertLessEqual(os.path.getsize(os.path.join(folder, name)), 16 * 1024)
        with open(access) as f:
            self.assertIn('"GET /api/search?q=last HTTP/1.1" 200', f.read().splitlines()[-1])
        self.assertGreater(daemon.top.site.logFile.rotations, 10)

    async def test_thousands_of_old_log_files_are_pruned_once_at_start(self) -> None:
        """twistd's LogFile keeps every old file and renames them all per rotation
        (thousands: a stalled reactor); at start-up those beyond `keep` go, once,
        and then each rotation renames at most `keep` while the daemon serves."""
        from tests.test_hostile_workers import LOG_BOUND, answer_within, flood_worker, \
            log_files, start_logging_daemon

        daemon, path = await start_logging_daemon(self, SEARCH + flood_worker(2),
                                                  old_files=3000)
        files = log_files(path)
        self.assertLessEqual(set(files), {"cgipool.log", "cgipool.log.1", "cgipool.log.2"})

        def oldest() -> str:
            with open(path + ".2") as f:
                return f.read()

        deadline = reactor.seconds() + 30
        while "old log" in oldest():  # the flood rotates the old files out
            self.assertLess(reactor.seconds(), deadline, "no rotation within 30 s")
            # It keeps answering while it rotates (each answer within a bound on a
            # stall: renaming 3,000 files per rotation blocked the reactor).
            code, _ = await answer_within(daemon.get("/api/search?q=x"), "/api/search")
            self.assertEqual(code, 200)
            self.assertLessEqual(sum(log_files(path).values()), LOG_BOUND)
            await sleep(0.05)
