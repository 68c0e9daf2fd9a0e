"""Classic CGI services (``protocol: cgi``): real scripts behind the real daemon.

Each request runs ``tests/workers/cgi_behaviour.py`` (or a shipped sample), so
every test spawns real processes on 127.0.0.1 and checks they are gone after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import sys
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.internet.error import ProcessDone
from twisted.internet.task import Clock
from twisted.logger import formatEventAsClassicLogText, globalLogPublisher
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest
from twisted.trial.unittest import TestCase

from cgipool.cgi import BadCgiResponse, CgiExecution, CgiPool, header_end, parse_cgi_header
from cgipool.config import load
from cgipool_tools.status import format_status
from tests.support import (
    ROOT,
    get_json,
    http_client,
    process_alive,
    search_service,
    sleep,
    start_daemon,
    wait_for,
    write_config,
)
from tests.test_config import ConfigTestCase

SCRIPT = os.path.join(ROOT, "tests", "workers", "cgi_behaviour.py")


def cgi_config(workers: str = "{max: 4}", queue: str = "{max: 8, timeout: 5}",
               request_timeout: float = 10, route: str = "/cgi/test") -> str:
    return f"""
services:
  script:
    protocol: cgi
    command: ["{{python}}", "{SCRIPT}"]
    route: {route}
    workers: {workers}
    queue: {queue}
    request_timeout: {request_timeout}
    stop_timeout: 2
"""


class HeaderParsingTests(TestCase):
    """RFC 3875 section 6: the script's header block."""

    def test_document_response(self) -> None:
        """A header block with Content-Type and no Status is a 200 document
        response (RFC 3875 6.2.1), its fields kept in order."""
        r = parse_cgi_header(b"Content-Type: text/plain\nX-A: 1")
        self.assertEqual((r.status, r.reason), (200, None))
        self.assertEqual(r.headers, [(b"Content-Type", b"text/plain"), (b"X-A", b"1")])

    def test_status_with_reason_and_crlf(self) -> None:
        """``Status:`` sets the code and keeps the script's reason phrase, with
        CRLF line ends as well as LF."""
        r = parse_cgi_header(b"Status: 418 I'm a teapot\r\nContent-Type: text/plain\r")
        self.assertEqual((r.status, r.reason), (418, b"I'm a teapot"))

    def test_location_alone_is_a_redirect(self) -> None:
        """A Location with a scheme or authority alone is a 302 for the client; a
        path alone is a local redirect the daemon follows; a Status overrides 302."""
        for location in (b"https://example.invalid/x", b"//other.invalid/x"):
            r = parse_cgi_header(b"Location: " + location)
            self.assertEqual((r.status, r.headers, r.local),
                             (302, [(b"Location", location)], None))
        # A path alone is a local redirect (RFC 3875 6.2.2): the daemon follows it.
        r = parse_cgi_header(b"Location: /local/path?q=1")
        self.assertEqual((r.headers, r.local), ([], b"/local/path?q=1"))
        r = parse_cgi_header(b"Status: 301 Moved\nLocation: /new\nContent-Type: text/html")
        self.assertEqual(r.status, 301)

    def test_framing_fields_are_the_daemons(self) -> None:
        """The script's Content-Length, Connection and Transfer-Encoding are
        dropped: the daemon frames the response, a script cannot desync it."""
        r = parse_cgi_header(b"Content-Type: a/b\nContent-Length: 5\nConnection: close\n"
                             b"Transfer-Encoding: chunked")
        self.assertEqual(r.headers, [(b"Content-Type", b"a/b")])

    def test_invalid_headers(self) -> None:
        """Each malformed block is BadCgiResponse naming the problem (no type, a
        bad name or Status, folding, a control character, a repeated Location)."""
        for block, problem in (
            (b"X-Only: 1", "no Content-Type, Location or Status"),
            (b"<html>", "not a header field"),
            (b"Bad Name: x\nContent-Type: a/b", "not a header field"),
            (b"Status: 99 Low\nContent-Type: a/b", "bad Status"),
            (b"Status: 200\nStatus: 201\nContent-Type: a/b", "bad Status"),
            (b"Content-Type: a/b\n folded", "folded"),
            (b"Content-Type: a/b\nX-Split: a\x00b", "control character"),
            (b"Location: /a\nLocation: /b", "repeated Location"),
        ):
            with self.assertRaises(BadCgiResponse) as caught:
                parse_cgi_header(block)
            self.assertIn(problem, str(caught.exception), block)

    def test_invalid_location_targets_are_refused(self) -> None:
        """A local redirect becomes a request line: origin-form only; any other
        Location goes to the client: URI characters only (RFC 3986)."""
        for location, problem in (
            (b"/a HTTP/1.0\tb c", "not a valid URI"),
            (b"/a b", "not a valid URI"),
            (b"/a%zz", "local redirect to an invalid path"),
            (b"/a#fragment", "local redirect to an invalid path"),
            (b"/a\\b", "not a valid URI"),
            (b"/caf\xc3\xa9", "not a valid URI"),
            (b"http://h/a b", "not a valid URI"),
            (b'http://h/"x"', "not a valid URI"),
            (b"http://h/<script>", "not a valid URI"),
        ):
            with self.assertRaises(BadCgiResponse) as caught:
                parse_cgi_header(b"Location: " + location)
            self.assertIn(problem, str(caught.exception), location)
        for location in (b"/a/b;c=d:e@f?q=1&r=/x?y%20", b"/", b"/%41?"):
            self.assertEqual(parse_cgi_header(b"Location: " + location).local, location)
        r = parse_cgi_header(b"Location: https://h.example/a?b#c")
        self.assertEqual((r.status, r.local), (302, None))

    def test_end_of_header(self) -> None:
        """header_end finds the blank line ending the header whatever mix of LF
        and CRLF the script used: (header length, separator length), -1 if none yet."""
        self.assertEqual(header_end(bytearray(b"A: b\n\nbody")), (4, 2))
        self.assertEqual(header_end(bytearray(b"A: b\r\n\r\nbody")), (4, 4))
        self.assertEqual(header_end(bytearray(b"A: b\n\r\nbody")), (4, 3))
        self.assertEqual(header_end(bytearray(b"A: b\r\n")), (-1, 0))


class _Pool:
    """What one CgiExecution asks of its pool, recorded."""

    name = "script"

    def __init__(self) -> None:
        self.reactor = Clock()
        self.killed: list[tuple[int, int]] = []
        self.ended: list[tuple[Any, bool]] = []

    def kill(self, pid: int, sig: int) -> None:
        self.killed.append((pid, sig))

    def kill_leftovers(self, pid: int, sig: int) -> None:
        pass

    def finished(self, execution: Any, exit_code: Any, ok: bool) -> None:
        self.ended.append((exit_code, ok))


class _Resource:
    """The CGI resource of an execution (the pipeline, not the execution, counts
    its requests: nothing is asked of it here)."""


class CgiExecutionTests(TestCase):
    def test_invalid_output_is_a_failure_even_when_the_script_exits_zero_first(
            self) -> None:
        # The script printed garbage and exited 0 before the SIGKILL that follows
        # a 502 reached it: still a failed execution (it used to count as ok).
        pool, resource = _Pool(), _Resource()
        request = DummyRequest([b""])
        execution = CgiExecution(pool, request, resource, "script-1", 0.0)  # type: ignore
        execution.pid = 4242
        execution.outReceived(b"<html>this is not a CGI header</html>\n\nbody")
        self.assertEqual(request.responseCode, 502)
        self.assertEqual(pool.killed, [(4242, signal.SIGKILL)])
        execution.processEnded(Failure(ProcessDone(0)))
        self.assertEqual(pool.ended, [(0, False)])

    def test_a_valid_answer_and_exit_zero_is_ok(self) -> None:
        pool, resource = _Pool(), _Resource()
        request = DummyRequest([b""])
        execution = CgiExecution(pool, request, resource, "script-1", 0.0)  # type: ignore
        execution.pid = 4242
        execution.outReceived(b"Content-Type: text/plain\n\nhello")
        execution.processEnded(Failure(ProcessDone(0)))
        self.assertEqual((pool.killed, pool.ended, request.responseCode), ([], [(0, True)], 200))
        self.assertEqual(b"".join(request.written), b"hello")


class CgiConfigTests(ConfigTestCase):
    def pool(self, service: str) -> str:
        return self.write(f'base_dir: {ROOT}\nservices:\n  s:\n' + service)

    def test_protocol_values(self) -> None:
        """An unknown protocol is a config error at its line that lists the
        accepted values, http and cgi."""
        path = self.pool('    protocol: fastcgi\n    command: ["true"]\n    route: /x\n')
        self.assertConfigError(path, line=4, service="s", key="protocol",
                               message="protocol must be one of http, cgi, got 'fastcgi'")

    def test_cgi_has_no_ports_and_no_port_placeholder(self) -> None:
        path = self.pool('    protocol: cgi\n    command: ["true"]\n    route: /x\n'
                         '    ports: [9000]\n')
        self.assertConfigError(path, line=7, service="s", key="ports",
                               message="listens on no port")
        path = self.pool('    protocol: cgi\n    command: ["sh", "{port}"]\n    route: /x\n')
        self.assertConfigError(path, line=5, service="s", key="command",
                               message="{port} and {worker} mean nothing here")

    def test_nph_scripts_are_refused(self) -> None:
        """An nph- script would write its own status line past the daemon's
        framing: refused at config load, with the script's name."""
        folder = self.folder()
        script = self.executable(os.path.join(folder, "nph-hello.sh"))
        path = self.pool(f'    protocol: cgi\n    command: ["{script}"]\n    route: /x\n')
        self.assertConfigError(path, line=5, service="s", key="command",
                               message="non-parsed-header scripts ('nph-hello.sh') "
                                       "are not supported")

    def test_shipped_samples(self) -> None:
        """etc/pool.yaml's two CGI samples load as documented: their routes, 4
        at once, a queue of 32 for 5 s, request_timeout 10 s."""
        config = load(os.path.join(ROOT, "etc", "pool.yaml"))
        for name, route in (("cgi-shell", "/api/cgi-shell"), ("cgi-python", "/api/cgi-python")):
            svc = config.service(name)
            self.assertEqual((svc.protocol, svc.route, svc.workers.max), ("cgi", route, 4))
            self.assertEqual((svc.queue.max, svc.queue.timeout, svc.request_timeout),
                             (32, 5.0, 10.0))


class CgiDaemonTestCase(TestCase):
    async def daemon(self, body: str, **kwargs: Any) -> Any:
        daemon = await start_daemon(self, write_config(self, body), **kwargs)
        self.client = http_client(self)
        return daemon

    def pidfile(self) -> str:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        return os.path.join(folder, "pids")

    async def read_pids(self, path: str) -> list[int]:
        await wait_for(lambda: os.path.exists(path) and open(path).read().endswith("\n"),
                       10, what="the script's pid file")
        with open(path) as f:
            pids = [int(p) for p in f.read().split()]
        self.addCleanup(self.assert_gone, pids)
        return pids

    async def assert_gone(self, pids: list[int], timeout: float = 5) -> None:
        await wait_for(lambda: not any(process_alive(p) for p in pids), timeout,
                       what=f"processes {pids} to be gone")

    async def paused_reader(self, daemon: Any, size: int = 8 * 1024 * 1024) -> Any:
        """A client of ``/cgi/test/big?n=size`` that stops reading once the
        first bytes arrive: the daemon's buffers and the script's pipe fill, and
        the script holds its slot until :meth:`read_to_end` (an event the test
        controls, where a script's sleep could end before the test's steps)."""
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        from tests.test_hostile_edge import Recorder

        client = await connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", daemon.port), Recorder())
        self.addCleanup(client.transport.abortConnection)
        client.size = size
        client.transport.write(b"GET /cgi/test/big?n=%d HTTP/1.1\r\nHost: h\r\n"
                               b"Connection: close\r\n\r\n" % size)
        await wait_for(lambda: client.received, 10, what="the first bytes")
        client.transport.pauseProducing()  # stop reading: the daemon's buffers fill
        return client

    async def read_to_end(self, client: Any) -> None:
        """A :meth:`paused_reader` reads again: a 200 with every byte, then closed."""
        from tests.test_proxy import dechunk

        client.transport.resumeProducing()
        await wait_for(lambda: client.closed, 20, what="the end of the response")
        head, _, body = bytes(client.received).partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 200"), head[:200])
        if b"transfer-encoding: chunked" in head.lower():
            body = dechunk(body)
        self.assertEqual(len(body), client.size, "every byte of the script's output")
        self.assertEqual(body[:512], bytes(range(256)) * 2)


class CgiRequestTests(CgiDaemonTestCase):
    async def test_environment_and_body(self) -> None:
        """The script gets the RFC 3875 meta-variables and the body; the daemon's
        own environment, Proxy (httpoxy), credentials, spoofed X-Forwarded-*
        and hop-by-hop headers are kept from it."""
        os.environ["CGIPOOL_TEST_SECRET"] = "not for scripts"
        self.addCleanup(os.environ.pop, "CGIPOOL_TEST_SECRET", None)
        daemon = await self.daemon(cgi_config())
        response = await self.client.post(
            f"{daemon.url}/cgi/test/env/more%20stuff?a=1&b=two%20words",
            data=b'{"hello": "cgi"}',
            headers={"Content-Type": "application/json", "X-Custom": ["a", "b"],
                     "Proxy": "http://evil.invalid:3128", "X_Under": "sneaky",
                     "Authorization": "Basic dXNlcjpwYXNz", "Cookie": "k=v",
                     # Spoofing attempts, and a header the client's Connection names.
                     "X-Forwarded-For": "1.2.3.4", "X-Real-IP": "1.2.3.4",
                     "X-Forwarded-Proto": "https", "X-Secret": "hop",
                     "Connection": "X-Secret"})
        self.assertEqual(response.code, 200)
        result = json.loads(await treq.content(response))
        env = result["env"]
        self.assertEqual(result["body"], '{"hello": "cgi"}')
        expected = {
            "GATEWAY_INTERFACE": "CGI/1.1",
            "REQUEST_METHOD": "POST",
            "SCRIPT_NAME": "/cgi/test",
            "PATH_INFO": "/env/more stuff",
            "QUERY_STRING": "a=1&b=two%20words",
            "CONTENT_TYPE": "application/json",
            "CONTENT_LENGTH": "16",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": str(daemon.port),
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "HTTP_X_CUSTOM": "a, b",
            "HTTP_COOKIE": "k=v",
            # The daemon's X-Forwarded-*, as a worker service gets them.
            "HTTP_X_FORWARDED_FOR": "127.0.0.1",
            "HTTP_X_FORWARDED_PROTO": "http",
            "HTTP_X_FORWARDED_HOST": f"127.0.0.1:{daemon.port}",
            "AUTH_TYPE": "Basic",
            "CGIPOOL_SERVICE": "script",
        }
        self.assertEqual({k: env.get(k) for k in expected}, expected)
        self.assertTrue(env["SERVER_SOFTWARE"].startswith("cgipool/"))
        self.assertTrue(env["CGIPOOL_REQUEST_ID"].startswith("script-"))
        self.assertTrue(env["REMOTE_PORT"].isdigit())
        for absent in ("HTTP_PROXY", "HTTP_X_UNDER", "HTTP_AUTHORIZATION",
                       "HTTP_CONTENT_TYPE", "HTTP_CONTENT_LENGTH", "CGIPOOL_TEST_SECRET",
                       "HTTP_X_REAL_IP", "HTTP_X_SECRET", "HTTP_CONNECTION"):
            self.assertNotIn(absent, env)

    async def test_get_has_no_content_length_and_the_route_alone_no_path_info(self) -> None:
        daemon = await self.daemon(cgi_config(route="/cgi/env"))
        # The route is the script name; PATH_INFO is empty when nothing follows.
        code, body = await get_json(self.client, f"{daemon.url}/cgi/env")
        self.assertEqual(code, 404)  # the script answers 404 for an empty PATH_INFO
        code, body = await get_json(self.client, f"{daemon.url}/cgi/env/env")
        self.assertEqual(code, 200)
        self.assertEqual(body["env"]["PATH_INFO"], "/env")
        self.assertEqual(body["env"]["QUERY_STRING"], "")
        self.assertNotIn("CONTENT_LENGTH", body["env"])
        self.assertNotIn("CONTENT_TYPE", body["env"])

    async def test_status_headers_redirects_and_bodies(self) -> None:
        """A script's Status and headers reach the client (its bogus framing
        does not), a client redirect passes, bodies buffered and streamed
        arrive byte for byte, and HEAD gets none."""
        daemon = await self.daemon(cgi_config())
        response = await self.client.get(f"{daemon.url}/cgi/test/created")
        self.assertEqual((response.code, response.phrase), (201, b"Made It"))
        self.assertEqual(response.headers.getRawHeaders(b"x-script"), [b"yes"])
        body = await treq.content(response)
        self.assertEqual(json.loads(body)["created"], True)
        # The script's bogus Content-Length and Connection are not passed on.
        self.assertEqual(response.length, len(body))

        response = await self.client.get(f"{daemon.url}/cgi/test/location",
                                         allow_redirects=False)
        self.assertEqual(response.code, 302)
        self.assertEqual(response.headers.getRawHeaders(b"location"),
                         [b"https://example.invalid/there"])
        await treq.content(response)

        for n in (0, 1000, 3 * 1024 * 1024 + 17):  # buffered, and streamed
            response = await self.client.get(f"{daemon.url}/cgi/test/big?n={n}")
            body = await treq.content(response)
            self.assertEqual(response.code, 200)
            expected = (bytes(range(256)) * 64 * (n // 16384 + 1))[:n]
            self.assertEqual(hashlib.sha256(body).hexdigest(),
                             hashlib.sha256(expected).hexdigest(), n)

        response = await self.client.head(f"{daemon.url}/cgi/test/big?n=1000")
        self.assertEqual(response.code, 200)
        self.assertEqual(await treq.content(response), b"")

    async def test_local_redirects_are_followed_by_the_daemon(self) -> None:
        daemon = await self.daemon(
            cgi_config() + search_service(workers=1, health_interval=5, fall=3))
        url = f"{daemon.url}/cgi/test/local"
        # To another run of a script: a bodiless GET, whatever the first request was.
        response = await self.client.post(f"{url}?to=/cgi/test/env/again%3Fx%3D1",
                                          data=b"a body", allow_redirects=False)
        self.assertEqual(response.code, 200)
        env = json.loads(await treq.content(response))["env"]
        self.assertEqual((env["REQUEST_METHOD"], env["PATH_INFO"], env["QUERY_STRING"]),
                         ("GET", "/env/again", "x=1"))
        self.assertNotIn("CONTENT_LENGTH", env)
        self.assertNotIn("CONTENT_TYPE", env)
        # To a worker service, through the proxy.
        code, body = await get_json(self.client, f"{url}?to=/api/search%3Fq%3Dredirected")
        self.assertEqual((code, body["query"]), (200, "redirected"))
        # To nowhere: what the daemon answers for that path.
        code, body = await get_json(self.client, f"{url}?to=/nowhere")
        self.assertEqual((code, body["routes"]), (404, ["/api/search", "/cgi/test"]))
        code, body = await get_json(self.client, f"{url}?to=/cgi/test/../../admin")
        self.assertEqual(code, 400)
        # A loop ends.
        code, body = await get_json(self.client, f"{daemon.url}/cgi/test/loop")
        self.assertEqual(code, 500)
        self.assertIn("more than 10 local redirects", body["error"])
        # HEAD stays HEAD.
        response = await self.client.head(f"{url}?to=/api/search%3Fq%3Dh")
        self.assertEqual((response.code, await treq.content(response)), (200, b""))
        # Each request counts once, for the route the client asked for, with
        # the status of whatever answered it in the end.
        metrics = daemon.top.metrics
        self.assertEqual(metrics.service("search").codes, {})
        self.assertEqual(metrics.service("script").codes, {200: 3, 404: 1, 400: 1, 500: 1})

    async def test_local_redirect_to_an_invalid_path_is_502(self) -> None:
        daemon = await self.daemon(cgi_config())
        # Location: /a HTTP/1.0<TAB>b c would have become a broken request line.
        for to in ("/a%20HTTP/1.0%09b%20c", "/a%2523frag%23x", "/a%25zz"):
            code, body = await get_json(self.client, f"{daemon.url}/cgi/test/local?to={to}")
            self.assertEqual(code, 502, (to, body))
            self.assertIn("sent an invalid response", body["error"])
            self.assertEqual(body["service"], "script")
        self.assertEqual(daemon.top.metrics.service("script").codes, {502: 3})

    async def test_client_redirect_with_a_space_is_502(self) -> None:
        daemon = await self.daemon(cgi_config())
        code, body = await get_json(
            self.client, f"{daemon.url}/cgi/test/local?to=https://h.example/a%20b")
        self.assertEqual(code, 502, body)
        self.assertIn("Location is not a valid URI", body["error"])

    async def test_control_characters_are_escaped_in_the_daemon_log(self) -> None:
        """ESC, CR and LF decoded into PATH_INFO and echoed by the script reach
        the daemon log escaped: no terminal escapes, no forged lines."""
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        daemon = await self.daemon(cgi_config())
        code, body = await get_json(self.client,
                                    f"{daemon.url}/cgi/test/echo%1b[2J%0dX%0aFAKE%1b]0;t%07")
        self.assertEqual(code, 200)
        pool = daemon.pool("script")
        await wait_for(lambda: not pool.running and pool.last_exit_codes, 5,
                       what="the script ended")
        lines = [formatEventAsClassicLogText(e) for e in logged
                 if e.get("log_namespace") == "cgipool.worker" and e.get("service") == "script"]
        text = "".join(lines)
        self.assertIn("path: /echo\\x1b[2J\\rX\n", text)
        self.assertIn("FAKE\\x1b]0;t\\x07", text)
        for line in lines:  # each event is one line, and no control character is left
            self.assertEqual(line.count("\n"), 1, line)
            self.assertNotRegex(line[:-1], "[\x00-\x1f\x7f]")

    async def test_bad_output_is_502_and_exit_codes_are_counted(self) -> None:
        daemon = await self.daemon(cgi_config())
        for path, problem in (("bad", "sent an invalid response: not a header field"),
                              ("silent", "exited (exit code 3) before a complete CGI "
                                         "header (no output)")):
            code, body = await get_json(self.client, f"{daemon.url}/cgi/test/{path}")
            self.assertEqual(code, 502, body)
            self.assertIn(problem, body["error"])
            self.assertEqual(body["service"], "script")
            self.assertTrue(body["request_id"].startswith("script-"))
        # A valid answer is delivered even when the script then fails.
        code, body = await get_json(self.client, f"{daemon.url}/cgi/test/fail")
        self.assertEqual(code, 200)
        pool = daemon.pool("script")
        # Exit codes are counted when each process has ended, which can be after
        # its answer went out: wait for all three.
        await wait_for(lambda: not pool.running and len(pool.last_exit_codes) >= 3, 5,
                       what="all three scripts ended")
        status = daemon.supervisor.status()["services"][0]
        self.assertEqual(status["protocol"], "cgi")
        self.assertEqual(status["cgi"]["executions"], 3)
        self.assertEqual(status["cgi"]["failures"], 3)
        self.assertEqual(status["cgi"]["last_exit_codes"][1:], [3, 7])
        self.assertEqual(status["state"], "failing")  # restart.failing_after = 3 in a row
        code, body = await get_json(self.client, f"{daemon.url}/cgi/test/env")
        self.assertEqual(daemon.supervisor.status()["services"][0]["state"], "ok")

    async def test_stderr_is_logged_with_the_request_id(self) -> None:
        logged: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, logged.append)
        daemon = await self.daemon(cgi_config())
        await get_json(self.client, f"{daemon.url}/cgi/test/env")  # script-1
        code, body = await get_json(self.client, f"{daemon.url}/cgi/test/stderr")
        self.assertEqual(code, 200)
        pool = daemon.pool("script")
        # A script's stderr and exit are handled when its process ends, which can be
        # after its answer went out: wait for both.
        await wait_for(lambda: not pool.running and len(pool.last_exit_codes) >= 2, 5,
                       what="both scripts ended")
        lines = [(e["worker"], e["pid"], e["line"]) for e in logged
                 if e.get("log_namespace") == "cgipool.worker" and e.get("service") == "script"]
        self.assertEqual(lines, [("script-2", body["pid"], "first complaint"),
                                 ("script-2", body["pid"], "second complaint")])


class CgiLimitTests(CgiDaemonTestCase):
    async def test_timeout_kills_the_process_group_and_answers_504(self) -> None:
        """A script past request_timeout (0.5 s; it sleeps 30 s) gets a 504 that
        names the timeout, and it and its grandchild are SIGKILLed and counted.
        The message and the count, not the seconds elapsed, show the timeout
        answered (no wall-clock bound: a loaded machine is slow, not wrong)."""
        daemon = await self.daemon(cgi_config(request_timeout=0.5))
        pidfile = self.pidfile()
        request = defer.ensureDeferred(get_json(
            self.client, f"{daemon.url}/cgi/test/sleep?s=30&pidfile={pidfile}"))
        pids = await self.read_pids(pidfile)
        self.assertTrue(all(process_alive(p) for p in pids))
        code, body = await request
        self.assertEqual(code, 504)
        self.assertIn("did not answer within request_timeout=0.5s", body["error"])
        await self.assert_gone(pids)  # the script and its grandchild
        await wait_for(lambda: not daemon.pool("script").running, 5, what="script reaped")
        status = daemon.supervisor.status()["services"][0]["cgi"]
        self.assertEqual((status["timeouts"], status["last_exit_codes"]), (1, ["signal 9"]))
        events = [e.message for e in daemon.supervisor.events.recent(50)
                  if e.kind == "request_timeout"]
        self.assertEqual(len(events), 1)

    async def test_cap_queue_and_overflow(self) -> None:
        """workers.max=2 scripts run at once, the next request waits in the queue
        (max 1), the one after is refused with 503 at once, and the waiting one
        runs when a script ends.  The two scripts hold their slots while their
        clients do not read, and end when the test lets them read: no script's
        sleep has to outlast the test's own steps on a loaded machine."""
        daemon = await self.daemon(cgi_config(workers="{min: 1, max: 2}",
                                              queue="{max: 1, timeout: 10}"))
        pool = daemon.pool("script")
        holders = [await self.paused_reader(daemon) for _ in range(2)]
        waiting = defer.ensureDeferred(get_json(self.client, f"{daemon.url}/cgi/test/env"))
        await wait_for(lambda: len(pool.running) == 2 and len(pool.waiting) == 1, 10,
                       what="2 running, 1 waiting")
        cgi = daemon.supervisor.status()["services"][0]["cgi"]
        self.assertEqual((cgi["in_flight"], cgi["queued"], cgi["limit"]), (2, 1, 2))
        # The queue is full: the next one is refused at once.
        response = await self.client.get(f"{daemon.url}/cgi/test/env")
        body = json.loads(await treq.content(response))
        self.assertEqual(response.code, 503)
        self.assertEqual(response.headers.getRawHeaders(b"retry-after"), [b"1"])
        self.assertIn("at capacity", body["error"])
        # Never more than 2 at once: the third starts once one of the first ends.
        self.assertFalse(waiting.called)
        self.assertEqual(len(pool.running), 2)
        await self.read_to_end(holders[0])
        code, _ = await waiting
        self.assertEqual(code, 200)
        await self.read_to_end(holders[1])
        await wait_for(lambda: not pool.running, 10, what="every script ended")
        cgi = daemon.supervisor.status()["services"][0]["cgi"]
        self.assertEqual((cgi["executions"], cgi["rejected"], cgi["in_flight"]), (3, 1, 0))

    async def test_queue_timeout_is_503(self) -> None:
        """A request that finds no slot within queue.timeout (0.3 s) gets a 503
        naming it, while the script holding the slot runs on and completes.
        The holder's client does not read until then, so the slot is surely
        still taken when the 503 comes (a script's 1.5 s sleep once had to
        outlast the test's steps: on a loaded machine the request got a slot)."""
        daemon = await self.daemon(cgi_config(workers="1", queue="{max: 4, timeout: 0.3}"))
        holder = await self.paused_reader(daemon)
        code, body = await get_json(self.client, f"{daemon.url}/cgi/test/env")
        self.assertEqual(code, 503)
        self.assertIn("no free slot for service 'script' within queue.timeout=0.3s",
                      body["error"])
        self.assertEqual(len(daemon.pool("script").running), 1, "the holder still runs")
        await self.read_to_end(holder)

    async def test_a_cgi_service_without_its_runtime_is_unavailable(self) -> None:
        daemon = await self.daemon("""
services:
  script:
    protocol: cgi
    route: /cgi/test
    runtimes:
      - {name: nothing, requires: [cgipool-no-such-interpreter], command: ["true"]}
""")
        code, body = await get_json(self.client, f"{daemon.url}/cgi/test")
        self.assertEqual((code, body["state"]), (503, "unavailable"))
        self.assertIn("no runtime installed (nothing: 'cgipool-no-such-interpreter'",
                      body["error"])
        status = daemon.supervisor.status()["services"][0]
        self.assertEqual((status["state"], status["cgi"]["executions"]), ("unavailable", 0))
        self.assertIn("cgipool-no-such-interpreter", status["reason"])

    async def test_scale_changes_the_cap(self) -> None:
        """Scaling a CGI service moves its cap of concurrent scripts (3, from
        workers.max, to 1; the old cap is returned, the status shows 1 desired);
        a size outside workers.min..max is refused."""
        daemon = await self.daemon(cgi_config(workers="{min: 1, max: 3}"))
        pool = daemon.pool("script")
        self.assertEqual(pool.limit, 3)
        self.assertEqual(pool.scale_to(1, "test"), 3)
        self.assertEqual(daemon.supervisor.status()["services"][0]["size"]["desired"], 1)
        self.assertRaises(ValueError, pool.scale_to, 4, "test")

    async def test_client_disconnect_kills_the_script(self) -> None:
        """A client that leaves takes its script (and grandchild) with it, and
        three such leaves are counted as abandoned, not failures: the service
        stays ok."""
        daemon = await self.daemon(cgi_config())
        pidfile = self.pidfile()
        sock = socket.create_connection(("127.0.0.1", daemon.port))
        sock.sendall(f"GET /cgi/test/sleep?s=30&pidfile={pidfile} HTTP/1.1\r\n"
                     f"Host: x\r\n\r\n".encode())
        pids = await self.read_pids(pidfile)
        sock.close()
        await self.assert_gone(pids)
        await wait_for(lambda: not daemon.pool("script").running, 5, what="no script")
        # Clients leaving are not the script's failures: three in a row (the
        # failing_after threshold) leave the service ok.
        for _ in range(2):
            os.unlink(pidfile)
            sock = socket.create_connection(("127.0.0.1", daemon.port))
            sock.sendall(f"GET /cgi/test/sleep?s=30&pidfile={pidfile} HTTP/1.1\r\n"
                         f"Host: x\r\n\r\n".encode())
            await self.read_pids(pidfile)
            sock.close()
            await wait_for(lambda: not daemon.pool("script").running, 5, what="no script")
        status = daemon.supervisor.status()["services"][0]
        self.assertEqual((status["state"], status["cgi"]["failures"],
                          status["cgi"]["abandoned"]), ("ok", 0, 3))

    async def test_daemon_stop_ends_running_scripts(self) -> None:
        """The daemon's stop does not wait for a running script: the proxy lets
        requests finish for up to 5 s, then the scripts get SIGTERM (python
        exits), SIGKILL after stop_timeout, and the stop returns with every
        script gone.  The script sleeps 300 s and the stop has 60 s, so the
        deadline tells "ended it" from "waited for it" with room for a loaded
        machine (it is a timeout, not a speed requirement)."""
        daemon = await self.daemon(cgi_config())
        pidfile = self.pidfile()
        request = defer.ensureDeferred(get_json(
            self.client, f"{daemon.url}/cgi/test/sleep?s=300&pidfile={pidfile}"))
        request.addErrback(lambda f: None)  # the connection may be cut
        pids = await self.read_pids(pidfile)
        stopped = defer.maybeDeferred(daemon.top.stopService)
        stopped.addTimeout(60, reactor)
        try:
            await stopped
        except defer.TimeoutError:
            self.fail("the stop waited for the script instead of ending it")
        self.assertFalse(any(process_alive(p) for p in pids))
        await request


class CgiSampleTests(CgiDaemonTestCase):
    """The shipped sample scripts through the proxy, and the status they show."""

    def services_dir(self) -> str:
        folder = os.path.abspath(self.mktemp())
        for name in ("cgi-shell", "cgi-python"):
            os.makedirs(os.path.join(folder, name))
            shutil.copy(os.path.join(ROOT, "services", name, "service.yaml"),
                        os.path.join(folder, name, "service.yaml"))
        return folder

    async def test_samples_answer_and_show_in_status(self) -> None:
        daemon = await start_daemon(self, write_config(self, "services: {}\n",
                                                       services_dir=self.services_dir()))
        client = http_client(self)
        for name, pool in daemon.supervisor.pools.items():
            self.assertIsInstance(pool, CgiPool)
            for example in pool.config.examples:
                code, body = await get_json(client, daemon.url + example.path)
                self.assertEqual(code, example.status, (example.path, body))
                self.assertIsInstance(body["pid"], int)
        code, body = await get_json(client, f"{daemon.url}/api/cgi-shell?name=tutorial")
        self.assertEqual((code, body["greeting"], body["gateway"]),
                         (200, "hello, tutorial", "CGI/1.1"))
        response = await client.post(f"{daemon.url}/api/cgi-python", data=b'{"x": [1, 2]}',
                                     headers={"Content-Type": "application/json"})
        self.assertEqual(json.loads(await treq.content(response))["echo"], {"x": [1, 2]})
        response = await client.get(f"{daemon.url}/api/cgi-python/redirect",
                                    allow_redirects=False)
        self.assertEqual(response.code, 302)
        await treq.content(response)
        code, body = await get_json(client, f"{daemon.url}/api/cgi-python/local")
        self.assertEqual((code, body["service"]), (200, "local"))

        code, status = await get_json(client, f"{daemon.admin_url}/admin/api/status")
        self.assertEqual(code, 200)
        by_name = {s["name"]: s for s in status["services"]}
        self.assertEqual(by_name["cgi-shell"]["protocol"], "cgi")
        self.assertEqual(by_name["cgi-shell"]["state"], "ok")
        self.assertEqual(by_name["cgi-shell"]["cgi"]["executions"], 3)
        self.assertEqual(by_name["cgi-python"]["cgi"]["last_exit_codes"], [0] * 7)
        text = format_status(status)
        self.assertIn("cgi-shell /api/cgi-shell — ok, cgi · up to 4 at once · 0 running\n"
                      "  CGI: 3 executions, 0 running (at most 4), 0 queued, 0 timeouts, "
                      "0 failed; last exit codes: 0 0 0", text)
        await sleep(0)
        self.assertEqual(sys.executable, daemon.pool("cgi-python").config.command[0])

        # A rolling restart has nothing to do: refused, and the card's button is off.
        response = await client.post(f"{daemon.admin_url}/admin/api/services/cgi-shell/"
                                     "rolling-restart", headers={"X-CGIPool-CSRF": "1"})
        body = json.loads(await treq.content(response))
        self.assertEqual((response.code, body["protocol"]), (409, "cgi"))
        self.assertIn("runs its CGI script once per request: nothing to restart",
                      body["error"])
        response = await client.get(f"{daemon.admin_url}/admin/")
        page = (await treq.content(response)).decode()
        card = page[page.index('data-service="cgi-shell"'):]
        end = card.index("Rolling restart</button>")
        button = card[card.rindex("<button", 0, end):end]
        self.assertIn('data-action="rolling-restart"', button)
        self.assertIn('disabled="disabled"', button)


class CgiSlowClientTests(CgiDaemonTestCase):
    """A client that reads a CGI script's streamed output slowly is governed by
    client_timeout, not by the script's request_timeout (the script is held
    back by the client, not slow itself), and loses none of the output."""

    SIZE = 8 * 1024 * 1024

    async def test_a_paused_reader_past_request_timeout_still_gets_every_byte(self) -> None:
        """Paused for 2.5 s with request_timeout 1 s (client_timeout 30 s): no 504,
        no cut, the whole body arrives once it reads again; the script is neither
        a timeout nor a failure.  (The sleep is the client's pause, at least
        2.5 s on any machine; the clocks themselves: ClientPaceTests.)"""
        daemon = await self.daemon("client_timeout: 30\n" + cgi_config(request_timeout=1))
        client = await self.paused_reader(daemon, self.SIZE)
        await sleep(2.5)  # the client's own pace: longer than request_timeout
        await self.read_to_end(client)
        pool = daemon.pool("script")
        await wait_for(lambda: not pool.running, 5, what="the execution to end")
        self.assertEqual((pool.timeouts, pool.failures), (0, 0))

    async def test_a_client_that_reads_nothing_is_cut_after_client_timeout(self) -> None:
        """A client that stops reading for client_timeout (1 s) is cut and its
        script ended, not counted as the script's request_timeout; the slot is
        free for the next request."""
        daemon = await self.daemon("client_timeout: 1\n" + cgi_config(request_timeout=60))
        client = await self.paused_reader(daemon, self.SIZE)
        pool = daemon.pool("script")
        await wait_for(lambda: not pool.running, 10, what="the execution ended by client_timeout")
        self.assertEqual(pool.timeouts, 0, "not the script's request_timeout")
        client.transport.resumeProducing()
        await wait_for(lambda: client.closed, 10, what="the cut connection")
        self.assertLess(len(client.received), self.SIZE)
        # The slot is free: the next request is answered.
        response = await self.client.get(f"{daemon.url}/cgi/test/env")
        self.assertEqual(response.code, 200)
        await treq.content(response)


class ClientPaceTests(TestCase):
    """ClientPace on a Clock: what a paused client does to the script's clocks."""

    def setUp(self) -> None:
        from types import SimpleNamespace

        from cgipool.cgi import ClientPace

        self.clock = Clock()
        calls: list[Any] = []
        self.calls = calls
        self.reader = SimpleNamespace(paused=0, resumed=0)
        self.reader.pauseProducing = lambda: setattr(self.reader, "paused",
                                                     self.reader.paused + 1)
        self.reader.resumeProducing = lambda: setattr(self.reader, "resumed",
                                                      self.reader.resumed + 1)
        execution = SimpleNamespace(
            pool=SimpleNamespace(reactor=self.clock,
                                 config=SimpleNamespace(request_timeout=10.0)),
            request=SimpleNamespace(channel=SimpleNamespace(
                site=SimpleNamespace(client_timeout=30.0))),
            answered=False, exit=None, linger=None, pipe_timer=None)
        execution.timeout = lambda: calls.append("timeout")
        execution.watch_pipes = lambda: calls.append("watch_pipes")
        execution.client_too_slow = lambda waited: calls.append(("too slow", waited))
        execution.timer = self.clock.callLater(10.0, execution.timeout)
        self.execution = execution
        self.pace = ClientPace(execution, self.reader)

    def test_a_pause_holds_request_timeout_and_quiet_pipe_checks(self) -> None:
        """Paused for longer than request_timeout: no timeout; an exited
        script's pipes are not judged quiet while nobody reads them."""
        ex = self.execution
        ex.exit = object()
        ex.linger = self.clock.callLater(0.3, lambda: self.calls.append("released"))
        self.pace.pauseProducing()
        self.assertEqual((ex.timer, ex.linger), (None, None))
        self.clock.advance(25)
        self.assertEqual(self.calls, [])
        self.pace.resumeProducing()
        self.assertEqual(self.calls, ["watch_pipes"])
        self.assertEqual(self.reader.resumed, 1)
        self.assertEqual(ex.timer.getTime(), self.clock.seconds() + 10.0,
                         "the script's clock starts afresh")
        self.clock.advance(10)
        self.assertEqual(self.calls, ["watch_pipes", "timeout"])

    def test_a_client_that_reads_nothing_for_client_timeout_is_cut(self) -> None:
        self.pace.pauseProducing()
        self.pace.pauseProducing()  # again: one clock, from the first pause
        self.clock.advance(29.9)
        self.assertEqual(self.calls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.calls, [("too slow", 30.0)])

    def test_done_leaves_no_clock_behind(self) -> None:
        """done() during a pause cancels the client_timeout timer (the pause
        held request_timeout's): no timer outlives the execution."""
        self.pace.pauseProducing()
        self.pace.done()
        self.assertEqual(self.clock.getDelayedCalls(), [])
