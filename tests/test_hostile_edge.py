"""Hostile clients at the edge: one named test per case, raw bytes on 127.0.0.1
(a body's pace, and where a head's reads end, are forced in memory on a Clock).

Every case gets a defined answer, nothing malformed reaches a worker, and the
daemon keeps serving the next client (``assertStillServes``).  The table in
docs/hardening.md lists these tests by name.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from tests.support import sleep, wait_for
from tests.test_proxy import CLOSE, ProxyTestCase, ok_json, split_response

GOOD = b"GET /api/svc?ok=1 HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n"


class Recorder(Protocol):
    """A raw client that keeps what it receives and notes when it is closed."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.closed = False

    def dataReceived(self, data: bytes) -> None:
        self.received.extend(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True


class EdgeCase(ProxyTestCase):
    async def connect(self) -> Recorder:
        client = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
                                       Recorder())
        self.addCleanup(client.transport.abortConnection)
        return client

    async def setup(self, **config: Any) -> int:
        self.worker, wport = await self.start_worker(lambda h, b, c: ok_json(ok=True))
        _, port = await self.start_proxy([self.worker_for(wport)], **config)
        self.port = port
        return port

    async def answer(self, data: bytes, **kw: Any) -> tuple[int, dict[bytes, list[bytes]],
                                                               bytes]:
        raw = await self.raw(self.port, data, **kw)
        self.assertTrue(raw, "the connection closed without an answer")
        return split_response(raw)

    async def assertRefused(self, data: bytes, *codes: int) -> bytes:
        """``data`` gets one of ``codes``, the connection closes, no worker sees it."""
        before = len(self.worker.requests)
        raw = await self.raw(self.port, data)
        self.assertTrue(raw, "the connection closed without an answer")
        status = int(raw.split(b" ", 2)[1])
        self.assertIn(status, codes, raw[:200])
        self.assertEqual(raw.count(b"HTTP/1.1 "), 1, "exactly one answer, then closed")
        self.assertEqual(len(self.worker.requests), before, "nothing reached the worker")
        await self.assertStillServes()
        return raw

    async def assertStillServes(self) -> None:
        status, _, body = split_response(await self.raw(self.port, GOOD))
        self.assertEqual((status, json.loads(body)), (200, {"ok": True}))


class SmugglingTests(EdgeCase):
    async def test_content_length_with_transfer_encoding_is_400(self) -> None:
        await self.setup()
        await self.assertRefused(
            b"POST /api/svc HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/svc/smuggled HTTP/1.1\r\n"
            b"Host: h\r\n\r\n", 400)

    async def test_conflicting_content_lengths_are_400(self) -> None:
        """Two different Content-Length values are a smuggling vector (each hop
        may pick another): 400, and the worker sees nothing."""
        await self.setup()
        await self.assertRefused(b"POST /api/svc HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n"
                                 b"Content-Length: 30\r\n\r\nabc", 400)

    async def test_content_length_list_is_400(self) -> None:
        """``Content-Length: 3, 30`` is not a length: 400, never read as the first
        or the last value."""
        await self.setup()
        await self.assertRefused(b"POST /api/svc HTTP/1.1\r\nHost: h\r\n"
                                 b"Content-Length: 3, 30\r\n\r\nabc", 400)

    async def test_malformed_content_lengths_are_400(self) -> None:
        """Signs, hex, underscores, blanks or a length past 64 bits: 400 (or 413
        for the huge one), never a lenient parse another hop reads otherwise."""
        await self.setup()
        for value in (b"-1", b"+3", b"3a", b"0x3", b"1_0", b" ", b"99999999999999999999999"):
            await self.assertRefused(b"POST /api/svc HTTP/1.1\r\nHost: h\r\nContent-Length: "
                                     + value + b"\r\n\r\nabc", 400, 413)

    async def test_transfer_encoding_other_than_chunked_is_refused(self) -> None:
        await self.setup()
        for value in (b"gzip", b"chunked, gzip", b"identity", b"gzip, chunked", b"xchunked"):
            await self.assertRefused(b"POST /api/svc HTTP/1.1\r\nHost: h\r\n"
                                     b"Transfer-Encoding: " + value + b"\r\n\r\n"
                                     b"3\r\nabc\r\n0\r\n\r\n", 400, 501)

    async def test_bad_chunk_sizes_are_400(self) -> None:
        """A chunk size that is not plain hex, overflows, or is missing is 400
        (413 allowed for the overflow): the body's framing cannot be guessed."""
        await self.setup()
        for size in (b"zz", b"-1", b"1_0", b"0x3", b"fffffffffffffffffffff", b""):
            await self.assertRefused(b"POST /api/svc HTTP/1.1\r\nHost: h\r\n"
                                     b"Transfer-Encoding: chunked\r\n\r\n"
                                     + size + b"\r\nabc\r\n0\r\n\r\n", 400, 413)

    async def test_chunk_without_crlf_after_data_is_400(self) -> None:
        await self.setup()
        await self.assertRefused(b"POST /api/svc HTTP/1.1\r\nHost: h\r\n"
                                 b"Transfer-Encoding: chunked\r\n\r\n3\r\nabcXX0\r\n\r\n", 400)

    async def test_framing_to_the_worker_is_regenerated(self) -> None:
        await self.setup()
        status, _, _ = await self.answer(
            b"POST /api/svc HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n" + CLOSE
            + b"\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\n\r\n")
        self.assertEqual(status, 200)
        head, body = self.worker.requests[-1]
        self.assertEqual(body, b"abcde")
        lower = head.lower()
        self.assertIn(b"content-length: 5", lower)
        self.assertNotIn(b"transfer-encoding", lower)
        self.assertNotIn(b"x-trailer", lower)


class BodyCostTests(EdgeCase):
    """A chunked body's CPU cost is bounded by its size (edge.CHUNKS_FREE...)."""

    async def test_one_byte_chunks_are_400_after_the_threshold(self) -> None:
        await self.setup()
        raw = await self.assertRefused(
            b"POST /api/svc HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"1\r\nx\r\n" * 5000 + b"0\r\n\r\n", 400)
        self.assertIn(b"chunked body with 257 chunks", raw)

    async def test_a_chunked_upload_of_several_mb_passes(self) -> None:
        await self.setup(max_body=8 * 1024 * 1024)
        piece = bytes(range(256)) * 32  # 8 KiB, as curl sends
        client = await self.connect()
        client.transport.write(b"POST /api/svc HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: "
                               b"chunked\r\n" + CLOSE + b"\r\n")
        for _ in range(640):  # 5 MiB
            client.transport.write(b"2000\r\n" + piece + b"\r\n")
        client.transport.write(b"0\r\n\r\n")
        await wait_for(lambda: client.closed, 20, what="the answer")
        self.assertEqual(split_response(bytes(client.received))[0], 200)
        self.assertEqual(self.worker.requests[-1][1], piece * 640)

    async def test_chunk_extensions_and_trailers_are_counted(self) -> None:
        await self.setup()
        raw = await self.assertRefused(
            b"POST /api/svc HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"1;ext=" + b"e" * 1000 + b"\r\nx\r\n") * 40 + b"0\r\n\r\n", 400)
        self.assertIn(b"chunk framing", raw)
        raw = await self.assertRefused(
            b"POST /api/svc HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n" + b"X-T: 1\r\n" * 1000 + b"\r\n", 400)
        self.assertIn(b"chunks", raw)


class SizeLimitTests(EdgeCase):
    async def test_oversized_request_line_is_414_or_400(self) -> None:
        await self.setup()
        await self.assertRefused(b"GET /api/svc?" + b"a" * 70000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
                                 414, 400, 431)

    async def test_oversized_header_block_is_431_or_400(self) -> None:
        await self.setup()
        await self.assertRefused(b"GET /api/svc HTTP/1.1\r\nHost: h\r\nX-Big: " + b"b" * 70000
                                 + b"\r\n\r\n", 431, 400)

    async def test_too_many_headers_is_431_or_400(self) -> None:
        await self.setup()
        headers = b"".join(b"X-H%d: v\r\n" % i for i in range(600))
        await self.assertRefused(b"GET /api/svc HTTP/1.1\r\nHost: h\r\n" + headers + b"\r\n",
                                 431, 400)

    async def test_body_above_the_route_limit_is_413(self) -> None:
        await self.setup(max_body=1000)
        await self.assertRefused(b"POST /api/svc HTTP/1.1\r\nHost: h\r\nContent-Length: 1001"
                                 b"\r\n\r\n" + b"x" * 1001, 413)


class HeaderTests(EdgeCase):
    async def test_header_value_with_nul_is_400(self) -> None:
        await self.setup()
        await self.assertRefused(b"GET /api/svc HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n", 400)

    async def test_header_value_with_bare_cr_is_400(self) -> None:
        await self.setup()
        await self.assertRefused(b"GET /api/svc HTTP/1.1\r\nHost: h\r\nX-A: a\rb\r\n\r\n", 400)

    async def test_control_characters_are_400_on_both_request_paths(self) -> None:
        await self.setup()
        for head, where in (
                (b"GET /api/svc HTTP/1.1\r\nHost: h\r\nX-A: a\x1b[2Jb\r\n\r\n", b"header 'X-A'"),
                (b"GET /api/svc HTTP/1.1\r\nHost: h\r\nX-A: a\x7f\r\n\r\n", b"header 'X-A'"),
                (b"GET /api/svc HTTP/1.1\r\nHost: h\r\nX-B: \x0bv\x0c\r\n\r\n", b"header 'X-B'"),
                (b"GET /api/svc?q=\x7f HTTP/1.1\r\nHost: h\r\n\r\n", b"the request target"),
                # With a body: refused all the same, before any of it is read.
                (b"POST /api/svc HTTP/1.1\r\nHost: h\r\nX-A: \x01\r\n"
                 b"Content-Length: 1\r\n\r\nx", b"header 'X-A'")):
            raw = await self.assertRefused(head, 400)
            self.assertIn(b"control character in " + where, raw)
        # A tab is allowed in a value.
        status, _, _ = await self.answer(
            b"GET /api/svc HTTP/1.1\r\nHost: h\r\nX-A: a\tb\r\nConnection: close\r\n\r\n")
        self.assertEqual(status, 200)

    async def test_host_exactly_once_in_http_1_1(self) -> None:
        await self.setup()
        for head, message in (
                (b"GET /api/svc HTTP/1.1\r\nX-A: 1\r\n\r\n", b"missing Host header"),
                (b"GET /api/svc HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                 b"more than one Host header"),
                (b"GET /api/svc HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n",
                 b"more than one Host header"),
                (b"POST /api/svc HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                 b"missing Host header")):
            raw = await self.assertRefused(head, 400)
            self.assertIn(message, raw)
        status, _, _ = await self.answer(b"GET /api/svc HTTP/1.0\r\n\r\n")
        self.assertEqual(status, 200)  # HTTP/1.0 needs none

    async def assertHostRefused(self, value: bytes) -> None:
        """``Host: value`` is 400 for a bodiless GET and for a POST with a body
        (the two kinds of request the names say "both request paths" for: one
        parser and one pipeline now), and never reaches the worker."""
        for head in (b"GET /api/svc HTTP/1.1\r\nHost: " + value + b"\r\n\r\n",
                     b"POST /api/svc HTTP/1.1\r\nHost: " + value
                     + b"\r\nContent-Length: 1\r\n\r\nx"):
            raw = await self.assertRefused(head, 400)
            self.assertIn(b"Host header", raw)

    async def assertOneHostUpstream(self, value: bytes) -> None:
        """``Host: value`` is accepted for a GET and for a POST with a body, and
        the worker gets exactly that one Host line each time."""
        status, _, _ = await self.answer(b"GET /api/svc HTTP/1.1\r\nHost: " + value
                                         + b"\r\n" + CLOSE + b"\r\n")
        self.assertEqual(status, 200)
        status, _, _ = await self.answer(b"POST /api/svc HTTP/1.1\r\nHost: " + value
                                         + b"\r\nContent-Length: 1\r\n" + CLOSE + b"\r\nx")
        self.assertEqual(status, 200)
        self.assertEqual(len(self.worker.requests), 2)
        for head, _ in self.worker.requests:
            hosts = [line for line in head.split(b"\r\n") if line.lower().startswith(b"host:")]
            self.assertEqual(hosts, [b"Host: " + value], head)

    async def test_empty_host_is_400_on_both_request_paths(self) -> None:
        await self.setup()
        await self.assertHostRefused(b"")

    async def test_host_list_is_400_on_both_request_paths(self) -> None:
        await self.setup()
        await self.assertHostRefused(b"a, b")

    async def test_host_with_userinfo_is_400_on_both_request_paths(self) -> None:
        await self.setup()
        await self.assertHostRefused(b"user@evil")

    async def test_host_with_a_path_is_400_on_both_request_paths(self) -> None:
        await self.setup()
        await self.assertHostRefused(b"evil/x")

    async def test_host_with_a_space_is_400_on_both_request_paths(self) -> None:
        await self.setup()
        await self.assertHostRefused(b"a b")

    async def test_host_with_a_port_goes_upstream_once_on_both_request_paths(self) -> None:
        await self.setup()
        await self.assertOneHostUpstream(b"shop.example:8080")

    async def test_ipv6_literal_host_goes_upstream_once_on_both_request_paths(self) -> None:
        await self.setup()
        await self.assertOneHostUpstream(b"[::1]:8080")

    async def test_http_1_0_without_host_gets_exactly_one_host_upstream(self) -> None:
        await self.setup()
        status, _, _ = await self.answer(b"GET /api/svc HTTP/1.0\r\n\r\n")
        self.assertEqual(status, 200)
        head = self.worker.requests[-1][0]
        self.assertEqual([line for line in head.split(b"\r\n")
                          if line.lower().startswith(b"host:")], [b"Host: localhost"])

    async def test_bare_lf_line_endings_are_400_at_once(self) -> None:
        # Not a 408 after the head deadline: the lines would never end.
        await self.setup()
        self.site.header_timeout = 30
        raw = await self.assertRefused(b"GET /api/svc HTTP/1.1\nHost: h\n\n", 400)
        self.assertIn(b"bare LF line endings", raw)

    def test_a_body_with_lf_is_fine_however_the_head_end_is_split(self) -> None:
        """A body of LFs right after the blank line is not read as bare-LF line
        endings, wherever the head's end falls between two reads: each cut around
        the blank line is fed to the edge as two dataReceived calls (a forced split,
        in memory: StringTransport and Clock), and each is a 200 whose resource
        got the whole body; the whole request in one read, through the proxy to a
        worker on 127.0.0.1, is a 200 too."""
        from twisted.internet.address import IPv4Address
        from twisted.internet.task import Clock
        from twisted.web.resource import Resource

        from cgipool.proxy.edge import EdgeSite
        from cgipool.proxy.routes import Root
        from tests.test_edge_protocol import Transport

        class Body(Resource):
            isLeaf = True

            def render_POST(self, request: Any) -> bytes:
                return request.content.read()

        head = (b"POST /svc HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
                b"Content-Length: 6\r\n\r\n")
        whole = head + b"\n\na\nb\n"
        for cut in [len(whole)] + list(range(len(head) - 4, len(whole))):
            # (the first: in one read; then every split around the blank line)
            site = EdgeSite(Root({"/svc": Body()}), reactor=Clock())
            peer = IPv4Address("TCP", "127.0.0.1", 1234)
            channel = site.buildProtocol(peer)
            transport = Transport(peerAddress=peer)
            channel.makeConnection(transport)
            channel.dataReceived(whole[:cut])
            if cut < len(whole):
                channel.dataReceived(whole[cut:])
            status, _, body = split_response(transport.value())
            self.assertEqual((status, body), (200, b"\n\na\nb\n"),
                             (cut, transport.value()[:120]))

    async def test_a_body_with_lf_goes_to_the_worker_in_one_read(self) -> None:
        """The same request whole, on a real socket through the proxy: a 200 from
        the worker, which got the body (the split reads are forced in memory by
        test_a_body_with_lf_is_fine_however_the_head_end_is_split)."""
        await self.setup()
        body = b"\n\na\nb\n"
        status, _, _ = await self.answer(
            b"POST /api/svc HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
            b"Content-Length: 6\r\n\r\n" + body)
        self.assertEqual(status, 200)
        self.assertEqual(self.worker.requests[-1][1], body)

    async def test_header_name_with_space_before_colon_is_400(self) -> None:
        await self.setup()
        await self.assertRefused(b"GET /api/svc HTTP/1.1\r\nHost: h\r\nX-A : v\r\n\r\n", 400)

    async def test_obsolete_line_folding_is_400(self) -> None:
        """A continuation line (obs-fold, RFC 9112 5.2) is refused with 400, not
        joined to the header above it or taken for a header of its own."""
        await self.setup()
        await self.assertRefused(b"GET /api/svc HTTP/1.1\r\nHost: h\r\nX-A: v\r\n  folded\r\n\r\n",
                                 400)

    async def test_header_names_with_underscore_are_not_forwarded(self) -> None:
        await self.setup()
        status, _, _ = await self.answer(b"GET /api/svc HTTP/1.1\r\nHost: h\r\nX_User: root\r\n"
                                         b"X-User: ann\r\n" + CLOSE + b"\r\n")
        self.assertEqual(status, 200)
        head = self.worker.requests[-1][0]
        self.assertIn(b"X-User: ann", head)
        self.assertNotIn(b"root", head)

    async def test_hop_by_hop_and_proxy_authorization_are_not_forwarded(self) -> None:
        await self.setup()
        await self.answer(b"GET /api/svc HTTP/1.1\r\nHost: h\r\nProxy-Authorization: Basic eA==\r\n"
                          b"Keep-Alive: 5\r\nTE: trailers\r\nUpgrade: h2c\r\nX-Drop: 1\r\n"
                          b"Connection: close, X-Drop\r\n\r\n")
        head = self.worker.requests[-1][0].lower()
        for name in (b"proxy-authorization", b"keep-alive", b"te:", b"upgrade", b"x-drop",
                     b"connection"):
            self.assertNotIn(name, head)

    async def test_client_x_forwarded_headers_are_replaced(self) -> None:
        await self.setup()
        await self.answer(b"GET /api/svc HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 6.6.6.6\r\n"
                          b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil\r\n"
                          b"X-Real-IP: 6.6.6.6\r\n" + CLOSE + b"\r\n")
        head = self.worker.requests[-1][0]
        self.assertNotIn(b"6.6.6.6", head)
        self.assertNotIn(b"evil", head)
        self.assertIn(b"X-Forwarded-For: 127.0.0.1", head)
        self.assertIn(b"X-Forwarded-Proto: http\r\n", head + b"\r\n")


class TrustedProxyTests(EdgeCase):
    async def test_a_trusted_proxys_chain_is_kept_and_appended_to(self) -> None:
        await self.setup()
        self.site.trusted_proxies = (ipaddress.ip_network("127.0.0.0/8"),)
        await self.answer(b"GET /api/svc HTTP/1.1\r\nHost: inner\r\n"
                          b"X-Forwarded-For: 203.0.113.7, 10.0.0.2\r\n"
                          b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: shop.example\r\n"
                          + CLOSE + b"\r\n")
        head = self.worker.requests[-1][0] + b"\r\n"
        self.assertIn(b"X-Forwarded-For: 203.0.113.7, 10.0.0.2, 127.0.0.1\r\n", head)
        self.assertIn(b"X-Forwarded-Proto: https\r\n", head)
        self.assertIn(b"X-Forwarded-Host: shop.example\r\n", head)
        self.assertEqual(head.count(b"X-Forwarded-For"), 1)

    async def test_an_untrusted_client_cannot_claim_a_chain(self) -> None:
        await self.setup()
        self.site.trusted_proxies = (ipaddress.ip_network("10.0.0.0/8"),)
        await self.answer(b"GET /api/svc HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.0.0.9\r\n"
                          + CLOSE + b"\r\n")
        head = self.worker.requests[-1][0] + b"\r\n"
        self.assertIn(b"X-Forwarded-For: 127.0.0.1\r\n", head)
        self.assertNotIn(b"10.0.0.9", head)


class PathTests(EdgeCase):
    async def test_dot_segments_cannot_reach_the_admin(self) -> None:
        await self.setup()
        for path in (b"/api/svc/../../admin/api/status", b"/api/svc/%2e%2e/%2E%2E/admin",
                     b"/api/svc/..%2f..%2fadmin", b"/api/svc/%2fadmin", b"/api/svc\\..\\admin"):
            raw = await self.assertRefused(b"GET " + path + b" HTTP/1.1\r\nHost: h\r\n"
                                           + CLOSE + b"\r\n", 400)
            self.assertNotIn(b"services", raw)

    async def test_absolute_form_is_400(self) -> None:
        """``GET http://h/...`` asks for a forward proxy, which this is not: 400,
        nothing reaches a worker."""
        await self.setup()
        await self.assertRefused(b"GET http://h/api/svc HTTP/1.1\r\nHost: h\r\n" + CLOSE
                                 + b"\r\n", 400)

    async def test_asterisk_form_is_answered_by_the_daemon_not_a_worker(self) -> None:
        await self.setup()
        status, headers, body = await self.answer(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n"
                                                  + CLOSE + b"\r\n")
        self.assertEqual((status, body), (200, b""))  # RFC 9110 9.3.7: server-wide options
        status, headers, body = await self.answer(b"GET * HTTP/1.1\r\nHost: h\r\n" + CLOSE
                                                  + b"\r\n")
        self.assertEqual((status, headers[b"allow"]), (405, [b"OPTIONS"]))
        self.assertIn("only OPTIONS", json.loads(body)["error"])
        self.assertEqual(self.worker.requests, [])

    async def test_connect_is_405(self) -> None:
        """CONNECT, in origin or authority form, gets 405 with a JSON reason:
        the daemon opens no tunnel."""
        await self.setup()
        for target in (b"/api/svc", b"127.0.0.1:22"):  # origin- and authority-form
            status, _, body = await self.answer(b"CONNECT " + target + b" HTTP/1.1\r\n"
                                                b"Host: h\r\n" + CLOSE + b"\r\n")
            self.assertEqual(status, 405, target)
            self.assertIn("CONNECT is not supported", json.loads(body)["error"])

    async def test_garbage_first_bytes_are_400_at_once(self) -> None:
        """A TLS hello, a NUL, binary: 400 JSON as soon as they arrive, not a 408
        when the head deadline (30 s here) passes."""
        await self.setup()
        self.site.header_timeout = 30
        for data in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", b"\x00",
                     b"\xff\xd8\xff\xe0 binary", b"\r\n\x80\x81"):
            client = await self.connect()
            client.transport.write(data)
            # At once means long before the 30 s head deadline (a 408), not fast.
            await wait_for(lambda: client.closed, 10, what=f"the answer to {data[:8]!r}")
            status, headers, body = split_response(bytes(client.received))
            self.assertEqual(status, 400, data)
            self.assertEqual(headers[b"content-type"], [b"application/json"])
            self.assertIn("error", json.loads(body))
        self.assertEqual(self.worker.requests, [])
        await self.assertStillServes()

    async def test_bad_request_line_is_400(self) -> None:
        """A line with no version, a double space, an unknown version, a NUL in
        the method or TLS bytes is 400 (or 505 for the version), then closed."""
        await self.setup()
        for line in (b"GET /api/svc", b"GET  /api/svc HTTP/1.1", b"GET /api/svc HTTP/9.9",
                     b"G\x00T /api/svc HTTP/1.1", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"):
            await self.assertRefused(line + b"\r\nHost: h\r\n\r\n", 400, 505)


class SlowClientTests(EdgeCase):
    async def test_slowloris_header_block_gets_408_after_the_deadline(self) -> None:
        await self.setup()
        site = self.site
        site.header_timeout = 0.5
        slow = await self.connect()
        slow.transport.write(b"GET /api/svc HTTP/1.1\r\n")
        for i in range(8):  # a header line every 0.2 s: the idle timeout never fires
            await sleep(0.2)
            if slow.closed:
                break
            slow.transport.write(b"X-%d: v\r\n" % i)
        await wait_for(lambda: slow.closed, 5, what="the slow client to be cut off")
        received = bytes(slow.received)
        self.assertTrue(received.startswith(b"HTTP/1.1 408 "), received[:80])
        self.assertEqual(self.worker.requests, [])
        await self.assertStillServes()

    def test_a_trickled_body_gets_408_a_slow_steady_one_goes_through(self) -> None:
        """BODY_TIMEOUT 0.5 s, MIN_BODY_RATE 1,000 bytes/s: a byte every 0.1 s
        (the idle timer never fires) meets the body deadline, 408, nothing
        dispatched; 400 bytes every 0.2 s (2,000 bytes/s) for 1.5 s is answered.
        In memory on a Clock, so the pace is the test's: on real sockets a
        loaded machine's late sleeps made the steady upload too slow."""
        from cgipool.proxy import edge
        from tests.test_edge_protocol import Connection, connect, status_of

        self.patch(edge, "BODY_TIMEOUT", 0.5)
        self.patch(edge, "MIN_BODY_RATE", 1000)

        def upload(piece: bytes, every: float, total: int) -> Connection:
            """POST a ``total``-byte body in ``piece``s, one every ``every`` s."""
            conn = connect()
            conn.send(b"POST /svc/up HTTP/1.1\r\nHost: h\r\nConnection: close\r\n"
                      b"Content-Length: %d\r\n\r\n" % total)
            sent = 0
            while sent < total and not conn.transport.value():
                data = piece[:total - sent]
                conn.send(data)
                sent += len(data)
                conn.clock.advance(every)
            return conn

        trickled = upload(b"x", 0.1, 100)
        raw = trickled.transport.value()
        self.assertEqual(status_of(raw), 408, raw[:80])
        self.assertIn(b"the request body did not arrive in time", raw)
        self.assertEqual(trickled.echo.rendered, [])
        steady = upload(b"y" * 400, 0.2, 3000)
        raw = steady.transport.value()
        self.assertEqual(status_of(raw), 200, raw[:200])
        self.assertEqual(steady.echo.rendered, [b"/up"])
        self.assertIn(b"y" * 3000, raw)

    async def test_client_leaving_mid_request_frees_the_worker_slot(self) -> None:
        self.worker, wport = await self.start_worker(lambda h, b, c: None)  # never answers
        target = self.worker_for(wport)
        _, self.port = await self.start_proxy([target])
        # The client leaves once the worker holds the request: an event, not a
        # delay a slow machine could outrun (then nothing would be in flight).
        await self.raw(self.port, b"GET /api/svc HTTP/1.1\r\nHost: h\r\n\r\n",
                       close_when=lambda: self.worker.requests)
        await wait_for(lambda: target.in_flight == 0 and not target.connections.active, 10,
                       what="the worker slot freed and its connection closed")

    async def test_request_line_without_end_gets_408(self) -> None:
        """A request line that never ends (no CRLF): the head deadline starts at
        the first byte, not at the first complete line.  (Bytes that cannot
        begin one get 400 at once: PathTests.test_garbage_first_bytes_are_400_at_once.)"""
        await self.setup()
        self.site.header_timeout = 0.3
        raw = await self.raw(self.port, b"GET /api/svc?" + b"a" * 100)
        self.assertTrue(raw.startswith(b"HTTP/1.1 408 "), raw[:80])
        await self.assertStillServes()

    async def test_idle_keep_alive_connection_is_not_a_slow_head(self) -> None:
        await self.setup()
        self.site.header_timeout = 0.3
        client = await self.connect()
        received = client.received
        client.transport.write(b"GET /api/svc HTTP/1.1\r\nHost: h\r\n\r\n")
        await wait_for(lambda: b'{"ok": true}' in received, 5, what="the first answer")
        await sleep(0.8)  # idle between requests: longer than header_timeout
        client.transport.write(b"GET /api/svc HTTP/1.1\r\nHost: h\r\n\r\n")
        await wait_for(lambda: received.count(b'{"ok": true}') == 2, 5,
                       what="the second answer on the same connection")
        self.assertNotIn(b" 408 ", bytes(received))


class LogTests(EdgeCase):
    async def test_control_characters_are_escaped_in_the_access_log(self) -> None:
        """Refused requests with ESC or DEL in the target or a header, TLS
        bytes, and a served one with escapes decoded in its path: one access-log
        line each, every control escaped."""
        from twisted.internet.endpoints import TCP4ServerEndpoint

        from cgipool.proxy.edge import EdgeSite
        from cgipool.proxy.routes import Root

        await self.setup()
        path = self.mktemp()
        site = EdgeSite(Root({"/api/svc": self.proxy}), access_log=path, reactor=reactor)
        port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(site)
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        # A refused request line is logged as far as it could be read, escaped.
        await self.assertRefused(b"GET /api/svc/\x1b[2J HTTP/1.1\r\nHost: h\r\n\r\n", 400)
        await self.assertRefused(b"GET /api/svc/\x7f[2J HTTP/1.1\r\nHost: h\r\n\r\n", 400)
        await self.assertRefused(b"GET /api/svc HTTP/1.1\r\nHost: h\r\nUser-Agent: a\x1bb\r\n\r\n",
                                 400)
        await self.assertRefused(b"\x16\x03\x01\x00\x1b\r\n", 400)
        await self.answer(b"GET /api/svc/%1b%0d%0a HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n")

        def lines() -> list[bytes]:
            with open(path, "rb") as f:
                return f.read().splitlines(keepends=True)
        # assertRefused checks the daemon still serves after each: 9 requests.
        await wait_for(lambda: len(lines()) >= 9, 5, what="nine access-log lines")
        logged = lines()
        self.assertEqual(len(logged), 9, logged)
        for line in logged:
            self.assertRegex(line[:-1], rb"^[\x20-\x7e]*$")  # printable, one line each
        self.assertIn(b'"GET /api/svc/\\x1b[2J HTTP/1.1" 400', logged[0])
        self.assertIn(b'"GET /api/svc/\\x7f[2J HTTP/1.1" 400', logged[2])
