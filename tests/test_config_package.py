"""The layout of ``cgipool.config`` (issue 15, item 4): a package whose parts
import no reactor and no busy poller, and whose top still offers every name the
rest of the project imports from it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

from twisted.trial.unittest import TestCase

import cgipool.busypoll
import cgipool.config
from cgipool.config.model import MAX_SPIN_US
from tests.support import ROOT

PACKAGE_DIR = os.path.join(ROOT, "cgipool", "config")


def _imported_modules(path: str) -> set[str]:
    """Every module ``path`` imports, at any depth (also inside functions)."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


class ConfigPackageTests(TestCase):
    def test_importing_config_imports_no_reactor(self) -> None:
        """twistd installs the reactor ``--reactor`` names after it imported the
        plugin's options, which import the config: importing it first must not
        install the default reactor (a fresh interpreter, so nothing else did)."""
        code = ("import cgipool.config, sys; "
                "assert 'twisted.internet.reactor' not in sys.modules, 'reactor'; "
                "assert 'cgipool.busypoll' not in sys.modules, 'busypoll'")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                              text=True, timeout=60, cwd=ROOT)
        self.assertEqual(done.returncode, 0, done.stderr)

    def test_no_module_of_the_package_names_the_reactor_or_busypoll(self) -> None:
        """Not even inside a function: the package validates without a reactor
        (endpoint strings are parsed with a stand-in) and keeps the busy-poll
        limit in its model."""
        sources = sorted(name for name in os.listdir(PACKAGE_DIR) if name.endswith(".py"))
        self.assertIn("__init__.py", sources)
        for name in sources:
            imported = _imported_modules(os.path.join(PACKAGE_DIR, name))
            self.assertNotIn("twisted.internet.reactor", imported, name)
            self.assertFalse({m for m in imported if m.startswith("cgipool.busypoll")}, name)

    def test_busy_poll_limit_is_the_busy_pollers(self) -> None:
        """``busy_poll_us`` is checked against the config's own MAX_SPIN_US; it
        must stay the limit cgipool.busypoll spins for."""
        self.assertEqual(MAX_SPIN_US, cgipool.busypoll.MAX_SPIN_US)
        self.assertEqual(cgipool.config.MAX_SPIN_US, cgipool.busypoll.MAX_SPIN_US)

    def test_every_name_importers_use_is_re_exported(self) -> None:
        """``from cgipool.config import X`` keeps working for every X used in the
        repository (cgipool/, cgipool_tools/, tests/, bench/, scripts/,
        twisted/plugins/), and ``__all__`` lists only what exists."""
        used: set[str] = set()
        for top in ("cgipool", "cgipool_tools", "tests", "bench", "scripts", "twisted"):
            for folder, _, files in os.walk(os.path.join(ROOT, top)):
                if folder.startswith(PACKAGE_DIR):
                    continue
                for name in files:
                    if not name.endswith(".py"):
                        continue
                    with open(os.path.join(folder, name), encoding="utf-8") as f:
                        tree = ast.parse(f.read())
                    for node in ast.walk(tree):
                        if isinstance(node, ast.ImportFrom) and node.module == "cgipool.config":
                            used.update(alias.name for alias in node.names)
        self.assertIn("load", used)
        self.assertEqual(sorted(used - set(cgipool.config.__all__)), [])
        for name in cgipool.config.__all__:
            self.assertTrue(hasattr(cgipool.config, name), name)
