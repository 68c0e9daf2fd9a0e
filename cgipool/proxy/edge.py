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
from twisted.web.http import HTTPChannel
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


class EdgeChannel(HTTPChannel):
    """HTTP/1.1 server channel that reads ``Connection`` as a token list.

    twisted.web splits the header on spaces, so ``Connection: close, X-Foo``
    kept the connection open; RFC 9110 says comma-separated tokens.
    """

    def checkPersistence(self, request: Request, version: bytes) -> bool:
        if version != b"HTTP/1.1":
            return False
        for value in request.requestHeaders.getRawHeaders(b"connection", ()):
            for token in value.split(b","):
                if token.strip().lower() == b"close":
                    request.responseHeaders.setRawHeaders(b"connection", [b"close"])
                    return False
        return True


class EdgeSite(Site):
    """A Site with the edge request class and no per-request logging by default."""

    protocol = EdgeChannel
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
