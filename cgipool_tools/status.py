"""``cgipool status``: the admin status API as a table.

Every string in the status document is printed through
:func:`cgipool_tools.client.clean`: a service name or an error text cannot move
the cursor, clear the screen or start a line of its own.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TextIO

from cgipool_tools.client import (
    HttpClient,
    NotRunning,
    StatusError,
    clean,
    fetch_status,
    parse_url,
)

#: Widest a table cell may be; longer text is cut with an ellipsis.
CELL_WIDTH = 40
WORKER_COLUMNS = ("ID", "PID", "PORT", "STATE", "UPTIME", "RESTARTS", "REQUESTS",
                  "IN_FLIGHT", "HEALTH", "LAST_EXIT")


def human_duration(seconds: Any) -> str:
    """``0.4s``, ``12.3s``, ``5m03s``, ``2h07m``, ``3d04h``; ``-`` when unknown."""
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) \
            or seconds != seconds or seconds < 0:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]],
                 indent: str = "", width: int = CELL_WIDTH) -> list[str]:
    """Left-aligned columns, every cell cleaned and at most ``width`` wide."""
    cells = [[clean(v, width) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in cells:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    lines = []
    for row in [list(headers), *cells]:
        line = "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row))
        lines.append(indent + line.rstrip())
    return lines


def format_health(health: Any) -> str:
    if not isinstance(health, dict):
        return "-"
    if health.get("ok"):
        latency = health.get("latency_ms")
        if isinstance(latency, (int, float)):
            return f"ok {latency:.1f} ms"
        return "ok"
    return f"FAIL {clean(health.get('error') or 'failed')}"


def _count(value: Any) -> str:
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "-"


def worker_row(w: dict[str, Any]) -> list[Any]:
    return [
        _count(w.get("id")),
        _count(w.get("pid")),
        _count(w.get("port")),
        w.get("state"),
        human_duration(w.get("uptime")),
        _count(w.get("restarts")),
        _count(w.get("requests")),
        _count(w.get("in_flight")),
        format_health(w.get("last_health")),
        w.get("last_exit") or "-",
    ]


def cgi_line(cgi: dict[str, Any]) -> str:
    """A CGI service's counters (it has no resident workers)."""
    exits = " ".join(clean(c, 12) for c in cgi.get("last_exit_codes") or []) or "-"
    return (f"  CGI: {_count(cgi.get('executions'))} executions, "
            f"{_count(cgi.get('in_flight'))} running (at most {_count(cgi.get('limit'))}), "
            f"{_count(cgi.get('queued'))} queued, {_count(cgi.get('timeouts'))} timeouts, "
            f"{_count(cgi.get('failures'))} failed; last exit codes: {exits}")


def cgi_summary(svc: dict[str, Any]) -> str | None:
    """``cgi · up to 4 at once · 2 running`` for a CGI service (None for others):
    it has no resident workers, so "0/4 workers ready" would read as broken."""
    cgi = svc.get("cgi")
    if svc.get("protocol") != "cgi" and not isinstance(cgi, dict):
        return None
    cgi = cgi if isinstance(cgi, dict) else {}
    return (f"cgi · up to {_count(cgi.get('limit'))} at once · "
            f"{_count(cgi.get('in_flight'))} running")


def size_summary(svc: dict[str, Any]) -> str:
    """``2/2 workers ready``, or a CGI service's :func:`cgi_summary`."""
    size = svc.get("size") if isinstance(svc.get("size"), dict) else {}
    return cgi_summary(svc) or (f"{_count(size.get('ready'))}/{_count(size.get('desired'))} "
                                "workers ready")


def service_header(svc: dict[str, Any]) -> str:
    if svc.get("protocol") == "cgi":
        return (f"{clean(svc.get('name'), CELL_WIDTH)} {clean(svc.get('route'), CELL_WIDTH)} — "
                f"{clean(svc.get('state'), 20)}, {size_summary(svc)}")
    size = svc.get("size") if isinstance(svc.get("size"), dict) else {}
    ready, desired = _count(size.get("ready")), _count(size.get("desired"))
    return (f"{clean(svc.get('name'), CELL_WIDTH)} {clean(svc.get('route'), CELL_WIDTH)} — "
            f"{clean(svc.get('state'), 20)}, {ready}/{desired} workers ready")


def format_status(status: dict[str, Any], url: str = "") -> str:
    """The status document as text: a summary line, then one block per service."""
    workers = status.get("workers") if isinstance(status.get("workers"), dict) else {}
    services = [s for s in status.get("services") or [] if isinstance(s, dict)]
    where = f" at {clean(url)}" if url else ""
    lines = [
        f"cgipool{where}: up {human_duration(status.get('uptime'))}, "
        f"{_count(workers.get('ready'))}/{_count(workers.get('total'))} workers ready, "
        f"{len(services)} service{'s' if len(services) != 1 else ''}"
    ]
    for svc in services:
        lines.append("")
        lines.append(service_header(svc))
        if svc.get("reason"):
            lines.append(f"  reason: {clean(svc.get('reason'), 400)}")
        rows = [worker_row(w) for w in svc.get("workers") or [] if isinstance(w, dict)]
        cgi = svc.get("cgi")
        if isinstance(cgi, dict):
            lines.append(cgi_line(cgi))
        elif rows:
            lines.extend(format_table(WORKER_COLUMNS, rows, indent="  "))
        else:
            lines.append("  (no workers)")
    return "\n".join(lines) + "\n"


async def run_status(reactor: Any, url: str, as_json: bool, out: TextIO,
                     err: TextIO, timeout: float = 5.0) -> int:
    client = HttpClient(reactor, parse_url(url), timeout=timeout)
    try:
        status = await fetch_status(client)
    except (NotRunning, StatusError) as e:
        err.write(f"{e}\n")
        return 1
    finally:
        await client.close()
    if as_json:
        out.write(json.dumps(status, indent=2) + "\n")
    else:
        out.write(format_status(status, client.target.url))
    return 0
