"""``cgipool smoke-test``: request every example of every service once.

Checks, in order: the status API itself, every ``examples`` entry of every
service (the status must match, and the content type, texts and JSON when
the example gives them: :mod:`cgipool_tools.expect`), and that an unknown
route is a JSON 404 with an ``error``.  Any HTTP service can pass: nothing is
assumed of a body the example says nothing about.  A service in state
``unavailable`` (its runtime is missing) is skipped.
"""

from __future__ import annotations

import json
import time
from typing import Any, TextIO

import attrs

from cgipool_tools.client import (
    STATUS_PATH,
    HttpClient,
    NotRunning,
    RequestError,
    Response,
    StatusError,
    clean,
    excerpt,
    fetch_status,
    parse_url,
)
from cgipool_tools.expect import BadExample, Expectation, media_type, pid_of

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
#: A path no service should own.
UNKNOWN_ROUTE = "/cgipool-smoke-test/no-such-route"
NAME_WIDTH = 24


@attrs.frozen
class Check:
    result: str          # PASS, FAIL or SKIP
    name: str            # service name, or "admin" / "routing"
    path: str
    expected: int | None
    status: int | None = None
    elapsed: float | None = None
    note: str = ""       # "pid 1234", or why it failed / was skipped

    def line(self, name_width: int = 10) -> str:
        name = clean(self.name, NAME_WIDTH).ljust(name_width)
        head = f"{self.result}  {name} GET {clean(self.path, 200)}"
        if self.result == SKIP:
            return f"{head}  ({self.note})"
        if self.status is None:
            return f"{head} -> {self.note}"
        if self.result == PASS:
            notes = [f"{self.elapsed * 1000:.1f} ms"] if self.elapsed is not None else []
            notes += [self.note] if self.note else []
            return f"{head} -> {self.status}" + (f" ({', '.join(notes)})" if notes else "")
        if self.status == self.expected:  # the status is right, the rest is not
            return f"{head} -> {self.status}, but {self.note}"
        return f"{head} -> expected {self.expected}, got {self.status}: {self.note}"


def check_response(name: str, path: str, expected: Expectation | int,
                   response: Response) -> Check:
    """An example's verdict: what :meth:`Expectation.judge` says of the answer.

    The note of a pass shows the worker's pid when a JSON body names one (the
    sample services do), else the answer's content type.
    """
    expect = expected if isinstance(expected, Expectation) else Expectation(expected)
    parsed = _json_object(response.body)
    failure = expect.judge(response.status, response.header(b"content-type"),
                           response.body, parsed)
    if failure is not None:
        return Check(FAIL, name, path, expect.status, response.status, response.elapsed,
                     failure.detail if failure.kind != f"HTTP {response.status}"
                     else excerpt(response.body))
    pid = pid_of(parsed)
    notes = [f"pid {pid}"] if pid is not None else []
    if pid is None or expect.content_type is not None:
        notes.append(clean(media_type(response.header(b"content-type"))
                           or "no content type", 60))
    checked = expect.describe()
    if checked:
        notes.append(checked)
    return Check(PASS, name, path, expect.status, response.status, response.elapsed,
                 ", ".join(notes))


def _json_object(body: bytes) -> Any:
    """The body as JSON when it looks like an object (cheap for other bodies)."""
    if body[:1] != b"{":
        return None
    try:
        return json.loads(body)
    except ValueError:
        return None


def check_not_found(response: Response) -> Check:
    name, path = "routing", UNKNOWN_ROUTE

    def fail(note: str) -> Check:
        return Check(FAIL, name, path, 404, response.status, response.elapsed, note)

    if response.status != 404:
        return fail(excerpt(response.body))
    try:
        body = response.json()
    except ValueError:
        return fail(f"body is not JSON: {excerpt(response.body)}")
    if not isinstance(body, dict) or not isinstance(body.get("error"), str):
        return fail(f"no 'error' field in the body: {excerpt(response.body)}")
    return Check(PASS, name, path, 404, 404, response.elapsed, "JSON error")


async def smoke_test(client: Any, timeout: float = 10.0) -> list[Check]:
    """Run every check; ``client`` has ``get(path, timeout) -> Deferred[Response]``.

    :raises NotRunning: the daemon is not reachable.
    """
    checks: list[Check] = []
    started = time.perf_counter()
    try:
        status = await fetch_status(client, timeout)
    except StatusError as e:
        return [Check(FAIL, "admin", STATUS_PATH, 200, None, None, str(e))]
    services = [s for s in status["services"] if isinstance(s, dict)]
    checks.append(Check(PASS, "admin", STATUS_PATH, 200, 200, time.perf_counter() - started,
                        f"{len(services)} service{'s' if len(services) != 1 else ''}"))

    for svc in services:
        name = str(svc.get("name"))
        examples = [e for e in svc.get("examples") or [] if isinstance(e, dict)]
        if not examples:
            checks.append(Check(SKIP, name, str(svc.get("route")), None,
                                note="no examples configured"))
            continue
        for example in examples:
            path = str(example.get("path"))
            try:
                expect: Expectation | BadExample = Expectation.from_example(example)
            except BadExample as e:
                expect = e
            status = expect.status if isinstance(expect, Expectation) else None
            if svc.get("state") == "unavailable":
                reason = svc.get("reason") or svc.get("error") or "runtime missing"
                checks.append(Check(SKIP, name, path, status,
                                    note=f"service unavailable: {clean(reason, 80)}"))
                continue
            checks.append(await _request(client, name, path, expect, timeout))

    try:
        response = await client.get(UNKNOWN_ROUTE, timeout)
    except RequestError as e:
        checks.append(Check(FAIL, "routing", UNKNOWN_ROUTE, 404, note=str(e)))
    else:
        checks.append(check_not_found(response))
    return checks


async def _request(client: Any, name: str, path: str, expect: Expectation | BadExample,
                   timeout: float) -> Check:
    if isinstance(expect, BadExample) or not path.startswith("/"):
        return Check(FAIL, name, path, None, note=f"bad example in the status: "
                                                   f"{clean(path, 80)} {clean(expect, 80)}")
    try:
        response = await client.get(path, timeout)
    except RequestError as e:
        return Check(FAIL, name, path, expect.status, note=str(e))
    except Exception as e:  # a path the client refuses to send, and the like
        return Check(FAIL, name, path, expect.status, note=clean(e, 120))
    return check_response(name, path, expect, response)


def format_report(checks: list[Check]) -> str:
    width = min(max((len(clean(c.name, NAME_WIDTH)) for c in checks), default=5), NAME_WIDTH)
    lines = [c.line(width) for c in checks]
    counts = {r: sum(1 for c in checks if c.result == r) for r in (PASS, FAIL, SKIP)}
    verdict = "all passed" if not counts[FAIL] else f"{counts[FAIL]} FAILED"
    lines.append("")
    lines += _per_service(checks, width)
    lines.append(f"smoke-test: {counts[PASS]} passed, {counts[FAIL]} failed, "
                 f"{counts[SKIP]} skipped — {verdict}")
    return "\n".join(lines) + "\n"


def _per_service(checks: list[Check], width: int) -> list[str]:
    """One line per service: its examples passed, failed, skipped."""
    services: dict[str, dict[str, int]] = {}
    for c in checks:
        if c.name not in ("admin", "routing"):
            counts = services.setdefault(c.name, {PASS: 0, FAIL: 0, SKIP: 0})
            counts[c.result] += 1
    lines = []
    for name, counts in services.items():
        parts = [f"{counts[FAIL]} FAILED"] if counts[FAIL] else []
        parts += [f"{counts[r]} {word}" for r, word in ((PASS, "passed"), (SKIP, "skipped"))
                  if counts[r]]
        lines.append(f"  {clean(name, NAME_WIDTH).ljust(width)}  {', '.join(parts)}")
    return (["by service:"] + lines + [""]) if lines else []


async def run_smoke(reactor: Any, url: str, out: TextIO, err: TextIO,
                    timeout: float = 10.0) -> int:
    client = HttpClient(reactor, parse_url(url), timeout=timeout)
    try:
        checks = await smoke_test(client, timeout)
    except NotRunning as e:
        err.write(f"{e}\n")
        return 1
    finally:
        await client.close()
    out.write(format_report(checks))
    return 1 if any(c.result == FAIL for c in checks) else 0
