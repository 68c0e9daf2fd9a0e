"""The capacity checks of ``make bench``: idle keep-alive clients and 1 GB bodies.

Plain blocking sockets against the cgipool daemon on loopback; the daemon's
resident memory is read from ``/proc/PID/status`` (sampled every 20 ms
while a body moves).
"""

from __future__ import annotations

import resource
import socket
import threading
import time
from typing import Any

PIECE = 1 << 20


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


class PeakRss:
    """Samples a process's RSS in a thread until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.02) -> None:
        self.pid = pid
        self.interval = interval
        self.peak = rss(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak = max(self.peak, rss(self.pid))
            except (OSError, RuntimeError):
                return

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        try:
            self.peak = max(self.peak, rss(self.pid))
        except (OSError, RuntimeError):
            pass


def _read_head(sock: socket.socket) -> tuple[int, dict[bytes, bytes], bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError(f"connection closed inside the response head: {buf[:200]!r}")
        buf += data
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, rest


def _read_response(sock: socket.socket) -> tuple[int, bytes]:
    status, headers, body = _read_head(sock)
    length = int(headers.get(b"content-length", b"0"))
    while len(body) < length:
        data = sock.recv(65536)
        if not data:
            raise ConnectionError("connection closed inside the response body")
        body += data
    return status, body


def idle_connections(host: str, port: int, pid: int, count: int, path: bytes,
                     hold: float = 2.0, batch: int = 100) -> dict[str, Any]:
    """Open ``count`` keep-alive connections, one request each, and hold them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < count + 256:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, count + 256), hard))
    request = b"GET %s HTTP/1.1\r\nHost: bench\r\n\r\n" % path
    before = rss(pid)
    socks: list[socket.socket] = []
    started = time.perf_counter()
    try:
        while len(socks) < count:
            group = []
            for _ in range(min(batch, count - len(socks))):
                s = socket.create_connection((host, port), timeout=10)
                s.sendall(request)
                group.append(s)
            for s in group:
                status, _ = _read_response(s)
                if status != 200:
                    raise RuntimeError(f"status {status} on idle connection {len(socks)}")
                socks.append(s)
        opened = time.perf_counter() - started
        time.sleep(hold)
        held_rss = rss(pid)
        alive = 0
        for s in socks:
            s.setblocking(False)
            try:
                if s.recv(1) == b"":
                    continue  # closed by the daemon
            except BlockingIOError:
                alive += 1
        # The daemon still serves a new client while holding them all.
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(request)
            status, _ = _read_response(s)
    finally:
        for s in socks:
            s.close()
    return {"connections": count, "alive": alive, "open_seconds": opened,
            "rss_before": before, "rss": held_rss, "fresh_status": status}


def big_response(host: str, port: int, pid: int, path: bytes, size: int,
                 pause: float = 1.0) -> dict[str, Any]:
    """Download ``size`` bytes, pausing mid-way (the daemon must stop reading
    the worker, not buffer); the daemon's RSS growth is the peak over before."""
    before = rss(pid)
    received = 0
    started = time.perf_counter()
    with PeakRss(pid) as peak, socket.create_connection((host, port), timeout=30) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: bench\r\n\r\n" % path)
        status, headers, rest = _read_head(s)
        received = len(rest)
        buf = bytearray(PIECE)
        paused = False
        while received < size:
            n = s.recv_into(buf)
            if not n:
                break
            received += n
            if not paused and received > size // 4:
                paused = True
                time.sleep(pause)
    elapsed = time.perf_counter() - started
    return {"status": status, "bytes": received, "size": size, "seconds": elapsed,
            "rss_before": before, "rss_peak": peak.peak, "growth": peak.peak - before}


def big_upload(host: str, port: int, pid: int, path: bytes, size: int) -> dict[str, Any]:
    """POST ``size`` bytes; the worker answers how many it got."""
    before = rss(pid)
    piece = bytes(PIECE)
    started = time.perf_counter()
    with PeakRss(pid) as peak, socket.create_connection((host, port), timeout=120) as s:
        s.sendall(b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream"
                  b"\r\nContent-Length: %d\r\n\r\n" % (path, size))
        left = size
        while left > 0:
            n = min(left, PIECE)
            s.sendall(piece[:n] if n < PIECE else piece)
            left -= n
        status, body = _read_response(s)
    elapsed = time.perf_counter() - started
    return {"status": status, "body": body[:200].decode("latin-1"), "size": size,
            "seconds": elapsed, "rss_before": before, "rss_peak": peak.peak,
            "growth": peak.peak - before}
