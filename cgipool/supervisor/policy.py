"""Autoscaling and recycling: what a pool decides on its own, on a clock tick.

Scaling looks at *utilisation*: requests in flight plus requests waiting in
the proxy's queue, over the capacity of the workers that are (or will soon
be) serving — ``(ready + starting) × concurrency``.  Starting workers count
as capacity, so one burst of load does not spawn a new batch every tick
while the first batch boots::

    utilisation ≥ up for `window` s   → grow: at most ×2 and +`step` per decision
    utilisation < down for `cooldown` s → shrink by one per `down_interval`
                                         (the idlest worker drains first)

Between ``down`` and ``up`` nothing happens (hysteresis).  Every decision is a
``scale`` event with its reason.  Recycling by age and memory
(``recycle.max_lifetime``, ``recycle.max_rss``) is checked every
``recycle.check_interval`` seconds, one worker at a time per pool, so a pool
never recycles all at once; ``recycle.max_requests`` is checked by the proxy
as requests finish.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cgipool.supervisor.worker import WorkerState

log = Logger(namespace="cgipool.policy")
S = WorkerState


def process_rss(pid: int) -> int | None:
    """Resident memory of ``pid`` in bytes (None when it is gone)."""
    import psutil

    try:
        return int(psutil.Process(pid).memory_info().rss)
    except (psutil.Error, OSError):
        return None


class PoolPolicy:
    """Sizes one pool by load and recycles its old or bloated workers."""

    def __init__(self, pool: Any, clock: Any,
                 rss: Callable[[int], int | None] = process_rss) -> None:
        self.pool = pool
        self.clock = clock
        self.rss = rss
        #: (time, utilisation) samples of the last `window` seconds.
        self.samples: deque[tuple[float, float]] = deque()
        self.utilisation = 0.0
        self.low_since: float | None = None
        self.next_down = 0.0
        self.last_decision: dict[str, Any] | None = None
        self._scale_loop: LoopingCall | None = None
        self._recycle_loop: LoopingCall | None = None

    @property
    def autoscaling(self) -> bool:
        workers = self.pool.config.workers
        return workers.max > workers.min

    def start(self) -> None:
        config = self.pool.config
        if self.autoscaling:
            self._scale_loop = self._loop(self.tick, config.autoscale.interval)
        recycle = config.recycle
        if recycle.max_rss or recycle.max_lifetime:
            self._recycle_loop = self._loop(self.check_recycling, recycle.check_interval)

    def _loop(self, fn: Callable[[], None], interval: float) -> LoopingCall:
        loop = LoopingCall(fn)
        loop.clock = self.clock
        loop.start(interval, now=False).addErrback(
            lambda f: log.failure("the {service} policy loop stopped", f,
                                  service=self.pool.name))
        return loop

    def stop(self) -> None:
        for name in ("_scale_loop", "_recycle_loop"):
            loop = getattr(self, name)
            setattr(self, name, None)
            if loop is not None and loop.running:
                loop.stop()

    def restart(self) -> None:
        """The pool's configuration changed: start over with its new settings."""
        self.stop()
        self.samples.clear()
        self.low_since = None
        self.start()

    def manual_change(self) -> None:
        """Someone resized the pool by hand: measure afresh before deciding."""
        self.samples.clear()
        self.low_since = None

    # -- scaling --------------------------------------------------------------

    def measure(self) -> tuple[float, int, int]:
        """``(utilisation, demand, serving workers)`` right now."""
        pool = self.pool
        demand = pool.queue_length
        serving = 0
        for worker in pool.workers:
            if worker.retiring:
                continue
            demand += worker.in_flight
            if worker.state is S.READY or worker.state is S.STARTING:
                serving += 1
        capacity = serving * pool.config.concurrency
        if capacity:
            return demand / capacity, demand, serving
        return (math.inf if demand else 0.0), demand, serving

    def tick(self) -> None:
        pool = self.pool
        if pool.stopping or not pool.started:
            return
        cfg = pool.config.autoscale
        now = self.clock.seconds()
        utilisation, demand, serving = self.measure()
        self.utilisation = utilisation
        samples = self.samples
        samples.append((now, utilisation))
        while samples and samples[0][0] < now - cfg.window - 1e-9:
            samples.popleft()
        desired, low, high = pool.desired, pool.config.workers.min, pool.config.workers.max
        covered = now - samples[0][0] >= cfg.window - cfg.interval / 2
        if covered and desired < high and all(u >= cfg.up for _, u in samples):
            target = min(high, desired + min(cfg.step, max(1, desired)))
            self._decide(target, f"load: utilisation {_fmt(utilisation)} >= {cfg.up:g} for "
                                 f"{cfg.window:g}s ({demand} requests in flight or waiting, "
                                 f"{serving} workers x concurrency {pool.config.concurrency})",
                         utilisation, now)
            samples.clear()
            self.low_since = None
            return
        if utilisation >= cfg.down:
            self.low_since = None
            return
        if self.low_since is None:
            self.low_since = now
            return
        if desired > low and now - self.low_since >= cfg.cooldown and now >= self.next_down:
            self._decide(desired - 1, f"idle: utilisation below {cfg.down:g} for "
                                      f"{now - self.low_since:.0f}s", utilisation, now)
            self.next_down = now + cfg.down_interval

    def _decide(self, target: int, reason: str, utilisation: float, now: float) -> None:
        before = self.pool.scale_to(target, reason)
        self.last_decision = {"at": now, "from": before, "to": target, "reason": reason,
                              "utilisation": _round(utilisation)}

    # -- recycling -----------------------------------------------------------------

    def check_recycling(self) -> None:
        pool = self.pool
        if pool.stopping or any(w.recycling for w in pool.workers):
            return  # one at a time: the pool keeps its capacity
        recycle = pool.config.recycle
        now = self.clock.seconds()
        for worker in pool.workers:
            if worker.state is not S.READY or worker.retiring or worker.pid is None:
                continue
            if worker.lifetime is not None and worker.started_at is not None \
                    and now - worker.started_at >= worker.lifetime:
                pool.recycle(worker, f"up for {now - worker.started_at:.0f}s "
                                     f"(recycle.max_lifetime={recycle.max_lifetime:g}s)")
                return
            if recycle.max_rss:
                rss = self.rss(worker.pid)
                if rss is not None and rss > recycle.max_rss:
                    pool.recycle(worker, f"RSS {rss // 1024} KiB > recycle.max_rss "
                                         f"{recycle.max_rss // 1024} KiB")
                    return

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.autoscaling,
            "utilisation": _round(self.utilisation),
            "idle_for": None if self.low_since is None
            else round(self.clock.seconds() - self.low_since, 1),
            "last_decision": self.last_decision,
        }


def _round(value: float) -> float | None:
    return None if math.isinf(value) else round(value, 3)


def _fmt(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.2f}"
