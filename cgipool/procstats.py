"""Resident memory and CPU use of every worker process, sampled with psutil.

:class:`ProcessSampler` keeps one :class:`psutil.Process` per live worker pid,
so ``cpu_percent(interval=None)`` measures the CPU time used since the previous
sample (the metrics tick, once a second).  It holds only the pids the pools
have now: a pid that left the pools, or whose process is gone, is dropped at
the next sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypedDict

import psutil
from twisted.logger import Logger

log = Logger(namespace="cgipool.procstats")

#: A process we may not or can no longer look at.
GONE = (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied)


class ProcessStats(TypedDict):
    #: Resident set size, bytes.
    rss: int
    #: CPU use since the previous sample; 100.0 is one core fully busy.  The
    #: first sample of a process has nothing to compare with and says 0.0.
    cpu_percent: float
    #: User + system CPU seconds of the process since it started (a counter:
    #: ``cgipool_worker_cpu_seconds_total``).
    cpu_seconds: float


class ProcessSampler:
    """RSS and CPU % of the processes ``pids()`` names, refreshed by :meth:`sample`.

    :param clock: an ``IReactorTime``; :attr:`sampled_at` is its time of the
        last sample.
    :param pids: the pids to watch now (the workers of every pool).
    """

    def __init__(self, clock: Any, pids: Callable[[], Iterable[int]],
                 process_factory: Callable[[int], psutil.Process] = psutil.Process) -> None:
        self.clock = clock
        self.pids = pids
        self._process_factory = process_factory
        self._processes: dict[int, psutil.Process] = {}
        self._stats: dict[int, ProcessStats] = {}
        self.sampled_at: float | None = None

    def sample(self) -> None:
        """Measure every watched process once; forget the ones that are gone."""
        wanted = {pid for pid in self.pids() if pid}
        for pid in [pid for pid in self._processes if pid not in wanted]:
            self._forget(pid)
        for pid in wanted:
            process = self._processes.get(pid)
            if process is not None and not _same_process(process):
                # The pid was reused by another process since the last sample.
                self._forget(pid)
                process = None
            if process is None:
                try:
                    process = self._process_factory(pid)
                except GONE:
                    continue
                self._processes[pid] = process
            try:
                with process.oneshot():
                    rss = process.memory_info().rss
                    cpu = process.cpu_percent(interval=None)
                    times = process.cpu_times()
                    if process.status() == psutil.STATUS_ZOMBIE:
                        raise psutil.ZombieProcess(pid)
            except GONE:
                self._forget(pid)
                continue
            self._stats[pid] = {"rss": rss, "cpu_percent": round(cpu, 2),
                                "cpu_seconds": round(times.user + times.system, 3)}
        self.sampled_at = self.clock.seconds()

    def stats(self, pid: int | None) -> ProcessStats | None:
        """The last sample of ``pid``, or None when it is not (or no longer) known."""
        if pid is None:
            return None
        return self._stats.get(pid)

    def all_stats(self) -> dict[int, ProcessStats]:
        """pid -> last sample, for every watched process."""
        return dict(self._stats)

    def __len__(self) -> int:
        return len(self._processes)

    def _forget(self, pid: int) -> None:
        self._processes.pop(pid, None)
        self._stats.pop(pid, None)


def _same_process(process: psutil.Process) -> bool:
    """False once the process has gone and its pid belongs to another one."""
    try:
        return process.is_running()
    except GONE:
        return False
