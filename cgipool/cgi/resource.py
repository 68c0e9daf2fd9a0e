"""``CgiResource``: what answers a CGI service's route (the pool runs, queues
or refuses each request)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from twisted.web.resource import Resource

from cgipool.config import ServiceConfig
from cgipool.credentials import AdminCredentials
from cgipool.proxy.errors import set_error
from cgipool.supervisor.interface import PerRequestPool


class CgiResource(Resource):
    """The resource behind a CGI service's route."""

    isLeaf = True

    def __init__(self, pool: PerRequestPool, reactor: Any, metrics: Any = None,
                 credentials: AdminCredentials | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.reactor = reactor
        self.metrics = metrics
        #: The admin's credentials, kept out of every script's environment.
        self.credentials = credentials
        self.max_body = pool.config.max_body

    def configure(self, config: ServiceConfig) -> None:
        self.max_body = config.max_body

    @property
    def exchanges(self) -> Collection[Any]:
        """Requests in progress (the daemon's stop waits for them)."""
        return self.pool.running

    def render(self, request: Any) -> Any:
        if request.method == b"CONNECT":
            return set_error(request, 405, "CONNECT is not supported")
        return self.pool.handle(request, self)

    def stop(self) -> None:
        """Daemon stop: waiting requests get 503 (running scripts are stopped by
        the pool)."""
        self.pool.refuse_waiting("the daemon is shutting down")
