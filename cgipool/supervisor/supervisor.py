"""The supervisor service: every service pool of the configuration."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, gatherResults

from cgipool.config import PoolConfig
from cgipool.events import EventLog
from cgipool.health import HttpProbe, Probe
from cgipool.supervisor.launch import default_launcher
from cgipool.supervisor.policy import PoolPolicy, process_rss
from cgipool.supervisor.pool import ServicePool, kill_group
from cgipool.supervisor.ports import PortAllocator
from cgipool.supervisor.unavailable import UnavailablePool
from cgipool.supervisor.worker import Worker


class Supervisor(Service):
    """Starts the pools with the daemon; stops them, waiting for every process."""

    name = "supervisor"

    def __init__(
        self,
        config: PoolConfig,
        reactor: Any,
        *,
        probe: Probe | None = None,
        launcher: Sequence[str] | None = None,
        connections_factory: Callable[[Worker], Any] | None = None,
        kill: Callable[[int, int], None] = kill_group,
        rss: Callable[[int], int | None] = process_rss,
        **pool_options: Any,
    ) -> None:
        self.config = config
        self.reactor = reactor
        self.events = EventLog(reactor.seconds)
        explicit = {port for svc in config.services for port in svc.ports}
        self.ports = PortAllocator(*config.port_range, reserved=explicit)
        self.started_at: float | None = None
        probe = probe if probe is not None else HttpProbe(reactor)
        launcher = list(launcher) if launcher is not None else default_launcher()
        self.pools: dict[str, ServicePool] = {
            svc.name: (UnavailablePool if svc.unavailable else ServicePool)(
                svc, reactor, ports=self.ports, events=self.events, probe=probe,
                launcher=launcher, connections_factory=connections_factory, kill=kill,
                **pool_options,
            )
            for svc in config.services
        }
        for pool in self.pools.values():
            pool.policy = PoolPolicy(pool, reactor, rss)

    def startService(self) -> None:
        super().startService()
        self.started_at = self.reactor.seconds()
        for pool in self.pools.values():
            pool.start()
            pool.policy.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        for pool in self.pools.values():
            pool.policy.stop()
        d = gatherResults([pool.stop() for pool in self.pools.values()])
        d.addCallback(lambda _: None)
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
