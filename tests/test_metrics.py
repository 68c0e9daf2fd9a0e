"""Request metrics, their history, the Prometheus page, and worker process stats."""

from __future__ import annotations

import gzip
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from typing import Any

import attrs
import treq
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase
from twisted.web.test.requesthelper import DummyRequest

from cgipool.busypoll import BusyPollReactor
from cgipool.metrics import (
    BUCKETS,
    NBUCKETS,
    Metrics,
    MetricsCollector,
    MetricsResource,
    MetricsService,
    ServiceMetrics,
    make_registry,
    metrics_allowed,
    quantile,
)
from cgipool.procstats import ProcessSampler
from cgipool.proxy.deadlines import Deadlines
from cgipool.supervisor.worker import WorkerState
from tests.support import (
    get_json,
    http_client,
    process_alive,
    require_binaries,
    search_service,
    start_daemon,
    wait_for,
    write_config,
)
from tests.test_proxy import CLOSE, ProxyTestCase, ScriptedConnection, ok_json, split_response

# -- helpers -----------------------------------------------------------------------


def bucket_of(seconds: float) -> int:
    """Index of the bucket holding ``seconds`` (``le`` semantics)."""
    for i, bound in enumerate(BUCKETS):
        if seconds <= bound:
            return i
    return len(BUCKETS)


def bucket_range(seconds: float) -> tuple[float, float]:
    i = bucket_of(seconds)
    lower = BUCKETS[i - 1] if i else 0.0
    upper = BUCKETS[i] if i < len(BUCKETS) else math.inf
    return lower, upper


def true_quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def counts_of(values: list[float]) -> list[int]:
    counts = [0] * NBUCKETS
    for v in values:
        counts[bucket_of(v)] += 1
    return counts


@attrs.define(eq=False)
class FakeWorker:
    index: int
    state: WorkerState = WorkerState.READY
    pid: int | None = None
    restarts: int = 0
    in_flight: int = 0


@attrs.define
class FakePool:
    workers: list[FakeWorker]

    @property
    def ready(self) -> list[FakeWorker]:
        return [w for w in self.workers if w.state is WorkerState.READY]


@attrs.define
class FakeSupervisor:
    pools: dict[str, FakePool]


class FakeSampler:
    def __init__(self, stats: dict[int, dict[str, Any]]) -> None:
        self._stats = stats
        self.samples = 0

    def sample(self) -> None:
        self.samples += 1

    def stats(self, pid: int | None) -> dict[str, Any] | None:
        return self._stats.get(pid) if pid is not None else None


def families(registry: Any) -> dict[str, Any]:
    text = generate_latest(registry).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample_value(family: Any, name: str, **labels: str) -> float:
    values = [s.value for s in family.samples if s.name == name and s.labels == labels]
    if len(values) != 1:
        raise AssertionError(f"{name}{labels}: {len(values)} samples in {family.samples}")
    return values[0]


# -- the hot path ------------------------------------------------------------------


class ServiceMetricsTests(SynchronousTestCase):
    def test_counts_by_exact_code(self) -> None:
        """Each status code is counted on its own, not as 2xx/4xx: /metrics must tell a 499
        from a 404 and a 502 from a 504."""
        m = ServiceMetrics("svc")
        for status in (200, 200, 200, 404, 301, 499, 502, 503, 504):
            m.record(status, 0.001)
        self.assertEqual(m.codes, {200: 3, 404: 1, 301: 1, 499: 1, 502: 1, 503: 1, 504: 1})
        self.assertEqual(m.requests_total, 9)

    def test_errors_are_5xx_only_and_499_is_not_an_error(self) -> None:
        m = ServiceMetrics("svc")
        for status in (200, 400, 404, 499, 500, 502, 599):
            m.record(status, 0.001)
        self.assertEqual(m.errors_total, 3)
        self.assertEqual(m.cur_errors, 3)

    def test_codes_outside_100_599_are_counted_as_other_and_bounded(self) -> None:
        m = ServiceMetrics("svc")
        for status in range(-5, 2000):
            m.record(status, 0.0)
        self.assertEqual(len(m.codes), 501)  # 100..599 and "other"
        self.assertEqual(m.codes[0], 2005 - 500)
        self.assertEqual(sum(m.codes.values()), m.requests_total)

    def test_buckets_use_le_bounds(self) -> None:
        """Buckets follow Prometheus' le rule: a duration equal to a bound is in that
        bucket, just above it in the next, past the last in +Inf; the sum is exact."""
        m = ServiceMetrics("svc")
        for seconds in (0.0, 0.0005, 0.00051, 1.0, 60.0, 60.1, 1e9):
            m.record(200, seconds)
        buckets = m.buckets_total()
        self.assertEqual(len(buckets), len(BUCKETS) + 1)
        self.assertEqual(buckets[0], 2)  # 0 and exactly 0.5 ms
        self.assertEqual(buckets[1], 1)  # just above 0.5 ms
        self.assertEqual(buckets[BUCKETS.index(1.0)], 1)
        self.assertEqual(buckets[BUCKETS.index(60.0)], 1)
        self.assertEqual(buckets[-1], 2)  # +Inf
        self.assertAlmostEqual(m.seconds_total, 0.0005 + 0.00051 + 1 + 60 + 60.1 + 1e9)

    def test_a_clock_step_back_counts_as_zero(self) -> None:
        m = ServiceMetrics("svc")
        m.record(200, -3.0)
        self.assertEqual((m.buckets_total()[0], m.seconds_total), (1, 0.0))

    def test_record_allocates_nothing_that_grows(self) -> None:
        """record() runs for every request: 20,000 more calls must not grow what metrics.py
        holds (under 1 KiB), whatever the codes and durations."""
        m = ServiceMetrics("svc")
        for i in range(1000):
            m.record(200 + i % 3, 0.001 * (i % 50))
        tracemalloc.start()
        try:
            before = tracemalloc.take_snapshot()
            for i in range(20000):
                m.record(200 + i % 3, 0.001 * (i % 50))
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        grown = sum(d.size_diff for d in after.compare_to(before, "filename")
                    if d.traceback[0].filename.endswith("metrics.py"))
        self.assertLess(grown, 1024)


class QuantileTests(SynchronousTestCase):
    def assert_within_bucket(self, values: list[float], q: float) -> None:
        estimate = quantile(q, counts_of(values))
        truth = true_quantile(values, q)
        lower, upper = bucket_range(truth)
        upper = min(upper, BUCKETS[-1])
        self.assertTrue(lower <= estimate <= upper,
                        f"p{q * 100:g}: estimate {estimate} outside the bucket "
                        f"({lower}, {upper}] of the true value {truth}")

    def test_uniform_inside_one_bucket_is_interpolated(self) -> None:
        rng = random.Random(1)
        values = [rng.uniform(0.010, 0.025) for _ in range(1000)]
        counts = counts_of(values)
        self.assertEqual(counts[BUCKETS.index(0.025)], 1000)
        for q in (0.5, 0.95, 0.99):
            estimate = quantile(q, counts)
            self.assertAlmostEqual(estimate, 0.010 + 0.015 * q, places=9)
            # and close to the real sample quantile
            self.assertLess(abs(estimate - true_quantile(values, q)), 0.001)

    def test_bimodal(self) -> None:
        """Two clusters (90 % under 1 ms, 10 % near 0.4 s): each estimate lies in the bucket
        of the true quantile, so p50 stays fast and p95 shows the slow cluster."""
        rng = random.Random(2)
        values = ([rng.uniform(0.0006, 0.0009) for _ in range(900)]
                  + [rng.uniform(0.3, 0.45) for _ in range(100)])
        for q in (0.5, 0.95, 0.99):
            self.assert_within_bucket(values, q)
        self.assertLess(quantile(0.5, counts_of(values)), 0.001)
        self.assertGreater(quantile(0.95, counts_of(values)), 0.25)

    def test_long_tailed_distribution(self) -> None:
        """On a log-normal latency distribution, the usual shape, p50 to p99 each fall in
        the bucket of the true quantile."""
        rng = random.Random(3)
        values = [rng.lognormvariate(math.log(0.02), 1.2) for _ in range(5000)]
        for q in (0.5, 0.9, 0.95, 0.99):
            self.assert_within_bucket(values, q)

    def test_edges(self) -> None:
        """No samples: None; only +Inf samples: the last finite bound, not infinity; one
        sample in the first bucket: its midpoint."""
        self.assertIsNone(quantile(0.5, [0] * NBUCKETS))
        only_inf = [0] * NBUCKETS
        only_inf[-1] = 10
        self.assertEqual(quantile(0.99, only_inf), BUCKETS[-1])
        one = [0] * NBUCKETS
        one[0] = 1
        self.assertEqual(quantile(0.5, one), BUCKETS[0] / 2)


# -- per-second history -------------------------------------------------------------


class TickTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1000)
        self.counts = {"a": (2, 3), "b": (1, 1)}
        self.metrics = Metrics(self.clock, ["a", "b"], history=10,
                               worker_counts=lambda name: self.counts[name])

    def tick(self, seconds: float = 1) -> None:
        self.clock.advance(seconds)
        self.metrics.tick()

    def test_current_second_rolls_into_a_point(self) -> None:
        a = self.metrics.service("a")
        for ms in (1, 2, 3, 4, 600):
            a.record(200 if ms < 600 else 503, ms / 1000)
        self.tick()
        point = self.metrics.points["a"][-1]
        self.assertEqual((point.t, point.requests, point.errors, point.rps), (1001, 5, 1, 5.0))
        self.assertEqual((point.workers_ready, point.workers), (2, 3))
        self.assertEqual((a.cur_requests, a.cur_errors, a.cur_sum), (0, 0, 0.0))
        self.assertEqual(a.cur_buckets, [0] * NBUCKETS)
        self.assertEqual((a.requests_total, a.errors_total), (5, 1))
        self.assertTrue(2.5 <= point.p50_ms <= 5)
        self.assertTrue(500 <= point.p99_ms <= 1000)
        # An idle second: a point with no percentiles.
        self.tick()
        idle = self.metrics.points["a"][-1]
        self.assertEqual((idle.requests, idle.rps, idle.p50_ms), (0, 0.0, None))
        self.assertEqual(len(self.metrics.points["b"]), 2)

    def test_a_late_tick_spreads_its_requests_over_the_missed_seconds(self) -> None:
        for _ in range(30):
            self.metrics.service("a").record(200, 0.001)
        self.tick(3)
        self.assertEqual(self.metrics.points["a"][-1].rps, 10.0)
        self.tick(1.02)  # timer jitter is not a longer interval
        self.assertEqual(self.metrics.points["a"][-1].seconds, 1)

    def test_history_is_a_bounded_ring(self) -> None:
        """The per-second history keeps its last `history` points only (the oldest dropped),
        while the totals count every request."""
        for i in range(25):
            self.metrics.service("a").record(200, 0.001)
            self.tick()
        points = self.metrics.points["a"]
        self.assertEqual(len(points), 10)
        self.assertEqual(points[0].t, 1016)
        self.assertEqual(self.metrics.service("a").requests_total, 25)

    def test_memory_stays_constant_after_many_ticks(self) -> None:
        rng = random.Random(4)

        def run(seconds: int) -> None:
            for _ in range(seconds):
                for _ in range(rng.randrange(0, 20)):
                    self.metrics.service("a").record(rng.choice((200, 404, 502)),
                                                     rng.random() / 10)
                self.tick()

        run(30)  # fill the ring
        tracemalloc.start()
        try:
            run(10)
            before = tracemalloc.take_snapshot()
            run(500)
            after = tracemalloc.take_snapshot()
        finally:
            tracemalloc.stop()
        grown = sum(d.size_diff for d in after.compare_to(before, "filename")
                    if d.traceback[0].filename.endswith("metrics.py"))
        self.assertLess(grown, 4096)

    def test_tick_survives_a_failing_worker_count(self) -> None:
        def broken(name: str) -> tuple[int, int]:
            raise ZeroDivisionError(name)

        self.metrics.worker_counts = broken
        self.metrics.service("a").record(200, 0.001)
        self.tick()
        self.tick()
        point = self.metrics.points["a"][-2]
        self.assertEqual((point.requests, point.workers_ready, point.workers), (1, None, None))
        self.assertEqual(len(self.metrics.points["b"]), 2)
        # Logged, but not every second.
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        self.tick(61)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_tick_survives_a_broken_clock(self) -> None:
        """An exception inside a tick is logged, not raised: the LoopingCall that ticks must
        not die and end the history."""
        self.metrics.clock = object()
        self.metrics.tick()
        self.assertEqual(len(self.flushLoggedErrors(AttributeError)), 1)

    def test_unknown_service(self) -> None:
        """A service without metrics is a KeyError, not zeros reported for a typo."""
        self.assertRaises(KeyError, self.metrics.service, "nope")
        self.assertRaises(KeyError, self.metrics.summary, "nope")
        self.assertRaises(KeyError, self.metrics.series, 60, "nope")

    def test_history_must_be_positive(self) -> None:
        """A history of zero, negative, fractional or boolean length is refused when the
        metrics are made."""
        for bad in (0, -1, 1.5, True):
            self.assertRaises(ValueError, Metrics, self.clock, ["a"], bad)


class SummaryTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(self.clock, ["a", "b"], history=120)

    def run_seconds(self, seconds: int, per_second: Any) -> None:
        for i in range(seconds):
            per_second(i)
            self.clock.advance(1)
            self.metrics.tick()

    def test_rps_over_60s_with_gaps(self) -> None:
        """The rate is requests over the window's seconds, idle ones included: 10 requests
        every other second is 5 req/s over 60 s and over 10 s."""
        a = self.metrics.service("a")

        def traffic(i: int) -> None:
            if i % 2 == 0:  # every other second is idle
                for _ in range(10):
                    a.record(200, 0.002)

        self.run_seconds(90, traffic)
        summary = self.metrics.summary("a", window=60)
        self.assertEqual((summary["requests"], summary["rps"]), (300, 5.0))
        self.assertEqual(summary["requests_total"], 450)
        self.assertEqual(self.metrics.summary("a", window=10)["requests"], 50)
        self.assertEqual(self.metrics.summary("a", window=10)["rps"], 5.0)
        self.assertEqual(self.metrics.summary("a", window=1)["requests"], 0)  # last was idle

    def test_rate_right_after_start_divides_by_the_time_covered(self) -> None:
        a = self.metrics.service("a")
        self.run_seconds(20, lambda i: a.record(200, 0.002))
        summary = self.metrics.summary("a", window=60)
        self.assertEqual((summary["requests"], summary["rps"]), (20, 1.0))

    def test_errors_percentiles_and_totals(self) -> None:
        """The window counts 5xx as errors (499 not) with their rate and the percentiles;
        the current, unrolled second is in the totals only."""
        a = self.metrics.service("a")

        def traffic(i: int) -> None:
            for status in (200,) * 17 + (499, 500, 503):
                a.record(status, 0.004)

        self.run_seconds(5, traffic)
        a.record(502, 0.004)  # not rolled yet: in the totals, not in the window
        summary = self.metrics.summary("a")
        self.assertEqual((summary["requests"], summary["errors"]), (100, 10))
        self.assertEqual(summary["error_rate"], 0.1)
        self.assertEqual((summary["requests_total"], summary["errors_total"]), (101, 11))
        for key in ("p50_ms", "p95_ms", "p99_ms"):
            self.assertTrue(2.5 <= summary[key] <= 5.0, summary)

    def test_all_services_together(self) -> None:
        """summary(None) is the pool as a whole: every service's requests, errors, rate and
        percentiles merged."""
        a, b = self.metrics.service("a"), self.metrics.service("b")

        def traffic(i: int) -> None:
            for _ in range(9):
                a.record(200, 0.0007)
            b.record(500, 0.4)

        self.run_seconds(10, traffic)
        both = self.metrics.summary(None, window=60)
        self.assertEqual((both["requests"], both["errors"], both["rps"]), (100, 10, 10.0))
        self.assertTrue(0.5 <= both["p50_ms"] <= 1.0)
        self.assertTrue(250 <= both["p99_ms"] <= 500)
        self.assertEqual(both["requests_total"], 100)

    def test_empty(self) -> None:
        """A summary before any request is zeros and None percentiles, not an error or NaN.
        A summary before any request is zeros and None percentiles, not an error or NaN."""
        summary = self.metrics.summary()
        self.assertEqual({k: summary[k] for k in ("requests", "rps", "errors", "error_rate",
                                                  "p50_ms", "p95_ms", "p99_ms")},
                         {"requests": 0, "rps": 0.0, "errors": 0, "error_rate": 0.0,
                          "p50_ms": None, "p95_ms": None, "p99_ms": None})

    def test_window_is_clamped_and_must_be_a_number(self) -> None:
        self.assertEqual(self.metrics.summary(window=0)["window"], 1)
        self.assertEqual(self.metrics.summary(window=10**6)["window"], 120)
        for bad in (math.nan, "60", None, True):
            self.assertRaises(ValueError, self.metrics.summary, None, bad)


class SeriesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.metrics = Metrics(self.clock, ["a", "b"], history=30,
                               worker_counts=lambda name: (1, 2))

    def test_shape(self) -> None:
        """series() has a column per metric, each as long as the window, with None
        percentiles for idle seconds, and is JSON; latest() is each service's last point."""
        self.assertEqual(self.metrics.latest()["services"], {"a": None, "b": None})
        a = self.metrics.service("a")
        for i in range(40):
            for _ in range(i % 4):
                a.record(200 if i % 5 else 500, 0.003)
            self.clock.advance(1)
            self.metrics.tick()
        series = self.metrics.series()
        self.assertEqual((series["interval"], series["window"], series["now"]), (1, 30, 40))
        self.assertEqual(set(series["services"]), {"a", "b"})
        columns = series["services"]["a"]
        self.assertEqual(set(columns), {"t", "rps", "errors", "p50_ms", "p95_ms", "p99_ms",
                                        "workers_ready", "workers"})
        self.assertEqual({len(v) for v in columns.values()}, {30})
        self.assertEqual(columns["t"], list(range(11, 41)))
        self.assertEqual(columns["rps"][-4:], [0.0, 1.0, 2.0, 3.0])
        self.assertEqual(columns["errors"][-11:-9], [0, 2])  # t=30, 31 (i=29, 30)
        self.assertEqual(columns["p50_ms"][-4], None)  # an idle second
        self.assertTrue(2.5 <= columns["p99_ms"][-2] <= 5)
        self.assertEqual((columns["workers_ready"][-1], columns["workers"][-1]), (1, 2))
        json.dumps(series)
        latest = self.metrics.latest()
        self.assertEqual(latest["services"]["a"]["t"], 40)
        self.assertEqual(latest["services"]["a"]["rps"], 3.0)
        self.assertEqual(latest["services"]["b"]["workers"], 2)
        json.dumps(latest)

    def test_window_clamping_and_one_service(self) -> None:
        """The window is clamped to 1..history, one service can be asked for alone, and a
        NaN window is refused."""
        for _ in range(40):
            self.clock.advance(1)
            self.metrics.tick()
        self.assertEqual(len(self.metrics.series(0)["services"]["a"]["t"]), 1)
        self.assertEqual(self.metrics.series(0)["window"], 1)
        self.assertEqual(len(self.metrics.series(5)["services"]["a"]["t"]), 5)
        self.assertEqual(self.metrics.series(10**9)["window"], 30)
        self.assertEqual(len(self.metrics.series(10**9)["services"]["b"]["t"]), 30)
        self.assertEqual(list(self.metrics.series(10, "b")["services"]), ["b"])
        self.assertRaises(ValueError, self.metrics.series, math.nan)


# -- Prometheus ----------------------------------------------------------------------


class CollectorTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_700_000_000)
        self.workers = [FakeWorker(0, pid=101, restarts=2), FakeWorker(1, pid=102),
                        FakeWorker(2, WorkerState.BACKOFF, restarts=5)]
        self.supervisor = FakeSupervisor({"search": FakePool(self.workers),
                                          "auth": FakePool([FakeWorker(0, pid=201)])})
        self.sampler = FakeSampler(
            {101: {"rss": 1_500_000, "cpu_percent": 12.5, "cpu_seconds": 3.25},
             201: {"rss": 2_000_000, "cpu_percent": 0.0, "cpu_seconds": 0.0}})
        self.metrics = Metrics(self.clock, ["search", "auth"])
        self.registry = make_registry(self.metrics, self.supervisor, self.sampler,
                                      process=False)

    def test_requests_and_histogram(self) -> None:
        """Requests by service and code ('other' out of range), cumulative le buckets ending
        in +Inf with count and sum, the current second included, no series for a service
        without requests."""
        search = self.metrics.service("search")
        for status, seconds in [(200, 0.0004)] * 5 + [(200, 0.03), (404, 0.002),
                                                        (499, 2.0), (503, 0.0), (700, 90.0)]:
            search.record(status, seconds)
        self.clock.advance(1)
        self.metrics.tick()
        search.record(200, 0.2)  # the current second is included
        fams = families(self.registry)
        requests = fams["cgipool_requests"]
        self.assertEqual(requests.type, "counter")
        by_code = {s.labels["code"]: s.value for s in requests.samples
                   if s.name == "cgipool_requests_total" and s.labels["service"] == "search"}
        self.assertEqual(by_code, {"200": 7, "404": 1, "499": 1, "503": 1, "other": 1})
        self.assertFalse([s for s in requests.samples if s.labels.get("service") == "auth"])

        hist = fams["cgipool_request_duration_seconds"]
        self.assertEqual(hist.type, "histogram")
        buckets = [(s.labels["le"], s.value) for s in hist.samples
                   if s.name.endswith("_bucket") and s.labels["service"] == "search"]
        self.assertEqual([le for le, _ in buckets][-1], "+Inf")
        self.assertEqual(len(buckets), len(BUCKETS) + 1)
        self.assertEqual([float(le) for le, _ in buckets], sorted(float(le) for le, _ in buckets))
        values = [v for _, v in buckets]
        self.assertEqual(values, sorted(values))  # cumulative: never decreasing
        count = sample_value(hist, "cgipool_request_duration_seconds_count", service="search")
        self.assertEqual(count, sum(by_code.values()))
        self.assertEqual(values[-1], count)
        self.assertEqual(dict(buckets)["0.0005"], 6)  # five at 0.4 ms and the 0.0 one
        self.assertAlmostEqual(
            sample_value(hist, "cgipool_request_duration_seconds_sum", service="search"),
            5 * 0.0004 + 0.03 + 0.002 + 2.0 + 90.0 + 0.2)
        self.assertEqual(
            sample_value(hist, "cgipool_request_duration_seconds_count", service="auth"), 0)

    def test_workers_restarts_and_process_stats(self) -> None:
        """Worker gauges for every state, restarts as a counter, RSS and CPU seconds for
        workers with a sample (none without), uptime and start time from the clock."""
        fams = families(self.registry)
        workers = fams["cgipool_workers"]
        self.assertEqual(workers.type, "gauge")
        search = {s.labels["state"]: s.value for s in workers.samples
                  if s.labels["service"] == "search"}
        self.assertEqual(set(search), {s.value for s in WorkerState})
        self.assertEqual((search["ready"], search["backoff"], search["stopped"]), (2, 1, 0))
        restarts = fams["cgipool_worker_restarts"]
        self.assertEqual(restarts.type, "counter")
        self.assertEqual(sample_value(restarts, "cgipool_worker_restarts_total",
                                      service="search"), 7)
        rss = fams["cgipool_worker_resident_memory_bytes"]
        self.assertEqual(sample_value(fams["cgipool_queued_requests"],
                                      "cgipool_queued_requests", service="search"), 0)
        self.assertEqual(sample_value(fams["cgipool_in_flight_requests"],
                                      "cgipool_in_flight_requests", service="search"), 0)
        self.assertEqual(sample_value(rss, rss.name, service="search", worker="0"), 1_500_000)
        self.assertEqual(sample_value(rss, rss.name, service="auth", worker="0"), 2_000_000)
        self.assertEqual(len(rss.samples), 2)  # worker 1 has no sample yet, 2 no process
        cpu = fams["cgipool_worker_cpu_seconds"]
        self.assertEqual(cpu.type, "counter")  # base unit; rate() gives the core share
        self.assertEqual(sample_value(cpu, "cgipool_worker_cpu_seconds_total",
                                      service="search", worker="0"), 3.25)
        self.assertNotIn("cgipool_worker_cpu_percent", fams)
        self.clock.advance(42)
        fams = families(self.registry)
        self.assertEqual(fams["cgipool_up_seconds"].samples[0].value, 42)
        self.assertEqual(fams["cgipool_start_time_seconds"].samples[0].value, 1_700_000_000)

    def test_restarts_counter_survives_a_slot_leaving(self) -> None:
        def restarts() -> float:
            fams = families(self.registry)
            return sample_value(fams["cgipool_worker_restarts"],
                                "cgipool_worker_restarts_total", service="search")

        self.assertEqual(restarts(), 7)
        self.workers[1].restarts = 1
        self.assertEqual(restarts(), 8)
        self.workers.remove(self.workers[2])  # scaled in: its 5 restarts stay counted
        self.assertEqual(restarts(), 8)
        self.workers.append(FakeWorker(3))
        self.workers[0].restarts += 1
        self.assertEqual(restarts(), 9)

    def test_without_supervisor_or_sampler(self) -> None:
        """Without a supervisor or sampler the registry still exports the request metrics
        and uptime and leaves the worker families out, instead of failing."""
        registry = make_registry(Metrics(self.clock, ["x"]), process=False)
        fams = families(registry)
        self.assertIn("cgipool_requests", fams)
        self.assertIn("cgipool_up_seconds", fams)
        self.assertNotIn("cgipool_workers", fams)

    def test_registries_are_private(self) -> None:
        """Each registry is its own: making two raises no duplicate-metric error, and
        nothing lands on prometheus_client's global REGISTRY."""
        from prometheus_client import REGISTRY

        make_registry(self.metrics, self.supervisor, self.sampler)
        make_registry(self.metrics, self.supervisor, self.sampler)  # no duplicate error
        self.assertNotIn("cgipool_requests", {f.name for f in REGISTRY.collect()})
        self.assertIsInstance(MetricsCollector(self.metrics).describe(), list)


def request_from(address: Any, method: bytes = b"GET", path: bytes = b"/metrics",
                 **headers: bytes) -> DummyRequest:
    request = DummyRequest([])
    request.client = address
    request.method = method
    request.path = path
    for name, value in headers.items():
        request.requestHeaders.setRawHeaders(name.replace("_", "-").encode(), [value])
    return request


class MetricsPageTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.metrics = Metrics(Clock(), ["search"])
        self.metrics.service("search").record(200, 0.01)
        self.resource = MetricsResource(make_registry(self.metrics, process=False))

    def test_access_rule_is_loopback_only(self) -> None:
        """/metrics is for loopback clients only (any 127/8 address, ::1); other addresses,
        hostnames, UNIX sockets and an unknown client are refused."""
        allowed = [IPv4Address("TCP", "127.0.0.1", 5), IPv4Address("TCP", "127.8.9.10", 5),
                   IPv6Address("TCP", "::1", 5)]
        refused = [IPv4Address("TCP", "10.0.0.1", 5), IPv4Address("TCP", "192.168.1.1", 5),
                   IPv6Address("TCP", "2001:db8::1", 5), IPv4Address("TCP", "localhost", 5),
                   UNIXAddress(b"/tmp/sock"), None]
        for address in allowed:
            self.assertTrue(metrics_allowed(request_from(address)), address)
        for address in refused:
            self.assertFalse(metrics_allowed(request_from(address)), address)

    def test_non_loopback_client_gets_403_json(self) -> None:
        request = request_from(IPv4Address("TCP", "192.0.2.7", 5))
        body = self.resource.render(request)
        self.assertEqual(request.responseCode, 403)
        self.assertIn("loopback", json.loads(body)["error"])
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-type"),
                         [b"application/json"])

    def test_text_format_openmetrics_and_gzip(self) -> None:
        """The page negotiates as Prometheus expects: the text format by default,
        OpenMetrics (ending in # EOF) when asked, gzip when accepted."""
        local = IPv4Address("TCP", "127.0.0.1", 5)
        request = request_from(local)
        body = self.resource.render(request)
        self.assertEqual(request.responseCode, None)  # 200
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0]
                        .startswith(b"text/plain; version=0.0.4"))
        self.assertIn(b'cgipool_requests_total{code="200",service="search"} 1.0', body)

        request = request_from(local, accept=b"application/openmetrics-text; version=1.0.0")
        body = self.resource.render(request)
        self.assertTrue(request.responseHeaders.getRawHeaders(b"content-type")[0]
                        .startswith(b"application/openmetrics-text"))
        self.assertTrue(body.endswith(b"# EOF\n"))

        request = request_from(local, accept_encoding=b"gzip, deflate")
        body = self.resource.render(request)
        self.assertEqual(request.responseHeaders.getRawHeaders(b"content-encoding"), [b"gzip"])
        self.assertIn(b"cgipool_requests_total", gzip.decompress(body))

    def test_other_methods_and_paths(self) -> None:
        """Only GET /metrics is the page: POST is 405 with a JSON error, a path below it
        404."""
        local = IPv4Address("TCP", "127.0.0.1", 5)
        request = request_from(local, method=b"POST")
        self.assertIn("not allowed", json.loads(self.resource.render(request))["error"])
        self.assertEqual(request.responseCode, 405)
        request = request_from(local, path=b"/metrics/x")
        request.postpath = [b"x"]
        self.resource.render(request)
        self.assertEqual(request.responseCode, 404)


class MetricsServiceTests(SynchronousTestCase):
    def test_ticks_every_second_and_stops_without_leftover_calls(self) -> None:
        clock = Clock()
        metrics = Metrics(clock, ["a"])
        sampler = FakeSampler({})
        service = MetricsService(metrics, sampler, clock)
        service.startService()
        metrics.service("a").record(200, 0.01)
        clock.pump([1] * 5)
        self.assertEqual(len(metrics.points["a"]), 5)
        self.assertEqual(metrics.points["a"][0].requests, 1)
        self.assertEqual(sampler.samples, 5)
        service.stopService()
        self.assertEqual(clock.getDelayedCalls(), [])
        service.stopService()  # twice is harmless

    def test_a_failing_sampler_does_not_stop_the_loop(self) -> None:
        clock = Clock()
        metrics = Metrics(clock, ["a"])
        sampler = FakeSampler({})
        sampler.sample = lambda: 1 / 0  # type: ignore[method-assign]
        service = MetricsService(metrics, sampler, clock)
        service.startService()
        self.addCleanup(service.stopService)
        clock.pump([1] * 3)
        self.assertEqual(len(metrics.points["a"]), 3)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_stop_before_start(self) -> None:
        """Stopping a metrics service that never started is a no-op, not an error: a
        parent service's stop reaches it whether it ran or not."""
        MetricsService(Metrics(Clock(), ["a"])).stopService()


# -- worker processes ------------------------------------------------------------------


class ProcStatsTests(SynchronousTestCase):
    def test_the_test_process_itself(self) -> None:
        """A real process (this one): its RSS, and CPU seconds that grow by the CPU
        time it burnt between two samples.  Measured in CPU time, not against the
        wall clock, so a busy machine cannot fail it; the CPU share (cpu_percent)
        is psutil's, checked on a scripted process in
        test_cpu_share_and_seconds_are_psutils_readings."""
        clock = Clock()
        sampler = ProcessSampler(clock, lambda: [os.getpid()])
        self.assertIsNone(sampler.stats(os.getpid()))
        sampler.sample()
        first = sampler.stats(os.getpid())
        self.assertGreater(first["rss"], 1_000_000)
        self.assertEqual(first["cpu_percent"], 0.0)  # nothing to compare with yet
        deadline = time.process_time() + 0.2
        while time.process_time() < deadline:
            pass  # burn CPU
        clock.advance(1)
        sampler.sample()
        second = sampler.stats(os.getpid())
        self.assertGreaterEqual(second["cpu_percent"], 0.0)
        self.assertGreaterEqual(second["cpu_seconds"] - first["cpu_seconds"], 0.15)
        self.assertEqual(sampler.sampled_at, 1)
        self.assertEqual(len(sampler), 1)
        self.assertIsNone(sampler.stats(None))

    def test_cpu_share_and_seconds_are_psutils_readings(self) -> None:
        """What psutil reads is what a sample holds: the share since the previous
        sample rounded to 0.01 %, user + system seconds rounded to 1 ms, the RSS;
        sampled_at is the clock's time (a scripted process: no machine speed)."""
        import contextlib
        from types import SimpleNamespace

        import psutil

        class Scripted:
            def __init__(self, pid: int) -> None:
                self.pid = pid
                self.readings = iter([(0.0, 1.0, 0.5), (87.456, 1.9004, 0.6)])

            def oneshot(self) -> Any:
                return contextlib.nullcontext()

            def is_running(self) -> bool:
                return True

            def memory_info(self) -> Any:
                return SimpleNamespace(rss=5_000_000)

            def cpu_percent(self, interval: Any = None) -> float:
                self.share, self.user, self.system = next(self.readings)
                return self.share

            def cpu_times(self) -> Any:
                return SimpleNamespace(user=self.user, system=self.system)

            def status(self) -> str:
                return psutil.STATUS_RUNNING

        clock = Clock()
        sampler = ProcessSampler(clock, lambda: [4242], process_factory=Scripted)  # type: ignore
        sampler.sample()
        self.assertEqual(sampler.stats(4242),
                         {"rss": 5_000_000, "cpu_percent": 0.0, "cpu_seconds": 1.5})
        clock.advance(1)
        sampler.sample()
        self.assertEqual(sampler.stats(4242),
                         {"rss": 5_000_000, "cpu_percent": 87.46, "cpu_seconds": 2.5})
        self.assertEqual(sampler.sampled_at, 1)

    def test_a_vanished_pid_is_dropped(self) -> None:
        """A killed worker (a zombie until reaped) and a reaped one leave the samples: no
        stats of a dead process on /metrics."""
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        self.addCleanup(lambda: child.poll() is None and child.kill())
        self.addCleanup(child.wait)
        pids = [child.pid]
        sampler = ProcessSampler(Clock(), lambda: pids)
        sampler.sample()
        self.assertGreater(sampler.stats(child.pid)["rss"], 0)
        # Killed but not reaped yet: a zombie is no longer a worker.
        child.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while process_alive(child.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        sampler.sample()
        self.assertIsNone(sampler.stats(child.pid))
        self.assertEqual(len(sampler), 0)
        # Reaped: the pid does not exist at all.
        child.wait()
        sampler.sample()
        self.assertIsNone(sampler.stats(child.pid))
        self.assertEqual(sampler.all_stats(), {})

    def test_only_the_current_pids_are_kept(self) -> None:
        pids = [os.getpid()]
        sampler = ProcessSampler(Clock(), lambda: pids)
        sampler.sample()
        self.assertEqual(len(sampler), 1)
        pids.clear()
        sampler.sample()
        self.assertEqual((len(sampler), sampler.stats(os.getpid())), (0, None))

    def test_a_pid_that_never_existed(self) -> None:
        """A pid that never existed (above pid_max) and pid 0 get no stats and no entry,
        rather than an exception from psutil."""
        pid = 2 ** 22 + 12345  # above Linux's pid_max
        sampler = ProcessSampler(Clock(), lambda: [pid, 0])
        sampler.sample()
        self.assertIsNone(sampler.stats(pid))
        self.assertEqual(len(sampler), 0)

    def test_a_reused_pid_gets_a_fresh_process(self) -> None:
        import psutil

        made: list[Any] = []

        class Stale(psutil.Process):
            def is_running(self) -> bool:
                return False

        def factory(pid: int) -> psutil.Process:
            made.append(pid)
            return Stale(pid) if len(made) == 1 else psutil.Process(pid)

        sampler = ProcessSampler(Clock(), lambda: [os.getpid()], process_factory=factory)
        sampler.sample()
        sampler.sample()
        self.assertEqual(made, [os.getpid(), os.getpid()])
        self.assertIsNotNone(sampler.stats(os.getpid()))


# -- the proxy records every request once ------------------------------------------------


class ProxyRecordingTests(ProxyTestCase):
    async def proxy_with_metrics(self, workers: list[Any], **config: Any) -> int:
        _, port = await self.start_proxy(workers, **config)
        self.metrics = ServiceMetrics("svc")
        self.proxy.metrics = self.metrics
        return port

    async def get(self, port: int, close_after: float | None = None) -> bytes:
        return await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n",
                              close_after)

    async def test_upstream_status_and_duration(self) -> None:
        """The worker's status and the exchange's duration are recorded, in seconds on the
        reactor's clock: no less than the worker took, no more than the client waited."""
        def slow(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            reactor.callLater(0.06, c.transport.write, ok_json(ok=True))

        _, wport = await self.start_worker(slow)
        port = await self.proxy_with_metrics([self.worker_for(wport)])
        sent = reactor.seconds()
        self.assertEqual(split_response(await self.get(port))[0], 200)
        waited = reactor.seconds() - sent
        self.assertEqual(self.metrics.codes, {200: 1})
        # In seconds, on the reactor's clock: at least the worker's 0.06 s, at most
        # what the client waited (however long a busy machine made that).
        self.assertGreaterEqual(self.metrics.cur_sum, 0.05)
        self.assertLessEqual(self.metrics.cur_sum, waited)

    async def test_worker_404_is_counted_and_not_an_error(self) -> None:
        reply = b"HTTP/1.1 404 Not Found\r\nContent-Length: 2\r\n\r\n{}"
        _, wport = await self.start_worker(lambda h, b, c: reply)
        port = await self.proxy_with_metrics([self.worker_for(wport)])
        await self.get(port)
        self.assertEqual((self.metrics.codes, self.metrics.errors_total), ({404: 1}, 0))

    async def test_retry_after_refusal_is_one_request(self) -> None:
        closed = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory())
        dead_port = closed.getHost().port
        await closed.stopListening()
        _, wport = await self.start_worker(lambda h, b, c: ok_json())
        port = await self.proxy_with_metrics([self.worker_for(dead_port, 0),
                                              self.worker_for(wport, 1)])
        for _ in range(3):
            await self.get(port)
        self.assertEqual((self.metrics.codes, self.metrics.requests_total), ({200: 3}, 3))

    async def test_proxy_errors(self) -> None:
        """The proxy's own answers count too: a garbage reply 502, no ready worker 503,
        CONNECT 405; the 502 and 503 are errors."""
        _, bad = await self.start_worker(lambda h, b, c: b"SSH-2.0-OpenSSH\r\n\r\n")
        port = await self.proxy_with_metrics([self.worker_for(bad)])
        await self.get(port)
        self.assertEqual(self.metrics.codes, {502: 1})
        self.pool.ready.clear()
        await self.get(port)  # the early 503: no exchange
        await self.raw(port, b"CONNECT /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")
        self.assertEqual(self.metrics.codes, {502: 1, 503: 1, 405: 1})
        self.assertEqual(self.metrics.errors_total, 2)

    async def test_timeout_is_504(self) -> None:
        """A worker that never answers is a 504 after request_timeout, recorded once, with a
        duration of at least the timeout."""
        _, wport = await self.start_worker(lambda h, b, c: None)
        port = await self.proxy_with_metrics([self.worker_for(wport)], request_timeout=0.2)
        self.assertEqual(split_response(await self.get(port))[0], 504)
        self.assertEqual(self.metrics.codes, {504: 1})
        self.assertGreaterEqual(self.metrics.cur_sum, 0.15)

    async def test_client_gone_is_499_once(self) -> None:
        """A client that leaves is one 499 (not an error), and request_timeout passing
        afterwards, on a Clock, records nothing more."""
        _, wport = await self.start_worker(lambda h, b, c: None)
        target = self.worker_for(wport)
        port = await self.proxy_with_metrics([target], request_timeout=0.5)
        # request_timeout on a Clock (set to the reactor's time, which the
        # exchanges' deadlines are counted from): moved past it by hand below.
        clock = Clock()
        clock.advance(reactor.seconds())
        self.proxy.deadlines = Deadlines(clock)
        await self.get(port, close_after=0.1)
        await wait_for(lambda: target.in_flight == 0, 10, what="the slot to be freed")
        self.assertEqual(self.metrics.codes, {499: 1})
        clock.advance(reactor.seconds() + 1 - clock.seconds())  # past request_timeout
        self.assertEqual((self.metrics.codes, self.metrics.errors_total), ({499: 1}, 0))
        self.assertEqual(clock.getDelayedCalls(), [])

    async def test_truncated_response_is_502(self) -> None:
        """A worker closing mid-body after a 200 head is recorded as 502, the broken answer
        the client got, not as 200."""
        def short(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            c.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            c.transport.loseConnection()

        _, wport = await self.start_worker(short)
        port = await self.proxy_with_metrics([self.worker_for(wport)])
        await self.raw(port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n\r\n")
        self.assertEqual(self.metrics.codes, {502: 1})


# -- end to end ----------------------------------------------------------------------------

SEARCH = "\nservices:\n" + search_service(request_timeout=0.5)
BROKEN = """
  broken:
    command: ["/bin/false"]
    route: /api/broken
    workers: 1
"""
#: The search worker again, with a request_timeout no test waits for: a client
#: that leaves is a 499 there whatever the machine's speed, never a 504.
PATIENT = """
  patient:
    command: ["build/search.cgi", "{port}"]
    route: /api/patient
    workers: 1
    health: {path: "/?q=health", interval: 1, timeout: 1, fall: 2}
    request_timeout: 60
"""


async def scrape(client: Any, url: str) -> tuple[int, dict[str, Any], bytes]:
    response = await client.get(url + "/metrics")
    body = await treq.content(response)
    fams = {}
    if response.code == 200:
        fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
    return response.code, fams, body


class DaemonMetricsTests(TestCase):
    def setUp(self) -> None:
        require_binaries("search.cgi")

    async def test_requests_through_the_proxy_show_on_metrics(self) -> None:
        daemon = await start_daemon(self, write_config(self, SEARCH))
        client = http_client(self)
        n = 25
        for i in range(n):
            code, _ = await get_json(client, f"{daemon.url}/api/search?q=m{i}")
            self.assertEqual(code, 200)
        for path in ("/api/search/nope?q=x", "/api/search/nope?q=y", "/api/search"):
            await get_json(client, daemon.url + path)
        # a tick has sampled both worker processes
        await wait_for(lambda: len(daemon.top.sampler) == 2, 5, what="a process sample")
        # recycle.max_rss reads the same samples (no second psutil pass).
        search = daemon.pool("search")
        for pid in (w.pid for w in search.workers):
            self.assertEqual(search.policy.rss(pid), daemon.top.sampler.stats(pid)["rss"])

        code, fams, body = await scrape(client, daemon.admin_url)
        self.assertEqual(code, 200)
        self.assertIn(f'cgipool_requests_total{{code="200",service="search"}} {n}.0'.encode(),
                      body)
        requests = fams["cgipool_requests"]
        self.assertEqual(sample_value(requests, "cgipool_requests_total",
                                      service="search", code="200"), n)
        self.assertEqual(sample_value(requests, "cgipool_requests_total",
                                      service="search", code="404"), 2)
        self.assertEqual(sample_value(requests, "cgipool_requests_total",
                                      service="search", code="400"), 1)
        hist = fams["cgipool_request_duration_seconds"]
        self.assertEqual(sample_value(hist, "cgipool_request_duration_seconds_count",
                                      service="search"), n + 3)
        self.assertEqual(sample_value(hist, "cgipool_request_duration_seconds_bucket",
                                      service="search", le="+Inf"), n + 3)
        workers = fams["cgipool_workers"]
        self.assertEqual(sample_value(workers, "cgipool_workers",
                                      service="search", state="ready"), 2)
        self.assertEqual(sample_value(workers, "cgipool_workers",
                                      service="search", state="backoff"), 0)
        rss = fams["cgipool_worker_resident_memory_bytes"]
        for index in ("0", "1"):
            self.assertGreater(sample_value(rss, rss.name, service="search", worker=index), 0)
        self.assertIn("process_resident_memory_bytes", fams)  # the daemon itself

        # The per-second history saw them too.
        metrics = daemon.top.metrics
        await wait_for(lambda: metrics.summary("search")["requests"] == n + 3, 3,
                       what="the requests in the per-second history")
        self.assertEqual(metrics.summary("search")["errors"], 0)
        point = metrics.latest()["services"]["search"]
        self.assertEqual((point["workers_ready"], point["workers"]), (2, 2))

    async def test_503_504_and_499_are_counted(self) -> None:
        """Each kind of failure lands under its own code and service: 503 (no worker),
        504 (request_timeout), 499 (the client left, not an error)."""
        daemon = await start_daemon(self, write_config(self, SEARCH + BROKEN + PATIENT),
                                    wait=False)
        search, patient = daemon.pool("search"), daemon.pool("patient")
        await wait_for(lambda: len(search.ready) == 2 and len(patient.ready) == 1, 15,
                       what="search and patient ready")
        client = http_client(self)
        for _ in range(3):
            code, body = await get_json(client, f"{daemon.url}/api/broken")
            self.assertEqual(code, 503)
        code, _ = await get_json(client, f"{daemon.url}/api/search?q=x&delay_ms=2000")
        self.assertEqual(code, 504)
        # A client that gives up before the answer.
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
        from twisted.internet.protocol import Protocol

        proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port),
                                      Protocol())
        proto.transport.write(b"GET /api/patient?q=x&delay_ms=10000 HTTP/1.1\r\n"
                              b"Host: h\r\n\r\n")
        # Leave once the request is at the worker (not after a sleep that hopes so).
        await wait_for(lambda: sum(w.in_flight for w in patient.workers) == 1, 10,
                       what="the request at the patient worker")
        proto.transport.loseConnection()
        metrics = daemon.top.metrics
        await wait_for(lambda: metrics.service("patient").codes.get(499) == 1, 10,
                       what="the 499")
        self.assertEqual(metrics.service("broken").codes, {503: 3})
        self.assertEqual(metrics.service("search").codes, {504: 1})
        self.assertEqual(metrics.service("patient").codes, {499: 1})
        code, fams, _ = await scrape(client, daemon.admin_url)
        requests = fams["cgipool_requests"]
        self.assertEqual(sample_value(requests, "cgipool_requests_total",
                                      service="broken", code="503"), 3)
        self.assertGreaterEqual(sample_value(fams["cgipool_worker_restarts"],
                                             "cgipool_worker_restarts_total",
                                             service="broken"), 1)
        self.assertEqual(metrics.service("search").errors_total, 1)
        self.assertEqual(metrics.service("patient").errors_total, 0)  # 499 is not an error

    async def test_stop_leaves_no_metrics_timer(self) -> None:
        """The metrics service stops after the supervisor (its last samples) and leaves no
        timer pending behind a stopped daemon."""
        daemon = await start_daemon(self, write_config(self, SEARCH))
        service = daemon.top.getServiceNamed("metrics")
        self.assertIs(daemon.top.metrics, service.metrics)
        order = list(daemon.top)  # stops after the workers
        self.assertGreater(order.index(service), order.index(daemon.supervisor))
        await daemon.top.stopService()
        self.assertIsNone(service._loop)
        self.assertFalse(any(process_alive(p) for p in daemon.pids))


PROMTOOL = shutil.which("promtool")
NO_PROMTOOL = "promtool is not installed (Debian: apt-get install prometheus)"
CGI_SCRIPT = """
  hello:
    protocol: cgi
    command: ["{python}", "services/cgi-python/hello.py"]
    route: /cgi/hello
    workers: {max: 2}
"""


def promtool_check(exposition: bytes) -> tuple[int, str]:
    """``promtool check metrics`` on a text exposition: its exit status (0 clean,
    3 lint problems, 1 unreadable) and what it said."""
    assert PROMTOOL is not None
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition,
                          capture_output=True, timeout=60)
    return done.returncode, (done.stdout + done.stderr).decode(errors="replace").strip()


class PromtoolTests(TestCase):
    """What CI's metrics lint says: a real daemon's /metrics, scraped on its admin
    listener with every family present (requests, workers, CPU, busy polling,
    dropped output, the process), passes ``promtool check metrics``."""

    timeout = 60

    def setUp(self) -> None:
        if PROMTOOL is None:
            raise SkipTest(NO_PROMTOOL)

    def test_promtool_fails_a_non_base_unit(self) -> None:
        """The check below can fail: the name this daemon used before is refused."""
        code, said = promtool_check(b"# HELP cgipool_busy_poll_microseconds x\n"
                                    b"# TYPE cgipool_busy_poll_microseconds gauge\n"
                                    b"cgipool_busy_poll_microseconds 400.0\n")
        self.assertNotEqual(code, 0)
        self.assertIn('use base unit "seconds"', said)

    async def test_a_real_daemons_metrics_pass_promtool_check_metrics(self) -> None:
        require_binaries("search.cgi")
        spin = "busy_poll_us: 50\n" if isinstance(reactor, BusyPollReactor) else ""
        # The CGI service has an output budget: cgipool_output_dropped_lines_total.
        daemon = await start_daemon(self, write_config(self, spin + SEARCH + CGI_SCRIPT))
        client = http_client(self)
        for i in range(5):
            code, _ = await get_json(client, f"{daemon.url}/api/search?q=lint{i}")
            self.assertEqual(code, 200)
        await get_json(client, f"{daemon.url}/api/search/nope")  # a 404 too
        response = await client.get(f"{daemon.url}/cgi/hello")
        await treq.content(response)
        await wait_for(lambda: len(daemon.top.sampler) == 2, 5, what="a process sample")

        response = await client.get(daemon.admin_url + "/metrics")
        body = await treq.content(response)
        self.assertEqual(response.code, 200)
        for family in (b"cgipool_requests_total", b"cgipool_worker_cpu_seconds_total",
                       b"cgipool_request_duration_seconds_bucket", b"process_cpu_seconds_total",
                       b"cgipool_output_dropped_lines_total",
                       *([b"cgipool_busy_poll_seconds"] if spin else [])):
            self.assertIn(b"\n" + family, body)
        code, said = promtool_check(body)
        self.assertEqual((code, said), (0, ""), body.decode())


class AddRemoveServiceTests(SynchronousTestCase):
    def test_a_reload_adds_and_removes_services(self) -> None:
        clock = Clock()
        metrics = Metrics(clock, ["a"])
        b = metrics.add_service("b")
        self.assertIs(metrics.add_service("b"), b)
        self.assertIs(metrics.service("b"), b)
        b.record(200, 0.01)
        clock.advance(1)
        metrics.tick()
        self.assertEqual(metrics.summary("b", 60)["requests"], 1)
        metrics.remove_service("b")
        self.assertRaises(KeyError, metrics.service, "b")
        metrics.tick()  # no trace of it left
        self.assertEqual(list(metrics.services), ["a"])
