"""docs/TUTORIAL.md runs: every ``bash`` block, in order, on a copy of the project.

The copy gets its own listening ports and worker ports (the tutorial's 8080 and 8005,
and the admin's 8081, are replaced), shares the project's .venv, and its daemon is stopped (and every
process of it checked gone) whatever happens.
"""

from __future__ import annotations

import os
import re
import shutil
import signal

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from tests.support import ROOT, free_ports, port_range, process_alive, wait_for

TUTORIAL = os.path.join(ROOT, "docs", "TUTORIAL.md")
BASH = shutil.which("bash")
COPY = ("Makefile", "setup.cfg", "pyproject.toml", "etc", "services", "cgipool", "twisted")


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)




class TutorialTests(TestCase):
    timeout = 300

    def setUp(self) -> None:
        if BASH is None or shutil.which("curl") is None or shutil.which("gcc") is None:
            raise SkipTest("the tutorial needs bash, curl and gcc")
        if not os.path.exists(os.path.join(ROOT, ".venv", ".installed")):
            raise SkipTest("run `make venv` first (the tutorial uses .venv/bin/cgipool)")

    def project_copy(self, port: int, admin_port: int) -> str:
        root = os.path.abspath(self.mktemp())
        os.makedirs(root)
        for name in COPY:
            source = os.path.join(ROOT, name)
            if os.path.isdir(source):
                shutil.copytree(source, os.path.join(root, name), copy_function=shutil.copy2,
                                ignore=shutil.ignore_patterns("__pycache__", "obj", "bin"))
            else:
                shutil.copy2(source, os.path.join(root, name))
        os.symlink(os.path.join(ROOT, ".venv"), os.path.join(root, ".venv"))
        # The copy shares the project's venv: its make must never reinstall into it
        # (an editable install would then point at this temporary copy).
        for name in ("setup.cfg", "pyproject.toml"):
            os.utime(os.path.join(root, name), (0, 0))
        pool = os.path.join(root, "etc", "pool.yaml")
        with open(pool) as f:
            text = f.read()
        # The shipped file listens where the defaults do (8080, 8081, ::1 too):
        # the copy names its own ports instead.
        if re.search(r"^(listen|admin):", text, flags=re.M):
            raise AssertionError("etc/pool.yaml sets listen or admin: rewrite them here")
        text = (f'listen: "tcp:{port}:interface=127.0.0.1"\n'
                f'admin: {{listen: "tcp:{admin_port}:interface=127.0.0.1"}}\n' + text)
        text = re.sub(r'^port_range: .*$', f'port_range: "{port_range()}"', text, flags=re.M)
        with open(pool, "w") as f:
            f.write(text)
        return root

    def stop_daemon(self, root: str) -> None:
        """Cleanup: the tutorial's daemon and its workers are gone, whatever happened."""
        pidfile = os.path.join(root, "run", "cgipool.pid")
        try:
            with open(pidfile) as f:
                pid = int(f.read().strip())
        except (OSError, ValueError):
            return
        if process_alive(pid):
            os.kill(pid, signal.SIGTERM)
        return wait_for(lambda: not process_alive(pid), 30, what="the tutorial's daemon to exit")

    async def test_the_tutorial_commands_work(self) -> None:
        """The documented commands, run as a new user would, succeed and print the
        answers the tutorial promises, and make stop leaves no daemon behind."""
        with open(TUTORIAL, encoding="utf-8") as f:
            blocks = bash_blocks(f.read())
        self.assertGreaterEqual(len(blocks), 5)
        port, by_hand, admin_port = free_ports(3)
        root = self.project_copy(port, admin_port)
        self.addCleanup(self.stop_daemon, root)
        script = "set -euo pipefail\n" + "\n".join(blocks)
        script = script.replace("8080", str(port)).replace("8005", str(by_hand))
        env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS")}
        env["URL"] = f"http://127.0.0.1:{port}"
        out, err, code = await getProcessOutputAndValue(
            BASH, ["-c", script], env=env, path=root, reactor=reactor)
        text = out.decode("utf-8", "replace")
        self.assertEqual(code, 0, f"the tutorial failed:\n{text[-4000:]}\n"
                                  f"{err.decode('utf-8', 'replace')[-4000:]}")
        self.assertTrue(os.path.exists(os.path.join(root, "services", "mycalc", "service.yaml")))
        for expected in ('"op": "add", "a": 10, "b": 5, "result": 15',
                         f'"port": {by_hand}',
                         '"op": "add", "a": 15, "b": 25, "result": 40',
                         '"op": "multiply", "a": 6, "b": 7, "result": 42',
                         '"error": "division by zero"',
                         "PASS  mycalc",
                         " 0 failed"):
            self.assertIn(expected, text)
        self.assertNotIn("FAIL  ", text)
        # make stop left nothing behind.
        self.assertFalse(os.path.exists(os.path.join(root, "run", "cgipool.pid"))
                         and process_alive(int(open(os.path.join(root, "run",
                                                                 "cgipool.pid")).read())))
