"""``make chaos``: well-formed traffic must not notice an attack and a chaos monkey.

For ``--seconds`` (default 30) against one cgipool daemon on 127.0.0.1:

- well-formed GETs on 16 keep-alive connections (cgipool's stress test);
- a random worker SIGKILLed every 300 ms;
- malformed requests back to back (smuggling attempts, bad chunking, huge
  heads, NUL bytes, dot-segment paths, TLS and binary garbage), each on its own
  connection;
- slow clients (slowloris: a header byte every half second) and clients
  that vanish mid-request.

Reports the well-formed requests answered and failed (must be 0), the answers
the malformed requests got, and the daemon's RSS and open descriptors before
and after (after the attack stops and a few seconds pass: no growth).  Writes
``bench/results/chaos.md``; exit status 1 when a well-formed request failed or
RSS/fds grew.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import random
import signal
import sys
import time
from typing import Any

import psutil
from twisted.internet import defer, protocol, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from elastic import ROOT, Bench  # noqa: E402

#: A fixed-size pool (no autoscaling) so that RSS and descriptors compare like for like.
CONFIG = """\
listen: "tcp:{port}:interface=127.0.0.1"
admin: {{listen: "tcp:{admin_port}:interface=127.0.0.1"}}
base_dir: {root}
port_range: "{low}-{high}"
services:
  search:
    command: ["build/search.cgi", "{{port}}"]
    route: /api/search
    workers: 3
    concurrency: 16
    health: {{path: "/?q=health", interval: 1, timeout: 1, fall: 2}}
    env: {{GENERATION: "{generation}", COOLDOWN: "{cooldown}"}}
"""

MALFORMED = [
    b"POST /api/search HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked"
    b"\r\n\r\n0\r\n\r\nGET /admin/api/status HTTP/1.1\r\nHost: h\r\n\r\n",
    b"POST /api/search HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\nContent-Length: 30\r\n\r\nabc",
    b"POST /api/search HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    b"POST /api/search HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n",
    b"POST /api/search HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffffffffff\r\n",
    b"GET /api/search?" + b"a" * 20000 + b" HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /api/search HTTP/1.1\r\nHost: h\r\nX: " + b"b" * 20000 + b"\r\n\r\n",
    b"GET /api/search HTTP/1.1\r\nHost: h\r\n" + b"X-A: 1\r\n" * 600 + b"\r\n",
    b"GET /api/search HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",
    b"GET /api/search/../../admin/api/status HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET /api/search/%2e%2e/%2e%2e/admin HTTP/1.1\r\nHost: h\r\n\r\n",
    b"GET http://evil/api/search HTTP/1.1\r\nHost: h\r\n\r\n",
    b"CONNECT evil:443 HTTP/1.1\r\nHost: evil\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)),
    b"GET /api/search HTTP/1.1\r\nHost: h\r\nX-A: v\r\n  folded\r\n\r\n",
    b"POST /api/search HTTP/1.1\r\nHost: h\r\nContent-Length: 999999999999\r\n\r\nx",
]


class Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.data = bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data.extend(data)

    def connectionLost(self, reason: Any) -> None:
        if not self.done.called:
            self.done.callback(bytes(self.data))


async def one_malformed(reactor: Any, port: int, data: bytes) -> str:
    """Send one malformed request; its answer's status (the attacker leaves then)."""
    proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Collect())
    proto.transport.write(data)
    deadline = time.time() + 12  # past the daemon's 10 s head deadline (408)
    while not proto.done.called and b"\r\n\r\n" not in proto.data and time.time() < deadline:
        await task.deferLater(reactor, 0.01, lambda: None)
    proto.transport.abortConnection()
    answer = await proto.done
    return answer[9:12].decode("latin-1") if answer.startswith(b"HTTP/1.1 ") else "closed"


async def slow_client(reactor: Any, port: int, until: float) -> str:
    proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Collect())
    head = b"GET /api/search?q=slow HTTP/1.1\r\nHost: h\r\nX-Slow: " + b"s" * 100
    for byte in head:
        if proto.done.called or time.time() > until:
            break
        proto.transport.write(bytes([byte]))
        await task.deferLater(reactor, 0.5, lambda: None)
    if not proto.done.called:
        proto.transport.abortConnection()
    answer = await proto.done
    return answer[9:12].decode("latin-1") if answer.startswith(b"HTTP/1.1 ") else "closed"


async def vanishing_client(reactor: Any, port: int) -> str:
    proto = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), Collect())
    proto.transport.write(b"POST /api/search?q=gone HTTP/1.1\r\nHost: h\r\nContent-Length: 100"
                          b"\r\n\r\nhalf a body")
    await task.deferLater(reactor, 0.05, lambda: None)
    proto.transport.abortConnection()
    await proto.done
    return "vanished"


def footprint(pid: int) -> tuple[int, int]:
    p = psutil.Process(pid)
    return p.memory_info().rss, p.num_fds()


async def main(reactor: Any, args: argparse.Namespace) -> int:
    bench = Bench(reactor, quick=args.seconds < 10, config=CONFIG)
    answers: collections.Counter[str] = collections.Counter()
    try:
        await bench.start()
        assert bench.process is not None
        pid = bench.process.pid
        port = bench.port
        warm, _ = bench.load("/api/search?q=warm", 16, 3)
        await warm
        await task.deferLater(reactor, 1.0, lambda: None)
        rss0, fds0 = footprint(pid)
        print(f"chaos for {args.seconds:g} s on {bench.url}: daemon pid {pid}, "
              f"RSS {rss0 >> 20} MiB, {fds0} fds", flush=True)
        until = time.time() + args.seconds
        good, runs = bench.load("/api/search?q=chaos", 16, args.seconds)
        rng = random.Random(11)

        async def monkey() -> int:
            kills = 0
            while time.time() < until:
                await task.deferLater(reactor, 0.3, lambda: None)
                status = await bench.status()
                alive = [w["pid"] for w in status["workers"] if w["pid"]]
                if alive:
                    try:
                        os.kill(rng.choice(alive), signal.SIGKILL)
                        kills += 1
                    except ProcessLookupError:
                        pass
            return kills

        async def attacker() -> None:
            while time.time() < until:
                answers[await one_malformed(reactor, port, rng.choice(MALFORMED))] += 1

        async def slow() -> None:
            while time.time() < until:
                answers["slowloris " + await slow_client(reactor, port, until)] += 1

        async def vanish() -> None:
            while time.time() < until:
                answers[await vanishing_client(reactor, port)] += 1

        jobs = [defer.ensureDeferred(monkey())]
        jobs += [defer.ensureDeferred(attacker()) for _ in range(4)]
        jobs += [defer.ensureDeferred(slow()) for _ in range(20)]
        jobs += [defer.ensureDeferred(vanish())]
        kills = (await defer.gatherResults(jobs))[0]
        result = await good
        # Settle, then the same warm-up load as before measuring "before".
        await bench.wait(lambda s: s["size"]["ready"] == 3, 30, "the pool healed")
        await task.deferLater(reactor, 2.0, lambda: None)
        warm, _ = bench.load("/api/search?q=warm", 16, 3)
        await warm
        await task.deferLater(reactor, 1.0, lambda: None)
        rss1, fds1 = footprint(pid)
    finally:
        await bench.client.close()
        bench.stop()
    rss_growth = rss1 - rss0
    rows = [
        ("well-formed requests answered", f"{result.requests - result.failed}"),
        ("well-formed requests failed", f"{result.failed}"),
        ("worker kills (kill -9 every 300 ms)", f"{kills}"),
        ("malformed / slow / vanishing requests", ", ".join(
            f"{k}: {v}" for k, v in sorted(answers.items()))),
        ("daemon RSS before -> after", f"{rss0 >> 20} MiB -> {rss1 >> 20} MiB"
                                        f" ({rss_growth / (1 << 20):+.1f} MiB)"),
        ("daemon open fds before -> after", f"{fds0} -> {fds1}"),
    ]
    for what, value in rows:
        print(f"  {what:<40} {value}")
    lines = [
        "# cgipool under attack and chaos",
        "",
        f"{datetime.datetime.now().isoformat(timespec='seconds')} · `make chaos` "
        f"(bench/chaos.py, {args.seconds:g} s) · C search workers · 127.0.0.1",
        "",
        "| measurement | result |",
        "|---|---|",
        *[f"| {what} | {value} |" for what, value in rows],
        "",
    ]
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines))
    print(f"written to {args.out}")
    bad = result.failed or result.requests == 0 or fds1 > fds0 + 5 or rss_growth > 16 << 20
    return 1 if bad else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "chaos.md"))
    arguments = parser.parse_args()

    async def run(reactor: Any) -> None:
        code = await main(reactor, arguments)
        if code:
            raise SystemExit(code)

    task.react(lambda r: defer.ensureDeferred(run(r)))
