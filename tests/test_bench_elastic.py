"""``make bench-elastic`` keeps working: its quick mode, run as a user would run it.

No timing is judged here; what is asserted is what must hold on any machine:
every phase ran and not one request failed.
"""

from __future__ import annotations

import os
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from tests.support import ROOT, require_binaries


class ElasticBenchTests(TestCase):
    timeout = 180

    async def test_quick_run_reports_every_phase_without_a_failed_request(self) -> None:
        require_binaries("search.cgi")
        out = os.path.abspath(self.mktemp()) + ".md"
        stdout, stderr, code = await getProcessOutputAndValue(
            sys.executable, [os.path.join(ROOT, "bench", "elastic.py"), "--quick",
                             "--out", out],
            env={**os.environ, "PYTHONPATH": ROOT}, path=ROOT, reactor=reactor)
        self.assertEqual(code, 0, (stdout + stderr).decode(errors="replace")[-3000:])
        with open(out) as f:
            report = f.read()
        rows = [line for line in report.splitlines() if line.startswith("| ") and "---" not in line]
        measurements = [row.split(" | ")[0].lstrip("| ") for row in rows[1:]]
        self.assertEqual(len(measurements), 12, report)
        failed = [row for row in rows if "failed requests" in row]
        self.assertEqual(len(failed), 5, report)
        for row in failed:
            self.assertIn("| 0 / ", row)
