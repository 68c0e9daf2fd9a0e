"""``cgipool check-config``: load and validate a pool configuration, spawn nothing."""

from __future__ import annotations

import os
import re
import shlex
from typing import TextIO

from cgipool.config import ConfigError, PoolConfig, ServiceConfig, load
from cgipool_tools.client import clean
from cgipool_tools.status import format_table

_PLAIN = re.compile(r"[\w@%+=:,./{}?&-]+")


def _shown_command(config: PoolConfig, svc: ServiceConfig) -> str:
    """The command with the program relative to base_dir when it lives there
    (for a service none of whose runtimes is installed: why it is unavailable)."""
    command = svc.command
    if not command:
        return f"unavailable: {svc.unavailable or 'no command'}"
    program = command[0]
    base = config.base_dir.rstrip(os.sep) + os.sep
    if program.startswith(base):
        program = program[len(base):]
    return " ".join(_quote(arg) for arg in (program, *command[1:]))


def _quote(arg: str) -> str:
    """Shell quoting, but leaving ``{port}``-style placeholders readable."""
    return arg if _PLAIN.fullmatch(arg) else shlex.quote(arg)


def _shown_listens(endpoints: tuple[str, ...], if_available: tuple[str, ...]) -> str:
    """A listener list as written, the default's ``::1`` ones marked as such."""
    return " + ".join(
        clean(e) + (" (where the host has ::1)" if e in if_available else "")
        for e in endpoints)


def format_config(config: PoolConfig) -> str:
    services = config.services
    low, high = config.port_range
    lines = [
        f"{clean(config.path)}: OK — listen "
        f"{_shown_listens(config.listen, config.listen_if_available)}, "
        f"admin {_shown_listens(config.admin.listen, config.admin.listen_if_available)}, "
        f"{len(services)} service{'s' if len(services) != 1 else ''}, "
        f"worker ports {low}-{high}",
    ]
    if config.access_log:
        lines.append(f"access log: {clean(config.access_log)}")
    rows = []
    for svc in services:
        workers = (str(svc.workers.min) if svc.workers.min == svc.workers.max
                   else f"{svc.workers.min}-{svc.workers.max}")
        ports = f"ports {','.join(map(str, svc.ports))}" if svc.ports else "-"
        rows.append([svc.name, svc.route, workers, ports, svc.health.path,
                     _shown_command(config, svc)])
    if rows:
        lines.append("")
        lines.extend(format_table(("SERVICE", "ROUTE", "WORKERS", "PORTS", "HEALTH", "COMMAND"),
                                  rows, indent="  ", width=80))
    return "\n".join(lines) + "\n"


def check_config(path: str, out: TextIO, err: TextIO) -> int:
    try:
        config = load(path)
    except ConfigError as e:
        err.write(f"cgipool: configuration error: {clean(e)}\n")
        return 1
    out.write(format_config(config))
    return 0
