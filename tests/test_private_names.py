"""scripts/twisted_private_names.py: what it reports on small sources, the
baseline ratchet, and that the committed baseline is the real tree's count."""

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

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "twisted_private_names.py"


def _load() -> ModuleType:
    """The script as a module (it is not part of any package)."""
    spec = importlib.util.spec_from_file_location("twisted_private_names", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


tpn = _load()

# A miniature Twisted: HTTPChannel inherits _buffer from LineReceiver and a mangled
# __timeoutCall from TimeoutMixin, and has private state and methods of its own.
FAKE_TWISTED = {
    "twisted": "",
    "twisted.protocols.basic": "class LineReceiver:\n    _buffer = b''\n",
    "twisted.protocols.policies": textwrap.dedent("""\
        class TimeoutMixin:
            def setTimeout(self, period):
                self.__timeoutCall = None
        """),
    "twisted.web.http": textwrap.dedent("""\
        from twisted.protocols import basic, policies
        class HTTPChannel(basic.LineReceiver, policies.TimeoutMixin):
            def __init__(self):
                self._command = None
                self.__first_line = 1
            def _handleStar(self):
                pass
        """),
    "twisted.web.server": "from twisted.web.http import HTTPChannel\n",
    "twisted.web.http_headers": "def _nameEncoder(name):\n    return name\n",
}


def found(source: str, path: str = "cgipool/mod.py",
          others: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(kind, name) of each use the script reports in ``source``."""
    sources = {path: textwrap.dedent(source), **(others or {})}
    uses = tpn.scan(sources, tpn.TwistedIndex(FAKE_TWISTED))
    return [(u.kind, u.name) for u in uses if u.path == path]


class KindsTests(TestCase):
    """Each kind of use is found, with the line it is on."""

    def test_private_attribute_of_a_twisted_object(self) -> None:
        """A private attribute cgipool does not define, read directly or through getattr
        with a literal name, is reported each time as a use of Twisted's."""
        self.assertEqual(found("""\
            def gone(request):
                return request._disconnected or getattr(request, "_disconnected", 0)
            """), [("attribute", "_disconnected")] * 2)

    def test_inherited_state_is_twisted_even_when_cgipool_writes_it(self) -> None:
        """``self._command = ...`` in an HTTPChannel subclass writes Twisted's
        state: an assignment there is no definition of cgipool's."""
        self.assertEqual(found("""\
            from twisted.web.http import HTTPChannel
            class Edge(HTTPChannel):
                def head(self):
                    self._command = b"GET"
                    self._mine = 1
                    return self._mine
            """), [("attribute", "_command")])

    def test_inherited_through_a_base_of_a_base_and_a_reexport(self) -> None:
        self.assertEqual(found("""\
            from twisted.web import server
            class Edge(server.HTTPChannel):
                def more(self):
                    return self._buffer
            class Edgier(Edge):
                def more(self):
                    return self._buffer
            """), [("attribute", "_buffer")] * 2)

    def test_override_and_super_call_of_a_private_method(self) -> None:
        self.assertEqual(found("""\
            from twisted.web.http import HTTPChannel
            class Edge(HTTPChannel):
                def _handleStar(self):
                    super()._handleStar()
            """), [("override", "_handleStar"), ("attribute", "_handleStar")])

    def test_mangled_names_of_other_classes(self) -> None:
        """Spelling out another class's mangled name reaches Twisted's most private state,
        of the class itself or of a mixin it inherits: reported as "mangled"."""
        self.assertEqual(found("""\
            from twisted.web.http import HTTPChannel
            class Edge(HTTPChannel):
                def reset(self):
                    self._HTTPChannel__first_line = 0
                    self._TimeoutMixin__timeoutCall = None
            """), [("mangled", "_HTTPChannel__first_line"),
                   ("mangled", "_TimeoutMixin__timeoutCall")])

    def test_private_imports_from_twisted(self) -> None:
        """Every spelling of importing a private Twisted module or name is reported; other
        libraries' private names and cgipool's own relative imports are not."""
        self.assertEqual(found("""\
            import twisted.internet._sslverify
            from twisted.internet import _sslverify
            from twisted.internet._sslverify import OpenSSLCertificateOptions
            from twisted.web.http_headers import Headers, _nameEncoder
            from attr import _make
            from .edge import _bad_line_start
            """, path="cgipool/proxy/mod.py"), [
            ("import", "twisted.internet._sslverify"),
            ("import", "twisted.internet._sslverify"),
            ("import", "twisted.internet._sslverify"),
            ("import", "twisted.web.http_headers._nameEncoder"),
        ])

    def test_class_swap_but_not_reading_the_class(self) -> None:
        self.assertEqual(found("""\
            def eager(transport, cls):
                if transport.__class__ is not cls:
                    transport.__class__ = cls
            """), [("class-swap", "transport.__class__")])

    def test_replaced_reactor_methods(self) -> None:
        """Assigning or deleting a reactor method patches Twisted for everyone: reported
        whatever the object is called, while an ordinary attribute is not."""
        self.assertEqual(found("""\
            class Spin:
                def __init__(self, reactor):
                    self.reactor = reactor
                def on(self, thing):
                    self.reactor.doIteration = self.iterate
                    reactor.callLater = self.later
                    thing.doIteration = self.iterate
                def off(self):
                    del self.reactor.doIteration
                    self.timeout = 5
            """), [("reactor-method", "self.reactor.doIteration"),
                   ("reactor-method", "reactor.callLater"),
                   ("reactor-method", "thing.doIteration"),
                   ("reactor-method", "self.reactor.doIteration")])

    def test_report_lines_name_path_line_kind_and_code(self) -> None:
        uses = tpn.scan({"cgipool/a.py": "x = 1\nif r._disconnected: pass\n"},
                        tpn.TwistedIndex(FAKE_TWISTED))
        self.assertEqual(str(uses[0]),
                         "cgipool/a.py:2: attribute: _disconnected  (if r._disconnected: pass)")
        text = tpn.report(uses)
        self.assertIn("cgipool/a.py", text.splitlines()[-3])
        self.assertTrue(text.endswith("1 uses of Twisted private names in 1 files, on 1 lines"))


class OwnNamesTests(TestCase):
    """cgipool's own ``_names`` and the documented stdlib ones are not reported."""

    def test_cgipool_definitions_anywhere_in_the_package(self) -> None:
        """What cgipool defines (module names, attrs fields, __slots__, assigned and
        mangled attributes) is its own to use from any of its modules: not reported."""
        other = textwrap.dedent("""\
            import attrs
            _LIMIT = 3
            def _helper(): pass
            @attrs.define
            class Pool:
                _file: object = attrs.field(default=None)
                _count = 0
                __slots__ = ("_next",)
                def __init__(self):
                    self._waiting = []
                    self.__secret = 1
                def _spawn(self):
                    return self.__secret
            """)
        self.assertEqual(found("""\
            from cgipool import other
            def use(pool, driver):
                driver._cgipool_profile = 1
                return (other._LIMIT, other._helper, pool._file, pool._count, pool._next,
                        pool._waiting, pool._spawn(), pool._Pool__secret,
                        driver._cgipool_profile)
            """, others={"cgipool/other.py": other}), [])

    def test_protocol_subclass_state_not_in_twisted_is_own(self) -> None:
        self.assertEqual(found("""\
            from twisted.web.http import HTTPChannel
            class Edge(HTTPChannel):
                def __init__(self):
                    self._head_deadline = None
                def head(self):
                    return self._head_deadline
            """), [])

    def test_dunders_are_not_private(self) -> None:
        """``__init__`` and ``__dict__`` are public protocol, not mangled names: reporting
        them would bury the real uses in noise."""
        self.assertEqual(found("""\
            class A:
                def __init__(self):
                    super().__init__()
                    self.__dict__.update(x=1)
            """), [])

    def test_documented_stdlib_underscores_are_exempt(self) -> None:
        """sys._getframe, os._exit and namedtuple's _replace/_asdict/_fields are documented
        API, each exemption says why, and the same name on an unknown object is reported."""
        self.assertEqual(found("""\
            import os, sys
            def f(point, other):
                sys._getframe(1)
                os._exit(0)
                point._replace(x=1), point._asdict(), point._fields
                return other._getframe
            """), [("attribute", "_getframe")])
        self.assertIn(("sys", "_getframe"), tpn.EXEMPT)
        self.assertTrue(all(why for why in tpn.EXEMPT.values()))


class BaselineTests(TestCase):
    """The ratchet: a file over its baseline fails, lower or equal passes, and the
    baseline is rewritten only downwards unless an increase is allowed."""

    def test_check_passes_at_or_below_and_fails_above(self) -> None:
        self.assertEqual(tpn.check({"cgipool/a.py": 3}, {"cgipool/a.py": 3}), [])
        self.assertEqual(tpn.check({"cgipool/a.py": 2}, {"cgipool/a.py": 3}), [])
        self.assertEqual(tpn.check({"cgipool/proxy/edge.py": 59},
                                   {"cgipool/proxy/edge.py": 58}),
                         ["cgipool/proxy/edge.py: 59 uses, baseline 58: a new use of a "
                          "Twisted private name — use the public surface or document it "
                          "in docs/ARCHITECTURE.md"])
        self.assertEqual(len(tpn.check({"cgipool/new.py": 1}, {})), 1)
        self.assertEqual(tpn.lowered({}, {"cgipool/a.py": 1}),
                         ["cgipool/a.py: 0 uses, baseline 1"])

    def _tree(self, source: str) -> tuple[Path, list[str]]:
        """A project folder with cgipool/mod.py and a fake Twisted next to it."""
        root = Path(self.mktemp())
        (root / "cgipool").mkdir(parents=True)
        (root / "scripts").mkdir()
        (root / "cgipool" / "mod.py").write_text(textwrap.dedent(source))
        for name, text in FAKE_TWISTED.items():
            parts = name.split(".")
            folder = root.joinpath("site", *parts)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "__init__.py").write_text(text)
        return root, ["--root", str(root), "--twisted", str(root / "site" / "twisted")]

    def run_main(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):
            code = tpn.main(list(argv))
        return code, out.getvalue(), err.getvalue()

    def test_main_exit_status_and_update(self) -> None:
        """The ratchet end to end: a new use exits 1, --update-baseline only lowers counts
        unless --allow-increase is given, a drop is noted, and --json carries the uses."""
        root, args = self._tree("def f(r):\n    return r._a, r._b\n")
        baseline = root / "scripts" / "twisted_private_names.baseline"
        self.assertEqual(self.run_main(*args)[0], 1)  # no baseline yet: 2 > 0
        self.assertEqual(self.run_main(*args, "--update-baseline")[0], 0)
        self.assertEqual(json.loads(baseline.read_text())["counts"], {"cgipool/mod.py": 2})
        code, out, _ = self.run_main(*args)
        self.assertEqual(code, 0)
        self.assertIn("cgipool/mod.py:2: attribute: _a  (return r._a, r._b)", out)

        (root / "cgipool" / "mod.py").write_text("def f(r):\n    return r._a, r._b, r._c\n")
        code, _, err = self.run_main(*args)
        self.assertEqual(code, 1)
        self.assertIn("cgipool/mod.py: 3 uses, baseline 2: a new use", err)
        self.assertEqual(self.run_main(*args, "--update-baseline")[0], 1)  # never up...
        self.assertEqual(tpn.load_baseline(baseline), {"cgipool/mod.py": 2})
        self.assertEqual(self.run_main(*args, "--update-baseline", "--allow-increase")[0], 0)
        self.assertEqual(tpn.load_baseline(baseline), {"cgipool/mod.py": 3})

        (root / "cgipool" / "mod.py").write_text("def f(r):\n    return r._a\n")
        code, _, err = self.run_main(*args)
        self.assertEqual(code, 0)
        self.assertIn("below baseline: cgipool/mod.py: 1 uses, baseline 3", err)
        self.assertEqual(self.run_main(*args, "--update-baseline")[0], 0)  # ...only down
        self.assertEqual(tpn.load_baseline(baseline), {"cgipool/mod.py": 1})

        code, out, _ = self.run_main(*args, "--json")
        data = json.loads(out)
        self.assertEqual((code, data["total"], data["counts"]), (0, 1, {"cgipool/mod.py": 1}))
        self.assertEqual(data["uses"][0]["name"], "_a")

    def test_no_twisted_source_is_refused(self) -> None:
        """Without Twisted's source nothing can be told apart as Twisted's: exit 2 with the
        reason, rather than a vacuous pass."""
        root, _ = self._tree("x = 1\n")
        code, _, err = self.run_main("--root", str(root), "--twisted", str(root / "nowhere"))
        self.assertEqual(code, 2)
        self.assertIn("no Twisted source", err)


class RealTreeTests(TestCase):
    def test_committed_baseline_is_the_real_count(self) -> None:
        """The baseline stays true: lowering the count means lowering the
        baseline in the same change (make private-names ARGS=--update-baseline)."""
        twisted = tpn.TwistedIndex.installed()
        self.assertIsNotNone(twisted)
        current = tpn.counts(tpn.scan(tpn.read_tree(tpn.ROOT), twisted))
        self.assertEqual(current, tpn.load_baseline(tpn.BASELINE),
                         "scripts/twisted_private_names.baseline is not the count in "
                         "cgipool/: run make private-names ARGS=--update-baseline")
