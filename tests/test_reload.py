"""Hot reload of a running daemon: real workers, real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import textwrap

import treq
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from tests.support import (
    get_json,
    http_client,
    process_alive,
    require_binaries,
    start_daemon,
    wait_for,
    write_config,
)
from tests.test_integration import SEARCH, hammer

AUTH = """
  auth:
    command: ["build/auth.cgi", "{port}"]
    route: /api/auth
    workers: 1
    health: {path: "/?user=health", interval: 1, timeout: 1, fall: 2}
"""


class ReloadTests(TestCase):
    def setUp(self) -> None:
        require_binaries("search.cgi", "auth.cgi")

    def rewrite(self, path: str, body: str) -> None:
        """Replace the services part of the daemon's file, keeping its head."""
        with open(path) as f:
            head = f.read().split("services:", 1)[0]
        with open(path + ".new", "w") as f:
            f.write(head + textwrap.dedent(body).lstrip("\n"))
        os.replace(path + ".new", path)

    async def post_reload(self, daemon: object, client: object) -> tuple[int, dict]:
        response = await client.post(  # type: ignore[attr-defined]
            f"{daemon.admin_url}/admin/api/reload",  # type: ignore[attr-defined]
            headers={"X-CGIPool-CSRF": "1"})
        return response.code, json.loads(await treq.content(response))

    async def test_invalid_file_is_refused_and_nothing_changes(self) -> None:
        path = write_config(self, SEARCH)
        daemon = await start_daemon(self, path)
        pids = set(daemon.ready_pids("search"))
        self.rewrite(path, SEARCH.replace("workers: {min: 2, max: 4}",
                                          "workers: {min: 2, max: 4}\n    bogus: 1"))
        code, body = await self.post_reload(daemon, http_client(self))
        self.assertEqual(code, 400)
        self.assertIn("key 'bogus'", body["error"])
        self.assertIn(f"{path}:", body["error"])
        self.assertEqual(set(daemon.ready_pids("search")), pids)
        self.assertIn("reload_failed", [e.kind for e in daemon.supervisor.events])
        code, _ = await get_json(http_client(self), f"{daemon.url}/api/search?q=x")
        self.assertEqual(code, 200)

    async def test_added_service_starts_and_unchanged_one_is_untouched(self) -> None:
        path = write_config(self, SEARCH)
        daemon = await start_daemon(self, path)
        pids = set(daemon.ready_pids("search"))
        client = http_client(self)
        code, _ = await get_json(client, f"{daemon.url}/api/auth?user=ann")
        self.assertEqual(code, 404)
        self.rewrite(path, SEARCH + AUTH)
        code, body = await self.post_reload(daemon, client)
        self.assertEqual(code, 200, body)
        self.assertEqual((body["added"], body["unchanged"]), (["auth"], ["search"]))
        await wait_for(lambda: daemon.pool("auth").ready, 10, what="auth ready")
        code, answer = await get_json(client, f"{daemon.url}/api/auth?user=ann")
        self.assertEqual(code, 200)
        self.assertEqual(set(daemon.ready_pids("search")), pids)
        code, status = await get_json(client, f"{daemon.admin_url}/admin/api/status")
        self.assertEqual({s["name"] for s in status["services"]}, {"search", "auth"})

    async def test_removed_service_drains_and_its_processes_stop(self) -> None:
        path = write_config(self, SEARCH + AUTH)
        daemon = await start_daemon(self, path)
        (auth_pid,) = daemon.ready_pids("auth")
        self.rewrite(path, SEARCH)
        result = daemon.top.reloader.reload()
        self.assertEqual(result.removed, ("auth",))
        client = http_client(self)
        code, body = await get_json(client, f"{daemon.url}/api/auth?user=ann")
        self.assertEqual(code, 404)
        await wait_for(lambda: not process_alive(auth_pid), 10, what="the auth worker gone")
        await wait_for(lambda: not daemon.supervisor.leaving, 5, what="the pool removed")
        self.assertNotIn("auth", daemon.supervisor.pools)

    async def test_daemon_stop_lets_a_removed_services_requests_finish(self) -> None:
        path = write_config(self, SEARCH + AUTH)
        daemon = await start_daemon(self, path)
        client = http_client(self)
        pending = defer.ensureDeferred(
            get_json(client, f"{daemon.url}/api/search?q=late&delay_ms=1000"))
        await wait_for(lambda: daemon.top.getServiceNamed("proxy").in_flight() == 1, 5,
                       what="the request in flight")
        self.rewrite(path, "services:" + AUTH)
        self.assertEqual(daemon.top.reloader.reload().removed, ("search",))
        # Off its route, still in flight: the stop waits for it like any other.
        self.assertEqual(daemon.top.getServiceNamed("proxy").in_flight(), 1)
        await daemon.top.stopService()
        code, body = await pending
        self.assertEqual((code, body["query"]), (200, "late"))

    async def test_limits_change_in_place_without_new_processes(self) -> None:
        path = write_config(self, SEARCH)
        daemon = await start_daemon(self, path)
        pids = set(daemon.ready_pids("search"))
        self.rewrite(path, SEARCH.replace("workers: {min: 2, max: 4}",
                                          "workers: {min: 3, max: 6}")
                                 .replace("concurrency: 16", "concurrency: 4"))
        result = daemon.top.reloader.reload()
        self.assertEqual(result.updated, ("search",))
        await wait_for(lambda: len(daemon.pool("search").ready) == 3, 10, what="a third worker")
        self.assertTrue(pids <= set(daemon.ready_pids("search")))
        self.assertEqual(daemon.top.proxy.resource("search").concurrency, 4)

    async def test_changed_env_rolls_under_load_on_sighup_without_a_failed_request(self) -> None:
        path = write_config(self, SEARCH)
        daemon = await start_daemon(self, path)
        before = set(daemon.ready_pids("search"))
        done: defer.Deferred[None] = defer.Deferred()
        load = defer.ensureDeferred(
            hammer(http_client(self), f"{daemon.url}/api/search?q=roll", 8, done))
        await wait_for(lambda: daemon.pool("search").retired_requests + sum(
            w.requests for w in daemon.pool("search").workers) > 50, 5, what="load running")
        self.rewrite(path, SEARCH.replace("concurrency: 16", "concurrency: 16\n"
                                          "    env: {RELOADED: \"yes\"}"))
        os.kill(os.getpid(), signal.SIGHUP)  # what `make reload` sends the daemon
        pool = daemon.pool("search")
        await wait_for(lambda: pool.rolling, 5, what="the rolling restart to begin")
        await wait_for(lambda: not pool.rolling, 20, what="the rolling restart to end")
        done.callback(None)
        stats = await load
        self.assertEqual(stats["failed"], [])
        after = set(daemon.ready_pids("search"))
        self.assertEqual(len(after), 2)
        self.assertFalse(before & after)
        # The reload's own event follows its next look at the new workers
        # (Reloader.wait_ready polls), which may come after the roll's end.
        await wait_for(lambda: "reload" in [e.kind for e in daemon.supervisor.events], 5,
                       what="the reload event")
        kinds = [e.kind for e in daemon.supervisor.events]
        self.assertIn("rolling_restart_done", kinds)


class ReloadCommandTests(TestCase):
    def setUp(self) -> None:
        require_binaries("search.cgi")

    async def test_cgipool_reload_reports_the_changes_and_errors(self) -> None:
        import io

        from twisted.internet import reactor

        from cgipool_tools.reload import run_reload

        path = write_config(self, SEARCH)
        daemon = await start_daemon(self, path)
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(await run_reload(reactor, daemon.url, out, err), 0, err.getvalue())
        self.assertEqual(out.getvalue(), "reloaded: no service changed\n")
        with open(path, "a") as f:
            f.write("    nonsense: [\n")
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(await run_reload(reactor, daemon.url, out, err), 1)
        self.assertIn("cgipool reload: 400: ", err.getvalue())
        self.assertIn(path, err.getvalue())

    async def test_cgipool_reload_exits_1_when_an_added_service_is_not_ready(self) -> None:
        """Applied all the same, but a script (or CI) can tell: the added service
        never listens, so after the bounded wait the answer names it and why."""
        import io
        import sys

        from twisted.internet import reactor

        from cgipool_tools.reload import run_reload
        from tests.test_integration import MISBEHAVING

        path = write_config(self, SEARCH)
        daemon = await start_daemon(self, path)
        command = json.dumps([sys.executable, MISBEHAVING, "{port}", "--wrong-port"])
        never = (f"  never:\n    command: {command}\n    route: /api/never\n"
                 f"    workers: 1\n    health: {{path: /, interval: 1, timeout: 1}}\n"
                 # Listens, but its health path is a 404 (a handler not written yet).
                 f"  wrong:\n    command: [build/search.cgi, \"{{port}}\"]\n"
                 f"    route: /api/wrong\n    workers: 1\n    queue: {{timeout: 60}}\n"
                 f"    health: {{path: /not-here, interval: 1, timeout: 1}}\n")
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:  # among the services, before write_config's admin line
            f.write(text.replace("\nadmin: {", "\n" + never + "admin: {", 1))
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(await run_reload(reactor, daemon.url, out, err), 1, err.getvalue())
        self.assertIn("added never: not ready yet (", out.getvalue(), err.getvalue())
        self.assertIn("added wrong: not ready yet (health check failing: HTTP 404)",
                      out.getvalue())
        self.assertIn("never", daemon.supervisor.pools, "the configuration was applied")
        for name in ("never", "wrong"):
            daemon.pids.update(w.pid for w in daemon.pool(name).workers if w.pid)
        # A request to the service that answers its probe wrongly is not queued
        # for queue.timeout (60 s here): 503 now, saying why.
        response = await http_client(self).get(f"{daemon.url}/api/wrong?q=x", timeout=20)
        body = json.loads(await treq.content(response))
        self.assertEqual(response.code, 503)
        self.assertIn("health check failing: HTTP 404", body["error"])

    async def test_restart_only_settings_are_reported_until_the_file_matches_again(
            self) -> None:
        # Compared with what the daemon runs with, not with the last file read.
        path = write_config(self, SEARCH)
        daemon = await start_daemon(self, path)
        reloader = daemon.top.reloader
        with open(path) as f:
            original = f.read()
        changed = original.replace('listen: "tcp:0:interface=127.0.0.1"',
                                   'listen: "tcp:1:interface=127.0.0.1"', 1)
        changed = changed.replace('admin: {listen: "tcp:0:interface=127.0.0.1"',
                                  'admin: {listen: "tcp:2:interface=127.0.0.1"', 1)
        self.assertEqual(changed.count("tcp:0:"), 0)
        with open(path, "w") as f:
            f.write(changed + "trusted_proxies: [10.0.0.0/8]\n")
        for _ in range(2):
            result = reloader.reload()
            self.assertEqual(result.needs_restart, ("listen", "trusted_proxies", "admin.listen"))
            self.assertEqual(result.applied, (), "admin.listen alone is not applied")
            self.assertIn("(listen, trusted_proxies, admin.listen changed: restart the "
                          "daemon to apply)", result.summary())
        with open(path, "w") as f:
            f.write(original)
        result = reloader.reload()
        self.assertEqual((result.ok, result.needs_restart), (True, ()))
        self.assertEqual(result.summary(), "no service changed")
        code, body = await get_json(http_client(self), f"{daemon.url}/api/search?q=same")
        self.assertEqual((code, body["query"]), (200, "same"))

    async def test_cgipool_reload_without_a_daemon(self) -> None:
        """`cgipool reload` with no daemon listening exits 1 with the `make start-bg` hint,
        not a traceback."""
        import io

        from twisted.internet import reactor

        from cgipool_tools.reload import run_reload

        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(await run_reload(reactor, "http://127.0.0.1:9", out, err), 1)
        self.assertIn("make start-bg", err.getvalue())


class ReloadKindTests(TestCase):
    """Reloads that CGI services and changes of kind go through."""

    def setUp(self) -> None:
        require_binaries("search.cgi")

    async def test_a_changed_cgi_service_reloads(self) -> None:
        """A CGI service whose settings changed (a new env) is reported rolled by a reload,
        like a worker service, and keeps answering."""
        from tests.test_cgi import cgi_config

        path = write_config(self, cgi_config())
        daemon = await start_daemon(self, path)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace("stop_timeout: 2", "stop_timeout: 2\n    env: {NEW: \"1\"}"))
        result = daemon.top.reloader.reload()
        self.assertEqual((result.ok, result.rolled), (True, ("script",)))
        code, _ = await get_json(http_client(self), f"{daemon.url}/cgi/test/env")
        self.assertEqual(code, 200)

    async def test_a_service_can_change_kind_while_its_old_pool_drains(self) -> None:
        from tests.test_cgi import SCRIPT

        path = write_config(self, SEARCH)
        daemon = await start_daemon(self, path)
        old_pids = set(daemon.ready_pids("search"))
        with open(path) as f:
            head = f.read().split("services:", 1)[0]
        with open(path, "w") as f:
            f.write(head + f"""services:
  search:
    protocol: cgi
    command: ["{{python}}", "{SCRIPT}"]
    route: /api/search
""")
        result = daemon.top.reloader.reload()
        self.assertTrue(result.ok, result)
        self.assertEqual(daemon.pool("search").config.protocol, "cgi")
        await wait_for(lambda: not any(process_alive(p) for p in old_pids), 10,
                       what="the old search workers gone")
        await wait_for(lambda: not daemon.supervisor.leaving, 5, what="the old pool removed")
        code, _ = await get_json(http_client(self), f"{daemon.url}/api/search/env")
        self.assertEqual(code, 200)
