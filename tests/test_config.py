"""The pool configuration is refused, before anything is spawned, with one clear line.

Every bad case asserts the whole location of the :class:`ConfigError` — file,
line, service, key — and a meaningful part of its message, plus the one-line
form ``file:line: service 'x': key 'y': message`` that the daemon prints.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import TestCase

from cgipool.config import ConfigError, Example, HealthConfig, WorkersConfig, expand, load
from cgipool.config import DEFAULT_ADMIN_LISTEN, DEFAULT_LISTEN, LogsConfig, listen_address

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = os.path.join(ROOT, "etc", "pool.yaml")
TWISTD = os.path.join(ROOT, ".venv", "bin", "twistd")
SH = shutil.which("sh")


class ConfigTestCase(TestCase):
    """Helpers: write YAML into fresh temp folders and check the error raised."""

    def folder(self) -> str:
        path = os.path.abspath(self.mktemp())
        os.makedirs(path)
        return path

    def write(self, text: str, name: str = "pool.yaml", folder: str | None = None) -> str:
        """Write dedented ``text`` (line 1 = its first line) to ``folder/name``."""
        path = os.path.join(folder or self.folder(), name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(textwrap.dedent(text))
        return path

    def executable(self, path: str, body: str = "#!/bin/sh\nexit 0\n", mode: int = 0o755) -> str:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(body)
        os.chmod(path, mode)
        return path

    def project(self, pool: str, manifests: dict[str, str]) -> tuple[str, str, dict[str, str]]:
        """``root/etc/pool.yaml`` plus ``root/services/<name>/service.yaml``."""
        root = self.folder()
        pool_path = self.write(pool, os.path.join("etc", "pool.yaml"), root)
        paths = {
            name: self.write(text, os.path.join("services", name, "service.yaml"), root)
            for name, text in manifests.items()
        }
        return root, pool_path, paths

    def assertConfigError(self, path: str, *, line: int | None, service: str | None,
                          key: str | None, message: str, file: str | None = None,
                          **load_options) -> ConfigError:
        error = self.assertRaises(ConfigError, load, path, **load_options)
        file = file or os.path.abspath(path)
        self.assertEqual(
            (error.file, error.line, error.service, error.key),
            (file, line, service, key),
            f"wrong location in: {error}",
        )
        self.assertIn(message, error.message)
        # The one line the daemon prints.
        where = file if line is None else f"{file}:{line}"
        parts = [where]
        if service is not None:
            parts.append(f"service {service!r}")
        if key is not None:
            parts.append(f"key {key!r}")
        self.assertEqual(str(error), ": ".join(parts) + ": " + error.message)
        self.assertNotIn("\n", str(error))
        return error

    def assertServiceError(self, body: str, *, line: int, key: str | None, message: str,
                           service: str = "search", **load_options) -> ConfigError:
        """A pool file whose only service is broken."""
        return self.assertConfigError(self.write(body), line=line, service=service,
                                      key=key, message=message, **load_options)


# --------------------------------------------------------------------------


class ShippedConfigTests(ConfigTestCase):
    """``etc/pool.yaml`` and ``services/*/service.yaml`` as shipped."""

    def load_shipped(self):
        built = all(os.access(os.path.join(ROOT, "build", f"{name}.cgi"), os.X_OK)
                    for name in ("search", "auth", "calculator"))
        return load(SHIPPED, check_executables=built)

    def test_shipped_pool_yaml_loads_four_services(self) -> None:
        config = self.load_shipped()
        self.assertEqual(config.path, SHIPPED)
        self.assertEqual(config.listen, DEFAULT_LISTEN)  # 127.0.0.1, and ::1 where it exists
        self.assertEqual(config.listen_if_available, DEFAULT_LISTEN[1:])
        self.assertEqual(config.admin.listen, DEFAULT_ADMIN_LISTEN)
        self.assertEqual(config.base_dir, ROOT)
        self.assertEqual(config.services_dir, os.path.join(ROOT, "services"))
        self.assertEqual(config.port_range, (9100, 9999))
        self.assertIsNone(config.access_log)
        self.assertEqual([s.name for s in config.services],
                         ["auth", "calculator", "cgi-python", "cgi-shell", "csharp", "python",
                          "search"])
        self.assertEqual(
            {s.name: s.route for s in config.services},
            {"search": "/api/search", "auth": "/api/auth",
             "calculator": "/api/calc", "python": "/api/python", "csharp": "/api/csharp",
             "cgi-shell": "/api/cgi-shell", "cgi-python": "/api/cgi-python"},
        )
        self.assertEqual(
            {s.name: s.workers for s in config.services},
            {"search": WorkersConfig(2, 4), "auth": WorkersConfig(2, 3),
             "calculator": WorkersConfig(2, 3), "python": WorkersConfig(2, 3),
             "csharp": WorkersConfig(2, 3), "cgi-shell": WorkersConfig(1, 4),
             "cgi-python": WorkersConfig(1, 4)},
        )
        self.assertEqual(
            {s.name: s.health.path for s in config.services},
            {"search": "/?q=health", "auth": "/?user=health",
             "calculator": "/?op=add&a=1&b=1", "python": "/?service=health",
             "csharp": "/?service=health", "cgi-shell": "/", "cgi-python": "/"},
        )

    def test_shipped_commands_resolved_against_project_root(self) -> None:
        config = self.load_shipped()
        for name in ("search", "auth", "calculator"):
            self.assertEqual(config.service(name).command,
                             (os.path.join(ROOT, "build", f"{name}.cgi"), "{port}"))
        self.assertEqual(config.service("python").command,
                         (sys.executable, "services/python/app.py", "{port}"))
        for svc in config.services:
            self.assertEqual(svc.cwd, ROOT)
            self.assertEqual(svc.service_dir, os.path.join(ROOT, "services", svc.name))
            self.assertTrue(svc.examples, svc.name)

    def test_shipped_search_override_merged_over_manifest(self) -> None:
        search = self.load_shipped().service("search")
        manifest = os.path.join(ROOT, "services", "search", "service.yaml")
        self.assertEqual(search.sources, (manifest, SHIPPED))
        # From pool.yaml: interval, timeout, fall, stop_timeout; from the manifest:
        # description, language, examples (and the same health path).
        self.assertEqual(search.health, HealthConfig("/?q=health", 5.0, 1.0, 3))
        self.assertEqual(search.stop_timeout, 5.0)
        self.assertEqual(search.language, "c")
        self.assertIn("search", search.description)
        self.assertEqual([(e.path, e.status) for e in search.examples],
                         [("/api/search?q=test", 200), ("/api/search", 400)])
        auth = self.load_shipped().service("auth")
        self.assertEqual(auth.sources, (os.path.join(ROOT, "services", "auth", "service.yaml"),))


# --------------------------------------------------------------------------


class FileTests(ConfigTestCase):
    """The file itself: missing, empty, not YAML, wrong shape."""

    def test_file_not_found(self) -> None:
        """A missing pool file is one line naming the path, with no line number, not an OSError
        traceback."""
        path = os.path.join(self.folder(), "nope.yaml")
        self.assertConfigError(path, line=None, service=None, key=None,
                               message="file not found")

    def test_empty_file(self) -> None:
        """An empty file is refused as empty, at line 1, rather than read as a configuration with
        nothing in it."""
        self.assertConfigError(self.write(""), line=1, service=None, key=None,
                               message="file is empty")

    def test_comments_only_file_is_empty(self) -> None:
        """A file of only comments and blank lines is as empty as an empty one, and says so."""
        self.assertConfigError(self.write("# nothing here\n\n"), line=1, service=None,
                               key=None, message="file is empty")

    def test_not_utf8(self) -> None:
        """Bytes that are not UTF-8 are refused with that reason, not a UnicodeDecodeError escaping
        from the loader."""
        path = os.path.join(self.folder(), "pool.yaml")
        with open(path, "wb") as f:
            f.write(b"listen: \xff\xfe\n")
        self.assertConfigError(path, line=None, service=None, key=None,
                               message="not valid UTF-8")

    def test_invalid_yaml_syntax_reports_line(self) -> None:
        """A mis-indented key is a YAML syntax error reported at the line of the mistake, so the
        user knows where to look."""
        path = self.write("""\
            services:
              search:
                route: /api/search
               command: [sh]
            """)
        self.assertConfigError(path, line=4, service=None, key=None,
                               message="invalid YAML")

    def test_unclosed_quote_reports_line(self) -> None:
        """An unclosed quote, which YAML may only notice lines later, is still a ConfigError with a
        line number, not a raw scanner exception."""
        path = self.write("""\
            listen: "tcp:8080
            services: {}
            """)
        error = self.assertRaises(ConfigError, load, path)
        self.assertIn("invalid YAML", error.message)
        self.assertIsNotNone(error.line)

    def test_top_level_not_a_mapping(self) -> None:
        """A file whose top level is a list is refused at line 1, saying a mapping was expected and
        a list given."""
        path = self.write("""\
            - search
            - auth
            """)
        self.assertConfigError(path, line=1, service=None, key=None,
                               message="expected a mapping (key: value), got a list")

    def test_unknown_top_level_key_names_allowed_keys(self) -> None:
        path = self.write("""\
            listen: "tcp:8080:interface=127.0.0.1"
            servics:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertConfigError(
            path, line=2, service=None, key="servics",
            message="unknown key 'servics' (allowed: access_log, admin, base_dir, busy_poll_us, "
                    "client_timeout, listen, logs, "
                    "port_range, services, services_dir, trusted_proxies)",
        )

    def test_duplicate_top_level_key_names_both_lines(self) -> None:
        # Plain YAML keeps the second `services:` and silently drops 'search'.
        path = self.write("""\
            listen: "tcp:8080:interface=127.0.0.1"
            services:
              search:
                route: /api/search
                command: [sh]
            services:
              auth: {route: /api/auth, command: [sh]}
            """)
        self.assertConfigError(path, line=6, service=None, key="services",
                               message="duplicate key (first given on line 2)")

    def test_duplicate_key_inside_service_names_both_lines(self) -> None:
        path = self.write("""\
            services:
              search:
                route: /api/search
                command: [sh]
                route: /api/find
            """)
        self.assertConfigError(path, line=5, service="search", key="route",
                               message="duplicate key (first given on line 3)")

    def test_duplicate_service_name(self) -> None:
        """Plain YAML would keep only the second 'search' and silently drop the first: the repeat
        is refused, naming the line of each."""
        path = self.write("""\
            services:
              search:
                route: /api/search
                command: [sh]
              search:
                route: /api/find
                command: [sh]
            """)
        self.assertConfigError(path, line=5, service=None, key="services.search",
                               message="duplicate key (first given on line 2)")

    def test_unsupported_yaml_tag_is_a_config_error(self) -> None:
        # Explicit tags used to escape as a raw ValueError/ConstructorError.
        for value in ("!!int abc", "!custom /api/search", "!!python/name:os.system"):
            path = self.write(f"""\
                services:
                  search:
                    command: [sh]
                    route: {value}
                """)
            self.assertConfigError(path, line=4, service="search", key="route",
                                   message="cannot read value")


# --------------------------------------------------------------------------


class ServiceKeyTests(ConfigTestCase):
    """Keys of one service entry."""

    def test_minimal_service_defaults(self) -> None:
        """route and command are all a service needs: one worker, no fixed ports, the default
        health check, the program found on PATH and the pool file's folder as cwd."""
        config = load(self.write("""\
            services:
              search:
                route: /api/search
                command: [sh]
            """))
        svc = config.service("search")
        self.assertEqual(svc.workers, WorkersConfig(1, 1))
        self.assertEqual(svc.ports, ())
        self.assertEqual(svc.health, HealthConfig())
        self.assertEqual(svc.command, (SH,))
        self.assertEqual(svc.cwd, os.path.dirname(config.path))
        self.assertIsNone(svc.service_dir)
        self.assertEqual(svc.sources, (config.path,))

    def test_unknown_service_key_names_allowed_keys(self) -> None:
        error = self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                descripton: Search things
            """, line=5, key="descripton", message="unknown key 'descripton' (allowed: ")
        for allowed in ("command", "description", "route", "workers", "health", "ports"):
            self.assertIn(allowed, error.message)

    def test_unknown_nested_key(self) -> None:
        """A typo inside a nested mapping is refused with its dotted key and line, rather than
        health.interval silently keeping its default."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                health:
                  path: /
                  intervall: 3
            """, line=7, key="health.intervall", message="unknown key 'intervall'")

    def test_missing_route(self) -> None:
        """A service without a route could never be reached: refused at load time at the service's
        entry, naming the key."""
        self.assertServiceError("""\
            services:
              search:
                command: [sh]
            """, line=3, key="route", message="is required")

    def test_missing_command(self) -> None:
        """A service without a command has nothing to spawn: refused at load time at the service's
        entry, naming the key."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                workers: 2
            """, line=3, key="command", message="is required")

    def test_workers_min_as_string(self) -> None:
        """A quoted number is refused, not coerced, and the message shows the string that was
        given."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                workers: {min: "2", max: 4}
            """, line=5, key="workers.min", message="expected an integer, got '2'")

    def test_health_interval_as_string(self) -> None:
        """Durations are plain numbers of seconds: '5s' is refused with a message saying so, not
        misread."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                health:
                  path: /
                  interval: 5s
            """, line=7, key="health.interval",
            message="expected a number (seconds), got '5s'")

    def test_env_value_as_list(self) -> None:
        """An environment value holds one string: a list is refused rather than passed to the
        worker as its Python repr."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                env:
                  GREETING: [hello, world]
            """, line=6, key="env.GREETING", message="expected a single value, got a list")

    def test_env_values_are_strings(self) -> None:
        """The environment only holds strings: YAML numbers are passed as written, and an empty
        value is allowed."""
        config = load(self.write("""\
            services:
              search:
                route: /api/search
                command: [sh]
                env: {GREETING: hello, THREADS: 4, RATIO: 0.5, _X1: ""}
            """))
        self.assertEqual(dict(config.service("search").env),
                         {"GREETING": "hello", "THREADS": "4", "RATIO": "0.5", "_X1": ""})

    def test_env_value_yaml_reads_as_boolean_asks_for_quotes(self) -> None:
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                env:
                  VERBOSE: yes
            """, line=6, key="env.VERBOSE", message="YAML reads 'yes' as True; quote it: \"yes\"")

    def test_bad_env_names(self) -> None:
        """Names a shell could not use (leading digit, '-', space, '=', non-ASCII) are refused at
        the name's own line, not handed to the worker mangled."""
        for name in ("1ABC", "A-B", "'A B'", "'A=B'", "ÄÖ"):
            self.assertServiceError(f"""\
                services:
                  search:
                    route: /api/search
                    command: [sh]
                    env:
                      OK: fine
                      {name}: x
                """, line=7, key=f"env.{name.strip(chr(39))}",
                message="is not valid")

    def test_command_as_mapping(self) -> None:
        """A mapping is not an argument list: refused with an example of the form expected."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: {program: sh}
            """, line=4, key="command",
            message="expected a list of arguments like")

    def test_command_argument_as_list(self) -> None:
        """A nested list inside the command is refused rather than turned into one argument that
        spells a Python list."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh, [-c, x]]
            """, line=4, key="command", message="expected a single value, got a list")

    def test_workers_min_zero_is_an_empty_pool(self) -> None:
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                workers:
                  min: 0
                  max: 2
            """, line=6, key="workers.min", message="a pool needs at least 1 worker")

    def test_workers_max_below_min(self) -> None:
        """An impossible size range is refused at workers.max's line, naming both values."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                workers:
                  min: 3
                  max: 2
            """, line=7, key="workers.max",
            message="workers.max (2) is below workers.min (3)")

    def test_workers_max_defaults_to_min(self) -> None:
        """Giving only workers.min means a fixed pool of that size, not an error for max being
        below it."""
        config = load(self.write("""\
            services:
              search:
                route: /api/search
                command: [sh]
                workers: {min: 3}
            """))
        self.assertEqual(config.service("search").workers, WorkersConfig(3, 3))

    def test_workers_min_defaults_to_one(self) -> None:
        """Giving only workers.max means a pool that scales from one worker up to it."""
        config = load(self.write("""\
            services:
              search:
                route: /api/search
                command: [sh]
                workers: {max: 4}
            """))
        self.assertEqual(config.service("search").workers, WorkersConfig(1, 4))

    def test_workers_shorthand_sets_min_and_max(self) -> None:
        config = load(self.write("""\
            services:
              search:
                route: /api/search
                command: [sh]
                workers: 3
            """))
        self.assertEqual(config.service("search").workers, WorkersConfig(3, 3))

    def test_workers_shorthand_zero(self) -> None:
        """workers: 0 is refused like workers.min: 0, since a pool without workers could answer
        nothing."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                workers: 0
            """, line=5, key="workers", message="a pool needs at least 1 worker")

    def test_workers_too_many(self) -> None:
        """workers.max is capped at 256, so a typo such as 1000 cannot make the daemon spawn a
        thousand processes."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                workers: {min: 1, max: 1000}
            """, line=5, key="workers.max", message="at most 256 workers")

    def test_health_path_must_start_with_slash(self) -> None:
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                health: {path: "?q=health", interval: 2}
            """, line=5, key="health.path", message="health path must start with '/'")

    def test_negative_and_zero_timeouts(self) -> None:
        """A zero, negative or infinite duration would act at once or never: each is refused with
        its key and bound (health.interval at least 0.05 s; restart.delay may be 0)."""
        cases = [
            ("stop_timeout: -1", "stop_timeout", "must be greater than 0, got -1"),
            ("start_timeout: 0", "start_timeout", "must be greater than 0, got 0"),
            ("request_timeout: -0.5", "request_timeout", "must be greater than 0, got -0.5"),
            ("health: {timeout: 0}", "health.timeout", "must be greater than 0, got 0"),
            ("health: {interval: 0}", "health.interval", "must be at least 0.05, got 0"),
            ("restart: {delay: -1}", "restart.delay", "must be at least 0, got -1"),
            ("restart: {reset_after: 0}", "restart.reset_after", "must be greater than 0"),
            ("stop_timeout: .inf", "stop_timeout", "expected a finite number"),
        ]
        for text, key, message in cases:
            self.assertServiceError(f"""\
                services:
                  search:
                    route: /api/search
                    command: [sh]
                    {text}
                """, line=5, key=key, message=message)

    def test_restart_max_delay_below_delay(self) -> None:
        """A backoff whose cap is below its first delay is refused at max_delay's line, naming both
        values."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                restart:
                  delay: 5
                  max_delay: 1
            """, line=7, key="restart.max_delay",
            message="restart.max_delay (1.0) is below restart.delay (5.0)")

    def test_restart_delay_above_default_max_delay(self) -> None:
        # Used to crash with KeyError('max_delay'): max_delay was not given.
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                restart:
                  delay: 60
            """, line=6, key="restart.delay",
            message="restart.max_delay (30.0) is below restart.delay (60.0)")

    def test_enabled_must_be_boolean(self) -> None:
        """A quoted "no" is a non-empty string: it is refused, since read as true it would run a
        service the user meant to switch off."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                enabled: "no"
            """, line=5, key="enabled", message="expected true or false, got 'no'")


# --------------------------------------------------------------------------


class CommandTests(ConfigTestCase):
    """``command``: resolving the program and the placeholders."""

    def test_missing_executable_under_base_dir_suggests_make_all(self) -> None:
        path = self.write("""\
            services:
              search:
                route: /api/search
                command: ["build/search.cgi", "{port}"]
            """)
        program = os.path.join(os.path.dirname(path), "build", "search.cgi")
        self.assertConfigError(
            path, line=4, service="search", key="command",
            message=f"executable {program!r} does not exist "
                    f"(run 'make all' to build the services)",
        )

    def test_missing_executable_outside_base_dir_no_hint(self) -> None:
        folder = self.folder()
        path = self.write("""\
            services:
              search:
                route: /api/search
                command: ["/nonexistent-cgipool-dir/search.cgi"]
            """, folder=os.path.join(folder, "etc"))
        error = self.assertConfigError(
            path, line=4, service="search", key="command",
            message="executable '/nonexistent-cgipool-dir/search.cgi' does not exist")
        self.assertNotIn("make all", error.message)
        # A sibling folder whose name merely starts like base_dir's is not "under" it.
        path = self.write("""\
            services:
              search:
                route: /api/search
                command: ["../etc2/search.cgi"]
            """, folder=os.path.join(folder, "etc"))
        error = self.assertConfigError(path, line=4, service="search", key="command",
                                       message="does not exist")
        self.assertNotIn("make all", error.message)

    def test_relative_command_resolves_against_config_folder(self) -> None:
        folder = self.folder()
        tool = self.executable(os.path.join(folder, "bin", "tool"))
        config = load(self.write("""\
            services:
              search:
                route: /api/search
                command: ["bin/tool", "{port}"]
            """, folder=folder))
        self.assertEqual(config.base_dir, folder)
        self.assertEqual(config.service("search").command, (tool, "{port}"))

    def test_relative_command_resolves_against_base_dir(self) -> None:
        root = self.folder()
        tool = self.executable(os.path.join(root, "bin", "tool"))
        config = load(self.write("""\
            base_dir: ..
            services:
              search:
                route: /api/search
                command: ["./bin/tool"]
            """, folder=os.path.join(root, "etc")))
        self.assertEqual(config.base_dir, root)
        self.assertEqual(config.service("search").command, (tool,))
        self.assertEqual(config.service("search").cwd, root)

    def test_base_dir_missing(self) -> None:
        """A base_dir that does not exist is refused at its own line, rather than each relative
        command failing to resolve against it."""
        path = self.write("""\
            base_dir: no-such-folder
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertConfigError(path, line=1, service=None, key="base_dir",
                               message="does not exist")

    def test_executable_exists_but_not_executable(self) -> None:
        """A program without its execute bit is refused at load time naming the file, rather than
        every spawn failing into a crash loop."""
        folder = self.folder()
        tool = self.executable(os.path.join(folder, "bin", "tool"), mode=0o644)
        path = self.write("""\
            services:
              search:
                route: /api/search
                command: ["bin/tool", "{port}"]
            """, folder=folder)
        self.assertConfigError(path, line=4, service="search", key="command",
                               message=f"{tool!r} is not an executable file")

    def test_executable_is_a_directory(self) -> None:
        """A command naming a directory is refused with the same message as a non-executable file,
        naming the path."""
        folder = self.folder()
        os.makedirs(os.path.join(folder, "bin"))
        path = self.write("""\
            services:
              search:
                route: /api/search
                command: ["./bin", "{port}"]
            """, folder=folder)
        program = os.path.join(folder, "bin")
        self.assertConfigError(path, line=4, service="search", key="command",
                               message=f"{program!r} is not an executable file")

    def test_bare_program_found_on_path(self) -> None:
        """A bare program name is looked up on PATH at load time and stored as its absolute path,
        the other arguments unchanged."""
        config = load(self.write("""\
            services:
              search:
                route: /api/search
                command: [sh, -c, "exec sleep 1", "{port}"]
            """))
        self.assertEqual(config.service("search").command,
                         (SH, "-c", "exec sleep 1", "{port}"))

    def test_bare_program_not_on_path(self) -> None:
        """A bare program missing from PATH is refused at load time, naming it, instead of every
        spawn of the service failing."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [cgipool-no-such-program, "{port}"]
            """, line=4, key="command",
            message="executable 'cgipool-no-such-program' not found on PATH")

    def test_check_executables_false_skips_file_checks(self) -> None:
        """For reading a configuration before make all has built anything: missing programs are
        accepted, and relative paths are still resolved."""
        path = self.write("""\
            services:
              search:
                route: /api/search
                command: ["build/search.cgi", "{port}"]
              auth:
                route: /api/auth
                command: [cgipool-no-such-program]
            """)
        config = load(path, check_executables=False)
        self.assertEqual(config.service("search").command,
                         (os.path.join(os.path.dirname(path), "build", "search.cgi"), "{port}"))
        self.assertEqual(config.service("auth").command, ("cgipool-no-such-program",))

    def test_unknown_placeholder(self) -> None:
        """A misspelt placeholder would reach the worker verbatim: it is refused, naming the
        argument and listing the known placeholders."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh, "--port={port}", "--x={nope}"]
            """, line=4, key="command",
            message="unknown placeholder {nope} in '--x={nope}' (known: {base_dir}, "
                    "{port}, {python}, {service}, {service_dir}, {worker}")

    def test_unbalanced_brace(self) -> None:
        """An unclosed brace is refused at load time rather than passed on literally or failing at
        spawn."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh, "{port"]
            """, line=4, key="command", message="bad placeholder in '{port'")

    def test_placeholders_fixed_at_load_time_port_and_worker_kept(self) -> None:
        path = self.write("""\
            services:
              search:
                route: /api/search
                command: ["{python}", "-c", "pass", "{port}", "w{worker}", "{service}",
                          "{base_dir}", "{service_dir}"]
            """)
        folder = os.path.dirname(path)
        command = load(path).service("search").command
        self.assertEqual(command, (sys.executable, "-c", "pass", "{port}", "w{worker}",
                                   "search", folder, folder))
        # What the supervisor runs for worker 1 on port 9101.
        self.assertEqual([expand(arg, port=9101, worker=1) for arg in command],
                         [sys.executable, "-c", "pass", "9101", "w1", "search", folder, folder])

    def test_service_dir_placeholder_is_the_manifest_folder(self) -> None:
        root, pool, manifests = self.project("""\
            base_dir: ..
            services_dir: services
            """, {"echo": """\
                command: ["{python}", "{service_dir}/app.py", "{port}"]
                route: /api/echo
                """})
        svc = load(pool).service("echo")
        self.assertEqual(svc.command, (sys.executable,
                                       os.path.join(root, "services", "echo", "app.py"),
                                       "{port}"))

    def test_literal_braces(self) -> None:
        """Doubled braces give literal ones (JSON in a shell command) while {port} is still filled
        in at spawn time."""
        command = load(self.write("""\
            services:
              search:
                route: /api/search
                command: [sh, -c, 'echo {{"port": {port}}}']
            """)).service("search").command
        self.assertEqual(command, (SH, "-c", 'echo {{"port": {port}}}'))
        self.assertEqual(expand(command[2], port=9100, worker=0), 'echo {"port": 9100}')

    def test_literal_braces_in_program_path(self) -> None:
        """A program path with braces, written doubled, survives the second expansion at spawn time
        and names the real file."""
        # command[0] is expanded again at spawn time: its braces must stay escaped
        # (a lone '}' used to make the spawn-time expansion raise).
        folder = self.folder()
        tool = self.executable(os.path.join(folder, "we}ird{", "tool"))
        command = load(self.write("""\
            services:
              search:
                route: /api/search
                command: ["we}}ird{{/tool", "{port}"]
            """, folder=folder)).service("search").command
        self.assertEqual([expand(arg, port=9100, worker=0) for arg in command],
                         [tool, "9100"])

    def test_string_command_split_with_shlex(self) -> None:
        """A command given as one string is split as a shell would split it: quotes keep their
        inner spaces together as one argument."""
        command = load(self.write("""\
            services:
              search:
                route: /api/search
                command: "sh -c 'echo hello   world' --port={port}"
            """)).service("search").command
        self.assertEqual(command, (SH, "-c", "echo hello   world", "--port={port}"))

    def test_string_command_unbalanced_quote(self) -> None:
        """A string command with an unclosed quote is refused at load time with the reason the
        split failed."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: "sh -c 'echo"
            """, line=4, key="command", message="cannot split command: No closing quotation")

    def test_empty_command(self) -> None:
        """A command given as an empty string, an empty list or a list of one empty string is
        refused at load time, naming the file, line and key, rather than failing at spawn."""
        for command in ('""', "[]", '[""]'):
            self.assertServiceError(f"""\
                services:
                  search:
                    route: /api/search
                    command: {command}
                """, line=4, key="command", message="command is empty")


# --------------------------------------------------------------------------


class PortTests(ConfigTestCase):
    """Explicit worker ports and the allocation range."""

    def ports_of(self, ports: str, workers: str = "{min: 1, max: 2}") -> tuple[int, ...]:
        config = load(self.write(f"""\
            services:
              search:
                route: /api/search
                command: [sh]
                workers: {workers}
                ports: {ports}
            """))
        return config.service("search").ports

    def test_ports_list(self) -> None:
        """An explicit list gives exactly those ports, in order."""
        self.assertEqual(self.ports_of("[8001, 8002]"), (8001, 8002))

    def test_ports_single_int(self) -> None:
        """A single integer is one port, enough for a one-worker service."""
        self.assertEqual(self.ports_of("8001", workers="1"), (8001,))

    def test_ports_range_string(self) -> None:
        """A "low-high" string means every port in it, both ends included."""
        self.assertEqual(self.ports_of('"8000-8003"', workers="{min: 2, max: 4}"),
                         (8000, 8001, 8002, 8003))

    def test_fewer_ports_than_workers_max(self) -> None:
        """Scaling up would find no port for the extra workers: refused at load time, saying how
        many ports are needed."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                workers: {min: 2, max: 4}
                ports: "8000-8002"
            """, line=6, key="ports",
            message="3 port(s) for up to 4 workers (workers.max); give at least 4")

    def test_duplicate_port_within_service(self) -> None:
        """Two workers cannot bind one port: a port listed twice is refused at load time."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                workers: 2
                ports: [8001, 8001]
            """, line=6, key="ports", message="the same port is listed twice")

    def test_same_port_in_two_services(self) -> None:
        """Workers of two services would fight over one port: refused, naming the other service."""
        path = self.write("""\
            services:
              search:
                route: /api/search
                command: [sh]
                ports: [8001]
              auth:
                route: /api/auth
                command: [sh]
                workers: 2
                ports: [8002, 8001]
            """)
        # Services are checked in name order: 'search' collides with 'auth'.
        self.assertConfigError(path, line=5, service="search", key="ports",
                               message="port 8001 is already used by service 'auth'")

    def test_port_equal_to_listen_port(self) -> None:
        """A worker told to bind the daemon's own listening port could never start: refused at load
        time."""
        path = self.write("""\
            listen: "tcp:18080:interface=127.0.0.1"
            services:
              search:
                route: /api/search
                command: [sh]
                workers: 2
                ports: [18079, 18080]
            """)
        self.assertConfigError(path, line=7, service="search", key="ports",
                               message="port 18080 is the daemon's own listening port")

    def test_ports_out_of_range(self) -> None:
        """A list entry outside 1..65535 is refused at that entry's own line, with the bound it
        breaks."""
        for port, message in (("0", "must be at least 1, got 0"),
                              ("65536", "must be at most 65535, got 65536"),
                              ("-80", "must be at least 1, got -80")):
            self.assertServiceError(f"""\
                services:
                  search:
                    route: /api/search
                    command: [sh]
                    workers: 2
                    ports:
                      - 8001
                      - {port}
                """, line=8, key="ports", message=message)

    def test_single_port_out_of_range(self) -> None:
        """A single port above 65535 is refused like a list entry, with the bound it breaks."""
        self.assertServiceError("""\
            services:
              search:
                route: /api/search
                command: [sh]
                ports: 70000
            """, line=5, key="ports", message="must be at most 65535, got 70000")

    def test_bad_range_strings(self) -> None:
        """Reversed, zero, above-65535 and malformed ranges are refused, showing the form expected,
        rather than read as some other set of ports."""
        for text, message in (
            ("8003-8000", "must satisfy 1 <= low <= high <= 65535"),
            ("0-3", "must satisfy 1 <= low <= high <= 65535"),
            ("65535-65536", "must satisfy 1 <= low <= high <= 65535"),
            ("8000-", "expected a port range like '9100-9999', got '8000-'"),
            ("eighty", "expected a port range like '9100-9999'"),
            ("8000:8003", "expected a port range like '9100-9999'"),
        ):
            self.assertServiceError(f"""\
                services:
                  search:
                    route: /api/search
                    command: [sh]
                    ports: "{text}"
                """, line=5, key="ports", message=message)

    def test_ports_wrong_type(self) -> None:
        """A boolean (which Python counts as 1), a float or a mapping is refused, naming the two
        forms accepted."""
        for text in ("true", "80.5", "{a: 1}"):
            self.assertServiceError(f"""\
                services:
                  search:
                    route: /api/search
                    command: [sh]
                    ports: {text}
                """, line=5, key="ports",
                message="expected a list of ports or a range like '8000-8003'")

    def test_top_level_port_range(self) -> None:
        """A reversed port_range is refused at its line, while spaces around the numbers are
        tolerated."""
        path = self.write("""\
            listen: "tcp:8080:interface=127.0.0.1"
            port_range: "9999-9100"
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertConfigError(path, line=2, service=None, key="port_range",
                               message="must satisfy 1 <= low <= high <= 65535")
        config = load(self.write("""\
            port_range: " 20000 - 20099 "
            services:
              search: {route: /api/search, command: [sh]}
            """))
        self.assertEqual(config.port_range, (20000, 20099))


# --------------------------------------------------------------------------


class RouteTests(ConfigTestCase):
    """``route``: the path prefix a service answers."""

    def route_of(self, route: str) -> str:
        config = load(self.write(f"""\
            services:
              search:
                route: {route}
                command: [sh]
            """))
        return config.service("search").route

    def test_duplicate_route_across_services(self) -> None:
        """Two services on one route would leave one unreachable: refused, naming the other
        service."""
        path = self.write("""\
            services:
              search:
                route: /api/x
                command: [sh]
              auth:
                route: /api/x
                command: [sh]
            """)
        self.assertConfigError(path, line=3, service="search", key="route",
                               message="route '/api/x' is already used by service 'auth'")

    def test_duplicate_route_after_trailing_slash_normalised(self) -> None:
        path = self.write("""\
            services:
              auth:
                route: /api/x
                command: [sh]
              search:
                route: /api/x/
                command: [sh]
            """)
        self.assertConfigError(path, line=6, service="search", key="route",
                               message="route '/api/x' is already used by service 'auth'")

    def test_trailing_slash_normalised(self) -> None:
        """'/api/search/' is the same route as '/api/search', so matching and the duplicate check
        see one form."""
        self.assertEqual(self.route_of("/api/search/"), "/api/search")

    def test_root_route_allowed(self) -> None:
        """'/' is a valid route, a service answering every path, and is not normalised to an empty
        prefix."""
        self.assertEqual(self.route_of("/"), "/")

    def test_reserved_routes(self) -> None:
        """/admin and /metrics belong to the daemon: a service there is refused rather than
        shadowing them or being shadowed."""
        for route in ("/admin", "/admin/", "/admin/x", "/metrics", "/metrics/x"):
            self.assertServiceError(f"""\
                services:
                  search:
                    command: [sh]
                    route: {route}
                """, line=4, key="route", message="is reserved for the daemon itself")

    def test_reserved_prefix_lookalikes_allowed(self) -> None:
        """The reservation is by whole path segment, so '/administrator' and '/api/admin' stay free
        for services."""
        self.assertEqual(self.route_of("/administrator"), "/administrator")
        self.assertEqual(self.route_of("/api/admin"), "/api/admin")

    def test_route_with_dot_segments(self) -> None:
        """'.' and '..' segments would be resolved by clients into another path ('/api/../admin' is
        '/admin'): refused."""
        for route in ("/api/../admin", "/api/./x", "/.."):
            self.assertServiceError(f"""\
                services:
                  search:
                    command: [sh]
                    route: {route}
                """, line=4, key="route", message="must not contain '.' or '..' segments")

    def test_route_with_bad_characters(self) -> None:
        """A route must be a plain path prefix: a query, space, percent-escape, missing leading
        slash, empty segment or fragment is refused with an example of the form."""
        for route in ('"/api/search?q=1"', '"/api/my search"', '"/api/%41"',
                      "api/search", '"/api//search"', '"/api/#x"'):
            self.assertServiceError(f"""\
                services:
                  search:
                    command: [sh]
                    route: {route}
                """, line=4, key="route",
                message="must be a path prefix like '/api/search'")


# --------------------------------------------------------------------------


class ManifestTests(ConfigTestCase):
    """``services_dir``: ``<name>/service.yaml`` manifests merged with pool.yaml."""

    ECHO = """\
        description: Echo
        command: ["sh", "-c", "exit 0", "{port}"]
        route: /api/echo
        workers: {min: 2, max: 3}
        health: {path: /ping, interval: 2, fall: 5}
        env: {A: "1", B: "2"}
        """

    def test_manifest_folder_becomes_service(self) -> None:
        """Each services_dir folder with a service.yaml becomes a service named after the folder,
        with every key of the manifest; a folder without one (lib) is ignored."""
        root, pool, manifests = self.project("""\
            base_dir: ..
            services_dir: services
            """, {"echo": self.ECHO})
        os.makedirs(os.path.join(root, "services", "lib"))  # no manifest: not a service
        config = load(pool)
        self.assertEqual(config.services_dir, os.path.join(root, "services"))
        self.assertEqual([s.name for s in config.services], ["echo"])
        echo = config.service("echo")
        self.assertEqual(echo.route, "/api/echo")
        self.assertEqual(echo.command, (SH, "-c", "exit 0", "{port}"))
        self.assertEqual(echo.workers, WorkersConfig(2, 3))
        self.assertEqual(echo.health, HealthConfig("/ping", 2.0, 1.0, 5))
        self.assertEqual(echo.service_dir, os.path.join(root, "services", "echo"))
        self.assertEqual(echo.sources, (manifests["echo"],))
        self.assertEqual(echo.description, "Echo")

    def test_pool_yaml_overrides_manifest_nested_mappings_merged(self) -> None:
        root, pool, manifests = self.project("""\
            base_dir: ..
            services_dir: services
            services:
              echo:
                route: /api/echo2
                workers: {max: 4}
                health: {interval: 7}
                env: {B: two, C: three}
            """, {"echo": self.ECHO})
        echo = load(pool).service("echo")
        self.assertEqual(echo.route, "/api/echo2")                      # replaced
        self.assertEqual(echo.workers, WorkersConfig(2, 4))             # min from manifest
        self.assertEqual(echo.health, HealthConfig("/ping", 7.0, 1.0, 5))
        self.assertEqual(dict(echo.env), {"A": "1", "B": "two", "C": "three"})
        self.assertEqual(echo.description, "Echo")                     # manifest only
        self.assertEqual(echo.sources, (manifests["echo"], pool))

    def test_pool_yaml_scalar_replaces_manifest_mapping(self) -> None:
        root, pool, manifests = self.project("""\
            base_dir: ..
            services_dir: services
            services:
              echo:
                workers: 5
            """, {"echo": self.ECHO})
        self.assertEqual(load(pool).service("echo").workers, WorkersConfig(5, 5))

    def test_error_in_manifest_names_manifest_file_and_line(self) -> None:
        root, pool, manifests = self.project("""\
            base_dir: ..
            services_dir: services
            """, {"echo": """\
                description: Echo
                command: [sh]
                route: /api/echo
                workers:
                  min: 0
                """})
        self.assertConfigError(pool, file=manifests["echo"], line=5, service="echo",
                               key="workers.min", message="a pool needs at least 1 worker")

    def test_manifest_value_error_after_merge_names_manifest(self) -> None:
        # pool.yaml overrides health.interval; the bad path still comes from the manifest.
        root, pool, manifests = self.project("""\
            base_dir: ..
            services_dir: services
            services:
              echo:
                health: {interval: 7}
            """, {"echo": """\
                command: [sh]
                route: /api/echo
                health:
                  path: ping
                """})
        self.assertConfigError(pool, file=manifests["echo"], line=4, service="echo",
                               key="health.path", message="health path must start with '/'")

    def test_override_error_names_pool_yaml(self) -> None:
        """A bad value coming from pool.yaml's override is reported at pool.yaml's line, not the
        manifest's, so the right file gets fixed."""
        root, pool, manifests = self.project("""\
            base_dir: ..
            services_dir: services
            services:
              echo:
                workers: {max: 1}
            """, {"echo": self.ECHO})
        self.assertConfigError(pool, line=5, service="echo", key="workers.max",
                               message="workers.max (1) is below workers.min (2)")

    def test_unknown_key_in_manifest(self) -> None:
        """A typo in a manifest is reported in the manifest at its line, even when pool.yaml also
        has an entry for the service."""
        root, pool, manifests = self.project("""\
            base_dir: ..
            services_dir: services
            services:
              echo:
                workers: 2
            """, {"echo": """\
                command: [sh]
                route: /api/echo
                langauge: c
                """})
        self.assertConfigError(pool, file=manifests["echo"], line=3, service="echo",
                               key="langauge", message="unknown key 'langauge'")

    def test_invalid_yaml_in_manifest_names_service(self) -> None:
        root, pool, manifests = self.project("""\
            base_dir: ..
            services_dir: services
            """, {"echo": """\
                command: [sh]
                route: /api/echo
                  workers: 2
                """})
        self.assertConfigError(pool, file=manifests["echo"], line=3, service="echo",
                               key=None, message="invalid YAML")

    def test_manifest_not_a_mapping(self) -> None:
        """A manifest that is a list is refused, naming the manifest file rather than pool.yaml."""
        root, pool, manifests = self.project("""\
            base_dir: ..
            services_dir: services
            """, {"echo": "- sh\n- /api/echo\n"})
        self.assertConfigError(pool, file=manifests["echo"], line=1, service="echo",
                               key=None, message="expected a mapping")

    def test_enabled_false_disables_manifest_service(self) -> None:
        """enabled: false in pool.yaml removes a manifest's service without validating it, so a
        broken service can be switched off without fixing it first."""
        root, pool, manifests = self.project("""\
            base_dir: ..
            services_dir: services
            services:
              broken:
                enabled: false
            """, {"echo": self.ECHO,
                  # Would fail (missing executable) if it were not disabled.
                  "broken": 'command: ["build/broken.cgi"]\nroute: /api/echo\n'})
        config = load(pool)
        self.assertEqual([s.name for s in config.services], ["echo"])
        self.assertRaises(KeyError, config.service, "broken")

    def test_all_services_disabled(self) -> None:
        """Disabling every service is 'no services configured', not a daemon that starts and serves
        nothing."""
        root, pool, manifests = self.project("""\
            base_dir: ..
            services_dir: services
            services:
              echo: {enabled: false}
            """, {"echo": self.ECHO})
        self.assertConfigError(pool, line=None, service=None, key=None,
                               message="no services configured")

    def test_service_entry_not_a_mapping(self) -> None:
        """A service given as a plain value or a list is refused at its line, saying which one it
        got."""
        path = self.write("""\
            services:
              search: /api/search
            """)
        self.assertConfigError(path, line=2, service="search", key=None,
                               message="expected a mapping (key: value), got a value")
        path = self.write("""\
            services:
              search:
                - route: /api/search
            """)
        self.assertConfigError(path, line=3, service="search", key=None,
                               message="expected a mapping (key: value), got a list")

    def test_service_entry_empty(self) -> None:
        """A service name with nothing under it is refused at its line as empty, not read as a
        service of defaults."""
        path = self.write("""\
            services:
              auth: {route: /api/auth, command: [sh]}
              search:
            """)
        self.assertConfigError(path, line=3, service="search", key=None,
                               message="service entry is empty")

    def test_services_not_a_mapping(self) -> None:
        """services: must map names to entries: a list is refused at its line."""
        path = self.write("""\
            services:
              - search
            """)
        self.assertConfigError(path, line=2, service=None, key="services",
                               message="expected a mapping (key: value), got a list")

    def test_invalid_service_names(self) -> None:
        """Service names end up in URLs, metric labels and file names: spaces, slashes, a leading
        '-', dots, non-ASCII and over-long names are refused at their line."""
        for name in ('"my service"', "-search", "a/b", '"."', "x" * 64, '"sé"'):
            path = self.write(f"""\
                services:
                  ok: {{route: /api/ok, command: [sh]}}
                  {name}: {{route: /api/search, command: [sh]}}
                """)
            error = self.assertRaises(ConfigError, load, path)
            self.assertEqual((error.file, error.line, error.key), (path, 3, None), str(error))
            self.assertIsNotNone(error.service)
            self.assertIn("service names use letters, digits", error.message)

    def test_invalid_service_folder_name(self) -> None:
        """A services_dir folder whose name is not a valid service name is refused, naming its
        manifest, rather than skipped silently."""
        root, pool, manifests = self.project("""\
            base_dir: ..
            services_dir: services
            """, {"my echo": self.ECHO})
        self.assertConfigError(pool, file=manifests["my echo"], line=None, service=None,
                               key=None, message="service folder names use letters")

    def test_services_dir_missing(self) -> None:
        """A services_dir that does not exist is refused, naming the resolved directory, rather
        than read as no services."""
        path = self.write("""\
            listen: "tcp:8080:interface=127.0.0.1"
            services_dir: no-such-services
            """)
        missing = os.path.join(os.path.dirname(path), "no-such-services")
        self.assertConfigError(path, line=2, service=None, key="services_dir",
                               message=f"directory {missing!r} does not exist")


# --------------------------------------------------------------------------


class PoolTests(ConfigTestCase):
    """Top-level keys: services present, listen."""

    def test_no_services_at_all(self) -> None:
        """A daemon with nothing to serve is refused, with a hint on where services go."""
        path = self.write('listen: "tcp:8080:interface=127.0.0.1"\n')
        self.assertConfigError(path, line=None, service=None, key=None,
                               message="no services configured (add some under 'services:'")

    def test_empty_services_mapping(self) -> None:
        """Both services: {} and a bare services: are the same 'no services configured' refusal."""
        for services in ("services: {}\n", "services:\n"):
            self.assertConfigError(self.write(services), line=None, service=None, key=None,
                                   message="no services configured")

    def test_services_dir_without_manifests(self) -> None:
        """A services_dir without any manifest is the same 'no services configured' refusal."""
        root, pool, manifests = self.project("""\
            base_dir: ..
            services_dir: services
            """, {})
        os.makedirs(os.path.join(root, "services"))
        self.assertConfigError(pool, line=None, service=None, key=None,
                               message="no services configured")

    def test_listen_not_an_endpoint_string(self) -> None:
        """An unknown endpoint type, a named port, a missing port, a misspelt option or an empty
        string is refused at load time, not when the daemon binds."""
        for listen in ('"nope:8080"', '"tcp:http"', '"tcp"',
                       '"tcp:8080:interfac=127.0.0.1"', '""'):
            path = self.write(f"""\
                listen: {listen}
                services:
                  search: {{route: /api/search, command: [sh]}}
                """)
            self.assertConfigError(path, line=1, service=None, key="listen",
                                   message="not a valid Twisted endpoint string")

    def test_an_unescaped_ipv6_interface_gets_the_escaping_hint(self) -> None:
        path = self.write("""\
            listen: "tcp6:18580:interface=::1"
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertConfigError(path, line=1, service=None, key="listen",
                               message="an IPv6 address needs its colons escaped: "
                                       "'tcp6:8080:interface=\\:\\:1'")

    def test_listen_endpoint_failing_with_os_error(self) -> None:
        # ssl: reads its key file while parsing; that used to escape as OSError.
        path = self.write("""\
            listen: "ssl:8443:privateKey=/nonexistent-cgipool/key.pem"
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertConfigError(path, line=1, service=None, key="listen",
                               message="not a valid Twisted endpoint string")

    def test_listen_port_out_of_range(self) -> None:
        """An out-of-range listening port is caught at load time, naming the port, before anything
        starts."""
        path = self.write("""\
            listen: "tcp:99999"
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertConfigError(path, line=1, service=None, key="listen",
                               message="port 99999 is out of range")

    def test_listen_not_a_string(self) -> None:
        """A bare port number is not an endpoint string: refused, showing the value given."""
        path = self.write("""\
            listen: 8080
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertConfigError(path, line=1, service=None, key="listen",
                               message="expected a string, got 8080")

    def test_listen_list_of_endpoints(self) -> None:
        """A list of endpoints is kept as written (tcp, tcp6, unix) and each one must listen; a
        listed ::1 is not skipped like the default's."""
        path = self.write("""\
            listen: ["tcp:18080:interface=127.0.0.1", 'tcp6:18080:interface=\:\:1',
                     "unix:/tmp/cgipool-test.sock"]
            admin: {listen: ["tcp:18081:interface=127.0.0.1"]}
            services:
              search: {route: /api/search, command: [sh]}
            """)
        config = load(path)
        self.assertEqual(config.listen, ("tcp:18080:interface=127.0.0.1",
                                         r"tcp6:18080:interface=\:\:1",
                                         "unix:/tmp/cgipool-test.sock"))
        # Named in the file: each must listen; none is skipped for a missing ::1.
        self.assertEqual(config.listen_if_available, ())
        self.assertEqual(config.admin.listen, ("tcp:18081:interface=127.0.0.1",))
        self.assertEqual(config.admin.listen_if_available, ())
        self.assertFalse(config.admin.same_listener)

    def test_listen_default_is_ipv4_and_ipv6_loopback(self) -> None:
        config = load(self.write("services:\n  search: {route: /api/search, command: [sh]}\n"))
        self.assertEqual(config.listen, ("tcp:8080:interface=127.0.0.1",
                                         r"tcp6:8080:interface=\:\:1"))
        self.assertEqual(config.listen_if_available, (r"tcp6:8080:interface=\:\:1",))
        self.assertEqual(config.admin.listen, ("tcp:8081:interface=127.0.0.1",
                                               r"tcp6:8081:interface=\:\:1"))
        self.assertEqual(config.admin.listen_if_available, (r"tcp6:8081:interface=\:\:1",))
        self.assertEqual(listen_address(config.listen[1]).host, "::1")

    def test_admin_listen_same_still_works(self) -> None:
        """admin.listen: same, the admin on the proxy's listener, is still accepted next to the
        list form, with nothing optional."""
        config = load(self.write("""\
            admin: {listen: same}
            services:
              search: {route: /api/search, command: [sh]}
            """))
        self.assertTrue(config.admin.same_listener)
        self.assertEqual(config.admin.listen_if_available, ())

    def test_listen_bad_entry_is_named_by_index_and_line(self) -> None:
        for entry, message in (('"tcp:nope"', "not a valid Twisted endpoint string"),
                               ("8080", "expected a string, got 8080"),
                               ('"tcp:70000"', "port 70000 is out of range"),
                               ('"tcp6:8082:interface=127.0.0.1"',
                                "tcp6 listens on IPv6 addresses, not '127.0.0.1'")):
            for key, top in (("listen", "listen:\n"), ("admin.listen", "admin:\n  listen:\n")):
                indent = "    " if key == "admin.listen" else "  "
                path = self.write(top + f'{indent}- "tcp:18080:interface=127.0.0.1"\n'
                                  f"{indent}- {entry}\n"
                                  "services:\n  search: {route: /api/search, command: [sh]}\n")
                line = top.count("\n") + 2
                self.assertConfigError(path, line=line, service=None, key=f"{key}[1]",
                                       message=message)

    def test_listen_empty_list_and_repeated_entry(self) -> None:
        path = self.write("listen: []\nservices:\n  search: {route: /a, command: [sh]}\n")
        self.assertConfigError(path, line=1, service=None, key="listen",
                               message="an empty list listens nowhere")
        path = self.write("""\
            listen:
              - "tcp:18080:interface=127.0.0.1"
              - "tcp:18080:interface=127.0.0.1"
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertConfigError(path, line=3, service=None, key="listen[1]",
                               message="is listed twice (listen[0])")

    def test_listeners_on_one_address_are_refused(self) -> None:
        for first, second, shown in (
                ("tcp:18080", "tcp:18080:interface=127.0.0.1", "0.0.0.0:18080"),
                ("tcp6:18080", "tcp:18080:interface=127.0.0.1", "[::]:18080"),
                ("tcp:port=18080:interface=127.0.0.1", "tcp:18080:interface=127.0.0.1",
                 "127.0.0.1:18080")):
            path = self.write(f"""\
                listen:
                  - "{first}"
                  - "{second}"
                services:
                  search: {{route: /api/search, command: [sh]}}
                """)
            self.assertConfigError(path, line=3, service=None, key="listen[1]",
                                   message=f"is also where listen[0] listens ({shown})")
        # IPv4 and IPv6 loopback on one port are two addresses.
        path = self.write("""\
            listen: ["tcp:18080", 'tcp6:18080:interface=\:\:1']
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertEqual(len(load(path).listen), 2)

    def test_admin_port_of_any_proxy_listener_is_refused(self) -> None:
        path = self.write("""\
            listen: ["tcp:18080:interface=127.0.0.1", 'tcp6:18090:interface=\:\:1']
            admin:
              listen: ["tcp:18081:interface=127.0.0.1", "tcp:18090:interface=127.0.0.1"]
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertConfigError(path, line=3, service=None, key="admin.listen[1]",
                               message="admin.listen[1] uses port 18090, which the proxy "
                                       "listens on (listen[1]); give the admin a port of "
                                       "its own, or write admin.listen: same")
        # The default proxy listeners count too (no line: nothing in the file).
        path = self.write("""\
            admin: {listen: "tcp:8080:interface=127.0.0.1"}
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertConfigError(path, line=1, service=None, key="admin.listen",
                               message="uses port 8080, which the proxy listens on "
                                       "(listen[0])")

    def test_worker_port_of_any_listener_is_refused(self) -> None:
        for port, message in (
                (18090, "port 18090 is the daemon's own listening port (listen[1])"),
                (8081, "port 8081 is the admin's listening port (admin.listen[0])")):
            path = self.write(f"""\
                listen: ["tcp:18080:interface=127.0.0.1", 'tcp6:18090:interface=\:\:1']
                services:
                  search: {{route: /api/search, command: [sh], ports: [{port}]}}
                """)
            self.assertConfigError(path, line=3, service="search", key="ports",
                                   message=message)

    def test_listen_address_reads_twisted_endpoint_syntax(self) -> None:
        cases = {
            "tcp:8080": ("tcp", "", 8080, 4),
            "tcp:8080:interface=127.0.0.1:backlog=50": ("tcp", "127.0.0.1", 8080, 4),
            "tcp:port=0:interface=127.0.0.1": ("tcp", "127.0.0.1", 0, 4),
            "tcp:8080:127.0.0.2": ("tcp", "127.0.0.2", 8080, 4),
            r"tcp:8080:interface=\:\:1": ("tcp", "::1", 8080, 6),
            r"tcp6:8080:interface=\:\:1": ("tcp6", "::1", 8080, 6),
            "tcp6:8080": ("tcp6", "", 8080, 6),
            "ssl:8443:privateKey=k.pem:interface=10.0.0.1": ("ssl", "10.0.0.1", 8443, 4),
        }
        for text, (kind, host, port, family) in cases.items():
            address = listen_address(text)
            self.assertEqual((address.kind, address.host, address.port, address.family),
                             (kind, host, port, family), text)
        for text in ("unix:/tmp/x.sock", "systemd:domain=INET:index=0"):
            self.assertIsNone(listen_address(text))
        self.assertRaises(ValueError, listen_address, "tcp:http")

    def test_validating_listen_imports_no_reactor(self) -> None:
        """twistd installs the reactor it is told to (--reactor) after reading
        the options: loading the file must not install the default one first."""
        path = self.write("""\
            listen: ["tcp:18080:interface=127.0.0.1", 'tcp6:18080:interface=\:\:1']
            admin: {listen: "tcp:18081:interface=127.0.0.1"}
            services:
              search: {route: /api/search, command: [sh]}
            """)
        code = ("import sys; from cgipool.config import load; load(sys.argv[1]); "
                "print('twisted.internet.reactor' in sys.modules)")
        done = subprocess.run([sys.executable, "-c", code, path], capture_output=True,
                              text=True, timeout=60, cwd=ROOT)
        self.assertEqual((done.returncode, done.stdout.strip()), (0, "False"), done.stderr)

    def test_access_log_relative_to_base_dir(self) -> None:
        path = self.write("""\
            access_log: run/access.log
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertEqual(load(path).access_log,
                         os.path.join(os.path.dirname(path), "run", "access.log"))


# --------------------------------------------------------------------------


class TwistdTests(ConfigTestCase):
    """``twistd -n cgipool --config BAD`` exits non-zero with the one line, spawning nothing."""

    timeout = 30

    def bad_project(self, bad_service: str = "", top: str = "") -> tuple[str, str, str]:
        """A pool whose good services would leave a marker file if ever spawned;
        ``top`` is added to its top-level keys."""
        folder = self.folder()
        marker = os.path.join(folder, "spawned")
        self.executable(os.path.join(folder, "bin", "worker"),
                        f'#!/bin/sh\necho "$@" >> "{marker}"\nexit 0\n')
        good = top + textwrap.dedent("""\
            listen: "tcp:0:interface=127.0.0.1"
            services:
              aaa:
                command: ["bin/worker", "{port}"]
                route: /aaa
                workers: 2
            """)
        # The bad service goes under `services:` after 'aaa'.
        path = self.write(good + textwrap.indent(textwrap.dedent(bad_service), "  "),
                          folder=folder)
        return folder, path, marker

    async def run_twistd(self, folder: str, path: str,
                         twistd_options: tuple[str, ...] = ()) -> tuple[int, str]:
        args = [*twistd_options, "-n", "--pidfile=", "cgipool", "--config", path]
        executable = TWISTD
        killer = shutil.which("timeout")
        if killer:
            # Should the daemon ever start, do not let it outlive the test.
            args = ["-k", "2", "15", TWISTD, *args]
            executable = killer
        out, err, code = await getProcessOutputAndValue(
            executable, args, env=dict(os.environ), path=folder, reactor=reactor)
        return code, (out + err).decode("utf-8", "replace")

    def assertRefused(self, code: int, output: str, marker: str, expected: str) -> None:
        self.assertNotEqual(code, 0, output)
        self.assertNotIn("Traceback", output)
        self.assertNotIn("Usage:", output)
        self.assertNotIn("--config=", output)  # twistd's option help
        lines = [line for line in output.splitlines() if line.strip()]
        self.assertEqual(lines, [f"cgipool: configuration error: {expected}"], output)
        self.assertFalse(os.path.exists(marker), "a worker process was spawned")

    async def test_twistd_refuses_bad_service_without_spawning(self) -> None:
        folder, path, marker = self.bad_project("""\
            zzz:
              command: ["bin/worker", "{port}"]
              route: /zzz
              workers: {min: 0, max: 2}
            """)
        code, output = await self.run_twistd(folder, path)
        self.assertRefused(code, output, marker,
                           f"{path}:10: service 'zzz': key 'workers.min': "
                           f"a pool needs at least 1 worker (workers.min=0)")

    async def test_twistd_refuses_conflict_between_services_without_spawning(self) -> None:
        # Found only after every service was read: still nothing may start.
        folder, path, marker = self.bad_project("""\
            zzz:
              command: ["bin/worker", "{port}"]
              route: /aaa/
            """)
        code, output = await self.run_twistd(folder, path)
        self.assertRefused(code, output, marker,
                           f"{path}:9: service 'zzz': key 'route': "
                           f"route '/aaa' is already used by service 'aaa'")

    async def test_twistd_refuses_busy_polling_without_cgipools_reactor(self) -> None:
        folder, path, marker = self.bad_project(top="busy_poll_us: 200\n")
        code, output = await self.run_twistd(folder, path, ("--reactor", "select"))
        self.assertRefused(code, output, marker,
                           f"{path}: key 'busy_poll_us': busy polling needs cgipool's "
                           f"reactor; this daemon runs "
                           f"twisted.internet.selectreactor.SelectReactor (start twistd "
                           f"without --reactor or with --reactor cgipool, or set "
                           f"busy_poll_us: 0)")

    async def test_twistd_refuses_missing_config_file(self) -> None:
        """Run as twistd, a missing --config file is the one error line and a non-zero exit, with
        no traceback or usage text, and nothing spawned."""
        folder = self.folder()
        path = os.path.join(folder, "missing.yaml")
        code, output = await self.run_twistd(folder, path)
        self.assertRefused(code, output, os.path.join(folder, "spawned"),
                           f"{path}: file not found")


class BodyLimitConfigTests(ConfigTestCase):
    def load_max_body(self, text: str) -> int:
        path = self.write(f"""\
            services:
              search:
                route: /api/search
                command: [sh]
                max_body: {text}
            """)
        return load(path).services[0].max_body

    def test_sizes_in_bytes_and_units(self) -> None:
        """max_body takes a byte count or a size such as 512K, 10M, 1G, '2 MiB' or 64kb (binary
        units, any case), so limits are written as people think of them."""
        cases = {"1048576": 1 << 20, "0": 0, '"512K"': 512 << 10, '"10M"': 10 << 20,
                 '"1G"': 1 << 30, '"2 MiB"': 2 << 20, '"64kb"': 64 << 10}
        for text, expected in cases.items():
            self.assertEqual(self.load_max_body(text), expected, text)

    def test_default_is_ten_mebibytes(self) -> None:
        """Without max_body a request body is limited to 10 MiB, so no service takes unbounded
        uploads by default."""
        path = self.write("""\
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertEqual(load(path).services[0].max_body, 10 << 20)

    def test_bad_sizes(self) -> None:
        """Unknown units (T included), negatives, fractions and booleans are refused at max_body's
        line, not read as some other limit."""
        cases = [('"10 parsecs"', "expected a size like"), ("-1", "between 0 and 1T"),
                 ("1.5", "expected an integer"), ('"2T"', "expected a size like"),
                 ("true", "expected an integer")]
        for text, message in cases:
            self.assertServiceError(f"""\
                services:
                  search:
                    route: /api/search
                    command: [sh]
                    max_body: {text}
                """, line=5, key="max_body", message=message)


class ExampleConfigTests(ConfigTestCase):
    """``examples:`` say what a good answer is: path, status, content_type, contains, json."""

    def examples(self, text: str) -> tuple:
        path = self.write("services:\n  search:\n    route: /api/search\n    command: [sh]\n"
                          "    examples:\n" + textwrap.indent(textwrap.dedent(text), "      "))
        return load(path).services[0].examples

    def assertExampleError(self, text: str, *, line: int, key: str, message: str) -> None:
        self.assertServiceError("services:\n  search:\n    route: /api/search\n"
                                "    command: [sh]\n    examples:\n"
                                + textwrap.indent(textwrap.dedent(text), "      "),
                                line=line, key=key, message=message)

    def test_a_bare_path_is_a_status_200_example(self) -> None:
        (example,) = self.examples("- /api/search?q=test\n")
        self.assertEqual(example, Example("/api/search?q=test", 200))
        self.assertEqual(example.as_status(), {
            "path": "/api/search?q=test", "status": 200, "content_type": None,
            "contains": [], "json": None})

    def test_every_key(self) -> None:
        """Every key of an example is read as the smoke test will check it: the media type
        lower-cased, contains items as text, json kept as nested data."""
        (example,) = self.examples("""\
            - path: "/api/search?q=test"
              status: 201
              content_type: Application/JSON
              contains: ["Test Result", 42]
              json: {query: test, results: [{id: 1}], ok: true, none: null, ratio: 0.5}
            """)
        self.assertEqual(example, Example(
            "/api/search?q=test", 201, "application/json", ("Test Result", "42"),
            {"query": "test", "results": [{"id": 1}], "ok": True, "none": None,
             "ratio": 0.5}))
        self.assertEqual(example.as_status()["contains"], ["Test Result", "42"])

    def test_one_text_and_wildcard_type_and_json_scalars(self) -> None:
        examples = self.examples("""\
            - {path: /api/search/a, contains: "ref: refs/heads/main", content_type: "text/*"}
            - {path: /api/search/b, json: [1, "two"]}
            - {path: /api/search/c, json: "just a string"}
            - {path: /api/search/d, json: {}}
            - {path: /api/search/e, json: null}
            """)
        self.assertEqual([(e.content_type, e.contains, e.json) for e in examples], [
            ("text/*", ("ref: refs/heads/main",), None), (None, (), [1, "two"]),
            (None, (), "just a string"), (None, (), {}), (None, (), None)])

    def test_bad_values(self) -> None:
        """Malformed or meaningless checks (a type with parameters, an empty contains, YAML dates
        or NaN in json, a bad status or path, an unknown key) are refused with their key, so a
        passing smoke test means something."""
        cases = [
            ("- {path: /x, content_type: 'text/html; charset=utf-8'}", "examples.content_type",
             "without parameters, e.g. 'text/html'"),
            ("- {path: /x, content_type: html}", "examples.content_type",
             "expected a media type like 'application/json' or 'text/*', got 'html'"),
            ("- {path: /x, content_type: '*/*'}", "examples.content_type",
             "expected a media type like"),
            ("- {path: /x, content_type: 7}", "examples.content_type", "expected a string"),
            ("- {path: /x, contains: ''}", "examples.contains", "an empty text is in every body"),
            ("- {path: /x, contains: []}", "examples.contains", "an empty list checks nothing"),
            ("- {path: /x, contains: [true]}", "examples.contains",
             "expected a text (or a list of texts) the body contains, got True"),
            ("- {path: /x, contains: {a: b}}", "examples.contains", "expected a single value"),
            ("- {path: /x, json: 2024-01-01}", "examples.json",
             "YAML reads '2024-01-01' as a date, which JSON does not have; quote it"),
            ("- {path: /x, json: {n: .nan}}", "examples.json.n",
             "JSON has no '.nan'; expected a finite number"),
            ("- {path: /x, status: 999}", "examples.status", "must be at most 599"),
            ("- {path: /x, status: '200'}", "examples.status", "expected an integer"),
            ("- {path: x}", "examples.path", "example 'x' must be a path starting with '/'"),
            ("- {path: '/a b'}", "examples.path", "must be printable ASCII without spaces"),
            ("- {status: 200}", "examples.path", "is required"),
            ("- {path: /x, body: hi}", "examples.body",
             "unknown key 'body' (allowed: contains, content_type, json, path, status)"),
            ("- 'x y'", "examples", "example 'x y' must be a path starting with '/'"),
        ]
        for text, key, message in cases:
            with self.subTest(text):
                self.assertExampleError(text + "\n", line=6, key=key, message=message)

    def test_errors_name_the_line_of_the_bad_key(self) -> None:
        self.assertExampleError("""\
            - /api/search?q=ok
            - path: /api/search
              status: 400
              content_type: json
            """, line=9, key="examples.content_type", message="expected a media type")


class AdminConfigTests(ConfigTestCase):
    def test_default_is_loopback_without_token(self) -> None:
        """Unconfigured, the admin has no token and trusts only loopback (127.0.0.0/8 and ::1), so
        it is not open to the network."""
        path = self.write("""\
            services:
              search: {route: /api/search, command: [sh]}
            """)
        admin = load(path).admin
        self.assertIsNone(admin.token)
        self.assertEqual([str(n) for n in admin.local_networks], ["127.0.0.0/8", "::1/128"])

    def test_token_and_networks(self) -> None:
        """A token and the admin's own local networks, IPv4 and IPv6, are read as given."""
        path = self.write("""\
            admin:
              token: "0123456789abcdef0123"
              local_networks: ["10.0.0.0/8", "fd00::/8"]
            services:
              search: {route: /api/search, command: [sh]}
            """)
        admin = load(path).admin
        self.assertEqual(admin.token, "0123456789abcdef0123")
        self.assertEqual([str(n) for n in admin.local_networks], ["10.0.0.0/8", "fd00::/8"])

    def test_token_file_relative_to_the_config(self) -> None:
        folder = self.folder()
        self.write("  s3cret-token-from-a-file  \n", name="admin.token", folder=folder)
        path = self.write("""\
            admin: {token_file: admin.token}
            services:
              search: {route: /api/search, command: [sh]}
            """, folder=folder)
        self.assertEqual(load(path).admin.token, "s3cret-token-from-a-file")

    def assertAdminError(self, admin: str, line: int, key: str, message: str) -> None:
        path = self.write(f"""\
            services:
              search: {{route: /api/search, command: [sh]}}
            admin:
              {admin}
            """)
        self.assertConfigError(path, line=line, service=None, key=key, message=message)

    def test_short_token(self) -> None:
        """A token under 16 characters is too easy to guess: refused at its line."""
        self.assertAdminError('token: "short"', 4, "admin.token", "at least 16 characters")

    def test_token_and_token_file_together(self) -> None:
        """Two sources for one token is ambiguous: refused at token_file's line, asking for one or
        the other."""
        path = self.write("""\
            services:
              search: {route: /api/search, command: [sh]}
            admin:
              token: "0123456789abcdef0123"
              token_file: admin.token
            """)
        self.assertConfigError(path, line=5, service=None, key="admin.token_file",
                               message="either admin.token or admin.token_file")

    def test_missing_token_file(self) -> None:
        """A token file that cannot be read is refused at load time, so the admin never starts with
        its token silently missing."""
        self.assertAdminError("token_file: nowhere.token", 4, "admin.token_file",
                              "cannot read")

    def test_bad_network(self) -> None:
        """An invalid network such as 10.0.0.0/33 is refused at its line instead of trusting a
        range the user did not mean."""
        self.assertAdminError('local_networks: ["10.0.0.0/33"]', 4, "admin.local_networks",
                              "not a network like")

    def test_unknown_admin_key(self) -> None:
        """A misspelt 'token' would leave the admin without one: refused, naming the key."""
        self.assertAdminError('tokn: "0123456789abcdef0123"', 4, "admin.tokn",
                              "unknown key 'tokn'")


class MisspeltServiceTests(ConfigTestCase):
    def test_an_entry_without_manifest_or_route_suggests_the_near_name(self) -> None:
        manifest = """\
            command: [sh]
            route: /api/search
            """
        _, pool, _ = self.project("""\
            services_dir: ../services
            services:
              serach:
                workers: 2
            """, {"search": manifest, "auth": manifest.replace("search", "auth")})
        root = os.path.dirname(os.path.dirname(pool))
        missing = os.path.join(root, "services", "serach", "service.yaml")
        self.assertConfigError(
            pool, line=4, service="serach", key=None,
            message=f"no manifest {missing} to extend, and no 'route' of its own; "
                    f"did you mean 'search'?")
        _, pool, _ = self.project("""\
            services_dir: ../services
            services:
              zzz: {workers: 2}
            """, {"search": manifest})
        error = self.assertConfigError(pool, line=3, service="zzz", key=None,
                                       message="to extend, and no 'route' of its own")
        self.assertNotIn("did you mean", error.message)


class BusyPollConfigTests(ConfigTestCase):
    def pool(self, line: str) -> str:
        return self.write(f"""\
            {line}
            services:
              search: {{route: /api/search, command: [sh]}}
            """)

    def test_microseconds_and_default(self) -> None:
        """busy_poll_us is a whole number of microseconds, and off (0) unless set."""
        self.assertEqual(load(self.pool("busy_poll_us: 250")).busy_poll_us, 250)
        self.assertEqual(load(self.pool("busy_poll_us: 0")).busy_poll_us, 0)
        self.assertEqual(load(self.pool("listen: tcp:0")).busy_poll_us, 0)

    def test_bad_values(self) -> None:
        """Negatives, more than 10 ms, fractions, YAML booleans and lists are refused at
        busy_poll_us's line, not read as some other poll time."""
        for text, message in (("-1", "must be at least 0"),
                              ("10001", "must be at most 10000"),
                              ("0.5", "expected an integer, got 0.5"),
                              ("yes", "expected an integer, got True"),
                              ("[1]", "expected a single value, got a list")):
            self.assertConfigError(self.pool(f"busy_poll_us: {text}"), line=1,
                                   service=None, key="busy_poll_us", message=message)


class ClientTimeoutConfigTests(ConfigTestCase):
    def pool(self, line: str) -> str:
        return self.write(f"""\
            {line}
            services:
              search: {{route: /api/search, command: [sh]}}
            """)

    def test_seconds_and_default(self) -> None:
        """client_timeout is in seconds, fractions allowed, and 60 s unless set."""
        self.assertEqual(load(self.pool("client_timeout: 2.5")).client_timeout, 2.5)
        self.assertEqual(load(self.pool("listen: tcp:0")).client_timeout, 60.0)

    def test_bad_values(self) -> None:
        """Zero (no time at all), more than an hour, words and lists are refused at
        client_timeout's line."""
        for text, message in (("0", "must be greater than 0"),
                              ("3601", "must be at most 3600"),
                              ("soon", "expected a number (seconds), got 'soon'"),
                              ("[1]", "expected a single value, got a list")):
            self.assertConfigError(self.pool(f"client_timeout: {text}"), line=1,
                                   service=None, key="client_timeout", message=message)


class LogsConfigTests(ConfigTestCase):
    def pool(self, logs: str) -> str:
        return self.write(f"""\
            services:
              search: {{route: /api/search, command: [sh]}}
            logs:
              {logs}
            """)

    def test_sizes_keep_and_defaults(self) -> None:
        """logs.max_bytes (with units) and logs.keep each default on their own, to 10 MiB and 5
        files, whether logs is given inline or as a block."""
        self.assertEqual(load(self.pool('max_bytes: "1M"')).logs, LogsConfig(1 << 20, 5))
        self.assertEqual(load(self.pool("keep: 0")).logs, LogsConfig(10 << 20, 0))
        path = self.write("""\
            logs: {max_bytes: 65536, keep: 2}
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertEqual(load(path).logs, LogsConfig(65536, 2))
        path = self.write("""\
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertEqual(load(path).logs, LogsConfig(10 << 20, 5))

    def test_bad_logs_values(self) -> None:
        """A max_bytes under 16K (rotating every few lines), negative or over-1000 keep, fractions
        and misspelt keys are refused with their key and line."""
        for logs, key, message in (
                ('max_bytes: "10 parsecs"', "logs.max_bytes", "expected a size like"),
                ('max_bytes: "1K"', "logs.max_bytes", "must be at least 16K, got 1024 bytes"),
                ("max_bytes: -1", "logs.max_bytes", "between 0 and 1T"),
                ("keep: -1", "logs.keep", "must be at least 0"),
                ("keep: 1001", "logs.keep", "must be at most 1000"),
                ("keep: 2.5", "logs.keep", "expected an integer, got 2.5"),
                ("kept: 3", "logs.kept", "unknown key 'kept' (allowed: keep, max_bytes)")):
            self.assertConfigError(self.pool(logs), line=4, service=None, key=key,
                                   message=message)

    def test_logs_must_be_a_mapping(self) -> None:
        """logs: 10M does not say which setting it is: refused, asking for a mapping."""
        path = self.write("""\
            services:
              search: {route: /api/search, command: [sh]}
            logs: 10M
            """)
        self.assertConfigError(path, line=3, service=None, key="logs",
                               message="expected a mapping (key: value), got a value")


class TrustedProxiesConfigTests(ConfigTestCase):
    def test_networks_and_default(self) -> None:
        """Networks and single addresses (read as /32) are accepted; by default no proxy is
        trusted."""
        path = self.write("""\
            trusted_proxies: ["10.0.0.0/8", "fd00::/8", "192.0.2.1"]
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertEqual([str(n) for n in load(path).trusted_proxies],
                         ["10.0.0.0/8", "fd00::/8", "192.0.2.1/32"])
        path = self.write("""\
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertEqual(load(path).trusted_proxies, ())

    def test_bad_network(self) -> None:
        """An invalid network is refused at trusted_proxies' line rather than trusting a range the
        user did not mean."""
        path = self.write("""\
            trusted_proxies: ["10.0.0.0/33"]
            services:
              search: {route: /api/search, command: [sh]}
            """)
        self.assertConfigError(path, line=1, service=None, key="trusted_proxies",
                               message="not a network like")
