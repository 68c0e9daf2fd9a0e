"""One service's workers: spawn, watch, restart, scale, drain and stop them.

The pool owns its worker slots and every decision about them; the proxy only
reads :attr:`ServicePool.ready` (the workers in rotation), reports refused
connections through :meth:`ServicePool.connection_refused` and calls a
draining worker's ``drained`` hook when its last request ends.

Changes that must not fail requests replace before they remove: a restart
starts a replacement, waits until it is ready, then drains the old worker
(it finishes its requests, gets no new ones) and retires its slot.
"""

from __future__ import annotations

import os
import random
import signal
from collections.abc import Callable, Sequence, Sized
from typing import Any

from twisted.internet.defer import Deferred, gatherResults, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from cgipool.config import ServiceConfig, expand
from cgipool.events import EventLog
from cgipool.supervisor.backoff import Backoff
from cgipool.supervisor.containment import Containment, new_lineage
from cgipool.supervisor.inputs import (
    InputStamps,
    changed_files,
    describe_change,
    input_files,
)
from cgipool.supervisor.interface import (
    Monitor,
    MonitorFactory,
    Policy,
    Probe,
    lifecycle_state,
)
from cgipool.supervisor.output import OutputBudget
from cgipool.supervisor.ports import PortAllocator, PortsExhausted, port_is_free
from cgipool.supervisor.worker import (
    AfterExit,
    Worker,
    WorkerProcess,
    WorkerState,
    describe_exit,
)

log = Logger(namespace="cgipool.pool")
S = WorkerState


def kill_group(pid: int, sig: int) -> None:
    """Signal a worker's whole process group (it leads its own session).

    Right after spawn the child may not have run ``setsid`` yet, so there is no
    group of that id: signal the process itself, or the signal would be lost.
    """
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            log.warn("cannot signal process {pid}: {error}", pid=pid, error=e)
    except PermissionError as e:
        log.warn("cannot signal process group {pid}: {error}", pid=pid, error=e)


#: A worker stopped within TERM_AGAIN_WINDOW seconds of its spawn gets its
#: SIGTERM again after TERM_AGAIN_AFTER seconds if it is still there.
TERM_AGAIN_WINDOW = 1.0
TERM_AGAIN_AFTER = 0.25


def kill_leftovers(pid: int, sig: int) -> None:
    """Signal what is left of an exited worker's process group.

    The worker itself is reaped, so its pid may already belong to another
    process: never fall back to ``kill(pid)`` here (unlike :func:`kill_group`).
    """
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


class ServicePool:
    """The worker slots of one service: a :class:`~cgipool.supervisor.interface.WorkerPool`."""

    #: Not a pool that runs a program per request (see Pool.per_request).
    per_request = None

    def __init__(
        self,
        config: ServiceConfig,
        reactor: Any,
        *,
        ports: PortAllocator,
        events: EventLog,
        probe: Probe,
        monitor: MonitorFactory,
        launcher: Sequence[str],
        connections_factory: Callable[[Worker], Any] | None = None,
        kill: Callable[[int, int], None] = kill_group,
        rand: Callable[[], float] = random.random,
        port_free: Callable[[int], bool] = port_is_free,
        containment: Containment | None = None,
        output_budget: OutputBudget | None = None,
    ) -> None:
        self.config = config
        #: Marks each process's lineage and kills what it leaves behind (None: off).
        self.containment = containment
        self.reactor = reactor
        self.ports = ports
        self.events = events
        self.probe = probe
        #: Makes each process's health monitor (cgipool.health.HealthMonitor).
        self.monitor = monitor
        self.launcher = list(launcher)
        self.connections_factory = connections_factory
        self._kill = kill
        #: After an exit: the group only (an injected kill, in tests, sees both).
        self._kill_leftovers = kill_leftovers if kill is kill_group else kill
        self._rand = rand
        self._port_free = port_free
        self.workers: list[Worker] = []
        #: Workers in rotation, read by the balancer on every request.
        self.ready: list[Worker] = []
        self.started = False
        self.stopping = False
        #: Removed by a reload: draining away.
        self.removing = False
        self.rolling = False
        #: Another rolling restart is due when the current one ends (its reason).
        self.roll_again: str | None = None
        self._next_index = 0
        #: Requests served by slots that have left the pool.
        self.retired_requests = 0
        #: Processes started after a slot's first one (restarts and replacements).
        self.restarts_total = 0
        self._monitors: dict[Worker, Monitor] = {}
        #: Deferreds waiting for a slot to become ready (True) or fail (False),
        #: and for a slot to leave the pool.
        self._ready_waiters: dict[Worker, list[Deferred[bool]]] = {}
        self._gone_waiters: dict[Worker, list[Deferred[None]]] = {}
        self._base_env = {**os.environ, **config.env, "CGIPOOL_SERVICE": config.name}
        #: Requests waiting for a free worker: the proxy's queue (see ServiceProxy).
        self.waiting: Sized = ()
        #: Called when a worker joins the rotation (the proxy hands it waiting requests).
        self.capacity_added: Callable[[], None] | None = None
        #: The autoscaling/recycling policy of this pool (set by the supervisor).
        self.policy: Policy | None = None
        #: The service's budget of logged output, shared by its workers (None: unlimited).
        self.output_budget = output_budget
        #: Stamps of the input files each worker is spawned from (supervisor/inputs.py).
        self.input_stamps = InputStamps()
        #: Bumped by :meth:`renew`: workers spawned since are the current ones.
        self.generation = 0
        #: The last replacement of a roll that never got ready: (generation, why).
        self.replace_failure: tuple[int, str] | None = None
        #: Rolling restarts begun, and the last one's outcome (shown in the status).
        self.rolls = 0
        #: The workers the rolling restart in progress replaces (or has replaced).
        self._rolling_workers: set[Worker] = set()
        self.last_roll: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def resident(self) -> ServicePool:
        """A worker pool is its own resident workers (see Pool.resident)."""
        return self

    # -- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self.started = True
        for _ in range(self.config.workers.min):
            self.spawn(self._add_slot())

    @property
    def desired(self) -> int:
        """The pool's size: slots that are neither leaving nor on probation."""
        return sum(1 for w in self.workers if not w.retiring and not w.probation)

    def stop(self) -> Deferred[None]:
        """Stop every worker: SIGTERM to each group, SIGKILL after ``stop_timeout``.

        Fires once every process has been reaped and its pipes closed.
        """
        self.stopping = True
        waits = []
        for worker in self.workers:
            _cancel(worker, "restart_timer")
            _cancel(worker, "drain_timer")
            worker.drained = None
            if worker.state is S.BACKOFF:
                worker.transition(S.STOPPED)
            elif worker.alive and worker.process is not None:
                worker.after_exit = AfterExit.STOP
                waits.append(worker.process.ended)
                if worker.state is not S.STOPPING:
                    self._terminate(worker)
        d = gatherResults(waits) if waits else succeed([])
        d.addCallback(lambda _: self._stopped())
        return d

    def _stopped(self) -> None:
        for worker in self.workers:
            if worker.port is not None and not self.config.ports:
                self.ports.release(worker.port)
        for waiters in self._ready_waiters.values():
            for d in waiters:
                d.callback(False)
        self._ready_waiters.clear()
        for waiters in self._gone_waiters.values():
            for d in waiters:
                d.callback(None)
        self._gone_waiters.clear()
        self.events.add("stopped", self.name, None, "all workers stopped")

    def _add_slot(self, probation: bool = False) -> Worker:
        worker = Worker(
            service=self.name,
            index=self._next_index,
            backoff=Backoff(self.config.restart, random=self._rand),
            probation=probation,
        )
        self._next_index += 1
        self.workers.append(worker)
        return worker

    def _remove_slot(self, worker: Worker) -> None:
        """A retired slot leaves the pool; its port is free again."""
        if worker in self.workers:
            self.workers.remove(worker)
        if worker.port is not None and not self.config.ports:
            self.ports.release(worker.port)
        for d in self._ready_waiters.pop(worker, []):
            d.callback(False)
        for d in self._gone_waiters.pop(worker, []):
            d.callback(None)

    # -- spawning -----------------------------------------------------------

    def _assign_port(self, worker: Worker) -> int:
        if self.config.ports:
            taken = {w.port for w in self.workers if w is not worker}
            candidates = ([worker.port] if worker.port is not None else []) + [
                p for p in self.config.ports if p not in taken and p != worker.port]
            foreign = []
            for port in candidates:
                if self._port_free(port):
                    return port
                foreign.append(port)
            if foreign:
                # Spawning would only crash-loop on "address in use": say why instead.
                raise PortsExhausted(
                    f"configured port(s) {', '.join(map(str, foreign))} in use by another "
                    "process; waiting for one to be free")
            raise PortsExhausted(
                f"all {len(self.config.ports)} configured ports are in use by workers")
        if worker.port is not None and self._port_free(worker.port):
            return worker.port
        if worker.port is not None:
            self.ports.release(worker.port)
            self.events.add("port", self.name, worker.index,
                            f"port {worker.port} is in use; taking another", "warn")
            worker.port = None
        return self.ports.allocate()

    def spawn(self, worker: Worker) -> None:
        """Start a process in ``worker``'s slot."""
        worker.restart_timer = None
        if self.stopping:
            return
        try:
            worker.port = self._assign_port(worker)
        except PortsExhausted as e:
            self.events.add("spawn_failed", self.name, worker.index, str(e), "error")
            worker.transition(S.STARTING)
            self._failed(worker)
            return
        argv = [expand(arg, port=worker.port, worker=worker.index)
                for arg in self.config.command]
        env = {**self._base_env, "PORT": str(worker.port),
               "CGIPOOL_WORKER": str(worker.index)}
        process = WorkerProcess(worker, self.reactor, self)
        process.lineage = new_lineage(self.containment, self.name, worker.index, worker.name)
        process.lineage.mark(env)
        worker.transition(S.STARTING)
        worker.after_exit = AfterExit.RESTART_WITH_BACKOFF
        worker.health_failures = 0
        worker.passive_failures = 0
        worker.last_health = None
        worker.recycling = None
        recycle = self.config.recycle
        worker.recycle_at = (
            worker.requests + max(1, round(recycle.max_requests * self._jitter()))
            if recycle.max_requests else None)
        worker.lifetime = (recycle.max_lifetime * self._jitter()
                           if recycle.max_lifetime else None)
        # Before the exec: a file changed after this is seen as changed (a restart
        # too many at worst), never missed.
        worker.inputs = self.input_stamps.stamps(input_files(self.config))
        worker.generation = self.generation
        try:
            self.reactor.spawnProcess(
                process, self.launcher[0], [*self.launcher, *argv], env=env,
                path=self.config.cwd, childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError as e:
            process.lineage.end()
            self.events.add("spawn_failed", self.name, worker.index,
                            f"cannot start {argv[0]}: {e}", "error")
            self._failed(worker)
            return
        process.lineage.spawned(process.pid)
        worker.process = process
        worker.pid = process.pid
        worker.started_at = self.reactor.seconds()
        worker.ready_at = None
        if self.connections_factory is not None:
            worker.connections = self.connections_factory(worker)
        monitor = self.monitor(self.reactor, self.probe, worker, self.config.health, self)
        self._monitors[worker] = monitor
        monitor.start(self.config.start_timeout)
        self.events.add("spawn", self.name, worker.index,
                        f"started pid {worker.pid} on port {worker.port}",
                        pid=worker.pid, port=worker.port)

    def _jitter(self) -> float:
        """A factor in (1 - jitter, 1]: recycling limits differ between workers."""
        return 1.0 - self.config.recycle.jitter * self._rand()

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def capacity(self) -> tuple[int, int]:
        """``(ready workers, worker slots)``."""
        return len(self.ready), len(self.workers)

    @property
    def accepting(self) -> bool:
        """Whether a request may wait for a worker: one is on its way (not a crash
        loop, and not a starting worker that answers its health check wrongly: a
        handler not written yet, a wrong health path; it would wait in vain)."""
        if self.stopping or not self.started:
            return False
        return bool(self.ready) or any(
            (w.state is S.STARTING and not _answers_wrongly(w)) or w.state is S.UNHEALTHY
            or (w.state is S.BACKOFF and not w.backoff.failing) for w in self.workers)

    # -- health verdicts (HealthListener) ------------------------------------

    def health_passed(self, worker: Worker) -> None:
        if worker.state not in (S.STARTING, S.UNHEALTHY):
            return
        was_starting = worker.state is S.STARTING
        worker.transition(S.READY)
        self.ready.append(worker)
        if self.capacity_added is not None:
            self.capacity_added()
        now = self.reactor.seconds()
        if was_starting:
            worker.ready_at = now
            worker.probation = False
            startup_ms = round((now - (worker.started_at or now)) * 1000, 1)
            worker.stable_timer = self.reactor.callLater(
                self.config.restart.reset_after, _reset_backoff, worker)
            self.events.add("ready", self.name, worker.index,
                            f"pid {worker.pid} ready in {startup_ms} ms",
                            pid=worker.pid, startup_ms=startup_ms)
            for d in self._ready_waiters.pop(worker, []):
                d.callback(True)
        else:
            self.events.add("recovered", self.name, worker.index,
                            f"pid {worker.pid} passes health checks again; back in rotation",
                            pid=worker.pid)

    def health_failed(self, worker: Worker, error: str) -> None:
        fall = self.config.health.fall
        self.events.add(
            "health_failed", self.name, worker.index,
            f"health check failed ({error}), {worker.health_failures}/{fall}", "warn",
            pid=worker.pid, error=error,
        )
        if worker.health_failures >= fall:
            self.restart_worker(worker, f"{fall} consecutive failed health checks")

    def startup_timed_out(self, worker: Worker) -> None:
        self.restart_worker(
            worker,
            f"not ready within start_timeout={self.config.start_timeout:g}s "
            f"(last check: {worker.last_health.error if worker.last_health else 'none'})",
        )

    # -- request accounting (from the proxy: once per request, keep it cheap) ---

    def acquire(self, worker: Worker) -> None:
        """A request is being sent to ``worker``: one more in flight.  Plain
        attribute updates only (no Deferred, no log): this is the hot path."""
        worker.in_flight += 1

    def release(self, worker: Worker, served: bool) -> None:
        """A request :meth:`acquire` counted on ``worker`` ended (once per acquire).

        ``served``: the worker answered in full, so it is counted (requests,
        recycle.max_requests) and its passive failures start again from 0; a
        failure, timeout, client gone or stop passes False (the failure itself
        is reported by :meth:`request_failed` and the like).  A draining
        worker's last request ends its drain.
        """
        if served:
            worker.passive_failures = 0
            requests = worker.requests = worker.requests + 1
            recycle_at = worker.recycle_at
            if recycle_at is not None and requests >= recycle_at and not worker.recycling:
                self.recycle(worker, f"served {requests} requests (recycle.max_requests)")
        in_flight = worker.in_flight = worker.in_flight - 1
        if not in_flight and worker.drained is not None:
            worker.drained(worker)  # a draining worker's last request ended

    # -- passive health (from the proxy) ---------------------------------------

    def connection_refused(self, worker: Worker) -> None:
        """The proxy could not connect: out of rotation until a probe passes."""
        if worker.state is not S.READY:
            return
        worker.transition(S.UNHEALTHY)
        self._leave_rotation(worker)
        self.events.add("unhealthy", self.name, worker.index,
                        f"pid {worker.pid} refused a connection; out of rotation", "warn",
                        pid=worker.pid)
        monitor = self._monitors.get(worker)
        if monitor is not None:
            monitor.check_soon()

    def request_failed(self, worker: Worker, kind: str, detail: str) -> None:
        """A proxied request failed at the worker (no or broken response).

        ``health.passive_fall`` such failures in a row take the worker out of
        rotation and restart it, without waiting for the next probe.
        """
        worker.passive_failures += 1
        fall = self.config.health.passive_fall
        if worker.passive_failures < fall or worker.state is not S.READY:
            return
        self.events.add("unhealthy", self.name, worker.index,
                        f"pid {worker.pid}: {worker.passive_failures} failed requests in a row "
                        f"(last: {kind}: {detail})", "warn", pid=worker.pid, failure=kind)
        self.restart_worker(worker, f"{fall} failed requests in a row")

    def request_timed_out(self, worker: Worker, request: str) -> None:
        """A request ran past request_timeout: the worker is stuck; recycle it."""
        self.events.add("request_timeout", self.name, worker.index,
                        f"pid {worker.pid} did not answer {request} within "
                        f"request_timeout={self.config.request_timeout:g}s", "warn",
                        pid=worker.pid, request=request)
        self.recycle(worker, f"a request ran past request_timeout ({request})")

    def recycle(self, worker: Worker, reason: str) -> bool:
        """Replace ``worker`` gracefully (replacement first, then drain); once."""
        if (self.stopping or worker.recycling or worker.retiring
                or worker not in self.workers or not worker.alive):
            return False
        worker.recycling = reason
        self.events.add("recycle", self.name, worker.index,
                        f"recycling pid {worker.pid}: {reason}", pid=worker.pid, reason=reason)

        def done(ok: bool) -> None:
            if not ok and worker in self.workers and not worker.retiring:
                worker.recycling = None  # the replacement failed: it keeps serving
        self.replace_worker(worker, f"recycle: {reason}").addCallback(done)
        return True

    # -- restarts and exits ----------------------------------------------------

    def restart_worker(self, worker: Worker, reason: str, planned: bool = False) -> bool:
        """Replace the worker's process: SIGTERM now, a new process after it exits.

        ``planned`` restarts (admin actions) respawn at once; failures go through
        the backoff.  Returns False when there is no process to restart.
        """
        if self.stopping or not worker.alive or worker.state is S.STOPPING:
            return False
        worker.after_exit = AfterExit.RESTART_NOW if planned else AfterExit.RESTART_WITH_BACKOFF
        self.events.add("restart", self.name, worker.index,
                        f"restarting pid {worker.pid}: {reason}",
                        "info" if planned else "warn", pid=worker.pid)
        self._terminate(worker)
        return True

    def _terminate(self, worker: Worker) -> None:
        self._leave_rotation(worker)
        self._stop_monitor(worker)
        worker.transition(S.STOPPING)
        assert worker.pid is not None
        self._kill(worker.pid, signal.SIGTERM)
        worker.kill_timer = self.reactor.callLater(
            self.config.stop_timeout, self._kill_hard, worker, worker.pid)
        started = worker.started_at
        if started is not None and self.reactor.seconds() - started < TERM_AGAIN_WINDOW:
            # A process this young may still be in the launcher (fork, setpriv,
            # setsid, exec), where a signal can be lost: say it once more.
            worker.term_timer = self.reactor.callLater(
                TERM_AGAIN_AFTER, self._term_again, worker, worker.pid)

    def _term_again(self, worker: Worker, pid: int) -> None:
        worker.term_timer = None
        if worker.pid == pid and worker.state is S.STOPPING:
            self._kill(pid, signal.SIGTERM)

    def _kill_hard(self, worker: Worker, pid: int) -> None:
        worker.kill_timer = None
        if worker.pid != pid:
            return
        self.events.add("kill", self.name, worker.index,
                        f"pid {pid} ignored SIGTERM for {self.config.stop_timeout:g}s; "
                        f"sending SIGKILL", "warn", pid=pid)
        self._kill(pid, signal.SIGKILL)

    def kill_group(self, pid: int, sig: int) -> None:
        """Used by the process protocol to clean up after its (reaped) process."""
        self._kill_leftovers(pid, sig)

    def process_exited(self, worker: Worker, process: WorkerProcess, reason: Failure) -> None:
        if worker.process is not process:
            return
        code, sig, text = describe_exit(reason)
        pid = worker.pid
        expected = worker.state is S.STOPPING
        worker.process = None
        worker.pid = None
        worker.last_exit = text
        for timer in ("kill_timer", "stable_timer", "term_timer"):
            _cancel(worker, timer)
        self._stop_monitor(worker)
        self._leave_rotation(worker)
        if worker.connections is not None:
            worker.connections.close()
            worker.connections = None
        fields = {"pid": pid, "exit_code": code, "signal": sig}
        _cancel(worker, "drain_timer")
        worker.drained = None
        if worker.retiring and not self.stopping:
            worker.transition(S.STOPPED)
            self.events.add("retired", self.name, worker.index,
                            f"pid {pid} retired ({text})", **fields)
            self._retired(worker)
        elif self.stopping or worker.after_exit is AfterExit.STOP:
            worker.transition(S.STOPPED)
            self.events.add("exit", self.name, worker.index, f"pid {pid} stopped ({text})",
                            **fields)
        elif worker.after_exit is AfterExit.RESTART_NOW:
            self.events.add("exit", self.name, worker.index, f"pid {pid} exited ({text})",
                            **fields)
            worker.restarts += 1
            self.restarts_total += 1
            self.spawn(worker)
        else:
            if not expected:
                self.events.add("crash", self.name, worker.index,
                                f"pid {pid} exited unexpectedly ({text})", "error", **fields)
            self._failed(worker, killed=sig == signal.SIGKILL)

    def _failed(self, worker: Worker, killed: bool = False) -> None:
        """The slot's process failed: wait out the backoff, then respawn.

        A replacement that never got ready gives up instead: the worker it was
        to replace is still serving.
        """
        if worker.probation:
            worker.transition(S.STOPPED)
            worker.retiring = True
            why = (f"replacement did not start ({worker.last_exit or 'no process'}); "
                   "the old worker keeps serving")
            self.replace_failure = (worker.generation, why)
            self.events.add("replace_failed", self.name, worker.index, why, "error")
            self._retired(worker)
            return
        now = self.reactor.seconds()
        if worker.ready_at is not None and (
                killed or worker.started_at is not None
                and now - worker.started_at >= self.config.restart.min_uptime):
            # It served, and for a while or until something outside killed it
            # (SIGKILL: the OOM killer, an operator): not a crash loop, so no
            # growing delay.  Killed before it was ever ready still counts.
            worker.backoff.reset()
        delay = worker.backoff.next_delay()
        worker.transition(S.BACKOFF)
        worker.restart_timer = self.reactor.callLater(delay, self._respawn, worker)
        if worker.backoff.failing:
            self.events.add(
                "failing", self.name, worker.index,
                f"{worker.backoff.failures} failures in a row; retrying in {delay:.2f}s",
                "error", failures=worker.backoff.failures, delay=round(delay, 3),
            )
        else:
            self.events.add("backoff", self.name, worker.index,
                            f"restarting in {delay:.2f}s", delay=round(delay, 3))

    def _respawn(self, worker: Worker) -> None:
        worker.restarts += 1
        self.restarts_total += 1
        self.spawn(worker)

    # -- resizing, draining, replacing -------------------------------------------

    def scale_to(self, size: int, reason: str) -> int:
        """Grow or shrink the pool to ``size`` workers (within min..max).

        Growing spawns new slots; shrinking drains the least useful workers
        first (not ready, then fewest requests in flight, then newest).
        Returns the previous size.
        """
        low, high = self.config.workers.min, self.config.workers.max
        if not low <= size <= high:
            raise ValueError(f"size {size} is outside workers.min..max ({low}..{high})")
        before = self.desired
        if size == before or self.stopping:
            return before
        self.events.add("scale", self.name, None, f"{before} -> {size} workers: {reason}",
                        before=before, after=size, reason=reason)
        if size > before:
            for _ in range(size - before):
                self.spawn(self._add_slot())
        else:
            order = {S.BACKOFF: 0, S.STOPPED: 0, S.STARTING: 1, S.UNHEALTHY: 2, S.READY: 3}
            candidates = [w for w in self.workers if not w.retiring and not w.probation]
            candidates.sort(key=lambda w: (order.get(w.state, 4), w.in_flight, -w.index))
            for worker in candidates[:before - size]:
                self._retire(worker, f"scaling in ({reason})")
        return before

    def drain_worker(self, worker: Worker, reason: str) -> bool:
        """Take ``worker`` out of rotation, let its requests finish, retire it.

        The pool shrinks by one, unless that would go below ``workers.min``:
        then a new worker takes its place.  False if it is already leaving.
        """
        if self.stopping or worker.retiring or worker not in self.workers:
            return False
        replace = self.desired - 1 < self.config.workers.min
        self._retire(worker, reason)
        if replace:
            self.spawn(self._add_slot())
        return True

    def replace_worker(self, old: Worker, reason: str) -> Deferred[bool]:
        """Restart without failing a request: a replacement first, then drain ``old``.

        Fires True once the replacement is ready and ``old`` has left the pool;
        False if the replacement did not start (``old`` keeps serving).
        """
        if self.stopping or old.retiring or old not in self.workers:
            return succeed(False)
        if not old.alive:
            # Nothing is serving from this slot: a fresh start is the restart.
            _cancel(old, "restart_timer")
            old.backoff.reset()
            if old.state is S.BACKOFF:
                self._respawn(old)
            return self.wait_ready(old)
        self.events.add("replace", self.name, old.index,
                        f"replacing pid {old.pid}: {reason}", pid=old.pid, reason=reason)
        new = self._add_slot(probation=True)
        try:
            new.port = self._assign_port(new)
        except PortsExhausted:
            # No port for a second process: restart in place.
            self._remove_slot(new)
            self.restart_worker(old, f"{reason} (in place: no spare port)", planned=True)
            return self.wait_ready(old)
        self.restarts_total += 1
        self.spawn(new)
        result: Deferred[bool] = Deferred()

        def ready(ok: bool) -> None:
            if not ok:
                result.callback(False)
                return
            if old in self.workers and not old.retiring:
                self._retire(old, f"replaced by {new.name} (pid {new.pid})")
            self.wait_gone(old).addCallback(lambda _: result.callback(True))

        self.wait_ready(new).addCallback(ready)
        return result

    def rolling_restart(self, reason: str,
                        workers: Sequence[Worker] | None = None) -> Deferred[bool]:
        """Replace every worker (or those of ``workers``), one at a time; stops at
        the first failure.  ``last_roll`` records its outcome for the status."""
        if self.rolling:
            raise RuntimeError(f"a rolling restart of {self.name!r} is already running")
        self.rolling = True
        todo = [w for w in (self.workers if workers is None else workers)
                if w in self.workers and not w.retiring and not w.probation]
        self.events.add("rolling_restart", self.name, None,
                        f"rolling restart of {len(todo)} workers: {reason}", reason=reason)
        result: Deferred[bool] = Deferred()
        self.rolls += 1
        self._rolling_workers = set(todo)
        record = self.last_roll = {
            "id": self.rolls, "reason": reason, "workers": len(todo),
            "old_pids": [w.pid for w in todo if w.pid is not None],
            "started_at": self.reactor.seconds(), "finished_at": None, "ok": None, "pids": None}

        def step(ok: bool) -> None:
            while ok and todo:
                old = todo.pop(0)
                if old in self.workers and not old.retiring:
                    self.replace_worker(old, f"rolling restart ({reason})").addCallback(step)
                    return
            self.rolling = False
            self._rolling_workers = set()
            record["finished_at"] = self.reactor.seconds()
            record["ok"] = ok and not self.stopping
            record["pids"] = [w.pid for w in self.workers if not w.retiring and w.pid]
            if ok and not self.stopping:
                self.events.add("rolling_restart_done", self.name, None,
                                "rolling restart finished")
            else:
                self.events.add("rolling_restart_failed", self.name, None,
                                "rolling restart stopped: a replacement did not start",
                                "error")
            result.callback(ok and not self.stopping)
            again, self.roll_again = self.roll_again, None
            if again is not None and ok and not self.stopping:
                self.rolling_restart(again)

        step(True)
        return result

    def roll(self, reason: str, workers: Sequence[Worker] | None = None) -> None:
        """A rolling restart now, or right after the one in progress (a reload
        during a rolling restart must still reach the workers it already replaced)."""
        if self.rolling:
            self.roll_again = reason
        else:
            self.rolling_restart(reason, workers)

    # -- new processes after a reload (changed settings or input files) --------------

    def stale_inputs(self, config: ServiceConfig | None = None) -> tuple[list[Worker], str]:
        """The workers whose input files (of ``config``, default the pool's) changed
        since their spawn, and what changed (``executable build/search.cgi changed``)."""
        config = config if config is not None else self.config
        kinds = input_files(config)
        now = self.input_stamps.stamps(kinds)
        stale: list[Worker] = []
        changed: list[str] = []
        # A file newly listed in `watch` counts from this reload on, not as a change.
        rebase = config.watch != self.config.watch
        for worker in self.workers:
            if worker.retiring or worker.inputs is None:
                continue
            if rebase:
                worker.inputs = {**{p: s for p, s in now.items() if p not in worker.inputs},
                                 **worker.inputs}
            files = changed_files(worker.inputs, now)
            if files:
                stale.append(worker)
                changed += [f for f in files if f not in changed]
        return stale, describe_change(changed, kinds, config.cwd)

    def renew(self, reason: str, workers: Sequence[Worker] | None = None) -> None:
        """New processes for ``workers`` (default: all), without failing a request:
        those not serving yet restart now — a slot waiting out its backoff retries
        at once, with its backoff reset (the fix may be in) — and the serving ones
        roll (a replacement ready before each drains)."""
        self.generation += 1
        serving = []
        for worker in list(self.workers if workers is None else workers):
            if worker not in self.workers or worker.retiring or self.stopping:
                continue
            if worker.state is S.BACKOFF:
                _cancel(worker, "restart_timer")
                worker.backoff.reset()
                self.events.add("retry", self.name, worker.index,
                                f"retrying now instead of after the backoff: {reason}")
                self._respawn(worker)
            elif worker.state is S.STARTING:
                self.restart_worker(worker, f"{reason} (not serving yet)", planned=True)
            elif (worker.state is S.STOPPING
                  and worker.after_exit is AfterExit.RESTART_WITH_BACKOFF):
                worker.after_exit = AfterExit.RESTART_NOW
                worker.backoff.reset()
            elif worker.state in (S.READY, S.UNHEALTHY):
                serving.append(worker)
        if self.rolling and workers is not None:
            # New files: the roll in progress replaces these from them (a replacement
            # already started from the old files is stale too: restarted above).
            serving = [w for w in serving if w not in self._rolling_workers]
        if serving:
            self.roll(reason, serving)

    def current_ready(self) -> bool:
        """Whether a worker spawned since the last :meth:`renew` is in rotation."""
        return any(w.generation == self.generation for w in self.ready)

    def why_not_ready(self) -> str:
        """Why no current worker is ready: the health check's error, the last
        exit of a crashing one, a roll whose replacement failed, or that none
        has answered yet."""
        failure = self.replace_failure
        if failure is not None and failure[0] == self.generation and not any(
                w.generation == self.generation and not w.retiring for w in self.workers):
            return f"rolling failed: {failure[1]}"
        current = [w for w in self.workers
                   if w.generation == self.generation and not w.retiring] or [
                   w for w in self.workers if not w.retiring]
        for worker in current:
            health = worker.last_health
            if worker.state is S.STARTING and health is not None and not health.ok:
                return f"health check failing: {health.error}"
        for worker in current:
            if worker.state is S.BACKOFF or (worker.state is S.STARTING and worker.last_exit):
                crash = "crash looping" if worker.backoff.failing else "exited"
                return f"{crash}: {worker.last_exit or 'did not start'}, restarting"
        if any(w.state is S.STARTING for w in current):
            return (f"no answer to the health check ({self.config.health.path}) yet; "
                    f"start_timeout is {self.config.start_timeout:g}s")
        return "no worker ready"

    def reconfigure(self, config: ServiceConfig) -> None:
        """Take a reloaded configuration: new limits apply at once, a new command or
        environment with the next process (a rolling restart makes that now)."""
        self.config = config
        self._base_env = {**os.environ, **config.env, "CGIPOOL_SERVICE": config.name}
        low, high = config.workers.min, config.workers.max
        desired = self.desired
        if desired < low:
            self.scale_to(low, "reload: workers.min is now %d" % low)
        elif desired > high:
            self.scale_to(high, "reload: workers.max is now %d" % high)

    def retire_all(self, reason: str) -> Deferred[list[None]]:
        """Every slot leaves (drained first); fires when all are gone."""
        self.removing = True
        workers = list(self.workers)
        for worker in workers:
            if not worker.retiring:
                self._retire(worker, reason)
        return gatherResults([self.wait_gone(w) for w in workers])

    def wait_ready(self, worker: Worker) -> Deferred[bool]:
        """Fires True when ``worker`` is next ready, False if its slot fails or leaves."""
        if worker.state is S.READY:
            return succeed(True)
        if worker not in self.workers or self.stopping:
            return succeed(False)
        d: Deferred[bool] = Deferred()
        self._ready_waiters.setdefault(worker, []).append(d)
        return d

    def wait_gone(self, worker: Worker) -> Deferred[None]:
        """Fires when ``worker``'s slot has left the pool."""
        if worker not in self.workers:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._gone_waiters.setdefault(worker, []).append(d)
        return d

    def _retire(self, worker: Worker, reason: str) -> None:
        """The slot leaves the pool: drained first if it is serving."""
        worker.retiring = True
        _cancel(worker, "restart_timer")
        for d in self._ready_waiters.pop(worker, []):
            d.callback(False)
        if worker.state in (S.READY, S.UNHEALTHY):
            worker.transition(S.DRAINING)
            self._leave_rotation(worker)
            self._stop_monitor(worker)
            self.events.add("drain", self.name, worker.index,
                            f"draining pid {worker.pid} ({worker.in_flight} in flight): {reason}",
                            pid=worker.pid, in_flight=worker.in_flight)
            if worker.in_flight == 0:
                self._terminate(worker)
            else:
                worker.drained = self._drained
                worker.drain_timer = self.reactor.callLater(
                    self.config.request_timeout, self._drain_timed_out, worker)
        elif worker.state is S.STARTING:
            self.events.add("drain", self.name, worker.index,
                            f"stopping pid {worker.pid} before it served: {reason}",
                            pid=worker.pid)
            self._terminate(worker)
        elif worker.state in (S.BACKOFF, S.STOPPED):
            if worker.state is S.BACKOFF:
                worker.transition(S.STOPPED)
            self.events.add("retired", self.name, worker.index, f"slot removed: {reason}")
            self._retired(worker)
        # STOPPING: it is exiting anyway; `retiring` makes the exit final.

    def _drained(self, worker: Worker) -> None:
        """Called by the proxy when a draining worker's last request ended."""
        worker.drained = None
        _cancel(worker, "drain_timer")
        if worker.state is S.DRAINING:
            self._terminate(worker)

    def _drain_timed_out(self, worker: Worker) -> None:
        worker.drain_timer = None
        worker.drained = None
        if worker.state is S.DRAINING:
            self.events.add("drain_timeout", self.name, worker.index,
                            f"pid {worker.pid} still had {worker.in_flight} requests after "
                            f"request_timeout={self.config.request_timeout:g}s; stopping it",
                            "warn", pid=worker.pid)
            self._terminate(worker)

    def _retired(self, worker: Worker) -> None:
        self.retired_requests += worker.requests
        self._remove_slot(worker)

    def _leave_rotation(self, worker: Worker) -> None:
        try:
            self.ready.remove(worker)
        except ValueError:
            pass

    def _stop_monitor(self, worker: Worker) -> None:
        monitor = self._monitors.pop(worker, None)
        if monitor is not None:
            monitor.stop()

    # -- reading -------------------------------------------------------------

    @property
    def state(self) -> str:
        """``ok``, ``degraded``, ``failing`` or ``starting`` while it runs (else
        :func:`~cgipool.supervisor.interface.lifecycle_state`'s)."""
        shared = lifecycle_state(self)
        if shared is not None:
            return shared
        ready = len(self.ready)
        if ready and ready >= self.desired:
            return "ok"
        if ready:
            return "degraded"
        if any(w.backoff.failing for w in self.workers):
            return "failing"
        return "starting"

    def status(self, now: float) -> dict[str, Any]:
        cfg = self.config
        return {
            "name": cfg.name,
            "route": cfg.route,
            "state": self.state,
            "description": cfg.description,
            "language": cfg.language,
            "examples": [e.as_status() for e in cfg.examples],
            "size": {"min": cfg.workers.min, "max": cfg.workers.max,
                     "desired": self.desired, "ready": len(self.ready)},
            "rolling_restart": self.rolling,
            "last_rolling_restart": self.last_roll,
            "concurrency": cfg.concurrency,
            "queue": {"length": self.queue_length, "max": cfg.queue.max,
                      "timeout": cfg.queue.timeout},
            "autoscale": self.policy.status() if self.policy is not None else None,
            "restarts_total": self.restarts_total,
            "requests": self.retired_requests + sum(w.requests for w in self.workers),
            "in_flight": sum(w.in_flight for w in self.workers),
            "workers": [w.as_dict(now) for w in self.workers],
        }


def _answers_wrongly(worker: Worker) -> bool:
    """A starting worker whose last probe got an HTTP answer other than 503 (a
    503 is how many services say "warming up"): it listens, but is not right."""
    health = worker.last_health
    return (health is not None and not health.ok and health.error is not None
            and health.error.startswith("HTTP ") and health.error != "HTTP 503")


def _cancel(worker: Worker, attribute: str) -> None:
    timer = getattr(worker, attribute)
    if timer is not None and timer.active():
        timer.cancel()
    setattr(worker, attribute, None)


def _reset_backoff(worker: Worker) -> None:
    worker.stable_timer = None
    worker.backoff.reset()
