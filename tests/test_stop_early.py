"""Stopping workers that were only just spawned (before their setsid)."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase

from cgipool.config import load
from cgipool.tap import build
from tests.support import (
    process_alive,
    require_binaries,
    search_service,
    wait_for,
    write_config,
)

SEARCH = "\nservices:\n" + search_service(workers=2, stop_timeout=5)


class EarlyStopTests(TestCase):
    async def test_stop_right_after_spawn_is_prompt(self) -> None:
        """SIGTERM goes to the process *group* (killpg); right after spawn the
        child has not run setsid() yet and killpg() fails with ESRCH: the
        signal must reach the process itself, or the stop waits the whole
        stop_timeout and SIGKILLs.  (Same for scale-in / replace of a worker
        that was just spawned.)"""
        require_binaries("search.cgi")
        top = build(load(write_config(self, SEARCH)), reactor)
        supervisor = top.supervisor
        kills = []
        supervisor.events.subscribe(lambda e: kills.append(e.message) if e.kind == "kill" else None)
        supervisor.startService()  # spawns; the children are still in setpriv/setsid
        pids = [w.pid for p in supervisor.pools.values() for w in p.workers]

        async def cleanup() -> None:
            await wait_for(lambda: not any(process_alive(p) for p in pids), 10,
                           what="every worker gone")

        self.addCleanup(cleanup)
        await supervisor.stopService()
        # A lost SIGTERM shows as the SIGKILL after stop_timeout (a "kill"
        # event), not as seconds on the wall clock: no speed requirement.
        self.assertEqual(kills, [], "a worker ignored SIGTERM until stop_timeout")


class LeftoverKillTests(TestCase):
    def test_cleanup_after_exit_never_signals_the_reaped_pid_itself(self) -> None:
        """kill_group falls back to kill(pid) for a live child not yet in its own
        group; after the exit the pid may belong to someone else: group only."""
        import os
        import signal
        from unittest import mock

        from cgipool.supervisor.pool import kill_group, kill_leftovers

        with mock.patch.object(os, "killpg", side_effect=ProcessLookupError), \
                mock.patch.object(os, "kill") as kill:
            kill_leftovers(4242, signal.SIGKILL)
            kill.assert_not_called()
            kill_group(4242, signal.SIGTERM)
            kill.assert_called_once_with(4242, signal.SIGTERM)
