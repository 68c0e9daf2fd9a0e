"""Busy polling: the reactor spins on ``epoll`` for a moment before it sleeps.

Each time the daemon blocks in ``epoll_wait`` its CPU may go idle; the next
packet then has to wake it (an interrupt, on a virtual machine an exit to the
hypervisor) before any Python runs.  On the machines cgipool was measured on,
that costs 30-80 µs per wake-up, and a proxied request waits for two of them
(the client's request, the worker's answer): more than all of cgipool's own
Python.  HAProxy's ``busy-polling`` and Linux's ``net.core.busy_poll`` trade
CPU for that latency in the same way.

With ``busy_poll_us: N`` in ``pool.yaml`` the reactor, after handling I/O, keeps
polling without blocking for up to N µs before it goes to sleep.  The spin
starts only after I/O, so an idle daemon sleeps as before (timers do not start
it), and it never delays a timer.  The cost: under light but steady traffic
the daemon keeps one core busy; ``cgipool_busy_poll_spin_seconds_total`` on
``/metrics`` shows how much CPU the spinning takes.  Off (0) by default.

It works with the epoll reactor (twistd's default on Linux) and replaces that
reactor's ``doIteration`` with :meth:`BusyPoll.iterate` while attached.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python import log as legacy_log

log = Logger(namespace="cgipool.busypoll")

#: The largest spin a configuration may ask for: 10 ms.
MAX_SPIN_US = 10_000

Events = Sequence[tuple[int, int]]


class BusyPollUnsupported(Exception):
    """The running reactor is not the epoll reactor."""


class BusyPoll:
    """The spin-then-sleep loop, over any ``poll(timeout, maxevents)``.

    :param poll: ``select.epoll.poll``-like: a timeout in seconds (``-1``
        blocks), the most events to return; returns ``[(fd, events)]``.
    :param dispatch: handles the events one poll returned.
    :param size: how many events one poll may return at most.
    :param now: a monotonic clock in seconds (injected by the tests).
    """

    def __init__(self, poll: Callable[[float, int], Events],
                 dispatch: Callable[[Events], None], size: Callable[[], int],
                 spin: float = 0.0, now: Callable[[], float] = time.monotonic) -> None:
        self._poll = poll
        self._dispatch = dispatch
        self._size = size
        self._now = now
        self.spin = spin
        #: When the last events were handled: the spin window starts there.
        self._last_io = float("-inf")
        #: Seconds spent spinning, and spins that ended in I/O (hits) or in
        #: sleep (misses): what busy polling costs and what it catches.
        self.spin_seconds = 0.0
        self.hits = 0
        self.misses = 0

    def iterate(self, timeout: float | None) -> None:
        """One reactor iteration: ``timeout`` is the reactor's time to its
        next timed call (``None``: none)."""
        try:
            events = self._wait(timeout)
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        if events:
            self._dispatch(events)
            self._last_io = self._now()

    def _wait(self, timeout: float | None) -> Events:
        poll, size = self._poll, max(1, self._size())
        if timeout == 0:
            return poll(0, size)
        start = self._now()
        until = self._last_io + self.spin
        if timeout is not None:
            until = min(until, start + timeout)
        if until > start:
            now = start
            while now < until:
                events = poll(0, size)
                now = self._now()
                if events:
                    self.hits += 1
                    self.spin_seconds += now - start
                    return events
            self.misses += 1
            self.spin_seconds += now - start
            if timeout is not None:
                timeout = max(0.0, timeout - (now - start))
        return poll(-1 if timeout is None else timeout, size)


def _epoll_dispatcher(reactor: Any) -> Callable[[Events], None]:
    """Hands events to their selectables exactly as ``EPollReactor.doPoll`` does."""
    selectables = reactor._selectables
    handle = reactor._doReadOrWrite
    call_with_logger = legacy_log.callWithLogger

    def dispatch(events: Events) -> None:
        for fd, event in events:
            selectable = selectables.get(fd)
            if selectable is not None:
                call_with_logger(selectable, handle, selectable, fd, event)

    return dispatch


def for_reactor(reactor: Any, spin: float = 0.0,
                now: Callable[[], float] = time.monotonic) -> BusyPoll:
    """A :class:`BusyPoll` over ``reactor``'s own epoll object.

    :raises BusyPollUnsupported: ``reactor`` is not an epoll reactor.
    """
    from twisted.internet.epollreactor import EPollReactor

    if not isinstance(reactor, EPollReactor):
        raise BusyPollUnsupported(
            f"busy polling needs the epoll reactor; this daemon runs "
            f"{type(reactor).__module__}.{type(reactor).__name__} (drop twistd's "
            f"--reactor option or set busy_poll_us: 0)")
    selectables = reactor._selectables
    return BusyPoll(reactor._poller.poll, _epoll_dispatcher(reactor),
                    selectables.__len__, spin, now)


class BusyPollService(Service):
    """Attaches busy polling to the reactor while the daemon runs.

    ``configure`` (start, reload) applies a new ``busy_poll_us``: 0 gives the
    reactor its own ``doIteration`` back, anything else spins that long.
    """

    name = "busy-poll"

    def __init__(self, reactor: Any, spin_us: int = 0) -> None:
        self.reactor = reactor
        self.spin_us = 0
        self.poller: BusyPoll | None = None
        self.check(spin_us)  # an unsupported reactor fails here, before anything starts
        self.spin_us = spin_us

    def check(self, spin_us: int) -> None:
        """Make sure ``spin_us`` can be applied.

        :raises BusyPollUnsupported: it asks for spinning on a reactor that
            cannot do it.
        """
        if spin_us and self.poller is None:
            self.poller = for_reactor(self.reactor)

    def startService(self) -> None:
        super().startService()
        self._apply()

    def stopService(self) -> None:
        super().stopService()
        self._detach()

    def configure(self, spin_us: int) -> None:
        """Spin for ``spin_us`` µs after I/O from now on (0: not at all)."""
        self.check(spin_us)
        changed = spin_us != self.spin_us
        self.spin_us = spin_us
        if self.running and changed:
            self._apply()

    def _apply(self) -> None:
        spin_us = self.spin_us
        if spin_us:
            assert self.poller is not None
            self.poller.spin = spin_us / 1e6
            self.reactor.doIteration = self.poller.iterate
            log.info("busy polling: spinning up to {busy_poll_us} µs after I/O",
                     busy_poll_us=spin_us)
        elif "doIteration" in vars(self.reactor):
            self._detach()
            log.info("busy polling: off", busy_poll_us=0)

    def _detach(self) -> None:
        # The instance attribute hides the class's doIteration; deleting it
        # gives the reactor its own loop back.
        if "doIteration" in vars(self.reactor):
            del self.reactor.doIteration
