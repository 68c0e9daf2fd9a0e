"""The Twisted baselines of ``make bench``, each one process on one port.

``python bench/servers.py KIND PORT [UPSTREAM_PORT ...]`` with KIND:

* ``hello``  -- a twisted.web leaf resource answering the search JSON itself
  (the ceiling of twisted.web on this interpreter: no proxying at all);
* ``rproxy`` -- ``twisted.web.proxy.ReverseProxyResource``, alternating between
  the upstream ports (one new upstream connection per request, as it does);
* ``agent``  -- ``twisted.web.client.Agent`` with a persistent
  ``HTTPConnectionPool``, alternating between the upstream ports;
* ``relay``  -- not an HTTP proxy at all: a byte relay with one upstream
  connection per client connection (alternating between the upstream ports),
  no parsing, no balancing, no metrics, eager sends and TCP_NODELAY as in
  cgipool.  It is the floor: the least any proxy on this reactor and
  interpreter can add, since it pays only the two extra reactor wake-ups and
  the four system calls of a hop.

Plain ``Site`` defaults (no access log), the default reactor, 127.0.0.1 only.
Prints ``ready PORT`` on stdout once listening.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from twisted.internet import reactor
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.proxy import ReverseProxyResource
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cgipool.proxy.fastio import connect_tcp, eager_tcp  # noqa: E402


class Hello(Resource):
    """The search worker's answer, built by twisted.web itself."""

    isLeaf = True

    def __init__(self, port: int) -> None:
        super().__init__()
        self.body = (b'{"query": "bench", "results": [{"id": 1, "title": "Bench Result"}], '
                     b'"pid": %d, "port": %d}\n' % (os.getpid(), port))

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        return self.body


class RoundRobinReverseProxy(Resource):
    """ReverseProxyResource per upstream, used in turn."""

    isLeaf = True

    def __init__(self, ports: list[int]) -> None:
        super().__init__()
        self.proxies = [ReverseProxyResource("127.0.0.1", p, b"/") for p in ports]
        self.next = 0

    def render(self, request: Any) -> Any:
        proxy = self.proxies[self.next]
        self.next = (self.next + 1) % len(self.proxies)
        return proxy.render(request)


class AgentProxy(Resource):
    """A proxy on Agent + a persistent HTTPConnectionPool (keep-alive upstreams)."""

    isLeaf = True

    def __init__(self, ports: list[int]) -> None:
        super().__init__()
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 64
        self.agent = Agent(reactor, pool=pool)
        self.bases = [b"http://127.0.0.1:%d" % p for p in ports]
        self.next = 0

    def render(self, request: Any) -> Any:
        base = self.bases[self.next]
        self.next = (self.next + 1) % len(self.bases)
        uri = request.uri
        query = uri.find(b"?")
        url = base + b"/" + (uri[query:] if query >= 0 else b"")
        d = self.agent.request(request.method, url, Headers({}))

        def got(response: Any) -> Any:
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() in (b"content-type",):
                    request.responseHeaders.setRawHeaders(name, values)
            return readBody(response)

        def body(data: bytes) -> None:
            if not request._disconnected:
                request.write(data)
                request.finish()

        def failed(failure: Any) -> None:
            if not request._disconnected:
                request.setResponseCode(502)
                request.finish()

        d.addCallback(got).addCallback(body).addErrback(failed)
        return NOT_DONE_YET


class _RelayUpstream(Protocol):
    """The worker side of one relayed client connection."""

    def __init__(self, client: _RelayClient) -> None:
        self.client = client

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.client.upstream_ready(self)

    def dataReceived(self, data: bytes) -> None:
        self.client.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.client.transport.loseConnection()


class _RelayClient(Protocol):
    """One client connection, relayed byte for byte to one worker connection."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.upstream: _RelayUpstream | None = None
        self.pending: list[bytes] = []

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        factory = ClientFactory()
        factory.buildProtocol = lambda addr: _RelayUpstream(self)  # type: ignore[method-assign]
        factory.noisy = False
        connect_tcp(reactor, "127.0.0.1", self.port, factory)  # eager writes

    def upstream_ready(self, upstream: _RelayUpstream) -> None:
        self.upstream = upstream
        if self.pending:
            upstream.transport.write(b"".join(self.pending))
            self.pending = []

    def dataReceived(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.upstream is not None:
            self.upstream.transport.loseConnection()


class RelayFactory(Factory):
    noisy = False

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self.next = 0

    def buildProtocol(self, addr: Any) -> _RelayClient:
        port = self.ports[self.next]
        self.next = (self.next + 1) % len(self.ports)
        return _RelayClient(port)


def main(argv: list[str]) -> int:
    kind, port = argv[0], int(argv[1])
    upstreams = [int(p) for p in argv[2:]]
    if kind == "hello":
        root: Resource = Hello(port)
    elif kind == "rproxy":
        root = RoundRobinReverseProxy(upstreams)
    elif kind == "agent":
        root = AgentProxy(upstreams)
    elif kind == "relay":
        eager_tcp(reactor).listenTCP(port, RelayFactory(upstreams), backlog=1024,
                                     interface="127.0.0.1")  # eager writes
        reactor.callWhenRunning(lambda: print(f"ready {port}", flush=True))
        reactor.run()
        return 0
    else:
        print(f"unknown kind {kind!r}", file=sys.stderr)
        return 2
    site = Site(root)
    site.noisy = False
    reactor.listenTCP(port, site, backlog=1024, interface="127.0.0.1")
    reactor.callWhenRunning(lambda: print(f"ready {port}", flush=True))
    reactor.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
