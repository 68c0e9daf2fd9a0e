"""Size-rotated log files with a bounded number of old ones (``logs: {max_bytes, keep}``).

Both the daemon log (twistd's ``--logfile``) and the access log (``access_log``)
are written through :class:`RotatingLogFile`: when the next write would take
the file past ``max_bytes`` it becomes ``<path>.1``, ``.1`` becomes ``.2`` and
so on up to ``<path>.<keep>``, which the rename replaces (the oldest is gone).
So the log never takes more than ``(keep + 1) × max_bytes`` on disk, whatever a
worker or a client makes the daemon write.

Why not :class:`twisted.python.logfile.LogFile`, which twistd uses by default:
it rotates at 1 MB and keeps every old file, and each rotation lists the
directory and renames *every* old file, so with thousands of them a rotation
stalls the reactor.  Here a rotation is at most ``keep`` renames, no directory
listing; old files beyond ``keep`` (left by an earlier twistd) are removed once,
when the file is opened at start-up.  Writes go straight to the file, one
``write()`` per log event, as LogFile does (opened unbuffered).

The daemon log gets this under twistd through its ``--logger`` option:
:func:`use_for_twistd`, called from the plugin's ``Options.postOptions``, names
:func:`twistd_observer` as the log observer factory when twistd would log to a
file (``--logfile``, or ``twistd.log`` when it daemonizes without one), and
leaves stdout (``twistd -n`` without ``--logfile``, ``--logfile -``),
``--syslog`` and another ``--logger`` alone.  twistd calls a factory it imports
by name with no arguments, so the file and the limits wait in
:data:`twistd_settings` until it does.
"""

from __future__ import annotations

import os
import re
import signal
import stat
from collections.abc import MutableMapping
from typing import Any

import attrs
from twisted.logger import FileLogObserver, textFileLogObserver

#: The file twistd logs to when it daemonizes without ``--logfile``.
TWISTD_DEFAULT_LOG = "twistd.log"
#: The ``--logger`` name twistd imports (and calls) for the daemon log.
TWISTD_LOGGER = "cgipool.logs.twistd_observer"


@attrs.frozen
class DaemonLogSettings:
    """What :func:`twistd_observer` opens: the file and its ``logs:`` limits."""

    path: str
    max_bytes: int
    keep: int


#: Set by :func:`use_for_twistd` while twistd parses its options.
twistd_settings: DaemonLogSettings | None = None


@attrs.define(eq=False)
class RotatingLogFile:
    """A file object for log text that rotates by size and keeps ``keep`` old files.

    It never raises from :meth:`write` (a log observer that raises is removed
    by twisted.logger, and a full disk must not stop the daemon): a failed write
    is counted in ``write_errors`` and the file is reopened on the next one.
    """

    path: str
    max_bytes: int
    keep: int
    #: Bytes in the current file.
    size: int = attrs.field(default=0, init=False)
    rotations: int = attrs.field(default=0, init=False)
    write_errors: int = attrs.field(default=0, init=False)
    #: Old files beyond ``keep`` removed when it was opened.
    pruned: int = attrs.field(default=0, init=False)
    #: The permissions of the file when it was opened, given to each new one (a
    #: daemonized twistd's umask is 077: a rotated log would lose them, as
    #: Twisted's LogFile avoids too).
    mode: int | None = attrs.field(default=None, init=False)
    _file: Any = attrs.field(default=None, init=False, repr=False)

    @classmethod
    def open(cls, path: str, max_bytes: int, keep: int) -> RotatingLogFile:
        """Open (append to) ``path``; remove old files beyond ``keep`` once."""
        log_file = cls(os.path.abspath(path), max_bytes, keep)
        log_file.pruned = log_file.prune()
        try:
            log_file.mode = stat.S_IMODE(os.stat(log_file.path).st_mode)
        except OSError:
            pass  # a new file: the mode the umask gives it now
        log_file._reopen()
        if log_file._file is None:
            # Refusing to start is better than a daemon that logs nowhere.
            raise OSError(f"cannot open the log file {log_file.path!r}")
        return log_file

    @property
    def closed(self) -> bool:
        return self._file is None

    def old_file(self, n: int) -> str:
        return f"{self.path}.{n}"

    def old_files(self) -> list[str]:
        """The kept old files that exist, newest first."""
        return [self.old_file(n) for n in range(1, self.keep + 1)
                if os.path.exists(self.old_file(n))]

    def write(self, data: str | bytes) -> None:
        raw = data.encode("utf-8", "replace") if isinstance(data, str) else bytes(data)
        if not raw:
            return
        if self.size and self.size + len(raw) > self.max_bytes:
            self.rotate()
        if self._file is None:
            self._reopen()
            if self._file is None:
                self.write_errors += 1
                return
        try:
            view = memoryview(raw)
            while view:
                written = self._file.write(view)
                view = view[written:]
        except OSError:
            self.write_errors += 1
            self._close()
            return
        self.size += len(raw)

    def flush(self) -> None:
        """Nothing is buffered (FileLogObserver calls this after each event)."""

    def rotate(self) -> None:
        """``path`` → ``path.1`` → … → ``path.<keep>`` (replacing it); a new ``path``.

        At most ``keep`` renames: each one replaces its target, so the oldest
        file disappears without a listing or a delete.
        """
        self._close()
        try:
            if self.keep == 0:
                os.unlink(self.path)
            else:
                for n in range(self.keep - 1, 0, -1):
                    try:
                        os.replace(self.old_file(n), self.old_file(n + 1))
                    except FileNotFoundError:
                        pass
                os.replace(self.path, self.old_file(1))
        except FileNotFoundError:
            pass  # removed from outside: start a new one
        except OSError:
            self.write_errors += 1  # cannot rename: keep appending rather than lose lines
        self.rotations += 1
        self._reopen()

    def prune(self) -> int:
        """Remove ``path.N`` for N > keep (from an earlier run or another keep)."""
        folder, name = os.path.split(self.path)
        pattern = re.compile(re.escape(name) + r"\.(\d+)")
        removed = 0
        try:
            entries = os.listdir(folder or ".")
        except OSError:
            return 0
        for entry in entries:
            match = pattern.fullmatch(entry)
            if match and int(match.group(1)) > self.keep:
                try:
                    os.unlink(os.path.join(folder, entry))
                    removed += 1
                except OSError:
                    pass
        return removed

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        f, self._file = self._file, None
        if f is not None:
            try:
                f.close()
            except OSError:
                pass

    def _reopen(self) -> None:
        try:
            f = open(self.path, "ab", buffering=0)
        except OSError:
            self._file = None
            return
        self._file = f
        try:
            info = os.fstat(f.fileno())
            self.size = info.st_size
            if self.mode is None:
                self.mode = stat.S_IMODE(info.st_mode)
            elif stat.S_IMODE(info.st_mode) != self.mode and self.size == 0:
                os.fchmod(f.fileno(), self.mode)
        except OSError:
            self.size = 0


def observer(path: str, max_bytes: int, keep: int) -> FileLogObserver:
    """The daemon log: twisted.logger's text format into a :class:`RotatingLogFile`.

    Called by twistd (as its ``--logger`` factory) before it daemonizes, so the
    file is opened in the directory it was started from, as twistd's own is.
    SIGUSR1 rotates it, as it does twistd's LogFile.
    """
    log_file = RotatingLogFile.open(path, max_bytes, keep)
    try:
        from twisted.internet import reactor

        def rotate(signum: int, frame: Any) -> None:
            reactor.callFromThread(log_file.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotate)
    except ValueError:
        pass  # not the main thread
    result = textFileLogObserver(log_file)  # type: ignore[arg-type]
    result.log_file = log_file  # type: ignore[attr-defined]
    return result


def twistd_observer() -> FileLogObserver:
    """twistd's ``--logger`` factory (:data:`TWISTD_LOGGER`): the daemon log."""
    settings = twistd_settings
    if settings is None:
        raise RuntimeError(f"{TWISTD_LOGGER} is set up by the cgipool plugin's options; "
                           "use `twistd --logfile FILE cgipool` instead of naming it")
    return observer(settings.path, settings.max_bytes, settings.keep)


def use_for_twistd(server_options: MutableMapping[str, Any] | None, max_bytes: int,
                   keep: int) -> str | None:
    """Make twistd write its log through :func:`twistd_observer` when it logs to a file.

    ``server_options`` is twistd's own options (the plugin options' ``parent``;
    twistd imports the ``logger`` name after the plugin's options are parsed).
    Returns the log file's path, or None when twistd's choice stands: stdout
    (``-n`` without ``--logfile``, or ``--logfile -``), ``--syslog``, or
    another ``--logger``.
    """
    global twistd_settings
    if server_options is None or server_options.get("syslog"):
        return None
    if server_options.get("logger") not in (None, "", TWISTD_LOGGER):
        return None
    logfile = server_options.get("logfile") or ""
    if logfile == "-" or (not logfile and server_options.get("nodaemon")):
        return None
    path = os.path.abspath(logfile or TWISTD_DEFAULT_LOG)
    twistd_settings = DaemonLogSettings(path, max_bytes, keep)
    server_options["logger"] = TWISTD_LOGGER
    return path
