"""Reading every key into the model: one reader per key or section, then
:func:`load`, which merges each service's manifest with the pool file, builds the
:class:`~cgipool.config.model.PoolConfig` and checks what spans services and
listeners (routes, ports, addresses).

A reader takes a :class:`~cgipool.config.yaml_reader.Value` and returns the
model's value or raises the value's :class:`ConfigError`; the limits each key may
take are written here, the defaults in :mod:`cgipool.config.model`.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
import re
from typing import Any

import attrs
import yaml

from cgipool.config.commands import check_cgi, command_or_runtimes
from cgipool.config.model import (
    ADMIN_SAME_LISTENER,
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_LISTEN,
    MANIFEST_NAME,
    MAX_SPIN_US,
    MIN_LOG_BYTES,
    PROTOCOLS,
    RESERVED_ROUTES,
    AdminConfig,
    AutoscaleConfig,
    Example,
    HealthConfig,
    LogsConfig,
    PoolConfig,
    QueueConfig,
    RecycleConfig,
    RestartConfig,
    ServiceConfig,
    WorkersConfig,
)
from cgipool.config.probe import endpoint_problem, listen_address
from cgipool.config.yaml_reader import ConfigError, Value, Where, YamlMapping, read_yaml

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_ROUTE_RE = re.compile(r"^(/[A-Za-z0-9._~!$&'()*+,;=:@-]+)+$")


def _default(cls: type, name: str) -> Any:
    """The declared default of an attrs field (slotted classes hide it)."""
    return attrs.fields_dict(cls)[name].default


# --------------------------------------------------------------------------
# Loading


def load(path: str, check_executables: bool = True) -> PoolConfig:
    """Read and validate ``path`` (and the manifests it points to).

    :raises ConfigError: on the first mistake found.
    """
    path = os.path.abspath(path)
    top = read_yaml(path, Where(path))
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
    found: dict[str, YamlMapping] = {}
    service_dirs: dict[str, str] = {}
    sources: dict[str, list[str]] = {}
    if services_dir is not None:
        for name, manifest_path in _manifests(services_dir):
            found[name] = read_yaml(manifest_path, Where(manifest_path, name))
            service_dirs[name] = os.path.dirname(manifest_path)
            sources[name] = [manifest_path]
    if services_value is not None and not services_value.is_null():
        for name, value in services_value.mapping().values.items():
            where = Where(path, name)
            if not _NAME_RE.match(name):
                raise where.error(
                    value.node,
                    "service names use letters, digits, '.', '_' and '-' "
                    "(at most 63, starting with a letter or digit)",
                )
            entry = Value(value.node, where)
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


def _service(name: str, m: YamlMapping, base_dir: str, service_dir: str | None,
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
    command, runtime, unavailable = command_or_runtimes(
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
        description=m.get("description", Value.string, ""),
        language=m.get("language", Value.string, ""),
        build=m.get("build", Value.string, ""),
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
        check_cgi(m, svc)
    return svc


def _listen_labels(key: str, endpoints: tuple[str, ...]) -> list[str]:
    """How errors name each listener: ``listen``, or ``listen[1]`` in a list."""
    return [key] if len(endpoints) == 1 else [f"{key}[{i}]" for i in range(len(endpoints))]


def _check_listeners(top: YamlMapping, path: str, listen: tuple[str, ...],
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
        items: list[Value | None] = [None] * len(endpoints)
        if value is not None and isinstance(value.node, yaml.SequenceNode):
            items = list(value.items())
        elif value is not None:
            items = [value]
        for label, item, text in zip(_listen_labels(key, endpoints), items, endpoints):
            address = listen_address(text)
            if address is not None and address.port:
                entries.append((label, item, address))

    def error(label: str, item: Value | None, message: str) -> ConfigError:
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


def _check_unique(services: list[ServiceConfig], found: dict[str, YamlMapping],
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


def _boolean(v: Value) -> bool:
    value = v.scalar()
    if not isinstance(value, bool):
        raise v.error(f"expected true or false, got {value!r}")
    return value


def _listen(v: Value, key: str) -> tuple[str, ...]:
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
        item = Value(item.node, attrs.evolve(item.where, key=f"{key}[{i}]"))
        text = _endpoint(item)
        if text in endpoints:
            raise item.error(f"{text!r} is listed twice ({key}[{endpoints.index(text)}])")
        endpoints.append(text)
    return tuple(endpoints)


def _endpoint(v: Value) -> str:
    text = v.string()
    problem = endpoint_problem(text)
    if problem is not None:
        raise v.error(problem)
    return text


def _directory(v: Value, relative_to: str) -> str:
    path = os.path.normpath(os.path.join(relative_to, os.path.expanduser(v.string())))
    if not os.path.isdir(path):
        raise v.error(f"directory {path!r} does not exist")
    return path


def _port(v: Value) -> int:
    return v.integer(1, 65535)


def _parse_port_range(v: Value, text: str) -> tuple[int, int]:
    match = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", text)
    if not match:
        raise v.error(f"expected a port range like '9100-9999', got {text!r}")
    low, high = int(match.group(1)), int(match.group(2))
    if not (1 <= low <= high <= 65535):
        raise v.error(f"port range {text!r} must satisfy 1 <= low <= high <= 65535")
    return low, high


def _port_range(v: Value) -> tuple[int, int]:
    return _parse_port_range(v, v.string())


def _ports(v: Value) -> tuple[int, ...]:
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


def _route(v: Value) -> str:
    problem = route_problem(v.string())
    if problem is not None:
        raise v.error(problem)
    return v.string().rstrip("/") or "/"


def _admin(v: Value, base_dir: str) -> AdminConfig:
    m = v.mapping()
    token = m.get("token", Value.string, None)
    token_file = m.get("token_file", Value.string, None)
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


def _admin_listen(v: Value) -> tuple[str, ...]:
    """``admin.listen``: endpoint strings, or ``same`` (the proxy's listeners)."""
    if isinstance(v.node, yaml.ScalarNode) and v.scalar() == ADMIN_SAME_LISTENER:
        return (ADMIN_SAME_LISTENER,)
    return _listen(v, "admin.listen")


_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
_SIZE = re.compile(r"\s*(\d+)\s*([kmg]?)(?:i?b)?\s*", re.IGNORECASE)


def _size(v: Value) -> int:
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


def _logs(v: Value) -> LogsConfig:
    m = v.mapping()
    max_bytes = m.get("max_bytes", _size, _default(LogsConfig, "max_bytes"))
    if max_bytes < MIN_LOG_BYTES:
        raise m.values["max_bytes"].error(
            f"must be at least {MIN_LOG_BYTES // 1024}K, got {max_bytes} bytes")
    keep = m.get("keep", lambda x: x.integer(0, 1000), _default(LogsConfig, "keep"))
    m.finish()
    return LogsConfig(max_bytes, keep)


def _networks(v: Value) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    result = []
    for item in v.items():
        text = item.string()
        try:
            result.append(ipaddress.ip_network(text, strict=False))
        except ValueError as e:
            raise item.error(f"not a network like '127.0.0.0/8': {e}") from None
    return tuple(result)


def _workers(v: Value) -> WorkersConfig:
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


def _check_max(v: Value, count: int) -> None:
    if count > 256:
        raise v.error(f"at most 256 workers per service, got {count}")


def _health(v: Value) -> HealthConfig:
    m = v.mapping()
    path = m.get("path", Value.string, _default(HealthConfig, "path"))
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


def _queue(v: Value) -> QueueConfig:
    m = v.mapping()
    size = m.get("max", lambda x: x.integer(0, 100000), _default(QueueConfig, "max"))
    timeout = m.get("timeout", lambda x: x.number(positive=True, maximum=3600),
                    _default(QueueConfig, "timeout"))
    m.finish()
    return QueueConfig(size, timeout)


def _autoscale(v: Value) -> AutoscaleConfig:
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


def _recycle(v: Value) -> RecycleConfig:
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


def _restart(v: Value) -> RestartConfig:
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


def _env(v: Value) -> dict[str, str]:
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


def _watch(v: Value, base_dir: str) -> tuple[str, ...]:
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


def _examples(v: Value, route: str) -> tuple[Example, ...]:
    """``examples:``: paths, or mappings of path, status, content_type, contains, json."""
    examples = []
    for item in v.items():
        if item.is_mapping():
            m = item.mapping()
            where = m.values.get("path", item)
            path = m.require("path", Value.string)
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


def _media_type(v: Value) -> str:
    text = v.string().strip()
    if ";" in text:
        raise v.error(f"give the media type without parameters, e.g. "
                      f"{text.split(';', 1)[0].strip()!r} (parameters such as charset "
                      "are not compared)")
    if not _MEDIA_TYPE_RE.match(text) or text.startswith("*/"):
        raise v.error(f"expected a media type like 'application/json' or 'text/*', "
                      f"got {text!r}")
    return text.lower()


def _contains(v: Value) -> tuple[str, ...]:
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


def _json_value(v: Value) -> Any:
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


def _protocol(v: Value) -> str:
    protocol = v.string()
    if protocol not in PROTOCOLS:
        raise v.error(f"protocol must be one of {', '.join(PROTOCOLS)}, got {protocol!r}")
    return protocol
