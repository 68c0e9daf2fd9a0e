"""One client request and its answer, as every stage of the pipeline sees it.

The edge protocol (:mod:`cgipool.proxy.edge`) makes an :class:`Exchange` for
each request it parses; the stages (:mod:`cgipool.proxy.pipeline`) route it,
admit or refuse it, hand it to a service and, once it is answered, log and
count it.  Whatever answers it — the proxy forwarding to a worker, a CGI
script, the admin's Klein app — answers through the same few methods
(:meth:`Exchange.respond`, :meth:`~Exchange.write`, :meth:`~Exchange.finish`,
:meth:`~Exchange.error`, :meth:`~Exchange.cut`), so framing, keep-alive, the
access log and the metrics are written once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable
from typing import IO, TYPE_CHECKING, Any, Protocol

from twisted.web.http import RESPONSES
from twisted.web.server import version as SERVER_VERSION

from cgipool.proxy.errors import REASONS, error_body

if TYPE_CHECKING:
    from cgipool.proxy.edge import EdgeProtocol

#: Request bodies up to this size stay in memory; larger ones go to a
#: temporary file (and are streamed from it to the worker).
BODY_IN_MEMORY = 64 * 1024
#: Responses to these never have a body (RFC 9110 6.4.1).
NO_BODY = frozenset({204, 304})


class Answering(Protocol):
    """What answers an exchange: told when the client goes away first."""

    def client_gone(self) -> None: ...


def connection_tokens(value: bytes | None) -> frozenset[bytes]:
    """The lower-case tokens of a ``Connection`` value (its fields joined by
    commas): ``close``, ``keep-alive`` and the hop-by-hop names it lists."""
    if not value:
        return NO_TOKENS
    return frozenset(t for t in (t.strip() for t in value.lower().split(b",")) if t)


NO_TOKENS: frozenset[bytes] = frozenset()


class Exchange:
    """A parsed request (method, target, version, headers in the client's
    order and case, body) and the state of its answer.

    Also what twisted.web's access-log formatter reads (``method``, ``uri``,
    ``clientproto``, ``code``, ``sentLength``, ``getClientAddress``,
    ``getHeader``), so a request that never had a twisted.web ``Request`` is
    logged exactly as one that had.
    """

    __slots__ = (
        "conn", "method", "uri", "clientproto", "headers", "keep_alive", "body",
        "body_size", "body_budget", "route", "origin", "upstream_target", "began", "complete",
        "code", "sentLength", "started", "finished", "gone", "handler", "stages",
        "chunk", "head", "producer", "redirects", "notes", "pending", "ran_head", "ended",
        "dispatching", "due", "listed",
    )

    def __init__(self, conn: EdgeProtocol, method: bytes, uri: bytes, clientproto: bytes,
                 headers: list[tuple[bytes, bytes]], keep_alive: bool, began: float) -> None:
        self.conn = conn
        self.method = method
        #: The request target exactly as sent (the access log shows it so).
        self.uri = uri
        self.clientproto = clientproto
        #: (name, value) pairs, names as the client spelt them, values without OWS.
        self.headers = headers
        #: Whether the client wants the connection kept after this request.
        self.keep_alive = keep_alive
        self.body: IO[bytes] | None = None
        self.body_size = 0
        #: Body bytes still allowed (the route's max_body), set by routing.
        self.body_budget = 0
        #: (handler resource, its route prefix) set by the route stage, or None.
        self.route: Any = None
        #: The route the client's request named (a local redirect changes
        #: ``route``, not this): its service counts the request, once.
        self.origin: Any = None
        #: The path and query for the worker or script (route prefix stripped).
        self.upstream_target = b"/"
        self.began = began
        #: The whole request (body included) has arrived.
        self.complete = False
        self.code = 0
        #: Response body bytes sent (the access log).
        self.sentLength = 0
        self.started = False
        self.finished = False
        #: The client went away before the answer was complete.
        self.gone = False
        #: Who is answering (told on client_gone), if anyone yet.
        self.handler: Answering | None = None
        #: The pipeline this exchange passes (set by the site).
        self.stages: Any = None
        #: Chunk-encode the body we write (HTTP/1.1, no length given).
        self.chunk = False
        #: The response head, held back to go out with the first body bytes.
        self.head: bytes | None = None
        #: A producer of the response body (backpressure from the client).
        self.producer: Any = None
        #: Local redirects followed (a CGI script's ``Location: /path``).
        self.redirects = 0
        #: Body bytes parsed while an earlier answer was on its way (None: not held).
        self.pending: list[bytes] | None = None
        #: The pipeline's head stages ran (so its end stages will, once).
        self.ran_head = False
        self.ended = False
        #: The request stages are running; what ended it meanwhile waits (``due``).
        self.dispatching = False
        self.due: Any = None
        #: Free-form notes stages may leave for later ones (e.g. the recorder).
        self.notes: dict[str, Any] | None = None
        #: The tokens of the client's Connection header (see connection_listed).
        self.listed: frozenset[bytes] | None = None

    # -- the request ---------------------------------------------------------------

    def header(self, name: bytes) -> bytes | None:
        """The last value of request header ``name`` (any case), or None."""
        wanted = name.lower()
        for key, value in reversed(self.headers):
            if key.lower() == wanted:
                return value
        return None

    def header_values(self, name: bytes) -> list[bytes]:
        """Every value of request header ``name``, in order."""
        wanted = name.lower()
        return [value for key, value in self.headers if key.lower() == wanted]

    getHeader = header  # the access-log formatter's name for it

    def connection_listed(self) -> frozenset[bytes]:
        """The lower-case tokens of the client's ``Connection`` header(s): the
        hop-by-hop names not to forward.  The edge sets them as it parses."""
        listed = self.listed
        if listed is None:
            listed = self.listed = connection_tokens(b",".join(
                value for name, value in self.headers
                if len(name) == 10 and name.lower() == b"connection"))
        return listed

    def getClientAddress(self) -> Any:
        return self.conn.peer

    def isSecure(self) -> bool:
        return self.conn.secure

    @property
    def path(self) -> bytes:
        """The target without its query."""
        uri = self.uri
        query = uri.find(b"?")
        return uri if query < 0 else uri[:query]

    def body_write(self, data: bytes) -> bool:
        """Add request body bytes; False when the route's limit is passed."""
        size = self.body_size + len(data)
        if size > self.body_budget:
            return False
        body = self.body
        if body is None:
            body = self.body = tempfile.SpooledTemporaryFile(max_size=BODY_IN_MEMORY)
        body.write(data)
        self.body_size = size
        return True

    def rewound_body(self) -> IO[bytes] | None:
        """The body at its start (None: there is none)."""
        body = self.body
        if body is not None:
            body.seek(0)
        return body

    # -- the answer ----------------------------------------------------------------

    def respond(self, status: int, reason: bytes | None,
                headers: Iterable[tuple[bytes, bytes]], length: int | None,
                framed: bool = False) -> None:
        """Start the answer: status and the end-to-end ``headers`` (including
        ``Content-Length`` when ``length`` is known).  Without a length an
        HTTP/1.1 body is chunk-encoded here (``framed``: the caller does it and
        says so in its headers), an HTTP/1.0 one ends with the connection."""
        if self.started or self.gone:
            return
        self.started = True
        self.code = status
        bodiless = self.method == b"HEAD" or status in NO_BODY or 100 <= status < 200
        # No connection is kept once the site stopped listening (the daemon stops).
        keep = self.keep_alive and not self.conn.site.stopped
        parts = [b"HTTP/1.1 %d " % status,
                 reason or RESPONSES.get(status) or REASONS.get(status, b"Unknown Status"),
                 b"\r\n"]
        for name, value in headers:
            parts += (name, b": ", value, b"\r\n")
        if length is None and not bodiless and not framed:
            if self.clientproto == b"HTTP/1.1":
                self.chunk = True
                parts.append(b"Transfer-Encoding: chunked\r\n")
            else:
                keep = False  # the body ends with the connection
        if not keep:
            self.keep_alive = False
            parts.append(b"Connection: close\r\n\r\n")
        elif self.clientproto == b"HTTP/1.0":
            parts.append(b"Connection: keep-alive\r\n\r\n")  # as asked (nginx does so)
        else:
            parts.append(b"\r\n")
        self.head = b"".join(parts)
        if bodiless:
            self.chunk = False
            self.producer = None

    def write(self, data: bytes) -> None:
        """Body bytes of the answer (after :meth:`respond`)."""
        if self.finished or self.gone or not data:
            return
        if self.method == b"HEAD" or self.code in NO_BODY:
            return
        self.sentLength += len(data)
        if self.chunk:
            data = b"%x\r\n%s\r\n" % (len(data), data)
        head = self.head
        if head is not None:
            self.head = None
            data = head + data  # head and first body bytes in one send
        self.conn.send(data)

    def finish(self) -> None:
        """The answer is complete."""
        if self.finished or self.gone:
            return
        tail = b"0\r\n\r\n" if self.chunk else b""
        head = self.head
        if head is not None:
            self.head = None
            tail = head + tail
        if tail:
            self.conn.send(tail)
        self.finished = True
        self.conn.exchange_done(self)

    def error(self, code: int, message: str, retry_after: int | None = None,
              **extra: Any) -> None:
        """Answer with a JSON error (if nothing was sent yet and the client is there)."""
        if self.started or self.gone or self.finished:
            return
        body = error_body(code, message, **extra)
        headers = [(b"Server", SERVER_VERSION), (b"Date", self.conn.site.date()),
                   (b"Content-Type", b"application/json"), (b"Cache-Control", b"no-store"),
                   (b"Content-Length", b"%d" % len(body))]
        if retry_after is not None:
            headers.append((b"Retry-After", b"%d" % retry_after))
        self.respond(code, None, headers, len(body))
        self.write(body)
        self.finish()

    def cut(self, abort: bool = False) -> None:
        """End a response that cannot complete (a worker failed mid-body): the
        client must not take a partial body as whole, so the connection closes
        (``abort``: at once, dropping what is still buffered for it)."""
        if self.finished or self.gone:
            return
        self.finished = True
        self.conn.cut(self, abort)

    def register_producer(self, producer: Any) -> None:
        """``producer`` (IPushProducer) is paused while the client's buffer is full."""
        self.producer = producer
        if self.conn.client_paused:
            producer.pauseProducing()

    def unregister_producer(self) -> None:
        self.producer = None

    def connection_lost(self) -> None:
        """From the edge: the client went away before this answer was complete."""
        if self.finished or self.gone:
            return
        self.gone = True
        self.code = 499  # the client left before its answer was complete
        handler, self.handler = self.handler, None
        if handler is not None:
            handler.client_gone()
        self.conn.exchange_ended(self)

    def __repr__(self) -> str:
        return f"<Exchange {self.method!r} {self.uri[:60]!r} {self.code}>"
