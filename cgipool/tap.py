"""``twistd cgipool``: options and the service tree of the daemon.

The configuration is loaded and validated in :meth:`Options.postOptions`, so a
bad file stops twistd before it daemonizes or spawns anything, with one line
naming file, line, service and key, and exit status 1.
"""

from __future__ import annotations

import resource
import signal
import socket
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from twisted.application.service import MultiService, Service
from twisted.internet import defer
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.python import usage
from twisted.web.resource import Resource

from cgipool.admin.app import AdminApp
from cgipool.admin.auth import AdminAuth
from cgipool.busypoll import BusyPollService, BusyPollUnsupported
from cgipool.cgi import CgiPool, CgiResource
from cgipool.config import ConfigError, PoolConfig, listen_address, load
from cgipool.credentials import AdminCredentials
from cgipool.health import HealthMonitor, HttpProbe
from cgipool.logs import use_for_twistd
from cgipool.metrics import Metrics, MetricsService
from cgipool.proxy.edge import EdgeSite
from cgipool.proxy.fastio import server_endpoint
from cgipool.proxy.forward import ServiceProxy
from cgipool.proxy.routes import Elsewhere, Root
from cgipool.proxy.upstream import WorkerConnections
from cgipool.ready import ReadyNotice, listener_url
from cgipool.reload import Reloader
from cgipool.supervisor.interface import Pool
from cgipool.supervisor.supervisor import Supervisor
from cgipool.supervisor.worker import Worker

if TYPE_CHECKING:
    from cgipool.procstats import ProcessSampler

log = Logger(namespace="cgipool")

#: How long a stopping daemon lets requests in flight finish.
DRAIN_TIMEOUT = 5.0
#: The listen backlog when ``listen`` names none (Twisted's default is 50, which
#: a burst of new connections overflows: each overflowing SYN waits ~1 s).
LISTEN_BACKLOG = 1024


def listen_endpoint(reactor: Any, listen: str) -> Any:
    """The endpoint for ``listen``, a TCP one with a backlog of LISTEN_BACKLOG
    unless the string sets one, and eager writes (``proxy/fastio.py``)."""
    kind = listen.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6") and "backlog=" not in listen:
        listen += f":backlog={LISTEN_BACKLOG}"
    return server_endpoint(reactor, listen)


class Options(usage.Options):
    synopsis = "[--config etc/pool.yaml]"
    longdesc = ("Supervise pools of worker processes and reverse-proxy requests "
                "to them, with an admin dashboard at /admin.")
    optParameters = [
        ["config", "c", "etc/pool.yaml", "The pool configuration file (YAML)."],
    ]

    def postOptions(self) -> None:
        try:
            self["pool"] = load(self["config"])
        except ConfigError as e:
            raise SystemExit(f"cgipool: configuration error: {e}") from None
        pool = self["pool"]
        listens, _ = active_listens(pool, has_ipv6_loopback())
        for listen in (*listens["web"], *listens["admin-web"]):
            problem = listen_problem(listen)
            if problem:
                raise SystemExit(f"cgipool: {problem}")
        # twistd's log file rotated by size with logs.keep old files (cgipool/logs.py).
        logs = self["pool"].logs
        self["daemon_log"] = use_for_twistd(getattr(self, "parent", None),
                                            logs.max_bytes, logs.keep)


def has_ipv6_loopback() -> bool:
    """Whether ``::1`` can be bound here (no IPv6, or IPv6 without loopback: not).
    Asked at start-up, not when the file is read: the file may move hosts."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def active_listens(config: PoolConfig, ipv6_loopback: bool
                   ) -> tuple[dict[str, tuple[str, ...]], tuple[str, ...]]:
    """The endpoints to listen on, by listener group (``web``, and ``admin-web``
    unless ``admin.listen: same``), and those skipped: the default's ``::1`` ones
    when the host has no IPv6 loopback."""
    groups = {"web": (config.listen, config.listen_if_available),
              "admin-web": (() if config.admin.same_listener else config.admin.listen,
                            config.admin.listen_if_available)}
    active: dict[str, tuple[str, ...]] = {}
    skipped: list[str] = []
    for name, (endpoints, if_available) in groups.items():
        active[name] = tuple(e for e in endpoints if ipv6_loopback or e not in if_available)
        skipped += [e for e in endpoints if e not in active[name]]
    return active, tuple(skipped)


def listen_problem(listen: str) -> str | None:
    """Why the daemon could not listen on ``listen`` (TCP only), checked before
    anything starts so the answer is one line instead of a traceback."""
    address = listen_address(listen)
    if address is None:
        return None
    family = socket.AF_INET6 if address.family == 6 else socket.AF_INET
    host, port = address.host, address.port
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            hint = " (is cgipool already running? `make stop`)" if e.errno == 98 else ""
            return f"cannot listen on {host or '*'}:{port} ({listen!r}): {e.strerror}{hint}"
    return None


class ListeningService(Service):
    """Listens on an endpoint while running; a failure to listen is raised from
    ``startService`` (a busy port stops the daemon before any worker starts).

    ``port`` is the listening port once listening (its ``getHost()`` gives the
    port a ``tcp:0`` endpoint got); ``listening`` fires with it.
    """

    def __init__(self, name: str, endpoint: Any, factory: Any) -> None:
        self.setName(name)
        self.endpoint = endpoint
        self.factory = factory
        self.port: Any = None
        self.listening: defer.Deferred[Any] = defer.Deferred()

    def startService(self) -> None:
        super().startService()
        failures: list[Any] = []
        d = self.endpoint.listen(self.factory)
        d.addCallbacks(self._listening, failures.append)
        if failures:  # TCP and UNIX endpoints answer at once
            self.running = False
            failures[0].raiseException()

    def _listening(self, port: Any) -> Any:
        self.port = port
        self.listening.callback(port)
        return port

    def stopService(self) -> defer.Deferred[None] | None:
        super().stopService()
        if self.port is None:
            return None
        port, self.port = self.port, None
        return defer.maybeDeferred(port.stopListening)


def daemon_urls(top: MultiService) -> tuple[list[str], str]:
    """The proxy's URLs and the dashboard's, from the listeners of ``top``."""
    proxies, dashboard = [], ""
    for service in top:
        if isinstance(service, ListeningService):
            url = listener_url(service)
            if url is None:
                continue
            if service.name.startswith("admin-web"):  # admin-web, admin-web-2…
                dashboard = dashboard or url + "/admin/"  # the first: IPv4
            else:
                proxies.append(url)
    return proxies, dashboard or (proxies[0] + "/admin/" if proxies else "")


def listener_origin(webs: Sequence[ListeningService]) -> Callable[[Any], bytes | None]:
    """The origin (``http://host:port``) of one of ``webs`` for a request: the
    listener on the address the request came to, else one of its family (a
    client of ``[::1]:8081`` gets ``[::1]:8080``), else the first; the request's
    host name when that listener takes every address.  None when none of them
    listens on an IP address (yet)."""

    def origin(request: Any) -> bytes | None:
        addresses = [service.port.getHost() for service in webs if service.port is not None]
        addresses = [a for a in addresses if isinstance(a, (IPv4Address, IPv6Address))]
        if not addresses:
            return None
        here = request.getHost()
        address = next((a for a in addresses if a.host == getattr(here, "host", None)),
                       next((a for a in addresses if type(a) is type(here)), addresses[0]))
        host = address.host
        if host in ("0.0.0.0", "::"):
            asked = (request.getHeader(b"host") or b"").decode("latin-1")
            host = asked.rsplit("]", 1)[0].lstrip("[") if asked.startswith("[") \
                else asked.split(":", 1)[0]
            host = host or "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{address.port}".encode("ascii", "replace")

    return origin


def admin_location(admin_webs: Sequence[ListeningService]) -> Any:
    """For the proxy's ``/admin`` redirect: the same path on an admin listener
    (see listener_origin)."""
    origin = listener_origin(admin_webs)

    def location(request: Any) -> bytes | None:
        found = origin(request)
        return None if found is None else found + request.uri

    return location


class ProxyService(Service):
    """Owns the per-route resources (a ServiceProxy or a CgiResource per service)
    and those a reload took off their routes; on stop, lets requests in flight
    finish.  The Reloader changes them only through :meth:`put` and
    :meth:`take_off`."""

    name = "proxy"

    def __init__(self, proxies: Mapping[str, Resource], supervisor: Supervisor,
                 reactor: Any, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        #: Each service's route resource, by service name (a copy: this is its owner).
        self._resources: dict[str, Resource] = dict(proxies)
        #: Proxies a reload took off their routes, maybe with requests in flight
        #: (only :meth:`retire` adds to it).
        self.retired: list[Any] = []
        self.supervisor = supervisor
        self.reactor = reactor
        self.drain_timeout = drain_timeout

    def retire(self, resource: Any) -> None:
        """Keep ``resource``, taken off its route by a reload, while it has
        requests in flight (the stop waits for and ends them); the retired
        ones that have none left are let go."""
        self.retired[:] = [p for p in self.retired if getattr(p, "exchanges", None)]
        self.retired.append(resource)

    def resource(self, name: str) -> Resource | None:
        """The resource on service ``name``'s route (None: it has none)."""
        return self._resources.get(name)

    def resources(self) -> dict[str, Resource]:
        """Every service's route resource, by service name (a copy)."""
        return dict(self._resources)

    def put(self, name: str, resource: Resource) -> None:
        """``resource`` answers service ``name``'s route from now on (one it
        replaces is retired)."""
        self.take_off(name)
        self._resources[name] = resource

    def take_off(self, name: str) -> None:
        """Service ``name``'s resource leaves its route; :meth:`retire` keeps it
        while it has requests."""
        resource = self._resources.pop(name, None)
        if resource is not None:
            self.retire(resource)

    def all_proxies(self) -> list[Any]:
        return [*self._resources.values(), *self.retired]

    def in_flight(self) -> int:
        return sum(len(getattr(p, "exchanges", ())) for p in self.all_proxies())

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        super().stopService()
        deadline = self.reactor.seconds() + self.drain_timeout
        while self.in_flight() and self.reactor.seconds() < deadline:
            yield _sleep(self.reactor, 0.05)
        for proxy in self.all_proxies():
            proxy.stop()
        for pool in [*self.supervisor.pools.values(), *self.supervisor.leaving]:
            for worker in pool.workers:
                if worker.connections is not None:
                    worker.connections.abort_all()


def _sleep(reactor: Any, seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class ReloadOnHangup(Service):
    """SIGHUP reloads the configuration file (``make reload``)."""

    name = "reload"

    def __init__(self, reloader: Reloader, reactor: Any) -> None:
        self.reloader = reloader
        self.reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._hangup)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _hangup(self, signum: int, frame: Any) -> None:
        # Signal handlers run between bytecodes: do the work in the reactor.  The
        # result (with any service not ready after the wait) goes to the logs.
        self.reactor.callFromThread(self.reloader.reload_and_wait)


class AdminService(Service):
    """Runs the admin's live stream; stopped before the proxy drains so open
    dashboards are closed instead of holding the daemon up."""

    name = "admin"

    def __init__(self, admin: AdminApp) -> None:
        self.admin = admin

    def startService(self) -> None:
        super().startService()
        self.admin.start()

    def stopService(self) -> None:
        super().stopService()
        self.admin.stop()


class CgipoolService(MultiService):
    """The daemon's services, started *and* stopped in the order they were added.

    Start: listen first (a busy port fails before any worker is spawned), then
    the admin stream, the proxy, the workers, the metrics loop and busy polling.
    Stop: stop listening, close live dashboards, let requests in flight finish,
    then stop the workers and wait for every one to be reaped.

    Its parts, for twistd's plugin, the tests and the benchmarks, are typed
    attributes given at construction (:func:`build` makes them).
    """

    def __init__(self, *, supervisor: Supervisor, proxy: ProxyService, metrics: Metrics,
                 sampler: ProcessSampler, site: EdgeSite, admin: AdminApp,
                 reloader: Reloader, busy_poll: BusyPollService, auth: AdminAuth) -> None:
        super().__init__()
        #: The worker pools (a child service).
        self.supervisor = supervisor
        #: The per-route proxies and the retired ones (a child service).
        self.proxy = proxy
        #: Request history per service, and the once-a-second process sampler.
        self.metrics = metrics
        self.sampler = sampler
        #: The proxy's site (every ``web`` listener serves it).
        self.site = site
        self.admin = admin
        self.reloader = reloader
        self.busy_poll = busy_poll
        self.auth = auth

    def stopService(self) -> defer.Deferred[None]:
        Service.stopService(self)
        d: defer.Deferred[Any] = defer.succeed(None)
        for service in list(self):
            d.addCallback(lambda _, s=service: s.stopService())
        d.addCallback(lambda _: None)
        return d


def raise_open_files_limit() -> None:
    """Many client connections need many descriptors: raise the soft limit."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        target = hard if hard != resource.RLIM_INFINITY else 1 << 20
        if soft < target:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as e:
        log.warn("cannot raise the open files limit: {error}", error=e)


def listener_names(group: str, endpoints: Sequence[str]) -> list[tuple[str, str]]:
    """Service names of a group's listeners: ``web``, ``web-2``… (the first keeps
    the plain name)."""
    return [(group if i == 0 else f"{group}-{i + 1}", endpoint)
            for i, endpoint in enumerate(endpoints)]


def build(config: PoolConfig, reactor: Any, *,
          loopback6: Callable[[], bool] = has_ipv6_loopback,
          **supervisor_options: Any) -> CgipoolService:
    """The whole daemon as a service tree, for twistd and for tests.

    ``loopback6`` says whether the host has IPv6 loopback (probed here, at
    start-up; tests inject an answer)."""

    def connections(worker: Worker) -> WorkerConnections:
        assert worker.port is not None
        return WorkerConnections(reactor, "127.0.0.1", worker.port)

    busy_poll = BusyPollService(reactor, config.busy_poll_us)  # refuses a reactor that cannot spin
    # Containment (supervisor/containment.py): only what this daemon marked unless
    # the caller says more (twistd: "all"); a test process has other children.
    supervisor_options.setdefault("contain", "ours")
    # Health checks: HTTP probes, a monitor per worker process (tests: a fake probe).
    supervisor_options.setdefault("probe", HttpProbe(reactor))
    supervisor_options.setdefault("monitor", HealthMonitor)
    supervisor = Supervisor(config, reactor, connections_factory=connections,
                            kinds={"cgi": CgiPool}, **supervisor_options)
    metrics_service = MetricsService.for_supervisor(supervisor, reactor,  # metrics
                                                    busy_poll=busy_poll)
    supervisor.use_sampler(metrics_service.sampler)  # recycle.max_rss: one sampler

    credentials = AdminCredentials()  # kept from every worker and script

    def make_resource(pool: Pool) -> Resource:
        """What answers a service's route: the proxy to its resident workers, or
        the resource that runs its program per request."""
        metrics = metrics_service.metrics.add_service(pool.name)
        workers = pool.resident
        if workers is not None:
            return ServiceProxy(workers, reactor, metrics, credentials)
        scripts = pool.per_request
        if scripts is None:
            raise TypeError(f"service {pool.name!r}: its pool neither keeps workers nor "
                            "answers requests itself")
        return CgiResource(scripts, reactor, metrics, credentials)

    proxy_service = ProxyService({name: make_resource(pool)
                                  for name, pool in supervisor.pools.items()},
                                 supervisor, reactor)
    auth = AdminAuth(config.admin, reactor, credentials)
    webs: list[ListeningService] = []  # the proxy's listeners, made below
    admin = AdminApp(supervisor, clock=reactor, auth=auth, metrics=metrics_service.metrics,
                     sampler=metrics_service.sampler,
                     proxy_origin=None if config.admin.same_listener else listener_origin(webs))
    admin_pages = {"admin": admin.resource(), "metrics": metrics_service.resource(auth.check)}
    listens, skipped = active_listens(config, loopback6())
    if skipped:
        log.info("this host has no IPv6 loopback (::1 cannot be bound): not listening "
                 "on {skipped}", skipped=", ".join(skipped))
    same = config.admin.same_listener
    admin_webs: list[ListeningService] = []
    if same:
        log.warn("admin.listen is 'same': the dashboard, its API and /metrics are served on "
                 "the proxy's listener ({listen}), the same origin as every service, so a "
                 "page that any worker or CGI script serves can use the admin through a "
                 "local admin's browser; give the admin a listener of its own to avoid it",
                 listen=", ".join(listens["web"]))
        local = admin_pages
    else:
        home = Elsewhere(lambda request: b"/admin/", "/admin/", "the dashboard is at /admin/")
        admin_site = EdgeSite(Root({}, local={**admin_pages, "": home},
                                   services_at=listener_origin(webs)), reactor=reactor)
        admin_webs = [ListeningService(name, listen_endpoint(reactor, listen), admin_site)
                      for name, listen in listener_names("admin-web", listens["admin-web"])]
        moved = Elsewhere(admin_location(admin_webs), ", ".join(listens["admin-web"]))
        local = {"admin": moved, "metrics": moved}
    root = Root(
        {supervisor.pools[name].config.route: resource
         for name, resource in proxy_service.resources().items()},
        local=local,
    )
    reloader = Reloader(config, supervisor, root, proxy_service, make_resource,
                        metrics_service.metrics, auth, busy_poll=busy_poll)
    admin.offer_reload(reloader)
    site = EdgeSite(root, access_log=config.access_log, reactor=reactor,
                    trusted_proxies=config.trusted_proxies, logs=config.logs,
                    client_timeout=config.client_timeout)
    top = CgipoolService(supervisor=supervisor, proxy=proxy_service,
                         metrics=metrics_service.metrics, sampler=metrics_service.sampler,
                         site=site, admin=admin, reloader=reloader, busy_poll=busy_poll,
                         auth=auth)
    for name, listen in listener_names("web", listens["web"]):
        web = ListeningService(name, listen_endpoint(reactor, listen), site)
        webs.append(web)
        web.setServiceParent(top)
    for admin_web in admin_webs:
        admin_web.setServiceParent(top)
    ReloadOnHangup(reloader, reactor).setServiceParent(top)
    AdminService(admin).setServiceParent(top)
    proxy_service.setServiceParent(top)
    supervisor.setServiceParent(top)
    metrics_service.setServiceParent(top)  # metrics: ticks after the workers start
    busy_poll.setServiceParent(top)  # spins while everything else runs
    ReadyNotice(supervisor, reactor, lambda: daemon_urls(top)).setServiceParent(top)
    return top


def makeService(options: Options) -> CgipoolService:
    from twisted.internet import reactor

    raise_open_files_limit()
    try:
        # The daemon's own process: any orphan in it is a leftover (containment).
        return build(options["pool"], reactor, contain="all")
    except BusyPollUnsupported as e:
        error = ConfigError(str(e), options["pool"].path, key="busy_poll_us")
        raise SystemExit(f"cgipool: configuration error: {error}") from None
