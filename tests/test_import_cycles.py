"""scripts/import_cycles.py: the package-level graph and its cycles on small
synthetic trees, deferred imports kept apart, the baseline ratchet, and that the
committed baseline is the real tree's cycles."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import ModuleType

from twisted.trial.unittest import TestCase

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "import_cycles.py"


def _load() -> ModuleType:
    """The script as a module (it is not part of any package)."""
    spec = importlib.util.spec_from_file_location("import_cycles", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


ic = _load()


def graph(files: dict[str, str]) -> "ic.Graph":
    """The graph of a tree given as {path under cgipool/: source}."""
    return ic.Graph.of_tree({f"cgipool/{path}": textwrap.dedent(text)
                             for path, text in files.items()})


def found(files: dict[str, str]) -> list[tuple[str, ...]]:
    return ic.cycles(graph(files).eager_successors())


# supervisor -> cgi -> proxy -> supervisor, the shape issue 15 names.
TRIANGLE = {
    "__init__.py": "",
    "cgi.py": "from cgipool.proxy.forward import ServiceProxy\n",
    "proxy/__init__.py": "",
    "proxy/forward.py": "from ..supervisor import pool\nServiceProxy = 1\n",
    "supervisor/__init__.py": "",
    "supervisor/pool.py": "import cgipool.cgi\n",
    "config.py": "from cgipool import cgi\n",
}


class GraphTests(TestCase):
    """Nodes are packages and top-level modules; edges carry their import lines."""

    def test_nodes_and_edges_at_package_level(self) -> None:
        """Only imports between packages count: one inside a package is no edge, and each
        edge keeps the file and line that make it."""
        g = graph({
            "__init__.py": "__version__ = '1'\n",
            "config.py": "from cgipool import __version__\nfrom . import logs\n",
            "logs.py": "",
            "proxy/__init__.py": "",
            "proxy/edge.py": "from .routes import Root\nfrom cgipool.config import X\n",
            "proxy/routes.py": "Root = 1\n",
            "admin/__init__.py": "from cgipool.proxy import edge\n",
        })
        self.assertEqual(g.nodes, {"cgipool", "cgipool.config", "cgipool.logs",
                                   "cgipool.proxy", "cgipool.admin"})
        self.assertEqual(sorted(g.eager), [
            ("cgipool.admin", "cgipool.proxy"), ("cgipool.config", "cgipool"),
            ("cgipool.config", "cgipool.logs"), ("cgipool.proxy", "cgipool.config")])
        # proxy.edge -> proxy.routes stays inside one package: no edge.
        self.assertEqual([str(s) for s in g.eager[("cgipool.proxy", "cgipool.config")]],
                         ["cgipool/proxy/edge.py:2 imports cgipool.config"])
        self.assertEqual(found({"a.py": "import cgipool.b\n", "b.py": "import os\n"}), [])

    def test_triangle_and_its_lines(self) -> None:
        """A cycle is found once, in one canonical rotation, and described with the file
        and line of every import in it, so the import to break is easy to find."""
        g = graph(TRIANGLE)
        cycles = ic.cycles(g.eager_successors())
        self.assertEqual(cycles, [("cgipool.cgi", "cgipool.proxy", "cgipool.supervisor")])
        self.assertEqual(ic.arrow(cycles[0]), "cgipool.cgi → cgipool.proxy → "
                         "cgipool.supervisor → cgipool.cgi")
        self.assertEqual(ic.describe(cycles[0], g), [
            "cgipool.cgi → cgipool.proxy → cgipool.supervisor → cgipool.cgi",
            "  cgipool.cgi → cgipool.proxy:",
            "    cgipool/cgi.py:1 imports cgipool.proxy.forward",
            "  cgipool.proxy → cgipool.supervisor:",
            "    cgipool/proxy/forward.py:1 imports cgipool.supervisor.pool",
            "  cgipool.supervisor → cgipool.cgi:",
            "    cgipool/supervisor/pool.py:1 imports cgipool.cgi",
        ])

    def test_every_elementary_cycle_of_a_component(self) -> None:
        """Every elementary cycle of a strongly connected group is listed, so the baseline
        records each one; a package merely importing into the group is in none."""
        # a <-> b and a -> b -> c -> a: one component, two cycles; d -> a outside it.
        files = {"a.py": "import cgipool.b\n", "b.py": "import cgipool.a, cgipool.c\n",
                 "c.py": "from cgipool import a\n", "d.py": "from cgipool.a import x\n"}
        self.assertEqual(found(files), [("cgipool.a", "cgipool.b"),
                                        ("cgipool.a", "cgipool.b", "cgipool.c")])
        self.assertEqual(ic.tarjan(graph(files).eager_successors()),
                         [["cgipool.a", "cgipool.b", "cgipool.c"]])

    def test_tarjan_separate_components_and_self_loops(self) -> None:
        succ = {"a": ["b"], "b": ["a"], "c": ["d"], "d": ["e"], "e": ["c"], "f": ["f"],
                "g": ["a"]}
        self.assertEqual(ic.tarjan(succ), [["a", "b"], ["c", "d", "e"], ["f"]])
        self.assertEqual(ic.cycles(succ), [("a", "b"), ("c", "d", "e"), ("f",)])
        self.assertEqual(ic.canonical(["e", "c", "d"]), ("c", "d", "e"))
        self.assertEqual(ic.canonical(["b", "a", "c"]), ("a", "c", "b"))  # direction kept


class DeferredTests(TestCase):
    """Imports inside functions (and under TYPE_CHECKING) are reported, not counted."""

    FILES = {
        "cli.py": "from cgipool.tools import screenshot\n",
        "tools/__init__.py": "",
        "tools/screenshot.py": textwrap.dedent("""\
            import typing
            if typing.TYPE_CHECKING:
                from cgipool.config import Config
            @staticmethod
            def helper():
                pass
            class Shot:
                def add_command(self):
                    from cgipool.cli import _seconds
                    return _seconds
            """),
        "config.py": "",
    }

    def test_deferred_edges_are_not_cycles(self) -> None:
        """Imports in functions or under TYPE_CHECKING do not run at import time, so they
        close no cycle; they are still listed, with where they are and what they would close."""
        g = graph(self.FILES)
        self.assertEqual(ic.cycles(g.eager_successors()), [])
        self.assertEqual(sorted(g.eager), [("cgipool.cli", "cgipool.tools")])
        self.assertEqual(sorted(g.deferred), [("cgipool.tools", "cgipool.cli"),
                                              ("cgipool.tools", "cgipool.config")])
        self.assertEqual([str(s) for s in g.deferred[("cgipool.tools", "cgipool.cli")]],
                         ["cgipool/tools/screenshot.py:9 imports cgipool.cli "
                          "(in Shot.add_command)"])
        self.assertEqual(ic.closing_deferred(g), {("cgipool.tools", "cgipool.cli")})
        text = ic.report(g, [])
        self.assertIn("no package import cycle", text)
        self.assertIn("  cgipool.tools → cgipool.cli  [would close a cycle at module level]",
                      text)
        self.assertIn("(in if TYPE_CHECKING)", text)
        self.assertTrue(text.endswith("0 package import cycles in 0 strongly connected "
                                      "groups; 3 packages, 1 module-level edges, "
                                      "2 deferred edges (1 closing a cycle)"))

    def test_the_same_edge_at_module_level_is_eager(self) -> None:
        """A deferred import is excused only while no module-level import makes the same
        edge: then the edge is eager, closes a cycle, and lists both imports."""
        files = dict(self.FILES)
        files["tools/client.py"] = "import cgipool.cli\n"
        g = graph(files)
        self.assertEqual(found(files), [("cgipool.cli", "cgipool.tools")])
        self.assertNotIn(("cgipool.tools", "cgipool.cli"), g.deferred)
        self.assertEqual(len(g.eager[("cgipool.tools", "cgipool.cli")]), 2)


class BaselineTests(TestCase):
    """The ratchet: a cycle not in the baseline fails; the baseline only loses
    cycles unless a new one is allowed."""

    def test_subset_check(self) -> None:
        """Only cycles missing from the baseline are new: a rotation of a known cycle is the
        same cycle, the reverse direction is not, and cycles left out are reported gone."""
        known = [("cgipool.cgi", "cgipool.proxy", "cgipool.supervisor")]
        self.assertEqual(ic.new_cycles([], known), [])
        self.assertEqual(ic.new_cycles([("cgipool.proxy", "cgipool.supervisor",
                                         "cgipool.cgi")], known), [])  # a rotation
        self.assertEqual(ic.new_cycles([("cgipool.a", "cgipool.b"), *known], known),
                         [("cgipool.a", "cgipool.b")])
        # The same packages the other way round are a different cycle.
        self.assertEqual(len(ic.new_cycles([("cgipool.cgi", "cgipool.supervisor",
                                             "cgipool.proxy")], known)), 1)
        self.assertEqual(ic.gone_cycles([], known), known)

    def _tree(self, files: dict[str, str]) -> tuple[Path, list[str]]:
        root = Path(self.mktemp())
        (root / "scripts").mkdir(parents=True)
        self._write(root, files)
        return root, ["--root", str(root)]

    def _write(self, root: Path, files: dict[str, str]) -> None:
        for path, text in files.items():
            target = root / "cgipool" / path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(textwrap.dedent(text))

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = ic.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_main_exit_status_and_update(self) -> None:
        """The ratchet end to end: a cycle not in the baseline exits 1 with its import lines,
        --update-baseline only removes cycles unless --allow-new, and --json lists edges."""
        root, args = self._tree(TRIANGLE)
        baseline = root / "scripts" / "import_cycles.baseline"
        code, _, err = self.run_main(*args)  # no baseline yet: the cycle is new
        self.assertEqual(code, 1)
        self.assertIn("import_cycles: new package import cycle: cgipool.cgi → "
                      "cgipool.proxy → cgipool.supervisor → cgipool.cgi", err)
        self.assertIn("    cgipool/supervisor/pool.py:1 imports cgipool.cgi", err)
        self.assertEqual(self.run_main(*args, "--update-baseline")[0], 0)  # the first
        self.assertEqual(json.loads(baseline.read_text()),
                         [["cgipool.cgi", "cgipool.proxy", "cgipool.supervisor"]])
        code, out, err = self.run_main(*args)
        self.assertEqual((code, err), (0, ""))
        self.assertIn("  1. cgipool.cgi → cgipool.proxy → cgipool.supervisor → "
                      "cgipool.cgi", out)

        # A new cycle: config <-> cgi.
        self._write(root, {"cgi.py": "from cgipool.proxy.forward import ServiceProxy\n"
                                     "from cgipool.config import X\n"})
        code, _, err = self.run_main(*args)
        self.assertEqual(code, 1)
        self.assertIn("new package import cycle: cgipool.cgi → cgipool.config → "
                      "cgipool.cgi\n  cgipool.cgi → cgipool.config:\n"
                      "    cgipool/cgi.py:2 imports cgipool.config\n", err)
        self.assertNotIn("cgipool.proxy → cgipool.supervisor → cgipool.cgi\n  ", err)
        self.assertEqual(self.run_main(*args, "--update-baseline")[0], 1)  # never added...
        self.assertEqual(len(ic.load_baseline(baseline)), 1)
        self.assertEqual(self.run_main(*args, "--update-baseline", "--allow-new")[0], 0)
        self.assertEqual(len(ic.load_baseline(baseline)), 2)

        # Both broken: passes, says so, and the update removes them.
        self._write(root, {"cgi.py": "", "supervisor/pool.py": ""})
        code, out, err = self.run_main(*args)
        self.assertEqual(code, 0)
        self.assertIn("no package import cycle", out)
        self.assertIn("gone from the tree: cgipool.cgi → cgipool.config → cgipool.cgi", err)
        self.assertEqual(self.run_main(*args, "--update-baseline")[0], 0)  # ...only removed
        self.assertEqual(ic.load_baseline(baseline), [])
        self.assertEqual(baseline.read_text(), "[]\n")

        code, out, _ = self.run_main(*args, "--json")
        data = json.loads(out)
        self.assertEqual((code, data["cycles"], data["new_cycles"]), (0, [], []))
        self.assertIn({"from": "cgipool.config", "to": "cgipool.cgi", "imports": [
            {"path": "cgipool/config.py", "line": 1, "source": "cgipool.config",
             "target": "cgipool.cgi", "deferred": False, "where": ""}]}, data["edges"])


class RealTreeTests(TestCase):
    def test_committed_baseline_is_the_real_tree(self) -> None:
        """The baseline stays true: breaking a cycle means removing it from the
        baseline in the same change (make import-cycles ARGS=--update-baseline)."""
        g = ic.Graph.of_tree(ic.read_tree(ic.ROOT))
        self.assertEqual(ic.cycles(g.eager_successors()), ic.load_baseline(ic.BASELINE),
                         "scripts/import_cycles.baseline is not the package cycles of "
                         "cgipool/: run make import-cycles ARGS=--update-baseline")
        self.assertIn("cgipool.supervisor", g.nodes)
