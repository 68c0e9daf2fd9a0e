"""``cgipool new-service``: what it writes loads as a valid service; mistakes write nothing."""

from __future__ import annotations

import io
import os

from twisted.trial.unittest import TestCase

from cgipool.cli import main
from cgipool.config import load
from cgipool_tools.scaffold import LANGUAGES, ScaffoldError, scaffold
from tests.support import ROOT, get_json, http_client, start_daemon, write_config


class ScaffoldTests(TestCase):
    def services(self) -> str:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        return folder

    def test_every_language_writes_a_loadable_manifest(self) -> None:
        services = self.services()
        for lang in LANGUAGES:
            written = scaffold(f"demo-{lang}", lang, services)
            self.assertIn(os.path.join(services, f"demo-{lang}", "service.yaml"), written)
        pool = write_config(self, "services: {}\n", services_dir=services)
        config = load(pool, check_executables=False)
        by_name = {s.name: s for s in config.services}
        self.assertEqual(set(by_name), {f"demo-{lang}" for lang in LANGUAGES})
        self.assertEqual(by_name["demo-c"].command[0], os.path.join(ROOT, "build", "demo-c.cgi"))
        self.assertEqual(by_name["demo-cgi"].protocol, "cgi")
        self.assertEqual(by_name["demo-csharp"].language, "csharp")
        for svc in config.services:
            self.assertEqual(svc.route, f"/api/{svc.name}")
            self.assertTrue(svc.examples)

    def test_refusals(self) -> None:
        """An existing folder, a bad or reserved name, an unknown language, a route the
        daemon owns and an example outside the route are refused with a reason, and
        nothing is written for any of them."""
        services = self.services()
        scaffold("taken", "c", services)
        for args, problem in (
            (("taken", "c"), "already exists; not overwriting"),
            (("Upper", "c"), "invalid service name"),
            (("lib", "c"), "reserved"),
            (("x", "go"), "unknown language"),
        ):
            with self.assertRaises(ScaffoldError) as caught:
                scaffold(*args, services)
            self.assertIn(problem, str(caught.exception))
        with self.assertRaises(ScaffoldError) as caught:
            scaffold("y", "c", services, route="/admin/y")
        self.assertIn("reserved for the daemon", str(caught.exception))
        with self.assertRaises(ScaffoldError) as caught:
            scaffold("z", "c", services, examples=["/elsewhere?x=1"])
        self.assertIn("not under the route", str(caught.exception))
        self.assertEqual(sorted(os.listdir(services)), ["taken"])

    def test_command_line_exit_codes(self) -> None:
        """Scripts can tell the outcomes apart: 0 written (and the next step, make reload,
        printed), 1 refused (folder exists, on stderr), 2 usage error (unknown language)."""
        services = self.services()
        out, err = io.StringIO(), io.StringIO()
        import sys
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = out, err
        try:
            self.assertEqual(main(["new-service", "hi", "--lang", "cgi",
                                   "--services-dir", services]), 0)
            self.assertEqual(main(["new-service", "hi", "--lang", "cgi",
                                   "--services-dir", services]), 1)
            self.assertEqual(main(["new-service", "hi2", "--lang", "cobol",
                                   "--services-dir", services]), 2)
        finally:
            sys.stdout, sys.stderr = old
        self.assertIn("make reload", out.getvalue())
        self.assertIn("already exists", err.getvalue())

    async def test_scaffolded_cgi_and_python_services_answer(self) -> None:
        services = self.services()
        scaffold("pyhello", "python", services)
        scaffold("cgihello", "cgi", services)
        daemon = await start_daemon(self, write_config(self, "services: {}\n",
                                                       services_dir=services))
        client = http_client(self)
        for pool in daemon.supervisor.pools.values():
            for example in pool.config.examples:
                code, body = await get_json(client, daemon.url + example.path)
                self.assertEqual(code, 200, body)
                self.assertIsInstance(body["pid"], int)
        code, body = await get_json(client, f"{daemon.url}/api/cgihello?name=you")
        self.assertEqual((body["service"], body["hello"]), ("cgihello", "you"))
