"""``cgipool``: the command-line tools (the daemon itself is ``twistd cgipool``).

    cgipool status        [--url URL] [--json]
    cgipool smoke-test    [--url URL]
    cgipool stress-test   [--url URL] [-c N] [-t N] [-d SECONDS]
                          [--path PATH]... | [--service NAME]... | [--all]
    cgipool wait-ready    [--url URL] [--pidfile FILE] [--timeout SECONDS] [--since T]
    cgipool stop          [--pidfile FILE] [--timeout SECONDS]
    cgipool restart       SERVICE [--url URL] [--timeout SECONDS]
    cgipool check-config  [--config etc/pool.yaml]
    cgipool new-service   NAME --lang c|python|csharp|cgi [--route R] [--health P] [--example P]
    cgipool dashboard-shot [--url URL] [--out docs/dashboard.png] [--load SECONDS]

Exit status: 0 on success, 1 on failure, 2 on a usage error.  The commands
themselves are the ``cgipool_tools`` package, which the daemon never imports.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cgipool_tools.client import DEFAULT_URL, UsageError
from cgipool_tools.command import run_on_reactor
from cgipool_tools.command import seconds as _seconds

DEFAULT_PIDFILE = "run/cgipool.pid"
DEFAULT_CONFIG = "etc/pool.yaml"


# -- argument types: a bad value is a clear usage error ----------------------------------


def _int_in(low: int, high: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {span}, got {value}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    from cgipool_tools.stress import DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT, MAX_CONCURRENCY

    parser = argparse.ArgumentParser(
        prog="cgipool",
        description="Command-line tools for a cgipool daemon (run it with `twistd cgipool`).")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def url_option(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", default=None,
                       help="the proxy's address (default: the first listener of --config, "
                            f"else {DEFAULT_URL}); the admin is found from it")
        p.add_argument("--config", default=DEFAULT_CONFIG,
                       help=f"the pool configuration to take the URL from (default: "
                            f"{DEFAULT_CONFIG})")

    p = commands.add_parser("status", help="table of services and workers")
    url_option(p)
    p.add_argument("--json", action="store_true", help="print the raw status JSON")

    p = commands.add_parser("smoke-test", help="request every example of every service")
    url_option(p)
    p.add_argument("--timeout", type=_seconds, default=10.0,
                   help="seconds per request (default: 10)")

    p = commands.add_parser(
        "stress-test", help="load test over keep-alive connections (loopback only)",
        description="Send requests back to back over CONCURRENCY keep-alive connections "
                    "until TOTAL requests are done or DURATION seconds have passed "
                    "(whichever comes first; default -t 1000). Exit status 0 only when no "
                    "request failed.")
    url_option(p)
    p.add_argument("-c", "--concurrency", type=_int_in(1, MAX_CONCURRENCY),
                   default=DEFAULT_CONCURRENCY,
                   help=f"connections, each with one request at a time "
                        f"(default: {DEFAULT_CONCURRENCY}, max {MAX_CONCURRENCY})")
    p.add_argument("-t", "--total", type=_int_in(1), default=None,
                   help="total requests (default: 1000 when no --duration is given)")
    p.add_argument("-d", "--duration", type=_seconds, default=None, help="seconds to run")
    p.add_argument("--path", action="append", default=[], metavar="PATH",
                   help="a path to request (repeatable, round robin), judged by "
                        "--expect-status alone; default: the examples with that status "
                        "of the pool's worker services, judged as each example says")
    p.add_argument("--service", action="append", default=[], metavar="NAME",
                   help="load this service's examples (repeatable; CGI services too)")
    p.add_argument("--all", action="store_true", dest="all_services",
                   help="load the examples of every service, CGI routes included "
                        "(a process per request: slower, and it shows)")
    p.add_argument("--timeout", type=_seconds, default=DEFAULT_TIMEOUT,
                   help=f"seconds per request (default: {DEFAULT_TIMEOUT:g})")
    p.add_argument("--expect-status", type=_int_in(100, 599), default=200,
                   help="load the examples with this status; with --path, the status "
                        "every response must have (default: 200)")

    p = commands.add_parser("wait-ready",
                            help="wait until every service of the daemon is ready")
    url_option(p)
    p.add_argument("--pidfile", default=None,
                   help="fail at once when the daemon named in this file exits")
    p.add_argument("--logfile", default=None,
                   help="log to show on failure (default: cgipool.log next to the pidfile)")
    p.add_argument("--timeout", type=_seconds, default=30.0,
                   help="seconds to wait (default: 30)")
    p.add_argument("--since", type=_seconds, default=None, metavar="UNIX_TIME",
                   help="report the time to ready from this moment (make start-bg: "
                        "when it started twistd) instead of from this command's start")

    p = commands.add_parser("stop", help="stop the background daemon and all its workers")
    p.add_argument("--pidfile", default=DEFAULT_PIDFILE,
                   help=f"the daemon's pidfile (default: {DEFAULT_PIDFILE})")
    p.add_argument("--timeout", type=_seconds, default=30.0,
                   help="seconds before SIGKILL (default: 30)")

    p = commands.add_parser("reload", help="re-read the daemon's configuration file "
                                           "(added services start, removed ones drain, "
                                           "changed ones roll)")
    url_option(p)

    p = commands.add_parser(
        "restart", help="rolling restart of one service (no request fails)",
        description="Replace every worker of SERVICE one at a time, each replacement "
                    "ready before the old worker drains, and wait until it is done. "
                    "(The whole daemon: make restart.)")
    p.add_argument("service", help="the service's name (see cgipool status)")
    url_option(p)
    p.add_argument("--timeout", type=_seconds, default=120.0,
                   help="seconds to wait for the end (default: 120)")

    p = commands.add_parser(
        "new-service", help="scaffold services/NAME/ (source and service.yaml)",
        description="Write services/NAME/ with a working source file and its manifest "
                    "(route, health check, examples). Refuses to overwrite. Then: make all, "
                    "make reload.")
    p.add_argument("name", help="lower-case letters, digits and '-' (names the folder, "
                                "binary and default route /api/NAME)")
    p.add_argument("--lang", required=True, choices=("c", "python", "csharp", "cgi"),
                   help="c (epoll worker), python (stdlib worker), csharp (.NET/Mono "
                        "worker) or cgi (a script run per request)")
    p.add_argument("--route", default=None, help="route prefix (default: /api/NAME)")
    p.add_argument("--health", default=None, help="health check path of a worker")
    p.add_argument("--example", action="append", default=[], metavar="PATH",
                   help="an example request (repeatable; default: one per language)")
    p.add_argument("--services-dir", default="services",
                   help="the services folder (default: ./services)")

    p = commands.add_parser("check-config", help="validate a pool configuration")
    p.add_argument("--config", "-c", default=DEFAULT_CONFIG,
                   help=f"the pool configuration (default: {DEFAULT_CONFIG})")
    from cgipool_tools.screenshot import add_command
    add_command(commands)  # dashboard-shot
    return parser


# -- running ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, or a usage error (already printed)
        return e.code if isinstance(e.code, int) else 2
    out, err = sys.stdout, sys.stderr
    try:
        return _dispatch(args, out, err)
    except UsageError as e:
        err.write(f"cgipool {args.command}: error: {e}\n")
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1


def _dispatch(args: argparse.Namespace, out: Any, err: Any) -> int:
    from cgipool_tools.client import parse_url, resolve_url

    command = args.command
    if hasattr(args, "url"):
        args.url = resolve_url(args.url, getattr(args, "config", None))
    if getattr(args, "run", None) is not None:  # dashboard-shot
        return args.run(args, out, err)
    if command == "check-config":
        from cgipool_tools.check_config import check_config

        return check_config(args.config, out, err)
    if command == "new-service":
        from cgipool_tools.scaffold import run_new_service

        return run_new_service(args.name, args.lang, args.services_dir, args.route,
                               args.health, args.example, out, err)
    if command == "stop":
        from cgipool_tools.daemon import stop

        return stop(args.pidfile, args.timeout, out, err)

    parse_url(args.url)  # a bad --url is a usage error before any reactor runs
    if command == "status":
        from cgipool_tools.status import run_status

        return run_on_reactor(lambda r: run_status(r, args.url, args.json, out, err))
    if command == "reload":
        from cgipool_tools.reload import run_reload

        return run_on_reactor(lambda r: run_reload(r, args.url, out, err))
    if command == "restart":
        from cgipool_tools.restart import run_restart

        return run_on_reactor(lambda r: run_restart(r, args.url, args.service, out, err,
                                                    args.timeout))
    if command == "smoke-test":
        from cgipool_tools.smoke import run_smoke

        return run_on_reactor(lambda r: run_smoke(r, args.url, out, err, args.timeout))
    if command == "wait-ready":
        from cgipool_tools.daemon import wait_ready

        return run_on_reactor(lambda r: wait_ready(
            r, args.url, args.pidfile, args.timeout, out, err, args.logfile,
            since=args.since))
    if command == "stress-test":
        from cgipool_tools.stress import run_stress, stress_options

        options = stress_options(args.url, args.concurrency, args.total, args.duration,
                                 args.path, args.timeout, args.expect_status,
                                 args.service, args.all_services)
        return run_on_reactor(lambda r: run_stress(r, options, out, err, handle_sigint=True))
    raise AssertionError(command)


if __name__ == "__main__":
    sys.exit(main())
