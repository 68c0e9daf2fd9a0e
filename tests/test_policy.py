"""Autoscaling, passive health and recycling decisions, on a Clock (no sleeping)."""

from __future__ import annotations

import signal
from typing import Any

from cgipool.config import AutoscaleConfig, HealthConfig, RecycleConfig, WorkersConfig
from cgipool.supervisor.policy import PoolPolicy
from cgipool.supervisor.worker import WorkerState
from tests.test_supervisor import PoolTestCase

S = WorkerState
FAST = AutoscaleConfig(interval=0.25, up=0.8, window=1.0, step=4, down=0.3, cooldown=5.0,
                       down_interval=1.0)


class PolicyTestCase(PoolTestCase):
    def start_policy(self, rss: Any = None, **overrides: Any) -> PoolPolicy:
        overrides.setdefault("workers", WorkersConfig(2, 8))
        overrides.setdefault("autoscale", FAST)
        overrides.setdefault("concurrency", 2)
        pool = self.start_ready(**overrides)
        self.policy = pool.policy = PoolPolicy(pool, self.reactor,
                                               rss or (lambda pid: 1000))
        pool.policy.start()
        self.addCleanup(pool.policy.stop)
        return pool.policy

    def load(self, in_flight: int, queued: int = 0) -> None:
        """Spread ``in_flight`` requests over the ready workers, ``queued`` waiting."""
        ready = self.pool.ready
        for i, worker in enumerate(ready):
            worker.in_flight = in_flight // len(ready) + (1 if i < in_flight % len(ready) else 0)
        self.pool.waiting = [None] * queued

    def pump(self, steps: int, step: float = 0.25) -> None:
        """Advance time; every health probe passes (workers stay healthy)."""
        for _ in range(steps):
            self.reactor.advance(step)
            self.probe.answer()

    def ready_new(self) -> None:
        self.reactor.advance(0.05)
        self.probe.answer()

    def scale_events(self) -> list[Any]:
        return [e for e in self.events if e.kind == "scale"]


class ScaleUpTests(PolicyTestCase):
    def test_sustained_overload_doubles_the_pool_within_a_second(self) -> None:
        policy = self.start_policy()
        self.load(4, queued=3)  # 7 requests for 2 workers x 2: utilisation 1.75
        self.pump(4)
        self.assertEqual(self.pool.desired, 2, "one window is not over yet")
        self.pump(1)
        self.assertEqual(self.pool.desired, 4)
        (event,) = self.scale_events()
        self.assertIn("utilisation 1.75 >= 0.8 for 1s", event.message)
        self.assertIn("7 requests in flight or waiting", event.message)
        self.assertEqual(policy.last_decision["to"], 4)

    def test_starting_workers_count_as_capacity_so_one_burst_spawns_once(self) -> None:
        self.start_policy()
        self.load(4, queued=2)  # 6 / (2 x 2) = 1.5
        self.pump(5)
        self.assertEqual(self.pool.desired, 4)
        # New workers still starting: 6 / (4 x 2) = 0.75 < 0.8, no second decision.
        self.pump(8)
        self.assertEqual(self.pool.desired, 4)
        self.assertEqual(len(self.scale_events()), 1)

    def test_growth_is_capped_by_step_and_max(self) -> None:
        self.start_policy(workers=WorkersConfig(2, 7),
                          autoscale=AutoscaleConfig(interval=0.25, window=0.5, step=3,
                                                    cooldown=5.0))
        self.load(4, queued=100)
        self.pump(3)
        self.assertEqual(self.pool.desired, 4)  # doubled (step 3 allows more)
        self.ready_new()
        self.load(8, queued=100)
        self.pump(3)
        self.assertEqual(self.pool.desired, 7)  # +3 (step), capped at max 7
        self.ready_new()
        self.pump(8)
        self.assertEqual(self.pool.desired, 7)

    def test_a_short_spike_does_not_scale(self) -> None:
        """Utilisation must stay above ``up`` for a whole window: a burst shorter than
        that spawns nothing."""
        self.start_policy()
        self.load(4, queued=4)
        self.pump(3)
        self.load(1)
        self.pump(8)
        self.assertEqual(self.pool.desired, 2)
        self.assertEqual(self.scale_events(), [])

    def test_no_ready_worker_with_waiting_requests_is_overload(self) -> None:
        self.start_policy()
        for worker in list(self.pool.workers):
            self.reactor.exit(worker.pid, code=1)
        self.assertEqual(self.pool.ready, [])
        self.pool.waiting = [None] * 5
        self.policy.tick()
        self.assertEqual(self.policy.utilisation, float("inf"))
        self.pump(5)
        self.assertEqual(self.pool.desired, 4)

    def test_fixed_size_pool_has_no_autoscaler(self) -> None:
        """With workers.min equal to max the size is the operator's: no load resizes it,
        and the status says autoscaling is off."""
        policy = self.start_policy(workers=WorkersConfig(3, 3))
        self.assertFalse(policy.autoscaling)
        self.load(6, queued=50)
        self.pump(20)
        self.assertEqual(self.pool.desired, 3)
        self.assertEqual(policy.status()["enabled"], False)


class ScaleDownTests(PolicyTestCase):
    def grown(self) -> PoolPolicy:
        policy = self.start_policy()
        self.pool.scale_to(5, "test")
        self.ready_new()
        policy.manual_change()
        return policy

    def test_idle_pool_shrinks_after_the_cooldown_one_worker_per_interval(self) -> None:
        self.grown()
        self.load(0)
        self.pump(20)  # 5 s idle: the cooldown is just over
        self.assertEqual(self.pool.desired, 5)
        self.reactor.advance(0.25)
        self.assertEqual(self.pool.desired, 4)
        self.pump(3)
        self.assertEqual(self.pool.desired, 4, "down_interval is 1 s")
        self.reactor.advance(0.25)
        self.assertEqual(self.pool.desired, 3)
        self.pump(12)
        self.assertEqual(self.pool.desired, 2, "never below workers.min")
        messages = [e.message for e in self.scale_events()]
        self.assertTrue(all("idle: utilisation below 0.3" in m for m in messages[-3:]))

    def test_busy_workers_drain_instead_of_being_killed(self) -> None:
        self.grown()
        workers = [w for w in self.pool.workers]
        for w in workers:
            w.in_flight = 0
        workers[-1].in_flight = 1  # one long request on the newest worker
        self.pump(21)
        (gone,) = [w for w in workers if w.retiring]
        self.assertIsNot(gone, workers[-1], "the idle worker goes first")
        self.assertEqual(gone.state, S.STOPPING)

    def test_load_between_down_and_up_holds_the_size(self) -> None:
        self.grown()
        self.load(5)  # 5 / (5 x 2) = 0.5: between 0.3 and 0.8
        self.pump(80)
        self.assertEqual(self.pool.desired, 5)

    def test_a_busy_moment_restarts_the_cooldown(self) -> None:
        self.grown()
        self.load(0)
        self.pump(16)  # 4 s idle
        self.load(5)
        self.reactor.advance(0.25)
        self.load(0)
        self.pump(16)  # 4 s idle again: not 5 in a row
        self.assertEqual(self.pool.desired, 5)
        self.pump(8)
        self.assertEqual(self.pool.desired, 4)


class PassiveHealthTests(PolicyTestCase):
    def test_failed_requests_in_a_row_restart_the_worker(self) -> None:
        pool = self.start_ready(health=HealthConfig(path="/h", passive_fall=3))
        worker = pool.ready[0]
        pool.request_failed(worker, "bad_response", "garbage")
        worker.passive_failures = 0  # a success in between (what the proxy does)
        pool.request_failed(worker, "bad_response", "garbage")
        pool.request_failed(worker, "truncated", "cut")
        self.assertIn(worker, pool.ready)
        pool.request_failed(worker, "no_response", "reset")
        self.assertNotIn(worker, pool.ready)
        self.assertEqual(self.kill.signals_to(worker.pid), [signal.SIGTERM])
        event = [e for e in self.events if e.kind == "unhealthy"][0]
        self.assertIn("3 failed requests in a row (last: no_response: reset)", event.message)


class RecycleTests(PolicyTestCase):
    def test_max_requests_limit_has_jitter_per_worker(self) -> None:
        rolls = iter([0.0, 1.0])
        pool = self.make_pool(recycle=RecycleConfig(max_requests=1000, jitter=0.2))
        pool._rand = lambda: next(rolls)
        pool.start()
        self.assertEqual([w.recycle_at for w in pool.workers], [1000, 800])

    def test_recycle_replaces_first_then_drains(self) -> None:
        """Recycling never lowers capacity: the old worker serves until its replacement
        is ready and only then drains; recycling it a second time is refused."""
        pool = self.start_ready()
        old = pool.ready[0]
        self.assertTrue(pool.recycle(old, "served 1000 requests"))
        self.assertFalse(pool.recycle(old, "again"), "once")
        self.assertIn(old, pool.ready, "serves until its replacement is ready")
        self.assertEqual(len(pool.workers), 3)
        self.ready_new()
        self.assertTrue(old.retiring)
        self.assertNotIn(old, pool.ready)
        self.assertEqual(len(pool.ready), 2)
        kinds = self.kinds()
        self.assertLess(kinds.index("replace"), len(kinds) - 1 - kinds[::-1].index("ready"))
        self.assertEqual(kinds[-1], "drain")

    def test_max_lifetime_recycles_one_worker_at_a_time(self) -> None:
        self.start_policy(workers=WorkersConfig(2, 2),
                          recycle=RecycleConfig(max_lifetime=60, jitter=0.0, check_interval=5))
        self.pump(12, 5.0)
        recycling = [w for w in self.pool.workers if w.recycling]
        self.assertEqual(len(recycling), 1)
        self.assertIn("recycle.max_lifetime=60s", recycling[0].recycling)
        self.ready_new()  # the replacement is ready, the old one drains and stops
        self.reactor.exit(recycling[0].pid)
        self.reactor.advance(5.0)
        self.assertEqual(len([w for w in self.pool.workers if w.recycling]), 1)

    def test_max_rss_recycles_a_bloated_worker(self) -> None:
        sizes: dict[int, int] = {}
        policy = self.start_policy(rss=lambda pid: sizes.get(pid, 10 << 20),
                                   recycle=RecycleConfig(max_rss=64 << 20, check_interval=2))
        fat = self.pool.ready[1]
        self.reactor.advance(2.0)
        self.assertFalse(any(w.recycling for w in self.pool.workers))
        sizes[fat.pid] = 100 << 20
        self.reactor.advance(2.0)
        self.assertIn("RSS 102400 KiB > recycle.max_rss 65536 KiB", fat.recycling)
        self.assertIsNotNone(policy)

    def test_request_timeout_recycles_the_worker_and_names_the_request(self) -> None:
        pool = self.start_ready()
        worker = pool.ready[0]
        pool.request_timed_out(worker, "GET /slow?x=1")
        self.assertIn("GET /slow?x=1", worker.recycling)
        event = [e for e in self.events if e.kind == "request_timeout"][0]
        self.assertIn("did not answer GET /slow?x=1 within request_timeout=30s", event.message)


class MinUptimeTests(PolicyTestCase):
    def crash_after(self, seconds: float, sig: int | None = None) -> Any:
        pool = self.pool
        worker = pool.ready[0]
        self.pump(int(seconds / 0.25))
        if sig is None:
            self.reactor.exit(worker.pid, code=1)
        else:
            self.reactor.exit(worker.pid, code=None, sig=sig)
        return worker

    def test_sigkill_is_not_a_crash_loop(self) -> None:
        """The OOM killer or an operator, even right after start: first delay again."""
        self.start_ready()
        for _ in range(5):
            worker = self.crash_after(0.25, sig=signal.SIGKILL)
            self.assertEqual(worker.backoff.failures, 1)
            self.pump(2)

    def test_a_worker_that_served_a_while_restarts_after_the_first_delay(self) -> None:
        self.start_ready()
        for _ in range(5):
            worker = self.crash_after(2.0)  # up 2 s > restart.min_uptime 1 s
            self.assertEqual(worker.backoff.failures, 1)
            self.assertFalse(worker.backoff.failing)
            self.pump(2)  # respawned and ready again

    def test_quick_deaths_after_ready_still_grow_the_delay(self) -> None:
        """Becoming ready is not enough: a worker dying within restart.min_uptime, say on
        its first request, backs off further each time until it is marked failing."""
        self.start_ready()
        worker = self.pool.ready[0]
        for expected in (1, 2, 3):
            self.assertIs(self.pool.ready[0], worker)
            self.crash_after(0.25)
            self.assertEqual(worker.backoff.failures, expected)
            while worker not in self.pool.ready:  # back after its (growing) delay
                self.pump(1)
            self.pool.ready.remove(worker)
            self.pool.ready.insert(0, worker)
        self.assertTrue(worker.backoff.failing)

    def test_sigkill_before_ready_still_counts_towards_a_crash_loop(self) -> None:
        """OOM-killed during start-up, again and again: that is a crash loop."""
        pool = self.make_pool()
        pool.start()
        worker = pool.workers[0]
        for expected in (1, 2, 3):
            self.reactor.exit(worker.pid, code=None, sig=signal.SIGKILL)  # never ready
            self.assertEqual(worker.backoff.failures, expected)
            while worker.state is not S.STARTING:
                self.reactor.advance(0.05)
        self.assertTrue(worker.backoff.failing)
