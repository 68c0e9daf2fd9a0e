"""Admin access from another address, over real sockets: 127.0.0.2 is "remote"
when ``admin.local_networks`` names only 127.0.0.1.  Refused requests change nothing."""

from __future__ import annotations

import base64
import json
import os
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from cgipool.admin.auth import LOGIN_FAILURES, LOGIN_WINDOW
from tests.support import ROOT, require_binaries, search_service, start_daemon, write_config
from tests.test_proxy import dechunk, split_response

TOKEN = "s3cret-admin-token-0123456789"
CONFIG = f"""
admin:
  token: "{TOKEN}"
  local_networks: ["127.0.0.1/32"]
services:
"""
CONFIG += search_service(workers="{min: 2, max: 3}", examples='["/api/search?q=test"]')


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data.extend(data)

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(bytes(self.data))


class RawClientCase(TestCase):
    """Raw HTTP/1.1 requests from a chosen loopback address to a test daemon."""

    daemon: Any

    def setUp(self) -> None:
        require_binaries("search.cgi")

    async def request(self, source: str, method: str, path: str,
                      headers: dict[str, str] | None = None, body: bytes = b"",
                      port: int | None = None) -> tuple[int, Any]:
        """A raw request from ``source`` to the admin listener (or ``port``)."""
        port = self.daemon.admin_port if port is None else port
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
        proto = await connectProtocol(endpoint, _Collect())
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
                 "Connection: close", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        proto.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        status, headers, payload = split_response(await proto.done)
        self.last_headers = headers
        if headers.get(b"transfer-encoding") == [b"chunked"]:
            payload = dechunk(payload)
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload



class RemoteAdminTests(RawClientCase):
    async def test_remote_reads_need_the_token(self) -> None:
        """Outside local_networks even reads need the token: none is 401 saying how to send
        it, a wrong one 403, the right one 200, /metrics alike; the local network needs
        none."""
        self.daemon = await start_daemon(self, write_config(self, CONFIG))
        status, body = await self.request("127.0.0.2", "GET", "/admin/api/status")
        self.assertEqual(status, 401)
        self.assertIn("Authorization: Bearer", body["error"])
        status, body = await self.request("127.0.0.2", "GET", "/admin/api/status",
                                          {"Authorization": "Bearer wrong-token-wrong-token"})
        self.assertEqual(status, 403)
        status, body = await self.request("127.0.0.2", "GET", "/admin/api/status",
                                          {"Authorization": f"Bearer {TOKEN}"})
        self.assertEqual(status, 200)
        self.assertEqual(body["services"][0]["name"], "search")
        status, _ = await self.request("127.0.0.2", "GET", "/metrics")
        self.assertEqual(status, 401)
        status, _ = await self.request("127.0.0.1", "GET", "/admin/api/status")
        self.assertEqual(status, 200, "the configured local network needs no token")

    async def test_remote_changes_are_refused_and_change_nothing(self) -> None:
        self.daemon = await start_daemon(self, write_config(self, CONFIG))
        pool = self.daemon.pool("search")
        pids = sorted(w.pid for w in pool.workers)
        body = json.dumps({"workers": 3}).encode()
        json_type = {"Content-Type": "application/json", "X-CGIPool-CSRF": "1"}
        for path, payload in [("/admin/api/services/search/scale", body),
                              ("/admin/api/services/search/workers/0/restart", b""),
                              ("/admin/api/services/search/rolling-restart", b""),
                              ("/admin/api/reload", b"")]:
            status, answer = await self.request("127.0.0.2", "POST", path, json_type, payload)
            self.assertEqual(status, 401, path)
            self.assertIn("error", answer)
        self.assertEqual(sorted(w.pid for w in pool.workers), pids)
        self.assertEqual(pool.desired, 2)
        self.assertNotIn("admin", [e.kind for e in self.daemon.supervisor.events])
        # With the token it works (a bearer token needs no CSRF header).
        status, answer = await self.request(
            "127.0.0.2", "POST", "/admin/api/services/search/scale",
            {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}, body)
        self.assertEqual((status, answer["after"]), (200, 3))


class _Stream(Protocol):
    """One raw event-stream request: its head as soon as it comes, kept open."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.head: defer.Deferred[bytes] = defer.Deferred()
        self.closed: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data.extend(data)
        if not self.head.called and b"\r\n\r\n" in self.data:
            self.head.callback(bytes(self.data))

    def connectionLost(self, reason: Any) -> None:
        if not self.head.called:
            self.head.callback(bytes(self.data))
        self.closed.callback(None)


class EventStreamSlotTests(TestCase):
    """The dashboard's live stream: 64 slots in all, at most 8 per client address,
    so one client cannot lock every dashboard out (it used to get all 64)."""

    def setUp(self) -> None:
        require_binaries("search.cgi")
        self.streams: list[_Stream] = []

        async def close_all() -> None:
            for stream in self.streams:
                stream.transport.abortConnection()
            for stream in self.streams:
                await stream.closed
        self.addCleanup(lambda: defer.ensureDeferred(close_all()))

    async def open_stream(self, source: str) -> tuple[int, dict[str, str], bytes]:
        port = getattr(self.daemon, "admin_port", self.daemon.port)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port, bindAddress=(source, 0))
        stream = await connectProtocol(endpoint, _Stream())
        self.streams.append(stream)
        stream.transport.write(
            f"GET /admin/api/events HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Connection: close\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
        raw = await stream.head
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return int(lines[0].split()[1]), headers, rest

    async def refused_body(self, rest: bytes) -> Any:
        stream = self.streams[-1]
        await stream.closed  # refused: answered and closed (Connection: close)
        status, headers, body = split_response(bytes(stream.data))
        if headers.get(b"transfer-encoding") == [b"chunked"]:
            body = dechunk(body)
        return json.loads(body)

    async def test_one_address_over_its_cap_gets_429_another_still_streams(self) -> None:
        self.daemon = await start_daemon(self, write_config(self, CONFIG))
        stream = self.daemon.top.admin.stream
        for n in range(stream.max_per_client):
            code, headers, _ = await self.open_stream("127.0.0.1")
            self.assertEqual(code, 200, f"stream {n + 1} of 127.0.0.1")
            self.assertTrue(headers["content-type"].startswith("text/event-stream"))
        code, headers, rest = await self.open_stream("127.0.0.1")
        self.assertEqual(code, 429)
        self.assertEqual(headers["retry-after"], "5")
        self.assertIn("at most 8 per client", (await self.refused_body(rest))["error"])
        code, headers, _ = await self.open_stream("127.0.0.2")
        self.assertEqual(code, 200, "another address still gets its stream")
        self.assertEqual(len(stream.clients), stream.max_per_client + 1)

    async def test_the_total_cap_still_answers_503(self) -> None:
        self.daemon = await start_daemon(self, write_config(self, CONFIG))
        stream = self.daemon.top.admin.stream
        sources = [f"127.0.0.{n}" for n in range(2, 2 + stream.max_clients // 8)]
        for source in sources:
            for _ in range(8):
                code, _, _ = await self.open_stream(source)
                self.assertEqual(code, 200, source)
        self.assertEqual(len(stream.clients), stream.max_clients)
        code, headers, rest = await self.open_stream("127.0.0.99")
        self.assertEqual(code, 503)
        self.assertEqual(headers["retry-after"], "5")
        self.assertIn("too many live dashboard connections",
                      (await self.refused_body(rest))["error"])


MISBEHAVING = os.path.join(ROOT, "tests", "workers", "misbehaving.py")
CGI_SCRIPT = os.path.join(ROOT, "tests", "workers", "cgi_behaviour.py")
#: A worker that echoes the headers it got, a CGI script that echoes its
#: environment, and the admin token: what an untrusted service could collect.
ECHO_CONFIG = f"""
admin:
  token: "{TOKEN}"
  local_networks: ["127.0.0.1/32"]
services:
  echo:
    command: {json.dumps([sys.executable, MISBEHAVING, "{port}"])}
    route: /api/echo
    workers: 1
    health: {{path: "/", interval: 1, timeout: 1, fall: 2}}
  script:
    protocol: cgi
    command: ["{{python}}", "{CGI_SCRIPT}"]
    route: /cgi/test
    workers: {{max: 2}}
"""


class AdminOriginTests(RawClientCase):
    """The admin on a listener of its own: the proxy's port only redirects."""

    async def test_proxy_port_redirects_to_the_admin_and_serves_no_admin_content(
            self) -> None:
        self.daemon = await start_daemon(self, write_config(self, CONFIG))
        pool = self.daemon.pool("search")
        proxy, admin = self.daemon.port, self.daemon.admin_port
        self.assertNotEqual(proxy, admin)
        for method, path, headers in (
                ("GET", "/admin/", {}), ("GET", "/admin/api/status", {}),
                ("GET", "/metrics", {}), ("GET", "/admin/api/events", {}),
                ("POST", "/admin/api/services/search/scale",
                 {"X-CGIPool-CSRF": "1", "Content-Type": "application/json"})):
            status, body = await self.request("127.0.0.1", method, path, headers,
                                              b'{"workers": 3}' if method == "POST" else b"",
                                              port=proxy)
            self.assertEqual(status, 307, path)
            self.assertEqual(body["location"], f"http://127.0.0.1:{admin}{path}", path)
            self.assertNotIn("services", body)
        self.assertEqual(pool.desired, 2, "a POST to the proxy's port changed nothing")
        self.assertNotIn("admin", [e.kind for e in self.daemon.supervisor.events])
        # The admin's listener serves the admin and nothing of the services.
        status, body = await self.request("127.0.0.1", "GET", "/admin/api/status")
        self.assertEqual(status, 200)
        status, body = await self.request("127.0.0.1", "GET", "/api/search?q=x")
        self.assertEqual(status, 404)
        self.assertEqual(body["services"], self.daemon.url, "says where the services are")
        # The dashboard's example links lead to the proxy's origin, not to this one.
        status, page = await self.request("127.0.0.1", "GET", "/admin/")
        self.assertEqual(status, 200)
        self.assertIn(f'data-proxy="{self.daemon.url}"'.encode(), page)
        self.assertIn(f'href="{self.daemon.url}/api/search'.encode(), page)
        status, body = await self.request("127.0.0.1", "GET", "/")
        self.assertEqual((status, body["location"]), (307, "/admin/"))

    async def test_admin_listen_same_serves_the_admin_on_the_proxy_and_warns(self) -> None:
        """One port only when the operator says so, with a warning that says
        what it exposes."""
        from twisted.logger import globalLogPublisher

        seen: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(seen.append)
        self.addCleanup(globalLogPublisher.removeObserver, seen.append)
        self.daemon = await start_daemon(self, write_config(
            self, CONFIG.replace("admin:\n", "admin:\n  listen: same\n")))
        self.assertEqual(self.daemon.admin_port, self.daemon.port)
        status, body = await self.request("127.0.0.1", "GET", "/admin/api/status")
        self.assertEqual(status, 200)
        warnings = [e for e in seen if "admin.listen is 'same'" in e.get("log_format", "")]
        self.assertEqual(len(warnings), 1)
        self.assertIn("same origin as every service", warnings[0]["log_format"])


class CredentialTests(RawClientCase):
    """No admin credential reaches a worker or a script, on any request path."""

    async def login(self) -> str:
        status, _ = await self.request(
            "127.0.0.2", "POST", "/admin/login",
            {"Content-Type": "application/x-www-form-urlencoded"},
            f"token={TOKEN}".encode())
        self.assertEqual(status, 303)
        session = self.last_headers[b"set-cookie"][0].split(b";")[0].decode()
        self.assertTrue(session.startswith("cgipool_admin="))
        return session

    async def test_session_cookie_and_admin_token_never_reach_a_worker_or_script(
            self) -> None:
        self.daemon = await start_daemon(self, write_config(self, ECHO_CONFIG))
        session = await self.login()
        status, _ = await self.request("127.0.0.2", "GET", "/admin/api/status",
                                       {"Cookie": session})
        self.assertEqual(status, 200, "the session works for the admin")
        basic = base64.b64encode(f"admin:{TOKEN}".encode()).decode()
        carried = {"Cookie": f"a=1; {session}; b=2"}
        proxy = self.daemon.port

        def worker_saw(body: Any) -> dict[str, list[str]]:
            seen: dict[str, list[str]] = {}
            for name, value in body["headers"]:
                seen.setdefault(name.lower(), []).append(value)
            return seen

        for authorization in (f"Bearer {TOKEN}", f"Basic {basic}"):
            for extra in ({}, {"Connection": "close"}):  # the lean and the general path
                status, body = await self.request(
                    "127.0.0.1", "GET", "/api/echo/x",
                    {**carried, "Authorization": authorization, **extra}, port=proxy)
                self.assertEqual(status, 200)
                seen = worker_saw(body)
                self.assertEqual(seen.get("cookie"), ["a=1; b=2"], (authorization, extra))
                self.assertNotIn("authorization", seen)
                self.assertNotIn(TOKEN, json.dumps(body))
            # A POST (with a body) goes the general path too.
            status, body = await self.request(
                "127.0.0.1", "POST", "/api/echo/x", {**carried, "Authorization": authorization},
                b"payload", port=proxy)
            self.assertEqual(status, 200)
            self.assertEqual(worker_saw(body).get("cookie"), ["a=1; b=2"])
            self.assertNotIn("authorization", worker_saw(body))
            # A CGI script's environment, directly and after a local redirect.
            status, body = await self.request(
                "127.0.0.1", "GET", "/cgi/test/env",
                {**carried, "Authorization": authorization}, port=proxy)
            self.assertEqual(status, 200)
            self.assertEqual(body["env"]["HTTP_COOKIE"], "a=1; b=2")
            self.assertNotIn("AUTH_TYPE", body["env"])
            self.assertNotIn(TOKEN, json.dumps(body))
            self.assertNotIn(session.split("=", 1)[1], json.dumps(body))
            status, body = await self.request(
                "127.0.0.1", "GET", "/cgi/test/local?to=/api/echo/redirected",
                {**carried, "Authorization": authorization}, port=proxy)
            self.assertEqual(status, 200)
            self.assertEqual(body["path"], "/redirected")
            self.assertEqual(worker_saw(body).get("cookie"), ["a=1; b=2"])
            self.assertNotIn("authorization", worker_saw(body))
        # Other credentials are the service's business and pass unchanged.
        status, body = await self.request(
            "127.0.0.1", "GET", "/api/echo/x",
            {"Cookie": "only=mine", "Authorization": "Bearer the-service-s-own"}, port=proxy)
        seen = worker_saw(body)
        self.assertEqual(seen.get("cookie"), ["only=mine"])
        self.assertEqual(seen.get("authorization"), ["Bearer the-service-s-own"])
        status, body = await self.request(
            "127.0.0.1", "GET", "/api/echo/x", {"Cookie": session}, port=proxy)
        self.assertNotIn("cookie", worker_saw(body), "a Cookie with only the session is dropped")

    async def test_a_copied_session_cookie_is_refused_from_another_address(self) -> None:
        """Replaying the cookie from another client address fails; the owner's
        copy keeps working."""
        self.daemon = await start_daemon(self, write_config(self, ECHO_CONFIG))
        session = await self.login()
        status, body = await self.request("127.0.0.3", "GET", "/admin/api/status",
                                          {"Cookie": session})
        self.assertEqual(status, 401)
        status, _ = await self.request("127.0.0.2", "GET", "/admin/api/status",
                                       {"Cookie": session})
        self.assertEqual(status, 200)

    async def test_failed_logins_over_the_network_get_429_with_retry_after(self) -> None:
        self.daemon = await start_daemon(self, write_config(self, ECHO_CONFIG))
        codes = []
        for _ in range(LOGIN_FAILURES):
            status, _ = await self.request(
                "127.0.0.2", "POST", "/admin/login",
                {"Content-Type": "application/x-www-form-urlencoded"}, b"token=guess")
            codes.append(status)
        self.assertEqual(codes, [403] * (LOGIN_FAILURES - 1) + [429])
        self.assertEqual(self.last_headers[b"retry-after"], [str(int(LOGIN_WINDOW)).encode()])
        status, _ = await self.request("127.0.0.3", "POST", "/admin/login",
                                       {"Content-Type": "application/x-www-form-urlencoded"},
                                       f"token={TOKEN}".encode())
        self.assertEqual(status, 303, "another client is not locked out")
