"""Real-browser tests: headless Chromium (selenium) against a real daemon.

    from tests.browser import (in_thread, page_text, require_browser, start_browser,
                               start_daemon_process, wait_until)

    class DashboardTests(TestCase):
        def setUp(self) -> None:
            require_browser()                       # SkipTest with the apt-get line

        async def test_overview_lists_the_pids(self) -> None:
            daemon = await start_daemon_process(self, SEARCH)   # twistd subprocess
            pids = daemon.worker_pids()                          # from its status
            driver = await start_browser(self)                   # after the daemon
            await in_thread(driver.get, daemon.admin_url + "/admin/")
            await wait_until(lambda: all(str(p) in page_text(driver) for p in pids),
                             10, "the worker pids on /admin/", driver=driver)

Selenium calls BLOCK.  A daemon in the test's own reactor
(:func:`tests.support.start_daemon`) cannot answer the browser while the
reactor thread waits for selenium — so every selenium step goes through
:func:`in_thread` (or :func:`wait_until`), which run it in the reactor's thread
pool.  With :func:`start_daemon_process` the daemon is a separate process and
cannot deadlock, but the reactor still should not stall: use them there too.

Start the browser *after* the daemon: cleanups run last-in first-out, so the
browser (and its open connections, e.g. an EventSource) is gone before the
daemon stops.  Every cleanup checks that no process is left: no chromium or
chromedriver (leftovers are SIGKILLed by pid), no daemon, no worker.
"""

from __future__ import annotations

import json
import os
import re
import sys
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet import defer, error, reactor, threads
from twisted.internet.protocol import ProcessProtocol
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase

from cgipool_tools import screenshot as _chromium
from cgipool_tools.screenshot import browser_log, png_size
from tests.support import (
    ROOT,
    free_ports,
    http_client,
    process_alive,
    sleep,
    wait_for,
    write_config,
)

T = TypeVar("T")

__all__ = [
    "DaemonProcess", "browser_log", "console_errors", "in_thread", "page_text",
    "png_size", "require_browser", "save_screenshot", "start_browser",
    "start_daemon_process", "wait_until",
]

#: Seconds :func:`start_daemon_process` waits for every service to be ``ok``.
DAEMON_READY_TIMEOUT = 20.0
#: Seconds the daemon gets to exit after SIGTERM (its workers' stop_timeout is 5 s).
DAEMON_STOP_TIMEOUT = 15.0


# -- the browser -------------------------------------------------------------------------


def require_browser() -> None:
    """Skip the test unless Chromium, chromedriver and selenium are installed."""
    reason = _chromium.browser_missing()
    if reason is not None:
        raise SkipTest(reason)


async def in_thread(fn: Callable[..., T], *args: Any, timeout: float | None = None,
                    **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` in the reactor's thread pool; its result.

    The reactor keeps running meanwhile (an in-process daemon answers the
    browser).  With ``timeout``, fail after that many seconds (the thread itself
    cannot be stopped; its late result is dropped).
    """
    d = threads.deferToThread(fn, *args, **kwargs)
    if timeout is None:
        return await d
    result: defer.Deferred[T] = defer.Deferred()
    name = getattr(fn, "__qualname__", repr(fn))

    def expire() -> None:
        result.errback(AssertionError(f"{name} still running after {timeout:g} s"))

    timer = reactor.callLater(timeout, expire)

    def done(value: Any) -> None:
        if timer.active():
            timer.cancel()
            if isinstance(value, Failure):
                result.errback(value)
            else:
                result.callback(value)
        # else: timed out already; the late value (or failure) is dropped.

    d.addBoth(done)
    return await result


def _transient() -> tuple[type[BaseException], ...]:
    """Exceptions of a page that is not there yet: the predicate is asked again."""
    from selenium.common.exceptions import (
        ElementNotInteractableException,
        JavascriptException,
        NoSuchElementException,
        StaleElementReferenceException,
    )

    return (NoSuchElementException, StaleElementReferenceException,
            ElementNotInteractableException, JavascriptException, AssertionError,
            LookupError, TypeError, ValueError)


async def wait_until(predicate: Callable[[], T], timeout: float = 10.0,
                     what: str = "condition", driver: Any = None,
                     interval: float = 0.05) -> T:
    """Ask ``predicate()`` (in a thread) until it returns something true; return that.

    A missing/stale element, a JavaScript error, an AssertionError, LookupError,
    TypeError or ValueError from the predicate counts as "not yet".  After
    ``timeout`` seconds: AssertionError naming ``what``, the last value or
    exception and — with ``driver`` — the page's URL and text, and a screenshot
    saved next to the test.
    """
    transient = _transient()
    deadline = reactor.seconds() + timeout
    last: str = "never asked"
    while True:
        try:
            value = await in_thread(predicate)
        except transient as e:
            last = f"raised {type(e).__name__}: {_first_line(e)}"
        else:
            if value:
                return value
            last = f"returned {value!r}"
        if reactor.seconds() > deadline:
            break
        await sleep(interval)
    message = f"timed out after {timeout:g} s waiting for {what}; the check last {last}"
    if driver is not None:
        message += await in_thread(_describe_page, driver, what)
    raise AssertionError(message)


def _first_line(e: BaseException) -> str:
    text = getattr(e, "msg", None) or str(e) or type(e).__name__
    return text.strip().splitlines()[0][:300] if text.strip() else type(e).__name__


def _describe_page(driver: Any, what: str) -> str:
    """For a failure message: where the browser is, what it shows, a screenshot."""
    parts = []
    try:
        parts.append(f"page {driver.current_url!r} titled {driver.title!r}")
        parts.append("text: " + _excerpt(page_text(driver), 600))
    except Exception as e:  # the page is gone too: say so
        parts.append(f"(could not read the page: {_first_line(e)})")
    folder = getattr(driver, "_cgipool_folder", None)
    if folder:
        name = re.sub(r"[^a-z0-9]+", "-", what.lower()).strip("-")[:60] or "page"
        path = os.path.join(folder, f"timeout-{name}.png")
        try:
            driver.save_screenshot(path)
            parts.append(f"screenshot: {path}")
        except Exception:
            pass
    try:
        errors = console_errors(driver)
        if errors:
            parts.append("console errors: " + " | ".join(errors)[:600])
    except Exception:
        pass
    return "\n  " + "\n  ".join(parts)


def _excerpt(text: str, width: int) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= width else text[:width] + "…")


def page_text(driver: Any) -> str:
    """The visible text of the page (blocking: call it in a thread)."""
    return str(driver.execute_script(
        "return document.body ? document.body.innerText : ''"))


def console_errors(driver: Any) -> list[str]:
    """SEVERE console messages (uncaught errors, failed loads) since the last call
    of this or :func:`browser_log` (blocking: call it in a thread)."""
    return [entry.get("message", "") for entry in browser_log(driver)
            if entry.get("level") == "SEVERE"]


def save_screenshot(driver: Any, path: str, full_page: bool = False) -> bytes:
    """Save a PNG of the page to ``path`` and return its bytes (blocking)."""
    data = _chromium.capture(driver, full_page)
    png_size(data)  # ValueError unless a PNG
    with open(path, "wb") as f:
        f.write(data)
    return data


async def start_browser(case: TestCase, width: int = _chromium.WIDTH,
                        height: int = _chromium.HEIGHT) -> Any:
    """A headless Chromium WebDriver, its viewport ``width`` x ``height``.

    Its profile (``--user-data-dir``), the chromedriver log and any screenshots of
    :func:`wait_until` are in a fresh folder of the test (``driver._cgipool_folder``).
    Cleanup quits it and makes sure no chromium/chromedriver process of it is
    left (leftovers are SIGKILLed by pid, with a warning).  Skips the test when
    no browser is installed.
    """
    require_browser()
    folder = os.path.abspath(case.mktemp())
    os.makedirs(folder)
    driver = await in_thread(
        _chromium.start_chromium, os.path.join(folder, "profile"), width, height, (),
        os.path.join(folder, "chromedriver.log"), timeout=60)
    driver._cgipool_folder = folder

    async def cleanup() -> None:
        known = dict(driver._cgipool_processes)
        killed = await in_thread(_chromium.quit_browser, driver)
        if killed:
            warnings.warn("browser processes outlived driver.quit() and were killed: "
                          + "; ".join(killed), stacklevel=1)
        alive = [p for p in known.values() if not _chromium.is_gone(p)]
        if alive:
            raise AssertionError(f"browser processes survived SIGKILL: {alive}")

    case.addCleanup(lambda: defer.ensureDeferred(cleanup()))
    return driver


# -- the daemon as a real twistd process -------------------------------------------------


class _Output(ProcessProtocol):
    def __init__(self) -> None:
        self.output = bytearray()
        self.ended: defer.Deferred[int | None] = defer.Deferred()
        self.exit_code: int | None = None
        self.signal: int | None = None

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if len(self.output) > 1 << 20:  # keep the last MiB
            del self.output[:len(self.output) - (1 << 20)]

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        self.exit_code = getattr(reason.value, "exitCode", None)
        self.signal = getattr(reason.value, "signal", None)
        self.ended.callback(self.exit_code)


class DaemonProcess:
    """A ``twistd -n cgipool`` child process (see :func:`start_daemon_process`)."""

    def __init__(self, case: TestCase, port: int, config: str, process: Any,
                 protocol: _Output, admin_port: int | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        #: The admin's own listener (``admin.listen``); the proxy's /admin redirects there.
        self.admin_port = admin_port if admin_port is not None else port
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.config = config
        self.process = process
        self.pid: int = process.pid
        self._protocol = protocol
        self._client = http_client(case, persistent=False)
        #: The last status document fetched, and every worker pid seen in one.
        self.last_status: dict[str, Any] | None = None
        self.seen_pids: set[int] = set()

    @property
    def running(self) -> bool:
        return not self._protocol.ended.called

    @property
    def output(self) -> str:
        """What the daemon printed (its log: ``twistd -n`` logs to stdout)."""
        return self._protocol.output.decode("utf-8", "replace")

    async def get(self, path: str) -> tuple[int, bytes]:
        """GET ``path`` from the daemon (``/admin…`` and ``/metrics`` from the
        admin listener): ``(status code, body)``."""
        import treq

        base = self.admin_url if path.startswith(("/admin", "/metrics")) else self.url
        response = await self._client.get(base + path)
        return response.code, await treq.content(response)

    async def status(self) -> dict[str, Any]:
        """``/admin/api/status`` as JSON (remembered in ``last_status``)."""
        code, body = await self.get("/admin/api/status")
        if code != 200:
            raise AssertionError(f"/admin/api/status answered {code}: {body[:300]!r}")
        status = json.loads(body)
        self.last_status = status
        self.seen_pids.update(self.worker_pids(status))
        return status

    def worker_pids(self, status: dict[str, Any] | None = None) -> list[int]:
        """The worker pids of ``status`` (default: the last one fetched)."""
        status = status if status is not None else self.last_status or {}
        return [w["pid"] for svc in status.get("services", [])
                for w in svc.get("workers", []) if w.get("pid")]

    def signal(self, name: str) -> None:
        """Send ``"TERM"``, ``"KILL"``, ``"HUP"``... to the daemon, if it still runs."""
        if self.running:
            try:
                self.process.signalProcess(name)
            except error.ProcessExitedAlready:
                pass

    async def wait_ended(self, timeout: float) -> bool:
        """True once the daemon exited; False if it still runs after ``timeout``."""
        try:
            await wait_for(lambda: not self.running, timeout, what="the daemon to exit")
        except AssertionError:
            return False
        return True

    def tail(self, chars: int = 3000) -> str:
        return self.output[-chars:]


def _free_ports(count: int) -> list[int]:
    """Ports for a daemon process (tests patch this to reuse a daemon's)."""
    return free_ports(count)


async def start_daemon_process(case: TestCase, config_text: str,
                               timeout: float = DAEMON_READY_TIMEOUT,
                               services_dir: str | None = None,
                               wrapper: list[str] | None = None) -> DaemonProcess:
    """Run ``twistd -n --pidfile= cgipool --config X`` on a free loopback port.

    ``config_text`` is the body of a pool.yaml (``services: ...``), written with
    :func:`tests.support.write_config`; ``wrapper`` runs twistd under another
    program (``["prlimit", "--nofile=128:128", "--"]``).  Returns once every service of
    ``/admin/api/status`` is ``ok`` (fails the test after ``timeout`` seconds,
    or at once if the daemon exits, with its output).  Cleanup: SIGTERM, wait
    for the daemon to exit, and fail if any worker pid it ever reported is
    still alive (those are SIGKILLed first).
    """
    port, admin_port = _free_ports(2)
    config = write_config(case, config_text, services_dir)
    with open(config) as f:
        text = f.read()
    if text.count("tcp:0:") != 2:
        raise AssertionError("write_config no longer writes two tcp:0: listen addresses")
    with open(config, "w") as f:
        f.write(text.replace("tcp:0:", f"tcp:{port}:", 1).replace("tcp:0:", f"tcp:{admin_port}:", 1))
    twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
    protocol = _Output()
    argv = [*(wrapper or []), twistd, "-n", "--pidfile=", "cgipool", "--config", config]
    process = reactor.spawnProcess(protocol, argv[0], argv, env=os.environ.copy(), path=ROOT)
    daemon = DaemonProcess(case, port, config, process, protocol, admin_port)

    async def cleanup() -> None:
        if daemon.running:
            try:
                await _refresh_status(daemon)
            except Exception:
                pass  # the pids seen so far are checked anyway
        daemon.signal("TERM")
        if not await daemon.wait_ended(DAEMON_STOP_TIMEOUT):
            daemon.signal("KILL")
            await daemon.wait_ended(5)
            _kill_left(daemon.seen_pids)
            raise AssertionError(f"the daemon (pid {daemon.pid}) did not exit within "
                                 f"{DAEMON_STOP_TIMEOUT:g} s of SIGTERM:\n{daemon.tail()}")
        try:
            await wait_for(lambda: not any(process_alive(p) for p in daemon.seen_pids), 2,
                           what="every worker of the daemon to be gone")
        except AssertionError:
            left = [p for p in daemon.seen_pids if process_alive(p)]
            _kill_left(left)
            raise AssertionError(f"worker processes outlived the daemon: {left}") from None

    case.addCleanup(lambda: defer.ensureDeferred(cleanup()))

    deadline = reactor.seconds() + timeout
    last = "no answer yet"
    while True:
        if not daemon.running:
            raise AssertionError(f"the daemon exited ({protocol.exit_code}) before it was "
                                 f"ready:\n{daemon.tail()}")
        try:
            status = await daemon.status()
        except Exception as e:
            last = f"{type(e).__name__}: {e}"
        else:
            states = {s["name"]: s["state"] for s in status.get("services", [])}
            if all(state == "ok" for state in states.values()):
                return daemon
            last = f"service states {states}"
        if reactor.seconds() > deadline:
            raise AssertionError(f"the daemon was not ready after {timeout:g} s ({last}):\n"
                                 f"{daemon.tail()}")
        await sleep(0.05)


async def _refresh_status(daemon: DaemonProcess) -> None:
    """Refresh the daemon's worker pids before stopping it (at most 2 s)."""
    d = defer.ensureDeferred(daemon.status())
    d.addTimeout(2, reactor)
    await d


def _kill_left(pids: Any) -> None:
    import signal

    for pid in pids:
        if process_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
