"""Request metrics at constant cost per request, their history, and ``/metrics``.

The hot path is :meth:`ServiceMetrics.record`: a handful of integer increments
on a per-service object the proxy holds directly (no lock, no allocation that
grows, no Deferred, no log line).  It only touches the *current second*
(request and error counts, latency buckets, latency sum) and the cumulative
count per status code.  Once a second :meth:`Metrics.tick` rolls every
service's current second into

* the cumulative totals (what Prometheus scrapes; a scrape adds the current,
  not yet rolled second, so totals are exact at any instant), and
* a ring buffer of per-second :class:`Point` s (rps, errors, p50/p95/p99,
  workers ready/total) for the admin charts and summaries, bounded by
  ``history`` seconds.

Latencies go into fixed Prometheus-style buckets; percentiles are estimated
from the buckets by linear interpolation inside the bucket that holds the
rank, the way Prometheus' ``histogram_quantile`` does, so an estimate is never
further from the truth than the width of its bucket.

Status 499 is nginx's "client closed the request": counted, not an error.
Errors are responses with status >= 500.

Prometheus exposition (:class:`MetricsCollector`) reads these counters at
scrape time into a private :class:`~prometheus_client.CollectorRegistry`;
no prometheus_client metric object is updated per request.
"""

from __future__ import annotations

import gzip
import math
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from twisted.application.service import Service
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.resource import Resource

from cgipool.admin.auth import Denied, client_ip, refuse
from cgipool.proxy.errors import set_error
from cgipool.supervisor.interface import Pool
from cgipool.supervisor.worker import WorkerState

log = Logger(namespace="cgipool.metrics")

#: Upper bounds (seconds) of the latency buckets; a last ``+Inf`` bucket is implied.
BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)
#: Number of bucket counters (the finite bounds plus ``+Inf``).
NBUCKETS = len(BUCKETS) + 1
_ZERO_BUCKETS: tuple[int, ...] = (0,) * NBUCKETS
#: The key under which status codes outside 100..599 are counted.
OTHER_CODE = 0
#: Seconds between ticks, and of one point of the series.
INTERVAL = 1
DEFAULT_HISTORY = 900
#: How often one failing part of the tick may log its traceback.
FAILURE_LOG_INTERVAL = 60.0

WorkerCounts = Callable[[str], "tuple[int, int]"]


# -- the hot path ------------------------------------------------------------------


class ServiceMetrics:
    """The request counters of one service; :meth:`record` is the hot path."""

    __slots__ = (
        "name", "codes",
        "cur_requests", "cur_errors", "cur_sum", "cur_buckets",
        "rolled_requests", "rolled_errors", "rolled_sum", "rolled_buckets",
    )

    def __init__(self, name: str) -> None:
        self.name = name
        #: Responses by exact status code since start (100..599; others under 0).
        self.codes: dict[int, int] = {}
        #: The current second, not yet rolled up by the tick.
        self.cur_requests = 0
        self.cur_errors = 0
        self.cur_sum = 0.0
        self.cur_buckets = [0] * NBUCKETS
        #: Everything before the current second.
        self.rolled_requests = 0
        self.rolled_errors = 0
        self.rolled_sum = 0.0
        self.rolled_buckets = [0] * NBUCKETS

    def record(self, status: int, seconds: float, _bisect: Any = bisect_left,
               _bounds: tuple[float, ...] = BUCKETS) -> None:
        """One client request ended with ``status`` after ``seconds``."""
        if seconds < 0.0:  # the wall clock stepped back
            seconds = 0.0
        self.cur_buckets[_bisect(_bounds, seconds)] += 1
        self.cur_requests += 1
        self.cur_sum += seconds
        if status >= 500:
            self.cur_errors += 1
        try:
            self.codes[status] += 1
        except KeyError:
            self._first_of_code(status)

    def _first_of_code(self, status: int) -> None:
        key = status if 100 <= status <= 599 else OTHER_CODE
        self.codes[key] = self.codes.get(key, 0) + 1

    # -- reading and rolling (not per request) ------------------------------------

    def roll(self) -> tuple[int, int, tuple[int, ...]]:
        """Close the current second: ``(requests, errors, bucket counts)`` of it."""
        requests = self.cur_requests
        if not requests:
            return 0, 0, _ZERO_BUCKETS
        errors = self.cur_errors
        current = self.cur_buckets
        counts = tuple(current)
        rolled = self.rolled_buckets
        for i in range(NBUCKETS):
            rolled[i] += current[i]
            current[i] = 0
        self.rolled_requests += requests
        self.rolled_errors += errors
        self.rolled_sum += self.cur_sum
        self.cur_requests = self.cur_errors = 0
        self.cur_sum = 0.0
        return requests, errors, counts

    @property
    def requests_total(self) -> int:
        return self.rolled_requests + self.cur_requests

    @property
    def errors_total(self) -> int:
        return self.rolled_errors + self.cur_errors

    @property
    def seconds_total(self) -> float:
        return self.rolled_sum + self.cur_sum

    def buckets_total(self) -> list[int]:
        """Requests per latency bucket since start (not cumulative)."""
        return [a + b for a, b in zip(self.rolled_buckets, self.cur_buckets)]


def quantile(q: float, counts: Sequence[int]) -> float | None:
    """Estimate the ``q`` quantile (seconds) from per-bucket ``counts``.

    Linear interpolation inside the bucket holding the rank (its lower bound is
    the previous bound, 0 for the first); a rank in the ``+Inf`` bucket gives
    the largest finite bound.  ``None`` without any count.
    """
    total = sum(counts)
    if not total:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if count and seen + count >= rank:
            if i >= len(BUCKETS):
                return BUCKETS[-1]
            lower = BUCKETS[i - 1] if i else 0.0
            upper = BUCKETS[i]
            return lower + (upper - lower) * max(rank - seen, 0.0) / count
        seen += count
    return BUCKETS[-1]  # not reached


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


# -- per-second history -------------------------------------------------------------


class Point:
    """One service during one interval (normally a second)."""

    __slots__ = ("t", "seconds", "requests", "errors", "p50_ms", "p95_ms", "p99_ms",
                 "workers_ready", "workers", "buckets")

    def __init__(self, t: float, seconds: float, requests: int, errors: int,
                 buckets: tuple[int, ...], workers_ready: int | None,
                 workers: int | None) -> None:
        self.t = t
        self.seconds = seconds
        self.requests = requests
        self.errors = errors
        self.buckets = buckets
        if requests:
            self.p50_ms = _ms(quantile(0.50, buckets))
            self.p95_ms = _ms(quantile(0.95, buckets))
            self.p99_ms = _ms(quantile(0.99, buckets))
        else:
            self.p50_ms = self.p95_ms = self.p99_ms = None
        self.workers_ready = workers_ready
        self.workers = workers

    @property
    def rps(self) -> float:
        return round(self.requests / self.seconds, 3)

    def as_dict(self) -> dict[str, Any]:
        return {
            "t": round(self.t, 3), "rps": self.rps, "errors": self.errors,
            "p50_ms": self.p50_ms, "p95_ms": self.p95_ms, "p99_ms": self.p99_ms,
            "workers_ready": self.workers_ready, "workers": self.workers,
        }


SERIES_KEYS = ("t", "rps", "errors", "p50_ms", "p95_ms", "p99_ms", "workers_ready",
               "workers")


def _window(value: float, history: int) -> float:
    """``value`` clamped to 1..history; ValueError for what is not a number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise ValueError(f"window must be a number of seconds, got {value!r}")
    return max(1, min(history, value))


class Metrics:
    """Every service's counters and per-second history.

    :param clock: an ``IReactorTime`` (the reactor, or ``task.Clock`` in tests).
    :param service_names: the services, each gets a :class:`ServiceMetrics`.
    :param history: seconds of per-second points kept per service.
    :param worker_counts: ``service name -> (ready workers, workers)``, read at
        each tick; its failures are logged and leave the counts ``None``.
    """

    def __init__(self, clock: Any, service_names: Iterable[str],
                 history: int = DEFAULT_HISTORY,
                 worker_counts: WorkerCounts | None = None) -> None:
        if isinstance(history, bool) or not isinstance(history, int) or history < 1:
            raise ValueError(f"history must be a positive integer, got {history!r}")
        self.clock = clock
        self.history = history
        self.worker_counts = worker_counts
        self.services: dict[str, ServiceMetrics] = {
            name: ServiceMetrics(name) for name in service_names}
        self.points: dict[str, deque[Point]] = {
            name: deque(maxlen=history) for name in self.services}
        self.started_at: float = clock.seconds()
        self.last_tick: float = self.started_at
        self._failure_logged: dict[str, float] = {}

    def service(self, name: str) -> ServiceMetrics:
        """The counters the proxy of service ``name`` records into."""
        return self.services[name]

    def add_service(self, name: str) -> ServiceMetrics:
        """The counters of ``name``, made if it is new (a service added by a reload)."""
        service = self.services.get(name)
        if service is None:
            service = self.services[name] = ServiceMetrics(name)
            self.points[name] = deque(maxlen=self.history)
        return service

    def remove_service(self, name: str) -> None:
        """A reload removed the service: forget its counters and history."""
        self.services.pop(name, None)
        self.points.pop(name, None)

    def start(self) -> None:
        """The daemon starts now: uptime and the first interval count from here."""
        self.started_at = self.last_tick = self.clock.seconds()

    # -- the tick ------------------------------------------------------------------

    def tick(self) -> None:
        """Roll every service's current second into its history.  Never raises."""
        try:
            now = self.clock.seconds()
            # Ticks fall on whole intervals; a late one covers the missed ones.
            seconds = max(1, round((now - self.last_tick) / INTERVAL)) * INTERVAL
            self.last_tick = now
        except Exception:
            self._log_failure("clock", "metrics tick: cannot read the clock")
            return
        for name, service in self.services.items():
            ready = total = None
            if self.worker_counts is not None:
                try:
                    ready, total = self.worker_counts(name)
                except Exception:
                    self._log_failure("worker_counts",
                                      "metrics tick: worker counts of {service} failed",
                                      service=name)
            try:
                requests, errors, buckets = service.roll()
                self.points[name].append(
                    Point(now, seconds, requests, errors, buckets, ready, total))
            except Exception:
                self._log_failure("roll", "metrics tick: rolling {service} failed",
                                  service=name)

    def _log_failure(self, key: str, format: str, **fields: Any) -> None:
        """Log the current exception, at most once a minute per ``key``."""
        try:
            now = self.clock.seconds()
        except Exception:
            now = 0.0
        last = self._failure_logged.get(key)
        if last is not None and now - last < FAILURE_LOG_INTERVAL:
            return
        self._failure_logged[key] = now
        log.failure(format, **fields)

    # -- reading --------------------------------------------------------------------

    def _names(self, service: str | None) -> list[str]:
        if service is None:
            return list(self.services)
        if service not in self.services:
            raise KeyError(service)
        return [service]

    def _recent(self, name: str, window: float) -> list[Point]:
        """The points of the last ``window`` seconds, up to the newest point."""
        points = self.points[name]
        if not points:
            return []
        cut = points[-1].t - window + INTERVAL / 2
        recent = []
        for point in reversed(points):
            if point.t <= cut:
                break
            recent.append(point)
        recent.reverse()
        return recent

    def summary(self, service: str | None = None, window: float = 60) -> dict[str, Any]:
        """Requests, rate, errors and percentiles of the last ``window`` seconds.

        For one service, or every service together when ``service`` is None.
        The rate divides by the time covered: ``window``, or less right after
        the start.  ``KeyError`` for an unknown service, ``ValueError`` for a
        window that is not a number (it is clamped to 1..history).
        """
        window = _window(window, self.history)
        names = self._names(service)
        requests = errors = 0
        buckets = [0] * NBUCKETS
        newest: float | None = None
        for name in names:
            for point in self._recent(name, window):
                requests += point.requests
                errors += point.errors
                if point.requests:
                    for i, count in enumerate(point.buckets):
                        buckets[i] += count
            if self.points[name]:
                t = self.points[name][-1].t
                newest = t if newest is None else max(newest, t)
        covered = 0.0 if newest is None else min(window, newest - self.started_at)
        return {
            "service": service,
            "window": window,
            "requests": requests,
            "rps": round(requests / covered, 3) if covered > 0 else 0.0,
            "errors": errors,
            "error_rate": round(errors / requests, 6) if requests else 0.0,
            "p50_ms": _ms(quantile(0.50, buckets)),
            "p95_ms": _ms(quantile(0.95, buckets)),
            "p99_ms": _ms(quantile(0.99, buckets)),
            "requests_total": sum(self.services[n].requests_total for n in names),
            "errors_total": sum(self.services[n].errors_total for n in names),
        }

    def series(self, window: float = DEFAULT_HISTORY,
               service: str | None = None) -> dict[str, Any]:
        """Per-second series of the last ``window`` seconds, for charts (JSON-ready)."""
        window = _window(window, self.history)
        services = {}
        for name in self._names(service):
            columns: dict[str, list[Any]] = {key: [] for key in SERIES_KEYS}
            for point in self._recent(name, window):
                for key, value in point.as_dict().items():
                    columns[key].append(value)
            services[name] = columns
        return {"interval": INTERVAL, "window": window, "now": self.clock.seconds(),
                "services": services}

    def latest(self) -> dict[str, Any]:
        """The newest point of every service (``None`` before the first tick):
        what the live stream pushes each second."""
        return {
            "interval": INTERVAL,
            "now": self.clock.seconds(),
            "services": {name: points[-1].as_dict() if points else None
                         for name, points in self.points.items()},
        }


# -- Prometheus ---------------------------------------------------------------------


class MetricsCollector(Collector):
    """Reads the counters, worker states and process stats at scrape time.

    :param metrics: the request counters.
    :param supervisor: anything with ``pools: {name: pool}``, each pool with
        ``workers`` (``state``, ``index``, ``pid``, ``restarts``); optional.
    :param sampler: a :class:`cgipool.procstats.ProcessSampler`; optional.
    :param busy_poll: a :class:`cgipool.busypoll.BusyPollService`; optional.
    """

    def __init__(self, metrics: Metrics, supervisor: Any = None, sampler: Any = None,
                 busy_poll: Any = None) -> None:
        self.metrics = metrics
        self.supervisor = supervisor
        self.sampler = sampler
        self.busy_poll = busy_poll
        #: Slots leave a pool (scale-in, replacement) with their restarts; to keep
        #: the restarts counter monotonic we remember each slot's count at the last
        #: scrape and keep the counts of the slots that have gone since.
        self._restarts_seen: dict[str, dict[Any, int]] = {}
        self._restarts_gone: dict[str, int] = {}

    def _restarts(self, name: str, workers: Sequence[Any]) -> int:
        seen = self._restarts_seen.get(name, {})
        now = {worker: worker.restarts for worker in workers}
        gone = self._restarts_gone.get(name, 0)
        gone += sum(count for worker, count in seen.items() if worker not in now)
        self._restarts_gone[name] = gone
        self._restarts_seen[name] = now
        return gone + sum(now.values())

    def describe(self) -> list[Metric]:
        # Names only, for the registry's duplicate check; no data at registration.
        return [
            CounterMetricFamily("cgipool_requests", ""),
            HistogramMetricFamily("cgipool_request_duration_seconds", ""),
            GaugeMetricFamily("cgipool_workers", ""),
            CounterMetricFamily("cgipool_worker_restarts", ""),
            CounterMetricFamily("cgipool_output_dropped_lines", ""),
            GaugeMetricFamily("cgipool_queued_requests", ""),
            GaugeMetricFamily("cgipool_in_flight_requests", ""),
            GaugeMetricFamily("cgipool_worker_resident_memory_bytes", ""),
            CounterMetricFamily("cgipool_worker_cpu_seconds", ""),
            GaugeMetricFamily("cgipool_up_seconds", ""),
            GaugeMetricFamily("cgipool_start_time_seconds", ""),
            GaugeMetricFamily("cgipool_busy_poll_seconds", ""),
            CounterMetricFamily("cgipool_busy_poll_spin_seconds", ""),
            CounterMetricFamily("cgipool_busy_poll_spins", ""),
        ]

    def collect(self) -> Iterator[Metric]:
        metrics = self.metrics
        requests = CounterMetricFamily(
            "cgipool_requests", "Client requests by service and final status code "
            "(499: the client went away first; 'other': a code outside 100-599).",
            labels=["service", "code"])
        duration = HistogramMetricFamily(
            "cgipool_request_duration_seconds",
            "Time from the request reaching the proxy to its end.", labels=["service"])
        bounds = [floatToGoString(b) for b in BUCKETS] + ["+Inf"]
        for name, service in metrics.services.items():
            for code, count in sorted(service.codes.items()):
                requests.add_metric([name, str(code) if code else "other"], count)
            cumulative, buckets = 0, []
            for bound, count in zip(bounds, service.buckets_total()):
                cumulative += count
                buckets.append((bound, cumulative))
            duration.add_metric([name], buckets, service.seconds_total)
        yield requests
        yield duration

        pools = getattr(self.supervisor, "pools", None) or {}
        if pools:
            states = GaugeMetricFamily("cgipool_workers", "Worker slots by state.",
                                       labels=["service", "state"])
            restarts = CounterMetricFamily(
                "cgipool_worker_restarts", "Restarts of the service's worker slots.",
                labels=["service"])
            queued = GaugeMetricFamily(
                "cgipool_queued_requests",
                "Requests waiting for a free worker (bounded by queue.max).",
                labels=["service"])
            in_flight = GaugeMetricFamily(
                "cgipool_in_flight_requests", "Requests being answered by a worker.",
                labels=["service"])
            for name, pool in pools.items():
                by_state = dict.fromkeys((s.value for s in WorkerState), 0)
                for worker in pool.workers:
                    by_state[worker.state.value] += 1
                for state, count in by_state.items():
                    states.add_metric([name, state], count)
                restarts.add_metric([name], self._restarts(name, pool.workers))
                queued.add_metric([name], getattr(pool, "queue_length", 0))
                in_flight.add_metric([name], sum(w.in_flight for w in pool.workers))
            yield states
            yield restarts
            yield queued
            yield in_flight
        yield from self._output_dropped()

        if self.sampler is not None and pools:
            rss = GaugeMetricFamily("cgipool_worker_resident_memory_bytes",
                                    "Resident memory of the worker process.",
                                    labels=["service", "worker"])
            # CPU time as a counter (base unit, like process_cpu_seconds_total):
            # rate() gives the share of a core; it restarts with the process.
            cpu = CounterMetricFamily("cgipool_worker_cpu_seconds",
                                      "User and system CPU time of the worker process "
                                      "(starts again at 0 when the slot's process is "
                                      "replaced).", labels=["service", "worker"])
            for name, pool in pools.items():
                for worker in pool.workers:
                    stats = self.sampler.stats(worker.pid) if worker.pid else None
                    if stats is None:
                        continue
                    labels = [name, str(worker.index)]
                    rss.add_metric(labels, stats["rss"])
                    cpu.add_metric(labels, stats["cpu_seconds"])
            yield rss
            yield cpu

        now = metrics.clock.seconds()
        yield GaugeMetricFamily("cgipool_up_seconds", "Seconds since the daemon started.",
                                value=max(0.0, now - metrics.started_at))
        yield GaugeMetricFamily("cgipool_start_time_seconds",
                                "Start time of the daemon (Unix time).",
                                value=metrics.started_at)
        yield from self._busy_poll()

    def _output_dropped(self) -> Iterator[Metric]:
        """Worker and script output lines over their service's budget (supervisor/output.py)."""
        budgets = getattr(getattr(self.supervisor, "output", None), "budgets", None)
        if budgets is None:
            return
        dropped = CounterMetricFamily(
            "cgipool_output_dropped_lines",
            "Lines of worker/CGI script output not logged: over the service's budget.",
            labels=["service", "stream"])
        for name, budget in sorted(budgets.items()):
            for stream in ("stdout", "stderr"):
                dropped.add_metric([name, stream], budget.dropped_lines.get(stream, 0))
        yield dropped

    def _busy_poll(self) -> Iterator[Metric]:
        """What busy polling is set to, costs (CPU seconds) and catches."""
        service = self.busy_poll
        if service is None:
            return
        # Prometheus wants base units: busy_poll_us is shown in seconds.
        yield GaugeMetricFamily("cgipool_busy_poll_seconds",
                                "busy_poll_us in seconds: how long the reactor spins "
                                "after I/O before sleeping (0: off).",
                                value=service.spin_us / 1e6)
        poller = service.poller
        if poller is None:
            return
        yield CounterMetricFamily("cgipool_busy_poll_spin_seconds",
                                  "Time the reactor spent spinning instead of sleeping "
                                  "(CPU busy polling costs).", value=poller.spin_seconds)
        spins = CounterMetricFamily("cgipool_busy_poll_spins",
                                    "Spins that ended in I/O (hit) or in sleep (miss).",
                                    labels=["result"])
        spins.add_metric(["hit"], poller.hits)
        spins.add_metric(["miss"], poller.misses)
        yield spins


def make_registry(metrics: Metrics, supervisor: Any = None, sampler: Any = None,
                  process: bool = True, busy_poll: Any = None) -> CollectorRegistry:
    """A private registry (never the global one) with our collector, and the
    daemon process's own ``process_*`` metrics when ``process``."""
    registry = CollectorRegistry()
    registry.register(MetricsCollector(metrics, supervisor, sampler, busy_poll))
    if process:
        ProcessCollector(registry=registry)
    return registry


def metrics_allowed(request: Any) -> bool:
    """The default rule for ``/metrics`` when no admin rule is given: loopback
    clients only.  The daemon passes its admin rule instead (see ``tap.py``)."""
    address = client_ip(request)
    return address is not None and address.is_loopback


def _loopback_only(request: Any) -> Denied | None:
    if metrics_allowed(request):
        return None
    return Denied(403, "/metrics answers loopback clients only")


class MetricsResource(Resource):
    """``/metrics``: the registry in the Prometheus text format (or OpenMetrics,
    by ``Accept``), gzip when accepted; rendered in the reactor thread."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry,
                 check: Callable[[Any], Denied | None] | None = None) -> None:
        super().__init__()
        self.registry = registry
        #: check(request) -> None when allowed, else a Denied (AdminAuth.check).
        self.check = check if check is not None else _loopback_only

    def render(self, request: Any) -> bytes:
        denied = self.check(request)
        if denied is not None:
            return refuse(request, denied)
        if request.postpath not in ([], [b""]):
            return set_error(request, 404, f"no page at {request.path.decode('latin-1')}")
        if request.method not in (b"GET", b"HEAD"):
            request.setHeader(b"allow", b"GET, HEAD")
            return set_error(request, 405,
                             f"{request.method.decode('latin-1')} is not allowed here")
        accept = request.getHeader(b"accept")
        encoder, content_type = choose_encoder(accept.decode("latin-1") if accept else "")
        body = encoder(self.registry)
        accept_encoding = request.getHeader(b"accept-encoding")
        if accept_encoding and gzip_accepted(accept_encoding.decode("latin-1")):
            body = gzip.compress(body)
            request.setHeader(b"content-encoding", b"gzip")
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"content-length", b"%d" % len(body))
        return body


# -- the service --------------------------------------------------------------------


def supervisor_worker_counts(supervisor: Any) -> WorkerCounts:
    """``name -> (ready, total)`` workers of the supervisor's pools (a CGI
    service: ``(running, at most)`` scripts): each pool's ``capacity``."""
    pools: Mapping[str, Pool] = supervisor.pools

    def counts(name: str) -> tuple[int, int]:
        return pools[name].capacity

    return counts


def supervisor_pids(supervisor: Any) -> Callable[[], list[int]]:
    """The pids of every worker process of the supervisor's pools, now."""
    pools = supervisor.pools

    def pids() -> list[int]:
        return [w.pid for pool in pools.values() for w in pool.workers if w.pid]

    return pids


class MetricsService(Service):
    """Ticks the metrics (and samples the worker processes) once a second.

    Stops cleanly: the loop's pending call is cancelled in ``stopService``.
    """

    name = "metrics"

    def __init__(self, metrics: Metrics, sampler: Any = None, clock: Any = None,
                 registry: CollectorRegistry | None = None) -> None:
        self.metrics = metrics
        self.sampler = sampler
        self.clock = clock if clock is not None else metrics.clock
        self.registry = registry
        self._loop: LoopingCall | None = None

    @classmethod
    def for_supervisor(cls, supervisor: Any, reactor: Any,
                       history: int = DEFAULT_HISTORY, busy_poll: Any = None) -> MetricsService:
        """Metrics, process sampler and registry for the supervisor's pools."""
        from cgipool.procstats import ProcessSampler

        metrics = Metrics(reactor, list(supervisor.pools), history,
                          worker_counts=supervisor_worker_counts(supervisor))
        sampler = ProcessSampler(reactor, supervisor_pids(supervisor))
        registry = make_registry(metrics, supervisor, sampler, busy_poll=busy_poll)
        return cls(metrics, sampler, reactor, registry)

    def resource(self, check: Callable[[Any], Denied | None] | None = None) -> MetricsResource:
        """The ``/metrics`` page of this service's registry, guarded by ``check``."""
        if self.registry is None:
            self.registry = make_registry(self.metrics, sampler=self.sampler)
        return MetricsResource(self.registry, check)

    def startService(self) -> None:
        super().startService()
        self.metrics.start()
        loop = self._loop = LoopingCall(self._tick)
        loop.clock = self.clock
        loop.start(INTERVAL, now=False).addErrback(
            lambda f: log.failure("the metrics loop stopped", f))

    def stopService(self) -> None:
        super().stopService()
        loop, self._loop = self._loop, None
        if loop is not None and loop.running:
            loop.stop()

    def _tick(self) -> None:
        if self.sampler is not None:
            try:
                self.sampler.sample()
            except Exception:
                self.metrics._log_failure("sample", "sampling the worker processes failed")
        self.metrics.tick()
