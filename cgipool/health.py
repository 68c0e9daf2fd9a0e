"""Active health checks: HTTP GETs of each worker's health path.

Right after a spawn the probe runs on a fast, growing schedule (5 ms, then ×1.5
up to 100 ms) so a worker is in rotation within ~100 ms of listening; after the
first pass it runs every ``health.interval`` seconds.  Verdicts go to the pool,
which owns the policy (``fall`` failures → restart).  Passive failures seen by
the proxy (a refused connection) ask for a check soon via :meth:`check_soon`.

The probe (:class:`HttpProbe`) is a small HTTP/1.1 client of its own on public
Twisted ground (``connectTCP``, a ``Protocol``, a quiet ``ClientFactory``): one
``GET`` per connection, the head parsed as strictly as the proxy parses it, the
body read to its end and dropped.  A failed probe's reason is what the dashboard
and ``why_not_ready`` show: ``connection refused``, ``timeout``, ``HTTP 404``
(an answer, but a wrong one), ``no response (connection closed)``,
``invalid response: …``, ``response truncated (…)``.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable
from typing import Protocol

from twisted.internet import error, protocol
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress, IConnector, IDelayedCall, IReactorTime
from twisted.python.failure import Failure

from cgipool.config import HealthConfig
from cgipool.supervisor.worker import HealthResult, Worker

#: ``probe(port, path) -> Deferred`` that fires on a healthy answer and fails otherwise.
Probe = Callable[[int, str], "Deferred[object]"]

STARTUP_FIRST_DELAY = 0.005
STARTUP_GROWTH = 1.5
STARTUP_MAX_DELAY = 0.1
#: After a passive failure, how soon to look again.
CHECK_SOON_DELAY = 0.05
#: A probe's TCP connect gives up after this long (``health.timeout``, enforced by
#: the monitor, is usually shorter and cancels the probe first).
CONNECT_TIMEOUT = 5
#: Bounds of what a probe reads, as the proxy's (``cgipool/proxy/upstream.py``).
MAX_HEAD = 64 * 1024
MAX_CHUNK_LINE = 4096
MAX_INTERIM = 16


class HealthListener(Protocol):
    def health_passed(self, worker: Worker) -> None: ...
    def health_failed(self, worker: Worker, error: str) -> None: ...
    def startup_timed_out(self, worker: Worker) -> None: ...


class UnhealthyResponse(Exception):
    """The worker answered, but not with a 2xx/3xx status."""


class ProbeFailed(Exception):
    """The worker gave no complete HTTP response (the message says what came)."""


class BadResponse(Exception):
    """What the worker sent is not an HTTP/1.x response."""


_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_REASON = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = frozenset(b"0123456789abcdefABCDEF")


def parse_head(head: bytes) -> tuple[int, int | None, bool]:
    """A response head (without its final CRLFCRLF) → ``(status, content_length,
    chunked)``, as strict as the proxy's ``parse_head`` on what a probe reads.

    (Not that function itself: ``cgipool.proxy`` imports the supervisor, which
    imports this module, so importing it here would make a package cycle.)
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
    content_length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not _TOKEN.fullmatch(name):
            raise BadResponse(f"bad header line {line[:80]!r}")
        value = value.strip(b" \t")
        if b"\n" in value or b"\r" in value or b"\0" in value:
            raise BadResponse("bad character in header value")
        name = name.lower()
        if name == b"content-length":
            if not value.isdigit():
                raise BadResponse(f"bad Content-Length {value[:40]!r}")
            if content_length is not None and content_length != int(value):
                raise BadResponse("conflicting Content-Length headers")
            content_length = int(value)
        elif name == b"transfer-encoding":
            codings = [t.strip().lower() for t in value.split(b",") if t.strip()]
            chunked = bool(codings) and codings[-1] == b"chunked"
            if not chunked:
                content_length = None  # not chunked last: to the end of the connection
    if chunked:
        content_length = None  # Transfer-Encoding wins (RFC 9112 6.3)
    return status, content_length, chunked


def request_target(path: str) -> bytes:
    """``health.path`` as a request target: the fragment dropped, and spaces,
    control characters and non-ASCII percent-encoded (UTF-8), as a client would."""
    path = path.split("#", 1)[0]
    return urllib.parse.quote(path, safe=_VISIBLE).encode("ascii")


_VISIBLE = "".join(chr(c) for c in range(0x21, 0x7F))


def probe_request(host: str, port: int, path: str) -> bytes:
    """The bytes of one probe: a ``GET`` on a connection of its own."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return (b"GET " + request_target(path) + b" HTTP/1.1\r\n"
            b"Host: " + authority.encode("ascii") + b"\r\n"
            b"User-Agent: cgipool-health\r\n"
            b"Connection: close\r\n\r\n")


class _ProbeProtocol(protocol.Protocol):
    """Sends the request, reads one response to its end, then closes.

    The head (at most ``MAX_HEAD``) is parsed as strictly as the proxy parses a
    worker's answers (:func:`parse_head`); 1xx interim
    answers are skipped.  The body is read to its end (``Content-Length``,
    chunked, or the end of the connection) and thrown away as it comes: only the
    head and a chunk-size line are ever kept.
    """

    def __init__(self, probe: "_ProbeCall") -> None:
        self.probe = probe
        self.buffer = b""
        self.received = False
        self.status = 0
        self.interim = 0
        self.state = "head"  # head, body, chunk-size, chunk-data, chunk-end, trailer, close, done
        self.remaining = 0

    def connectionMade(self) -> None:
        self.transport.write(self.probe.request)  # type: ignore[union-attr]

    def dataReceived(self, data: bytes) -> None:
        if self.state == "done":
            return
        self.received = True
        try:
            self._feed(data)
        except BadResponse as e:
            self._end(Failure(ProbeFailed(f"invalid response: {e}")))

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.state == "done":
            return
        how = "closed" if reason.check(error.ConnectionDone) else "lost"
        if self.state == "close":
            self._answered()  # the body ran to the end of the connection
        elif self.state == "head" and not self.buffer and not self.received:
            self._end(Failure(ProbeFailed(f"no response (connection {how})")))
        else:
            self._end(Failure(ProbeFailed(f"response truncated (connection {how})")))

    # -- reading ------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        buffer = self.buffer + data
        while buffer and self.state != "done":
            state = self.state
            if state == "head":
                end = buffer.find(b"\r\n\r\n")
                if end < 0:
                    if len(buffer) > MAX_HEAD:
                        raise BadResponse(f"response head over {MAX_HEAD} bytes")
                    break
                if end > MAX_HEAD:
                    raise BadResponse(f"response head over {MAX_HEAD} bytes")
                head, buffer = buffer[:end], buffer[end + 4:]
                self._head(head)
            elif state in ("body", "chunk-data"):
                taken = min(len(buffer), self.remaining)
                buffer = buffer[taken:]
                self.remaining -= taken
                if self.remaining == 0:
                    if state == "body":
                        self._answered()
                    else:
                        self.state = "chunk-end"
            elif state == "close":
                buffer = b""  # to the end of the connection
            else:  # chunk-size, chunk-end, trailer: one line at a time
                end = buffer.find(b"\r\n")
                if end < 0:
                    if len(buffer) > MAX_CHUNK_LINE:
                        raise BadResponse("chunk line too long")
                    break
                line, buffer = buffer[:end], buffer[end + 2:]
                self._line(line)
        self.buffer = b"" if self.state == "done" else buffer

    def _head(self, head: bytes) -> None:
        status, length, chunked = parse_head(head)
        if status < 200:
            self.interim += 1
            if self.interim > MAX_INTERIM:
                raise BadResponse("too many interim (1xx) responses")
            return  # the real answer follows
        self.status = status
        if status in (204, 304):
            self._answered()
        elif chunked:
            self.state = "chunk-size"
        elif length is not None:
            self.remaining = length
            self.state = "body"
            if length == 0:
                self._answered()
        else:
            self.state = "close"

    def _line(self, line: bytes) -> None:
        if self.state == "chunk-end":
            if line:
                raise BadResponse("no CRLF after a chunk")
            self.state = "chunk-size"
        elif self.state == "chunk-size":
            size = line.split(b";", 1)[0].strip(b" \t")
            if not size or len(size) > 16 or not all(c in _HEX for c in size):
                raise BadResponse(f"bad chunk size {line[:40]!r}")
            self.remaining = int(size, 16)
            self.state = "chunk-data" if self.remaining else "trailer"
        elif line:  # a trailer field: read past it
            self.remaining += len(line) + 2
            if self.remaining > MAX_HEAD:
                raise BadResponse(f"trailers over {MAX_HEAD} bytes")
        else:
            self._answered()

    # -- the verdict ----------------------------------------------------------------

    def _answered(self) -> None:
        status = self.status
        if 200 <= status < 400:
            self._end(status)
        else:
            self._end(Failure(UnhealthyResponse(f"HTTP {status}")))

    def _end(self, result: "int | Failure") -> None:
        self.state = "done"
        self.buffer = b""
        if self.transport is not None:
            self.transport.loseConnection()
        self.probe.finish(result)


class _ProbeCall(protocol.ClientFactory):
    """One probe: its connection attempt, its protocol and its Deferred."""

    noisy = False  # no "Starting factory" / "Stopping factory" log lines per probe

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.connector: IConnector | None = None
        self.connection: _ProbeProtocol | None = None
        self.deferred: Deferred[object] = Deferred(self._cancel)

    def buildProtocol(self, addr: IAddress) -> _ProbeProtocol:
        self.connection = _ProbeProtocol(self)
        return self.connection

    def clientConnectionFailed(self, connector: IConnector, reason: Failure) -> None:
        self.finish(reason)

    def finish(self, result: "int | Failure") -> None:
        if not self.deferred.called:  # not after a cancel
            if isinstance(result, Failure):
                self.deferred.errback(result)
            else:
                self.deferred.callback(result)

    def _cancel(self, _: Deferred[object]) -> None:
        # The Deferred fails with CancelledError ("timeout"); whatever the
        # connection does after this is ignored.
        connection = self.connection
        if connection is not None and connection.transport is not None:
            connection.state = "done"
            connection.transport.abortConnection()  # type: ignore[attr-defined]
        elif self.connector is not None:
            self.connector.disconnect()


class HttpProbe:
    """GET ``http://127.0.0.1:<port><path>`` on a fresh connection; success is a
    complete 2xx/3xx answer (the status, as the Deferred's result).

    A fresh connection per probe: a check must see the worker as a new client
    would, and nothing is left open when the daemon stops.  Plain ``connectTCP`` to
    an IP literal (no resolver), a factory that logs nothing, and a cancel that
    aborts the connection (the monitor's ``health.timeout``).
    """

    def __init__(self, reactor: IReactorTime, host: str = "127.0.0.1",
                 connect_timeout: float = CONNECT_TIMEOUT) -> None:
        self.reactor = reactor
        self.host = host
        self.connect_timeout = connect_timeout

    def __call__(self, port: int, path: str) -> Deferred[object]:
        call = _ProbeCall(probe_request(self.host, port, path))
        call.connector = self.reactor.connectTCP(  # type: ignore[attr-defined]
            self.host, port, call, timeout=self.connect_timeout)
        return call.deferred


def describe_failure(failure: Failure) -> str:
    """A short reason for the dashboard: 'connection refused', 'timeout', 'HTTP 500'."""
    exc = failure.value
    if isinstance(exc, CancelledError):
        return "timeout"
    if isinstance(exc, error.ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, (UnhealthyResponse, ProbeFailed)):
        return str(exc)
    if isinstance(exc, error.TimeoutError):
        return "timeout"
    name = type(exc).__name__
    text = str(exc)
    return f"{name}: {text}" if text else name


class HealthMonitor:
    """The probe loop of one worker process (a new monitor per process)."""

    def __init__(self, clock: IReactorTime, probe: Probe, worker: Worker,
                 config: HealthConfig, listener: HealthListener) -> None:
        self.clock = clock
        self.probe = probe
        self.worker = worker
        self.config = config
        self.listener = listener
        self.starting = True
        self.stopped = False
        self._deadline = 0.0
        self._delay = STARTUP_FIRST_DELAY
        self._timer: IDelayedCall | None = None
        self._pending: Deferred[object] | None = None

    def start(self, start_timeout: float) -> None:
        """Probe fast until the first pass, giving up after ``start_timeout``."""
        self._deadline = self.clock.seconds() + start_timeout
        self._schedule(STARTUP_FIRST_DELAY)

    def check_soon(self) -> None:
        """Probe shortly instead of waiting for the next interval."""
        if self.stopped or self._pending is not None:
            return
        if self._timer is not None and self._timer.getTime() - self.clock.seconds() <= CHECK_SOON_DELAY:
            return
        self._schedule(CHECK_SOON_DELAY)

    def stop(self) -> None:
        self.stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()

    def _schedule(self, delay: float) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._run)

    def _run(self) -> None:
        self._timer = None
        if self.stopped or self.worker.port is None:
            return
        started = self.clock.seconds()
        d = self.probe(self.worker.port, self.config.path)
        self._pending = d
        timeout = self.clock.callLater(self.config.timeout, d.cancel)

        def done(result: object) -> None:
            if timeout.active():
                timeout.cancel()
            if self._pending is not d:
                return  # stopped meanwhile
            self._pending = None
            if isinstance(result, Failure):
                self._failed(describe_failure(result))
            else:
                self._passed(self.clock.seconds() - started)

        d.addBoth(done)

    def _passed(self, latency: float) -> None:
        worker = self.worker
        worker.last_health = HealthResult(True, self.clock.seconds(), latency)
        worker.health_failures = 0
        self.starting = False
        self.listener.health_passed(worker)
        if not self.stopped:
            self._schedule(self.config.interval)

    def _failed(self, error: str) -> None:
        worker = self.worker
        now = self.clock.seconds()
        worker.last_health = HealthResult(False, now, None, error)
        if self.starting:
            if now >= self._deadline:
                self.stopped = True
                self.listener.startup_timed_out(worker)
                return
            self._delay = min(self._delay * STARTUP_GROWTH, STARTUP_MAX_DELAY)
            self._schedule(min(self._delay, max(0.0, self._deadline - now)))
            return
        worker.health_failures += 1
        self.listener.health_failed(worker, error)
        if not self.stopped:
            self._schedule(self.config.interval)
