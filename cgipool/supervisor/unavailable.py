"""A service that cannot run on this machine: none of its runtimes is installed.

The configuration names it (``runtimes:`` candidates tried in order, see
:func:`cgipool.config._command_or_runtimes`); when none is present the service
is *unavailable* rather than a configuration error, so the rest of the pool
runs.  Its pool spawns nothing, says why once in the start-up log and the event
log, shows ``state: "unavailable"`` with the ``reason`` in the status, and the
proxy answers its route with 503 JSON.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from cgipool.supervisor.pool import ServicePool

log = Logger(namespace="cgipool.pool")


def announce_unavailable(name: str, reason: str, events: Any) -> None:
    """Say once, in the log and the event log, that a service will not run."""
    log.warn("service {service} is unavailable: {reason}; the other services run",
             service=name, reason=reason)
    events.add("unavailable", name, None, f"not started: {reason}", "warn", reason=reason)


class UnavailablePool(ServicePool):
    """A pool that stays empty and says why."""

    @property
    def reason(self) -> str:
        return self.config.unavailable or "unavailable"

    def start(self) -> None:
        self.started = True
        announce_unavailable(self.name, self.reason, self.events)

    @property
    def accepting(self) -> bool:
        """No worker will ever come: requests fail at once (503)."""
        return False

    def scale_to(self, size: int, reason: str) -> int:
        raise ValueError(f"service {self.name!r} is unavailable: {self.reason}")

    def rolling_restart(self, reason: str, workers: Any = None) -> Deferred[bool]:
        return succeed(False)

    def status(self, now: float) -> dict[str, Any]:
        status = super().status(now)
        status["reason"] = self.reason
        return status
