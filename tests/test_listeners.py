"""Listeners: ``listen`` and ``admin.listen`` as one endpoint or a list, the
default's IPv6 loopback where the host has it (a notice where it has not), the
proxy's /admin redirect by address family, start-up checks, reload and
check-config."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import textwrap
from typing import Any

import attrs
from twisted.internet import reactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SkipTest, TestCase

from cgipool.config import PoolConfig, load
from cgipool.tap import ListeningService, active_listens, build, has_ipv6_loopback
from cgipool_tools.check_config import format_config
from tests.support import (
    ROOT,
    Daemon,
    port_range,
    require_binaries,
    run_daemon,
    write_config,
)
from tests.test_integration import SEARCH

TWISTD = os.path.join(ROOT, ".venv", "bin", "twistd")
V4 = "tcp:0:interface=127.0.0.1"
V6 = r"tcp6:0:interface=\:\:1"


def ipv6_here() -> bool:
    """The check the brief asks for, independent of the code under test."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def require_ipv6() -> None:
    if not ipv6_here():
        raise SkipTest("this host has no IPv6 loopback (::1)")


def like_the_default(config: PoolConfig) -> PoolConfig:
    """``config`` listening the way the default does (127.0.0.1, and ::1 only
    where it exists), on free ports instead of 8080 and 8081."""
    return attrs.evolve(
        config, listen=(V4, V6), listen_if_available=(V6,),
        admin=attrs.evolve(config.admin, listen=(V4, V6), listen_if_available=(V6,)))


def listeners(top: Any) -> dict[str, Any]:
    return {s.name: s for s in top if isinstance(s, ListeningService)}


async def get(url: str) -> tuple[int, dict[str, list[str]], bytes]:
    """GET without following redirects, with any host literal (treq refuses
    ``[::1]``); no connection is kept."""
    from twisted.web.client import Agent, readBody

    response = await Agent(reactor).request(b"GET", url.encode("ascii"))
    body = await readBody(response)
    headers = {k.decode().lower(): [v.decode() for v in vs]
               for k, vs in response.headers.getAllRawHeaders()}
    return response.code, headers, body


def url(port: Any) -> str:
    address = port.getHost()
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"http://{host}:{address.port}"


class ListenerDaemonTests(TestCase):
    """Real daemons (real workers, real sockets on 127.0.0.1 and ::1)."""

    timeout = 60

    def setUp(self) -> None:
        require_binaries("search.cgi")
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    async def start(self, config: PoolConfig, **options: Any) -> Daemon:
        """Like support.start_daemon, for a config object (not a file)."""
        return await run_daemon(self, build(config, reactor, **options))

    def notices(self) -> list[str]:
        return [e["log_format"] for e in self.events
                if "no IPv6 loopback" in e.get("log_format", "")]

    async def test_a_list_listens_on_each_and_admin_redirects_keep_the_family(self) -> None:
        require_ipv6()
        path = write_config(self, f"listen: ['{V4}', '{V6}']\n"
                                  f"admin: {{listen: ['{V4}', '{V6}']}}\n"
                            + textwrap.dedent(SEARCH))
        with open(path) as f:  # write_config's own listen comes first: drop it
            text = f.read().replace(f'listen: "{V4}"\n', "", 1)
        with open(path, "w") as f:
            f.write(text)
        daemon = await self.start(load(path))
        services = listeners(daemon.top)
        self.assertEqual(sorted(services), ["admin-web", "admin-web-2", "web", "web-2"])
        ports = {name: await s.listening for name, s in services.items()}
        self.assertEqual(ports["web-2"].getHost().host, "::1")
        for name in ("web", "web-2"):
            code, _, body = await get(url(ports[name]) + "/api/search?q=both")
            self.assertEqual((code, json.loads(body)["query"]), (200, "both"), name)
            # The proxy's /admin: the admin listener of the request's family.
            code, headers, _ = await get(url(ports[name]) + "/admin/api/status")
            admin = "admin-web" if name == "web" else "admin-web-2"
            self.assertEqual((code, headers["location"]),
                             (307, [url(ports[admin]) + "/admin/api/status"]))
        for name in ("admin-web", "admin-web-2"):
            code, _, _ = await get(url(ports[name]) + "/admin/api/status")
            self.assertEqual(code, 200, name)
        self.assertEqual(self.notices(), [])

    async def test_the_default_listens_on_ipv6_loopback_on_this_host(self) -> None:
        require_ipv6()
        self.assertTrue(has_ipv6_loopback())
        daemon = await self.start(like_the_default(load(write_config(self, SEARCH))))
        services = listeners(daemon.top)
        self.assertEqual(sorted(services), ["admin-web", "admin-web-2", "web", "web-2"])
        port = await services["web-2"].listening
        self.assertEqual(port.getHost().host, "::1")
        code, _, body = await get(url(port) + "/api/search?q=six")
        self.assertEqual((code, json.loads(body)["query"]), (200, "six"))
        self.assertEqual(self.notices(), [])

    async def test_a_host_without_ipv6_loopback_starts_with_one_notice(self) -> None:
        daemon = await self.start(like_the_default(load(write_config(self, SEARCH))),
                                  loopback6=lambda: False)
        self.assertEqual(sorted(listeners(daemon.top)), ["admin-web", "web"])
        notices = [e for e in self.events if "no IPv6 loopback" in e.get("log_format", "")]
        self.assertEqual(len(notices), 1)
        self.assertEqual(notices[0]["log_level"].name, "info")  # a notice, not an error
        self.assertEqual(notices[0]["skipped"], f"{V6}, {V6}")
        code, _, _ = await get(daemon.url + "/api/search?q=four")
        self.assertEqual(code, 200)

    async def test_reload_reports_a_changed_list_as_needing_a_restart(self) -> None:
        path = write_config(self, SEARCH)
        daemon = await self.start(load(path))
        with open(path) as f:
            original = f.read()
        self.assertIn(f'listen: "{V4}"\n', original)
        with open(path, "w") as f:
            f.write(original.replace(f'listen: "{V4}"\n', f"listen: ['{V4}', '{V6}']\n", 1)
                    .replace(f'admin: {{listen: "{V4}"', f"admin: {{listen: ['{V4}', '{V6}']",
                             1))
        result = daemon.top.reloader.reload()
        self.assertTrue(result.ok, result.error)
        self.assertEqual(result.needs_restart, ("listen", "admin.listen"))
        self.assertEqual(sorted(listeners(daemon.top)), ["admin-web", "web"])  # unchanged


class ListenAtStartTests(TestCase):
    """``twistd cgipool`` checks every listener before anything starts."""

    timeout = 60

    def test_a_busy_second_listener_is_one_line_exit_1(self) -> None:
        """A taken port is found before any worker is spawned and reported in one line
        naming the address and endpoint, with exit status 1, not a traceback."""
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen(1)
            taken = busy.getsockname()[1]
            marker = os.path.abspath(self.mktemp())
            folder = os.path.abspath(self.mktemp())
            os.makedirs(folder)
            worker = os.path.join(folder, "worker")
            with open(worker, "w") as f:
                f.write(f'#!/bin/sh\ntouch "{marker}"\nexec sleep 30\n')
            os.chmod(worker, 0o755)
            path = os.path.join(folder, "pool.yaml")
            with open(path, "w") as f:
                f.write(f"""\
listen: ["{V4}", "tcp:{taken}:interface=127.0.0.1"]
admin: {{listen: "{V4}"}}
port_range: "{port_range()}"
services:
  w: {{command: ["{worker}", "{{port}}"], route: /w}}
""")
            done = subprocess.run([TWISTD, "-n", "--pidfile=", "cgipool", "--config", path],
                                  capture_output=True, text=True, timeout=30, cwd=folder)
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        lines = (done.stdout + done.stderr).strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertIn(f"cannot listen on 127.0.0.1:{taken} ('tcp:{taken}:interface=127.0.0.1')",
                      lines[0])
        self.assertFalse(os.path.exists(marker), "a worker was spawned")


class ListenUnitTests(TestCase):
    def test_active_listens_skip_only_the_defaults_ipv6(self) -> None:
        """Only the default's ::1 may be skipped on a host without it: an IPv6 endpoint
        written in the file is always tried, and ``admin.listen: same`` opens no port."""
        config = like_the_default(load(write_config(self, SEARCH)))
        self.assertEqual(active_listens(config, True),
                         ({"web": (V4, V6), "admin-web": (V4, V6)}, ()))
        self.assertEqual(active_listens(config, False),
                         ({"web": (V4,), "admin-web": (V4,)}, (V6, V6)))
        named = attrs.evolve(config, listen_if_available=())  # written in the file
        self.assertEqual(active_listens(named, False)[0]["web"], (V4, V6))
        same = attrs.evolve(config, admin=attrs.evolve(config.admin, listen=("same",),
                                                       listen_if_available=()))
        self.assertEqual(active_listens(same, False), ({"web": (V4,), "admin-web": ()},
                                                       (V6,)))

    def test_check_config_prints_every_listener(self) -> None:
        """check-config's summary line names every proxy and admin endpoint, marking the
        default's ::1 as conditional, so the reader knows where the daemon will listen."""
        require_binaries("search.cgi")
        config = load(write_config(self, SEARCH))
        first = format_config(like_the_default(config)).splitlines()[0]
        self.assertIn(f"OK — listen {V4} + {V6} (where the host has ::1), "
                      f"admin {V4} + {V6} (where the host has ::1), 1 service", first)
        named = attrs.evolve(config, listen=(V4, "unix:/tmp/x.sock"))
        self.assertIn(f"listen {V4} + unix:/tmp/x.sock, admin {V4}, ",
                      format_config(named).splitlines()[0])

    def test_check_config_command_with_a_list(self) -> None:
        """An ``admin.listen`` written as a list passes ``cgipool check-config`` (exit 0)
        and both of its endpoints are printed."""
        from cgipool_tools.check_config import check_config

        require_binaries("search.cgi")
        path = write_config(self, f"admin: {{listen: ['{V4}', '{V6}']}}\n" + SEARCH)
        out, err = io.StringIO(), io.StringIO()
        self.assertEqual(check_config(path, out, err), 0, err.getvalue())
        self.assertIn(f"admin {V4} + {V6}, ", out.getvalue())
