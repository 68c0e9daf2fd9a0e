"""Property-based fuzzing (hypothesis) of what hostile bytes reach first.

- ``normalize_path`` and routing: no input escapes its route or reaches the
  admin by a detour; the result is canonical.
- ``parse_head`` (worker responses): only ``BadResponse`` ever escapes, and
  what it accepts cannot split the client's response.
- the edge (``EdgeProtocol``, the httptools parser and the one request
  pipeline, with the real routing, in memory): arbitrary bytes never raise,
  every answer is a well-formed HTTP/1.1 response, and nothing but
  well-framed requests reaches the service resource.

CI runs a short pass (a few hundred examples each); ``make fuzz`` runs each
property for ``CGIPOOL_FUZZ_SECONDS`` (default 100 s each, 5 minutes in all).
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.testing import StringTransport
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource

from cgipool.proxy.edge import EdgeSite
from cgipool.proxy.routes import BadPath, Root, normalize_path
from cgipool.proxy.upstream import BadResponse, parse_head

FUZZ_SECONDS = float(os.environ.get("CGIPOOL_FUZZ_SECONDS", "0"))
CI_EXAMPLES = 300

PATH_ALPHABET = b"/.%2fF5cCeE0aA_-~?#\\\x00 az"
path_bytes = st.lists(st.sampled_from([bytes([c]) for c in PATH_ALPHABET]
                                      + [b"%2e", b"%2E", b"%2f", b"%5c", b"..", b"//", b"/./",
                                         b"/../", b"%252e", b"%00", b"admin", b"api"]),
                      max_size=24).map(lambda parts: b"/" + b"".join(parts))


def run(test: SynchronousTestCase, prop: Any) -> None:
    """Run a @given property: briefly in CI, for CGIPOOL_FUZZ_SECONDS under `make fuzz`."""
    quiet = dict(database=None, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    if FUZZ_SECONDS <= 0:
        settings(max_examples=CI_EXAMPLES, **quiet)(prop)()
        return
    end = time.monotonic() + FUZZ_SECONDS
    runs = 0
    prop = settings(max_examples=2000, **quiet)(prop)
    while time.monotonic() < end:
        prop()  # a fresh random seed each round
        runs += 1
    print(f"{test.id()}: {runs * 2000} examples in {FUZZ_SECONDS:g} s")


class PathFuzz(SynchronousTestCase):
    def test_normalised_paths_are_canonical_and_never_climb(self) -> None:
        @given(path_bytes)
        def prop(path: bytes) -> None:
            try:
                out = normalize_path(path)
            except BadPath:
                return
            self.assertTrue(out.startswith(b"/"))
            segments = out.split(b"/")[1:]
            self.assertNotIn(b"..", segments)
            self.assertNotIn(b".", segments)
            self.assertNotIn(b"//", out)
            self.assertNotIn(b"\\", out)
            self.assertIsNone(re.search(rb"%(2[fF]|5[cC]|00|2[eE])", out))
            self.assertEqual(normalize_path(out), out, "idempotent")

        run(self, prop)

    def test_routing_never_reaches_another_route_or_the_admin_by_a_detour(self) -> None:
        class Leaf(Resource):
            isLeaf = True

            def __init__(self, name: str) -> None:
                super().__init__()
                self.name = name

        routes = {"/api/search": Leaf("search"), "/api/auth": Leaf("auth")}
        root = Root(routes, local={"admin": Leaf("admin")})

        @given(path_bytes)
        def prop(path: bytes) -> None:
            limit, route = root.lookup(path)
            self.assertGreater(limit, 0)
            if route is None:
                return
            resource, target = route
            canonical = normalize_path(path.split(b"?", 1)[0])
            self.assertTrue(canonical.startswith(("/api/" + resource.name).encode()))
            self.assertTrue(target.startswith(b"/"))
            self.assertNotIn(b"/../", target + b"/")

        run(self, prop)


header_name = st.binary(min_size=0, max_size=12)
header_value = st.binary(min_size=0, max_size=24)


class ResponseHeadFuzz(SynchronousTestCase):
    def test_parse_head_accepts_only_what_cannot_split_a_response(self) -> None:
        status_line = st.one_of(
            st.binary(max_size=40),
            st.tuples(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2", b"http/1.1"]),
                      st.binary(max_size=5), st.binary(max_size=20))
            .map(lambda t: t[0] + b" " + t[1] + b" " + t[2]))
        lines = st.lists(st.one_of(
            st.tuples(header_name, header_value).map(lambda t: t[0] + b":" + t[1]),
            st.sampled_from([b"Content-Length: 5", b"Content-Length: -1",
                             b"Transfer-Encoding: chunked", b"Connection: close, x",
                             b"Content-Length: 5, 5", b"X: a\nb", b" folded"])), max_size=8)

        @given(status_line, lines)
        def prop(first: bytes, rest: list[bytes]) -> None:
            head = b"\r\n".join([first, *rest])
            try:
                status, reason, keep_alive, headers, length, chunked = parse_head(head)
            except BadResponse:
                return
            self.assertTrue(100 <= status <= 999)
            self.assertIsNone(re.search(rb"[\r\n\x00]", reason))
            for name, value in headers:
                self.assertRegex(name, rb"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")
                self.assertIsNone(re.search(rb"[\r\n\x00]", value))
            if length is not None:
                self.assertGreaterEqual(length, 0)

        run(self, prop)


class _Transport(StringTransport):
    """A TCP-like in-memory transport: half-close and abort as on a socket."""

    write_closed = False
    aborted = False

    def loseWriteConnection(self) -> None:
        self.write_closed = True

    def abortConnection(self) -> None:
        self.aborted = True
        self.loseConnection()

    def write(self, data: bytes) -> None:
        if self.write_closed or self.aborted:
            raise AssertionError(f"write after the write side was closed: {data[:60]!r}")
        super().write(data)


class EdgeFuzz(SynchronousTestCase):
    def test_arbitrary_bytes_at_the_edge_get_well_formed_answers(self) -> None:
        served: list[bytes] = []

        class Service(Resource):
            isLeaf = True
            max_body = 4096

            def render(self, request: Any) -> bytes:
                served.append(request.method + b" " + request.uri)
                request.setHeader(b"content-type", b"text/plain")
                return b"ok"

        chunks = st.lists(st.one_of(
            st.binary(max_size=40),
            st.sampled_from([b"GET /api/x HTTP/1.1\r\n", b"POST /api/x HTTP/1.1\r\n",
                             b"Host: h\r\n", b"Content-Length: 3\r\n", b"Content-Length: x\r\n",
                             b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n",
                             b"\r\n", b"3\r\nabc\r\n0\r\n\r\n", b"abc", b"GET /../admin HTTP/1.1\r\n",
                             b" folded\r\n", b"X_Y: 1\r\n", b"GET http://x/ HTTP/1.1\r\n",
                             b"CONNECT x:1 HTTP/1.1\r\n", b"\x00\xff"])), max_size=12)

        @given(chunks, st.booleans())
        def prop(parts: list[bytes], at_once: bool) -> None:
            if at_once:  # one read, else one read per part: where reads end must not matter
                parts = [b"".join(parts)]
            clock = Clock()
            site = EdgeSite(Root({"/api/x": Service()}), reactor=clock)
            channel = site.buildProtocol(None)
            transport = _Transport()
            channel.makeConnection(transport)
            for part in parts:
                if transport.disconnecting:
                    break
                channel.dataReceived(part)
            clock.advance(120)  # every deadline passes: nothing may blow up
            out = transport.value()
            channel.connectionLost(Exception("done"))
            if out:
                self.assertTrue(out.startswith(b"HTTP/1."), out[:60])
                for status in re.findall(rb"HTTP/1\.[01] (\d{3}) ", out):
                    self.assertTrue(100 <= int(status) <= 599)

        run(self, prop)
        # Only well-formed requests for the route ever reached the service.
        for line in served:
            method, _, uri = line.partition(b" ")
            self.assertRegex(method, rb"^[A-Z!#$%&'*+\-.^_`|~0-9a-z]+$")
            self.assertTrue(uri == b"/api/x" or uri.startswith((b"/api/x/", b"/api/x?")), uri)
