"""What a worker was started from: the files whose change means "restart it".

A running process does not notice that its binary was rebuilt (``make all``) or
its script edited.  Each worker records, at spawn, a :class:`FileStamp` of its
service's input files — the command's program, every argument that names a
file (``{python} app.py`` → ``app.py``) and the manifest's ``watch`` entries —
and a reload (cgipool/reload.py) compares those records with the files now, so
a changed input rolls the service.

A stamp is size and ``mtime_ns``, plus a SHA-256 of files up to
:data:`HASH_LIMIT`: a rebuild that writes the same bytes again (``touch``, an
unchanged ``make``) is not a change.  Digests are cached by ``(size, mtime_ns,
inode)``, so a spawn only hashes a file that changed since the last look.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

#: Files up to this size are hashed; larger ones compare by size and mtime only.
HASH_LIMIT = 16 * 1024 * 1024
#: At most this many files per service (a ``watch`` of a huge tree stays cheap).
MAX_FILES = 2000
#: Folders of a watched directory that never count (byte-code caches, VCS data).
SKIPPED_DIRS = frozenset({"__pycache__", "node_modules"})


@attrs.frozen
class FileStamp:
    """One input file as a worker's process was started from it."""

    #: None: the file did not exist.
    size: int | None
    mtime_ns: int = 0
    digest: str | None = None

    def same_as(self, other: FileStamp) -> bool:
        if self.size is None or other.size is None:
            return self.size == other.size
        if self.size != other.size:
            return False
        if self.digest is not None and other.digest is not None:
            return self.digest == other.digest
        return self.mtime_ns == other.mtime_ns


MISSING = FileStamp(None)


def _unescape(arg: str) -> str:
    return arg.replace("{{", "{").replace("}}", "}")


def command_files(config: Any) -> list[str]:
    """The program of ``config.command`` and every later argument naming a file
    (relative to ``config.cwd``), as absolute paths; placeholders are skipped."""
    command = tuple(getattr(config, "command", ()) or ())
    if not command:
        return []
    files = [_unescape(command[0])]
    cwd = getattr(config, "cwd", ".") or "."
    for arg in command[1:]:
        if not arg or arg.startswith("-") or "{port}" in arg or "{worker}" in arg:
            continue
        path = os.path.normpath(os.path.join(cwd, _unescape(arg)))
        if os.path.isfile(path):
            files.append(path)
    return files


def watched_files(patterns: Iterable[str]) -> list[str]:
    """The files of ``watch`` entries (absolute paths or globs, ``**`` recursive):
    a folder stands for every file below it.  A pattern matching nothing stays,
    so that its files appearing later is a change."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern, recursive=True)) if glob.has_magic(pattern) \
            else [pattern]
        if not matches:
            files.append(pattern)
        for match in matches:
            if os.path.isdir(match):
                files.extend(_tree(match))
            else:
                files.append(match)
        if len(files) >= MAX_FILES:
            break
    return files[:MAX_FILES]


def _tree(top: str) -> list[str]:
    found: list[str] = []
    for folder, dirs, names in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d not in SKIPPED_DIRS)
        found.extend(os.path.join(folder, n) for n in sorted(names)
                     if not n.startswith(".") and not n.endswith((".pyc", ".pyo")))
        if len(found) >= MAX_FILES:
            break
    return found


def input_files(config: Any) -> dict[str, str]:
    """``path -> kind`` (``"executable"`` or ``"watched"``) of a service's inputs."""
    inputs = {path: "executable" for path in command_files(config)}
    for path in watched_files(getattr(config, "watch", ()) or ()):
        inputs.setdefault(path, "watched")
    return inputs


class InputStamps:
    """Stamps files, hashing each version of a file once."""

    def __init__(self) -> None:
        self._digests: dict[str, tuple[tuple[int, int, int], str | None]] = {}

    def stamp(self, path: str) -> FileStamp:
        try:
            st = os.stat(path)
        except OSError:
            self._digests.pop(path, None)
            return MISSING
        key = (st.st_size, st.st_mtime_ns, st.st_ino)
        cached = self._digests.get(path)
        if cached is not None and cached[0] == key:
            digest = cached[1]
        else:
            digest = _digest(path) if st.st_size <= HASH_LIMIT else None
            self._digests[path] = (key, digest)
        return FileStamp(st.st_size, st.st_mtime_ns, digest)

    def stamps(self, paths: Iterable[str]) -> dict[str, FileStamp]:
        return {path: self.stamp(path) for path in paths}


def _digest(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except OSError:
        return None


def changed_files(before: Mapping[str, FileStamp], now: Mapping[str, FileStamp]) -> list[str]:
    """The paths whose stamp differs (or that appeared or went), in ``now``'s order."""
    changed = [p for p, stamp in now.items()
               if not before.get(p, MISSING).same_as(stamp)]
    changed += [p for p, stamp in before.items()
                if p not in now and stamp.size is not None]
    return changed


def describe_change(paths: list[str], kinds: Mapping[str, str], base: str) -> str:
    """``executable build/search.cgi changed`` (paths shown relative to ``base``)."""
    if not paths:
        return ""

    def shown(path: str) -> str:
        rel = os.path.relpath(path, base) if os.path.isabs(path) else path
        return path if rel.startswith("..") else rel

    first = paths[0]
    kind = kinds.get(first, "watched file")
    if kind == "watched":
        kind = "watched file"
    text = f"{kind} {shown(first)} changed"
    if len(paths) > 1:
        text += f" (+{len(paths) - 1} more)"
    return text
