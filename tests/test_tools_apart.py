"""The tools apart from the daemon (issue 15, item 5): importing the daemon loads no
tool and no Selenium, no daemon module imports the tools, and no tool imports the
command line back (the cli.py ↔ tools/screenshot.py knot)."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

from twisted.trial.unittest import TestCase

ROOT = Path(__file__).resolve().parent.parent

#: Module names that have no place in the daemon's process.
TOOLISH = ("cgipool_tools", "cgipool.tools", "cgipool.cli", "selenium")


def _loaded_after(code: str) -> list[str]:
    """The modules a fresh interpreter has loaded after running ``code`` (in the
    project folder, as twistd and the tests run)."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))\n"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise AssertionError(f"the import failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def _toolish(modules: list[str]) -> list[str]:
    return [m for m in modules
            if any(m == t or m.startswith(t + ".") for t in TOOLISH)]


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module an ``import`` or ``from … import`` of ``path`` names, anywhere in
    it (inside functions too), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


class DaemonImportTests(TestCase):
    def test_importing_the_daemon_loads_no_tool_and_no_selenium(self) -> None:
        """What twistd imports — the plugin, then cgipool.tap and everything it
        imports, the service tree built — has no tools module in sys.modules."""
        loaded = _loaded_after(
            "import twisted.plugins.cgipool_plugin as plugin\n"
            "import cgipool.tap\n"
            "assert plugin.cgipool.module == 'cgipool.tap', plugin.cgipool.module\n")
        self.assertIn("cgipool.tap", loaded)
        self.assertIn("cgipool.supervisor.pool", loaded)
        self.assertEqual(_toolish(loaded), [])

    def test_the_command_line_loads_the_tools_but_not_selenium(self) -> None:
        """The check above is not vacuous: the command line does load the tools
        (and the parser, with dashboard-shot registered, still no Selenium)."""
        loaded = _loaded_after("import cgipool.cli\ncgipool.cli.build_parser()\n")
        self.assertIn("cgipool_tools.screenshot", loaded)
        self.assertIn("cgipool_tools.stress", loaded)
        self.assertNotIn("selenium", loaded)


class ImportDirectionTests(TestCase):
    def test_no_daemon_module_imports_the_tools(self) -> None:
        """Only cgipool/cli.py (the console script) may name cgipool_tools."""
        offenders = []
        for path in sorted((ROOT / "cgipool").rglob("*.py")):
            if path == ROOT / "cgipool" / "cli.py":
                continue
            offenders += [f"{path.relative_to(ROOT)}:{line} imports {name}"
                          for line, name in _imports(path)
                          if name.split(".")[0] == "cgipool_tools"
                          or name.startswith("cgipool.tools") or name == "cgipool.cli"]
        self.assertEqual(offenders, [])

    def test_no_tool_imports_the_command_line(self) -> None:
        """The tools get what they share from cgipool_tools.command, never from
        cgipool.cli (not even inside a function), so the two do not import each other."""
        offenders = []
        for path in sorted((ROOT / "cgipool_tools").rglob("*.py")):
            offenders += [f"{path.relative_to(ROOT)}:{line} imports {name}"
                          for line, name in _imports(path)
                          if name == "cgipool.cli" or name.startswith("cgipool.cli.")]
        self.assertEqual(offenders, [])
        self.assertFalse((ROOT / "cgipool" / "tools").exists(),
                         "cgipool/tools/ is back in the daemon's package")
