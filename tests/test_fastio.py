"""Eager writes (cgipool/proxy/fastio.py) on real loopback connections: a write
with nothing queued is sent before the call returns, anything else goes through
Twisted's buffer in order, and the transports come from the listening port and
the connector from the start.  Each test also pins down the Twisted behaviour
fastio relies on (named in the failure messages), so a Twisted release that
changes it fails here, loudly, rather than reorder bytes in production."""

from __future__ import annotations

import socket
from typing import Any

from twisted.internet import defer, error, reactor, ssl, tcp
from twisted.internet.abstract import FileDescriptor
from twisted.internet.address import IPv4Address
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from cgipool.proxy.fastio import (
    EagerClient,
    EagerConnector,
    EagerPort,
    EagerServer,
    EagerWrites,
    connect_tcp,
    eager_tcp,
    eager_writes,
    server_endpoint,
)
from cgipool.tap import listen_endpoint
from tests.support import sleep, wait_for


class Keep(Protocol):
    """Keeps what it receives; ``made`` fires with the protocol once connected."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.made: defer.Deferred[Keep] = defer.Deferred()
        self.lost: defer.Deferred[Any] = defer.Deferred()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None if reason is None else reason.value)


class KeepFactory(Factory):
    noisy = False

    def __init__(self) -> None:
        self.protocols: list[Keep] = []
        self.connected: defer.Deferred[Keep] = defer.Deferred()

    def buildProtocol(self, addr: Any) -> Keep:
        protocol = Keep()
        self.protocols.append(protocol)
        if len(self.protocols) == 1:
            protocol.made.addCallback(self.connected.callback)
        return protocol


def recv_now(peer: socket.socket) -> bytes:
    """What has arrived at ``peer`` by now (no reactor turn in between)."""
    try:
        return peer.recv(1 << 20)
    except BlockingIOError:
        return b""


class EagerServerTests(TestCase):
    """The server side: an EagerPort's connections, a plain socket as the client."""

    async def accept(self, sndbuf: int | None = None) -> tuple[Any, socket.socket]:
        factory = KeepFactory()
        port = await server_endpoint(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        peer = socket.socket()
        self.addCleanup(peer.close)
        if sndbuf is not None:
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        peer.connect(("127.0.0.1", port.getHost().port))
        peer.setblocking(False)
        protocol = await factory.connected
        transport = protocol.transport
        self.addCleanup(lambda: transport.connected and transport.abortConnection())
        if sndbuf is not None:
            transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        return transport, peer

    async def test_listening_port_builds_eager_transports(self) -> None:
        """A connection accepted by server_endpoint's port is an EagerServer (a
        tcp.Server with eager writes): the port's ``transport`` class attribute
        is the hook fastio relies on."""
        transport, _ = await self.accept()
        self.assertIsInstance(
            transport, EagerServer,
            "tcp.Port no longer builds its connections with its `transport` class "
            "attribute: fastio.EagerPort needs another way to make eager transports")
        self.assertIsInstance(transport, tcp.Server)
        self.assertTrue(eager_writes(transport))

    async def test_write_with_nothing_queued_is_sent_before_it_returns(self) -> None:
        transport, peer = await self.accept()
        transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
        self.assertEqual(recv_now(peer), b"HTTP/1.1 200 OK\r\n\r\n")
        transport.writeSequence([b"one ", b"two"])
        self.assertEqual(recv_now(peer), b"one two")
        self.assertFalse(transport.eager_queued)
        self.assertNotIn(transport, reactor.getWriters())  # no epoll_ctl for a write

    async def test_what_the_kernel_refuses_is_buffered_and_later_writes_queue_behind_it(
            self) -> None:
        transport, peer = await self.accept(sndbuf=4096)
        big = bytes(range(256)) * 8192  # 2 MiB: more than the socket buffers hold
        transport.write(big)
        self.assertTrue(transport.eager_queued)
        self.assertIn(transport, reactor.getWriters())
        transport.write(b"<tail>")  # must not overtake what is queued
        self.assertTrue(transport.eager_queued)

        received = bytearray()

        def drained() -> bool:
            received.extend(recv_now(peer))
            return len(received) >= len(big) + 6

        await wait_for(drained, 20, what="the buffered bytes")
        self.assertEqual(bytes(received), big + b"<tail>")
        # Twisted's doWrite calls the transport's stopWriting() once its buffer is
        # empty: that is how EagerWrites learns that nothing is queued any more.
        await wait_for(lambda: not transport.eager_queued, 2,
                       what="FileDescriptor.doWrite to call stopWriting() once drained")
        self.assertNotIn(transport, reactor.getWriters())
        transport.write(b"again")
        self.assertEqual(recv_now(peer), b"again")

    async def test_a_pull_producer_keeps_twisteds_buffering(self) -> None:
        transport, peer = await self.accept()

        class Pull:
            def resumeProducing(self) -> None:
                pass

            def stopProducing(self) -> None:
                pass

        transport.registerProducer(Pull(), False)
        transport.write(b"pulled")
        self.assertEqual(recv_now(peer), b"")  # the reactor's doWrite sends it
        self.assertTrue(transport.eager_queued)
        got = bytearray()

        def arrived() -> bool:
            got.extend(recv_now(peer))
            return bytes(got) == b"pulled"

        await wait_for(arrived, 2, what="doWrite to send the pull producer's write")
        transport.unregisterProducer()

    async def test_after_loseWriteConnection_writes_are_twisteds(self) -> None:
        """After a half-close eager writes stop (a write is not sent at once,
        Twisted's own rules apply) and the peer sees the clean EOF."""
        transport, peer = await self.accept()
        transport.loseWriteConnection()
        transport.write(b"late")
        self.assertEqual(recv_now(peer), b"")
        self.assertTrue(transport.eager_closed)

        def closed() -> bool:
            try:
                return peer.recv(100) == b""
            except BlockingIOError:
                return False

        await wait_for(closed, 2, what="the half-close")

    async def test_after_abortConnection_nothing_is_sent(self) -> None:
        """A write after abortConnection() is dropped, neither sent at once nor
        later: the peer sees the connection end with no byte (polled until it
        ends, instead of a short sleep that proved nothing)."""
        transport, peer = await self.accept()
        transport.abortConnection()
        transport.write(b"late")
        self.assertEqual(recv_now(peer), b"")
        got = bytearray()

        def ended() -> bool:
            try:
                data = peer.recv(100)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                return True
            got.extend(data)
            return data == b""

        await wait_for(ended, 10, what="the aborted connection to end at the peer")
        self.assertEqual(bytes(got), b"")


class EagerClientTests(TestCase):
    """The client side: connect_tcp's connector and its EagerClient transport."""

    async def listen(self) -> tuple[KeepFactory, int]:
        factory = KeepFactory()
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return factory, port.getHost().port

    async def test_connects_with_an_eager_transport_and_closes(self) -> None:
        server, number = await self.listen()
        client = Keep()
        events: list[str] = []

        class Once(ClientFactory):
            noisy = False

            def doStart(self) -> None:
                events.append("doStart")

            def doStop(self) -> None:
                events.append("doStop")

            def startedConnecting(self, connector: Any) -> None:
                events.append("startedConnecting")

            def buildProtocol(self, addr: Any) -> Keep:
                events.append(f"buildProtocol {addr.host}:{addr.port == number}")
                return client

            def clientConnectionLost(self, connector: Any, reason: Any) -> None:
                events.append(f"lost {reason.type.__name__}")

        connector = connect_tcp(reactor, "127.0.0.1", number, Once(), timeout=5)
        self.assertIsInstance(connector, EagerConnector)
        self.assertEqual(connector.getDestination(), IPv4Address("TCP", "127.0.0.1", number))
        await client.made
        self.assertIsInstance(
            client.transport, EagerClient,
            "tcp.Client(host, port, bindAddress, connector, reactor) and its calls "
            "back to the connector are what fastio.EagerConnector relies on")
        self.assertIsNone(connector.timeout_call)  # cancelled once connected
        peer = await server.connected
        client.transport.write(b"GET / HTTP/1.1\r\n\r\n")
        server_socket = peer.transport.getHandle()
        server_socket.setblocking(False)
        self.assertEqual(recv_now(server_socket), b"GET / HTTP/1.1\r\n\r\n")
        connector.disconnect()
        await client.lost
        await sleep(0)  # the transport tells the connector after the protocol
        self.assertEqual(events, ["doStart", "startedConnecting", "buildProtocol 127.0.0.1:True",
                                  "lost ConnectionDone", "doStop"])
        self.assertEqual(connector.state, "disconnected")

    async def test_refused_and_stopped_attempts_reach_clientConnectionFailed(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            closed = s.getsockname()[1]  # nobody listens there once closed
        failures: list[Any] = []
        done: defer.Deferred[None] = defer.Deferred()

        class Failing(ClientFactory):
            noisy = False

            def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
                failures.append(reason.type)
                if len(failures) == 2:
                    done.callback(None)

        connect_tcp(reactor, "127.0.0.1", closed, Failing(), timeout=5)
        stopped = connect_tcp(reactor, "127.0.0.1", closed, Failing(), timeout=5)
        stopped.stopConnecting()
        self.assertRaises(error.NotConnectingError, stopped.stopConnecting)
        await done
        self.assertEqual(sorted(f.__name__ for f in failures),
                         ["ConnectionRefusedError", "UserError"])

    def test_a_fake_reactor_keeps_its_own_connectTCP_and_listenTCP(self) -> None:
        fake = MemoryReactor()
        self.assertIs(eager_tcp(fake), fake)
        connect_tcp(fake, "127.0.0.1", 8000, ClientFactory(), timeout=3)
        self.assertEqual(fake.tcpClients[0][:2], ("127.0.0.1", 8000))


class EagerTlsTests(TestCase):
    """After startTLS the transport's writes are Twisted's (the TLS layer's)."""

    async def test_tls_transport_is_left_alone(self) -> None:
        """After startTLS both ends' writes go through the TLS layer, not
        straight to the socket (eager plaintext would corrupt the stream): a
        round trip of encrypted bytes works."""
        key = ssl.KeyPair.generate(size=2048)
        cert = key.selfSignedCert(1, CN="localhost")
        server = KeepFactory()
        port = await server_endpoint(reactor, "tcp:0:interface=127.0.0.1").listen(server)
        self.addCleanup(port.stopListening)
        client = Keep()

        class One(ClientFactory):
            noisy = False

            def buildProtocol(self, addr: Any) -> Keep:
                return client

        connect_tcp(reactor, "127.0.0.1", port.getHost().port, One(), timeout=5)
        await client.made
        self.addCleanup(lambda: client.lost)
        self.addCleanup(client.transport.abortConnection)
        peer = await server.connected
        peer.transport.startTLS(cert.options())
        client.transport.startTLS(ssl.CertificateOptions(verify=False))
        self.assertTrue(peer.transport.TLS)
        peer.transport.write(b"secret")
        client.transport.write(b"hello")
        await wait_for(lambda: client.received == b"secret" and peer.received == b"hello", 10,
                       what="the TLS round trip")


class DefaultsTests(SynchronousTestCase):
    def test_tap_listens_eagerly_on_tcp_only(self) -> None:
        eager = listen_endpoint(reactor, "tcp:0:interface=127.0.0.1")
        d = eager.listen(Factory())
        port = self.successResultOf(d)
        self.addCleanup(port.stopListening)
        self.assertIsInstance(port, EagerPort)
        self.assertEqual(port.backlog, 1024)
        unix = listen_endpoint(reactor, f"unix:{self.mktemp()}")
        port = self.successResultOf(unix.listen(Factory()))
        self.addCleanup(port.stopListening)
        self.assertNotIsInstance(port, EagerPort)

    def test_eager_writes_changes_no_transport(self) -> None:
        """eager_writes() only asks: a plain FileDescriptor is not eager and
        keeps its class (nothing is patched onto it)."""
        plain = FileDescriptor(reactor)
        self.assertFalse(eager_writes(plain))
        self.assertIs(type(plain), FileDescriptor)
        self.assertTrue(issubclass(EagerServer, EagerWrites))
