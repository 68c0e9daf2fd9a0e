"""Classic CGI (RFC 3875): a service whose command runs once per request.

A service with ``protocol: cgi`` has no resident workers.  Each request spawns
its command (through the same launcher as the workers: its own process group,
killed with the daemon) with the standard CGI environment and the request body
on stdin, and the script's CGI response — header fields, a blank line, the
body — becomes the HTTP response::

    Status: 404 Not Found            (optional; default 200, or 302 with Location)
    Content-Type: application/json   (required unless it is a redirect)
    Location: http://host/elsewhere  (optional; a client redirect: 302)
    X-Anything: other fields are passed on
                                     (blank line)
    body...

- ``workers.max`` caps concurrent executions (``scale`` changes the cap within
  ``workers.min..max``); more requests wait in a bounded queue (``queue.max``,
  ``queue.timeout``); a full queue or a wait past the timeout → 503 JSON with
  ``Retry-After``.
- ``request_timeout`` kills the script's whole process group → 504 JSON.
- The execution ends when the script has exited and its output pipes are closed:
  a descendant that still holds them (``setsid sleep 300 &``) is killed after
  ``LINGER`` seconds without output (``supervisor/containment.py``), so the
  response ends normally and the slot is free.
- A script that exits without a valid header → 502 JSON; its stderr is logged
  line by line with the request id.
- ``Location: /path?query`` alone (no Status) is a *local* redirect (RFC 3875
  6.2.2): the daemon answers as it would a GET (HEAD stays HEAD) for that path,
  through its routes (another service, a CGI script, a 404), without a body.
  At most ``MAX_LOCAL_REDIRECTS`` in a row (then 500 JSON: a loop).
- Never set: ``HTTP_PROXY`` (httpoxy), ``HTTP_*`` of header names with ``_``.
  ``Authorization`` is not passed (only ``AUTH_TYPE``).  Non-parsed-header
  (``nph-``) scripts are refused by the configuration.

The package, by concern: ``response.py`` (the script's header block parsed),
``environ.py`` (the RFC 3875 environment), ``pool.py`` (``CgiPool``: the cap,
the queue, the counters), ``execution.py`` (``CgiExecution``, one run of the
script, and ``ClientPace``), ``resource.py`` (``CgiResource``, the route).
"""

from cgipool.cgi.environ import SERVER_SOFTWARE, cgi_environ
from cgipool.cgi.execution import (
    BUFFER_LIMIT,
    CLOSE_AFTER,
    LINGER,
    MAX_LINGER,
    CgiExecution,
    ClientPace,
)
from cgipool.cgi.pool import CgiPool, Waiting
from cgipool.cgi.resource import CgiResource
from cgipool.cgi.response import (
    MAX_HEADER,
    BadCgiResponse,
    CgiResponse,
    header_end,
    parse_cgi_header,
)

__all__ = [
    "BUFFER_LIMIT", "CLOSE_AFTER", "LINGER", "MAX_HEADER", "MAX_LINGER", "SERVER_SOFTWARE",
    "BadCgiResponse", "CgiExecution", "CgiPool", "CgiResource", "CgiResponse", "ClientPace",
    "Waiting", "cgi_environ", "header_end", "parse_cgi_header",
]
