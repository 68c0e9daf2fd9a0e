"""The service lifecycle a new user meets: ``make run``'s pidfile and ready line,
``cgipool restart SERVICE``, and CGI services shown as what they are."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.trial.unittest import TestCase

from cgipool_tools.daemon import read_pidfile, service_line, stop
from cgipool_tools.restart import run_restart
from cgipool_tools.status import format_status
from tests.browser import _free_ports, _Output
from tests.support import (
    ROOT,
    process_alive,
    require_binaries,
    start_daemon,
    wait_for,
    write_config,
)
from tests.test_integration import SEARCH

CGI_STATUS = {
    "name": "cgi-shell", "route": "/api/cgi-shell", "state": "ok", "protocol": "cgi",
    "size": {"min": 1, "max": 4, "desired": 4, "ready": 0}, "workers": [],
    "cgi": {"limit": 4, "in_flight": 2, "executions": 9, "queued": 0, "timeouts": 0,
            "failures": 0, "last_exit_codes": [0]},
}


class CgiWordingTests(TestCase):
    def test_start_bg_and_status_say_cgi_not_zero_workers_ready(self) -> None:
        """A CGI service has no resident workers: "0/4 workers ready" would read as an
        outage, so it is described by its concurrency limit and running scripts."""
        self.assertEqual(service_line(CGI_STATUS),
                         "cgi-shell    ok         cgi · up to 4 at once · 2 running  "
                         "/api/cgi-shell")
        text = format_status({"uptime": 1, "workers": {"ready": 0, "total": 0},
                              "services": [CGI_STATUS]})
        self.assertIn("cgi-shell /api/cgi-shell — ok, cgi · up to 4 at once · 2 running\n",
                      text)
        self.assertNotIn("0/4", text)
        worker = {**CGI_STATUS, "name": "search", "protocol": "http", "cgi": None,
                  "size": {"ready": 1, "desired": 2}}
        self.assertIn("1/2 workers ready", service_line(worker))


class RestartCommandTests(TestCase):
    def setUp(self) -> None:
        require_binaries("search.cgi")

    async def test_restart_replaces_every_worker_and_says_so(self) -> None:
        daemon = await start_daemon(self, write_config(self, SEARCH))
        before = sorted(daemon.ready_pids("search"))
        out, err = io.StringIO(), io.StringIO()
        code = await run_restart(reactor, daemon.url, "search", out, err, timeout=30)
        self.assertEqual(code, 0, err.getvalue())
        after = sorted(daemon.ready_pids("search"))
        self.assertFalse(set(before) & set(after))
        lines = out.getvalue().splitlines()
        self.assertEqual(lines[0], "rolling restart of search: 2 workers, one at a time")
        self.assertRegex(lines[1], r"^restarted search in \d+\.\d s: pids "
                         + ", ".join(map(str, before)) + " -> ")
        self.assertEqual(sorted(int(p) for p in lines[1].split(" -> ")[1].split(", ")), after)

    async def test_unknown_cgi_and_absent_daemon_are_clear_errors(self) -> None:
        from tests.test_cgi import cgi_config

        daemon = await start_daemon(self, write_config(self, cgi_config()))
        for name, expected in (
                ("nope", "cgipool restart: 404: no service named 'nope' (services: script)"),
                ("script", "cgipool restart: 409: service 'script' runs its CGI script "
                           "once per request")):
            out, err = io.StringIO(), io.StringIO()
            self.assertEqual(await run_restart(reactor, daemon.url, name, out, err), 1)
            self.assertIn(expected, err.getvalue())
            self.assertEqual(out.getvalue(), "")
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(await run_restart(reactor, "http://127.0.0.1:9", "x", out, err), 1)
        self.assertIn("make start-bg", err.getvalue())

    def test_cli_has_the_command(self) -> None:
        """``cgipool restart SERVICE --timeout N`` reaches the restart tool with its
        service and timeout in seconds, so it is usable from the command line."""
        from cgipool.cli import build_parser

        args = build_parser().parse_args(["restart", "search", "--timeout", "5"])
        self.assertEqual((args.command, args.service, args.timeout), ("restart", "search", 5))


class MakeRunPidfileTests(TestCase):
    """``make run`` runs ``twistd --nodaemon --pidfile run/cgipool.pid``: the
    tools of another shell find it there, and it says where it is once ready."""

    def setUp(self) -> None:
        require_binaries("search.cgi")

    async def test_make_stop_stops_a_foreground_daemon_by_its_pidfile(self) -> None:
        port, admin_port = _free_ports(2)
        config = write_config(self, SEARCH)
        with open(config) as f:
            text = f.read()
        with open(config, "w") as f:
            f.write(text.replace("tcp:0:", f"tcp:{port}:", 1)
                    .replace("tcp:0:", f"tcp:{admin_port}:", 1))
        pidfile = os.path.join(os.path.dirname(config), "cgipool.pid")
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        protocol = _Output()
        argv = [twistd, "--nodaemon", "--pidfile", pidfile, "cgipool", "--config", config]
        process = reactor.spawnProcess(protocol, twistd, argv, env=os.environ.copy(),
                                       path=ROOT)

        def cleanup() -> None:
            if not protocol.ended.called:
                process.signalProcess("KILL")
        self.addCleanup(cleanup)
        ready = (f"cgipool ready: proxy http://127.0.0.1:{port}, "
                 f"dashboard http://127.0.0.1:{admin_port}/admin/")
        await wait_for(lambda: ready in protocol.output.decode("utf-8", "replace")
                       or protocol.ended.called, 30, interval=0.05, what="the ready line")
        self.assertIn(ready, protocol.output.decode("utf-8", "replace"))
        self.assertEqual(read_pidfile(pidfile), process.pid)

        # make start-bg (and make run) in another shell: already running, pid named.
        result = subprocess.run(
            ["make", "-s", "--no-print-directory", "-o", "venv", "-o", "all", "start-bg",
             f"PIDFILE={pidfile}", f"CONFIG={config}"],
            cwd=ROOT, capture_output=True, text=True, timeout=60)
        self.assertEqual(result.stdout, f"cgipool is already running (pid {process.pid})\n",
                         result.stderr)

        out, err = io.StringIO(), io.StringIO()
        pid = process.pid
        code = await _in_thread(stop, pidfile, 20.0, out, err)
        self.assertEqual(code, 0, err.getvalue())
        self.assertRegex(out.getvalue(), rf"^stopped cgipool \(pid {pid}\) and 2 workers in ")
        await wait_for(lambda: protocol.ended.called, 10, what="twistd to exit")
        self.assertFalse(os.path.exists(pidfile))
        self.assertFalse(process_alive(pid))


def _in_thread(fn: Callable[..., int], *args: Any) -> Deferred[int]:
    """``stop`` waits with time.sleep: off the reactor, which must keep running."""
    from twisted.internet.threads import deferToThread

    return deferToThread(fn, *args)
