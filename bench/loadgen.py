"""The built-in load generator of ``make bench`` when wrk is not installed.

``python bench/loadgen.py URL CONNECTIONS SECONDS`` runs
:class:`cgipool_tools.stress.StressRun` (keep-alive, one request at a time per
connection) against URL and prints one JSON object: requests, errors, rps,
p50/p99 in seconds.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from twisted.internet import defer, task

from cgipool_tools.stress import (
    StressResult,
    StressRun,
    _PathSpec,
    raise_open_files_limit,
    stress_options,
)


async def run(reactor: Any, url: str, connections: int, seconds: float) -> dict[str, Any]:
    slash = url.find("/", url.index("//") + 2)
    base, path = (url, "/") if slash < 0 else (url[:slash], url[slash:])
    options = stress_options(base, connections, duration=seconds, timeout=5.0)
    target = options.target
    spec = _PathSpec(path, target.request(path), path)
    result = StressResult(target.url, connections)
    raise_open_files_limit(connections + 64)
    await StressRun(reactor, options, [spec], result).start()
    lat = result.latency
    return {"requests": result.requests, "errors": result.failed,
            "rps": result.rate, "p50": lat.percentile(50), "p99": lat.percentile(99)}


def main(reactor: Any, url: str, connections: str, seconds: str) -> Any:
    d = defer.Deferred.fromCoroutine(run(reactor, url, int(connections), float(seconds)))
    d.addCallback(lambda out: print(json.dumps(out), flush=True))
    return d


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
