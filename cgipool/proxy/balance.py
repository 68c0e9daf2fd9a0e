"""Choosing a worker: least outstanding requests, ties broken round robin.

With the handful of workers a pool has, a full scan of in-flight counts is
cheaper and fairer than power-of-two-choices; the rotating start makes
sequential requests (all counts zero) go to each worker in turn.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

from cgipool.supervisor.worker import Worker


class LeastOutstanding:
    """Picks the ready worker with the fewest requests in flight."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, ready: Sequence[Worker], exclude: Collection[Worker] = ()) -> Worker | None:
        n = len(ready)
        if n == 0:
            return None
        start = self._next % n
        self._next = start + 1
        best: Worker | None = None
        best_load = 1 << 62
        for i in range(start, start + n):
            worker = ready[i % n] if i >= n else ready[i]
            load = worker.in_flight
            if load < best_load and worker not in exclude:
                best, best_load = worker, load
                if load == 0:
                    break
        return best
