"""Classic CGI (RFC 3875): a service whose command runs once per request.

A service with ``protocol: cgi`` has no resident workers.  Each request spawns
its command (through the same launcher as the workers: its own process group,
killed with the daemon) with the standard CGI environment and the request body
on stdin, and the script's CGI response — header fields, a blank line, the
body — becomes the HTTP response::

    Status: 404 Not Found            (optional; default 200, or 302 with Location)
    Content-Type: application/json   (required unless it is a redirect)
    Location: http://host/elsewhere  (optional; a client redirect: 302)
    X-Anything: other fields are passed on
                                     (blank line)
    body...

- ``workers.max`` caps concurrent executions (``scale`` changes the cap within
  ``workers.min..max``); more requests wait in a bounded queue (``queue.max``,
  ``queue.timeout``); a full queue or a wait past the timeout → 503 JSON with
  ``Retry-After``.
- ``request_timeout`` kills the script's whole process group → 504 JSON.
- The execution ends when the script has exited and its output pipes are closed:
  a descendant that still holds them (``setsid sleep 300 &``) is killed after
  ``LINGER`` seconds without output (``supervisor/containment.py``), so the
  response ends normally and the slot is free.
- A script that exits without a valid header → 502 JSON; its stderr is logged
  line by line with the request id.
- ``Location: /path?query`` alone (no Status) is a *local* redirect (RFC 3875
  6.2.2): the daemon answers as it would a GET (HEAD stays HEAD) for that path,
  through its routes (another service, a CGI script, a 404), without a body.
  At most ``MAX_LOCAL_REDIRECTS`` in a row (then 500 JSON: a loop).
- Never set: ``HTTP_PROXY`` (httpoxy), ``HTTP_*`` of header names with ``_``.
  ``Authorization`` is not passed (only ``AUTH_TYPE``).  Non-parsed-header
  (``nph-``) scripts are refused by the configuration.
"""

from __future__ import annotations

import collections
import itertools
import os
import re
import signal
from collections.abc import Callable, Collection, Sequence
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET
from zope.interface import implementer

from cgipool import __version__
from cgipool.config import ServiceConfig, expand
from cgipool.credentials import CREDENTIAL_HEADERS, AdminCredentials, sets_admin_cookie
from cgipool.events import EventLog
from cgipool.logtext import printable
from cgipool.proxy.edge import CLIENT_TIMEOUT
from cgipool.proxy.errors import finish_with_error, set_error
from cgipool.proxy.forward import DROP_REQUEST_HEADERS, body_size, forwarded_block
from cgipool.proxy.routes import BadPath, local_redirect, normalize_path
from cgipool.supervisor.containment import Containment, Lineage, new_lineage
from cgipool.supervisor.interface import PerRequestPool, lifecycle_state
from cgipool.supervisor.output import OutputBudget, OutputLogger
from cgipool.supervisor.pool import kill_group, kill_leftovers
from cgipool.supervisor.unavailable import announce_unavailable
from cgipool.supervisor.worker import describe_exit

log = Logger(namespace="cgipool.cgi")

SERVER_SOFTWARE = f"cgipool/{__version__}"
#: The script's header block may not be longer than this.
MAX_HEADER = 64 * 1024
#: A body up to this size is sent with a Content-Length; a longer one is streamed.
BUFFER_LIMIT = 64 * 1024
#: Exit codes kept for the status.
LAST_EXITS = 10
#: After the script exited, how long its output pipes may stay open (held by
#: a descendant) without a byte before that descendant is killed; and how long
#: after that the daemon closes the pipes itself (a holder it could not find).
LINGER = 0.3
CLOSE_AFTER = 1.0
#: Output that keeps coming after the script exited (a descendant writing without
#: end) postpones that for at most this long: then the holders are killed and
#: the response ends with what came (it is not held until request_timeout).
MAX_LINGER = 2.0
#: Request headers never passed as HTTP_*: the body's own (CONTENT_*), hop-by-hop
#: ones, credentials, and Proxy (httpoxy: HTTP_PROXY would steer the script's
#: outgoing requests).
SKIP_HEADERS = frozenset({
    b"content-type", b"content-length", b"proxy", b"authorization",
    b"proxy-authorization", b"connection", b"keep-alive", b"te", b"trailer",
    b"transfer-encoding", b"upgrade",
})
#: Request headers no script sees: the above, and what no worker sees either.
_SKIP_ALWAYS = SKIP_HEADERS | DROP_REQUEST_HEADERS
#: Response fields of the script that the daemon sets itself.
DROP_RESPONSE_HEADERS = frozenset({
    b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"trailer",
    b"upgrade", b"te", b"proxy-connection",
})
#: The environment a script inherits from the daemon (the rest is CGI's own).
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "HOME")
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_STATUS = re.compile(rb"^([1-5][0-9][0-9])(?:[ \t]+(.*))?$")
#: A local redirect's target: origin-form, ``absolute-path [ "?" query ]`` of
#: RFC 3986 pchars (RFC 9112 3.2.1, RFC 3875 6.2.2): it becomes a request line.
_PCHAR = rb"(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})"
_ORIGIN_FORM = re.compile(rb"(?:/" + _PCHAR + rb"*)+(?:\?(?:" + _PCHAR + rb"|[/?])*)?")
#: Any other Location (a client redirect): a URI reference's characters only
#: (RFC 3986 2: unreserved, reserved, '%'); no space, control or quote.
_URI_REFERENCE = re.compile(rb"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")


class BadCgiResponse(ValueError):
    """The script's output is not a CGI response."""


class CgiResponse:
    """The parsed header block of a script's output."""

    __slots__ = ("status", "reason", "headers", "local")

    def __init__(self, status: int, reason: bytes | None,
                 headers: list[tuple[bytes, bytes]], local: bytes | None = None) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        #: The path (and query) of a local redirect, else None.
        self.local = local


def parse_cgi_header(block: bytes) -> CgiResponse:
    """RFC 3875 section 6: the header block (without the blank line) → a response.

    :raises BadCgiResponse: no Content-Type, Location or Status field, a
        malformed line, a bad Status, or a value with a control character.
    """
    status: int | None = None
    reason: bytes | None = None
    location: bytes | None = None
    content_type = False
    headers: list[tuple[bytes, bytes]] = []
    for raw in block.split(b"\n"):
        line = raw[:-1] if raw.endswith(b"\r") else raw
        if line[:1] in (b" ", b"\t"):
            raise BadCgiResponse("folded header lines are not allowed")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.match(name):
            raise BadCgiResponse(f"not a header field: {_show(line)}")
        value = value.strip(b" \t")
        if any(c < 0x20 and c != 0x09 or c == 0x7F for c in value):
            raise BadCgiResponse(f"control character in the {_show(name)} field")
        lname = name.lower()
        if lname == b"status":
            match = _STATUS.match(value)
            if match is None or status is not None:
                raise BadCgiResponse(f"bad Status field: {_show(value)}")
            status = int(match.group(1))
            reason = match.group(2) or None
        elif lname == b"location":
            if location is not None or not value:
                raise BadCgiResponse("bad or repeated Location field")
            if not _URI_REFERENCE.fullmatch(value):
                raise BadCgiResponse(f"Location is not a valid URI: {_show(value)}")
            location = value
            headers.append((b"Location", value))
        else:
            if lname == b"content-type":
                content_type = True
            if lname not in DROP_RESPONSE_HEADERS and not (
                    lname == b"set-cookie" and sets_admin_cookie(value)):
                headers.append((name, value))
    if status is None:
        if location is not None:
            if location[:1] == b"/" and location[:2] != b"//":
                # A local redirect (RFC 3875 6.2.2): the daemon answers it itself.
                if not _ORIGIN_FORM.fullmatch(location):
                    raise BadCgiResponse("local redirect to an invalid path "
                                         f"(expected /path?query): {_show(location)}")
                return CgiResponse(302, None, [], local=location)
            status = 302  # a client redirect (an absolute URI)
        elif content_type:
            status = 200
        else:
            raise BadCgiResponse("no Content-Type, Location or Status field")
    return CgiResponse(status, reason, headers)


def _show(data: bytes, limit: int = 80) -> str:
    text = data[:limit].decode("latin-1")
    return repr(text + ("…" if len(data) > limit else ""))


def cgi_environ(request: Any, script_name: str, path_info: bytes, request_id: str,
                base: dict[str, str],
                credentials: AdminCredentials | None = None) -> dict[str, str]:
    """The RFC 3875 meta-variables of ``request`` (on top of ``base``), without
    the admin's ``credentials`` (session cookie, token)."""
    env = dict(base)
    host = request.getHost()
    client = request.getClientAddress()
    uri = request.uri
    query = uri.partition(b"?")[2]
    server_name = request.getRequestHostname()
    body_length = body_size(request)
    env.update({
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": SERVER_SOFTWARE,
        "SERVER_PROTOCOL": request.clientproto.decode("latin-1"),
        "SERVER_NAME": server_name.decode("latin-1"),
        "SERVER_PORT": str(getattr(host, "port", "")),
        "REQUEST_METHOD": request.method.decode("latin-1"),
        "REQUEST_URI": uri.decode("latin-1"),
        "SCRIPT_NAME": script_name,
        # Not URL-encoded (RFC 3875 4.1.5); routing refused encoded '/' and NUL.
        "PATH_INFO": os.fsdecode(_unquote(path_info)),
        "QUERY_STRING": query.decode("latin-1"),
        "REMOTE_ADDR": str(getattr(client, "host", "")),
        "REMOTE_PORT": str(getattr(client, "port", "")),
        "HTTPS": "on" if request.isSecure() else "off",
        "CGIPOOL_REQUEST_ID": request_id,
    })
    if body_length or request.method in (b"POST", b"PUT", b"PATCH"):
        env["CONTENT_LENGTH"] = str(body_length)
    content_type = request.requestHeaders.getRawHeaders(b"content-type")
    if content_type:
        env["CONTENT_TYPE"] = content_type[0].decode("latin-1")
    authorization = request.requestHeaders.getRawHeaders(b"authorization")
    if authorization and not (credentials is not None and any(
            credentials.is_admin_authorization(v) for v in authorization)):
        scheme = (authorization[0].split(None, 1) or [b""])[0]
        if _TOKEN.match(scheme):
            env["AUTH_TYPE"] = scheme.decode("latin-1")
    # The same headers a worker service would see: no hop-by-hop ones, none the
    # client's Connection names, and X-Forwarded-* set by the daemon, not the client.
    headers = request.requestHeaders
    skip = _SKIP_ALWAYS | {
        token.strip().lower() for value in headers.getRawHeaders(b"connection", ())
        for token in value.split(b",")}
    pairs = [(name, b", ".join(values)) for name, values in headers.getAllRawHeaders()
             if name.lower() not in skip]
    if credentials is not None:
        pairs = _without_credentials(pairs, credentials)
    host = (headers.getRawHeaders(b"host") or [b""])[0]
    for line in forwarded_block(request, host).split(b"\r\n"):
        name, sep, value = line.partition(b": ")
        if sep:
            pairs.append((name, value))
    for name, joined in pairs:
        if b"_" in name or not _TOKEN.match(name):
            continue
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        text = joined.decode("latin-1")
        env[key] = f"{env[key]}, {text}" if key in env else text
    env.pop("HTTP_PROXY", None)
    return env


def _without_credentials(pairs: list[tuple[bytes, bytes]],
                         credentials: AdminCredentials) -> list[tuple[bytes, bytes]]:
    """``pairs`` with the admin's session cookie and token taken out (a script
    is as untrusted as a worker: see cgipool.credentials)."""
    kept = []
    for name, joined in pairs:
        lname = name.lower()
        if lname == b"cookie":
            # Several Cookie lines were joined with ", ": scrub each one.
            values = [credentials.scrub_cookie(v) for v in joined.split(b", ")]
            joined = b"; ".join(v for v in values if v)
            if not joined:
                continue
        elif lname in CREDENTIAL_HEADERS and credentials.allowed(lname, joined) is None:
            continue
        kept.append((name, joined))
    return kept


def _unquote(path: bytes) -> bytes:
    return re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes((int(m.group(1), 16),)), path)


def _body(request: Any) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    return content.read()


class CgiPool:
    """A ``protocol: cgi`` service: per-request executions, a cap and a queue.

    Sits in ``Supervisor.pools`` beside the worker pools, as a
    :class:`~cgipool.supervisor.interface.PerRequestPool`: it keeps no resident
    worker (``resident`` is None, ``workers`` empty) and is not autoscaled
    (``policy`` is None: ``workers.max`` is a cap, not a size).
    """

    #: Nothing runs between requests: no worker slots, no worker pool, no policy.
    workers: tuple[()] = ()
    resident = None
    policy = None

    def __init__(self, config: ServiceConfig, reactor: Any, *, events: EventLog,
                 launcher: Sequence[str], kill: Callable[[int, int], None] = kill_group,
                 containment: Containment | None = None,
                 output_budget: OutputBudget | None = None) -> None:
        self.config = config
        #: Marks each execution's lineage and kills what it leaves behind (None: off).
        self.containment = containment
        self.reactor = reactor
        self.events = events
        self.launcher = list(launcher)
        self.kill = kill
        #: After a script exited: its group only, never its (reaped) pid.
        self.kill_leftovers = kill_leftovers if kill is kill_group else kill
        #: The service's budget of logged script stderr (None: unlimited).
        self.output_budget = output_budget
        self.started = False
        self.stopping = False
        self.removing = False
        #: Concurrent executions allowed now (``scale`` changes it).
        self.limit = config.workers.max
        self.running: set[CgiExecution] = set()
        self.waiting: collections.deque[Waiting] = collections.deque()
        self.executions = 0
        self.completed = 0
        self.timeouts = 0
        self.failures = 0
        #: Executions killed because their client left (counted as neither).
        self.abandoned = 0
        self.rejected = 0
        self.consecutive_failures = 0
        self.last_exit_codes: collections.deque[int | str] = collections.deque(
            maxlen=LAST_EXITS)
        self._ids = itertools.count(1)
        self._idle: list[Deferred[None]] = []
        self._base_env = self._make_base_env(config)
        # No {port} or {worker} in a CGI command (the config refuses them): once.
        self.argv = [expand(arg, port=0, worker=0) for arg in config.command]

    @staticmethod
    def _make_base_env(config: ServiceConfig) -> dict[str, str]:
        inherited = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
        return {**inherited, **config.env, "CGIPOOL_SERVICE": config.name}

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def per_request(self) -> CgiPool:
        """A CGI pool answers each request itself (see Pool.per_request)."""
        return self

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def capacity(self) -> tuple[int, int]:
        """``(scripts running, at most)``: a CGI service keeps no worker."""
        return len(self.running), self.limit

    @property
    def accepting(self) -> bool:
        return self.started and not self.stopping and not self.removing \
            and not self.config.unavailable

    # -- lifecycle ------------------------------------------------------------

    def start(self) -> None:
        self.started = True
        if self.config.unavailable:
            announce_unavailable(self.name, self.config.unavailable, self.events)

    def stop(self) -> Deferred[None]:
        """Refuse new requests, answer waiting ones 503, stop running scripts
        (SIGTERM to the group, SIGKILL after ``stop_timeout``); fires when all ended."""
        self.stopping = True
        self.refuse_waiting("the daemon is shutting down")
        for execution in list(self.running):
            execution.terminate(self.config.stop_timeout)
        d = self._when_idle()
        d.addCallback(lambda _: self.events.add("stopped", self.name, None,
                                                "no CGI script running"))
        return d

    def retire_all(self, reason: str) -> Deferred[None]:
        """Removed by a reload: no new requests; those running finish."""
        self.removing = True
        self.refuse_waiting(f"service {self.name!r} was removed")
        return self._when_idle()

    def reconfigure(self, config: ServiceConfig) -> None:
        """A reloaded configuration: new limits and command apply to the next execution."""
        self.config = config
        self.limit = config.workers.max
        self._base_env = self._make_base_env(config)
        # No {port} or {worker} in a CGI command (the config refuses them): once.
        self.argv = [expand(arg, port=0, worker=0) for arg in config.command]
        self._dispatch()

    def scale_to(self, size: int, reason: str) -> int:
        """Change the cap of concurrent executions (within workers.min..max)."""
        low, high = self.config.workers.min, self.config.workers.max
        if not low <= size <= high:
            raise ValueError(f"size {size} is outside workers.min..max ({low}..{high})")
        before, self.limit = self.limit, size
        if size != before:
            self.events.add("scale", self.name, None,
                            f"at most {before} -> {size} concurrent executions: {reason}",
                            before=before, after=size, reason=reason)
            self._dispatch()
        return before

    def _when_idle(self) -> Deferred[None]:
        if not self.running:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d

    def refuse_waiting(self, message: str) -> None:
        while self.waiting:
            self.waiting.popleft().refuse(message)

    # -- requests ---------------------------------------------------------------

    def handle(self, request: Any, resource: CgiResource) -> Any:
        """Run the script for ``request`` now, queue it, or refuse it."""
        if self.config.unavailable or not self.accepting:
            resource.record(503, 0.0)
            self.rejected += 1
            return set_error(request, 503, self._why_not(), retry_after=1,
                             service=self.name, state=self.state)
        if len(self.running) < self.limit and not self.waiting:
            self._run(request, resource, self.reactor.seconds())
            return NOT_DONE_YET
        if len(self.waiting) >= self.config.queue.max:
            resource.record(503, 0.0)
            self.rejected += 1
            return set_error(request, 503,
                             f"service {self.name!r} is at capacity: {len(self.running)} "
                             f"scripts running, {len(self.waiting)} requests waiting",
                             retry_after=1, service=self.name)
        self.waiting.append(Waiting(self, request, resource))
        return NOT_DONE_YET

    def _why_not(self) -> str:
        if self.config.unavailable:
            return f"service {self.name!r} is unavailable: {self.config.unavailable}"
        if self.removing:
            return f"service {self.name!r} was removed"
        return "the daemon is shutting down"

    def _run(self, request: Any, resource: CgiResource, began: float) -> None:
        request_id = f"{self.name}-{next(self._ids)}"
        execution = CgiExecution(self, request, resource, request_id, began)
        self.running.add(execution)
        self.executions += 1
        execution.start()

    def _dispatch(self) -> None:
        while self.waiting and len(self.running) < self.limit and self.accepting:
            waiting = self.waiting.popleft()
            waiting.dequeued()
            self._run(waiting.request, waiting.resource, waiting.began)

    def finished(self, execution: CgiExecution, exit_code: int | str,
                 ok: bool | None) -> None:
        """An execution is over (process reaped, response done or abandoned);
        ``ok`` None: neither a success nor a failure (its client left)."""
        self.running.discard(execution)
        self.completed += 1
        self.last_exit_codes.append(exit_code)
        if ok is None:
            self.abandoned += 1
        elif ok:
            self.consecutive_failures = 0
        else:
            self.failures += 1
            self.consecutive_failures += 1
        self._dispatch()
        if not self.running:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)

    # -- reading ---------------------------------------------------------------

    @property
    def state(self) -> str:
        """``ok`` or ``failing`` (the last scripts all failed) while it runs (else
        :func:`~cgipool.supervisor.interface.lifecycle_state`'s)."""
        shared = lifecycle_state(self)
        if shared is not None:
            return shared
        if self.consecutive_failures >= self.config.restart.failing_after:
            return "failing"
        return "ok"

    def status(self, now: float) -> dict[str, Any]:
        cfg = self.config
        status = {
            "name": cfg.name,
            "route": cfg.route,
            "state": self.state,
            "protocol": "cgi",
            "description": cfg.description,
            "language": cfg.language,
            "examples": [e.as_status() for e in cfg.examples],
            "size": {"min": cfg.workers.min, "max": cfg.workers.max,
                     "desired": self.limit, "ready": 0},
            "rolling_restart": False,
            "concurrency": 1,
            "queue": {"length": len(self.waiting), "max": cfg.queue.max,
                      "timeout": cfg.queue.timeout},
            "autoscale": None,
            "restarts_total": 0,
            "requests": self.completed,
            "in_flight": len(self.running),
            "workers": [],
            "cgi": {
                "command": list(cfg.command),
                "limit": self.limit,
                "executions": self.executions,
                "in_flight": len(self.running),
                "queued": len(self.waiting),
                "timeouts": self.timeouts,
                "failures": self.failures,
                "abandoned": self.abandoned,
                "rejected": self.rejected,
                "last_exit_codes": list(self.last_exit_codes),
                "pids": sorted(e.pid for e in self.running if e.pid is not None),
            },
        }
        if cfg.unavailable:
            status["reason"] = cfg.unavailable
        return status


class Waiting:
    """A request in the queue, waiting for a free execution slot."""

    def __init__(self, pool: CgiPool, request: Any, resource: CgiResource) -> None:
        self.pool = pool
        self.request = request
        self.resource = resource
        self.began = pool.reactor.seconds()
        request.exchange = self
        self.timer: IDelayedCall | None = pool.reactor.callLater(
            pool.config.queue.timeout, self.timed_out)

    def dequeued(self) -> None:
        self._cancel()
        self.request.exchange = None

    def _cancel(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def timed_out(self) -> None:
        self.timer = None
        self._leave()
        self.refuse(f"no free slot for service {self.pool.name!r} within "
                    f"queue.timeout={self.pool.config.queue.timeout:g}s")

    def refuse(self, message: str) -> None:
        self._cancel()
        self.request.exchange = None
        self.pool.rejected += 1
        self.resource.record(503, self.pool.reactor.seconds() - self.began)
        finish_with_error(self.request, 503, message, retry_after=1, service=self.pool.name)

    def client_gone(self) -> None:
        self._cancel()
        self._leave()
        self.resource.record(499, self.pool.reactor.seconds() - self.began)

    def _leave(self) -> None:
        try:
            self.pool.waiting.remove(self)
        except ValueError:
            pass


class CgiExecution(ProcessProtocol):
    """One run of the script for one request."""

    def __init__(self, pool: CgiPool, request: Any, resource: CgiResource,
                 request_id: str, began: float) -> None:
        self.pool = pool
        self.request = request
        self.resource = resource
        self.request_id = request_id
        self.began = began
        self.pid: int | None = None
        self.header = bytearray()
        self.response: CgiResponse | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        self.committed = False  # status and headers were given to the request
        self.answered = False   # the client got (or will get) its whole answer
        self.client_left = False
        #: The client's connection is gone (told by ``request.notifyFinish()``;
        #: then the request can neither finish nor unregister a producer).
        self.disconnected = False
        request.notifyFinish().addErrback(self._connection_lost)
        self.timed_out = False
        #: The script's output was not a valid CGI response: a failure even if
        #: it exited 0 before the SIGKILL that follows reached it.
        self.invalid_output = False
        self.exit: Failure | None = None
        self.stderr: OutputLogger | None = None
        self.timer: IDelayedCall | None = None
        self.kill_timer: IDelayedCall | None = None
        self.status_sent = 0
        #: The script's stdout reader while it is registered as the producer.
        self.producing: Any = None
        #: The execution's lineage (containment): its descendants end with it.
        self.lineage: Lineage | None = None
        #: Running while the script has exited but its pipes are still open.
        self.linger: IDelayedCall | None = None
        #: Output after the exit postpones ``linger`` until this time at most.
        self.linger_until = 0.0
        self.pipe_timer: IDelayedCall | None = None

    # -- spawning ----------------------------------------------------------------

    def start(self) -> None:
        pool, request = self.pool, self.request
        cfg = pool.config
        argv = pool.argv
        try:
            path = normalize_path(request.path)
        except BadPath:  # routing refused these already
            path = request.path
        # SCRIPT_NAME is the route, PATH_INFO what follows it.
        script_name = "" if cfg.route == "/" else cfg.route
        path_info = path[len(script_name):]
        env = cgi_environ(request, script_name, path_info, self.request_id, pool._base_env,
                          self.resource.credentials)
        request.exchange = self
        self.lineage = new_lineage(pool.containment, pool.name, None, self.request_id)
        self.lineage.mark(env)
        try:
            pool.reactor.spawnProcess(
                self, pool.launcher[0], [*pool.launcher, *argv], env=env, path=cfg.cwd,
                childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            self.lineage.end()
            log.error("{service} [{request_id}]: cannot start {program}: {error}",
                      service=pool.name, request_id=self.request_id, program=argv[0],
                      error=e)
            self._error(502, f"cannot start the CGI script of service {pool.name!r}")
            pool.finished(self, "spawn failed", False)
            return
        self.lineage.spawned(self.pid)
        self.timer = pool.reactor.callLater(cfg.request_timeout, self.timeout)

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.stderr = OutputLogger(self.pool.reactor, self.pool.name,
                                   self.request_id, self.pid, "stderr",
                                   budget=self.pool.output_budget)
        body = _body(self.request)
        if body:
            self.transport.write(body)
        self.transport.closeStdin()

    # -- output --------------------------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        if self.linger is not None:
            self._postpone_release()  # a descendant is still writing: quiet first
        if self.answered:
            return  # answered with an error, or the client left: drain the pipe
        if self.response is None:
            self.header += data
            end, sep = _header_end(self.header)
            if end < 0:
                if len(self.header) > MAX_HEADER:
                    self._bad_output(f"no end of the CGI header within {MAX_HEADER} bytes")
                return
            block, rest = bytes(self.header[:end]), bytes(self.header[end + sep:])
            self.header = bytearray()
            try:
                self.response = parse_cgi_header(block)
            except BadCgiResponse as e:
                self._bad_output(str(e))
                return
            if self.response.local is not None:
                self._local_redirect(self.response.local)
                return
            data = rest
            if not data:
                return
        head = self.request.method == b"HEAD"
        if self.committed:
            if not head:
                self.request.write(data)
                timer = self.timer
                if timer is not None and timer.active():
                    # Streaming: request_timeout is the longest the output may stall.
                    timer.reset(self.pool.config.request_timeout)
            return
        self.body_size += len(data)
        if not head:
            self.body.append(data)
        if self.body_size > BUFFER_LIMIT:
            # Long output: stream it, pausing the script's pipe while the client is slow.
            self._commit(None)
            for chunk in self.body:
                self.request.write(chunk)
            self.body = []
            reader = getattr(self.transport, "pipes", {}).get(1)
            if reader is not None and not head:
                pace = ClientPace(self, reader)
                self.request.registerProducer(pace, True)
                self.producing = pace

    def errReceived(self, data: bytes) -> None:
        if self.linger is not None:
            self._postpone_release()
        if self.stderr is not None:
            self.stderr.feed(data)

    def _bad_output(self, problem: str) -> None:
        pool = self.pool
        log.warn("{service} [{request_id}] pid={pid}: invalid CGI response: {problem}",
                 service=pool.name, request_id=self.request_id, pid=self.pid,
                 problem=problem)
        self.response = None
        self.invalid_output = True
        self._error(502, f"the CGI script of service {pool.name!r} sent an invalid "
                         f"response: {problem}")
        self._kill(signal.SIGKILL)

    # -- the end -----------------------------------------------------------------------

    def processExited(self, reason: Failure) -> None:
        self.exit = reason
        if self.pid is not None:
            # Anything the script left behind in its group goes with it.
            self.pool.kill_leftovers(self.pid, signal.SIGKILL)
        if self.lineage is not None:
            self.lineage.exited()
        self.watch_pipes()

    def watch_pipes(self) -> None:
        """The script has exited: its pipes must end soon (see _release).  Not
        while a slow client holds the output back (the pipe is quiet because it
        is not read): ClientPace calls this again when the client reads."""
        if isinstance(self.producing, ClientPace) and self.producing.paused_at is not None:
            return
        if self.transport is not None and self.linger is None and self.pipe_timer is None:
            # Until the pipes close too (processEnded, usually at once): a descendant
            # outside the group may hold them; see _release.
            clock = self.pool.reactor
            self.linger = clock.callLater(LINGER, self._release)
            self.linger_until = clock.seconds() + MAX_LINGER

    def _postpone_release(self) -> None:
        """Output after the exit: wait for LINGER of quiet, but not past MAX_LINGER."""
        linger = self.linger
        if linger is not None and linger.active() and \
                self.pool.reactor.seconds() + LINGER <= self.linger_until:
            linger.reset(LINGER)

    def _release(self) -> None:
        """The script exited and its pipes are still open and quiet: what holds them
        (its lineage, or any orphan with the pipe open) is killed, so the output ends,
        the response is finished and the slot is free.  CLOSE_AFTER later the daemon
        closes its ends itself."""
        if self.linger is not None and self.linger.active():
            self.linger.cancel()
        self.linger = None
        lineage = self.lineage
        if lineage is not None and lineage.containment is not None:
            lineage.containment.release(lineage, self._pipe_inodes())
        if self.pipe_timer is None:
            self.pipe_timer = self.pool.reactor.callLater(CLOSE_AFTER, self._close_pipes)

    def _pipe_inodes(self) -> list[int]:
        inodes = []
        for fd in (1, 2):
            reader = getattr(self.transport, "pipes", {}).get(fd)
            try:
                inodes.append(os.fstat(reader.fileno()).st_ino)
            except (AttributeError, OSError, ValueError):
                pass
        return inodes

    def _close_pipes(self) -> None:
        self.pipe_timer = None
        if self.transport is not None:
            log.warn("{service} [{request_id}]: output pipes still open {seconds:g}s "
                     "after the script exited; closing them", service=self.pool.name,
                     request_id=self.request_id, seconds=LINGER + CLOSE_AFTER)
            self.transport.loseConnection()

    def processEnded(self, reason: Failure) -> None:
        if self.exit is None:
            self.processExited(reason)
        for timer in (self.timer, self.kill_timer, self.linger, self.pipe_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.timer = self.kill_timer = self.linger = self.pipe_timer = None
        if self.lineage is not None:
            self.lineage.end()  # what it left behind goes at the next sweep
        if self.stderr is not None:
            self.stderr.flush()
        code, sig, text = describe_exit(self.exit or reason)
        exit_code: int | str = code if code is not None else f"signal {sig}"
        ok: bool | None = exit_code == 0 and not self.timed_out and not self.invalid_output
        if self.client_left and not ok:
            ok = None  # killed because its client left: says nothing about the script
        if not self.answered:
            if self.response is None:
                # The output ended before the header did.
                got = "no output" if not self.header else f"{len(self.header)} bytes"
                problem = f"it exited ({text}) before a complete CGI header ({got})"
                log.warn("{service} [{request_id}] pid={pid}: {problem}",
                         service=self.pool.name, request_id=self.request_id, pid=self.pid,
                         problem=problem)
                self._error(502, f"the CGI script of service {self.pool.name!r} sent no "
                                 f"valid response: {problem}")
                ok = False
            else:
                self._finish()
        if exit_code != 0 and not self.timed_out:
            log.warn("{service} [{request_id}] pid={pid}: the script exited with {exit}",
                     service=self.pool.name, request_id=self.request_id, pid=self.pid,
                     exit=text)
        self.pool.finished(self, exit_code, ok)

    def _commit(self, length: int | None) -> None:
        """Give status and headers to the client's request."""
        response = self.response
        assert response is not None
        request = self.request
        self.committed = True
        request.setResponseCode(response.status, response.reason)
        headers = request.responseHeaders
        for name, value in response.headers:
            headers.addRawHeader(name, value)
        if length is not None:
            headers.setRawHeaders(b"content-length", [b"%d" % length])
        self.status_sent = response.status

    def _connection_lost(self, reason: Failure) -> None:
        self.disconnected = True

    def _unproduce(self) -> None:
        pace, self.producing = self.producing, None
        if pace is not None:
            if not self.disconnected:
                self.request.unregisterProducer()
            pace.done()
            pace.reader.resumeProducing()  # read (and drop) the rest, so the end is seen

    def _finish(self) -> None:
        self.answered = True
        self._unproduce()
        if self.client_left:
            return
        if not self.committed:
            body = b"".join(self.body)
            self.body = []
            self._commit(self.body_size)
            if body:
                self.request.write(body)
        self._record(self.status_sent)
        request = self.request
        request.exchange = None
        if not request.finished and not self.disconnected:
            request.finish()

    def _local_redirect(self, target: bytes) -> None:
        """Answer as for a GET of ``target`` (counted here as a 302; the
        service that answers counts the request again with its own status)."""
        self.answered = True
        request = self.request
        request.exchange = None
        self._record(302)
        log.info("{service} [{request_id}] local redirect to {target}",
                 service=self.pool.name, request_id=self.request_id,
                 target=printable(target, 200))
        local_redirect(request, target)

    def _error(self, code: int, message: str) -> None:
        self.answered = True
        self._unproduce()
        self.request.exchange = None
        self._record(code)
        if self.committed:
            # Part of the response went out: the client must see it cut short.
            self.request.channel.loseConnection()
            return
        finish_with_error(self.request, code, message, service=self.pool.name,
                          request_id=self.request_id)

    def _record(self, code: int) -> None:
        self.resource.record(code, self.pool.reactor.seconds() - self.began)

    # -- from the clock and the client ---------------------------------------------------

    def timeout(self) -> None:
        self.timer = None
        pool = self.pool
        self.timed_out = True
        pool.timeouts += 1
        seconds = pool.config.request_timeout
        log.warn("{service} [{request_id}] pid={pid}: no complete answer within "
                 "request_timeout={seconds:g}s; killing its process group",
                 service=pool.name, request_id=self.request_id, pid=self.pid,
                 seconds=seconds)
        pool.events.add("request_timeout", pool.name, None,
                        f"{self.request_id}: pid {self.pid} killed after "
                        f"request_timeout={seconds:g}s", "warn", pid=self.pid,
                        request_id=self.request_id)
        if not self.answered:
            self._error(504, f"the CGI script of service {pool.name!r} did not answer "
                             f"within request_timeout={seconds:g}s")
        self._kill(signal.SIGKILL)
        if self.exit is not None and self.pipe_timer is None:
            self._release()  # exited, and a descendant kept the pipes busy until now

    def terminate(self, grace: float) -> None:
        """Daemon stop: SIGTERM to the group, SIGKILL after ``grace`` seconds."""
        if not self.answered:
            self._error(503, "the daemon is shutting down")
        self._kill(signal.SIGTERM)
        if self.kill_timer is None:
            self.kill_timer = self.pool.reactor.callLater(grace, self._kill, signal.SIGKILL)

    def client_too_slow(self, waited: float) -> None:
        """The client took nothing of the streamed output for client_timeout:
        cut it (499 in the access log), like a client that left.  Not the
        script's fault: not counted as a failure or a timeout."""
        request = self.request
        pool = self.pool
        client = getattr(request.getClientAddress(), "host", "?")
        log.warn("{service} [{request_id}]: client {client} too slow: took nothing of "
                 "the response for {seconds:.1f}s (client_timeout); connection closed",
                 service=pool.name, request_id=self.request_id, client=client,
                 seconds=waited)
        self.client_gone()
        request.channel.transport.abortConnection()  # the edge logs its 499 line

    def client_gone(self) -> None:
        """The client disconnected: the script is of no use any more."""
        self.client_left = True
        self._unproduce()
        if not self.answered:
            self.answered = True
            self._record(499)
        self._kill(signal.SIGKILL)

    def _kill(self, sig: int) -> None:
        if self.pid is not None and self.exit is None:
            self.pool.kill(self.pid, sig)


@implementer(IPushProducer)
class ClientPace:
    """A script's streamed output as the client connection's producer.

    Once output streams, ``request_timeout`` is the longest the script may go
    without output (CgiExecution.outReceived), as a worker's after its head.
    While the client takes nothing (its send buffer is full), the script is
    held back by the client, not slow itself: its ``request_timeout`` stops
    and the client's own ``client_timeout`` runs instead; past it the client is
    cut (499), as on the proxy path (ProxyExchange.pauseProducing).  When the
    client reads again, the script's clock starts afresh.
    A pipe that is quiet only because nobody reads it does not count as the
    script's output having ended (CgiExecution.watch_pipes).
    """

    def __init__(self, execution: CgiExecution, reader: Any) -> None:
        self.execution = execution
        self.reader = reader
        self.clock = execution.pool.reactor
        #: When the client stopped reading (None while it reads).
        self.paused_at: float | None = None
        self.client_timer: IDelayedCall | None = None

    def pauseProducing(self) -> None:
        self.reader.pauseProducing()
        if self.paused_at is not None:
            return
        execution = self.execution
        self.paused_at = self.clock.seconds()
        timer = execution.timer
        if timer is not None and timer.active():
            timer.cancel()
        execution.timer = None
        for name in ("linger", "pipe_timer"):  # quiet because unread, not ended
            pending = getattr(execution, name)
            if pending is not None and pending.active():
                pending.cancel()
            setattr(execution, name, None)
        self.client_timer = self.clock.callLater(self.client_limit(), self.too_slow)

    def resumeProducing(self) -> None:
        if self.paused_at is not None:
            self._resume_clocks()
        self.reader.resumeProducing()

    def stopProducing(self) -> None:
        self.reader.stopProducing()

    def client_limit(self) -> float:
        site = getattr(getattr(self.execution.request, "channel", None), "site", None)
        return float(getattr(site, "client_timeout", CLIENT_TIMEOUT))

    def done(self) -> None:
        """The response ended (or was abandoned): no more clocks of ours."""
        if self.client_timer is not None and self.client_timer.active():
            self.client_timer.cancel()
        self.client_timer = None
        self.paused_at = None

    def _resume_clocks(self) -> None:
        execution = self.execution
        self.paused_at = None
        if self.client_timer is not None and self.client_timer.active():
            self.client_timer.cancel()
        self.client_timer = None
        if execution.timer is None and not execution.answered:
            execution.timer = self.clock.callLater(
                execution.pool.config.request_timeout, execution.timeout)
        if execution.exit is not None:
            execution.watch_pipes()

    def too_slow(self) -> None:
        self.client_timer = None
        execution = self.execution
        now = self.clock.seconds()
        waited = now - self.paused_at if self.paused_at is not None else 0.0
        execution.client_too_slow(waited)


def _header_end(data: bytearray) -> tuple[int, int]:
    """Where the header block ends and how long the blank line is (-1 if not yet)."""
    lf = data.find(b"\n\n")
    crlf = data.find(b"\r\n\r\n")
    candidates = [(i, 2) for i in (lf,) if i >= 0] + [(i, 4) for i in (crlf,) if i >= 0]
    mixed = data.find(b"\n\r\n")
    if mixed >= 0:
        candidates.append((mixed, 3))
    if not candidates:
        return -1, 0
    return min(candidates)


class CgiResource(Resource):
    """The resource behind a CGI service's route."""

    isLeaf = True

    def __init__(self, pool: PerRequestPool, reactor: Any, metrics: Any = None,
                 credentials: AdminCredentials | None = None) -> None:
        super().__init__()
        self.pool = pool
        self.reactor = reactor
        self.metrics = metrics
        #: The admin's credentials, kept out of every script's environment.
        self.credentials = credentials
        self.max_body = pool.config.max_body

    def configure(self, config: ServiceConfig) -> None:
        self.max_body = config.max_body

    @property
    def exchanges(self) -> Collection[Any]:
        """Requests in progress (the daemon's stop waits for them)."""
        return self.pool.running

    def record(self, status: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.record(status, seconds)

    def render(self, request: Any) -> Any:
        if request.method == b"CONNECT":
            self.record(405, 0.0)
            return set_error(request, 405, "CONNECT is not supported")
        return self.pool.handle(request, self)

    def stop(self) -> None:
        """Daemon stop: waiting requests get 503 (running scripts are stopped by
        the pool)."""
        self.pool.refuse_waiting("the daemon is shutting down")
