"""The live stream of the dashboard: Server-Sent Events at ``/admin/api/events``.

About once a second every client gets ``event: status`` with the whole
snapshot (built and serialised once per tick, whatever the number of
clients); every pool event is pushed as it happens as ``event: event`` with
its sequence number as the SSE ``id``, so a reconnecting browser
(``Last-Event-ID``) receives what it missed from the event log.

A client that does not read is not buffered without end: while its
connection pushes back, snapshots are skipped (it gets the newest one when
it resumes) and after ``stall_timeout`` seconds it is disconnected.

Slots are capped in total (``max_clients``: 503) and per client address
(``max_per_client``: 429), so one client — a script, a runaway tab reloading
— cannot take every slot and lock the other dashboards out.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from cgipool.admin.auth import client_ip
from cgipool.events import Event, EventLog

log = Logger(namespace="cgipool.admin")


@implementer(IPushProducer)
class _Client:
    """One connected browser; also the producer twisted.web pauses."""

    def __init__(self, request: Any, clock: Any) -> None:
        self.request = request
        self.clock = clock
        #: Whose slot this is (the per-client cap counts these).
        self.address = _address(request)
        self.paused_at: float | None = None
        #: False once the connection is gone (``request.notifyFinish()``, or the
        #: subscription cancelled because of it): nothing more to tell it.
        self.connected = True
        request.notifyFinish().addBoth(self.gone)

    def gone(self, _: object = None) -> None:
        self.connected = False

    def pauseProducing(self) -> None:
        if self.paused_at is None:
            self.paused_at = self.clock.seconds()

    def resumeProducing(self) -> None:
        self.paused_at = None

    def stopProducing(self) -> None:
        pass


class EventStream:
    """Broadcasts snapshots and events to every subscribed SSE client."""

    def __init__(self, clock: Any, snapshot: Callable[[], dict[str, Any]], events: EventLog,
                 interval: float = 1.0, max_clients: int = 64,
                 stall_timeout: float = 30.0, max_per_client: int = 8) -> None:
        self.clock = clock
        self.snapshot = snapshot
        self.events = events
        self.interval = interval
        self.max_clients = max_clients
        self.max_per_client = max_per_client
        self.stall_timeout = stall_timeout
        self.clients: list[_Client] = []
        self._loop = LoopingCall(self._tick)
        self._loop.clock = clock
        self._unsubscribe: Callable[[], None] | None = None

    def start(self) -> None:
        self._unsubscribe = self.events.subscribe(self._event)
        self._loop.start(self.interval, now=False)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        for client in list(self.clients):
            self._drop(client)
            if client.connected:
                client.request.channel.loseConnection()

    @property
    def full(self) -> bool:
        return len(self.clients) >= self.max_clients

    def refusal(self, request: Any) -> tuple[int, str] | None:
        """Why ``request`` may not subscribe now: (503, …) when every slot is
        taken, (429, …) when its address holds ``max_per_client``; else None."""
        if self.full:
            return 503, "too many live dashboard connections"
        address = _address(request)
        held = sum(1 for client in self.clients if client.address == address)
        if held >= self.max_per_client:
            return 429, (f"too many live dashboard connections from {address} "
                         f"({held}; at most {self.max_per_client} per client)")
        return None

    def subscribe(self, request: Any, last_event_id: int | None = None) -> Deferred[None]:
        """Start streaming to ``request``; the Deferred is cancelled when it goes."""
        client = _Client(request, self.clock)

        def cancelled(d: Deferred[None]) -> None:
            client.gone()  # Klein cancels the subscription when the client has left
            self._drop(client)

        done: Deferred[None] = Deferred(cancelled)
        request.setHeader(b"content-type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        request.setHeader(b"x-accel-buffering", b"no")
        request.registerProducer(client, True)
        self.clients.append(client)
        lines = [b"retry: 2000\n\n"]
        if last_event_id is not None:
            lines += [_event_message(e) for e in self.events if e.seq > last_event_id]
        lines.append(_message(b"status", json.dumps(self.snapshot()).encode()))
        request.write(b"".join(lines))
        return done

    def _drop(self, client: _Client) -> None:
        if client in self.clients:
            self.clients.remove(client)
            if client.connected:
                try:
                    client.request.unregisterProducer()
                except RuntimeError:
                    pass

    def _tick(self) -> None:
        if not self.clients:
            return
        try:
            payload = _message(b"status", json.dumps(self.snapshot()).encode())
        except Exception:
            log.failure("cannot build the dashboard snapshot")
            return
        now = self.clock.seconds()
        for client in list(self.clients):
            if client.paused_at is not None:
                if now - client.paused_at > self.stall_timeout:
                    self._drop(client)
                    client.request.channel.loseConnection()
                continue
            client.request.write(payload)

    def _event(self, event: Event) -> None:
        if not self.clients:
            return
        message = _event_message(event)
        for client in list(self.clients):
            if client.paused_at is None:
                client.request.write(message)


def _address(request: Any) -> str:
    """The client's address as the per-client cap counts it (IPv4-mapped as IPv4)."""
    address = client_ip(request)
    return str(address) if address is not None else "unknown"


def _message(kind: bytes, data: bytes) -> bytes:
    return b"event: " + kind + b"\ndata: " + data + b"\n\n"


def _event_message(event: Event) -> bytes:
    data = json.dumps(event.as_dict()).encode()
    return b"id: %d\n" % event.seq + _message(b"event", data)

