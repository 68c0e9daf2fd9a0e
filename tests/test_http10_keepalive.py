"""HTTP/1.0 keep-alive as ApacheBench uses it (issue 16), and the bench's
readers of ab's and h2load's summaries.

``ab -k`` sends HTTP/1.0 requests with ``Connection: keep-alive``; a server
that answers a length-delimited response with ``Connection: keep-alive`` and
keeps the connection (as nginx does) lets it reuse connections.  Before the
edge of issue 15 cgipool closed each one: ``Keep-Alive requests: 0``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, SynchronousTestCase, TestCase

from cgipool.config import load
from cgipool.tap import build
from tests.support import ROOT, require_binaries, run_daemon, search_service, write_config

SEARCH = "\nservices:\n" + search_service(workers=1)


def bench_run() -> object:
    """bench/run.py as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location("bench_run", os.path.join(ROOT, "bench",
                                                                             "run.py"))
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


#: ab's summary from a real run (ab 2.3 against Python's http.server, which
#: speaks HTTP/1.0 without keep-alive: no request was kept).
AB_OUTPUT = (
    'Server Software:        SimpleHTTP/0.6\n'
    'Server Hostname:        127.0.0.1\n'
    'Server Port:            47999\n'
    '\n'
    'Document Path:          /\n'
    'Document Length:        2645 bytes\n'
    '\n'
    'Concurrency Level:      2\n'
    'Time taken for tests:   0.024 seconds\n'
    'Complete requests:      20\n'
    'Failed requests:        0\n'
    'Keep-Alive requests:    0\n'
    'Total transferred:      56020 bytes\n'
    'HTML transferred:       52900 bytes\n'
    'Requests per second:    840.48 [#/sec] (mean)\n'
    'Time per request:       2.380 [ms] (mean)\n'
    'Time per request:       1.190 [ms] (mean, across all concurrent requests)\n'
    'Transfer rate:          2299.00 [Kbytes/sec] received\n'
)

#: h2load's summary from a real run (h2load --h1, the same server).
H2LOAD_OUTPUT = (
    'finished in 21.55ms, 928.12 req/s, 21.21KB/s\n'
    'requests: 20 total, 20 started, 20 done, 20 succeeded, 0 failed, 0 errored, 0 timeout\n'
    'status codes: 20 2xx, 0 3xx, 0 4xx, 0 5xx\n'
)


class SummaryReaderTests(SynchronousTestCase):
    def test_ab_summary_gives_requests_failures_kept_and_rate(self) -> None:
        run = bench_run()
        self.assertEqual(run.parse_ab(AB_OUTPUT),  # type: ignore[attr-defined]
                         {"requests": 20, "failed": 0, "non_2xx": 0, "keep_alive": 0,
                          "rps": 840.48})

    def test_h2load_summary_gives_requests_successes_failures_and_rate(self) -> None:
        run = bench_run()
        self.assertEqual(run.parse_h2load(H2LOAD_OUTPUT),  # type: ignore[attr-defined]
                         {"requests": 20, "succeeded": 20, "failed": 0, "rps": 928.12})

    def test_an_unreadable_summary_is_the_harness_failing_not_zero(self) -> None:
        """A tool that printed something else (an error, another version's
        layout) stops the bench with its output, rather than a 0 req/s row."""
        run = bench_run()
        for parse in (run.parse_ab, run.parse_h2load):  # type: ignore[attr-defined]
            with self.assertRaises(run.HarnessError):  # type: ignore[attr-defined]
                parse("apr_socket_connect(): Connection refused (111)\n")


class ApacheBenchKeepAliveTests(TestCase):
    async def test_ab_k_reuses_every_connection(self) -> None:
        """200 HTTP/1.0 keep-alive requests on 4 connections: every one answered
        200 and every one on a kept connection (ab counts them)."""
        require_binaries("search.cgi")
        ab = shutil.which("ab")
        if ab is None:
            raise SkipTest("ab is not installed (apt-get install apache2-utils)")
        daemon = await run_daemon(self, build(load(write_config(self, SEARCH)), reactor))
        out, err, code = await getProcessOutputAndValue(
            ab, ["-q", "-k", "-c", "4", "-n", "200", f"{daemon.url}/api/search?q=ab"],
            env=os.environ)
        self.assertEqual(code, 0, err)
        result = bench_run().parse_ab(out.decode())  # type: ignore[attr-defined]
        self.assertEqual((result["requests"], result["failed"], result["non_2xx"],
                          result["keep_alive"]), (200, 0, 0, 200), out.decode())
