"""Server-rendered admin pages (a plain first version; see static/ for the live parts)."""

from __future__ import annotations

import html
from typing import Any

NAV = (("overview", "/admin/", "Overview"), ("processes", "/admin/processes", "Processes"),
       ("traffic", "/admin/traffic", "Traffic"), ("events", "/admin/events", "Events"))


def _layout(title: str, active: str, body: str) -> bytes:
    e = html.escape
    nav = " ".join(
        f'<a href="{href}"{" aria-current=page" if key == active else ""}>{e(label)}</a>'
        for key, href, label in NAV)
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · cgipool</title></head>
<body><header><b>cgipool</b> <nav>{nav}</nav></header>
<main>{body}</main></body></html>
""".encode()


def _process_rows(snapshot: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for svc in snapshot["services"]:
        for w in svc["workers"]:
            cells = (svc["name"], w["id"], w["pid"] or "-", w["port"] or "-", w["state"],
                     w["uptime"] if w["uptime"] is not None else "-", w["restarts"],
                     w["requests"], w["in_flight"])
            rows.append("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in cells) + "</tr>")
    return ("<table><thead><tr><th>service</th><th>worker</th><th>pid</th><th>port</th>"
            "<th>state</th><th>uptime s</th><th>restarts</th><th>requests</th>"
            "<th>in flight</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def render(name: str, snapshot: dict[str, Any], extra: dict[str, Any]) -> bytes:
    e = html.escape
    if name == "events":
        items = "".join(f"<li>{e(ev['kind'])} {e(ev['service'])}: {e(ev['message'])}</li>"
                        for ev in extra.get("events", []))
        return _layout("Events", name, f"<h1>Events</h1><ul>{items}</ul>")
    services = "".join(
        f"<li><b>{e(s['name'])}</b> <code>{e(s['route'])}</code> {e(s['state'])} "
        f"({s['size']['ready']}/{s['size']['desired']} ready)</li>"
        for s in snapshot["services"])
    return _layout(name.title(), name,
                   f"<h1>{e(name.title())}</h1><ul>{services}</ul>{_process_rows(snapshot)}")


def render_login(error: str | None, enabled: bool) -> bytes:
    e = html.escape
    if not enabled:
        body = "<p>Remote access is off: set <code>admin.token</code> in the config.</p>"
    else:
        body = ((f"<p role=alert>{e(error)}</p>" if error else "")
                + '<form method="post" action="/admin/login"><label>Admin token '
                  '<input type="password" name="token" autocomplete="current-password">'
                  '</label> <button>Log in</button></form>')
    return _layout("Log in", "", "<h1>Log in</h1>" + body)
