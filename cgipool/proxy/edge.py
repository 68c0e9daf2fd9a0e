"""The client-facing side: our HTTP/1.1 protocol and the site that builds it.

Requests are parsed by ``httptools`` (the bindings to llhttp, Node's parser: C
speed, strict by default — no line folding, no bare LF, no ``Content-Length``
with ``Transfer-Encoding``, only ``chunked``, no duplicate lengths, overflowing
chunk sizes refused).  :class:`EdgeProtocol` adds the limits a server needs
(head and line sizes, the head and body deadlines, the chunk-count bound, the
body limit of the route), keep-alive (HTTP/1.1, and HTTP/1.0 with
``Connection: keep-alive``), pipelining in order, backpressure from the
client, and JSON refusals.  Each request becomes an
:class:`~cgipool.proxy.exchange.Exchange` that passes the site's
:class:`~cgipool.proxy.pipeline.Pipeline`.

:class:`EdgeSite` is still a twisted.web ``Site``: Klein's admin, the metrics
page, CGI and the daemon's error pages are twisted.web resources, rendered
through :mod:`cgipool.proxy.webbridge`.
"""

from __future__ import annotations

import ipaddress
import re
import time
from collections.abc import Iterable, Sequence
from typing import Any

from httptools import (
    HttpParserError,
    HttpParserInvalidMethodError,
    HttpParserUpgrade,
    HttpRequestParser,
)
from twisted.internet.interfaces import IPushProducer, ISSLTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import RESPONSES, datetimeToString
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from cgipool.config import LogsConfig
from cgipool.logs import RotatingLogFile
from cgipool.proxy.deadlines import Deadlines
from cgipool.proxy.errors import REASONS, error_body
from cgipool.proxy.exchange import NO_TOKENS, Exchange, connection_tokens
from cgipool.proxy.pipeline import Pipeline

log = Logger(namespace="cgipool.edge")

#: After refusing a request early, how long and how much of its body we read
#: and drop so the client sees the answer instead of a reset.
LINGER_SECONDS = 2.0
LINGER_BYTES = 1024 * 1024
#: Idle keep-alive connections (and clients that stop sending) are closed after this.
IDLE_TIMEOUT = 75
#: A connection closed for idleness that does not go within this is aborted.
ABORT_TIMEOUT = 15
#: A request head (request line and headers) must arrive within this (→ 408).
HEADER_TIMEOUT = 10.0
#: A request body must arrive within BODY_TIMEOUT seconds plus one second per
#: MIN_BODY_RATE bytes received (Apache's mod_reqtimeout ``body=20,MinRate=500``):
#: an idle timer restarting with every byte would let a body trickled at 1
#: byte/s hold its connection forever; a slow but real upload keeps going.
BODY_TIMEOUT = 20.0
MIN_BODY_RATE = 500
#: A client that takes none of a response being sent to it for this long is
#: cut (pool.yaml ``client_timeout``; see forward.ProxyExchange.pauseProducing).
CLIENT_TIMEOUT = 60.0
#: A chunked body may have CHUNKS_FREE chunks (trailer lines count as chunks),
#: then one more per CHUNK_MIN_AVERAGE bytes of data: each chunk costs the
#: reactor a Python callback whatever its size, so a body's CPU cost stays
#: proportional to its size.  Clients send chunks of 8 KiB or more (curl,
#: browsers, git), far above the 1 KiB average.
CHUNKS_FREE = 256
CHUNK_MIN_AVERAGE = 1024
#: Its framing (size lines with their extensions, trailers) may take FRAMING_FREE
#: bytes plus one per FRAMING_RATIO bytes of data (8 KiB chunks: 1 per 800).
FRAMING_FREE = 16 * 1024
FRAMING_RATIO = 16
#: The request line, and the header block, may each take this many bytes (→ 414, 431).
MAX_LINE = 16384
MAX_HEADERS_SIZE = 16384
MAX_HEADERS = 500
#: Bytes an unfinished head may hold before it is refused (431) whatever its
#: shape: the parser keeps a header being read in memory.
MAX_HEAD_BYTES = 64 * 1024 + MAX_HEADERS_SIZE
#: Reads larger than this are parsed in slices of this size (see dataReceived).
FEED_SLICE = 4096
#: Requests parsed and waiting behind an unfinished answer: at this many the
#: rest of the read is held (and the client no longer read) until half are
#: answered, so a read of tiny pipelined requests is not a queue of thousands.
MAX_PIPELINED = 16
#: Control characters no request target or header value may hold (RFC 9110
#: 5.5: field values are visible characters, SP and HTAB).
_CONTROL = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
#: A method: a token (RFC 9110 9.1).
_TOKEN_START = re.compile(rb"[\r\n]*[!#$%&'*+\-.^_`|~0-9A-Za-z]+ ")
#: The first bytes of a method not yet followed by its space.
_TOKEN_PREFIX = re.compile(rb"[\r\n]*[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
#: An LF without its CR.
_BARE_LF = re.compile(rb"(?<!\r)\n")
#: A Host value: ``uri-host [ ":" port ]`` (RFC 9112 3.2, RFC 3986 3.2.2): a
#: reg-name (unreserved, pct-encoded, sub-delims except ``,``: no real name
#: holds one and it reads as a list) or an IP literal in brackets, and a port
#: of 1 to 5 digits.  Empty, lists, userinfo, paths and spaces do not match.
_HOST = re.compile(rb"(?:(?:[A-Za-z0-9\-._~!$&'()*+;=]|%[0-9A-Fa-f]{2})+"
                   rb"|\[([0-9A-Fa-f:.]+)\])(?::([0-9]{1,5}))?")
_VERSIONS = {"1.1": b"HTTP/1.1", "1.0": b"HTTP/1.0"}
#: A header line holding a control character (for the refusal's message).
_BAD_FIELD = re.compile(rb"(?m)^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[^\r\n]*?"
                        rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


_BAD_LINE = "bad request line (expected METHOD SP target SP HTTP/1.x CRLF)"


def _line_problem(start: bytes) -> str | None:
    """Why the request line at the start of ``start`` is malformed (None: it
    is not, or is not whole yet): exactly ``method SP target SP version``."""
    start = start.lstrip(b"\r\n")
    end = start.find(b"\r\n")
    if end < 0:
        return None
    if start.count(b" ", 0, end) != 2 or start[:1] == b" ":
        return _BAD_LINE
    return None


def _skip_crlf(data: bytes, at: int) -> int:
    """``at`` past the empty lines llhttp skips before a request."""
    while data[at:at + 1] in (b"\r", b"\n") and at < len(data):
        at += 1
    return at


def _chunked_end(data: bytes, at: int) -> int:
    """The end of the chunked body that begins at ``at`` in ``data`` (whole
    there, and already accepted by the parser): size lines, data, trailers."""
    while True:
        eol = data.find(b"\r\n", at)
        size = int(data[at:eol].split(b";", 1)[0], 16)
        at = eol + 2
        if not size:
            break
        at += size + 2
    if data.startswith(b"\r\n", at):
        return at + 2
    return data.find(b"\r\n\r\n", at) + 4


def _request_line(start: bytes) -> tuple[bytes, bytes, bytes]:
    """Method, target and version of a request line, for the access log ("-": unknown)."""
    line = start.lstrip(b"\r\n").split(b"\r\n", 1)[0]
    parts = line.split(b" ")
    if len(parts) == 3 and all(parts):
        return parts[0][:32], parts[1], parts[2][:16]
    return b"-", b"-", b"-"


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


#: The header fields the edge acts on as it parses (see on_header).
_SPECIAL_FIELDS = {b"content-length": 0, b"transfer-encoding": 1, b"host": 2,
                   b"connection": 3}


def head_problem(version: bytes, target: bytes, hosts: int, host: bytes) -> str | None:
    """Why a request head must be refused with 400 beyond what the parser
    checks (None: it may go on): a control character in the target, not
    exactly one ``Host`` in HTTP/1.1 (at most one in 1.0), or one that is not
    a valid ``host[:port]`` — RFC 9112 3.2.  (Control characters in header
    values are the parser's: llhttp refuses them, strict by default, and
    tests/test_edge_protocol.py keeps that true.)  ``hosts`` and ``host``:
    the Host fields counted while the head was parsed, and the last one."""
    if _CONTROL.search(target):
        return "control character in the request target"
    if hosts > 1:
        return "more than one Host header"
    if hosts == 0:
        return "missing Host header (required in HTTP/1.1)" if version == b"HTTP/1.1" else None
    return host_problem(host)


_date_cache: list[Any] = [0, b""]


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


class _Stop(Exception):
    """Raised from a parser callback to stop parsing (the request was refused)."""


@implementer(IPushProducer)
class EdgeProtocol(Protocol):
    """One client connection: parse requests, run each through the pipeline,
    write the answers in order.

    It is its transport's producer: when the client stops reading, the
    answer's producer (a worker connection) is paused, and no further
    pipelined request is started until the client drains.
    """

    #: Slots: 10,000 idle keep-alive clients are 10,000 of these (a dict of
    #: ~45 attributes is ~2 KB more each).  Twisted's own (transport, factory,
    #: connected) stay in the instance dict Protocol gives.
    __slots__ = (
        "abort_call", "advance_waiting", "begun_at", "body_began", "body_bytes",
        "body_due", "chunk_data", "chunked", "chunks", "client_paused", "closing",
        "connection", "deadline_key", "deadline_kind", "declared_length", "fed",
        "feed_begins", "fields", "fields_size", "forwarded", "framing", "head_fed",
        "head_line", "held", "hold_at", "host", "host_field", "hosts", "idle_since",
        "in_head", "linger", "lingered", "parser", "parsing", "peer", "pipeline", "queue",
        "reading_paused", "refusal", "refused", "resumed", "secure", "site", "start",
        "url", "url_size",
    )

    def __init__(self, site: EdgeSite) -> None:
        self.site = site
        self.pipeline: Pipeline = site.pipeline
        self.parser = HttpRequestParser(self)
        #: Exchanges parsed and not yet answered; the first is being answered.
        #: (A list, not a deque: at most MAX_PIPELINED long, and an empty deque
        #: is 760 bytes on each of 10,000 idle connections.)
        self.queue: list[Exchange] = []
        #: The exchange whose body is being read (head complete, body not).
        self.parsing: Exchange | None = None
        # The head being read.
        self.in_head = False
        self.url: list[bytes] = []
        self.url_size = 0
        self.fields: list[tuple[bytes, bytes]] = []
        self.fields_size = 0
        self.head_fed = 0
        #: The declared Content-Length of the request being read (None: none).
        self.declared_length: int | None = None
        self.chunked = False
        self.chunks = 0
        self.chunk_data = 0
        self.framing = 0
        #: No more requests are read (a non-keep-alive one was, or a refusal).
        self.closing = False
        self.refused = False
        self.lingered = 0
        self.linger: Any = None
        self.abort_call: Any = None
        #: A refusal waiting for the answers before it (pipelining).
        self.refusal: tuple[int, str, tuple[tuple[bytes, bytes], ...]] | None = None
        #: The client's send buffer is full (it is not reading).
        self.client_paused = False
        #: An exchange finished while the client was not reading: the next waits.
        self.advance_waiting = False
        self.reading_paused = False
        #: The edge's own deadline: ("idle" | "head" | "body", key in site.head_deadlines).
        self.deadline_kind: str | None = None
        self.deadline_key: int | None = None
        #: Since when the connection has been idle (see _idle).
        self.idle_since = 0.0
        #: The Host fields and the Connection value of the head being parsed.
        self.hosts = 0
        self.host_field = b""
        self.connection: bytes | None = None
        self.body_began = 0.0
        self.body_bytes = 0
        self.body_due = 0.0
        #: The first bytes of the request being read (its request line).
        self.start = b""
        self.feed_begins = False
        #: The slice being parsed, where in it the request being read began
        #: (None: in an earlier slice; -1: not known), and for a slice that
        #: continues a request, how far it had got (in its head, the head's
        #: last line, body bytes): what finds a request pipelined inside a
        #: slice (see _next_start).
        self.fed = b""
        self.begun_at: int | None = None
        self.resumed: tuple[bool, bytes | None, int] = (False, None, 0)
        #: Bytes read and not parsed while MAX_PIPELINED requests wait (None: none
        #: held), and where in the slice the request to hold from begins.
        self.held: bytes | None = None
        self.hold_at: int | None = None
        #: The unfinished last line of the head so far, from its LF (None: not
        #: known): what a refusal's message is found in, with the next read.
        self.head_line: bytes | None = b""
        self.peer: Any = None
        self.host: Any = None
        self.secure = False
        #: The X-Forwarded-For/-Proto lines for this client (forward.client_forwarded).
        self.forwarded: bytes | None = None

    # -- the connection ------------------------------------------------------------

    def connectionMade(self) -> None:
        transport = self.transport
        try:
            transport.setTcpNoDelay(True)  # an answer is one write: send it now
        except (AttributeError, OSError):
            pass
        # (Eager writes come with the transport: cgipool.proxy.fastio's port.)
        self.peer = transport.getPeer()
        self.host = transport.getHost()
        self.secure = ISSLTransport.providedBy(transport)
        transport.registerProducer(self, True)
        self._idle()

    def getPeer(self) -> Any:
        return self.peer

    def getHost(self) -> Any:
        return self.host

    def isSecure(self) -> bool:
        return self.secure

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self._deadline(None)
        for call in (self.linger, self.abort_call):
            if call is not None and call.active():
                call.cancel()
        self.linger = self.abort_call = None
        queue, self.queue = self.queue, []
        self.parsing = None
        self.held = None
        for exchange in queue:
            if exchange.ran_head:
                exchange.connection_lost()

    # -- backpressure from the client (IPushProducer for our transport) -------------

    def _producer(self) -> Any:
        """The producer of the answer being sent (the first exchange's), if any."""
        return self.queue[0].producer if self.queue else None

    def pauseProducing(self) -> None:
        self.client_paused = True
        producer = self._producer()
        if producer is not None:
            producer.pauseProducing()

    def resumeProducing(self) -> None:
        self.client_paused = False
        producer = self._producer()
        if producer is not None:
            producer.resumeProducing()
        if self.advance_waiting:
            self.advance_waiting = False
            self._advance()

    def stopProducing(self) -> None:
        producer = self._producer()
        if producer is not None:
            producer.stopProducing()

    def _pause_reading(self) -> None:
        if not self.reading_paused:
            self.reading_paused = True
            self.transport.pauseProducing()

    def _resume_reading(self) -> None:
        if self.reading_paused and not self.refused:
            self.reading_paused = False
            self.transport.resumeProducing()

    # -- parsing -----------------------------------------------------------------

    def dataReceived(self, data: bytes) -> None:
        if self.refused:
            self.lingered += len(data)
            if self.lingered > LINGER_BYTES:
                self.transport.abortConnection()
            return
        if self.refusal is not None:
            return  # a refusal waits for the answers before it: nothing more is read
        if self.held is not None:
            self.held += data  # MAX_PIPELINED requests wait: parsed once they drain
            return
        if len(data) <= FEED_SLICE:
            self._feed(data, b"")
            return
        # A large read is parsed in slices, so that what a chunked body spends on
        # framing (which the parser does not report) is measured per slice.
        for offset in range(0, len(data), FEED_SLICE):
            if not self._feed(data[offset:offset + FEED_SLICE], data[offset + FEED_SLICE:]):
                return

    def _feed(self, data: bytes, rest: bytes) -> bool:
        """Parse ``data`` (``rest`` follows it); False: stop (refused, or the
        parser was replaced after an upgrade and was given ``rest`` itself)."""
        self.fed = data
        parsing = self.parsing
        body_feed = parsing is not None and self.chunked
        before = self.chunk_data
        context = self.head_line if self.in_head else b"" if parsing is None else None
        if not self.in_head and parsing is None:
            # A request begins: its request line, when whole here, is checked
            # (llhttp allows runs of spaces) and kept for the access log.
            self.start = data[:2048]
            self.feed_begins = True
            problem = _line_problem(self.start)
            if problem is not None:
                self.refuse(400, problem)
                return False
        else:
            # A request goes on from an earlier slice: where it had got, should
            # another begin after it in this one.
            self.begun_at = None
            self.resumed = (self.in_head, context, before)
        if self.in_head and 0 < len(self.start) < 2048 and \
                b"\r\n" not in self.start.lstrip(b"\r\n"):
            # Its request line began in an earlier read: checked once it is whole
            # here, as it would have been in one read.
            self.start += data[:2048 - len(self.start)]
            problem = _line_problem(self.start)
            if problem is not None:
                self.refuse(400, problem)
                return False
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade as e:
            self._upgraded(data[e.args[0] if e.args else len(data):] + rest)
            return False
        except _Stop:
            return False
        except HttpParserInvalidMethodError:
            self._bad_start()
            return False
        except HttpParserError as e:
            if self.hold_at is not None:
                self._hold(data[self.hold_at:] + rest)
                return False
            if self.closing or self.refused or isinstance(e.__context__, _Stop):
                return False  # data after a closing request, or refused: dropped
            self.refuse(400, self._parse_problem(
                str(e), data if context is None else context + data, 1 if context else 0))
            return False
        if self.refused:
            return False
        if self.in_head:
            self.head_fed += len(data)
            if self.head_fed > MAX_HEAD_BYTES:
                self._too_long()
                return False
            if self.deadline_kind != "head":
                self._deadline("head", self.site.header_timeout)
            end = data.rfind(b"\n")
            line = data[end:] if end >= 0 else None if context is None else context + data
            self.head_line = line if line is not None and len(line) <= 256 else None
        elif body_feed and parsing is self.parsing and parsing is not None:
            # The whole slice was this chunked body: what was not data was framing.
            self.framing += len(data) - (self.chunk_data - before)
            if self.framing > FRAMING_FREE + self.chunk_data // FRAMING_RATIO:
                self.refuse(400, f"chunked body with {self.framing} bytes of chunk framing, "
                                 f"extensions and trailers for {self.chunk_data} bytes of data")
                return False
        return not self.closing or self.parsing is not None or self.in_head

    def _upgraded(self, rest: bytes) -> None:
        """llhttp stops after a request with ``Upgrade`` (or ``CONNECT``): the
        request itself was handled as any other (no tunnel, no protocol
        switch: ``Upgrade`` is hop-by-hop and not forwarded); parsing goes on
        with what follows."""
        self.parser = HttpRequestParser(self)
        if rest and not self.closing and not self.refused:
            self.dataReceived(rest)

    def _bad_start(self) -> None:
        if self.closing:
            return
        # The request's first bytes so far (self.start, empty when where it began
        # inside this read is not known: see _next_start).
        start = self.start
        if not start:
            self.refuse(400, "bad request: a pipelined request does not begin "
                             "with a known method")
        elif start[:1] == b"\x16":  # a TLS handshake record (a read may hold one byte)
            self.refuse(400, "this port speaks plain HTTP, not TLS")
        elif _TOKEN_START.match(start[:64]):
            method = start.lstrip(b"\r\n").split(b" ", 1)[0]
            self.refuse(501, f"method {method[:20].decode('latin-1')!r} is not implemented")
        elif len(start) < 64 and _TOKEN_PREFIX.fullmatch(start):
            # A method llhttp does not know, its space not read yet: the next read
            # tells 501 from 400, as one read would (the parser keeps its error,
            # and start grows with each read); the head deadline bounds the wait.
            if self.deadline_kind != "head":
                self._deadline("head", self.site.header_timeout)
        else:
            self.refuse(400, "bad request: these bytes cannot begin an HTTP request line")

    def _parse_problem(self, problem: str, data: bytes, skip: int = 0) -> str:
        """A refusal's message for the parser's ``problem`` with ``data`` (its
        first ``skip`` bytes: the LF of an earlier read's line)."""
        lower = problem.lower()
        if "header value char" in lower:
            bad = _BAD_FIELD.search(data)
            if bad is not None:
                return f"control character in header {bad.group(1).decode('latin-1')[:40]!r}"
        if "in url" in lower and _CONTROL.search(data.lstrip(b"\r\n").split(b"\r\n", 1)[0]):
            return "control character in the request target"
        if "lf" in lower and "cr" in lower and _BARE_LF.search(data, skip):
            return "bare LF line endings in the request head (lines end with CRLF)"
        if "after version" in lower:
            return _BAD_LINE
        if "whitespace" in lower and (b"\n " in data or b"\n\t" in data):
            return "obsolete line folding in the header block is not accepted"
        if "transfer-encoding" in lower:
            return ("Transfer-Encoding is not supported unless it is exactly 'chunked' "
                    f"({problem})")
        return f"bad request: {problem}"

    def _too_long(self) -> None:
        if not self.fields and self.url_size and b"\n" not in b"".join(self.url[-1:]):
            self.refuse(414, f"request line longer than {MAX_LINE} bytes")
        else:
            self.refuse(431, f"request head larger than {MAX_HEADERS_SIZE} bytes")

    # httptools callbacks (their names are the parser's)

    def on_message_begin(self) -> None:
        if self.closing:
            raise _Stop()
        if self.feed_begins:
            self.feed_begins = False
            self.begun_at = 0
        else:
            self._begins_inside()
        self.in_head = True
        self.url = []
        self.url_size = 0
        self.fields = []
        self.fields_size = 0
        self.head_fed = 0
        self.declared_length = None
        self.chunked = False
        self.chunks = self.chunk_data = self.framing = 0
        self.hosts = 0
        self.host_field = b""
        self.connection = None
        # (An idle deadline stays: deadline_passed sees the connection is busy.)

    def _begins_inside(self) -> None:
        """A request begins inside this slice, after another: its request line
        is checked as at the start of a read, and when MAX_PIPELINED wait,
        what is left of the read is held from here."""
        at = self._next_start()
        if at is None:
            self.begun_at = -1
            self.start = b""  # not known: unchecked (see _next_start)
            self.held = None
            return
        self.begun_at = at
        if self.held is not None:
            self.hold_at = at
            raise _Stop()
        self.start = self.fed[at:at + 2048]
        problem = _line_problem(self.start)
        if problem is not None:
            self.refuse(400, problem)
            raise _Stop()

    def _next_start(self) -> int | None:
        """Where in the slice the request beginning now starts: the end of the
        one before, from where that one began and its framing (None: not known,
        when that one's chunked body went on from an earlier slice)."""
        fed, at = self.fed, self.begun_at
        seen = 0
        if at == -1:
            return None
        if at is not None:
            head_end = fed.find(b"\r\n\r\n", _skip_crlf(fed, at)) + 4
        else:
            in_head, context, seen = self.resumed
            if in_head:
                # Its head's end may straddle the slices: the earlier one's last
                # bytes are prepended (its last line from its LF, whose CR the
                # strict parser required; an unknown long line: at most its CR).
                tail = (b"\r" + (context or b""))[-3:]
                head_end = (tail + fed).find(b"\r\n\r\n") + 4 - len(tail)
                seen = 0
            elif self.chunked:
                return None
            else:
                head_end = 0
        if self.chunked:
            return _chunked_end(fed, head_end)
        return head_end + (self.declared_length or 0) - seen

    def on_url(self, fragment: bytes) -> None:
        self.url.append(fragment)
        self.url_size += len(fragment)
        if self.url_size > MAX_LINE:
            self.refuse(414, f"request line longer than {MAX_LINE} bytes")
            raise _Stop()

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.in_head:
            # A trailer field (after a chunked body): as costly as a chunk; dropped.
            self._chunk_counted()
            return
        size = self.fields_size = self.fields_size + len(name) + len(value) + 4
        if size > MAX_HEADERS_SIZE:
            self.refuse(431, f"header block larger than {MAX_HEADERS_SIZE} bytes")
            raise _Stop()
        # (The count is checked once the head is whole: the size bounds it meanwhile.)
        value = value.rstrip(b" \t")  # llhttp has dropped the leading OWS
        special = _SPECIAL_FIELDS.get(name.lower())
        if special is not None:
            if special == 0:  # content-length
                self.declared_length = int(value)
            elif special == 1:  # transfer-encoding
                if value.lower() != b"chunked":
                    # Only chunked is understood; anything else (identity, gzip,
                    # lists) is a smuggling vector when a hop reads it differently.
                    self.refuse(501, f"Transfer-Encoding {value[:40]!r} is not supported "
                                     "(only 'chunked')")
                    raise _Stop()
                self.chunked = True
            elif special == 2:  # host
                self.hosts += 1
                self.host_field = value
            else:  # connection
                connection = self.connection
                self.connection = value if connection is None else connection + b"," + value
        self.fields.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        if self.deadline_kind == "head":
            self._deadline(None)
        parser = self.parser
        version = _VERSIONS.get(parser.get_http_version())
        if version is None:
            self.refuse(505, f"HTTP version {parser.get_http_version()!r} is not supported "
                             "(HTTP/1.0 and HTTP/1.1 are)")
            raise _Stop()
        uri = b"".join(self.url)
        fields = self.fields
        if len(fields) > MAX_HEADERS:
            self.refuse(431, f"more than {MAX_HEADERS} header fields")
            raise _Stop()
        if (self.declared_length or self.chunked) and parser.should_upgrade():
            # llhttp skips the body of an upgrade request and would parse it as
            # the next request (smuggling); cgipool switches no protocol, so
            # such a request is refused rather than framed two ways.
            self.refuse(400, "a request asking for a protocol upgrade may not have a body")
            raise _Stop()
        problem = head_problem(version, uri, self.hosts, self.host_field)
        if problem is not None:
            self.refuse(400, problem)
            raise _Stop()
        keep = version == b"HTTP/1.1"
        connection = self.connection
        tokens = NO_TOKENS if connection is None else connection_tokens(connection)
        if tokens:
            if b"close" in tokens:
                keep = False
            elif b"keep-alive" in tokens and version == b"HTTP/1.0":
                keep = True
        exchange = Exchange(self, parser.get_method(), uri, version, fields, keep,
                            self.site.reactor.seconds())
        exchange.listed = tokens
        if not keep:
            self.closing = True
        self.queue.append(exchange)
        if self.declared_length or self.chunked:
            self.parsing = exchange
        if len(self.queue) == 1:
            self._start(exchange)
            if self.refused:
                raise _Stop()
        else:
            exchange.pending = []  # behind another answer: held until its turn
            self._pause_reading()
        if self.parsing is exchange and not self.refused:
            self._body_deadline()

    def on_body(self, data: bytes) -> None:
        exchange = self.parsing
        if exchange is None:
            return
        self.chunk_data += len(data)
        if self.deadline_kind == "body":
            self._body_progress(len(data))
        pending = exchange.pending
        if pending is not None:
            pending.append(data)
            if self.chunk_data > exchange.body_budget and exchange.ran_head:
                self.refuse(413, "request body larger than the limit for this route")
                raise _Stop()
            return
        if not exchange.body_write(data):
            self.refuse(413, "request body larger than the limit for this route")
            raise _Stop()

    def on_chunk_header(self) -> None:
        self._chunk_counted()

    def _chunk_counted(self) -> None:
        self.chunks += 1
        if self.chunks > CHUNKS_FREE + self.chunk_data // CHUNK_MIN_AVERAGE:
            self.refuse(400, f"chunked body with {self.chunks} chunks for {self.chunk_data} "
                             f"bytes (at most {CHUNKS_FREE} plus one per "
                             f"{CHUNK_MIN_AVERAGE} bytes)")
            raise _Stop()

    def on_message_complete(self) -> None:
        exchange = self.parsing
        if exchange is None:
            exchange = self.queue[-1] if self.queue else None
        else:
            self.parsing = None
            if self.deadline_kind == "body":
                self._deadline(None)
        if exchange is None:
            return
        exchange.complete = True
        if exchange.pending is None:
            if exchange.ran_head and not exchange.ended:
                self._dispatch(exchange)
        elif len(self.queue) >= MAX_PIPELINED and self.held is None:
            # Enough wait: what follows in this read is held (see _begins_inside).
            self.held = b""

    # -- running exchanges in order ------------------------------------------------

    def _start(self, exchange: Exchange) -> None:
        """``exchange`` is first in line: its head stages, then (when its body
        is in) its dispatch."""
        exchange.ran_head = True
        exchange.stages = self.pipeline
        if not self.pipeline.head(exchange):
            if not exchange.ended:
                # A stage answered it itself (an error): that ends it.
                if not exchange.finished and not self.refused:
                    exchange.error(500, "the request was stopped without an answer")
            return
        pending, exchange.pending = exchange.pending, None
        if pending:
            for data in pending:
                if not exchange.body_write(data):
                    self.refuse(413, "request body larger than the limit for this route")
                    return
        if exchange.complete:
            self._dispatch(exchange)

    def _dispatch(self, exchange: Exchange) -> None:
        """The request stages of ``exchange``.  An answer made during them (a
        daemon page renders at once) ends the exchange only after the last of
        them: every stage sees ``request`` before any sees ``end``."""
        exchange.dispatching = True
        try:
            self.pipeline.request(exchange)
        finally:
            exchange.dispatching = False
        due, exchange.due = exchange.due, None
        if due is not None:
            due(exchange)

    def continue_if_expected(self, exchange: Exchange) -> None:
        """``100 Continue`` when the client waits for it before its body."""
        if exchange.clientproto != b"HTTP/1.1" or exchange.complete:
            return
        if not (self.declared_length or self.chunked) or self.parsing is not exchange:
            return
        expect = exchange.header(b"expect")
        if expect is not None and expect.lower() == b"100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def exchange_ended(self, exchange: Exchange) -> None:
        """Once per exchange: its end stages (the access log, the metrics)."""
        if exchange.ended:
            return
        if exchange.dispatching:
            exchange.due = exchange.due or self.exchange_ended
            return
        exchange.ended = True
        if exchange.ran_head:
            self.pipeline.end(exchange)

    def exchange_done(self, exchange: Exchange) -> None:
        """``exchange`` was answered in full: on to the next, or close."""
        if exchange.dispatching:
            exchange.due = self.exchange_done
            return
        self.exchange_ended(exchange)
        if self.queue and self.queue[0] is exchange:
            del self.queue[0]
        if self.refused:
            return
        if not exchange.keep_alive:
            self.closing = True
            self.queue.clear()
            self._close()
            return
        if self.client_paused:
            # The client does not read: start nothing more until it drains.
            self._pause_reading()
            self.advance_waiting = True
            return
        self._advance()

    def _hold(self, rest: bytes) -> None:
        """Keep ``rest`` (from a request's start) for when the queue drains; a
        new parser takes it then (the old one stopped with an error)."""
        self.hold_at = None
        self.held = rest + (self.held or b"")
        self.parser = HttpRequestParser(self)
        self._pause_reading()

    def _release(self) -> None:
        """Parse what was held: half of MAX_PIPELINED were answered."""
        held, self.held = self.held, None
        if held:
            self.dataReceived(held)

    def _advance(self) -> None:
        queue = self.queue
        if queue:
            exchange = queue[0]
            if not exchange.ran_head:
                self._start(exchange)
            if self.held is not None and len(queue) <= MAX_PIPELINED // 2 and \
                    not self.refused and self.refusal is None:
                self._release()
            if len(queue) > 1:
                return
        if self.refusal is not None and not queue:
            code, message, headers = self.refusal
            self.refusal = None
            self.refuse(code, message, headers)
            return
        self._resume_reading()
        if not queue and not self.in_head and self.parsing is None and not self.closing:
            self._idle()

    def cut(self, exchange: Exchange, abort: bool = False) -> None:
        """End ``exchange`` without completing its answer: the connection closes
        (``abort``: at once, dropping what is buffered)."""
        self.exchange_ended(exchange)
        self.closing = True
        self.queue.clear()
        if abort:
            self.transport.abortConnection()
        else:
            self._close()

    def _unregister(self) -> None:
        """Stop being our transport's producer before closing it: a transport
        does not close while a producer is registered (ITransport.loseConnection),
        so an edge paused by a full client buffer would hold the connection open
        until ABORT_TIMEOUT (twisted.web's HTTPChannel.loseConnection does the same)."""
        try:
            self.transport.unregisterProducer()
        except RuntimeError:
            pass  # none registered (a test's StringTransport says so)

    def _close(self) -> None:
        self._deadline(None)  # closing: no idle (or other) deadline of its own left
        self._unregister()
        self.transport.loseConnection()
        self.abort_call = self.site.reactor.callLater(ABORT_TIMEOUT,
                                                      self.transport.abortConnection)

    def refuse(self, code: int, message: str,
               headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
        """Answer ``code`` with a JSON ``message`` and close: the write side
        now, and what the client still sends is read and dropped for a moment
        so it sees the answer, not a reset."""
        if self.refused:
            return
        current = self.queue[0] if self.queue else None
        if current is not None and current.ran_head and not current.finished and \
                current is not self._refused_exchange():
            # An earlier answer is still on its way: this one follows it.
            self.refusal = (code, message, tuple(headers))
            self._pause_reading()
            return
        self.refused = True
        self._deadline(None)
        body = error_body(code, message)
        reason = RESPONSES.get(code) or REASONS.get(code, b"Error")
        extra = b"".join(b"%s: %s\r\n" % pair for pair in headers)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nCache-Control: "
            b"no-store\r\n%sConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (code, reason, extra, len(body), body))
        exchange = self._refused_exchange()
        if exchange is None:
            # Refused before its head was whole: a line in the access log all the same.
            method, uri, version = _request_line(self.start)
            exchange = Exchange(self, method, uri, version, [], False,
                                self.site.reactor.seconds())
            exchange.ran_head = True
        exchange.code = code
        exchange.sentLength = len(body)
        exchange.started = exchange.finished = True
        self.exchange_ended(exchange)
        self.queue.clear()
        self.parsing = None
        self._resume_reading()
        self._unregister()
        self.transport.loseWriteConnection()
        self.linger = self.site.reactor.callLater(LINGER_SECONDS, self.transport.abortConnection)

    def _refused_exchange(self) -> Exchange | None:
        """The exchange a refusal now is about: the one being read, if any."""
        parsing = self.parsing
        if parsing is not None:
            return parsing
        if self.queue and not self.queue[-1].started:
            last = self.queue[-1]
            if not last.complete or not last.ran_head or last.route is None and \
                    not last.started:
                return last if last.ran_head and not last.finished else None
        return None

    # -- the edge's deadlines -------------------------------------------------------

    def _deadline(self, kind: str | None, after: float | None = None,
                  at: float | None = None) -> None:
        deadlines = self.site.head_deadlines
        key = self.deadline_key
        if key is not None:
            self.deadline_key = None
            deadlines.remove(self, key)
        self.deadline_kind = kind
        if kind is not None:
            if at is None:
                at = deadlines.reactor.seconds() + (after or 0.0)
            self.deadline_key = deadlines.add(self, at)

    def _idle(self) -> None:
        """The connection is idle from now: closed after ``site.timeOut`` unless a
        request begins.  An idle deadline already set is kept (not moved per
        request): when it passes, deadline_passed re-arms it for what is left."""
        self.idle_since = now = self.site.reactor.seconds()
        if self.deadline_kind != "idle":
            self._deadline("idle", at=now + self.site.timeOut)

    def _body_deadline(self) -> None:
        now = self.site.reactor.seconds()
        self.body_began, self.body_bytes = now, 0
        self.body_due = now + BODY_TIMEOUT
        self._deadline("body", at=self.body_due)

    def _body_progress(self, size: int) -> None:
        self.body_bytes += size
        due = self.body_began + BODY_TIMEOUT + self.body_bytes / MIN_BODY_RATE
        if due - self.body_due >= min(1.0, BODY_TIMEOUT / 4):
            # Moved once per second of credit, not per chunk of a fast upload.
            self.body_due = due
            self._deadline("body", at=due)

    def deadline_passed(self, now: float) -> None:
        kind, self.deadline_kind, self.deadline_key = self.deadline_kind, None, None
        if kind == "idle":
            timeout = self.site.timeOut
            if self.queue or self.in_head or self.parsing is not None:
                self._deadline("idle", at=now + timeout)  # busy: idle again after it
            elif now < self.idle_since + timeout:
                self._deadline("idle", at=self.idle_since + timeout)
            else:
                self.closing = True
                self._close()
        elif kind == "head":
            self.refuse(408, "the request head did not arrive in time")
        elif kind == "body":
            self.refuse(408, f"the request body did not arrive in time (at least "
                             f"{MIN_BODY_RATE} bytes/s after the first {BODY_TIMEOUT:g} s)")


class EdgeSite(Site):
    """The proxy's (and the admin's) listener: builds :class:`EdgeProtocol`,
    holds the pipeline, the limits and the access log."""

    protocol = EdgeProtocol  # type: ignore[assignment]
    displayTracebacks = False
    noisy = False

    def __init__(self, root: Resource, access_log: str | None = None,
                 reactor: Any = None, idle_timeout: float = IDLE_TIMEOUT,
                 trusted_proxies: Sequence[Any] = (), logs: LogsConfig | None = None,
                 client_timeout: float = CLIENT_TIMEOUT,
                 pipeline: Pipeline | None = None) -> None:
        super().__init__(root, logPath=access_log, reactor=reactor)
        from cgipool.proxy.webbridge import EdgeRequest  # it imports this module
        self.requestFactory = EdgeRequest
        #: The stages every request passes (cgipool/proxy/pipeline.py).
        self.pipeline = pipeline if pipeline is not None else Pipeline.default()
        #: How the access log rotates (cgipool/logs.py).
        self.logs = logs if logs is not None else LogsConfig()
        self.timeOut = idle_timeout
        #: Seconds a client may read nothing of a streamed response (→ cut, 499).
        self.client_timeout = client_timeout
        #: Networks whose X-Forwarded-* headers are kept (see forward.request_head).
        self.trusted_proxies = tuple(trusted_proxies)
        #: Seconds a request head may take to arrive (→ 408), and its timer.
        self.header_timeout = HEADER_TIMEOUT
        # keep_timer: a head nearly always arrives within one read, so its
        # deadline is removed at once; released in stopFactory.
        self.head_deadlines = Deadlines(self.reactor, tick=0.25, keep_timer=True)
        #: No port listens any more (the daemon stops): answers close their connection.
        self.stopped = False

    def buildProtocol(self, addr: Any) -> EdgeProtocol:
        return EdgeProtocol(self)

    def date(self) -> bytes:
        return http_date()

    def startFactory(self) -> None:
        super().startFactory()
        self.stopped = False
        self.head_deadlines.keep_timer = True
        if self.logPath:
            # twisted.web's file grows without end: rotate by size, `keep` old files.
            self.logFile.close()
            self.logFile = RotatingLogFile.open(self.logPath, self.logs.max_bytes,
                                                self.logs.keep)

    def stopFactory(self) -> None:
        super().stopFactory()
        # Connections still open keep their deadlines; the timer goes with the last.
        self.stopped = True
        self.head_deadlines.release_timer()

    def log(self, request: Any) -> None:
        # twisted.web logs every request to the main log unless told where;
        # we write an access log only when one is configured.
        if self.logPath:
            super().log(request)
