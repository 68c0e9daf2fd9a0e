"""A service's command: argv templates, placeholders, and choosing a runtime.

``command`` is a list of arguments or one shell-like string; ``{port}`` and
``{worker}`` stay for spawn time (:func:`expand`), the other placeholders are
filled in now.  ``runtimes`` lists candidate commands tried in order, the first
whose programs are installed running (:func:`command_or_runtimes`).
"""

from __future__ import annotations

import os
import shlex
import string
import sys
from collections.abc import Mapping

import yaml

from cgipool.config.model import PLACEHOLDERS, ServiceConfig
from cgipool.config.probe import missing_requirement, resolve_program
from cgipool.config.yaml_reader import ConfigError, Value, YamlMapping


def _command(v: Value, base_dir: str, cwd: str, service: str,
             service_dir: str | None, check_executables: bool) -> tuple[str, ...]:
    if isinstance(v.node, yaml.SequenceNode):
        argv = [_argument(item) for item in v.items()]
    elif v.is_mapping():
        raise v.error('expected a list of arguments like ["build/x.cgi", "{port}"] '
                      "or one string, got a mapping")
    else:
        try:
            argv = shlex.split(v.string())
        except ValueError as e:
            raise v.error(f"cannot split command: {e}") from None
    if not argv or not argv[0]:
        raise v.error("command is empty")
    for arg in argv:
        for _, field, _, _ in _safe_parse(v, arg):
            if field is not None and field not in PLACEHOLDERS:
                raise v.error(
                    f"unknown placeholder {{{field}}} in {arg!r} (known: "
                    + ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
                    + "; write {{ and }} for literal braces)"
                )
    fixed = {
        "python": sys.executable,
        "service": service,
        "base_dir": base_dir,
        "service_dir": service_dir or base_dir,
    }
    program = expand(argv[0], fixed, port=0, worker=0)
    program, problem = resolve_program(program, base_dir, check_executables)
    if problem is not None:
        raise v.error(problem)
    # Fill in the fixed placeholders now; {port} and {worker} stay for spawn time.
    rest = [_partial(arg, fixed) for arg in argv[1:]]
    return (program.replace("{", "{{").replace("}", "}}"), *rest)


def _argument(v: Value) -> str:
    value = v.scalar()
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float)):
        raise v.error(f"command arguments must be strings, got {value!r}")
    text = str(value)
    if "\0" in text:
        raise v.error("command arguments cannot contain NUL")
    return text


def _safe_parse(v: Value, text: str) -> list[tuple[str, str | None, str | None, str | None]]:
    try:
        return list(string.Formatter().parse(text))
    except ValueError as e:
        raise v.error(f"bad placeholder in {text!r}: {e}") from None


def _partial(text: str, fixed: Mapping[str, str]) -> str:
    """Substitute the fixed placeholders, keep ``{port}``/``{worker}`` for later."""
    out = []
    for literal, field, spec, conv in string.Formatter().parse(text):
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if field is None:
            continue
        if field in fixed:
            out.append(str(fixed[field]).replace("{", "{{").replace("}", "}}"))
        else:
            out.append("{" + field + "}")
    return "".join(out)


def expand(text: str, fixed: Mapping[str, str] | None = None, *, port: int,
           worker: int) -> str:
    """Fill in every placeholder of one command argument."""
    values = dict(fixed or {})
    values.update(port=str(port), worker=str(worker))
    return text.format_map(_Default(values))


class _Default(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def command_or_runtimes(m: YamlMapping, base_dir: str, cwd: str, service: str,
                        service_dir: str | None, check_executables: bool
                        ) -> tuple[tuple[str, ...], str, str | None]:
    """``(command, runtime name, unavailable reason)`` from ``command`` or ``runtimes``.

    ``runtimes`` lists candidates ``{name, command, requires}`` tried in order:
    the first whose ``requires`` (programs on PATH, or files relative to
    ``base_dir``) and command program are all present runs.  When none is, the
    service is *unavailable* (with the reason) instead of a configuration error,
    so the rest of the pool still runs.
    """
    runtimes = m.take("runtimes")
    if runtimes is None or runtimes.is_null():
        command = m.require(
            "command",
            lambda v: _command(v, base_dir, cwd, service, service_dir, check_executables))
        return command, "", None
    if m.has("command"):
        raise m.values["command"].error(
            "give either 'command' or 'runtimes', not both (to pin one runtime, "
            "override 'runtimes' with a list of one)")
    m.take("command")
    items = runtimes.items()
    if not items:
        raise runtimes.error("runtimes is empty; list at least one {name, command}")
    chosen: tuple[tuple[str, ...], str] | None = None
    problems: list[str] = []
    names: set[str] = set()
    for item in items:
        entry = item.mapping()
        name = entry.require("name", Value.string)
        if name in names:
            raise entry.values["name"].error(f"runtime {name!r} is listed twice")
        names.add(name)
        requires = entry.get("requires", lambda v: [x.string() for x in v.items()], [])
        command_value = entry.take("command")
        if command_value is None or command_value.is_null():
            raise entry.where.child("command").error(entry.node, "is required")
        entry.finish()
        # Syntax first: a mistake in any candidate is an error, found or not.
        _command(command_value, base_dir, cwd, service, service_dir, False)
        if chosen is not None:
            continue
        if not check_executables:
            chosen = (_command(command_value, base_dir, cwd, service, service_dir, False), name)
            continue
        missing = [missing_requirement(req, base_dir) for req in requires]
        missing = [text for text in missing if text]
        if not missing:
            try:
                chosen = (_command(command_value, base_dir, cwd, service, service_dir, True),
                          name)
                continue
            except ConfigError as e:
                missing.append(e.message)
        problems.append(f"{name}: {', '.join(missing)}")
    if chosen is None:
        return (), "", "no runtime installed (" + "; ".join(problems) + ")"
    return chosen[0], chosen[1], None


def check_cgi(m: YamlMapping, svc: ServiceConfig) -> None:
    """What a per-request CGI service cannot have: ports, {port}, NPH scripts."""
    if svc.ports:
        raise m.values["ports"].error("a CGI service (protocol: cgi) listens on no port")
    where = m.values.get("command") or m.values["runtimes"]
    for arg in svc.command:
        if "{port}" in arg or "{worker}" in arg:
            raise where.error(
                "a CGI service runs once per request: {port} and {worker} mean nothing here")
        if os.path.basename(arg).startswith("nph-"):
            raise where.error(
                f"non-parsed-header scripts ({os.path.basename(arg)!r}) are not supported: "
                "cgipool parses the script's CGI header; rename it without 'nph-' and "
                "print 'Status:' and 'Content-Type:' lines instead")
