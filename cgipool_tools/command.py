"""What every ``cgipool`` command shares: an argument type and running on a reactor.

:mod:`cgipool.cli` builds the parser and dispatches; commands that register
themselves (``dashboard-shot``, :mod:`cgipool_tools.screenshot`) take these from
here, so no tool imports the command line back.
"""

from __future__ import annotations

import argparse
import math
import sys
import traceback
from collections.abc import Callable, Coroutine
from typing import Any

from cgipool_tools.client import UsageError


def seconds(text: str) -> float:
    """An argparse type: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def run_on_reactor(main: Callable[[Any], Coroutine[Any, Any, int]]) -> int:
    """Run ``main(reactor)`` with :func:`twisted.internet.task.react`; its exit status."""
    from twisted.internet import defer, task

    code = 0

    async def wrapped(reactor: Any) -> None:
        nonlocal code
        try:
            code = await main(reactor)
        except UsageError as e:
            sys.stderr.write(f"cgipool: {e}\n")
            code = 2
        except Exception:
            traceback.print_exc()
            code = 1

    try:
        task.react(lambda reactor: defer.ensureDeferred(wrapped(reactor)))
    except SystemExit as e:
        if e.code not in (0, None) and code == 0:
            code = e.code if isinstance(e.code, int) else 1
    return code
