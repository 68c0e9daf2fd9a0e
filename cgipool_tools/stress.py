"""``cgipool stress-test``: a keep-alive load generator on Twisted.

``concurrency`` loops each own one request at a time and send the next as soon
as a response ends, over keep-alive connections of
:class:`cgipool.proxy.upstream.WorkerConnections` (prebuilt request bytes,
in-place response parsing), so one Python process drives thousands of requests
per second.  Latencies go into a fixed log-scale :class:`Histogram`, so a long
run uses constant memory.  Every response is judged as its example says
(:mod:`cgipool_tools.expect`: the status, and the content type and body only
when the example gives them), so any HTTP service can be loaded; a JSON body
that names a worker ``pid`` is counted per pid.  The summary is per service.

The default load is the examples of the pool's worker routes (``protocol:
http``): a CGI script starts a process per request, and mixing those in would
make the proxy look slow.  CGI routes are loaded when named (``--path``,
``--service``), with ``--all``, or when the pool has no worker route at all.

Load tools target loopback addresses only (:func:`require_loopback`).
"""

from __future__ import annotations

import json
import math
import resource
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall

from cgipool.proxy.upstream import WorkerConnections
from cgipool_tools.client import (
    TIMEOUT,
    HttpClient,
    NotRunning,
    StatusError,
    Target,
    UsageError,
    check_path,
    classify,
    clean,
    close_connections,
    fetch_status,
    parse_url,
    require_loopback,
)
from cgipool_tools.expect import BadExample, Expectation, pid_of

MAX_CONCURRENCY = 1000
DEFAULT_CONCURRENCY = 10
DEFAULT_TOTAL = 1000
DEFAULT_TIMEOUT = 10.0
FALLBACK_PATH = "/api/search?q=stress"
#: After a connection-level failure a loop pauses this long before its next
#: request, so a dead daemon is not hammered in a tight loop.
ERROR_PAUSE = 0.01
#: How often request timeouts are checked.
SWEEP_INTERVAL = 0.05
#: Pids listed one by one per service in the summary (CGI has one per request).
MAX_PIDS_SHOWN = 12


# -- latency histogram -------------------------------------------------------------


class Histogram:
    """Durations in fixed log-scale buckets: constant memory, ≤1% relative error.

    Bucket ``i`` holds values in ``[LOW * GROWTH**i, LOW * GROWTH**(i+1))``; a
    percentile is reported as its bucket's geometric middle, clamped to the
    exact minimum and maximum seen.  Values below ``LOW`` (1 µs) land in the
    first bucket, values above ``HIGH`` (1000 s) in the last.
    """

    LOW = 1e-6
    HIGH = 1000.0
    GROWTH = 1.02

    def __init__(self) -> None:
        self._log_growth = math.log(self.GROWTH)
        self.size = int(math.ceil(math.log(self.HIGH / self.LOW) / self._log_growth)) + 1
        self.counts = [0] * self.size
        self.count = 0
        self.total = 0.0
        self.min = math.inf
        self.max = 0.0

    def bucket(self, value: float) -> int:
        if value <= self.LOW:
            return 0
        i = int(math.log(value / self.LOW) / self._log_growth)
        return i if i < self.size else self.size - 1

    def add(self, value: float) -> None:
        self.counts[self.bucket(value)] += 1
        self.count += 1
        self.total += value
        if value < self.min:
            self.min = value
        if value > self.max:
            self.max = value

    def merge(self, other: Histogram) -> None:
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.count += other.count
        self.total += other.total
        self.min = min(self.min, other.min)
        self.max = max(self.max, other.max)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def percentile(self, p: float) -> float | None:
        """The value at or below which ``p`` percent of the values lie."""
        if not 0 <= p <= 100:
            raise ValueError(f"percentile {p} outside 0..100")
        if not self.count:
            return None
        if p == 100:
            return self.max
        if p == 0:
            return self.min
        rank = max(1, math.ceil(p / 100 * self.count))
        seen = 0
        for i, c in enumerate(self.counts):
            seen += c
            if seen >= rank:
                middle = self.LOW * self.GROWTH ** (i + 0.5)
                return min(max(middle, self.min), self.max)
        return self.max  # not reached


# -- options ---------------------------------------------------------------------


@attrs.frozen
class StressOptions:
    """A validated stress-test configuration (see :func:`stress_options`)."""

    target: Target
    concurrency: int = DEFAULT_CONCURRENCY
    total: int | None = DEFAULT_TOTAL
    duration: float | None = None
    paths: tuple[str, ...] = ()
    timeout: float = DEFAULT_TIMEOUT
    expect_status: int = 200
    #: Services whose examples to load (``--service``); empty: the default set.
    services: tuple[str, ...] = ()
    #: Every service's examples, CGI routes included (``--all``).
    all_services: bool = False


def stress_options(url: str, concurrency: int = DEFAULT_CONCURRENCY,
                   total: int | None = None, duration: float | None = None,
                   paths: Sequence[str] = (), timeout: float = DEFAULT_TIMEOUT,
                   expect_status: int = 200, services: Sequence[str] = (),
                   all_services: bool = False) -> StressOptions:
    """Validate the options; :class:`UsageError` names the bad one."""
    target = parse_url(url)
    require_loopback(target)
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) \
            or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise UsageError(f"-c/--concurrency must be an integer from 1 to "
                         f"{MAX_CONCURRENCY}, got {concurrency!r}")
    if total is not None and (isinstance(total, bool) or not isinstance(total, int)
                              or total < 1):
        raise UsageError(f"-t/--total must be a positive integer, got {total!r}")
    if duration is not None and not _positive_finite(duration):
        raise UsageError(f"-d/--duration must be a positive number of seconds, "
                         f"got {duration!r}")
    if not _positive_finite(timeout):
        raise UsageError(f"--timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(expect_status, int) or not 100 <= expect_status <= 599:
        raise UsageError(f"--expect-status must be an HTTP status (100-599), "
                         f"got {expect_status!r}")
    for path in paths:
        check_path(path)
    if sum(map(bool, (paths, services, all_services))) > 1:
        raise UsageError("give one of --path, --service and --all")
    for name in services:
        if not name or not name.isprintable():
            raise UsageError(f"--service needs a service name, got {name!r}")
    if total is None and duration is None:
        total = DEFAULT_TOTAL
    return StressOptions(target, concurrency, total, duration, tuple(paths), timeout,
                         expect_status, tuple(services), all_services)


def _positive_finite(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


# -- results ---------------------------------------------------------------------


@attrs.define
class ServiceStats:
    """One service's (or, for a path no service owns, one path's) share of a run."""

    route: str | None = None
    requests: int = 0
    failed: int = 0
    latency: Histogram = attrs.field(factory=Histogram)
    errors: dict[str, int] = attrs.field(factory=dict)
    error_examples: dict[str, str] = attrs.field(factory=dict)


@attrs.define
class StressResult:
    url: str
    concurrency: int
    #: Requests that ended (a response or a failure), and those that failed.
    requests: int = 0
    failed: int = 0
    #: Seconds from the first request sent to the last one ended.
    elapsed: float = 0.0
    latency: Histogram = attrs.field(factory=Histogram)
    #: HTTP status -> responses.
    statuses: dict[int, int] = attrs.field(factory=dict)
    #: Error kind -> count, and one example text per kind.
    errors: dict[str, int] = attrs.field(factory=dict)
    error_examples: dict[str, str] = attrs.field(factory=dict)
    #: Service (or path) -> worker pid -> responses.
    pids: dict[str, dict[int, int]] = attrs.field(factory=dict)
    #: Service -> route, for the summary.
    routes: dict[str, str] = attrs.field(factory=dict)
    paths: tuple[str, ...] = ()
    stopped_early: str | None = None
    #: Service (or path) -> its requests, failures and latencies, in load order.
    services: dict[str, ServiceStats] = attrs.field(factory=dict)
    #: What the load is, when it is not the default (e.g. the CGI fallback).
    note: str | None = None

    @property
    def rate(self) -> float:
        return self.requests / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.requests > 0 and self.failed == 0

    def all_pids(self) -> set[int]:
        return {pid for pids in self.pids.values() for pid in pids}


@attrs.frozen
class _PathSpec:
    path: str
    request: bytes
    group: str
    expect: Expectation = Expectation()


# -- the load loops --------------------------------------------------------------


class _Exchange:
    """One request in flight, fed by an upstream connection."""

    __slots__ = ("run", "loop", "spec", "connection", "connecting", "status", "body",
                 "content_type", "done")

    def __init__(self, run: StressRun, loop: _Loop, spec: _PathSpec) -> None:
        self.run = run
        self.loop = loop
        self.spec = spec
        self.connection: Any = None
        self.connecting: Any = None
        self.status = 0
        self.body: Any = b""
        self.content_type: bytes | None = None
        self.done = False

    def response_started(self, status: int, reason: bytes,
                         headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        if self.spec.expect.reads_headers:
            for name, value in headers:
                if name.lower() == b"content-type":
                    self.content_type = value
                    break

    def response_data(self, data: bytes) -> None:
        body = self.body
        if not body:
            self.body = data
        elif isinstance(body, list):
            body.append(data)
        else:
            self.body = [body, data]

    def response_finished(self) -> None:
        if not self.done:
            self.done = True
            self.run._response(self)

    def upstream_failed(self, kind: str, detail: str) -> None:
        if not self.done:
            self.done = True
            self.run._failure(self, classify(kind, detail), detail)

    def abort(self) -> None:
        self.done = True
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.connection is not None:
            self.connection.abort()
            self.connection = None


class _Loop:
    """One client: a request at a time, back to back."""

    __slots__ = ("exchange", "sent_at", "pause")

    def __init__(self) -> None:
        self.exchange: _Exchange | None = None
        self.sent_at = 0.0
        self.pause: Any = None


class StressRun:
    """One load run against a daemon; :meth:`start` returns the result Deferred."""

    def __init__(self, reactor: Any, options: StressOptions, specs: Sequence[_PathSpec],
                 result: StressResult, clock: Callable[[], float] = time.perf_counter) -> None:
        if not specs:
            raise ValueError("nothing to request")
        self.reactor = reactor
        self.options = options
        self.specs = list(specs)
        self.result = result
        self.clock = clock
        self.connections = WorkerConnections(
            reactor, options.target.host, options.target.port,
            max_idle=options.concurrency, connect_timeout=options.timeout)
        self.loops = [_Loop() for _ in range(options.concurrency)]
        self.issued = 0
        self.running = 0
        self.stopping = False
        self.started_at = 0.0
        self.ended_at = 0.0
        self.done: Deferred[StressResult] = Deferred()
        self._sweeper = LoopingCall(self._sweep)
        self._sweeper.clock = reactor
        self._stop_timer: Any = None

    # -- control ----------------------------------------------------------------

    def start(self) -> Deferred[StressResult]:
        self.started_at = self.ended_at = self.clock()
        duration = self.options.duration
        if duration is not None:
            self._stop_timer = self.reactor.callLater(duration, self.stop)
        self._sweeper.start(SWEEP_INTERVAL, now=False)
        self.running = len(self.loops)
        for loop in self.loops:
            self._next(loop)
        return self.done

    def stop(self, reason: str | None = None) -> None:
        """Send no more requests; those in flight finish (or time out)."""
        timer, self._stop_timer = self._stop_timer, None
        if timer is not None and timer.active():
            timer.cancel()
        if reason is not None and self.result.stopped_early is None:
            self.result.stopped_early = reason
        self.stopping = True
        for loop in self.loops:
            if loop.pause is not None:
                loop.pause.cancel()
                loop.pause = None
                self._idle(loop)

    @property
    def elapsed(self) -> float:
        return self.clock() - self.started_at

    # -- the loop ---------------------------------------------------------------

    def _next(self, loop: _Loop) -> None:
        loop.pause = None
        total = self.options.total
        if self.stopping or (total is not None and self.issued >= total):
            self._idle(loop)
            return
        spec = self.specs[self.issued % len(self.specs)]
        self.issued += 1
        exchange = _Exchange(self, loop, spec)
        loop.exchange = exchange
        loop.sent_at = self.clock()
        self.connections.send(exchange, spec.request)

    def _idle(self, loop: _Loop) -> None:
        loop.exchange = None
        self.running -= 1
        if self.running == 0:
            self._finish()

    def _response(self, exchange: _Exchange) -> None:
        loop = exchange.loop
        now = self.clock()
        result = self.result
        result.latency.add(now - loop.sent_at)
        result.requests += 1
        self.ended_at = now
        status = exchange.status
        result.statuses[status] = result.statuses.get(status, 0) + 1
        stats = self._stats(exchange.spec)
        stats.requests += 1
        stats.latency.add(now - loop.sent_at)
        body = exchange.body
        if isinstance(body, list):
            body = b"".join(body)
        parsed = None
        if body[:1] == b"{":  # a JSON object, perhaps naming its worker's pid
            try:
                parsed = json.loads(body)
            except ValueError:
                pass
        failure = exchange.spec.expect.judge(status, exchange.content_type, body, parsed)
        if failure is not None:
            self._error(stats, failure.kind, failure.detail)
        else:
            pid = pid_of(parsed)
            if pid is not None:
                group = result.pids.get(exchange.spec.group)
                if group is None:
                    group = result.pids[exchange.spec.group] = {}
                group[pid] = group.get(pid, 0) + 1
        loop.exchange = None
        self._next(loop)

    def _stats(self, spec: _PathSpec) -> ServiceStats:
        stats = self.result.services.get(spec.group)
        if stats is None:
            stats = self.result.services[spec.group] = ServiceStats(
                self.result.routes.get(spec.group))
        return stats

    def _failure(self, exchange: _Exchange, kind: str, detail: str) -> None:
        loop = exchange.loop
        self.result.requests += 1
        self.ended_at = self.clock()
        stats = self._stats(exchange.spec)
        stats.requests += 1
        self._error(stats, kind, detail)
        loop.exchange = None
        if self.stopping:
            self._next(loop)
        else:
            loop.pause = self.reactor.callLater(ERROR_PAUSE, self._next, loop)

    def _error(self, stats: ServiceStats, kind: str, detail: str) -> None:
        result = self.result
        result.failed += 1
        result.errors[kind] = result.errors.get(kind, 0) + 1
        if kind not in result.error_examples:
            result.error_examples[kind] = clean(detail, 160)
        stats.failed += 1
        stats.errors[kind] = stats.errors.get(kind, 0) + 1
        if kind not in stats.error_examples:
            stats.error_examples[kind] = clean(detail, 160)

    def _sweep(self) -> None:
        """Time out requests older than ``timeout``."""
        now = self.clock()
        timeout = self.options.timeout
        for loop in self.loops:
            exchange = loop.exchange
            if exchange is not None and not exchange.done and now - loop.sent_at > timeout:
                exchange.abort()
                self._failure(exchange, TIMEOUT, f"no response within {timeout:g} s")

    def _finish(self) -> None:
        if self._sweeper.running:
            self._sweeper.stop()
        if self._stop_timer is not None and self._stop_timer.active():
            self._stop_timer.cancel()
        self._stop_timer = None
        self.result.elapsed = max(self.ended_at - self.started_at, 1e-9)
        d = Deferred.fromCoroutine(close_connections(self.reactor, self.connections))
        d.addBoth(lambda _: self.done.callback(self.result))


# -- choosing paths ----------------------------------------------------------------


def group_for(path: str, routes: dict[str, str]) -> str:
    """The service whose route owns ``path`` (longest prefix), else the path."""
    bare = path.split("?", 1)[0]
    best, best_len = None, -1
    for name, route in routes.items():
        if (bare == route or bare.startswith(route.rstrip("/") + "/")) \
                and len(route) > best_len:
            best, best_len = name, len(route)
    return best if best is not None else bare


@attrs.frozen
class Plan:
    """What a run requests (round robin), the routes by service, and a note on
    the choice when it is not the default one."""

    specs: list[_PathSpec]
    routes: dict[str, str]
    note: str | None = None


def plan_paths(options: StressOptions, status: dict[str, Any] | None) -> Plan:
    """The requests to send, round robin, and the routes by service name.

    ``--path``: those paths, each judged by ``--expect-status`` alone.  Else the
    examples whose status is ``--expect-status`` of the services that can
    answer (not ``unavailable`` or ``stopped``), each judged as it says: with
    ``--service``, of the services named (:class:`UsageError` for an unknown
    one); with ``--all``, of every service; by default of the worker services
    (``protocol: http``), or of the CGI ones when there is no worker service.
    Without any: :data:`FALLBACK_PATH`.
    """
    services = [svc for svc in (status or {}).get("services") or []
                if isinstance(svc, dict) and isinstance(svc.get("name"), str)
                and isinstance(svc.get("route"), str)]
    routes = {svc["name"]: svc["route"] for svc in services}
    target = options.target
    if options.paths:
        expect = Expectation(options.expect_status)
        return Plan([_PathSpec(p, target.request(p), group_for(p, routes), expect)
                     for p in options.paths], routes)
    note = None
    if options.services:
        unknown = [name for name in options.services if name not in routes]
        if unknown:
            raise UsageError(f"no service {clean(unknown[0], 60)!r} in the pool "
                             f"(services: {', '.join(sorted(routes)) or 'none'})")
        chosen = [svc for name in dict.fromkeys(options.services)
                  for svc in services if svc["name"] == name]
    elif options.all_services:
        chosen = services
    else:
        chosen = [svc for svc in services if svc.get("protocol", "http") != "cgi"]
        if not _loadable(chosen, options) and _loadable(services, options):
            chosen = services
            note = "the pool has no worker route to load: its CGI routes instead"
    specs = []
    for svc in chosen:
        for path, expect in _examples(svc, options):
            specs.append(_PathSpec(path, target.request(path), svc["name"], expect))
    if not specs and options.services:
        raise UsageError(f"nothing to load: no example with status "
                         f"{options.expect_status} of a running service among "
                         f"{', '.join(clean(n, 60) for n in options.services)} "
                         f"(give --path)")
    if not specs:
        expect = Expectation(options.expect_status)
        specs = [_PathSpec(FALLBACK_PATH, target.request(FALLBACK_PATH),
                           group_for(FALLBACK_PATH, routes), expect)]
    return Plan(specs, routes, note)


def _examples(svc: dict[str, Any], options: StressOptions) -> list[tuple[str, Expectation]]:
    """A running service's usable examples with the status asked for."""
    if svc.get("state") in ("unavailable", "stopped"):
        return []
    found = []
    for example in svc.get("examples") or []:
        if not isinstance(example, dict) or not isinstance(example.get("path"), str):
            continue
        try:
            expect = Expectation.from_example(example)
            path = check_path(example["path"])
        except (BadExample, UsageError):
            continue  # the smoke test reports it
        if expect.status == options.expect_status:
            found.append((path, expect))
    return found


def _loadable(services: list[dict[str, Any]], options: StressOptions) -> bool:
    return any(_examples(svc, options) for svc in services)


async def stress_test(reactor: Any, options: StressOptions,
                      progress: TextIO | None = None,
                      on_start: Callable[[StressRun], None] | None = None) -> StressResult:
    """Run the load test; the result says what happened (nothing is printed
    unless ``progress`` is given).

    :raises NotRunning: nothing listens at the URL.
    """
    client = HttpClient(reactor, options.target, timeout=min(options.timeout, 10.0))
    try:
        status: dict[str, Any] | None = await fetch_status(client)
    except StatusError:
        status = None  # not a cgipool status: --path or the fallback still work
    finally:
        await client.close()
    plan = plan_paths(options, status)
    specs = plan.specs
    result = StressResult(options.target.url, options.concurrency, routes=plan.routes,
                          paths=tuple(s.path for s in specs), note=plan.note)
    for spec in specs:  # the summary's rows in the plan's order, answered or not
        if spec.group not in result.services:
            result.services[spec.group] = ServiceStats(plan.routes.get(spec.group))
    raise_open_files_limit(options.concurrency + 64)
    run = StressRun(reactor, options, specs, result)
    reporter = Progress(run, progress) if progress is not None else None
    if on_start is not None:
        on_start(run)
    d = run.start()
    if reporter is not None:
        reporter.start()
    try:
        return await d
    finally:
        if reporter is not None:
            reporter.finish()


def raise_open_files_limit(needed: int) -> None:
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < needed:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    except (ValueError, OSError):
        pass


# -- progress and summary -----------------------------------------------------------


class Progress:
    """A progress bar on a TTY (one line redrawn), else a line every second."""

    WIDTH = 30

    def __init__(self, run: StressRun, stream: TextIO) -> None:
        self.run = run
        self.stream = stream
        try:
            self.tty = stream.isatty()
        except (AttributeError, ValueError):
            self.tty = False
        self.interval = 0.2 if self.tty else 1.0
        self._call = LoopingCall(self.draw)
        self._call.clock = run.reactor
        self._last = (0.0, 0)
        self._drawn = False

    def start(self) -> None:
        self._last = (self.run.elapsed, self.run.result.requests)
        self._call.start(self.interval, now=False)

    def line(self) -> str:
        run, result, options = self.run, self.run.result, self.run.options
        elapsed = run.elapsed
        done = result.requests
        then, before = self._last
        rate = (done - before) / (elapsed - then) if elapsed > then else 0.0
        self._last = (elapsed, done)
        fractions, parts = [], []
        if options.total is not None:
            fractions.append(done / options.total)
            parts.append(f"{done}/{options.total}")
        else:
            parts.append(f"{done} requests")
        if options.duration is not None:
            fractions.append(elapsed / options.duration)
            parts.append(f"{min(elapsed, options.duration):.1f}/{options.duration:g} s")
        fraction = min(max(fractions), 1.0)
        errors = f"{result.failed} error{'s' if result.failed != 1 else ''}"
        text = f"{'  '.join(parts)}  {rate:,.0f} req/s  {errors}"
        if self.tty:
            filled = int(fraction * self.WIDTH)
            return f"[{'#' * filled}{'.' * (self.WIDTH - filled)}] {text}"
        return f"progress: {text}"

    def draw(self) -> None:
        try:
            if self.tty:
                self.stream.write(f"\r{self.line()}\x1b[K")
            else:
                self.stream.write(self.line() + "\n")
            self.stream.flush()
            self._drawn = True
        except (OSError, ValueError):
            pass

    def finish(self) -> None:
        if self._call.running:
            self._call.stop()
        if self.tty and self._drawn:
            try:
                self.stream.write("\r\x1b[K")
                self.stream.flush()
            except (OSError, ValueError):
                pass


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.2f}"


def format_summary(result: StressResult) -> str:
    lat = result.latency
    lines = [
        f"stress-test {clean(result.url)}: {result.requests} requests in "
        f"{result.elapsed:.2f} s over {result.concurrency} connection"
        f"{'s' if result.concurrency != 1 else ''}"
        + (f" ({result.stopped_early})" if result.stopped_early else ""),
    ]
    if result.note:
        lines.append(f"  ({result.note})")
    table = _service_table(result)
    if table:
        lines += table
        lines.append(f"  slowest     {_ms(lat.max if lat.count else None)} ms")
    else:
        lines += [
            f"  throughput  {result.rate:,.0f} req/s",
            f"  latency ms  p50 {_ms(lat.percentile(50))}  p95 {_ms(lat.percentile(95))}  "
            f"p99 {_ms(lat.percentile(99))}  max {_ms(lat.max if lat.count else None)}",
        ]
    lines.append("  status      " + ("  ".join(f"{code}: {n}" for code, n in
                                               sorted(result.statuses.items())) or "none"))
    if result.errors:
        lines.append("  errors")
        if result.services:  # by service, each kind with one example
            for group, stats in result.services.items():
                for kind, n in sorted(stats.errors.items(), key=lambda kv: (-kv[1], kv[0])):
                    example = stats.error_examples.get(kind, "")
                    lines.append(f"    {clean(group, 30)}: {clean(kind, 40)}: {n}"
                                 + (f"  (e.g. {example})" if example else ""))
        else:
            for kind, n in sorted(result.errors.items(), key=lambda kv: (-kv[1], kv[0])):
                example = result.error_examples.get(kind, "")
                lines.append(f"    {clean(kind, 40)}: {n}" + (f"  (e.g. {example})"
                                                                if example else ""))
    else:
        lines.append("  errors      none")
    if result.pids:
        lines.append("  workers     responses per pid")
        order = [g for g in result.services if g in result.pids]
        for group in order + sorted(set(result.pids) - set(order)):
            pids = result.pids[group]
            route = result.routes.get(group)
            label = clean(group, 30) + (f" {clean(route, 40)}" if route else "")
            total = sum(pids.values())
            ranked = sorted(pids.items(), key=lambda kv: -kv[1])
            if len(pids) > MAX_PIDS_SHOWN and all(n == 1 for _, n in ranked):
                lines.append(f"    {label}: {total} over {len(pids)} pids "
                             f"(a process per request: CGI)")
                continue
            lines.append(f"    {label}: {total} over {len(pids)} pid"
                         f"{'s' if len(pids) != 1 else ''}")
            cells = [f"{pid}: {n} ({n / total:.0%})" for pid, n in ranked[:MAX_PIDS_SHOWN]]
            for i in range(0, len(cells), 4):
                lines.append("      " + "   ".join(cells[i:i + 4]))
            if len(ranked) > MAX_PIDS_SHOWN:
                rest = ranked[MAX_PIDS_SHOWN:]
                lines.append(f"      … and {len(rest)} more pids with "
                             f"{sum(n for _, n in rest)} responses")
    if result.ok and result.stopped_early:
        lines.append(f"INCOMPLETE: {result.stopped_early}; no failed requests until then")
    elif result.ok:
        lines.append("PASS: no failed requests")
    elif result.requests == 0:
        lines.append("FAIL: no request was sent")
    else:
        lines.append(f"FAIL: {result.failed} of {result.requests} requests failed")
    return "\n".join(lines) + "\n"


def _service_table(result: StressResult) -> list[str]:
    """Requests, failures, req/s and latency percentiles per service, then the total."""
    if not result.services:
        return []
    names = {group: clean(group, 24) for group in result.services}
    routes = {group: clean(stats.route or "", 28) for group, stats in result.services.items()}
    name_w = max(len("service"), len("total"), *map(len, names.values()))
    route_w = max(len("route"), *map(len, routes.values()))
    elapsed = result.elapsed if result.elapsed > 0 else None

    def row(name: str, route: str, requests: int, failed: int, lat: Histogram) -> str:
        rate = f"{requests / elapsed:,.0f}" if elapsed else "-"
        return (f"  {name.ljust(name_w)}  {route.ljust(route_w)}  {requests:>8}  "
                f"{failed:>6}  {rate:>8}  {_ms(lat.percentile(50)):>8}  "
                f"{_ms(lat.percentile(95)):>8}  {_ms(lat.percentile(99)):>8}")

    lines = [f"  {'service'.ljust(name_w)}  {'route'.ljust(route_w)}  {'requests':>8}  "
             f"{'failed':>6}  {'req/s':>8}  {'p50 ms':>8}  {'p95 ms':>8}  {'p99 ms':>8}"]
    for group, stats in result.services.items():
        lines.append(row(names[group], routes[group], stats.requests, stats.failed,
                         stats.latency))
    lines.append(row("total", "", result.requests, result.failed, result.latency))
    return lines


async def run_stress(reactor: Any, options: StressOptions, out: TextIO, err: TextIO,
                     handle_sigint: bool = False) -> int:
    """The command: progress on ``err``, the summary on ``out``.

    With ``handle_sigint``, Ctrl-C stops sending and still prints the summary
    (a second Ctrl-C quits).
    """
    runs: list[StressRun] = []

    def interrupted(signum: int, frame: Any) -> None:
        if runs and not runs[0].stopping:
            reactor.callFromThread(runs[0].stop, "interrupted")
        else:
            reactor.callFromThread(reactor.stop)

    if handle_sigint:
        # After the reactor installed its own handlers.
        reactor.callWhenRunning(signal.signal, signal.SIGINT, interrupted)
    try:
        result = await stress_test(reactor, options, progress=err, on_start=runs.append)
    except NotRunning as e:
        err.write(f"{e}\n")
        return 1
    out.write(format_summary(result))
    return 0 if result.ok and result.stopped_early is None else 1
