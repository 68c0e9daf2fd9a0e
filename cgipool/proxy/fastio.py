"""Eager writes for the proxy's TCP connections.

Twisted's TCP transport queues every ``write`` and sends it on the next
reactor turn, after registering the socket for writability and before
unregistering it again: per response that is two ``epoll_ctl`` calls, one
more trip through the reactor and the latency of one loop iteration.  On
the proxy's hot path each request makes exactly two writes (the request to
the worker, the response to the client), so :func:`eager_writes` switches a
connection to a transport class that calls ``send()`` at once when nothing
is queued, and falls back to Twisted's buffering (and so its backpressure,
producers and error handling) for whatever the kernel does not take.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from twisted.internet import tcp


class _EagerWrites:
    """Mixin for a :class:`twisted.internet.tcp.Connection` subclass."""

    def write(self, data: bytes) -> None:
        # Only with nothing queued and no pull producer (doWrite drives those;
        # a streaming one, such as twisted.web's HTTPChannel, is paused by the
        # buffered path below when the kernel takes less than all).
        if (not self._tempDataBuffer and self.offset == len(self.dataBuffer)  # type: ignore
                and (self.producer is None or self.streamingProducer)  # type: ignore
                and self.connected  # type: ignore
                and not self.disconnecting and not self.TLS  # type: ignore
                and not self._writeDisconnecting and not self._writeDisconnected  # type: ignore
                and type(data) is bytes):
            try:
                sent = self.socket.send(data)  # type: ignore
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # queued below: the next doWrite reports the error as usual
            if sent == len(data):
                return
            data = data[sent:]
        super().write(data)  # type: ignore[misc]

    def writeSequence(self, iovec: Iterable[bytes]) -> None:
        self.write(b"".join(iovec))


_CLASSES: dict[type, type] = {}


def eager_writes(transport: Any) -> None:
    """Make ``transport`` (a plain TCP connection; others are left alone) send
    writes immediately when its buffer is empty."""
    cls = type(transport)
    eager = _CLASSES.get(cls)
    if eager is None:
        if not issubclass(cls, tcp.Connection) or issubclass(cls, _EagerWrites):
            return
        eager = _CLASSES[cls] = type("Eager" + cls.__name__, (_EagerWrites, cls), {})
    if getattr(transport, "TLS", False):
        return
    transport.__class__ = eager
