"""``cgipool reload``: re-read the daemon's configuration file (like SIGHUP).

Unlike a bare signal it reports what happened: the services added, removed,
rolling (with why: ``executable build/search.cgi changed``, ``env changed``) and
updated, those not ready after the daemon's bounded wait (``added mycalc: not
ready yet (health check failing: HTTP 404)``), or the configuration error that
kept the running configuration (exit status 1).
"""

from __future__ import annotations

from typing import Any, TextIO

from cgipool_tools.client import (
    REFUSED,
    START_HINT,
    HttpClient,
    RequestError,
    excerpt,
    parse_url,
)

RELOAD_PATH = "/admin/api/reload"


async def run_reload(reactor: Any, url: str, out: TextIO, err: TextIO,
                     timeout: float = 30.0) -> int:
    client = HttpClient(reactor, parse_url(url), timeout)
    try:
        try:
            response = await client.get(RELOAD_PATH, timeout, method="POST")
        except RequestError as e:
            hint = f"; {START_HINT}" if e.kind == REFUSED else ""
            err.write(f"cgipool reload: no answer from {url}: {e}{hint}\n")
            return 1
    finally:
        await client.close()
    try:
        body = response.json()
    except ValueError:
        body = None
    if response.status == 200 and isinstance(body, dict):
        out.write(f"reloaded: {body.get('summary')}\n")
        # Applied, but a service it added or rolled has no ready worker: a
        # script (or CI) must be able to tell.
        return 1 if body.get("not_ready") else 0
    message = body.get("error") if isinstance(body, dict) else excerpt(response.body)
    err.write(f"cgipool reload: {response.status}: {message}\n")
    return 1
