"""The RFC 3875 meta-variables a script runs with: the request's, and what it
inherits of the daemon's environment; and the request body for its stdin."""

from __future__ import annotations

import os
import re
from typing import Any

from cgipool import __version__
from cgipool.cgi.response import TOKEN
from cgipool.config import ServiceConfig
from cgipool.credentials import CREDENTIAL_HEADERS, AdminCredentials
from cgipool.proxy.forward import DROP_REQUEST_HEADERS, body_size, forwarded_block

SERVER_SOFTWARE = f"cgipool/{__version__}"
#: Request headers never passed as HTTP_*: the body's own (CONTENT_*), hop-by-hop
#: ones, credentials, and Proxy (httpoxy: HTTP_PROXY would steer the script's
#: outgoing requests).
SKIP_HEADERS = frozenset({
    b"content-type", b"content-length", b"proxy", b"authorization",
    b"proxy-authorization", b"connection", b"keep-alive", b"te", b"trailer",
    b"transfer-encoding", b"upgrade",
})
#: Request headers no script sees: the above, and what no worker sees either.
_SKIP_ALWAYS = SKIP_HEADERS | DROP_REQUEST_HEADERS
#: The environment a script inherits from the daemon (the rest is CGI's own).
INHERITED_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "TMPDIR", "HOME")


def base_environ(config: ServiceConfig) -> dict[str, str]:
    """What every script of the service starts from: the daemon's INHERITED_ENV,
    the service's ``env`` and ``CGIPOOL_SERVICE``."""
    inherited = {k: os.environ[k] for k in INHERITED_ENV if k in os.environ}
    return {**inherited, **config.env, "CGIPOOL_SERVICE": config.name}


def cgi_environ(request: Any, script_name: str, path_info: bytes, request_id: str,
                base: dict[str, str],
                credentials: AdminCredentials | None = None) -> dict[str, str]:
    """The RFC 3875 meta-variables of ``request`` (on top of ``base``), without
    the admin's ``credentials`` (session cookie, token)."""
    env = dict(base)
    host = request.getHost()
    client = request.getClientAddress()
    uri = request.uri
    query = uri.partition(b"?")[2]
    server_name = request.getRequestHostname()
    body_length = body_size(request)
    env.update({
        "GATEWAY_INTERFACE": "CGI/1.1",
        "SERVER_SOFTWARE": SERVER_SOFTWARE,
        "SERVER_PROTOCOL": request.clientproto.decode("latin-1"),
        "SERVER_NAME": server_name.decode("latin-1"),
        "SERVER_PORT": str(getattr(host, "port", "")),
        "REQUEST_METHOD": request.method.decode("latin-1"),
        "REQUEST_URI": uri.decode("latin-1"),
        "SCRIPT_NAME": script_name,
        # Not URL-encoded (RFC 3875 4.1.5); routing refused encoded '/' and NUL.
        "PATH_INFO": os.fsdecode(_unquote(path_info)),
        "QUERY_STRING": query.decode("latin-1"),
        "REMOTE_ADDR": str(getattr(client, "host", "")),
        "REMOTE_PORT": str(getattr(client, "port", "")),
        "HTTPS": "on" if request.isSecure() else "off",
        "CGIPOOL_REQUEST_ID": request_id,
    })
    if body_length or request.method in (b"POST", b"PUT", b"PATCH"):
        env["CONTENT_LENGTH"] = str(body_length)
    content_type = request.requestHeaders.getRawHeaders(b"content-type")
    if content_type:
        env["CONTENT_TYPE"] = content_type[0].decode("latin-1")
    authorization = request.requestHeaders.getRawHeaders(b"authorization")
    if authorization and not (credentials is not None and any(
            credentials.is_admin_authorization(v) for v in authorization)):
        scheme = (authorization[0].split(None, 1) or [b""])[0]
        if TOKEN.match(scheme):
            env["AUTH_TYPE"] = scheme.decode("latin-1")
    # The same headers a worker service would see: no hop-by-hop ones, none the
    # client's Connection names, and X-Forwarded-* set by the daemon, not the client.
    headers = request.requestHeaders
    skip = _SKIP_ALWAYS | {
        token.strip().lower() for value in headers.getRawHeaders(b"connection", ())
        for token in value.split(b",")}
    pairs = [(name, b", ".join(values)) for name, values in headers.getAllRawHeaders()
             if name.lower() not in skip]
    if credentials is not None:
        pairs = _without_credentials(pairs, credentials)
    host = (headers.getRawHeaders(b"host") or [b""])[0]
    for line in forwarded_block(request, host).split(b"\r\n"):
        name, sep, value = line.partition(b": ")
        if sep:
            pairs.append((name, value))
    for name, joined in pairs:
        if b"_" in name or not TOKEN.match(name):
            continue
        key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
        text = joined.decode("latin-1")
        env[key] = f"{env[key]}, {text}" if key in env else text
    env.pop("HTTP_PROXY", None)
    return env


def _without_credentials(pairs: list[tuple[bytes, bytes]],
                         credentials: AdminCredentials) -> list[tuple[bytes, bytes]]:
    """``pairs`` with the admin's session cookie and token taken out (a script
    is as untrusted as a worker: see cgipool.credentials)."""
    kept = []
    for name, joined in pairs:
        lname = name.lower()
        if lname == b"cookie":
            # Several Cookie lines were joined with ", ": scrub each one.
            values = [credentials.scrub_cookie(v) for v in joined.split(b", ")]
            joined = b"; ".join(v for v in values if v)
            if not joined:
                continue
        elif lname in CREDENTIAL_HEADERS and credentials.allowed(lname, joined) is None:
            continue
        kept.append((name, joined))
    return kept


def _unquote(path: bytes) -> bytes:
    return re.sub(rb"%([0-9A-Fa-f]{2})", lambda m: bytes((int(m.group(1), 16),)), path)


def request_body(request: Any) -> bytes:
    content = request.content
    if content is None:
        return b""
    content.seek(0)
    return content.read()
