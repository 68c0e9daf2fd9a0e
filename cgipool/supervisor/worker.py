"""One worker slot: its state machine and the ProcessProtocol of its process.

A slot (``service[index]``) lives as long as the pool wants it; the process in
it comes and goes.  Its life::

    stopped ──spawn──▶ starting ──probe passes──▶ ready ◀──probe passes── unhealthy
                          │                        │  └──refused / probe fails──▶┘
                          │ exits, or never ready  │ exits (crash) or `fall` failed probes
                          ▼                        ▼
                       backoff ──delay──▶ starting          stopping ──exit──▶ stopped
                                                             (SIGTERM, SIGKILL after stop_timeout)
    ready / unhealthy ──drain──▶ draining ──in-flight done (or request_timeout)──▶ stopping

A crash is the event that moves a live worker to ``backoff``.  A *retiring*
slot (drained, scaled in, or replaced) is removed from its pool once its
process has exited.  Illegal
transitions raise, so a bug in the pool cannot silently corrupt a worker's state.
"""

from __future__ import annotations

import enum
import signal
from typing import Any

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure

from cgipool.supervisor.backoff import Backoff
from cgipool.supervisor.containment import Lineage
from cgipool.supervisor.output import OutputLogger


class WorkerState(enum.Enum):
    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    UNHEALTHY = "unhealthy"
    DRAINING = "draining"
    STOPPING = "stopping"
    BACKOFF = "backoff"


S = WorkerState
#: Which state may follow which.
TRANSITIONS: dict[WorkerState, frozenset[WorkerState]] = {
    S.STOPPED: frozenset({S.STARTING}),
    S.STARTING: frozenset({S.READY, S.STOPPING, S.BACKOFF, S.STOPPED}),
    S.READY: frozenset({S.UNHEALTHY, S.DRAINING, S.STOPPING, S.BACKOFF, S.STOPPED}),
    S.UNHEALTHY: frozenset({S.READY, S.DRAINING, S.STOPPING, S.BACKOFF, S.STOPPED}),
    S.DRAINING: frozenset({S.STOPPING, S.STOPPED}),
    S.STOPPING: frozenset({S.STOPPED, S.BACKOFF, S.STARTING}),
    S.BACKOFF: frozenset({S.STARTING, S.STOPPED}),
}
#: States in which a process exists.
ALIVE = frozenset({S.STARTING, S.READY, S.UNHEALTHY, S.DRAINING, S.STOPPING})


class IllegalTransition(Exception):
    """A bug: the pool asked a worker for a state change its life does not allow."""


class AfterExit(enum.Enum):
    """What the pool wants once the current process is gone."""

    RESTART_WITH_BACKOFF = "backoff"
    RESTART_NOW = "restart"
    STOP = "stop"
    #: Remove the slot from the pool (drained, scaled in, replaced).
    RETIRE = "retire"


@attrs.frozen
class HealthResult:
    ok: bool
    at: float
    latency: float | None
    error: str | None = None


def describe_exit(reason: Failure) -> tuple[int | None, int | None, str]:
    """``(exit code, signal, text)`` of a process exit."""
    value = reason.value
    code = getattr(value, "exitCode", None)
    sig = getattr(value, "signal", None)
    if isinstance(value, error.ProcessDone):
        return 0, None, "exit code 0"
    if sig is not None:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        return None, sig, f"killed by {name}"
    return code, None, f"exit code {code}"


@attrs.define(eq=False)
class Worker:
    """A worker slot's state, owned by its pool and read by proxy and admin."""

    service: str
    index: int
    backoff: Backoff
    port: int | None = None
    state: WorkerState = WorkerState.STOPPED
    pid: int | None = None
    #: Clock time the current process was spawned / became ready.
    started_at: float | None = None
    ready_at: float | None = None
    #: Restarts of this slot (any exit followed by a new spawn).
    restarts: int = 0
    #: Requests completed by this slot, and requests in progress now.
    requests: int = 0
    in_flight: int = 0
    last_exit: str | None = None
    last_health: HealthResult | None = None
    health_failures: int = 0
    after_exit: AfterExit = AfterExit.RESTART_WITH_BACKOFF
    #: The current process protocol, while a process exists.
    process: WorkerProcess | None = None
    #: Keep-alive connections to this worker, owned by the proxy; closed when
    #: the process goes.
    connections: Any = None
    #: Pending timers (restart after backoff, SIGKILL after stop_timeout, the
    #: "stable again" reset of the backoff).
    restart_timer: IDelayedCall | None = None
    kill_timer: IDelayedCall | None = None
    stable_timer: IDelayedCall | None = None
    drain_timer: IDelayedCall | None = None
    term_timer: IDelayedCall | None = None
    #: Leaving the pool: no restart after its process exits.
    retiring: bool = False
    #: A replacement that has not been ready yet: a failed start gives up
    #: instead of backing off, and the worker it replaces keeps serving.
    probation: bool = False
    #: Set while draining: the proxy calls it when ``in_flight`` drops to 0.
    drained: Any = None
    #: Consecutive proxied requests that failed (passive health); 0 after a success.
    passive_failures: int = 0
    #: Recycle once ``requests`` reaches this (None: never); set at each spawn.
    recycle_at: int | None = None
    #: Seconds this process may live (None: forever); set at each spawn.
    lifetime: float | None = None
    #: Why it is being recycled (a replacement is on its way), or None.
    recycling: str | None = None
    #: The service's input files as the current (or last) process was started
    #: from them (supervisor/inputs.py): a reload restarts it when they changed.
    inputs: dict[str, Any] | None = None
    #: The pool's generation at spawn: a reload that renews the pool bumps it.
    generation: int = 0

    @property
    def name(self) -> str:
        return f"{self.service}[{self.index}]"

    @property
    def alive(self) -> bool:
        return self.state in ALIVE

    def transition(self, new: WorkerState) -> WorkerState:
        old = self.state
        if new not in TRANSITIONS[old]:
            raise IllegalTransition(f"{self.name}: {old.value} -> {new.value}")
        self.state = new
        return old

    def as_dict(self, now: float) -> dict[str, Any]:
        health = self.last_health
        return {
            "id": self.index,
            "pid": self.pid,
            "port": self.port,
            "state": self.state.value,
            "started_at": self.started_at,
            "uptime": None if self.started_at is None or not self.alive
            else round(now - self.started_at, 3),
            "restarts": self.restarts,
            "requests": self.requests,
            "in_flight": self.in_flight,
            "last_exit": self.last_exit,
            "crash_looping": self.backoff.failing,
            "retiring": self.retiring,
            "recycling": self.recycling,
            "passive_failures": self.passive_failures,
            "last_health": None if health is None else {
                "ok": health.ok,
                "at": health.at,
                "latency_ms": None if health.latency is None
                else round(health.latency * 1000, 3),
                "error": health.error,
            },
        }


class WorkerProcess(ProcessProtocol):
    """The protocol of one worker process: output to the log, exit to the pool."""

    #: After the process is reaped, how long its pipes may stay open (held by
    #: a grandchild that escaped the group kill) before we close them.
    PIPE_GRACE = 1.0

    def __init__(self, worker: Worker, clock: IReactorTime, pool: Any) -> None:
        self.worker = worker
        self.clock = clock
        self.pool = pool
        self.pid: int | None = None
        self.exited = False
        self.ended: Deferred[None] = Deferred()
        self._stdout: OutputLogger | None = None
        self._stderr: OutputLogger | None = None
        self._pipe_timer: IDelayedCall | None = None
        #: The process's lineage (set by the pool): what it leaves behind dies with it.
        self.lineage: Lineage | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        # Both streams of every worker of the service share one budget.
        budget = getattr(self.pool, "output_budget", None)
        self._stdout = OutputLogger(self.clock, self.worker.service, self.worker.index,
                                    self.pid, "stdout", budget=budget)
        self._stderr = OutputLogger(self.clock, self.worker.service, self.worker.index,
                                    self.pid, "stderr", budget=budget)
        self.transport.closeStdin()

    def outReceived(self, data: bytes) -> None:
        if self._stdout is not None:
            self._stdout.feed(data)

    def errReceived(self, data: bytes) -> None:
        if self._stderr is not None:
            self._stderr.feed(data)

    def processExited(self, reason: Failure) -> None:
        self.exited = True
        if self.pid is not None:
            # Grandchildren die with the group.
            self.pool.kill_group(self.pid, signal.SIGKILL)
        if self.lineage is not None:
            # And those that left the group (re-parented to the daemon) at the next sweep.
            self.lineage.end()
        self._pipe_timer = self.clock.callLater(self.PIPE_GRACE, self._close_pipes)
        self.pool.process_exited(self.worker, self, reason)

    def _close_pipes(self) -> None:
        self._pipe_timer = None
        if self.transport is not None:
            self.transport.loseConnection()

    def processEnded(self, reason: Failure) -> None:
        if not self.exited:
            # Some reactors report only the end.
            self.processExited(reason)
        if self._pipe_timer is not None and self._pipe_timer.active():
            self._pipe_timer.cancel()
        self._pipe_timer = None
        for stream in (self._stdout, self._stderr):
            if stream is not None:
                stream.flush()
        self.ended.callback(None)
