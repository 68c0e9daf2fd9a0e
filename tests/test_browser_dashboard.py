"""The live dashboard in a real browser: headless Chromium against a real daemon.

A ``twistd -n cgipool`` process with two C search workers; the browser loads
the admin pages and the test checks what a person would see: the real pids,
request counts rising without a reload, a restarted worker's new pid, the
result of each action, drawn charts, and no JavaScript errors.  Skipped (with
the apt-get line) where Chromium, chromedriver or selenium are missing.
"""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from tests import browser
from tests.browser import (
    console_errors,
    in_thread,
    page_text,
    require_browser,
    start_browser,
    start_daemon_process,
    wait_until,
)
from tests.support import require_binaries, search_service

SEARCH = "\nservices:\n" + search_service(description="C search workers for the browser test",
                                            examples='["/api/search?q=test"]')

#: The same pool, quick to scale back down when idle (after 3 s, one worker per 0.5 s).
ELASTIC = SEARCH.replace("    examples:", """    autoscale: {cooldown: 3, down_interval: 0.5}
    examples:""")
#: A scale-down (cooldown + two steps) seen through the ~1/s status stream.
SCALE_DOWN_TIMEOUT = 15.0

#: Seconds for a page load, and for the page to show something the daemon did.
LOAD_TIMEOUT = 20.0
LIVE_TIMEOUT = 10.0
#: A worker restart: the replacement spawns, passes a probe, the old one drains.
RESTART_TIMEOUT = 15.0

ROWS_JS = """
return Array.from(document.querySelectorAll('#proc-body tr')).map(function (row) {
  var cell = function (name) { return row.querySelector('[data-f="' + name + '"]').textContent; };
  return {service: row.dataset.service, worker: row.dataset.worker, pid: cell('pid'),
          state: cell('state'), requests: Number(cell('requests').replace(/,/g, ''))};
});
"""


def table(driver: Any) -> list[dict[str, Any]]:
    """The process table's rows as the page shows them (blocking)."""
    return list(driver.execute_script(ROWS_JS))


def table_pids(driver: Any) -> list[int]:
    return sorted(int(row["pid"]) for row in table(driver) if row["pid"].isdigit())


def connection(driver: Any) -> str:
    return str(driver.execute_script(
        "return document.getElementById('conn').getAttribute('data-state')"))


def notices(driver: Any) -> str:
    return str(driver.execute_script("return document.getElementById('notice').innerText"))


CARD_JS = """
var card = document.querySelector('article[data-service="search"]');
var f = function (name) { return card.querySelector('[data-f="' + name + '"]').textContent; };
return {ready: f('ready'), util: f('util'), queue: f('queue'), autoscale: f('autoscale'),
        move: f('decision-move'), reason: f('decision-reason'),
        chips: card.querySelectorAll('.chip').length,
        label: card.querySelector('.scale-label').textContent,
        max: card.querySelector('input[name="workers"]').getAttribute('max')};
"""


def search_card(driver: Any) -> dict[str, Any]:
    """What the search card shows (blocking)."""
    return dict(driver.execute_script(CARD_JS))


class DashboardBrowserTests(TestCase):
    def setUp(self) -> None:
        require_browser()
        require_binaries("search.cgi")

    async def open(self, path: str, config: str = SEARCH) -> tuple[Any, Any]:
        """A daemon and a browser (started after it, so it goes first) showing ``path``."""
        daemon = await start_daemon_process(self, config)
        await daemon.status()
        driver = await start_browser(self)
        await in_thread(driver.get, daemon.admin_url + path, timeout=LOAD_TIMEOUT)
        await wait_until(lambda: connection(driver) == "live", LIVE_TIMEOUT,
                         "the connection indicator to say live", driver=driver)
        return daemon, driver

    async def assert_no_console_errors(self, driver: Any) -> None:
        errors = await in_thread(console_errors, driver, timeout=LOAD_TIMEOUT)
        self.assertEqual(errors, [])

    async def test_processes_live_counts_and_restart_button(self) -> None:
        daemon, driver = await self.open("/admin/processes")
        pids = sorted(daemon.worker_pids())
        self.assertEqual(len(pids), 2)
        await wait_until(lambda: table_pids(driver) == pids, LIVE_TIMEOUT,
                         f"the worker pids {pids} in the table", driver=driver)
        # Requests through the proxy show up without a reload.
        await in_thread(driver.execute_script, "window.cgipoolTestMarker = 'same page';")
        before = sum(row["requests"] for row in await in_thread(table, driver))
        for i in range(20):
            code, _ = await daemon.get(f"/api/search?q=browser{i}")
            self.assertEqual(code, 200)
        await wait_until(
            lambda: sum(row["requests"] for row in table(driver)) >= before + 20,
            LIVE_TIMEOUT, "the request counts to rise by 20", driver=driver)
        self.assertEqual(await in_thread(driver.execute_script,
                                         "return window.cgipoolTestMarker"), "same page")

        # Restart worker 0 with its button: its pid leaves the table, a new one comes.
        from selenium.webdriver.common.by import By

        (old,) = [row for row in await in_thread(table, driver) if row["worker"] == "0"]
        old_pid = int(old["pid"])
        button = await in_thread(
            driver.find_element, By.CSS_SELECTOR,
            'tr[data-worker="0"] button[data-action="restart"]')
        await in_thread(button.click)

        def replaced() -> list[int]:
            now = table_pids(driver)
            return now if len(now) == 2 and old_pid not in now else []

        new_pids = await wait_until(replaced, RESTART_TIMEOUT,
                                    f"pid {old_pid} to be replaced in the table", driver=driver)
        message = await wait_until(lambda: "Restarted search[0]" in notices(driver)
                                   and notices(driver), RESTART_TIMEOUT,
                                   "the restart's result message", driver=driver)
        (new_pid,) = set(new_pids) - set(pids)
        self.assertIn(f"pid {old_pid} \u2192 {new_pid}", message)
        status = await daemon.status()
        self.assertEqual(sorted(daemon.worker_pids(status)), new_pids)
        # The action is in the event log, which the overview shows live too.
        log = [e["message"] for e in (await daemon_log(daemon))]
        self.assertTrue(any("restart search[0]" in m for m in log), log)
        self.assertEqual(await in_thread(driver.execute_script,
                                         "return window.cgipoolTestMarker"), "same page")
        await self.assert_no_console_errors(driver)

    async def test_overview_scale_control_and_live_events(self) -> None:
        daemon, driver = await self.open("/admin/")
        text = await in_thread(page_text, driver)
        for pid in daemon.worker_pids():
            self.assertIn(str(pid), text)
        self.assertIn("/api/search?q=test", text)
        from selenium.webdriver.common.by import By

        from selenium.webdriver.common.keys import Keys

        field = await in_thread(driver.find_element, By.CSS_SELECTOR,
                                'article[data-service="search"] input[name="workers"]')
        # As a person does it: focus the field, select its value, type over it (a
        # live update leaves a focused or edited field alone; clear() alone
        # neither focuses nor edits it, so an update could refill it).
        await in_thread(field.click)
        await in_thread(field.send_keys, Keys.CONTROL, "a")
        await in_thread(field.send_keys, "3")
        submit = await in_thread(driver.find_element, By.CSS_SELECTOR,
                                 'article[data-service="search"] button[type="submit"]')
        await in_thread(submit.click)
        await wait_until(lambda: "Scaled search: 2 \u2192 3 workers" in notices(driver),
                         LIVE_TIMEOUT, "the scale result message", driver=driver)
        chips = ('return document.querySelectorAll('
                 '\'article[data-service="search"] .chip.state-ready\').length')
        await wait_until(lambda: driver.execute_script(chips) == 3, LIVE_TIMEOUT,
                         "three ready workers on the card", driver=driver)
        # The events arrive over the stream, newest first.
        await wait_until(lambda: "scale to 3" in driver.execute_script(
            "return document.querySelector('#event-list li').innerText + ' ' + "
            "document.getElementById('event-list').innerText"), LIVE_TIMEOUT,
            "the admin action in the recent events", driver=driver)
        await self.assert_no_console_errors(driver)
        # An out-of-range count is refused by the API and the message says why.
        await in_thread(driver.execute_script, """
            var input = document.querySelector('article[data-service="search"] input[name="workers"]');
            input.removeAttribute('max'); input.value = '9';
            input.form.requestSubmit();""")
        await wait_until(lambda: "failed (400): workers must be between 2 and 4"
                         in notices(driver), LIVE_TIMEOUT, "the refusal message",
                         driver=driver)
        status = await daemon.status()
        self.assertEqual(status["services"][0]["size"]["desired"], 3)
        # Chromium logs the refused request itself; nothing else went wrong.
        errors = await in_thread(console_errors, driver, timeout=LOAD_TIMEOUT)
        self.assertEqual([e for e in errors if "status of 400" not in e], [])

    async def test_overview_follows_autoscaling_and_reloads_the_configuration(self) -> None:
        """Scale up by hand, watch the autoscaler shrink the idle pool on the card, then
        reload a changed and a broken configuration with the header's button."""
        daemon, driver = await self.open("/admin/", ELASTIC)
        from selenium.webdriver.common.by import By

        shown = await in_thread(search_card, driver, timeout=LOAD_TIMEOUT)
        self.assertEqual((shown["ready"], shown["util"], shown["queue"], shown["chips"]),
                         ("2/2", "0%", "queue 0/256", 2))
        self.assertTrue(shown["autoscale"].startswith("on \u00b7 2\u20134 workers"), shown)
        self.assertEqual(shown["move"], "no scaling decision yet")

        # Four workers by hand: the card grows...
        await in_thread(driver.execute_script, """
            var input = document.querySelector('article[data-service="search"] input[name="workers"]');
            input.value = '4'; input.form.requestSubmit();""")
        await wait_until(lambda: "Scaled search: 2 \u2192 4 workers" in notices(driver),
                         LIVE_TIMEOUT, "the scale result message", driver=driver)
        await wait_until(lambda: search_card(driver)["ready"] == "4/4", LIVE_TIMEOUT,
                         "4/4 ready on the card", driver=driver)
        # ...and, idle, the autoscaler takes it back to workers.min one step at a time.
        await wait_until(lambda: search_card(driver)["move"] == "3 \u2192 2 workers"
                         and search_card(driver)["ready"] == "2/2", SCALE_DOWN_TIMEOUT,
                         "the autoscaler's 3 -> 2 decision on the card", driver=driver)
        shown = await in_thread(search_card, driver)
        self.assertTrue(shown["reason"].startswith("idle: utilisation below 0.3 for "), shown)
        await wait_until(lambda: search_card(driver)["chips"] == 2, LIVE_TIMEOUT,
                         "two worker chips once the drained ones left", driver=driver)
        self.assertEqual((await daemon.status())["services"][0]["size"]["desired"], 2)
        await wait_until(lambda: driver.execute_script(
            "return document.querySelectorAll('#event-list li.kind-scale').length") >= 2,
            LIVE_TIMEOUT, "the scale events in the recent events", driver=driver)

        # A changed configuration: the Reload button shows the summary, the card the
        # new limits.
        with open(daemon.config) as f:
            text = f.read()
        with open(daemon.config, "w") as f:
            f.write(text.replace("workers: {min: 2, max: 4}", "workers: {min: 2, max: 5}"))
        button = await in_thread(driver.find_element, By.CSS_SELECTOR,
                                 'header button[data-action="reload"]')
        await in_thread(button.click)
        await wait_until(lambda: "Configuration reloaded: updated search" in notices(driver),
                         LIVE_TIMEOUT, "the reload summary", driver=driver)
        await wait_until(lambda: search_card(driver)["autoscale"].startswith(
                         "on \u00b7 2\u20135 workers") and search_card(driver)["max"] == "5"
                         and search_card(driver)["label"] == "Workers (2\u20135)",
                         LIVE_TIMEOUT, "the new workers.max on the card", driver=driver)
        await wait_until(lambda: driver.execute_script(
            "return document.querySelector('#event-list li.kind-reload') !== null"),
            LIVE_TIMEOUT, "the reload event", driver=driver)
        await self.assert_no_console_errors(driver)

        # A broken file is refused: the message names the file, nothing changes.
        with open(daemon.config, "w") as f:
            f.write(text.replace("workers: {min: 2, max: 4}", "workers: {min: 3, max: 1}"))
        await in_thread(button.click)
        message = await wait_until(
            lambda: "Configuration reload failed (400): configuration not reloaded: "
            in notices(driver) and notices(driver), LIVE_TIMEOUT, "the refusal message",
            driver=driver)
        self.assertIn(daemon.config, message)
        await wait_until(lambda: driver.execute_script(
            "return document.querySelector('#event-list li.kind-reload_failed') !== null"),
            LIVE_TIMEOUT, "the reload_failed event", driver=driver)
        self.assertEqual(await in_thread(lambda: search_card(driver)["max"]), "5")
        self.assertEqual((await daemon.status())["services"][0]["size"]["max"], 5)
        errors = await in_thread(console_errors, driver, timeout=LOAD_TIMEOUT)
        self.assertEqual([e for e in errors if "status of 400" not in e], [])

    async def test_traffic_charts_are_drawn(self) -> None:
        """After some traffic the traffic page draws the service's four charts (req/s,
        errors, latency, workers), the req/s one filled, with the workers label and no
        JavaScript error."""
        daemon, driver = await self.open("/admin/traffic")
        for i in range(30):
            code, _ = await daemon.get(f"/api/search?q=chart{i}")
            self.assertEqual(code, 200)

        def drawn() -> dict[str, int]:
            counts = driver.execute_script("""
                var out = {};
                document.querySelectorAll('section[data-service="search"] figure').forEach(
                  function (fig) {
                    var svg = fig.querySelector('svg');
                    out[fig.dataset.metric] = svg.querySelectorAll('path.line, circle.dot').length
                      ? Number(svg.getAttribute('data-drawn')) : 0;
                  });
                return out;""")
            return counts if counts and all(counts.get(m, 0) >= 1 for m in
                                            ("rps", "errors", "latency", "workers")) else {}

        await wait_until(drawn, LIVE_TIMEOUT, "all four charts drawn", driver=driver)
        # The requests/s line has gone above its baseline: some point is not at zero.
        await wait_until(lambda: driver.execute_script("""
            var fig = document.querySelector('section[data-service="search"] figure[data-metric="rps"]');
            return /req\\/s/.test(fig.querySelector('[data-f="now-rps"]').textContent) &&
              fig.querySelector('path.area') !== null;"""), LIVE_TIMEOUT,
            "a filled requests/s chart", driver=driver)
        label = await in_thread(driver.execute_script, """return document.querySelector(
            'section[data-service="search"] [data-f="now-workers"]').textContent""")
        self.assertEqual(label, "2/2 ready")
        await self.assert_no_console_errors(driver)

    async def test_a_cgi_service_reads_as_cgi_on_the_card_and_the_traffic_page(self) -> None:
        """Not "Ready 0/4" or "0/0 ready": it keeps no worker, and says what runs."""
        from tests.test_cgi import cgi_config

        config = SEARCH + cgi_config().split("services:", 1)[1]
        daemon, driver = await self.open("/admin/", config)
        card_js = """var card = document.querySelector('article[data-service="script"]');
            var f = function (n) { return card.querySelector('[data-f="' + n + '"]').textContent; };
            return [f('ready-label'), f('ready'), f('cgi')];"""
        for i in range(3):
            code, _ = await daemon.get("/cgi/test/env")
            self.assertEqual(code, 200)
        # Live: the executions appear without a page load.
        await wait_until(lambda: "0 running · 3 runs" in driver.execute_script(card_js)[2],
                         LIVE_TIMEOUT, "the CGI card to count 3 finished runs", driver=driver)
        label, ready, stats = await in_thread(driver.execute_script, card_js)
        self.assertEqual((label, ready), ("Running", "0 of 4"))
        self.assertTrue(stats.startswith("cgi · up to 4 at once · 0 running · 3 runs"), stats)
        await in_thread(driver.get, daemon.admin_url + "/admin/traffic", timeout=LOAD_TIMEOUT)
        now_js = """return document.querySelector(
            'section[data-service="script"] [data-f="now-workers"]').textContent"""
        await wait_until(lambda: driver.execute_script(now_js).startswith("cgi"),
                         LIVE_TIMEOUT, "the CGI workers chart label", driver=driver)
        self.assertEqual(await in_thread(driver.execute_script, now_js),
                         "cgi · up to 4 at once · 0 running")
        await self.assert_no_console_errors(driver)

    async def test_reconnects_by_itself_after_a_daemon_restart(self) -> None:
        daemon, driver = await self.open("/admin/processes")
        await in_thread(driver.execute_script, "window.cgipoolTestMarker = 'same page';")
        old = sorted(daemon.worker_pids())
        daemon.signal("TERM")
        self.assertTrue(await daemon.wait_ended(RESTART_TIMEOUT), daemon.tail())
        await wait_until(lambda: connection(driver) == "reconnecting", LIVE_TIMEOUT,
                         "the indicator to say reconnecting", driver=driver)
        # A new daemon on the same address (its own cleanup stops it first).
        self.patch(browser, "_free_ports", lambda count: [daemon.port, daemon.admin_port])
        second = await start_daemon_process(self, SEARCH)
        new = sorted(second.worker_pids())
        self.assertFalse(set(new) & set(old))
        await wait_until(lambda: connection(driver) == "live" and table_pids(driver) == new,
                         RESTART_TIMEOUT, f"live again with the new pids {new}",
                         driver=driver)
        self.assertIn("The daemon restarted", await in_thread(notices, driver))
        self.assertEqual(await in_thread(driver.execute_script,
                                         "return window.cgipoolTestMarker"), "same page")


async def daemon_log(daemon: Any) -> list[dict[str, Any]]:
    import json

    code, body = await daemon.get("/admin/api/log?limit=50")
    assert code == 200, body
    return list(json.loads(body)["events"])
