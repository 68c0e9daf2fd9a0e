"""An untrusted service's page against the admin, in a real browser.

Headless Chromium opens the dashboard as a local admin would (tokenless local
access: the strongest position an attacker can ride on), then a page that a
CGI script serves on the proxy's origin.  That page tries what one XSS in any
service would: scale, reload and read the admin through ``fetch``.  The admin
is on a listener of its own, so the browser treats all of it as cross-origin
and the pool does not change.
"""

from __future__ import annotations

import os
import urllib.parse

from twisted.trial.unittest import TestCase

from tests.browser import (
    in_thread,
    page_text,
    require_browser,
    start_browser,
    start_daemon_process,
    wait_until,
)
from tests.support import ROOT, SEARCH, require_binaries

SCRIPT = os.path.join(ROOT, "tests", "workers", "cgi_behaviour.py")
CONFIG = SEARCH + f"""\
  script:
    protocol: cgi
    command: ["{{python}}", "{SCRIPT}"]
    route: /cgi/test
    workers: {{max: 2}}
"""


class ServicePageAgainstTheAdminTests(TestCase):
    def setUp(self) -> None:
        require_browser()
        require_binaries("search.cgi")

    async def test_a_service_page_cannot_scale_reload_or_read_the_admin(self) -> None:
        daemon = await start_daemon_process(self, CONFIG)
        before = await daemon.status()
        search = [s for s in before["services"] if s["name"] == "search"][0]
        driver = await start_browser(self)
        # The admin's own browser, with the dashboard open.
        await in_thread(driver.get, f"{daemon.admin_url}/admin/")
        await wait_until(lambda: "search" in page_text(driver), 10, "the dashboard",
                         driver=driver)
        attack = f"{daemon.url}/cgi/test/attack?" + urllib.parse.urlencode(
            {"admin": daemon.admin_url})
        await in_thread(driver.get, attack)
        text = await wait_until(lambda: "done" in page_text(driver) and page_text(driver),
                                15, "the attack page to finish", driver=driver)
        lines = [line for line in text.splitlines() if ": " in line]
        self.assertEqual(len(lines), 5, text)
        for line in lines:
            # Blocked by the browser (CORS, a refused preflight), or sent blind
            # (no-cors: an opaque answer the page cannot read).
            self.assertTrue(": blocked " in line or ": answered opaque 0" in line, line)
        after = await daemon.status()
        search_after = [s for s in after["services"] if s["name"] == "search"][0]
        self.assertEqual(search_after["size"]["desired"], search["size"]["desired"])
        self.assertEqual(len(search_after["workers"]), len(search["workers"]))
        code, body = await daemon.get("/admin/api/log?limit=200")
        self.assertEqual(code, 200)
        self.assertNotIn(b'"kind": "admin"', body)
        self.assertNotIn(b'"kind": "reload"', body)
