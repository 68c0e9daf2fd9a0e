"""``cgipool wait-ready`` and ``cgipool stop``: the background daemon's life.

``make start-bg`` runs ``twistd --pidfile run/cgipool.pid ...`` (which returns
once the daemon is listening) and then ``wait-ready``, which polls the status
API until every service is ready, and fails fast when the daemon dies.
``make stop`` runs ``stop``: SIGTERM to the daemon, then it waits until the
daemon *and every worker process it had* are gone — SIGKILL for whatever is
left after the timeout — so "stopped" means no process is left.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

import attrs

from cgipool_tools.client import (
    REFUSED,
    HttpClient,
    NotRunning,
    StatusError,
    clean,
    fetch_status,
    parse_url,
    sleep,
)
from cgipool_tools.status import size_summary

#: Service states that need no more waiting.
SETTLED = frozenset({"ok", "unavailable"})
POLL_INTERVAL = 0.1
LOG_TAIL = 20


# -- /proc -----------------------------------------------------------------------


@attrs.frozen
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    state: str
    #: Clock ticks since boot when it started: with the pid, names one process.
    start: int
    name: str


def proc_info(pid: int) -> ProcInfo | None:
    """``/proc/PID/stat`` parsed; None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
        return None
    try:
        left, right = data.index(b"("), data.rindex(b")")
        name = data[left + 1:right].decode("utf-8", "replace")
        fields = data[right + 2:].split()
        # fields[0] is field 3 (state) of proc(5).
        return ProcInfo(pid, int(fields[1]), int(fields[2]), fields[0].decode(),
                        int(fields[19]), name)
    except (ValueError, IndexError):
        return None


def all_processes() -> list[ProcInfo]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = proc_info(int(entry))
            if info is not None:
                found.append(info)
    return found


def descendants(pid: int, processes: Iterable[ProcInfo] | None = None) -> list[ProcInfo]:
    """Every process below ``pid`` (children, their children...), parents first."""
    by_parent: dict[int, list[ProcInfo]] = {}
    for info in processes if processes is not None else all_processes():
        by_parent.setdefault(info.ppid, []).append(info)
    result, queue = [], [pid]
    while queue:
        for child in by_parent.get(queue.pop(0), []):
            if child.pid != pid and child not in result:
                result.append(child)
                queue.append(child.pid)
    return result


def is_gone(process: ProcInfo) -> bool:
    """Exited (a zombie counts) or the pid now names another process."""
    now = proc_info(process.pid)
    return now is None or now.state in ("Z", "X") or now.start != process.start


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return ""


def read_pidfile(path: str) -> int | None:
    """The pid in ``path``; None when missing, empty or not a number."""
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        return None
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def log_tail(path: str, lines: int = LOG_TAIL) -> list[str]:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except OSError:
        return []
    return [clean(line) for line in data.decode("utf-8", "replace").splitlines()[-lines:]]


def default_logfile(pidfile: str) -> str:
    """The log next to the pidfile: ``run/x.pid`` -> ``run/x.log``, else ``cgipool.log``."""
    if pidfile.endswith(".pid") and len(os.path.basename(pidfile)) > 4:
        return pidfile[:-4] + ".log"
    return os.path.join(os.path.dirname(pidfile) or ".", "cgipool.log")


# -- wait-ready --------------------------------------------------------------------


def service_line(svc: dict[str, Any]) -> str:
    """``search  ok  2/2 workers ready  /api/search``; a CGI service says what it is
    (``cgi · up to 4 at once · 0 running``) instead of "0/4 workers ready"."""
    return (f"{clean(svc.get('name'), 24):<12} {clean(svc.get('state'), 16):<10} "
            f"{size_summary(svc)}  {clean(svc.get('route'), 40)}")


def not_ready(status: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in status.get("services") or []
            if isinstance(s, dict) and s.get("state") not in SETTLED]


class DaemonGone(Exception):
    pass


async def wait_ready(reactor: Any, url: str, pidfile: str | None, timeout: float,
                     out: TextIO, err: TextIO, logfile: str | None = None,
                     interval: float = POLL_INTERVAL, since: float | None = None) -> int:
    """Poll the status API until every service is ready; 0 when it is.

    ``since``: when the wait really began (``make start-bg`` passes the moment it
    started twistd, which daemonizes only once it has built everything), so the
    time reported is the one the user waited.
    """
    target = parse_url(url)
    client = HttpClient(reactor, target, timeout=min(2.0, timeout))
    started = reactor.seconds()
    deadline = started + timeout
    last: dict[str, Any] | None = None
    last_problem = REFUSED
    pid = None
    try:
        while True:
            if pidfile is not None:
                pid = read_pidfile(pidfile)
                info = proc_info(pid) if pid is not None else None
                if info is None or info.state in ("Z", "X"):
                    what = (f"cgipool (pid {pid}) exited" if pid is not None
                            else f"cgipool is not running (no pid in {pidfile})")
                    err.write(f"{what} before it was ready\n")
                    _print_log(err, logfile or default_logfile(pidfile))
                    return 1
            try:
                status = await fetch_status(client)
            except NotRunning:
                last_problem = f"not reachable at {target.url} ({REFUSED})"
            except StatusError as e:
                last_problem = str(e)
            else:
                last = status
                if not not_ready(status):
                    took = reactor.seconds() - (started if since is None else since)
                    for svc in status["services"]:
                        if isinstance(svc, dict):
                            out.write(service_line(svc) + "\n")
                    who = f" (pid {pid})" if pid is not None else ""
                    out.write(f"cgipool is ready at {target.url}{who} after {took:.1f} s; "
                              f"dashboard: {client.admin_url}/admin/\n")
                    return 0
            if reactor.seconds() >= deadline:
                break
            await sleep(reactor, interval)
    finally:
        await client.close()
    err.write(f"cgipool is not ready after {timeout:g} s: ")
    if last is None:
        err.write(f"{last_problem}\n")
    else:
        waiting = not_ready(last)
        err.write("waiting for " + ", ".join(
            f"{clean(s.get('name'), 24)} ({clean(s.get('state'), 16)}, {size_summary(s)})"
            for s in waiting) + "\n")
        for svc in waiting:
            for w in svc.get("workers") or []:
                if isinstance(w, dict) and (w.get("last_exit") or w.get("last_health")):
                    health = w.get("last_health") or {}
                    err.write(f"  {clean(svc.get('name'), 24)}[{clean(w.get('id'))}] "
                              f"{clean(w.get('state'))}: last exit {clean(w.get('last_exit'))}, "
                              f"last health check "
                              f"{'ok' if health.get('ok') else clean(health.get('error'))}\n")
    if pidfile is not None:
        _print_log(err, logfile or default_logfile(pidfile))
    return 1


def _print_log(err: TextIO, logfile: str) -> None:
    lines = log_tail(logfile)
    if lines:
        err.write(f"last {len(lines)} lines of {logfile}:\n")
        for line in lines:
            err.write(f"  {line}\n")
    elif not os.path.exists(logfile):
        err.write(f"(no log at {logfile})\n")


# -- stop ------------------------------------------------------------------------


def looks_like_cgipool(pid: int) -> bool:
    """Refuse to signal a stranger that reuses a stale pidfile's pid."""
    command = cmdline(pid)
    return "twistd" in command or "cgipool" in command or command == ""


def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else plural or word + 's'}"


def stop(pidfile: str, timeout: float, out: TextIO, err: TextIO,
         clock: Callable[[], float] = time.monotonic,
         pause: Callable[[float], None] = time.sleep,
         kill: Callable[[int, int], None] = os.kill,
         killpg: Callable[[int, int], None] = os.killpg) -> int:
    """Stop the daemon named in ``pidfile`` and wait for all its processes."""
    pid = read_pidfile(pidfile)
    if pid is None:
        if os.path.exists(pidfile):
            _remove(pidfile)
            out.write(f"cgipool is not running (removed unreadable pidfile {pidfile})\n")
        else:
            out.write("cgipool is not running\n")
        return 0
    daemon = proc_info(pid)
    if daemon is None or daemon.state in ("Z", "X"):
        _remove(pidfile)
        out.write(f"cgipool is not running (removed stale pidfile {pidfile} of pid {pid})\n")
        return 0
    if not looks_like_cgipool(pid):
        _remove(pidfile)
        out.write(f"cgipool is not running (pid {pid} of {pidfile} is another program: "
                  f"{clean(cmdline(pid), 80)}; removed the stale pidfile)\n")
        return 0

    children = descendants(pid)
    started = clock()
    deadline = started + timeout
    try:
        kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    # The daemon first (it stops its workers itself); a worker it spawned
    # after our first look is picked up while it is still the parent.
    polls = 0
    while not is_gone(daemon) and clock() < deadline:
        pause(0.02)
        polls += 1
        if polls % 5 == 0 and not is_gone(daemon):
            known = {(p.pid, p.start) for p in children}
            children += [p for p in descendants(pid) if (p.pid, p.start) not in known]
    waiting = [daemon, *children]
    # Then every process it had.
    while any(not is_gone(p) for p in waiting) and clock() < deadline:
        pause(0.02)
    left = [p for p in waiting if not is_gone(p)]
    if left:
        err.write(f"still running after {timeout:g} s, sending SIGKILL: " + ", ".join(
            f"pid {p.pid} ({clean(p.name, 32)})" for p in left) + "\n")
        own_group = os.getpgrp()
        for p in left:
            try:
                if p.pgid > 1 and p.pgid != own_group:
                    killpg(p.pgid, signal.SIGKILL)
                else:
                    kill(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError) as e:
                err.write(f"cannot kill pid {p.pid}: {e}\n")
        kill_deadline = clock() + 5.0
        while any(not is_gone(p) for p in left) and clock() < kill_deadline:
            pause(0.02)
    took = clock() - started
    if is_gone(daemon) and read_pidfile(pidfile) == pid:
        _remove(pidfile)  # twistd removes it on a clean exit; not after SIGKILL
    remaining = [p for p in waiting if not is_gone(p)]
    if remaining:
        err.write("cgipool did not stop; still running: " + ", ".join(
            f"pid {p.pid} ({clean(p.name, 32)})" for p in remaining) + "\n")
        return 1
    killed = f" (after SIGKILL to {_plural(len(left), 'process', 'processes')})" if left else ""
    out.write(f"stopped cgipool (pid {pid}) and {_plural(len(children), 'worker')} "
              f"in {took:.1f} s{killed}\n")
    return 0


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError:
        pass
