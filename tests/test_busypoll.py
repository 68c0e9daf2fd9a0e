"""Busy polling: the spin-then-sleep loop on a scripted poller and clock; cgipool's
reactor (BusyPollReactor) driven by hand on real sockets; the service; and the
daemon as users start it (``twistd -n cgipool``, which installs that reactor)."""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import sys
import textwrap
from collections.abc import Sequence
from typing import Any

import treq
from twisted.internet import reactor, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cgipool.busypoll import BusyPoll, BusyPollReactor, BusyPollService, BusyPollUnsupported
from tests.support import (
    ROOT,
    free_ports,
    get_json,
    http_client,
    require_binaries,
    sleep,
    start_daemon,
    write_config,
)
from tests.test_integration import SEARCH, _Collect

TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")


class ScriptedPoller:
    """A poller whose n-th call returns the n-th scripted answer (then nothing);
    each call advances the fake monotonic clock by ``step`` seconds, or by the
    timeout when it blocks and nothing comes."""

    def __init__(self, answers: Sequence[Any] = (), step: float = 10e-6) -> None:
        self.answers = list(answers)
        self.step = step
        self.now = 100.0
        self.calls: list[tuple[float, int]] = []

    def clock(self) -> float:
        return self.now

    def poll(self, timeout: float, size: int) -> list[tuple[int, int]]:
        self.calls.append((timeout, size))
        answer = self.answers.pop(0) if self.answers else []
        if isinstance(answer, Exception):
            raise answer
        if not answer and timeout > 0:
            self.now += timeout
        else:
            self.now += self.step
        return answer


class BusyPollLoopTests(SynchronousTestCase):
    def make(self, poller: ScriptedPoller, spin: float = 100e-6,
             size: int = 3) -> tuple[BusyPoll, list[Any]]:
        handled: list[Any] = []
        busy = BusyPoll(poller.poll, handled.append, lambda: size, spin, poller.clock)
        return busy, handled

    def test_no_spin_before_any_io(self) -> None:
        """An idle daemon (timers only) sleeps straight away: one blocking poll, no spin,
        nothing counted."""
        poller = ScriptedPoller()
        busy, handled = self.make(poller)
        busy.iterate(5.0)
        self.assertEqual(poller.calls, [(5.0, 3)])
        self.assertEqual((handled, busy.hits, busy.misses, busy.spin_seconds), ([], 0, 0, 0.0))

    def test_timer_wakes_never_start_a_spin(self) -> None:
        # Blocking polls that time out (timers due, no I/O) leave the spin window
        # closed: an idle daemon never spins, whatever busy_poll_us says.
        poller = ScriptedPoller()
        busy, handled = self.make(poller, spin=1.0)
        for _ in range(3):
            busy.iterate(0.5)
        self.assertEqual(poller.calls, [(0.5, 3)] * 3)
        self.assertEqual((handled, busy.hits, busy.misses, busy.spin_seconds), ([], 0, 0, 0.0))

    def test_spin_after_io_catches_the_next_events_without_sleeping(self) -> None:
        first, second = [(7, 1)], [(8, 4)]
        poller = ScriptedPoller([first, [], [], second])
        busy, handled = self.make(poller)
        busy.iterate(None)      # blocking poll: the first events
        busy.iterate(None)      # spins: nothing, nothing, the second events
        self.assertEqual(handled, [first, second])
        self.assertEqual(poller.calls, [(-1, 3), (0, 3), (0, 3), (0, 3)])
        self.assertEqual((busy.hits, busy.misses), (1, 0))
        self.assertAlmostEqual(busy.spin_seconds, 30e-6)

    def test_spin_window_runs_out_then_sleeps_for_the_rest_of_the_timeout(self) -> None:
        poller = ScriptedPoller([[(7, 1)]], step=40e-6)
        busy, handled = self.make(poller, spin=100e-6)
        busy.iterate(1.0)       # I/O at t=100.00004
        busy.iterate(1.0)       # spins at 0.00004, 0.00008, 0.00012 (past the window)
        self.assertEqual(len(handled), 1)
        self.assertEqual([t for t, _ in poller.calls[1:4]], [0, 0, 0])
        blocking, _ = poller.calls[4]
        self.assertAlmostEqual(blocking, 1.0 - 120e-6)
        self.assertEqual(len(poller.calls), 5)
        self.assertEqual((busy.hits, busy.misses), (0, 1))
        self.assertAlmostEqual(busy.spin_seconds, 120e-6)

    def test_spin_never_outlasts_the_next_timer(self) -> None:
        poller = ScriptedPoller([[(7, 1)]], step=10e-6)
        busy, _ = self.make(poller, spin=1.0)
        busy.iterate(None)
        busy.iterate(25e-6)     # a timer is due in 25 µs: spin 3 polls, then poll(0)
        self.assertEqual([t for t, _ in poller.calls[1:]], [0, 0, 0, 0.0])
        self.assertEqual(busy.misses, 1)

    def test_zero_timeout_is_one_poll(self) -> None:
        """A zero timeout (a timer due now) is one non-blocking poll: no spin past a due
        timer, neither a hit nor a miss counted."""
        poller = ScriptedPoller([[(7, 1)]])
        busy, _ = self.make(poller)
        busy.iterate(None)
        busy.iterate(0)
        self.assertEqual(poller.calls[1:], [(0, 3)])
        self.assertEqual((busy.hits, busy.misses), (0, 0))

    def test_spin_zero_is_the_plain_loop(self) -> None:
        poller = ScriptedPoller([[(7, 1)]])
        busy, _ = self.make(poller, spin=0.0)
        busy.iterate(None)
        busy.iterate(2.0)
        self.assertEqual(poller.calls, [(-1, 3), (2.0, 3)])

    def test_poll_size_is_at_least_one(self) -> None:
        poller = ScriptedPoller()
        busy, _ = self.make(poller, size=0)
        busy.iterate(1.0)
        self.assertEqual(poller.calls, [(1.0, 1)])

    def test_interrupted_poll_returns_and_other_errors_propagate(self) -> None:
        poller = ScriptedPoller([OSError(errno.EINTR, "interrupted"),
                                 OSError(errno.EBADF, "bad")])
        busy, handled = self.make(poller)
        busy.iterate(1.0)
        self.assertEqual(handled, [])
        error = self.assertRaises(OSError, busy.iterate, 1.0)
        self.assertEqual(error.errno, errno.EBADF)


class Pipe(FileDescriptor):
    """One end of a socketpair as a reactor descriptor: keeps what it reads."""

    def __init__(self, reactor: Any, sock: socket.socket) -> None:
        super().__init__(reactor)
        self.sock = sock
        sock.setblocking(False)
        self.read: list[bytes] = []
        self.writable = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def doRead(self) -> None:
        self.read.append(self.sock.recv(4096))

    def doWrite(self) -> None:
        self.writable += 1
        self.stopWriting()


def registered(reactor: BusyPollReactor) -> dict[int, int]:
    """fd -> epoll events, as Twisted's public getReaders/getWriters say."""
    masks: dict[int, int] = {}
    for reader in reactor.getReaders():
        masks[reader.fileno()] = masks.get(reader.fileno(), 0) | select.EPOLLIN
    for writer in reactor.getWriters():
        masks[writer.fileno()] = masks.get(writer.fileno(), 0) | select.EPOLLOUT
    return masks


class BusyPollReactorTests(SynchronousTestCase):
    """A BusyPollReactor of its own (not installed, never run), iterated by hand."""

    def setUp(self) -> None:
        self.now = 50.0
        self.reactor = BusyPollReactor(now=lambda: self.now)
        self.addCleanup(self.close, self.reactor)

    @staticmethod
    def close(r: BusyPollReactor) -> None:
        r.set_spin(0)
        waker = r.waker
        r.removeReader(waker)
        waker.connectionLost(None)

    def pipe(self) -> tuple[Pipe, socket.socket]:
        ours, theirs = socket.socketpair()
        self.addCleanup(theirs.close)
        self.addCleanup(ours.close)
        pipe = Pipe(self.reactor, ours)
        self.addCleanup(pipe.stopWriting)
        self.addCleanup(pipe.stopReading)
        return pipe, theirs

    def test_spin_zero_is_the_epoll_reactors_own_poll(self) -> None:
        r = self.reactor
        self.assertIsInstance(r, EPollReactor)
        self.assertFalse(r.spinning)
        self.assertIsNone(r.readiness)
        pipe, theirs = self.pipe()
        r.addReader(pipe)
        theirs.send(b"plain")
        r.doIteration(1.0)
        self.assertEqual(pipe.read, [b"plain"])
        self.assertEqual((r.busy_poll.hits, r.busy_poll.misses), (0, 0))

    def test_io_is_dispatched_and_the_next_io_caught_by_the_spin(self) -> None:
        r = self.reactor
        busy = r.set_spin(5.0)  # the injected clock stands still: the window stays open
        self.assertTrue(r.spinning)
        pipe, theirs = self.pipe()
        r.addReader(pipe)
        theirs.send(b"first")
        r.doIteration(1.0)       # sleeps on the readiness set, woken by the bytes
        self.assertEqual(pipe.read, [b"first"])
        self.assertEqual((busy.hits, busy.misses), (0, 0))
        theirs.send(b"second")
        r.doIteration(1.0)       # spins: found at once
        self.assertEqual(pipe.read, [b"first", b"second"])
        self.assertEqual((busy.hits, busy.misses), (1, 0))

    def test_without_io_there_is_no_spin(self) -> None:
        # The deterministic form of "an idle daemon sleeps": with busy polling on
        # and nothing ready, an iteration is one blocking poll that times out.
        r = self.reactor
        busy = r.set_spin(5.0)
        pipe, _ = self.pipe()
        r.addReader(pipe)
        r.doIteration(0.01)
        r.doIteration(0.01)
        self.assertEqual((pipe.read, busy.hits, busy.misses, busy.spin_seconds),
                         ([], 0, 0, 0.0))

    def test_the_spin_ends_with_its_window(self) -> None:
        r = self.reactor
        busy = r.set_spin(100e-6)
        pipe, theirs = self.pipe()
        r.addReader(pipe)
        theirs.send(b"x")
        r.doIteration(1.0)
        self.now += 1.0          # the window has passed: no spin, a plain sleep
        r.doIteration(0.01)
        self.assertEqual((busy.hits, busy.misses), (0, 0))

    def test_readiness_follows_every_registration(self) -> None:
        """The readiness set the spin polls mirrors Twisted's readers and writers through
        every add and remove, including those from before busy polling began; else the
        spin would miss I/O or report what is no longer asked for."""
        r = self.reactor
        a, _ = self.pipe()
        r.addReader(a)           # before busy polling: copied when it starts
        r.set_spin(1e-3)
        readiness = r.readiness
        assert readiness is not None
        self.assertEqual(readiness.masks, registered(r))
        b, _ = self.pipe()
        r.addWriter(b)
        r.addReader(b)
        self.assertEqual(readiness.masks[b.fileno()], select.EPOLLIN | select.EPOLLOUT)
        r.removeWriter(b)
        self.assertEqual(readiness.masks, registered(r))
        r.doIteration(0)
        self.assertEqual(b.writable, 0)  # no longer asked for
        fd = b.fileno()
        r.removeReader(b)
        self.assertNotIn(fd, readiness.masks)
        self.assertEqual(readiness.masks, registered(r))
        r.set_spin(0)
        self.assertIsNone(r.readiness)
        self.assertFalse(r.spinning)

    def test_twisted_registers_tcp_connections_through_the_public_methods(self) -> None:
        # BusyPollReactor's readiness set is only right if Twisted adds and
        # removes every descriptor with addReader/addWriter/removeReader/
        # removeWriter (as it does today): a real listening port, an accepted
        # connection, a buffered write and a close, compared at each step.
        r = BusyPollReactor()  # the real clock: spin windows end
        self.addCleanup(self.close, r)
        r.set_spin(1e-3)
        readiness = r.readiness
        assert readiness is not None
        accepted: list[Protocol] = []

        class Accept(Factory):
            noisy = False

            def buildProtocol(self, addr: Any) -> Protocol:
                protocol = Protocol()
                accepted.append(protocol)
                return protocol

        port = tcp.Port(0, Accept(), interface="127.0.0.1", reactor=r)
        port.startListening()
        self.addCleanup(lambda: port.connected and port.connectionLost(None))
        self.addCleanup(port.stopReading)
        self.assertEqual(readiness.masks, registered(r), "after listening")
        client = socket.create_connection(("127.0.0.1", port.getHost().port))
        self.addCleanup(client.close)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        for _ in range(100):
            r.doIteration(0.01)
            if accepted:
                break
        self.assertEqual(len(accepted), 1)
        self.assertEqual(readiness.masks, registered(r), "after accepting")
        transport = accepted[0].transport
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        transport.write(b"x" * (256 << 10))  # Twisted's buffering: addWriter
        self.assertIn(transport, r.getWriters())
        self.assertEqual(readiness.masks, registered(r), "while writing")
        client.setblocking(False)

        def turn() -> None:
            r.doIteration(0.001)
            try:
                while client.recv(1 << 16):
                    pass
            except BlockingIOError:
                pass

        for _ in range(20000):
            turn()
            if transport not in r.getWriters():
                break
        self.assertNotIn(transport, r.getWriters())
        self.assertEqual(readiness.masks, registered(r), "after the buffer drained")
        transport.loseConnection()
        for _ in range(1000):
            turn()
            if not transport.connected:
                break
        self.assertFalse(transport.connected)
        self.assertEqual(readiness.masks, registered(r), "after the close")


def busy_poll_reactor_only(case: Any) -> None:
    if not isinstance(reactor, BusyPollReactor):
        case.skipTest(f"needs cgipool's reactor (trial --reactor cgipool), trial runs "
                      f"{type(reactor).__name__}; DaemonProcessTests cover twistd")


class BusyPollServiceTests(SynchronousTestCase):
    def test_other_reactors_are_refused_only_when_asked_to_spin(self) -> None:
        for other in (Clock(), EPollReactor.__new__(EPollReactor)):
            BusyPollService(other, 0)
            error = self.assertRaises(BusyPollUnsupported, BusyPollService, other, 200)
            name = f"{type(other).__module__}.{type(other).__name__}"
            self.assertEqual(str(error),
                             f"busy polling needs cgipool's reactor; this daemon runs "
                             f"{name} (start twistd without --reactor or with --reactor "
                             f"cgipool, or set busy_poll_us: 0)")
            service = BusyPollService(other, 0)
            self.assertRaises(BusyPollUnsupported, service.check, 1)
            self.assertRaises(BusyPollUnsupported, service.configure, 1)
            self.assertEqual(service.spin_us, 0)

    def test_spins_on_start_follows_configure_and_stops_on_stop(self) -> None:
        r = BusyPollReactor()
        self.addCleanup(BusyPollReactorTests.close, r)
        service = BusyPollService(r, 150)
        self.assertFalse(r.spinning)
        service.startService()
        self.assertTrue(r.spinning)
        poller = service.poller
        self.assertIs(poller, r.busy_poll)
        self.assertEqual(poller.spin, 150e-6)
        service.configure(0)
        self.assertFalse(r.spinning)
        service.configure(300)
        self.assertTrue(r.spinning)
        self.assertEqual((service.poller, poller.spin), (poller, 300e-6))
        service.stopService()
        self.assertFalse(r.spinning)

    def test_off_from_the_start_never_touches_the_reactor(self) -> None:
        r = BusyPollReactor()
        self.addCleanup(BusyPollReactorTests.close, r)
        service = BusyPollService(r, 0)
        service.startService()
        service.stopService()
        self.assertIsNone(service.poller)
        self.assertFalse(r.spinning)


class BusyPollDaemonTests(TestCase):
    """A daemon with busy_poll_us answers through the spinning reactor; a
    reload turns it off and on again; /metrics shows what it costs.  In this
    process: only under ``trial --reactor cgipool``."""

    timeout = 60

    def setUp(self) -> None:
        require_binaries("search.cgi")

    async def test_requests_through_the_spinning_reactor_and_live_reload(self) -> None:
        """Requests through the spinning reactor succeed and its spins catch I/O (counted,
        on /metrics); a reload turns spinning off, then on again at another length."""
        busy_poll_reactor_only(self)
        path = write_config(self, "busy_poll_us: 400\n" + textwrap.dedent(SEARCH))
        daemon = await start_daemon(self, path)
        poller = daemon.top.busy_poll.poller
        self.assertTrue(reactor.spinning)
        self.assertIs(poller, reactor.busy_poll)
        client = http_client(self)
        for i in range(50):
            code, body = await get_json(client, f"{daemon.url}/api/search?q=spin{i}")
            self.assertEqual((code, body["query"]), (200, f"spin{i}"))
        # A hit is I/O within 400 µs of the last: a busy machine may deny it to a
        # given request, so more requests are sent until one has it (a bound).
        deadline = reactor.seconds() + 20
        while poller.hits == 0 and reactor.seconds() < deadline:
            code, _ = await get_json(client, f"{daemon.url}/api/search?q=more")
            self.assertEqual(code, 200)
        self.assertGreater(poller.hits, 0)
        self.assertGreater(poller.spin_seconds, 0)

        response = await client.get(f"{daemon.admin_url}/metrics")
        text = (await treq.content(response)).decode()
        self.assertIn("cgipool_busy_poll_seconds 0.0004\n", text)  # 400 µs, in base units
        hits = [line for line in text.splitlines()
                if line.startswith('cgipool_busy_poll_spins_total{result="hit"}')]
        self.assertEqual(len(hits), 1)
        self.assertGreater(float(hits[0].split()[-1]), 0)
        self.assertIn("cgipool_busy_poll_spin_seconds_total", text)

        set_busy_poll(path, 0)
        result = daemon.top.reloader.reload()
        self.assertTrue(result.ok, result.error)
        self.assertEqual(result.applied, ("busy_poll_us",))
        self.assertIn("busy_poll_us applied", result.summary())
        self.assertFalse(reactor.spinning)
        code, body = await get_json(client, f"{daemon.url}/api/search?q=off")
        self.assertEqual((code, body["query"]), (200, "off"))
        hits = poller.hits
        code, _ = await get_json(client, f"{daemon.url}/api/search?q=still-off")
        self.assertEqual((code, poller.hits), (200, hits))

        set_busy_poll(path, 50)
        response = await client.post(f"{daemon.admin_url}/admin/api/reload",
                                     headers={"X-CGIPool-CSRF": "1"})
        body = json.loads(await treq.content(response))
        self.assertEqual((response.code, body["applied"]), (200, ["busy_poll_us"]))
        self.assertEqual((reactor.spinning, poller.spin), (True, 50e-6))
        code, _ = await get_json(client, f"{daemon.url}/api/search?q=on-again")
        self.assertEqual(code, 200)

        await daemon.top.stopService()
        self.assertFalse(reactor.spinning)

    async def test_reload_to_busy_polling_on_another_reactor_changes_nothing(
            self) -> None:
        path = write_config(self, SEARCH)
        daemon = await start_daemon(self, path)
        service = daemon.top.busy_poll
        service.reactor = Clock()  # as if twistd had been started with another reactor
        set_busy_poll(path, 200)
        result = daemon.top.reloader.reload()
        self.assertFalse(result.ok)
        self.assertEqual(result.error,
                         f"{path}: key 'busy_poll_us': busy polling needs cgipool's "
                         f"reactor; this daemon runs twisted.internet.task.Clock (start "
                         f"twistd without --reactor or with --reactor cgipool, or set "
                         f"busy_poll_us: 0)")
        self.assertEqual((service.spin_us, daemon.top.reloader.config.busy_poll_us), (0, 0))


def set_busy_poll(path: str, spin_us: int) -> None:
    with open(path) as f:
        lines = [line for line in f if not line.startswith("busy_poll_us:")]
    with open(path + ".new", "w") as f:
        f.write(f"busy_poll_us: {spin_us}\n" + "".join(lines))
    os.replace(path + ".new", path)


def fixed_ports(path: str) -> tuple[int, int]:
    """Give the config's two ``tcp:0`` listeners (proxy, admin) fixed ports."""
    proxy, admin = free_ports(2)
    with open(path) as f:
        text = f.read()
    text = text.replace("tcp:0:", f"tcp:{proxy}:", 1).replace("tcp:0:", f"tcp:{admin}:", 1)
    with open(path, "w") as f:
        f.write(text)
    return proxy, admin


class DaemonProcessTests(TestCase):
    """``twistd -n cgipool`` as users start it: it installs cgipool's reactor, so
    busy_poll_us works without any --reactor option."""

    timeout = 90

    async def test_twistd_cgipool_busy_polls_without_a_reactor_option(self) -> None:
        require_binaries("search.cgi")
        path = write_config(self, "busy_poll_us: 400\n" + textwrap.dedent(SEARCH))
        proxy, admin = fixed_ports(path)
        proto = _Collect()
        process = reactor.spawnProcess(
            proto, TWISTD, [TWISTD, "-n", "--pidfile=", "cgipool", "--config", path],
            env=os.environ.copy(), path=ROOT)

        def cleanup() -> Any:
            if process.pid is not None:
                process.signalProcess("KILL")
            return proto.ended

        self.addCleanup(cleanup)
        client = http_client(self, persistent=False)
        metrics = f"http://127.0.0.1:{admin}/metrics"

        async def ready() -> bool:
            try:
                code, _ = await get_json(client, f"http://127.0.0.1:{proxy}/api/search?q=up")
            except Exception:
                return False
            return code == 200

        deadline = reactor.seconds() + 20
        while not await ready():
            if reactor.seconds() > deadline or proto.ended.called:
                self.fail(f"daemon not ready: {proto.output.decode(errors='replace')[-2000:]}")
            await sleep(0.1)
        output = proto.output.decode(errors="replace")
        self.assertIn("reactor class: cgipool.busypoll.BusyPollReactor", output)
        self.assertIn("busy polling: spinning up to 400 µs after I/O", output)
        keep = http_client(self)

        async def spin_hits() -> float:
            text = (await treq.content(await client.get(metrics))).decode()
            self.assertIn("cgipool_busy_poll_seconds 0.0004\n", text)
            hits = [float(line.split()[-1]) for line in text.splitlines()
                    if line.startswith('cgipool_busy_poll_spins_total{result="hit"}')]
            self.assertEqual(len(hits), 1)
            return hits[0]

        # Requests until the daemon's spin has caught some I/O (within 400 µs of
        # the last, which a busy machine may deny any given request): a bound.
        deadline = reactor.seconds() + 20
        for i in range(10_000):
            code, _ = await get_json(keep, f"http://127.0.0.1:{proxy}/api/search?q=p{i}")
            self.assertEqual(code, 200)
            if i >= 29 and (await spin_hits() > 0 or reactor.seconds() > deadline):
                break
        self.assertGreater(await spin_hits(), 0)

        set_busy_poll(path, 0)
        process.signalProcess("HUP")
        await wait_metric(client, metrics, "cgipool_busy_poll_seconds 0.0\n")
        code, _ = await get_json(keep, f"http://127.0.0.1:{proxy}/api/search?q=off")
        self.assertEqual(code, 200)
        process.signalProcess("TERM")
        await proto.ended  # twistd ends with the signal it got
        self.assertIn("Server Shut Down.", proto.output.decode(errors="replace"))

    async def test_another_reactor_with_busy_poll_us_is_one_line_exit_1(self) -> None:
        path = write_config(self, "busy_poll_us: 200\n" + textwrap.dedent(SEARCH))
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["--reactor", "poll", "-n", "--pidfile=", "cgipool", "--config", path],
            env=os.environ.copy(), path=ROOT)
        self.assertEqual(code, 1, out + err)
        self.assertEqual(err.decode().strip().count("\n"), 0, err)
        self.assertIn("busy polling needs cgipool's reactor; this daemon runs "
                      "twisted.internet.pollreactor.PollReactor", err.decode())
        self.assertNotIn(b"Traceback", out + err)

    async def test_the_reactor_plugin_is_listed(self) -> None:
        """`twistd --help-reactors` lists cgipool: `--reactor cgipool` is a name users can
        find."""
        out, err, code = await getProcessOutputAndValue(
            TWISTD, ["--help-reactors"], env=os.environ.copy(), path=ROOT)
        self.assertIn(b"cgipool", out, out + err)


async def wait_metric(client: Any, url: str, line: str, timeout: float = 10) -> None:
    deadline = reactor.seconds() + timeout
    while True:
        text = (await treq.content(await client.get(url))).decode()
        if line in text:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"{line!r} not in {url} after {timeout}s")
        await sleep(0.1)
