"""The real-browser test infrastructure (tests/browser.py) and ``cgipool dashboard-shot``.

Headless Chromium against a real daemon; skipped, with the apt-get line to run,
where Debian's chromium and chromium-driver (or selenium) are not installed.
"""

from __future__ import annotations

import io
import os
import re
import sys

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from cgipool_tools import screenshot
from tests.browser import (
    in_thread,
    page_text,
    png_size,
    require_browser,
    save_screenshot,
    start_browser,
    start_daemon_process,
    wait_until,
)
from tests.support import ROOT, require_binaries, search_service, start_daemon, write_config

SEARCH = "\nservices:\n" + search_service(examples='["/api/search?q=test"]')


class BrowserSmokeTests(TestCase):
    def setUp(self) -> None:
        require_browser()
        require_binaries("search.cgi")

    async def test_admin_page_of_a_daemon_process_in_headless_chromium(self) -> None:
        """The walkthrough's http://localhost:8080/admin/ (the proxy's port) leads
        the browser to the dashboard on the admin's own listener."""
        daemon = await start_daemon_process(self, SEARCH)
        pids = daemon.worker_pids()
        self.assertEqual(len(pids), 2)
        driver = await start_browser(self)
        await in_thread(driver.get, f"{daemon.url}/admin/")
        await wait_until(lambda: all(str(pid) in page_text(driver) for pid in pids), 10,
                         "the worker pids on /admin/", driver=driver)
        where = await in_thread(lambda: driver.current_url)
        self.assertEqual(where, f"{daemon.admin_url}/admin/")
        path = os.path.join(driver._cgipool_folder, "admin.png")
        data = await in_thread(save_screenshot, driver, path)
        self.assertEqual(png_size(data), (1280, 900))
        with open(path, "rb") as f:
            self.assertEqual(f.read(), data)
        self.assertGreater(len(data), 1000)

    async def test_in_process_daemon_answers_a_browser_driven_off_the_reactor(self) -> None:
        """The daemon runs in this reactor: only :func:`in_thread` keeps it answering."""
        daemon = await start_daemon(self, write_config(self, SEARCH))
        pids = daemon.ready_pids("search")
        driver = await start_browser(self)
        await in_thread(driver.get, f"{daemon.admin_url}/admin/", timeout=20)

        def shows_the_pids() -> str:
            text = page_text(driver)
            return text if all(str(pid) in text for pid in pids) else ""

        text = await wait_until(shows_the_pids, 10, "the worker pids on /admin/",
                                driver=driver)
        self.assertIn("search", text)


class BrowserMissingTests(TestCase):
    """What happens where Chromium is not installed (it is hidden here)."""

    def hide_chromium(self) -> None:
        self.patch(screenshot, "CHROMIUM", "/nonexistent/chromium")

    def test_require_browser_skips_with_the_apt_get_line(self) -> None:
        self.hide_chromium()
        with self.assertRaises(SkipTest) as e:
            require_browser()
        self.assertEqual(str(e.exception),
                         "chromium/chromedriver not installed: apt-get install chromium "
                         "chromium-driver (missing /nonexistent/chromium)")

    async def test_dashboard_shot_says_what_to_install(self) -> None:
        self.hide_chromium()
        out, err = io.StringIO(), io.StringIO()
        code = await screenshot.dashboard_shot(
            reactor, "http://127.0.0.1:1", "x.png", ["/admin/"], None, None, True, out, err)
        self.assertEqual(code, 1)
        self.assertEqual(out.getvalue(), "")
        self.assertIn("apt-get install chromium chromium-driver", err.getvalue())


class DashboardShotTests(TestCase):
    def test_shot_paths(self) -> None:
        """One --out name gives a file per page: the first page the name itself, the others
        a suffix from their path (or pageN), so no shot overwrites another."""
        self.assertEqual(
            screenshot.shot_paths("docs/dashboard.png",
                                  ["/admin/", "/admin/traffic", "/admin/events?x=1"]),
            ["docs/dashboard.png", "docs/dashboard-traffic.png", "docs/dashboard-events.png"])
        self.assertEqual(screenshot.shot_paths("shot", ["/admin/", "/"]),
                         ["shot.png", "shot-page2.png"])

    async def test_not_running(self) -> None:
        """dashboard-shot against a closed port exits 1 with one line saying cgipool is not
        running, not a picture of an error page."""
        require_browser()
        out, err = io.StringIO(), io.StringIO()
        code = await screenshot.dashboard_shot(
            reactor, "http://127.0.0.1:1", "x.png", ["/admin/"], None, None, True, out, err)
        self.assertEqual(code, 1)
        self.assertEqual(err.getvalue(), "cgipool dashboard-shot: cgipool is not running at "
                                         "http://127.0.0.1:1: connection refused — start it "
                                         "with `make start-bg`\n")

    async def test_the_command_with_load(self) -> None:
        """`cgipool dashboard-shot --load 1` loads the daemon without a failure and saves a
        1280-wide PNG at least 900 tall; a page that answers 404 is an error, not a shot."""
        require_browser()
        require_binaries("search.cgi")
        daemon = await start_daemon_process(self, SEARCH)
        folder = os.path.abspath(self.mktemp())
        out_path = os.path.join(folder, "shots", "dash.png")
        cgipool = os.path.join(os.path.dirname(sys.executable), "cgipool")
        out, err, code = await getProcessOutputAndValue(
            cgipool, ["dashboard-shot", "--url", daemon.url, "--out", out_path,
                      "--load", "1"], env=dict(os.environ), path=ROOT)
        self.assertEqual(code, 0, err)
        self.assertEqual(out.decode(), f"{out_path}\n")
        self.assertIn(b"load: ", err)
        self.assertIn(b", 0 failed", err)
        with open(out_path, "rb") as f:
            width, height = png_size(f.read())
        self.assertEqual(width, 1280)
        self.assertGreaterEqual(height, 900)
        # The load reached the daemon (each of its requests counted there); how
        # many fit in its second is the machine's speed, which `make bench` measures.
        loaded = re.search(rb"load: (\d+) requests in", err)
        assert loaded is not None, err
        self.assertGreater(int(loaded.group(1)), 0)
        status = await daemon.status()
        self.assertGreaterEqual(status["services"][0]["requests"], int(loaded.group(1)))
        # A page that is not there is an error, not a picture of an error.
        out, err, code = await getProcessOutputAndValue(
            cgipool, ["dashboard-shot", "--url", daemon.url, "--out", out_path,
                      "--page", "/admin/no-such-page"], env=dict(os.environ), path=ROOT)
        self.assertEqual((code, out), (1, b""))
        self.assertIn(b"/admin/no-such-page answered 404", err)
