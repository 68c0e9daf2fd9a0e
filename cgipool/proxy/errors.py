"""Every error a client sees is JSON with an ``error`` field and the right status."""

from __future__ import annotations

import json
from typing import Any

from twisted.web.server import Request


def error_body(code: int, message: str, **extra: Any) -> bytes:
    return json.dumps({"error": message, "status": code, **extra}).encode()


#: Reason phrases twisted.web's RESPONSES lacks (it would send "Unknown Status").
REASONS = {429: b"Too Many Requests", 431: b"Request Header Fields Too Large"}


def set_error(request: Request, code: int, message: str,
              retry_after: int | None = None, **extra: Any) -> bytes:
    """Set status and headers of a JSON error on ``request``; return the body."""
    body = error_body(code, message, **extra)
    request.setResponseCode(code, REASONS.get(code))
    headers = request.responseHeaders
    headers.setRawHeaders(b"content-type", [b"application/json"])
    headers.setRawHeaders(b"cache-control", [b"no-store"])
    headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
    if retry_after is not None:
        headers.setRawHeaders(b"retry-after", [b"%d" % retry_after])
    return body


def client_left(request: Request) -> bool:
    """Whether ``request``'s client went away (its channel says so: see
    cgipool.proxy.webbridge.WebChannel.gone)."""
    return bool(getattr(getattr(request, "channel", None), "gone", False))


def finish_with_error(request: Request, code: int, message: str,
                      retry_after: int | None = None, **extra: Any) -> None:
    """Answer an asynchronous request with a JSON error (if the client is still there)."""
    if request.finished or client_left(request):
        return
    body = set_error(request, code, message, retry_after, **extra)
    request.write(body)
    request.finish()
