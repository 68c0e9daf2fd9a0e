"""``make bench``: cgipool's data path against direct, nginx and Twisted's own ceiling.

One invocation builds nothing itself (the Makefile builds ``build/search.cgi``
first), then starts, all on 127.0.0.1:

* the cgipool daemon (``twistd -n cgipool``, ``bench/pool.yaml``), which spawns
  the two C search workers on the fixed ports 19101-19102 (and a bulk-data
  worker for the body checks); every other path reaches *those* workers:
* ``cgipool-busy`` -- a second daemon, the same pool with ``busy_poll_us: 200``
  (its own two search workers on 19111-19112, the same binary): what busy
  polling buys in latency and costs in CPU;
* ``direct``  -- wrk straight to one search worker;
* ``nginx``   -- 1 worker process, keep-alive upstreams (when installed);
* ``hello``   -- a twisted.web resource answering the JSON itself;
* ``rproxy``  -- twisted.web.proxy.ReverseProxyResource;
* ``agent``   -- twisted.web.client.Agent + HTTPConnectionPool;
* ``relay``   -- a do-nothing Twisted byte relay: the floor of any proxy on
  this reactor and interpreter (not HTTP-aware, shown for reference);

measures each with the same load generator (wrk -t1, else bench/loadgen.py):
req/s, p50, p99 at 50 connections and p50/p99 at 1 connection; then the
capacity checks against cgipool (10,000 idle keep-alive clients, a 1 GB
download with a paused reader, a 1 GB upload).  Prints a table with the
targets of issue 5 and PASS/FAIL and writes ``bench/results/latest.md`` and
``latest.png``.  Every process started here is stopped at the end, also on
Ctrl-C, SIGTERM or an error.

``--quick`` is the CI smoke mode: short runs, small sizes, no verdicts on
timings (exit status 1 only when the harness itself fails).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import big  # noqa: E402
import chart  # noqa: E402

HOST = "127.0.0.1"
WORKER_PORTS = (19101, 19102)
BUSY_WORKER_PORTS = (19111, 19112)
#: busy_poll_us of the cgipool-busy daemon.
BUSY_POLL_US = 200
PORTS = {"cgipool": 18080, "rproxy": 18081, "hello": 18082, "agent": 18083, "nginx": 18084,
         "relay": 18085, "cgipool-busy": 18086,
         # The two daemons' admin listeners (admin.listen; nothing is measured there).
         "cgipool-admin": 18087, "cgipool-busy-admin": 18088}
QUERY = "/?q=bench"
PATHS = {"direct": QUERY, "cgipool": "/api/search" + QUERY}
ORDER = ("direct", "nginx", "relay", "cgipool", "cgipool-busy", "hello", "rproxy", "agent")
LABELS = {
    "direct": "direct to one worker",
    "nginx": "nginx, 1 worker, keepalive upstreams",
    "cgipool": "cgipool",
    "cgipool-busy": f"cgipool, busy_poll_us: {BUSY_POLL_US}",
    "hello": "twisted.web hello resource (no proxying)",
    "rproxy": "twisted.web.proxy.ReverseProxyResource",
    "agent": "Agent + HTTPConnectionPool proxy",
    "relay": "do-nothing Twisted byte relay (the floor)",
}
MB = 1 << 20

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    upstream search {{
        server 127.0.0.1:{p1};
        server 127.0.0.1:{p2};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location / {{
            proxy_pass http://search;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""


class HarnessError(Exception):
    pass


# -- processes -----------------------------------------------------------------------


class Processes:
    """Every process the bench starts, each in its own session; all stopped at the end."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes], float]] = []

    def start(self, name: str, argv: Sequence[str], stop_timeout: float = 5.0,
              **kwargs: Any) -> subprocess.Popen[bytes]:
        log = open(os.path.join(self.log_dir, f"{name}.log"), "wb")
        proc = subprocess.Popen(list(argv), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=ROOT, **kwargs)
        log.close()
        self.procs.append((name, proc, stop_timeout))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        try:
            with open(os.path.join(self.log_dir, f"{name}.log"), "rb") as f:
                return b"\n".join(f.read().splitlines()[-lines:]).decode("utf-8", "replace")
        except OSError:
            return ""

    def stop_all(self) -> None:
        """SIGTERM to each process group (newest first), SIGKILL after its timeout."""
        while self.procs:
            name, proc, timeout = self.procs.pop()
            if proc.poll() is not None:
                continue
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"bench: {name} (pid {proc.pid}) ignored SIGTERM; killing it",
                      file=sys.stderr)
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise HarnessError(f"exited with status {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except Exception as e:  # noqa: BLE001 - anything: try again
            last = e
        time.sleep(0.05)
    raise HarnessError(f"{url} did not answer 200 within {timeout:g} s ({last})")


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)


def bench_config(path: str, busy_poll_us: int = 0) -> str:
    """bench/pool.yaml with an absolute base_dir and, when this cgipool has
    per-worker ``concurrency`` (the C workers serve many requests at once), a
    generous one, written next to the logs.  With ``busy_poll_us``: the
    cgipool-busy daemon's pool (its own port and workers, no bulk worker)."""
    import yaml

    from cgipool.config import ServiceConfig

    with open(os.path.join(HERE, "pool.yaml")) as f:
        config = yaml.safe_load(f)
    config["base_dir"] = ROOT
    if "concurrency" in {a.name for a in ServiceConfig.__attrs_attrs__}:  # type: ignore
        config["services"]["search"]["concurrency"] = 1024
        config["services"]["blob"]["concurrency"] = 16
    if busy_poll_us:
        config["busy_poll_us"] = busy_poll_us
        config["listen"] = f"tcp:{PORTS['cgipool-busy']}:interface={HOST}:backlog=1024"
        config["admin"] = {"listen": f"tcp:{PORTS['cgipool-busy-admin']}:interface={HOST}"}
        config["services"]["search"]["ports"] = list(BUSY_WORKER_PORTS)
        del config["services"]["blob"]
    with open(path, "w") as f:
        yaml.safe_dump(config, f)
    return path


# -- load ------------------------------------------------------------------------------


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


def _seconds(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise HarnessError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse_wrk(output: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    total = re.search(r"(\d+) requests in", output)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    if not (rps and total and p50 and p99):
        raise HarnessError(f"cannot read wrk's output:\n{output}")
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    if non2xx:
        errors += int(non2xx.group(1))
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                        r"timeout (\d+)", output)
    if sockets:
        errors += sum(int(n) for n in sockets.groups())
    return {"rps": float(rps.group(1)), "requests": int(total.group(1)),
            "p50": _seconds(p50.group(1)), "p99": _seconds(p99.group(1)), "errors": errors}


class Load:
    """wrk -t1 when installed, else the built-in generator (bench/loadgen.py)."""

    def __init__(self, kind: str) -> None:
        wrk = shutil.which("wrk")
        if kind == "wrk" and wrk is None:
            raise HarnessError("--loadgen wrk: wrk is not installed (apt-get install wrk)")
        self.wrk = wrk if kind in ("auto", "wrk") else None
        self.name = "wrk -t1" if self.wrk else "built-in (bench/loadgen.py)"

    def run(self, url: str, connections: int, seconds: float) -> dict[str, Any]:
        if self.wrk:
            argv = [self.wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s",
                    "--latency", "--timeout", "5s", url]
            out = subprocess.run(argv, capture_output=True, text=True,
                                 timeout=seconds + 60)
            if out.returncode != 0:
                raise HarnessError(f"wrk failed: {out.stderr.strip()}")
            return parse_wrk(out.stdout)
        out = subprocess.run(
            [sys.executable, os.path.join(HERE, "loadgen.py"), url, str(connections),
             str(seconds)], capture_output=True, text=True, timeout=seconds + 60, cwd=ROOT)
        if out.returncode != 0:
            raise HarnessError(f"loadgen failed: {out.stderr.strip()[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])


# -- the run ------------------------------------------------------------------------------


def start_all(procs: Processes, args: argparse.Namespace, log_dir: str) -> dict[str, str]:
    """Start the daemon and the baselines; returns name -> URL of each path."""
    needed = [*WORKER_PORTS, *BUSY_WORKER_PORTS, 19103, *PORTS.values()]
    busy = [p for p in needed if not port_free(p)]
    if busy:
        raise HarnessError(f"port(s) {busy} on {HOST} are in use: is a bench already "
                           "running? (ps -eo pid,args | grep -E 'twistd|cgi|nginx')")
    if not os.access(os.path.join(ROOT, "build", "search.cgi"), os.X_OK):
        raise HarnessError("build/search.cgi is missing: run `make all` (make bench does)")
    urls = {"direct": f"http://{HOST}:{WORKER_PORTS[0]}{QUERY}"}
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    config = bench_config(os.path.join(log_dir, "pool.yaml"))
    daemon = procs.start("cgipool", [twistd, "-n", "--pidfile=", "--logfile",
                                     os.path.join(log_dir, "cgipool-twistd.log"),
                                     "cgipool", "--config", config], stop_timeout=15)
    base = f"http://{HOST}:{PORTS['cgipool']}"
    try:
        wait_http(base + "/api/search" + QUERY, 30, daemon)
        wait_http(base + "/api/blob/?q=health", 30, daemon)
    except HarnessError as e:
        raise HarnessError(f"cgipool: {e}\n"
                           f"{procs.log_tail('cgipool')}") from None
    urls["cgipool"] = base + "/api/search" + QUERY
    args.daemon_pid = daemon.pid
    args.pids = {"cgipool": daemon.pid}
    busy_config = bench_config(os.path.join(log_dir, "pool-busy.yaml"), BUSY_POLL_US)
    busy_daemon = procs.start("cgipool-busy", [twistd, "-n", "--pidfile=", "--logfile",
                                        os.path.join(log_dir, "cgipool-busy-twistd.log"),
                                               "cgipool", "--config", busy_config],
                              stop_timeout=15)
    url = f"http://{HOST}:{PORTS['cgipool-busy']}/api/search{QUERY}"
    try:
        wait_http(url, 30, busy_daemon)
    except HarnessError as e:
        raise HarnessError(f"cgipool-busy: {e}\n{procs.log_tail('cgipool-busy')}") from None
    urls["cgipool-busy"] = url
    args.pids["cgipool-busy"] = busy_daemon.pid
    for kind in ("relay", "hello", "rproxy", "agent"):
        port = PORTS[kind]
        proc = procs.start(kind, [sys.executable, os.path.join(HERE, "servers.py"), kind,
                                  str(port), *map(str, WORKER_PORTS)])
        url = f"http://{HOST}:{port}{QUERY}"
        try:
            wait_http(url, 15, proc)
        except HarnessError as e:
            raise HarnessError(f"{kind}: {e}\n{procs.log_tail(kind)}") from None
        urls[kind] = url
        args.pids[kind] = proc.pid
    nginx = find_nginx() if args.nginx else None
    if nginx is None:
        args.notes.append("nginx: not installed, skipped (apt-get install nginx-light)"
                          if args.nginx else "nginx: skipped (--no-nginx)")
    else:
        ndir = os.path.join(log_dir, "nginx")
        os.makedirs(ndir, exist_ok=True)
        conf = os.path.join(ndir, "nginx.conf")
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(dir=ndir, p1=WORKER_PORTS[0], p2=WORKER_PORTS[1],
                                      port=PORTS["nginx"]))
        proc = procs.start("nginx", [nginx, "-c", conf, "-p", ndir])
        url = f"http://{HOST}:{PORTS['nginx']}{QUERY}"
        try:
            wait_http(url, 15, proc)
            urls["nginx"] = url
            args.pids["nginx"] = proc.pid  # the master: its worker's CPU is counted
        except HarnessError as e:
            args.notes.append(f"nginx: did not start ({e}); skipped")
    return urls


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of the process serving a path (nginx: of its
    workers; the C workers behind a proxy are not counted)."""
    if pid is None:
        return None
    try:
        import psutil

        proc = psutil.Process(pid)
        procs = proc.children() if proc.name() == "nginx" else [proc]
        return sum(p.cpu_times().user + p.cpu_times().system for p in procs)
    except Exception:  # noqa: BLE001 - psutil missing or the process gone
        return None


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each number over the rounds (errors and requests: summed)."""
    out: dict[str, Any] = {"rounds": len(runs)}
    for key in ("rps", "p50", "p99"):
        values = sorted(r[key] for r in runs)
        out[key] = statistics.median(values)
    out["requests"] = sum(r["requests"] for r in runs)
    out["errors"] = sum(r["errors"] for r in runs)
    cpu = [r["cpu_us"] for r in runs if r.get("cpu_us") is not None]
    out["cpu_us"] = statistics.median(cpu) if cpu else None
    return out


def measure(urls: dict[str, str], load: Load, args: argparse.Namespace) -> dict[str, Any]:
    """Every path in turn, ``rounds`` times (the median counts): on a shared
    machine, load from elsewhere then hits every path alike."""
    names = [name for name in ORDER if name in urls]
    for name in names:
        load.run(urls[name], args.connections, args.warmup)  # warm-up, not counted
    busy: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    single: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    per_round = args.duration / args.rounds
    per_round_single = args.latency_duration / args.rounds
    for i in range(args.rounds):
        print(f"bench: round {i + 1}/{args.rounds}: {', '.join(names)}: {per_round:g} s at "
              f"{args.connections} connections, {per_round_single:g} s at 1", flush=True)
        for name in names:
            before = cpu_seconds(args.pids.get(name))
            run = load.run(urls[name], args.connections, per_round)
            after = cpu_seconds(args.pids.get(name))
            if before is not None and after is not None and run["requests"]:
                run["cpu_us"] = (after - before) / run["requests"] * 1e6
            busy[name].append(run)
            single[name].append(load.run(urls[name], 1, per_round_single))
    return {name: {"busy": _median_run(busy[name]), "single": _median_run(single[name])}
            for name in names}


def parse_ab(output: str) -> dict[str, Any]:
    """ApacheBench's summary: requests done, failed, kept alive, req/s."""
    def number(label: str) -> float:
        match = re.search(rf"^{label}:\s+([\d.]+)", output, re.M)
        if match is None:
            raise HarnessError(f"cannot read {label!r} in ab's output:\n{output[-2000:]}")
        return float(match.group(1))
    return {"requests": int(number("Complete requests")),
            "failed": int(number("Failed requests")),
            "non_2xx": int(re.search(r"^Non-2xx responses:\s+(\d+)", output, re.M).group(1))
            if "Non-2xx responses" in output else 0,
            "keep_alive": int(number("Keep-Alive requests")),
            "rps": number("Requests per second")}


def parse_h2load(output: str) -> dict[str, Any]:
    """h2load's summary: requests done, succeeded, failed, req/s."""
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output)
    counts = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                       r"(\d+) failed, (\d+) errored", output)
    if rate is None or counts is None:
        raise HarnessError(f"cannot read h2load's output:\n{output[-2000:]}")
    return {"requests": int(counts.group(3)), "succeeded": int(counts.group(4)),
            "failed": int(counts.group(5)) + int(counts.group(6)),
            "rps": float(rate.group(1))}


def run_http10(args: argparse.Namespace) -> dict[str, Any] | None:
    """HTTP/1.0 keep-alive (issue 16): ``ab -k`` (HTTP/1.0 with ``Connection:
    keep-alive``) against ``h2load --h1`` (HTTP/1.1) on the same route and
    connection count, alternating, medians; None when either is not installed."""
    ab, h2load = shutil.which("ab"), shutil.which("h2load")
    if ab is None or h2load is None:
        args.notes.append("HTTP/1.0 keep-alive not measured: needs ab and h2load "
                          "(apt-get install apache2-utils nghttp2-client)")
        return None
    url = f"http://{HOST}:{PORTS['cgipool']}/api/search{QUERY}"
    seconds = max(1, round(args.duration / args.rounds))
    runs: dict[str, list[dict[str, Any]]] = {"ab": [], "h2load": []}
    print(f"bench: HTTP/1.0 keep-alive: ab -k and h2load --h1, {args.connections} "
          f"connections, {args.rounds} x {seconds} s each", flush=True)
    for _ in range(args.rounds):
        out = subprocess.run([ab, "-q", "-k", "-r", "-c", str(args.connections), "-t",
                              str(seconds), "-n", "10000000", url],
                             capture_output=True, text=True, timeout=seconds + 60)
        runs["ab"].append(parse_ab(out.stdout))
        out = subprocess.run([h2load, "--h1", "-c", str(args.connections), "-t", "1", "-D",
                              str(seconds), url],
                             capture_output=True, text=True, timeout=seconds + 60)
        runs["h2load"].append(parse_h2load(out.stdout))
    return {name: sorted(r, key=lambda run: run["rps"])[len(r) // 2]
            for name, r in runs.items()}


def run_big(args: argparse.Namespace) -> dict[str, Any]:
    pid, port = args.daemon_pid, PORTS["cgipool"]
    out: dict[str, Any] = {}
    print(f"bench: {args.idle} idle keep-alive connections", flush=True)
    out["idle"] = big.idle_connections(HOST, port, pid, args.idle,
                                       b"/api/search" + QUERY.encode(), hold=args.hold)
    size = args.body_mb * MB
    print(f"bench: {args.body_mb} MB response (reader paused once)", flush=True)
    out["download"] = big.big_response(HOST, port, pid, b"/api/blob/?bytes=%d" % size, size,
                                       pause=args.hold / 2)
    print(f"bench: {args.body_mb} MB upload", flush=True)
    out["upload"] = big.big_upload(HOST, port, pid, b"/api/blob/", size)
    return out


# -- verdicts and report ------------------------------------------------------------------


def targets(results: dict[str, Any], capacity: dict[str, Any] | None,
            args: argparse.Namespace) -> list[tuple[str, str, str, bool | None]]:
    """(target, measured, goal, passed) rows; passed None when not measurable."""
    rows: list[tuple[str, str, str, bool | None]] = []
    cg = results.get("cgipool")

    def ratio(other: str, goal: float) -> None:
        if cg is None or other not in results or not results[other]["busy"]["rps"]:
            rows.append((f"throughput cgipool / {other}", "-", f">= {goal}", None))
            return
        value = cg["busy"]["rps"] / results[other]["busy"]["rps"]
        rows.append((f"throughput cgipool / {other}", f"{value:.2f}x", f">= {goal}x",
                     value >= goal))

    ratio("rproxy", 2.5)
    ratio("hello", 0.6)
    # Latency is judged with busy polling on (the setting for latency; it costs
    # CPU, see cgipool/busypoll.py); the defaults and the relay are shown beside it.
    judged = "cgipool-busy" if "cgipool-busy" in results else "cgipool"
    for q, goal in (("p50", 150e-6), ("p99", 1e-3)):
        if judged not in results or "direct" not in results:
            rows.append((f"added {q} at 1 connection", "-", "", None))
            continue
        direct = results["direct"]["single"][q]
        for name, label, verdict in (
                (judged, f"added {q} at 1 connection ({LABELS[judged]})", True),
                ("cgipool", f"(reference) added {q} of cgipool with busy polling off", False),
                ("relay", f"(reference) added {q} of the do-nothing Twisted relay", False)):
            if name not in results or (not verdict and name == judged):
                continue
            added = results[name]["single"][q] - direct
            shown = f"{added * 1e6:.0f} µs" + (" (direct's own was higher: noise)"
                                               if added < 0 else "")
            rows.append((label, shown, f"<= {goal * 1e6:.0f} µs" if verdict else "",
                         added <= goal if verdict else None))
    http10 = results.get("http10")
    if http10:
        ab, h1 = http10["ab"], http10["h2load"]
        value = ab["rps"] / h1["rps"] if h1["rps"] else 0.0
        kept = ab["keep_alive"] == ab["requests"] and ab["requests"] > 0
        rows.append(("HTTP/1.0 keep-alive: ab -k / h2load --h1 (req/s)",
                     f"{value:.2f}x ({ab['rps']:,.0f} / {h1['rps']:,.0f})", ">= 0.9x",
                     value >= 0.9 and kept))
        rows.append(("ab -k: requests on kept connections",
                     f"{ab['keep_alive']:,} of {ab['requests']:,} ({ab['failed']} failed, "
                     f"{ab['non_2xx']} non-2xx)", "all", kept and not ab["non_2xx"]))
    if capacity:
        idle = capacity["idle"]
        ok = idle["alive"] == idle["connections"] and idle["rss"] <= 200 * MB \
            and idle["fresh_status"] == 200
        rows.append((f"{idle['connections']:,} idle keep-alive clients: daemon RSS",
                     f"{idle['rss'] / MB:.0f} MB ({idle['alive']:,} alive)", "<= 200 MB",
                     ok))
        down = capacity["download"]
        ok = down["status"] == 200 and down["bytes"] == down["size"] \
            and down["growth"] <= 50 * MB
        rows.append((f"{down['size'] // MB} MB response: daemon RSS growth",
                     f"{down['growth'] / MB:.1f} MB ({down['size'] / MB / down['seconds']:.0f}"
                     " MB/s)", "<= 50 MB", ok))
        up = capacity["upload"]
        ok = up["status"] == 200 and f'"received": {up["size"]}' in up["body"] \
            and up["growth"] <= 50 * MB
        rows.append((f"{up['size'] // MB} MB upload: daemon RSS growth",
                     f"{up['growth'] / MB:.1f} MB ({up['size'] / MB / up['seconds']:.0f}"
                     " MB/s)", "<= 50 MB", ok))
    return rows


def broken(capacity: dict[str, Any]) -> str:
    """What went wrong in the capacity checks, apart from memory ('' if nothing)."""
    idle, down, up = capacity["idle"], capacity["download"], capacity["upload"]
    if idle["alive"] != idle["connections"] or idle["fresh_status"] != 200:
        return f"idle connections: {idle}"
    if down["status"] != 200 or down["bytes"] != down["size"]:
        return f"download: {down}"
    if up["status"] != 200 or f'"received": {up["size"]}' not in up["body"]:
        return f"upload: {up}"
    return ""


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f}"


def report(results: dict[str, Any], rows: list[tuple[str, str, str, bool | None]],
           load: Load, args: argparse.Namespace) -> str:
    direct = results.get("direct")
    lines = [
        f"# cgipool bench{' (quick smoke run: timings not judged)' if args.quick else ''}",
        "",
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {platform.python_implementation()}"
        f" {platform.python_version()}, {os.cpu_count()} cores, load generator {load.name}, "
        f"{args.connections} connections for {args.duration:g} s, 1 connection for "
        f"{args.latency_duration:g} s, in {args.rounds} interleaved round(s) (medians); "
        f"git {_git_rev()}.",
        "",
        f"| path | req/s ({args.connections} conn) | p50 ms | p99 ms | p50 ms (1 conn) "
        "| p99 ms (1 conn) | added p50 µs | CPU µs/request | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in ORDER:
        r = results.get(name)
        if r is None:
            continue
        busy, single = r["busy"], r["single"]
        added = "-" if direct is None or name == "direct" else \
            f"{(single['p50'] - direct['single']['p50']) * 1e6:.0f}"
        label = f"**{LABELS[name]}**" if name.startswith("cgipool") else LABELS[name]
        cpu = "-" if busy.get("cpu_us") is None else f"{busy['cpu_us']:.0f}"
        lines.append(f"| {label} | {busy['rps']:,.0f} | {_ms(busy['p50'])} | "
                     f"{_ms(busy['p99'])} | {_ms(single['p50'])} | {_ms(single['p99'])} | "
                     f"{added} | {cpu} | {busy['errors'] + single['errors']} |")
    lines += ["", "| target | measured | goal | result |", "|---|---:|---:|---|"]
    for target, value, goal, ok in rows:
        verdict = "-" if ok is None else ("PASS" if ok else "FAIL")
        if args.quick and ok is not None:
            verdict += " (not judged)"
        lines.append(f"| {target} | {value} | {goal} | {verdict} |")
    if args.notes:
        lines += [""] + [f"- {note}" for note in args.notes]
    lines += ["", "![req/s](latest.png)" if not args.quick else ""]
    return "\n".join(lines).rstrip() + "\n"


def _git_rev() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, cwd=ROOT, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, cwd=ROOT, timeout=5).stdout
        return rev + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "?"


def write_outputs(text: str, results: dict[str, Any], args: argparse.Namespace) -> None:
    os.makedirs(args.out, exist_ok=True)
    stem = "quick" if args.quick else "latest"
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, f"{stem}.json"), "w") as f:
        json.dump(results, f, indent=1, default=str)
    hello = results.get("hello", {}).get("busy", {}).get("rps")
    bars = []
    for name in ORDER:
        if name in results:
            rps = results[name]["busy"]["rps"]
            extra = f" ({rps / hello:.2f}x hello)" if name == "cgipool" and hello else ""
            bars.append((name, rps, f"{rps:,.0f}{extra}"))
    png = chart.bar_chart(f"REQ/S, {args.connections} CONNECTIONS, WRK -T1"
                          if args.loadgen_name.startswith("wrk")
                          else f"REQ/S, {args.connections} CONNECTIONS", bars)
    with open(os.path.join(args.out, f"{stem}.png"), "wb") as f:
        f.write(png)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="CI smoke mode: ~1 s runs, small sizes, timings not judged")
    p.add_argument("--duration", type=float, default=12.0,
                   help="seconds at 50 connections (over all rounds)")
    p.add_argument("--latency-duration", type=float, default=6.0,
                   help="seconds at 1 connection (over all rounds)")
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=3,
                   help="every path is measured this often, in turn; medians count")
    p.add_argument("-c", "--connections", type=int, default=50)
    p.add_argument("--loadgen", choices=("auto", "wrk", "builtin"), default="auto")
    p.add_argument("--no-nginx", dest="nginx", action="store_false")
    p.add_argument("--no-big", dest="big", action="store_false",
                   help="skip the idle-connection and 1 GB body checks")
    p.add_argument("--only-big", action="store_true", help="only those checks")
    p.add_argument("--idle", type=int, default=10000, help="idle keep-alive clients")
    p.add_argument("--body-mb", type=int, default=1024, help="body size of the body checks")
    p.add_argument("--hold", type=float, default=2.0,
                   help="seconds the idle clients are held (and the reader pauses: half)")
    p.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.latency_duration, args.warmup, args.rounds = 1.0, 1.0, 0.3, 1
        args.idle, args.body_mb, args.hold = min(args.idle, 200), min(args.body_mb, 16), 0.4
    args.notes = []
    args.pids = {}
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)

    def terminated(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    # Also when started in the background, where SIGINT comes in ignored.
    signal.signal(signal.SIGINT, terminated)
    log_dir = tempfile.mkdtemp(prefix="cgipool-bench-")
    procs = Processes(log_dir)
    failed = False
    try:
        load = Load(args.loadgen)
        args.loadgen_name = load.name
        urls = start_all(procs, args, log_dir)
        results: dict[str, Any] = {}
        if not args.only_big:
            results = measure(urls, load, args)
            http10 = run_http10(args)
            if http10:
                results["http10"] = http10
        capacity = run_big(args) if args.big or args.only_big else None
        if capacity:
            results["capacity"] = capacity
        rows = targets(results, capacity, args)
        text = report(results, rows, load, args)
        print()
        print(text)
        if not args.only_big:
            write_outputs(text, results, args)
        for name, r in results.items():
            if name not in ("capacity", "http10") and r["busy"]["requests"] == 0:
                print(f"bench: {name} answered no request", file=sys.stderr)
                failed = True
        cg = results.get("cgipool")
        if cg is not None and cg["busy"]["errors"] + cg["single"]["errors"]:
            print("bench: cgipool answered errors (see the table)", file=sys.stderr)
            failed = True
        if capacity and broken(capacity):
            print(f"bench: a capacity check did not work: {broken(capacity)}", file=sys.stderr)
            failed = True
        if args.strict and not args.quick:
            failed = failed or any(ok is False for *_, ok in rows)
    except HarnessError as e:
        print(f"bench: {e}", file=sys.stderr)
        failed = True
    except KeyboardInterrupt:
        print("bench: interrupted; stopping every process", file=sys.stderr)
        failed = True
    finally:
        procs.stop_all()
        if failed:
            print(f"bench: logs kept in {log_dir}", file=sys.stderr)
        else:
            shutil.rmtree(log_dir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
