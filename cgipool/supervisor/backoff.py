"""Restart delays for workers that exit unexpectedly.

Exponential with jitter, so a pool whose workers all die together does not
restart them in lockstep; capped, so a crash-looping worker keeps retrying at
the maximum delay instead of giving up (supervisord's FATAL state is what users
complain about); reset once a worker has stayed up long enough to count as stable.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import attrs

from cgipool.config import RestartConfig


@attrs.define
class Backoff:
    """Consecutive-failure counter that turns into the next restart delay."""

    config: RestartConfig
    #: Returns a float in [0, 1); injected so tests are deterministic.
    random: Callable[[], float] = random.random
    #: Fraction of the delay added or removed at random.
    jitter: float = 0.2
    failures: int = 0

    def next_delay(self) -> float:
        """Count one more failure and return how long to wait before restarting."""
        base = min(self.config.max_delay, self.config.delay * (2 ** min(self.failures, 62)))
        self.failures += 1
        spread = base * self.jitter * (2 * self.random() - 1)
        return max(0.0, min(self.config.max_delay, base + spread))

    def reset(self) -> None:
        """The worker ran long enough: the next failure starts from the first delay."""
        self.failures = 0

    @property
    def failing(self) -> bool:
        """Whether the worker is crash-looping (shown as ``failing``)."""
        return self.failures >= self.config.failing_after
