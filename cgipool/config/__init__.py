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

The package, in the order a value passes through it:

- :mod:`~cgipool.config.yaml_reader`: YAML nodes with their file and line, and
  :class:`ConfigError`;
- :mod:`~cgipool.config.validate`: a reader per key and section, and :func:`load`
  (:mod:`~cgipool.config.commands`: a service's command and runtimes);
- :mod:`~cgipool.config.probe`: what is asked of the machine (programs on PATH,
  executables) and of Twisted's endpoint syntax, without a reactor;
- :mod:`~cgipool.config.model`: the frozen result classes and their defaults.

Importing this package imports neither ``twisted.internet.reactor`` nor
:mod:`cgipool.busypoll` (tests/test_config_package.py).
"""

from cgipool.config.commands import expand
from cgipool.config.model import (
    ADMIN_SAME_LISTENER,
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_LISTEN,
    MANIFEST_NAME,
    MAX_SPIN_US,
    MIN_LOG_BYTES,
    PLACEHOLDERS,
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
from cgipool.config.probe import ListenAddress, listen_address
from cgipool.config.validate import example_path_problem, load, route_problem
from cgipool.config.yaml_reader import ConfigError

__all__ = [
    "ADMIN_SAME_LISTENER",
    "DEFAULT_ADMIN_LISTEN",
    "DEFAULT_LISTEN",
    "MANIFEST_NAME",
    "MAX_SPIN_US",
    "MIN_LOG_BYTES",
    "PLACEHOLDERS",
    "PROTOCOLS",
    "RESERVED_ROUTES",
    "AdminConfig",
    "AutoscaleConfig",
    "ConfigError",
    "Example",
    "HealthConfig",
    "ListenAddress",
    "LogsConfig",
    "PoolConfig",
    "QueueConfig",
    "RecycleConfig",
    "RestartConfig",
    "ServiceConfig",
    "WorkersConfig",
    "example_path_problem",
    "expand",
    "listen_address",
    "load",
    "route_problem",
]
