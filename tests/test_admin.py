"""The admin app through treq's StubTreq: pages, API, controls and access rules.

The supervisor behind it runs on the fake process reactor, so controls that
replace workers are driven by answering probes and ending processes.
"""

from __future__ import annotations

import html
import ipaddress
import json
import re
from html.parser import HTMLParser
from typing import Any

import treq
from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from cgipool.admin.app import AdminApp
from cgipool.admin.auth import LOGIN_FAILURES, LOGIN_WINDOW, AdminAuth, SessionStore
from cgipool.cgi import CgiPool
from cgipool.config import AdminConfig, Example, PoolConfig, WorkersConfig
from cgipool.health import STARTUP_FIRST_DELAY, HealthMonitor
from cgipool.metrics import Metrics, supervisor_worker_counts
from cgipool.proxy.routes import Root
from cgipool.supervisor.supervisor import Supervisor
from tests.fakes import FakeProbe, FakeProcessReactor, KillRecorder, service

TOKEN = "s3cret-token-for-tests"
HOSTILE = "<script>alert('x')</script>"
CSRF = {b"X-CGIPool-CSRF": [b"1"]}
BASE = "http://127.0.0.1:8080"


class AdminTestCase(TestCase):
    def build(self, admin: AdminConfig | None = None,
              services: tuple[Any, ...] | None = None, metrics: bool = False) -> None:
        self.reactor = FakeProcessReactor()
        self.probe = FakeProbe()
        self.kill = KillRecorder()
        config = PoolConfig(path="pool.yaml", services=services or (
            service("search", workers=WorkersConfig(2, 4)),
            service(HOSTILE, route="/api/evil", description=f"desc {HOSTILE}",
                    examples=(Example(f"/api/evil?q={HOSTILE}"),), workers=WorkersConfig(1, 1)),
        ))
        self.supervisor = Supervisor(config, self.reactor, probe=self.probe,
                                     monitor=HealthMonitor, launcher=["/bin/launch"],
                                     kill=self.kill,
                                     rand=lambda: 0.5, port_free=lambda p: True,
                                     kinds={"cgi": CgiPool})
        self.supervisor.startService()
        self.ready_all()
        self.metrics = (Metrics(self.reactor, list(self.supervisor.pools),
                                worker_counts=supervisor_worker_counts(self.supervisor))
                        if metrics else None)
        self.admin = AdminApp(self.supervisor, clock=self.reactor,
                              auth=AdminAuth(admin or AdminConfig(), self.reactor),
                              metrics=self.metrics)
        self.client = StubTreq(Root({}, local={"admin": self.admin.resource()}))

    def ready_all(self) -> None:
        self.reactor.advance(STARTUP_FIRST_DELAY)
        self.probe.answer()

    def setUp(self) -> None:
        self.build()

    async def call(self, method: str, path: str, headers: dict[bytes, list[bytes]] | None = None,
                   data: Any = None, **kw: Any) -> tuple[int, Any, Any]:
        response = await self.client.request(method, BASE + path, headers=headers,
                                             data=data, **kw)
        body = await treq.content(response)
        kind = (response.headers.getRawHeaders(b"content-type") or [b""])[0]
        if kind.startswith(b"application/json"):
            return response.code, json.loads(body), response
        return response.code, body.decode(), response

    def pool(self, name: str = "search") -> Any:
        return self.supervisor.pools[name]

    def kinds(self) -> list[str]:
        return [e.kind for e in self.supervisor.events]


class PageTests(AdminTestCase):
    async def test_every_page_renders_and_escapes_hostile_strings(self) -> None:
        for path in ("/admin/", "/admin/processes", "/admin/traffic", "/admin/events"):
            code, body, response = await self.call("GET", path)
            self.assertEqual(code, 200, path)
            self.assertIn("search", body)
            self.assertNotIn(HOSTILE, body)
            self.assertNotIn("<script>alert", body)
            self.assertIn(b"DENY", response.headers.getRawHeaders(b"x-frame-options")[0])
        code, body, _ = await self.call("GET", "/admin/processes")
        for worker in self.pool().workers:
            self.assertIn(str(worker.pid), body)

    async def test_unknown_admin_path_is_json_404(self) -> None:
        code, body, _ = await self.call("GET", "/admin/nope")
        self.assertEqual(code, 404)
        self.assertIn("error", body)

    async def test_static_files_by_plain_name_only(self) -> None:
        code, _, _ = await self.call("GET", "/admin/static/..%2fapp.py")
        self.assertEqual(code, 400)  # encoded slash: refused by routing
        code, _, _ = await self.call("GET", "/admin/static/.hidden")
        self.assertEqual(code, 404)
        code, _, _ = await self.call("GET", "/admin/static/nonexistent.js")
        self.assertEqual(code, 404)


PAGES = ("/admin/", "/admin/processes", "/admin/traffic", "/admin/events")
#: A name that would break out of a double- or single-quoted attribute.
QUOTES = 'q"x\' onmouseover="alert(2)'


class _Parsed(HTMLParser):
    """Elements, attributes and text of a page, as a browser's parser sees them."""

    def __init__(self, body: str) -> None:
        super().__init__(convert_charrefs=True)
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.text: list[str] = []
        self.feed(body)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.elements.append((tag, dict(attrs)))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def rows(body: str) -> list[str]:
    """The ``<tr>`` elements of the process table body."""
    tbody = body.split('<tbody id="proc-body">', 1)[1].split("</tbody>", 1)[0]
    return re.findall(r"<tr .*?</tr>", tbody)


def assert_no_inline_code(case: TestCase, body: str, path: str) -> None:
    """The CSP allows no inline script or style: the page must not need any."""
    parsed = _Parsed(body)
    for tag, attrs in parsed.elements:
        case.assertNotEqual(tag, "style", path)
        if tag == "script":
            case.assertRegex(attrs.get("src") or "", r"^/admin/static/[a-z]+\.js$", path)
        bad = [name for name in attrs if name == "style" or name.startswith("on")]
        case.assertEqual(bad, [], (path, tag, attrs))
    case.assertNotRegex(body, r"<script[^>]*>[^<]", path)  # no inline body


class PageContentTests(AdminTestCase):
    """What each server-rendered page shows (JS then keeps it live)."""

    async def test_overview_shows_totals_cards_examples_controls_and_events(self) -> None:
        for i in range(5):
            self.supervisor.events.add("admin", "search", None, f"note {i}")
        code, body, _ = await self.call("GET", "/admin/")
        self.assertEqual(code, 200)
        for label in ("Uptime", "Workers", "Requests/s", "Error rate", "p50", "p95", "p99"):
            self.assertIn(f'<div class="stat-label">{label}</div>', body)
        self.assertIn('data-g="workers">3/3</div>', body)
        card = body.split('data-service="search"', 1)[1].split("</article>", 1)[0]
        self.assertIn('data-state="ok"', body)
        self.assertIn("<code>/api/search</code>", card)
        for worker in self.pool().workers:
            self.assertIn(f'<span class="chip-pid">{worker.pid}</span>', card)
        self.assertIn('data-f="ready">2/2</dd>', card)
        # Scale form within workers.min..max, and the rolling restart button.
        self.assertRegex(card, r'<input type="number" name="workers" min="2" max="4" '
                               r'value="2"')
        self.assertIn('data-action="rolling-restart"', card)
        # The hostile service: examples are links, min == max disables scaling.
        evil = body.split('data-service="&lt;script&gt;', 1)[1].split("</article>", 1)[0]
        self.assertIn('<a href="/api/evil?q=&lt;script&gt;alert(\'x\')&lt;/script&gt;" '
                      'class="ex-path">', evil)
        self.assertIn('disabled="disabled"', evil)
        # Recent events, newest first, at most pages.OVERVIEW_EVENTS.
        seqs = [int(n) for n in re.findall(r'<li class="ev [^"]*" data-seq="(\d+)"', body)]
        self.assertEqual(seqs, sorted(seqs, reverse=True))
        self.assertEqual(len(seqs), 8)
        self.assertEqual(seqs[0], max(e.seq for e in self.supervisor.events))
        assert_no_inline_code(self, body, "/admin/")

    async def test_service_states_shown_on_cards(self) -> None:
        """ok / degraded / failing as they are; starting and stopped are unavailable."""
        self.pool().scale_to(3, "test")  # a third worker, not ready yet: degraded
        code, body, _ = await self.call("GET", "/admin/")
        self.assertIn('<span class="badge state-degraded" data-f="state">degraded</span>',
                      body)
        self.build(services=(service("lonely", workers=WorkersConfig(1, 1)),))
        self.reactor.exit(self.pool("lonely").workers[0].pid, code=1)  # down, in backoff
        code, body, _ = await self.call("GET", "/admin/")
        self.assertIn('data-state="unavailable"', body)
        self.assertIn("unavailable (starting)", body)

    async def test_processes_table_has_a_row_per_worker_with_controls(self) -> None:
        code, body, _ = await self.call("GET", "/admin/processes")
        self.assertEqual(code, 200)
        for column in ("Service", "Worker", "PID", "Port", "State", "Uptime", "Restarts",
                       "Requests", "In flight", "Last health check", "RSS", "CPU"):
            self.assertIn(f'<th scope="col">{column}</th>', body)
        found = rows(body)
        self.assertEqual(len(found), 3)
        for row, worker in zip(found, self.pool().workers):
            self.assertIn(f'data-service="search" data-worker="{worker.index}"', row)
            self.assertIn(f'<td data-f="pid" class="num">{worker.pid}</td>', row)
            self.assertIn(f'<td data-f="port" class="num">{worker.port}</td>', row)
            self.assertIn('<span class="badge state-ready">ready</span>', row)
            self.assertIn('data-action="restart">restart</button>', row)
            self.assertIn('data-action="drain">drain</button>', row)
            self.assertIn('<td data-f="health" class="health-ok">ok', row)
        assert_no_inline_code(self, body, "/admin/processes")

    async def test_processes_show_requests_rss_and_cpu(self) -> None:
        worker = self.pool().workers[0]
        worker.requests = 12345

        class Sampler:
            def stats(self, pid: int) -> dict[str, Any]:
                return {"rss": 3 * 1024 * 1024, "cpu_percent": 12.34}

        self.admin.sampler = Sampler()
        code, body, _ = await self.call("GET", "/admin/processes")
        row = rows(body)[0]
        self.assertIn('<td data-f="requests" class="num">12,345</td>', row)
        self.assertIn('<td data-f="rss" class="num">3.0 MiB</td>', row)
        self.assertIn('<td data-f="cpu" class="num">12.3%</td>', row)

    async def test_traffic_page_has_four_charts_per_service(self) -> None:
        self.build(metrics=True)
        assert self.metrics is not None
        for _ in range(5):
            self.metrics.service("search").record(200, 0.004)
        self.reactor.advance(1)
        self.metrics.tick()
        code, body, _ = await self.call("GET", "/admin/traffic")
        self.assertEqual(code, 200)
        self.assertIn('id="traffic" class="traffic-list" data-window="900"', body)
        for name in ("search", "&lt;script&gt;alert('x')&lt;/script&gt;"):
            section = body.split(f'data-service="{name}"', 1)[1].split("</section>", 1)[0]
            metrics = re.findall(r'<figure class="chart" data-metric="([a-z]+)">', section)
            self.assertEqual(metrics, ["rps", "errors", "latency", "workers"])
            self.assertEqual(section.count('<svg class="chart-svg"'), 4)
        self.assertIn('data-points="1"', body)
        assert_no_inline_code(self, body, "/admin/traffic")

    async def test_overview_shows_the_last_minute_of_traffic(self) -> None:
        self.build(metrics=True)
        assert self.metrics is not None
        for status in (200, 200, 200, 502):
            self.metrics.service("search").record(status, 0.004)
        self.reactor.advance(1)
        self.metrics.tick()
        code, body, _ = await self.call("GET", "/admin/")
        self.assertIn('data-g="error_rate">25.00%</div>', body)
        self.assertIn('data-g="requests_total">4</div>', body)
        self.assertRegex(body, r'data-g="p50">\d\.\d\d ms</div>')

    async def test_events_page_lists_actions_newest_first(self) -> None:
        await self.call("POST", "/admin/api/services/search/scale", headers=CSRF,
                        json={"workers": 3})
        code, body, _ = await self.call("GET", "/admin/events")
        self.assertEqual(code, 200)
        seqs = [int(n) for n in re.findall(r'data-seq="(\d+)"', body)]
        self.assertEqual(seqs, sorted((e.seq for e in self.supervisor.events), reverse=True))
        self.assertIn('<span class="ev-kind">scale</span>', body)
        self.assertIn('<span class="ev-kind">admin</span>', body)
        self.assertIn("scale to 3: search (requested by 127.0.0.1)", body)
        assert_no_inline_code(self, body, "/admin/events")

    async def test_layout_nav_connection_indicator_and_assets(self) -> None:
        for path, current in zip(PAGES, ("Overview", "Processes", "Traffic", "Events")):
            code, body, response = await self.call("GET", path)
            self.assertTrue(body.startswith("<!doctype html>"), path)
            self.assertIn(f'aria-current="page">{current}</a>', body)
            self.assertIn('id="conn" class="conn" role="status" data-state="connecting"', body)
            self.assertIn('id="notice" class="notice" role="status" aria-live="polite"', body)
            self.assertIn('<link rel="stylesheet" href="/admin/static/dashboard.css" />', body)
            self.assertIn('<script src="/admin/static/dashboard.js" defer="defer"></script>',
                          body)
            self.assertIn('name="viewport" content="width=device-width, initial-scale=1"',
                          body)
            csp = response.headers.getRawHeaders(b"content-security-policy")[0]
            self.assertIn(b"script-src 'self'", csp)
            self.assertIn(b"style-src 'self'", csp)

    async def test_login_page_escapes_and_has_no_live_parts(self) -> None:
        self.build(AdminConfig(token=TOKEN, local_networks=(ipaddress.ip_network("10.0.0.0/8"),)))
        code, body, _ = await self.call("GET", "/admin/login")
        self.assertEqual(code, 200)
        self.assertIn('name="token"', body)
        self.assertNotIn("dashboard.js", body)
        assert_no_inline_code(self, body, "/admin/login")


class EscapingTests(AdminTestCase):
    """Hostile names, descriptions, examples and event messages render inert everywhere."""

    def setUp(self) -> None:
        self.build(services=(
            service("search", workers=WorkersConfig(2, 4)),
            service(HOSTILE, route="/api/evil", description=f"desc {HOSTILE}",
                    language=HOSTILE, examples=(Example(f"/api/evil?q={HOSTILE}"),
                                                Example("javascript:alert(3)")),
                    workers=WorkersConfig(1, 1)),
            service(QUOTES, route="/api/quotes", description=QUOTES,
                    examples=(Example(f'/api/quotes?q={QUOTES}'),),
                    workers=WorkersConfig(1, 2)),
        ))
        self.supervisor.events.add("admin", HOSTILE, 0, f"message {HOSTILE} {QUOTES}")

    async def test_every_page_escapes_every_dynamic_string(self) -> None:
        for path in PAGES:
            code, body, _ = await self.call("GET", path)
            self.assertEqual(code, 200, path)
            self.assertNotIn("<script>alert", body, path)
            self.assertNotIn(HOSTILE, body, path)
            parsed = _Parsed(body)
            # Only our own elements: one <script>, the dashboard's; no handler attributes.
            scripts = [a for tag, a in parsed.elements if tag == "script"]
            self.assertEqual(scripts, [{"src": "/admin/static/dashboard.js", "defer": "defer"}],
                             path)
            for tag, attrs in parsed.elements:
                self.assertFalse([n for n in attrs if n.startswith("on")], (path, tag, attrs))
            # The hostile strings are shown (as text, and whole in data attributes).
            text = "".join(parsed.text)
            self.assertIn(HOSTILE, text, path)
            self.assertIn(QUOTES, text, path)
            services = {a["data-service"] for _, a in parsed.elements if "data-service" in a}
            if path != "/admin/events":
                self.assertEqual(services, {"search", HOSTILE, QUOTES}, path)
            assert_no_inline_code(self, body, path)

    async def test_hostile_strings_round_trip_through_data_attributes(self) -> None:
        code, body, _ = await self.call("GET", "/admin/processes")
        # What the browser decodes from data-service is the real name: JS builds the
        # control URLs from it with encodeURIComponent.
        names = {html.unescape(n) for n in re.findall(r'<tr [^>]*data-service="([^"]*)"', body)}
        self.assertEqual(names, {"search", HOSTILE, QUOTES})

    async def test_example_links_are_site_paths_only(self) -> None:
        code, body, _ = await self.call("GET", "/admin/")
        self.assertNotIn('href="javascript:', body)
        self.assertIn('<span class="ex-path">javascript:alert(3)</span>', body)


#: A recycling/autoscaling reason that would break out of text and attributes.
REASON = f"max_rss {HOSTILE} {QUOTES}"


def card(body: str, name: str = "search") -> str:
    """The overview card of service ``name`` (escaped as in the page)."""
    return "<article " + body.split(f'data-service="{name}"', 1)[1].split("</article>", 1)[0]


def attributes(fragment: str, tag: str, **match: str) -> dict[str, str | None]:
    """The attributes (decoded, as a browser sees them) of the first ``tag`` in
    ``fragment`` whose attributes include ``match``."""
    for name, attrs in _Parsed(fragment).elements:
        if name == tag and all(attrs.get(k.replace("_", "-")) == v for k, v in match.items()):
            return attrs
    raise AssertionError(f"no <{tag}> with {match} in {fragment[:300]!r}")


class ElasticPageTests(AdminTestCase):
    """Utilisation, queue, autoscale decisions and leaving workers on the pages."""

    async def test_card_shows_utilisation_queue_and_the_last_decision(self) -> None:
        pool = self.pool()
        pool.workers[0].in_flight = 1
        pool.waiting = [None]
        now = self.reactor.seconds()
        pool.policy.last_decision = {"at": now - 12, "from": 2, "to": 4,
                                     "reason": "load: utilisation 1.00 >= 0.8 for 1s",
                                     "utilisation": 1.0}
        code, body, _ = await self.call("GET", "/admin/")
        self.assertEqual(code, 200)
        search = card(body)
        # 1 in flight + 1 queued over 2 workers x concurrency 1: 100 %, half of it queued.
        self.assertIn('<div class="load level-high" data-f="load">', search)
        self.assertIn('<span class="load-pct" data-f="util">100%</span>', search)
        self.assertEqual(attributes(search, "rect", data_f="util-busy")["width"], "50")
        queued = attributes(search, "rect", data_f="util-queued")
        self.assertEqual((queued["x"], queued["width"]), ("50", "50"))
        self.assertEqual(attributes(search, "svg", data_f="util-bar")["aria-label"],
                         "utilisation 100%")
        self.assertIn('<span data-f="in-flight">1 in flight</span>', search)
        self.assertIn('<span class="queue queued" data-f="queue">queue 1/256</span>', search)
        self.assertIn('<span data-f="capacity">2 slots</span>', search)
        # Autoscaling between workers.min and max, the last decision and how long ago.
        self.assertIn('data-f="autoscale">on · 2–4 workers</span>', search)
        self.assertIn('<p class="decision dir-up" data-f="decision"', search)
        self.assertIn('data-f="decision-move">2 → 4 workers</span>', search)
        self.assertIn('data-f="decision-ago">12s ago</span>', search)
        self.assertIn('data-f="decision-reason">load: utilisation 1.00 &gt;= 0.8 for 1s</span>',
                      search)
        title = attributes(search, "p", data_f="decision")["title"] or ""
        self.assertIn("utilisation 1.00", title)
        # A fixed-size pool is not autoscaled and has made no decision.
        evil = body.split('data-service="&lt;script&gt;', 1)[1].split("</article>", 1)[0]
        self.assertIn('data-f="autoscale">off · fixed at 1</span>', evil)
        self.assertIn('<p class="decision dir-none" data-f="decision">', evil)
        self.assertIn("no scaling decision yet", evil)
        self.assertIn('<div class="load level-low" data-f="load">', evil)
        self.assertIn('data-f="util">0%</span>', evil)
        assert_no_inline_code(self, body, "/admin/")

    async def test_an_idle_pool_and_a_pool_without_capacity(self) -> None:
        self.pool().policy.low_since = self.reactor.seconds() - 65
        code, body, _ = await self.call("GET", "/admin/")
        self.assertIn('data-f="autoscale">on · 2–4 workers · idle 1m 05s</span>', card(body))
        self.assertIn('data-f="util">0%</span>', card(body))
        # No worker serving but requests waiting: the bar is all queue.
        for worker in self.pool().workers:
            worker.retiring = True
        self.pool().waiting = [None] * 3
        code, body, _ = await self.call("GET", "/admin/")
        search = card(body)
        self.assertIn('<div class="load level-over" data-f="load">', search)
        self.assertIn('data-f="util">no capacity</span>', search)
        self.assertEqual(attributes(search, "rect", data_f="util-queued")["width"], "100")

    async def test_hostile_decision_reason_is_escaped(self) -> None:
        """A scaling decision's reason shows in the card's text and title, escaped: markup
        or quotes in it can neither run script nor leave the attribute."""
        self.pool().policy.last_decision = {"at": self.reactor.seconds(), "from": 3, "to": 2,
                                            "reason": REASON, "utilisation": 0.1}
        code, body, _ = await self.call("GET", "/admin/")
        self.assertNotIn("<script>alert", body)
        self.assertNotIn('q"x\' onmouseover="alert(2) (utilisation', body)  # attribute
        search = card(body)
        decision = attributes(search, "p", data_f="decision")
        self.assertEqual(decision["class"], "decision dir-down")
        self.assertIn(REASON, decision["title"] or "")
        self.assertIn(REASON, "".join(_Parsed(search).text))
        assert_no_inline_code(self, body, "/admin/")

    async def test_recycling_and_leaving_workers_are_marked_with_the_reason(self) -> None:
        pool = self.pool()
        recycled, drained = pool.workers[0], pool.workers[1]
        recycled.passive_failures = 2
        self.assertTrue(pool.recycle(recycled, REASON))
        drained.in_flight = 1  # stays draining until its request is done
        self.assertTrue(pool.drain_worker(drained, "admin request"))
        self.assertEqual(drained.state.value, "draining")

        code, body, _ = await self.call("GET", "/admin/")
        self.assertNotIn("<script>alert", body)
        search = card(body)
        chip = attributes(search, "li", data_worker=str(recycled.index))
        self.assertEqual(chip["class"], "chip state-ready chip-recycling")
        self.assertIn(f"recycling: {REASON}", chip["title"] or "")
        self.assertIn("2 failed requests in a row", chip["title"] or "")
        chip = attributes(search, "li", data_worker=str(drained.index))
        self.assertEqual(chip["class"], "chip state-draining chip-leaving")
        self.assertIn("leaving the pool", chip["title"] or "")
        # The draining worker's request counts, but not towards the capacity.
        self.assertIn('data-f="in-flight">1 in flight</span>', search)

        code, body, _ = await self.call("GET", "/admin/processes")
        self.assertNotIn("<script>alert", body)
        self.assertIn('<th scope="col" title="passive health: failed requests in a row '
                      '(refused, broken, unanswered)">Fails</th>', body)
        found = {re.search(r'data-worker="(\d+)"', r).group(1): r for r in rows(body)
                 if 'data-service="search"' in r}
        row = found[str(recycled.index)]
        self.assertIn('<td data-f="passive" class="num warn">2</td>', row)
        self.assertIn('<span class="badge state-ready">ready</span>', row)
        note = attributes(row, "span", data_f="note")
        self.assertEqual(note["class"], "badge note note-recycling")
        self.assertTrue((note["title"] or "").startswith(f"recycling: {REASON} ("))
        self.assertRegex(row, r'<tr class="state-ready leaving"')
        # "draining" says it is leaving: the explanation is the state badge's title.
        row = found[str(drained.index)]
        badge = attributes(row, "span", **{"class": "badge state-draining"})
        self.assertIn("leaving the pool", badge["title"] or "")
        self.assertNotIn('data-f="note"', row)
        self.assertIn('<td data-f="passive" class="num">0</td>', row)
        # The replacement starting for the recycled worker has no note.
        others = [r for i, r in found.items() if i not in (str(recycled.index),
                                                           str(drained.index))]
        self.assertTrue(others)
        for row in others:
            self.assertNotIn('data-f="note"', row)
        assert_no_inline_code(self, body, "/admin/processes")

        # The events page colours the new kinds by their kind class.
        code, body, _ = await self.call("GET", "/admin/events")
        self.assertNotIn("<script>alert", body)
        self.assertRegex(body, r'<li class="ev level-info kind-recycle" data-seq="\d+">')
        self.assertRegex(body, r'<li class="ev level-info kind-drain" data-seq="\d+">')
        self.assertIn(f"recycling pid {recycled.pid}: {html.escape(REASON, quote=False)}",
                      body)

    def test_a_cgi_service_counts_its_executions(self) -> None:
        from cgipool.admin import pages

        svc = {"size": {"min": 1, "max": 4, "desired": 4, "ready": 0}, "concurrency": 1,
               "queue": {"length": 2, "max": 32, "timeout": 5.0}, "autoscale": None,
               "in_flight": 4, "workers": [], "cgi": {"limit": 4, "in_flight": 4}}
        load = pages.service_load(svc)
        self.assertEqual((load["utilisation"], load["level"], load["bar"]), (1.5, "over",
                                                                             (100.0, 0.0)))
        self.assertEqual((pages.fmt_utilisation(load), pages.fmt_queue(load),
                          pages.fmt_capacity(load)), ("150%", "queue 2/32", "4 slots"))
        self.assertEqual(pages.fmt_autoscale(svc), "per request · at most 4 at once")

    async def test_every_page_has_the_reload_control(self) -> None:
        for path in PAGES:
            code, body, _ = await self.call("GET", path)
            button = attributes(body, "button", data_action="reload")
            self.assertEqual(button["type"], "button", path)
            self.assertIn("Reload config", body, path)
        code, body, _ = await self.call("GET", "/admin/login")
        self.assertNotIn('data-action="reload"', body)

    async def test_reload_answers_what_the_control_shows(self) -> None:
        from cgipool.reload import ReloadResult

        code, body, _ = await self.call("POST", "/admin/api/reload", headers=CSRF)
        self.assertEqual(code, 503)  # no reloader in this app

        class Reloader:
            result = ReloadResult(ok=True, updated=("search",), unchanged=(HOSTILE,))

            def reload_and_wait(self) -> defer.Deferred[ReloadResult]:
                return defer.succeed(self.result)

        reloader = Reloader()
        self.admin.offer_reload(reloader)
        code, body, _ = await self.call("POST", "/admin/api/reload", headers=CSRF)
        self.assertEqual(code, 200)
        self.assertEqual(body["summary"], "updated search")
        reloader.result = ReloadResult(ok=False, error=f"pool.yaml:3: {HOSTILE}")
        code, body, _ = await self.call("POST", "/admin/api/reload", headers=CSRF)
        self.assertEqual(code, 400)
        self.assertEqual(body["error"], f"configuration not reloaded: pool.yaml:3: {HOSTILE}")
        code, body, _ = await self.call("POST", "/admin/api/reload")
        self.assertEqual(code, 403)  # no CSRF header

    async def test_script_and_styles_know_the_new_parts(self) -> None:
        code, js, _ = await self.call("GET", "/admin/static/dashboard.js")
        for needle in ("'/admin/api/reload'", "action === 'reload'", "last_decision",
                       "passive_failures", "w.recycling", "queue.length", "'util-busy'"):
            self.assertIn(needle, js)
        code, css, _ = await self.call("GET", "/admin/static/dashboard.css")
        for needle in (".chip.chip-recycling", ".chip.chip-leaving", ".badge.note",
                       ".util-queued", ".kind-scale", ".kind-recycle", ".kind-reload_failed",
                       ".kind-request_timeout", ".badge.state-draining"):
            self.assertIn(needle, css)


class StaticTests(AdminTestCase):
    async def test_assets_are_served_with_their_content_types(self) -> None:
        for name, kind in (("dashboard.js", b"javascript"), ("dashboard.css", b"text/css"),
                           ("favicon.svg", b"image/svg+xml")):
            code, body, response = await self.call("GET", f"/admin/static/{name}")
            self.assertEqual(code, 200, name)
            self.assertIn(kind, response.headers.getRawHeaders(b"content-type")[0], name)
            self.assertGreater(len(body), 100, name)

    async def test_unknown_names_and_path_tricks_are_refused(self) -> None:
        for path in ("nope.js", ".hidden", "..", "dashboard.js.bak", "DASHBOARD.JS",
                     "%2e%2e", "..%2fapp.py", "..%5capp.py", "static", "", "a%00.js"):
            code, body, _ = await self.call("GET", f"/admin/static/{path}")
            self.assertIn(code, (400, 404), path)
            self.assertIn("error", body, path)
        code, _, _ = await self.call("GET", "/admin/static/../app.py")
        self.assertIn(code, (400, 404))
        code, _, _ = await self.call("GET", "/admin/static/sub/dashboard.js")
        self.assertEqual(code, 404)

    async def test_the_script_stays_self_contained_and_builds_no_html(self) -> None:
        code, js, _ = await self.call("GET", "/admin/static/dashboard.js")
        self.assertNotIn("innerHTML", js)
        self.assertNotIn("outerHTML", js)
        self.assertNotIn("insertAdjacentHTML", js)
        self.assertNotIn("document.write", js)
        self.assertNotIn("eval(", js)
        # No CDN or other host: the only URL is the SVG namespace.
        self.assertEqual(set(re.findall(r"https?://[^'\"\s]+", js)),
                         {"http://www.w3.org/2000/svg"})
        for needle in ("new EventSource('/admin/api/events'", "'X-CGIPool-CSRF': '1'",
                       "credentials: 'same-origin'", "'Content-Type': 'application/json'",
                       "EventSource.CLOSED", "/admin/api/metrics?window="):
            self.assertIn(needle.split("'/admin/api/events'")[0], js, needle)
        code, css, _ = await self.call("GET", "/admin/static/dashboard.css")
        self.assertNotRegex(css, r"url\(|@import|https?://")
        self.assertIn("@media (max-width", css)
        self.assertIn("overflow-x: auto", css)


class ReadApiTests(AdminTestCase):
    async def test_status_lists_services_workers_and_version(self) -> None:
        code, body, _ = await self.call("GET", "/admin/api/status")
        self.assertEqual(code, 200)
        names = [s["name"] for s in body["services"]]
        self.assertEqual(names, ["search", HOSTILE])  # JSON carries it verbatim
        search = body["services"][0]
        self.assertEqual(search["state"], "ok")
        self.assertEqual(search["size"], {"min": 2, "max": 4, "desired": 2, "ready": 2})
        for worker in search["workers"]:
            for key in ("id", "pid", "port", "state", "started_at", "uptime", "restarts",
                        "requests", "in_flight", "last_health", "rss", "cpu_percent"):
                self.assertIn(key, worker)
        self.assertIn("version", body)

    async def test_one_service_with_its_events(self) -> None:
        """/admin/api/services/NAME is that service with its own events; an unknown name is
        404 listing the services there are."""
        code, body, _ = await self.call("GET", "/admin/api/services/search")
        self.assertEqual(code, 200)
        self.assertEqual(body["name"], "search")
        self.assertEqual({e["kind"] for e in body["events"]}, {"spawn", "ready"})
        code, body, _ = await self.call("GET", "/admin/api/services/nope")
        self.assertEqual(code, 404)
        self.assertIn("search", body["services"])

    async def test_log_and_bad_arguments(self) -> None:
        """The log API gives `limit` events, newest first, and refuses a limit that is not a
        number from 1 to 1000 with a 400 naming it."""
        code, body, _ = await self.call("GET", "/admin/api/log?limit=2")
        self.assertEqual((code, len(body["events"])), (200, 2))
        self.assertGreater(body["events"][0]["seq"], body["events"][1]["seq"])  # newest first
        for query in ("limit=abc", "limit=0", "limit=5000"):
            code, body, _ = await self.call("GET", f"/admin/api/log?{query}")
            self.assertEqual(code, 400, query)
            self.assertIn("limit", body["error"])

    async def test_metrics_api_without_metrics_is_503_json(self) -> None:
        code, body, _ = await self.call("GET", "/admin/api/metrics")
        self.assertEqual(code, 503)
        self.assertIn("error", body)


class ControlTests(AdminTestCase):
    async def test_scale_changes_the_pool_and_logs_the_action(self) -> None:
        code, body, _ = await self.call("POST", "/admin/api/services/search/scale",
                                        headers=CSRF, json={"workers": 3})
        self.assertEqual((code, body["before"], body["after"]), (200, 2, 3))
        self.assertEqual(self.pool().desired, 3)
        admin = [e for e in self.supervisor.events if e.kind == "admin"]
        self.assertIn("scale to 3", admin[-1].message)
        self.assertIn("127.0.0.1", admin[-1].message)

    async def test_scale_refuses_bad_input_and_changes_nothing(self) -> None:
        cases = [({"workers": 9}, 400, "between 2 and 4"), ({"workers": "3"}, 400, "integer"),
                 ({}, 400, "integer"), ({"workers": True}, 400, "integer")]
        for body, status, message in cases:
            code, answer, _ = await self.call("POST", "/admin/api/services/search/scale",
                                              headers=CSRF, json=body)
            self.assertEqual(code, status, body)
            self.assertIn(message, answer["error"])
        code, answer, _ = await self.call(
            "POST", "/admin/api/services/search/scale",
            headers={**CSRF, b"Content-Type": [b"application/json"]}, data=b"{nope")
        self.assertEqual(code, 400)
        self.assertIn("invalid JSON", answer["error"])
        code, answer, _ = await self.call("POST", "/admin/api/services/search/scale",
                                          headers=CSRF, data=b"workers=3")
        self.assertEqual(code, 415)
        self.assertEqual(self.pool().desired, 2)
        self.assertNotIn("admin", self.kinds())

    async def test_controls_are_post_only(self) -> None:
        """A GET to a control is 405 with Allow: POST and changes nothing: a link or a
        prefetch cannot scale a pool."""
        code, body, response = await self.call("GET", "/admin/api/services/search/scale")
        self.assertEqual(code, 405)
        self.assertIn("POST", body["error"])
        self.assertEqual(response.headers.getRawHeaders(b"allow"), [b"POST"])

    async def test_restart_worker_answers_once_the_replacement_is_ready(self) -> None:
        pool = self.pool()
        old = pool.workers[0]
        old_pid = old.pid
        pending = defer.ensureDeferred(
            self.call("POST", "/admin/api/services/search/workers/0/restart", headers=CSRF))
        self.ready_all()  # the replacement passes its first probe
        self.reactor.exit(old_pid)  # the drained old worker exits after SIGTERM
        self.client.flush()
        code, body, _ = await pending
        self.assertEqual(code, 200)
        self.assertEqual((body["done"], body["old_pid"]), (True, old_pid))
        self.assertNotEqual(body["replacement"]["pid"], old_pid)
        self.assertNotIn(old, pool.workers)
        self.assertEqual(len(pool.ready), 2)

    async def test_restart_that_takes_long_answers_202(self) -> None:
        pending = defer.ensureDeferred(
            self.call("POST", "/admin/api/services/search/workers/1/restart", headers=CSRF))
        self.reactor.advance(10)
        self.client.flush()
        code, body, _ = await pending
        self.assertEqual((code, body["done"]), (202, False))

    async def test_restart_unknown_worker_or_service_is_404(self) -> None:
        code, body, _ = await self.call("POST", "/admin/api/services/search/workers/7/restart",
                                        headers=CSRF)
        self.assertEqual(code, 404)
        self.assertEqual(body["workers"], [0, 1])
        code, _, _ = await self.call("POST", "/admin/api/services/nope/workers/0/restart",
                                     headers=CSRF)
        self.assertEqual(code, 404)

    async def test_drain_then_drain_again_is_409(self) -> None:
        code, body, _ = await self.call("POST", "/admin/api/services/search/workers/1/drain",
                                        headers=CSRF)
        self.assertEqual((code, body["replaced"]), (202, True))
        code, body, _ = await self.call("POST", "/admin/api/services/search/workers/1/drain",
                                        headers=CSRF)
        self.assertEqual(code, 409)

    async def test_rolling_restart_twice_is_409(self) -> None:
        """A rolling restart while one runs is refused with 409 instead of starting a second
        over the first."""
        code, body, _ = await self.call("POST", "/admin/api/services/search/rolling-restart",
                                        headers=CSRF)
        self.assertEqual(code, 202)
        self.assertTrue(self.pool().rolling)
        code, body, _ = await self.call("POST", "/admin/api/services/search/rolling-restart",
                                        headers=CSRF)
        self.assertEqual(code, 409)


class AccessTests(AdminTestCase):
    """127.0.0.1 is the client of StubTreq; a config without it makes it remote."""

    def remote(self, token: str | None = None) -> None:
        self.build(AdminConfig(token=token,
                               local_networks=(ipaddress.ip_network("10.0.0.0/8"),)))

    async def test_remote_client_refused_without_a_configured_token(self) -> None:
        self.remote()
        code, body, _ = await self.call("GET", "/admin/api/status")
        self.assertEqual(code, 403)
        self.assertIn("admin.token", body["error"])
        code, _, _ = await self.call("GET", "/admin/")
        self.assertEqual(code, 403)
        code, _, _ = await self.call("GET", "/admin/nope")
        self.assertEqual(code, 403)

    async def test_remote_client_needs_the_bearer_token(self) -> None:
        self.remote(TOKEN)
        code, body, response = await self.call("GET", "/admin/api/status")
        self.assertEqual(code, 401)
        self.assertIn(b"Bearer", response.headers.getRawHeaders(b"www-authenticate")[0])
        code, body, _ = await self.call("GET", "/admin/api/status",
                                        headers={b"Authorization": [b"Bearer wrong-token-xyz"]})
        self.assertEqual(code, 403)
        code, body, _ = await self.call("GET", "/admin/api/status",
                                        headers={b"Authorization": [f"Bearer {TOKEN}".encode()]})
        self.assertEqual(code, 200)

    async def test_a_browser_without_a_session_is_sent_to_the_login_form(self) -> None:
        """Pages answer a browser (Accept: text/html) with a redirect to the
        login form; the API and other clients keep the JSON 401."""
        self.remote(TOKEN)
        html = {b"Accept": [b"text/html,application/xhtml+xml,*/*;q=0.8"]}
        for path in ("/admin/", "/admin/processes"):
            response = await self.client.get(BASE + path, headers=html, allow_redirects=False)
            await treq.content(response)
            self.assertEqual(response.code, 303, path)
            self.assertEqual(response.headers.getRawHeaders(b"location"), [b"/admin/login"])
        code, body, _ = await self.call("GET", "/admin/api/status", headers=html)
        self.assertEqual(code, 401)
        code, body, _ = await self.call("GET", "/admin/")
        self.assertEqual(code, 401)
        self.assertIn("log in", body["error"])

    async def test_bearer_token_is_enough_for_changes(self) -> None:
        self.remote(TOKEN)
        code, _, _ = await self.call("POST", "/admin/api/services/search/scale",
                                     headers={b"Authorization": [f"Bearer {TOKEN}".encode()]},
                                     json={"workers": 3})
        self.assertEqual(code, 200)

    async def test_login_cookie_then_changes_need_the_csrf_header(self) -> None:
        self.remote(TOKEN)
        code, body, _ = await self.call("POST", "/admin/login", data={"token": "nope"})
        self.assertEqual(code, 403)
        self.assertIn("Wrong token", body)
        response = await self.client.post(BASE + "/admin/login", data={"token": TOKEN},
                                          allow_redirects=False)
        self.assertEqual(response.code, 303)
        cookie = response.headers.getRawHeaders(b"set-cookie")[0]
        self.assertIn(b"HttpOnly", cookie)
        self.assertIn(b"samesite=strict", cookie.lower())
        session = {b"Cookie": [cookie.split(b";")[0]]}
        code, _, _ = await self.call("GET", "/admin/api/status", headers=session)
        self.assertEqual(code, 200)
        code, body, _ = await self.call("POST", "/admin/api/services/search/scale",
                                        headers=session, json={"workers": 3})
        self.assertEqual(code, 403)
        self.assertIn("X-CGIPool-CSRF", body["error"])
        code, _, _ = await self.call("POST", "/admin/api/services/search/scale",
                                     headers={**session, **CSRF}, json={"workers": 3})
        self.assertEqual(code, 200)

    async def login(self, token: str = TOKEN) -> tuple[int, bytes | None, Any]:
        """POST the login form: (status, the session cookie pair or None, response)."""
        response = await self.client.post(BASE + "/admin/login", data={"token": token},
                                          allow_redirects=False)
        await treq.content(response)
        cookies = response.headers.getRawHeaders(b"set-cookie") or []
        return response.code, (cookies[0].split(b";")[0] if cookies else None), response

    async def test_session_cookie_is_random_scoped_to_the_admin_and_strict(self) -> None:
        """Each login gets its own 256-bit id (not derived from the token), sent
        only to /admin, unreadable by scripts and never cross-site."""
        self.remote(TOKEN)
        code, first, response = await self.login()
        self.assertEqual(code, 303)
        cookie = response.headers.getRawHeaders(b"set-cookie")[0].lower()
        for part in (b"path=/admin", b"httponly", b"samesite=strict"):
            self.assertIn(part, cookie)
        self.assertNotIn(b"path=/;", cookie + b";")
        _, second, _ = await self.login()
        assert first is not None and second is not None
        self.assertNotEqual(first, second)
        value = first.split(b"=", 1)[1]
        self.assertGreaterEqual(len(value), 43)  # 32 random bytes, base64url
        self.assertNotIn(TOKEN.encode(), value)
        self.assertEqual(len(self.admin.auth.sessions), 2)

    async def test_the_session_cookie_is_secure_over_tls(self) -> None:
        """Served over TLS (the request is secure), the cookie is ``Secure`` too,
        so the browser never sends it over plain HTTP."""
        self.remote(TOKEN)
        response = await self.client.post("https://127.0.0.1:8081/admin/login",
                                          data={"token": TOKEN}, allow_redirects=False)
        await treq.content(response)
        self.assertEqual(response.code, 303)
        cookie = response.headers.getRawHeaders(b"set-cookie")[0].lower()
        self.assertIn(b"; secure", cookie)
        _, plain, plain_response = await self.login()
        self.assertNotIn(b"secure", plain_response.headers.getRawHeaders(b"set-cookie")[0].lower())

    async def test_sessions_end_when_idle_at_their_lifetime_at_logout_and_on_a_new_token(
            self) -> None:
        self.build(AdminConfig(token=TOKEN, local_networks=(ipaddress.ip_network("10.0.0.0/8"),),
                               session_idle=60, session_lifetime=300))
        _, cookie, _ = await self.login()
        session = {b"Cookie": [cookie]}

        async def status() -> int:
            code, _, _ = await self.call("GET", "/admin/api/status", headers=session)
            return code

        self.assertEqual(await status(), 200)
        self.reactor.advance(59)
        self.assertEqual(await status(), 200, "used within session_idle: still valid")
        self.reactor.advance(61)
        self.assertEqual(await status(), 401, "idle for longer than session_idle")
        # The absolute limit holds however often the session is used.
        _, cookie, _ = await self.login()
        session = {b"Cookie": [cookie]}
        for _ in range(5):
            self.reactor.advance(50)
            self.assertEqual(await status(), 200)
        self.reactor.advance(51)
        code, body, _ = await self.call("GET", "/admin/api/status", headers=session)
        self.assertEqual(code, 401)
        self.assertIn("session has ended", body["error"])
        # Logout forgets it in the daemon (a copy of the cookie is worthless).
        _, cookie, _ = await self.login()
        session = {b"Cookie": [cookie]}
        response = await self.client.post(BASE + "/admin/logout", headers=session,
                                          allow_redirects=False)
        await treq.content(response)
        self.assertEqual(response.code, 303)
        gone = response.headers.getRawHeaders(b"set-cookie")[0].lower()
        self.assertIn(b"max-age=0", gone)
        self.assertEqual(await status(), 401)
        # A new token (a reload) ends every session.
        _, cookie, _ = await self.login()
        session = {b"Cookie": [cookie]}
        self.assertEqual(await status(), 200)
        self.admin.auth.configure(AdminConfig(
            token="another-token-0123456789",
            local_networks=(ipaddress.ip_network("10.0.0.0/8"),)))
        self.assertEqual(await status(), 401)
        self.assertEqual(len(self.admin.auth.sessions), 0)

    async def test_a_planted_cookie_of_the_same_name_does_not_shadow_the_session(
            self) -> None:
        """A service's page can set ``cgipool_admin=x; path=/`` with
        document.cookie; the browser then sends both values, in either order."""
        self.remote(TOKEN)
        _, cookie, _ = await self.login()
        assert cookie is not None
        for header in (cookie + b"; cgipool_admin=planted", b"cgipool_admin=planted; " + cookie):
            code, _, _ = await self.call("GET", "/admin/api/status",
                                         headers={b"Cookie": [header]})
            self.assertEqual(code, 200, header)
        code, _, _ = await self.call("GET", "/admin/api/status",
                                     headers={b"Cookie": [b"cgipool_admin=planted"]})
        self.assertEqual(code, 401)

    async def test_failed_logins_are_limited_per_client_with_retry_after(self) -> None:
        self.remote(TOKEN)
        for _ in range(LOGIN_FAILURES - 1):
            code, _, _ = await self.login("wrong-token-guess")
            self.assertEqual(code, 403)
        code, _, response = await self.login("wrong-token-guess")
        self.assertEqual(code, 429)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"300"])
        self.assertEqual(response.phrase, b"Too Many Requests")
        code, cookie, _ = await self.login()
        self.assertEqual((code, cookie), (429, None), "even the right token waits")
        # Guessing through the bearer token counts the same way.
        code, body, response = await self.call(
            "GET", "/admin/api/status", headers={b"Authorization": [f"Bearer {TOKEN}".encode()]})
        self.assertEqual(code, 429)
        self.assertIn("error", body)
        self.reactor.advance(LOGIN_WINDOW)
        code, cookie, _ = await self.login()
        self.assertEqual(code, 303)
        self.assertIsNotNone(cookie)

    async def test_wrong_bearer_tokens_are_limited_too(self) -> None:
        self.remote(TOKEN)
        wrong = {b"Authorization": [b"Bearer wrong-token-guess-0000"]}
        codes = [(await self.call("GET", "/admin/api/status", headers=wrong))[0]
                 for _ in range(LOGIN_FAILURES + 1)]
        self.assertEqual(codes, [403] * LOGIN_FAILURES + [429])

    async def test_reads_loaded_by_another_origins_page_are_refused(self) -> None:
        """Fetch Metadata: a worker's page (same site, another origin) may link to
        the admin but not load it as a subresource or read it with fetch()."""
        for mode, dest in ((b"cors", b"empty"), (b"no-cors", b"image"), (b"no-cors", b"script")):
            code, body, _ = await self.call("GET", "/admin/api/status", headers={
                b"Sec-Fetch-Site": [b"same-site"], b"Sec-Fetch-Mode": [mode],
                b"Sec-Fetch-Dest": [dest]})
            self.assertEqual(code, 403, (mode, dest))
            self.assertIn("cross-origin", body["error"])
        code, _, _ = await self.call("GET", "/admin/", headers={
            b"Sec-Fetch-Site": [b"same-site"], b"Sec-Fetch-Mode": [b"navigate"],
            b"Sec-Fetch-Dest": [b"document"]})
        self.assertEqual(code, 200, "a link from another page opens the dashboard")
        code, _, _ = await self.call("GET", "/admin/api/status", headers={
            b"Sec-Fetch-Site": [b"same-origin"], b"Sec-Fetch-Mode": [b"cors"]})
        self.assertEqual(code, 200, "the dashboard's own fetches")

    async def test_local_changes_need_the_csrf_header(self) -> None:
        code, body, _ = await self.call("POST", "/admin/api/services/search/scale",
                                        json={"workers": 3})
        self.assertEqual(code, 403)
        self.assertEqual(self.pool().desired, 2)

    async def test_cross_site_and_cross_origin_changes_are_refused(self) -> None:
        for headers in ({b"Sec-Fetch-Site": [b"cross-site"]},
                        {b"Origin": [b"http://evil.example"]}):
            code, body, _ = await self.call("POST", "/admin/api/services/search/scale",
                                            headers={**CSRF, **headers}, json={"workers": 3})
            self.assertEqual(code, 403, headers)
        code, _, _ = await self.call(
            "POST", "/admin/api/services/search/scale", json={"workers": 3},
            headers={**CSRF, b"Origin": [BASE.encode()], b"Sec-Fetch-Site": [b"same-origin"]})
        self.assertEqual(code, 200)

    async def test_dns_rebinding_host_is_refused_for_tokenless_access(self) -> None:
        code, body, _ = await self.call("GET", "/admin/api/status",
                                        headers={b"Host": [b"rebind.evil.example"]})
        self.assertEqual(code, 403)
        self.assertIn("Host", body["error"])
        for host in (b"localhost:8080", b"127.0.0.1", b"[::1]:8080"):
            code, _, _ = await self.call("GET", "/admin/api/status", headers={b"Host": [host]})
            self.assertEqual(code, 200, host)


class UnavailableServiceControlTests(AdminTestCase):
    def setUp(self) -> None:
        self.build(services=(
            service("search", workers=WorkersConfig(2, 4)),
            service("csharp", route="/api/csharp", workers=WorkersConfig(2, 3),
                    command=(), unavailable="no runtime installed (mono: not found)"),
        ))

    async def test_controls_of_an_unavailable_service_are_409(self) -> None:
        headers = {b"x-cgipool-csrf": [b"1"], b"content-type": [b"application/json"]}
        for path, data in (("/admin/api/services/csharp/scale", b'{"workers": 3}'),
                           ("/admin/api/services/csharp/rolling-restart", b"")):
            code, body, _ = await self.call("POST", path, headers=headers, data=data)
            self.assertEqual(code, 409, path)
            self.assertEqual(body["state"], "unavailable")
            self.assertIn("unavailable", body["error"])
        self.assertNotIn("admin", [e.kind for e in self.supervisor.events])


class CgiServiceCardTests(AdminTestCase):
    def setUp(self) -> None:
        self.build(services=(
            service("search", workers=WorkersConfig(2, 4)),
            service("cgi-shell", route="/api/cgi-shell", workers=WorkersConfig(1, 4),
                    command=("/bin/sh", "hello.sh"), protocol="cgi"),
        ))

    async def test_cgi_card_shows_executions_timeouts_and_exit_codes(self) -> None:
        pool = self.supervisor.pools["cgi-shell"]
        pool.executions, pool.timeouts, pool.failures = 12, 1, 2
        pool.last_exit_codes.extend([0, 0, 3])
        code, page, _ = await self.call("GET", "/admin/")
        self.assertEqual(code, 200)
        card = page.split('data-service="cgi-shell"', 1)[1].split("</article>", 1)[0]
        self.assertIn("cgi · up to 4 at once · 0 running · 12 runs · 0 queued · 1 timeouts · "
                      "2 failed · exit codes 0 0 3", card)
        # Not "Ready 0/4": a CGI service keeps no worker, so it says what runs.
        self.assertIn('<dt data-f="ready-label">Running</dt><dd data-f="ready">0 of 4</dd>', card)
        code, page, _ = await self.call("GET", "/admin/traffic")
        section = page.split('data-service="cgi-shell"', 1)[1].split("</section>", 1)[0]
        self.assertIn('data-protocol="cgi"', section)
        self.assertIn("CGI scripts", section)
        self.assertNotIn(">total<", section)
        traffic = page.split('data-service="search"', 1)[1].split("</section>", 1)[0]
        self.assertIn(">Workers<", traffic)
        code, page, _ = await self.call("GET", "/admin/")
        search = page.split('data-service="search"', 1)[1].split("</article>", 1)[0]
        self.assertIn('class="cgi-stats" data-f="cgi" hidden="hidden"', search)
        code, status, _ = await self.call("GET", "/admin/api/status")
        cgi = [s for s in status["services"] if s["name"] == "cgi-shell"][0]["cgi"]
        self.assertEqual((cgi["executions"], cgi["timeouts"], cgi["last_exit_codes"][-1]),
                         (12, 1, 3))


class SessionStoreTests(TestCase):
    def test_a_session_belongs_to_the_address_that_logged_in(self) -> None:
        """A cookie copied to another address is refused (and stays valid for
        its owner)."""
        clock = Clock()
        store = SessionStore(clock, idle=60, lifetime=600)
        session_id = store.create("192.0.2.1")
        self.assertFalse(store.valid(session_id, "192.0.2.2"))
        self.assertTrue(store.valid(session_id, "192.0.2.1"))
        self.assertFalse(store.valid("made-up", "192.0.2.1"))

    def test_the_number_of_sessions_is_bounded_oldest_first(self) -> None:
        clock = Clock()
        store = SessionStore(clock, idle=60, lifetime=600, limit=3)
        ids = [store.create("192.0.2.1") for _ in range(4)]
        self.assertEqual(len(store), 3)
        self.assertFalse(store.valid(ids[0], "192.0.2.1"))
        self.assertTrue(all(store.valid(i, "192.0.2.1") for i in ids[1:]))

    def test_ipv6_clients_are_counted_by_their_64(self) -> None:
        """One host usually holds a whole /64: rotating addresses in it does not
        give a guesser more tries."""
        from cgipool.admin.auth import client_key

        class Request:
            def __init__(self, host: str) -> None:
                self.host = host

            def getClientAddress(self) -> Any:
                return self

        self.assertEqual(client_key(Request("2001:db8::1")), client_key(Request("2001:db8::ffff")))
        self.assertNotEqual(client_key(Request("2001:db8::1")),
                            client_key(Request("2001:db8:0:1::1")))
        self.assertEqual(client_key(Request("::ffff:192.0.2.7")), "192.0.2.7")
