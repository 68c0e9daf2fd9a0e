"""One run of a CGI script for one request (``CgiExecution``, its
ProcessProtocol): the environment and body in, the output parsed and passed to
the client — buffered, or streamed at the client's pace (``ClientPace``) — the
timeouts, and the end once the script exited and its pipes closed (a descendant
holding them is killed after ``LINGER``: supervisor/containment.py)."""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING, Any

from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from cgipool.cgi.environ import cgi_environ, request_body
from cgipool.cgi.response import (
    MAX_HEADER,
    BadCgiResponse,
    CgiResponse,
    header_end,
    parse_cgi_header,
)
from cgipool.logtext import printable
from cgipool.proxy.edge import CLIENT_TIMEOUT
from cgipool.proxy.errors import finish_with_error
from cgipool.proxy.routes import BadPath, local_redirect, normalize_path
from cgipool.supervisor.containment import Lineage, new_lineage
from cgipool.supervisor.output import OutputLogger
from cgipool.supervisor.worker import describe_exit

if TYPE_CHECKING:
    from cgipool.cgi.pool import CgiPool
    from cgipool.cgi.resource import CgiResource

log = Logger(namespace="cgipool.cgi")

#: A body up to this size is sent with a Content-Length; a longer one is streamed.
BUFFER_LIMIT = 64 * 1024
#: After the script exited, how long its output pipes may stay open (held by
#: a descendant) without a byte before that descendant is killed; and how long
#: after that the daemon closes the pipes itself (a holder it could not find).
LINGER = 0.3
CLOSE_AFTER = 1.0
#: Output that keeps coming after the script exited (a descendant writing without
#: end) postpones that for at most this long: then the holders are killed and
#: the response ends with what came (it is not held until request_timeout).
MAX_LINGER = 2.0


class CgiExecution(ProcessProtocol):
    """One run of the script for one request."""

    def __init__(self, pool: CgiPool, request: Any, resource: CgiResource,
                 request_id: str, began: float) -> None:
        self.pool = pool
        self.request = request
        self.resource = resource
        self.request_id = request_id
        self.began = began
        self.pid: int | None = None
        self.header = bytearray()
        self.response: CgiResponse | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        self.committed = False  # status and headers were given to the request
        self.answered = False   # the client got (or will get) its whole answer
        self.client_left = False
        #: The client's connection is gone (told by ``request.notifyFinish()``;
        #: then the request can neither finish nor unregister a producer).
        self.disconnected = False
        request.notifyFinish().addErrback(self._connection_lost)
        self.timed_out = False
        #: The script's output was not a valid CGI response: a failure even if
        #: it exited 0 before the SIGKILL that follows reached it.
        self.invalid_output = False
        self.exit: Failure | None = None
        self.stderr: OutputLogger | None = None
        self.timer: IDelayedCall | None = None
        self.kill_timer: IDelayedCall | None = None
        self.status_sent = 0
        #: The script's stdout reader while it is registered as the producer.
        self.producing: Any = None
        #: The execution's lineage (containment): its descendants end with it.
        self.lineage: Lineage | None = None
        #: Running while the script has exited but its pipes are still open.
        self.linger: IDelayedCall | None = None
        #: Output after the exit postpones ``linger`` until this time at most.
        self.linger_until = 0.0
        self.pipe_timer: IDelayedCall | None = None

    # -- spawning ----------------------------------------------------------------

    def start(self) -> None:
        pool, request = self.pool, self.request
        cfg = pool.config
        argv = pool.argv
        try:
            path = normalize_path(request.path)
        except BadPath:  # routing refused these already
            path = request.path
        # SCRIPT_NAME is the route, PATH_INFO what follows it.
        script_name = "" if cfg.route == "/" else cfg.route
        path_info = path[len(script_name):]
        env = cgi_environ(request, script_name, path_info, self.request_id, pool.base_env,
                          self.resource.credentials)
        request.exchange = self
        self.lineage = new_lineage(pool.containment, pool.name, None, self.request_id)
        self.lineage.mark(env)
        try:
            pool.reactor.spawnProcess(
                self, pool.launcher[0], [*pool.launcher, *argv], env=env, path=cfg.cwd,
                childFDs={0: "w", 1: "r", 2: "r"})
        except OSError as e:
            self.lineage.end()
            log.error("{service} [{request_id}]: cannot start {program}: {error}",
                      service=pool.name, request_id=self.request_id, program=argv[0],
                      error=e)
            self._error(502, f"cannot start the CGI script of service {pool.name!r}")
            pool.finished(self, "spawn failed", False)
            return
        self.lineage.spawned(self.pid)
        self.timer = pool.reactor.callLater(cfg.request_timeout, self.timeout)

    def connectionMade(self) -> None:
        self.pid = self.transport.pid
        self.stderr = OutputLogger(self.pool.reactor, self.pool.name,
                                   self.request_id, self.pid, "stderr",
                                   budget=self.pool.output_budget)
        body = request_body(self.request)
        if body:
            self.transport.write(body)
        self.transport.closeStdin()

    # -- output --------------------------------------------------------------------

    def outReceived(self, data: bytes) -> None:
        if self.linger is not None:
            self._postpone_release()  # a descendant is still writing: quiet first
        if self.answered:
            return  # answered with an error, or the client left: drain the pipe
        if self.response is None:
            self.header += data
            end, sep = header_end(self.header)
            if end < 0:
                if len(self.header) > MAX_HEADER:
                    self._bad_output(f"no end of the CGI header within {MAX_HEADER} bytes")
                return
            block, rest = bytes(self.header[:end]), bytes(self.header[end + sep:])
            self.header = bytearray()
            try:
                self.response = parse_cgi_header(block)
            except BadCgiResponse as e:
                self._bad_output(str(e))
                return
            if self.response.local is not None:
                self._local_redirect(self.response.local)
                return
            data = rest
            if not data:
                return
        head = self.request.method == b"HEAD"
        if self.committed:
            if not head:
                self.request.write(data)
                timer = self.timer
                if timer is not None and timer.active():
                    # Streaming: request_timeout is the longest the output may stall.
                    timer.reset(self.pool.config.request_timeout)
            return
        self.body_size += len(data)
        if not head:
            self.body.append(data)
        if self.body_size > BUFFER_LIMIT:
            # Long output: stream it, pausing the script's pipe while the client is slow.
            self._commit(None)
            for chunk in self.body:
                self.request.write(chunk)
            self.body = []
            reader = getattr(self.transport, "pipes", {}).get(1)
            if reader is not None and not head:
                pace = ClientPace(self, reader)
                self.request.registerProducer(pace, True)
                self.producing = pace

    def errReceived(self, data: bytes) -> None:
        if self.linger is not None:
            self._postpone_release()
        if self.stderr is not None:
            self.stderr.feed(data)

    def _bad_output(self, problem: str) -> None:
        pool = self.pool
        log.warn("{service} [{request_id}] pid={pid}: invalid CGI response: {problem}",
                 service=pool.name, request_id=self.request_id, pid=self.pid,
                 problem=problem)
        self.response = None
        self.invalid_output = True
        self._error(502, f"the CGI script of service {pool.name!r} sent an invalid "
                         f"response: {problem}")
        self._kill(signal.SIGKILL)

    # -- the end -----------------------------------------------------------------------

    def processExited(self, reason: Failure) -> None:
        self.exit = reason
        if self.pid is not None:
            # Anything the script left behind in its group goes with it.
            self.pool.kill_leftovers(self.pid, signal.SIGKILL)
        if self.lineage is not None:
            self.lineage.exited()
        self.watch_pipes()

    def watch_pipes(self) -> None:
        """The script has exited: its pipes must end soon (see _release).  Not
        while a slow client holds the output back (the pipe is quiet because it
        is not read): ClientPace calls this again when the client reads."""
        if isinstance(self.producing, ClientPace) and self.producing.paused_at is not None:
            return
        if self.transport is not None and self.linger is None and self.pipe_timer is None:
            # Until the pipes close too (processEnded, usually at once): a descendant
            # outside the group may hold them; see _release.
            clock = self.pool.reactor
            self.linger = clock.callLater(LINGER, self._release)
            self.linger_until = clock.seconds() + MAX_LINGER

    def _postpone_release(self) -> None:
        """Output after the exit: wait for LINGER of quiet, but not past MAX_LINGER."""
        linger = self.linger
        if linger is not None and linger.active() and \
                self.pool.reactor.seconds() + LINGER <= self.linger_until:
            linger.reset(LINGER)

    def _release(self) -> None:
        """The script exited and its pipes are still open and quiet: what holds them
        (its lineage, or any orphan with the pipe open) is killed, so the output ends,
        the response is finished and the slot is free.  CLOSE_AFTER later the daemon
        closes its ends itself."""
        if self.linger is not None and self.linger.active():
            self.linger.cancel()
        self.linger = None
        lineage = self.lineage
        if lineage is not None and lineage.containment is not None:
            lineage.containment.release(lineage, self._pipe_inodes())
        if self.pipe_timer is None:
            self.pipe_timer = self.pool.reactor.callLater(CLOSE_AFTER, self._close_pipes)

    def _pipe_inodes(self) -> list[int]:
        inodes = []
        for fd in (1, 2):
            reader = getattr(self.transport, "pipes", {}).get(fd)
            try:
                inodes.append(os.fstat(reader.fileno()).st_ino)
            except (AttributeError, OSError, ValueError):
                pass
        return inodes

    def _close_pipes(self) -> None:
        self.pipe_timer = None
        if self.transport is not None:
            log.warn("{service} [{request_id}]: output pipes still open {seconds:g}s "
                     "after the script exited; closing them", service=self.pool.name,
                     request_id=self.request_id, seconds=LINGER + CLOSE_AFTER)
            self.transport.loseConnection()

    def processEnded(self, reason: Failure) -> None:
        if self.exit is None:
            self.processExited(reason)
        for timer in (self.timer, self.kill_timer, self.linger, self.pipe_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self.timer = self.kill_timer = self.linger = self.pipe_timer = None
        if self.lineage is not None:
            self.lineage.end()  # what it left behind goes at the next sweep
        if self.stderr is not None:
            self.stderr.flush()
        code, sig, text = describe_exit(self.exit or reason)
        exit_code: int | str = code if code is not None else f"signal {sig}"
        ok: bool | None = exit_code == 0 and not self.timed_out and not self.invalid_output
        if self.client_left and not ok:
            ok = None  # killed because its client left: says nothing about the script
        if not self.answered:
            if self.response is None:
                # The output ended before the header did.
                got = "no output" if not self.header else f"{len(self.header)} bytes"
                problem = f"it exited ({text}) before a complete CGI header ({got})"
                log.warn("{service} [{request_id}] pid={pid}: {problem}",
                         service=self.pool.name, request_id=self.request_id, pid=self.pid,
                         problem=problem)
                self._error(502, f"the CGI script of service {self.pool.name!r} sent no "
                                 f"valid response: {problem}")
                ok = False
            else:
                self._finish()
        if exit_code != 0 and not self.timed_out:
            log.warn("{service} [{request_id}] pid={pid}: the script exited with {exit}",
                     service=self.pool.name, request_id=self.request_id, pid=self.pid,
                     exit=text)
        self.pool.finished(self, exit_code, ok)

    def _commit(self, length: int | None) -> None:
        """Give status and headers to the client's request."""
        response = self.response
        assert response is not None
        request = self.request
        self.committed = True
        request.setResponseCode(response.status, response.reason)
        headers = request.responseHeaders
        for name, value in response.headers:
            headers.addRawHeader(name, value)
        if length is not None:
            headers.setRawHeaders(b"content-length", [b"%d" % length])
        self.status_sent = response.status

    def _connection_lost(self, reason: Failure) -> None:
        self.disconnected = True

    def _unproduce(self) -> None:
        pace, self.producing = self.producing, None
        if pace is not None:
            if not self.disconnected:
                self.request.unregisterProducer()
            pace.done()
            pace.reader.resumeProducing()  # read (and drop) the rest, so the end is seen

    def _finish(self) -> None:
        self.answered = True
        self._unproduce()
        if self.client_left:
            return
        if not self.committed:
            body = b"".join(self.body)
            self.body = []
            self._commit(self.body_size)
            if body:
                self.request.write(body)
        request = self.request
        request.exchange = None
        if not request.finished and not self.disconnected:
            request.finish()

    def _local_redirect(self, target: bytes) -> None:
        """Answer as for a GET of ``target``: the request goes on through the
        edge's pipeline (routed and dispatched again), counted once, with the
        status of what answers it."""
        self.answered = True
        request = self.request
        request.exchange = None
        log.info("{service} [{request_id}] local redirect to {target}",
                 service=self.pool.name, request_id=self.request_id,
                 target=printable(target, 200))
        local_redirect(request, target)

    def _error(self, code: int, message: str) -> None:
        self.answered = True
        self._unproduce()
        self.request.exchange = None
        if self.committed:
            # Part of the response went out: the client must see it cut short.
            self.request.channel.loseConnection()
            return
        finish_with_error(self.request, code, message, service=self.pool.name,
                          request_id=self.request_id)

    # -- from the clock and the client ---------------------------------------------------

    def timeout(self) -> None:
        self.timer = None
        pool = self.pool
        self.timed_out = True
        pool.timeouts += 1
        seconds = pool.config.request_timeout
        log.warn("{service} [{request_id}] pid={pid}: no complete answer within "
                 "request_timeout={seconds:g}s; killing its process group",
                 service=pool.name, request_id=self.request_id, pid=self.pid,
                 seconds=seconds)
        pool.events.add("request_timeout", pool.name, None,
                        f"{self.request_id}: pid {self.pid} killed after "
                        f"request_timeout={seconds:g}s", "warn", pid=self.pid,
                        request_id=self.request_id)
        if not self.answered:
            self._error(504, f"the CGI script of service {pool.name!r} did not answer "
                             f"within request_timeout={seconds:g}s")
        self._kill(signal.SIGKILL)
        if self.exit is not None and self.pipe_timer is None:
            self._release()  # exited, and a descendant kept the pipes busy until now

    def terminate(self, grace: float) -> None:
        """Daemon stop: SIGTERM to the group, SIGKILL after ``grace`` seconds."""
        if not self.answered:
            self._error(503, "the daemon is shutting down")
        self._kill(signal.SIGTERM)
        if self.kill_timer is None:
            self.kill_timer = self.pool.reactor.callLater(grace, self._kill, signal.SIGKILL)

    def client_too_slow(self, waited: float) -> None:
        """The client took nothing of the streamed output for client_timeout:
        cut it (499 in the access log), like a client that left.  Not the
        script's fault: not counted as a failure or a timeout."""
        request = self.request
        pool = self.pool
        client = getattr(request.getClientAddress(), "host", "?")
        log.warn("{service} [{request_id}]: client {client} too slow: took nothing of "
                 "the response for {seconds:.1f}s (client_timeout); connection closed",
                 service=pool.name, request_id=self.request_id, client=client,
                 seconds=waited)
        self.client_gone()
        request.channel.transport.abortConnection()  # the edge logs its 499 line

    def client_gone(self) -> None:
        """The client disconnected: the script is of no use any more."""
        self.client_left = True
        self._unproduce()
        self.answered = True
        self._kill(signal.SIGKILL)

    def _kill(self, sig: int) -> None:
        if self.pid is not None and self.exit is None:
            self.pool.kill(self.pid, sig)


@implementer(IPushProducer)
class ClientPace:
    """A script's streamed output as the client connection's producer.

    Once output streams, ``request_timeout`` is the longest the script may go
    without output (CgiExecution.outReceived), as a worker's after its head.
    While the client takes nothing (its send buffer is full), the script is
    held back by the client, not slow itself: its ``request_timeout`` stops
    and the client's own ``client_timeout`` runs instead; past it the client is
    cut (499), as on the proxy path (ProxyExchange.pauseProducing).  When the
    client reads again, the script's clock starts afresh.
    A pipe that is quiet only because nobody reads it does not count as the
    script's output having ended (CgiExecution.watch_pipes).
    """

    def __init__(self, execution: CgiExecution, reader: Any) -> None:
        self.execution = execution
        self.reader = reader
        self.clock = execution.pool.reactor
        #: When the client stopped reading (None while it reads).
        self.paused_at: float | None = None
        self.client_timer: IDelayedCall | None = None

    def pauseProducing(self) -> None:
        self.reader.pauseProducing()
        if self.paused_at is not None:
            return
        execution = self.execution
        self.paused_at = self.clock.seconds()
        timer = execution.timer
        if timer is not None and timer.active():
            timer.cancel()
        execution.timer = None
        for name in ("linger", "pipe_timer"):  # quiet because unread, not ended
            pending = getattr(execution, name)
            if pending is not None and pending.active():
                pending.cancel()
            setattr(execution, name, None)
        self.client_timer = self.clock.callLater(self.client_limit(), self.too_slow)

    def resumeProducing(self) -> None:
        if self.paused_at is not None:
            self._resume_clocks()
        self.reader.resumeProducing()

    def stopProducing(self) -> None:
        self.reader.stopProducing()

    def client_limit(self) -> float:
        site = getattr(getattr(self.execution.request, "channel", None), "site", None)
        return float(getattr(site, "client_timeout", CLIENT_TIMEOUT))

    def done(self) -> None:
        """The response ended (or was abandoned): no more clocks of ours."""
        if self.client_timer is not None and self.client_timer.active():
            self.client_timer.cancel()
        self.client_timer = None
        self.paused_at = None

    def _resume_clocks(self) -> None:
        execution = self.execution
        self.paused_at = None
        if self.client_timer is not None and self.client_timer.active():
            self.client_timer.cancel()
        self.client_timer = None
        if execution.timer is None and not execution.answered:
            execution.timer = self.clock.callLater(
                execution.pool.config.request_timeout, execution.timeout)
        if execution.exit is not None:
            execution.watch_pipes()

    def too_slow(self) -> None:
        self.client_timer = None
        execution = self.execution
        now = self.clock.seconds()
        waited = now - self.paused_at if self.paused_at is not None else 0.0
        execution.client_too_slow(waited)
