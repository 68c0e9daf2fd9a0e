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

It needs cgipool's reactor, :class:`BusyPollReactor`: the epoll reactor with
its public ``doIteration`` overridden.  ``twistd cgipool`` installs it when no
reactor was chosen (:func:`install_default`); ``twistd --reactor cgipool`` and
``trial --reactor cgipool`` name it (the plugin in
``twisted/plugins/cgipool_plugin.py``).  To know whether a poll found I/O
without Twisted's private poller, the reactor keeps a second epoll set of its
own (:class:`Readiness`) in step with the public ``addReader``/``addWriter``/
``removeReader``/``removeWriter`` while busy polling is on: it waits and spins
on that set and lets Twisted's own ``doPoll(0)`` handle what is ready.  That
costs one ``epoll_wait(0)`` more per wake-up or hit than spinning on Twisted's
poller did (about 2 per proxied request, ~1 µs), and an ``epoll_ctl`` more per
registration change (with eager writes: a connection's start and end); with
``busy_poll_us: 0`` the reactor keeps no second set and costs nothing more.
``tests/test_busypoll.py`` checks on real sockets that Twisted registers
everything through those public methods.
"""

from __future__ import annotations

import errno
import select
import time
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.epollreactor import EPollReactor
from twisted.internet.error import ReactorAlreadyInstalledError
from twisted.logger import Logger

log = Logger(namespace="cgipool.busypoll")

#: The largest spin a configuration may ask for: 10 ms.
MAX_SPIN_US = 10_000

Events = Sequence[tuple[int, int]]


class BusyPollUnsupported(Exception):
    """The running reactor is not cgipool's busy-polling reactor."""


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


class Readiness:
    """An epoll set of our own holding the reactor's descriptors with the same
    events: it tells whether any is ready, the reactor's ``doPoll`` handles them.

    Kept in step by :class:`BusyPollReactor`'s ``addReader``… the way Twisted
    keeps its own set: by the descriptor's ``fileno()`` (or, once that is
    ``-1``, by the object it was added for).  Descriptors epoll refuses
    (``EPERM``: regular files, which Twisted polls by timer) are left out.
    """

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.poll = self.epoll.poll
        #: fd -> the events it is registered for, and the object it was added for.
        self.masks: dict[int, int] = {}
        self.owners: dict[int, Any] = {}

    def add(self, selectable: Any, event: int) -> None:
        fd = selectable.fileno()
        if fd < 0:
            return
        old = self.masks.get(fd, 0) if self.owners.get(fd) is selectable else 0
        if old & event:
            return
        new = old | event
        try:
            self._control(fd, new, registered=bool(old))
        except OSError:
            return  # EPERM (Twisted polls it by timer), EBADF: not ours to track
        self.masks[fd] = new
        self.owners[fd] = selectable

    def remove(self, selectable: Any, event: int) -> None:
        fd = selectable.fileno()
        if fd < 0 or self.owners.get(fd) is not selectable:
            fd = next((f for f, s in self.owners.items() if s is selectable), -1)
            if fd < 0:
                return
        old = self.masks.get(fd, 0)
        if not old & event:
            return
        new = old & ~event
        try:
            if new:
                self.epoll.modify(fd, new)
            else:
                self.epoll.unregister(fd)
        except OSError:
            pass  # closed already: the kernel dropped it from the set
        if new:
            self.masks[fd] = new
        else:
            del self.masks[fd], self.owners[fd]

    def _control(self, fd: int, mask: int, registered: bool) -> None:
        try:
            if registered:
                self.epoll.modify(fd, mask)
            else:
                self.epoll.register(fd, mask)
        except FileExistsError:  # a closed descriptor's number, reused
            self.epoll.modify(fd, mask)
        except FileNotFoundError:  # closed and dropped by the kernel meanwhile
            self.epoll.register(fd, mask)

    def close(self) -> None:
        self.epoll.close()
        self.masks.clear()
        self.owners.clear()


class BusyPollReactor(EPollReactor):
    """The epoll reactor, able to busy-poll (``set_spin``); with spin 0 its
    iterations are the epoll reactor's own ``doPoll``."""

    def __init__(self, now: Callable[[], float] = time.monotonic) -> None:
        #: The second epoll set, only while busy polling is on.
        self.readiness: Readiness | None = None
        #: The loop and its counters: one for the reactor's life, so the
        #: counters add up across reloads that turn it off and on.
        self.busy_poll = BusyPoll(self.poll_readiness, self.dispatch_ready,
                                  lambda: 1, 0.0, now)
        super().__init__()

    # -- the iteration -----------------------------------------------------------

    def doIteration(self, timeout: float | None) -> None:
        if self.readiness is None:
            self.doPoll(timeout)
        else:
            self.busy_poll.iterate(timeout)

    def poll_readiness(self, timeout: float, maxevents: int) -> Events:
        readiness = self.readiness
        if readiness is None:  # turned off inside this iteration: nothing found
            return []
        return readiness.poll(timeout, maxevents)

    def dispatch_ready(self, events: Events) -> None:
        """Something is ready: Twisted's own poll, without blocking, handles it."""
        self.doPoll(0)

    def set_spin(self, spin: float) -> BusyPoll:
        """Spin up to ``spin`` seconds after I/O from now on (0: not at all)."""
        self.busy_poll.spin = spin
        if spin > 0 and self.readiness is None:
            readiness = Readiness()
            for reader in self.getReaders():
                readiness.add(reader, select.EPOLLIN)
            for writer in self.getWriters():
                readiness.add(writer, select.EPOLLOUT)
            self.readiness = readiness
        elif spin <= 0 and self.readiness is not None:
            readiness, self.readiness = self.readiness, None
            readiness.close()
        return self.busy_poll

    @property
    def spinning(self) -> bool:
        return self.readiness is not None

    # -- the descriptors, also in the readiness set ------------------------------

    def addReader(self, reader: Any) -> None:
        super().addReader(reader)
        if self.readiness is not None:
            self.readiness.add(reader, select.EPOLLIN)

    def addWriter(self, writer: Any) -> None:
        super().addWriter(writer)
        if self.readiness is not None:
            self.readiness.add(writer, select.EPOLLOUT)

    def removeReader(self, reader: Any) -> None:
        super().removeReader(reader)
        if self.readiness is not None:
            self.readiness.remove(reader, select.EPOLLIN)

    def removeWriter(self, writer: Any) -> None:
        super().removeWriter(writer)
        if self.readiness is not None:
            self.readiness.remove(writer, select.EPOLLOUT)


def install() -> None:
    """Install :class:`BusyPollReactor` as the reactor (``--reactor cgipool``)."""
    from twisted.internet.main import installReactor

    installReactor(BusyPollReactor())


def install_default() -> bool:
    """Install :class:`BusyPollReactor` unless a reactor is installed already
    (twistd's ``--reactor``, trial's): whether it did."""
    try:
        install()
    except ReactorAlreadyInstalledError:
        return False
    return True


def unsupported(reactor: Any) -> BusyPollUnsupported:
    return BusyPollUnsupported(
        f"busy polling needs cgipool's reactor; this daemon runs "
        f"{type(reactor).__module__}.{type(reactor).__name__} (start twistd "
        f"without --reactor or with --reactor cgipool, or set busy_poll_us: 0)")


class BusyPollService(Service):
    """Busy polling on the reactor while the daemon runs.

    ``configure`` (start, reload) applies a new ``busy_poll_us``: 0 gives the
    reactor its plain iterations back, anything else spins that long.
    """

    name = "busy-poll"

    def __init__(self, reactor: Any, spin_us: int = 0) -> None:
        self.reactor = reactor
        self.spin_us = 0
        #: The reactor's loop and counters, once busy polling was asked for.
        self.poller: BusyPoll | None = None
        self.check(spin_us)  # an unsupported reactor fails here, before anything starts
        self.spin_us = spin_us

    def check(self, spin_us: int) -> None:
        """Make sure ``spin_us`` can be applied.

        :raises BusyPollUnsupported: it asks for spinning on a reactor that
            cannot do it.
        """
        if spin_us and not isinstance(self.reactor, BusyPollReactor):
            raise unsupported(self.reactor)

    def startService(self) -> None:
        super().startService()
        self._apply()

    def stopService(self) -> None:
        super().stopService()
        if self.spin_us and isinstance(self.reactor, BusyPollReactor):
            self.reactor.set_spin(0)

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
            self.poller = self.reactor.set_spin(spin_us / 1e6)
            log.info("busy polling: spinning up to {busy_poll_us} µs after I/O",
                     busy_poll_us=spin_us)
        elif isinstance(self.reactor, BusyPollReactor) and self.reactor.spinning:
            self.reactor.set_spin(0)
            log.info("busy polling: off", busy_poll_us=0)
