"""Supervision logic on a fake process reactor and a Clock: no sleeping, no processes."""

from __future__ import annotations

import signal
from typing import Any

import attrs
from twisted.trial.unittest import SynchronousTestCase

from cgipool.config import RestartConfig, WorkersConfig
from cgipool.events import EventLog
from cgipool.health import STARTUP_FIRST_DELAY, HealthMonitor
from cgipool.proxy.balance import LeastOutstanding
from cgipool.supervisor.backoff import Backoff
from cgipool.supervisor.output import OutputBudget, OutputBudgets, OutputLogger
from cgipool.supervisor.pool import TERM_AGAIN_AFTER, TERM_AGAIN_WINDOW, ServicePool
from cgipool.supervisor.ports import PortAllocator, PortsExhausted
from cgipool.supervisor.worker import IllegalTransition, Worker, WorkerState
from tests.fakes import FakeProbe, FakeProcessReactor, KillRecorder, service

LAUNCHER = ["/usr/bin/setpriv", "--pdeathsig", "KILL", "/usr/bin/setsid"]
S = WorkerState


class PoolTestCase(SynchronousTestCase):
    def make_pool(self, free_ports: set[int] | None = None, **overrides: Any) -> ServicePool:
        self.reactor = FakeProcessReactor()
        self.probe = FakeProbe()
        self.kill = KillRecorder()
        self.events = EventLog(self.reactor.seconds)
        self.busy_ports: set[int] = set()
        self.ports = PortAllocator(9000, 9099, is_free=lambda p: p not in self.busy_ports)
        self.closed_connections: list[int] = []
        test = self

        class Connections:
            def __init__(self, worker: Worker) -> None:
                self.port = worker.port

            def close(self) -> None:
                test.closed_connections.append(self.port)

        self.pool = ServicePool(
            service(**overrides), self.reactor, ports=self.ports, events=self.events,
            probe=self.probe, monitor=HealthMonitor, launcher=LAUNCHER,
            connections_factory=Connections,
            kill=self.kill, rand=lambda: 0.5, port_free=lambda p: p not in self.busy_ports,
        )
        return self.pool

    def start_ready(self, **overrides: Any) -> ServicePool:
        pool = self.make_pool(**overrides)
        pool.start()
        self.reactor.advance(STARTUP_FIRST_DELAY)
        self.probe.answer()
        return pool

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


class SpawnTests(PoolTestCase):
    def test_start_spawns_min_workers_with_launcher_argv_env_and_cwd(self) -> None:
        pool = self.make_pool()
        pool.start()
        self.assertEqual(len(self.reactor.spawned), 2)
        first, second = self.reactor.spawned
        self.assertEqual(first.executable, LAUNCHER[0])
        self.assertEqual(first.args, [*LAUNCHER, "/bin/worker", "--port", "9000", "--id=0"])
        self.assertEqual(second.args[-2:], ["9001", "--id=1"])
        self.assertEqual(first.env["PORT"], "9000")
        self.assertEqual(first.env["CGIPOOL_SERVICE"], "svc")
        self.assertEqual(first.env["CGIPOOL_WORKER"], "0")
        self.assertEqual(first.env["GREETING"], "hi")
        self.assertIn("PATH", first.env)  # the daemon's environment is passed on
        self.assertEqual(first.path, "/srv")
        self.assertTrue(first.transport.stdin_closed)
        self.assertEqual([w.state for w in pool.workers], [S.STARTING, S.STARTING])
        self.assertEqual(pool.ready, [])
        self.assertEqual(pool.state, "starting")

    def test_first_probe_soon_after_spawn_puts_worker_in_rotation(self) -> None:
        pool = self.make_pool()
        pool.start()
        self.assertEqual(self.probe.calls, 0)
        self.reactor.advance(STARTUP_FIRST_DELAY)
        self.assertEqual([(p, path) for p, path, _ in self.probe.pending],
                         [(9000, "/health"), (9001, "/health")])
        self.probe.answer(9000)
        self.assertEqual(pool.workers[0].state, S.READY)
        self.assertEqual(pool.ready, [pool.workers[0]])
        self.assertEqual(pool.state, "degraded")
        self.probe.answer(9001)
        self.assertEqual(pool.state, "ok")
        self.assertEqual(self.kinds().count("ready"), 2)

    def test_startup_probes_speed_up_then_cap_at_100ms(self) -> None:
        self.make_pool(workers=WorkersConfig(1, 1))
        self.pool.start()
        times = []
        for _ in range(12):
            before = self.probe.calls
            while self.probe.calls == before:
                self.reactor.advance(0.001)
            times.append(round(self.reactor.seconds(), 3))
            self.probe.answer(ok=False)
        gaps = [round(b - a, 3) for a, b in zip(times, times[1:])]
        self.assertEqual(times[0], STARTUP_FIRST_DELAY)
        self.assertTrue(all(g <= 0.101 for g in gaps), gaps)
        self.assertEqual(gaps[-1], 0.1)
        self.assertEqual(self.pool.workers[0].state, S.STARTING)

    def test_never_ready_is_restarted_after_start_timeout(self) -> None:
        pool = self.make_pool(start_timeout=1.0,
                              workers=WorkersConfig(1, 1))
        pool.start()
        worker = pool.workers[0]
        pid = worker.pid
        while self.reactor.seconds() < 1.2:
            self.reactor.advance(0.01)
            self.probe.answer(ok=False)
        self.assertEqual(worker.state, S.STOPPING)
        self.assertEqual(self.kill.signals_to(pid), [signal.SIGTERM])
        self.assertIn("not ready within start_timeout=1s", self.events.recent(1)[0].message)
        self.reactor.exit(pid, sig=signal.SIGTERM)
        self.assertEqual(worker.state, S.BACKOFF)
        self.reactor.advance(0.1)
        self.assertEqual(worker.state, S.STARTING)
        self.assertNotEqual(worker.pid, pid)
        self.assertEqual(worker.restarts, 1)

    def test_spawn_error_goes_to_backoff_and_retries(self) -> None:
        pool = self.make_pool(workers=WorkersConfig(1, 1))
        self.reactor.fail_spawn = OSError(2, "No such file or directory")
        pool.start()
        worker = pool.workers[0]
        self.assertEqual(worker.state, S.BACKOFF)
        self.assertIn("spawn_failed", self.kinds())
        self.reactor.fail_spawn = None
        self.reactor.advance(0.1)
        self.assertEqual(worker.state, S.STARTING)


class CrashTests(PoolTestCase):
    def test_crash_restarts_after_backoff_and_counts_restart(self) -> None:
        pool = self.start_ready()
        worker = pool.workers[0]
        old = worker.pid
        self.reactor.exit(old, sig=signal.SIGKILL)
        self.assertEqual(worker.state, S.BACKOFF)
        self.assertNotIn(worker, pool.ready)
        self.assertEqual(worker.last_exit, "killed by SIGKILL")
        self.assertEqual(self.closed_connections, [9000])
        self.assertIn("crash", self.kinds())
        # The rest of the group is killed too.
        self.assertEqual(self.kill.signals_to(old), [signal.SIGKILL])
        self.reactor.advance(0.099)
        self.assertEqual(worker.state, S.BACKOFF)
        self.reactor.advance(0.001)
        self.assertEqual(worker.state, S.STARTING)
        self.assertEqual(worker.restarts, 1)
        self.assertEqual(worker.port, 9000)  # the slot keeps its port
        self.reactor.advance(STARTUP_FIRST_DELAY)
        self.probe.answer()
        self.assertEqual(worker.state, S.READY)
        self.assertEqual(pool.state, "ok")

    def test_crash_loop_backs_off_exponentially_shows_failing_and_never_gives_up(self) -> None:
        pool = self.make_pool(workers=WorkersConfig(1, 1),
                              restart=RestartConfig(delay=0.1, max_delay=2.0, reset_after=10,
                                                    failing_after=3))
        pool.start()
        worker = pool.workers[0]
        delays = []
        for _ in range(12):
            self.reactor.exit(worker.pid, code=1)
            self.assertEqual(worker.state, S.BACKOFF)
            timer = worker.restart_timer
            delays.append(round(timer.getTime() - self.reactor.seconds(), 3))
            self.reactor.advance(delays[-1])
        self.assertEqual(delays[:6], [0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
        self.assertEqual(set(delays[5:]), {2.0})
        self.assertEqual(worker.state, S.STARTING)  # still trying
        self.assertEqual(worker.restarts, 12)
        self.assertEqual(pool.state, "failing")
        self.assertIn("failing", self.kinds())
        self.assertTrue(pool.status(0)["workers"][0]["crash_looping"])

    def test_backoff_resets_after_stable_period(self) -> None:
        """A worker that flapped and then stays up for restart.reset_after is stable again: its
        next crash waits the first delay, not one grown from old failures."""
        pool = self.start_ready(workers=WorkersConfig(1, 1))
        worker = pool.workers[0]
        for _ in range(3):
            self.reactor.exit(worker.pid, code=1)
            self.reactor.advance(worker.restart_timer.getTime() - self.reactor.seconds())
            self.reactor.advance(STARTUP_FIRST_DELAY)
            self.probe.answer()
        self.assertEqual(worker.backoff.failures, 3)
        self.assertEqual(pool.state, "ok")  # ready again: ok, even if it flapped
        self.reactor.advance(10)
        self.assertEqual(worker.backoff.failures, 0)
        self.reactor.exit(worker.pid, code=1)
        self.assertAlmostEqual(worker.restart_timer.getTime() - self.reactor.seconds(), 0.1)

    def test_port_taken_by_someone_else_while_down_gets_a_new_port(self) -> None:
        pool = self.start_ready()
        worker = pool.workers[0]
        self.reactor.exit(worker.pid, code=1)
        self.busy_ports.add(9000)
        self.reactor.advance(0.1)
        self.assertEqual(worker.state, S.STARTING)
        self.assertEqual(worker.port, 9002)
        self.assertIn("port", self.kinds())

    def test_ports_exhausted_is_a_failure_not_a_crash_of_the_daemon(self) -> None:
        pool = self.make_pool(workers=WorkersConfig(1, 1))
        self.ports.high = self.ports.low  # one port only
        self.busy_ports.add(9000)
        pool.start()
        self.assertEqual(pool.workers[0].state, S.BACKOFF)
        self.assertIn("no free port", self.events.recent(2)[1].message)


class HealthTests(PoolTestCase):
    def test_fall_consecutive_failures_take_worker_out_and_restart_it(self) -> None:
        pool = self.start_ready()
        worker = pool.workers[0]
        pid = worker.pid
        for n in (1, 2):
            self.reactor.advance(5)
            self.probe.answer(9000, ok=False)
            self.probe.answer(9001)
            self.assertEqual(worker.health_failures, n)
            self.assertIn(worker, pool.ready)  # below `fall`: still serving
        self.reactor.advance(5)
        self.probe.answer(9000, ok=False)
        self.assertEqual(worker.state, S.STOPPING)
        self.assertNotIn(worker, pool.ready)
        self.assertEqual(self.kill.signals_to(pid), [signal.SIGTERM])
        self.assertEqual(worker.last_health.error, "connection refused")
        self.reactor.exit(pid, sig=signal.SIGTERM)
        self.assertEqual(worker.state, S.BACKOFF)

    def test_passing_probe_resets_failure_count(self) -> None:
        """Health failures must be consecutive to take a worker out: one passing probe resets
        the count, so scattered failures never add up to ``fall``."""
        pool = self.start_ready()
        worker = pool.workers[0]
        for ok in (False, False, True, False, False):
            self.reactor.advance(5)
            self.probe.answer(9000, ok=ok)
            self.probe.answer(9001)
        self.assertEqual(worker.state, S.READY)
        self.assertEqual(worker.health_failures, 2)

    def test_probe_that_hangs_times_out(self) -> None:
        """A worker that accepts the health check but never answers counts a failure after
        health.timeout, instead of the probe waiting forever."""
        pool = self.start_ready()
        worker = pool.workers[0]
        self.reactor.advance(5)
        self.probe.answer(9001)
        self.reactor.advance(1.0)  # health.timeout
        self.assertEqual(worker.health_failures, 1)
        self.assertEqual(worker.last_health.error, "timeout")

    def test_refused_connection_takes_worker_out_until_a_probe_passes(self) -> None:
        pool = self.start_ready()
        worker = pool.workers[0]
        pool.connection_refused(worker)
        self.assertEqual(worker.state, S.UNHEALTHY)
        self.assertEqual(pool.ready, [pool.workers[1]])
        self.assertEqual(pool.state, "degraded")
        self.reactor.advance(0.05)  # checked soon, not after the 5 s interval
        self.assertEqual(self.probe.answer(9000), 1)
        self.assertEqual(worker.state, S.READY)
        self.assertIn(worker, pool.ready)
        self.assertIn("recovered", self.kinds())


class RestartAndStopTests(PoolTestCase):
    def test_planned_restart_respawns_without_backoff(self) -> None:
        """A restart the operator asked for is no crash: the worker respawns as soon as its
        process ends, and its backoff count is untouched."""
        pool = self.start_ready()
        worker = pool.workers[1]
        pid = worker.pid
        self.assertTrue(pool.restart_worker(worker, "admin", planned=True))
        self.assertEqual(self.kill.signals_to(pid), [signal.SIGTERM])
        self.reactor.exit(pid)
        self.assertEqual(worker.state, S.STARTING)
        self.assertEqual(worker.restarts, 1)
        self.assertEqual(worker.backoff.failures, 0)

    def test_sigkill_after_stop_timeout_when_sigterm_is_ignored(self) -> None:
        pool = self.start_ready()
        self.reactor.advance(TERM_AGAIN_WINDOW)  # not a young process (see below)
        worker = pool.workers[0]
        pid = worker.pid
        pool.restart_worker(worker, "test", planned=True)
        self.reactor.advance(4.9)
        self.assertEqual(self.kill.signals_to(pid), [signal.SIGTERM])
        self.reactor.advance(0.1)
        self.assertEqual(self.kill.signals_to(pid), [signal.SIGTERM, signal.SIGKILL])
        self.assertIn("kill", self.kinds())

    def test_a_young_process_gets_its_sigterm_again(self) -> None:
        """Right after spawn the child may still be in the launcher, where a signal
        can be lost: the SIGTERM is repeated once, then SIGKILL as usual."""
        pool = self.start_ready()
        worker = pool.workers[0]
        pid = worker.pid
        pool.restart_worker(worker, "test", planned=True)
        self.reactor.advance(TERM_AGAIN_AFTER)
        self.assertEqual(self.kill.signals_to(pid), [signal.SIGTERM, signal.SIGTERM])
        self.reactor.advance(5)
        self.assertEqual(self.kill.signals_to(pid),
                         [signal.SIGTERM, signal.SIGTERM, signal.SIGKILL])

    def test_stop_waits_until_every_process_has_ended(self) -> None:
        pool = self.start_ready(workers=WorkersConfig(3, 3))
        self.reactor.advance(TERM_AGAIN_WINDOW)
        # One worker is in backoff when the stop comes: it must not respawn.
        crashed = pool.workers[2]
        self.reactor.exit(crashed.pid, code=1)
        a, b = pool.workers[0], pool.workers[1]
        pids = (a.pid, b.pid)
        d = pool.stop()
        self.assertEqual([self.kill.signals_to(p) for p in pids],
                         [[signal.SIGTERM], [signal.SIGTERM]])
        self.assertEqual(crashed.state, S.STOPPED)
        self.assertNoResult(d)
        self.reactor.exit(pids[0])
        self.assertNoResult(d)
        # The second ignores SIGTERM: SIGKILL after stop_timeout, then it ends
        # but a grandchild holds its pipes for a moment.
        self.reactor.advance(5)
        self.assertEqual(self.kill.signals_to(pids[1]), [signal.SIGTERM, signal.SIGKILL])
        self.reactor.exit(pids[1], sig=signal.SIGKILL, close_pipes=False)
        self.assertNoResult(d)
        self.reactor.advance(1.0)  # pipes force-closed after the grace period
        self.successResultOf(d)
        self.assertEqual([w.state for w in pool.workers], [S.STOPPED] * 3)
        self.assertEqual(pool.state, "stopped")
        spawned = len(self.reactor.spawned)
        self.reactor.advance(60)
        self.assertEqual(len(self.reactor.spawned), spawned)

    def test_stop_during_restart_does_not_respawn(self) -> None:
        pool = self.start_ready()
        worker = pool.workers[0]
        pid = worker.pid
        pool.restart_worker(worker, "test", planned=True)
        d = pool.stop()
        self.reactor.exit(pid)
        self.reactor.exit(pool.workers[1].pid)
        self.successResultOf(d)
        self.assertEqual(worker.state, S.STOPPED)

    def test_restart_of_a_worker_without_process_is_refused(self) -> None:
        pool = self.start_ready()
        worker = pool.workers[0]
        self.reactor.exit(worker.pid, code=1)
        self.assertFalse(pool.restart_worker(worker, "test"))


class WorkerStateTests(SynchronousTestCase):
    def test_illegal_transition_raises(self) -> None:
        """The state machine refuses impossible moves (READY before STARTING, READY back to
        STARTING), so a bookkeeping bug fails loudly instead of corrupting the pool."""
        worker = Worker("svc", 0, Backoff(RestartConfig()))
        with self.assertRaises(IllegalTransition):
            worker.transition(S.READY)
        worker.transition(S.STARTING)
        worker.transition(S.READY)
        with self.assertRaises(IllegalTransition):
            worker.transition(S.STARTING)


class BackoffTests(SynchronousTestCase):
    def test_jitter_stays_within_twenty_percent_and_below_max(self) -> None:
        """Jitter spreads the respawns of workers that crashed together, but never past
        max_delay, and a very long crash loop does not overflow the doubling."""
        config = RestartConfig(delay=1.0, max_delay=5.0)
        low = Backoff(config, random=lambda: 0.0)
        high = Backoff(config, random=lambda: 0.999999)
        self.assertAlmostEqual(low.next_delay(), 0.8)
        self.assertAlmostEqual(high.next_delay(), 1.2, places=4)
        for _ in range(10):
            high.next_delay()
        self.assertEqual(high.next_delay(), 5.0)
        low.failures = 200  # no overflow after a very long crash loop
        self.assertEqual(low.next_delay(), 4.0)


class PortAllocatorTests(SynchronousTestCase):
    def test_skips_ports_in_use_and_reserved_ones(self) -> None:
        """Ports another program holds or the config reserves are never handed out, and a
        released port is reused only after the ports not used yet."""
        busy = {5001}
        ports = PortAllocator(5000, 5004, reserved={5000}, is_free=lambda p: p not in busy)
        self.assertEqual([ports.allocate(), ports.allocate()], [5002, 5003])
        ports.release(5002)
        self.assertEqual(ports.allocate(), 5004)
        self.assertEqual(ports.allocate(), 5002)
        with self.assertRaises(PortsExhausted):
            ports.allocate()


class BalancerTests(SynchronousTestCase):
    def workers(self, *loads: int) -> list[Worker]:
        out = []
        for i, load in enumerate(loads):
            w = Worker("svc", i, Backoff(RestartConfig()))
            w.in_flight = load
            out.append(w)
        return out

    def test_sequential_requests_rotate(self) -> None:
        """With equal load the balancer rotates instead of always picking the first worker,
        so one-at-a-time requests still spread over the pool."""
        ws = self.workers(0, 0, 0)
        balancer = LeastOutstanding()
        self.assertEqual([balancer.pick(ws).index for _ in range(6)], [0, 1, 2, 0, 1, 2])

    def test_least_outstanding_wins(self) -> None:
        """The worker with the fewest requests in flight gets every next one, so a worker
        stuck on slow requests is not handed more."""
        ws = self.workers(3, 1, 2)
        balancer = LeastOutstanding()
        self.assertEqual({balancer.pick(ws).index for _ in range(5)}, {1})

    def test_ties_among_least_loaded_rotate(self) -> None:
        """Ties among the least loaded rotate between them and never reach a busier worker,
        so no single idle worker takes every request."""
        ws = self.workers(2, 1, 1)
        balancer = LeastOutstanding()
        self.assertEqual({balancer.pick(ws).index for _ in range(6)}, {1, 2})

    def test_exclude_and_empty(self) -> None:
        """A retry excludes the workers already tried and gets another; with none left, or an
        empty pool, the answer is None rather than an exception."""
        ws = self.workers(0, 5)
        balancer = LeastOutstanding()
        self.assertIs(balancer.pick(ws, exclude=[ws[0]]), ws[1])
        self.assertIsNone(balancer.pick(ws, exclude=ws))
        self.assertIsNone(balancer.pick([]))


class OutputLoggerTests(SynchronousTestCase):
    def setUp(self) -> None:
        from twisted.logger import globalLogPublisher

        self.logged: list[dict[str, Any]] = []
        observer = self.logged.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        from twisted.internet.task import Clock

        self.clock = Clock()
        self.out = OutputLogger(self.clock, "svc", 1, 42, "stdout", max_line=16,
                                lines_per_second=5)

    def lines(self) -> list[str]:
        return [e["line"] for e in self.logged if e.get("service") == "svc" and "line" in e]

    def test_lines_are_split_and_tagged(self) -> None:
        """Worker output becomes one log event per line, reassembled across reads and without
        its CRLF, tagged with service, worker, pid and stream to trace it back."""
        self.out.feed(b"hello\nwor")
        self.out.feed(b"ld\r\n")
        self.assertEqual(self.lines(), ["hello", "world"])
        event = [e for e in self.logged if e.get("line") == "hello"][0]
        self.assertEqual((event["service"], event["worker"], event["pid"], event["stream"]),
                         ("svc", 1, 42, "stdout"))

    def test_endless_line_is_truncated_and_memory_stays_bounded(self) -> None:
        for _ in range(1000):
            self.out.feed(b"x" * 10_000)
        self.assertLessEqual(len(self.out._partial), 16)
        self.out.feed(b"\n")
        self.assertEqual(self.lines(), ["x" * 16 + " [line truncated]"])

    def test_flood_is_rate_limited_with_a_summary(self) -> None:
        self.out.feed(b"line\n" * 100)
        self.assertEqual(len(self.lines()), 5)
        self.clock.advance(1.0)
        self.out.feed(b"after\n")
        dropped = [e for e in self.logged if e.get("dropped")]
        self.assertEqual(dropped[0]["dropped"], 95)
        self.assertEqual(self.lines()[-1], "after")

    def test_flush_logs_unterminated_last_line(self) -> None:
        """A worker's last words before it exits often lack a newline: flushing logs them
        instead of dropping them."""
        self.out.feed(b"no newline")
        self.out.flush()
        self.assertEqual(self.lines(), ["no newline"])


class OutputBudgetTests(SynchronousTestCase):
    """The per-service token bucket of logged output, on a Clock."""

    def setUp(self) -> None:
        from twisted.internet.task import Clock
        from twisted.logger import globalLogPublisher

        self.logged: list[dict[str, Any]] = []
        observer = self.logged.append
        globalLogPublisher.addObserver(observer)
        self.addCleanup(globalLogPublisher.removeObserver, observer)
        self.clock = Clock()
        self.budget = OutputBudget(self.clock, "svc", lines_per_second=10,
                                   bytes_per_second=10_000)

    def logger(self, worker: int | str, stream: str) -> OutputLogger:
        return OutputLogger(self.clock, "svc", worker, 100, stream, budget=self.budget)

    def lines(self) -> list[str]:
        return [e["line"] for e in self.logged if e.get("service") == "svc" and "line" in e]

    def summaries(self) -> list[dict[str, Any]]:
        return [e for e in self.logged if "dropped" in e]

    def test_all_workers_and_streams_of_a_service_share_one_budget(self) -> None:
        loggers = [self.logger(0, "stdout"), self.logger(0, "stderr"),
                   self.logger(1, "stderr"), self.logger("r-1", "stderr")]
        for out in loggers:
            out.feed(b"flood\n" * 100)
        self.assertEqual(len(self.lines()), 10, "the service's burst, not 10 per process")
        self.assertEqual(self.budget.dropped_lines, {"stdout": 90, "stderr": 300})
        other = OutputBudget(self.clock, "other", lines_per_second=10)
        OutputLogger(self.clock, "other", 0, 1, "stderr", budget=other).feed(b"mine\n")
        self.assertIn("mine", [e.get("line") for e in self.logged], "another service's own")

    def test_drops_are_summed_up_once_per_interval_with_the_service_named(self) -> None:
        out = self.logger(0, "stderr")
        out.feed(b"x\n" * 12_355)
        self.assertEqual(self.summaries(), [], "reported when the interval ends")
        self.clock.advance(1.0)
        (summary,) = self.summaries()
        self.assertEqual((summary["service"], summary["stream"], summary["dropped"]),
                         ("svc", "stderr", 12_345))
        from twisted.logger import formatEvent

        self.assertIn("dropped 12,345 lines (24,690 bytes) of stderr from service svc "
                      "in the last 1.0 s", formatEvent(summary))
        self.assertEqual(summary["log_level"].name, "warn")
        out.feed(b"x\n" * 15)  # 10 tokens refilled: 5 over
        self.clock.advance(1.0)
        self.assertEqual([s["dropped"] for s in self.summaries()], [12_345, 5])
        self.clock.advance(5.0)
        self.assertEqual(len(self.summaries()), 2, "no drops, no summary")
        self.assertEqual(self.clock.getDelayedCalls(), [], "no timer without drops")

    def test_a_flood_in_one_chunk_is_counted_as_line_by_line(self) -> None:
        from twisted.internet.task import Clock

        data = b"".join(b"line %d\n" % n for n in range(5000)) + b"partial"
        one = OutputBudget(Clock(), "svc", lines_per_second=10)
        OutputLogger(one.clock, "svc", 0, 1, "stderr", budget=one).feed(data)
        each = OutputBudget(Clock(), "svc", lines_per_second=10)
        by_line = OutputLogger(each.clock, "svc", 0, 1, "stderr", budget=each)
        for byte in range(len(data)):
            by_line.feed(data[byte:byte + 1])
        self.assertEqual(one.dropped_lines, each.dropped_lines)
        self.assertEqual(one.dropped_bytes, each.dropped_bytes)
        self.assertEqual(one.dropped_lines, {"stderr": 4990})
        self.assertEqual([e["line"] for e in self.logged if "line" in e],
                         [f"line {n}" for n in range(10)] * 2)

    def test_the_bytes_budget_drops_long_lines(self) -> None:
        out = self.logger(0, "stdout")
        out.feed((b"y" * 3000 + b"\n") * 10)  # 3 KB lines, 10 KB/s
        self.assertEqual(len(self.lines()), 3)
        self.assertEqual(self.budget.dropped_bytes, {"stdout": 7 * 3001})
        self.clock.advance(0.5)  # 5,000 bytes back: one more line
        out.feed(b"y" * 3000 + b"\n")
        out.feed(b"y" * 3000 + b"\n")
        self.assertEqual(len(self.lines()), 4)

    def test_tokens_refill_at_the_rate_up_to_the_burst(self) -> None:
        out = self.logger(0, "stdout")
        out.feed(b"a\n" * 10)
        self.clock.advance(0.3)
        out.feed(b"b\n" * 10)
        self.assertEqual(self.lines().count("b"), 3)
        self.clock.advance(60)  # a long quiet spell: one burst, not 600 lines
        out.feed(b"c\n" * 100)
        self.assertEqual(self.lines().count("c"), 10)

    def test_stop_reports_what_is_pending_and_leaves_no_timer(self) -> None:
        budgets = OutputBudgets(self.clock, lines_per_second=1)
        out = OutputLogger(self.clock, "a", 0, 1, "stderr", budget=budgets.budget("a"))
        out.feed(b"z\n" * 5)
        self.assertIs(budgets.budget("a"), out.budget, "one budget per service name")
        budgets.stop()
        self.assertEqual([s["dropped"] for s in self.summaries()], [4])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_dropped_lines_are_a_counter_in_metrics(self) -> None:
        from prometheus_client import generate_latest

        from cgipool.metrics import Metrics, make_registry

        budgets = OutputBudgets(self.clock, lines_per_second=1)
        OutputLogger(self.clock, "a", 0, 1, "stderr", budget=budgets.budget("a")).feed(
            b"z\n" * 8)

        class Supervisor:
            pools: dict[str, Any] = {}
            output = budgets

        registry = make_registry(Metrics(self.clock, ["a"]), Supervisor(), process=False)
        text = generate_latest(registry).decode()
        self.assertIn('cgipool_output_dropped_lines_total{service="a",stream="stderr"} 7.0',
                      text)
        self.assertIn('cgipool_output_dropped_lines_total{service="a",stream="stdout"} 0.0',
                      text)
        budgets.stop()

    def test_the_supervisor_gives_every_pool_its_service_budget(self) -> None:
        from cgipool.config import PoolConfig
        from cgipool.supervisor.supervisor import Supervisor

        config = PoolConfig(path="pool.yaml", services=(service("a"), service("b")))
        supervisor = Supervisor(config, FakeProcessReactor(), probe=FakeProbe(),
                                monitor=HealthMonitor, launcher=LAUNCHER, kill=KillRecorder())
        a, b = supervisor.pools["a"], supervisor.pools["b"]
        self.assertIs(a.output_budget, supervisor.output.budget("a"))
        self.assertIsNot(a.output_budget, b.output_budget)


class ResizeTests(PoolTestCase):
    def ready_all(self) -> None:
        self.reactor.advance(STARTUP_FIRST_DELAY)
        self.probe.answer()

    def test_scale_up_spawns_new_slots_on_new_ports(self) -> None:
        pool = self.start_ready()
        self.assertEqual(pool.scale_to(4, "admin"), 2)
        self.assertEqual([w.index for w in pool.workers], [0, 1, 2, 3])
        self.assertEqual([w.port for w in pool.workers], [9000, 9001, 9002, 9003])
        self.assertEqual(pool.desired, 4)
        self.ready_all()
        self.assertEqual(len(pool.ready), 4)
        self.assertEqual(pool.state, "ok")
        event = [e for e in self.events if e.kind == "scale"][0]
        self.assertEqual((event.fields["before"], event.fields["after"]), (2, 4))

    def test_scale_outside_min_max_is_refused(self) -> None:
        pool = self.start_ready()
        self.assertRaises(ValueError, pool.scale_to, 1, "x")
        self.assertRaises(ValueError, pool.scale_to, 5, "x")
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_scale_down_drains_idle_workers_first_and_waits_for_busy_ones(self) -> None:
        pool = self.start_ready()
        pool.scale_to(4, "up")
        self.ready_all()
        w0, w1, w2, w3 = pool.workers
        w3.in_flight = 1
        w2.in_flight = 1
        w0.in_flight = 2
        pool.scale_to(2, "down")
        # The idle one goes first, then the least busy, newest first.
        self.assertEqual(w1.state, S.STOPPING)
        self.assertEqual(w3.state, S.DRAINING)
        self.assertEqual(pool.ready, [w0, w2])
        self.assertEqual(pool.desired, 2)
        self.assertEqual(self.kill.signals_to(w3.pid), [])  # still finishing its request
        w3.in_flight = 0
        w3.drained(w3)  # what the proxy does when the last request ends
        self.assertEqual(self.kill.signals_to(w3.pid), [signal.SIGTERM])
        for worker in (w1, w3):
            self.reactor.exit(worker.pid)
        self.assertEqual(pool.workers, [w0, w2])
        self.assertEqual(pool.state, "ok")
        self.assertIn("retired", self.kinds())
        # Their ports are free again.
        self.assertFalse({w1.port, w3.port} & self.ports._taken)

    def test_drain_that_never_finishes_is_stopped_after_request_timeout(self) -> None:
        pool = self.start_ready(request_timeout=2.0)
        pool.scale_to(3, "up")
        self.ready_all()
        worker = pool.workers[2]
        worker.in_flight = 1
        self.assertTrue(pool.drain_worker(worker, "admin"))
        self.reactor.advance(1.9)
        self.assertEqual(worker.state, S.DRAINING)
        self.reactor.advance(0.1)
        self.assertEqual(worker.state, S.STOPPING)
        self.assertIn("drain_timeout", self.kinds())

    def test_drain_at_min_size_starts_a_replacement(self) -> None:
        pool = self.start_ready()
        old = pool.workers[0]
        self.assertTrue(pool.drain_worker(old, "admin"))
        self.assertFalse(pool.drain_worker(old, "again"))
        self.assertEqual(old.state, S.STOPPING)  # idle: stopped at once
        self.assertEqual(pool.desired, 2)
        self.assertEqual(pool.workers[-1].state, S.STARTING)
        self.reactor.exit(old.pid)
        self.assertNotIn(old, pool.workers)

    def test_replace_keeps_the_old_worker_serving_until_the_new_one_is_ready(self) -> None:
        pool = self.start_ready()
        old = pool.workers[0]
        old_pid = old.pid
        old.in_flight = 1
        result = pool.replace_worker(old, "admin")
        new = pool.workers[-1]
        self.assertEqual((new.state, new.probation, new.port), (S.STARTING, True, 9002))
        self.assertIn(old, pool.ready)
        self.assertEqual(pool.desired, 2)
        self.assertEqual(pool.state, "ok")
        self.ready_all()
        self.assertEqual(old.state, S.DRAINING)
        self.assertEqual(pool.ready, [pool.workers[1], new])
        self.assertNoResult(result)
        old.in_flight = 0
        old.drained(old)
        self.reactor.exit(old_pid)
        self.assertIs(self.successResultOf(result), True)
        self.assertEqual(pool.workers, [pool.workers[0], new])
        self.assertEqual(len(pool.ready), 2)
        self.assertEqual(pool.restarts_total, 1)

    def test_replacement_that_fails_to_start_leaves_the_old_worker(self) -> None:
        pool = self.start_ready()
        old = pool.workers[0]
        result = pool.replace_worker(old, "admin")
        new = pool.workers[-1]
        self.reactor.exit(new.pid, code=127)
        self.assertIs(self.successResultOf(result), False)
        self.assertNotIn(new, pool.workers)
        self.assertEqual(old.state, S.READY)
        self.assertIn("replace_failed", self.kinds())
        self.reactor.advance(60)
        self.assertEqual(len(pool.workers), 2)  # no lingering backoff loop

    def test_rolling_restart_replaces_one_at_a_time_without_losing_capacity(self) -> None:
        pool = self.start_ready()
        originals = list(pool.workers)
        done = pool.rolling_restart("deploy")
        self.assertRaises(RuntimeError, pool.rolling_restart, "again")
        for _ in range(2):
            self.assertEqual(len([w for w in pool.workers if w.state is S.STARTING]), 1)
            self.assertEqual(len(pool.ready), 2)
            self.ready_all()
            leaving = [w for w in originals if w.state is S.STOPPING]
            self.assertEqual(len(leaving), 1)
            self.reactor.exit(leaving[0].pid)
        self.assertIs(self.successResultOf(done), True)
        self.assertEqual([w for w in pool.workers if w in originals], [])
        self.assertEqual(len(pool.ready), 2)
        self.assertFalse(pool.rolling)
        self.assertIn("rolling_restart_done", self.kinds())

    def test_roll_during_a_rolling_restart_rolls_again_afterwards(self) -> None:
        """A reload that changes the command mid-way must reach the workers the
        first rolling restart had already replaced with the old command."""
        pool = self.start_ready()
        pool.roll("deploy")
        self.ready_all()
        self.reactor.exit([w for w in pool.workers if w.state is S.STOPPING][0].pid)
        # Half-way: one worker replaced with the old environment.  A reload comes.
        pool.reconfigure(attrs.evolve(pool.config, env={"GREETING": "new"}))
        pool.roll("configuration reloaded")
        for _ in range(10):  # the first roll ends, a second one replaces both
            self.ready_all()
            for w in [w for w in pool.workers if w.state is S.STOPPING]:
                self.reactor.exit(w.pid)
            if not pool.rolling:
                break
        self.assertFalse(pool.rolling)
        self.assertEqual([e.kind for e in self.events].count("rolling_restart_done"), 2)
        envs = {self.reactor.by_pid[w.pid].env["GREETING"] for w in pool.workers}
        self.assertEqual(envs, {"new"})
        self.assertEqual(len(pool.ready), 2)

    def test_replace_with_no_spare_explicit_port_restarts_in_place(self) -> None:
        pool = self.start_ready(ports=(8000, 8001, 8002, 8003))
        pool.scale_to(4, "full")
        self.ready_all()
        old = pool.workers[0]
        pid = old.pid
        result = pool.replace_worker(old, "admin")
        self.assertEqual(len(pool.workers), 4)
        self.assertEqual(old.state, S.STOPPING)
        self.reactor.exit(pid)
        self.assertEqual((old.state, old.port), (S.STARTING, 8000))
        self.ready_all()
        self.assertIs(self.successResultOf(result), True)

    def test_stop_while_draining_and_replacing(self) -> None:
        """A stop in the middle of a drain and a replacement still ends: every worker stops,
        the replacement reports failure and no drain callback is left waiting."""
        pool = self.start_ready()
        busy = pool.workers[0]
        busy.in_flight = 1
        pool.scale_to(3, "up")
        pool.drain_worker(busy, "admin")
        replace = pool.replace_worker(pool.workers[1], "admin")
        d = pool.stop()
        for pid in self.reactor.alive():
            self.reactor.exit(pid)
        self.successResultOf(d)
        self.assertIs(self.successResultOf(replace), False)
        self.assertTrue(all(w.state is S.STOPPED for w in pool.workers))
        self.assertIsNone(busy.drained)
