"""Worker port allocation from the configured range, skipping ports in use."""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a worker could bind ``host:port`` right now (with SO_REUSEADDR,
    as the workers do, so connections in TIME_WAIT do not count as in use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
                return False
            raise
    return True


class PortsExhausted(Exception):
    """Every port of the range is allocated or in use."""


class PortAllocator:
    """Hands out distinct free ports from ``[low, high]``.

    Ports are checked for being free at allocation time; a port keeps being
    reserved for its worker slot until released, so two services never race for
    the same one.
    """

    def __init__(self, low: int, high: int, reserved: set[int] | None = None,
                 is_free: Callable[[int], bool] = port_is_free) -> None:
        self.low = low
        self.high = high
        self._is_free = is_free
        self._taken: set[int] = set(reserved or ())
        self._next = low

    def allocate(self) -> int:
        size = self.high - self.low + 1
        for _ in range(size):
            port = self._next
            self._next = self.low if port >= self.high else port + 1
            if port not in self._taken and self._is_free(port):
                self._taken.add(port)
                return port
        raise PortsExhausted(
            f"no free port left in {self.low}-{self.high} "
            f"({len(self._taken)} allocated to workers)"
        )

    def release(self, port: int) -> None:
        self._taken.discard(port)

    def reserve(self, port: int) -> None:
        """Keep ``port`` (an explicitly configured one) out of allocation."""
        self._taken.add(port)
