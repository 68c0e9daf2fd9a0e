"""Hot reload of the configuration file (SIGHUP, ``make reload``, the admin API).

The new file is loaded and validated first; if it is invalid nothing changes
and the error is reported (event log, daemon log, the API's JSON answer).
Otherwise, service by service:

- *added*: a new pool starts and its route appears once the pool exists;
- *removed*: its route disappears at once (no new requests), its workers
  drain — requests in flight finish — and stop;
- *changed*: limits (workers, concurrency, queue, timeouts, autoscaling,
  recycling, route, description…) apply at once; a change to what a process
  is started with (command, env, cwd, ports, health check, runtime) rolls the
  pool: one worker at a time, each replacement ready before the old one drains;
- *unchanged*: untouched.

Settings of the daemon itself (listen address, port range, log rotation) cannot
change while it runs: they are reported as needing a restart; ``admin`` and
``busy_poll_us`` apply at once.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import attrs
from twisted.logger import Logger
from twisted.web.resource import Resource

from cgipool.busypoll import BusyPollUnsupported
from cgipool.config import ConfigError, PoolConfig, ServiceConfig, load

log = Logger(namespace="cgipool.reload")

#: Service settings a running process was started with: changing one rolls the pool.
PROCESS_KEYS = ("command", "env", "cwd", "ports", "health", "runtime", "protocol",
                "unavailable", "start_timeout")
#: Daemon settings that need a restart to change.
RESTART_KEYS = ("listen", "port_range", "trusted_proxies", "access_log", "logs",
                "client_timeout")
#: Daemon settings a reload applies at once.
LIVE_KEYS = ("admin", "busy_poll_us")


@attrs.frozen
class ReloadResult:
    ok: bool
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    #: Changed and rolling (new processes), changed in place (limits only).
    rolled: tuple[str, ...] = ()
    updated: tuple[str, ...] = ()
    unchanged: tuple[str, ...] = ()
    #: Daemon settings that changed and apply at once (admin, busy_poll_us).
    applied: tuple[str, ...] = ()
    #: Daemon settings that changed but need a restart.
    needs_restart: tuple[str, ...] = ()
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def summary(self) -> str:
        if not self.ok:
            return f"configuration not reloaded: {self.error}"
        parts = [f"{label} {', '.join(names)}" for label, names in (
            ("added", self.added), ("removed", self.removed), ("rolling", self.rolled),
            ("updated", self.updated)) if names]
        text = "; ".join(parts) or "no service changed"
        if self.applied:
            text += f"; {', '.join(self.applied)} applied"
        if self.needs_restart:
            text += f" ({', '.join(self.needs_restart)} changed: restart the daemon to apply)"
        return text


class Reloader:
    """Applies a new configuration file to a running daemon."""

    def __init__(self, config: PoolConfig, supervisor: Any, root: Any,
                 proxies: MutableMapping[str, Any],
                 make_resource: Callable[[Any], Resource], metrics: Any = None,
                 auth: Any = None, retired: list[Any] | None = None,
                 busy_poll: Any = None) -> None:
        self.config = config
        #: The daemon settings it runs with: a reload cannot change them, so each
        #: reload compares the file with these, not with the last file read.
        self.running = {key: getattr(config, key) for key in RESTART_KEYS}
        self.running["admin.listen"] = config.admin.listen
        self.supervisor = supervisor
        self.root = root
        self.proxies = proxies
        #: Resources taken off their route while requests may be in flight on
        #: them; the daemon's stop waits for and ends those too (ProxyService).
        self.retired: list[Any] = retired if retired is not None else []
        self.make_resource = make_resource
        self.metrics = metrics
        self.auth = auth
        #: The daemon's :class:`cgipool.busypoll.BusyPollService`, if any.
        self.busy_poll = busy_poll

    def reload(self, path: str | None = None) -> ReloadResult:
        """Load ``path`` (default: the file the daemon started with) and apply it."""
        events = self.supervisor.events
        try:
            new = load(path or self.config.path)
            if self.busy_poll is not None:
                try:
                    self.busy_poll.check(new.busy_poll_us)
                except BusyPollUnsupported as e:
                    raise ConfigError(str(e), new.path, key="busy_poll_us") from None
        except ConfigError as e:
            log.error("configuration not reloaded: {error}", error=str(e))
            events.add("reload_failed", "", None, f"configuration not reloaded: {e}",
                       "error", error=str(e))
            return ReloadResult(ok=False, error=str(e))
        result = self.apply(new)
        log.info("configuration reloaded: {summary}", summary=result.summary())
        events.add("reload", "", None, f"configuration reloaded: {result.summary()}",
                   **{k: list(v) for k, v in result.as_dict().items()
                      if isinstance(v, tuple)})
        return result

    def apply(self, new: PoolConfig) -> ReloadResult:
        old = self.config
        before = {s.name: s for s in old.services}
        after = {s.name: s for s in new.services}
        pools = self.supervisor.pools
        added, removed, rolled, updated, unchanged = [], [], [], [], []
        for name in sorted(before.keys() - after.keys()):
            removed.append(name)
        for name, svc in sorted(after.items()):
            if name not in before or name not in pools:
                added.append(name)
            elif svc == before[name]:
                unchanged.append(name)
            elif _process_changed(before[name], svc):
                rolled.append(name)
            else:
                updated.append(name)
        # Routes first: removed services take no new request from here on.
        for name in removed:
            self._retire(name)
        self._publish_routes()
        for name in removed:
            if name in pools:
                self.supervisor.remove_pool(name, "removed from the configuration")
            if self.metrics is not None:
                self.metrics.remove_service(name)
        for name in added:
            pool = self.supervisor.add_pool(after[name])
            self.proxies[name] = self.make_resource(pool)
        for name in (*rolled, *updated):
            pool = pools[name]
            if _kind(before[name]) != _kind(after[name]) or after[name].unavailable:
                # A different kind of pool (unavailable, runnable, CGI): start afresh.
                self._retire(name)
                self.supervisor.remove_pool(name, "its runtime changed")
                new_pool = self.supervisor.add_pool(after[name])
                self.proxies[name] = self.make_resource(new_pool)
                continue
            pool.reconfigure(after[name])
            proxy = self.proxies.get(name)
            if proxy is not None and hasattr(proxy, "configure"):
                proxy.configure(after[name])
            pool.policy.restart()
            if name in rolled:
                pool.roll("configuration reloaded")
        self._publish_routes()
        if self.auth is not None:
            self.auth.configure(new.admin)
        if self.busy_poll is not None:
            self.busy_poll.configure(new.busy_poll_us)
        self.config = new

        def live(config: PoolConfig, key: str) -> Any:
            value = getattr(config, key)
            if key == "admin":  # its listener is restart-only (below)
                value = attrs.evolve(value, listen="")
            return value

        def changed(keys: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(k for k in keys if live(old, k) != live(new, k))

        needs_restart = tuple(k for k in RESTART_KEYS if getattr(new, k) != self.running[k])
        if new.admin.listen != self.running["admin.listen"]:
            needs_restart += ("admin.listen",)
        return ReloadResult(ok=True, added=tuple(added), removed=tuple(removed),
                            rolled=tuple(rolled), updated=tuple(updated),
                            unchanged=tuple(unchanged), applied=changed(LIVE_KEYS),
                            needs_restart=needs_restart)

    def _retire(self, name: str) -> None:
        """Take a service's resource off the routes; keep it while it has requests."""
        proxy = self.proxies.pop(name, None)
        self.retired[:] = [p for p in self.retired if getattr(p, "exchanges", None)]
        if proxy is not None:
            self.retired.append(proxy)

    def _publish_routes(self) -> None:
        pools = self.supervisor.pools
        self.root.set_routes({pools[name].config.route: resource
                              for name, resource in self.proxies.items() if name in pools})


def _kind(config: ServiceConfig) -> tuple[Any, ...]:
    return (getattr(config, "protocol", "http"), bool(getattr(config, "unavailable", None)))


def _process_changed(old: ServiceConfig, new: ServiceConfig) -> bool:
    return any(getattr(old, key, None) != getattr(new, key, None) for key in PROCESS_KEYS)
