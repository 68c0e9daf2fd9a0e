"""Eager writes for the proxy's TCP connections.

Twisted's TCP transport queues every ``write`` and sends it on the next
reactor turn, after registering the socket for writability and before
unregistering it again: per response that is two ``epoll_ctl`` calls, one
more trip through the reactor and the latency of one loop iteration.  On
the proxy's hot path each request makes exactly two writes (the request to
the worker, the response to the client), so its connections use transports
that call ``send()`` at once when nothing is queued, and fall back to
Twisted's buffering (and so its backpressure, producers and error handling)
for whatever the kernel does not take.

Those transports are subclasses from the start, made through public Twisted
constructors only:

- server side: :class:`EagerPort`, a :class:`twisted.internet.tcp.Port`
  whose ``transport`` class attribute (documented as replaceable) is
  :class:`EagerServer`; :func:`server_endpoint` builds the endpoint of a
  ``tcp:``/``tcp6:`` listen description on it (others keep the plain one);
- client side: :func:`connect_tcp`, ``connectTCP`` with an
  :class:`EagerConnector` (our own ``IConnector``) whose transport is an
  :class:`EagerClient`.

Under a reactor that is not a real POSIX one (a test's fake) both fall back
to the reactor's own ``listenTCP``/``connectTCP``.

Whether Twisted still holds bytes of ours is state the subclass owns
(:attr:`EagerWrites.eager_queued`): set when a write goes to Twisted's
buffer, cleared when Twisted's ``doWrite`` drained that buffer, which it
says by calling the public ``stopWriting``.  ``tests/test_fastio.py``
checks that behaviour of Twisted on real sockets.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import address, error, tcp
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IConnector, IReactorTCP
from twisted.internet.posixbase import PosixReactorBase
from zope.interface import implementer


class EagerWrites:
    """Mixin for a :class:`twisted.internet.tcp.Connection` subclass: a write
    with nothing queued, no pull producer and the write side open is sent at
    once; what the kernel does not take goes to Twisted's buffer."""

    #: Twisted's buffer holds bytes of ours (cleared by ``stopWriting``: Twisted
    #: calls it when ``doWrite`` has sent everything).
    eager_queued = False
    #: The write side is closing or closed (``loseWriteConnection``,
    #: ``abortConnection``): Twisted decides what happens to later writes.
    eager_closed = False

    def write(self, data: bytes) -> None:
        # Only with nothing queued and no pull producer (doWrite drives those;
        # a streaming one, such as twisted.web's HTTPChannel, is paused by the
        # buffered path below when the kernel takes less than all).
        if (not self.eager_queued and not self.eager_closed
                and self.connected and not self.disconnecting  # type: ignore[attr-defined]
                and not self.TLS  # type: ignore[attr-defined]
                and (self.producer is None or self.streamingProducer)  # type: ignore[attr-defined]
                and type(data) is bytes):
            try:
                sent = self.socket.send(data)  # type: ignore[attr-defined]
            except OSError:
                sent = 0  # EAGAIN, or queued below: the next doWrite reports the error
            if sent == len(data):
                return
            data = data[sent:]
        if data and self.connected:  # type: ignore[attr-defined]
            self.eager_queued = True  # Twisted keeps it (or drops it once write-closed)
        super().write(data)  # type: ignore[misc]

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self.write(b"".join(iovec))

    def stopWriting(self) -> None:
        super().stopWriting()  # type: ignore[misc]
        # doWrite calls it once its buffer is empty; the other callers close the
        # connection (connectionLost, a failed connect) or are ours below.
        if not self.dataBuffer:  # type: ignore[attr-defined]
            self.eager_queued = False

    def loseWriteConnection(self) -> None:
        self.eager_closed = True
        super().loseWriteConnection()  # type: ignore[misc]

    def abortConnection(self) -> None:
        self.eager_closed = True
        super().abortConnection()  # type: ignore[misc]


class EagerServer(EagerWrites, tcp.Server):
    """An accepted TCP connection with eager writes."""


class EagerClient(EagerWrites, tcp.Client):
    """An outgoing TCP connection with eager writes."""


class EagerPort(tcp.Port):
    """A listening TCP port whose connections are :class:`EagerServer`\\ s."""

    transport = EagerServer


@implementer(IConnector)
class EagerConnector:
    """One outgoing TCP connection on an :class:`EagerClient`: what
    ``reactor.connectTCP``'s connector does, with public names only.

    The transport calls back ``buildProtocol``, ``connectionFailed`` and
    ``connectionLost``; the factory gets the usual ``doStart``,
    ``startedConnecting``, ``clientConnectionFailed``/``clientConnectionLost``
    and ``doStop``, and may call ``connect()`` again from those.
    """

    def __init__(self, host: str, port: int, factory: Any, timeout: float | None,
                 bindAddress: Any, reactor: Any) -> None:
        self.host = host
        self.port = port
        self.factory = factory
        self.timeout = timeout
        self.bindAddress = bindAddress
        self.reactor = reactor
        self.state = "disconnected"
        self.transport: EagerClient | None = None
        self.timeout_call: Any = None
        self.factory_started = False

    def connect(self) -> None:
        if self.state != "disconnected":
            raise RuntimeError("can't connect in this state")
        self.state = "connecting"
        if not self.factory_started:
            self.factory.doStart()
            self.factory_started = True
        transport = self.transport = EagerClient(
            self.host, self.port, self.bindAddress, self, self.reactor)
        if self.timeout is not None:
            self.timeout_call = self.reactor.callLater(
                self.timeout, transport.failIfNotConnected, error.TimeoutError())
        self.factory.startedConnecting(self)

    def stopConnecting(self) -> None:
        if self.state != "connecting":
            raise error.NotConnectingError("we're not trying to connect")
        transport = self.transport
        self.state = "disconnected"
        assert transport is not None
        transport.failIfNotConnected(error.UserError())
        self.transport = None

    def disconnect(self) -> None:
        if self.state == "connecting":
            self.stopConnecting()
        elif self.state == "connected" and self.transport is not None:
            self.transport.loseConnection()

    def getDestination(self) -> address.IPv4Address | address.IPv6Address:
        kind = address.IPv6Address if ":" in self.host else address.IPv4Address
        return kind("TCP", self.host, self.port)

    # -- called by the transport --------------------------------------------------

    def cancel_timeout(self) -> None:
        call, self.timeout_call = self.timeout_call, None
        if call is not None and call.active():
            call.cancel()

    def buildProtocol(self, addr: Any) -> Any:
        self.state = "connected"
        self.cancel_timeout()
        return self.factory.buildProtocol(addr)

    def connectionFailed(self, reason: Any) -> None:
        self.cancel_timeout()
        self.transport = None
        self.state = "disconnected"
        self.factory.clientConnectionFailed(self, reason)
        self._stop_factory()

    def connectionLost(self, reason: Any) -> None:
        self.state = "disconnected"
        self.factory.clientConnectionLost(self, reason)
        self._stop_factory()

    def _stop_factory(self) -> None:
        if self.state == "disconnected":  # the factory did not connect() again
            self.factory.doStop()
            self.factory_started = False

    def __repr__(self) -> str:
        return f"<EagerConnector {self.state} {self.host}:{self.port}>"


@implementer(IReactorTCP)
class EagerTCP:
    """``listenTCP``/``connectTCP`` of ``reactor`` with eager transports: what
    Twisted's TCP endpoints are given in place of the reactor."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def listenTCP(self, port: int, factory: Any, backlog: int = 50,
                  interface: str = "") -> EagerPort:
        listening = EagerPort(port, factory, backlog, interface, self.reactor)
        listening.startListening()
        return listening

    def connectTCP(self, host: str, port: int, factory: Any, timeout: float = 30.0,
                   bindAddress: Any = None) -> EagerConnector:
        connector = EagerConnector(host, port, factory, timeout, bindAddress, self.reactor)
        connector.connect()
        return connector


def eager_tcp(reactor: Any) -> Any:
    """An ``IReactorTCP`` with eager transports over ``reactor``; ``reactor``
    itself when it is not a real POSIX reactor (a test's fake)."""
    return EagerTCP(reactor) if isinstance(reactor, PosixReactorBase) else reactor


def server_endpoint(reactor: Any, description: str) -> Any:
    """``serverFromString(reactor, description)``, with eager transports for
    ``tcp:`` and ``tcp6:`` (``ssl:``, ``unix:``… keep the plain endpoint)."""
    kind = description.split(":", 1)[0].strip().lower()
    if kind in ("tcp", "tcp6"):
        return serverFromString(eager_tcp(reactor), description)
    return serverFromString(reactor, description)


def connect_tcp(reactor: Any, host: str, port: int, factory: Any,
                timeout: float = 30.0, bindAddress: Any = None) -> Any:
    """``reactor.connectTCP`` with an eager transport; the connector."""
    return eager_tcp(reactor).connectTCP(host, port, factory, timeout, bindAddress)


def eager_writes(transport: Any) -> bool:
    """Whether ``transport`` writes eagerly; it changes nothing.

    Kept for callers of the former class-swapping version: eager transports
    now come from :class:`EagerPort` and :func:`connect_tcp`.
    """
    return isinstance(transport, EagerWrites)
