"""Shared helpers for the integration tests: a real daemon in the test's reactor.

``start_daemon`` builds the same service tree as ``twistd cgipool`` (via
:func:`cgipool.tap.build`) with real worker processes on free loopback ports,
and registers cleanup that stops it and checks that every worker process is
gone — a test that leaks a process fails.
"""

from __future__ import annotations

import os
import re
import textwrap
from typing import Any

import yaml
from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial.unittest import SkipTest, TestCase

from cgipool.config import load
from cgipool.tap import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD = os.path.join(ROOT, "build")


def require_binaries(*names: str) -> None:
    missing = [n for n in names if not os.access(os.path.join(BUILD, n), os.X_OK)]
    if missing:
        raise SkipTest(f"build the C services first (make all): missing {missing}")


def port_range() -> str:
    """A worker port range of this test process, apart from other trial jobs."""
    low = 20000 + (os.getpid() % 150) * 200
    return f"{low}-{low + 199}"


#: The admin listener of a test daemon: a free port of its own.
TEST_ADMIN_LISTEN = "tcp:0:interface=127.0.0.1"


def search_service(workers: Any = "{min: 2, max: 4}", health_interval: float = 1,
                   fall: int = 2, **extra: Any) -> str:
    """The C search service (``build/search.cgi``) as an entry of ``services:``,
    with quick health checks; ``extra`` adds keys after them, in order, their
    values as YAML text (``concurrency=16``, ``request_timeout=0.5``,
    ``examples='["/api/search?q=test"]'``)."""
    lines = "".join(f"    {key}: {value}\n" for key, value in extra.items())
    return (
        "  search:\n"
        '    command: ["build/search.cgi", "{port}"]\n'
        "    route: /api/search\n"
        f"    workers: {workers}\n"
        f'    health: {{path: "/?q=health", interval: {health_interval}, timeout: 1, '
        f"fall: {fall}}}\n"
        + lines
    )


#: A pool.yaml body with the search service alone (2 to 4 workers): append more
#: services to it as further ``services:`` entries.
SEARCH = "\nservices:\n" + search_service()


def write_config(case: TestCase, body: str, services_dir: str | None = None) -> str:
    """Write a pool.yaml whose relative paths resolve against the project root,
    listening (proxy and admin) on free loopback ports."""
    folder = os.path.abspath(case.mktemp())
    os.makedirs(folder)
    path = os.path.join(folder, "pool.yaml")
    head = (
        f'listen: "tcp:0:interface=127.0.0.1"\n'
        f"base_dir: {ROOT}\n"
        f'port_range: "{port_range()}"\n'
    )
    if services_dir is not None:
        head += f"services_dir: {services_dir}\n"
    with open(path, "w") as f:
        f.write(head + with_admin_listen(textwrap.dedent(body)))
    return path


def with_admin_listen(body: str, listen: str = TEST_ADMIN_LISTEN) -> str:
    """``body`` (a pool.yaml's text) with ``admin.listen`` set, unless it sets it:
    added to its ``admin:`` mapping (block or flow style) or as a new one."""
    try:
        parsed = yaml.safe_load(body) or {}
    except yaml.YAMLError:
        return body  # a test of a broken file: leave it as written
    admin = parsed.get("admin") if isinstance(parsed, dict) else None
    if isinstance(admin, dict) and "listen" in admin:
        return body
    flow = re.search(r"^admin:\s*\{", body, re.MULTILINE)
    if flow:
        return body[:flow.end()] + f'listen: "{listen}", ' + body[flow.end():]
    block = re.search(r"^admin:[ \t]*\n([ \t]+)", body, re.MULTILINE)
    if block:
        indent = block.group(1)
        return body[:block.start(1)] + f'{indent}listen: "{listen}"\n' + body[block.start(1):]
    if re.search(r"^admin:", body, re.MULTILINE):
        raise AssertionError("write_config cannot add admin.listen to this admin: entry")
    return body + f'\nadmin: {{listen: "{listen}"}}\n'


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def sleep(seconds: float) -> defer.Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


async def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.01,
                   what: str = "condition") -> None:
    """Poll ``predicate`` on the reactor until true; fail after ``timeout``."""
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await sleep(interval)


class Daemon:
    """A running daemon: its services, its URLs (proxy and admin) and every pid
    it ever spawned."""

    def __init__(self, top: Any, port: int, admin_port: int | None = None) -> None:
        self.top = top
        self.supervisor = top.supervisor
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        #: Where the admin pages, API and /metrics are (the proxy's URL with
        #: ``admin.listen: same``).
        self.admin_port = admin_port if admin_port is not None else port
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.pids: set[int] = set()
        self.supervisor.events.subscribe(self._record)

    def _record(self, event: Any) -> None:
        pid = event.fields.get("pid")
        if event.kind == "spawn" and pid:
            self.pids.add(pid)

    def pool(self, name: str) -> Any:
        return self.supervisor.pools[name]

    def ready_pids(self, name: str) -> list[int]:
        return [w.pid for w in self.pool(name).ready]

    async def wait_ready(self, timeout: float = 15.0) -> None:
        pools = list(self.supervisor.pools.values())
        # A CGI pool keeps no worker (resident is None): nothing to wait for.
        await wait_for(lambda: all(p.resident is None or len(p.resident.ready) == len(p.workers)
                                   for p in pools), timeout, what="every worker ready")


async def start_daemon(case: TestCase, config_path: str, wait: bool = True,
                       **options: Any) -> Daemon:
    return await run_daemon(case, build(load(config_path), reactor, **options), wait)


async def run_daemon(case: TestCase, top: Any, wait: bool = True) -> Daemon:
    """Start a built service tree (``cgipool.tap.build``); stopped at cleanup,
    which fails if a worker process outlives it."""
    top.startService()
    listening = await top.getServiceNamed("web").listening
    admin_port = None
    if "admin-web" in top.namedServices:
        admin_port = (await top.getServiceNamed("admin-web").listening).getHost().port
    daemon = Daemon(top, listening.getHost().port, admin_port)
    # Pids spawned before we subscribed.
    for pool in daemon.supervisor.pools.values():
        daemon.pids.update(w.pid for w in pool.workers if w.pid)

    async def cleanup() -> None:
        if top.running:
            await top.stopService()
        await wait_for(lambda: not any(process_alive(p) for p in daemon.pids), 5,
                       what="every worker process to be gone")

    case.addCleanup(lambda: defer.ensureDeferred(cleanup()))
    if wait:
        await daemon.wait_ready()
    return daemon


def free_ports(count: int) -> list[int]:
    """``count`` different free loopback ports (held open together while chosen)."""
    import socket

    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def http_client(case: TestCase, persistent: bool = True) -> Any:
    """A treq client whose cached connections are closed at cleanup."""
    from treq.client import HTTPClient
    from twisted.web.client import Agent, HTTPConnectionPool

    pool = HTTPConnectionPool(reactor, persistent=persistent)
    pool.maxPersistentPerHost = 32
    case.addCleanup(pool.closeCachedConnections)
    return HTTPClient(Agent(reactor, pool=pool))


async def get_json(client: Any, url: str) -> tuple[int, Any]:
    import json

    import treq

    response = await client.get(url)
    body = await treq.content(response)
    return response.code, json.loads(body)
