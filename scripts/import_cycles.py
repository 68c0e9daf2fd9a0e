#!/usr/bin/env python3
"""The package-level import graph of cgipool/ and its cycles; CI runs it as a ratchet.

Issue 15 (item 4) wants no package-level import cycle.  Until then this script keeps
new ones out: CI fails when the cycles among cgipool's packages are not a subset of
``scripts/import_cycles.baseline``, and ``--update-baseline`` only ever removes
cycles from it (``--allow-new`` to add one, deliberately).  So cycles only go away.

The nodes are cgipool's packages (``cgipool.admin``, ``cgipool.proxy``,
``cgipool.supervisor``) and its top-level modules, each a node
of its own (``cgipool.config``, ``cgipool.cgi``, ``cgipool.tap`` …); ``cgipool``
itself (its ``__init__``) is one too.  An edge A → B is every ``import`` or ``from
… import`` in a module of A that names a module (or a name) of B, A ≠ B; each edge
keeps the lines that make it (``cgipool/cgi.py:57 imports cgipool.proxy.forward``).

Imports at module level (also in a class body, ``try:`` or ``if``) run when the
module is imported: they make the cycles.  Imports inside a function (and under
``if TYPE_CHECKING:``) run later or never: they are reported separately as
*deferred* edges, and not counted — though one that closes a cycle of the graph
with them is marked, since it is the same knot tied later.

A cycle is an elementary cycle of the module-level graph (found inside the
strongly connected components, Tarjan), written from its smallest package:
``["cgipool.cgi", "cgipool.proxy", "cgipool.supervisor"]`` is cgi → proxy →
supervisor → cgi.  A new edge inside a known component that makes a new cycle
fails too.

Standard library only (``ast``, ``argparse``, ``json``, ``pathlib``); not part of
the cgipool package; reads the source, never imports it.  ``make import-cycles``
runs it; exit 0: every cycle is in the baseline, 1: a new one.
"""
from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "cgipool"
BASELINE = ROOT / "scripts" / "import_cycles.baseline"

# More elementary cycles than this and the listing stops being useful (and the
# enumeration exponential): refuse instead of hanging.
MAX_CYCLES = 5000

Cycle = tuple[str, ...]


@dataclass(frozen=True, order=True)
class Site:
    """One import statement's contribution to an edge."""
    path: str
    line: int
    source: str  # the importing module
    target: str  # the cgipool module (or package) it names
    deferred: bool  # inside a function / under TYPE_CHECKING
    where: str  # the function it is in ("" at module level)

    def __str__(self) -> str:
        text = f"{self.path}:{self.line} imports {self.target}"
        if self.deferred:
            text += f" (in {self.where})" if self.where else " (deferred)"
        return text


# --- reading the tree ---------------------------------------------------------------

def module_name(path: str) -> tuple[str, bool]:
    """``cgipool/proxy/edge.py`` -> (``cgipool.proxy.edge``, is a package)."""
    parts = list(Path(path).with_suffix("").parts)
    is_pkg = parts[-1] == "__init__"
    if is_pkg:
        parts.pop()
    return ".".join(parts), is_pkg


def node_of(module: str) -> str:
    """The package-level node of a module: ``cgipool.proxy.edge`` -> ``cgipool.proxy``,
    ``cgipool.config`` -> itself, ``cgipool`` -> itself."""
    return ".".join(module.split(".")[:2])


def read_tree(root: Path = ROOT, package: str = PACKAGE) -> dict[str, str]:
    """Every .py under ``root/package`` as {relative posix path: source}."""
    return {p.relative_to(root).as_posix(): p.read_text("utf-8")
            for p in sorted((root / package).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


class _Imports(ast.NodeVisitor):
    """The cgipool imports of one module, with whether each is deferred."""

    def __init__(self, path: str, name: str, is_pkg: bool, modules: set[str],
                 package: str) -> None:
        self.path = path
        self.name = name
        self.package_of = name if is_pkg else name.rpartition(".")[0]
        self.modules = modules
        self.top = package
        self.scope: list[tuple[str, bool]] = []  # (class or function name, is a function)
        self.type_checking = 0
        self.sites: list[Site] = []

    def _add(self, node: ast.stmt, target: str) -> None:
        if target != self.top and not target.startswith(self.top + "."):
            return
        in_function = any(is_function for _, is_function in self.scope)
        deferred = in_function or self.type_checking > 0
        where = ".".join(name for name, _ in self.scope) if in_function else (
            "if TYPE_CHECKING" if self.type_checking else "")
        self.sites.append(Site(self.path, node.lineno, self.name, target, deferred, where))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(node, alias.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            parts = self.package_of.split(".")
            base = ".".join(parts[: len(parts) - node.level + 1])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            # from cgipool import config: the module; from cgipool.cgi import X: cgi.
            self._add(node, sub if sub in self.modules else source)

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        # Decorators and defaults run at definition time: module level.
        for expr in [*node.decorator_list, *node.args.defaults, *node.args.kw_defaults]:
            if expr is not None:
                self.visit(expr)
        self.scope.append((node.name, True))
        for stmt in node.body:
            self.visit(stmt)
        self.scope.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        # The body runs at definition time; only the methods' bodies are deferred.
        for expr in [*node.decorator_list, *node.bases, *[k.value for k in node.keywords]]:
            self.visit(expr)
        self.scope.append((node.name, False))
        for stmt in node.body:
            self.visit(stmt)
        self.scope.pop()

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            self.type_checking += 1
            for stmt in node.body:
                self.visit(stmt)
            self.type_checking -= 1
            for stmt in node.orelse:
                self.visit(stmt)
        else:
            self.generic_visit(node)


def import_sites(sources: Mapping[str, str], package: str = PACKAGE) -> list[Site]:
    """Every import of a cgipool module in ``sources`` ({path: text})."""
    names = {path: module_name(path) for path in sources}
    modules = {name for name, _ in names.values()}
    sites: list[Site] = []
    for path, text in sorted(sources.items()):
        name, is_pkg = names[path]
        visitor = _Imports(path, name, is_pkg, modules, package)
        visitor.visit(ast.parse(text, filename=path))
        sites.extend(visitor.sites)
    # One per line and target: `from cgipool.proxy.forward import a, b` is one site.
    return sorted(set(sites))


# --- the graph ----------------------------------------------------------------------

class Graph:
    """Package-level edges, each with the import lines that make it; module-level
    (``eager``) and function-level (``deferred``) kept apart."""

    def __init__(self, sites: Iterable[Site], nodes: Iterable[str] = ()) -> None:
        self.nodes: set[str] = set(nodes)
        self.eager: dict[tuple[str, str], list[Site]] = {}
        self.deferred: dict[tuple[str, str], list[Site]] = {}
        for site in sites:
            a, b = node_of(site.source), node_of(site.target)
            self.nodes |= {a, b}
            if a == b:
                continue
            (self.deferred if site.deferred else self.eager).setdefault((a, b), []).append(site)
        # An edge both eager and deferred is eager: the deferred lines add nothing
        # at import time, but they stay listed with it.
        for edge in list(self.deferred):
            if edge in self.eager:
                self.eager[edge].extend(self.deferred.pop(edge))

    @classmethod
    def of_tree(cls, sources: Mapping[str, str], package: str = PACKAGE) -> "Graph":
        nodes = {node_of(module_name(p)[0]) for p in sources}
        return cls(import_sites(sources, package), nodes)

    def successors(self, edges: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {n: [] for n in sorted(self.nodes)}
        for a, b in sorted(edges):
            out[a].append(b)
        return out

    def eager_successors(self) -> dict[str, list[str]]:
        return self.successors(self.eager)

    def all_successors(self) -> dict[str, list[str]]:
        return self.successors([*self.eager, *self.deferred])


def tarjan(succ: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Strongly connected components (Tarjan, iterative), each sorted; only those
    with a cycle (more than one node, or a self-loop); sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(succ):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(succ.get(root, ())))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(succ.get(child, ()))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1 or node in succ.get(node, ()):
                        components.append(sorted(component))
    return sorted(components)


def canonical(cycle: Sequence[str]) -> Cycle:
    """A cycle rotated to start at its smallest node (direction kept)."""
    i = min(range(len(cycle)), key=lambda k: cycle[k])
    return tuple(cycle[i:]) + tuple(cycle[:i])


def cycles(succ: Mapping[str, Sequence[str]], limit: int = MAX_CYCLES) -> list[Cycle]:
    """Every elementary cycle, canonical and sorted.  Inside each strongly connected
    component, a depth-first search from each node over the nodes after it."""
    found: list[Cycle] = []
    for component in tarjan(succ):
        members = set(component)
        for start in component:
            allowed = {n for n in members if n >= start}
            path = [start]
            on_path = {start}
            work = [iter([n for n in succ[start] if n in allowed])]
            while work:
                for child in work[-1]:
                    if child == start:
                        found.append(tuple(path))
                        if len(found) > limit:
                            raise RuntimeError(f"more than {limit} package import cycles")
                    elif child not in on_path:
                        path.append(child)
                        on_path.add(child)
                        work.append(iter([n for n in succ[child] if n in allowed]))
                        break
                else:
                    work.pop()
                    on_path.discard(path.pop())
    return sorted(canonical(c) for c in found)


def arrow(cycle: Sequence[str]) -> str:
    return " → ".join([*cycle, cycle[0]])


def edges_of(cycle: Sequence[str]) -> list[tuple[str, str]]:
    return [(cycle[i], cycle[(i + 1) % len(cycle)]) for i in range(len(cycle))]


def describe(cycle: Sequence[str], graph: Graph, indent: str = "  ") -> list[str]:
    """The cycle and, per edge, the import lines that make it."""
    lines = [arrow(cycle)]
    for a, b in edges_of(cycle):
        lines.append(f"{indent}{a} → {b}:")
        lines += [f"{indent}  {site}" for site in graph.eager.get((a, b), [])]
    return lines


def closing_deferred(graph: Graph) -> set[tuple[str, str]]:
    """Deferred edges A → B where B reaches A: they would close a cycle if they ran
    at import time."""
    succ = graph.all_successors()
    closing: set[tuple[str, str]] = set()
    for a, b in graph.deferred:
        seen, todo = {b}, [b]
        while todo:
            node = todo.pop()
            if node == a:
                closing.add((a, b))
                break
            for nxt in succ[node]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
    return closing


def report(graph: Graph, found: Sequence[Cycle]) -> str:
    lines: list[str] = []
    components = tarjan(graph.eager_successors())
    if found:
        lines.append(f"package import cycles (module-level imports): {len(found)}")
        for n, cycle in enumerate(found, 1):
            text = describe(cycle, graph, indent="    ")
            lines.append(f"{n:>3}. {text[0]}")
            lines += text[1:]
        lines.append("")
        lines.append("strongly connected packages: " + "; ".join(
            "{" + ", ".join(c) + "}" for c in components))
    else:
        lines.append("no package import cycle")
    closing = closing_deferred(graph)
    if graph.deferred:
        lines.append("")
        lines.append("deferred edges (imports inside functions; not counted as cycles):")
        for edge, sites in sorted(graph.deferred.items()):
            mark = "  [would close a cycle at module level]" if edge in closing else ""
            lines.append(f"  {edge[0]} → {edge[1]}{mark}")
            lines += [f"    {site}" for site in sites]
    lines.append("")
    lines.append(f"{len(found)} package import cycles in {len(components)} strongly "
                 f"connected groups; {len(graph.nodes)} packages, {len(graph.eager)} "
                 f"module-level edges, {len(graph.deferred)} deferred edges "
                 f"({len(closing)} closing a cycle)")
    return "\n".join(lines)


# --- the baseline -------------------------------------------------------------------

def load_baseline(path: Path = BASELINE) -> list[Cycle]:
    """The committed cycles ([] when there is no baseline yet), canonical."""
    if not path.exists():
        return []
    return sorted(canonical(list(map(str, c))) for c in json.loads(path.read_text("utf-8")))


def write_baseline(current: Iterable[Cycle], path: Path = BASELINE) -> None:
    data = [list(c) for c in sorted(set(current))]
    text = "[\n" + ",\n".join("  " + json.dumps(c) for c in data) + "\n]\n" if data else "[]\n"
    path.write_text(text, "utf-8")


def new_cycles(current: Iterable[Cycle], baseline: Iterable[Cycle]) -> list[Cycle]:
    """Cycles not in the baseline: what makes CI fail."""
    known = {canonical(c) for c in baseline}
    return sorted({canonical(c) for c in current} - known)


def gone_cycles(current: Iterable[Cycle], baseline: Iterable[Cycle]) -> list[Cycle]:
    """Baseline cycles no longer there: the ratchet can tighten."""
    now = {canonical(c) for c in current}
    return sorted({canonical(c) for c in baseline} - now)


def problems(graph: Graph, added: Sequence[Cycle]) -> str:
    """The message naming each new cycle and the edges that make it."""
    lines: list[str] = []
    for cycle in added:
        text = describe(cycle, graph)
        lines.append(f"import_cycles: new package import cycle: {text[0]}")
        lines += text[1:]
    lines.append("import_cycles: break an edge of it (move what both need into a package "
                 "below them, or pass it in), or, deliberately, run make import-cycles "
                 "ARGS='--update-baseline --allow-new' and say why in docs/ARCHITECTURE.md "
                 "(\"Package import cycles\")")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Show the package-level import cycles of cgipool/ and check them "
                    "against the committed baseline (cycles may only go away).")
    parser.add_argument("--root", type=Path, default=ROOT, help="the project folder")
    parser.add_argument("--baseline", type=Path, default=None,
                        help="default: scripts/import_cycles.baseline under --root")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--update-baseline", action="store_true",
                        help="write the current cycles as the baseline (removes only)")
    parser.add_argument("--allow-new", action="store_true",
                        help="with --update-baseline: also add new cycles")
    args = parser.parse_args(argv)
    baseline_path = args.baseline or args.root / "scripts" / "import_cycles.baseline"

    graph = Graph.of_tree(read_tree(args.root))
    found = cycles(graph.eager_successors())
    baseline = load_baseline(baseline_path)
    added = new_cycles(found, baseline)

    if args.update_baseline:
        # The first baseline records what is there; after that it only loses cycles.
        if added and baseline_path.exists() and not args.allow_new:
            print(problems(graph, added), file=sys.stderr)
            print("import_cycles: the baseline only loses cycles (--allow-new to add "
                  "one on purpose)", file=sys.stderr)
            return 1
        write_baseline(found, baseline_path)
        print(f"import_cycles: baseline written: {len(found)} package import cycles "
              f"({baseline_path})")
        return 0

    if args.json:
        def edges(table: Mapping[tuple[str, str], list[Site]]) -> list[dict[str, object]]:
            return [{"from": a, "to": b, "imports": [asdict(s) for s in sites]}
                    for (a, b), sites in sorted(table.items())]
        print(json.dumps({
            "packages": sorted(graph.nodes),
            "edges": edges(graph.eager),
            "deferred_edges": edges(graph.deferred),
            "components": tarjan(graph.eager_successors()),
            "cycles": [list(c) for c in found],
            "baseline": [list(c) for c in baseline],
            "new_cycles": [list(c) for c in added],
        }, indent=2))
    else:
        print(report(graph, found))
    if added:
        print(problems(graph, added), file=sys.stderr)
        return 1
    for cycle in gone_cycles(found, baseline):
        print(f"gone from the tree: {arrow(cycle)} — run `make import-cycles "
              "ARGS=--update-baseline` to lock it in", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
