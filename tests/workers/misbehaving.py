#!/usr/bin/env python3
"""A test worker with configurable bad habits.

    misbehaving.py PORT [--ignore-term] [--grandchild PIDFILE] [--escape PIDFILE]
                        [--say TEXT] [--flood] [--wrong-port] [--exit-at-once CODE]

--ignore-term    ignore SIGTERM (the supervisor must SIGKILL it)
--grandchild F   start `sleep 300` in the background and write its pid to F
--escape F       start `sleep 300` in its own session through a parent that exits
                 at once (a daemonizing helper: an orphan while the worker lives),
                 holding the worker's stdout; write its pid to F
--say TEXT       print TEXT on stdout and stderr once listening
--flood          once listening, write to stdout without end (long lines, no pause)
--wrong-port     listen on some other port than PORT (never ready)
--exit-at-once C exit with status C before listening (a crash loop)
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
        body = json.dumps({"pid": os.getpid(), "path": self.path,
                           "headers": [[k, v] for k, v in self.headers.items()]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.do_GET()

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("port", type=int)
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument("--grandchild")
    parser.add_argument("--escape")
    parser.add_argument("--say")
    parser.add_argument("--flood", action="store_true")
    parser.add_argument("--wrong-port", action="store_true")
    parser.add_argument("--exit-at-once", type=int)
    args = parser.parse_args()
    if args.exit_at_once is not None:
        sys.exit(args.exit_at_once)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    if args.grandchild:
        child = subprocess.Popen(["sleep", "300"])
        with open(args.grandchild, "w") as f:
            f.write(str(child.pid))
    if args.escape:
        subprocess.run([sys.executable, "-c",
                        "import subprocess, sys\n"
                        "p = subprocess.Popen(['sleep', '300'], start_new_session=True)\n"
                        "open(sys.argv[1] + '.tmp', 'w').write(str(p.pid))\n",
                        args.escape], check=True)
        os.rename(args.escape + ".tmp", args.escape)
    port = 0 if args.wrong_port else args.port  # 0: some other port
    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    server.daemon_threads = True
    if args.say:
        print(args.say, flush=True)
        print(args.say, file=sys.stderr, flush=True)
    if args.flood:
        import threading

        def flood() -> None:
            line = ("x" * 20000 + "\n").encode()
            out = sys.stdout.buffer
            while True:
                out.write(line)
                out.write(b"short line\n" * 50)
                out.flush()

        threading.Thread(target=flood, daemon=True).start()
    server.serve_forever()


if __name__ == "__main__":
    main()
