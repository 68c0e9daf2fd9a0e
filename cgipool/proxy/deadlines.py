"""Request deadlines in coarse buckets behind one timer.

A ``callLater`` per request (and its ``cancel`` when the response comes,
nearly always well before the deadline) is a heap insertion and removal in
the reactor for every request.  :class:`Deadlines` keeps deadlines in
buckets of ``tick`` seconds (a set per bucket: O(1) add and remove) and holds
one ``DelayedCall`` for the earliest bucket; while requests overlap, a new
request schedules nothing.  A deadline fires at most ``tick`` late, never
early.  With nothing left to watch the timer is cancelled, so an idle daemon
(or a test) has no pending call.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.logger import Logger

log = Logger(namespace="cgipool.proxy")


class Watched(Protocol):
    def deadline_passed(self, now: float) -> None: ...


class Deadlines:
    """Calls ``item.deadline_passed(now)`` once ``now`` reaches the item's deadline."""

    __slots__ = ("reactor", "tick", "buckets", "count", "call", "call_key", "keep_timer")

    def __init__(self, reactor: Any, tick: float = 0.1, keep_timer: bool = False) -> None:
        self.reactor = reactor
        self.tick = tick
        #: Leave the timer pending when nothing is watched (it then fires once
        #: and stops): for items that nearly always go within the same reactor
        #: turn, such as a request head that arrives in one packet.  The owner
        #: must call :meth:`clear` when it stops.
        self.keep_timer = keep_timer
        #: Bucket number -> items due at the end of that bucket.
        self.buckets: dict[int, set[Watched]] = {}
        self.count = 0
        self.call: Any = None
        self.call_key = 0

    def add(self, item: Watched, deadline: float) -> int:
        """Watch ``item``; returns the key :meth:`remove` needs."""
        key = int(deadline / self.tick) + 1
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = set()
        bucket.add(item)
        self.count += 1
        call = self.call
        if call is None:
            self._schedule(key)
        elif key < self.call_key:
            call.cancel()
            self._schedule(key)
        return key

    def remove(self, item: Watched, key: int) -> None:
        """Stop watching ``item`` (added under ``key``); no-op when it is not watched."""
        bucket = self.buckets.get(key)
        if bucket is None or item not in bucket:
            return
        bucket.discard(item)
        if not bucket:
            del self.buckets[key]
        self.count -= 1
        if not self.count and self.call is not None and not self.keep_timer:
            self.call.cancel()
            self.call = None

    def release_timer(self) -> None:
        """From now on, no timer is left pending while nothing is watched (the
        owner stops; what is still watched keeps its deadline)."""
        self.keep_timer = False
        if not self.count and self.call is not None:
            self.call.cancel()
            self.call = None

    def clear(self) -> None:
        self.buckets.clear()
        self.count = 0
        if self.call is not None:
            self.call.cancel()
            self.call = None

    def _schedule(self, key: int) -> None:
        self.call_key = key
        delay = max(0.0, key * self.tick - self.reactor.seconds())
        self.call = self.reactor.callLater(delay, self._fire)

    def _fire(self) -> None:
        self.call = None
        now = self.reactor.seconds()
        tick = self.tick
        due = sorted(key for key in self.buckets if key * tick <= now)
        for key in due:
            items = self.buckets.pop(key, None)
            if not items:
                continue
            self.count -= len(items)
            for item in items:
                try:
                    item.deadline_passed(now)  # may add it again, under a later key
                except Exception:
                    log.failure("deadline of {item!r}", item=item)
        if self.buckets:
            first = min(self.buckets)
            if self.call is None:
                self._schedule(first)
            elif first < self.call_key:
                self.call.cancel()
                self._schedule(first)
