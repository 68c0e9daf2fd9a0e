#!/usr/bin/env python3
"""A classic CGI script in Python (RFC 3875), standard library only.

cgipool runs it once per request: the request is in the environment
(REQUEST_METHOD, QUERY_STRING, PATH_INFO, HTTP_*...), the body on stdin, and
what it prints is the response: header fields, a blank line, the body.

    GET  /api/cgi-python?service=demo&data=test -> {"service": "demo", "data": "test", ...}
    POST /api/cgi-python  (a JSON body)          -> the body echoed back under "echo"
    GET  /api/cgi-python/env                     -> the CGI meta-variables it got
    GET  /api/cgi-python/redirect                -> 302 to /api/cgi-python?service=redirected
    GET  /api/cgi-python/local                   -> a local redirect: the daemon answers
                                                    as for /api/cgi-python?service=local
    anything else                                -> 404
"""

import json
import os
import sys
from urllib.parse import parse_qsl

#: What /env shows: the CGI meta-variables, no inherited environment.
CGI_VARIABLES = ("GATEWAY_INTERFACE", "SERVER_SOFTWARE", "SERVER_PROTOCOL", "SERVER_NAME",
                 "SERVER_PORT", "REQUEST_METHOD", "SCRIPT_NAME", "PATH_INFO", "QUERY_STRING",
                 "CONTENT_TYPE", "CONTENT_LENGTH", "REMOTE_ADDR", "CGIPOOL_REQUEST_ID")


def respond(payload: dict, status: str = "200 OK", extra: str = "") -> None:
    body = json.dumps({**payload, "language": "python", "pid": os.getpid()}) + "\n"
    sys.stdout.write(f"Status: {status}\r\nContent-Type: application/json\r\n{extra}\r\n")
    sys.stdout.write(body)


def main() -> int:
    env = os.environ
    path = env.get("PATH_INFO", "")
    params = dict(parse_qsl(env.get("QUERY_STRING", ""), keep_blank_values=True))
    length = int(env.get("CONTENT_LENGTH") or 0)
    body = sys.stdin.buffer.read(length) if length > 0 else b""
    print(f"hello.py: {env.get('REQUEST_METHOD')} {path or '/'} {len(body)} bytes",
          file=sys.stderr)
    if path in ("", "/"):
        payload = {"service": params.get("service"), "data": params.get("data")}
        if body:
            try:
                payload["echo"] = json.loads(body)
            except ValueError:
                respond({"error": "the body is not JSON"}, "400 Bad Request")
                return 0
        respond(payload)
    elif path == "/env":
        respond({"env": {k: env[k] for k in CGI_VARIABLES if k in env},
                 "headers": {k: v for k, v in env.items() if k.startswith("HTTP_")}})
    elif path == "/redirect":
        # A Location with a Status is a redirect with a body (RFC 3875 6.2.4).
        respond({"redirect": "/api/cgi-python?service=redirected"}, "302 Found",
                "Location: /api/cgi-python?service=redirected\r\n")
    elif path == "/local":
        # A Location path alone: the daemon answers it itself (RFC 3875 6.2.2).
        sys.stdout.write("Location: /api/cgi-python?service=local\r\n\r\n")
    else:
        respond({"error": f"not found: {path}"}, "404 Not Found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
