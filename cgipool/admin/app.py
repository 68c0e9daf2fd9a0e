"""The admin: dashboard pages, JSON API, live stream and controls (Klein).

Mounted at ``/admin`` on the proxy's Site; routes here are relative to it.
Every route passes :class:`~cgipool.admin.auth.AdminAuth` first; changes are
POST only and need the CSRF header (see ``auth.py``).  Every error is JSON
with an ``error`` field.

Pages (server-rendered, updated live by ``static/dashboard.js``)::

    GET  /admin/                 overview      GET /admin/traffic   charts
    GET  /admin/processes        process table GET /admin/events    event log

API::

    GET  /admin/api/status                       everything, as the stream sends it
    GET  /admin/api/services/<name>              one service
    GET  /admin/api/metrics?window=900&service=  per-second time series
    GET  /admin/api/log?limit=100&service=       recent events, newest first
    GET  /admin/api/events                       Server-Sent Events (status + events)
    POST /admin/api/services/<name>/scale        {"workers": n}
    POST /admin/api/services/<name>/rolling-restart
    POST /admin/api/services/<name>/workers/<id>/restart
    POST /admin/api/services/<name>/workers/<id>/drain
    POST /admin/api/reload                       re-read the configuration file
"""

from __future__ import annotations

import json
import mimetypes
import os
from typing import Any, Protocol
from urllib.parse import parse_qs

from klein import Klein
from twisted.internet import defer
from twisted.web.resource import Resource
from werkzeug.exceptions import MethodNotAllowed, NotFound

from cgipool import __version__
from cgipool.admin import pages
from cgipool.admin.auth import AdminAuth, Denied, refuse
from cgipool.admin.stream import EventStream
from cgipool.config import AdminConfig
from cgipool.credentials import SESSION_COOKIE
from cgipool.proxy.errors import REASONS, set_error
from cgipool.supervisor.interface import Pool, WorkerPool
from cgipool.supervisor.supervisor import Supervisor
from cgipool.supervisor.worker import Worker

STATIC_DIR = os.path.join(os.path.dirname(__file__), "static")
MAX_BODY = 64 * 1024
#: How long a restart request waits for its replacement before answering 202.
RESTART_WAIT = 10.0


class _Refused(Exception):
    """An API call refused with a JSON error (status code + message)."""

    def __init__(self, code: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra


class _Denied(Exception):
    """Refused by the access rules (see auth.py)."""

    def __init__(self, denied: Denied) -> None:
        super().__init__(denied.message)
        self.denied = denied


def _json(request: Any, value: Any, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    request.setHeader(b"cache-control", b"no-store")
    return json.dumps(value).encode()


def _html(request: Any, body: bytes) -> bytes:
    request.setHeader(b"content-type", b"text/html; charset=utf-8")
    request.setHeader(b"cache-control", b"no-store")
    request.setHeader(b"x-frame-options", b"DENY")
    request.setHeader(b"content-security-policy",
                      b"default-src 'self'; img-src 'self' data:; style-src 'self'; "
                      b"script-src 'self'; frame-ancestors 'none'")
    return body


def _wants_page(request: Any) -> bool:
    """A browser's GET of a dashboard page (not the API, not a script)."""
    path = request.path
    return (request.method in (b"GET", b"HEAD") and not path.startswith(b"/admin/api/")
            and not path.startswith(b"/admin/static/")
            and b"text/html" in (request.getHeader(b"accept") or b""))


def _arg(request: Any, name: str) -> str | None:
    values = request.args.get(name.encode())
    return values[-1].decode("utf-8", "replace") if values else None


def _number_arg(request: Any, name: str, default: float, low: float, high: float) -> float:
    text = _arg(request, name)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise _Refused(400, f"{name} must be a number, got {text!r}") from None
    if not low <= value <= high:
        raise _Refused(400, f"{name} must be between {low:g} and {high:g}, got {value:g}")
    return value


class Reloading(Protocol):
    """What the admin needs of the daemon's :class:`cgipool.reload.Reloader`."""

    def reload_and_wait(self) -> defer.Deferred[Any]: ...


class AdminApp:
    """The routes under ``/admin``, bound to one daemon's state."""

    app = Klein()

    def __init__(self, supervisor: Supervisor, *, clock: Any = None,
                 auth: AdminAuth | None = None, metrics: Any = None,
                 sampler: Any = None, proxy_origin: Any = None) -> None:
        self.supervisor = supervisor
        #: The proxy listener's origin for a request (the pages' example links go
        #: there), or None when the admin shares the proxy's listener.
        self.proxy_origin = proxy_origin
        self.clock = clock if clock is not None else supervisor.reactor
        self.auth = auth if auth is not None else AdminAuth(AdminConfig())
        self.metrics = metrics
        self.sampler = sampler
        self.stream = EventStream(self.clock, self.snapshot, supervisor.events)
        #: The daemon's :class:`cgipool.reload.Reloader` (None: reload not offered;
        #: :meth:`offer_reload` sets it).
        self.reloader: Reloading | None = None

    def offer_reload(self, reloader: Reloading) -> None:
        """Offer the configuration reload (``POST /admin/api/reload``) through
        ``reloader``; once (``tap.build``, which makes the reloader after this
        app's pages are on their routes)."""
        if self.reloader is not None:
            raise RuntimeError("the admin already has its reloader")
        self.reloader = reloader

    def resource(self) -> Resource:
        return self.app.resource()

    def start(self) -> None:
        self.stream.start()

    def stop(self) -> None:
        self.stream.stop()

    # -- the data every page, API call and stream message is made of -------------------

    def snapshot(self) -> dict[str, Any]:
        status = self.supervisor.status()
        status["version"] = __version__
        status["now"] = self.clock.seconds()
        metrics, sampler = self.metrics, self.sampler
        if metrics is not None:
            status["traffic"] = metrics.summary(None, 60)
            latest = metrics.latest()["services"]
        for service in status["services"]:
            if metrics is not None:
                service["traffic"] = metrics.summary(service["name"], 60)
                service["latest"] = latest.get(service["name"])
            for worker in service["workers"]:
                stats = (sampler.stats(worker["pid"])
                         if sampler is not None and worker["pid"] else None)
                worker["rss"] = stats["rss"] if stats else None
                worker["cpu_percent"] = stats["cpu_percent"] if stats else None
        return status

    # -- access and lookups ------------------------------------------------------------

    def _check(self, request: Any, mutation: bool = False) -> None:
        denied = self.auth.check(request, mutation)
        if denied is not None:
            raise _Denied(denied)

    def _pool(self, name: str) -> Pool:
        pool = self.supervisor.pools.get(name)
        if pool is None:
            raise _Refused(404, f"no service named {name!r}",
                           services=sorted(self.supervisor.pools))
        return pool

    def _workers(self, pool: Pool, what: str) -> WorkerPool:
        """The pool's resident workers, for a control that acts on them; 409 for
        a service that runs its program per request (CGI)."""
        workers = pool.resident
        if workers is None:
            raise _Refused(409, f"service {pool.name!r} runs its CGI script once per request: "
                                f"{what} (the next request runs it afresh)",
                           protocol=pool.config.protocol)
        return workers

    def _worker(self, pool: Pool, worker_id: int) -> Worker:
        for worker in pool.workers:
            if worker.index == worker_id:
                return worker
        raise _Refused(404, f"service {pool.name!r} has no worker {worker_id}",
                       workers=[w.index for w in pool.workers])

    def _record(self, request: Any, pool: Pool, worker: Worker | None,
                action: str) -> None:
        who = getattr(request.getClientAddress(), "host", "?")
        target = pool.name if worker is None else worker.name
        self.supervisor.events.add("admin", pool.name, None if worker is None else worker.index,
                                   f"{action} {target} (requested by {who})",
                                   action=action, client=who)

    # -- pages ---------------------------------------------------------------------------

    def _page(self, request: Any, name: str) -> bytes:
        self._check(request)
        snapshot = self.snapshot()
        origin = self.proxy_origin(request) if self.proxy_origin is not None else None
        extra: dict[str, Any] = {"session": self.auth.in_session(request),
                                 "proxy": origin.decode("latin-1") if origin else ""}
        if name in ("events", "overview"):
            limit = 200 if name == "events" else pages.OVERVIEW_EVENTS
            extra["events"] = [e.as_dict() for e in self.supervisor.events.recent(limit)]
        if name == "traffic" and self.metrics is not None:
            # Only how many points each chart starts with; the page fetches the series.
            extra["points"] = {name: len(points)
                               for name, points in self.metrics.points.items()}
        return _html(request, pages.render(name, snapshot, extra))

    @app.route("/", branch=False, methods=["GET"])
    def overview(self, request: Any) -> bytes:
        return self._page(request, "overview")

    @app.route("/processes", methods=["GET"])
    def processes(self, request: Any) -> bytes:
        return self._page(request, "processes")

    @app.route("/traffic", methods=["GET"])
    def traffic(self, request: Any) -> bytes:
        return self._page(request, "traffic")

    @app.route("/events", methods=["GET"])
    def events_page(self, request: Any) -> bytes:
        return self._page(request, "events")

    @app.route("/login", methods=["GET"])
    def login_form(self, request: Any) -> bytes:
        return _html(request, pages.render_login(error=None,
                                                 enabled=self.auth.token is not None))

    @app.route("/login", methods=["POST"])
    def login(self, request: Any) -> bytes:
        enabled = self.auth.token is not None
        denied = self.auth.same_origin(request)
        if denied is not None:
            raise _Denied(denied)
        body = request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise _Refused(413, f"a login form is at most {MAX_BODY} bytes")
        token = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[-1]
        session_id, denied = self.auth.login(request, token)
        if denied is not None:
            request.setResponseCode(denied.code, REASONS.get(denied.code))
            if denied.retry_after is not None:
                request.setHeader(b"retry-after", b"%d" % denied.retry_after)
            message = ("Wrong token." if denied.code == 403 else
                       f"Too many failed logins: try again in {denied.retry_after} s.")
            return _html(request, pages.render_login(error=message, enabled=enabled))
        assert session_id is not None
        who = getattr(request.getClientAddress(), "host", "?")
        self.supervisor.events.add("admin", "", None, f"login from {who}",
                                   action="login", client=who)
        request.addCookie(SESSION_COOKIE, session_id.encode(), path=b"/admin",
                          httpOnly=True, sameSite="strict", secure=request.isSecure())
        request.setResponseCode(303)
        request.setHeader(b"location", b"/admin/")
        return b""

    @app.route("/logout", methods=["POST"])
    def logout(self, request: Any) -> bytes:
        denied = self.auth.same_origin(request)
        if denied is not None:
            raise _Denied(denied)
        if self.auth.logout(request):
            who = getattr(request.getClientAddress(), "host", "?")
            self.supervisor.events.add("admin", "", None, f"logout from {who}",
                                       action="logout", client=who)
        # Expire the cookie in the browser too (the daemon forgot the session).
        request.addCookie(SESSION_COOKIE, b"", path=b"/admin", httpOnly=True,
                          sameSite="strict", secure=request.isSecure(), max_age=b"0",
                          expires=b"Thu, 01 Jan 1970 00:00:00 GMT")
        request.setResponseCode(303)
        request.setHeader(b"location", b"/admin/login")
        return b""

    @app.route("/static/<string:name>", methods=["GET"])
    def static(self, request: Any, name: str) -> bytes:
        data = _static_file(name)
        if data is None:
            raise _Refused(404, f"no static file {name!r}")
        content_type = mimetypes.guess_type(name)[0] or "application/octet-stream"
        request.setHeader(b"content-type", content_type.encode())
        request.setHeader(b"cache-control", b"no-cache")
        return data

    # -- read API ------------------------------------------------------------------------

    @app.route("/api/status", methods=["GET"])
    def status(self, request: Any) -> bytes:
        self._check(request)
        return _json(request, self.snapshot())

    @app.route("/api/services/<string:name>", methods=["GET"])
    def service(self, request: Any, name: str) -> bytes:
        self._check(request)
        self._pool(name)
        snapshot = self.snapshot()
        (service,) = [s for s in snapshot["services"] if s["name"] == name]
        service["events"] = [e.as_dict() for e in self.supervisor.events.recent(50, name)]
        return _json(request, service)

    @app.route("/api/metrics", methods=["GET"])
    def metrics_series(self, request: Any) -> bytes:
        self._check(request)
        if self.metrics is None:
            raise _Refused(503, "metrics are not enabled")
        window = _number_arg(request, "window", 900, 1, 86400)
        name = _arg(request, "service")
        if name is not None:
            self._pool(name)
        return _json(request, self.metrics.series(window, name))

    @app.route("/api/log", methods=["GET"])
    def log(self, request: Any) -> bytes:
        self._check(request)
        limit = int(_number_arg(request, "limit", 100, 1, 1000))
        name = _arg(request, "service")
        if name is not None:
            self._pool(name)
        return _json(request, {"events": [e.as_dict() for e in
                                          self.supervisor.events.recent(limit, name)]})

    @app.route("/api/events", methods=["GET"])
    def stream(self, request: Any) -> Any:
        self._check(request)
        refused = self.stream.refusal(request)  # 503 all slots taken, 429 this client's
        if refused is not None:
            raise _Refused(*refused, retry_after=5)
        last = request.getHeader(b"last-event-id") or _arg(request, "since")
        try:
            last_id = int(last) if last else None
        except ValueError:
            raise _Refused(400, f"bad Last-Event-ID {last!r}") from None
        return self.stream.subscribe(request, last_id)

    # -- controls ------------------------------------------------------------------------

    @app.route("/api/services/<string:name>/scale", methods=["POST"])
    def scale(self, request: Any, name: str) -> bytes:
        self._check(request, mutation=True)
        pool = self._pool(name)
        body = _json_body(request)
        size = body.get("workers")
        if isinstance(size, bool) or not isinstance(size, int):
            raise _Refused(400, 'expected {"workers": <integer>}')
        low, high = pool.config.workers.min, pool.config.workers.max
        if not low <= size <= high:
            raise _Refused(400, f"workers must be between {low} and {high} "
                                f"(workers.min..max of {name!r}), got {size}")
        if pool.state in ("unavailable", "removing", "stopped"):
            raise _Refused(409, f"service {name!r} is {pool.state}; it cannot be scaled",
                           state=pool.state)
        self._record(request, pool, None, f"scale to {size}:")
        before = pool.scale_to(size, "admin request")
        if pool.policy is not None:  # the autoscaler measures afresh before deciding
            pool.policy.manual_change()
        return _json(request, {"ok": True, "service": name, "before": before, "after": size})

    @app.route("/api/services/<string:name>/rolling-restart", methods=["POST"])
    def rolling_restart(self, request: Any, name: str) -> bytes:
        self._check(request, mutation=True)
        pool = self._pool(name)
        if pool.state in ("unavailable", "removing", "stopped"):
            raise _Refused(409, f"service {name!r} is {pool.state}; nothing to restart",
                           state=pool.state)
        workers = self._workers(pool, "nothing to restart")
        if workers.rolling:
            raise _Refused(409, f"a rolling restart of {name!r} is already running")
        self._record(request, pool, None, "rolling restart of")
        workers.rolling_restart("admin request")
        # ``roll``: the id of this restart's record, ``last_rolling_restart`` in
        # the service's status once it ends (cgipool restart waits for it).
        return _json(request, {"ok": True, "service": name, "started": True,
                               "workers": workers.desired,
                               "roll": (workers.last_roll or {}).get("id")}, 202)

    @app.route("/api/services/<string:name>/workers/<int:worker_id>/restart",
               methods=["POST"])
    async def restart(self, request: Any, name: str, worker_id: int) -> bytes:
        self._check(request, mutation=True)
        pool = self._pool(name)
        worker = self._worker(pool, worker_id)
        if worker.retiring:
            raise _Refused(409, f"worker {worker.name} is already leaving the pool")
        workers = self._workers(pool, "no worker to restart")
        old_pid = worker.pid
        self._record(request, pool, worker, "restart")
        before = set(pool.workers)
        ok = await _within(self.clock, workers.replace_worker(worker, "admin request"),
                           RESTART_WAIT)
        new = [w for w in pool.workers if w not in before] or [worker]
        replacement = {"id": new[0].index, "pid": new[0].pid}
        if ok is None:
            return _json(request, {"ok": True, "done": False, "service": name,
                                   "worker": worker_id, "old_pid": old_pid,
                                   "replacement": replacement}, 202)
        if not ok:
            raise _Refused(500, f"the replacement for {worker.name} did not start; "
                                "the worker keeps serving (see the event log)")
        return _json(request, {"ok": True, "done": True, "service": name, "worker": worker_id,
                               "old_pid": old_pid, "replacement": replacement})

    @app.route("/api/services/<string:name>/workers/<int:worker_id>/drain", methods=["POST"])
    def drain(self, request: Any, name: str, worker_id: int) -> bytes:
        self._check(request, mutation=True)
        pool = self._pool(name)
        worker = self._worker(pool, worker_id)
        if worker.retiring:
            raise _Refused(409, f"worker {worker.name} is already leaving the pool")
        workers = self._workers(pool, "no worker to drain")
        self._record(request, pool, worker, "drain")
        replaced = workers.desired - 1 < pool.config.workers.min
        workers.drain_worker(worker, "admin request")
        return _json(request, {"ok": True, "service": name, "worker": worker_id,
                               "in_flight": worker.in_flight, "replaced": replaced}, 202)

    @app.route("/api/reload", methods=["POST"])
    async def reload(self, request: Any) -> bytes:
        self._check(request, mutation=True)
        if self.reloader is None:
            raise _Refused(503, "configuration reload is not available")
        who = getattr(request.getClientAddress(), "host", "?")
        self.supervisor.events.add("admin", "", None, f"reload requested by {who}",
                                   action="reload", client=who)
        # Answers once added and rolled services have a new worker ready (at most
        # reload.READY_WAIT seconds), naming those that have not and why.
        result = await self.reloader.reload_and_wait()
        if not result.ok:
            raise _Refused(400, result.summary(), reload=result.as_dict())
        return _json(request, {"ok": True, "summary": result.summary(), **result.as_dict()})

    # -- errors --------------------------------------------------------------------------

    @app.handle_errors(_Refused)
    def refused(self, request: Any, failure: Any) -> bytes:
        e = failure.value
        retry = e.extra.pop("retry_after", None)
        return set_error(request, e.code, e.message, retry_after=retry, **e.extra)

    @app.handle_errors(_Denied)
    def denied(self, request: Any, failure: Any) -> bytes:
        denied = failure.value.denied
        if denied.code == 401 and _wants_page(request):
            # A browser opening a page without a session: to the login form.
            request.setResponseCode(303)
            request.setHeader(b"location", b"/admin/login")
            return _html(request, b"")
        return refuse(request, denied)

    @app.handle_errors(NotFound)
    def not_found(self, request: Any, failure: Any) -> bytes:
        denied = self.auth.check(request)
        if denied is not None:
            return refuse(request, denied)
        return set_error(request, 404, f"no admin page at {request.path.decode('latin-1')}")

    @app.handle_errors(MethodNotAllowed)
    def not_allowed(self, request: Any, failure: Any) -> bytes:
        allowed = ", ".join(sorted(failure.value.valid_methods or ()))
        if allowed:
            request.setHeader(b"allow", allowed.encode())
        return set_error(request, 405,
                         f"{request.method.decode('latin-1')} is not allowed here"
                         + (f" (use {allowed})" if allowed else ""))


def _within(clock: Any, d: defer.Deferred[Any], seconds: float) -> defer.Deferred[Any]:
    """``d``'s result, or None if it takes longer than ``seconds`` (``d`` goes on)."""
    timer = clock.callLater(seconds, lambda: result.called or result.callback(None))
    result: defer.Deferred[Any] = defer.Deferred(
        lambda _: timer.cancel() if timer.active() else None)

    def fire(value: Any) -> Any:
        if timer.active():
            timer.cancel()
        if not result.called:
            result.callback(value)
        return value

    d.addBoth(fire)
    return result


def _json_body(request: Any) -> dict[str, Any]:
    content_type = (request.getHeader(b"content-type") or b"").split(b";")[0].strip()
    if content_type != b"application/json":
        raise _Refused(415, "send the request body as application/json")
    data = request.content.read(MAX_BODY + 1)
    if len(data) > MAX_BODY:
        raise _Refused(413, f"request body larger than {MAX_BODY} bytes")
    try:
        body = json.loads(data or b"{}")
    except ValueError as e:
        raise _Refused(400, f"invalid JSON: {e}") from None
    if not isinstance(body, dict):
        raise _Refused(400, "expected a JSON object")
    return body


_STATIC_CACHE: dict[str, bytes] = {}


def _static_file(name: str) -> bytes | None:
    """A file of ``static/`` by plain name (no paths), cached in memory."""
    if name in _STATIC_CACHE:
        return _STATIC_CACHE[name]
    if "/" in name or "\\" in name or name.startswith("."):
        return None
    path = os.path.join(STATIC_DIR, name)
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        data = f.read()
    _STATIC_CACHE[name] = data
    return data


__all__ = ["AdminApp", "Denied"]
