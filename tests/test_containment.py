"""Containment of descendants (cgipool/supervisor/containment.py).

The sweep's decisions run against a fake process table on a Clock; the hostile
cases (CGI scripts and workers that leave ``setsid`` children behind, a daemon
stopped with SIGTERM) run real processes under a real daemon.  The table in
docs/hardening.md lists these tests by name.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from typing import Any

import attrs
import treq
from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web.test.requesthelper import DummyRequest

from cgipool.cgi import CLOSE_AFTER, LINGER, CgiExecution
from cgipool.config import WorkersConfig
from cgipool.events import EventLog
from cgipool.health import HealthMonitor
from cgipool.supervisor.containment import (
    LINEAGE_VAR,
    STOP_TIMEOUT,
    SWEEP_INTERVAL,
    Containment,
    ProcFS,
    ProcInfo,
    new_lineage,
)
from cgipool.supervisor.pool import ServicePool
from cgipool.supervisor.ports import PortAllocator
from tests.fakes import FakeProbe, FakeProcessReactor, KillRecorder, service
from tests.support import (
    ROOT,
    get_json,
    http_client,
    process_alive,
    start_daemon,
    wait_for,
    write_config,
)

ME = 1


class FakeProcs:
    """A process table with the kernel's rules that matter here: a killed process
    becomes a zombie if the daemon is its parent (else its parent reaps it), and
    its children are re-parented to the daemon (a subreaper)."""

    def __init__(self) -> None:
        self.table: dict[int, ProcInfo] = {}
        self.env: dict[int, str] = {}
        self.fds: dict[int, set[int]] = {}
        self.signals: list[tuple[int, int]] = []
        self.reaped: list[int] = []
        #: Processes a SIGKILL does not end (stuck in the kernel, say).
        self.immortal: set[int] = set()

    def add(self, pid: int, ppid: int = ME, lineage: str | None = None,
            session: int | None = None, pgrp: int | None = None,
            fds: tuple[int, ...] = (), state: str = "S") -> int:
        self.table[pid] = ProcInfo(pid, ppid, state, pgrp or pid, session or pid, pid * 10)
        if lineage is not None:
            self.env[pid] = lineage
        self.fds[pid] = set(fds)
        return pid

    def alive(self) -> set[int]:
        return {p for p, i in self.table.items() if not i.zombie}

    # ProcessTable

    def self_pid(self) -> int:
        return ME

    def snapshot(self) -> dict[int, ProcInfo]:
        return dict(self.table)

    def lineage(self, pid: int) -> str | None:
        return None if self.table[pid].zombie else self.env.get(pid)

    def holds(self, pid: int, inodes: frozenset[int]) -> bool:
        return bool(self.fds.get(pid, set()) & inodes)

    def kill(self, pid: int, sig: int) -> None:
        self.signals.append((pid, sig))
        info = self.table.get(pid)
        if info is None or info.zombie or pid in self.immortal:
            return
        for child in list(self.table.values()):
            if child.ppid == pid:
                self.table[child.pid] = attrs.evolve(child, ppid=ME)
        if info.ppid == ME:
            self.table[pid] = attrs.evolve(info, state="Z")
        else:
            del self.table[pid]

    def reap(self, pid: int) -> bool:
        info = self.table.get(pid)
        if info is None or info.ppid != ME:
            return True
        if not info.zombie:
            return False
        del self.table[pid]
        self.reaped.append(pid)
        return True


class FakeSubreaper:
    def __init__(self, on: bool | None = False, refuse: bool = False) -> None:
        self.on = on
        self.refuse = refuse
        self.calls: list[bool] = []

    def get(self) -> bool | None:
        return self.on

    def set(self, on: bool) -> None:
        self.calls.append(on)
        if self.refuse or self.on is None:
            raise OSError(1, "Operation not permitted")
        self.on = on


class DecisionTests(TestCase):
    """What a sweep does with each kind of orphan."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.events = EventLog(self.clock.seconds)
        self.procs = FakeProcs()
        self.subreaper = FakeSubreaper()

    def contain(self, hostile: bool = False) -> Containment:
        c = Containment(self.clock, self.events, procs=self.procs, subreaper=self.subreaper,
                        strangers_hostile=hostile)
        c.start()
        self.addCleanup(self.stop, c)
        return c

    def stop(self, c: Containment) -> None:
        d = c.stop()
        self.clock.advance(STOP_TIMEOUT + 1)
        self.successResultOf(d)

    def kills(self) -> list[int]:
        return [pid for pid, sig in self.procs.signals if sig == signal.SIGKILL]

    def contained(self) -> list[Any]:
        return [e for e in self.events if e.kind == "contained"]

    def test_an_orphan_of_a_live_owner_is_left_alone(self) -> None:
        c = self.contain()
        worker = c.lineage("search", 0, "search[0]")
        worker.spawned(self.procs.add(100))
        self.procs.add(200, lineage=worker.marker)  # its double-forked helper
        self.assertEqual(c.sweep(), set())
        self.assertEqual(self.procs.signals, [])
        self.assertEqual(self.procs.alive(), {100, 200})

    def test_orphans_of_an_ended_owner_die_with_their_subtree_and_are_reaped(self) -> None:
        c = self.contain()
        worker = c.lineage("search", 0, "search[0]")
        worker.spawned(self.procs.add(100))
        self.procs.add(200, lineage=worker.marker)
        self.procs.add(201, ppid=200, lineage=worker.marker)
        self.procs.add(202, ppid=201)  # scrubbed its environment: the tree names it
        del self.procs.table[100]  # the worker exits (Twisted reaps it)
        worker.end()
        self.clock.advance(0)  # the sweep an ended owner asks for
        self.assertEqual(sorted(self.kills()), [200, 201, 202])
        (event,) = self.contained()
        self.assertEqual((event.service, event.worker, event.fields["count"]),
                         ("search", 0, 3))
        self.assertIn("leftover process(es) of search[0]", event.message)
        # Killed: zombies of the daemon now, reaped by the sweep that follows a kill.
        self.clock.advance(0.1)
        self.assertEqual(sorted(self.procs.reaped), [200, 201, 202])
        self.assertEqual(self.procs.table, {})

    def test_an_unknown_lineage_of_ours_counts_as_ended(self) -> None:
        c = self.contain()
        self.procs.add(300, lineage=f"{c.nonce}:999")
        self.procs.add(301, lineage=f"{c.nonce}:garbage")
        c.sweep()
        self.assertEqual(sorted(self.kills()), [300, 301])

    def test_processes_the_reactor_spawned_are_never_touched(self) -> None:
        c = self.contain(hostile=True)
        worker = c.lineage("search", 0, "search[0]")
        worker.spawned(self.procs.add(100))
        script = c.lineage("cgi", None, "cgi-1")
        script.spawned(self.procs.add(101, state="Z"))  # exited, Twisted not told yet
        c.sweep()
        self.assertEqual((self.procs.signals, self.procs.reaped), ([], []))

    def test_zombies_of_strangers_are_reaped_only_when_strangers_are_hostile(self) -> None:
        c = self.contain()
        self.procs.add(400, state="Z")  # a test runner's own child, say
        c.sweep()
        self.assertEqual(self.procs.reaped, [])
        c.strangers_hostile = True
        c.sweep()
        self.assertEqual(self.procs.reaped, [400])

    def test_zombies_of_our_orphans_are_reaped(self) -> None:
        c = self.contain()
        worker = c.lineage("search", 0, "search[0]")
        worker.spawned(self.procs.add(100))
        self.procs.add(200, lineage=worker.marker)
        c.sweep()  # seen alive: ours
        self.procs.table[200] = attrs.evolve(self.procs.table[200], state="Z")
        c.sweep()
        self.assertEqual(self.procs.reaped, [200])

    def test_a_reused_pid_is_not_mistaken_for_our_orphan(self) -> None:
        c = self.contain()
        worker = c.lineage("search", 0, "search[0]")
        self.procs.add(200, lineage=worker.marker)
        c.sweep()
        del self.procs.table[200]
        c.sweep()  # gone: forgotten
        self.procs.table[200] = ProcInfo(200, ME, "Z", 200, 200, 77)  # another one
        c.sweep()
        self.assertEqual(self.procs.reaped, [])

    def test_unmarked_orphans_are_killed_only_when_strangers_are_hostile(self) -> None:
        c = self.contain()
        self.procs.add(500)
        self.procs.add(501, lineage="0123456789ab:1")  # another daemon's mark
        c.sweep()
        self.assertEqual(self.procs.signals, [])
        c.strangers_hostile = True
        c.sweep()
        self.assertEqual(sorted(self.kills()), [500, 501])
        (event,) = self.contained()
        self.assertEqual(event.service, "")
        self.assertIn("nobody (unmarked", event.message)

    def test_an_unmarked_orphan_in_a_live_workers_session_is_left_alone(self) -> None:
        c = self.contain(hostile=True)
        worker = c.lineage("search", 0, "search[0]")
        worker.spawned(self.procs.add(100))
        self.procs.add(600, session=100)  # env -i, but still in the worker's session
        self.procs.add(601, session=601, pgrp=100)  # or its group
        c.sweep()
        self.assertEqual(self.procs.signals, [])
        self.procs.table.pop(100)
        worker.end()
        self.clock.advance(0)
        self.assertEqual(sorted(self.kills()), [600, 601])
        (event,) = self.contained()
        self.assertEqual((event.service, event.worker), ("search", 0))

    def test_the_session_of_an_ended_owner_names_its_leftovers_even_unmarked(self) -> None:
        c = self.contain()  # strangers left alone: the session says these are ours
        worker = c.lineage("search", 0, "search[0]")
        worker.spawned(self.procs.add(100))
        self.procs.add(610, session=100, pgrp=610)  # left the group, kept the session
        self.procs.add(611, session=100, state="Z")  # killed with the group, re-parented
        self.procs.table.pop(100)
        worker.end()
        self.clock.advance(0)
        self.assertEqual((self.kills(), self.procs.reaped), ([610], [611]))

    def test_an_empty_environment_is_judged_at_the_second_look(self) -> None:
        # A process in the middle of an exec shows an empty environment, as does
        # one started with `env -i`: only the second look tells them apart.
        c = self.contain(hostile=True)
        worker = c.lineage("search", 0, "search[0]")
        self.procs.add(800, lineage="")
        self.procs.add(801, lineage="")
        c.sweep()
        self.assertEqual(self.procs.signals, [])
        self.procs.env[801] = worker.marker  # its exec finished
        self.clock.advance(0.1)
        self.assertEqual(self.kills(), [800])

    def test_the_periodic_sweep(self) -> None:
        """Without any worker ending, the sweep every SWEEP_INTERVAL finds a process marked
        by this daemon for a lineage no longer alive and kills it, not before the
        interval."""
        c = self.contain()
        self.procs.add(300, lineage=f"{c.nonce}:999")
        self.clock.advance(SWEEP_INTERVAL - 0.01)
        self.assertEqual(self.kills(), [])
        self.clock.advance(0.02)
        self.assertEqual(self.kills(), [300])

    def test_release_kills_pipe_holders_whatever_their_mark(self) -> None:
        c = self.contain()
        script = c.lineage("cgi", None, "cgi-7")
        script.spawned(self.procs.add(100))
        self.procs.add(700, fds=(4242,))  # scrubbed, own session, holds stdout
        self.procs.add(701, ppid=700, fds=(4243,))  # below it, holds stderr
        self.procs.add(702, lineage=script.marker)  # marked, holds nothing
        self.procs.add(703, fds=(9999,))  # someone else's pipe: a stranger, left alone
        self.procs.table.pop(100)
        script.exited()
        self.assertEqual(c.release(script, [4242, 4243]), 3)
        self.assertEqual(sorted(self.kills()), [700, 701, 702])
        messages = [e.message for e in self.contained()]
        self.assertTrue(any("holding the pipes of cgi-7" in m for m in messages), messages)

    def test_stop_kills_every_marked_descendant_and_waits_until_reaped(self) -> None:
        c = Containment(self.clock, self.events, procs=self.procs, subreaper=self.subreaper)
        c.start()
        worker = c.lineage("search", 0, "search[0]")
        self.procs.add(200, lineage=worker.marker)  # its owner never ended (no stop)
        self.procs.add(201, ppid=200, lineage=worker.marker)
        self.procs.add(500)  # not ours: left to the test runner
        d = c.stop()
        self.assertNoResult(d)  # killed, not reaped yet
        self.clock.advance(0.02)
        self.assertEqual(sorted(self.procs.reaped), [200, 201])
        self.clock.advance(0.02)
        self.successResultOf(d)
        self.assertEqual(self.procs.alive(), {500})
        self.assertFalse(c.running)

    def test_stop_gives_up_after_its_timeout(self) -> None:
        c = Containment(self.clock, self.events, procs=self.procs, subreaper=self.subreaper)
        c.start()
        self.procs.add(200, lineage=f"{c.nonce}:1")
        self.procs.immortal.add(200)
        d = c.stop()
        self.clock.advance(STOP_TIMEOUT - 0.1)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.successResultOf(d)

    def test_the_subreaper_is_set_on_start_and_cleared_on_stop(self) -> None:
        c = Containment(self.clock, self.events, procs=self.procs, subreaper=self.subreaper)
        c.start()
        self.assertTrue(c.subreaping)
        self.assertEqual(self.subreaper.calls, [True])
        self.successResultOf(c.stop())
        self.assertEqual(self.subreaper.calls, [True, False])

    def test_a_subreaper_set_by_someone_else_stays_set(self) -> None:
        self.subreaper.on = True
        c = Containment(self.clock, self.events, procs=self.procs, subreaper=self.subreaper)
        c.start()
        self.successResultOf(c.stop())
        self.assertEqual(self.subreaper.calls, [])

    def test_without_a_subreaper_it_says_so_and_goes_on(self) -> None:
        for subreaper in (FakeSubreaper(on=None), FakeSubreaper(refuse=True)):
            c = Containment(self.clock, self.events, procs=self.procs, subreaper=subreaper)
            c.start()
            self.assertFalse(c.subreaping)
            self.procs.add(300, lineage=f"{c.nonce}:5")
            c.sweep()  # what it can still see (direct children) it still cleans up
            self.assertIn(300, self.kills())
            self.successResultOf(c.stop())
            self.procs.table.clear()

    def test_lineage_marks_the_environment_and_an_inert_one_does_nothing(self) -> None:
        c = self.contain()
        lineage = c.lineage("search", 1, "search[1]")
        env: dict[str, str] = {}
        lineage.mark(env)
        self.assertEqual(env, {LINEAGE_VAR: f"{c.nonce}:{lineage.id}"})
        inert = new_lineage(None, "search", 1, "search[1]")
        inert.mark(env := {})
        inert.spawned(5)
        inert.end()
        self.assertEqual(env, {})


class ProcFSTests(TestCase):
    """The real /proc reader, on this test process."""

    async def test_reads_this_process_and_its_environment(self) -> None:
        procs = ProcFS()
        me = procs.snapshot()[os.getpid()]
        self.assertEqual((me.ppid, me.zombie), (os.getppid(), False))
        os.environ[LINEAGE_VAR] = "abc:1"
        self.addCleanup(os.environ.pop, LINEAGE_VAR)
        # /proc/self/environ is the environment at exec: read a child's.
        import subprocess

        child = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE)
        self.addCleanup(child.wait)
        self.addCleanup(child.kill)
        # Popen returns while the exec is still setting up the new environment.
        await wait_for(lambda: procs.lineage(child.pid) != "", 5, what="the exec done")
        self.assertEqual(procs.lineage(child.pid), "abc:1")
        inode = os.fstat(child.stdout.fileno()).st_ino  # type: ignore[union-attr]
        self.assertTrue(procs.holds(child.pid, frozenset({inode})))
        self.assertFalse(procs.holds(child.pid, frozenset({1})))
        child.stdout.close()  # type: ignore[union-attr]


class _Pool:
    """What one CgiExecution asks of its pool."""

    name = "script"
    output_budget = None

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.ended: list[tuple[Any, Any]] = []

    def kill(self, pid: int, sig: int) -> None:
        pass

    def kill_leftovers(self, pid: int, sig: int) -> None:
        pass

    def finished(self, execution: Any, exit_code: Any, ok: Any) -> None:
        self.ended.append((exit_code, ok))


class _Resource:
    def record(self, code: int, seconds: float) -> None:
        pass


class OwnerTests(TestCase):
    """The pools mark what they spawn and end the lineage when it is over."""

    def setUp(self) -> None:
        self.reactor = FakeProcessReactor()
        self.events = EventLog(self.reactor.seconds)
        self.procs = FakeProcs()
        self.containment = Containment(self.reactor, self.events, procs=self.procs,
                                       subreaper=FakeSubreaper())
        self.containment.start()
        self.addCleanup(self.stop)

    def stop(self) -> None:
        d = self.containment.stop()
        self.reactor.advance(STOP_TIMEOUT + 1)
        self.successResultOf(d)

    def test_a_worker_is_marked_and_its_exit_ends_its_lineage(self) -> None:
        pool = ServicePool(service("svc", workers=WorkersConfig(1, 1)),
                           self.reactor, ports=PortAllocator(9000, 9010),
                           events=self.events, probe=FakeProbe(), monitor=HealthMonitor,
                           launcher=["/bin/launch"],
                           kill=KillRecorder(), port_free=lambda p: True,
                           containment=self.containment)
        pool.start()
        (spawned,) = self.reactor.spawned
        nonce, _, ident = spawned.env[LINEAGE_VAR].partition(":")
        self.assertEqual(nonce, self.containment.nonce)
        lineage = self.containment.lineages[int(ident)]
        self.assertEqual((lineage.service, lineage.worker, lineage.pid),
                         ("svc", 0, spawned.pid))
        self.assertIn(spawned.pid, self.containment.spawned)
        self.procs.add(200, lineage=spawned.env[LINEAGE_VAR])  # its escaped helper
        self.reactor.exit(spawned.pid, sig=signal.SIGKILL)
        self.assertNotIn(spawned.pid, self.containment.spawned)
        self.assertNotIn(lineage.id, self.containment.lineages)
        self.reactor.advance(0)
        self.assertIn((200, signal.SIGKILL), self.procs.signals)

    def test_a_cgi_execution_whose_pipes_stay_open_is_released_then_closed(self) -> None:
        pool = _Pool(self.reactor)
        request = DummyRequest([b""])
        request.content = None
        execution = CgiExecution(pool, request, _Resource(), "script-1", 0.0)  # type: ignore
        execution.lineage = self.containment.lineage("script", None, "script-1")
        self.reactor.spawnProcess(execution, "/bin/script", ["/bin/script"], env={})
        execution.lineage.spawned(execution.pid)
        self.procs.add(300, lineage=execution.lineage.marker)  # `setsid sleep` with stdout
        execution.outReceived(b"Content-Type: text/plain\n\nhello")
        self.reactor.exit(execution.pid, close_pipes=False)
        self.reactor.advance(LINGER - 0.01)
        execution.outReceived(b" there")  # still writing: the grace starts again
        self.reactor.advance(LINGER - 0.01)
        self.assertEqual(self.procs.signals, [])
        self.reactor.advance(0.02)
        self.assertIn((300, signal.SIGKILL), self.procs.signals)
        self.assertEqual(pool.ended, [])  # the fake pipes stay open: closed by the daemon
        self.reactor.advance(CLOSE_AFTER)
        self.assertEqual(pool.ended, [(0, True)])
        self.assertEqual(b"".join(request.written), b"hello there")

    def test_a_cgi_execution_that_ends_normally_ends_its_lineage_without_a_timer(
            self) -> None:
        pool = _Pool(self.reactor)
        request = DummyRequest([b""])
        request.content = None
        execution = CgiExecution(pool, request, _Resource(), "script-1", 0.0)  # type: ignore
        execution.lineage = self.containment.lineage("script", None, "script-1")
        self.reactor.spawnProcess(execution, "/bin/script", ["/bin/script"], env={})
        execution.lineage.spawned(execution.pid)
        self.procs.add(301, lineage=execution.lineage.marker)  # detached (no pipe)
        execution.outReceived(b"Content-Type: text/plain\n\nhi")
        self.reactor.exit(execution.pid)
        self.assertEqual(pool.ended, [(0, True)])
        self.assertEqual((execution.linger, execution.pipe_timer), (None, None))
        self.reactor.advance(0)
        self.assertIn((301, signal.SIGKILL), self.procs.signals)


# -- real processes --------------------------------------------------------------------

SCRIPT = os.path.join(ROOT, "tests", "workers", "cgi_behaviour.py")
MISBEHAVING = os.path.join(ROOT, "tests", "workers", "misbehaving.py")


def cgi_service(request_timeout: float = 10) -> str:
    return f"""
  script:
    protocol: cgi
    command: ["{{python}}", "{SCRIPT}"]
    route: /cgi/test
    workers: {{max: 4}}
    queue: {{max: 8, timeout: 5}}
    request_timeout: {request_timeout}
    stop_timeout: 2
"""


def escaping_worker(pidfile: str) -> str:
    command = json.dumps([sys.executable, MISBEHAVING, "{port}", "--escape", pidfile])
    return f"""
  odd:
    command: {command}
    route: /api/odd
    workers: 1
    health: {{path: "/", interval: 1, timeout: 1, fall: 2}}
    stop_timeout: 2
"""


def kill_all(pids: Any) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


class LeftoverTestCase(TestCase):
    def folder(self) -> str:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        return folder

    async def read_pids(self, path: str) -> list[int]:
        await wait_for(lambda: os.path.exists(path) and open(path).read().strip(), 10,
                       what=f"pids in {path}")
        with open(path) as f:
            pids = [int(p) for p in f.read().split()]
        self.addCleanup(kill_all, pids)  # whatever the test's outcome
        return pids

    async def assert_gone(self, pids: list[int], timeout: float = 10) -> None:
        await wait_for(lambda: not any(process_alive(p) for p in pids), timeout,
                       what=f"processes {pids} to be gone")


class CgiLeftoverTests(LeftoverTestCase):
    timeout = 60

    async def orphan_requests(self, query: str, times: int = 10) -> tuple[Any, list[int]]:
        """``times`` requests whose script leaves two `setsid sleep 300` holding its
        stdout (``query`` adds to the URL): each is a 200 released by the linger
        (not by request_timeout: no timeout counted), every slot frees, the
        service answers and the children are gone.  How soon (cgi.LINGER) is
        asserted on a Clock: test_a_cgi_execution_whose_pipes_stay_open_is_released_
        then_closed; here the waits are bounds, not speed targets."""
        daemon = await start_daemon(self, write_config(self, "services:" + cgi_service()))
        client = http_client(self)
        folder = self.folder()
        orphans: list[int] = []
        pool = daemon.pool("script")
        for i in range(times):
            pidfile = os.path.join(folder, f"pids-{i}")
            code, body = await get_json(
                client, f"{daemon.url}/cgi/test/orphan?n=2&pidfile={pidfile}{query}")
            self.assertEqual(code, 200, body)
            self.assertEqual(pool.timeouts, 0, f"request {i} was held until request_timeout")
            orphans += await self.read_pids(pidfile)
        # Every slot free, and the service answers normally.
        await wait_for(lambda: not pool.running, 8, what="every slot free")
        code, body = await get_json(client, f"{daemon.url}/cgi/test/env")
        self.assertEqual(code, 200)
        self.assertEqual(pool.timeouts, 0)
        await self.assert_gone(orphans)
        return daemon, orphans

    async def test_setsid_children_holding_a_scripts_stdout_do_not_keep_its_slot(
            self) -> None:
        daemon, orphans = await self.orphan_requests("")
        status = daemon.supervisor.status()["services"][0]["cgi"]
        self.assertEqual((status["timeouts"], status["failures"], status["rejected"]),
                         (0, 0, 0))
        contained = [e for e in daemon.supervisor.events if e.kind == "contained"]
        self.assertTrue(contained)
        self.assertEqual({e.service for e in contained}, {"script"})
        killed = {pid for e in contained for pid in e.fields["pids"]}
        self.assertEqual(killed, set(orphans))

    async def test_scrubbed_setsid_children_are_found_by_the_pipes_they_hold(self) -> None:
        # env -i: no lineage mark, and (in a test process) strangers are left alone,
        # so only the pipe inodes they hold name them.
        await self.orphan_requests("&scrub=1", times=3)

    async def test_a_leftover_that_keeps_writing_does_not_hold_the_answer(self) -> None:
        """A descendant writing to the script's stdout without end postpones the
        end of the response by at most cgi.MAX_LINGER: the client gets the
        script's complete answer (what the writer added follows it), not a 504
        after request_timeout, and the writer is killed."""
        daemon = await start_daemon(self, write_config(
            self, "services:" + cgi_service(request_timeout=60)))
        pidfile = os.path.join(self.folder(), "pids")
        response = await http_client(self).get(f"{daemon.url}/cgi/test/writer?pidfile={pidfile}")
        body = await treq.content(response)
        self.assertEqual(response.code, 200)
        answer = json.loads(body.split(b"\n", 1)[0].split(b"}", 1)[0] + b"}")
        self.assertEqual(set(answer), {"pid", "writer"})
        await self.assert_gone(await self.read_pids(pidfile))
        pool = daemon.pool("script")
        await wait_for(lambda: not pool.running, 10, what="the slot to be free")
        self.assertEqual(pool.timeouts, 0, "ended by MAX_LINGER, not request_timeout")

    async def test_detached_children_die_when_the_execution_ends(self) -> None:
        daemon = await start_daemon(self, write_config(self, "services:" + cgi_service()))
        pidfile = os.path.join(self.folder(), "pids")
        code, _ = await get_json(http_client(self),
                                 f"{daemon.url}/cgi/test/orphan?n=2&detach=1&pidfile={pidfile}")
        self.assertEqual(code, 200)
        await self.assert_gone(await self.read_pids(pidfile))
        (event,) = [e for e in daemon.supervisor.events if e.kind == "contained"]
        self.assertIn("leftover process(es) of script-1", event.message)


class WorkerLeftoverTests(LeftoverTestCase):
    timeout = 60

    async def escaped(self) -> tuple[Any, int]:
        pidfile = os.path.join(self.folder(), "escaped")
        daemon = await start_daemon(
            self, write_config(self, "services:" + escaping_worker(pidfile)))
        (escapee,) = await self.read_pids(pidfile)
        # Its parent exited: re-parented to the daemon (a subreaper), not to pid 1.
        await wait_for(lambda: parent_of(escapee) == os.getpid(), 5,
                       what="the escapee re-parented to the daemon")
        containment = daemon.supervisor.containment
        sweeps = containment.sweeps
        # Two sweeps take 2 × SWEEP_INTERVAL of timers; the bound leaves a busy
        # machine room (when sweeps come is asserted on a Clock:
        # test_the_periodic_sweep).
        await wait_for(lambda: containment.sweeps >= sweeps + 2, 10 * SWEEP_INTERVAL,
                       what="two more sweeps")
        self.assertTrue(process_alive(escapee), "left alone while its worker lives")
        return daemon, escapee

    async def test_an_escaped_descendant_lives_with_its_worker_and_dies_with_it(
            self) -> None:
        daemon, escapee = await self.escaped()
        (worker,) = daemon.pool("odd").workers
        os.kill(worker.pid, signal.SIGKILL)
        await self.assert_gone([escapee])
        kinds = [e.kind for e in daemon.supervisor.events if e.service == "odd"]
        self.assertIn("contained", kinds)

    async def test_daemon_stop_leaves_no_escaped_descendant(self) -> None:
        daemon, escapee = await self.escaped()
        await daemon.top.stopService()
        self.assertFalse(process_alive(escapee))


class TwistdLeftoverTests(LeftoverTestCase):
    timeout = 90

    async def test_sigterm_of_twistd_leaves_no_descendant(self) -> None:
        from tests.browser import start_daemon_process

        folder = self.folder()
        daemon = await start_daemon_process(
            self, "services:" + cgi_service()
            + escaping_worker(os.path.join(folder, "escaped")))
        client = http_client(self, persistent=False)
        leftovers = await self.read_pids(os.path.join(folder, "escaped"))
        for i, query in enumerate(["", "&scrub=1", "&detach=1"]):
            pidfile = os.path.join(folder, f"cgi-{i}")
            code, body = await get_json(
                client, f"{daemon.url}/cgi/test/orphan?n=2&pidfile={pidfile}{query}")
            self.assertEqual(code, 200, body)
            leftovers += await self.read_pids(pidfile)
        self.assertTrue(process_alive(leftovers[0]), "the worker's helper lives with it")
        daemon.signal("TERM")
        self.assertTrue(await daemon.wait_ended(15), daemon.tail())
        await self.assert_gone(leftovers)
        self.assertIn("contained: killed 1 leftover process(es) of odd[0]", daemon.output)
