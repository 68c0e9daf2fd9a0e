"""The bounded per-service queue, passive health and recycling hooks of the proxy,
with scripted workers on real loopback sockets."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol

from cgipool.config import QueueConfig
from tests.support import wait_for
from tests.test_proxy import CLOSE, ProxyTestCase, ScriptedConnection, ok_json, split_response

GET = b"GET /api/svc?n=%d HTTP/1.1\r\nHost: h\r\n" + CLOSE + b"\r\n"


class HeldWorker:
    """A worker that answers only when the test says so."""

    def __init__(self) -> None:
        self.held: list[tuple[bytes, ScriptedConnection]] = []

    def __call__(self, head: bytes, body: bytes, conn: ScriptedConnection) -> None:
        self.held.append((head, conn))

    def release(self, n: int = 1) -> list[bytes]:
        heads = []
        for _ in range(n):
            head, conn = self.held.pop(0)
            heads.append(head.split(b"\r\n")[0])
            conn.transport.write(ok_json(target=head.split(b" ")[1].decode()))
        return heads


class QueueTests(ProxyTestCase):
    async def setup_held(self, **config: Any) -> tuple[HeldWorker, Any, int]:
        held = HeldWorker()
        _, wport = await self.start_worker(held)
        worker = self.worker_for(wport)
        config.setdefault("concurrency", 2)
        pool, port = await self.start_proxy([worker], **config)
        pool.accepting = True
        return held, worker, port

    def send(self, port: int, n: int, **kw: Any) -> defer.Deferred[bytes]:
        return defer.ensureDeferred(self.raw(port, GET % n, **kw))

    async def test_requests_beyond_concurrency_wait_and_go_in_order(self) -> None:
        held, worker, port = await self.setup_held()
        replies = [self.send(port, n) for n in range(5)]
        await wait_for(lambda: len(held.held) == 2 and self.pool.queue_length == 3, 5,
                       what="2 at the worker, 3 waiting")
        self.assertEqual(worker.in_flight, 2)
        order = held.release(2)
        await wait_for(lambda: len(held.held) == 2, 5, what="the next two dispatched")
        order += held.release(2)
        await wait_for(lambda: len(held.held) == 1, 5, what="the last one dispatched")
        order += held.release(1)
        results = [split_response(r) for r in await defer.gatherResults(replies)]
        self.assertEqual([s for s, _, _ in results], [200] * 5)
        self.assertEqual(order, [b"GET /?n=%d HTTP/1.1" % n for n in range(5)])
        self.assertEqual((worker.in_flight, self.pool.queue_length), (0, 0))

    async def test_full_queue_answers_503_at_once_with_retry_after(self) -> None:
        held, _, port = await self.setup_held(queue=QueueConfig(max=1, timeout=30))
        waiting = [self.send(port, n) for n in range(3)]
        await wait_for(lambda: self.pool.queue_length == 1, 5, what="one waiting")
        status, headers, body = split_response(await self.raw(port, GET % 9))
        self.assertEqual(status, 503)
        self.assertEqual(headers[b"retry-after"], [b"1"])
        self.assertIn("1 requests are already waiting", json.loads(body)["error"])
        held.release(2)
        await wait_for(lambda: len(held.held) == 1, 5, what="the waiting one dispatched")
        held.release(1)
        self.assertEqual([split_response(r)[0] for r in await defer.gatherResults(waiting)],
                         [200] * 3)

    async def test_queue_timeout_is_503_and_nothing_reaches_the_worker(self) -> None:
        held, worker, port = await self.setup_held(concurrency=1,
                                                   queue=QueueConfig(max=10, timeout=0.2))
        busy = self.send(port, 0)
        await wait_for(lambda: len(held.held) == 1, 5, what="the worker busy")
        status, headers, body = split_response(await self.raw(port, GET % 1))
        self.assertEqual(status, 503)
        self.assertEqual(headers[b"retry-after"], [b"1"])
        self.assertIn("queue.timeout=0.2s", json.loads(body)["error"])
        self.assertEqual(self.pool.queue_length, 0)
        held.release(1)
        self.assertEqual(split_response(await busy)[0], 200)
        self.assertEqual(len(held.held), 0)

    async def test_client_leaving_the_queue_frees_its_place(self) -> None:
        """A client that hangs up while queued gives its place up: the queue empties and
        its request is never sent to the worker."""
        held, _, port = await self.setup_held(concurrency=1)
        busy = self.send(port, 0)
        await wait_for(lambda: len(held.held) == 1, 5, what="the worker busy")
        gone: defer.Deferred[None] = defer.Deferred()

        class Leaving(Protocol):
            def connectionLost(self, reason: Any) -> None:
                gone.callback(None)

        leaving = await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port),
                                        Leaving())
        leaving.transport.write(GET % 1)
        await wait_for(lambda: self.pool.queue_length == 1, 5, what="the request waiting")
        leaving.transport.loseConnection()  # gives up while waiting
        await gone
        await wait_for(lambda: self.pool.queue_length == 0, 5, what="the queue to empty")
        self.assertEqual(len(self.proxy.exchanges), 1)
        held.release(1)
        await busy
        self.assertEqual(held.held, [], "the abandoned request was never sent")

    async def test_a_worker_joining_the_rotation_takes_waiting_requests(self) -> None:
        held = HeldWorker()
        _, wport = await self.start_worker(held)
        newcomer = self.worker_for(wport)
        pool, port = await self.start_proxy([], concurrency=1)
        pool.accepting = True  # a worker is starting
        waiting = self.send(port, 7)
        await wait_for(lambda: pool.queue_length == 1, 5, what="the request waiting")
        pool.add_ready(newcomer)
        await wait_for(lambda: len(held.held) == 1, 5, what="the request dispatched")
        held.release(1)
        self.assertEqual(split_response(await waiting)[0], 200)

    async def test_daemon_stop_answers_waiting_requests(self) -> None:
        """On shutdown a queued request is answered 503 "shutting down" at once rather
        than left hanging, while the one already at the worker still completes."""
        held, _, port = await self.setup_held(concurrency=1)
        busy = self.send(port, 0)
        waiting = self.send(port, 1)
        await wait_for(lambda: self.pool.queue_length == 1, 5, what="one waiting")
        self.proxy.stop()
        status, _, body = split_response(await waiting)
        self.assertEqual(status, 503)
        self.assertIn("shutting down", json.loads(body)["error"])
        await busy
        self.assertEqual(self.pool.queue_length, 0)


class WorkerVerdictTests(ProxyTestCase):
    async def test_broken_responses_count_against_the_worker_and_success_resets(self) -> None:
        answers = [b"garbage\r\n\r\n", ok_json(), b"garbage\r\n\r\n"]
        _, wport = await self.start_worker(lambda h, b, c: answers.pop(0))
        worker = self.worker_for(wport)
        pool, port = await self.start_proxy([worker])
        await self.raw(port, GET % 0)
        self.assertEqual(pool.failed, [(worker, "bad_response")])
        await self.raw(port, GET % 1)
        self.assertEqual(worker.passive_failures, 0)
        await self.raw(port, GET % 2)
        self.assertEqual(len(pool.failed), 2)

    async def test_timeout_names_the_request_to_the_pool(self) -> None:
        _, wport = await self.start_worker(lambda h, b, c: None)
        worker = self.worker_for(wport)
        pool, port = await self.start_proxy([worker], request_timeout=0.2)
        raw = await self.raw(port, b"GET /api/svc/slow?x=1 HTTP/1.1\r\nHost: h\r\n"
                                   + CLOSE + b"\r\n")
        self.assertEqual(split_response(raw)[0], 504)
        self.assertEqual(pool.timed_out, [(worker, "GET /api/svc/slow?x=1")])

    async def test_max_requests_recycles_once(self) -> None:
        """A worker that has served its request limit is reported for recycling once,
        not again on every later request, with the count as reason; no request fails."""
        _, wport = await self.start_worker(lambda h, b, c: ok_json())
        worker = self.worker_for(wport)
        worker.recycle_at = 3
        pool, port = await self.start_proxy([worker])
        for n in range(5):
            self.assertEqual(split_response(await self.raw(port, GET % n))[0], 200)
        self.assertEqual(len(pool.recycled), 1)
        self.assertIn("served 3 requests", pool.recycled[0][1])
