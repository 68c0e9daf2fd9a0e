"""``make bench-elastic``: how fast and how safely the pools heal and change under load.

Starts one cgipool daemon (``twistd -n cgipool``) with the C search service on
127.0.0.1, drives it with the built-in load generator (cgipool's stress test,
keep-alive connections) and measures, from the daemon's own event log:

1. **scale-up reaction**: slow requests (``?delay_ms=``) on many connections;
   seconds from the load's start to the first ``scale`` decision and to the
   pool being at ``workers.max`` with every worker ready; then, idle, the
   seconds until it is back at ``workers.min``;
2. **replacement after kill -9**: a ready worker SIGKILLed (several times);
   milliseconds from its ``crash`` event to the slot's next ``ready``;
3. **chaos**: a random worker SIGKILLed every 300 ms for 10 s under load;
   requests answered and failed;
4. **rolling restart** (admin API) and 5. **reload** (changed ``env``, then
   ``POST /admin/api/reload``) under load: duration and failed requests.

Prints a table and writes ``bench/results/elastic.md``.  ``--quick`` shortens
every phase (the CI smoke run keeps the harness working; no verdicts).
Every process started here is stopped at the end, also on errors.
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from twisted.internet import defer, task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from cgipool_tools.client import HttpClient, fetch_status, parse_url  # noqa: E402
from cgipool_tools.stress import StressRun, stress_options, stress_test  # noqa: E402

CONFIG = """\
listen: "tcp:{port}:interface=127.0.0.1"
admin: {{listen: "tcp:{admin_port}:interface=127.0.0.1"}}
base_dir: {root}
port_range: "{low}-{high}"
services:
  search:
    command: ["build/search.cgi", "{{port}}"]
    route: /api/search
    workers: {{min: 2, max: 6}}
    concurrency: 2
    queue: {{max: 1000, timeout: 10}}
    autoscale: {{cooldown: {cooldown}, down_interval: 0.5}}
    health: {{path: "/?q=health", interval: 1, timeout: 1, fall: 2}}
    env: {{GENERATION: "{generation}"}}
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Bench:
    def __init__(self, reactor: Any, quick: bool, config: str = CONFIG) -> None:
        self.reactor = reactor
        self.config = config
        self.quick = quick
        self.folder = tempfile.mkdtemp(prefix="cgipool-elastic-")
        self.config_path = os.path.join(self.folder, "pool.yaml")
        self.port = free_port()
        self.admin_port = free_port()  # the admin's own listener (the tools find it)
        self.url = f"http://127.0.0.1:{self.port}"
        low = 20000 + random.Random().randrange(0, 20000)
        self.ports = (low, low + 63)
        self.cooldown = 2 if quick else 5
        self.process: subprocess.Popen[bytes] | None = None
        self.client = HttpClient(reactor, parse_url(self.url), timeout=10)
        self.rows: list[tuple[str, str, str]] = []

    # -- the daemon --------------------------------------------------------------------

    def write_config(self, generation: int) -> None:
        text = self.config.format(port=self.port, admin_port=self.admin_port, root=ROOT,
                                  low=self.ports[0],
                             high=self.ports[1], cooldown=self.cooldown,
                             generation=generation)
        with open(self.config_path + ".new", "w") as f:
            f.write(text)
        os.replace(self.config_path + ".new", self.config_path)

    async def start(self) -> None:
        self.write_config(1)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        self.log = open(os.path.join(self.folder, "cgipool.log"), "wb")
        self.process = subprocess.Popen(
            [twistd, "-n", "--pidfile=", "cgipool", "--config", self.config_path],
            cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.time() + 30
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the daemon exited: see {self.log.name}")
            try:
                status = await fetch_status(self.client, 2)
                pool = self.service(status)
                if len(pool["workers"]) and pool["size"]["ready"] >= pool["size"]["min"]:
                    return
            except Exception:
                pass
            await self.sleep(0.1)
        raise RuntimeError("the daemon did not get ready within 30 s")

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()  # its workers die with it (setpriv --pdeathsig)
            process.wait()

    # -- helpers -------------------------------------------------------------------------

    def sleep(self, seconds: float) -> defer.Deferred[None]:
        return task.deferLater(self.reactor, seconds, lambda: None)

    @staticmethod
    def service(status: dict[str, Any]) -> dict[str, Any]:
        return next(s for s in status["services"] if s["name"] == "search")

    async def status(self) -> dict[str, Any]:
        return self.service(await fetch_status(self.client, 5))

    async def events(self, limit: int = 1000) -> list[dict[str, Any]]:
        response = await self.client.get(f"/admin/api/log?limit={limit}")
        return list(reversed(response.json()["events"]))  # oldest first

    async def post(self, path: str) -> Any:
        response = await self.client.get(path, method="POST")
        return response.status, response.json()

    def load(self, path: str, concurrency: int, duration: float) -> tuple[Any, list[Any]]:
        runs: list[StressRun] = []
        options = stress_options(self.url, concurrency=concurrency, duration=duration,
                                 paths=[path], timeout=15)
        d = defer.ensureDeferred(stress_test(self.reactor, options, on_start=runs.append))
        return d, runs

    async def wait(self, predicate: Any, timeout: float, what: str) -> float:
        started = time.time()
        while time.time() - started < timeout:
            if predicate(await self.status()):
                return time.time() - started
            await self.sleep(0.05)
        raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")

    def add(self, what: str, value: str, note: str = "") -> None:
        self.rows.append((what, value, note))
        print(f"  {what:<44} {value:>16}  {note}", flush=True)

    # -- the phases ----------------------------------------------------------------------

    async def scale_up(self) -> None:
        status = await self.status()
        high, low = status["size"]["max"], status["size"]["min"]
        seconds = 6 if self.quick else 10
        started = time.time()
        load, runs = self.load("/api/search?q=step&delay_ms=50", 24, seconds)
        at_max = await self.wait(
            lambda s: s["size"]["ready"] == high and s["size"]["desired"] == high,
            seconds + 5, "the pool at workers.max")
        result = await load
        scale = [e for e in await self.events()
                 if e["kind"] == "scale" and e["time"] >= started]
        first = scale[0]["time"] - started if scale else float("nan")
        self.add("scale-up: first decision after load start", f"{first:.2f} s",
                 scale[0]["message"][:60] if scale else "")
        self.add("scale-up: all workers.max ready after", f"{at_max:.2f} s",
                 f"{low} -> {high} workers")
        self.add("scale-up phase: failed requests", f"{result.failed} / {result.requests}")
        idle = await self.wait(lambda s: s["size"]["desired"] == low and
                               len(s["workers"]) == low, self.cooldown + 20,
                               "the pool back at workers.min")
        self.add("scale-down: back at workers.min after idle", f"{idle:.2f} s",
                 f"cooldown {self.cooldown} s + one worker per 0.5 s")

    async def replacement(self) -> None:
        load, runs = self.load("/api/search?q=kill", 4, 60)
        times = []
        for _ in range(3 if self.quick else 6):
            status = await self.status()
            victim = next(w for w in status["workers"] if w["state"] == "ready")
            killed = time.time()
            os.kill(victim["pid"], signal.SIGKILL)
            await self.wait(lambda s: any(w["id"] == victim["id"] and w["state"] == "ready"
                                          and w["pid"] != victim["pid"]
                                          for w in s["workers"]), 10, "the replacement")
            events = [e for e in await self.events() if e.get("worker") == victim["id"]
                      and e["time"] >= killed - 0.5]
            crash = next(e["time"] for e in events if e["kind"] in ("crash", "exit"))
            ready = next(e["time"] for e in events if e["kind"] == "ready" and e["time"] >= crash)
            times.append((ready - crash) * 1000)
            await self.sleep(1.2)
        runs[0].stop()
        result = await load
        self.add("kill -9 -> replacement ready (median)", f"{statistics.median(times):.0f} ms",
                 f"max {max(times):.0f} ms over {len(times)} kills")
        self.add("kill -9 phase: failed requests", f"{result.failed} / {result.requests}")

    async def chaos(self) -> None:
        seconds = 4 if self.quick else 10
        load, runs = self.load("/api/search?q=chaos", 16, 600)
        rng = random.Random(3)
        kills = 0
        started = time.time()
        for tick in range(1, int(seconds / 0.3) + 1):
            await self.sleep(max(0.0, started + 0.3 * tick - time.time()))
            status = await self.status()
            alive = [w["pid"] for w in status["workers"] if w["pid"]]
            if alive:
                try:
                    os.kill(rng.choice(alive), signal.SIGKILL)
                    kills += 1
                except ProcessLookupError:
                    pass
        runs[0].stop()
        result = await load
        self.add(f"chaos: kill -9 every 300 ms for {seconds} s", f"{kills} kills",
                 f"{result.requests} requests, {result.rate:.0f} req/s")
        self.add("chaos: failed requests", f"{result.failed} / {result.requests}",
                 _errors(result))

    async def rolling(self) -> None:
        load, runs = self.load("/api/search?q=roll", 16, 600)
        await self.sleep(0.5)
        code, body = await self.post("/admin/api/services/search/rolling-restart")
        if code != 202:
            raise RuntimeError(f"rolling restart refused: {code} {body}")
        took = await self.wait(lambda s: not s["rolling_restart"], 60, "the rolling restart")
        runs[0].stop()
        result = await load
        self.add("rolling restart under load: duration", f"{took:.2f} s")
        self.add("rolling restart: failed requests", f"{result.failed} / {result.requests}",
                 _errors(result))

    async def reload(self) -> None:
        before = {w["pid"] for w in (await self.status())["workers"]}
        load, runs = self.load("/api/search?q=reload", 16, 600)
        await self.sleep(0.5)
        self.write_config(2)
        code, body = await self.post("/admin/api/reload")
        if code != 200:
            raise RuntimeError(f"reload refused: {code} {body}")
        await self.sleep(0.2)
        took = await self.wait(lambda s: not s["rolling_restart"], 60, "the reload to roll")
        runs[0].stop()
        result = await load
        after = {w["pid"] for w in (await self.status())["workers"]}
        self.add("reload (env changed) under load: duration", f"{took + 0.2:.2f} s",
                 body["summary"] + ("" if not before & after else " (some pids kept!)"))
        self.add("reload: failed requests", f"{result.failed} / {result.requests}",
                 _errors(result))


def _errors(result: Any) -> str:
    if not result.failed:
        return ""
    return "; ".join(f"{k}: {v}" for k, v in sorted(result.errors.items()))[:80]


def write_report(bench: Bench, path: str) -> None:
    lines = [
        "# cgipool elastic pools: healing and changes under load",
        "",
        f"{datetime.datetime.now().isoformat(timespec='seconds')} · "
        f"{'quick' if bench.quick else 'full'} run · `make bench-elastic` "
        "(bench/elastic.py) · C search workers, built-in load generator, 127.0.0.1",
        "",
        "| measurement | result | note |",
        "|---|---:|---|",
        *[f"| {what} | {value} | {note} |" for what, value, note in bench.rows],
        "",
    ]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines))


async def main(reactor: Any, args: argparse.Namespace) -> None:
    bench = Bench(reactor, args.quick)
    try:
        print(f"cgipool elastic bench ({'quick' if args.quick else 'full'}), daemon on "
              f"{bench.url}", flush=True)
        await bench.start()
        for phase in (bench.scale_up, bench.replacement, bench.chaos, bench.rolling,
                      bench.reload):
            await phase()
    finally:
        await bench.client.close()
        bench.stop()
    write_report(bench, args.out)
    print(f"written to {args.out}")
    if any("failed requests" in what and not value.startswith("0 /")
           for what, value, _ in bench.rows) and not args.quick:
        raise SystemExit(1)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short phases (CI smoke run)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "elastic.md"))
    arguments = parser.parse_args()
    task.react(lambda reactor: defer.ensureDeferred(main(reactor, arguments)))
