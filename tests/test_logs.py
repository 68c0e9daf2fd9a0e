"""Size-rotated logs (cgipool/logs.py): real files in a temp folder."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import Logger
from twisted.trial.unittest import SynchronousTestCase

from cgipool import logs
from cgipool.config import LogsConfig
from cgipool.logs import RotatingLogFile, observer, use_for_twistd
from cgipool.proxy.edge import EdgeSite
from cgipool.proxy.routes import Root


class RotatingLogFileTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.folder = os.path.abspath(self.mktemp())
        os.makedirs(self.folder)
        self.path = os.path.join(self.folder, "cgipool.log")

    def open(self, max_bytes: int = 1000, keep: int = 3) -> RotatingLogFile:
        log_file = RotatingLogFile.open(self.path, max_bytes, keep)
        self.addCleanup(log_file.close)
        return log_file

    def files(self) -> list[str]:
        return sorted(os.listdir(self.folder))

    def read(self, path: str) -> list[str]:
        with open(path, encoding="utf-8") as f:
            return f.read().splitlines()

    def test_rotation_keeps_at_most_keep_files_and_the_newest_lines(self) -> None:
        log_file = self.open(max_bytes=1000, keep=3)
        lines = [f"line {n:05d} " + "x" * 88 for n in range(500)]  # 100 bytes each
        for line in lines:
            log_file.write(line + "\n")
        self.assertEqual(self.files(), ["cgipool.log", "cgipool.log.1", "cgipool.log.2",
                                        "cgipool.log.3"])
        for name in self.files():
            self.assertLessEqual(os.path.getsize(os.path.join(self.folder, name)), 1000)
        kept = []
        for path in [*reversed(log_file.old_files()), self.path]:
            kept += self.read(path)
        # The newest lines, in order, none lost between the kept files.
        self.assertEqual(kept, lines[-len(kept):])
        self.assertEqual(len(kept), 40)  # 10 per full file, the current one full too
        self.assertEqual(log_file.rotations, 49)

    def test_a_rotation_renames_at_most_keep_files(self) -> None:
        """The cost of a rotation is bounded by ``keep``, however many times the file
        has rotated before."""
        log_file = self.open(max_bytes=100, keep=2)
        renames: list[tuple[str, str]] = []
        real = os.replace

        def counting(src: Any, dst: Any) -> None:
            renames.append((os.path.basename(src), os.path.basename(dst)))
            real(src, dst)

        self.patch(os, "replace", counting)
        log_file.write("0" * 99 + "\n")
        for n in range(1, 10):
            renames.clear()
            log_file.write(f"{n}" * 99 + "\n")  # full: a rotation each time
            self.assertLessEqual(len(renames), 2, renames)
        self.assertEqual(log_file.rotations, 9)
        self.assertEqual(self.files(), ["cgipool.log", "cgipool.log.1", "cgipool.log.2"])

    def test_old_files_beyond_keep_are_removed_once_at_open(self) -> None:
        """The thousands of numbered files twistd's own LogFile leaves are pruned down to
        ``keep`` when the log opens, and a file not of the numbered series is left alone."""
        for n in range(1, 2001):  # what twistd's LogFile leaves behind
            with open(f"{self.path}.{n}", "w") as f:
                f.write("old\n")
        with open(os.path.join(self.folder, "cgipool.log.old"), "w") as f:
            f.write("not ours\n")
        log_file = self.open(max_bytes=1000, keep=2)
        self.assertEqual(log_file.pruned, 1998)
        self.assertEqual(self.files(), ["cgipool.log", "cgipool.log.1", "cgipool.log.2",
                                        "cgipool.log.old"])

    def test_appends_to_an_existing_file_and_counts_its_size(self) -> None:
        """A restart neither truncates the previous log nor lets it grow past
        ``max_bytes``: the existing size counts toward the next rotation."""
        with open(self.path, "w") as f:
            f.write("a" * 950 + "\n")
        log_file = self.open(max_bytes=1000, keep=1)
        self.assertEqual(log_file.size, 951)
        log_file.write("b" * 99 + "\n")  # would pass 1000: rotates first
        self.assertEqual(self.read(self.path), ["b" * 99])
        self.assertEqual(self.read(self.path + ".1"), ["a" * 950])

    def test_new_files_keep_the_first_ones_permissions(self) -> None:
        """A log the operator made group-readable stays so after rotation, even under
        the 077 umask a daemonized twistd runs with."""
        with open(self.path, "w"):
            pass
        os.chmod(self.path, 0o640)
        log_file = self.open(max_bytes=100, keep=1)
        old = os.umask(0o077)  # what a daemonized twistd runs with
        self.addCleanup(os.umask, old)
        log_file.write("a" * 60 + "\n")
        log_file.write("b" * 60 + "\n")
        self.assertEqual(os.stat(self.path).st_mode & 0o777, 0o640)

    def test_keep_zero_keeps_only_the_current_file(self) -> None:
        log_file = self.open(max_bytes=100, keep=0)
        for n in range(10):
            log_file.write(f"{n}" * 60 + "\n")
        self.assertEqual(self.files(), ["cgipool.log"])
        self.assertEqual(self.read(self.path), ["9" * 60])

    def test_a_file_removed_from_outside_is_recreated(self) -> None:
        """An operator deleting the log does not stop logging: the next write recreates
        the file and no error is counted."""
        log_file = self.open(max_bytes=100, keep=1)
        log_file.write("a" * 60 + "\n")
        os.unlink(self.path)
        log_file.write("b" * 60 + "\n")  # rotation finds nothing to rename
        self.assertEqual(self.read(self.path), ["b" * 60])
        self.assertEqual(log_file.write_errors, 0)

    def test_write_errors_are_counted_not_raised(self) -> None:
        """A full disk must not take the daemon down through its logging: each failed
        write is counted and the file reopened for the next one."""
        if not os.path.exists("/dev/full"):
            self.skipTest("no /dev/full")
        log_file = RotatingLogFile.open("/dev/full", 100, 1)  # every write: ENOSPC
        self.addCleanup(log_file.close)
        log_file.write("lost\n")
        log_file.write("lost again\n")  # reopened, fails again
        self.assertEqual(log_file.write_errors, 2)

    def test_the_daemon_log_observer_writes_twisted_logger_events(self) -> None:
        events = observer(self.path, 16 * 1024, 2)
        self.addCleanup(events.log_file.close)  # type: ignore[attr-defined]
        log = Logger(namespace="test", observer=events)
        for n in range(1000):
            log.info("event {n} of {what}", n=n, what="x" * 50)
        self.assertLessEqual(len(self.files()), 3)
        last = self.read(self.path)[-1]
        self.assertIn("[test#info] event 999 of " + "x" * 50, last)
        total = sum(os.path.getsize(os.path.join(self.folder, f)) for f in self.files())
        self.assertLessEqual(total, 3 * 16 * 1024)


class TwistdOptionsTests(SynchronousTestCase):
    """use_for_twistd: the plugin's options hand twistd our observer only when
    twistd would write a file (its --logfile semantics otherwise unchanged)."""

    def setUp(self) -> None:
        self.patch(logs, "twistd_settings", None)

    def test_logfile_gets_the_rotating_observer(self) -> None:
        """``--logfile FILE`` makes twistd log through the size-rotated observer (its own
        LogFile keeps every old file), with the path made absolute and the limits handed on."""
        options = {"logfile": "run/cgipool.log", "nodaemon": False, "logger": None}
        path = use_for_twistd(options, 1 << 20, 3)
        self.assertEqual(path, os.path.abspath("run/cgipool.log"))
        self.assertEqual(options["logger"], "cgipool.logs.twistd_observer")
        self.assertEqual(logs.twistd_settings, logs.DaemonLogSettings(path, 1 << 20, 3))

    def test_daemon_without_logfile_rotates_twistd_log(self) -> None:
        """A daemonized twistd with no ``--logfile`` writes ./twistd.log: that file is
        rotated too, rather than growing without bound."""
        options = {"logfile": None, "nodaemon": False}
        self.assertEqual(use_for_twistd(options, 1 << 20, 3), os.path.abspath("twistd.log"))

    def test_stdout_syslog_and_an_explicit_logger_are_left_alone(self) -> None:
        mine = object()
        for options in ({"logfile": None, "nodaemon": True},  # make run
                        {"logfile": "-", "nodaemon": True},
                        {"logfile": "x.log", "syslog": True},
                        {"logfile": "x.log", "logger": mine}):
            before = dict(options)
            self.assertIsNone(use_for_twistd(options, 1 << 20, 3))
            self.assertEqual(options, before)
        self.assertIsNone(use_for_twistd(None, 1 << 20, 3))


class _Request:
    """What twisted.web's combinedLogFormatter reads."""

    method, uri, clientproto, code, sentLength = b"GET", b"/x", b"HTTP/1.1", 200, 2

    def getClientAddress(self) -> Any:
        from twisted.internet.address import IPv4Address

        return IPv4Address("TCP", "127.0.0.1", 1234)

    def getHeader(self, name: bytes) -> None:
        return None


class AccessLogTests(SynchronousTestCase):
    def test_the_access_log_rotates_with_the_logs_settings(self) -> None:
        folder = os.path.abspath(self.mktemp())
        os.makedirs(folder)
        path = os.path.join(folder, "access.log")
        site = EdgeSite(Root({}), access_log=path, reactor=Clock(),
                        logs=LogsConfig(max_bytes=16 * 1024, keep=2))
        site.startFactory()
        self.addCleanup(site.stopFactory)
        self.assertIsInstance(site.logFile, RotatingLogFile)
        for _ in range(2000):
            site.log(_Request())  # type: ignore[arg-type]
        self.assertEqual(sorted(os.listdir(folder)),
                         ["access.log", "access.log.1", "access.log.2"])
        for name in os.listdir(folder):
            self.assertLessEqual(os.path.getsize(os.path.join(folder, name)), 16 * 1024)
        with open(path) as f:
            self.assertIn('"GET /x HTTP/1.1" 200 2', f.readline())
