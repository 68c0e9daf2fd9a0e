"""``CgiPool``: a ``protocol: cgi`` service's executions — the cap of concurrent
scripts, the bounded queue of requests waiting for a slot, the counters and the
status — and ``Waiting``, one queued request."""

from __future__ import annotations

import collections
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.web.server import NOT_DONE_YET

from cgipool.cgi.environ import base_environ
from cgipool.cgi.execution import CgiExecution
from cgipool.config import ServiceConfig, expand
from cgipool.events import EventLog
from cgipool.proxy.errors import finish_with_error, set_error
from cgipool.supervisor.containment import Containment
from cgipool.supervisor.interface import lifecycle_state
from cgipool.supervisor.output import OutputBudget
from cgipool.supervisor.pool import kill_group, kill_leftovers
from cgipool.supervisor.unavailable import announce_unavailable

if TYPE_CHECKING:
    from cgipool.cgi.resource import CgiResource

#: Exit codes kept for the status.
LAST_EXITS = 10


class CgiPool:
    """A ``protocol: cgi`` service: per-request executions, a cap and a queue.

    Sits in ``Supervisor.pools`` beside the worker pools, as a
    :class:`~cgipool.supervisor.interface.PerRequestPool`: it keeps no resident
    worker (``resident`` is None, ``workers`` empty) and is not autoscaled
    (``policy`` is None: ``workers.max`` is a cap, not a size).
    """

    #: Nothing runs between requests: no worker slots, no worker pool, no policy.
    workers: tuple[()] = ()
    resident = None
    policy = None

    def __init__(self, config: ServiceConfig, reactor: Any, *, events: EventLog,
                 launcher: Sequence[str], kill: Callable[[int, int], None] = kill_group,
                 containment: Containment | None = None,
                 output_budget: OutputBudget | None = None) -> None:
        self.config = config
        #: Marks each execution's lineage and kills what it leaves behind (None: off).
        self.containment = containment
        self.reactor = reactor
        self.events = events
        self.launcher = list(launcher)
        self.kill = kill
        #: After a script exited: its group only, never its (reaped) pid.
        self.kill_leftovers = kill_leftovers if kill is kill_group else kill
        #: The service's budget of logged script stderr (None: unlimited).
        self.output_budget = output_budget
        self.started = False
        self.stopping = False
        self.removing = False
        #: Concurrent executions allowed now (``scale`` changes it).
        self.limit = config.workers.max
        self.running: set[CgiExecution] = set()
        self.waiting: collections.deque[Waiting] = collections.deque()
        self.executions = 0
        self.completed = 0
        self.timeouts = 0
        self.failures = 0
        #: Executions killed because their client left (counted as neither).
        self.abandoned = 0
        self.rejected = 0
        self.consecutive_failures = 0
        self.last_exit_codes: collections.deque[int | str] = collections.deque(
            maxlen=LAST_EXITS)
        self._ids = itertools.count(1)
        self._idle: list[Deferred[None]] = []
        #: The environment every script starts from (cgi.environ.base_environ).
        self.base_env = base_environ(config)
        # No {port} or {worker} in a CGI command (the config refuses them): once.
        self.argv = [expand(arg, port=0, worker=0) for arg in config.command]

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def per_request(self) -> CgiPool:
        """A CGI pool answers each request itself (see Pool.per_request)."""
        return self

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def capacity(self) -> tuple[int, int]:
        """``(scripts running, at most)``: a CGI service keeps no worker."""
        return len(self.running), self.limit

    @property
    def accepting(self) -> bool:
        return self.started and not self.stopping and not self.removing \
            and not self.config.unavailable

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self.started = True
        if self.config.unavailable:
            announce_unavailable(self.name, self.config.unavailable, self.events)

    def stop(self) -> Deferred[None]:
        """Refuse new requests, answer waiting ones 503, stop running scripts
        (SIGTERM to the group, SIGKILL after ``stop_timeout``); fires when all ended."""
        self.stopping = True
        self.refuse_waiting("the daemon is shutting down")
        for execution in list(self.running):
            execution.terminate(self.config.stop_timeout)
        d = self._when_idle()
        d.addCallback(lambda _: self.events.add("stopped", self.name, None,
                                                "no CGI script running"))
        return d

    def retire_all(self, reason: str) -> Deferred[None]:
        """Removed by a reload: no new requests; those running finish."""
        self.removing = True
        self.refuse_waiting(f"service {self.name!r} was removed")
        return self._when_idle()

    def reconfigure(self, config: ServiceConfig) -> None:
        """A reloaded configuration: new limits and command apply to the next execution."""
        self.config = config
        self.limit = config.workers.max
        self.base_env = base_environ(config)
        # No {port} or {worker} in a CGI command (the config refuses them): once.
        self.argv = [expand(arg, port=0, worker=0) for arg in config.command]
        self._dispatch()

    def scale_to(self, size: int, reason: str) -> int:
        """Change the cap of concurrent executions (within workers.min..max)."""
        low, high = self.config.workers.min, self.config.workers.max
        if not low <= size <= high:
            raise ValueError(f"size {size} is outside workers.min..max ({low}..{high})")
        before, self.limit = self.limit, size
        if size != before:
            self.events.add("scale", self.name, None,
                            f"at most {before} -> {size} concurrent executions: {reason}",
                            before=before, after=size, reason=reason)
            self._dispatch()
        return before

    def _when_idle(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def refuse_waiting(self, message: str) -> None:
        while self.waiting:
            self.waiting.popleft().refuse(message)

    # -- requests ---------------------------------------------------------------

    def handle(self, request: Any, resource: CgiResource) -> Any:
        """Run the script for ``request`` now, queue it, or refuse it."""
        if self.config.unavailable or not self.accepting:
            self.rejected += 1
            return set_error(request, 503, self._why_not(), retry_after=1,
                             service=self.name, state=self.state)
        if len(self.running) < self.limit and not self.waiting:
            self._run(request, resource, self.reactor.seconds())
            return NOT_DONE_YET
        if len(self.waiting) >= self.config.queue.max:
            self.rejected += 1
            return set_error(request, 503,
                             f"service {self.name!r} is at capacity: {len(self.running)} "
                             f"scripts running, {len(self.waiting)} requests waiting",
                             retry_after=1, service=self.name)
        self.waiting.append(Waiting(self, request, resource))
        return NOT_DONE_YET

    def _why_not(self) -> str:
        if self.config.unavailable:
            return f"service {self.name!r} is unavailable: {self.config.unavailable}"
        if self.removing:
            return f"service {self.name!r} was removed"
        return "the daemon is shutting down"

    def _run(self, request: Any, resource: CgiResource, began: float) -> None:
        request_id = f"{self.name}-{next(self._ids)}"
        execution = CgiExecution(self, request, resource, request_id, began)
        self.running.add(execution)
        self.executions += 1
        execution.start()

    def _dispatch(self) -> None:
        while self.waiting and len(self.running) < self.limit and self.accepting:
            waiting = self.waiting.popleft()
            waiting.dequeued()
            self._run(waiting.request, waiting.resource, waiting.began)

    def finished(self, execution: CgiExecution, exit_code: int | str,
                 ok: bool | None) -> None:
        """An execution is over (process reaped, response done or abandoned);
        ``ok`` None: neither a success nor a failure (its client left)."""
        self.running.discard(execution)
        self.completed += 1
        self.last_exit_codes.append(exit_code)
        if ok is None:
            self.abandoned += 1
        elif ok:
            self.consecutive_failures = 0
        else:
            self.failures += 1
            self.consecutive_failures += 1
        self._dispatch()
        if not self.running:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    # -- reading ---------------------------------------------------------------

    @property
    def state(self) -> str:
        """``ok`` or ``failing`` (the last scripts all failed) while it runs (else
        :func:`~cgipool.supervisor.interface.lifecycle_state`'s)."""
        shared = lifecycle_state(self)
        if shared is not None:
            return shared
        if self.consecutive_failures >= self.config.restart.failing_after:
            return "failing"
        return "ok"

    def status(self, now: float) -> dict[str, Any]:
        cfg = self.config
        status = {
            "name": cfg.name,
            "route": cfg.route,
            "state": self.state,
            "protocol": "cgi",
            "description": cfg.description,
            "language": cfg.language,
            "examples": [e.as_status() for e in cfg.examples],
            "size": {"min": cfg.workers.min, "max": cfg.workers.max,
                     "desired": self.limit, "ready": 0},
            "rolling_restart": False,
            "concurrency": 1,
            "queue": {"length": len(self.waiting), "max": cfg.queue.max,
                      "timeout": cfg.queue.timeout},
            "autoscale": None,
            "restarts_total": 0,
            "requests": self.completed,
            "in_flight": len(self.running),
            "workers": [],
            "cgi": {
                "command": list(cfg.command),
                "limit": self.limit,
                "executions": self.executions,
                "in_flight": len(self.running),
                "queued": len(self.waiting),
                "timeouts": self.timeouts,
                "failures": self.failures,
                "abandoned": self.abandoned,
                "rejected": self.rejected,
                "last_exit_codes": list(self.last_exit_codes),
                "pids": sorted(e.pid for e in self.running if e.pid is not None),
            },
        }
        if cfg.unavailable:
            status["reason"] = cfg.unavailable
        return status


class Waiting:
    """A request in the queue, waiting for a free execution slot."""

    def __init__(self, pool: CgiPool, request: Any, resource: CgiResource) -> None:
        self.pool = pool
        self.request = request
        self.resource = resource
        self.began = pool.reactor.seconds()
        request.exchange = self
        self.timer: IDelayedCall | None = pool.reactor.callLater(
            pool.config.queue.timeout, self.timed_out)

    def dequeued(self) -> None:
        self._cancel()
        self.request.exchange = None

    def _cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def timed_out(self) -> None:
        self.timer = None
        self._leave()
        self.refuse(f"no free slot for service {self.pool.name!r} within "
                    f"queue.timeout={self.pool.config.queue.timeout:g}s")

    def refuse(self, message: str) -> None:
        self._cancel()
        self.request.exchange = None
        self.pool.rejected += 1
        finish_with_error(self.request, 503, message, retry_after=1, service=self.pool.name)

    def client_gone(self) -> None:
        self._cancel()
        self._leave()

    def _leave(self) -> None:
        try:
            self.pool.waiting.remove(self)
        except ValueError:
            pass
