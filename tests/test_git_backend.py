"""A real third-party CGI program behind cgipool: git's ``http-backend``.

The tools must work on any HTTP service, not only the samples' JSON with a
``pid``: a fresh project (its own folder, ``etc/pool.yaml`` and
``services/git/service.yaml``) serves a bare repository through
``/usr/lib/git-core/git-http-backend``, and ``make smoke-test``, a short
``cgipool stress-test`` and a ``git clone`` through the proxy all pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import textwrap

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.support import ROOT, port_range, start_daemon

HTTP_BACKEND = "/usr/lib/git-core/git-http-backend"
VENV_BIN = os.path.join(ROOT, ".venv", "bin")
#: What git's smart HTTP protocol answers to a clone's first request.
ADVERTISEMENT = "application/x-git-upload-pack-advertisement"

MANIFEST = f"""\
description: git's smart HTTP server (git-http-backend), a CGI program
protocol: cgi
command: ["{HTTP_BACKEND}"]
route: /git
workers: {{max: 4}}
request_timeout: 30
env: {{GIT_PROJECT_ROOT: "{{repos}}", GIT_HTTP_EXPORT_ALL: "1"}}
examples:
  - path: /git/demo.git/info/refs?service=git-upload-pack
    content_type: {ADVERTISEMENT}
    contains: ["# service=git-upload-pack", "refs/heads/main"]
  - {{path: "/git/demo.git/HEAD", content_type: text/plain, contains: "ref: refs/heads/main"}}
  - {{path: "/git/nothing.git/info/refs?service=git-upload-pack", status: 404}}
"""


def git_env() -> dict[str, str]:
    """A fixed identity, no user or system configuration, no proxy."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent",
            "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": "/dev/null",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_AUTHOR_NAME": "cgipool", "GIT_AUTHOR_EMAIL": "cgipool@example.invalid",
            "GIT_COMMITTER_NAME": "cgipool",
            "GIT_COMMITTER_EMAIL": "cgipool@example.invalid"}


def git(*args: str, cwd: str | None = None) -> str:
    """Run git before the daemon starts (this blocks the reactor)."""
    done = subprocess.run(["git", *args], cwd=cwd, env=git_env(), capture_output=True,
                          text=True, timeout=60)
    if done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout


class GitHttpBackendTests(TestCase):
    def setUp(self) -> None:
        if not (os.access(HTTP_BACKEND, os.X_OK) and shutil.which("git")):
            raise SkipTest(f"{HTTP_BACKEND} not found (Debian: apt-get install git)")

    def project(self) -> str:
        """A fresh project: a bare repository with one pushed commit, and a pool
        whose only service is git's http-backend (a manifest folder)."""
        root = os.path.abspath(self.mktemp())
        repos = os.path.join(root, "repos")
        os.makedirs(repos)
        bare = os.path.join(repos, "demo.git")
        git("init", "--quiet", "--bare", "--initial-branch=main", bare)
        work = os.path.join(root, "work")
        git("clone", "--quiet", bare, work)
        with open(os.path.join(work, "README"), "w") as f:
            f.write("served by git-http-backend behind cgipool\n")
        git("add", "README", cwd=work)
        git("commit", "--quiet", "-m", "first commit", cwd=work)
        git("push", "--quiet", "origin", "HEAD:main", cwd=work)
        os.makedirs(os.path.join(root, "services", "git"))
        with open(os.path.join(root, "services", "git", "service.yaml"), "w") as f:
            f.write(MANIFEST.replace("{repos}", repos))
        os.makedirs(os.path.join(root, "etc"))
        with open(os.path.join(root, "etc", "pool.yaml"), "w") as f:
            f.write(textwrap.dedent(f"""\
                listen: "tcp:0:interface=127.0.0.1"
                base_dir: ..
                services_dir: services
                port_range: "{port_range()}"
                admin: {{listen: "tcp:0:interface=127.0.0.1"}}
                """))
        return root

    async def command(self, *argv: str, cwd: str = ROOT) -> tuple[str, int]:
        """Its standard output (the progress lines on stderr are left out) and exit
        status; a failure shows both streams."""
        env = dict(os.environ)
        env.pop("CGIPOOL_ADMIN_TOKEN", None)
        out, err, code = await getProcessOutputAndValue(argv[0], argv[1:], env=env,
                                                        path=cwd, reactor=reactor)
        if code not in (0, 1):
            raise AssertionError(f"{argv} exited {code}: {out.decode()}{err.decode()}")
        return out.decode(), code

    async def test_smoke_test_stress_test_and_clone_through_the_proxy(self) -> None:
        root = self.project()
        daemon = await start_daemon(self, os.path.join(root, "etc", "pool.yaml"))

        # make smoke-test (the venv is there: the test runs in it).
        output, code = await self.command("make", "-s", "-o", ".venv/.installed", "smoke-test",
                                      f"URL={daemon.url}")
        self.assertEqual(code, 0, output)
        self.assertRegex(output, r"PASS  git     GET /git/demo.git/info/refs\?service=git-upload-pack "
                                 rf"-> 200 \([0-9.]+ ms, {ADVERTISEMENT}, 2 texts found\)")
        self.assertIn("GET /git/nothing.git/info/refs?service=git-upload-pack -> 404", output)
        self.assertIn("by service:\n  git      3 passed\n", output)
        self.assertIn("smoke-test: 5 passed, 0 failed, 0 skipped — all passed", output)

        # A short stress test: the pool has no worker route, so its CGI routes.
        output, code = await self.command(os.path.join(VENV_BIN, "cgipool"), "stress-test",
                                      "--url", daemon.url, "-t", "50", "-c", "4")
        self.assertEqual(code, 0, output)
        self.assertIn("50 requests in", output)
        self.assertIn("(the pool has no worker route to load: its CGI routes instead)",
                      output)
        self.assertRegex(output, r"\n  git +/git +50 +0 ")
        self.assertRegex(output, r"\n  total +50 +0 ")
        self.assertIn("status      200: 50", output)
        self.assertIn("errors      none", output)
        self.assertTrue(output.endswith("PASS: no failed requests\n"), output)
        # Named, the same.
        output, code = await self.command(os.path.join(VENV_BIN, "cgipool"), "stress-test",
                                      "--url", daemon.url, "-t", "20", "--service", "git")
        self.assertEqual(code, 0, output)
        self.assertNotIn("CGI routes instead", output)

        # And git itself: a clone through the proxy.
        clone = os.path.join(root, "clone")
        out, err, code = await getProcessOutputAndValue(
            shutil.which("git"), ["clone", "--quiet", f"{daemon.url}/git/demo.git", clone],
            env=git_env(), reactor=reactor)
        self.assertEqual(code, 0, err)
        with open(os.path.join(clone, "README")) as f:
            self.assertIn("git-http-backend", f.read())
        self.assertEqual(daemon.pool("git").status(reactor.seconds())["cgi"]["failures"], 0)

    async def test_a_wrong_expectation_fails_with_what_was_answered(self) -> None:
        """An example asking for JSON of git's answer fails on the content type and
        says what came instead; the stress test counts it per service."""
        root = self.project()
        manifest = os.path.join(root, "services", "git", "service.yaml")
        with open(manifest, "a") as f:
            f.write("  - {path: /git/demo.git/HEAD, content_type: application/json}\n")
        daemon = await start_daemon(self, os.path.join(root, "etc", "pool.yaml"))
        output, code = await self.command(os.path.join(VENV_BIN, "cgipool"), "smoke-test",
                                      "--url", daemon.url)
        self.assertEqual(code, 1, output)
        self.assertIn("FAIL  git     GET /git/demo.git/HEAD -> 200, but content type "
                      "text/plain, expected application/json", output)
        self.assertIn("  git      1 FAILED, 3 passed", output)
        output, code = await self.command(os.path.join(VENV_BIN, "cgipool"), "stress-test",
                                      "--url", daemon.url, "-t", "30", "--service", "git")
        self.assertEqual(code, 1, output)
        self.assertIn("git: content type: 10  (e.g. content type text/plain, "
                      "expected application/json)", output)
        self.assertIn("FAIL: 10 of 30 requests failed", output)
