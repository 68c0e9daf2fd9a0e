"""``cgipool dashboard-shot``: a PNG of the admin pages in headless Chromium.

    cgipool dashboard-shot [--url URL] [--out docs/dashboard.png] [--load SECONDS]
                           [--page /admin/ --page /admin/traffic] [--wait-for CSS]

Also the browser core of the real-browser tests (``tests/browser.py``): Debian's
``/usr/bin/chromium`` driven through ``/usr/bin/chromedriver`` by selenium (the
``test`` extra).  Nothing is ever downloaded: the driver and the browser are
given by path, so selenium-manager is never run (and ``SE_OFFLINE=true`` tells
it to stay offline if it were).  Every Chromium gets a fresh profile folder, and
:func:`quit_browser` makes sure that no process of it survives.

Selenium calls block: the tool runs them in the reactor's thread pool while the
reactor drives the optional load (:mod:`cgipool_tools.stress`).
"""

from __future__ import annotations

import os
import signal
import struct
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from cgipool_tools.client import (
    HttpClient,
    NotRunning,
    StatusError,
    check_path,
    clean,
    fetch_status,
    parse_url,
)
from cgipool_tools.daemon import ProcInfo, all_processes, descendants, is_gone, proc_info

#: Debian's packages ``chromium`` and ``chromium-driver``; overridable (tests hide
#: the browser with ``CGIPOOL_CHROMIUM=/nonexistent``).
CHROMIUM = os.environ.get("CGIPOOL_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("CGIPOOL_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL_HINT = "apt-get install chromium chromium-driver"
SELENIUM_HINT = "pip install -e '.[tools]' (make venv installs it)"

WIDTH, HEIGHT = 1280, 900
#: The flags of every Chromium we start: headless, no sandbox (CI runs as root),
#: nothing that phones home or waits on a network that is not there.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--no-proxy-server",
    "--force-device-scale-factor=1",
)
#: Seconds a selenium page load or script may take.
PAGE_TIMEOUT = 20.0
#: Connections of the background load of ``dashboard-shot --load``.
LOAD_CONCURRENCY = 8
#: Seconds Chromium's processes get to exit after ``quit()`` before SIGKILL.
QUIT_GRACE = 5.0


class BrowserMissing(Exception):
    """Chromium, chromedriver or selenium is not installed (the message says how to)."""


def browser_missing() -> str | None:
    """Why no browser can be started here, or None when everything is installed."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    if missing:
        return (f"chromium/chromedriver not installed: {INSTALL_HINT} "
                f"(missing {', '.join(missing)})")
    try:
        import selenium  # noqa: F401
    except ImportError:
        return f"the selenium module is not installed: {SELENIUM_HINT}"
    return None


def start_chromium(profile_dir: str, width: int = WIDTH, height: int = HEIGHT,
                   extra_flags: Sequence[str] = (), log_path: str | None = None) -> Any:
    """A headless Chromium WebDriver with a fresh profile in ``profile_dir``.

    Blocks (about a second): call it from a thread when a reactor must keep
    running.  The driver remembers what :func:`quit_browser` needs.

    :raises BrowserMissing: when the browser, its driver or selenium is missing.
    """
    reason = browser_missing()
    if reason is not None:
        raise BrowserMissing(reason)
    # selenium-manager (never run here: both paths are given) must not go online.
    os.environ.setdefault("SE_OFFLINE", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.makedirs(profile_dir, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--window-size={width},{height}",
                 f"--user-data-dir={os.path.abspath(profile_dir)}", *extra_flags):
        options.add_argument(flag)
    # Console messages, for browser_log().
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    options.ignore_local_proxy_environment_variables()
    service = Service(executable_path=CHROMEDRIVER,
                      log_output=log_path if log_path else None)
    driver = webdriver.Chrome(options=options, service=service)
    driver._cgipool_profile = os.path.abspath(profile_dir)
    driver._cgipool_processes = _browser_processes(driver)
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        driver.set_script_timeout(PAGE_TIMEOUT)
        fit_viewport(driver, width, height)
    except Exception:
        quit_browser(driver)
        raise
    return driver


def fit_viewport(driver: Any, width: int, height: int) -> None:
    """Resize the window so that the page's viewport is ``width`` x ``height``
    (headless Chromium takes ``--window-size`` for the outer window)."""
    for _ in range(3):
        inner_w, inner_h = driver.execute_script("return [innerWidth, innerHeight]")
        if (inner_w, inner_h) == (width, height):
            return
        size = driver.get_window_size()
        driver.set_window_size(size["width"] + width - inner_w,
                               size["height"] + height - inner_h)


def _browser_processes(driver: Any) -> dict[int, ProcInfo]:
    """chromedriver, every process below it, and any process naming our profile."""
    found: dict[int, ProcInfo] = {}
    process = getattr(getattr(driver, "service", None), "process", None)
    pid = getattr(process, "pid", None)
    processes = all_processes()
    if pid:
        info = proc_info(pid)
        if info is not None:
            found[pid] = info
        for child in descendants(pid, processes):
            found[child.pid] = child
    profile = getattr(driver, "_cgipool_profile", None)
    if profile:
        needle = profile.encode()
        for info in processes:
            if info.pid not in found and info.pid != os.getpid() \
                    and needle in _cmdline(info.pid):
                found[info.pid] = info
    return found


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def quit_browser(driver: Any, grace: float = QUIT_GRACE) -> list[str]:
    """``driver.quit()``, then make sure no process of that browser is left.

    Whatever still runs ``grace`` seconds after ``quit()`` is SIGKILLed by pid
    (a pid that names another process by then is left alone).  Returns a line
    per process that had to be killed (empty when ``quit()`` was enough).
    Blocks: call it from a thread when a reactor must keep running.
    """
    known: dict[int, ProcInfo] = dict(getattr(driver, "_cgipool_processes", {}))
    try:
        known.update(_browser_processes(driver))
    except Exception:
        pass
    try:
        driver.quit()
    except Exception:
        pass  # a dead browser or driver: the processes are checked below anyway
    deadline = time.monotonic() + grace
    while True:
        left = [p for p in known.values() if not is_gone(p)]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    killed = []
    for p in left:
        args = _cmdline(p.pid).replace(b"\0", b" ").decode("utf-8", "replace").strip()
        killed.append(f"pid {p.pid} ({p.name}): {clean(args, 100)}")
        try:
            os.kill(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 2.0
    while any(not is_gone(p) for p in left) and time.monotonic() < deadline:
        time.sleep(0.02)
    return killed


def browser_log(driver: Any) -> list[dict[str, Any]]:
    """The console messages (and uncaught errors) since the last call:
    ``{"level": "SEVERE"|"WARNING"|"INFO", "message": ..., "timestamp": ...}``."""
    return list(driver.get_log("browser"))


def page_status(driver: Any) -> int | None:
    """The HTTP status of the page's own document (None when Chromium can't tell)."""
    value = driver.execute_script(
        "const n = performance.getEntriesByType('navigation')[0];"
        "return n && n.responseStatus ? n.responseStatus : null;")
    return int(value) if value else None


def png_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` of a PNG; ValueError when ``data`` is none."""
    if len(data) < 24 or data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG image")
    width, height = struct.unpack(">II", data[16:24])
    return width, height


#: Resolves once the document is loaded, its fonts are ready and the DOM has not
#: changed for ``quiet`` ms (or ``limit`` ms have passed): "rendered" for a page
#: that fills itself in with JavaScript.  Two animation frames make it painted.
_SETTLE_JS = """
const [quiet, limit, done] = arguments;
const start = performance.now();
const frames = () => requestAnimationFrame(() => requestAnimationFrame(() => done(true)));
const settle = () => {
  let last = performance.now();
  const seen = new MutationObserver(() => { last = performance.now(); });
  seen.observe(document, {subtree: true, childList: true, characterData: true, attributes: true});
  const check = () => {
    const now = performance.now();
    if (now - last >= quiet || now - start >= limit) { seen.disconnect(); frames(); }
    else setTimeout(check, 25);
  };
  check();
};
const loaded = () => (document.fonts ? document.fonts.ready : Promise.resolve()).then(settle, settle);
if (document.readyState === 'complete') loaded();
else addEventListener('load', loaded, {once: true});
"""


def settle(driver: Any, quiet: float = 0.3, limit: float = 5.0) -> None:
    """Wait until the page is loaded, its fonts are in, and its DOM was quiet
    for ``quiet`` seconds (at most ``limit`` seconds of waiting for quiet)."""
    driver.execute_async_script(_SETTLE_JS, int(quiet * 1000), int(limit * 1000))


def capture(driver: Any, full_page: bool = True) -> bytes:
    """A PNG of the viewport; with ``full_page``, of the whole page height when it
    is taller than the viewport (same width)."""
    if full_page:
        width, height, viewport = driver.execute_script(
            "const d = document.documentElement, b = document.body || d;"
            "return [d.clientWidth, Math.max(d.scrollHeight, b.scrollHeight), innerHeight];")
        if height > viewport:
            import base64

            shot = driver.execute_cdp_cmd("Page.captureScreenshot", {
                "format": "png", "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 16384),
                         "scale": 1}})
            return base64.b64decode(shot["data"])
    return driver.get_screenshot_as_png()


# -- the command ---------------------------------------------------------------------


def shot_paths(out: str, pages: Sequence[str]) -> list[str]:
    """Where each page's PNG goes: ``out`` for the first, ``<out>-<name>.png`` after."""
    base, ext = os.path.splitext(out)
    ext = ext or ".png"
    paths = []
    for i, page in enumerate(pages):
        if i == 0:
            paths.append(base + ext)
            continue
        name = "-".join(part for part in page.split("?", 1)[0].split("/")
                        if part and part != "admin") or f"page{i + 1}"
        paths.append(f"{base}-{name}{ext}")
    return paths


def _write(path: str, data: bytes) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".dashboard-shot-", suffix=".png", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def take_shots(driver: Any, base_url: str, pages: Sequence[str], paths: Sequence[str],
               wait_for: str | None = None, full_page: bool = True,
               before_capture: Callable[[], None] | None = None,
               timeout: float = PAGE_TIMEOUT) -> list[tuple[str, int, int]]:
    """Open every page, wait until it is rendered, save its PNG (blocking).

    Returns ``(path, width, height)`` per page.  :raises ShotError:.
    """
    from selenium.common.exceptions import TimeoutException, WebDriverException

    done = []
    for page, path in zip(pages, paths):
        url = base_url.rstrip("/") + page
        try:
            driver.get(url)
            status = page_status(driver)
            if status is not None and status >= 400:
                body = driver.execute_script("return document.body ? document.body.innerText : ''")
                raise ShotError(f"GET {url} answered {status}: {clean(body, 120)}")
            if wait_for:
                _wait_for_selector(driver, wait_for, timeout, url)
            settle(driver)
            if before_capture is not None:
                before_capture()
            data = capture(driver, full_page)
        except TimeoutException as e:
            raise ShotError(f"{url}: the page did not render within {timeout:g} s "
                            f"({clean(e.msg or 'timeout', 120)})") from None
        except WebDriverException as e:
            raise ShotError(f"{url}: {clean((e.msg or str(e)).splitlines()[0], 200)}") from None
        width, height = png_size(data)
        _write(path, data)
        done.append((path, width, height))
    return done


def _wait_for_selector(driver: Any, selector: str, timeout: float, url: str) -> None:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        WebDriverWait(driver, timeout, poll_frequency=0.05).until(
            lambda d: d.find_elements(By.CSS_SELECTOR, selector))
    except TimeoutException:
        raise ShotError(f"{url}: nothing matched --wait-for {selector!r} "
                        f"within {timeout:g} s") from None


class ShotError(Exception):
    """A page could not be captured (one line)."""


async def dashboard_shot(reactor: Any, url: str, out: str, pages: Sequence[str],
                         load: float | None, wait_for: str | None, full_page: bool,
                         stdout: TextIO, stderr: TextIO, width: int = WIDTH,
                         height: int = HEIGHT) -> int:
    """The command: 0 when every page was saved, 1 otherwise (one line on ``stderr``)."""
    from twisted.internet import defer, threads

    target = parse_url(url)
    for page in pages:
        check_path(page)
    paths = shot_paths(out, pages)
    reason = browser_missing()
    if reason is not None:
        stderr.write(f"cgipool dashboard-shot: {reason}\n")
        return 1
    client = HttpClient(reactor, target, timeout=5.0)
    try:
        await fetch_status(client)
    except (NotRunning, StatusError) as e:
        stderr.write(f"cgipool dashboard-shot: {e}\n")
        return 1
    finally:
        await client.close()
    admin_url = client.admin_url  # the pages are on the admin's own listener

    stress: Any = None
    capture_at = time.monotonic()
    if load:
        from cgipool_tools.stress import stress_options, stress_test

        options = stress_options(url, concurrency=LOAD_CONCURRENCY, duration=load)
        stress = defer.Deferred.fromCoroutine(stress_test(reactor, options))
        # Capture near the end of the load, so the pages show the traffic.
        capture_at += max(load - 0.5, 0.5)
        stderr.write(f"dashboard-shot: load for {load:g} s in the background\n")

    def before_capture() -> None:  # in a thread
        while time.monotonic() < capture_at and not (stress is not None and stress.called):
            time.sleep(0.05)

    profile = tempfile.mkdtemp(prefix="cgipool-dashboard-shot-")
    driver = None
    code = 1
    try:
        driver = await threads.deferToThread(start_chromium, profile, width, height,
                                             ("--hide-scrollbars",))
        shots = await threads.deferToThread(take_shots, driver, admin_url, pages, paths,
                                            wait_for, full_page, before_capture)
        for path, w, h in shots:
            stdout.write(f"{path}\n")
            stderr.write(f"dashboard-shot: saved {path} ({w}x{h} px)\n")
        code = 0
    except ShotError as e:
        stderr.write(f"cgipool dashboard-shot: {e}\n")
    except Exception as e:
        first = (getattr(e, "msg", None) or str(e) or type(e).__name__).splitlines()[0]
        stderr.write(f"cgipool dashboard-shot: could not run Chromium: {clean(first, 300)}\n")
    finally:
        if driver is not None:
            killed = await threads.deferToThread(quit_browser, driver)
            for line in killed:
                stderr.write(f"dashboard-shot: killed a leftover browser process: {line}\n")
        import shutil

        shutil.rmtree(profile, ignore_errors=True)
        if stress is not None:
            try:
                result = await stress
            except Exception as e:
                stderr.write(f"dashboard-shot: the load failed: {e}\n")
            else:
                stderr.write(
                    f"dashboard-shot: load: {result.requests} requests in "
                    f"{result.elapsed:.1f} s ({result.rate:,.0f} req/s), "
                    f"{result.failed} failed\n")
    return code


def add_command(commands: Any) -> None:
    """Register ``dashboard-shot`` on the ``cgipool`` command's subparsers."""
    from cgipool_tools.client import DEFAULT_URL
    from cgipool_tools.command import seconds

    p = commands.add_parser(
        "dashboard-shot", help="PNG screenshots of the admin pages (headless Chromium)",
        description="Open the admin pages of a running daemon in headless Chromium "
                    f"({WIDTH}x{HEIGHT}, the whole page height), wait until each is "
                    "rendered and save a PNG; print each path. Needs Debian's chromium and "
                    f"chromium-driver ({INSTALL_HINT}) and selenium ({SELENIUM_HINT}).")
    p.add_argument("--url", default=None,
                   help="the proxy's address (default: the first listener of --config, "
                        f"else {DEFAULT_URL}); the admin is found from it")
    p.add_argument("--config", default="etc/pool.yaml",
                   help="the pool configuration to take the URL from (default: etc/pool.yaml)")
    p.add_argument("--out", default="docs/dashboard.png",
                   help="the PNG of the first page (default: docs/dashboard.png); further "
                        "pages go to OUT-<name>.png, e.g. docs/dashboard-traffic.png")
    p.add_argument("--page", action="append", default=[], metavar="PATH",
                   help="a page to capture (repeatable; default: /admin/), "
                        "e.g. --page /admin/ --page /admin/traffic")
    p.add_argument("--load", type=seconds, default=None, metavar="SECONDS",
                   help="first put this many seconds of load on the daemon's services "
                        "(the stress-test core, in the background) and capture near its end")
    p.add_argument("--wait-for", default=None, metavar="CSS",
                   help="also wait until an element matches this CSS selector")
    p.add_argument("--viewport-only", action="store_true",
                   help=f"capture {WIDTH}x{HEIGHT} only, not the whole page height")
    p.set_defaults(run=run_command)


def run_command(args: Any, out: TextIO, err: TextIO) -> int:
    from cgipool_tools.command import run_on_reactor

    parse_url(args.url)  # a bad --url is a usage error before any reactor runs
    pages = args.page or ["/admin/"]
    for page in pages:
        check_path(page)
    if args.load:
        from cgipool_tools.stress import stress_options

        stress_options(args.url, duration=args.load)  # loopback only: a usage error
    return run_on_reactor(lambda r: dashboard_shot(
        r, args.url, args.out, pages, args.load, args.wait_for, not args.viewport_only,
        out, err))
