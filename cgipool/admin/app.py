"""Admin pages and JSON API (Klein), mounted at ``/admin`` on the proxy's Site.

Only loopback clients are answered: the admin shows pids and ports and will
grow controls, so it is never exposed by accident.
"""

from __future__ import annotations

import html
import ipaddress
import json
from typing import Any

from klein import Klein
from werkzeug.exceptions import MethodNotAllowed, NotFound

from cgipool.proxy.errors import set_error
from cgipool.supervisor.supervisor import Supervisor


def is_loopback(request: Any) -> bool:
    host = getattr(request.getClientAddress(), "host", None)
    if host is None:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _json(request: Any, value: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value).encode()


class AdminApp:
    """The routes under ``/admin``."""

    app = Klein()

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def resource(self) -> Any:
        return self.app.resource()

    def _denied(self, request: Any) -> bytes | None:
        if is_loopback(request):
            return None
        return set_error(request, 403, "the admin interface answers loopback clients only")

    @app.route("/", branch=False)
    def index(self, request: Any) -> bytes:
        denied = self._denied(request)
        if denied is not None:
            return denied
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        return render_status_page(self.supervisor.status()).encode()

    @app.route("/api/status", methods=["GET"])
    def status(self, request: Any) -> bytes:
        denied = self._denied(request)
        if denied is not None:
            return denied
        return _json(request, self.supervisor.status())

    @app.handle_errors(NotFound)
    def not_found(self, request: Any, failure: Any) -> bytes:
        return set_error(request, 404, f"no admin page at {request.path.decode('latin-1')}")

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: Any, failure: Any) -> bytes:
        return set_error(request, 405, f"{request.method.decode('latin-1')} is not allowed here")


def render_status_page(status: dict[str, Any]) -> str:
    """A plain server-rendered status table (every dynamic string escaped)."""
    e = html.escape
    rows = []
    for svc in status["services"]:
        for w in svc["workers"]:
            rows.append(
                "<tr>" + "".join(f"<td>{e(str(v))}</td>" for v in (
                    svc["name"], w["id"], w["pid"] or "-", w["port"] or "-", w["state"],
                    w["uptime"] if w["uptime"] is not None else "-", w["restarts"],
                    w["requests"], w["in_flight"],
                )) + "</tr>"
            )
    services = "".join(
        f"<li><b>{e(s['name'])}</b> <code>{e(s['route'])}</code> "
        f"<span class=state-{e(s['state'])}>{e(s['state'])}</span> "
        f"({s['size']['ready']}/{s['size']['desired']} ready) {e(s['description'])}</li>"
        for s in status["services"]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta http-equiv="refresh" content="2">
<title>cgipool admin</title>
<style>
body{{font:14px system-ui,sans-serif;margin:1.5em}} table{{border-collapse:collapse}}
td,th{{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left}}
.state-ok{{color:#070}} .state-degraded{{color:#a60}} .state-failing{{color:#b00}}
</style></head><body>
<h1>cgipool</h1>
<p>Uptime {e(str(status['uptime']))} s &middot; workers ready {status['workers']['ready']}
of {status['workers']['total']} &middot; <a href="/admin/api/status">status JSON</a></p>
<ul>{services}</ul>
<table><thead><tr><th>service</th><th>worker</th><th>pid</th><th>port</th><th>state</th>
<th>uptime s</th><th>restarts</th><th>requests</th><th>in flight</th></tr></thead>
<tbody>{''.join(rows)}</tbody></table>
</body></html>
"""
