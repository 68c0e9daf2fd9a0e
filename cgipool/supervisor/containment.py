"""Containment: nothing a worker or CGI script leaves behind outlives its owner.

A process group kill misses a descendant that moved to its own session
(``setsid sleep 300 &``), and without help such an orphan is re-parented to
pid 1: it survives its worker, keeps a CGI script's stdout open (so the
execution never ends and its slot stays taken) and survives ``make stop``.

So the daemon becomes a *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER)``):
every orphan of its subtree is re-parented to the daemon, whatever session or
group it moved to, and stays findable.  Every process the daemon spawns gets
``CGIPOOL_LINEAGE=<daemon nonce>:<owner id>`` in its environment, which its
descendants inherit; an owner is one worker process or one CGI execution.
:meth:`Containment.sweep` looks at the daemon's direct children that the
reactor did not spawn (orphans) and

- leaves alone those whose owner is alive (a worker's helper that double-forked),
- SIGKILLs those whose owner ended, with their whole subtree,
- reaps (``waitpid(pid, WNOHANG)``) the zombies among them (Twisted reaps only
  the processes it spawned),
- and, when told to treat *strangers* as hostile (``twistd cgipool``: nothing
  else in the daemon spawns processes), kills orphans without our mark (an
  environment scrubbed with ``env -i``) unless their session or group is a live
  owner's.  Inside a test process the daemon shares its children with the test
  runner, so only processes with this daemon's nonce are touched there.

Sweeps run when an owner ends, every :data:`SWEEP_INTERVAL` seconds (a read of
``/proc``: ~10 µs per process on the host), and at daemon stop, which kills
every marked descendant and waits (bounded) until they are reaped.  The mark is
a best-effort label, not a secret: workers run as the daemon's user and can
read or forge it (see docs/hardening.md, the threat model).
"""

from __future__ import annotations

import collections
import ctypes
import os
import secrets
import signal
import sys
from collections.abc import Iterable, Mapping, MutableMapping
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from cgipool.events import EventLog

log = Logger(namespace="cgipool.containment")

#: The environment variable that carries a process's lineage.
LINEAGE_VAR = "CGIPOOL_LINEAGE"
#: Seconds between two periodic sweeps.
SWEEP_INTERVAL = 2.0
#: After a kill, the next sweep (to reap the killed and catch late forks).
AFTER_KILL = 0.05
#: How long a daemon stop waits for its last descendants to be reaped.
STOP_TIMEOUT = 2.0
#: How often a stopping daemon looks again while it waits.
STOP_POLL = 0.02
#: Ended owners remembered for the events that name them.
ENDED_KEPT = 1000

PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


@attrs.frozen
class ProcInfo:
    """What ``/proc/PID/stat`` says about one process."""

    pid: int
    ppid: int
    state: str
    pgrp: int
    session: int
    #: Start time in clock ticks since boot: with ``pid``, names one process
    #: even after its pid is reused.
    start: int

    @property
    def zombie(self) -> bool:
        return self.state in ("Z", "X")


class ProcessTable(Protocol):
    """The system's processes, as far as containment needs them (a seam for tests)."""

    def self_pid(self) -> int: ...

    def snapshot(self) -> Mapping[int, ProcInfo]:
        """Every process now, by pid."""

    def lineage(self, pid: int) -> str | None:
        """The ``CGIPOOL_LINEAGE`` value of ``pid``'s environment (None: none, or
        unreadable; ``""``: an empty environment, which is also what a process in
        the middle of an exec shows — look again before judging it)."""

    def holds(self, pid: int, inodes: frozenset[int]) -> bool:
        """Whether ``pid`` has a descriptor open on one of these pipe inodes."""

    def kill(self, pid: int, sig: int) -> None: ...

    def reap(self, pid: int) -> bool:
        """``waitpid(pid, WNOHANG)``: True if it was reaped (or is not our child)."""


class Subreaper(Protocol):
    """``prctl(PR_SET_CHILD_SUBREAPER)`` (a seam for tests)."""

    def get(self) -> bool | None:
        """Whether the process is a subreaper now (None: cannot tell, not Linux)."""

    def set(self, on: bool) -> None:
        """:raises OSError: when the kernel refuses or there is no prctl."""


class ProcFS:
    """:class:`ProcessTable` on Linux's ``/proc``."""

    def self_pid(self) -> int:
        return os.getpid()

    def snapshot(self) -> dict[int, ProcInfo]:
        table = {}
        try:
            names = os.listdir("/proc")
        except OSError:
            return {}
        for name in names:
            if name.isdigit():
                info = _stat(int(name))
                if info is not None:
                    table[info.pid] = info
        return table

    def lineage(self, pid: int) -> str | None:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read()
        except OSError:
            return None
        if not environ:
            return ""
        key = LINEAGE_VAR.encode() + b"="
        for entry in environ.split(b"\0"):
            if entry.startswith(key):
                return entry[len(key):].decode("latin-1")
        return None

    def holds(self, pid: int, inodes: frozenset[int]) -> bool:
        folder = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(folder)
        except OSError:
            return False
        for fd in fds:
            try:
                target = os.readlink(f"{folder}/{fd}")
            except OSError:
                continue
            if target.startswith("pipe:[") and int(target[6:-1]) in inodes:
                return True
        return False

    def kill(self, pid: int, sig: int) -> None:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def reap(self, pid: int) -> bool:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        return done == pid


def _stat(pid: int) -> ProcInfo | None:
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            data = os.read(fd, 1024)
        finally:
            os.close(fd)
        # pid (comm) state ppid pgrp session ... starttime (field 22)
        fields = data[data.rindex(b")") + 2:].split()
        return ProcInfo(pid, int(fields[1]), fields[0].decode("ascii"), int(fields[2]),
                        int(fields[3]), int(fields[19]))
    except (OSError, ValueError, IndexError):
        return None


class Prctl:
    """:class:`Subreaper` through libc's ``prctl`` (ctypes)."""

    def __init__(self) -> None:
        self._libc: Any = None
        if sys.platform.startswith("linux"):
            try:
                self._libc = ctypes.CDLL(None, use_errno=True)
                self._libc.prctl  # noqa: B018 (a missing symbol raises here)
            except (OSError, AttributeError):
                self._libc = None

    def get(self) -> bool | None:
        if self._libc is None:
            return None
        value = ctypes.c_int(0)
        if self._libc.prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(value), 0, 0, 0) != 0:
            return None
        return bool(value.value)

    def set(self, on: bool) -> None:
        if self._libc is None:
            raise OSError("prctl is not available on this system")
        if self._libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))


#: Containments running in this process: the subreaper flag is the process's,
#: so the last one to stop clears it (if the first one set it).
_running: list[Containment] = []
_we_set_subreaper = False


@attrs.define(eq=False)
class Lineage:
    """One owner (a worker process or a CGI execution) and what it spawns.

    With no containment (unit tests of the pools) every method does nothing.
    """

    containment: Containment | None
    id: int
    service: str
    worker: int | None
    #: For messages: ``search[0] pid 123`` or the CGI request id.
    label: str
    #: The owner process while it runs.
    pid: int | None = None
    #: The pid it was spawned as, kept after it exited: it led its own session and
    #: group (the launcher's setsid), so descendants that kept them are its.
    leader: int | None = None
    alive: bool = True

    @property
    def marker(self) -> str:
        nonce = self.containment.nonce if self.containment is not None else "-"
        return f"{nonce}:{self.id}"

    def mark(self, env: MutableMapping[str, str]) -> None:
        """Put the lineage into the environment of the process about to be spawned."""
        if self.containment is not None:
            env[LINEAGE_VAR] = self.marker

    def spawned(self, pid: int | None) -> None:
        """The reactor spawned the owner as ``pid`` (Twisted reaps it; a sweep never
        touches it)."""
        if self.containment is not None and pid is not None and self.alive:
            self.pid = self.leader = pid
            self.containment.spawned[pid] = self
            self.containment.leaders[pid] = self

    def exited(self) -> None:
        """The owner process was reaped; its descendants may still be working."""
        if self.containment is not None and self.pid is not None:
            if self.containment.spawned.get(self.pid) is self:
                del self.containment.spawned[self.pid]
            self.pid = None

    def end(self) -> None:
        """The owner is over: its descendants are killed at the next sweep (soon)."""
        if self.containment is None or not self.alive:
            return
        self.exited()
        self.alive = False
        self.containment.owner_ended(self)


@attrs.define(eq=False)
class Containment:
    """The daemon's descendants: marked at spawn, swept, killed when their owner ends."""

    clock: Any
    events: EventLog
    procs: ProcessTable = attrs.field(factory=ProcFS)
    subreaper: Subreaper = attrs.field(factory=Prctl)
    #: Kill orphans that carry no mark of this daemon (twistd: yes; a test process: no).
    strangers_hostile: bool = False
    interval: float = SWEEP_INTERVAL
    nonce: str = attrs.field(factory=lambda: secrets.token_hex(6))
    #: Live owners by id; an id of ours that is not here has ended.
    lineages: dict[int, Lineage] = attrs.field(factory=dict, init=False)
    #: Recently ended owners, for the events that name them.
    ended: collections.OrderedDict[int, Lineage] = attrs.field(
        factory=collections.OrderedDict, init=False)
    #: Pids the reactor spawned and has not reaped yet: never touched here.
    spawned: dict[int, Lineage] = attrs.field(factory=dict, init=False)
    #: Live and recently ended owners by the pid they were spawned as (their
    #: session and group id).
    leaders: dict[int, Lineage] = attrs.field(factory=dict, init=False)
    #: Orphans known to be ours, by (pid, start time): their zombies are reaped
    #: even when strangers are left alone.
    ours: set[tuple[int, int]] = attrs.field(factory=set, init=False)
    #: Orphans that showed an empty environment once (maybe mid-exec): judged
    #: as unmarked if they still do at the next sweep.
    unsure: set[tuple[int, int]] = attrs.field(factory=set, init=False)
    running: bool = attrs.field(default=False, init=False)
    stopping: bool = attrs.field(default=False, init=False)
    #: Whether this process is a subreaper (False where the kernel cannot do it).
    subreaping: bool = attrs.field(default=False, init=False)
    sweeps: int = attrs.field(default=0, init=False)
    killed: int = attrs.field(default=0, init=False)
    reaped: int = attrs.field(default=0, init=False)
    _next_id: int = attrs.field(default=1, init=False)
    _loop: LoopingCall | None = attrs.field(default=None, init=False)
    _soon: IDelayedCall | None = attrs.field(default=None, init=False)

    # -- owners --------------------------------------------------------------------

    def lineage(self, service: str, worker: int | None, label: str) -> Lineage:
        """A new live owner; mark its process's environment with :meth:`Lineage.mark`."""
        lineage = Lineage(self, self._next_id, service, worker, label)
        self._next_id += 1
        self.lineages[lineage.id] = lineage
        return lineage

    def owner_ended(self, lineage: Lineage) -> None:
        """Called by :meth:`Lineage.end`: its orphans go at the next sweep, now."""
        self.lineages.pop(lineage.id, None)
        self.ended[lineage.id] = lineage
        while len(self.ended) > ENDED_KEPT:
            _, old = self.ended.popitem(last=False)
            if old.leader is not None and self.leaders.get(old.leader) is old:
                del self.leaders[old.leader]
        self.sweep_soon()

    # -- start and stop --------------------------------------------------------------

    def start(self) -> None:
        """Become a subreaper (once per process) and sweep every ``interval`` seconds."""
        global _we_set_subreaper
        self.running = True
        if not _running:
            already = self.subreaper.get()
            if already is None:
                log.warn("cannot become a child subreaper (not Linux, or no prctl): "
                         "what workers and scripts leave behind may outlive them")
            elif not already:
                try:
                    self.subreaper.set(True)
                    _we_set_subreaper = True
                except OSError as e:
                    log.warn("cannot become a child subreaper ({error}): what workers "
                             "and scripts leave behind may outlive them", error=e)
            self.subreaping = bool(self.subreaper.get())
        else:
            self.subreaping = _running[0].subreaping
        _running.append(self)
        self._loop = LoopingCall(self.sweep)
        self._loop.clock = self.clock
        self._loop.start(self.interval, now=False)

    def stop(self) -> Deferred[None]:
        """Kill every descendant of ours and wait until they are reaped (at most
        :data:`STOP_TIMEOUT`); then stop sweeping.  Call after the pools stopped."""
        if not self.running:
            return succeed(None)
        self.stopping = True
        for lineage in list(self.lineages.values()):
            lineage.alive = False
            self.ended[lineage.id] = lineage
        self.lineages.clear()
        deadline = self.clock.seconds() + STOP_TIMEOUT
        done: Deferred[None] = Deferred()

        def again() -> None:
            left = self.sweep()
            if left and self.clock.seconds() < deadline:
                self.clock.callLater(STOP_POLL, again)
                return
            if left:
                log.warn("{count} descendant(s) still there {timeout:g}s after the stop: "
                         "{pids}", count=len(left), timeout=STOP_TIMEOUT, pids=sorted(left))
            self._halt()
            done.callback(None)

        again()
        return done

    def _halt(self) -> None:
        global _we_set_subreaper
        self.running = False
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        if self in _running:
            _running.remove(self)
            if not _running and _we_set_subreaper:
                try:
                    self.subreaper.set(False)
                except OSError:
                    pass
                _we_set_subreaper = False

    # -- sweeping ----------------------------------------------------------------------

    def sweep_soon(self, delay: float = 0.0) -> None:
        """A sweep within ``delay`` seconds (coalesced with one already due)."""
        if not self.running or self.stopping:
            return
        soon = self._soon
        if soon is not None and soon.active():
            if soon.getTime() <= self.clock.seconds() + delay:
                return
            soon.cancel()
        self._soon = self.clock.callLater(delay, self._sweep_now)

    def _sweep_now(self) -> None:
        self._soon = None
        self.sweep()

    def sweep(self) -> set[int]:
        """Decide about every orphan now (see the module docstring).

        Returns the orphans still there that must go (killed just now, or zombies
        not reaped yet): empty once nothing is left to clean up.
        """
        self.sweeps += 1
        table = self.procs.snapshot()
        me = self.procs.self_pid()
        left: set[int] = set()
        kills: dict[tuple[str, int | None, str], list[int]] = {}
        for info in table.values():
            if info.ppid != me or info.pid in self.spawned:
                continue
            key = (info.pid, info.start)
            if info.zombie:
                # Ours if seen or killed as ours, or still in an owner's session or
                # group (what the group kill at a worker's exit leaves as zombies).
                if key in self.ours or self.strangers_hostile or self._leader(info):
                    if self.procs.reap(info.pid):
                        self.reaped += 1
                        self.ours.discard(key)
                    else:
                        left.add(info.pid)
                continue
            verdict = self._judge(info)
            if verdict is None:
                self.unsure.add(key)
                left.add(info.pid)  # look again soon
                continue
            if verdict.owner is not None:
                self.ours.add(key)  # a live owner's: left alone, reaped when it exits
                continue
            if not verdict.ours and not self.strangers_hostile:
                continue  # not ours to judge (a test runner's own children)
            subtree = _subtree(table, info.pid)
            for pid in subtree:
                self.procs.kill(pid, signal.SIGKILL)
                self.ours.add((pid, table[pid].start))
            self.killed += len(subtree)
            left.add(info.pid)
            kills.setdefault(verdict.why, []).extend(subtree)
        # Forget what is gone (a pid may be reused: the start time tells).
        present = {(i.pid, i.start) for i in table.values()}
        self.ours &= present
        self.unsure &= present
        for (service, worker, label), pids in kills.items():
            self._event(service, worker, f"killed {len(pids)} leftover process(es) of "
                        f"{label}", pids)
        if left:
            self.sweep_soon(AFTER_KILL)
        return left

    def _leader(self, orphan: ProcInfo) -> Lineage | None:
        """The owner whose session or group ``orphan`` is still in."""
        return self.leaders.get(orphan.session) or self.leaders.get(orphan.pgrp)

    def _judge(self, orphan: ProcInfo) -> Verdict | None:
        """Who owns ``orphan`` (None: cannot tell yet)."""
        marker = self.procs.lineage(orphan.pid)
        if marker == "" and (orphan.pid, orphan.start) not in self.unsure:
            leader = self._leader(orphan)
            if leader is not None and leader.alive:
                return Verdict(leader, True, ("", None, ""))
            return None
        if marker:
            nonce, _, ident = marker.partition(":")
            if nonce == self.nonce:
                number = int(ident) if ident.isdigit() else -1
                owner = self.lineages.get(number)
                if owner is not None:
                    return Verdict(owner, True, ("", None, ""))
                gone = self.ended.get(number)
                if gone is not None:
                    return Verdict(None, True, (gone.service, gone.worker, gone.label))
                return Verdict(None, True, ("", None, f"ended owner #{ident}"))
        # Unmarked (scrubbed, or another daemon's mark): an owner's if it kept the
        # owner's session or group (workers and scripts lead their own session).
        leader = self._leader(orphan)
        if leader is not None:
            if leader.alive:
                return Verdict(leader, True, ("", None, ""))
            return Verdict(None, True, (leader.service, leader.worker, leader.label))
        return Verdict(None, False, ("", None, "nobody (unmarked, re-parented to the daemon)"))

    def _event(self, service: str, worker: int | None, message: str,
               pids: list[int]) -> None:
        shown = sorted(pids)[:12]
        more = f" (+{len(pids) - len(shown)})" if len(pids) > len(shown) else ""
        self.events.add("contained", service, worker,
                        f"{message}: pid {', '.join(map(str, shown))}{more}", "warn",
                        pids=shown, count=len(pids))

    # -- a CGI execution whose pipes stay open -------------------------------------------

    def release(self, lineage: Lineage, inodes: Iterable[int] = ()) -> int:
        """End ``lineage`` and kill, now, its orphans and any orphan (or process below
        one) that still holds one of the pipes ``inodes`` — the script's stdout and
        stderr, whose output is complete once nothing holds them.  A holder may have
        scrubbed its mark: the pipe names it.  Returns how many were killed.
        """
        before = self.killed
        lineage.end()
        frozen = frozenset(inodes)
        if frozen:
            table = self.procs.snapshot()
            me = self.procs.self_pid()
            holders = [pid for info in table.values()
                       if info.ppid == me and info.pid not in self.spawned and not info.zombie
                       for pid in _subtree(table, info.pid) if self.procs.holds(pid, frozen)]
            for pid in holders:
                self.procs.kill(pid, signal.SIGKILL)
                self.ours.add((pid, table[pid].start))
            if holders:
                self.killed += len(holders)
                self._event(lineage.service, lineage.worker,
                            f"killed {len(holders)} process(es) holding the pipes of "
                            f"{lineage.label}", holders)
        self.sweep()
        return self.killed - before

    def status(self) -> dict[str, Any]:
        return {"subreaper": self.subreaping, "owners": len(self.lineages),
                "sweeps": self.sweeps, "killed": self.killed, "reaped": self.reaped}


@attrs.frozen
class Verdict:
    """What a sweep makes of one orphan."""

    #: Its live owner (then it is left alone).
    owner: Lineage | None
    #: Marked by this daemon (or attributed to one of its owners).
    ours: bool
    #: (service, worker, label) for the event if it is killed.
    why: tuple[str, int | None, str]


def _subtree(table: Mapping[int, ProcInfo], root: int) -> list[int]:
    """``root`` and every process below it, parents first."""
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def new_lineage(containment: Containment | None, service: str, worker: int | None,
                label: str) -> Lineage:
    """A lineage from ``containment``, or an inert one when there is none."""
    if containment is None:
        return Lineage(None, 0, service, worker, label)
    return containment.lineage(service, worker, label)
