#!/usr/bin/env python3
"""A test worker with configurable bad habits.

    misbehaving.py PORT [--ignore-term] [--grandchild PIDFILE] [--say TEXT]

--ignore-term    ignore SIGTERM (the supervisor must SIGKILL it)
--grandchild F   start `sleep 300` in the background and write its pid to F
--say TEXT       print TEXT on stdout and stderr once listening
"""

import argparse
import json
import os
import signal
import subprocess
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self) -> None:
        body = json.dumps({"pid": os.getpid(), "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--grandchild")
    parser.add_argument("--say")
    args = parser.parse_args()
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if args.grandchild:
        child = subprocess.Popen(["sleep", "300"])
        with open(args.grandchild, "w") as f:
            f.write(str(child.pid))
    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    if args.say:
        print(args.say, flush=True)
        print(args.say, file=sys.stderr, flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
