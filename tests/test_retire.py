"""Proxies a reload takes off their routes have one owner: the ProxyService
(``retire``), which keeps them while they have requests so a daemon stop
drains those too; the Reloader only hands them over."""

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

    def test_the_reloader_hands_a_removed_route_to_retire_and_keeps_no_list(self) -> None:
        handed: list[Any] = []
        config = SimpleNamespace(admin=SimpleNamespace(listen=()),
                                 **{key: None for key in RESTART_KEYS})
        gone = _Proxy(busy=True)
        proxies: dict[str, Any] = {"gone": gone, "kept": _Proxy(busy=False)}
        reloader = Reloader(config, None, None, proxies,  # type: ignore[arg-type]
                            lambda pool: None, retire=handed.append, clock=Clock())
        reloader._retire("gone")
        reloader._retire("never-there")
        self.assertEqual(handed, [gone])
        self.assertEqual(list(proxies), ["kept"])
        self.assertFalse(hasattr(reloader, "retired"))
