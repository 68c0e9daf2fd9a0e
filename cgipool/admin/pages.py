"""Server-rendered admin pages (twisted.web.template: every dynamic string is escaped).

Each page is complete without JavaScript; ``static/dashboard.js`` then keeps it
live from the SSE stream.  The markup is the contract between the two: values
JS refreshes carry ``data-g`` (daemon-wide) or ``data-f`` (per service card or
process row) attributes, cards and rows are keyed by ``data-service`` and
``data-worker``, control buttons by ``data-action``.  The page's CSP forbids
inline scripts and styles, so there are none: no ``style=``, no ``<script>``
body, initial values travel in ``data-`` attributes.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from twisted.web.template import Tag, flattenString

from cgipool import __version__

NAV = (("overview", "/admin/", "Overview"), ("processes", "/admin/processes", "Processes"),
       ("traffic", "/admin/traffic", "Traffic"), ("events", "/admin/events", "Events"))
TITLES = {"overview": "Overview", "processes": "Processes", "traffic": "Traffic",
          "events": "Events"}
DASH = "–"
#: Pool states shown as they are; any other (``starting``, ``stopped``) is ``unavailable``.
SHOWN_STATES = ("ok", "degraded", "failing")
#: How many events the overview lists.
OVERVIEW_EVENTS = 8
PROCESS_COLUMNS = (
    ("service", "Service"), ("id", "Worker"), ("pid", "PID"), ("port", "Port"),
    ("state", "State"), ("uptime", "Uptime"), ("restarts", "Restarts"),
    ("requests", "Requests"), ("in_flight", "In flight"), ("passive", "Fails"),
    ("health", "Last health check"), ("rss", "RSS"), ("cpu", "CPU"),
)
#: Process table columns shown right-aligned in monospace.
NUMERIC_COLUMNS = ("id", "pid", "port", "uptime", "restarts", "requests", "in_flight",
                   "passive", "rss", "cpu")
CHARTS = (("rps", "Requests/s"), ("errors", "Errors/s"), ("latency", "Latency (ms)"),
          ("workers", "Workers"))


class _Tags:
    """``tags.name(...)`` builds a :class:`Tag` of any HTML5 element (twisted's own
    ``tags`` knows no ``main``, ``nav``, ``time``...)."""

    def __getattr__(self, name: str) -> Tag:
        return Tag(name)


tags = _Tags()


#: Why a CGI service's card has no rolling restart (dashboard.js says the same).
CGI_NO_ROLLING = "a CGI script runs once per request: nothing to restart"


# -- formatting (static/dashboard.js has the same functions) --------------------------


def service_state(state: str) -> str:
    """The state a service card shows: ok, degraded, failing or unavailable."""
    return state if state in SHOWN_STATES else "unavailable"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def fmt_ms(value: float | None) -> str:
    if value is None:
        return DASH
    if value < 10:
        return f"{value:.2f} ms"
    if value < 100:
        return f"{value:.1f} ms"
    return f"{value:.0f} ms"


def fmt_rate(value: float | None) -> str:
    return DASH if value is None else f"{value:,.1f}"


def fmt_percent(fraction: float | None) -> str:
    return DASH if fraction is None else f"{fraction * 100:.2f}%"


def fmt_count(value: int | None) -> str:
    return DASH if value is None else f"{value:,}"


def fmt_bytes(value: int | None) -> str:
    if value is None:
        return DASH
    return f"{value / (1 << 20):.1f} MiB"


def fmt_cpu(value: float | None) -> str:
    return DASH if value is None else f"{value:.1f}%"


def fmt_health(health: dict[str, Any] | None) -> str:
    if not health:
        return DASH
    if health.get("ok"):
        latency = health.get("latency_ms")
        return "ok" if latency is None else f"ok · {fmt_ms(latency)}"
    return "failed · " + str(health.get("error") or "no answer")


def fmt_clock(when: float | None) -> str:
    return DASH if when is None else time.strftime("%H:%M:%S", time.localtime(when))


def _text(value: Any) -> str:
    return DASH if value is None else str(value)


def fmt_ago(seconds: float | None) -> str:
    return DASH if seconds is None else fmt_duration(max(0.0, seconds)) + " ago"


# -- elastic pools: load, autoscaling, workers leaving (same in dashboard.js) ----------


def service_load(svc: dict[str, Any]) -> dict[str, Any]:
    """What the autoscaler weighs: requests in flight on workers that stay plus those
    waiting in the queue (``demand``) over ``capacity`` = serving (ready + starting,
    not leaving) workers × ``concurrency``; a CGI service's slots are its limit."""
    queue = svc.get("queue") or {}
    queued = int(queue.get("length") or 0)
    cgi = svc.get("cgi")
    if cgi:
        busy = int(cgi.get("in_flight") or 0)
        serving = capacity = int(cgi.get("limit") or 0)
        concurrency = 1
    else:
        concurrency = int(svc.get("concurrency") or 1)
        staying = [w for w in svc.get("workers") or () if not w.get("retiring")]
        busy = sum(int(w.get("in_flight") or 0) for w in staying)
        serving = sum(1 for w in staying if w.get("state") in ("ready", "starting"))
        capacity = serving * concurrency
    demand = busy + queued
    utilisation = demand / capacity if capacity else None
    if capacity and busy >= capacity:
        bar_busy, bar_queued = 100.0, 0.0
    elif capacity:
        bar_busy = busy / capacity * 100
        bar_queued = min(queued / capacity * 100, 100 - bar_busy)
    else:
        bar_busy, bar_queued = 0.0, (100.0 if demand else 0.0)
    if utilisation is None:
        level = "over" if demand else "idle"
    elif utilisation > 1:
        level = "over"
    elif utilisation >= 0.8:
        level = "high"
    elif utilisation >= 0.5:
        level = "mid"
    else:
        level = "low"
    return {"busy": busy, "queued": queued, "queue_max": queue.get("max"),
            "in_flight": svc.get("in_flight", busy), "serving": serving,
            "concurrency": concurrency, "capacity": capacity, "utilisation": utilisation,
            "level": level, "bar": (round(bar_busy, 1), round(bar_queued, 1))}


def fmt_utilisation(load: dict[str, Any]) -> str:
    u = load["utilisation"]
    if u is None:
        return "no capacity" if load["busy"] + load["queued"] else DASH
    return f"{u * 100:.0f}%"


def fmt_queue(load: dict[str, Any]) -> str:
    return f"queue {load['queued']}/{_text(load['queue_max'])}"


def fmt_capacity(load: dict[str, Any]) -> str:
    slots = f"{load['capacity']} slot" + ("" if load["capacity"] == 1 else "s")
    if load["concurrency"] == 1:
        return slots
    return f"{slots} ({load['serving']} × {load['concurrency']})"


def fmt_cgi_kind(cgi: dict[str, Any] | None) -> str:
    """What a CGI service is, in place of "0/4 workers ready" (it keeps no worker):
    ``cgi · up to 4 at once · 2 running``."""
    if not cgi:
        return ""
    return (f"cgi · up to {fmt_count(cgi.get('limit'))} at once · "
            f"{fmt_count(cgi.get('in_flight'))} running")


def fmt_cgi(cgi: dict[str, Any] | None) -> str:
    """A CGI service's executions at a glance (RFC 3875 scripts run per request)."""
    if not cgi:
        return ""
    codes = cgi.get("last_exit_codes") or []
    text = (f"{fmt_cgi_kind(cgi)} · {fmt_count(cgi.get('executions'))} runs · "
            f"{fmt_count(cgi.get('queued'))} queued · "
            f"{fmt_count(cgi.get('timeouts'))} timeouts · "
            f"{fmt_count(cgi.get('failures'))} failed")
    if codes:
        text += " · exit codes " + " ".join(_text(c) for c in codes[-8:])
    return text


def fmt_autoscale(svc: dict[str, Any]) -> str:
    size = svc["size"]
    auto = svc.get("autoscale") or {}
    if svc.get("cgi"):
        return f"per request · at most {svc['cgi'].get('limit')} at once"
    span = f"{size['min']}–{size['max']} workers"
    if auto.get("enabled"):
        idle = auto.get("idle_for")
        return f"on · {span}" + ("" if idle is None else f" · idle {fmt_duration(idle)}")
    if size["min"] == size["max"]:
        return f"off · fixed at {size['min']}"
    return f"off · {span}"


def decision_parts(svc: dict[str, Any], now: float | None) -> tuple[str, str, str, str, str]:
    """The last autoscale decision: (move, ago, reason, title, direction)."""
    decision = (svc.get("autoscale") or {}).get("last_decision")
    if not decision:
        return "no scaling decision yet", "", "", "", "none"
    before, after = decision.get("from"), decision.get("to")
    move = f"{_text(before)} → {_text(after)} workers"
    at = decision.get("at")
    ago = fmt_ago(None if at is None or now is None else now - at)
    reason = str(decision.get("reason") or "")
    title = f"scaled {move} at {fmt_clock(at)}: {reason}"
    if decision.get("utilisation") is not None:
        title += f" (utilisation {decision['utilisation']:.2f})"
    direction = ("up" if isinstance(before, int) and isinstance(after, int) and after > before
                 else "down")
    return move, ago, reason, title, direction


def worker_note(w: dict[str, Any]) -> tuple[str, str] | None:
    """A worker on its way out: (label, explanation), or None."""
    if w.get("recycling"):
        return "recycling", (f"recycling: {w['recycling']} (a replacement starts first, "
                             "then this worker drains)")
    if w.get("retiring") or w.get("state") == "draining":
        return "leaving", ("leaving the pool: no new requests; it stops once its "
                           "requests in flight are done")
    return None


# -- the layout ------------------------------------------------------------------------


def _flatten(root: Tag) -> bytes:
    """The markup of ``root`` (our trees have no Deferreds: flattening is synchronous)."""
    out: list[Any] = []
    flattenString(None, root).addBoth(out.append)
    (result,) = out
    if not isinstance(result, bytes):
        result.raiseException()
    return b"<!doctype html>\n" + result


def _layout(title: str, active: str, body: Iterable[Any],
            snapshot: dict[str, Any] | None = None, live: bool = True,
            session: bool = False, proxy: str = "") -> bytes:
    nav = tags.nav(class_="nav", **{"aria-label": "Admin pages"})(*[
        tags.a(label, href=href, **({"aria-current": "page"} if key == active else {}))
        for key, href, label in NAV])
    version = (snapshot or {}).get("version", __version__)
    started = (snapshot or {}).get("started_at")
    head = tags.head(
        tags.meta(charset="utf-8"),
        tags.meta(name="viewport", content="width=device-width, initial-scale=1"),
        tags.meta(name="color-scheme", content="dark"),
        tags.title(f"{title} · cgipool"),
        tags.link(rel="icon", href="/admin/static/favicon.svg", type="image/svg+xml"),
        tags.link(rel="stylesheet", href="/admin/static/dashboard.css"),
        tags.script(src="/admin/static/dashboard.js", defer="defer") if live else "",
    )
    header = tags.header(class_="top")(
        tags.a(href="/admin/", class_="brand")(tags.span(class_="logo", **{"aria-hidden": "true"}),
                                               "cgipool"),
        nav,
        tags.button("Reload config", type="button", class_="btn btn-small btn-reload",
                    title="Re-read the configuration file (like make reload): an invalid "
                          "file is refused and the running configuration stays",
                    **{"data-action": "reload"}) if live else "",
        tags.span(id="conn", class_="conn", role="status", **{"data-state": "connecting"})(
            tags.span(class_="dot", **{"aria-hidden": "true"}),
            tags.span("connecting", class_="conn-text")) if live else "",
        tags.form(method="post", action="/admin/logout", class_="logout")(
            tags.button("Log out", type="submit", class_="btn btn-small")) if session else "",
    )
    notice = tags.div(id="notice", class_="notice", role="status",
                      **{"aria-live": "polite", "hidden": "hidden"})
    footer = tags.footer(class_="foot")(
        f"cgipool {version}", " · ",
        tags.span("started ", tags.span(fmt_clock(started), **{"data-g": "started"})),
        " · ",
        tags.span("updated ", tags.span(fmt_clock((snapshot or {}).get("now")),
                                        **{"data-g": "now"})),
    )
    attrs = {"data-page": active}
    if proxy:
        attrs["data-proxy"] = proxy  # dashboard.js builds example links on it
    if started is not None:
        attrs["data-started"] = repr(started)
    page = tags.html(lang="en")(head, tags.body(**attrs)(
        header, notice, tags.main(class_="main")(*body), footer))
    return _flatten(page)


def _stat(label: str, key: str, value: str, hint: str = "") -> Tag:
    return tags.div(class_="stat")(
        tags.div(label, class_="stat-label"),
        tags.div(value, class_="stat-value", **{"data-g": key}),
        tags.div(hint, class_="stat-hint", **({"data-g": key + "-hint"} if hint else {})))


# -- overview --------------------------------------------------------------------------


def _example(example: dict[str, Any], proxy: str = "") -> Tag:
    """An example of a service: a link to it on the proxy's origin ``proxy``
    (the admin has a listener of its own: a relative link would stay there)."""
    path = str(example.get("path", ""))
    status = example.get("status")
    link: Any = (tags.a(path, href=proxy + path, class_="ex-path")
                 if path.startswith("/") and not path.startswith("//")
                 else tags.span(path, class_="ex-path"))
    return tags.li(link, " ", tags.span(_text(status), class_="ex-status"))


def chip_class(worker: dict[str, Any]) -> str:
    note = worker_note(worker)
    return f"chip state-{worker['state']}" + ("" if note is None else f" chip-{note[0]}")


def chip_title(worker: dict[str, Any]) -> str:
    title = f"worker {worker['id']}: {worker['state']}"
    note = worker_note(worker)
    if note is not None:
        title += f" · {note[1]}"
    failures = worker.get("passive_failures") or 0
    if failures:
        title += f" · {failures} failed requests in a row"
    return title


def _worker_chip(worker: dict[str, Any]) -> Tag:
    return tags.li(class_=chip_class(worker), title=chip_title(worker),
                   **{"data-worker": str(worker["id"])})(
        tags.span(f"#{worker['id']}", class_="chip-id"), " ",
        tags.span(_text(worker["pid"]), class_="chip-pid"))


def _load_bar(load: dict[str, Any]) -> Tag:
    """In flight (and queued, amber) against the capacity: SVG, so no inline style."""
    busy, queued = load["bar"]
    return tags.svg(class_="util-bar", viewBox="0 0 100 6", preserveAspectRatio="none",
                    role="img", **{"aria-label": "utilisation " + fmt_utilisation(load),
                                   "data-f": "util-bar"})(
        tags.rect(class_="util-track", width="100", height="6"),
        tags.rect(class_="util-busy", width=f"{busy:g}", height="6", **{"data-f": "util-busy"}),
        tags.rect(class_="util-queued", x=f"{busy:g}", width=f"{queued:g}", height="6",
                  **{"data-f": "util-queued"}))


def _load_panel(svc: dict[str, Any], now: float | None) -> list[Tag]:
    load = service_load(svc)
    move, ago, reason, title, direction = decision_parts(svc, now)
    decision = tags.p(class_=f"decision dir-{direction}", **{"data-f": "decision"})(
        tags.span(move, class_="decision-move", **{"data-f": "decision-move"}),
        tags.span(ago, class_="decision-ago", **{"data-f": "decision-ago"}),
        tags.span(reason, class_="decision-reason", **{"data-f": "decision-reason"}))
    if title:
        decision.attributes["title"] = title
    return [
        tags.div(class_=f"load level-{load['level']}", **{"data-f": "load"})(
            tags.div(class_="load-head")(
                tags.span("Utilisation", class_="load-label"),
                tags.span(fmt_utilisation(load), class_="load-pct", **{"data-f": "util"})),
            _load_bar(load),
            tags.div(class_="load-detail")(
                tags.span(f"{fmt_count(load['in_flight'])} in flight",
                          **{"data-f": "in-flight"}), " · ",
                tags.span(fmt_queue(load), class_="queue" + (" queued" if load["queued"] else ""),
                          **{"data-f": "queue"}), " · ",
                tags.span(fmt_capacity(load), **{"data-f": "capacity"}))),
        tags.div(class_="scaling")(
            tags.div(class_="load-head")(
                tags.span("Autoscale", class_="load-label"),
                tags.span(fmt_autoscale(svc), class_="autoscale", **{"data-f": "autoscale"})),
            decision),
    ]


def _service_card(svc: dict[str, Any], now: float | None = None, proxy: str = "") -> Tag:
    state = service_state(svc["state"])
    size = svc["size"]
    traffic = svc.get("traffic") or {}
    raw = "" if state == svc["state"] else f" ({svc['state']})"
    cgi = svc.get("cgi") or {}
    examples = svc.get("examples") or []
    fixed = size["min"] == size["max"]
    number = tags.input(type="number", name="workers", min=str(size["min"]),
                        max=str(size["max"]), value=str(size["desired"]), step="1",
                        required="required", **{"data-f": "desired-input"})
    if fixed:
        number.attributes["disabled"] = "disabled"
    controls = tags.form(class_="controls", **{"data-action": "scale"})(
        tags.label(class_="scale")(
            tags.span(f"Workers ({size['min']}–{size['max']})", class_="scale-label"),
            number),
        tags.button("Set", type="submit", class_="btn",
                    **({"disabled": "disabled"} if fixed else {})),
        tags.button("Rolling restart", type="button", class_="btn btn-warn",
                    **{"data-action": "rolling-restart"},
                    **({"disabled": "disabled", "title": CGI_NO_ROLLING}
                       if svc.get("protocol") == "cgi" else {})),
    )
    return tags.article(class_=f"card svc state-{state}",
                        **{"data-service": svc["name"], "data-state": state})(
        tags.header(class_="card-head")(
            tags.h3(svc["name"], class_="svc-name"),
            tags.span(state + raw, class_=f"badge state-{state}", **{"data-f": "state"})),
        tags.p(class_="route")(tags.code(svc["route"]),
                               " ", tags.span(svc.get("language") or "", class_="lang")),
        tags.p(svc.get("description") or "", class_="desc"),
        tags.dl(class_="mini")(
            tags.div(tags.dt("Running" if cgi else "Ready", **{"data-f": "ready-label"}),
                     tags.dd(f"{fmt_count(cgi.get('in_flight'))} of {fmt_count(cgi.get('limit'))}"
                             if cgi else f"{size['ready']}/{size['desired']}",
                             **{"data-f": "ready"})),
            tags.div(tags.dt("Req/s"), tags.dd(fmt_rate(traffic.get("rps")),
                                               **{"data-f": "rps"})),
            tags.div(tags.dt("p95"), tags.dd(fmt_ms(traffic.get("p95_ms")),
                                             **{"data-f": "p95"})),
            tags.div(tags.dt("Requests"), tags.dd(fmt_count(svc.get("requests")),
                                                  **{"data-f": "requests"})),
        ),
        *_load_panel(svc, now),
        tags.p(fmt_cgi(svc.get("cgi")), class_="cgi-stats", **{"data-f": "cgi"},
               **({} if svc.get("cgi") else {"hidden": "hidden"})),
        tags.ul(class_="chips", **{"data-f": "workers", "aria-label": "workers"})(
            *[_worker_chip(w) for w in svc["workers"]]),
        tags.details(class_="examples", open="open")(
            tags.summary(f"Examples ({len(examples)})"),
            tags.ul(*[_example(e, proxy) for e in examples]) if examples
            else tags.p("No examples in the manifest.", class_="muted")),
        controls,
    )


def _event_item(event: dict[str, Any]) -> Tag:
    worker = event.get("worker")
    who = event.get("service", "") + ("" if worker is None else f"[{worker}]")
    return tags.li(class_=f"ev level-{event.get('level', 'info')} kind-{event.get('kind', '')}",
                   **{"data-seq": str(event.get("seq", ""))})(
        tags.time(fmt_clock(event.get("time")), **{"data-t": repr(event.get("time"))}),
        tags.span(event.get("kind", ""), class_="ev-kind"),
        tags.span(who, class_="ev-who"),
        tags.span(event.get("message", ""), class_="ev-msg"))


def _overview(snapshot: dict[str, Any], extra: dict[str, Any]) -> list[Any]:
    traffic = snapshot.get("traffic") or {}
    workers = snapshot["workers"]
    stats = tags.section(class_="stats", **{"aria-label": "Totals"})(
        _stat("Uptime", "uptime", fmt_duration(snapshot.get("uptime"))),
        _stat("Workers", "workers", f"{workers['ready']}/{workers['total']}",
              "ready / total"),
        _stat("Requests/s", "rps", fmt_rate(traffic.get("rps")), "last minute"),
        _stat("Error rate", "error_rate", fmt_percent(traffic.get("error_rate")),
              f"{fmt_count(traffic.get('errors'))} errors last minute"),
        _stat("p50", "p50", fmt_ms(traffic.get("p50_ms"))),
        _stat("p95", "p95", fmt_ms(traffic.get("p95_ms"))),
        _stat("p99", "p99", fmt_ms(traffic.get("p99_ms"))),
        _stat("Requests", "requests_total", fmt_count(traffic.get("requests_total")),
              "since start"),
    )
    events = extra.get("events") or []
    return [
        tags.h1("Overview"),
        stats,
        tags.h2("Services"),
        tags.div(id="services", class_="cards")(*[_service_card(s, snapshot.get("now"),
                                                                extra.get("proxy", ""))
                                                  for s in snapshot["services"]]),
        tags.section(class_="panel")(
            tags.div(class_="panel-head")(tags.h2("Recent events"),
                                          tags.a("All events →", href="/admin/events")),
            tags.ol(id="event-list", class_="events compact",
                    **{"data-limit": str(OVERVIEW_EVENTS)})(
                *[_event_item(e) for e in events[:OVERVIEW_EVENTS]])),
    ]


# -- processes -------------------------------------------------------------------------


def _shows_note(w: dict[str, Any], note: tuple[str, str]) -> bool:
    """The table adds a note badge unless the state says it already (draining)."""
    return note[0] != "leaving" or w["state"] != "draining"


def _process_row(svc: dict[str, Any], w: dict[str, Any]) -> Tag:
    health = w.get("last_health")
    values = {
        "service": svc["name"], "id": str(w["id"]), "pid": _text(w["pid"]),
        "port": _text(w["port"]), "state": w["state"], "uptime": fmt_duration(w["uptime"]),
        "restarts": fmt_count(w["restarts"]), "requests": fmt_count(w["requests"]),
        "in_flight": fmt_count(w["in_flight"]),
        "passive": fmt_count(w.get("passive_failures")), "health": fmt_health(health),
        "rss": fmt_bytes(w.get("rss")), "cpu": fmt_cpu(w.get("cpu_percent")),
    }
    cells = []
    for key, _ in PROCESS_COLUMNS:
        cell = tags.td(**{"data-f": key})
        if key == "state":
            badge = tags.span(values[key], class_=f"badge state-{w['state']}")
            cell(badge)
            note = worker_note(w)
            if note is not None and _shows_note(w, note):
                cell(" ", tags.span(note[0], class_=f"badge note note-{note[0]}",
                                    title=note[1], **{"data-f": "note"}))
            elif note is not None:
                badge.attributes["title"] = note[1]
        else:
            cell(values[key])
        if key == "health" and health:
            cell.attributes["class"] = "health-ok" if health.get("ok") else "health-bad"
        if key in NUMERIC_COLUMNS:
            cell.attributes["class"] = "num"
        if key == "passive" and w.get("passive_failures"):
            cell.attributes["class"] = "num warn"
        cells.append(cell)
    cells.append(tags.td(class_="actions")(
        tags.button("restart", type="button", class_="btn btn-small",
                    **{"data-action": "restart"}),
        tags.button("drain", type="button", class_="btn btn-small btn-ghost",
                    **{"data-action": "drain"})))
    leaving = " leaving" if w.get("retiring") or w.get("recycling") else ""
    return tags.tr(class_=f"state-{w['state']}{leaving}",
                   **{"data-service": svc["name"], "data-worker": str(w["id"])})(*cells)


def _processes(snapshot: dict[str, Any], extra: dict[str, Any]) -> list[Any]:
    rows = [_process_row(svc, w) for svc in snapshot["services"] for w in svc["workers"]]
    workers = snapshot["workers"]
    return [
        tags.div(class_="title-row")(
            tags.h1("Processes"),
            tags.span(class_="muted")(
                tags.span(f"{workers['ready']}/{workers['total']}", **{"data-g": "workers"}),
                " workers ready")),
        tags.div(class_="table-wrap")(tags.table(class_="procs")(
            tags.thead(tags.tr(*[tags.th(label, scope="col", **(
                {"title": "passive health: failed requests in a row (refused, broken, "
                          "unanswered)"} if key == "passive" else {}))
                for key, label in PROCESS_COLUMNS],
                               tags.th("Actions", scope="col"))),
            tags.tbody(id="proc-body")(*rows))),
        tags.p("Restart starts a replacement first and retires the worker once the "
               "replacement is ready; drain takes the worker out of rotation and stops it "
               "after its requests in flight.  Recycling and leaving workers are marked "
               "(hover for the reason); fails counts the failed requests in a row "
               "(refused, broken or unanswered) that take a worker out of rotation.",
               class_="muted small"),
    ]


# -- traffic ---------------------------------------------------------------------------


def _chart(metric: str, label: str, cgi: bool = False) -> Tag:
    if metric == "workers" and cgi:
        label = "CGI scripts"  # a CGI service keeps no worker: running vs the cap
    svg = tags.svg(class_="chart-svg", viewBox="0 0 320 140", role="img",
                   **{"aria-label": label})
    legend: Any = tags.span(class_="legend")(
        tags.span("all responses" if metric == "rps" else "status ≥ 500",
                  class_="key s-" + metric))
    if metric == "latency":
        legend = tags.span(class_="legend")(
            tags.span("p50", class_="key s-p50"), tags.span("p95", class_="key s-p95"),
            tags.span("p99", class_="key s-p99"))
    elif metric == "workers" and cgi:
        legend = tags.span(class_="legend")(
            tags.span("running", class_="key s-ready"),
            tags.span("at most", class_="key s-total"))
    elif metric == "workers":
        legend = tags.span(class_="legend")(
            tags.span("ready", class_="key s-ready"), tags.span("total", class_="key s-total"))
    return tags.figure(class_="chart", **{"data-metric": metric})(
        tags.figcaption(tags.span(label, class_="chart-title"),
                        tags.span(DASH, class_="chart-now", **{"data-f": "now-" + metric}),
                        legend),
        svg)


def _traffic(snapshot: dict[str, Any], extra: dict[str, Any]) -> list[Any]:
    counts = extra.get("points") or {}
    sections = []
    for svc in snapshot["services"]:
        points = counts.get(svc["name"], 0)
        state = service_state(svc["state"])
        cgi = svc.get("cgi")
        sections.append(tags.section(class_=f"card traffic state-{state}",
                                     **{"data-service": svc["name"],
                                        "data-protocol": "cgi" if cgi else "http"})(
            tags.header(class_="card-head")(
                tags.h3(svc["name"], class_="svc-name"),
                tags.code(svc["route"]),
                tags.span(state, class_=f"badge state-{state}", **{"data-f": "state"})),
            tags.div(class_="charts", **{"data-points": str(points)})(
                *[_chart(metric, label, cgi=bool(cgi)) for metric, label in CHARTS])))
    if not snapshot["services"]:
        sections.append(tags.p("No services configured.", class_="muted"))
    return [
        tags.div(class_="title-row")(
            tags.h1("Traffic"),
            tags.span(class_="muted")(
                tags.span("last 15 minutes", id="traffic-span"), ", per second ",
                tags.span("" if counts else "· waiting for data", id="traffic-status"))),
        tags.div(id="traffic", class_="traffic-list", **{"data-window": "900"})(*sections),
    ]


# -- events ----------------------------------------------------------------------------


def _events(snapshot: dict[str, Any], extra: dict[str, Any]) -> list[Any]:
    events = extra.get("events") or []
    return [
        tags.div(class_="title-row")(
            tags.h1("Events"), tags.span("newest first", class_="muted")),
        tags.section(class_="panel")(
            tags.ol(id="event-list", class_="events", **{"data-limit": "200"})(
                *[_event_item(e) for e in events]),
            tags.p("No events yet.", class_="muted empty") if not events else ""),
    ]


_PAGES = {"overview": _overview, "processes": _processes, "traffic": _traffic,
          "events": _events}


def render(name: str, snapshot: dict[str, Any], extra: dict[str, Any]) -> bytes:
    """The HTML of page ``name`` (overview, processes, traffic, events)."""
    body = _PAGES[name](snapshot, extra)
    return _layout(TITLES[name], name, body, snapshot, session=extra.get("session", False),
                   proxy=extra.get("proxy", ""))


def render_login(error: str | None, enabled: bool) -> bytes:
    """The login form (or why there is none): no live parts, no data."""
    if not enabled:
        body: list[Any] = [tags.p("Remote access is off: set ", tags.code("admin.token"),
                                  " in the config.")]
    else:
        body = [tags.p(error, role="alert", class_="error") if error else "",
                tags.form(method="post", action="/admin/login", class_="login")(
                    tags.label("Admin token ",
                               tags.input(type="password", name="token",
                                          autocomplete="current-password")),
                    tags.button("Log in", class_="btn"))]
    return _layout("Log in", "", [tags.section(class_="panel narrow")(tags.h1("Log in"), *body)],
                   live=False)
