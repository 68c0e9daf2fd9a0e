"""A worker's stdout/stderr, turned into tagged log events line by line.

Memory stays bounded whatever the worker prints: a partial line is capped at
``max_line`` bytes (the rest of an endless line is dropped and counted), and
lines beyond a per-second budget are dropped with one summary line, so a worker
that floods its output cannot grow the daemon or drown the log.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

log = Logger(namespace="cgipool.worker")


class OutputLogger:
    """Splits one worker stream into lines and logs each with its tags."""

    def __init__(self, clock: IReactorTime, service: str, worker: int, pid: int | None,
                 stream: str, max_line: int = 8192, lines_per_second: int = 200) -> None:
        self.clock = clock
        self.service = service
        self.worker = worker
        self.pid = pid
        self.stream = stream
        self.max_line = max_line
        self.budget = lines_per_second
        self._partial = bytearray()
        self._truncating = False
        self._window_start = clock.seconds()
        self._logged_in_window = 0
        self.dropped = 0

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
        self._report_dropped()

    def _emit(self, line: bytes, truncated: bool) -> None:
        now = self.clock.seconds()
        if now - self._window_start >= 1.0:
            self._report_dropped()
            self._window_start = now
            self._logged_in_window = 0
        if self._logged_in_window >= self.budget:
            self.dropped += 1
            return
        self._logged_in_window += 1
        text = line.decode("utf-8", "replace")
        if truncated:
            text += " [line truncated]"
        log.info(
            "{service}[{worker}] pid={pid} {stream}: {line}",
            service=self.service, worker=self.worker, pid=self.pid,
            stream=self.stream, line=text,
        )

    def _report_dropped(self) -> None:
        if self.dropped:
            log.warn(
                "{service}[{worker}] pid={pid} {stream}: dropped {dropped} lines "
                "(more than {budget} lines/s)",
                service=self.service, worker=self.worker, pid=self.pid,
                stream=self.stream, dropped=self.dropped, budget=self.budget,
            )
            self.dropped = 0
