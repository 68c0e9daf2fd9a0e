"""The client-facing side: the Site and its Request class.

``EdgeRequest`` adds what the proxy needs from twisted.web's request: a hook
when the client goes away (to free the worker slot at once, without a
``notifyFinish`` Deferred per request) and JSON instead of an HTML traceback
when something fails.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import (
    RESPONSES,
    HTTPChannel,
    _ChunkedTransferDecoder,
    _MalformedChunkedDataError,
    _getContentFile,
    _parseRequestLine,
    datetimeToString,
)
from twisted.web.http_headers import Headers, InvalidHeaderName, _nameEncoder
from twisted.web.iweb import INonQueuedRequestFactory
from twisted.web.resource import Resource
from twisted.web.server import Request, Site, version as SERVER_VERSION

from cgipool.config import LogsConfig
from cgipool.logs import RotatingLogFile
from cgipool.logtext import printable
from cgipool.proxy.deadlines import Deadlines
from cgipool.proxy.errors import REASONS, error_body, finish_with_error, set_error
from cgipool.proxy.fastio import eager_writes
from cgipool.proxy.routes import DEFAULT_BODY_LIMIT

log = Logger(namespace="cgipool.edge")

#: After refusing a request early, how long and how much of its body we read
#: and drop so the client sees the answer instead of a reset.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
#: Idle keep-alive connections (and clients that stop sending) are closed after this.
IDLE_TIMEOUT = 75
#: A request head (request line and headers) must arrive within this (→ 408).
HEADER_TIMEOUT = 10.0
#: A request body must arrive within BODY_TIMEOUT seconds plus one second per
#: MIN_BODY_RATE bytes received (Apache's mod_reqtimeout ``body=20,MinRate=500``):
#: the idle timer alone restarts with every byte, so a body trickled at 1 byte/s
#: would hold its connection forever; a slow but real upload keeps going.
BODY_TIMEOUT = 20.0
MIN_BODY_RATE = 500
#: A client that takes none of a response being sent to it for this long is
#: cut (pool.yaml ``client_timeout``; see forward.ProxyExchange.pauseProducing).
CLIENT_TIMEOUT = 60.0
#: A chunked body may have CHUNKS_FREE chunks (trailer lines count as chunks),
#: then one more per CHUNK_MIN_AVERAGE bytes of data: each chunk costs the
#: reactor a few µs of Python whatever its size (1-byte chunks: 75 s of CPU for
#: 2 × 9 MB), so a body's CPU cost stays proportional to its size.  Clients send
#: chunks of 8 KiB or more (curl, browsers, git), far above the 1 KiB average.
CHUNKS_FREE = 256
CHUNK_MIN_AVERAGE = 1024
#: Its framing (size lines with their extensions, trailers) may take FRAMING_FREE
#: bytes plus one per FRAMING_RATIO bytes of data (8 KiB chunks: 1 per 800).
FRAMING_FREE = 16 * 1024
FRAMING_RATIO = 16
#: What may begin a request line: empty lines (RFC 9112 2.2), then a method
#: (a token).  Bytes that cannot (a TLS hello, NUL, binary) get 400 at once.
_LINE_START = re.compile(rb"[\r\n]*[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
#: How many first bytes of a request line are checked against _LINE_START.
_LINE_START_BYTES = 64
#: Control characters no request line or header value may hold (RFC 9110 5.5:
#: field values are visible characters, SP and HTAB); CR and LF are the line
#: breaks, checked apart.
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
#: A Host value: ``uri-host [ ":" port ]`` (RFC 9112 3.2, RFC 3986 3.2.2): a
#: reg-name (unreserved, pct-encoded, sub-delims except ``,``: no real name
#: holds one and it reads as a list) or an IP literal in brackets, and a port
#: of 1 to 5 digits.  Empty, lists, userinfo, paths and spaces do not match.
_HOST = re.compile(rb"(?:(?:[A-Za-z0-9\-._~!$&'()*+;=]|%[0-9A-Fa-f]{2})+"
                   rb"|\[([0-9A-Fa-f:.]+)\])(?::([0-9]{1,5}))?")


def host_problem(value: bytes) -> str | None:
    """Why ``value`` is not a valid Host (None: it is).  IPv6 literals are
    checked by :mod:`ipaddress`; IPvFuture and zone ids are refused."""
    match = _HOST.fullmatch(value)
    if match is None:
        return (f"invalid Host header {value[:60].decode('latin-1')!r} "
                "(expected host[:port])")
    literal, port = match.groups()
    if literal is not None:
        try:
            ipaddress.IPv6Address(literal.decode("ascii"))
        except ValueError:
            return f"invalid IPv6 literal in the Host header {value[:60].decode('latin-1')!r}"
    if port is not None and int(port) > 65535:
        return f"invalid port in the Host header {value[:60].decode('latin-1')!r}"
    return None


def head_problem(version: bytes, target: bytes,
                 headers: Iterable[tuple[bytes, Sequence[bytes]]]) -> str | None:
    """Why a request head must be refused with 400 beyond what twisted.web
    checks (None: it may go on): a control character, not exactly one
    ``Host`` in HTTP/1.1 (at most one in 1.0), or one that is not a valid
    ``host[:port]`` — RFC 9112 3.2.  Both request paths apply it: the one-pass
    parser leaves such heads to the line-by-line one."""
    if _CONTROL.search(target):
        return "control character in the request target"
    hosts = 0
    host = b""
    for name, values in headers:
        if name.lower() == b"host":
            hosts += len(values)
            host = values[0] if values else b""
        for value in values:
            if _CONTROL.search(value):
                return f"control character in header {name.decode('latin-1')[:40]!r}"
    if hosts > 1:
        return "more than one Host header"
    if hosts == 0 and version == b"HTTP/1.1":
        return "missing Host header (required in HTTP/1.1)"
    if hosts:
        return host_problem(host)
    return None

_date_cache: list[Any] = [0, b""]
#: Request factory -> whether it provides INonQueuedRequestFactory.
_NON_QUEUED: dict[Any, bool] = {}


def http_date() -> bytes:
    """The ``Date`` header value of now, formatted once per second."""
    now = int(time.time())
    if now != _date_cache[0]:
        _date_cache[0], _date_cache[1] = now, datetimeToString(now)
    return _date_cache[1]


def response_head(version: bytes, code: bytes, reason: bytes,
                  headers: Iterable[tuple[bytes, Sequence[bytes]]]) -> list[bytes]:
    """A response's status line and header block, as parts to join."""
    head = [version, b" ", code, b" ", reason, b"\r\n"]
    for name, values in headers:
        for value in values:
            head += (name, b": ", value, b"\r\n")
    head.append(b"\r\n")
    return head


class RefusalEntry:
    """What the access-log formatter reads, for a request the edge refused itself
    (400, 408, 413, 414, 431, 501): attacks get a line too."""

    def __init__(self, channel: Any, code: int, method: bytes, uri: bytes,
                 clientproto: bytes, sent: int) -> None:
        self.channel = channel
        self.code = code
        self.method, self.uri, self.clientproto = method, uri, clientproto
        self.sentLength = sent

    def getClientAddress(self) -> Any:
        return self.channel.getPeer()

    def getHeader(self, name: bytes) -> bytes | None:
        return None


class EdgeRequest(Request):
    #: No default: a worker's response without Content-Type must not become HTML.
    defaultContentType = None
    #: The proxy exchange in progress, told when the client disconnects.
    exchange: Any = None
    #: The path (and query) to send to the worker, set by routing.
    upstream_target: bytes = b"/"
    #: Body bytes still allowed (limit of the route), None before the head is read.
    body_budget: int | None = None
    #: (service resource, upstream target) when the head named a service route
    #: (``Root.lookup``): such a request skips twisted.web's traversal.
    route: tuple[Resource, bytes] | None = None

    def gotLength(self, length: int | None) -> None:
        channel = self.channel
        # As server.Request.gotLength, without its AttributeError per request
        # (a Site has no getContentFile unless one is given).
        site = getattr(channel, "site", None)
        get_content_file = getattr(site, "getContentFile", None)
        self.content = (get_content_file(length) if get_content_file is not None
                        else _getContentFile(length))
        root = site.resource
        lookup = getattr(root, "lookup", None)
        if lookup is not None:
            limit, self.route = lookup(channel._path)
        else:
            limit = DEFAULT_BODY_LIMIT
        if length is not None and length > limit:
            channel.refuse(413, f"request body of {length} bytes is larger than the "
                                f"limit of {limit} bytes for this route")
            return
        self.body_budget = limit

    def handleContentChunk(self, data: bytes) -> None:
        budget = self.body_budget
        if budget is None:
            return  # refused: the rest is dropped
        budget -= len(data)
        if budget < 0:
            self.body_budget = None
            self.channel.refuse(413, "request body larger than the limit for this route")
            return
        self.body_budget = budget
        self.content.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        if self.channel.refused:
            return  # answered already; never routed
        if self.route is None:
            super().requestReceived(command, path, version)
            return
        self.prepare_service(command, path, version)
        self.process()

    def prepare_service(self, command: bytes, path: bytes, version: bytes) -> None:
        """What requestReceived and process do before rendering, for a service
        route: no query or form arguments are parsed (the body goes to the
        worker as it is), no traversal (routing was done on the head), and a
        Date formatted once per second."""
        self.content.seek(0, 0)
        self.args = {}
        self.method, self.uri, self.clientproto = command, path, version
        query = path.find(b"?")
        self.path = path if query < 0 else path[:query]
        self.site = self.channel.site
        headers = self.responseHeaders
        raw = getattr(headers, "_rawHeaders", None)
        if type(headers) is Headers and type(raw) is dict:
            # setRawHeaders, minus canonicalising and checking constant names
            # and values without CR or LF.
            raw[b"Server"] = [SERVER_VERSION]
            raw[b"Date"] = [http_date()]
        else:
            headers.setRawHeaders(b"server", [SERVER_VERSION])
            headers.setRawHeaders(b"date", [http_date()])
        self.prepath, self.postpath, self.sitepath = [], [], []

    def _handleStar(self) -> None:
        # twisted.web's answer to '*' minus its empty 405: errors are JSON here.
        if self.method == b"OPTIONS":
            super()._handleStar()
            return
        self.setHeader(b"Allow", b"OPTIONS")
        self.write(set_error(self, 405, "only OPTIONS may have '*' as its target"))
        self.finish()

    def process(self) -> None:
        route = self.route
        if route is None:
            super().process()
            return
        resource, self.upstream_target = route
        try:
            self.render(resource)
        except BaseException:
            self.processingFailed(Failure())

    def write(self, data: bytes) -> None:
        super().write(data)
        # The channel holds the head back for the first body bytes (one send);
        # whatever Request.write did, the head is out when it returns.
        flush = getattr(self.channel, "flush_head", None)
        if flush is not None:
            flush()

    def connectionLost(self, reason: Failure) -> None:
        site = getattr(self, "site", None)
        super().connectionLost(reason)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.client_gone()
            if site is not None and site.logPath and not self.finished:
                self.code = 499  # the client left before its answer was complete
                site.log(self)

    def processingFailed(self, reason: Failure) -> None:
        log.failure("error while handling {method} {uri}", reason,
                    method=printable(self.method), uri=printable(self.uri, 200))
        if self.startedWriting:
            self.channel.loseConnection()
        else:
            finish_with_error(self, 500, "internal error in cgipool (see the daemon log)")


class _StrictChunkedDecoder(_ChunkedTransferDecoder):
    """twisted.web's chunked decoder, refusing chunk sizes over 16 hex digits (it
    would wait forever for 2**80 bytes; no body here is larger than max_body),
    and bodies whose chunks or framing cost more than their size warrants
    (CHUNKS_FREE, CHUNK_MIN_AVERAGE, FRAMING_FREE, FRAMING_RATIO): the channel
    answers 400 with the reason and the connection closes."""

    #: The edge channel to refuse on (set when the decoder is chosen).
    channel: Any = None
    chunks = 0
    data = 0
    framing = 0

    def _dataReceived_CHUNK_LENGTH(self) -> bool:
        eol = self._buffer.find(b"\r\n", 0, 1024)
        size = self._buffer[:eol if eol >= 0 else len(self._buffer)].split(b";", 1)[0]
        if len(size.strip()) > 16:
            raise _MalformedChunkedDataError("chunk size too large")
        before = len(self._buffer)
        if not super()._dataReceived_CHUNK_LENGTH():
            return False
        # The size line and the CRLF after the chunk's data are framing.
        self._account(self.length, before - len(self._buffer) + 2)
        return True

    def _dataReceived_TRAILER(self) -> bool:
        before = len(self._buffer)
        more = super()._dataReceived_TRAILER()
        if more:  # one trailer line consumed: as costly as a chunk
            self._account(0, before - len(self._buffer))
        return more

    def _account(self, data: int, framing: int) -> None:
        """One more chunk (or trailer line) of ``data`` bytes and ``framing``
        bytes around them: refuse the body once it costs too much."""
        self.chunks += 1
        self.data += data
        self.framing += framing
        if self.chunks > CHUNKS_FREE + self.data // CHUNK_MIN_AVERAGE:
            problem = (f"chunked body with {self.chunks} chunks for {self.data} bytes "
                       f"(at most {CHUNKS_FREE} plus one per {CHUNK_MIN_AVERAGE} bytes)")
        elif self.framing > FRAMING_FREE + self.data // FRAMING_RATIO:
            problem = (f"chunked body with {self.framing} bytes of chunk framing, "
                       f"extensions and trailers for {self.data} bytes of data")
        else:
            return
        if self.channel is not None:
            self.channel.refuse(400, problem)
        raise _MalformedChunkedDataError(problem)


class EdgeChannel(HTTPChannel):
    """HTTP/1.1 server channel with early refusals and token-list ``Connection``.

    twisted.web splits ``Connection`` on spaces, so ``Connection: close, X-Foo``
    kept the connection open; RFC 9110 says comma-separated tokens.

    :meth:`refuse` answers before the body is read (413 on Content-Length):
    the answer is sent, the write side closed, and what the client still sends
    is read and dropped for a moment so it sees the answer, not a reset.
    """

    refused = False
    _lingered = 0
    _linger: Any = None
    #: A response head waiting for its first body bytes (see writeHeaders).
    _head: list[bytes] | None = None
    #: The X-Forwarded-For/-Proto lines for this client (build_request).
    forwarded: bytes | None = None
    _host: Any = None
    _peer: Any = None

    def connectionMade(self) -> None:
        super().connectionMade()
        transport = self.transport
        try:
            transport.setTcpNoDelay(True)  # a response is one write: send it now
        except (AttributeError, OSError):
            pass
        eager_writes(transport)

    def getPeer(self) -> Any:
        """The client's address, made once per connection (Request.__init__)."""
        peer = self._peer
        if peer is None:
            peer = self._peer = self.transport.getPeer()
        return peer

    def getHost(self) -> Any:
        """The local address, read once per connection (twisted.web asks for
        it in every Request.__init__: a getsockname() each)."""
        host = self._host
        if host is None:
            host = self._host = self.transport.getHost()
        return host

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes,
                     headers: Any) -> None:
        """Build the head, but send it with the first body bytes (one ``send``)."""
        if not isinstance(headers, Headers):
            super().writeHeaders(version, code, reason, headers)
            return
        head = response_head(version, code, reason, headers.getAllRawHeaders())
        self.flush_head()
        self._head = head

    def flush_head(self) -> None:
        head = self._head
        if head is not None:
            self._head = None
            self.transport.write(b"".join(head))

    def write(self, data: bytes) -> None:
        head = self._head
        if head is not None:
            self._head = None
            head.append(data)
            data = b"".join(head)
        self.transport.write(data)

    def writeSequence(self, iovec: Sequence[bytes]) -> None:
        head = self._head
        if head is not None:
            self._head = None
            iovec = head + list(iovec)
        self.transport.write(b"".join(iovec))

    def refuse(self, code: int, message: str) -> None:
        if self.refused:
            return
        self.refused = True
        body = error_body(code, message)
        reason = RESPONSES.get(code) or REASONS.get(code, b"Error")
        response = (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nCache-Control: "
                    b"no-store\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
                    % (code, reason, len(body), body))
        self.transport.write(response)
        site = self.site
        if site is not None and site.logPath:
            # The request line, when it was read (else "-"), as far as it got.
            known = not self._HTTPChannel__first_line  # type: ignore[attr-defined]

            def parsed(name: str) -> bytes:
                return getattr(self, name, b"-") if known else b"-"

            site.log(RefusalEntry(self, code, parsed("_command"), parsed("_path"),
                                  parsed("_version"), len(body)))
        self.setTimeout(None)
        self.transport.loseWriteConnection()
        self._linger = self.callLater(LINGER_SECONDS, self.transport.abortConnection)

    def connectionLost(self, reason: Failure) -> None:
        linger = self._linger
        if linger is not None and linger.active():
            linger.cancel()
        self._cancel_head_deadline()
        super().connectionLost(reason)

    # -- strict request parsing (hostile clients) ------------------------------------

    _head_deadline: Any = None

    def _start_head_deadline(self) -> None:
        """The whole request head must arrive within header_timeout (slowloris:
        the idle timeout alone restarts with every byte).  One shared coarse
        timer for all connections (:class:`~cgipool.proxy.deadlines.Deadlines`)."""
        site = self.site
        deadlines = site.head_deadlines
        self._head_deadline = deadlines.add(self, deadlines.reactor.seconds()
                                            + site.header_timeout)

    def deadline_passed(self, now: float) -> None:
        self._head_deadline = None
        if self._body_deadline_at is not None:
            self._body_deadline_at = None
            self.refuse(408, f"the request body did not arrive in time (at least "
                             f"{MIN_BODY_RATE} bytes/s after the first {BODY_TIMEOUT:g} s)")
            return
        self.refuse(408, "the request head did not arrive in time")

    # The body deadline reuses the head's slot (the two never overlap).

    #: When the body deadline falls (None: no body being read), when the body
    #: began, and how much of it has come.
    _body_deadline_at: float | None = None
    _body_began = 0.0
    _body_bytes = 0

    def _start_body_deadline(self) -> None:
        deadlines = self.site.head_deadlines
        now = deadlines.reactor.seconds()
        self._body_began, self._body_bytes = now, 0
        self._body_deadline_at = now + BODY_TIMEOUT
        self._head_deadline = deadlines.add(self, self._body_deadline_at)

    def _body_progress(self, size: int) -> None:
        self._body_bytes += size
        due = self._body_began + BODY_TIMEOUT + self._body_bytes / MIN_BODY_RATE
        if self._body_deadline_at is not None and \
                due - self._body_deadline_at >= min(1.0, BODY_TIMEOUT / 4):
            # Moved once per second of credit, not per chunk of a fast upload.
            deadlines = self.site.head_deadlines
            self._cancel_head_deadline()
            self._body_deadline_at = due
            self._head_deadline = deadlines.add(self, due)

    def lineReceived(self, line: bytes) -> None:
        if self.refused:
            return  # answered already: what follows is dropped, never parsed
        if self._HTTPChannel__first_line:  # type: ignore[attr-defined]
            if line and self._head_deadline is None:
                self._start_head_deadline()
        elif line[:1] in (b" ", b"\t"):
            self.refuse(400, "obsolete line folding in the header block is not accepted")
            return
        super().lineReceived(line)

    def rawDataReceived(self, data: bytes) -> None:
        if self.refused:
            return
        if self._body_deadline_at is not None:
            self._body_progress(len(data))
        super().rawDataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel_head_deadline()
        problem = head_problem(self._version, self._path,
                               self.requests[-1].requestHeaders.getAllRawHeaders())
        if problem is not None:
            self.refuse(400, problem)
            return
        super().allHeadersReceived()
        if (self.length or self._transferDecoder is not None) and not self.refused:
            self._start_body_deadline()

    def _cancel_head_deadline(self) -> None:
        key, self._head_deadline = self._head_deadline, None
        if key is not None:
            self.site.head_deadlines.remove(self, key)

    def lineLengthExceeded(self, line: bytes) -> None:
        if self._HTTPChannel__first_line:  # type: ignore[attr-defined]
            self.refuse(414, f"request line longer than {self.MAX_LENGTH} bytes")
        else:
            self.refuse(431, f"header line longer than {self.MAX_LENGTH} bytes")

    def _respondToBadRequestAndDisconnect(self) -> None:
        # twisted.web's own refusals (bad request line or header, too many or too
        # large headers, bad framing): a JSON answer, then the connection closes.
        self.refuse(400, "bad request: malformed request line, header or body framing")

    def _maybeChooseTransferDecoder(self, header: bytes, data: bytes) -> bool:
        if header == b"Transfer-Encoding" and data.lower() != b"chunked":
            # Only chunked is understood; anything else (identity, gzip, lists)
            # is a smuggling vector when a hop reads it differently.
            self.refuse(501, f"Transfer-Encoding {data[:40]!r} is not supported "
                             "(only 'chunked')")
            return False
        if not super()._maybeChooseTransferDecoder(header, data):
            return False
        if isinstance(self._transferDecoder, _ChunkedTransferDecoder) and \
                not isinstance(self._transferDecoder, _StrictChunkedDecoder):
            self._transferDecoder.__class__ = _StrictChunkedDecoder
            self._transferDecoder.channel = self
        return True

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            self._lingered += len(data)
            if self._lingered > LINGER_BYTES:
                self.transport.abortConnection()
            return
        if (self.line_mode and not self._handlingRequest and not self._buffer
                and self._HTTPChannel__first_line == 1  # type: ignore[attr-defined]
                and self.persistent and self._head_deadline is None
                and not self._busyReceiving and not self.paused
                and self._held is None and data[-4:] == b"\r\n\r\n"
                and self._fast_head(data)):
            return
        if self.line_mode and (b"\n\n" in data or (
                data[:1] == b"\n" and self._buffer[-1:] == b"\n")):
            # A head ended by a blank line with bare LFs (no CR before it, in what
            # is not parsed yet) would never end a line here: the client would
            # wait for the head deadline (408) for nothing.  Anything after a CR
            # may be a body, and is left alone.  (A CRLF head has no "\n\n": the
            # test above keeps the copy below off the usual path.)
            joined = self._buffer + data
            blank = joined.find(b"\n\n")
            if blank >= 0 and b"\r" not in joined[:blank]:
                self.refuse(400, "bare LF line endings in the request head "
                                 "(lines end with CRLF)")
                return
        if (self._head_deadline is None and not self._handlingRequest
                and self._HTTPChannel__first_line):  # type: ignore[attr-defined]
            # The first byte of a request (even one that never sends a CRLF).
            self._start_head_deadline()
            self._line_start = b""
        if self._line_start is not None and self._bad_line_start(data):
            return
        super().dataReceived(data)

    #: The first bytes of a request line while they are checked, else None.
    _line_start: bytes | None = None

    def _bad_line_start(self, data: bytes) -> bool:
        """Refuse at once (400) bytes that cannot begin a request line: after
        optional empty lines, a method token then SP (or the line's end,
        which twisted.web judges).  A TLS hello or binary would otherwise wait
        for the head deadline (408)."""
        start = self._line_start + data[:_LINE_START_BYTES]  # type: ignore[operator]
        end = _LINE_START.match(start).end()  # type: ignore[union-attr]
        if end == len(start) and end < _LINE_START_BYTES:
            self._line_start = start  # undecided: all of it may still begin one
            return False
        self._line_start = None
        if end == len(start) or start[end:end + 1] in (b" ", b"\r", b"\n"):
            return False
        if start[end:end + 2] == b"\x16\x03":
            self.refuse(400, "this port speaks plain HTTP, not TLS")
        else:
            self.refuse(400, "bad request: these bytes cannot begin an HTTP request line")
        return True

    #: Pipelined bytes not parsed yet because the client is not reading its answers.
    _held: bytes | None = None

    def _fast_head(self, data: bytes) -> bool:
        """A whole request head without a body, alone in ``data``: parse it in
        one pass and go on as twisted.web would after its last line.

        Only heads the line-by-line path would accept unchanged are taken:
        anything else (framing headers, obs-fold, stray CR/LF/NUL, bad names,
        limits approached, a second request...) returns False before any
        state is touched, and the normal path parses ``data`` and answers it
        exactly as before.
        """
        end = len(data) - 4
        if end > self.MAX_LENGTH or end > self.totalHeadersSize or end <= 0:
            return False
        head = data[:end]
        if b"\r\n\r\n" in head or _CONTROL.search(head):
            return False  # a second head (pipelining) or a control character: the slow path
        lines = head.split(b"\r\n")
        count = len(lines) - 1
        if count > self.maxHeaders or head.count(b"\n") != count \
                or head.count(b"\r") != count:
            return False  # bare CR or LF somewhere
        first = lines[0]
        if not first:
            return False  # a leading empty line (the IE quirk)
        try:
            command, path, version = _parseRequestLine(first)
        except ValueError:
            return False
        parsed = []
        encode = _nameEncoder.encode
        plain = True  # no Connection or Expect header (the lean path's condition)
        hosts = 0
        for i in range(1, count + 1):
            line = lines[i]
            if line[:1] in (b" ", b"\t"):
                return False  # obs-fold: refused by lineReceived
            name, sep, value = line.partition(b":")
            if not sep:
                return False
            try:
                name = encode(name)
            except InvalidHeaderName:
                return False
            if name == b"Content-Length" or name == b"Transfer-Encoding":
                return False  # a body (or a refusal): the slow path
            if name == b"Connection" or name == b"Expect":
                plain = False
            elif name == b"Host":
                hosts += 1
                host = value.strip(b" \t")
            parsed.append((name, value.strip(b" \t")))
        if hosts != 1 or host_problem(host) is not None:
            return False  # missing, repeated or invalid Host: refused by the slow path
        if plain and version == b"HTTP/1.1" and (command == b"GET" or command == b"HEAD") \
                and self._lean(command, path, parsed):
            return True
        # What HTTPChannel.lineReceived and headerReceived do, line by line.
        request = self._new_request(parsed, len(self.requests))
        self.requests.append(request)
        self._HTTPChannel__first_line = 0
        self._command, self._path, self._version = command, path, version
        self._receivedHeaderCount = count
        self._receivedHeaderSize = end - 2 * count
        # HTTPChannel.dataReceived would reset the idle timer here, but
        # allContentReceived (next) stops it, and requestDone starts it again
        # from the end of the request: no reset is needed.
        self.allHeadersReceived()
        if self.length == 0:
            self.allContentReceived()
        else:
            self.setRawMode()
        return True

    def _new_request(self, headers: list[tuple[bytes, bytes]], position: int) -> Request:
        """A request object from the site's factory, with ``headers``, for
        ``position`` in the channel's queue (twisted.web's deprecated
        ``queued`` argument: a request at 0 finishes by itself)."""
        factory = self.requestFactory
        non_queued = _NON_QUEUED.get(factory)
        if non_queued is None:
            # A zope interface check per request is costly: once per factory.
            non_queued = INonQueuedRequestFactory.providedBy(factory)
            if len(_NON_QUEUED) < 64:
                _NON_QUEUED[factory] = non_queued
        if non_queued:
            request = factory(self)
        else:
            request = factory(self, position)
        raw = request.requestHeaders._rawHeaders
        for name, value in headers:
            values = raw.get(name)
            if values is None:
                raw[name] = [value]
            else:
                values.append(value)
        return request

    # -- the lean path (forward.LeanExchange) ------------------------------------

    def _lean(self, command: bytes, path: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
        """Offer a plain HTTP/1.1 GET or HEAD to its service's lean path, which
        forwards it without a twisted.web Request when a worker is free now."""
        lookup = getattr(self.site.resource, "lookup", None)
        if lookup is None:
            return False
        route = lookup(path)[1]
        if route is None:
            return False
        lean = getattr(route[0], "lean", None)
        return lean is not None and lean(self, command, path, route[1], headers)

    def begin_lean(self, exchange: Any) -> None:
        """The lean path took a request: the channel waits for its end (the
        exchange calls requestDone) and buffers what follows, as
        HTTPChannel.allContentReceived does for any request."""
        self.requests.append(exchange)
        if self.timeOut:
            self._park_next = True  # see setTimeout: the idle timer is parked
            self._savedTimeOut = self.setTimeout(None)
        self._handlingRequest = True
        self.setRawMode()

    def promote(self, exchange: Any, command: bytes, path: bytes,
                headers: list[tuple[bytes, bytes]]) -> EdgeRequest:
        """The twisted.web request a lean exchange stands for, made when it needs
        the general path (a failure, a retry, a response to stream); it takes
        the exchange's place in the channel's queue."""
        position = self.requests.index(exchange)
        request = self._new_request(headers, position)
        request.content = _getContentFile(0)  # bodiless: an empty BytesIO
        request.body_budget = 0
        request.prepare_service(command, path, b"HTTP/1.1")
        self.requests[position] = request
        return request

    def requestDone(self, request: Any) -> None:
        if self._waitingForTransport and self.persistent and not self.refused:
            # The client does not read: parse no further pipelined request (each
            # would add an answer to the send buffer) until its socket drains.
            if request is not self.requests[0]:
                raise TypeError
            del self.requests[0]
            self._handlingRequest = False
            if self._savedTimeOut:
                self.setTimeout(self._savedTimeOut)
            self._held = b"".join(self._dataBuffer)
            self._dataBuffer = []
            self._networkProducer.pauseProducing()
            return
        super().requestDone(request)

    def resumeProducing(self) -> None:
        super().resumeProducing()
        held = self._held
        if held is not None and not self._waitingForTransport:
            self._held = None
            self.setLineMode(held)

    # -- the idle timer across requests ------------------------------------------
    #
    # twisted.web stops the idle timer for each request (setTimeout(None) in
    # allContentReceived: a DelayedCall cancelled) and starts it again when the
    # request is done (a new callLater): two heap operations per request.  The
    # call is kept instead ("parked"), ignored should it fire meanwhile, and
    # moved to now + timeOut when the request is done, which is when the new
    # one would have fired.  Any other setTimeout is TimeoutMixin's own.

    #: The next setTimeout(None) is allContentReceived's: park the call.
    _park_next = False
    #: The idle DelayedCall, parked while a request is handled.
    _parked: Any = None

    def allContentReceived(self) -> None:
        if self._body_deadline_at is not None:
            self._body_deadline_at = None
            self._cancel_head_deadline()
        if self.timeOut:
            self._park_next = True  # its first act is setTimeout(None)
        super().allContentReceived()

    def setTimeout(self, period: float | None) -> float | None:
        if self._park_next:
            self._park_next = False
            call = self._TimeoutMixin__timeoutCall  # type: ignore[attr-defined]
            if period is None and call is not None and self._parked is None:
                previous, self.timeOut = self.timeOut, None
                self._TimeoutMixin__timeoutCall = None
                self._parked = call
                return previous
        parked = self._parked
        if parked is not None:
            self._parked = None
            if (period is not None and parked.active()
                    and self._TimeoutMixin__timeoutCall is None):  # type: ignore[attr-defined]
                previous, self.timeOut = self.timeOut, period
                parked.reset(period)
                self._TimeoutMixin__timeoutCall = parked
                return previous
            if parked.active():
                parked.cancel()
        return super().setTimeout(period)

    def timeoutConnection(self) -> None:
        if self._parked is not None:
            # The parked idle timer: a request is in progress, so this is not
            # an idle connection; requestDone starts a new timer.
            self._parked = None
            return
        super().timeoutConnection()

    def _send100Continue(self) -> None:
        if not self.refused:
            super()._send100Continue()

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
                 reactor: Any = None, idle_timeout: float = IDLE_TIMEOUT,
                 trusted_proxies: Sequence[Any] = (), logs: LogsConfig | None = None,
                 client_timeout: float = CLIENT_TIMEOUT) -> None:
        super().__init__(root, logPath=access_log, reactor=reactor)
        #: How the access log rotates (cgipool/logs.py).
        self.logs = logs if logs is not None else LogsConfig()
        self.timeOut = idle_timeout
        #: Seconds a client may read nothing of a streamed response (→ cut, 499).
        self.client_timeout = client_timeout
        #: Networks whose X-Forwarded-* headers are kept (see forward.build_request).
        self.trusted_proxies = tuple(trusted_proxies)
        #: Seconds a request head may take to arrive (→ 408), and its timer.
        self.header_timeout = HEADER_TIMEOUT
        # keep_timer: a head nearly always arrives within one read, so its
        # deadline is removed at once; cleared in stopFactory.
        self.head_deadlines = Deadlines(self.reactor, tick=0.25, keep_timer=True)

    def startFactory(self) -> None:
        super().startFactory()
        if self.logPath:
            # twisted.web's file grows without end: rotate by size, `keep` old files.
            self.logFile.close()
            self.logFile = RotatingLogFile.open(self.logPath, self.logs.max_bytes,
                                                self.logs.keep)

    def stopFactory(self) -> None:
        super().stopFactory()
        self.head_deadlines.clear()

    def log(self, request: Request) -> None:
        # twisted.web logs every request to the main log unless told where;
        # we write an access log only when one is configured.
        if self.logPath:
            super().log(request)
