#!/usr/bin/env python3
"""Demo cgipool worker written in Python (standard library only).

    GET /?service=demo&data=test
    -> {"service": "demo", "data": "test", "language": "python", "pid": ..., "port": ...}

Missing parameters are ``null`` (still 200); any path other than ``/`` is a 404.
Health probe: ``/?service=health``.

Usage: app.py PORT   (or $PORT)

HTTP/1.1 keep-alive, one thread per connection (``ThreadingHTTPServer``), bound
to 127.0.0.1.  SIGTERM/SIGINT stop the server and exit with status 0.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, urlsplit

NAME = "python"
#: Largest request body read (and ignored) for POST.
MAX_BODY = 1 << 20
#: Idle keep-alive connections are closed after this many seconds.
IDLE_TIMEOUT = 60


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two send() calls: without TCP_NODELAY, Nagle
    # plus the client's delayed ACK adds ~40 ms to every keep-alive response.
    disable_nagle_algorithm = True
    server_version = "cgipool-python"
    timeout = IDLE_TIMEOUT

    def version_string(self) -> str:
        return self.server_version

    # -- helpers --------------------------------------------------------

    def _send_json(self, status: int, payload: dict, *, close: bool = False) -> None:
        payload = dict(payload)
        payload["pid"] = os.getpid()
        payload["port"] = self.server.server_address[1]
        body = (json.dumps(payload) + "\n").encode("ascii")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if close:
            self.close_connection = True
        self.send_header("Connection", "close" if self.close_connection else "keep-alive")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _read_body(self) -> bool:
        """Consume a Content-Length body so keep-alive framing stays intact."""
        if self.headers.get("Transfer-Encoding"):
            self._send_json(501, {"error": "chunked request bodies are not supported"},
                            close=True)
            return False
        raw = self.headers.get("Content-Length")
        if raw is None:
            return True
        if not raw.strip().isdigit():
            self._send_json(400, {"error": "invalid Content-Length"}, close=True)
            return False
        length = int(raw)
        if length > MAX_BODY:
            self._send_json(413, {"error": "request body too large (max 1048576 bytes)"},
                            close=True)
            return False
        if length:
            self.rfile.read(length)
        return True

    # -- methods --------------------------------------------------------

    def do_GET(self) -> None:
        if not self._read_body():
            return
        parts = urlsplit(self.path)
        if parts.path != "/":
            self._send_json(404, {"error": f"not found: {parts.path} (this worker only serves /)"})
            return
        params: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            params.setdefault(key, value)
        self._send_json(200, {
            "service": params.get("service"),
            "data": params.get("data"),
            "language": "python",
        })

    do_HEAD = do_GET
    do_POST = do_GET

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """JSON instead of the default HTML error page (bad request line, 501, ...)."""
        try:
            short = HTTPStatus(code).phrase
        except ValueError:
            short = "error"
        if code == 501 and getattr(self, "command", None):
            code = 405
            message = f"method {self.command} not allowed (use GET, HEAD or POST)"
        # The request could not be parsed: do not trust the rest of the stream.
        self.close_connection = True
        # An unparseable request line leaves request_version at "HTTP/0.9", which
        # would make the base class drop the status line and headers.
        if getattr(self, "request_version", "HTTP/0.9") == "HTTP/0.9":
            self.request_version = "HTTP/1.0"
        if not hasattr(self, "command") or self.command is None:
            self.command = ""
        self._send_json(code, {"error": message or short}, close=True)

    def log_message(self, format: str, *args) -> None:  # noqa: A002
        """No per-request access log (the daemon keeps its own)."""


class Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True
    request_queue_size = 1024

    def handle_error(self, request, client_address) -> None:
        """Client disconnects mid-request are normal; keep stderr quiet."""
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            return
        super().handle_error(request, client_address)


def parse_port(argv: list[str]) -> int:
    raw = argv[1] if len(argv) > 1 else os.environ.get("PORT")
    if raw is None or not raw.isdigit() or not 0 <= int(raw) <= 65535:
        print(f"{NAME}: usage: {argv[0]} PORT   (or set $PORT); got {raw!r}", file=sys.stderr)
        sys.exit(2)
    return int(raw)


def main(argv: list[str]) -> int:
    port = parse_port(argv)
    stop = threading.Event()
    received: list[int] = []

    def on_signal(signum, frame) -> None:
        received.append(signum)
        stop.set()

    # Installed before anything slow so an early SIGTERM still exits with 0.
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    try:
        server = Server(("127.0.0.1", port), Handler)
    except OSError as e:
        print(f"{NAME}: cannot bind 127.0.0.1:{port}: {e.strerror or e}", file=sys.stderr)
        return 1

    # serve_forever runs in a thread: shutdown() must not be called from the
    # thread running serve_forever (it would deadlock), so the main thread only
    # waits for a signal and then stops the loop.
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                              name="serve_forever", daemon=True)
    thread.start()
    print(f"{NAME}: listening on 127.0.0.1:{server.server_address[1]} pid={os.getpid()}",
          file=sys.stderr, flush=True)

    while not stop.wait(0.5):
        pass
    name = signal.Signals(received[0]).name if received else "signal"
    print(f"{NAME}: {name} received, exiting pid={os.getpid()}", file=sys.stderr, flush=True)
    server.shutdown()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
