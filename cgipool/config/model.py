"""The configuration's result classes: frozen attrs classes and their defaults.

What :func:`cgipool.config.load` returns, and what the supervisor, the proxy, the
admin and the tests build directly.  No reading or checking here: the limits a key
may take are in :mod:`cgipool.config.validate`, the YAML in
:mod:`cgipool.config.yaml_reader`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from typing import Any

import attrs

#: Placeholders a command may use.  ``{port}`` and the worker identity change per
#: worker; the others are fixed at load time.
PLACEHOLDERS = frozenset(
    {"port", "python", "service", "worker", "service_dir", "base_dir"}
)
#: Routes the daemon serves itself; a service may not shadow them.
RESERVED_ROUTES = ("/admin", "/metrics")
MANIFEST_NAME = "service.yaml"
#: What ``protocol`` may say: ``http`` (long-running workers) or ``cgi`` (RFC 3875).
PROTOCOLS = ("http", "cgi")
#: Below this a rotated file could not hold one whole line of worker output.
MIN_LOG_BYTES = 16 * 1024
#: The largest ``busy_poll_us``.  The same limit as :data:`cgipool.busypoll.MAX_SPIN_US`
#: (tests/test_config_package.py checks they are equal), defined here so reading
#: the file does not import the busy poller.
MAX_SPIN_US = 10_000


@attrs.frozen
class WorkersConfig:
    """How many worker processes a service runs."""

    min: int = 1
    max: int = 1


@attrs.frozen
class HealthConfig:
    """Active health check: HTTP GET of ``path`` every ``interval`` seconds."""

    path: str = "/"
    interval: float = 5.0
    timeout: float = 1.0
    #: Consecutive failures that take a worker out of rotation and restart it.
    fall: int = 3
    #: Consecutive failed proxied requests (refused, no or broken response)
    #: that do the same: passive health.
    passive_fall: int = 3


@attrs.frozen
class RestartConfig:
    """Restart backoff after unexpected exits."""

    #: First delay; doubles per consecutive failure up to ``max_delay``.
    delay: float = 0.1
    max_delay: float = 30.0
    #: A worker that stays up this long is stable again: the delay resets.
    reset_after: float = 10.0
    #: Consecutive quick failures after which the service reports ``failing``.
    failing_after: int = 3
    #: A process that was ready and lived this long did not crash-loop: its
    #: exit restarts it after the first delay, not a grown one.
    min_uptime: float = 1.0


@attrs.frozen
class QueueConfig:
    """Requests waiting for a free worker when every one is busy."""

    #: Waiting requests per service; one more gets 503 at once.
    max: int = 256
    #: Seconds a request may wait; then 503 with Retry-After.
    timeout: float = 5.0


@attrs.frozen
class AutoscaleConfig:
    """Sizing the pool between workers.min and workers.max by load.

    Utilisation is (in flight + queued) / (workers × concurrency), sampled
    every ``interval`` seconds.
    """

    interval: float = 0.25
    #: Scale up when utilisation stays at or above ``up`` for ``window`` seconds.
    up: float = 0.8
    window: float = 1.0
    #: Workers added per decision at most (the pool at most doubles per decision).
    step: int = 4
    #: Scale down (one worker per ``down_interval``) after utilisation stayed
    #: below ``down`` for ``cooldown`` seconds.
    down: float = 0.3
    cooldown: float = 30.0
    down_interval: float = 1.0


@attrs.frozen
class RecycleConfig:
    """Replacing workers before they age badly (replacement first, then drain)."""

    #: After this many requests (0: never); each worker's limit is lowered by
    #: up to ``jitter`` (a fraction) so workers do not recycle together.
    max_requests: int = 0
    #: Resident memory in bytes (0: never); checked every ``check_interval``.
    max_rss: int = 0
    #: Seconds since start (0: never), with the same jitter.
    max_lifetime: float = 0.0
    jitter: float = 0.1
    check_interval: float = 5.0


@attrs.frozen
class Example:
    """A request the smoke and stress tests send (and the dashboard shows), with
    what a good answer is: the status always; the rest only when given, so any
    HTTP service (HTML, git's smart protocol, JSON) can say what it answers."""

    path: str
    status: int = 200
    #: The answer's media type (``type/subtype`` or ``type/*``), compared without
    #: parameters and case: ``text/html`` matches ``text/html; charset=utf-8``.
    content_type: str | None = None
    #: Texts the body must contain, each one (UTF-8, case-sensitive).
    contains: tuple[str, ...] = ()
    #: A JSON value the body must match: objects may have more keys, the rest
    #: (lists, strings, numbers) must be equal.  None: the body is not read as JSON.
    json: Any = None

    def as_status(self) -> dict[str, Any]:
        """The status document's form (``/admin/api/status``, the tools read it)."""
        return {"path": self.path, "status": self.status,
                "content_type": self.content_type, "contains": list(self.contains),
                "json": self.json}


@attrs.frozen
class ServiceConfig:
    """One pool of identical workers behind one route."""

    name: str
    #: argv template; ``command[0]`` is already resolved to an absolute path
    #: (its literal braces escaped as ``{{``/``}}``, like every argument).
    command: tuple[str, ...]
    route: str
    workers: WorkersConfig = WorkersConfig()
    #: Explicit worker ports (one per slot), or ``()`` to allocate from the range.
    ports: tuple[int, ...] = ()
    health: HealthConfig = HealthConfig()
    restart: RestartConfig = RestartConfig()
    env: Mapping[str, str] = attrs.field(factory=dict)
    stop_timeout: float = 5.0
    start_timeout: float = 30.0
    request_timeout: float = 30.0
    #: Largest request body accepted on this route (bytes); above it: 413.
    max_body: int = 10 * 1024 * 1024
    #: Requests one worker is given at once (1 suits single-threaded workers).
    concurrency: int = 1
    queue: QueueConfig = QueueConfig()
    autoscale: AutoscaleConfig = AutoscaleConfig()
    recycle: RecycleConfig = RecycleConfig()
    cwd: str = "."
    description: str = ""
    language: str = ""
    build: str = ""
    examples: tuple[Example, ...] = ()
    #: The manifest folder, when the service came from one.
    service_dir: str | None = None
    #: Files that defined this service, for messages.
    sources: tuple[str, ...] = ()
    #: ``http``: a pool of long-running workers; ``cgi``: the command runs once
    #: per request (RFC 3875), at most ``workers.max`` at a time.
    protocol: str = "http"
    #: The entry of ``runtimes`` that was found (``""`` without ``runtimes``).
    runtime: str = ""
    #: Why the service cannot run here (no runtime installed), or None.
    unavailable: str | None = None
    #: More input files (absolute paths or globs): when one changes, ``make reload``
    #: restarts the workers, as for a rebuilt executable (supervisor/inputs.py).
    watch: tuple[str, ...] = ()


#: ``admin.listen`` value that serves the admin on the proxy's own listener.
ADMIN_SAME_LISTENER = "same"
#: The proxy's listeners when ``listen`` is not given: IPv4 loopback, and IPv6
#: loopback where the host has it (the second is in ``listen_if_available``).
DEFAULT_LISTEN = ("tcp:8080:interface=127.0.0.1", r"tcp6:8080:interface=\:\:1")
#: The admin's listeners when ``admin.listen`` is not given, likewise.
DEFAULT_ADMIN_LISTEN = ("tcp:8081:interface=127.0.0.1", r"tcp6:8081:interface=\:\:1")


@attrs.frozen
class AdminConfig:
    """Who may use the admin pages, the admin API and ``/metrics``, and where."""

    #: Remote clients must present this (``Authorization: Bearer …``); without
    #: a token only clients from ``local_networks`` are answered.
    token: str | None = None
    local_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    #: The admin's own listeners (Twisted endpoint strings): a page a worker
    #: serves on the proxy's origin is then cross-origin to the admin.
    #: ``(ADMIN_SAME_LISTENER,)`` serves it on the proxy's listeners (warned
    #: about at start-up); see :attr:`same_listener`.
    listen: tuple[str, ...] = DEFAULT_ADMIN_LISTEN
    #: Those of ``listen`` skipped, with a notice, on a host without IPv6
    #: loopback: only the default's ``::1``, never one the file names.
    listen_if_available: tuple[str, ...] = DEFAULT_ADMIN_LISTEN[1:]
    #: A login session ends after this many seconds without a request...
    session_idle: float = 1800.0
    #: ...and this many seconds after the login in any case.
    session_lifetime: float = 43200.0

    @property
    def same_listener(self) -> bool:
        """``admin.listen: same``: the admin is served on the proxy's listeners."""
        return self.listen == (ADMIN_SAME_LISTENER,)


@attrs.frozen
class LogsConfig:
    """The daemon log and the access log: rotated by size, a bounded number kept."""

    #: A file is rotated before a write would take it past this many bytes.
    max_bytes: int = 10 * 1024 * 1024
    #: Old files kept (``cgipool.log.1`` … ``.keep``); the oldest is deleted.
    keep: int = 5


@attrs.frozen
class PoolConfig:
    """The whole daemon configuration."""

    path: str
    #: The proxy's listeners, Twisted endpoint strings (``listen``: one or a list).
    listen: tuple[str, ...] = DEFAULT_LISTEN
    #: Those of ``listen`` skipped, with a notice, on a host without IPv6
    #: loopback (``cgipool.tap.active_listens``): the default's ``::1`` only.
    listen_if_available: tuple[str, ...] = DEFAULT_LISTEN[1:]
    base_dir: str = "."
    services_dir: str | None = None
    port_range: tuple[int, int] = (9100, 9999)
    access_log: str | None = None
    logs: LogsConfig = LogsConfig()
    admin: AdminConfig = AdminConfig()
    #: Clients whose X-Forwarded-For/-Proto/-Host are kept and appended to (load
    #: balancers in front of cgipool); everyone else's are replaced.
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    #: After I/O, poll without sleeping for up to this many µs (0: off); see
    #: :mod:`cgipool.busypoll`.
    busy_poll_us: int = 0
    #: Seconds a client may take no part of a response being sent to it before
    #: its connection is cut (499); the worker's request_timeout is not used for it.
    client_timeout: float = 60.0
    services: tuple[ServiceConfig, ...] = ()

    def service(self, name: str) -> ServiceConfig:
        for svc in self.services:
            if svc.name == name:
                return svc
        raise KeyError(name)
