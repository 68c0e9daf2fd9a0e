"""The daemon's one "ready" log line: where the proxy and the dashboard are.

``make run`` shows the daemon's log in the terminal; without this line a new
user has to guess the URLs.  Once every service is settled (``ok``, or
``unavailable``: it will not get better by waiting) the daemon logs::

    cgipool ready: proxy http://127.0.0.1:8080, dashboard http://127.0.0.1:8081/admin/

and, if that takes longer than :data:`NOTICE_AFTER`, first a line naming the
services it waits for, so a crash-looping worker does not look like a hang.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger(namespace="cgipool")

SETTLED = frozenset({"ok", "unavailable"})
POLL = 0.1
NOTICE_AFTER = 30.0


def listener_url(listening: Any) -> str | None:
    """``http://host:port`` of a :class:`cgipool.tap.ListeningService` that listens."""
    port = getattr(listening, "port", None)
    if port is None:
        return None
    address = port.getHost()
    if not isinstance(address, (IPv4Address, IPv6Address)):
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(address.host, address.host)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{address.port}"


class ReadyNotice(Service):
    """Logs the ready line once every pool of ``supervisor`` has settled.

    ``urls`` gives ``(proxy URLs, dashboard URL)`` when asked (the listeners'
    ports are known only once they listen).
    """

    name = "ready-notice"

    def __init__(self, supervisor: Any, clock: Any,
                 urls: Callable[[], tuple[list[str], str]]) -> None:
        self.supervisor = supervisor
        self.clock = clock
        self.urls = urls
        self.done = False
        self._since = 0.0
        self._noticed = False
        self._loop: LoopingCall | None = None

    def startService(self) -> None:
        super().startService()
        self._since = self.clock.seconds()
        self._loop = LoopingCall(self._look)
        self._loop.clock = self.clock
        self._loop.start(POLL, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None

    def _where(self) -> str:
        proxies, dashboard = self.urls()
        return f"proxy {', '.join(proxies) or '?'}, dashboard {dashboard or '?'}"

    def _look(self) -> None:
        waiting = {name: pool.state for name, pool in self.supervisor.pools.items()
                   if pool.state not in SETTLED}
        if not waiting:
            log.info("cgipool ready: {where}", where=self._where())
            self.done = True
            if self._loop is not None and self._loop.running:
                self._loop.stop()
            return
        if not self._noticed and self.clock.seconds() - self._since >= NOTICE_AFTER:
            self._noticed = True
            log.warn("cgipool is up but not ready after {seconds:g} s: waiting for {waiting} "
                     "({where}; the dashboard's events say why)", seconds=NOTICE_AFTER,
                     waiting=", ".join(f"{n} ({s})" for n, s in sorted(waiting.items())),
                     where=self._where())
