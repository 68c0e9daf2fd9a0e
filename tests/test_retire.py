"""Route resources have one owner: the ProxyService, which keeps those a reload
takes off their routes (``retire``) while they have requests, so a daemon stop
drains those too; the Reloader asks it (``put``, ``take_off``) and keeps no
list or dict of its own."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from cgipool.reload import RESTART_KEYS, Reloader
from cgipool.tap import ProxyService


class _Proxy:
    """A route's resource: its requests in flight, and whether it was stopped."""

    def __init__(self, busy: bool) -> None:
        self.exchanges = {object()} if busy else set()
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True
        self.exchanges.clear()


def _service(proxies: dict[str, Any]) -> ProxyService:
    supervisor = SimpleNamespace(pools={}, leaving=[])
    return ProxyService(proxies, supervisor, Clock(), drain_timeout=0)  # type: ignore[arg-type]


class RetireTests(SynchronousTestCase):
    def test_retire_keeps_busy_proxies_and_lets_idle_ones_go(self) -> None:
        service = _service({})
        busy, idle = _Proxy(busy=True), _Proxy(busy=False)
        service.retire(busy)
        service.retire(idle)
        self.assertEqual(service.retired, [busy, idle])
        self.assertEqual(service.in_flight(), 1)
        later = _Proxy(busy=True)
        service.retire(later)  # the idle one is let go now
        self.assertEqual(service.retired, [busy, later])

    def test_stop_ends_the_requests_of_retired_proxies(self) -> None:
        live, busy = _Proxy(busy=False), _Proxy(busy=True)
        service = _service({"live": live})
        service.retire(busy)
        service.startService()
        self.successResultOf(service.stopService())  # drain_timeout=0: at once
        self.assertTrue(busy.stopped and live.stopped)

    def test_the_reloader_takes_a_removed_route_off_through_its_owner(self) -> None:
        config = SimpleNamespace(admin=SimpleNamespace(listen=()),
                                 **{key: None for key in RESTART_KEYS})
        gone, kept = _Proxy(busy=True), _Proxy(busy=False)
        proxies: dict[str, Any] = {"gone": gone, "kept": kept}
        service = _service(proxies)
        reloader = Reloader(config, None, None, service,  # type: ignore[arg-type]
                            lambda pool: None, clock=Clock())
        reloader._retire("gone")
        reloader._retire("never-there")
        self.assertEqual(service.retired, [gone])
        self.assertEqual(service.resources(), {"kept": kept})
        self.assertEqual(proxies, {"gone": gone, "kept": kept}, "the service owns a copy")
        for shared in ("retired", "proxies", "retire"):
            self.assertFalse(hasattr(reloader, shared), shared)

    def test_put_replaces_a_route_resource_and_retires_the_old_one(self) -> None:
        old, new = _Proxy(busy=True), _Proxy(busy=False)
        service = _service({"svc": old})
        service.put("svc", new)
        self.assertIs(service.resource("svc"), new)
        self.assertEqual(service.retired, [old])
