"""``cgipool restart SERVICE``: a rolling restart of one service, on request.

Through the admin API (``POST /admin/api/services/<name>/rolling-restart``): one
worker at a time, each replacement ready before the old one drains, so no
request fails.  The command then follows the service's status until that
restart has ended (at most ``--timeout`` seconds) and says how it went: the
pids replaced, or that a replacement did not start (exit status 1; the old
workers keep serving).  A CGI service has nothing to restart: the API's 409
says so.
"""

from __future__ import annotations

import urllib.parse
from typing import Any, TextIO

from cgipool_tools.client import (
    REFUSED,
    START_HINT,
    HttpClient,
    RequestError,
    clean,
    excerpt,
    parse_url,
    sleep,
)

POLL_INTERVAL = 0.1


def _pids(pids: Any) -> str:
    if not isinstance(pids, list) or not pids:
        return "-"
    return ", ".join(clean(p, 12) for p in pids)


async def run_restart(reactor: Any, url: str, service: str, out: TextIO, err: TextIO,
                      timeout: float = 120.0, interval: float = POLL_INTERVAL) -> int:
    """Start the rolling restart, wait for its end; 0 when every worker was replaced."""
    name = urllib.parse.quote(service, safe="")
    client = HttpClient(reactor, parse_url(url), timeout=min(10.0, timeout))
    started = reactor.seconds()
    try:
        try:
            response = await client.get(f"/admin/api/services/{name}/rolling-restart",
                                        method="POST")
        except RequestError as e:
            hint = f"; {START_HINT}" if e.kind == REFUSED else ""
            err.write(f"cgipool restart: no answer from {url}: {e}{hint}\n")
            return 1
        try:
            body = response.json()
        except ValueError:
            body = None
        if response.status != 202 or not isinstance(body, dict):
            message = body.get("error") if isinstance(body, dict) else excerpt(response.body)
            extra = ""
            if isinstance(body, dict) and isinstance(body.get("services"), list):
                extra = " (services: " + ", ".join(clean(s, 40) for s in body["services"]) + ")"
            err.write(f"cgipool restart: {response.status}: {clean(message, 400)}{extra}\n")
            return 1
        roll = body.get("roll")
        out.write(f"rolling restart of {clean(service, 40)}: "
                  f"{clean(body.get('workers'))} workers, one at a time\n")
        deadline = started + timeout
        path = f"/admin/api/services/{name}"
        record: dict[str, Any] | None = None
        while True:
            try:
                answer = await client.get(path)
                status = answer.json() if answer.status == 200 else None
            except (RequestError, ValueError):
                status = None
            last = status.get("last_rolling_restart") if isinstance(status, dict) else None
            if isinstance(last, dict) and last.get("id") == roll \
                    and last.get("finished_at") is not None:
                record = last
                break
            if reactor.seconds() >= deadline:
                break
            await sleep(reactor, interval)
    finally:
        await client.close()
    took = reactor.seconds() - started
    if record is None:
        err.write(f"cgipool restart: {clean(service, 40)} is still restarting after "
                  f"{timeout:g} s (see `cgipool status` and the dashboard's events)\n")
        return 1
    if not record.get("ok"):
        err.write(f"cgipool restart: rolling restart of {clean(service, 40)} stopped after "
                  f"{took:.1f} s: a replacement did not start; the old workers keep "
                  f"serving (pids {_pids(record.get('pids'))}; see the event log)\n")
        return 1
    out.write(f"restarted {clean(service, 40)} in {took:.1f} s: "
              f"pids {_pids(record.get('old_pids'))} -> {_pids(record.get('pids'))}\n")
    return 0
