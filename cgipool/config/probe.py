"""What the configuration asks of the machine and of Twisted's endpoint syntax.

Run while the file is read, with no reactor: an endpoint string is parsed by
Twisted's public ``serverFromString`` given a stand-in that parsing only stores
(the global reactor, imported here, would be installed before twistd has chosen
the one ``--reactor`` names), and its address by :func:`listen_address`, since
Twisted keeps it private.  Programs are looked up on ``PATH`` or under
``base_dir``.  Each function answers with a problem in words (or raises
``ValueError``), never a :class:`~cgipool.config.ConfigError`: the readers in
:mod:`cgipool.config.validate` put it on the key it came from.
"""

from __future__ import annotations

import os
import re
import shutil

import attrs

#: Stands in for the reactor while endpoint strings are checked: parsing only
#: stores it, and importing the global reactor here would install one before
#: twistd has chosen it.
_NO_REACTOR = object()


def endpoint_problem(text: str) -> str | None:
    """Why ``text`` is not an endpoint string the daemon can listen on, or None."""
    from twisted.internet import endpoints

    try:
        endpoints.serverFromString(_NO_REACTOR, text)
    except Exception as e:
        hint = ("; an IPv6 address needs its colons escaped: "
                "'tcp6:8080:interface=\\:\\:1'" if re.search(r"interface=[^\\]*::?", text)
                else "; example: 'tcp:8080:interface=127.0.0.1'")
        return f"not a valid Twisted endpoint string ({e}){hint}"
    try:
        address = listen_address(text)
    except ValueError as e:
        return str(e)
    if address is not None and not 0 <= address.port <= 65535:
        return f"port {address.port} is out of range (0-65535)"
    if address is not None and address.kind == "tcp6" and address.host \
            and address.family != 6:
        return (f"tcp6 listens on IPv6 addresses, not {address.host!r}; write "
                f"'tcp:{address.port}:interface={address.host}'")
    return None


@attrs.frozen
class ListenAddress:
    """Where a TCP endpoint string listens (``host`` ``""``: every address)."""

    kind: str
    host: str
    port: int

    @property
    def family(self) -> int:
        """4 or 6 (``tcp:…:interface=\\:\\:1`` listens on IPv6 too, as in Twisted)."""
        return 6 if ":" in self.host or (self.kind == "tcp6" and not self.host) else 4

    def overlaps(self, other: ListenAddress) -> bool:
        """Whether both cannot listen at once: one port, and one address or a
        wildcard covering the other (``::`` also takes IPv4 on Linux)."""
        if self.port != other.port:
            return False
        if self.host == other.host or "::" in (self.host, other.host) \
                or (not self.host and self.kind == "tcp6") \
                or (not other.host and other.kind == "tcp6"):
            return True
        wildcard = {"", "0.0.0.0"}
        return (self.family == other.family == 4
                and (self.host in wildcard or other.host in wildcard))

    def __str__(self) -> str:
        host = self.host or ("::" if self.family == 6 else "0.0.0.0")
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"


def listen_address(text: str) -> ListenAddress | None:
    """The address of a ``tcp``, ``tcp6`` or ``ssl`` endpoint string, None for
    other kinds (``unix:``, ``systemd:``…).  Parsed here, in Twisted's syntax
    (``:`` separates, ``\\`` escapes, ``key=value`` or positional), because
    Twisted's endpoints keep it in private attributes.

    :raises ValueError: a port that is not a number.
    """
    args: list[str] = []
    kwargs: dict[str, str] = {}
    current, escaped, parts = "", False, []
    for char in text:
        if escaped:
            current, escaped = current + char, False
        elif char == "\\":
            escaped = True
        elif char == ":":
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    kind = parts[0].lower()
    if kind not in ("tcp", "tcp6", "ssl"):
        return None
    for part in parts[1:]:
        key, equals, value = part.partition("=")
        if equals:
            kwargs[key] = value
        else:
            args.append(part)
    port_text = kwargs.get("port", args[0] if args else "")
    # Positional after the port: tcp and tcp6 take the interface, ssl the key file.
    host = kwargs.get("interface", args[1] if len(args) > 1 and kind != "ssl" else "")
    if not port_text.strip().isdigit():
        raise ValueError(f"port {port_text!r} is not a number")
    return ListenAddress(kind, host, int(port_text))


def resolve_program(program: str, base_dir: str, check: bool) -> tuple[str, str | None]:
    """``(path, problem)`` for a command's program: a name with ``/`` is a path
    relative to ``base_dir`` (made absolute), a bare name is looked up on ``PATH``
    (only when ``check``).  ``problem`` is why it cannot run here (with ``check``:
    missing, not executable, not on PATH), or None."""
    if "/" in program:
        program = os.path.normpath(os.path.join(base_dir, program))
        if check:
            if not os.path.exists(program):
                under = program.startswith(os.path.join(base_dir, ""))
                hint = " (run 'make all' to build the services)" if under else ""
                return program, f"executable {program!r} does not exist{hint}"
            if os.path.isdir(program) or not os.access(program, os.X_OK):
                return program, f"{program!r} is not an executable file"
    elif check:
        found = shutil.which(program)
        if found is None:
            return program, f"executable {program!r} not found on PATH"
        program = found
    return program, None


def missing_requirement(requirement: str, base_dir: str) -> str | None:
    """Why ``requirement`` (a program on PATH, or a file) is not there, or None."""
    if "/" in requirement:
        path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(requirement)))
        if os.path.exists(path):
            return None
        under = path.startswith(os.path.join(base_dir, ""))
        return f"{requirement!r} does not exist" + (" (run 'make all')" if under else "")
    if shutil.which(requirement) is None:
        return f"{requirement!r} not found on PATH"
    return None
