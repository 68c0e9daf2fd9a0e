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
    /echo...   its PATH_INFO on stderr (raw: a %1b in the URL is an ESC), then a response
    /sleep?s=S&pidfile=F   write "pid grandchild" to F, start a grandchild
               `sleep 60`, sleep S seconds, then answer
    /writer?pidfile=F  answer and exit, leaving a setsid descendant that writes
               to its stdout without end (pid in F)
    /orphan?n=N&pidfile=F[&scrub=1][&detach=1]   start N `sleep 300` in their own
               sessions (setsid) holding its stdout (detach: /dev/null, stderr too), with an
               empty environment (scrub), write their pids to F, answer and exit
"""

import json
import os
import subprocess
import sys
import time
from urllib.parse import parse_qsl

ATTACK_PAGE = b"""<!doctype html><title>attack</title><pre id="out"></pre><script>
const admin = ADMIN_ORIGIN;
const scale = "/admin/api/services/search/scale";
const post = {method: "POST", credentials: "include", body: JSON.stringify({workers: 3}),
              headers: {"X-CGIPool-CSRF": "1", "Content-Type": "application/json"}};
const tries = [
  ["scale via the proxy origin", () => fetch(scale, post)],
  ["scale on the admin origin", () => fetch(admin + scale, post)],
  ["scale without the header", () => fetch(admin + scale, {method: "POST",
      credentials: "include", mode: "no-cors", body: "workers=3"})],
  ["read the status", () => fetch(admin + "/admin/api/status", {credentials: "include"})],
  ["reload", () => fetch(admin + "/admin/api/reload", {method: "POST",
      credentials: "include", headers: {"X-CGIPool-CSRF": "1"}})],
];
(async () => {
  const lines = [];
  for (const [name, attempt] of tries) {
    try {
      const r = await attempt();
      let body = "";
      try { body = (await r.text()).slice(0, 200); } catch (e) { body = String(e); }
      lines.push(name + ": answered " + r.type + " " + r.status + " " + body);
    } catch (e) {
      lines.push(name + ": blocked " + e.name);
    }
  }
  document.getElementById("out").textContent = lines.join("\\n") + "\\ndone";
})();
</script>"""

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
elif path == "/orphan":
    kids = [subprocess.Popen(["sleep", "300"], start_new_session=True,
                             env={} if query.get("scrub") else None,
                             executable="/bin/sleep" if query.get("scrub") else None,
                             stdout=subprocess.DEVNULL if query.get("detach") else None,
                             stderr=subprocess.DEVNULL if query.get("detach") else None)
            for _ in range(int(query.get("n", "1")))]
    with open(query["pidfile"], "w") as f:
        f.write(" ".join(str(k.pid) for k in kids) + "\n")
    answer({"orphans": [k.pid for k in kids], "pid": os.getpid()})
elif path == "/writer":
    # A descendant in its own session that keeps writing to the script's stdout,
    # started once the answer is out (its output must follow the header, not
    # come before it).
    answer({"pid": os.getpid(), "writer": True})
    kid = subprocess.Popen(["sh", "-c", "while :; do echo spam; sleep 0.05; done"],
                           start_new_session=True)
    with open(query["pidfile"], "w") as f:
        f.write(f"{kid.pid}\n")
elif path.startswith("/echo"):
    print("path:", path, file=sys.stderr, flush=True)
    answer({"pid": os.getpid()})
elif path == "/attack":
    # A page an untrusted service serves on the proxy's origin, trying what an
    # XSS would against the admin (tests/test_hostile_browser.py).
    out.write(b"Content-Type: text/html; charset=utf-8\r\n\r\n" + ATTACK_PAGE.replace(
        b"ADMIN_ORIGIN", json.dumps(query.get("admin", "")).encode()))
else:
    out.write(b"Status: 404 Not Found\nContent-Type: application/json\n\n{}")
