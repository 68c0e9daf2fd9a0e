#!/usr/bin/env python3
"""List every use of a Twisted private name in cgipool/; CI runs it as a ratchet.

Issue 15 ("supported ground") wants at most three uses of Twisted internals, each
listed in docs/ARCHITECTURE.md with why and a test that fails loudly when Twisted
changes it.  Until then this script keeps the count from growing: CI fails when a
file of cgipool/ has more uses than ``scripts/twisted_private_names.baseline``
allows, and ``--update-baseline`` only ever lowers the numbers (``--allow-increase``
to raise them, deliberately).  So the count only goes down.

What counts as a use (one per occurrence, several may share a line):

- ``attribute``: ``obj._name`` read, written or deleted (also ``getattr(obj,
  "_name")`` and friends) where ``_name`` is not one of cgipool's own names, or
  where it is a name a Twisted base class of the enclosing class defines
  (``self._command = ...`` in an ``HTTPChannel`` subclass writes Twisted's state);
- ``override``: a method or class attribute ``_name`` in a subclass of a Twisted
  class that defines ``_name`` itself;
- ``mangled``: a name-mangled attribute of someone else's class
  (``_HTTPChannel__first_line``);
- ``import``: a private module or name imported from twisted
  (``from twisted.web.http_headers import _nameEncoder``);
- ``class-swap``: ``obj.__class__ = ...``;
- ``reactor-method``: a method of the reactor replaced or deleted
  (``reactor.doIteration = ...``).

cgipool's own names are the ``_``-prefixed names it defines: methods and
functions, class attributes (attrs fields, ``__slots__``), ``self._x = ...``,
module-level names, and attributes it invents on other objects.  Which names a
Twisted base class defines is read from the installed Twisted's source with
``ast`` (never imported, so the scan has no side effects); without that source
the count would differ from the baseline's, so the script refuses (exit 2).
Known limit: without types, ``other._x`` where cgipool also defines ``_x``
somewhere is taken as cgipool's.

Standard library only (``ast``, ``argparse``, ``json``, ``pathlib``); not part of
the cgipool package.  ``make private-names`` runs it with the venv's python;
exit 0: every file at or below its baseline, 1: a file above it, 2: no Twisted.
"""
from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "cgipool"
BASELINE = ROOT / "scripts" / "twisted_private_names.baseline"

# Underscore names of the standard library that its documentation makes public
# API: using them is not resting on an internal.  (receiver, name); receiver
# None: on any object.
EXEMPT: dict[tuple[str | None, str], str] = {
    ("sys", "_getframe"): "documented in the sys module (CPython API)",
    ("sys", "_current_frames"): "documented in the sys module",
    ("os", "_exit"): "documented in the os module: exit without cleanup (after fork)",
    (None, "_replace"): "namedtuple API (underscore only to avoid field clashes)",
    (None, "_asdict"): "namedtuple API",
    (None, "_fields"): "namedtuple API",
    (None, "_field_defaults"): "namedtuple API",
    (None, "_make"): "namedtuple API",
}

# Methods only a reactor has: assigning them is patching the event loop,
# whatever the receiver is called.
REACTOR_ONLY_METHODS = frozenset({
    "doIteration", "doPoll", "doSelect", "doKEvent", "doWaitForMultipleEvents",
    "mainLoop", "runUntilCurrent",
})

KINDS = ("attribute", "override", "mangled", "import", "class-swap", "reactor-method")

# _HTTPChannel__first_line: Python's mangled form of __first_line in HTTPChannel.
MANGLED = re.compile(r"^_(?P<cls>[A-Za-z0-9]\w*?)__(?P<attr>[A-Za-z0-9]\w*)$")
ATTR_FUNCS = frozenset({"getattr", "setattr", "hasattr", "delattr"})


def is_private(name: str) -> bool:
    """``_x`` and ``__x`` but not dunders (``__init__``) and not ``_``."""
    return name.startswith("_") and name.strip("_") != "" and not (
        name.startswith("__") and name.endswith("__"))


def is_mangled_foreign(name: str, own_classes: set[str]) -> bool:
    """``_Cls__attr`` written out by hand for a class that is not cgipool's."""
    m = MANGLED.match(name)
    return bool(m) and m.group("cls").lstrip("_") not in own_classes


@dataclass(frozen=True, order=True)
class Use:
    """One use of a private name: where, what kind, which name, the line."""
    path: str
    line: int
    kind: str
    name: str
    code: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}: {self.name}  ({self.code})"


# --- one parsed module: imports, classes, definitions ---------------------------

@dataclass
class ClassInfo:
    """The private names a class defines itself and its base expressions."""
    module: str
    name: str
    node: ast.ClassDef
    defines: set[str]
    bases: list[str]  # dotted, as resolved through the module's imports


def _dotted(node: ast.expr) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    if isinstance(node, ast.Subscript):  # Generic[T], Protocol[T]
        return _dotted(node.value)
    return None


def _self_name(func: ast.FunctionDef | ast.AsyncFunctionDef) -> str | None:
    args = func.args.posonlyargs + func.args.args
    return args[0].arg if args else None


def _mangle(cls: str, name: str) -> str:
    if name.startswith("__") and not name.endswith("__"):
        return f"_{cls.lstrip('_')}{name}"
    return name


def _store_targets(node: ast.AST) -> Iterator[ast.expr]:
    if isinstance(node, ast.Assign):
        for target in node.targets:
            yield from _flatten(target)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        yield node.target
    elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
        yield from _flatten(node.target)
    elif isinstance(node, ast.withitem) and node.optional_vars is not None:
        yield from _flatten(node.optional_vars)
    elif isinstance(node, ast.NamedExpr):
        yield node.target


def _flatten(target: ast.expr) -> Iterator[ast.expr]:
    if isinstance(target, (ast.Tuple, ast.List)):
        for elt in target.elts:
            yield from _flatten(elt)
    elif isinstance(target, ast.Starred):
        yield from _flatten(target.value)
    else:
        yield target


def _class_defines(cls: ast.ClassDef) -> set[str]:
    """Private names a class body defines: methods, class attributes, slots,
    and ``self._x = ...`` in its methods (mangled like Python does)."""
    names: set[str] = set()
    for stmt in cls.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(_mangle(cls.name, stmt.name))
        for target in _store_targets(stmt):
            if isinstance(target, ast.Name):
                names.add(_mangle(cls.name, target.id))
                if target.id == "__slots__":
                    names.update(_mangle(cls.name, s) for s in _strings(stmt))
    for func in cls.body:
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        me = _self_name(func)
        for node in ast.walk(func):
            for target in _store_targets(node):
                if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                        and target.value.id == me):
                    names.add(_mangle(cls.name, target.attr))
    return {n for n in names if is_private(n) or MANGLED.match(n)}


def _strings(stmt: ast.stmt) -> Iterator[str]:
    value = getattr(stmt, "value", None)
    if value is None:
        return
    for node in ast.walk(value):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


class Module:
    """A parsed module: its import table, top-level names and classes."""

    def __init__(self, name: str, source: str, is_package: bool = False) -> None:
        self.name = name
        self.tree = ast.parse(source)
        self.lines = source.splitlines()
        self.package = name if is_package else name.rpartition(".")[0]
        self.imports: dict[str, str] = {}  # local name -> dotted target
        self.top: set[str] = set()
        self.classes: dict[str, ClassInfo] = {}
        for node in self.tree.body:
            self._top_level(node)

    def _top_level(self, node: ast.stmt) -> None:
        if isinstance(node, (ast.If, ast.Try)):  # try: import x / if TYPE_CHECKING
            for block in (node.body, getattr(node, "orelse", []),
                          getattr(node, "finalbody", []),
                          *[h.body for h in getattr(node, "handlers", [])]):
                for sub in block:
                    self._top_level(sub)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    self.imports[alias.asname] = alias.name
                else:
                    head = alias.name.split(".")[0]
                    self.imports[head] = head
        elif isinstance(node, ast.ImportFrom):
            source = self.absolute(node)
            for alias in node.names:
                self.imports[alias.asname or alias.name] = f"{source}.{alias.name}"
        elif isinstance(node, ast.ClassDef):
            self.top.add(node.name)
            bases = [self.resolve(b) for b in node.bases]
            self.classes[node.name] = ClassInfo(
                self.name, node.name, node, _class_defines(node),
                [b for b in bases if b])
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            self.top.add(node.name)
        else:
            for target in _store_targets(node):
                if isinstance(target, ast.Name):
                    self.top.add(target.id)

    def absolute(self, node: ast.ImportFrom) -> str:
        """The module an ``ImportFrom`` reads from, relative imports resolved."""
        if not node.level:
            return node.module or ""
        parts = self.package.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1])
        return f"{base}.{node.module}" if node.module else base

    def resolve(self, expr: ast.expr) -> str | None:
        """A base-class expression as a dotted name through this module's imports."""
        dotted = _dotted(expr)
        if dotted is None:
            return None
        head, _, rest = dotted.partition(".")
        if head in self.imports:
            target = self.imports[head]
        elif head in self.top:
            target = f"{self.name}.{head}"
        else:
            return dotted  # a builtin (object, Exception) or unknown
        return f"{target}.{rest}" if rest else target

    def code(self, line: int) -> str:
        return self.lines[line - 1].strip() if 0 < line <= len(self.lines) else ""


# --- Twisted's side: which private names a Twisted class and its bases define ---

class TwistedIndex:
    """Twisted's modules, parsed on demand from source (never imported), to say
    which private names a Twisted class and its ancestors define."""

    def __init__(self, sources: Mapping[str, Path | str]) -> None:
        self._sources = dict(sources)  # module name -> file or source text
        self._modules: dict[str, Module | None] = {}
        self._ancestry: dict[str, frozenset[str]] = {}
        self._words: set[str] | None = None

    @classmethod
    def installed(cls, top: Path | None = None) -> "TwistedIndex | None":
        """The index of the Twisted that ``find_spec`` sees (or the package at
        ``top``); None when there is no Twisted source."""
        if top is None:
            try:
                spec = importlib.util.find_spec("twisted")
            except (ImportError, ValueError):
                return None
            if spec is None or not spec.submodule_search_locations:
                return None
            for location in spec.submodule_search_locations:
                if (Path(location) / "__init__.py").is_file():
                    top = Path(location)
                    break
            else:
                return None
        if not (top / "__init__.py").is_file():
            return None
        sources: dict[str, Path | str] = {}
        for path in top.rglob("*.py"):
            rel = path.relative_to(top.parent).with_suffix("")
            parts = rel.parts
            if "test" in parts or "plugins" in parts:
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            sources[".".join(parts)] = path
        return cls(sources)

    def module(self, name: str) -> Module | None:
        if name not in self._modules:
            src = self._sources.get(name)
            mod = None
            if src is not None:
                text = src.read_text("utf-8") if isinstance(src, Path) else src
                is_pkg = isinstance(src, Path) and src.name == "__init__.py"
                try:
                    mod = Module(name, text, is_package=is_pkg)
                except SyntaxError:
                    mod = None
            self._modules[name] = mod
        return self._modules[name]

    def has_module(self, name: str) -> bool:
        return name in self._sources

    def lookup(self, dotted: str, depth: int = 0) -> ClassInfo | None:
        """The class a dotted name names, following re-exports."""
        module, _, attr = dotted.rpartition(".")
        mod = self.module(module) if module else None
        if mod is None or depth > 8:
            return None
        if attr in mod.classes:
            return mod.classes[attr]
        target = mod.imports.get(attr)
        return self.lookup(target, depth + 1) if target and target != dotted else None

    def ancestry(self, dotted: str) -> frozenset[str]:
        """Private names defined by the Twisted class ``dotted`` and its bases."""
        if dotted in self._ancestry:
            return self._ancestry[dotted]
        self._ancestry[dotted] = frozenset()  # cycles
        info = self.lookup(dotted)
        names: set[str] = set()
        if info is not None:
            names |= info.defines
            for base in info.bases:
                names |= self.ancestry(base)
        self._ancestry[dotted] = frozenset(names)
        return self._ancestry[dotted]

    def mentions(self, name: str) -> bool:
        """Whether the word ``name`` is anywhere in Twisted's source (a text
        search, done once: parsing all of Twisted would take seconds)."""
        if self._words is None:
            words: set[str] = set()
            for src in self._sources.values():
                text = src.read_text("utf-8", errors="replace") if isinstance(src, Path) else src
                words.update(re.findall(r"(?<!\w)_\w+", text))
            self._words = words
        return name in self._words


# --- cgipool's side ---------------------------------------------------------------

def module_name(path: str) -> tuple[str, bool]:
    """``cgipool/proxy/edge.py`` -> (``cgipool.proxy.edge``, is a package)."""
    parts = list(Path(path).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts.pop()
    return ".".join(parts), is_pkg


class Scanner:
    """The uses of foreign private names in a set of cgipool modules."""

    def __init__(self, sources: Mapping[str, str], twisted: TwistedIndex | None) -> None:
        self.twisted = twisted
        self.modules: dict[str, tuple[str, Module]] = {}
        for path, text in sorted(sources.items()):
            name, is_pkg = module_name(path)
            self.modules[name] = (path, Module(name, text, is_package=is_pkg))
        self.own_classes = {c for _, m in self.modules.values() for c in m.classes}
        self._twisted_ancestry: dict[tuple[str, str], frozenset[str]] = {}
        self.own = self._own_names()

    # Which Twisted private names a cgipool class inherits.
    def inherited(self, module: str, cls: str, seen: frozenset[tuple[str, str]] = frozenset()
                  ) -> frozenset[str]:
        key = (module, cls)
        if key in self._twisted_ancestry:
            return self._twisted_ancestry[key]
        if key in seen:
            return frozenset()
        info = self.modules[module][1].classes.get(cls)
        names: set[str] = set()
        for base in info.bases if info else []:
            own = self._own_class(base)
            if own is not None:
                names |= self.inherited(*own, seen=seen | {key})
            elif self.twisted is not None and base.startswith("twisted."):
                names |= self.twisted.ancestry(base)
        self._twisted_ancestry[key] = frozenset(names)
        return self._twisted_ancestry[key]

    def _own_class(self, dotted: str) -> tuple[str, str] | None:
        module, _, cls = dotted.rpartition(".")
        if module in self.modules:
            mod = self.modules[module][1]
            if cls in mod.classes:
                return module, cls
            target = mod.imports.get(cls)
            if target and target != dotted:
                return self._own_class(target)
        return None

    def _own_names(self) -> set[str]:
        own: set[str] = set()
        for name, (_, mod) in self.modules.items():
            own |= {n for n in mod.top if is_private(n)}
            for info in mod.classes.values():
                own |= info.defines - self.inherited(name, info.name)
            # Attributes cgipool invents on other objects (driver._cgipool_x = ...):
            # its own, unless Twisted has a name like that.
            for node in ast.walk(mod.tree):
                for target in _store_targets(node):
                    if (isinstance(target, ast.Attribute) and is_private(target.attr)
                            and not (self.twisted and self.twisted.mentions(target.attr))):
                        own.add(target.attr)
        return {n for n in own if not is_mangled_foreign(n, self.own_classes)}

    def scan(self) -> list[Use]:
        uses: list[Use] = []
        for name, (path, mod) in self.modules.items():
            uses.extend(_ModuleVisitor(self, name, path, mod).run())
        return sorted(uses)


class _ModuleVisitor(ast.NodeVisitor):
    """Walks one module with the enclosing class and its ``self`` in view."""

    def __init__(self, scanner: Scanner, name: str, path: str, mod: Module) -> None:
        self.scanner = scanner
        self.name = name
        self.path = path
        self.mod = mod
        self.uses: list[Use] = []
        self.cls: str | None = None
        self.inherited: frozenset[str] = frozenset()
        self.me: str | None = None  # the name of self in the current method

    def run(self) -> list[Use]:
        self.visit(self.mod.tree)
        return self.uses

    def add(self, node: ast.AST, kind: str, name: str) -> None:
        line = getattr(node, "lineno", 0)
        self.uses.append(Use(self.path, line, kind, name, self.mod.code(line)))

    # Imports.
    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _twisted_private_module(alias.name):
                self.add(node, "import", alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = self.mod.absolute(node)
        if source.split(".")[0] != "twisted":
            return
        if _twisted_private_module(source):
            self.add(node, "import", source)
            return
        for alias in node.names:
            if is_private(alias.name):
                self.add(node, "import", f"{source}.{alias.name}")

    # Scope: which class, which self.
    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        saved = self.cls, self.inherited, self.me
        top = node.name in self.mod.classes and self.mod.classes[node.name].node is node
        self.cls = node.name
        self.inherited = self.scanner.inherited(self.name, node.name) if top else frozenset()
        self.me = None
        for stmt in node.body:
            names: list[tuple[ast.AST, str]] = []
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.append((stmt, stmt.name))
            names += [(t, t.id) for t in _store_targets(stmt) if isinstance(t, ast.Name)]
            for where, name in names:
                if name in self.inherited and is_private(name):
                    self.add(where, "override", name)
        self.generic_visit(node)
        self.cls, self.inherited, self.me = saved

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        saved = self.me
        if self.cls is not None and self.me is None:
            decorators = {_dotted(d) for d in node.decorator_list}
            if "staticmethod" not in decorators:
                self.me = _self_name(node)
        self.generic_visit(node)
        self.me = saved

    visit_AsyncFunctionDef = visit_FunctionDef

    # Attributes.
    def visit_Attribute(self, node: ast.Attribute) -> None:
        self.attribute(node, node.value, node.attr, isinstance(node.ctx, (ast.Store, ast.Del)))
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if (isinstance(func, ast.Name) and func.id in ATTR_FUNCS and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
                and isinstance(node.args[1].value, str)):
            self.attribute(node, node.args[0], node.args[1].value,
                           func.id in ("setattr", "delattr"))
        self.generic_visit(node)

    def attribute(self, node: ast.AST, receiver: ast.expr, attr: str, store: bool) -> None:
        if attr == "__class__":
            if store:
                self.add(node, "class-swap", f"{_dotted(receiver) or '…'}.__class__")
            return
        if not is_private(attr):
            if store and (attr in REACTOR_ONLY_METHODS or _looks_like_reactor(receiver)):
                self.add(node, "reactor-method", f"{_dotted(receiver) or '…'}.{attr}")
            return
        if attr.startswith("__"):
            return  # self.__x: mangled to this very class, cgipool's own
        receiver_name = _dotted(receiver)
        if (receiver_name, attr) in EXEMPT or (None, attr) in EXEMPT:
            return
        if is_mangled_foreign(attr, self.scanner.own_classes):
            self.add(node, "mangled", attr)
        elif attr in self.inherited and self._is_self(receiver):
            self.add(node, "attribute", attr)
        elif attr not in self.scanner.own:
            self.add(node, "attribute", attr)

    def _is_self(self, receiver: ast.expr) -> bool:
        if isinstance(receiver, ast.Name):
            return receiver.id == self.me or receiver.id == "cls"
        return (isinstance(receiver, ast.Call) and isinstance(receiver.func, ast.Name)
                and receiver.func.id == "super")


def _twisted_private_module(dotted: str) -> bool:
    parts = dotted.split(".")
    return parts[0] == "twisted" and any(is_private(p) for p in parts[1:])


def _looks_like_reactor(receiver: ast.expr) -> bool:
    name = receiver.id if isinstance(receiver, ast.Name) else (
        receiver.attr if isinstance(receiver, ast.Attribute) else "")
    return name.lstrip("_").lower().endswith("reactor")


# --- the tree, the report, the baseline --------------------------------------------

def read_tree(root: Path = ROOT, package: str = PACKAGE) -> dict[str, str]:
    """Every .py under ``root/package`` as {relative posix path: source}."""
    return {p.relative_to(root).as_posix(): p.read_text("utf-8")
            for p in sorted((root / package).rglob("*.py"))}


def scan(sources: Mapping[str, str], twisted: TwistedIndex | None) -> list[Use]:
    """The uses of Twisted private names in ``sources`` ({path: text})."""
    return Scanner(sources, twisted).scan()


def counts(uses: Iterable[Use]) -> dict[str, int]:
    """Uses per file, files sorted."""
    out: dict[str, int] = {}
    for use in uses:
        out[use.path] = out.get(use.path, 0) + 1
    return dict(sorted(out.items()))


def by_kind(uses: Iterable[Use]) -> dict[str, dict[str, int]]:
    """{path: {kind: n}}."""
    out: dict[str, dict[str, int]] = {}
    for use in uses:
        kinds = out.setdefault(use.path, {})
        kinds[use.kind] = kinds.get(use.kind, 0) + 1
    return dict(sorted(out.items()))


def report(uses: Sequence[Use]) -> str:
    """One line per use, then a table of uses per file and kind."""
    lines = [str(u) for u in uses]
    table = by_kind(uses)
    kinds = [k for k in KINDS if any(k in v for v in table.values())]
    width = max([len(p) for p in table] + [5])
    lines.append("")
    lines.append(f"{'file':<{width}}  {'uses':>4}  " + "  ".join(kinds))
    for path, per in table.items():
        cells = "  ".join(f"{per.get(k, 0):>{len(k)}}" for k in kinds)
        lines.append(f"{path:<{width}}  {sum(per.values()):>4}  {cells}")
    total = {k: sum(v.get(k, 0) for v in table.values()) for k in kinds}
    cells = "  ".join(f"{total[k]:>{len(k)}}" for k in kinds)
    lines.append(f"{'total':<{width}}  {len(uses):>4}  {cells}")
    lines.append(f"{len(uses)} uses of Twisted private names in {len(table)} files, "
                 f"on {len({(u.path, u.line) for u in uses})} lines")
    return "\n".join(lines)


def load_baseline(path: Path = BASELINE) -> dict[str, int]:
    """The committed counts per file ({} when there is no baseline yet)."""
    if not path.exists():
        return {}
    data = json.loads(path.read_text("utf-8"))
    return {str(k): int(v) for k, v in data["counts"].items()}


def write_baseline(current: Mapping[str, int], path: Path = BASELINE) -> None:
    data = {
        "about": "Uses of Twisted private names per file of cgipool/, the most CI allows "
                 "(scripts/twisted_private_names.py). Lower it with --update-baseline; "
                 "issue 15's goal is at most three, each in docs/ARCHITECTURE.md.",
        "total": sum(current.values()),
        "counts": dict(sorted(current.items())),
    }
    path.write_text(json.dumps(data, indent=2) + "\n", "utf-8")


def check(current: Mapping[str, int], baseline: Mapping[str, int]) -> list[str]:
    """One message per file with more uses than its baseline allows."""
    return [f"{path}: {n} uses, baseline {baseline.get(path, 0)}: a new use of a Twisted "
            "private name — use the public surface or document it in docs/ARCHITECTURE.md"
            for path, n in sorted(current.items()) if n > baseline.get(path, 0)]


def lowered(current: Mapping[str, int], baseline: Mapping[str, int]) -> list[str]:
    """Files now below their baseline: the ratchet can tighten."""
    return [f"{path}: {current.get(path, 0)} uses, baseline {n}"
            for path, n in sorted(baseline.items()) if current.get(path, 0) < n]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="List Twisted private names used in cgipool/ and check them against "
                    "the committed baseline (the count may only go down).")
    parser.add_argument("--root", type=Path, default=ROOT, help="the project folder")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="default: scripts/twisted_private_names.baseline under --root")
    parser.add_argument("--twisted", type=Path, default=None,
                        help="Twisted's package folder (default: the one find_spec sees)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--update-baseline", action="store_true",
                        help="write the current counts as the baseline (lower only)")
    parser.add_argument("--allow-increase", action="store_true",
                        help="with --update-baseline: also raise counts")
    args = parser.parse_args(argv)
    baseline_path = args.baseline or args.root / "scripts" / "twisted_private_names.baseline"

    twisted = TwistedIndex.installed(args.twisted)
    if twisted is None:
        # Without it the count is a different one than the baseline's: refuse.
        print("twisted_private_names: no Twisted source found: run it with the venv's "
              "python (make private-names) or name the package with --twisted",
              file=sys.stderr)
        return 2
    uses = scan(read_tree(args.root), twisted)
    current = counts(uses)
    baseline = load_baseline(baseline_path)

    if args.update_baseline:
        raised = check(current, baseline) if baseline_path.exists() else []
        if raised and not args.allow_increase:
            print("\n".join(raised), file=sys.stderr)
            print("twisted_private_names: the baseline only goes down (--allow-increase "
                  "to raise it on purpose)", file=sys.stderr)
            return 1
        write_baseline(current, baseline_path)
        print(f"twisted_private_names: baseline written: {sum(current.values())} uses "
              f"in {len(current)} files ({baseline_path})")
        return 0

    problems = check(current, baseline)
    if args.json:
        print(json.dumps({"uses": [asdict(u) for u in uses], "counts": current,
                          "by_kind": by_kind(uses), "total": len(uses),
                          "baseline": baseline, "over_baseline": problems}, indent=2))
    else:
        print(report(uses))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    for line in lowered(current, baseline):
        print(f"below baseline: {line} — run `make private-names ARGS=--update-baseline` "
              "to lock it in", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
