"""A bulk-data worker for the body benchmarks of ``make bench`` (stdlib only).

``python bench/blob.py PORT``:

* ``GET /?bytes=N``  -- N bytes of zeros with a Content-Length, written in
  1 MiB pieces (``GET /?q=...`` without ``bytes`` answers small JSON: health);
* ``POST /`` with a body -- reads it in 1 MiB pieces and answers
  ``{"received": N, "pid": ...}``.
"""

from __future__ import annotations

import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PIECE = 1 << 20
ZEROS = bytes(PIECE)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: one line per request would be the cost measured

    def _json(self, data: dict[str, object]) -> None:
        body = json.dumps({**data, "pid": os.getpid()}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        if "bytes" not in query:
            self._json({"ok": True})
            return
        size = int(query["bytes"][0])
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(size))
        self.end_headers()
        view = memoryview(ZEROS)
        left = size
        while left > 0:
            n = min(left, PIECE)
            self.wfile.write(view[:n])
            left -= n

    def do_POST(self) -> None:
        left = int(self.headers.get("Content-Length") or 0)
        received = 0
        while left > 0:
            data = self.rfile.read(min(left, PIECE))
            if not data:
                break
            received += len(data)
            left -= len(data)
        self._json({"received": received})


def main() -> int:
    port = int(sys.argv[1] if len(sys.argv) > 1 else os.environ["PORT"])
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
