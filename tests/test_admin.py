"""The admin app through treq's StubTreq: pages, API, controls and access rules.

The supervisor behind it runs on the fake process reactor, so controls that
replace workers are driven by answering probes and ending processes.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

import treq
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.trial.unittest import TestCase

from cgipool.admin.app import AdminApp
from cgipool.admin.auth import AdminAuth
from cgipool.config import AdminConfig, Example, PoolConfig, WorkersConfig
from cgipool.health import STARTUP_FIRST_DELAY
from cgipool.proxy.routes import Root
from cgipool.supervisor.supervisor import Supervisor
from tests.fakes import FakeProbe, FakeProcessReactor, KillRecorder, service

TOKEN = "s3cret-token-for-tests"
HOSTILE = "<script>alert('x')</script>"
CSRF = {b"X-CGIPool-CSRF": [b"1"]}
BASE = "http://127.0.0.1:8080"


class AdminTestCase(TestCase):
    def build(self, admin: AdminConfig | None = None) -> None:
        self.reactor = FakeProcessReactor()
        self.probe = FakeProbe()
        self.kill = KillRecorder()
        config = PoolConfig(path="pool.yaml", services=(
            service("search", workers=WorkersConfig(2, 4)),
            service(HOSTILE, route="/api/evil", description=f"desc {HOSTILE}",
                    examples=(Example(f"/api/evil?q={HOSTILE}"),), workers=WorkersConfig(1, 1)),
        ))
        self.supervisor = Supervisor(config, self.reactor, probe=self.probe,
                                     launcher=["/bin/launch"], kill=self.kill,
                                     rand=lambda: 0.5, port_free=lambda p: True)
        self.supervisor.startService()
        self.ready_all()
        self.admin = AdminApp(self.supervisor, clock=self.reactor,
                              auth=AdminAuth(admin or AdminConfig()))
        self.client = StubTreq(Root({}, local={"admin": self.admin.resource()}))

    def ready_all(self) -> None:
        self.reactor.advance(STARTUP_FIRST_DELAY)
        self.probe.answer()

    def setUp(self) -> None:
        self.build()

    async def call(self, method: str, path: str, headers: dict[bytes, list[bytes]] | None = None,
                   data: Any = None, **kw: Any) -> tuple[int, Any, Any]:
        response = await self.client.request(method, BASE + path, headers=headers,
                                             data=data, **kw)
        body = await treq.content(response)
        kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if kind.startswith(b"application/json"):
            return response.code, json.loads(body), response
        return response.code, body.decode(), response

    def pool(self, name: str = "search") -> Any:
        return self.supervisor.pools[name]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.supervisor.events]


class PageTests(AdminTestCase):
    async def test_every_page_renders_and_escapes_hostile_strings(self) -> None:
        for path in ("/admin/", "/admin/processes", "/admin/traffic", "/admin/events"):
            code, body, response = await self.call("GET", path)
            self.assertEqual(code, 200, path)
            self.assertIn("search", body)
            self.assertNotIn(HOSTILE, body)
            self.assertNotIn("<script>alert", body)
            self.assertIn(b"DENY", response.headers.getRawHeaders(b"x-frame-options")[0])
        code, body, _ = await self.call("GET", "/admin/processes")
        for worker in self.pool().workers:
            self.assertIn(str(worker.pid), body)

    async def test_unknown_admin_path_is_json_404(self) -> None:
        code, body, _ = await self.call("GET", "/admin/nope")
        self.assertEqual(code, 404)
        self.assertIn("error", body)

    async def test_static_files_by_plain_name_only(self) -> None:
        code, _, _ = await self.call("GET", "/admin/static/..%2fapp.py")
        self.assertEqual(code, 400)  # encoded slash: refused by routing
        code, _, _ = await self.call("GET", "/admin/static/.hidden")
        self.assertEqual(code, 404)
        code, _, _ = await self.call("GET", "/admin/static/nonexistent.js")
        self.assertEqual(code, 404)


class ReadApiTests(AdminTestCase):
    async def test_status_lists_services_workers_and_version(self) -> None:
        code, body, _ = await self.call("GET", "/admin/api/status")
        self.assertEqual(code, 200)
        names = [s["name"] for s in body["services"]]
        self.assertEqual(names, ["search", HOSTILE])  # JSON carries it verbatim
        search = body["services"][0]
        self.assertEqual(search["state"], "ok")
        self.assertEqual(search["size"], {"min": 2, "max": 4, "desired": 2, "ready": 2})
        for worker in search["workers"]:
            for key in ("id", "pid", "port", "state", "started_at", "uptime", "restarts",
                        "requests", "in_flight", "last_health", "rss", "cpu_percent"):
                self.assertIn(key, worker)
        self.assertIn("version", body)

    async def test_one_service_with_its_events(self) -> None:
        code, body, _ = await self.call("GET", "/admin/api/services/search")
        self.assertEqual(code, 200)
        self.assertEqual(body["name"], "search")
        self.assertEqual({e["kind"] for e in body["events"]}, {"spawn", "ready"})
        code, body, _ = await self.call("GET", "/admin/api/services/nope")
        self.assertEqual(code, 404)
        self.assertIn("search", body["services"])

    async def test_log_and_bad_arguments(self) -> None:
        code, body, _ = await self.call("GET", "/admin/api/log?limit=2")
        self.assertEqual((code, len(body["events"])), (200, 2))
        self.assertGreater(body["events"][0]["seq"], body["events"][1]["seq"])  # newest first
        for query in ("limit=abc", "limit=0", "limit=5000"):
            code, body, _ = await self.call("GET", f"/admin/api/log?{query}")
            self.assertEqual(code, 400, query)
            self.assertIn("limit", body["error"])

    async def test_metrics_api_without_metrics_is_503_json(self) -> None:
        code, body, _ = await self.call("GET", "/admin/api/metrics")
        self.assertEqual(code, 503)
        self.assertIn("error", body)


class ControlTests(AdminTestCase):
    async def test_scale_changes_the_pool_and_logs_the_action(self) -> None:
        code, body, _ = await self.call("POST", "/admin/api/services/search/scale",
                                        headers=CSRF, json={"workers": 3})
        self.assertEqual((code, body["before"], body["after"]), (200, 2, 3))
        self.assertEqual(self.pool().desired, 3)
        admin = [e for e in self.supervisor.events if e.kind == "admin"]
        self.assertIn("scale to 3", admin[-1].message)
        self.assertIn("127.0.0.1", admin[-1].message)

    async def test_scale_refuses_bad_input_and_changes_nothing(self) -> None:
        cases = [({"workers": 9}, 400, "between 2 and 4"), ({"workers": "3"}, 400, "integer"),
                 ({}, 400, "integer"), ({"workers": True}, 400, "integer")]
        for body, status, message in cases:
            code, answer, _ = await self.call("POST", "/admin/api/services/search/scale",
                                              headers=CSRF, json=body)
            self.assertEqual(code, status, body)
            self.assertIn(message, answer["error"])
        code, answer, _ = await self.call(
            "POST", "/admin/api/services/search/scale",
            headers={**CSRF, b"Content-Type": [b"application/json"]}, data=b"{nope")
        self.assertEqual(code, 400)
        self.assertIn("invalid JSON", answer["error"])
        code, answer, _ = await self.call("POST", "/admin/api/services/search/scale",
                                          headers=CSRF, data=b"workers=3")
        self.assertEqual(code, 415)
        self.assertEqual(self.pool().desired, 2)
        self.assertNotIn("admin", self.kinds())

    async def test_controls_are_post_only(self) -> None:
        code, body, response = await self.call("GET", "/admin/api/services/search/scale")
        self.assertEqual(code, 405)
        self.assertIn("POST", body["error"])
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])

    async def test_restart_worker_answers_once_the_replacement_is_ready(self) -> None:
        pool = self.pool()
        old = pool.workers[0]
        old_pid = old.pid
        pending = defer.ensureDeferred(
            self.call("POST", "/admin/api/services/search/workers/0/restart", headers=CSRF))
        self.ready_all()  # the replacement passes its first probe
        self.reactor.exit(old_pid)  # the drained old worker exits after SIGTERM
        self.client.flush()
        code, body, _ = await pending
        self.assertEqual(code, 200)
        self.assertEqual((body["done"], body["old_pid"]), (True, old_pid))
        self.assertNotEqual(body["replacement"]["pid"], old_pid)
        self.assertNotIn(old, pool.workers)
        self.assertEqual(len(pool.ready), 2)

    async def test_restart_that_takes_long_answers_202(self) -> None:
        pending = defer.ensureDeferred(
            self.call("POST", "/admin/api/services/search/workers/1/restart", headers=CSRF))
        self.reactor.advance(10)
        self.client.flush()
        code, body, _ = await pending
        self.assertEqual((code, body["done"]), (202, False))

    async def test_restart_unknown_worker_or_service_is_404(self) -> None:
        code, body, _ = await self.call("POST", "/admin/api/services/search/workers/7/restart",
                                        headers=CSRF)
        self.assertEqual(code, 404)
        self.assertEqual(body["workers"], [0, 1])
        code, _, _ = await self.call("POST", "/admin/api/services/nope/workers/0/restart",
                                     headers=CSRF)
        self.assertEqual(code, 404)

    async def test_drain_then_drain_again_is_409(self) -> None:
        code, body, _ = await self.call("POST", "/admin/api/services/search/workers/1/drain",
                                        headers=CSRF)
        self.assertEqual((code, body["replaced"]), (202, True))
        code, body, _ = await self.call("POST", "/admin/api/services/search/workers/1/drain",
                                        headers=CSRF)
        self.assertEqual(code, 409)

    async def test_rolling_restart_twice_is_409(self) -> None:
        code, body, _ = await self.call("POST", "/admin/api/services/search/rolling-restart",
                                        headers=CSRF)
        self.assertEqual(code, 202)
        self.assertTrue(self.pool().rolling)
        code, body, _ = await self.call("POST", "/admin/api/services/search/rolling-restart",
                                        headers=CSRF)
        self.assertEqual(code, 409)


class AccessTests(AdminTestCase):
    """127.0.0.1 is the client of StubTreq; a config without it makes it remote."""

    def remote(self, token: str | None = None) -> None:
        self.build(AdminConfig(token=token,
                               local_networks=(ipaddress.ip_network("10.0.0.0/8"),)))

    async def test_remote_client_refused_without_a_configured_token(self) -> None:
        self.remote()
        code, body, _ = await self.call("GET", "/admin/api/status")
        self.assertEqual(code, 403)
        self.assertIn("admin.token", body["error"])
        code, _, _ = await self.call("GET", "/admin/")
        self.assertEqual(code, 403)
        code, _, _ = await self.call("GET", "/admin/nope")
        self.assertEqual(code, 403)

    async def test_remote_client_needs_the_bearer_token(self) -> None:
        self.remote(TOKEN)
        code, body, response = await self.call("GET", "/admin/api/status")
        self.assertEqual(code, 401)
        self.assertIn(b"Bearer", response.headers.getRawHeaders(b"www-authenticate")[0])
        code, body, _ = await self.call("GET", "/admin/api/status",
                                        headers={b"Authorization": [b"Bearer wrong-token-xyz"]})
        self.assertEqual(code, 403)
        code, body, _ = await self.call("GET", "/admin/api/status",
                                        headers={b"Authorization": [f"Bearer {TOKEN}".encode()]})
        self.assertEqual(code, 200)

    async def test_bearer_token_is_enough_for_changes(self) -> None:
        self.remote(TOKEN)
        code, _, _ = await self.call("POST", "/admin/api/services/search/scale",
                                     headers={b"Authorization": [f"Bearer {TOKEN}".encode()]},
                                     json={"workers": 3})
        self.assertEqual(code, 200)

    async def test_login_cookie_then_changes_need_the_csrf_header(self) -> None:
        self.remote(TOKEN)
        code, body, _ = await self.call("POST", "/admin/login", data={"token": "nope"})
        self.assertEqual(code, 403)
        self.assertIn("Wrong token", body)
        response = await self.client.post(BASE + "/admin/login", data={"token": TOKEN},
                                          allow_redirects=False)
        self.assertEqual(response.code, 303)
        cookie = response.headers.getRawHeaders(b"set-cookie")[0]
        self.assertIn(b"HttpOnly", cookie)
        self.assertIn(b"samesite=strict", cookie.lower())
        session = {b"Cookie": [cookie.split(b";")[0]]}
        code, _, _ = await self.call("GET", "/admin/api/status", headers=session)
        self.assertEqual(code, 200)
        code, body, _ = await self.call("POST", "/admin/api/services/search/scale",
                                        headers=session, json={"workers": 3})
        self.assertEqual(code, 403)
        self.assertIn("X-CGIPool-CSRF", body["error"])
        code, _, _ = await self.call("POST", "/admin/api/services/search/scale",
                                     headers={**session, **CSRF}, json={"workers": 3})
        self.assertEqual(code, 200)

    async def test_local_changes_need_the_csrf_header(self) -> None:
        code, body, _ = await self.call("POST", "/admin/api/services/search/scale",
                                        json={"workers": 3})
        self.assertEqual(code, 403)
        self.assertEqual(self.pool().desired, 2)

    async def test_cross_site_and_cross_origin_changes_are_refused(self) -> None:
        for headers in ({b"Sec-Fetch-Site": [b"cross-site"]},
                        {b"Origin": [b"http://evil.example"]}):
            code, body, _ = await self.call("POST", "/admin/api/services/search/scale",
                                            headers={**CSRF, **headers}, json={"workers": 3})
            self.assertEqual(code, 403, headers)
        code, _, _ = await self.call(
            "POST", "/admin/api/services/search/scale", json={"workers": 3},
            headers={**CSRF, b"Origin": [BASE.encode()], b"Sec-Fetch-Site": [b"same-origin"]})
        self.assertEqual(code, 200)

    async def test_dns_rebinding_host_is_refused_for_tokenless_access(self) -> None:
        code, body, _ = await self.call("GET", "/admin/api/status",
                                        headers={b"Host": [b"rebind.evil.example"]})
        self.assertEqual(code, 403)
        self.assertIn("Host", body["error"])
        for host in (b"localhost:8080", b"127.0.0.1", b"[::1]:8080"):
            code, _, _ = await self.call("GET", "/admin/api/status", headers={b"Host": [host]})
            self.assertEqual(code, 200, host)
