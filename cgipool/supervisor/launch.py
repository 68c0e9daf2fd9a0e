"""How a worker process is started: in its own session, dying with the daemon.

Each worker leads its own process group (so a stop signals the worker and every
child it spawned) and has a parent-death signal (so a SIGKILLed daemon leaves no
workers behind).  util-linux's ``setpriv --pdeathsig KILL`` and ``setsid`` do
both with two cheap execs; where they are missing, this module is the launcher:
``python -m cgipool.supervisor.launch PROGRAM ARGS...``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import sys

PR_SET_PDEATHSIG = 1


def default_launcher() -> list[str]:
    """The argv prefix that puts a worker in its own group with a death signal."""
    setpriv, setsid = shutil.which("setpriv"), shutil.which("setsid")
    if setpriv and setsid:
        return [setpriv, "--pdeathsig", "KILL", setsid]
    return [sys.executable, "-m", "cgipool.supervisor.launch"]


def main(argv: list[str]) -> None:
    if not argv:
        sys.exit("usage: python -m cgipool.supervisor.launch PROGRAM [ARGS...]")
    parent = os.getppid()
    os.setsid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        # The daemon died before the death signal was armed.
        sys.exit(1)
    os.execvp(argv[0], argv)


if __name__ == "__main__":
    main(sys.argv[1:])
