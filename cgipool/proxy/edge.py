"""The client-facing side: the Site and its Request class.

``EdgeRequest`` adds what the proxy needs from twisted.web's request: a hook
when the client goes away (to free the worker slot at once, without a
``notifyFinish`` Deferred per request) and JSON instead of an HTML traceback
when something fails.
"""

from __future__ import annotations

from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from cgipool.proxy.errors import finish_with_error

log = Logger(namespace="cgipool.edge")


class EdgeRequest(Request):
    #: The proxy exchange in progress, told when the client disconnects.
    exchange: Any = None
    #: The path (and query) to send to the worker, set by routing.
    upstream_target: bytes = b"/"

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.client_gone()

    def processingFailed(self, reason: Failure) -> None:
        log.failure("error while handling {method} {uri}", reason,
                    method=self.method, uri=self.uri)
        if self.startedWriting:
            self.channel.loseConnection()
        else:
            finish_with_error(self, 500, "internal error in cgipool (see the daemon log)")


class EdgeSite(Site):
    """A Site with the edge request class and no per-request logging by default."""

    requestFactory = EdgeRequest
    displayTracebacks = False
    noisy = False

    def __init__(self, root: Resource, access_log: str | None = None,
                 reactor: Any = None) -> None:
        super().__init__(root, logPath=access_log, reactor=reactor)

    def log(self, request: Request) -> None:
        # twisted.web logs every request to the main log unless told where;
        # we write an access log only when one is configured.
        if self.logPath:
            super().log(request)
