"""Worker and CGI script output, turned into tagged log events line by line, on a budget.

Memory stays bounded whatever a process prints: a partial line is capped at
``max_line`` bytes (the rest of an endless line is dropped).  Disk stays
bounded too: every line is charged to its *service's* :class:`OutputBudget`, a
token bucket of lines and bytes per second shared by all the service's workers
(stdout and stderr) or CGI executions (stderr), so a service that floods —
one script or a hundred of them at once — logs at most its budget.  What is
over it is dropped, counted per stream (``cgipool_output_dropped_lines_total``
in ``/metrics``) and summed up in one warning per second per stream.
"""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from cgipool.logtext import printable

log = Logger(namespace="cgipool.worker")

#: One service's default budget: lines and bytes of output logged per second.
LINES_PER_SECOND = 200
BYTES_PER_SECOND = 64 * 1024
#: The bucket holds this many seconds of budget: a burst after a quiet spell
#: passes whole, a steady flood gets the rate.
BURST_SECONDS = 1.0
#: Seconds a summary of dropped lines covers.
REPORT_INTERVAL = 1.0
#: Longest line kept (bytes); the rest of a longer line is dropped.
MAX_LINE = 8192


@attrs.define(eq=False)
class OutputBudget:
    """A token bucket of log lines and bytes for one service, on the injected clock.

    A line passes when a line token and ``len(line)`` byte tokens are left;
    tokens refill continuously at the per-second rates up to ``burst`` seconds'
    worth.  Drops are reported by a timer ``report_interval`` after the first
    one of a spell, so the summary comes even when the flood stops.
    """

    clock: IReactorTime
    service: str
    lines_per_second: float = LINES_PER_SECOND
    bytes_per_second: float = BYTES_PER_SECOND
    burst: float = BURST_SECONDS
    report_interval: float = REPORT_INTERVAL
    #: Lines (and their bytes) dropped since the daemon started, by stream.
    dropped_lines: dict[str, int] = attrs.field(factory=dict, init=False)
    dropped_bytes: dict[str, int] = attrs.field(factory=dict, init=False)
    _line_tokens: float = attrs.field(default=0.0, init=False)
    _byte_tokens: float = attrs.field(default=0.0, init=False)
    _updated: float = attrs.field(default=0.0, init=False)
    #: Dropped since the last summary: stream → [lines, bytes].
    _pending: dict[str, list[int]] = attrs.field(factory=dict, init=False)
    _pending_since: float = attrs.field(default=0.0, init=False)
    _report_call: IDelayedCall | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self._line_tokens = self.lines_per_second * self.burst
        self._byte_tokens = self.bytes_per_second * self.burst
        self._updated = self.clock.seconds()

    def allow(self, stream: str, size: int) -> bool:
        """Charge one line of ``size`` bytes; False (and counted) when over budget."""
        self._refill()
        if self._line_tokens >= 1 and self._byte_tokens >= size:
            self._line_tokens -= 1
            self._byte_tokens -= size
            return True
        self.drop(stream, 1, size)
        return False

    def exhausted(self) -> bool:
        """No line may pass now: a reader can drop whole chunks without looking."""
        self._refill()
        return self._line_tokens < 1

    def drop(self, stream: str, lines: int, size: int) -> None:
        """Count ``lines`` (``size`` bytes) not logged; the summary timer starts."""
        self.dropped_lines[stream] = self.dropped_lines.get(stream, 0) + lines
        self.dropped_bytes[stream] = self.dropped_bytes.get(stream, 0) + size
        pending = self._pending.setdefault(stream, [0, 0])
        pending[0] += lines
        pending[1] += size
        if self._report_call is None:
            self._pending_since = self.clock.seconds()
            self._report_call = self.clock.callLater(self.report_interval, self.report)

    def _refill(self) -> None:
        now = self.clock.seconds()
        elapsed = now - self._updated
        if elapsed > 0:
            self._line_tokens = min(self.lines_per_second * self.burst,
                                    self._line_tokens + elapsed * self.lines_per_second)
            self._byte_tokens = min(self.bytes_per_second * self.burst,
                                    self._byte_tokens + elapsed * self.bytes_per_second)
            self._updated = now

    def report(self) -> None:
        """Log one summary line per stream of what was dropped since the last one."""
        call, self._report_call = self._report_call, None
        if call is not None and call.active():
            call.cancel()
        seconds = max(self.clock.seconds() - self._pending_since, 0.0)
        for stream, (lines, size) in sorted(self._pending.items()):
            log.warn(
                "dropped {dropped:,} lines ({dropped_bytes:,} bytes) of {stream} from "
                "service {service} in the last {seconds:.1f} s (its budget: "
                "{lines_per_second:g} lines/s, {bytes_per_second:,.0f} bytes/s)",
                service=self.service, stream=stream, dropped=lines, dropped_bytes=size,
                seconds=seconds, lines_per_second=self.lines_per_second,
                bytes_per_second=self.bytes_per_second,
            )
        self._pending.clear()

    def stop(self) -> None:
        """Report what is pending now (the daemon stops): no timer is left behind."""
        if self._report_call is not None:
            self.report()


@attrs.define(eq=False)
class OutputBudgets:
    """Every service's :class:`OutputBudget`, kept by name: a reload that changes
    or re-adds a service keeps its budget and its counts."""

    clock: IReactorTime
    lines_per_second: float = LINES_PER_SECOND
    bytes_per_second: float = BYTES_PER_SECOND
    budgets: dict[str, OutputBudget] = attrs.field(factory=dict, init=False)

    def budget(self, service: str) -> OutputBudget:
        found = self.budgets.get(service)
        if found is None:
            found = self.budgets[service] = OutputBudget(
                self.clock, service, self.lines_per_second, self.bytes_per_second)
        return found

    def stop(self) -> None:
        for budget in self.budgets.values():
            budget.stop()


class OutputLogger:
    """Splits one process stream into lines and logs each with its tags, on a budget.

    ``budget`` is the service's shared one; without it (a process outside a
    supervisor, tests) the logger has one of its own at ``lines_per_second``.
    """

    def __init__(self, clock: IReactorTime, service: str, worker: int | str, pid: int | None,
                 stream: str, max_line: int = MAX_LINE,
                 lines_per_second: int = LINES_PER_SECOND,
                 budget: OutputBudget | None = None) -> None:
        self.clock = clock
        self.service = service
        self.worker = worker
        self.pid = pid
        self.stream = stream
        self.max_line = max_line
        self.budget = budget if budget is not None else OutputBudget(
            clock, service, lines_per_second=lines_per_second)
        self._partial = bytearray()
        self._truncating = False

    def feed(self, data: bytes) -> None:
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                self._keep(data[start:])
                return
            self._keep(data[start:nl])
            self._end_line()
            start = nl + 1
            if self.budget.exhausted():
                # A flood: count the chunk's whole lines at once instead of one by
                # one (~4 µs each), so a flooding pipe costs the reactor little.
                last = data.rfind(b"\n", start)
                if last >= 0:
                    self.budget.drop(self.stream, data.count(b"\n", start, last + 1),
                                     last + 1 - start)
                    start = last + 1

    def _keep(self, chunk: bytes) -> None:
        if self._truncating or not chunk:
            return
        room = self.max_line - len(self._partial)
        if len(chunk) > room:
            self._partial += chunk[:room]
            self._truncating = True
        else:
            self._partial += chunk

    def _end_line(self) -> None:
        line = bytes(self._partial).rstrip(b"\r")
        truncated = self._truncating
        self._partial.clear()
        self._truncating = False
        self._emit(line, truncated)

    def flush(self) -> None:
        """Log what is left of an unterminated last line (at process end)."""
        if self._partial:
            self._end_line()

    def _emit(self, line: bytes, truncated: bool) -> None:
        if not self.budget.allow(self.stream, len(line) + 1):
            return
        # Escaped: a script may echo its request (PATH_INFO...) to stderr.
        text = printable(line.decode("utf-8", "replace"))
        if truncated:
            text += " [line truncated]"
        log.info(
            "{service}[{worker}] pid={pid} {stream}: {line}",
            service=self.service, worker=self.worker, pid=self.pid,
            stream=self.stream, line=text,
        )
