"""End to end: real C and Python workers behind the real proxy on 127.0.0.1."""

from __future__ import annotations

from twisted.trial.unittest import TestCase

from tests.support import get_json, http_client, require_binaries, start_daemon, write_config

SEARCH = """
services:
  search:
    command: ["build/search.cgi", "{port}"]
    route: /api/search
    workers: {min: 2, max: 4}
    health: {path: "/?q=health", interval: 1, timeout: 1, fall: 2}
"""


class ProxyTests(TestCase):
    def setUp(self) -> None:
        require_binaries("search.cgi")

    async def test_requests_spread_over_workers(self) -> None:
        daemon = await start_daemon(self, write_config(self, SEARCH))
        client = http_client(self)
        pids = []
        for i in range(6):
            code, body = await get_json(client, f"{daemon.url}/api/search?q=test{i}")
            self.assertEqual(code, 200)
            self.assertEqual(body["query"], f"test{i}")
            pids.append(body["pid"])
        self.assertEqual(set(pids), set(daemon.ready_pids("search")))
        self.assertEqual(len(set(pids)), 2)
        # Sequential requests alternate between the two workers.
        self.assertNotEqual(pids[0], pids[1])
