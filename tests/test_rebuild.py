"""A rebuilt executable (or edited script, or watched file) and ``make reload``.

The unit tests run the real Supervisor and Reloader on a fake process reactor
(a Clock): change detection, the bounded wait for a new worker and the retry
of a crash-looping one.  The integration test rebuilds the ``search`` C service
with another answer in a temporary copy and reloads a real daemon under load.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import textwrap
from typing import Any

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cgipool.config import load
from cgipool.health import STARTUP_FIRST_DELAY, HealthMonitor
from cgipool.reload import READY_WAIT, Reloader
from cgipool.supervisor.inputs import InputStamps, changed_files, input_files
from cgipool.supervisor.supervisor import Supervisor
from cgipool.supervisor.worker import WorkerState
from cgipool.tap import ProxyService
from tests.fakes import FakeProbe, FakeProcessReactor, KillRecorder
from tests.support import ROOT, http_client, require_binaries, start_daemon, wait_for

S = WorkerState
LAUNCHER = ["/usr/bin/setpriv", "--pdeathsig", "KILL", "/usr/bin/setsid"]


def write(path: str, data: bytes, mode: int = 0o755) -> None:
    with open(path, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


class InputStampTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        self.path = os.path.join(self.dir, "worker")
        write(self.path, b"version 1")

    def test_same_bytes_rewritten_is_no_change_other_bytes_are(self) -> None:
        """A `make` that writes the same binary again (new mtime) rolls nothing."""
        stamps = InputStamps()
        before = stamps.stamps([self.path])
        write(self.path, b"version 1")
        os.utime(self.path, ns=(1, 1))
        self.assertEqual(changed_files(before, stamps.stamps([self.path])), [])
        write(self.path, b"version 2")
        self.assertEqual(changed_files(before, stamps.stamps([self.path])), [self.path])
        os.unlink(self.path)
        self.assertEqual(changed_files(before, stamps.stamps([self.path])), [self.path])

    def test_inputs_are_the_program_its_file_arguments_and_watch_entries(self) -> None:
        app = os.path.join(self.dir, "app.py")
        write(app, b"print()")
        os.makedirs(os.path.join(self.dir, "lib", "__pycache__"))
        write(os.path.join(self.dir, "lib", "util.py"), b"x = 1")
        write(os.path.join(self.dir, "lib", "__pycache__", "util.pyc"), b"\0")

        class Config:
            command = ("/usr/bin/python3", "app.py", "--port", "{port}", "missing.py")
            cwd = self.dir
            watch = (os.path.join(self.dir, "lib"), os.path.join(self.dir, "*.cfg"))

        inputs = input_files(Config)
        self.assertEqual(inputs, {
            "/usr/bin/python3": "executable", app: "executable",
            os.path.join(self.dir, "lib", "util.py"): "watched",
            os.path.join(self.dir, "*.cfg"): "watched"})


class ReloadClockTests(SynchronousTestCase):
    """The Reloader and the pools on a Clock: no process, no sleeping."""

    def setUp(self) -> None:
        self.dir = os.path.abspath(self.mktemp())
        os.makedirs(self.dir)
        os.makedirs(os.path.join(self.dir, "none"))  # no manifests
        for name in ("a", "b"):
            write(os.path.join(self.dir, name), f"{name} version 1".encode())
        self.config_path = os.path.join(self.dir, "pool.yaml")
        self.write_config()
        self.reactor = FakeProcessReactor()
        self.probe = FakeProbe()
        config = load(self.config_path)
        self.supervisor = Supervisor(config, self.reactor, probe=self.probe,
                                     monitor=HealthMonitor, launcher=LAUNCHER,
                                     kill=KillRecorder(),
                                     rand=lambda: 0.5)
        self.supervisor.startService()
        self.addCleanup(self.supervisor.stopService)

        class Root:
            def set_routes(self, routes: Any) -> None:
                self.routes = routes

        resources = ProxyService({}, self.supervisor, self.reactor)
        self.reloader = Reloader(config, self.supervisor, Root(), resources,
                                 lambda pool: object(), clock=self.reactor)
        self.ready_all()

    def write_config(self, extra: str = "") -> None:
        with open(self.config_path, "w") as f:
            f.write(textwrap.dedent(f"""\
                listen: "tcp:0:interface=127.0.0.1"
                base_dir: {self.dir}
                services_dir: {self.dir}/none
                services:
                  a:
                    command: ["./a", "{{port}}"]
                    route: /a
                    workers: 2
                    restart: {{delay: 0.1, max_delay: 30, failing_after: 3}}
                  b:
                    command: ["./b", "{{port}}"]
                    route: /b
                    workers: 1
                """) + extra)

    def ready_all(self) -> None:
        self.reactor.advance(STARTUP_FIRST_DELAY)
        self.probe.answer()

    def pool(self, name: str) -> Any:
        return self.supervisor.pools[name]

    def kinds(self, service: str) -> list[str]:
        return [e.kind for e in self.supervisor.events if e.service == service]

    def test_unchanged_files_change_nothing(self) -> None:
        """A reload with no file changed rolls no service and says so: a reload is safe to
        run at any time."""
        result = self.reloader.reload()
        self.assertEqual((result.rolled, result.unchanged), ((), ("a", "b")))
        self.assertEqual(result.summary(), "no service changed")

    def test_a_rebuilt_executable_rolls_its_service_and_the_result_says_why(self) -> None:
        pool = self.pool("a")
        old = list(pool.workers)
        write(os.path.join(self.dir, "a"), b"a version 2")
        d = self.reloader.reload_and_wait()
        self.assertEqual(self.pool("b").workers[0].state, S.READY)
        self.assertTrue(pool.rolling)
        self.assertNoResult(d)  # waits for the first new worker ...
        self.ready_all()
        self.reactor.advance(0.05)
        result = self.successResultOf(d)  # ... and answers as soon as it is ready
        self.assertEqual((result.rolled, result.unchanged), (("a",), ("b",)))
        self.assertEqual(result.reasons, {"a": "executable a changed"})
        self.assertEqual(result.not_ready, {})
        self.assertEqual(result.summary(), "rolling a (executable a changed)")
        reload_event = [e for e in self.supervisor.events if e.kind == "reload"][-1]
        self.assertEqual(reload_event.message,
                         "configuration reloaded: rolling a (executable a changed)")
        # The roll goes on, one worker at a time, until no old process is left.
        for _ in range(4):
            for w in [w for w in pool.workers if w.state is S.STOPPING]:
                self.reactor.exit(w.pid)
            self.ready_all()
        self.assertFalse(pool.rolling)
        self.assertFalse(set(old) & set(pool.workers))
        self.assertEqual(len(pool.ready), 2)
        # The new workers were stamped from the new file: the next reload is a no-op.
        self.assertEqual(self.reloader.reload().rolled, ())

    def test_a_reload_during_the_roll_does_not_roll_twice(self) -> None:
        write(os.path.join(self.dir, "a"), b"a version 2")
        self.reloader.reload()
        self.assertEqual(self.reloader.reload().rolled, ("a",))  # still old processes
        for _ in range(6):
            for w in [w for w in self.pool("a").workers if w.state is S.STOPPING]:
                self.reactor.exit(w.pid)
            self.ready_all()
        self.assertEqual(self.kinds("a").count("rolling_restart"), 1)
        self.assertFalse(self.pool("a").rolling)

    def test_a_watched_file_rolls_the_service(self) -> None:
        write(os.path.join(self.dir, "b.conf"), b"x", 0o644)
        self.write_config("    watch: [b.conf]\n")
        result = self.reloader.reload()
        # Newly watched: counted from now on, not a change of its own.
        self.assertEqual((result.updated, result.rolled), (("b",), ()))
        write(os.path.join(self.dir, "b.conf"), b"y", 0o644)
        result = self.reloader.reload()
        self.assertEqual(result.rolled, ("b",))
        self.assertEqual(result.reasons["b"], "watched file b.conf changed")

    def test_an_added_service_that_never_gets_ready_is_reported_after_the_wait(self) -> None:
        write(os.path.join(self.dir, "c"), b"c")
        self.write_config('  c:\n    command: ["./c", "{port}"]\n    route: /c\n'
                          "    workers: 1\n    health: {path: /health}\n")
        d = self.reloader.reload_and_wait()
        self.reactor.advance(STARTUP_FIRST_DELAY)
        self.probe.answer(ok=False)  # the scaffold's handler is not written yet
        self.reactor.advance(READY_WAIT - 1)
        self.assertNoResult(d)
        self.reactor.advance(1.5)
        result = self.successResultOf(d)
        self.assertEqual(result.added, ("c",))
        self.assertTrue(result.not_ready["c"].startswith("health check failing: "),
                        result.not_ready)
        self.assertTrue(result.summary().startswith(
            "added c: not ready yet (health check failing: "), result.summary())
        reload_event = [e for e in self.supervisor.events if e.kind == "reload"][-1]
        self.assertEqual(reload_event.level, "warn")
        self.assertIn("added c: not ready yet", reload_event.message)

    def test_requests_wait_only_for_a_worker_that_may_still_get_ready(self) -> None:
        """A starting worker counts as on its way (requests queue for it) while
        its probe is refused or answered 503 (booting, warming up); once it
        answers another HTTP error it listens but is wrong: requests get their
        503 at once (ServiceProxy) instead of waiting for queue.timeout."""
        from cgipool.supervisor.worker import HealthResult

        pool = self.pool("b")
        (worker,) = pool.workers
        self.reactor.exit(worker.pid, code=0)  # a clean exit: restarts, then starts afresh
        self.reactor.advance(worker.restart_timer.getTime() - self.reactor.seconds())
        self.assertEqual((worker.state, pool.ready), (S.STARTING, []))
        now = self.reactor.seconds()
        for error, waits in (("connection refused", True), ("HTTP 503", True),
                             ("HTTP 404", False), ("HTTP 500", False), ("timeout", True)):
            worker.last_health = HealthResult(False, now, None, error)
            self.assertEqual(pool.accepting, waits, error)
        worker.last_health = HealthResult(False, now, None, "HTTP 400")
        self.assertEqual(pool.why_not_ready(), "health check failing: HTTP 400")

    def test_a_roll_whose_new_program_does_not_start_says_so(self) -> None:
        """A rebuilt binary that exits at once: the reload's answer names the
        failed replacement and its exit, not just "no worker ready"; the old
        workers keep serving."""
        pool = self.pool("a")
        old = [w.pid for w in pool.ready]
        write(os.path.join(self.dir, "a"), b"a broken")
        d = self.reloader.reload_and_wait()
        (replacement,) = [w for w in pool.workers if w.probation]
        self.reactor.advance(STARTUP_FIRST_DELAY)
        self.reactor.exit(replacement.pid, code=1)
        self.reactor.advance(READY_WAIT + 1)
        result = self.successResultOf(d)
        self.assertEqual(result.rolled, ("a",))
        self.assertTrue(result.not_ready["a"].startswith("rolling failed: replacement did "
                                                         "not start (exit code 1)"),
                        result.not_ready)
        self.assertEqual([w.pid for w in pool.ready], old)

    def test_a_crash_looping_service_retries_at_once_when_its_executable_changes(self) -> None:
        pool = self.pool("b")
        (worker,) = pool.workers
        for _ in range(5):  # crash after crash: the backoff delay grows
            if worker.state is S.BACKOFF:
                self.reactor.advance(worker.restart_timer.getTime() - self.reactor.seconds())
            self.reactor.exit(worker.pid, code=1)
        self.assertEqual(worker.state, S.BACKOFF)
        waiting = worker.restart_timer.getTime() - self.reactor.seconds()
        self.assertGreater(waiting, 1.0)
        spawned = len(self.reactor.spawned)
        write(os.path.join(self.dir, "b"), b"b fixed")
        d = self.reloader.reload_and_wait()
        # At once, not after `waiting` seconds, and with the backoff reset.
        self.assertEqual(len(self.reactor.spawned), spawned + 1)
        self.assertEqual(worker.state, S.STARTING)
        self.assertEqual(worker.backoff.failures, 0)
        self.assertIn("retry", self.kinds("b"))
        self.ready_all()
        self.reactor.advance(0.05)
        result = self.successResultOf(d)
        self.assertEqual((result.rolled, result.not_ready), (("b",), {}))
        self.assertEqual(pool.state, "ok")

    def test_a_starting_worker_of_an_old_executable_restarts_now(self) -> None:
        """Not serving yet: nothing to roll, its process is replaced in place."""
        pool = self.pool("b")
        (worker,) = pool.workers
        self.reactor.exit(worker.pid, code=1)
        self.reactor.advance(worker.restart_timer.getTime() - self.reactor.seconds())
        self.assertEqual(worker.state, S.STARTING)
        old_pid = worker.pid
        write(os.path.join(self.dir, "b"), b"b fixed")
        self.reloader.reload()
        self.assertEqual(worker.state, S.STOPPING)
        self.reactor.exit(old_pid)
        self.assertEqual(worker.state, S.STARTING)
        self.assertNotEqual(worker.pid, old_pid)
        self.assertFalse(pool.rolling)


# -- the real thing: search rebuilt with another answer ---------------------------------


class RebuiltSearchTests(TestCase):
    def setUp(self) -> None:
        require_binaries("search.cgi")
        if shutil.which("gcc") is None:
            self.skipTest("gcc is not installed")

    def build(self, src: str, output: str, word: bytes) -> None:
        """Compile the copy of services/search/ with ``word`` (7 bytes) after the title."""
        source = os.path.join(src, "search", "search.c")
        with open(os.path.join(ROOT, "services", "search", "search.c"), "rb") as f:
            text = f.read()
        self.assertEqual(text.count(b'" Result", 7'), 1)
        with open(source, "wb") as f:
            f.write(text.replace(b'" Result", 7', b'"' + word + b'", 7'))
        tmp = output + ".tmp"
        subprocess.run(["gcc", "-O2", "-std=gnu11", "-o", tmp, source,
                        os.path.join(src, "lib", "httpd.c"), "-lm"], check=True)
        os.replace(tmp, output)  # what make does in effect: a new file at the same path

    async def test_make_reload_after_a_rebuild_serves_the_new_answer_from_every_worker(
            self) -> None:
        from twisted.internet import reactor

        from cgipool_tools.reload import run_reload
        from tests.test_integration import hammer

        work = os.path.abspath(self.mktemp())
        src = os.path.join(work, "services")
        shutil.copytree(os.path.join(ROOT, "services", "search"), os.path.join(src, "search"))
        shutil.copytree(os.path.join(ROOT, "services", "lib"), os.path.join(src, "lib"))
        binary = os.path.join(work, "build", "search.cgi")
        os.makedirs(os.path.dirname(binary))
        self.build(src, binary, b" Result")
        from tests.support import write_config

        path = write_config(self, f"""
services:
  search:
    command: ["{binary}", "{{port}}"]
    route: /api/search
    workers: 2
    concurrency: 16
    health: {{path: "/?q=health", interval: 1, timeout: 1, fall: 2}}
""")
        daemon = await start_daemon(self, path)
        client = http_client(self)
        old_pids = set(daemon.ready_pids("search"))

        async def titles(n: int) -> tuple[set[str], set[int]]:
            seen, pids = set(), set()
            for i in range(n):
                response = await client.get(f"{daemon.url}/api/search?q=word")
                body = await response.json()
                seen.add(body["results"][0]["title"])
                pids.add(body["pid"])
            return seen, pids

        self.assertEqual((await titles(4))[0], {"Word Result"})
        done: defer.Deferred[None] = defer.Deferred()
        load = defer.ensureDeferred(
            hammer(http_client(self), f"{daemon.url}/api/search?q=load", 6, done))
        try:
            self.build(src, binary, b" Newer!")
            out, err = io.StringIO(), io.StringIO()
            code = await run_reload(reactor, daemon.url, out, err)
            self.assertEqual(code, 0, err.getvalue())
            self.assertEqual(out.getvalue(), "reloaded: rolling search (executable "
                                             f"{os.path.relpath(binary, ROOT)} changed)\n")
            pool = daemon.pool("search")
            await wait_for(lambda: not pool.rolling and len(pool.ready) == 2, 10,
                           what="the rolling restart to end")
        finally:
            done.callback(None)
        stats = await load
        self.assertEqual(stats["failed"], [])
        self.assertGreater(stats["ok"], 0)
        seen, pids = await titles(8)
        self.assertEqual(seen, {"Word Newer!"})
        self.assertEqual(pids, set(daemon.ready_pids("search")))
        self.assertFalse(pids & old_pids)
        kinds = [e.kind for e in daemon.supervisor.events]
        self.assertIn("rolling_restart_done", kinds)
