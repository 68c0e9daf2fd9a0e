"""Classic CGI (RFC 3875): ``protocol: cgi`` services (see execution.py)."""

from cgipool.cgi.execution import *  # noqa: F401,F403
from cgipool.cgi.execution import (  # noqa: F401
    CLOSE_AFTER,
    LINGER,
    MAX_LINGER,
    BadCgiResponse,
    CgiExecution,
    CgiPool,
    CgiResource,
    ClientPace,
    _header_end,
    parse_cgi_header,
)
