"""The Python demo (services/python): the daemon's interpreter, stdlib only, clean SIGTERM.

The manifest's ``{python}`` placeholder is the daemon's own interpreter, so the
service needs nothing installed; a pool file can name another interpreter.  The
worker exits with status 0 on SIGTERM, also with idle keep-alive connections
and a request in progress, so a daemon stop never needs SIGKILL for it.
"""

from __future__ import annotations

import ast
import os
import shutil
import socket
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import SkipTest, TestCase

from cgipool.config import load
from tests.support import ROOT, get_json, http_client, start_daemon, wait_for, write_config

APP = os.path.join(ROOT, "services", "python", "app.py")
MANIFEST_DIR = os.path.join(ROOT, "services")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _App(ProcessProtocol):
    def __init__(self) -> None:
        self.stderr = b""
        self.ended: defer.Deferred[Any] = defer.Deferred()

    def errReceived(self, data: bytes) -> None:
        self.stderr += data

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(reason.value)


class PythonServiceTests(TestCase):
    def test_manifest_runs_the_daemons_interpreter(self) -> None:
        """The python service's manifest runs the daemon's own interpreter ({python}), so it
        works in a venv with no python3 on PATH."""
        svc = load(os.path.join(ROOT, "etc", "pool.yaml")).service("python")
        self.assertEqual(svc.command[0], sys.executable)
        self.assertEqual(svc.command[1:], ("services/python/app.py", "{port}"))
        self.assertEqual(svc.language, "python")

    def test_standard_library_only(self) -> None:
        """The sample Python worker imports only the standard library: it runs on any Python
        3 with nothing to install."""
        with open(APP, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        modules = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
        self.assertTrue(modules)
        self.assertEqual(modules - set(sys.stdlib_module_names) - {"__future__"}, set())

    async def _spawn(self) -> tuple[_App, Any, int]:
        port = free_port()
        app = _App()
        process = reactor.spawnProcess(app, sys.executable, [sys.executable, APP, str(port)],
                                       env={"PATH": os.environ.get("PATH", "")})

        def cleanup() -> Any:
            if not app.ended.called:
                process.signalProcess("KILL")
                return app.ended
        self.addCleanup(cleanup)
        await wait_for(lambda: b"listening" in app.stderr, 10, what="the app to listen")
        return app, process, port

    async def test_sigterm_exits_with_status_0_despite_open_connections(self) -> None:
        app, process, port = await self._spawn()
        # An idle keep-alive connection and one with half a request sent.
        client = http_client(self)
        code, body = await get_json(client, f"http://127.0.0.1:{port}/?service=demo&data=x")
        self.assertEqual((code, body["language"], body["port"]), (200, "python", port))
        half = socket.create_connection(("127.0.0.1", port))
        self.addCleanup(half.close)
        half.sendall(b"GET /?service=slow HTTP/1.1\r\nHost: x\r\n")
        process.signalProcess("TERM")
        reason = await app.ended
        self.assertEqual(reason.exitCode, 0, app.stderr)
        self.assertIsNone(reason.signal)
        self.assertIn(b"SIGTERM received, exiting", app.stderr)

    async def test_daemon_stop_ends_python_workers_with_status_0(self) -> None:
        daemon = await start_daemon(self, write_config(self, f"""
services:
  python:
    command: ["{{python}}", "services/python/app.py", "{{port}}"]
    route: /api/python
    workers: 2
    health: {{path: "/?service=health"}}
    stop_timeout: 5
"""))
        pids = daemon.ready_pids("python")
        await daemon.top.stopService()
        exits = {e.fields.get("pid"): e.message for e in daemon.supervisor.events.recent(100)
                 if e.kind == "exit"}
        self.assertEqual(set(exits), set(pids))
        for pid in pids:
            self.assertIn("exit code 0", exits[pid])
        kills = [e for e in daemon.supervisor.events.recent(100) if e.kind == "kill"]
        self.assertEqual(kills, [])

    async def test_a_configured_interpreter(self) -> None:
        """The pool file names another interpreter for the same manifest."""
        other = "/usr/bin/python3"
        if not os.access(other, os.X_OK) or (
                os.path.realpath(other) == os.path.realpath(sys.executable)):
            raise SkipTest(f"no interpreter other than the daemon's at {other}")
        services = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(services, "python"))
        shutil.copy(os.path.join(MANIFEST_DIR, "python", "service.yaml"),
                    os.path.join(services, "python", "service.yaml"))
        config = write_config(self, f"""
services:
  python:
    command: ["{other}", "services/python/app.py", "{{port}}"]
    workers: 1
""", services_dir=services)
        svc = load(config).service("python")
        self.assertEqual(svc.command[0], other)
        self.assertEqual(svc.route, "/api/python")  # the rest comes from the manifest
        daemon = await start_daemon(self, config)
        code, body = await get_json(http_client(self),
                                    f"{daemon.url}/api/python?service=demo&data=test")
        self.assertEqual((code, body["data"]), (200, "test"))
        pid = daemon.ready_pids("python")[0]
        self.assertEqual(os.path.realpath(f"/proc/{pid}/exe"), os.path.realpath(other))

    def test_sigterm_handler_is_installed_before_binding(self) -> None:
        """An early SIGTERM (right after spawn) must still exit 0: the handler
        comes before the slow part of start-up."""
        with open(APP, encoding="utf-8") as f:
            source = f.read()
        self.assertLess(source.index("signal.signal(signal.SIGTERM"),
                        source.index("Server((\"127.0.0.1\", port)"))
