"""The pool configuration: ``etc/pool.yaml`` plus the service manifests it finds.

Everything is validated before any process is spawned.  A mistake raises one
:class:`ConfigError` naming the file, the line, the service and the key, because
a daemon that half-starts with a bad pool is worse than one that refuses to start.

Shape (see ``etc/pool.yaml`` for the annotated default)::

    listen: "tcp:8080:interface=127.0.0.1"   # or a list; default: 127.0.0.1 and ::1
    base_dir: ..                # relative paths resolve here; default: the file's folder
    services_dir: services      # every <dir>/<name>/service.yaml is a service
    port_range: "9100-9999"     # worker ports when a service names none
    busy_poll_us: 0             # spin this long after I/O before sleeping (0: off)
    client_timeout: 60          # a client that reads nothing of its answer this long is cut
    logs: {max_bytes: 10M, keep: 5}   # daemon and access log: size-rotated, 5 old kept
    services:
      search:                   # overrides/extends services/search/service.yaml
        command: ["build/search.cgi", "{port}"]
        route: /api/search
        workers: {min: 2, max: 4}
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
import re
import shutil
import string
import sys
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import yaml

from cgipool.busypoll import MAX_SPIN_US

#: Placeholders a command may use.  ``{port}`` and the worker identity change per
#: worker; the others are fixed at load time.
PLACEHOLDERS = frozenset(
    {"port", "python", "service", "worker", "service_dir", "base_dir"}
)
#: Routes the daemon serves itself; a service may not shadow them.
RESERVED_ROUTES = ("/admin", "/metrics")
MANIFEST_NAME = "service.yaml"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ROUTE_RE = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@-]+)+$")


class ConfigError(Exception):
    """A configuration mistake, located as precisely as we know it."""

    def __init__(
        self,
        message: str,
        file: str | None = None,
        line: int | None = None,
        service: str | None = None,
        key: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.line = line
        self.service = service
        self.key = key

    def __str__(self) -> str:
        where = self.file or "<config>"
        if self.line is not None:
            where += f":{self.line}"
        parts = [where]
        if self.service is not None:
            parts.append(f"service {self.service!r}")
        if self.key is not None:
            parts.append(f"key {self.key!r}")
        return ": ".join(parts) + ": " + self.message


# --------------------------------------------------------------------------
# The resulting configuration objects


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


def _default(cls: type, name: str) -> Any:
    """The declared default of an attrs field (slotted classes hide it)."""
    return attrs.fields_dict(cls)[name].default


# --------------------------------------------------------------------------
# Reading YAML nodes while remembering where each value came from


@attrs.frozen
class _Where:
    """The file, service and key path of a node, for error messages."""

    file: str
    service: str | None = None
    key: str | None = None

    def child(self, key: str) -> _Where:
        return attrs.evolve(self, key=key if self.key is None else f"{self.key}.{key}")

    def error(self, node: yaml.Node | None, message: str) -> ConfigError:
        line = node.start_mark.line + 1 if node is not None else None
        return ConfigError(message, self.file, line, self.service, self.key)


@attrs.frozen
class _Value:
    """A YAML node with its location."""

    node: yaml.Node
    where: _Where

    def error(self, message: str) -> ConfigError:
        return self.where.error(self.node, message)

    def scalar(self) -> Any:
        if not isinstance(self.node, yaml.ScalarNode):
            raise self.error(f"expected a single value, got a {_kind(self.node)}")
        try:
            return yaml.SafeLoader("").construct_object(self.node)
        except (yaml.YAMLError, ValueError, TypeError) as e:
            problem = getattr(e, "problem", None) or e
            raise self.error(f"cannot read value: {problem}") from None

    def string(self) -> str:
        value = self.scalar()
        if not isinstance(value, str):
            raise self.error(f"expected a string, got {value!r}")
        return value

    def integer(self, minimum: int | None = None, maximum: int | None = None) -> int:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"expected an integer, got {value!r}")
        self._check_range(value, minimum, maximum)
        return value

    def number(self, minimum: float | None = None, maximum: float | None = None,
               positive: bool = False) -> float:
        value = self.scalar()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(f"expected a number (seconds), got {value!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise self.error(f"expected a finite number, got {value!r}")
        if positive and value <= 0:
            raise self.error(f"must be greater than 0, got {value!r}")
        self._check_range(value, minimum, maximum)
        return float(value)

    def _check_range(self, value: float, minimum: float | None, maximum: float | None) -> None:
        if minimum is not None and value < minimum:
            raise self.error(f"must be at least {minimum}, got {value!r}")
        if maximum is not None and value > maximum:
            raise self.error(f"must be at most {maximum}, got {value!r}")

    def items(self) -> list[_Value]:
        if not isinstance(self.node, yaml.SequenceNode):
            raise self.error(f"expected a list, got a {_kind(self.node)}")
        return [_Value(item, self.where) for item in self.node.value]

    def mapping(self) -> _Mapping:
        if not isinstance(self.node, yaml.MappingNode):
            raise self.error(f"expected a mapping (key: value), got a {_kind(self.node)}")
        return _Mapping.from_node(self.node, self.where)

    def is_mapping(self) -> bool:
        return isinstance(self.node, yaml.MappingNode)

    def is_null(self) -> bool:
        return isinstance(self.node, yaml.ScalarNode) and self.node.tag.endswith(":null")


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "list"
    return "value"


class _Mapping:
    """A YAML mapping whose keys are taken one by one; leftovers are errors."""

    def __init__(self, node: yaml.Node | None, where: _Where,
                 values: dict[str, _Value]) -> None:
        self.node = node
        self.where = where
        self.values = values
        self._taken: set[str] = set()

    @classmethod
    def from_node(cls, node: yaml.MappingNode, where: _Where) -> _Mapping:
        values: dict[str, _Value] = {}
        key_lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise where.error(key_node, "keys must be plain strings")
            key = str(key_node.value)
            if key in values:
                raise where.child(key).error(
                    key_node, f"duplicate key (first given on line {key_lines[key]})"
                )
            values[key] = _Value(value_node, where.child(key))
            key_lines[key] = key_node.start_mark.line + 1
        return cls(node, where, values)

    def merged_over(self, base: _Mapping) -> _Mapping:
        """This mapping's keys win; nested mappings are merged one level deep."""
        values = dict(base.values)
        for key, value in self.values.items():
            old = values.get(key)
            if old is not None and old.is_mapping() and value.is_mapping():
                merged = value.mapping().merged_over(old.mapping())
                values[key] = _MergedValue(value.node, value.where, merged)
            else:
                values[key] = value
        return _Mapping(self.node, self.where, values)

    def has(self, key: str) -> bool:
        return key in self.values

    def take(self, key: str) -> _Value | None:
        self._taken.add(key)
        return self.values.get(key)

    def get(self, key: str, read: Callable[[_Value], Any], default: Any) -> Any:
        value = self.take(key)
        if value is None or value.is_null():
            return default
        return read(value)

    def require(self, key: str, read: Callable[[_Value], Any]) -> Any:
        value = self.take(key)
        if value is None or value.is_null():
            raise self.where.child(key).error(self.node, "is required")
        return read(value)

    def finish(self) -> None:
        """Reject unknown keys, naming the ones that are allowed."""
        for key, value in self.values.items():
            if key not in self._taken:
                allowed = ", ".join(sorted(self._taken))
                raise ConfigError(
                    f"unknown key {key!r} (allowed: {allowed})",
                    value.where.file,
                    _key_line(self.node, key, value),
                    value.where.service,
                    value.where.key,
                )


@attrs.frozen
class _MergedValue(_Value):
    """A mapping value assembled from a manifest and the pool file."""

    merged: _Mapping = attrs.field(default=None)

    def mapping(self) -> _Mapping:
        return _Mapping(self.merged.node, self.where, dict(self.merged.values))

    def is_mapping(self) -> bool:
        return True


def _key_line(node: yaml.Node | None, key: str, value: _Value) -> int:
    if isinstance(node, yaml.MappingNode):
        for key_node, _ in node.value:
            if key_node.value == key:
                return key_node.start_mark.line + 1
    return value.node.start_mark.line + 1


# --------------------------------------------------------------------------
# Loading


def _read_yaml(path: str, where: _Where) -> _Mapping:
    service = where.service
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError("file not found", path, service=service) from None
    except OSError as e:
        raise ConfigError(f"cannot read file: {e.strerror}", path, service=service) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not valid UTF-8 ({e.reason})", path, service=service) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError(f"invalid YAML: {e.problem or e}", path, line, service) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML: {e}", path, service=service) from None
    if node is None:
        raise ConfigError("file is empty; expected a mapping", path, 1, service)
    return _Value(node, where).mapping()


def load(path: str, check_executables: bool = True) -> PoolConfig:
    """Read and validate ``path`` (and the manifests it points to).

    :raises ConfigError: on the first mistake found.
    """
    path = os.path.abspath(path)
    top = _read_yaml(path, _Where(path))
    config_dir = os.path.dirname(path)

    listen = top.get("listen", lambda v: _listen(v, "listen"), None)
    base_dir = top.get("base_dir", lambda v: _directory(v, config_dir), config_dir)
    services_dir = top.get("services_dir", lambda v: _directory(v, base_dir), None)
    port_range = top.get("port_range", _port_range, _default(PoolConfig, "port_range"))
    access_log = top.get(
        "access_log", lambda v: os.path.join(base_dir, v.string()), None
    )
    logs = top.get("logs", _logs, LogsConfig())
    admin = top.get("admin", lambda v: _admin(v, base_dir), AdminConfig())
    trusted_proxies = top.get("trusted_proxies", _networks, ())
    busy_poll_us = top.get("busy_poll_us", lambda v: v.integer(0, MAX_SPIN_US), 0)
    client_timeout = top.get("client_timeout", lambda v: v.number(positive=True, maximum=3600),
                             _default(PoolConfig, "client_timeout"))
    services_value = top.take("services")
    top.finish()

    # Collect each service's mapping: the manifest first, the pool file on top.
    found: dict[str, _Mapping] = {}
    service_dirs: dict[str, str] = {}
    sources: dict[str, list[str]] = {}
    if services_dir is not None:
        for name, manifest_path in _manifests(services_dir):
            found[name] = _read_yaml(manifest_path, _Where(manifest_path, name))
            service_dirs[name] = os.path.dirname(manifest_path)
            sources[name] = [manifest_path]
    if services_value is not None and not services_value.is_null():
        for name, value in services_value.mapping().values.items():
            where = _Where(path, name)
            if not _NAME_RE.match(name):
                raise where.error(
                    value.node,
                    "service names use letters, digits, '.', '_' and '-' "
                    "(at most 63, starting with a letter or digit)",
                )
            entry = _Value(value.node, where)
            if entry.is_null():
                raise where.error(value.node, "service entry is empty")
            mapping = entry.mapping()
            if name in found:
                mapping = mapping.merged_over(found[name])
            elif "route" not in mapping.values and service_dirs:
                # Most likely a misspelt manifest name: say so instead of "route is required".
                close = difflib.get_close_matches(name, list(service_dirs), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise where.error(
                    value.node,
                    f"no manifest {os.path.join(services_dir or '', name, MANIFEST_NAME)} "
                    f"to extend, and no 'route' of its own{hint}")
            found[name] = mapping
            sources.setdefault(name, []).append(path)

    services: list[ServiceConfig] = []
    for name in sorted(found):
        svc = _service(name, found[name], base_dir, service_dirs.get(name),
                       tuple(sources[name]), check_executables)
        if svc is not None:
            services.append(svc)
    if not services:
        raise ConfigError(
            "no services configured (add some under 'services:' or set "
            "'services_dir' to a folder of <name>/service.yaml manifests)",
            path,
        )
    _check_listeners(top, path, listen or DEFAULT_LISTEN, admin.listen)
    _check_unique(services, found, listen or DEFAULT_LISTEN, admin.listen)
    return PoolConfig(
        path=path,
        listen=listen or DEFAULT_LISTEN,
        listen_if_available=() if listen else DEFAULT_LISTEN[1:],
        base_dir=base_dir,
        services_dir=services_dir,
        port_range=port_range,
        access_log=access_log,
        logs=logs,
        admin=admin,
        trusted_proxies=trusted_proxies,
        busy_poll_us=busy_poll_us,
        client_timeout=client_timeout,
        services=tuple(services),
    )


def _manifests(services_dir: str) -> list[tuple[str, str]]:
    result = []
    for entry in sorted(os.listdir(services_dir)):
        manifest = os.path.join(services_dir, entry, MANIFEST_NAME)
        if os.path.isfile(manifest):
            if not _NAME_RE.match(entry):
                raise ConfigError(
                    "service folder names use letters, digits, '.', '_' and '-'",
                    manifest,
                )
            result.append((entry, manifest))
    return result


def _service(name: str, m: _Mapping, base_dir: str, service_dir: str | None,
             sources: tuple[str, ...], check_executables: bool) -> ServiceConfig | None:
    if not m.get("enabled", _boolean, True):
        # Still read the remaining keys so typos are reported.
        for key in list(m.values):
            m.take(key)
        return None
    route = m.require("route", _route)
    workers = m.get("workers", _workers, WorkersConfig())
    ports = m.get("ports", _ports, ())
    if ports and len(ports) < workers.max:
        raise m.values["ports"].error(
            f"{len(ports)} port(s) for up to {workers.max} workers "
            f"(workers.max); give at least {workers.max}"
        )
    cwd = m.get("cwd", lambda v: _directory(v, base_dir), base_dir)
    protocol = m.get("protocol", _protocol, "http")
    command, runtime, unavailable = _command_or_runtimes(
        m, base_dir, cwd, name, service_dir, check_executables)
    svc = ServiceConfig(
        name=name,
        command=command,
        route=route,
        workers=workers,
        ports=ports,
        health=m.get("health", _health, HealthConfig()),
        restart=m.get("restart", _restart, RestartConfig()),
        env=m.get("env", _env, {}),
        stop_timeout=m.get("stop_timeout", lambda v: v.number(positive=True, maximum=3600),
                           _default(ServiceConfig, "stop_timeout")),
        start_timeout=m.get("start_timeout", lambda v: v.number(positive=True, maximum=3600),
                            _default(ServiceConfig, "start_timeout")),
        request_timeout=m.get("request_timeout",
                              lambda v: v.number(positive=True, maximum=86400),
                              _default(ServiceConfig, "request_timeout")),
        max_body=m.get("max_body", _size, _default(ServiceConfig, "max_body")),
        concurrency=m.get("concurrency", lambda v: v.integer(1, 10000),
                          _default(ServiceConfig, "concurrency")),
        queue=m.get("queue", _queue, QueueConfig()),
        autoscale=m.get("autoscale", _autoscale, AutoscaleConfig()),
        recycle=m.get("recycle", _recycle, RecycleConfig()),
        cwd=cwd,
        description=m.get("description", _Value.string, ""),
        language=m.get("language", _Value.string, ""),
        build=m.get("build", _Value.string, ""),
        examples=m.get("examples", lambda v: _examples(v, route), ()),
        service_dir=service_dir,
        sources=sources,
        protocol=protocol,
        runtime=runtime,
        unavailable=unavailable,
        watch=m.get("watch", lambda v: _watch(v, base_dir), ()),
    )
    m.finish()
    if protocol == "cgi":
        _check_cgi(m, svc)
    return svc


def _listen_labels(key: str, endpoints: tuple[str, ...]) -> list[str]:
    """How errors name each listener: ``listen``, or ``listen[1]`` in a list."""
    return [key] if len(endpoints) == 1 else [f"{key}[{i}]" for i in range(len(endpoints))]


def _check_listeners(top: _Mapping, path: str, listen: tuple[str, ...],
                     admin_listen: tuple[str, ...]) -> None:
    """No two listeners on one address, and the admin on ports of its own (its
    redirect and the tools tell the two apart by port)."""
    admin_value = top.values.get("admin")
    admin_entries = None
    if admin_value is not None and admin_value.is_mapping():
        admin_entries = admin_value.mapping().values.get("listen")
    entries = []  # (label, where to point an error, address)
    for key, endpoints, value in (("listen", listen, top.values.get("listen")),
                                  ("admin.listen", admin_listen, admin_entries)):
        if endpoints == (ADMIN_SAME_LISTENER,):
            continue
        items: list[_Value | None] = [None] * len(endpoints)
        if value is not None and isinstance(value.node, yaml.SequenceNode):
            items = list(value.items())
        elif value is not None:
            items = [value]
        for label, item, text in zip(_listen_labels(key, endpoints), items, endpoints):
            address = listen_address(text)
            if address is not None and address.port:
                entries.append((label, item, address))

    def error(label: str, item: _Value | None, message: str) -> ConfigError:
        if item is not None:
            return ConfigError(message, path, item.node.start_mark.line + 1, key=label)
        return ConfigError(message, path, key=label)

    for n, (label, item, address) in enumerate(entries):
        for other_label, _, other in entries[:n]:
            proxy_and_admin = label.startswith("admin.") != other_label.startswith("admin.")
            if proxy_and_admin and address.port == other.port:
                raise error(label, item,
                            f"{label} uses port {address.port}, which the proxy listens on "
                            f"({other_label}); give the admin a port of its own, or write "
                            f"admin.listen: same")
            if address.overlaps(other):
                raise error(label, item, f"{address} is also where {other_label} "
                                         f"listens ({other})")


def _check_unique(services: list[ServiceConfig], found: dict[str, _Mapping],
                  listen: tuple[str, ...], admin_listen: tuple[str, ...]) -> None:
    routes: dict[str, str] = {}
    ports: dict[int, str] = {}
    listening: dict[int, str] = {}  # a port any listener uses -> how to name it
    for key, endpoints in (("admin.listen", admin_listen), ("listen", listen)):
        for label, text in zip(_listen_labels(key, endpoints), endpoints):
            address = listen_address(text)
            if address is not None and address.port:
                owner = "the admin's" if key == "admin.listen" else "the daemon's own"
                listening.setdefault(address.port, f"{owner} listening port ({label})")
    for svc in services:
        m = found[svc.name]
        if svc.route in routes:
            raise m.values["route"].error(
                f"route {svc.route!r} is already used by service {routes[svc.route]!r}"
            )
        routes[svc.route] = svc.name
        for port in svc.ports:
            if port in ports:
                raise m.values["ports"].error(
                    f"port {port} is already used by service {ports[port]!r}"
                )
            if port in listening:
                raise m.values["ports"].error(f"port {port} is {listening[port]}")
            ports[port] = svc.name


# --------------------------------------------------------------------------
# Readers for individual keys


def _boolean(v: _Value) -> bool:
    value = v.scalar()
    if not isinstance(value, bool):
        raise v.error(f"expected true or false, got {value!r}")
    return value


def _listen(v: _Value, key: str) -> tuple[str, ...]:
    """``listen`` (and ``admin.listen``): one endpoint string or a list of them;
    an error names the entry (``listen[1]``) and its line."""
    if not isinstance(v.node, yaml.SequenceNode):
        return (_endpoint(v),)
    items = v.items()
    if not items:
        raise v.error("an empty list listens nowhere; give at least one endpoint string "
                      "(or leave the key out for the default)")
    endpoints: list[str] = []
    for i, item in enumerate(items):
        item = _Value(item.node, attrs.evolve(item.where, key=f"{key}[{i}]"))
        text = _endpoint(item)
        if text in endpoints:
            raise item.error(f"{text!r} is listed twice ({key}[{endpoints.index(text)}])")
        endpoints.append(text)
    return tuple(endpoints)


#: Stands in for the reactor while endpoint strings are checked: parsing only
#: stores it, and importing the global reactor here would install one before
#: twistd has chosen it.
_NO_REACTOR = object()


def _endpoint(v: _Value) -> str:
    text = v.string()
    from twisted.internet import endpoints

    try:
        endpoints.serverFromString(_NO_REACTOR, text)
    except Exception as e:
        hint = ("; an IPv6 address needs its colons escaped: "
                "'tcp6:8080:interface=\\:\\:1'" if re.search(r"interface=[^\\]*::?", text)
                else "; example: 'tcp:8080:interface=127.0.0.1'")
        raise v.error(f"not a valid Twisted endpoint string ({e}){hint}") from None
    try:
        address = listen_address(text)
    except ValueError as e:
        raise v.error(str(e)) from None
    if address is not None and not 0 <= address.port <= 65535:
        raise v.error(f"port {address.port} is out of range (0-65535)")
    if address is not None and address.kind == "tcp6" and address.host \
            and address.family != 6:
        raise v.error(f"tcp6 listens on IPv6 addresses, not {address.host!r}; write "
                      f"'tcp:{address.port}:interface={address.host}'")
    return text


@attrs.frozen
class ListenAddress:
    """Where a TCP endpoint string listens (``host`` ``""``: every address)."""

    kind: str
    host: str
    port: int

    @property
    def family(self) -> int:
        """4 or 6 (``tcp:…:interface=\\:\\:1`` listens on IPv6 too, as in Twisted)."""
        return 6 if ":" in self.host or (self.kind == "tcp6" and not self.host) else 4

    def overlaps(self, other: ListenAddress) -> bool:
        """Whether both cannot listen at once: one port, and one address or a
        wildcard covering the other (``::`` also takes IPv4 on Linux)."""
        if self.port != other.port:
            return False
        if self.host == other.host or "::" in (self.host, other.host) \
                or (not self.host and self.kind == "tcp6") \
                or (not other.host and other.kind == "tcp6"):
            return True
        wildcard = {"", "0.0.0.0"}
        return (self.family == other.family == 4
                and (self.host in wildcard or other.host in wildcard))

    def __str__(self) -> str:
        host = self.host or ("::" if self.family == 6 else "0.0.0.0")
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def listen_address(text: str) -> ListenAddress | None:
    """The address of a ``tcp``, ``tcp6`` or ``ssl`` endpoint string, None for
    other kinds (``unix:``, ``systemd:``…).  Parsed here, in Twisted's syntax
    (``:`` separates, ``\\`` escapes, ``key=value`` or positional), because
    Twisted's endpoints keep it in private attributes.

    :raises ValueError: a port that is not a number.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    current, escaped, parts = "", False, []
    for char in text:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    kind = parts[0].lower()
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    for part in parts[1:]:
        key, equals, value = part.partition("=")
        if equals:
            kwargs[key] = value
        else:
            args.append(part)
    port_text = kwargs.get("port", args[0] if args else "")
    # Positional after the port: tcp and tcp6 take the interface, ssl the key file.
    host = kwargs.get("interface", args[1] if len(args) > 1 and kind != "ssl" else "")
    if not port_text.strip().isdigit():
        raise ValueError(f"port {port_text!r} is not a number")
    return ListenAddress(kind, host, int(port_text))


def _directory(v: _Value, relative_to: str) -> str:
    path = os.path.normpath(os.path.join(relative_to, os.path.expanduser(v.string())))
    if not os.path.isdir(path):
        raise v.error(f"directory {path!r} does not exist")
    return path


def _port(v: _Value) -> int:
    return v.integer(1, 65535)


def _parse_port_range(v: _Value, text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not match:
        raise v.error(f"expected a port range like '9100-9999', got {text!r}")
    low, high = int(match.group(1)), int(match.group(2))
    if not (1 <= low <= high <= 65535):
        raise v.error(f"port range {text!r} must satisfy 1 <= low <= high <= 65535")
    return low, high


def _port_range(v: _Value) -> tuple[int, int]:
    return _parse_port_range(v, v.string())


def _ports(v: _Value) -> tuple[int, ...]:
    if isinstance(v.node, yaml.SequenceNode):
        ports = tuple(_port(item) for item in v.items())
    elif v.is_mapping():
        raise v.error("expected a list of ports or a range like '8000-8003', got a mapping")
    else:
        value = v.scalar()
        if isinstance(value, int) and not isinstance(value, bool):
            ports = (_port(v),)
        elif isinstance(value, str):
            low, high = _parse_port_range(v, value)
            ports = tuple(range(low, high + 1))
        else:
            raise v.error(f"expected a list of ports or a range like '8000-8003', got {value!r}")
    if len(set(ports)) != len(ports):
        raise v.error("the same port is listed twice")
    return ports


def route_problem(text: str) -> str | None:
    """Why ``text`` cannot be a service route (None when it can); also used by
    ``cgipool new-service``."""
    route = text.rstrip("/") or "/"
    if route != "/" and not _ROUTE_RE.match(route):
        return (f"route {text!r} must be a path prefix like '/api/search' "
                "(no query, no spaces, no '%')")
    if any(seg in (".", "..") for seg in route.split("/")):
        return f"route {route!r} must not contain '.' or '..' segments"
    for reserved in RESERVED_ROUTES:
        if route == reserved or route.startswith(reserved + "/"):
            return f"route {route!r} is reserved for the daemon itself"
    return None


def _route(v: _Value) -> str:
    problem = route_problem(v.string())
    if problem is not None:
        raise v.error(problem)
    return v.string().rstrip("/") or "/"


def _admin(v: _Value, base_dir: str) -> AdminConfig:
    m = v.mapping()
    token = m.get("token", _Value.string, None)
    token_file = m.get("token_file", _Value.string, None)
    if token is not None and token_file is not None:
        raise m.values["token_file"].error("give either admin.token or admin.token_file")
    if token_file is not None:
        path = os.path.join(base_dir, os.path.expanduser(token_file))
        try:
            with open(path, encoding="utf-8") as f:
                token = f.read().strip()
        except OSError as e:
            raise m.values["token_file"].error(f"cannot read {path!r}: {e.strerror}") from None
    if token is not None and len(token) < 16:
        where = m.values.get("token") or m.values["token_file"]
        raise where.error("the admin token must be at least 16 characters long")
    networks = m.get("local_networks", _networks, _default(AdminConfig, "local_networks"))
    listen = m.get("listen", _admin_listen, None)
    idle = m.get("session_idle", lambda v: v.number(10, 7 * 86400),
                 _default(AdminConfig, "session_idle"))
    lifetime = m.get("session_lifetime", lambda v: v.number(10, 30 * 86400),
                     _default(AdminConfig, "session_lifetime"))
    if idle > lifetime:
        raise m.values["session_idle"].error(
            f"session_idle ({idle:g} s) is longer than session_lifetime ({lifetime:g} s)")
    m.finish()
    return AdminConfig(token=token, local_networks=networks,
                       listen=listen or DEFAULT_ADMIN_LISTEN,
                       listen_if_available=() if listen else DEFAULT_ADMIN_LISTEN[1:],
                       session_idle=idle, session_lifetime=lifetime)


def _admin_listen(v: _Value) -> tuple[str, ...]:
    """``admin.listen``: endpoint strings, or ``same`` (the proxy's listeners)."""
    if isinstance(v.node, yaml.ScalarNode) and v.scalar() == ADMIN_SAME_LISTENER:
        return (ADMIN_SAME_LISTENER,)
    return _listen(v, "admin.listen")


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_SIZE = re.compile(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", re.IGNORECASE)


def _size(v: _Value) -> int:
    """A byte count: an integer, or a string like ``"512K"``, ``"10M"``, ``"1G"``."""
    value = v.scalar()
    if isinstance(value, str):
        match = _SIZE.fullmatch(value)
        if match is None:
            raise v.error(f"expected a size like 1048576, '512K', '10M' or '1G', got {value!r}")
        size = int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    else:
        size = v.integer()
    if not 0 <= size <= 1 << 40:
        raise v.error(f"must be between 0 and 1T bytes, got {size}")
    return size


#: Below this a rotated file could not hold one whole line of worker output.
MIN_LOG_BYTES = 16 * 1024


def _logs(v: _Value) -> LogsConfig:
    m = v.mapping()
    max_bytes = m.get("max_bytes", _size, _default(LogsConfig, "max_bytes"))
    if max_bytes < MIN_LOG_BYTES:
        raise m.values["max_bytes"].error(
            f"must be at least {MIN_LOG_BYTES // 1024}K, got {max_bytes} bytes")
    keep = m.get("keep", lambda x: x.integer(0, 1000), _default(LogsConfig, "keep"))
    m.finish()
    return LogsConfig(max_bytes, keep)


def _networks(v: _Value) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    result = []
    for item in v.items():
        text = item.string()
        try:
            result.append(ipaddress.ip_network(text, strict=False))
        except ValueError as e:
            raise item.error(f"not a network like '127.0.0.0/8': {e}") from None
    return tuple(result)


def _workers(v: _Value) -> WorkersConfig:
    if not v.is_mapping():
        count = v.integer()
        if count < 1:
            raise v.error("a pool needs at least 1 worker")
        _check_max(v, count)
        return WorkersConfig(count, count)
    m = v.mapping()
    low = m.get("min", lambda x: x.integer(), 1)
    if low < 1:
        raise m.values["min"].error(f"a pool needs at least 1 worker (workers.min={low})")
    high = m.get("max", lambda x: x.integer(), low)
    if high < low:
        raise m.values["max"].error(f"workers.max ({high}) is below workers.min ({low})")
    _check_max(m.values.get("max") or m.values.get("min") or v, high)
    m.finish()
    return WorkersConfig(low, high)


def _check_max(v: _Value, count: int) -> None:
    if count > 256:
        raise v.error(f"at most 256 workers per service, got {count}")


def _health(v: _Value) -> HealthConfig:
    m = v.mapping()
    path = m.get("path", _Value.string, _default(HealthConfig, "path"))
    if not path.startswith("/"):
        raise m.values["path"].error(f"health path must start with '/', got {path!r}")
    interval = m.get("interval", lambda x: x.number(minimum=0.05, maximum=3600),
                     _default(HealthConfig, "interval"))
    timeout = m.get("timeout", lambda x: x.number(positive=True, maximum=3600),
                    _default(HealthConfig, "timeout"))
    fall = m.get("fall", lambda x: x.integer(1, 100), _default(HealthConfig, "fall"))
    passive_fall = m.get("passive_fall", lambda x: x.integer(1, 1000),
                         _default(HealthConfig, "passive_fall"))
    m.finish()
    return HealthConfig(path, interval, timeout, fall, passive_fall)


def _queue(v: _Value) -> QueueConfig:
    m = v.mapping()
    size = m.get("max", lambda x: x.integer(0, 100000), _default(QueueConfig, "max"))
    timeout = m.get("timeout", lambda x: x.number(positive=True, maximum=3600),
                    _default(QueueConfig, "timeout"))
    m.finish()
    return QueueConfig(size, timeout)


def _autoscale(v: _Value) -> AutoscaleConfig:
    m = v.mapping()
    d = functools.partial(_default, AutoscaleConfig)
    interval = m.get("interval", lambda x: x.number(minimum=0.01, maximum=60), d("interval"))
    up = m.get("up", lambda x: x.number(positive=True, maximum=100), d("up"))
    window = m.get("window", lambda x: x.number(minimum=0, maximum=3600), d("window"))
    step = m.get("step", lambda x: x.integer(1, 256), d("step"))
    down = m.get("down", lambda x: x.number(minimum=0, maximum=100), d("down"))
    if down >= up:
        raise (m.values.get("down") or m.values["up"]).error(
            f"autoscale.down ({down:g}) must be below autoscale.up ({up:g})")
    cooldown = m.get("cooldown", lambda x: x.number(minimum=0, maximum=86400), d("cooldown"))
    down_interval = m.get("down_interval", lambda x: x.number(minimum=0, maximum=3600),
                          d("down_interval"))
    m.finish()
    return AutoscaleConfig(interval, up, window, step, down, cooldown, down_interval)


def _recycle(v: _Value) -> RecycleConfig:
    m = v.mapping()
    d = functools.partial(_default, RecycleConfig)
    max_requests = m.get("max_requests", lambda x: x.integer(0, 1 << 40), d("max_requests"))
    max_rss = m.get("max_rss", _size, d("max_rss"))
    max_lifetime = m.get("max_lifetime", lambda x: x.number(minimum=0, maximum=10 ** 8),
                         d("max_lifetime"))
    jitter = m.get("jitter", lambda x: x.number(minimum=0, maximum=0.9), d("jitter"))
    check_interval = m.get("check_interval", lambda x: x.number(minimum=0.1, maximum=3600),
                           d("check_interval"))
    m.finish()
    return RecycleConfig(max_requests, max_rss, max_lifetime, jitter, check_interval)


def _restart(v: _Value) -> RestartConfig:
    m = v.mapping()
    delay = m.get("delay", lambda x: x.number(minimum=0, maximum=3600), _default(RestartConfig, "delay"))
    max_delay = m.get("max_delay", lambda x: x.number(minimum=0, maximum=86400),
                      _default(RestartConfig, "max_delay"))
    if max_delay < delay:
        raise m.values.get("max_delay", m.values.get("delay")).error(
            f"restart.max_delay ({max_delay}) is below restart.delay ({delay})"
        )
    reset_after = m.get("reset_after", lambda x: x.number(positive=True, maximum=86400),
                        _default(RestartConfig, "reset_after"))
    failing_after = m.get("failing_after", lambda x: x.integer(1, 1000),
                          _default(RestartConfig, "failing_after"))
    min_uptime = m.get("min_uptime", lambda x: x.number(minimum=0, maximum=86400),
                       _default(RestartConfig, "min_uptime"))
    m.finish()
    return RestartConfig(delay, max_delay, reset_after, failing_after, min_uptime)


def _env(v: _Value) -> dict[str, str]:
    result = {}
    for key, value in v.mapping().values.items():
        if not _ENV_RE.match(key):
            raise value.error(f"environment variable name {key!r} is not valid")
        raw = value.scalar()
        if isinstance(raw, bool):
            raise value.error(f"YAML reads {value.node.value!r} as {raw!r}; quote it: "
                              f"\"{value.node.value}\"")
        if raw is None or not isinstance(raw, (str, int, float)):
            raise value.error(f"expected a string value, got {raw!r}")
        text = str(raw)
        if "\0" in text:
            raise value.error("environment values cannot contain NUL")
        result[key] = text
    return result


def _watch(v: _Value, base_dir: str) -> tuple[str, ...]:
    """``watch:``: files, folders or globs (``services/x/**/*.py``) whose change
    restarts the service at a reload; relative to base_dir."""
    items = [v] if not isinstance(v.node, yaml.SequenceNode) else v.items()
    paths = []
    for item in items:
        text = item.string()
        if not text or "\0" in text:
            raise item.error("a watch entry is a non-empty path or glob")
        paths.append(os.path.normpath(os.path.join(base_dir, os.path.expanduser(text))))
    return tuple(paths)


def _examples(v: _Value, route: str) -> tuple[Example, ...]:
    """``examples:``: paths, or mappings of path, status, content_type, contains, json."""
    examples = []
    for item in v.items():
        if item.is_mapping():
            m = item.mapping()
            where = m.values.get("path", item)
            path = m.require("path", _Value.string)
            example = Example(
                path,
                status=m.get("status", lambda x: x.integer(100, 599), 200),
                content_type=m.get("content_type", _media_type, None),
                contains=m.get("contains", _contains, ()),
                json=m.get("json", _json_value, None))
            m.finish()
        else:
            where, example = item, Example(item.string())
        problem = example_path_problem(example.path)
        if problem is not None:
            raise where.error(problem)
        examples.append(example)
    return tuple(examples)


def example_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be an example request, or None.  (Not checked: that it
    is under the route, which pool.yaml may change after the manifest's examples.)"""
    if not path.startswith("/"):
        return f"example {path!r} must be a path starting with '/'"
    if not all(33 <= ord(c) < 127 for c in path):
        return (f"example {path!r} must be printable ASCII without spaces "
                "(percent-encode the rest)")
    return None


_TOKEN = r"[A-Za-z0-9!#$%&'*+.^_`|~-]+"
_MEDIA_TYPE_RE = re.compile(rf"^{_TOKEN}/{_TOKEN}$")


def _media_type(v: _Value) -> str:
    text = v.string().strip()
    if ";" in text:
        raise v.error(f"give the media type without parameters, e.g. "
                      f"{text.split(';', 1)[0].strip()!r} (parameters such as charset "
                      "are not compared)")
    if not _MEDIA_TYPE_RE.match(text) or text.startswith("*/"):
        raise v.error(f"expected a media type like 'application/json' or 'text/*', "
                      f"got {text!r}")
    return text.lower()


def _contains(v: _Value) -> tuple[str, ...]:
    items = v.items() if isinstance(v.node, yaml.SequenceNode) else [v]
    texts = []
    for item in items:
        raw = item.scalar()
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise item.error(f"expected a text (or a list of texts) the body contains, "
                             f"got {raw!r}")
        text = raw if isinstance(raw, str) else str(item.node.value)
        if not text:
            raise item.error("an empty text is in every body; give what the body contains")
        texts.append(text)
    if not texts:
        raise v.error("an empty list checks nothing; give a text or leave contains out")
    return tuple(texts)


def _json_value(v: _Value) -> Any:
    """A YAML value as plain JSON data (objects with string keys, lists, scalars)."""
    if v.is_mapping():
        return {key: _json_value(value) for key, value in v.mapping().values.items()}
    if isinstance(v.node, yaml.SequenceNode):
        return [_json_value(item) for item in v.items()]
    raw = v.scalar()
    if raw is None or isinstance(raw, (str, bool, int)):
        return raw
    if isinstance(raw, float):
        if raw != raw or raw in (float("inf"), float("-inf")):
            raise v.error(f"JSON has no {v.node.value!r}; expected a finite number")
        return raw
    raise v.error(f"YAML reads {v.node.value!r} as a {type(raw).__name__}, which JSON "
                  f"does not have; quote it: \"{v.node.value}\"")


def _command(v: _Value, base_dir: str, cwd: str, service: str,
             service_dir: str | None, check_executables: bool) -> tuple[str, ...]:
    if isinstance(v.node, yaml.SequenceNode):
        argv = [_argument(item) for item in v.items()]
    elif v.is_mapping():
        raise v.error('expected a list of arguments like ["build/x.cgi", "{port}"] '
                      "or one string, got a mapping")
    else:
        import shlex

        try:
            argv = shlex.split(v.string())
        except ValueError as e:
            raise v.error(f"cannot split command: {e}") from None
    if not argv or not argv[0]:
        raise v.error("command is empty")
    for arg in argv:
        for _, field, _, _ in _safe_parse(v, arg):
            if field is not None and field not in PLACEHOLDERS:
                raise v.error(
                    f"unknown placeholder {{{field}}} in {arg!r} (known: "
                    + ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
                    + "; write {{ and }} for literal braces)"
                )
    fixed = {
        "python": sys.executable,
        "service": service,
        "base_dir": base_dir,
        "service_dir": service_dir or base_dir,
    }
    program = expand(argv[0], fixed, port=0, worker=0)
    if "/" in program:
        program = os.path.normpath(os.path.join(base_dir, program))
        if check_executables:
            if not os.path.exists(program):
                under = program.startswith(os.path.join(base_dir, ""))
                hint = " (run 'make all' to build the services)" if under else ""
                raise v.error(f"executable {program!r} does not exist{hint}")
            if os.path.isdir(program) or not os.access(program, os.X_OK):
                raise v.error(f"{program!r} is not an executable file")
    elif check_executables:
        found = shutil.which(program)
        if found is None:
            raise v.error(f"executable {program!r} not found on PATH")
        program = found
    # Fill in the fixed placeholders now; {port} and {worker} stay for spawn time.
    rest = [_partial(arg, fixed) for arg in argv[1:]]
    return (program.replace("{", "{{").replace("}", "}}"), *rest)


def _argument(v: _Value) -> str:
    value = v.scalar()
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float)):
        raise v.error(f"command arguments must be strings, got {value!r}")
    text = str(value)
    if "\0" in text:
        raise v.error("command arguments cannot contain NUL")
    return text


def _safe_parse(v: _Value, text: str) -> list[tuple[str, str | None, str | None, str | None]]:
    try:
        return list(string.Formatter().parse(text))
    except ValueError as e:
        raise v.error(f"bad placeholder in {text!r}: {e}") from None


def _partial(text: str, fixed: Mapping[str, str]) -> str:
    """Substitute the fixed placeholders, keep ``{port}``/``{worker}`` for later."""
    out = []
    for literal, field, spec, conv in string.Formatter().parse(text):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        if field in fixed:
            out.append(str(fixed[field]).replace("{", "{{").replace("}", "}}"))
        else:
            out.append("{" + field + "}")
    return "".join(out)


def expand(text: str, fixed: Mapping[str, str] | None = None, *, port: int,
           worker: int) -> str:
    """Fill in every placeholder of one command argument."""
    values = dict(fixed or {})
    values.update(port=str(port), worker=str(worker))
    return text.format_map(_Default(values))


class _Default(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


# --------------------------------------------------------------------------
# Runtimes (try candidates in order) and classic CGI services

PROTOCOLS = ("http", "cgi")


def _protocol(v: _Value) -> str:
    protocol = v.string()
    if protocol not in PROTOCOLS:
        raise v.error(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    return protocol


def _command_or_runtimes(m: _Mapping, base_dir: str, cwd: str, service: str,
                         service_dir: str | None, check_executables: bool
                         ) -> tuple[tuple[str, ...], str, str | None]:
    """``(command, runtime name, unavailable reason)`` from ``command`` or ``runtimes``.

    ``runtimes`` lists candidates ``{name, command, requires}`` tried in order:
    the first whose ``requires`` (programs on PATH, or files relative to
    ``base_dir``) and command program are all present runs.  When none is, the
    service is *unavailable* (with the reason) instead of a configuration error,
    so the rest of the pool still runs.
    """
    runtimes = m.take("runtimes")
    if runtimes is None or runtimes.is_null():
        command = m.require(
            "command",
            lambda v: _command(v, base_dir, cwd, service, service_dir, check_executables))
        return command, "", None
    if m.has("command"):
        raise m.values["command"].error(
            "give either 'command' or 'runtimes', not both (to pin one runtime, "
            "override 'runtimes' with a list of one)")
    m.take("command")
    items = runtimes.items()
    if not items:
        raise runtimes.error("runtimes is empty; list at least one {name, command}")
    chosen: tuple[tuple[str, ...], str] | None = None
    problems: list[str] = []
    names: set[str] = set()
    for item in items:
        entry = item.mapping()
        name = entry.require("name", _Value.string)
        if name in names:
            raise entry.values["name"].error(f"runtime {name!r} is listed twice")
        names.add(name)
        requires = entry.get("requires", lambda v: [x.string() for x in v.items()], [])
        command_value = entry.take("command")
        if command_value is None or command_value.is_null():
            raise entry.where.child("command").error(entry.node, "is required")
        entry.finish()
        # Syntax first: a mistake in any candidate is an error, found or not.
        _command(command_value, base_dir, cwd, service, service_dir, False)
        if chosen is not None:
            continue
        if not check_executables:
            chosen = (_command(command_value, base_dir, cwd, service, service_dir, False), name)
            continue
        missing = [_missing(req, base_dir) for req in requires]
        missing = [text for text in missing if text]
        if not missing:
            try:
                chosen = (_command(command_value, base_dir, cwd, service, service_dir, True),
                          name)
                continue
            except ConfigError as e:
                missing.append(e.message)
        problems.append(f"{name}: {', '.join(missing)}")
    if chosen is None:
        return (), "", "no runtime installed (" + "; ".join(problems) + ")"
    return chosen[0], chosen[1], None


def _missing(requirement: str, base_dir: str) -> str | None:
    """Why ``requirement`` (a program on PATH, or a file) is not there, or None."""
    if "/" in requirement:
        path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(requirement)))
        if os.path.exists(path):
            return None
        under = path.startswith(os.path.join(base_dir, ""))
        return f"{requirement!r} does not exist" + (" (run 'make all')" if under else "")
    if shutil.which(requirement) is None:
        return f"{requirement!r} not found on PATH"
    return None


def _check_cgi(m: _Mapping, svc: ServiceConfig) -> None:
    """What a per-request CGI service cannot have: ports, {port}, NPH scripts."""
    if svc.ports:
        raise m.values["ports"].error("a CGI service (protocol: cgi) listens on no port")
    where = m.values.get("command") or m.values["runtimes"]
    for arg in svc.command:
        if "{port}" in arg or "{worker}" in arg:
            raise where.error(
                "a CGI service runs once per request: {port} and {worker} mean nothing here")
        if os.path.basename(arg).startswith("nph-"):
            raise where.error(
                f"non-parsed-header scripts ({os.path.basename(arg)!r}) are not supported: "
                "cgipool parses the script's CGI header; rename it without 'nph-' and "
                "print 'Status:' and 'Content-Type:' lines instead")
