"""Admin access from another address, over real sockets: 127.0.0.2 is "remote"
when ``admin.local_networks`` names only 127.0.0.1.  Refused requests change nothing."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase

from tests.support import require_binaries, start_daemon, write_config
from tests.test_proxy import dechunk, split_response

TOKEN = "s3cret-admin-token-0123456789"
CONFIG = f"""
admin:
  token: "{TOKEN}"
  local_networks: ["127.0.0.1/32"]
services:
  search:
    command: ["build/search.cgi", "{{port}}"]
    route: /api/search
    workers: {{min: 2, max: 3}}
    health: {{path: "/?q=health", interval: 1, timeout: 1, fall: 2}}
"""


class _Collect(Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data.extend(data)

    def connectionLost(self, reason: Any) -> None:
        self.done.callback(bytes(self.data))


class RemoteAdminTests(TestCase):
    def setUp(self) -> None:
        require_binaries("search.cgi")

    async def request(self, source: str, method: str, path: str,
                      headers: dict[str, str] | None = None, body: bytes = b"") -> tuple[int, Any]:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.daemon.port,
                                      bindAddress=(source, 0))
        proto = await connectProtocol(endpoint, _Collect())
        lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{self.daemon.port}",
                 "Connection: close", f"Content-Length: {len(body)}"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        proto.transport.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        status, headers, payload = split_response(await proto.done)
        if headers.get(b"transfer-encoding") == [b"chunked"]:
            payload = dechunk(payload)
        try:
            return status, json.loads(payload)
        except ValueError:
            return status, payload

    async def test_remote_reads_need_the_token(self) -> None:
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
