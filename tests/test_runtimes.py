"""Runtime candidates (``runtimes:``), unavailable services and the C# demo.

A service lists runtimes tried in order; the first whose requirements are all
installed runs.  None installed: the service is *unavailable* — a state with a
reason in the status, the event log and the start-up log, a 503 on its route —
and the rest of the pool runs.  The C# demo runs through the real proxy when
Mono (or .NET) is installed, and is skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import io
import os
import shutil

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest

from cgipool.config import load
from cgipool_tools.check_config import check_config
from cgipool_tools.daemon import SETTLED
from cgipool_tools.smoke import SKIP, smoke_test
from cgipool_tools.status import format_status
from tests.support import (
    ROOT,
    get_json,
    http_client,
    require_binaries,
    start_daemon,
    write_config,
)
from tests.test_config import ConfigTestCase

MISSING = "cgipool-no-such-runtime"


class RuntimeConfigTests(ConfigTestCase):
    """Choosing a runtime, and the mistakes that are errors rather than 'unavailable'."""

    def manifest(self, runtimes: str, extra: str = "") -> str:
        root, pool, _ = self.project("base_dir: ..\nservices_dir: services\n", {
            "demo": "route: /api/demo\nruntimes:\n" + runtimes + extra,
        })
        self.root = root
        return pool

    def test_first_installed_runtime_wins(self) -> None:
        """Candidates are tried in order: the first whose requirements are all installed
        runs (command resolved on PATH, {port} kept), even when a later one would too."""
        pool = self.manifest(
            f'  - {{name: missing, requires: [{MISSING}], command: ["{MISSING}", "{{port}}"]}}\n'
            '  - {name: sh, requires: [sh], command: ["sh", "-c", "exec sleep 60", "{port}"]}\n'
            '  - {name: also, command: ["true"]}\n')
        svc = load(pool).service("demo")
        self.assertEqual((svc.runtime, svc.unavailable), ("sh", None))
        self.assertEqual(svc.command[0], shutil.which("sh"))
        self.assertEqual(svc.command[-1], "{port}")

    def test_required_file_relative_to_base_dir(self) -> None:
        """A required file is looked for under base_dir, so a runtime whose binary is not
        built yet is passed over until ``make all`` builds it."""
        pool = self.manifest(
            '  - {name: built, requires: [build/demo.exe], command: ["sh", "build/demo.exe"]}\n'
            '  - {name: fallback, command: ["sh"]}\n')
        self.assertEqual(load(pool).service("demo").runtime, "fallback")
        self.executable(os.path.join(self.root, "build", "demo.exe"))
        self.assertEqual(load(pool).service("demo").runtime, "built")

    def test_none_installed_is_unavailable_with_every_reason(self) -> None:
        pool = self.manifest(
            f'  - {{name: one, requires: [{MISSING}], command: ["sh"]}}\n'
            '  - {name: two, requires: [build/two.exe], command: ["sh"]}\n'
            f'  - {{name: three, command: ["{MISSING}-too", "{{port}}"]}}\n')
        svc = load(pool).service("demo")
        self.assertEqual((svc.runtime, svc.command), ("", ()))
        self.assertEqual(
            svc.unavailable,
            f"no runtime installed (one: '{MISSING}' not found on PATH; "
            "two: 'build/two.exe' does not exist (run 'make all'); "
            f"three: executable '{MISSING}-too' not found on PATH)")

    def test_without_executable_checks_the_first_candidate_is_taken(self) -> None:
        pool = self.manifest(f'  - {{name: one, requires: [{MISSING}], command: ["x", "{{port}}"]}}\n')
        svc = load(pool, check_executables=False).service("demo")
        self.assertEqual((svc.runtime, svc.unavailable), ("one", None))

    def test_command_and_runtimes_together(self) -> None:
        """Both ``command`` and ``runtimes`` is ambiguous: refused at load time naming the
        manifest's file, line and key, rather than one of them silently winning."""
        pool = self.manifest('  - {name: sh, command: ["sh"]}\n', 'command: ["sh"]\n')
        path = os.path.join(self.root, "services", "demo", "service.yaml")
        self.assertConfigError(pool, file=path, line=4, service="demo", key="command",
                               message="give either 'command' or 'runtimes', not both")

    def test_empty_runtimes(self) -> None:
        """``runtimes: []`` is a mistake in the manifest, reported with file, line and key,
        not a service quietly unavailable for want of candidates."""
        root, pool, paths = self.project("base_dir: ..\nservices_dir: services\n", {
            "demo": "route: /api/demo\nruntimes: []\n"})
        self.assertConfigError(pool, file=paths["demo"], line=2, service="demo",
                               key="runtimes", message="runtimes is empty")

    def test_candidate_mistakes_are_errors_even_when_not_chosen(self) -> None:
        path_of = lambda: os.path.join(self.root, "services", "demo", "service.yaml")  # noqa: E731
        pool = self.manifest('  - {name: sh, command: ["sh"]}\n'
                             '  - {name: bad, command: ["sh", "{nope}"]}\n')
        self.assertConfigError(pool, file=path_of(), line=4, service="demo",
                               key="runtimes.command", message="unknown placeholder {nope}")
        pool = self.manifest('  - {name: sh, command: ["sh"]}\n'
                             '  - {name: sh, command: ["true"]}\n')
        self.assertConfigError(pool, file=path_of(), line=4, service="demo",
                               key="runtimes.name", message="runtime 'sh' is listed twice")
        pool = self.manifest('  - {name: sh, command: ["sh"], when: always}\n')
        self.assertConfigError(pool, file=path_of(), line=3, service="demo",
                               key="runtimes.when", message="unknown key 'when'")
        pool = self.manifest('  - {name: sh}\n')
        self.assertConfigError(pool, file=path_of(), line=3, service="demo",
                               key="runtimes.command", message="is required")

    def test_the_shipped_csharp_manifest(self) -> None:
        """The shipped etc/pool.yaml loads on any machine: the C# service picks one of its
        runtimes or is unavailable with the reasons, never a load error."""
        svc = load(os.path.join(ROOT, "etc", "pool.yaml")).service("csharp")
        self.assertEqual(svc.route, "/api/csharp")
        self.assertEqual(svc.language, "csharp")
        if svc.unavailable is None:
            self.assertIn(svc.runtime, ("dotnet-script", "dotnet", "mono"))
        else:
            self.assertIn("no runtime installed (dotnet-script:", svc.unavailable)


UNAVAILABLE = f"""
services:
  search:
    command: ["build/search.cgi", "{{port}}"]
    route: /api/search
    workers: 1
    health: {{path: "/?q=health"}}
  ghost:
    route: /api/ghost
    workers: {{min: 2, max: 4}}
    runtimes:
      - {{name: imaginary, requires: [{MISSING}], command: ["{MISSING}", "{{port}}"]}}
    examples: ["/api/ghost?x=1"]
"""


class UnavailableServiceTests(ConfigTestCase):
    """A service without a runtime: the daemon runs, the service says why."""

    def setUp(self) -> None:
        require_binaries("search.cgi")

    def test_check_config_shows_why_instead_of_crashing(self) -> None:
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(check_config(write_config(self, UNAVAILABLE), out, err), 0,
                         err.getvalue())
        text = out.getvalue()
        self.assertIn("2 services", text)
        row = next(line for line in text.splitlines() if line.strip().startswith("ghost"))
        self.assertIn("unavailable: no runtime installed (imaginary:", row)
        self.assertIn("build/search.cgi {port}", text)

    async def test_the_rest_of_the_pool_runs_and_status_says_why(self) -> None:
        logged: list[dict] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        daemon = await start_daemon(self, write_config(self, UNAVAILABLE))
        client = http_client(self)

        code, body = await get_json(client, f"{daemon.url}/api/search?q=still")
        self.assertEqual((code, body["query"]), (200, "still"))

        code, status = await get_json(client, f"{daemon.admin_url}/admin/api/status")
        ghost = next(s for s in status["services"] if s["name"] == "ghost")
        self.assertEqual(ghost["state"], "unavailable")
        self.assertIn(f"imaginary: '{MISSING}' not found on PATH", ghost["reason"])
        self.assertEqual(ghost["workers"], [])
        self.assertIn("unavailable", SETTLED)  # wait-ready does not wait for it
        text = format_status(status)
        self.assertIn("ghost /api/ghost — unavailable, 0/0 workers ready\n"
                      "  reason: no runtime installed (imaginary:", text)

        code, body = await get_json(client, f"{daemon.url}/api/ghost?x=1")
        self.assertEqual(code, 503)
        self.assertEqual((body["service"], body["state"]), ("ghost", "unavailable"))

        events = [e for e in daemon.supervisor.events.recent(100) if e.kind == "unavailable"]
        self.assertEqual([e.service for e in events], ["ghost"])
        lines = [e for e in logged if e.get("log_namespace") == "cgipool.pool"
                 and e.get("service") == "ghost"]
        self.assertTrue(lines, "no start-up log line for the unavailable service")
        self.assertIn(MISSING, lines[0]["reason"])

        # The smoke test skips it instead of failing.
        from cgipool_tools.client import HttpClient, parse_url
        from twisted.internet import reactor
        smoke = HttpClient(reactor, parse_url(daemon.url), timeout=5)
        try:
            checks = await smoke_test(smoke, 5)
        finally:
            await smoke.close()
        ghost_checks = [c for c in checks if c.name == "ghost"]
        self.assertEqual([c.result for c in ghost_checks], [SKIP])
        self.assertIn("service unavailable: no runtime installed", ghost_checks[0].note)

    async def test_scaling_an_unavailable_service_is_refused(self) -> None:
        """A service with no runtime has nothing to spawn: scaling it raises instead of
        pretending to grow."""
        daemon = await start_daemon(self, write_config(self, UNAVAILABLE))
        pool = daemon.pool("ghost")
        self.assertRaises(ValueError, pool.scale_to, 3, "test")
        self.assertEqual(pool.workers, [])


def require_csharp() -> None:
    """Skip unless the shipped C# manifest found a runtime on this machine."""
    svc = load(os.path.join(ROOT, "etc", "pool.yaml")).service("csharp")
    if svc.unavailable is not None:
        raise SkipTest(f"no C# runtime here ({svc.unavailable}); "
                       "apt-get install mono-mcs, then make all")


class CsharpServiceTests(ConfigTestCase):
    """The C# demo through the real proxy (Mono, .NET or dotnet-script)."""

    def setUp(self) -> None:
        require_csharp()

    def services_dir(self) -> str:
        """A folder with just the shipped C# manifest (its paths resolve from ROOT)."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(folder, "csharp"))
        shutil.copy(os.path.join(ROOT, "services", "csharp", "service.yaml"),
                    os.path.join(folder, "csharp", "service.yaml"))
        return folder

    async def test_demo_answers_through_the_proxy(self) -> None:
        """With a C# runtime installed the demo is a real service: both workers answer
        JSON through the proxy, quoted data round-trips, unknown paths are 404, status ok."""
        daemon = await start_daemon(
            self, write_config(self, "services: {}\n", services_dir=self.services_dir()))
        client = http_client(self)
        pids = set()
        for _ in range(4):
            code, body = await get_json(client,
                                        f"{daemon.url}/api/csharp?service=demo&data=test")
            self.assertEqual(code, 200, body)
            self.assertEqual((body["service"], body["data"], body["language"]),
                             ("demo", "test", "csharp"))
            self.assertIn(body["runtime"], ("mono", "dotnet"))
            self.assertIn(body["port"], [w.port for w in daemon.pool("csharp").ready])
            pids.add(body["pid"])
        self.assertEqual(pids, set(daemon.ready_pids("csharp")))
        self.assertEqual(len(pids), 2)

        code, body = await get_json(client, f"{daemon.url}/api/csharp?data=%22quoted%22")
        self.assertEqual((code, body["service"], body["data"]), (200, None, '"quoted"'))
        code, body = await get_json(client, f"{daemon.url}/api/csharp/nothing-here")
        self.assertEqual(code, 404)
        self.assertIn("error", body)

        code, status = await get_json(client, f"{daemon.admin_url}/admin/api/status")
        csharp = status["services"][0]
        self.assertEqual((csharp["name"], csharp["state"], csharp["language"]),
                         ("csharp", "ok", "csharp"))
        self.assertEqual(json.loads(json.dumps(csharp["size"]))["ready"], 2)
