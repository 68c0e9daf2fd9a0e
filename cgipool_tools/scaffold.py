"""``cgipool new-service NAME --lang c|python|csharp|cgi``: a new service folder.

Writes ``services/NAME/`` with a working source file and its ``service.yaml``
(route, health check, examples), refusing to touch an existing folder.  Then
``make all`` builds it (C: ``build/NAME.cgi``; C#: ``build/NAME.exe``) and
``make reload`` (SIGHUP) puts it in rotation in a running daemon.
"""

from __future__ import annotations

import os
import re
from typing import TextIO

from cgipool.config import route_problem

LANGUAGES = ("c", "python", "csharp", "cgi")
#: Lower-case letters, digits and '-': it names a folder, a binary and a route.
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,39}$")
#: Folders under services/ that are not services.
RESERVED_NAMES = frozenset({"lib", "build"})
HERE = os.path.dirname(os.path.abspath(__file__))
PROJECT = os.path.dirname(HERE)


class ScaffoldError(Exception):
    """A reason not to write anything."""


def check_name(name: str) -> None:
    if not NAME_RE.match(name):
        raise ScaffoldError(
            f"invalid service name {name!r}: use 1-40 lower-case letters, digits and '-', "
            "starting with a letter (it names the folder, the binary and the route)")
    if name in RESERVED_NAMES:
        raise ScaffoldError(f"{name!r} is reserved (services/{name} is not a service)")


def check_route(route: str) -> None:
    """The configuration's own rule, so a scaffolded manifest always loads."""
    problem = route_problem(route)
    if problem is not None:
        raise ScaffoldError(problem)


def _yaml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def manifest(name: str, lang: str, route: str, health: str, examples: list[str]) -> str:
    """The service.yaml text."""
    lines = [f"# Service {name!r}, scaffolded by `cgipool new-service`.  Keys: README.md,",
             "# section 'Configuration'.  `make all` builds it, `make reload` starts it."]
    if lang == "c":
        lines += [f"description: {name} API written in C (epoll, keep-alive)",
                  "language: c",
                  f'command: ["build/{name}.cgi", "{{port}}"]   # make all builds '
                  f"services/{name}/*.c"]
    elif lang == "python":
        lines += [f"description: {name} API written in Python (standard library)",
                  "language: python",
                  f'command: ["{{python}}", "{{service_dir}}/app.py", "{{port}}"]']
    elif lang == "csharp":
        lines += [f"description: {name} API written in C# (.NET or Mono)",
                  "language: csharp",
                  "runtimes:                         # the first one installed runs",
                  f"  - name: dotnet-script",
                  f"    requires: [dotnet-script]",
                  f'    command: ["dotnet-script", "{{service_dir}}/app.csx", "--", "{{port}}"]',
                  f"  - name: dotnet",
                  f"    requires: [dotnet, build/{name}-dotnet/{name}.dll]",
                  f'    command: ["dotnet", "build/{name}-dotnet/{name}.dll", "{{port}}"]',
                  f"  - name: mono",
                  f"    requires: [mono, build/{name}.exe]    # make all runs mcs",
                  f'    command: ["mono", "build/{name}.exe", "{{port}}"]']
    else:
        lines += [f"description: {name}, a classic CGI script (one process per request)",
                  "language: python",
                  "protocol: cgi",
                  f'command: ["{{python}}", "{{service_dir}}/{name}.py"]',
                  "request_timeout: 10               # then its process group is killed: 504",
                  "queue: {max: 32, timeout: 5}      # requests waiting for a free slot"]
    lines.append(f"route: {route}")
    if lang == "cgi":
        lines.append("workers: {max: 4}                 # at most 4 scripts at once")
    else:
        lines += ["workers: {min: 2, max: 4}",
                  f"health: {{path: {_yaml_string(health)}}}"]
    lines.append("examples:                         # requested by `make smoke-test`")
    lines += [f"  - {_yaml_string(example)}" for example in examples]
    return "\n".join(lines) + "\n"


def _template(path: str) -> str:
    with open(os.path.join(PROJECT, path), encoding="utf-8") as f:
        return f.read()


def sources(name: str, lang: str) -> dict[str, tuple[str, int]]:
    """``{file name: (text, mode)}`` of the service's source files."""
    if lang == "c":
        return {f"{name}.c": (C_TEMPLATE.replace("NAME", name), 0o644)}
    if lang == "python":
        text = _template("services/python/app.py")
        text = text.replace('NAME = "python"', f'NAME = "{name}"')
        text = text.replace('"Demo cgipool worker written in Python', f'"{name}: a cgipool worker '
                            'written in Python')
        return {"app.py": (text, 0o755)}
    if lang == "csharp":
        program = _template("services/csharp/Program.cs").replace(
            'const string Name = "csharp";', f'const string Name = "{name}";')
        project = _template("services/csharp/csharp.csproj").replace(
            "<AssemblyName>csharp</AssemblyName>", f"<AssemblyName>{name}</AssemblyName>")
        project = project.replace("services/csharp/csharp.csproj",
                                  f"services/{name}/{name}.csproj")
        project = project.replace("build/csharp-dotnet", f"build/{name}-dotnet")
        script = _template("services/csharp/app.csx").replace("services/csharp",
                                                               f"services/{name}")
        return {"Program.cs": (program, 0o644), f"{name}.csproj": (project, 0o644),
                "app.csx": (script, 0o644)}
    return {f"{name}.py": (CGI_TEMPLATE.replace("NAME", name), 0o755)}


def defaults(name: str, lang: str) -> tuple[str, str, list[str]]:
    """Route, health path and examples when none are given."""
    route = f"/api/{name}"
    if lang == "c":
        return route, "/?name=health", [f"{route}?name=world"]
    if lang == "cgi":
        return route, "/", [f"{route}?name=world"]
    return route, "/?service=health", [f"{route}?service=demo&data=test"]


def scaffold(name: str, lang: str, services_dir: str, route: str | None = None,
             health: str | None = None, examples: list[str] | None = None) -> list[str]:
    """Write ``services_dir/name/``; the paths written.

    :raises ScaffoldError: bad name, language, route or health path, or the folder exists.
    """
    check_name(name)
    if lang not in LANGUAGES:
        raise ScaffoldError(f"unknown language {lang!r} (use {', '.join(LANGUAGES)})")
    default_route, default_health, default_examples = defaults(name, lang)
    route = route or default_route
    check_route(route)
    health = health or default_health
    if not health.startswith("/"):
        raise ScaffoldError(f"the health path must start with '/', got {health!r}")
    if examples:
        for example in examples:
            if not example.startswith(route):
                raise ScaffoldError(f"example {example!r} is not under the route {route!r}")
    else:
        examples = [e.replace(default_route, route, 1) for e in default_examples]
    if not os.path.isdir(services_dir):
        raise ScaffoldError(f"no services folder at {services_dir!r} (run this in the "
                            "project folder, or give --services-dir)")
    folder = os.path.join(services_dir, name)
    if os.path.lexists(folder):
        raise ScaffoldError(f"{folder} already exists; not overwriting it")
    files = {name_: text for name_, text in sources(name, lang).items()}
    files["service.yaml"] = (manifest(name, lang, route, health, examples), 0o644)
    os.makedirs(folder)
    written = []
    for file_name, (text, mode) in files.items():
        path = os.path.join(folder, file_name)
        with open(path, "x", encoding="utf-8") as f:
            f.write(text)
        os.chmod(path, mode)
        written.append(path)
    return written


def run_new_service(name: str, lang: str, services_dir: str, route: str | None,
                    health: str | None, examples: list[str], out: TextIO, err: TextIO) -> int:
    try:
        written = scaffold(name, lang, services_dir, route, health, examples or None)
    except ScaffoldError as e:
        err.write(f"cgipool new-service: error: {e}\n")
        return 1
    out.write(f"created services/{name}/:\n")
    for path in written:
        out.write(f"  {os.path.relpath(path)}\n")
    build = {"c": f"make all              # builds build/{name}.cgi\n",
             "csharp": f"make all              # builds build/{name}.exe (needs mono-mcs)\n",
             }.get(lang, "")
    out.write("next:\n  " + build.replace("\n", "\n  ") +
              "make reload           # a running daemon starts it (or: make start-bg)\n"
              "  make smoke-test       # requests its examples\n")
    return 0


C_TEMPLATE = r"""/*
 * NAME.cgi - a cgipool worker in C, scaffolded by `cgipool new-service`.
 *
 *   GET /?name=you -> {"service": "NAME", "hello": "you", "pid": ..., "port": ...}
 *
 * services/lib/httpd.h does the HTTP (epoll, keep-alive, SIGTERM); edit handle().
 * Usage: NAME.cgi PORT   (or $PORT)
 */
#include "../lib/httpd.h"

static void handle(const struct httpd_request *req, struct httpd_response *res)
{
    char name[256];
    if (httpd_query_param(req->query, "name", name, sizeof name) <= 0) {
        httpd_resp_error(res, 400, "missing name parameter");
        return;
    }
    httpd_resp_append(res, "{\"service\": \"NAME\", \"hello\": ");
    httpd_resp_json_string(res, name);
    httpd_resp_json_end(res);
}

int main(int argc, char **argv)
{
    return httpd_main("NAME", argc, argv, handle);
}
"""

CGI_TEMPLATE = '''#!/usr/bin/env python3
"""NAME: a classic CGI script (RFC 3875), scaffolded by `cgipool new-service`.

cgipool runs it once per request: the request is in the environment
(REQUEST_METHOD, QUERY_STRING, PATH_INFO, CONTENT_LENGTH, HTTP_*...), the body
on stdin; it prints header fields, a blank line, then the body.

    GET /?name=you -> {"service": "NAME", "hello": "you", "pid": ...}
"""

import json
import os
import sys
from urllib.parse import parse_qsl


def main() -> int:
    params = dict(parse_qsl(os.environ.get("QUERY_STRING", "")))
    if os.environ.get("PATH_INFO", "") not in ("", "/"):
        status, payload = "404 Not Found", {"error": "not found"}
    else:
        status, payload = "200 OK", {"service": "NAME", "hello": params.get("name", "world")}
    payload["pid"] = os.getpid()
    sys.stdout.write(f"Status: {status}\\r\\nContent-Type: application/json\\r\\n\\r\\n")
    sys.stdout.write(json.dumps(payload) + "\\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
'''
