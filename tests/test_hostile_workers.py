"""The worst workers: one named test per case, each with a defined, logged outcome.

Response cases use scripted workers on real sockets (``tests/test_proxy.py``);
process cases use real processes (``tests/workers/misbehaving.py``) under a
real daemon, next to a healthy service that must keep serving.  The table in
docs/hardening.md lists these tests by name.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.support import (
    get_json,
    http_client,
    process_alive,
    require_binaries,
    search_service,
    sleep,
    start_daemon,
    wait_for,
    write_config,
)
from tests.test_proxy import CLOSE, ProxyTestCase, ScriptedConnection, split_response

MISBEHAVING = os.path.join(os.path.dirname(__file__), "workers", "misbehaving.py")
GET = b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n"


class ResponseCases(ProxyTestCase):
    """What a worker answers: anything but valid HTTP is 502 and counts against it."""

    async def served(self, reply: Any) -> tuple[bytes, Any]:
        _, wport = await self.start_worker(reply)
        worker = self.worker_for(wport)
        pool, port = await self.start_proxy([worker])
        return await self.raw(port, GET), pool

    async def assertBadGateway(self, reply: Any, kind: str = "bad_response") -> None:
        raw, pool = await self.served(reply)
        status, headers, body = split_response(raw)
        self.assertEqual(status, 502)
        self.assertEqual(headers[b"content-type"], [b"application/json"])
        self.assertIn("worker svc[0]", json.loads(body)["error"])
        self.assertEqual([k for _, k in pool.failed], [kind])

    async def test_garbage_instead_of_http_is_502(self) -> None:
        await self.assertBadGateway(lambda h, b, c: b"\x00\x01garbage\xff\r\n\r\n")

    async def test_no_status_line_is_502(self) -> None:
        """A reply without a status line is not HTTP: 502 to the client, counted against the
        worker as bad_response."""
        await self.assertBadGateway(lambda h, b, c: b"Content-Type: text/plain\r\n\r\nhi")

    async def test_bad_status_code_is_502(self) -> None:
        """A status code that is not three digits (2000) is a malformed response: 502,
        counted against the worker, never passed on."""
        await self.assertBadGateway(lambda h, b, c: b"HTTP/1.1 2000 OK\r\n\r\n")

    async def test_oversized_response_head_is_502(self) -> None:
        """A response head past the limit (a 70 kB header) is a 502, not buffered without
        bound."""
        await self.assertBadGateway(
            lambda h, b, c: b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n")

    async def test_conflicting_content_lengths_are_502(self) -> None:
        """Two different Content-Lengths leave the body's end ambiguous (response
        splitting): a 502, not a guess."""
        await self.assertBadGateway(
            lambda h, b, c: b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n"
                            b"\r\nab")

    async def test_closing_without_an_answer_is_502(self) -> None:
        def close(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            c.transport.loseConnection()

        raw, pool = await self.served(close)
        # A GET is retried once more on the same (only) worker, then answered.
        self.assertEqual(split_response(raw)[0], 502)
        self.assertEqual({k for _, k in pool.failed}, {"no_response"})

    async def test_truncated_body_cuts_the_client_and_counts(self) -> None:
        def short(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            c.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
            c.transport.loseConnection()

        raw, pool = await self.served(short)
        status, headers, body = split_response(raw)
        self.assertEqual((status, body), (200, b"only this"))  # and then the connection closed
        self.assertEqual([k for _, k in pool.failed], ["truncated"])

    async def test_closing_mid_chunked_body_cuts_the_client_and_counts(self) -> None:
        def cut(h: bytes, b: bytes, c: ScriptedConnection) -> None:
            c.transport.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                              b"5\r\nhello\r\n")
            c.transport.loseConnection()  # and the last chunk never comes

        raw, pool = await self.served(cut)
        self.assertNotIn(b"\r\n0\r\n\r\n", raw, "the client must not see a complete body")
        self.assertEqual([k for _, k in pool.failed], ["truncated"])


def odd(*flags: str, **extra: Any) -> str:
    command = json.dumps([sys.executable, MISBEHAVING, "{port}", *flags])
    lines = "".join(f"    {k}: {v}\n" for k, v in extra.items())
    return f"""
  odd:
    command: {command}
    route: /api/odd
    workers: 1
    health: {{path: "/", interval: 1, timeout: 1, fall: 2}}
    restart: {{delay: 0.05, max_delay: 0.4, reset_after: 10, failing_after: 3}}
{lines}"""


SEARCH = "\nservices:\n" + search_service(workers=1)


class CrashLoopScheduleTests(SynchronousTestCase):
    """The crash loop of ProcessCases on a Clock (a fake process reactor): when
    the respawns come, without counting them in a second of wall-clock time."""

    def test_a_crash_loop_is_retried_at_the_max_delay_forever(self) -> None:
        """restart {delay: 0.05, max_delay: 0.4, failing_after: 3} (odd()'s) and the
        jitter at both extremes: the delays double from 0.05 up to 0.4 and stay
        there, never above it nor below its 20 % jitter; `failing` from the third
        crash; 2 to 4 spawns in any second once failing; still retrying after 40."""
        from cgipool.config import RestartConfig, WorkersConfig
        from cgipool.events import EventLog
        from cgipool.health import HealthMonitor
        from cgipool.supervisor.pool import ServicePool
        from cgipool.supervisor.ports import PortAllocator
        from tests.fakes import FakeProbe, FakeProcessReactor, KillRecorder, service

        clock = FakeProcessReactor()
        extremes = iter([0.0, 0.999999] * 50)
        restart = RestartConfig(delay=0.05, max_delay=0.4, reset_after=10, failing_after=3)
        pool = ServicePool(service("odd", workers=WorkersConfig(1, 1), restart=restart),
                           clock, ports=PortAllocator(9000, 9010),
                           events=EventLog(clock.seconds), probe=FakeProbe(),
                           monitor=HealthMonitor,
                           launcher=["/bin/launch"], kill=KillRecorder(),
                           rand=lambda: next(extremes), port_free=lambda p: True)
        pool.start()
        (worker,) = pool.workers
        delays, spawned_at, states = [], [], []
        for _ in range(40):
            clock.exit(worker.pid, code=3)  # exits at once
            states.append(pool.state)
            delay = worker.restart_timer.getTime() - clock.seconds()
            delays.append(round(delay, 9))
            clock.advance(delay)
            spawned_at.append(clock.seconds())
        for delay, base in zip(delays, [0.05, 0.1, 0.2, 0.4]):
            self.assertTrue(round(0.8 * base, 9) <= delay <= min(round(1.2 * base, 9), 0.4),
                            (delay, base))
        for delay in delays[3:]:
            self.assertTrue(0.32 <= delay <= 0.4, delay)
        self.assertNotIn("failing", states[:2])
        self.assertEqual(set(states[2:]), {"failing"})
        failing_from = spawned_at[3]
        for start in spawned_at[3:-3]:
            in_a_second = [t for t in spawned_at if start <= t < start + 1.0]
            self.assertTrue(2 <= len(in_a_second) <= 4, (start, in_a_second))
        self.assertGreater(spawned_at[-1] - failing_from, 10)
        self.assertEqual(worker.restarts, 40)
        self.assertEqual(len(clock.spawned), 41)  # the first and 40 restarts: never gave up


class ProcessCases(TestCase):
    """How a worker behaves as a process; the healthy service keeps serving."""

    def setUp(self) -> None:
        require_binaries("search.cgi")

    async def daemon(self, odd_service: str, wait: bool = False) -> Any:
        daemon = await start_daemon(self, write_config(self, SEARCH + odd_service), wait=False)
        await wait_for(lambda: daemon.pool("search").ready, 10, what="search ready")
        return daemon

    async def assertOthersServe(self, daemon: Any) -> None:
        code, body = await get_json(http_client(self), f"{daemon.url}/api/search?q=ok")
        self.assertEqual((code, body["query"]), (200, "ok"))

    def kinds(self, daemon: Any, service: str = "odd") -> list[str]:
        return [e.kind for e in daemon.supervisor.events if e.service == service]

    async def test_crash_loop_shows_failing_and_keeps_retrying_at_the_max_delay(self) -> None:
        """A real worker that exits at once with 3: `failing`, spawned again after
        that (it never gives up), requests 503 at once, the other service serves.
        How often it is retried (restart.max_delay, within its jitter) is not
        counted against the wall clock here but on a Clock:
        CrashLoopScheduleTests.test_a_crash_loop_is_retried_at_the_max_delay_forever."""
        daemon = await self.daemon(odd("--exit-at-once", "3"))
        pool = daemon.pool("odd")
        await wait_for(lambda: pool.state == "failing", 10, what="the odd service failing")
        spawns = self.kinds(daemon).count("spawn")
        await wait_for(lambda: self.kinds(daemon).count("spawn") > spawns, 10,
                       what="another spawn once failing (it never gives up)")
        crash = [e for e in daemon.supervisor.events if e.kind == "crash"][-1]
        self.assertEqual(crash.fields["exit_code"], 3)
        code, body = await get_json(http_client(self), f"{daemon.url}/api/odd")
        self.assertEqual(code, 503)  # at once: nothing is on its way
        self.assertEqual(body["state"], "failing")
        await self.assertOthersServe(daemon)

    async def test_missing_executable_at_spawn_time_is_a_logged_failure(self) -> None:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        program = os.path.join(folder, "worker.py")
        shutil.copy(MISBEHAVING, program)
        os.chmod(program, 0o755)
        service = odd().replace(json.dumps(sys.executable) + ", " + json.dumps(MISBEHAVING),
                                json.dumps(program))
        daemon = await start_daemon(self, write_config(self, SEARCH + service), wait=False)
        os.remove(program)  # gone after the configuration was checked
        pool = daemon.pool("odd")
        await wait_for(lambda: pool.state == "failing", 10, what="the odd service failing")
        self.assertIn("crash", self.kinds(daemon))
        await self.assertOthersServe(daemon)

    async def test_never_listening_on_its_port_is_restarted_after_start_timeout(self) -> None:
        daemon = await self.daemon(odd("--wrong-port", start_timeout=0.5))
        pool = daemon.pool("odd")
        await wait_for(lambda: "restart" in self.kinds(daemon), 10, what="a restart")
        restart = [e for e in daemon.supervisor.events
                   if e.kind == "restart" and e.service == "odd"][0]
        self.assertIn("not ready within start_timeout=0.5s", restart.message)
        self.assertEqual(pool.ready, [])
        await self.assertOthersServe(daemon)

    async def test_port_taken_by_a_foreign_process_is_reported_not_crash_looped(self) -> None:
        squatter = socket.socket()
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        self.addCleanup(squatter.close)
        port = squatter.getsockname()[1]
        daemon = await self.daemon(odd(ports=f"[{port}]"))
        await wait_for(lambda: "spawn_failed" in self.kinds(daemon), 10, what="spawn_failed")
        failed = [e for e in daemon.supervisor.events if e.kind == "spawn_failed"][0]
        self.assertIn(f"port(s) {port} in use by another process", failed.message)
        self.assertNotIn("spawn", self.kinds(daemon), "nothing was started on a taken port")
        squatter.close()
        await wait_for(lambda: daemon.pool("odd").ready, 15, what="odd ready once freed")
        await self.assertOthersServe(daemon)

    async def test_stdout_flood_does_not_grow_the_daemon(self) -> None:
        """A worker writing long stdout lines without pause: the daemon reads them
        and drops what is over the service's budget (counted), the worker stays
        `ok` and the other service serves.  That memory stays flat is not read
        from this process's RSS after a sleep (noise of the whole test run) but
        proven where it is decided: an endless line keeps at most 16 bytes
        (test_supervisor.OutputLoggerTests.test_endless_line_is_truncated_and_
        memory_stays_bounded, and the budget's tests beside it)."""
        daemon = await self.daemon(odd("--flood"))
        await wait_for(lambda: daemon.pool("odd").ready, 10, what="odd ready")
        budget = daemon.supervisor.output.budgets["odd"]
        await wait_for(lambda: budget.dropped_lines.get("stdout", 0) > 1000, 20,
                       what="the flood read and dropped over the budget")
        self.assertEqual(daemon.pool("odd").state, "ok")
        await self.assertOthersServe(daemon)

    async def test_ignoring_sigterm_gets_sigkill_after_stop_timeout(self) -> None:
        """A worker ignoring SIGTERM gets SIGKILL, not before stop_timeout (a lower bound
        set by a timer: a busy machine can only make it longer) and is gone when stop
        returns."""
        daemon = await self.daemon(odd("--ignore-term", stop_timeout=0.5))
        await wait_for(lambda: daemon.pool("odd").ready, 10, what="odd ready")
        (pid,) = [w.pid for w in daemon.pool("odd").workers]
        started = reactor.seconds()
        await daemon.top.stopService()
        self.assertGreaterEqual(reactor.seconds() - started, 0.5)
        self.assertFalse(process_alive(pid))
        self.assertIn("kill", self.kinds(daemon))

    async def test_grandchildren_die_with_their_worker(self) -> None:
        """A worker killed with SIGKILL cannot clean up, yet the process it started in the
        background dies with it: no grandchild outlives its worker."""
        pidfile = os.path.abspath(self.mktemp())
        daemon = await self.daemon(odd("--grandchild", pidfile))
        await wait_for(lambda: os.path.exists(pidfile) and open(pidfile).read(), 10,
                       what="the grandchild started")
        with open(pidfile) as f:
            grandchild = int(f.read())
        self.assertTrue(process_alive(grandchild))
        (worker,) = daemon.pool("odd").workers
        os.kill(worker.pid, 9)
        await wait_for(lambda: not process_alive(grandchild), 5, what="the grandchild gone")


# -- output floods against the log's bounds (a real `twistd --logfile`) ------------------

#: Small bounds, so a few seconds of flooding rotate many times: at most 3 × 16 KiB.
LOG_LIMITS = 'logs: {max_bytes: "16K", keep: 2}\n'
LOG_BOUND = 3 * 16 * 1024


def flood_worker(seconds: float) -> str:
    """A healthy worker (misbehaving.py) whose process group also runs `yes` to stderr."""
    script = f"timeout {seconds:g} yes 'worker stderr flood' >&2 & exec \"$0\" \"$1\" \"$2\""
    command = json.dumps(["/bin/sh", "-c", script, sys.executable, MISBEHAVING, "{port}"])
    return f"""
  flood:
    command: {command}
    route: /api/flood
    workers: 2
    health: {{path: "/", interval: 1, timeout: 1, fall: 2}}
"""


def flood_script(seconds: float) -> str:
    """A CGI script that answers, closes its stdout and floods stderr for a while."""
    script = (f"printf 'Content-Type: text/plain\\r\\n\\r\\nok'; exec 1>&-; "
              f"exec timeout {seconds:g} yes 'cgi stderr flood' >&2")
    return f"""
  floodcgi:
    protocol: cgi
    command: {json.dumps(["/bin/sh", "-c", script])}
    route: /cgi/flood
    workers: {{max: 4}}
    request_timeout: 10
    stop_timeout: 2
"""


async def start_logging_daemon(case: TestCase, body: str,
                               old_files: int = 0) -> tuple[Any, str]:
    """``twistd -n --logfile <temp>/cgipool.log cgipool`` (the log in a file, as
    ``make start-bg`` has it) with LOG_LIMITS, after writing ``old_files`` old
    logs (``cgipool.log.1`` …) there; returns the daemon and the log path."""
    from tests.browser import start_daemon_process

    folder = os.path.abspath(case.mktemp())
    os.makedirs(folder)
    path = os.path.join(folder, "cgipool.log")
    for n in range(1, old_files + 1):
        with open(f"{path}.{n}", "w") as f:
            f.write(f"old log {n}\n")
    wrapper = ["/bin/sh", "-c", f'exec "$0" --logfile {shlex.quote(path)} "$@"']
    daemon = await start_daemon_process(case, LOG_LIMITS + body, wrapper=wrapper)
    return daemon, path


def log_files(path: str) -> dict[str, int]:
    """The log and its old files, with their sizes."""
    folder, name = os.path.split(path)
    return {entry: os.path.getsize(os.path.join(folder, entry))
            for entry in os.listdir(folder) if entry.startswith(name)}


#: How long one answer may take while the daemon is flooded: a bound on a stall (a
#: reactor blocked by its log: the renames of thousands of old files), not a measure
#: of speed (a loaded machine is slow, it does not stall for seconds).
ANSWER_BOUND = 10.0


async def answer_within(request: Any, what: str) -> Any:
    """The result of ``request`` (a coroutine of an answer); fails the test if it
    does not come within ANSWER_BOUND."""
    d = defer.ensureDeferred(request)
    d.addTimeout(ANSWER_BOUND, reactor)
    try:
        return await d
    except defer.TimeoutError:
        raise AssertionError(f"no answer to {what} within {ANSWER_BOUND:g} s: "
                             "the daemon stalled") from None


def read_logs(path: str) -> str:
    folder = os.path.dirname(path)
    text = ""
    for entry in sorted(log_files(path), reverse=True):  # .2, .1, then the current one
        with open(os.path.join(folder, entry), encoding="utf-8", errors="replace") as f:
            text += f.read()
    return text


class OutputFloodTests(TestCase):
    """Worker and script output against the disk: per-service budgets drop the excess
    (counted, summed up once a second) and the daemon log rotates within
    (keep + 1) × max_bytes, while the daemon keeps answering."""

    timeout = 60

    def setUp(self) -> None:
        require_binaries("search.cgi")

    async def watch(self, daemon: Any, path: str, seconds: float) -> None:
        """For ``seconds``: the log within its bound at every look, and between
        looks a 200 from /api/search (the daemon keeps answering: each answer
        within ANSWER_BOUND, a bound on a stall, not a latency target)."""
        deadline = reactor.seconds() + seconds
        while reactor.seconds() < deadline:
            files = log_files(path)
            self.assertLessEqual(sum(files.values()), LOG_BOUND, files)
            self.assertLessEqual(set(files), {"cgipool.log", "cgipool.log.1", "cgipool.log.2"})
            code, body = await answer_within(daemon.get("/api/search?q=alive"), "/api/search")
            self.assertEqual(code, 200, body[:200])
            await sleep(0.05)

    async def dropped_over(self, daemon: Any, service: str, count: int,
                           timeout: float = 30.0) -> None:
        """Poll /metrics until ``service`` has dropped more than ``count`` stderr
        lines: how many a flood of a few seconds gets past the daemon depends on
        the machine's speed, so it is waited for (a bound), not counted at a moment."""
        deadline = reactor.seconds() + timeout
        while (seen := await self.dropped(daemon, service)) <= count:
            if reactor.seconds() > deadline:
                self.fail(f"{service}: {seen:g} lines dropped after {timeout:g} s, "
                          f"expected over {count}")
            await sleep(0.2)

    async def dropped(self, daemon: Any, service: str) -> float:
        code, body = await daemon.get("/metrics")
        self.assertEqual(code, 200)
        line = (f'cgipool_output_dropped_lines_total{{service="{service}",'
                f'stream="stderr"}} ')
        for text in body.decode().splitlines():
            if text.startswith(line):
                return float(text[len(line):])
        raise AssertionError(f"no {line.strip()} in /metrics")

    async def test_worker_stderr_flood_cannot_grow_the_log_past_its_bound(self) -> None:
        daemon, path = await start_logging_daemon(self, SEARCH + flood_worker(4))
        await self.watch(daemon, path, 4.5)
        await self.dropped_over(daemon, "flood", 1000)
        text = read_logs(path)
        # Summed up about once a second: how late the timer ran is the machine's.
        self.assertRegex(text, r"dropped [\d,]+ lines \([\d,]+ bytes\) of stderr from "
                               r"service flood in the last \d+\.\d s")
        self.assertIn("flood[0] pid=", text, "within its budget the flood is logged")
        self.assertIn("cgipool.log.1", log_files(path), "it rotated")

    async def test_cgi_stderr_flood_cannot_grow_the_log_past_its_bound(self) -> None:
        daemon, path = await start_logging_daemon(self, SEARCH + flood_script(3))
        answers = [daemon.get("/cgi/flood") for _ in range(4)]  # 4 scripts, one budget
        await self.watch(daemon, path, 3.5)
        for code, body in [await d for d in answers]:
            self.assertEqual((code, body), (200, b"ok"))
        await self.dropped_over(daemon, "floodcgi", 1000)
        self.assertRegex(read_logs(path), r"dropped [\d,]+ lines \([\d,]+ bytes\) of stderr "
                                          r"from service floodcgi in the last")
