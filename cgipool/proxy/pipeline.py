"""The request pipeline: the ordered stages every client request passes.

One list, :data:`STAGES`, names them in order; the edge protocol runs it for
every request it parses, whatever carries the request (a whole head in one
read, a chunked body across many, a pipelined burst) and whatever answers it
(a worker, a CGI script, a daemon page).  A stage may act at three moments:

``head(exchange)``
    the request head is complete; the body has not been read.  Returning
    False means the stage answered (a refusal) and the request goes no further
    (later stages' ``head`` and every ``request`` are skipped).
``request(exchange)``
    the whole request, body included, has arrived: the dispatch stage hands it
    to whoever answers it.
``end(exchange)``
    the exchange is over (answered, refused, cut, or the client left): the
    access log and the metrics.  Every stage's ``end`` runs, once, in order,
    for every exchange whose ``head`` stages ran.

Adding a concern (API keys, rate limits, a cache) means writing one stage and
naming it in :data:`STAGES`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

from twisted.logger import Logger

from cgipool.proxy.routes import DEFAULT_BODY_LIMIT

if TYPE_CHECKING:
    from cgipool.proxy.exchange import Exchange

log = Logger(namespace="cgipool.pipeline")


class Stage(Protocol):
    """One step of the pipeline (see the module docstring)."""

    name: str

    def head(self, exchange: Exchange) -> bool: ...

    def request(self, exchange: Exchange) -> None: ...

    def end(self, exchange: Exchange) -> None: ...


class BaseStage:
    """A stage that does nothing at each moment; stages override what they need."""

    name = "stage"

    def head(self, exchange: Exchange) -> bool:
        return True

    def request(self, exchange: Exchange) -> None:
        pass

    def end(self, exchange: Exchange) -> None:
        pass


class Route(BaseStage):
    """Find the route for the raw target (``Root.lookup``: the longest prefix of
    the normalised path) and with it the body limit: a declared body over it
    is refused with 413 before it is read.  A target that is not a path (``*``,
    authority- or absolute-form) has no route."""

    name = "route"

    def head(self, exchange: Exchange) -> bool:
        uri = exchange.uri
        limit = DEFAULT_BODY_LIMIT
        if uri.startswith(b"/"):
            lookup = getattr(exchange.conn.site.resource, "lookup", None)
            if lookup is not None:
                limit, found = lookup(uri)
                if found is not None:
                    exchange.route, exchange.upstream_target = found
                    exchange.origin = exchange.route
        declared = exchange.conn.declared_length
        if declared is not None and declared > limit:
            exchange.conn.refuse(413, f"request body of {declared} bytes is larger than "
                                      f"the limit of {limit} bytes for this route")
            return False
        exchange.body_budget = limit
        return True


class Admission(BaseStage):
    """Whether the request may go on: no tunnels (``CONNECT``), ``*`` only for
    ``OPTIONS``, a path or nothing; then ``100 Continue`` to a client waiting
    for it before it sends its body (only once the request is admitted).  API
    keys and rate limits join here."""

    name = "admission"

    def head(self, exchange: Exchange) -> bool:
        method, uri = exchange.method, exchange.uri
        if method == b"CONNECT":
            exchange.conn.refuse(405, "CONNECT is not supported")
            return False
        if uri == b"*":
            if method != b"OPTIONS":
                exchange.conn.refuse(405, "only OPTIONS may have '*' as its target",
                                     [(b"Allow", b"OPTIONS")])
                return False
        elif not uri.startswith(b"/"):
            exchange.conn.refuse(400, "the request target must be a path starting with '/'")
            return False
        conn = exchange.conn
        if conn.parsing is exchange:  # a body is to come
            conn.continue_if_expected(exchange)
        return True


class Dispatch(BaseStage):
    """Hand the whole request to what answers it: a service's ``handle``
    (queue, balance, forward: :class:`~cgipool.proxy.forward.ServiceProxy`), or
    a twisted.web resource through :mod:`cgipool.proxy.webbridge` (CGI, the
    daemon's pages, the 404 and 400 pages)."""

    name = "dispatch"

    def request(self, exchange: Exchange) -> None:
        dispatch(exchange)


def dispatch(exchange: Exchange) -> None:
    """Run ``exchange`` on its route's handler (also for a local redirect)."""
    route = exchange.route
    handle = getattr(route, "handle", None)
    try:
        if handle is not None:
            handle(exchange)
            return
        from cgipool.proxy.webbridge import render  # it imports the edge
        render(exchange, route)
    except Exception:
        log.failure("error while handling {method} {uri}",
                    method=exchange.method, uri=exchange.uri[:200])
        if exchange.started:
            exchange.cut()
        else:
            exchange.error(500, "internal error in cgipool (see the daemon log)")


class AccessLog(BaseStage):
    """One combined-format line per request in the access log (when configured),
    refusals and clients that left (499) included."""

    name = "access-log"

    def end(self, exchange: Exchange) -> None:
        site = exchange.conn.site
        if site.logPath:
            site.log(exchange)


class Count(BaseStage):
    """One ``record(status, seconds)`` per request in the metrics of the service
    it was sent to (after a local redirect too: with the final status)."""

    name = "count"

    def end(self, exchange: Exchange) -> None:
        metrics = getattr(exchange.origin, "metrics", None)
        if metrics is not None:
            conn = exchange.conn
            metrics.record(exchange.code, conn.site.reactor.seconds() - exchange.began)


#: The pipeline, in order.  Flow 1 of docs/ARCHITECTURE.md is this list.
STAGES: tuple[type[BaseStage], ...] = (Route, Admission, Dispatch, AccessLog, Count)


def _acts_at(stage: Any, moment: str) -> bool:
    """Whether ``stage`` does something at ``moment`` (not BaseStage's no-op)."""
    method = getattr(type(stage), moment, None)
    return method is not None and method is not getattr(BaseStage, moment)


class Pipeline:
    """The stages of one site, run in order.  Each moment calls only the
    stages that act at it (a stage that inherits BaseStage's no-op is skipped):
    the pipeline is on every request's path, and most stages act at one moment."""

    __slots__ = ("stages", "heads", "requests", "ends")

    def __init__(self, stages: Sequence[Any]) -> None:
        self.stages = tuple(stages)
        self.heads = tuple(s.head for s in self.stages if _acts_at(s, "head"))
        self.requests = tuple(s.request for s in self.stages if _acts_at(s, "request"))
        self.ends = tuple((s.name, s.end) for s in self.stages if _acts_at(s, "end"))

    @classmethod
    def default(cls) -> Pipeline:
        return cls([stage() for stage in STAGES])

    def with_stage(self, stage: Any, after: str) -> Pipeline:
        """A copy with ``stage`` inserted after the one named ``after`` (tests)."""
        stages = list(self.stages)
        index = [s.name for s in stages].index(after) + 1
        stages.insert(index, stage)
        return Pipeline(stages)

    def head(self, exchange: Exchange) -> bool:
        for head in self.heads:
            if not head(exchange):
                return False
        return True

    def request(self, exchange: Exchange) -> None:
        for request in self.requests:
            request(exchange)

    def end(self, exchange: Exchange) -> None:
        for name, end in self.ends:
            try:
                end(exchange)
            except Exception:
                log.failure("stage {stage} failed at the end of {method} {uri}",
                            stage=name, method=exchange.method, uri=exchange.uri[:200])


__all__ = ["STAGES", "AccessLog", "Admission", "BaseStage", "Count",
           "Dispatch", "Pipeline", "Route", "Stage", "dispatch"]
