"""Busy polling: the spin-then-sleep loop on a scripted poller and clock, then
attached to the real epoll reactor under a running daemon."""

from __future__ import annotations

import errno
import json
import os
import resource
import textwrap
from collections.abc import Sequence
from typing import Any

import treq
from twisted.internet import reactor
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cgipool.busypoll import BusyPoll, BusyPollService, BusyPollUnsupported, for_reactor
from tests.support import (
    get_json,
    http_client,
    require_binaries,
    sleep,
    start_daemon,
    write_config,
)
from tests.test_integration import SEARCH


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
        # An idle daemon (timers only) sleeps straight away: one blocking poll.
        poller = ScriptedPoller()
        busy, handled = self.make(poller)
        busy.iterate(5.0)
        self.assertEqual(poller.calls, [(5.0, 3)])
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


def epoll_reactor_only(case: Any) -> None:
    if not isinstance(reactor, EPollReactor):
        case.skipTest(f"needs the epoll reactor, trial runs {type(reactor).__name__}")


class BusyPollServiceTests(SynchronousTestCase):
    def test_non_epoll_reactor_is_refused_only_when_asked_to_spin(self) -> None:
        BusyPollService(Clock(), 0)
        error = self.assertRaises(BusyPollUnsupported, BusyPollService, Clock(), 200)
        self.assertIn("busy polling needs the epoll reactor; this daemon runs "
                      "twisted.internet.task.Clock", str(error))
        service = BusyPollService(Clock(), 0)
        self.assertRaises(BusyPollUnsupported, service.check, 1)
        self.assertRaises(BusyPollUnsupported, service.configure, 1)
        self.assertEqual(service.spin_us, 0)
        self.assertRaises(BusyPollUnsupported, for_reactor, Clock())

    def test_attaches_on_start_follows_configure_and_detaches_on_stop(self) -> None:
        epoll_reactor_only(self)
        service = BusyPollService(reactor, 150)
        self.addCleanup(lambda: service.running and service.stopService())
        own = reactor.doIteration
        self.assertEqual(own, EPollReactor.doPoll.__get__(reactor))
        service.startService()
        self.assertEqual(reactor.doIteration, service.poller.iterate)
        self.assertEqual(service.poller.spin, 150e-6)
        service.configure(0)
        self.assertNotIn("doIteration", vars(reactor))
        service.configure(300)
        self.assertEqual((reactor.doIteration, service.poller.spin),
                         (service.poller.iterate, 300e-6))
        service.stopService()
        self.assertNotIn("doIteration", vars(reactor))
        self.assertEqual(reactor.doIteration, own)


class BusyPollDaemonTests(TestCase):
    """A daemon with busy_poll_us answers through the spinning reactor; a
    reload turns it off and on again; /metrics shows what it costs."""

    timeout = 60

    def setUp(self) -> None:
        require_binaries("search.cgi")
        epoll_reactor_only(self)

    def set_busy_poll(self, path: str, spin_us: int) -> None:
        with open(path) as f:
            lines = [line for line in f if not line.startswith("busy_poll_us:")]
        with open(path + ".new", "w") as f:
            f.write(f"busy_poll_us: {spin_us}\n" + "".join(lines))
        os.replace(path + ".new", path)

    async def test_requests_through_the_spinning_reactor_and_live_reload(self) -> None:
        path = write_config(self, "busy_poll_us: 400\n" + textwrap.dedent(SEARCH))
        daemon = await start_daemon(self, path)
        poller = daemon.top.busy_poll.poller
        self.assertEqual(reactor.doIteration, poller.iterate)
        client = http_client(self)
        for i in range(50):
            code, body = await get_json(client, f"{daemon.url}/api/search?q=spin{i}")
            self.assertEqual((code, body["query"]), (200, f"spin{i}"))
        self.assertGreater(poller.hits, 0)
        self.assertGreater(poller.spin_seconds, 0)

        # Idle (no client, timers and health checks only), the reactor sleeps:
        # spinning through the half second would take about half a CPU second.
        before = resource.getrusage(resource.RUSAGE_SELF)
        await sleep(0.5)
        after = resource.getrusage(resource.RUSAGE_SELF)
        used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        self.assertLess(used, 0.15, f"{used:.3f} CPU seconds while idle")

        response = await client.get(f"{daemon.admin_url}/metrics")
        text = (await treq.content(response)).decode()
        self.assertIn("cgipool_busy_poll_seconds 0.0004\n", text)  # 400 µs, in base units
        hits = [line for line in text.splitlines()
                if line.startswith('cgipool_busy_poll_spins_total{result="hit"}')]
        self.assertEqual(len(hits), 1)
        self.assertGreater(float(hits[0].split()[-1]), 0)
        self.assertIn("cgipool_busy_poll_spin_seconds_total", text)

        self.set_busy_poll(path, 0)
        result = daemon.top.reloader.reload()
        self.assertTrue(result.ok, result.error)
        self.assertEqual(result.applied, ("busy_poll_us",))
        self.assertIn("busy_poll_us applied", result.summary())
        self.assertNotIn("doIteration", vars(reactor))
        code, body = await get_json(client, f"{daemon.url}/api/search?q=off")
        self.assertEqual((code, body["query"]), (200, "off"))
        hits = poller.hits
        code, _ = await get_json(client, f"{daemon.url}/api/search?q=still-off")
        self.assertEqual((code, poller.hits), (200, hits))

        self.set_busy_poll(path, 50)
        response = await client.post(f"{daemon.admin_url}/admin/api/reload",
                                     headers={"X-CGIPool-CSRF": "1"})
        body = json.loads(await treq.content(response))
        self.assertEqual((response.code, body["applied"]), (200, ["busy_poll_us"]))
        self.assertEqual((reactor.doIteration, poller.spin), (poller.iterate, 50e-6))
        code, _ = await get_json(client, f"{daemon.url}/api/search?q=on-again")
        self.assertEqual(code, 200)

        await daemon.top.stopService()
        self.assertNotIn("doIteration", vars(reactor))

    async def test_reload_to_busy_polling_on_a_reactor_without_epoll_changes_nothing(
            self) -> None:
        path = write_config(self, SEARCH)
        daemon = await start_daemon(self, path)
        service = daemon.top.busy_poll
        service.reactor = Clock()  # as if twistd had been started with another reactor
        self.set_busy_poll(path, 200)
        result = daemon.top.reloader.reload()
        self.assertFalse(result.ok)
        self.assertEqual(result.error,
                         f"{path}: key 'busy_poll_us': busy polling needs the epoll "
                         f"reactor; this daemon runs twisted.internet.task.Clock (drop "
                         f"twistd's --reactor option or set busy_poll_us: 0)")
        self.assertEqual((service.spin_us, daemon.top.reloader.config.busy_poll_us), (0, 0))
        self.assertNotIn("doIteration", vars(reactor))
