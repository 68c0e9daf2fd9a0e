"""The supervisor service: every service pool of the configuration."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults

from cgipool.config import PoolConfig, ServiceConfig
from cgipool.events import EventLog
from cgipool.supervisor.containment import Containment
from cgipool.supervisor.interface import MonitorFactory, Pool, Probe
from cgipool.supervisor.launch import default_launcher
from cgipool.supervisor.output import OutputBudget, OutputBudgets
from cgipool.supervisor.policy import PoolPolicy, process_rss
from cgipool.supervisor.pool import ServicePool, kill_group
from cgipool.supervisor.ports import PortAllocator
from cgipool.supervisor.unavailable import UnavailablePool
from cgipool.supervisor.worker import Worker


class PoolFactory(Protocol):
    """Makes the pool of a service whose ``protocol`` is not ``http``
    (:class:`cgipool.cgi.CgiPool` for ``cgi``)."""

    def __call__(self, config: ServiceConfig, reactor: Any, *, events: EventLog,
                 launcher: Sequence[str], kill: Callable[[int, int], None],
                 containment: Containment | None,
                 output_budget: OutputBudget | None) -> Pool: ...


class Supervisor(Service):
    """Starts the pools with the daemon; stops them, waiting for every process.

    ``contain`` turns on :mod:`cgipool.supervisor.containment` (the daemon as a
    subreaper, leftovers killed): ``"ours"`` touches only processes this daemon
    marked (safe inside a test runner's process), ``"all"`` also kills unmarked
    orphans (``twistd cgipool``); None (unit tests on a fake reactor): off.

    ``kinds`` makes the pools of services whose protocol is not ``http``, by
    protocol (``tap.build`` gives ``{"cgi": CgiPool}``): the supervisor runs
    worker pools itself and knows the other kinds only as a :class:`Pool`.
    ``probe`` and ``monitor`` check the workers' health (``tap.build`` gives
    :class:`cgipool.health.HttpProbe` and :class:`~cgipool.health.HealthMonitor`;
    tests a fake probe).
    """

    name = "supervisor"

    def __init__(
        self,
        config: PoolConfig,
        reactor: Any,
        *,
        probe: Probe,
        monitor: MonitorFactory,
        launcher: Sequence[str] | None = None,
        connections_factory: Callable[[Worker], Any] | None = None,
        kill: Callable[[int, int], None] = kill_group,
        rss: Callable[[int], int | None] = process_rss,
        contain: str | None = None,
        kinds: Mapping[str, PoolFactory] | None = None,
        **pool_options: Any,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.events = EventLog(reactor.seconds)
        if contain not in (None, "ours", "all"):
            raise ValueError(f"contain must be None, 'ours' or 'all', not {contain!r}")
        self.containment = None if contain is None else Containment(
            reactor, self.events, strangers_hostile=contain == "all")
        explicit = {port for svc in config.services for port in svc.ports}
        self.ports = PortAllocator(*config.port_range, reserved=explicit)
        self.started_at: float | None = None
        launcher = list(launcher) if launcher is not None else default_launcher()
        self.kinds: Mapping[str, PoolFactory] = dict(kinds or {})
        self._launcher = launcher
        self._kill = kill
        self._pool_args = dict(probe=probe, monitor=monitor, launcher=launcher,
                               connections_factory=connections_factory, kill=kill,
                               containment=self.containment, **pool_options)
        #: Worker RSS for recycle.max_rss: psutil directly, or the metrics
        #: sampler's last sample once the daemon wires it (use_sampler).
        self.rss = rss
        #: Each service's budget of logged worker/script output (supervisor/output.py).
        self.output = OutputBudgets(reactor)
        #: Pools removed by a reload, draining; stopped with the daemon if still here.
        self.leaving: list[Pool] = []
        self.pools: dict[str, Pool] = {
            svc.name: self._make_pool(svc) for svc in config.services}

    def startService(self) -> None:
        super().startService()
        self.started_at = self.reactor.seconds()
        if self.containment is not None:
            self.containment.start()  # a subreaper before the first spawn
        for pool in self.pools.values():
            self._start(pool)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        pools = [*self.pools.values(), *self.leaving]
        for pool in pools:
            if pool.policy is not None:
                pool.policy.stop()
        d = gatherResults([pool.stop() for pool in pools])
        if self.containment is not None:
            # Then whatever they left behind: no descendant outlives the daemon.
            d.addCallback(lambda _: self.containment.stop())
        d.addCallback(lambda _: self.output.stop())  # the last drop summaries, no timer left
        return d

    # -- reload: pools come and go while the daemon runs -------------------------------

    def _make_pool(self, config: ServiceConfig) -> Pool:
        # One budget of logged output for all the service's processes.
        budget = self.output.budget(config.name)
        if config.protocol != "http":
            factory = self.kinds.get(config.protocol)
            if factory is None:
                raise ValueError(f"service {config.name!r}: no pool for protocol "
                                 f"{config.protocol!r} (kinds: {sorted(self.kinds)})")
            return factory(config, self.reactor, events=self.events, launcher=self._launcher,
                           kill=self._kill, containment=self.containment,
                           output_budget=budget)
        cls = UnavailablePool if config.unavailable else ServicePool
        pool = cls(config, self.reactor, ports=self.ports, events=self.events,
                   output_budget=budget, **self._pool_args)
        pool.policy = PoolPolicy(pool, self.reactor, self.worker_rss)
        return pool

    @staticmethod
    def _start(pool: Pool) -> None:
        pool.start()
        if pool.policy is not None:
            pool.policy.start()

    def worker_rss(self, pid: int) -> int | None:
        """Resident memory of a worker process in bytes (None when unknown)."""
        return self.rss(pid)

    def use_sampler(self, sampler: Any) -> None:
        """Read worker RSS from ``sampler`` (a ProcessSampler, refreshed every
        second by the metrics service) instead of asking psutil again."""

        def sampled(pid: int) -> int | None:
            stats = sampler.stats(pid)
            return None if stats is None else stats["rss"]

        self.rss = sampled

    def add_pool(self, config: ServiceConfig) -> Pool:
        """A new service's pool; started at once when the daemon runs."""
        if config.name in self.pools:
            raise ValueError(f"service {config.name!r} already has a pool")
        for port in config.ports:
            self.ports.reserve(port)
        pool = self.pools[config.name] = self._make_pool(config)
        if self.running:
            self._start(pool)
        return pool

    def remove_pool(self, name: str, reason: str) -> Deferred[None]:
        """Take a service away: its workers drain (requests in flight finish), then stop."""
        pool = self.pools.pop(name)
        self.leaving.append(pool)  # by pool: the name may come back before it is gone
        if pool.policy is not None:
            pool.policy.stop()
        d = pool.retire_all(reason)

        def gone(_: object) -> None:
            self.leaving.remove(pool)
            still = {p for current in self.pools.values() for p in current.config.ports}
            for port in pool.config.ports:
                if port not in still:  # a pool added since may have claimed it again
                    self.ports.release(port)
        d.addCallback(gone)
        return d

    def status(self) -> dict[str, Any]:
        now = self.reactor.seconds()
        services = [pool.status(now) for pool in self.pools.values()]
        return {
            "started_at": self.started_at,
            "uptime": None if self.started_at is None else round(now - self.started_at, 3),
            "workers": {
                "ready": sum(s["size"]["ready"] for s in services),
                "total": sum(len(s["workers"]) for s in services),
            },
            "services": services,
        }
