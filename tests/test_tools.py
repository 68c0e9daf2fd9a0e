"""The command-line tools: unit tests, and runs against real daemons.

In-process daemons come from :func:`tests.support.start_daemon`; the
``wait-ready``/``stop`` test runs a real ``twistd`` daemon and the ``cgipool``
commands as subprocesses, and checks that no process of it is left.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import socket
import sys
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import Clock
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from cgipool import cli
from cgipool_tools import daemon as daemon_mod
from cgipool_tools.check_config import check_config
from cgipool_tools.client import (
    HttpClient,
    NotRunning,
    Response,
    UsageError,
    clean,
    fetch_status,
    parse_url,
)
from cgipool_tools.daemon import (
    ProcInfo,
    default_logfile,
    descendants,
    stop,
    wait_ready,
)
from cgipool_tools.expect import BadExample, Expectation, json_mismatch, media_type
from cgipool_tools.smoke import FAIL, PASS, SKIP, check_response, format_report, smoke_test
from cgipool_tools.status import format_status, format_table, human_duration
from cgipool_tools.stress import (
    FALLBACK_PATH,
    Histogram,
    ServiceStats,
    StressResult,
    format_summary,
    group_for,
    plan_paths,
    stress_options,
    stress_test,
)
from tests.support import (
    ROOT,
    process_alive,
    require_binaries,
    search_service,
    start_daemon,
    wait_for,
    write_config,
)

VENV_BIN = os.path.join(ROOT, ".venv", "bin")

#: Two C services with examples (a 200 and a 400 each), fast health checks.
SERVICES = "\nservices:\n" + search_service(
    workers="{min: 2, max: 2}",
    examples='["/api/search?q=test", {path: "/api/search", status: 400}]') + """\
  calculator:
    command: ["build/calculator.cgi", "{port}"]
    route: /api/calc
    workers: {min: 2, max: 2}
    health: {path: "/?op=add&a=1&b=1", interval: 1, timeout: 1, fall: 2}
    examples:
      - /api/calc?op=add&a=10&b=5
      - {path: "/api/calc?op=divide&a=10&b=0", status: 400}
"""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sample_status(**service: Any) -> dict[str, Any]:
    svc = {
        "name": "search", "route": "/api/search", "state": "ok",
        "examples": [{"path": "/api/search?q=test", "status": 200},
                     {"path": "/api/search", "status": 400}],
        "size": {"min": 2, "max": 4, "desired": 2, "ready": 2},
        "workers": [
            {"id": 0, "pid": 101, "port": 9100, "state": "ready", "uptime": 75.5,
             "restarts": 1, "requests": 12, "in_flight": 0,
             "last_exit": "killed by SIGKILL",
             "last_health": {"ok": True, "at": 1.0, "latency_ms": 1.234, "error": None}},
            {"id": 1, "pid": None, "port": 9101, "state": "backoff", "uptime": None,
             "restarts": 3, "requests": 0, "in_flight": 0, "last_exit": "exit code 1",
             "last_health": {"ok": False, "at": 1.0, "latency_ms": None,
                             "error": "connection refused"}},
        ],
    }
    svc.update(service)
    return {"uptime": 3725.0, "workers": {"ready": 1, "total": 2}, "services": [svc]}


# -- pure functions ------------------------------------------------------------------


class HistogramTests(TestCase):
    def assertClose(self, value: float | None, expected: float, relative: float) -> None:
        assert value is not None
        if abs(value - expected) > relative * abs(expected):
            self.fail(f"{value!r} is not within {relative:.1%} of {expected!r}")

    def test_empty(self) -> None:
        """An empty histogram has no percentile and no mean (None, not 0): a summary of no
        requests must not print a made-up latency."""
        h = Histogram()
        self.assertIsNone(h.percentile(50))
        self.assertIsNone(h.mean)

    def test_single_value_is_exact(self) -> None:
        """One sample is every percentile exactly, not its bucket's bound: a run of one
        request reports the latency it measured."""
        h = Histogram()
        h.add(0.0123)
        for p in (0, 50, 99, 100):
            self.assertEqual(h.percentile(p), 0.0123)

    def test_uniform_percentiles_within_one_percent(self) -> None:
        """The bucketed histogram's error bound: over 10,000 evenly spread values from 0.1
        ms to 1 s each percentile is within 1.1 % of the truth, and max, min and mean are
        exact."""
        h = Histogram()
        for i in range(1, 10001):
            h.add(i / 10000)  # 0.1 ms .. 1 s
        for p, expected in ((50, 0.5), (90, 0.9), (95, 0.95), (99, 0.99)):
            self.assertClose(h.percentile(p), expected, 0.011)
        self.assertEqual(h.percentile(100), 1.0)
        self.assertEqual(h.max, 1.0)
        self.assertEqual(h.min, 0.0001)
        self.assertClose(h.mean, 0.50005, 1e-9)

    def test_skewed_distribution(self) -> None:
        """A 1 % tail of slow requests shows at p99.5 without dragging p50 and p99 of the
        fast 99 % off their value: the tail is neither hidden nor smeared."""
        h = Histogram()
        for _ in range(990):
            h.add(0.001)
        for _ in range(10):
            h.add(0.5)
        self.assertClose(h.percentile(50), 0.001, 0.011)
        self.assertClose(h.percentile(99), 0.001, 0.011)
        self.assertClose(h.percentile(99.5), 0.5, 0.011)

    def test_memory_is_bounded_and_extremes_clamp(self) -> None:
        h = Histogram()
        size = len(h.counts)
        for i in range(100000):
            h.add((i % 1000) * 1e-4)
        h.add(0.0)
        h.add(1e-9)
        h.add(5000.0)  # beyond the last bucket
        self.assertEqual(len(h.counts), size)
        self.assertLess(size, 2000)
        self.assertEqual(h.count, 100003)
        self.assertEqual(h.percentile(0), 0.0)
        self.assertEqual(h.percentile(100), 5000.0)

    def test_merge(self) -> None:
        """Merging per-connection histograms gives the histogram of all their values (count,
        percentiles, min), which the run's summary is built from."""
        a, b = Histogram(), Histogram()
        for i in range(100):
            a.add(0.001 * (i + 1))
            b.add(0.1 + 0.001 * i)
        a.merge(b)
        self.assertEqual(a.count, 200)
        self.assertClose(a.percentile(50), 0.1, 0.011)
        self.assertEqual(a.min, 0.001)

    def test_bad_percentile(self) -> None:
        """A percentile above 100 is the caller's mistake: ValueError, not a silently
        clamped answer."""
        self.assertRaises(ValueError, Histogram().percentile, 101)


class FormatTests(TestCase):
    def test_human_duration(self) -> None:
        """Durations read as a person says them (0.4s, 1m15s, 1h02m, 2d02h), and None or NaN
        as '-' rather than a crash or 'nan'."""
        self.assertEqual(human_duration(None), "-")
        self.assertEqual(human_duration(float("nan")), "-")
        self.assertEqual(human_duration(0.42), "0.4s")
        self.assertEqual(human_duration(75.5), "1m15s")
        self.assertEqual(human_duration(3725), "1h02m")
        self.assertEqual(human_duration(2 * 86400 + 7200), "2d02h")

    def test_clean(self) -> None:
        """Text from the daemon is made safe for a terminal: control characters and bidi
        overrides are escaped, long text is cut with '…', None shows as '-'."""
        self.assertEqual(clean("a\x1b[2Jb\nc\td"), "a\\x1b[2Jb\\x0ac\\x09d")
        self.assertEqual(clean("\u202eevil"), "\\u202eevil")
        self.assertEqual(clean("x" * 50, 10), "x" * 9 + "…")
        self.assertEqual(clean(None), "-")

    def test_status_table(self) -> None:
        """`cgipool status` prints a header line, a line per service and a row per worker
        (health, last exit), with every column aligned across rows."""
        text = format_status(sample_status(), "http://127.0.0.1:8080")
        lines = text.splitlines()
        self.assertEqual(lines[0], "cgipool at http://127.0.0.1:8080: up 1h02m, "
                                   "1/2 workers ready, 1 service")
        self.assertEqual(lines[2], "search /api/search — ok, 2/2 workers ready")
        header = lines[3].split()
        self.assertEqual(header, ["ID", "PID", "PORT", "STATE", "UPTIME", "RESTARTS",
                                  "REQUESTS", "IN_FLIGHT", "HEALTH", "LAST_EXIT"])
        self.assertEqual(lines[4].split(), ["0", "101", "9100", "ready", "1m15s", "1", "12",
                                            "0", "ok", "1.2", "ms", "killed", "by",
                                            "SIGKILL"])
        self.assertEqual(lines[5].split()[:6], ["1", "-", "9101", "backoff", "-", "3"])
        self.assertIn("FAIL connection refused", lines[5])
        # Columns line up: every row starts its HEALTH cell at the same column.
        column = lines[3].index("HEALTH")
        self.assertEqual(lines[4][column:column + 2], "ok")
        self.assertEqual(lines[5][column:column + 4], "FAIL")

    def test_hostile_service_name(self) -> None:
        """A service name, route or exit reason carrying escape sequences, CR/LF or bidi
        controls can neither drive the terminal nor forge a line, in the status table or
        the smoke report."""
        hostile = "evil\x1b[2J\x1b]0;pwned\x07\r\nFAKE LINE\u202e" + "x" * 200
        status = sample_status(name=hostile, route="/api/\x1b[31mred", state="ok\nok")
        status["services"][0]["workers"][0]["last_exit"] = "exit\x1b[H\r\nboom"
        text = format_status(status)
        self.assertNotIn("\x1b", text)
        self.assertNotIn("\r", text)
        self.assertNotIn("\x07", text)
        self.assertNotIn("\u202e", text)
        self.assertEqual(len(text.splitlines()), 6)  # no line of its own
        header = text.splitlines()[2]
        self.assertTrue(header.startswith("evil\\x1b[2J"))
        self.assertIn("…", header)
        self.assertLess(len(header), 200)
        # The same for the smoke-test and check lines.
        check = check_response(hostile, "/x", 200, Response(500, b"", [], b"\x1b[2J", 0.001))
        self.assertNotIn("\x1b", format_report([check]))

    def test_table_widths(self) -> None:
        """A cell wider than its column is cut with '…' and None shows as '-': one long
        value cannot break the table's alignment."""
        lines = format_table(("A", "B"), [["xx", "y"], ["z" * 100, None]], width=10)
        self.assertEqual(lines, ["A           B", "xx          y",
                                 "zzzzzzzzz…  -"])

    def test_summary(self) -> None:
        """The stress summary gives count, time, connections, throughput, latency
        percentiles, statuses, errors with an example, how requests spread over pids, and
        a FAIL line when any request failed."""
        result = StressResult("http://127.0.0.1:8080", 10, requests=1000, failed=3,
                              elapsed=2.0, statuses={200: 998, 503: 2},
                              errors={"HTTP 503": 2, "timeout": 1},
                              error_examples={"HTTP 503": "no ready worker"},
                              pids={"search": {11: 600, 12: 398}},
                              routes={"search": "/api/search"})
        for i in range(998):
            result.latency.add(0.001 + i * 1e-6)
        text = format_summary(result)
        self.assertIn("1000 requests in 2.00 s over 10 connections", text)
        self.assertIn("throughput  500 req/s", text)
        self.assertIn("p50 1.51  p95 1.95  p99 1.99  max 2.00", text)
        self.assertIn("200: 998  503: 2", text)
        self.assertIn("HTTP 503: 2  (e.g. no ready worker)", text)
        self.assertIn("search /api/search: 998 over 2 pids", text)
        self.assertIn("11: 600 (60%)", text)
        self.assertTrue(text.endswith("FAIL: 3 of 1000 requests failed\n"))

    def test_summary_per_service(self) -> None:
        """A row per service (requests, failed, req/s, p50/p95/p99) and the total; errors
        under the service that had them; a note says when the load is not the default."""
        search, git = ServiceStats("/api/search"), ServiceStats("/git")
        search.requests, git.requests, git.failed = 600, 400, 2
        git.errors, git.error_examples = {"HTTP 503": 2}, {"HTTP 503": "queue full"}
        result = StressResult("http://127.0.0.1:8080", 4, requests=1000, failed=2,
                              elapsed=2.0, statuses={200: 998, 503: 2},
                              errors={"HTTP 503": 2}, services={"search": search, "git": git},
                              routes={"search": "/api/search", "git": "/git"},
                              note="the pool has no worker route to load: its CGI routes "
                                   "instead")
        for i in range(600):
            search.latency.add(0.001)
            result.latency.add(0.001)
        for i in range(400):
            git.latency.add(0.1)
            result.latency.add(0.1)
        lines = format_summary(result).splitlines()
        self.assertEqual(lines[1], "  (the pool has no worker route to load: its CGI "
                                   "routes instead)")
        self.assertEqual(lines[2:6], [
            "  service  route        requests  failed     req/s    p50 ms    p95 ms    p99 ms",
            "  search   /api/search       600       0       300      1.00      1.00      1.00",
            "  git      /git              400       2       200    100.00    100.00    100.00",
            "  total                     1000       2       500      1.00    100.00    100.00",
        ])
        self.assertIn("  slowest     100.00 ms", lines)
        self.assertIn("    git: HTTP 503: 2  (e.g. queue full)", lines)
        self.assertEqual(lines[-1], "FAIL: 2 of 1000 requests failed")

    def test_summary_of_a_cgi_service_does_not_list_hundreds_of_pids(self) -> None:
        result = StressResult("http://127.0.0.1:8080", 4, requests=400, elapsed=1.0,
                              statuses={200: 400}, pids={"cgi": dict.fromkeys(range(400), 1)},
                              routes={"cgi": "/api/cgi"})
        text = format_summary(result)
        self.assertIn("    cgi /api/cgi: 400 over 400 pids (a process per request: CGI)\n",
                      text)
        self.assertLess(len(text.splitlines()), 10)
        # A worker service with many pids lists the busiest ones.
        result.pids = {"w": {pid: 2 + pid % 3 for pid in range(40)}}
        self.assertIn("… and 28 more pids with ", format_summary(result))


class OptionTests(TestCase):
    def test_non_loopback_refused(self) -> None:
        """The stress test loads loopback addresses only: a mistyped or hostile --url cannot
        turn it against another host."""
        for url in ("http://10.0.0.1:8080", "http://example.com:8080",
                    "http://192.168.1.5", "http://[2001:db8::1]:80"):
            with self.assertRaises(UsageError) as e:
                stress_options(url)
            self.assertIn("loopback", str(e.exception))

    def test_loopback_accepted(self) -> None:
        """localhost, any 127/8 address and [::1] count as loopback; localhost is resolved
        to 127.0.0.1 and an IPv6 authority is bracketed."""
        self.assertEqual(stress_options("http://localhost:8080").target.host, "127.0.0.1")
        self.assertEqual(stress_options("http://127.0.0.2:81").target.port, 81)
        target = stress_options("http://[::1]:8080").target
        self.assertEqual((target.host, target.authority), ("::1", "[::1]:8080"))

    def test_defaults(self) -> None:
        """Without options a run is 1000 requests over 10 connections; a duration replaces
        the request count instead of adding to it."""
        options = stress_options("http://127.0.0.1:8080")
        self.assertEqual((options.concurrency, options.total, options.duration),
                         (10, 1000, None))
        options = stress_options("http://127.0.0.1:8080", duration=5)
        self.assertEqual((options.total, options.duration), (None, 5))

    def test_bad_values(self) -> None:
        """Out-of-range or ill-typed options (0 or 1001 connections, a boolean, a NaN or
        infinite duration, a path without '/' or with a header injection, a non-HTTP
        status) are a UsageError before any load is sent."""
        url = "http://127.0.0.1:8080"
        for kwargs in ({"concurrency": 0}, {"concurrency": 1001}, {"concurrency": True},
                       {"total": 0}, {"total": -5}, {"duration": 0},
                       {"duration": float("nan")}, {"duration": float("inf")},
                       {"timeout": 0}, {"timeout": -1}, {"paths": ["api/search"]},
                       {"paths": ["/a b"]}, {"paths": ["/a\r\nX: y"]},
                       {"expect_status": 42}):
            self.assertRaises(UsageError, stress_options, url, **kwargs)

    def test_bad_urls(self) -> None:
        """Only http://HOST[:PORT][/prefix] is a target: https, a missing scheme or host, a
        bad port, a query or credentials are refused."""
        for url in ("https://127.0.0.1:8080", "127.0.0.1:8080", "http://", "http://:80",
                    "http://127.0.0.1:99999", "http://127.0.0.1:8080/?x=1",
                    "http://u:p@127.0.0.1"):
            self.assertRaises(UsageError, parse_url, url)

    def test_url_prefix_and_request_bytes(self) -> None:
        """A URL's path prefix goes before every request path, and the bytes sent are
        exactly these (Host, User-Agent, Accept); admin API paths ask for JSON."""
        target = parse_url("http://127.0.0.1:8080/base/")
        self.assertEqual(target.request("/api/x?q=1"),
                         b"GET /base/api/x?q=1 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
                         b"User-Agent: cgipool-tools\r\nAccept: */*\r\n\r\n")
        self.assertIn(b"\r\nAccept: application/json\r\n", target.request("/admin/api/status"))

    def test_admin_token_from_the_environment_goes_to_admin_paths_only(self) -> None:
        self.patch(os, "environ", {**os.environ, "CGIPOOL_ADMIN_TOKEN": "s3cret-token-0123"})
        target = parse_url("http://127.0.0.1:8080")
        self.assertNotIn("s3cret", repr(target))
        for path in ("/admin/api/status", "/admin", "/metrics", "/metrics?x=1"):
            self.assertIn(b"Authorization: Bearer s3cret-token-0123\r\n",
                          target.request(path), path)
        for path in ("/api/search?q=1", "/administrator", "/metricsx", "/api/admin"):
            self.assertNotIn(b"Authorization", target.request(path), path)
        self.patch(os, "environ", {**os.environ, "CGIPOOL_ADMIN_TOKEN": "bad token\r\nX: 1"})
        error = self.assertRaises(UsageError, parse_url, "http://127.0.0.1:8080")
        self.assertIn("$CGIPOOL_ADMIN_TOKEN", str(error))

    def run_cli(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        self.patch(sys, "stdout", out)
        self.patch(sys, "stderr", err)
        return cli.main(list(argv)), out.getvalue(), err.getvalue()

    def test_cli_usage_errors(self) -> None:
        """Every bad command line exits 2 with a message naming the problem, never a
        traceback or a run with a wrong value."""
        for argv, message in (
            (["stress-test", "-c", "abc"], "expected an integer"),
            (["stress-test", "-c", "1001"], "must be from 1 to 1000"),
            (["stress-test", "-t", "0"], "must be at least 1"),
            (["stress-test", "-d", "-5"], "positive number of seconds"),
            (["stress-test", "--timeout", "nan"], "positive number of seconds"),
            (["stress-test", "--url", "http://10.1.2.3:8080"], "loopback"),
            (["stress-test", "--path", "nope"], "must start with '/'"),
            (["stress-test", "--path", "/x", "--all"], "one of --path, --service and --all"),
            (["stress-test", "--service", "git", "--all"], "one of --path, --service"),
            (["status", "--url", "ftp://x"], "expected http://HOST:PORT"),
            (["wait-ready", "--timeout", "0"], "positive number of seconds"),
            (["no-such-command"], "invalid choice"),
            ([], "required"),
        ):
            code, out, err = self.run_cli(*argv)
            self.assertEqual(code, 2, argv)
            self.assertIn(message, err, argv)

    def test_cli_help(self) -> None:
        """`stress-test --help` exits 0 and documents --concurrency, --service and --all."""
        code, out, _ = self.run_cli("stress-test", "--help")
        self.assertEqual(code, 0)
        self.assertIn("--concurrency", out)
        self.assertIn("--service NAME", out)
        self.assertIn("--all", out)


def mixed_status() -> dict[str, Any]:
    """A worker service, a CGI one and git's http-backend (CGI, no JSON)."""
    status = sample_status()
    status["services"][0]["protocol"] = "http"
    status["services"] += [
        {"name": "cgi-shell", "route": "/api/cgi-shell", "state": "ok", "protocol": "cgi",
         "examples": [{"path": "/api/cgi-shell?name=cgi", "status": 200}]},
        {"name": "git", "route": "/git", "state": "ok", "protocol": "cgi",
         "examples": [{"path": "/git/r.git/info/refs?service=git-upload-pack",
                       "status": 200, "content_type": "application/x-git-upload-pack-"
                                                      "advertisement",
                       "contains": ["refs/heads/main"], "json": None}]},
    ]
    return status


class PlanTests(TestCase):
    def test_default_load_is_the_worker_routes_cgi_only_when_asked(self) -> None:
        url = "http://127.0.0.1:8080"
        plan = plan_paths(stress_options(url), mixed_status())
        self.assertEqual([(s.path, s.group) for s in plan.specs],
                         [("/api/search?q=test", "search")])
        self.assertIsNone(plan.note)
        plan = plan_paths(stress_options(url, all_services=True), mixed_status())
        self.assertEqual([s.group for s in plan.specs], ["search", "cgi-shell", "git"])
        plan = plan_paths(stress_options(url, services=["git"]), mixed_status())
        self.assertEqual([s.group for s in plan.specs], ["git"])
        # Each example is judged as it says; --path by --expect-status alone.
        git = plan.specs[0].expect
        self.assertEqual((git.status, git.content_type, git.contains),
                         (200, "application/x-git-upload-pack-advertisement",
                          (b"refs/heads/main",)))
        plan = plan_paths(stress_options(url, paths=["/git/r.git/HEAD"],
                                         expect_status=404), mixed_status())
        self.assertEqual((plan.specs[0].group, plan.specs[0].expect), ("git", Expectation(404)))

    def test_a_pool_without_worker_routes_loads_its_cgi_routes_and_says_so(self) -> None:
        status = mixed_status()
        del status["services"][0]
        plan = plan_paths(stress_options("http://127.0.0.1:8080"), status)
        self.assertEqual([s.group for s in plan.specs], ["cgi-shell", "git"])
        self.assertEqual(plan.note,
                         "the pool has no worker route to load: its CGI routes instead")

    def test_unknown_or_idle_service_named(self) -> None:
        """--service naming a service that is not there, or one with nothing to load
        (stopped), is a usage error saying what there is, not an empty run."""
        url = "http://127.0.0.1:8080"
        with self.assertRaises(UsageError) as e:
            plan_paths(stress_options(url, services=["gti"]), mixed_status())
        self.assertIn("no service 'gti' in the pool (services: cgi-shell, git, search)",
                      str(e.exception))
        status = mixed_status()
        status["services"][2]["state"] = "stopped"
        with self.assertRaises(UsageError) as e:
            plan_paths(stress_options(url, services=["git"]), status)
        self.assertIn("no example with status 200 of a running service among git",
                      str(e.exception))

    def test_default_paths_are_200_examples_of_available_services(self) -> None:
        status = sample_status()
        status["services"].append({"name": "py", "route": "/api/py", "state": "unavailable",
                                   "examples": [{"path": "/api/py?x=1", "status": 200}]})
        status["services"].append({"name": "calc", "route": "/api/calc", "state": "degraded",
                                   "examples": [{"path": "/api/calc?a=1", "status": 200},
                                                {"path": "/api/calc/sub", "status": 200}]})
        plan = plan_paths(stress_options("http://127.0.0.1:8080"), status)
        specs, routes = plan.specs, plan.routes
        self.assertEqual([(s.path, s.group) for s in specs],
                         [("/api/search?q=test", "search"), ("/api/calc?a=1", "calc"),
                          ("/api/calc/sub", "calc")])
        self.assertEqual(routes["py"], "/api/py")

    def test_fallback_and_explicit_paths(self) -> None:
        """Without a status document the plan falls back to FALLBACK_PATH; --path entries
        are used as given, each counted under the service whose route owns it, else under
        itself."""
        specs = plan_paths(stress_options("http://127.0.0.1:8080"), None).specs
        self.assertEqual([s.path for s in specs], [FALLBACK_PATH])
        options = stress_options("http://127.0.0.1:8080", paths=["/api/search?q=1", "/other"])
        specs = plan_paths(options, sample_status()).specs
        self.assertEqual([(s.path, s.group) for s in specs],
                         [("/api/search?q=1", "search"), ("/other", "/other")])

    def test_group_for_longest_prefix(self) -> None:
        """A path belongs to the service with the longest matching route, at a segment
        boundary (/api/bx is not /api/b's); a path no route owns is a group of its own."""
        routes = {"a": "/api", "b": "/api/b"}
        self.assertEqual(group_for("/api/b/x?q=1", routes), "b")
        self.assertEqual(group_for("/api/bx", routes), "a")
        self.assertEqual(group_for("/apix", routes), "/apix")


class SmokeUnitTests(TestCase):
    def test_check_response(self) -> None:
        """A check passes on the expected status and reports latency, pid and content type;
        a wrong status shows the body; the right status with a wrong content type says
        so, not 'expected 200, got 200'."""
        def r(status: int, body: bytes) -> Response:
            return Response(status, b"", [], body, 0.0015)

        ok = check_response("s", "/p", 200, r(200, b'{"pid": 7}'))
        self.assertEqual((ok.result, ok.line(1)), (PASS, "PASS  s GET /p -> 200 (1.5 ms, pid 7)"))
        self.assertEqual(check_response("s", "/p", 400, r(400, b'{"error": "x"}')).result, PASS)
        wrong = check_response("s", "/p", 200, r(503, b'{"error": "no ready worker"}'))
        self.assertEqual(wrong.line(1), 'FAIL  s GET /p -> expected 200, got 503: '
                                        '{"error": "no ready worker"}')
        # An example that asks only for a status accepts any body.
        html = Response(200, b"", [(b"Content-Type", b"text/html; charset=utf-8")],
                        b"<html>", 0.002)
        self.assertEqual(check_response("s", "/p", 200, html).line(1),
                         "PASS  s GET /p -> 200 (2.0 ms, text/html)")
        self.assertEqual(check_response("s", "/p", 200, r(200, b"[1]")).result, PASS)
        self.assertEqual(check_response("s", "/p", 200, r(200, b'{"a": 1}')).line(1),
                         "PASS  s GET /p -> 200 (1.5 ms, no content type)")
        # The status right, the rest wrong: said so, not "expected 200, got 200".
        wants_json = Expectation(200, content_type="application/json")
        wrong_type = check_response("s", "/p", wants_json, html)
        self.assertEqual(wrong_type.line(1), "FAIL  s GET /p -> 200, but content type "
                                             "text/html, expected application/json")

    async def test_unavailable_service_is_skipped(self) -> None:
        """A service the daemon reports unavailable (its runtime missing) is a SKIP with its
        reason and is never requested: the smoke test passes on a machine without that
        runtime."""
        status = sample_status()
        status["services"].append({"name": "python", "route": "/api/python",
                                   "state": "unavailable", "reason": "python3 not found",
                                   "examples": [{"path": "/api/python?x=1", "status": 200}]})
        answers = {
            "/admin/api/status": Response(200, b"", [], json.dumps(status).encode(), 0.001),
            "/api/search?q=test": Response(200, b"", [], b'{"pid": 5}', 0.001),
            "/api/search": Response(400, b"", [], b'{"error": "missing q"}', 0.001),
        }
        requested = []

        class FakeClient:
            target = parse_url("http://127.0.0.1:1")

            def get(self, path: str, timeout: float | None = None) -> Any:
                requested.append(path)
                return defer.succeed(answers.get(
                    path, Response(404, b"", [], b'{"error": "no route"}', 0.001)))

        checks = await smoke_test(FakeClient())
        self.assertEqual([c.result for c in checks], [PASS, PASS, PASS, SKIP, PASS])
        self.assertNotIn("/api/python?x=1", requested)
        self.assertIn("python3 not found", checks[3].line())
        report = format_report(checks)
        self.assertIn("\nby service:\n  search   2 passed\n  python   1 skipped\n\n", report)
        self.assertIn("1 skipped", report)


def canned(status: int = 200, body: bytes = b"", content_type: bytes | None = None
           ) -> Response:
    """A response as the client parses it, with an optional Content-Type."""
    headers = [(b"Content-Type", content_type)] if content_type is not None else []
    return Response(status, b"OK", headers, body, 0.001)


class ExpectationTests(TestCase):
    """Judging canned answers as an example of the status document says."""

    def judge(self, example: dict[str, Any], response: Response) -> Any:
        return Expectation.from_example(example).judge(
            response.status, response.header(b"content-type"), response.body)

    def test_status_only_accepts_any_body(self) -> None:
        """An example naming only a status passes on it whatever the body (git's binary
        answers, HTML, nothing); a wrong status fails showing the body; no status means
        200."""
        example = {"path": "/git/x", "status": 200}
        for body, ctype in ((b"001e# service=git-upload-pack\n0000",
                             b"application/x-git-upload-pack-advertisement"),
                            (b"<!doctype html><p>hi", b"text/html"), (b"", None),
                            (b"\x00\xff binary", b"application/octet-stream")):
            self.assertIsNone(self.judge(example, canned(200, body, ctype)), body)
        failure = self.judge(example, canned(503, b'{"error": "no ready worker"}'))
        self.assertEqual(failure.kind, "HTTP 503")
        self.assertIn("expected 200, got 503: {\"error\": \"no ready worker\"}",
                      failure.detail)
        self.assertIsNone(self.judge({"path": "/x"}, canned(200)))  # status 200 by default

    def test_content_type(self) -> None:
        """content_type is matched on the media type alone (case and parameters ignored,
        type/* for any subtype); a missing header fails, and the status is judged first."""
        example = {"path": "/x", "content_type": "application/x-git-upload-pack-advertisement"}
        self.assertIsNone(self.judge(example, canned(
            200, b"", b"application/x-git-upload-pack-advertisement")))
        # Parameters and case do not matter; the media type does.
        html = {"path": "/x", "content_type": "text/html"}
        self.assertIsNone(self.judge(html, canned(200, b"", b"Text/HTML; charset=UTF-8")))
        failure = self.judge(html, canned(200, b"{}", b"application/json"))
        self.assertEqual((failure.kind, failure.detail),
                         ("content type", "content type application/json, expected text/html"))
        self.assertEqual(self.judge(html, canned(200, b"<p>")).detail,
                         "content type none, expected text/html")
        # type/* matches any subtype of that type only.
        text = {"path": "/x", "content_type": "text/*"}
        self.assertIsNone(self.judge(text, canned(200, b"", b"text/plain")))
        self.assertIsNotNone(self.judge(text, canned(200, b"", b"texts/plain")))
        self.assertIsNotNone(self.judge(text, canned(200, b"", b"application/json")))
        # The status is judged first.
        self.assertEqual(self.judge(html, canned(404, b"", b"text/html")).kind, "HTTP 404")

    def test_contains(self) -> None:
        """contains needs every listed text in the body, case-sensitive and as UTF-8, and
        names the first one missing."""
        example = {"path": "/x", "contains": ["# service=git-upload-pack", "refs/heads/main"]}
        good = b"001e# service=git-upload-pack\n0000003f1234 refs/heads/main\n"
        self.assertIsNone(self.judge(example, canned(200, good)))
        failure = self.judge(example, canned(200, b"001e# service=git-upload-pack\n0000"))
        self.assertEqual(failure.kind, "body")
        self.assertIn("does not contain 'refs/heads/main'", failure.detail)
        # One text, case-sensitive, UTF-8.
        self.assertIsNone(self.judge({"path": "/x", "contains": "Grüße"},
                                     canned(200, "<p>Grüße</p>".encode())))
        self.assertIsNotNone(self.judge({"path": "/x", "contains": "grüße"},
                                        canned(200, "<p>Grüße</p>".encode())))

    def test_json_subset(self) -> None:
        """json is a subset match (extra keys allowed, lists item by item, 1 equals 1.0 but
        not true), and a mismatch names its path in the body."""
        body = json.dumps({"query": "test", "results": [{"id": 1, "title": "Test Result"}],
                           "pid": 5728, "port": 9106, "ok": True, "ratio": 1.0}).encode()
        good = [{"query": "test"}, {}, {"results": [{"id": 1}]}, {"ok": True},
                {"ratio": 1}, {"results": [{"id": 1, "title": "Test Result"}], "query": "test"}]
        for expected in good:
            self.assertIsNone(self.judge({"path": "/x", "json": expected}, canned(200, body)),
                              expected)
        bad = [({"query": "other"}, 'query: expected "other", got "test"'),
               ({"missing": 1}, "missing: missing"),
               ({"results": [{"id": 2}]}, "results[0].id: expected 2, got 1"),
               ({"results": []}, "results: expected 0 items, got 1"),
               ({"results": {"id": 1}}, "results: expected an object, got a list"),
               ({"ok": 1}, "ok: expected 1, got true"),
               ({"pid": True}, "pid: expected true, got 5728"),
               ({"query": None}, 'query: expected null, got "test"'),
               (["test"], "the body: expected a list, got an object")]
        for expected, problem in bad:
            failure = self.judge({"path": "/x", "json": expected}, canned(200, body))
            self.assertEqual((failure.kind, failure.detail), ("json", f"json {problem}"))
        failure = self.judge({"path": "/x", "json": {}}, canned(200, b"<html>"))
        self.assertEqual(failure.detail, "the body is not JSON: <html>")
        # Scalars and lists at the top.
        self.assertIsNone(json_mismatch([1, "a"], [1, "a"]))
        self.assertIsNone(json_mismatch(3, 3.0))
        self.assertEqual(json_mismatch("a", "b"), 'the body: expected "a", got "b"')

    def test_every_key_together_and_the_first_problem_wins(self) -> None:
        example = {"path": "/x", "status": 201, "content_type": "application/json",
                   "contains": ["created"], "json": {"state": "created"}}
        ok = canned(201, b'{"state": "created", "pid": 1}', b"application/json")
        self.assertIsNone(self.judge(example, ok))
        self.assertEqual(self.judge(example, canned(201, b'{"state": "created"}',
                                                    b"text/plain")).kind, "content type")
        self.assertEqual(self.judge(example, canned(201, b'{"state": "done"}',
                                                    b"application/json")).kind, "body")
        self.assertEqual(Expectation.from_example(example).describe(),
                         "1 text found, json matched")

    def test_unusable_examples_in_the_status_document(self) -> None:
        for example, message in (({"path": "/x", "status": "200"}, "not an HTTP status"),
                                 ({"path": "/x", "status": True}, "not an HTTP status"),
                                 ({"path": "/x", "status": 99}, "not an HTTP status"),
                                 ({"path": "/x", "content_type": 5}, "not a media type"),
                                 ({"path": "/x", "contains": [1]}, "not a list of texts"),
                                 ({"path": "/x", "contains": [""]}, "not a list of texts"),
                                 ("/x", "expected an object")):
            with self.assertRaises(BadExample) as e:
                Expectation.from_example(example)
            self.assertIn(message, str(e.exception))
        # The keys of a status document from before they existed: status only.
        self.assertEqual(Expectation.from_example({"path": "/x", "status": 400}),
                         Expectation(400))
        self.assertEqual(media_type(b" Application/JSON ;charset=utf-8"), "application/json")
        self.assertIsNone(media_type(b""))


class ProcTests(TestCase):
    def test_descendants(self) -> None:
        """descendants is the whole subtree below a pid (children and theirs) and nothing
        else: what `stop` signals."""
        def p(pid: int, ppid: int) -> ProcInfo:
            return ProcInfo(pid, ppid, pid, "S", 0, f"p{pid}")

        procs = [p(1, 0), p(10, 1), p(11, 10), p(12, 10), p(13, 11), p(20, 1)]
        self.assertEqual([x.pid for x in descendants(10, procs)], [11, 12, 13])
        self.assertEqual(descendants(13, procs), [])

    def test_default_logfile(self) -> None:
        """The log is next to the pidfile, named after it with .log, or cgipool.log when the
        pidfile has no .pid suffix."""
        self.assertEqual(default_logfile("run/cgipool.pid"), "run/cgipool.log")
        self.assertEqual(default_logfile("/x/y.pid"), "/x/y.log")
        self.assertEqual(default_logfile("/x/pidfile"), "/x/cgipool.log")

    def test_stop_without_daemon(self) -> None:
        """`cgipool stop` without a daemon succeeds and says so; a stale pidfile is removed;
        a pid now used by another program is never signalled."""
        folder = self.mktemp()
        os.makedirs(folder)
        pidfile = os.path.join(folder, "cgipool.pid")
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(stop(pidfile, 1, out, err), 0)
        self.assertEqual(out.getvalue(), "cgipool is not running\n")
        # A stale pidfile (a pid that cannot exist) is removed.
        with open(pidfile, "w") as f:
            f.write("4194305")
        out = io.StringIO()
        self.assertEqual(stop(pidfile, 1, out, err), 0)
        self.assertIn("removed stale pidfile", out.getvalue())
        self.assertFalse(os.path.exists(pidfile))
        # A pid reused by an unrelated process is never signalled.
        with open(pidfile, "w") as f:
            f.write(str(os.getpid()))
        self.patch(daemon_mod, "cmdline", lambda pid: "/usr/bin/sleep 1000")
        signals: list[tuple[int, int]] = []
        out = io.StringIO()
        code = stop(pidfile, 1, out, err, kill=lambda *a: signals.append(a),
                    killpg=lambda *a: signals.append(a))
        self.assertEqual((code, signals), (0, []))
        self.assertIn("is another program: /usr/bin/sleep 1000", out.getvalue())
        self.assertFalse(os.path.exists(pidfile))

    def test_check_config(self) -> None:
        """`check-config` exits 0 with a summary of a valid file, and 1 with a configuration
        error naming what is wrong (the missing command)."""
        require_binaries("search.cgi", "calculator.cgi")
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(check_config(write_config(self, SERVICES), out, err), 0)
        self.assertIn("2 services", out.getvalue())
        self.assertIn("build/search.cgi {port}", out.getvalue())
        bad = write_config(self, "services:\n  x:\n    route: /api/x\n")
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(check_config(bad, out, err), 1)
        self.assertIn("configuration error", err.getvalue())
        self.assertIn("command", err.getvalue())


# -- against an in-process daemon --------------------------------------------------------


class DaemonToolTests(TestCase):
    def setUp(self) -> None:
        require_binaries("search.cgi", "calculator.cgi")

    async def daemon(self) -> Any:
        return await start_daemon(self, write_config(self, SERVICES))

    async def test_stress_total(self) -> None:
        """--total 600 over 8 connections sends exactly 600 requests, all 200, spread over
        every ready worker of both services (300 each), and the summary's rows say so."""
        daemon = await self.daemon()
        options = stress_options(daemon.url, concurrency=8, total=600)
        result = await stress_test(reactor, options)
        self.assertEqual(result.requests, 600)
        self.assertEqual((result.failed, result.errors), (0, {}))
        self.assertEqual(result.statuses, {200: 600})
        self.assertEqual(result.latency.count, 600)
        self.assertEqual(sorted(result.pids), ["calculator", "search"])
        self.assertEqual(sum(result.pids["search"].values()), 300)
        for service in ("search", "calculator"):
            self.assertEqual(set(result.pids[service]), set(daemon.ready_pids(service)))
            self.assertEqual(len(result.pids[service]), 2)
        self.assertTrue(result.ok)
        self.assertEqual(sorted(result.services), ["calculator", "search"])
        for stats in result.services.values():
            self.assertEqual((stats.requests, stats.failed, stats.latency.count),
                             (300, 0, 300))
        summary = format_summary(result)
        self.assertRegex(summary, r"\n  search +/api/search +300 +0 ")
        self.assertRegex(summary, r"\n  total +600 +0 ")
        self.assertIn("PASS: no failed requests", summary)

    async def test_stress_duration_with_progress(self) -> None:
        """--duration stops sending when its timer fires and lets what is in flight finish,
        spread over both workers, without a failure; how many requests fit in it is the
        machine's speed, not asked for."""
        daemon = await self.daemon()
        options = stress_options(daemon.url, concurrency=4, duration=0.3,
                                 paths=["/api/search?q=stress"])
        progress = io.StringIO()
        result = await stress_test(reactor, options, progress=progress)
        # Each of the 4 connections finishes at least the request it had in flight
        # when the duration ran out; how many more fit in 0.3 s is the machine's
        # speed (`make bench` measures it), so it is not asked for.
        self.assertGreaterEqual(result.requests, 4)
        self.assertEqual(result.failed, 0)
        self.assertGreaterEqual(len(result.pids["search"]), 2)
        # Loops keep a request in flight until the 0.3 s timer stops them.
        self.assertGreaterEqual(result.elapsed, 0.29)

    async def test_stress_counts_timeouts_and_bad_status(self) -> None:
        """A request slower than --timeout counts as 'timeout' and an unexpected status as
        'HTTP 400', each a failure of the run; the daemon still answers a clean run
        afterwards."""
        daemon = await self.daemon()
        # Timeouts from a worker that takes 10 s (the longest delay_ms it takes),
        # against --timeout 2: the 400s must come within it, a bound a busy machine
        # still meets, not a 0.2 s race.
        options = stress_options(daemon.url, concurrency=2, total=4, timeout=2.0,
                                 paths=["/api/search?q=slow&delay_ms=10000", "/api/search"])
        result = await stress_test(reactor, options)
        self.assertEqual(result.requests, 4)
        self.assertEqual(result.failed, 4)
        self.assertEqual(result.errors, {"timeout": 2, "HTTP 400": 2})
        self.assertFalse(result.ok)
        # The daemon is still fine afterwards.
        result = await stress_test(reactor, stress_options(daemon.url, total=20))
        self.assertTrue(result.ok)

    async def test_stress_not_running(self) -> None:
        """Against a port where nothing listens the run raises NotRunning with 'connection
        refused' and the `make start-bg` hint, instead of reporting every request failed."""
        options = stress_options(f"http://127.0.0.1:{free_port()}", total=5)
        with self.assertRaises(NotRunning) as e:
            await stress_test(reactor, options)
        self.assertIn("connection refused", str(e.exception))
        self.assertIn("make start-bg", str(e.exception))

    async def test_smoke_test_passes(self) -> None:
        """Against a healthy daemon every example of the status document and the
        unknown-route 404 check pass: 6 checks, none failed."""
        daemon = await self.daemon()
        client = HttpClient(reactor, parse_url(daemon.url))
        try:
            checks = await smoke_test(client)
        finally:
            await client.close()
        report = format_report(checks)
        self.assertEqual([c.result for c in checks], [PASS] * 6, report)
        self.assertIn("GET /api/search?q=test -> 200 (", report)
        self.assertIn("GET /cgipool-smoke-test/no-such-route -> 404", report)
        self.assertIn("smoke-test: 6 passed, 0 failed, 0 skipped", report)

    async def test_smoke_test_of_the_shipped_services(self) -> None:
        """Every sample manifest's examples (content types, texts, JSON) hold, and the
        default stress load is the worker routes only: no CGI route in it."""
        daemon = await start_daemon(
            self, write_config(self, "services: {}\n", services_dir="services"))
        client = HttpClient(reactor, parse_url(daemon.url))
        try:
            checks = await smoke_test(client)
        finally:
            await client.close()
        report = format_report(checks)
        self.assertNotIn(FAIL, [c.result for c in checks], report)
        self.assertRegex(report, r"PASS  search +GET /api/search\?q=test -> 200 "
                                 r"\([0-9.]+ ms, pid \d+, application/json, json matched\)")
        self.assertRegex(report, r"PASS  cgi-python +GET /api/cgi-python/env -> 200 "
                                 r"\([0-9.]+ ms, pid \d+, 1 text found\)")
        result = await stress_test(reactor, stress_options(daemon.url, total=100))
        self.assertTrue(result.ok, format_summary(result))
        self.assertFalse({"cgi-shell", "cgi-python"} & set(result.services))
        self.assertIn("search", result.services)

    async def test_smoke_test_reports_failures(self) -> None:
        """With no search worker in rotation both search examples fail, showing the daemon's
        503 body: the report says what a user would get."""
        daemon = await self.daemon()
        # Take every search worker out of rotation: its examples now get 503.
        daemon.pool("search").ready.clear()
        client = HttpClient(reactor, parse_url(daemon.url))
        try:
            checks = await smoke_test(client)
        finally:
            await client.close()
        failed = [c for c in checks if c.result == FAIL]
        self.assertEqual(len(failed), 2, format_report(checks))
        self.assertIn("expected 200, got 503", failed[0].line())
        self.assertIn("no ready worker", failed[0].line())

    async def test_status_table_of_real_status(self) -> None:
        """The table made from a live daemon's status document shows every service and every
        ready worker's pid: format_status reads the real document, not only the sample."""
        daemon = await self.daemon()
        client = HttpClient(reactor, parse_url(daemon.url))
        try:
            status = await fetch_status(client)
        finally:
            await client.close()
        text = format_status(status, daemon.url)
        self.assertIn("4/4 workers ready, 2 services", text)
        self.assertIn("search /api/search — ok, 2/2 workers ready", text)
        for pid in daemon.ready_pids("search") + daemon.ready_pids("calculator"):
            self.assertIn(f" {pid} ", text)
        self.assertEqual(text.count(" ready "), 4)

    async def test_status_not_running(self) -> None:
        """`cgipool status` against a closed port exits 1 with one line: not running at that
        URL, and how to start it."""
        out, err = io.StringIO(), io.StringIO()
        from cgipool_tools.status import run_status

        url = f"http://127.0.0.1:{free_port()}"
        self.assertEqual(await run_status(reactor, url, False, out, err), 1)
        self.assertEqual(err.getvalue(), f"cgipool is not running at {url}: connection "
                                         f"refused — start it with `make start-bg`\n")

    async def test_status_of_a_daemon_with_an_admin_token(self) -> None:
        """Against a daemon that wants a token, `status` without one exits 1 with the 401
        and the hint to set $CGIPOOL_ADMIN_TOKEN; with it set it reads the status."""
        from cgipool_tools.status import run_status

        token = "tools-token-0123456789"
        config = SERVICES + f'admin: {{token: "{token}", local_networks: []}}\n'
        daemon = await start_daemon(self, write_config(self, config), wait=False)
        self.patch(os, "environ", {k: v for k, v in os.environ.items()
                                   if k != "CGIPOOL_ADMIN_TOKEN"})
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(await run_status(reactor, daemon.url, False, out, err), 1)
        self.assertIn("answered 401", err.getvalue())
        self.assertIn("(set $CGIPOOL_ADMIN_TOKEN to the admin token)", err.getvalue())
        self.patch(os, "environ", {**os.environ, "CGIPOOL_ADMIN_TOKEN": token})
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(await run_status(reactor, daemon.url, False, out, err), 0,
                         err.getvalue())
        self.assertIn("search /api/search", out.getvalue())

    async def test_wait_ready_in_process(self) -> None:
        """wait-ready answers 0 once every worker is ready, and the time it reports is
        counted from --since when given (make start-bg's start of twistd)."""
        daemon = await start_daemon(self, write_config(self, SERVICES), wait=False)
        out, err = io.StringIO(), io.StringIO()
        code = await wait_ready(reactor, daemon.url, None, 10, out, err, interval=0.02)
        self.assertEqual(code, 0, err.getvalue())
        self.assertTrue(all(len(p.ready) == 2 for p in daemon.supervisor.pools.values()))
        self.assertIn("cgipool is ready at", out.getvalue())
        # Counted from --since (make start-bg: when it ran twistd), when given.
        out = io.StringIO()
        code = await wait_ready(reactor, daemon.url, None, 10, out, err, interval=0.02,
                                since=reactor.seconds() - 100)
        self.assertEqual(code, 0, err.getvalue())
        took = re.search(r"cgipool is ready at \S+ after (\d+\.\d) s; dashboard: \S+/admin/\n$",
                         out.getvalue())
        assert took is not None, out.getvalue()
        self.assertGreaterEqual(float(took.group(1)), 100.0)  # from since, not from the call

    async def test_wait_ready_gives_up(self) -> None:
        """wait-ready exits 1 after its timeout naming the last problem, and at once when
        the pidfile's process is dead, with the last 20 lines of its log, escaped."""
        url = f"http://127.0.0.1:{free_port()}"
        out, err = io.StringIO(), io.StringIO()
        code = await wait_ready(reactor, url, None, 0.3, out, err, interval=0.05)
        self.assertEqual(code, 1)
        self.assertIn("not ready after 0.3 s", err.getvalue())
        self.assertIn("connection refused", err.getvalue())
        # A pidfile naming no live process fails at once, with the log.
        folder = self.mktemp()
        os.makedirs(folder)
        pidfile = os.path.join(folder, "d.pid")
        with open(pidfile, "w") as f:
            f.write("4194305")
        with open(os.path.join(folder, "d.log"), "w") as f:
            f.write("".join(f"line {i}\n" for i in range(30)) + "Traceback: boom\x1b[2J\n")
        err = io.StringIO()
        # On a Clock that never moves: the answer comes without any of the 30 s
        # timeout passing (and without a request: a Clock connects nothing).
        code = self.successResultOf(defer.ensureDeferred(
            wait_ready(Clock(), url, pidfile, 30, out, err)))
        self.assertEqual(code, 1)
        text = err.getvalue()
        self.assertIn("cgipool (pid 4194305) exited before it was ready", text)
        self.assertIn("last 20 lines of", text)
        self.assertNotIn("line 10\n", text)
        self.assertIn("line 11\n", text)
        self.assertIn("Traceback: boom\\x1b[2J", text)


# -- a real twistd daemon, driven by the real commands -------------------------------------


class BackgroundDaemonTests(TestCase):
    def setUp(self) -> None:
        require_binaries("search.cgi")
        for tool in ("twistd", "cgipool"):
            if not os.access(os.path.join(VENV_BIN, tool), os.X_OK):
                self.skipTest(f"{VENV_BIN}/{tool} is missing (make venv)")

    def run_tool(self, *args: str) -> defer.Deferred[tuple[bytes, bytes, int]]:
        return getProcessOutputAndValue(args[0], args[1:], env=dict(os.environ), path=ROOT)

    async def test_wait_ready_then_stop(self) -> None:
        """The real commands on a real twistd daemon: wait-ready sees it ready, stop ends it
        and both workers, removes the pidfile and frees the port; a second stop is
        harmless."""
        port = free_port()
        config = write_config(self, SERVICES.split("  calculator:")[0])
        with open(config) as f:
            text = f.read()
        with open(config, "w") as f:
            f.write(text.replace('"tcp:0:', f'"tcp:{port}:', 1))
        folder = os.path.dirname(config)
        pidfile = os.path.join(folder, "cgipool.pid")
        logfile = os.path.join(folder, "cgipool.log")
        url = f"http://127.0.0.1:{port}"
        seen: set[int] = set()

        def record() -> None:
            """Remember the daemon and its workers, to check (and clean) them all."""
            pid = _read_pid(pidfile)
            if pid is not None:
                seen.add(pid)
                seen.update(p.pid for p in descendants(pid))

        async def cleanup() -> None:
            record()
            for pid in seen:
                if process_alive(pid):
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            await wait_for(lambda: not any(process_alive(p) for p in seen), 5,
                           what="the background daemon's processes to be gone")

        self.addCleanup(lambda: defer.ensureDeferred(cleanup()))

        out, err, code = await self.run_tool(
            os.path.join(VENV_BIN, "twistd"), "--pidfile", pidfile, "--logfile", logfile,
            "cgipool", "--config", config)
        self.assertEqual(code, 0, (out, err))
        record()

        out, err, code = await self.run_tool(
            os.path.join(VENV_BIN, "cgipool"), "wait-ready", "--url", url,
            "--pidfile", pidfile, "--timeout", "15")
        self.assertEqual(code, 0, (out, err))
        self.assertIn(b"search", out)
        self.assertIn(b"ok", out)
        self.assertIn(f"cgipool is ready at {url}".encode(), out)
        record()
        daemon_pid = _read_pid(pidfile)
        assert daemon_pid is not None

        client = HttpClient(reactor, parse_url(url))
        try:
            status = await fetch_status(client)
        finally:
            await client.close()
        workers = [w["pid"] for w in status["services"][0]["workers"]]
        self.assertEqual(len(workers), 2)
        self.assertTrue(all(process_alive(p) for p in [daemon_pid, *workers]))

        out, err, code = await self.run_tool(
            os.path.join(VENV_BIN, "cgipool"), "stop", "--pidfile", pidfile,
            "--timeout", "10")
        self.assertEqual(code, 0, (out, err))
        self.assertRegex(out.decode(),
                         rf"^stopped cgipool \(pid {daemon_pid}\) and 2 workers in [\d.]+ s\n$")
        for pid in [daemon_pid, *workers, *seen]:
            self.assertFalse(process_alive(pid), pid)
        self.assertFalse(os.path.exists(pidfile))
        with socket.socket() as s:
            self.assertNotEqual(s.connect_ex(("127.0.0.1", port)), 0)

        # Stopping again is fine.
        out, err, code = await self.run_tool(
            os.path.join(VENV_BIN, "cgipool"), "stop", "--pidfile", pidfile)
        self.assertEqual((code, out), (0, b"cgipool is not running\n"))


    async def test_stop_kills_what_ignores_sigterm(self) -> None:
        """A daemon (and its child) ignoring SIGTERM get SIGKILL to their group."""
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        pidfile = os.path.join(folder, "fake.pid")
        ended: defer.Deferred[None] = defer.Deferred()

        class Fake(ProcessProtocol):
            def processEnded(self, reason: Any) -> None:
                ended.callback(None)

        # argv names "cgipool", so `stop` takes it for the daemon.
        process = reactor.spawnProcess(
            Fake(), sys.executable,
            [sys.executable, "-c", FAKE_DAEMON, pidfile, "cgipool-fake-daemon"],
            env=dict(os.environ), childFDs={0: "w", 1: "r", 2: "r"})
        daemon_pid = process.pid
        pids: set[int] = {daemon_pid}

        async def cleanup() -> None:
            for pid in pids:
                if process_alive(pid):
                    os.kill(pid, signal.SIGKILL)
            await wait_for(lambda: not any(process_alive(p) for p in pids), 5,
                           what="the fake daemon to be gone")
            await ended

        self.addCleanup(lambda: defer.ensureDeferred(cleanup()))
        await wait_for(lambda: os.path.exists(pidfile), 10, what="the fake daemon's pidfile")
        await wait_for(lambda: len(descendants(daemon_pid)) == 1, 10,
                       what="the fake daemon's child")
        child = descendants(daemon_pid)[0].pid
        pids.add(child)

        out, err, code = await self.run_tool(
            os.path.join(VENV_BIN, "cgipool"), "stop", "--pidfile", pidfile,
            "--timeout", "0.3")
        self.assertEqual(code, 0, (out, err))
        self.assertIn(f"still running after 0.3 s, sending SIGKILL: pid {daemon_pid} "
                      f"(python", err.decode())
        self.assertIn(f"pid {child} (python", err.decode())
        self.assertRegex(out.decode(), rf"^stopped cgipool \(pid {daemon_pid}\) and 1 worker "
                                       rf"in [\d.]+ s \(after SIGKILL to 2 processes\)\n$")
        self.assertFalse(process_alive(daemon_pid))
        self.assertFalse(process_alive(child))
        self.assertFalse(os.path.exists(pidfile))


#: A "daemon" that ignores SIGTERM, leads its own session and has a child.
FAKE_DAEMON = r"""
import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
os.setsid()
if os.fork() == 0:
    time.sleep(60)
    os._exit(0)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(os.getpid()))
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""


def _read_pid(pidfile: str) -> int | None:
    try:
        with open(pidfile) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None



class UrlFromConfigTests(TestCase):
    """The tools take the proxy's URL from the configuration when not given one,
    so `make start-bg`/`status`/`smoke-test` follow an edited ``listen``."""

    def _write(self, listen: str) -> str:
        path = write_config(self, "services:\n" + search_service())
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(text.replace('listen: "tcp:0:interface=127.0.0.1"', f"listen: {listen}", 1))
        return path

    def test_the_first_tcp_listener_wildcards_as_loopback(self) -> None:
        from cgipool_tools.client import url_from_config

        for listen, url in (('"tcp:18580:interface=127.0.0.1"', "http://127.0.0.1:18580"),
                            ('["tcp6:18581:interface=\\\\:\\\\:1", "tcp:18582"]',
                             "http://[::1]:18581"),
                            ('"tcp:18583"', "http://127.0.0.1:18583"),
                            ('"tcp6:18584"', "http://[::1]:18584")):
            self.assertEqual(url_from_config(self._write(listen)), url, listen)

    def test_url_option_wins_then_the_config_then_the_default(self) -> None:
        from cgipool_tools.client import DEFAULT_URL, resolve_url

        path = self._write('"tcp:18585:interface=127.0.0.1"')
        self.assertEqual(resolve_url("http://127.0.0.1:9", path), "http://127.0.0.1:9")
        self.assertEqual(resolve_url(None, path), "http://127.0.0.1:18585")
        self.assertEqual(resolve_url(None, path + ".missing"), DEFAULT_URL)
        broken = self._write('"tcp:18586:interface=127.0.0.1"')
        with open(broken, "a") as f:
            f.write("nonsense: [\n")
        self.assertEqual(resolve_url(None, broken), DEFAULT_URL)

    async def test_status_without_url_reports_the_configured_address(self) -> None:
        cgipool = os.path.join(VENV_BIN, "cgipool")
        if not os.access(cgipool, os.X_OK):
            self.skipTest(f"{cgipool} is missing (make venv)")
        path = self._write('"tcp:1:interface=127.0.0.1"')
        out, err, code = await getProcessOutputAndValue(
            cgipool, ["status", "--config", path], env=dict(os.environ), path=ROOT)
        self.assertEqual(code, 1)
        self.assertIn(b"not running at http://127.0.0.1:1", err)
