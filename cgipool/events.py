"""What happened to the pools: spawns, exits, restarts, health failures.

One bounded, newest-last log that the supervisor writes and the admin API (and
anything else that subscribes) reads.  Every event is also a structured log line.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import attrs
from twisted.logger import Logger, LogLevel

log = Logger(namespace="cgipool.events")


@attrs.frozen
class Event:
    """One thing that happened, with the fields the dashboard shows."""

    seq: int
    time: float
    kind: str
    service: str
    worker: int | None
    message: str
    level: str = "info"
    fields: dict[str, Any] = attrs.field(factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "time": self.time,
            "kind": self.kind,
            "service": self.service,
            "worker": self.worker,
            "level": self.level,
            "message": self.message,
            **self.fields,
        }


_LEVELS = {"info": LogLevel.info, "warn": LogLevel.warn, "error": LogLevel.error}


class EventLog:
    """A ring buffer of events with subscribers."""

    def __init__(self, clock_seconds: Callable[[], float], size: int = 1000) -> None:
        self._now = clock_seconds
        self._events: deque[Event] = deque(maxlen=size)
        self._seq = 0
        self._subscribers: list[Callable[[Event], None]] = []

    def add(self, kind: str, service: str, worker: int | None, message: str,
            level: str = "info", **fields: Any) -> Event:
        self._seq += 1
        event = Event(self._seq, self._now(), kind, service, worker, message, level, fields)
        self._events.append(event)
        log.emit(
            _LEVELS.get(level, LogLevel.info),
            "{service}[{worker}] {kind}: {message}",
            service=service, worker="-" if worker is None else worker,
            kind=kind, message=message, **fields,
        )
        for subscriber in list(self._subscribers):
            subscriber(event)
        return event

    def subscribe(self, callback: Callable[[Event], None]) -> Callable[[], None]:
        """Call ``callback`` for every new event; returns the unsubscribe function."""
        self._subscribers.append(callback)
        return lambda: self._subscribers.remove(callback)

    def __iter__(self) -> Iterator[Event]:
        return iter(self._events)

    def recent(self, limit: int = 100, service: str | None = None) -> list[Event]:
        """Newest first."""
        out = []
        for event in reversed(self._events):
            if service is None or event.service == service:
                out.append(event)
                if len(out) >= limit:
                    break
        return out
