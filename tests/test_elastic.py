"""Elastic, self-healing pools end to end: real C workers, real load on 127.0.0.1.

Bounded: each test runs its load for a few seconds (the chaos test for the 10 s
the issue names) with a handful of connections.
"""

from __future__ import annotations

import os
import random
import signal

from twisted.internet import defer, reactor
from twisted.trial.unittest import TestCase

from tests.support import (
    http_client,
    require_binaries,
    search_service,
    sleep,
    start_daemon,
    wait_for,
    write_config,
)
from tests.test_integration import hammer

SLOW = "\nservices:\n" + search_service(
    concurrency=2, queue="{max: 100, timeout: 10}",
    autoscale="{window: 0.5, cooldown: 2, down_interval: 0.5}")

CHAOS = "\nservices:\n" + search_service(workers="{min: 3, max: 4}", concurrency=16)


class ElasticTests(TestCase):
    timeout = 60

    def setUp(self) -> None:
        require_binaries("search.cgi")

    async def test_load_step_grows_the_pool_to_max_and_idle_shrinks_it_to_min(self) -> None:
        daemon = await start_daemon(self, write_config(self, SLOW))
        pool = daemon.pool("search")
        done: defer.Deferred[None] = defer.Deferred()
        started = reactor.seconds()
        load = defer.ensureDeferred(hammer(
            http_client(self), f"{daemon.url}/api/search?q=step&delay_ms=100", 12, done))
        try:
            await wait_for(lambda: len(pool.ready) == 4, 10, what="the pool to grow to max")
            grown_in = reactor.seconds() - started
        finally:
            done.callback(None)
        stats = await load
        self.assertEqual(stats["failed"], [])
        self.assertLess(grown_in, 5.0)
        await wait_for(lambda: len(pool.workers) == 2 and len(pool.ready) == 2, 15,
                       what="the idle pool to shrink to min")
        reasons = [e.fields.get("reason", "") for e in daemon.supervisor.events
                   if e.kind == "scale"]
        self.assertTrue(any(r.startswith("load: utilisation") for r in reasons), reasons)
        self.assertTrue(any(r.startswith("idle: utilisation below 0.3") for r in reasons),
                        reasons)
        self.assertEqual(pool.queue_length, 0)

    async def test_kill_9_chaos_under_load_fails_no_request(self) -> None:
        daemon = await start_daemon(self, write_config(self, CHAOS))
        pool = daemon.pool("search")
        done: defer.Deferred[None] = defer.Deferred()
        load = defer.ensureDeferred(
            hammer(http_client(self), f"{daemon.url}/api/search?q=chaos", 8, done))
        rng = random.Random(7)
        kills = 0
        try:
            start = reactor.seconds()
            for tick in range(1, 34):  # every 300 ms for 10 s, without drift
                await sleep(max(0.0, start + 0.3 * tick - reactor.seconds()))
                alive = [w.pid for w in pool.workers if w.pid and w.alive]
                if alive:
                    os.kill(rng.choice(alive), signal.SIGKILL)
                    kills += 1
        finally:
            done.callback(None)
        stats = await load
        self.assertEqual(stats["failed"], [])
        self.assertGreaterEqual(kills, 30)
        self.assertGreater(stats["ok"], 1000)
        await wait_for(lambda: len(pool.ready) >= 3, 10, what="the pool to heal")
        self.assertIn(pool.state, ("ok",))
