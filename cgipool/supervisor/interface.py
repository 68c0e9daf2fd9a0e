"""What the rest of the daemon needs of a service's pool, as typing Protocols.

Two kinds of pool sit in ``Supervisor.pools``: a
:class:`~cgipool.supervisor.pool.ServicePool` (and its
:class:`~cgipool.supervisor.unavailable.UnavailablePool`) keeps worker
processes that serve many requests each; a :class:`cgipool.cgi.CgiPool` runs
its script once per request.  The supervisor, the admin, the metrics, the
reload and ``tap.build`` read either through :class:`Pool`.  What only one kind
has is a *capability* of the Pool, None on the other kind, so a consumer asks
instead of guessing from the class or the configuration:

- ``Pool.resident`` → :class:`WorkerPool`: the worker processes — what the
  proxy balances over and reports failures to, rolling restarts, per-worker
  controls, renewal on a reload (None: a CGI pool keeps no process);
- ``Pool.per_request`` → :class:`PerRequestPool`: a pool that answers each
  request itself with a program it runs for it (None: a worker pool);
- ``Pool.policy`` → :class:`Policy`: autoscaling and recycling (None: the pool
  is not autoscaled; a CGI pool's ``workers.max`` is a cap, not a size).

A worker pool's health checks come in the same way: the daemon gives it a
:data:`Probe` and a :data:`MonitorFactory` (:mod:`cgipool.health`'s), so that
supervisor/ does not import the health module, which imports the worker slot.

The states every kind shares (``stopped``, ``removing``, ``unavailable``) are
decided once, by :func:`lifecycle_state`.

This module imports nothing of cgipool's but the configuration's classes and
the worker slot, so every package may depend on it (docs/ARCHITECTURE.md,
*Package import cycles*).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence, Sized
from typing import Any, Protocol

from twisted.internet.defer import Deferred

from cgipool.config import HealthConfig, ServiceConfig
from cgipool.supervisor.worker import Worker


#: ``probe(port, path) -> Deferred`` that fires on a healthy answer and fails
#: otherwise (:class:`cgipool.health.HttpProbe`).
Probe = Callable[[int, str], "Deferred[object]"]


class Policy(Protocol):
    """A pool's autoscaling and recycling (:class:`~cgipool.supervisor.policy.PoolPolicy`)."""

    def start(self) -> None: ...
    def stop(self) -> None: ...

    def restart(self) -> None:
        """The pool's configuration changed (a reload): start over with it."""

    def manual_change(self) -> None:
        """Someone resized the pool by hand: measure afresh before deciding."""

    def status(self) -> dict[str, Any]: ...


class Pool(Protocol):
    """One service's pool, whatever runs its requests."""

    #: ``start()`` ran; ``stop()`` ran (the daemon stops); ``retire_all()`` ran
    #: (a reload removed the service).
    started: bool
    stopping: bool
    removing: bool

    @property
    def config(self) -> ServiceConfig: ...

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> str:
        """``stopped``, ``removing``, ``unavailable`` (see :func:`lifecycle_state`),
        else the kind's own: ``ok``, ``degraded``, ``starting`` or ``failing``."""

    @property
    def accepting(self) -> bool:
        """Whether a request may be taken (or wait) now."""

    @property
    def queue_length(self) -> int:
        """Requests waiting for a free worker or execution slot."""

    @property
    def capacity(self) -> tuple[int, int]:
        """What serves now and the most there can be: ready workers and worker
        slots; for a CGI pool, scripts running and the cap (the Traffic chart)."""

    @property
    def workers(self) -> Sequence[Worker]:
        """The resident worker slots (the metrics' per-state gauges, the
        admin's worker lookups, the stop's connection aborts); a pool that runs
        a script per request has none."""

    @property
    def policy(self) -> Policy | None:
        """Autoscaling and recycling, started and stopped by the supervisor;
        None: not autoscaled."""

    @property
    def resident(self) -> WorkerPool | None:
        """This pool's worker processes (a ServicePool: itself); None when
        nothing runs between requests."""

    @property
    def per_request(self) -> PerRequestPool | None:
        """This pool as one that answers each request with a program run for it
        (a CgiPool: itself); None for a worker pool."""

    def start(self) -> None: ...

    def stop(self) -> Deferred[Any]:
        """Stop everything it runs; fires once every process has ended."""

    def retire_all(self, reason: str) -> Deferred[Any]:
        """Removed by a reload: no new requests; fires when those running ended."""

    def reconfigure(self, config: ServiceConfig) -> None:
        """A reloaded configuration of the same kind of service."""

    def scale_to(self, size: int, reason: str) -> int:
        """Resize (workers, or the cap of concurrent scripts) within
        ``workers.min..max``; returns the size before."""

    def status(self, now: float) -> dict[str, Any]:
        """The service's entry in ``/admin/api/status``."""


class WorkerPool(Pool, Protocol):
    """A pool of resident worker processes: what the proxy, the admin's worker
    controls and the reload's renewal need (:class:`~cgipool.supervisor.pool.ServicePool`)."""

    #: Requests waiting for a worker: the proxy's queue (``queue_length`` counts it).
    waiting: Sized
    #: Called when a worker joins the rotation (the proxy hands it waiting requests).
    capacity_added: Callable[[], None] | None
    #: A rolling restart is in progress.
    rolling: bool
    #: The last rolling restart's record (shown in the status), or None.
    last_roll: dict[str, Any] | None

    @property
    def ready(self) -> Sequence[Worker]:
        """The workers in rotation (the balancer reads it on every request)."""

    @property
    def desired(self) -> int:
        """The pool's size: slots neither leaving nor on probation."""

    # -- from the proxy, once per request or failure ---------------------------

    def acquire(self, worker: Worker) -> None: ...
    def release(self, worker: Worker, served: bool) -> None: ...
    def connection_refused(self, worker: Worker) -> None: ...
    def request_failed(self, worker: Worker, kind: str, detail: str) -> None: ...
    def request_timed_out(self, worker: Worker, request: str) -> None: ...

    def why_not_ready(self) -> str:
        """Why no current worker is ready (the proxy's 503, the reload's report)."""

    # -- the admin's controls and the reload ------------------------------------

    def rolling_restart(self, reason: str,
                        workers: Sequence[Worker] | None = None) -> Deferred[bool]: ...
    def replace_worker(self, old: Worker, reason: str) -> Deferred[bool]: ...
    def drain_worker(self, worker: Worker, reason: str) -> bool: ...

    def renew(self, reason: str, workers: Sequence[Worker] | None = None) -> None:
        """New processes (for ``workers``, default all) without failing a request."""

    def stale_inputs(self, config: ServiceConfig | None = None
                     ) -> tuple[list[Worker], str]:
        """The workers started from input files that changed since, and what changed."""

    def current_ready(self) -> bool:
        """Whether a worker spawned since the last :meth:`renew` is in rotation."""


class PerRequestPool(Pool, Protocol):
    """A pool that runs a program for each request (:class:`cgipool.cgi.CgiPool`):
    what its route's resource needs."""

    @property
    def running(self) -> Collection[Any]:
        """The requests being answered now (the daemon's stop waits for them)."""

    def handle(self, request: Any, resource: Any) -> Any:
        """Answer ``request`` (for ``resource``, which counts it): run the program
        now, queue the request, or refuse it; what ``render`` returns."""

    def refuse_waiting(self, message: str) -> None:
        """Answer every queued request 503 with ``message``."""


class Monitor(Protocol):
    """The health probe loop of one worker process (:class:`cgipool.health.HealthMonitor`)."""

    def start(self, start_timeout: float) -> None: ...
    def check_soon(self) -> None: ...
    def stop(self) -> None: ...


class HealthListener(Protocol):
    """Where a monitor's verdicts go (the pool)."""

    def health_passed(self, worker: Worker) -> None: ...
    def health_failed(self, worker: Worker, error: str) -> None: ...
    def startup_timed_out(self, worker: Worker) -> None: ...


#: Makes a worker's monitor: ``(clock, probe, worker, health config, listener)``;
#: the daemon gives :class:`cgipool.health.HealthMonitor` (supervisor/ never
#: imports cgipool.health, which imports the worker slot: see ARCHITECTURE.md,
#: *Package import cycles*).
MonitorFactory = Callable[[Any, Probe, Worker, HealthConfig, HealthListener], Monitor]


def lifecycle_state(pool: Pool) -> str | None:
    """The states every kind of pool shares, in this order: ``stopped`` (not
    started yet, or stopping with the daemon), ``removing`` (a reload took the
    service away), ``unavailable`` (no runtime of it is installed); None while
    it runs, when its own kind says how well."""
    if pool.stopping or not pool.started:
        return "stopped"
    if pool.removing:
        return "removing"
    if pool.config.unavailable:
        return "unavailable"
    return None
