"""twisted.web resources answering pipeline exchanges.

The daemon's pages (Klein's admin, ``/metrics``), CGI and the error pages of
routing are twisted.web resources.  For an exchange the dispatch stage gives
them, :func:`render` makes an :class:`EdgeRequest` whose channel is a
:class:`WebChannel`: the object twisted.web's ``Request`` writes to (its
``writeHeaders``/``write``/``requestDone``/producer calls, as ``H2Stream``
is for HTTP/2).  The channel turns them into the exchange's answer, so the
framing, keep-alive, access log and metrics are the edge's and the
pipeline's, whatever rendered the page.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, version as SERVER_VERSION

from cgipool.logtext import printable
from cgipool.proxy.errors import finish_with_error
from cgipool.proxy.exchange import Exchange

log = Logger(namespace="cgipool.edge")


class WebChannel:
    """What a twisted.web ``Request`` needs of its channel, for one exchange."""

    __slots__ = ("exchange", "site", "transport", "request")

    def __init__(self, exchange: Exchange) -> None:
        self.exchange = exchange
        conn = exchange.conn
        self.site = conn.site
        self.transport = conn.transport
        self.request: EdgeRequest | None = None

    @property
    def gone(self) -> bool:
        """The client went away (twisted.web keeps its own flag private)."""
        return self.exchange.gone

    def getPeer(self) -> Any:
        return self.exchange.conn.peer

    def getHost(self) -> Any:
        return self.exchange.conn.host

    def isSecure(self) -> bool:
        return self.exchange.conn.secure

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes,
                     headers: Headers) -> None:
        pairs = []
        length = None
        framed = False
        for name, values in headers.getAllRawHeaders():
            lname = name.lower()
            if lname == b"content-length":
                length = int(values[-1])
            elif lname == b"transfer-encoding":
                framed = True  # Request chunk-encodes the body itself
            elif lname == b"connection":
                continue  # the edge decides (keep-alive, close)
            for value in values:
                pairs.append((name, value))
        self.exchange.respond(int(code), reason or None, pairs, length, framed)

    def write(self, data: bytes) -> None:
        self.exchange.write(data)

    def writeSequence(self, data: Any) -> None:
        self.exchange.write(b"".join(data))

    def requestDone(self, request: Request) -> None:
        exchange = self.exchange
        exchange.sentLength = request.sentLength
        exchange.finish()

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.exchange.register_producer(producer)

    def unregisterProducer(self) -> None:
        self.exchange.unregister_producer()

    def loseConnection(self) -> None:
        """A resource giving up on its answer mid-way (a CGI script cut short)."""
        self.exchange.cut()

    def client_gone(self) -> None:
        """From the exchange: tell the request (notifyFinish, the CGI execution)."""
        request = self.request
        if request is not None and not request.finished:
            request.connectionLost(Failure(ConnectionError("the client went away")))


class EdgeRequest(Request):
    """twisted.web's request, for an exchange: JSON instead of an HTML
    traceback, no default Content-Type (a script's answer without one must
    not become HTML), and what a route's resource reads (``upstream_target``,
    ``exchange``)."""

    #: No default: a response without Content-Type must not become HTML.
    defaultContentType = None
    #: A resource's own per-request state, told when the client disconnects
    #: (the CGI execution waiting or running for this request).
    exchange: Any = None
    #: The path (and query) a route's worker or script sees, set by routing.
    upstream_target: bytes = b"/"
    #: (route resource, upstream target) when the request named a route.
    route: tuple[Resource, bytes] | None = None

    def prepare_service(self, command: bytes, path: bytes, version: bytes) -> None:
        """What requestReceived and process do before rendering, for a route's
        resource: no query or form arguments parsed (the body goes to the
        script as it is), no traversal (routing was done on the head)."""
        self.args = {}
        self.method, self.uri, self.clientproto = command, path, version
        query = path.find(b"?")
        self.path = path if query < 0 else path[:query]
        self.site = self.channel.site
        self.setHeader(b"server", SERVER_VERSION)
        self.setHeader(b"date", self.site.date())
        self.prepath, self.postpath, self.sitepath = [], [], []

    def connectionLost(self, reason: Failure) -> None:
        super().connectionLost(reason)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.client_gone()

    def processingFailed(self, reason: Failure) -> None:
        log.failure("error while handling {method} {uri}", reason,
                    method=printable(self.method), uri=printable(self.uri, 200))
        if self.startedWriting:
            self.channel.loseConnection()
        else:
            finish_with_error(self, 500, "internal error in cgipool (see the daemon log)")


def render(exchange: Exchange, resource: Resource | None) -> None:
    """Answer ``exchange`` with twisted.web: ``resource`` (a route's) directly,
    or, without one, the site's usual traversal (daemon pages, 404, 400)."""
    conn = exchange.conn
    if exchange.uri == b"*":
        # OPTIONS * (the only method the admission stage lets through with it).
        exchange.respond(200, None, [(b"Server", SERVER_VERSION), (b"Date", conn.site.date()),
                                     (b"Content-Length", b"0")], 0)
        exchange.finish()
        return
    channel = WebChannel(exchange)
    # No form parsing of bodies: the daemon's pages read query arguments and
    # their own bodies (the login form), and twisted.web's answer to a bad
    # multipart body goes through a private channel method.
    request = EdgeRequest(channel, parsePOSTFormSubmission=False)
    channel.request = request
    exchange.handler = channel
    headers = request.requestHeaders
    for name, value in exchange.headers:
        headers.addRawHeader(name, value)
    body = exchange.rewound_body()
    request.content = body if body is not None else BytesIO()
    if resource is not None:
        request.route = (resource, exchange.upstream_target)
        request.upstream_target = exchange.upstream_target
        request.prepare_service(exchange.method, exchange.uri, exchange.clientproto)
        try:
            request.render(resource)
        except BaseException:
            request.processingFailed(Failure())
        return
    request.requestReceived(exchange.method, exchange.uri, exchange.clientproto)


def redirect(request: EdgeRequest, method: bytes, target: bytes) -> bool:
    """Go on with ``request``'s exchange as a bodiless ``method`` of ``target``
    (a CGI local redirect): routed again and dispatched again, answered by
    whatever answers that path.  False when there is no exchange to go on with."""
    channel = request.channel
    exchange = getattr(channel, "exchange", None)
    if not isinstance(channel, WebChannel) or exchange is None:
        return False
    from cgipool.proxy.pipeline import dispatch  # the pipeline imports this module
    channel.request = None  # this request is done with; it writes nothing more
    exchange.handler = None
    exchange.method = method
    exchange.uri = target
    exchange.body = None
    exchange.body_size = 0
    exchange.headers = [(name, value) for name, value in exchange.headers
                        if name.lower() not in (b"content-length", b"content-type",
                                                b"transfer-encoding")]
    root = exchange.conn.site.resource
    found = root.lookup(target)[1] if hasattr(root, "lookup") else None
    exchange.route = None
    if found is not None:
        exchange.route, exchange.upstream_target = found
    dispatch(exchange)
    return True
