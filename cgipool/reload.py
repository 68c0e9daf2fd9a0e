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
- *rebuilt*: a service whose input files changed since its workers started
  (the command's program, a script argument, the manifest's ``watch`` files:
  supervisor/inputs.py) rolls the same way — ``make reload`` after ``make all``;
- *unchanged*: untouched.

Workers that serve nothing yet (starting, or waiting out a crash loop's backoff)
are restarted at once rather than rolled: the fix may be in the new files.
:meth:`Reloader.reload_and_wait` (the API, ``cgipool reload``, SIGHUP) then waits
up to :data:`READY_WAIT` seconds for each added or rolled service's first new
worker to be ready, and says which is not and why.

Settings of the daemon itself (listen address, port range, log rotation) cannot
change while it runs: they are reported as needing a restart; ``admin`` and
``busy_poll_us`` apply at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.resource import Resource

from cgipool.busypoll import BusyPollUnsupported
from cgipool.config import ConfigError, PoolConfig, ServiceConfig, load
from cgipool.supervisor.interface import Pool, WorkerPool
from cgipool.supervisor.worker import Worker

log = Logger(namespace="cgipool.reload")

#: Service settings a running process was started with: changing one rolls the pool.
PROCESS_KEYS = ("command", "env", "cwd", "ports", "health", "runtime", "protocol",
                "unavailable", "start_timeout")
#: Daemon settings that need a restart to change.
RESTART_KEYS = ("listen", "port_range", "trusted_proxies", "access_log", "logs",
                "client_timeout")
#: Daemon settings a reload applies at once.
LIVE_KEYS = ("admin", "busy_poll_us")
#: How long a reload waits for the first ready worker of an added or rolled service.
READY_WAIT = 5.0
#: How often it looks while it waits.
READY_POLL = 0.05


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
    #: Why a rolled service rolls (``executable build/search.cgi changed``, ``env changed``).
    reasons: dict[str, str] = attrs.field(factory=dict, hash=False)
    #: Added or rolled services with no new worker ready after the wait, and why.
    not_ready: dict[str, str] = attrs.field(factory=dict, hash=False)

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    def summary(self) -> str:
        if not self.ok:
            return f"configuration not reloaded: {self.error}"
        parts = []

        def shown(n: str) -> str:
            return n + (f" ({self.reasons[n]})" if n in self.reasons else "")

        for label, names in (("added", self.added), ("removed", self.removed),
                             ("rolling", self.rolled), ("updated", self.updated)):
            ready = [shown(n) for n in names if n not in self.not_ready]
            if ready:
                parts.append(f"{label} {', '.join(ready)}")
            parts += [f"{label} {shown(n)}: not ready yet ({self.not_ready[n]})"
                      for n in names if n in self.not_ready]
        text = "; ".join(parts) or "no service changed"
        if self.applied:
            text += f"; {', '.join(self.applied)} applied"
        if self.needs_restart:
            text += f" ({', '.join(self.needs_restart)} changed: restart the daemon to apply)"
        return text


class RouteResources(Protocol):
    """The owner of each service's route resource (the daemon's ProxyService)."""

    def resource(self, name: str) -> Resource | None: ...
    def resources(self) -> dict[str, Resource]: ...

    def put(self, name: str, resource: Resource) -> None:
        """``resource`` answers service ``name``'s route from now on."""

    def take_off(self, name: str) -> None:
        """Service ``name``'s resource leaves its route (kept while it has requests)."""


class Reloader:
    """Applies a new configuration file to a running daemon."""

    def __init__(self, config: PoolConfig, supervisor: Any, root: Any,
                 resources: RouteResources,
                 make_resource: Callable[[Any], Resource], metrics: Any = None,
                 auth: Any = None, busy_poll: Any = None, clock: Any = None) -> None:
        self.config = config
        #: For the bounded wait for readiness (the reactor; a Clock in tests).
        self.clock = clock if clock is not None else supervisor.reactor
        #: The daemon settings it runs with: a reload cannot change them, so each
        #: reload compares the file with these, not with the last file read.
        self.running = {key: getattr(config, key) for key in RESTART_KEYS}
        self.running["admin.listen"] = config.admin.listen
        self.supervisor = supervisor
        self.root = root
        #: Who owns the route resources: the reload asks it to put a new service's
        #: and to take a removed one's off (it keeps those while they have requests;
        #: the daemon's stop waits for and ends them too).
        self.resources = resources
        self.make_resource = make_resource
        self.metrics = metrics
        self.auth = auth
        #: The daemon's :class:`cgipool.busypoll.BusyPollService`, if any.
        self.busy_poll = busy_poll

    def reload(self, path: str | None = None) -> ReloadResult:
        """Load ``path`` (default: the file the daemon started with) and apply it."""
        result = self._load_and_apply(path)
        if result.ok:
            self._report(result)
        return result

    def reload_and_wait(self, path: str | None = None,
                        wait: float = READY_WAIT) -> Deferred[ReloadResult]:
        """:meth:`reload`, then up to ``wait`` seconds for the first new worker of
        each added or rolled service; the result names those still not ready."""
        result = self._load_and_apply(path)
        if not result.ok:
            return succeed(result)
        d = self.wait_ready(result, wait)
        d.addCallback(self._report)
        return d

    def wait_ready(self, result: ReloadResult, wait: float) -> Deferred[ReloadResult]:
        """``result`` with ``not_ready`` filled in once every added or rolled
        service has a current worker in rotation, or after ``wait`` seconds."""
        # Services with resident workers (a CGI service runs its new command at
        # the next request: nothing to wait for), that can run here.
        resident: dict[str, WorkerPool] = {}
        for name in (*result.added, *result.rolled):
            pool = self.supervisor.pools.get(name)
            workers = pool.resident if pool is not None else None
            if workers is not None and workers.state != "unavailable":
                resident[name] = workers
        pools = self.supervisor.pools
        deadline = self.clock.seconds() + wait
        done: Deferred[ReloadResult] = Deferred()

        def look() -> None:
            # A pool removed or replaced meanwhile is no longer waited for.
            waiting = [n for n, pool in resident.items() if pools.get(n) is pool
                       and not pool.current_ready() and not pool.stopping]
            if waiting and self.clock.seconds() < deadline:
                self.clock.callLater(READY_POLL, look)
                return
            done.callback(attrs.evolve(result, not_ready={
                n: resident[n].why_not_ready() for n in waiting}))

        look()
        return done

    def _report(self, result: ReloadResult) -> ReloadResult:
        log.info("configuration reloaded: {summary}", summary=result.summary())
        fields: dict[str, Any] = {k: list(v) for k, v in result.as_dict().items()
                                  if isinstance(v, tuple)}
        fields.update(reasons=dict(result.reasons), not_ready=dict(result.not_ready))
        self.supervisor.events.add(
            "reload", "", None, f"configuration reloaded: {result.summary()}",
            "warn" if result.not_ready else "info", **fields)
        return result

    def _load_and_apply(self, path: str | None) -> ReloadResult:
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
        return self.apply(new)

    def apply(self, new: PoolConfig) -> ReloadResult:
        old = self.config
        before = {s.name: s for s in old.services}
        after = {s.name: s for s in new.services}
        pools = self.supervisor.pools
        added, removed, rolled, updated, unchanged = [], [], [], [], []
        reasons: dict[str, str] = {}
        #: Rolled for their input files only: just the workers started from old ones.
        stale: dict[str, list[Any]] = {}
        for name in sorted(before.keys() - after.keys()):
            removed.append(name)
        for name, svc in sorted(after.items()):
            if name not in before or name not in pools:
                added.append(name)
                continue
            keys = _process_changed(before[name], svc)
            if keys:
                rolled.append(name)
                reasons[name] = f"{', '.join(keys)} changed"
                continue
            workers, why = _stale_inputs(pools[name], svc)
            if workers:
                rolled.append(name)
                reasons[name] = why
                stale[name] = workers
            elif svc == before[name]:
                unchanged.append(name)
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
            self.resources.put(name, self.make_resource(pool))
        for name in (*rolled, *updated):
            pool = pools[name]
            if _kind(before[name]) != _kind(after[name]) or after[name].unavailable:
                # A different kind of pool (unavailable, runnable, CGI): start afresh.
                self._retire(name)
                self.supervisor.remove_pool(name, "its runtime changed")
                new_pool = self.supervisor.add_pool(after[name])
                self.resources.put(name, self.make_resource(new_pool))
                continue
            pool.reconfigure(after[name])
            proxy = self.resources.resource(name)
            if proxy is not None and hasattr(proxy, "configure"):
                proxy.configure(after[name])
            if pool.policy is not None:
                pool.policy.restart()
            # New processes for resident workers; a CGI service runs the new
            # command at its next request.
            workers = pool.resident
            if name in rolled and workers is not None:
                workers.renew(f"reload: {reasons[name]}", stale.get(name))
        self._publish_routes()
        if self.auth is not None:
            self.auth.configure(new.admin)
        if self.busy_poll is not None:
            self.busy_poll.configure(new.busy_poll_us)
        self.config = new

        def live(config: PoolConfig, key: str) -> Any:
            value = getattr(config, key)
            if key == "admin":  # its listener is restart-only (below)
                value = attrs.evolve(value, listen=(), listen_if_available=())
            return value

        def changed(keys: tuple[str, ...]) -> tuple[str, ...]:
            return tuple(k for k in keys if live(old, k) != live(new, k))

        needs_restart = tuple(k for k in RESTART_KEYS if getattr(new, k) != self.running[k])
        if new.admin.listen != self.running["admin.listen"]:
            needs_restart += ("admin.listen",)
        return ReloadResult(ok=True, added=tuple(added), removed=tuple(removed),
                            rolled=tuple(rolled), updated=tuple(updated),
                            unchanged=tuple(unchanged), applied=changed(LIVE_KEYS),
                            needs_restart=needs_restart, reasons=reasons)

    def _retire(self, name: str) -> None:
        """Take a service's resource off the routes (its owner keeps it while it
        has requests)."""
        self.resources.take_off(name)

    def _publish_routes(self) -> None:
        pools = self.supervisor.pools
        self.root.set_routes({pools[name].config.route: resource
                              for name, resource in self.resources.resources().items()
                              if name in pools})


def _kind(config: ServiceConfig) -> tuple[Any, ...]:
    return (getattr(config, "protocol", "http"), bool(getattr(config, "unavailable", None)))


def _process_changed(old: ServiceConfig, new: ServiceConfig) -> list[str]:
    """The settings a running process was started with that changed."""
    return [key for key in PROCESS_KEYS if getattr(old, key, None) != getattr(new, key, None)]


def _stale_inputs(pool: Pool, new: ServiceConfig) -> tuple[list[Worker], str]:
    """Workers of ``pool`` started from input files that changed since (none for
    a CGI service, which runs its files afresh per request, or another kind)."""
    workers = pool.resident
    if workers is None or _kind(pool.config) != _kind(new):
        return [], ""
    return workers.stale_inputs(new)
