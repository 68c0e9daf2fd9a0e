"""Test doubles: a process reactor on a Clock, and a health probe the test drives.

Modelled on Twisted's own procmon tests: spawning records the call and
connects the protocol to a fake transport; the test decides when a process
exits and when a probe answers, and advances time instead of sleeping.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from cgipool.config import HealthConfig, RestartConfig, ServiceConfig, WorkersConfig


class FakeProcessTransport:
    def __init__(self, reactor: FakeProcessReactor, proto: Any, pid: int) -> None:
        self.reactor = reactor
        self.proto = proto
        self.pid: int | None = pid
        self.stdin_closed = False
        self.pipes_open = True

    def closeStdin(self) -> None:
        self.stdin_closed = True

    def loseConnection(self) -> None:
        """Close our pipe ends; ends the process protocol if it already exited."""
        if self.pipes_open:
            self.pipes_open = False
            if self.pid is None:
                self.proto.processEnded(self.reactor.last_reason[self])


@attrs.define
class Spawned:
    proto: Any
    executable: str
    args: list[str]
    env: dict[str, str]
    path: str | None
    transport: FakeProcessTransport

    @property
    def pid(self) -> int:
        return self.proto.pid


class FakeProcessReactor(Clock):
    """A Clock that can 'spawn' processes and end them on command."""

    def __init__(self) -> None:
        super().__init__()
        self.spawned: list[Spawned] = []
        self.by_pid: dict[int, Spawned] = {}
        self.last_reason: dict[FakeProcessTransport, Failure] = {}
        self._next_pid = 1000
        self.fail_spawn: Exception | None = None

    def spawnProcess(self, proto: Any, executable: str, args: list[str],
                     env: dict[str, str] | None = None, path: str | None = None,
                     uid: int | None = None, gid: int | None = None,
                     usePTY: bool = False, childFDs: Any = None) -> FakeProcessTransport:
        if self.fail_spawn is not None:
            raise self.fail_spawn
        self._next_pid += 1
        transport = FakeProcessTransport(self, proto, self._next_pid)
        record = Spawned(proto, executable, list(args), dict(env or {}), path, transport)
        self.spawned.append(record)
        self.by_pid[self._next_pid] = record
        proto.makeConnection(transport)
        return transport

    def exit(self, pid: int, code: int | None = 0, sig: int | None = None,
             close_pipes: bool = True) -> None:
        """The process ``pid`` ends (is reaped); its pipes close too unless told not to."""
        record = self.by_pid[pid]
        transport = record.transport
        if code == 0 and sig is None:
            reason = Failure(error.ProcessDone(0))
        else:
            reason = Failure(error.ProcessTerminated(exitCode=code, signal=sig))
        transport.pid = None
        self.last_reason[transport] = reason
        record.proto.processExited(reason)
        if close_pipes and transport.pipes_open:
            transport.pipes_open = False
            record.proto.processEnded(reason)

    def alive(self) -> list[int]:
        return [pid for pid, r in self.by_pid.items() if r.transport.pid is not None]


class FakeProbe:
    """Health probes that wait for the test to answer them."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, str, Deferred[object]]] = []
        self.calls = 0

    def __call__(self, port: int, path: str) -> Deferred[object]:
        self.calls += 1
        d: Deferred[object] = Deferred()
        self.pending.append((port, path, d))
        return d

    def answer(self, port: int | None = None, ok: bool = True) -> int:
        """Answer every pending probe (of ``port``); returns how many."""
        todo = [p for p in self.pending if port is None or p[0] == port]
        self.pending = [p for p in self.pending if p not in todo]
        for _, _, d in todo:
            if d.called:
                continue
            if ok:
                d.callback(None)
            else:
                d.errback(error.ConnectionRefusedError())
        return len(todo)


class KillRecorder:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def __call__(self, pid: int, sig: int) -> None:
        self.calls.append((pid, sig))

    def signals_to(self, pid: int) -> list[int]:
        return [s for p, s in self.calls if p == pid]


def service(name: str = "svc", **overrides: Any) -> ServiceConfig:
    values: dict[str, Any] = dict(
        name=name,
        command=("/bin/worker", "--port", "{port}", "--id={worker}"),
        route=f"/api/{name}",
        workers=WorkersConfig(2, 4),
        health=HealthConfig(path="/health", interval=5.0, timeout=1.0, fall=3),
        restart=RestartConfig(delay=0.1, max_delay=30.0, reset_after=10.0, failing_after=3),
        env={"GREETING": "hi"},
        stop_timeout=5.0,
        start_timeout=30.0,
        cwd="/srv",
    )
    values.update(overrides)
    return ServiceConfig(**values)
