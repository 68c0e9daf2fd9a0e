"""Keep-alive connections to one worker and a lean HTTP/1.1 client on each.

This is the hot path.  Instead of ``twisted.web.client.Agent`` (a Deferred
chain, a producer and a parser object per request), each worker has a small
pool of idle connections; a request is one ``transport.write`` of prebuilt
bytes, and the response is parsed in place and streamed to an *exchange*
object through plain method calls::

    exchange.response_started(status, reason, headers)
    exchange.response_data(data)          # 0..n times, body only, de-chunked
    exchange.response_finished()
    exchange.upstream_failed(kind, detail) # instead of finished, at most once

Framing from the worker is parsed strictly and never copied: the edge
regenerates it, so a worker cannot smuggle a second response.
"""

from __future__ import annotations

import re
from typing import IO, Any, Protocol as TypingProtocol

from twisted.internet.interfaces import IReactorTCP
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.protocol import ClientFactory, Protocol, connectionDone
from twisted.python.failure import Failure

from cgipool.proxy.fastio import connect_tcp

#: Failure kinds, from the exchange's point of view.
CONNECT_FAILED = "connect_failed"  # nothing reached the worker: always safe to retry
REFUSED = "refused"                # like CONNECT_FAILED, and the worker refused it: its fault
NO_RESPONSE = "no_response"        # sent, then the connection died before any byte came back
BAD_RESPONSE = "bad_response"      # the worker answered with something that is not HTTP
TRUNCATED = "truncated"            # the response started, then the connection died

MAX_HEAD = 64 * 1024
MAX_CHUNK_LINE = 4096
#: Interim (1xx) responses accepted before the final one.
MAX_INTERIM = 16

#: RFC 9110 token: what a header name may be.
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
#: Bytes a reason phrase must not hold (controls other than HTAB): a worker
#: must not be able to add lines to the client's response head.
_BAD_REASON = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = frozenset(b"0123456789abcdefABCDEF")
#: Header names seen valid -> lower case (bounded: a worker cannot grow it).
_NAMES: dict[bytes, bytes] = {}
_MAX_NAMES = 1000

# Parser modes.
_IDLE, _HEAD, _LENGTH, _CHUNKED, _EOF = range(5)
# Chunked sub-states.
_C_SIZE, _C_DATA, _C_DATA_END, _C_TRAILER = range(4)

#: Connection tokens that are options, not header names.
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive"})

#: Response headers that describe one hop only, never passed to the client.
HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
    b"trailers", b"transfer-encoding", b"upgrade", b"proxy-authenticate",
    b"proxy-authorization",
})


class Exchange(TypingProtocol):
    def response_started(self, status: int, reason: bytes,
                         headers: list[tuple[bytes, bytes]]) -> None: ...
    def response_data(self, data: bytes) -> None: ...
    def response_finished(self) -> None: ...
    def upstream_failed(self, kind: str, detail: str) -> None: ...


class BadResponse(Exception):
    pass


class StreamedRequest:
    """A request head and a large body to stream from a file after it.

    The body (twisted.web spools large ones to a temporary file) is read in
    pieces as the worker connection drains, so memory stays bounded; the
    file is read from the start on every attempt.
    """

    __slots__ = ("head", "body", "size")

    def __init__(self, head: bytes, body: IO[bytes], size: int) -> None:
        self.head = head
        self.body = body
        self.size = size


class _BodySender:
    """Pull producer: one piece of the body each time the connection drains."""

    PIECE = 256 * 1024

    __slots__ = ("conn", "body", "left", "done")

    def __init__(self, conn: UpstreamConnection, request: StreamedRequest) -> None:
        self.conn = conn
        self.body = request.body
        self.left = request.size
        self.done = False
        self.body.seek(0)

    def resumeProducing(self) -> None:
        if self.done:
            return
        data = self.body.read(min(self.PIECE, self.left))
        if not data:
            # The spool is shorter than announced: the worker must not take a
            # truncated body as whole.
            self.stop()
            self.conn.transport.abortConnection()
            return
        self.left -= len(data)
        self.conn.transport.write(data)
        if self.left <= 0:
            self.stop()

    def pauseProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        self.done = True

    def stop(self) -> None:
        """Sent, or the request is over: let go of the connection."""
        if self.done:
            return
        self.done = True
        conn = self.conn
        if conn.sender is self:
            conn.sender = None
            if not conn.disconnected:
                conn.transport.unregisterProducer()


def parse_head(head: bytes) -> tuple[int, bytes, bool, list[tuple[bytes, bytes]],
                                     int | None, bool]:
    """Parse a response head (without the final CRLFCRLF).

    Returns ``(status, reason, keep_alive, headers, content_length, chunked)``;
    ``headers`` excludes hop-by-hop headers and those named in ``Connection``.
    """
    lines = head.split(b"\r\n")
    status_line = lines[0]
    version, _, rest = status_line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise BadResponse(f"bad status line {status_line[:80]!r}")
    status = int(code)
    if status < 100:
        raise BadResponse(f"bad status code {status}")
    if _BAD_REASON.search(reason):
        raise BadResponse(f"control character in status line {status_line[:80]!r}")
    keep_alive = version == b"HTTP/1.1"
    headers: list[tuple[bytes, bytes]] = []
    content_length: int | None = None
    chunked = False
    connection_tokens: list[bytes] = []
    # No CR, LF or NUL besides the line breaks: then no value holds one
    # (three scans of the head instead of three per value).
    separators = len(lines) - 1
    clean = (head.count(b"\n") == separators and head.count(b"\r") == separators
             and b"\0" not in head)
    names = _NAMES
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        lname = names.get(name) if sep else None
        if lname is None:
            if not sep or not _TOKEN.fullmatch(name):
                raise BadResponse(f"bad header line {line[:80]!r}")
            lname = name.lower()
            if len(names) < _MAX_NAMES:
                names[name] = lname
        value = value.strip(b" \t")
        if not clean and (b"\n" in value or b"\r" in value or b"\0" in value):
            raise BadResponse("bad character in header value")
        if lname == b"content-length":
            if not value.isdigit():
                raise BadResponse(f"bad Content-Length {value[:40]!r}")
            length = int(value)
            if content_length is not None and content_length != length:
                raise BadResponse("conflicting Content-Length headers")
            if content_length is None:
                headers.append((name, value))
            content_length = length
        elif lname in HOP_BY_HOP:
            if lname == b"connection":
                token = value.lower()
                if token in _CONNECTION_OPTIONS:
                    connection_tokens.append(token)  # the usual single token
                else:
                    connection_tokens.extend(
                        t.strip().lower() for t in value.split(b",") if t.strip())
            elif lname == b"transfer-encoding":
                codings = [t.strip().lower() for t in value.split(b",") if t.strip()]
                if codings and codings[-1] == b"chunked":
                    chunked = True
                else:
                    # Not chunked last: the body runs to the end of the connection.
                    keep_alive = False
                    chunked = False
        else:
            headers.append((name, value))
    if connection_tokens:
        if b"close" in connection_tokens:
            keep_alive = False
        elif b"keep-alive" in connection_tokens:
            keep_alive = True
        if not _CONNECTION_OPTIONS.issuperset(connection_tokens):
            named = set(connection_tokens) - _CONNECTION_OPTIONS
            headers = [(n, v) for n, v in headers if n.lower() not in named]
    if chunked:
        # Transfer-Encoding wins over Content-Length (RFC 9112 6.3); drop the latter.
        content_length = None
        headers = [(n, v) for n, v in headers if n.lower() != b"content-length"]
    return status, reason, keep_alive, headers, content_length, chunked


class UpstreamConnection(Protocol):
    """One keep-alive HTTP/1.1 connection to a worker, one request at a time."""

    def __init__(self, pool: WorkerConnections) -> None:
        self.pool = pool
        self.exchange: Any = None
        self.disconnected = False
        self.requests = 0
        self._mode = _IDLE
        self._buf = b""
        self._remaining = 0
        self._keep_alive = True
        self._head_request = False
        self._chunk_state = _C_SIZE
        self._got_bytes = False
        self._interim = 0
        #: Streaming a request body (StreamedRequest) to the worker.
        self.sender: _BodySender | None = None

    # -- driven by the pool ------------------------------------------------------

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        if self.factory is not None:
            self.factory.connected(self)

    def send(self, exchange: Exchange, data: bytes | StreamedRequest,
             head_request: bool) -> None:
        self.exchange = exchange
        self.requests += 1
        self._mode = _HEAD
        self._buf = b""
        self._head_request = head_request
        self._got_bytes = False
        self._interim = 0
        exchange.connection = self  # type: ignore[attr-defined]
        if type(data) is bytes:
            self.transport.write(data)
            return
        assert isinstance(data, StreamedRequest)
        self.transport.write(data.head)
        self.sender = _BodySender(self, data)
        self.transport.registerProducer(self.sender, False)

    @property
    def reused(self) -> bool:
        return self.requests > 1

    def abort(self) -> None:
        """Drop the request in progress (client gone, timeout): the connection
        is in an unknown state and is closed, never reused."""
        self.exchange = None
        self._mode = _IDLE
        if self.sender is not None:
            self.sender.stop()
        if not self.disconnected:
            self.transport.abortConnection()

    # -- parsing -------------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        mode = self._mode
        if mode == _LENGTH:
            # The common case first: a body chunk of known length.
            self._length_data(data)
            return
        exchange = self.exchange
        if exchange is None:
            # Bytes from an idle worker: it is confused; never hand it out again.
            self._retire()
            return
        self._got_bytes = True
        if mode == _HEAD:
            self._head_data(data)
        elif mode == _CHUNKED:
            self._chunked_data(data)
        elif mode == _EOF:
            exchange.response_data(data)

    def _head_data(self, data: bytes) -> None:
        old = self._buf
        if old:
            buf = old + data
            end = buf.find(b"\r\n\r\n", max(0, len(old) - 3))  # no rescan: linear
        else:
            buf = data
            end = buf.find(b"\r\n\r\n")
        while True:
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._fail(BAD_RESPONSE, "response head larger than 64 KiB")
                else:
                    self._buf = buf
                return
            self._buf = b""
            if end > MAX_HEAD:
                self._fail(BAD_RESPONSE, "response head larger than 64 KiB")
                return
            try:
                status, reason, keep_alive, headers, length, chunked = parse_head(buf[:end])
            except BadResponse as e:
                self._fail(BAD_RESPONSE, str(e))
                return
            rest = buf[end + 4:]
            if status >= 200:
                break
            # Informational (100 Continue...): skip it and wait for the real one.
            self._interim += 1
            if self._interim > MAX_INTERIM:
                self._fail(BAD_RESPONSE, f"more than {MAX_INTERIM} interim responses")
                return
            buf = rest
            end = buf.find(b"\r\n\r\n")
            if not buf:
                return
        self._keep_alive = keep_alive
        exchange = self.exchange
        if self._head_request or status in (204, 304):
            self._mode = _LENGTH
            self._remaining = 0
        elif chunked:
            self._mode = _CHUNKED
            self._chunk_state = _C_SIZE
        elif length is not None:
            self._mode = _LENGTH
            self._remaining = length
        else:
            self._mode = _EOF
            self._keep_alive = False
        exchange.response_started(status, reason, headers)
        if self.exchange is not exchange:
            return  # the exchange gave up (client gone) while handling the head
        if self._mode == _LENGTH:
            if self._remaining == 0:
                if rest:
                    self._keep_alive = False
                self._complete()
            elif rest:
                self._length_data(rest)
        elif rest:
            self.dataReceived(rest)

    def _retire(self) -> None:
        """Close for good: out of the idle list now, not at connectionLost."""
        self.pool.lost(self)
        if not self.disconnected:
            self.transport.abortConnection()

    def _length_data(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:
            self._retire()
            return
        remaining = self._remaining
        n = len(data)
        if n < remaining:
            self._remaining = remaining - n
            exchange.response_data(data)
            return
        if n > remaining:
            # More than the worker announced: finish, but never reuse it.
            self._keep_alive = False
            data = data[:remaining]
        self._remaining = 0
        if data:
            exchange.response_data(data)
        if self.exchange is exchange:
            self._complete()

    def _chunked_data(self, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pos = 0
        exchange = self.exchange
        while pos < len(buf) and self.exchange is exchange:
            state = self._chunk_state
            if state == _C_DATA:
                take = min(self._remaining, len(buf) - pos)
                exchange.response_data(buf[pos:pos + take])
                pos += take
                self._remaining -= take
                if self._remaining == 0:
                    self._chunk_state = _C_DATA_END
                continue
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                if len(buf) - pos > MAX_CHUNK_LINE:
                    self._fail(TRUNCATED, "chunk line too long")
                    return
                self._buf = buf[pos:]
                return
            line = buf[pos:eol]
            pos = eol + 2
            if state == _C_SIZE:
                size_text = line.split(b";", 1)[0].rstrip(b" \t")
                if not size_text or len(size_text) > 16 or not _HEX.issuperset(size_text):
                    self._fail(TRUNCATED, f"bad chunk size {line[:40]!r}")
                    return
                size = int(size_text, 16)
                if size == 0:
                    self._chunk_state = _C_TRAILER
                else:
                    self._remaining = size
                    self._chunk_state = _C_DATA
            elif state == _C_DATA_END:
                if line:
                    self._fail(TRUNCATED, "missing CRLF after chunk data")
                    return
                self._chunk_state = _C_SIZE
            else:  # trailer section: ignored, ends with an empty line
                if not line:
                    if pos < len(buf):
                        self._keep_alive = False
                    self._complete()
                    return

    def _complete(self) -> None:
        exchange = self.exchange
        self.exchange = None
        self._mode = _IDLE
        if self.sender is not None:
            # Answered before the whole body went out (e.g. 413): the worker
            # reads no further request from this connection.
            self.sender.stop()
            self._keep_alive = False
        if self._keep_alive and not self.disconnected:
            self.pool.release(self)
        elif not self.disconnected:
            self.transport.loseConnection()
        exchange.response_finished()

    def _fail(self, kind: str, detail: str) -> None:
        exchange = self.exchange
        self.exchange = None
        self._mode = _IDLE
        if self.sender is not None:
            self.sender.stop()
        if not self.disconnected:
            self.transport.abortConnection()
        if exchange is not None:
            exchange.upstream_failed(kind, detail)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.disconnected = True
        self.pool.lost(self)
        exchange = self.exchange
        if exchange is None:
            return
        self.exchange = None
        mode = self._mode
        self._mode = _IDLE
        if mode == _EOF and reason.check(ConnectionDone):
            exchange.response_finished()  # a close-delimited body ends cleanly
        elif mode == _HEAD and not self._got_bytes:
            exchange.upstream_failed(NO_RESPONSE, _reason_text(reason))
        elif mode == _HEAD:
            exchange.upstream_failed(BAD_RESPONSE, "connection closed inside the response head")
        else:
            exchange.upstream_failed(TRUNCATED, "connection closed before the response ended")


def _reason_text(reason: Failure) -> str:
    text = reason.getErrorMessage()
    return text or type(reason.value).__name__


class _Connect(ClientFactory):
    """One connection attempt on behalf of one request."""

    noisy = False

    def __init__(self, pool: WorkerConnections, exchange: Any,
                 data: bytes | StreamedRequest, head_request: bool) -> None:
        self.pool = pool
        self.exchange = exchange
        self.data = data
        self.head_request = head_request
        self.connector: Any = None

    def buildProtocol(self, addr: Any) -> UpstreamConnection:
        conn = UpstreamConnection(self.pool)
        conn.factory = self
        return conn

    def connected(self, conn: UpstreamConnection) -> None:
        exchange, self.exchange = self.exchange, None
        self.pool.connecting.discard(self)
        self.pool.active.add(conn)
        if exchange is None:
            # The request was given up while we connected: keep the connection.
            self.pool.release(conn)
        else:
            exchange.connecting = None
            conn.send(exchange, self.data, self.head_request)

    def cancel(self) -> None:
        self.exchange = None
        if self.connector is not None:
            self.connector.disconnect()

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:
        self.pool.connecting.discard(self)
        exchange, self.exchange = self.exchange, None
        if exchange is not None:
            exchange.connecting = None
            # Only a refusal is the worker's fault; EMFILE, EADDRNOTAVAIL, a
            # timeout under load... are ours or the network's.
            kind = REFUSED if reason.check(ConnectionRefusedError) else CONNECT_FAILED
            exchange.upstream_failed(kind, _reason_text(reason))


class WorkerConnections:
    """The keep-alive connections to one worker process."""

    def __init__(self, reactor: IReactorTCP, host: str, port: int,
                 max_idle: int = 64, connect_timeout: float = 5.0) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.max_idle = max_idle
        self.connect_timeout = connect_timeout
        self.idle: list[UpstreamConnection] = []
        #: Every open connection (idle or busy), to close them all on stop.
        self.active: set[UpstreamConnection] = set()
        self.connecting: set[_Connect] = set()
        self.closed = False

    def send(self, exchange: Any, data: bytes | StreamedRequest,
             head_request: bool = False) -> None:
        """Send ``data`` (a complete request, or a head and a body to stream) on an
        idle connection or a new one."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.disconnected or conn.transport.disconnecting:
                continue
            conn.send(exchange, data, head_request)
            return
        attempt = _Connect(self, exchange, data, head_request)
        exchange.connecting = attempt
        self.connecting.add(attempt)
        attempt.connector = connect_tcp(  # eager writes (proxy/fastio.py)
            self.reactor, self.host, self.port, attempt, timeout=self.connect_timeout)

    def release(self, conn: UpstreamConnection) -> None:
        if self.closed or len(self.idle) >= self.max_idle or conn.disconnected:
            conn.transport.loseConnection()
            return
        self.idle.append(conn)

    def lost(self, conn: UpstreamConnection) -> None:
        self.active.discard(conn)
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close(self) -> None:
        """The worker is gone: close idle connections and refuse to keep more.

        Busy connections end with their requests (or with the process).
        """
        self.closed = True
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.transport.loseConnection()

    def abort_all(self) -> None:
        """Daemon stop: drop every connection and attempt now."""
        self.close()
        for attempt in list(self.connecting):
            attempt.cancel()
        for conn in list(self.active):
            conn.abort()
