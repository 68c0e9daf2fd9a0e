"""Routing: the site's root resource maps path prefixes to services.

Routing looks at the whole raw path, normalised first (unreserved percent-escapes
decoded, empty segments collapsed); dot-segments and encoded slashes are refused
with 400, so ``/api/search/../../admin`` cannot reach another route or the admin
pages by a detour (real clients remove dot-segments before sending).  The longest matching
prefix wins; the prefix is stripped before forwarding
(``/api/search?q=x`` reaches the worker as ``/?q=x``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from twisted.web.resource import Resource

from cgipool.proxy.errors import client_left, set_error

#: Body limit for the daemon's own pages and for paths without a route.
DEFAULT_BODY_LIMIT = 64 * 1024

_UNRESERVED = frozenset(
    b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
)
_ESCAPE = re.compile(rb"%([0-9A-Fa-f]{2})")


#: Raw paths whose routing :meth:`Root.lookup` remembers (then it starts over).
_MAX_LOOKUPS = 1024
#: Longer raw paths are routed every time (the table stays small).
_MAX_LOOKUP_PATH = 256
#: Local redirects (a CGI script's ``Location: /path``) followed for one request.
MAX_LOCAL_REDIRECTS = 10


class BadPath(ValueError):
    pass


def normalize_path(path: bytes) -> bytes:
    """RFC 3986 normalisation of an origin-form path, for routing and forwarding.

    :raises BadPath: not origin-form, a dot-segment, or an encoded ``/``,
        ``\\`` or NUL: things different servers would read differently.
    """
    if not path.startswith(b"/"):
        raise BadPath("the request target must be a path starting with '/'")
    if b"%" not in path and b"/." not in path and b"//" not in path and b"\\" not in path:
        return path
    if b"\\" in path:
        raise BadPath("backslash in path")
    if b"%" in path:
        def unescape(match: re.Match[bytes]) -> bytes:
            byte = int(match.group(1), 16)
            if byte in (0x2F, 0x5C, 0x00):
                raise BadPath("encoded '/', '\\' or NUL in path")
            if byte in _UNRESERVED:
                return bytes((byte,))
            return b"%" + match.group(1).upper()

        path = _ESCAPE.sub(unescape, path)
    out: list[bytes] = []
    segments = path.split(b"/")[1:]
    last = len(segments) - 1
    for i, segment in enumerate(segments):
        if segment == b"." or segment == b"..":
            raise BadPath("dot-segments ('.' or '..') are not allowed in paths")
        if segment or i == last:
            out.append(segment)  # '//' collapses; a trailing '/' stays
    return b"/" + b"/".join(out)


def _worker_path(prefix: bytes, path: bytes) -> bytes:
    """The path a service's worker sees: its route prefix stripped."""
    return path if prefix == b"/" else path[len(prefix):] or b"/"


class JsonError(Resource):
    """A leaf that answers every request with one JSON error."""

    isLeaf = True

    def __init__(self, code: int, message: str, **extra: Any) -> None:
        super().__init__()
        self.code = code
        self.message = message
        self.extra = extra

    def render(self, request: Any) -> bytes:
        return set_error(request, self.code, self.message, **self.extra)


class Root(Resource):
    """Dispatches on the full path: daemon pages first, then service routes."""

    def __init__(self, routes: Mapping[str, Resource],
                 local: Mapping[str, Resource] | None = None,
                 services_at: Callable[[Any], bytes | None] | None = None) -> None:
        super().__init__()
        #: Pages of the daemon itself (``admin``, ``metrics``), by first segment.
        self.local = {name.encode(): resource for name, resource in (local or {}).items()}
        #: On the admin's listener: where the services are, for its 404s.
        self.services_at = services_at
        self.set_routes(routes)

    def set_routes(self, routes: Mapping[str, Resource]) -> None:
        """Replace the service routes at once (a reload); requests in progress go on."""
        #: Longest prefix first.
        self.routes = sorted(
            ((route.encode(), resource) for route, resource in routes.items()),
            key=lambda item: len(item[0]), reverse=True,
        )
        self.route_list = sorted(routes)
        self._lookups: dict[bytes, tuple[Resource, bytes] | None] = {}

    def resolve(self, path: bytes) -> tuple[bytes, Resource] | None:
        """The route prefix and resource for a normalised path (longest prefix)."""
        for prefix, resource in self.routes:
            if path.startswith(prefix) and (
                    prefix == b"/" or len(path) == len(prefix) or path[len(prefix)] == 0x2F):
                return prefix, resource
        return None

    def lookup(self, target: bytes) -> tuple[int, tuple[Resource, bytes] | None]:
        """For a raw request target, at the end of the head: the body limit, and
        for a service route ``(resource, target for the worker)``, else None
        (daemon pages, 404s and bad paths go through :meth:`getChildWithDefault`)."""
        query = target.find(b"?")
        raw = target if query < 0 else target[:query]
        lookups = self._lookups
        try:
            found = lookups[raw]
        except KeyError:
            found = self._lookup_path(raw)
            if len(raw) <= _MAX_LOOKUP_PATH:
                if len(lookups) >= _MAX_LOOKUPS:
                    lookups.clear()  # bounded: a client cannot grow it
                lookups[raw] = found
        if found is None:
            return DEFAULT_BODY_LIMIT, None
        resource, rest = found
        return (getattr(resource, "max_body", DEFAULT_BODY_LIMIT),
                (resource, rest if query < 0 else rest + target[query:]))

    def _lookup_path(self, raw: bytes) -> tuple[Resource, bytes] | None:
        """For :meth:`lookup` (remembered per raw path until the routes change):
        the service resource and the path for its worker, or None."""
        try:
            path = normalize_path(raw)
        except BadPath:
            return None
        if path[1:].partition(b"/")[0] in self.local:
            return None
        found = self.resolve(path)
        if found is None:
            return None
        prefix, resource = found
        return resource, _worker_path(prefix, path)

    def render(self, request: Any) -> bytes:
        # Only targets without a path get here (authority- or absolute-form).
        return set_error(request, 400, "the request target must be a path starting with '/'")

    def getChildWithDefault(self, name: bytes, request: Any) -> Resource:
        if request.method == b"CONNECT" and not request.path.startswith(b"/"):
            return JsonError(405, "CONNECT is not supported")  # authority-form: no tunnels
        try:
            path = normalize_path(request.path)
        except BadPath as e:
            return JsonError(400, str(e))
        first, _, _ = path[1:].partition(b"/")
        local = self.local.get(first)
        if local is not None:
            # Traverse the daemon's own pages along the normalised path.
            segments = path[1:].split(b"/")
            request.prepath = segments[:1]
            request.postpath = segments[1:]
            return local
        found = self.resolve(path)  # '/api/searchx' is not under '/api/search'
        if found is not None:
            prefix, resource = found
            rest = _worker_path(prefix, path)
            uri = request.uri
            query = uri.find(b"?")
            request.upstream_target = rest if query < 0 else rest + uri[query:]
            return resource
        origin = self.services_at(request) if self.services_at is not None else None
        if origin is not None:
            where = origin.decode("latin-1")
            return JsonError(404, f"no admin page at {path.decode('latin-1')}: this is the "
                                  f"admin's listener; the services are on {where}",
                             services=where)
        return JsonError(404, f"no route for {path.decode('latin-1')}",
                         routes=self.route_list)


class Elsewhere(Resource):
    """A JSON redirect: the daemon's pages asked for on a listener that does
    not serve them go to the same path on the one that does (the admin's own
    listener), and never get the content itself.

    ``location`` gives the URL for a request, or None when there is none (the
    admin on a UNIX socket): then 404 saying where it is.
    """

    isLeaf = True

    def __init__(self, location: Callable[[Any], bytes | None], where: str,
                 message: str = "the admin is served on its own listener") -> None:
        super().__init__()
        self.location = location
        self.where = where
        self.message = message

    def render(self, request: Any) -> bytes:
        location = self.location(request)
        if location is None:
            return set_error(request, 404, f"the admin is served on {self.where}, "
                                           f"not on this listener", admin=self.where)
        request.setHeader(b"location", location)
        # 307 keeps the method; a browser then sees another origin and
        # applies its cross-origin rules to anything but a navigation.
        return set_error(request, 307, self.message, location=location.decode("latin-1"))


def local_redirect(request: Any, target: bytes) -> None:
    """Answer ``request`` as this site would a bodiless GET (HEAD stays HEAD) of
    ``target``, a path and query: the same routing, services and errors.  For
    RFC 3875 local redirects; the request must not have started its answer."""
    from cgipool.proxy.webbridge import redirect  # it renders through this module's Root
    if request.finished or client_left(request):
        return
    exchange = getattr(request.channel, "exchange", None)
    hops = exchange.redirects = getattr(exchange, "redirects", 0) + 1
    if hops > MAX_LOCAL_REDIRECTS:
        body = set_error(request, 500, f"more than {MAX_LOCAL_REDIRECTS} local redirects "
                                       f"in a row (last to {target[:200].decode('latin-1')})")
        request.write(body)
        request.finish()
        return
    method = b"HEAD" if request.method == b"HEAD" else b"GET"
    if not redirect(request, method, target):
        body = set_error(request, 500, "a local redirect outside an edge connection")
        request.write(body)
        request.finish()
