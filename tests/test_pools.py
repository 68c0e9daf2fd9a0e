"""The pool interface (cgipool/supervisor/interface.py): worker pools and CGI
pools meet the same ``Pool`` Protocol without stand-ins, and say what they
cannot do through its capabilities (``resident``, ``per_request``, ``policy``)
instead of imitating each other."""

from __future__ import annotations

from typing import Any, Protocol

from twisted.trial.unittest import SynchronousTestCase

from cgipool.cgi import CgiPool
from cgipool.config import PoolConfig, WorkersConfig
from cgipool.events import EventLog
from cgipool.health import HealthMonitor
from cgipool.supervisor.interface import PerRequestPool, Pool, WorkerPool, lifecycle_state
from cgipool.supervisor.policy import PoolPolicy
from cgipool.supervisor.pool import ServicePool
from cgipool.supervisor.ports import PortAllocator
from cgipool.supervisor.supervisor import Supervisor
from cgipool.supervisor.unavailable import UnavailablePool
from tests.fakes import FakeProbe, FakeProcessReactor, KillRecorder, service


def members(protocol: type) -> set[str]:
    """The names a Protocol declares, its bases' included."""
    names: set[str] = set()
    for base in protocol.__mro__:
        if not getattr(base, "_is_protocol", False) or base is Protocol:
            continue
        names |= set(base.__dict__.get("__annotations__", {}))
        names |= {n for n in vars(base) if not n.startswith("_")}
    return names


class PoolInterfaceTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.events = EventLog(self.reactor.seconds)

    def worker_pool(self, cls: type[ServicePool] = ServicePool, **overrides: Any) -> ServicePool:
        return cls(service("svc", **overrides), self.reactor, ports=PortAllocator(9000, 9010),
                   events=self.events, probe=FakeProbe(), monitor=HealthMonitor,
                   launcher=["/bin/launch"],
                   kill=KillRecorder(), port_free=lambda p: True)

    def cgi_pool(self, **overrides: Any) -> CgiPool:
        config = service("script", protocol="cgi", command=("/bin/script",), **overrides)
        return CgiPool(config, self.reactor, events=self.events, launcher=["/bin/launch"],
                       kill=KillRecorder())

    def assertMeets(self, pool: object, protocol: type) -> None:
        missing = sorted(n for n in members(protocol) if not hasattr(pool, n))
        self.assertEqual(missing, [], f"{type(pool).__name__} lacks {protocol.__name__}'s")

    def test_every_kind_of_pool_meets_the_pool_protocol(self) -> None:
        self.assertIn("capacity", members(Pool))
        self.assertIn("why_not_ready", members(WorkerPool))
        for pool in (self.worker_pool(), self.worker_pool(UnavailablePool, unavailable="no"),
                     self.cgi_pool()):
            self.assertMeets(pool, Pool)

    def test_a_worker_pool_is_its_own_resident_workers_and_runs_nothing_per_request(
            self) -> None:
        pool = self.worker_pool()
        self.assertMeets(pool, WorkerPool)
        self.assertIs(pool.resident, pool)
        self.assertIsNone(pool.per_request)

    def test_a_cgi_pool_has_no_workers_no_worker_pool_and_no_policy(self) -> None:
        """No stand-ins: a CGI pool says it has none instead of imitating them."""
        pool = self.cgi_pool(workers=WorkersConfig(1, 3))
        self.assertMeets(pool, PerRequestPool)
        self.assertIs(pool.per_request, pool)
        self.assertIsNone(pool.resident)
        self.assertIsNone(pool.policy)
        self.assertEqual(tuple(pool.workers), ())
        self.assertEqual(pool.capacity, (0, 3))
        for imitation in ("ready", "rolling_restart", "roll", "renew", "desired"):
            self.assertFalse(hasattr(pool, imitation), imitation)

    def test_the_shared_states_are_decided_once_for_both_kinds(self) -> None:
        for pool in (self.worker_pool(), self.cgi_pool()):
            self.assertEqual((pool.state, lifecycle_state(pool)), ("stopped", "stopped"))
            pool.start()
            self.assertIsNone(lifecycle_state(pool))
            pool.retire_all("removed")
            self.assertEqual((pool.state, lifecycle_state(pool)), ("removing", "removing"))
        for pool in (self.worker_pool(UnavailablePool, unavailable="no runtime"),
                     self.cgi_pool(unavailable="no runtime")):
            pool.start()
            self.assertEqual(pool.state, "unavailable")
            pool.stop()
            self.assertEqual(pool.state, "stopped")

    def test_the_supervisor_makes_other_kinds_through_the_factories_it_is_given(self) -> None:
        config = PoolConfig(path="pool.yaml", services=(
            service("web"), service("script", protocol="cgi", command=("/bin/script",))))
        with self.assertRaises(ValueError) as caught:
            Supervisor(config, self.reactor, probe=FakeProbe(), monitor=HealthMonitor,
                       launcher=["/bin/launch"])
        self.assertIn("no pool for protocol 'cgi'", str(caught.exception))
        supervisor = Supervisor(config, self.reactor, probe=FakeProbe(),
                                monitor=HealthMonitor, launcher=["/bin/launch"],
                                kill=KillRecorder(),
                                kinds={"cgi": CgiPool})
        web, script = supervisor.pools["web"], supervisor.pools["script"]
        self.assertIsInstance(script, CgiPool)
        self.assertIsInstance(web.policy, PoolPolicy)
        self.assertIs(script.output_budget, supervisor.output.budget("script"))
        self.assertIs(web.output_budget, supervisor.output.budget("web"))
        supervisor.startService()  # a pool without a policy starts and stops too
        self.assertEqual(script.state, "ok")
        supervisor.stopService()
