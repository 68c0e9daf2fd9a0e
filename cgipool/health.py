"""Active health checks: HTTP GETs of each worker's health path.

Right after a spawn the probe runs on a fast, growing schedule (5 ms, then ×1.5
up to 100 ms) so a worker is in rotation within ~100 ms of listening; after the
first pass it runs every ``health.interval`` seconds.  Verdicts go to the pool,
which owns the policy (``fall`` failures → restart).  Passive failures seen by
the proxy (a refused connection) ask for a check soon via :meth:`check_soon`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import treq
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.web.client import Agent, HTTPConnectionPool, _HTTP11ClientFactory
from zope.interface import implementer
from twisted.web.iweb import IAgentEndpointFactory

from cgipool.config import HealthConfig
from cgipool.supervisor.worker import HealthResult, Worker

#: ``probe(port, path) -> Deferred`` that fires on a healthy answer and fails otherwise.
Probe = Callable[[int, str], "Deferred[object]"]

STARTUP_FIRST_DELAY = 0.005
STARTUP_GROWTH = 1.5
STARTUP_MAX_DELAY = 0.1
#: After a passive failure, how soon to look again.
CHECK_SOON_DELAY = 0.05


class HealthListener(Protocol):
    def health_passed(self, worker: Worker) -> None: ...
    def health_failed(self, worker: Worker, error: str) -> None: ...
    def startup_timed_out(self, worker: Worker) -> None: ...


class UnhealthyResponse(Exception):
    """The worker answered, but not with a 2xx/3xx status."""


class _QuietClientFactory(_HTTP11ClientFactory):
    noisy = False  # no "Starting factory" log line per probe


@implementer(IAgentEndpointFactory)
class _LoopbackEndpoints:
    """Plain TCP to an IP literal: no resolver thread hop per probe."""

    def __init__(self, reactor: IReactorTime) -> None:
        self.reactor = reactor

    def endpointForURI(self, uri: object) -> TCP4ClientEndpoint:
        return TCP4ClientEndpoint(self.reactor, uri.host.decode(), uri.port,  # type: ignore[attr-defined]
                                  timeout=5)


class HttpProbe:
    """GET ``http://127.0.0.1:<port><path>`` with treq; success is any 2xx/3xx."""

    def __init__(self, reactor: IReactorTime, host: str = "127.0.0.1") -> None:
        self.reactor = reactor
        self.host = host
        # A fresh connection per probe: a check must see the worker as a new
        # client would, and nothing is left cached when the daemon stops.
        self.pool = HTTPConnectionPool(reactor, persistent=False)
        self.pool._factory = _QuietClientFactory
        self.agent = Agent.usingEndpointFactory(reactor, _LoopbackEndpoints(reactor),
                                                pool=self.pool)

    def __call__(self, port: int, path: str) -> Deferred[object]:
        d = treq.get(f"http://{self.host}:{port}{path}", agent=self.agent,
                     reactor=self.reactor, allow_redirects=False)

        def check(response: object) -> Deferred[object]:
            code = response.code  # type: ignore[attr-defined]
            body = treq.content(response)
            if not 200 <= code < 400:
                body.addCallback(lambda _: _raise(UnhealthyResponse(f"HTTP {code}")))
            return body

        return d.addCallback(check)


def _raise(exc: Exception) -> None:
    raise exc


def describe_failure(failure: Failure) -> str:
    """A short reason for the dashboard: 'connection refused', 'timeout', 'HTTP 500'."""
    from twisted.internet import error

    exc = failure.value
    if isinstance(exc, CancelledError):
        return "timeout"
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, UnhealthyResponse):
        return str(exc)
    if isinstance(exc, error.TimeoutError):
        return "timeout"
    name = type(exc).__name__
    text = str(exc)
    return f"{name}: {text}" if text else name


class HealthMonitor:
    """The probe loop of one worker process (a new monitor per process)."""

    def __init__(self, clock: IReactorTime, probe: Probe, worker: Worker,
                 config: HealthConfig, listener: HealthListener) -> None:
        self.clock = clock
        self.probe = probe
        self.worker = worker
        self.config = config
        self.listener = listener
        self.starting = True
        self.stopped = False
        self._deadline = 0.0
        self._delay = STARTUP_FIRST_DELAY
        self._timer: IDelayedCall | None = None
        self._pending: Deferred[object] | None = None

    def start(self, start_timeout: float) -> None:
        """Probe fast until the first pass, giving up after ``start_timeout``."""
        self._deadline = self.clock.seconds() + start_timeout
        self._schedule(STARTUP_FIRST_DELAY)

    def check_soon(self) -> None:
        """Probe shortly instead of waiting for the next interval."""
        if self.stopped or self._pending is not None:
            return
        if self._timer is not None and self._timer.getTime() - self.clock.seconds() <= CHECK_SOON_DELAY:
            return
        self._schedule(CHECK_SOON_DELAY)

    def stop(self) -> None:
        self.stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._run)

    def _run(self) -> None:
        self._timer = None
        if self.stopped or self.worker.port is None:
            return
        started = self.clock.seconds()
        d = self.probe(self.worker.port, self.config.path)
        self._pending = d
        timeout = self.clock.callLater(self.config.timeout, d.cancel)

        def done(result: object) -> None:
            if timeout.active():
                timeout.cancel()
            if self._pending is not d:
                return  # stopped meanwhile
            self._pending = None
            if isinstance(result, Failure):
                self._failed(describe_failure(result))
            else:
                self._passed(self.clock.seconds() - started)

        d.addBoth(done)

    def _passed(self, latency: float) -> None:
        worker = self.worker
        worker.last_health = HealthResult(True, self.clock.seconds(), latency)
        worker.health_failures = 0
        self.starting = False
        self.listener.health_passed(worker)
        if not self.stopped:
            self._schedule(self.config.interval)

    def _failed(self, error: str) -> None:
        worker = self.worker
        now = self.clock.seconds()
        worker.last_health = HealthResult(False, now, None, error)
        if self.starting:
            if now >= self._deadline:
                self.stopped = True
                self.listener.startup_timed_out(worker)
                return
            self._delay = min(self._delay * STARTUP_GROWTH, STARTUP_MAX_DELAY)
            self._schedule(min(self._delay, max(0.0, self._deadline - now)))
            return
        worker.health_failures += 1
        self.listener.health_failed(worker, error)
        if not self.stopped:
            self._schedule(self.config.interval)
