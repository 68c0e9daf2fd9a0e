"""A CGI script whose behaviour the test picks by PATH_INFO (tests/test_cgi.py).

    /env       the meta-variables and the body it got, as JSON
    /created   Status: 201 with an extra header
    /location  a Location field only (a redirect)
    /local?to=PATH  a local redirect (Location: PATH alone), e.g. to=/cgi/test/env
    /loop      a local redirect to itself
    /big?n=N   N bytes of body
    /bad       output that is not a CGI header
    /silent    no output at all, exit status 3
    /fail      a valid response, then exit status 7
    /stderr    two stderr lines, then a response
    /sleep?s=S&pidfile=F   write "pid grandchild" to F, start a grandchild
               `sleep 60`, sleep S seconds, then answer
"""

import json
import os
import subprocess
import sys
import time
from urllib.parse import parse_qsl

env = os.environ
path = env.get("PATH_INFO", "")
query = dict(parse_qsl(env.get("QUERY_STRING", "")))
out = sys.stdout.buffer


def answer(payload, head=b"Content-Type: application/json\r\n"):
    out.write(head + b"\r\n" + json.dumps(payload).encode())
    out.flush()


if path.startswith("/env"):
    length = int(env.get("CONTENT_LENGTH") or 0)
    body = sys.stdin.buffer.read(length).decode("latin-1") if length else ""
    answer({"env": dict(env), "body": body, "pid": os.getpid()})
elif path == "/created":
    answer({"created": True, "pid": os.getpid()},
           b"Status: 201 Made It\r\nContent-Type: application/json\r\nX-Script: yes\r\n"
           b"Content-Length: 99999\r\nConnection: close\r\n")
elif path == "/location":
    out.write(b"Location: https://example.invalid/there\n\n")
elif path == "/local":
    out.write(b"Location: " + query.get("to", "/").encode() + b"\r\n\r\n")
elif path == "/loop":
    out.write(b"Location: " + env["SCRIPT_NAME"].encode() + b"/loop\r\n\r\n")
elif path == "/big":
    n = int(query.get("n", "0"))
    out.write(b"Content-Type: application/octet-stream\n\n")
    chunk = bytes(range(256)) * 64
    while n > 0:
        out.write(chunk[:n])
        n -= len(chunk)
elif path == "/bad":
    out.write(b"<html>this is not a CGI header</html>\n\nbody")
elif path == "/silent":
    sys.exit(3)
elif path == "/fail":
    answer({"pid": os.getpid()})
    sys.exit(7)
elif path == "/stderr":
    print("first complaint", file=sys.stderr, flush=True)
    print("second complaint", file=sys.stderr, flush=True)
    answer({"pid": os.getpid()})
elif path == "/sleep":
    child = subprocess.Popen(["sleep", "60"])
    if query.get("pidfile"):
        with open(query["pidfile"], "w") as f:
            f.write(f"{os.getpid()} {child.pid}\n")
    time.sleep(float(query.get("s", "60")))
    answer({"slept": True, "pid": os.getpid()})
else:
    out.write(b"Status: 404 Not Found\nContent-Type: application/json\n\n{}")
