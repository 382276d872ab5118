"""Import hygiene of the sparsemerge package (issue 11, item 6).

Every module of the package is found with ``pkgutil.walk_packages`` and its import statements
are read with ``ast`` (nothing is executed). An import names the most specific sparsemerge
module it loads: ``from sparsemerge.prune import api`` -> ``sparsemerge.prune.api``,
``from sparsemerge.prune.base import METHODS`` -> ``sparsemerge.prune.base``,
``from sparsemerge.prune import METHODS`` -> ``sparsemerge.prune``; relative imports and
``importlib.import_module("literal")`` calls count too. Parent packages that Python runs on
the way are not edges (a package ``__init__`` importing its own submodules is no cycle).

Checks:

* no cycle among module-level imports (the ones that run at import time; class bodies, ``if``
  and ``try`` blocks included, ``if TYPE_CHECKING:`` blocks excluded);
* no cycle either once imports deferred into functions are counted: a cycle broken only by
  moving one import into a function still ties the modules together (issue 11 lists four);
* no module outside ``sparsemerge.cli`` imports ``sparsemerge.cli`` at any level (the CLI only
  parses, validates and calls the library, never the reverse).
"""
from __future__ import annotations

import ast
import importlib.util
import pkgutil
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import pytest

import sparsemerge

PKG = "sparsemerge"
CLI = "sparsemerge.cli"

# Known cases that are being removed on other branches of issue 11 (the kernels cycle: helper
# "kernels"). The lead empties these after merging them; an entry that no longer matches
# anything fails the test, so stale ones cannot stay.
# Each entry is the (importer, imported) edge, imported inside a function, that closes the cycle.
KNOWN_DEFERRED_CYCLE_EDGES: frozenset[tuple[str, str]] = frozenset()  # none left since the kernels merge
KNOWN_CLI_IMPORTS: frozenset[tuple[str, str]] = frozenset()  # (importer, imported cli module); empty since the cli merge


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    deferred: bool  # inside a function or lambda: runs when called, not at import time
    type_checking: bool  # under ``if TYPE_CHECKING:``: never runs


# ------------------------------------------------------------------------------ parsing
def _absolute(module: str, is_package: bool, level: int, name: Optional[str]) -> str:
    """The absolute module a (possibly relative) ``from`` import names."""
    if level == 0:
        return name or ""
    parts = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(parts) - 1:
        raise ValueError(f"{module}: relative import beyond the top-level package")
    parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([name] if name else []))


def _known(name: str, modules: set[str]) -> Optional[str]:
    """The longest prefix of ``name`` that is a module of the package (None outside it)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(module: str, source: str, is_package: bool, modules: set[str]) -> list[Import]:
    """Every import of a package module in ``source`` (the text of ``module``)."""
    found: list[Import] = []

    def add(target: str, node: ast.AST, deferred: bool, type_checking: bool) -> None:
        known = _known(target, modules)
        if known is not None and known != module:
            found.append(Import(module, known, node.lineno, deferred, type_checking))

    def visit(node: ast.AST, deferred: bool, type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            child_deferred = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    add(alias.name, child, deferred, type_checking)
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(module, is_package, child.level, child.module)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    add(sub if sub in modules else base, child, deferred, type_checking)
            elif (
                isinstance(child, ast.Call)
                and isinstance(child.func, (ast.Attribute, ast.Name))
                and (child.func.attr if isinstance(child.func, ast.Attribute) else child.func.id) == "import_module"
                and child.args
                and isinstance(child.args[0], ast.Constant)
                and isinstance(child.args[0].value, str)
            ):
                add(child.args[0].value, child, deferred, type_checking)
            if isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), child_deferred, True)
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), child_deferred, type_checking)
                continue
            visit(child, child_deferred, type_checking)

    visit(ast.parse(source), False, False)
    return found


def package_modules() -> dict[str, tuple[Path, bool]]:
    """``{module name: (source file, is a package)}`` for the whole sparsemerge package."""
    errors: list[str] = []
    out = {PKG: (Path(sparsemerge.__file__), True)}
    for info in pkgutil.walk_packages(sparsemerge.__path__, PKG + ".", onerror=errors.append):
        spec = importlib.util.find_spec(info.name)
        assert spec is not None and spec.origin, info.name
        out[info.name] = (Path(spec.origin), info.ispkg)
    assert not errors, f"could not import packages {errors}"
    return out


def package_imports() -> list[Import]:
    modules = package_modules()
    names = set(modules)
    found = []
    for name, (path, is_package) in sorted(modules.items()):
        if path.suffix == ".py":
            found += imports_of(name, path.read_text(encoding="utf-8"), is_package, names)
    return found


# ------------------------------------------------------------------------------ graphs
def cycles(edges: Iterable[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:  # recursion depth <= number of modules (~100)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return sorted(out)


def one_cycle(component: list[str], imports: list[Import]) -> str:
    """A concrete cycle through the first module of ``component``, with file lines, for the message."""
    members = set(component)
    by_edge = {(i.importer, i.imported): i for i in imports if i.importer in members and i.imported in members}
    start = component[0]
    parent: dict[str, Optional[str]] = {start: None}
    queue = deque([start])
    while queue:  # shortest path start -> ... -> a module importing start
        v = queue.popleft()
        if (v, start) in by_edge:
            path = [v]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])  # type: ignore[arg-type]
            path = path[::-1] + [start]
            steps = [f"{a} (line {by_edge[(a, b)].line}{', in a function' if by_edge[(a, b)].deferred else ''})" for a, b in zip(path, path[1:])]
            return " -> ".join(steps + [start])
        for a, b in sorted(by_edge):
            if a == v and b not in parent:
                parent[b] = v
                queue.append(b)
    return " <-> ".join(component)


def _cycle_report(imports: list[Import], allowed: frozenset[tuple[str, str]] = frozenset()) -> list[str]:
    edges = {(i.importer, i.imported) for i in imports} - allowed
    return [one_cycle(c, [i for i in imports if (i.importer, i.imported) in edges]) for c in cycles(edges)]


# ------------------------------------------------------------------------------ tests
@pytest.fixture(scope="module")
def all_imports() -> list[Import]:
    return package_imports()


def test_walk_sees_the_whole_package(all_imports: list[Import]) -> None:
    modules = package_modules()
    for name in ("sparsemerge.cli.main", "sparsemerge.prune.api", "sparsemerge.formats.base", "sparsemerge.selection"):
        assert name in modules
    assert len(modules) >= 80
    edges = {(i.importer, i.imported, i.deferred) for i in all_imports}
    assert ("sparsemerge.prune.select", "sparsemerge.selection", False) in edges  # module level
    assert ("sparsemerge.prune.api", "sparsemerge.eval.data", True) in edges  # inside prune_()


def test_no_import_cycles_at_module_level(all_imports: list[Import]) -> None:
    runtime = [i for i in all_imports if not i.deferred and not i.type_checking]
    found = _cycle_report(runtime)
    assert not found, "import cycles among module-level imports:\n  " + "\n  ".join(found)


def test_no_import_cycles_counting_deferred_imports(all_imports: list[Import]) -> None:
    runtime = [i for i in all_imports if not i.type_checking]
    found = _cycle_report(runtime, KNOWN_DEFERRED_CYCLE_EDGES)
    assert not found, (
        "import cycles (counting imports inside functions; moving an import into a function hides a cycle, "
        "it does not remove it):\n  " + "\n  ".join(found)
    )
    components = cycles({(i.importer, i.imported) for i in runtime})
    in_cycle = {(a, b) for a, b in KNOWN_DEFERRED_CYCLE_EDGES if any(a in c and b in c for c in components)}
    stale = sorted(KNOWN_DEFERRED_CYCLE_EDGES - in_cycle)
    assert not stale, f"these known cycles are gone: remove them from KNOWN_DEFERRED_CYCLE_EDGES: {stale}"


def test_nothing_outside_cli_imports_cli(all_imports: list[Import]) -> None:
    def in_cli(name: str) -> bool:
        return name == CLI or name.startswith(CLI + ".")

    bad = {(i.importer, i.imported): i.line for i in all_imports if in_cli(i.imported) and not in_cli(i.importer)}
    new = sorted(f"{a} line {line} imports {b}" for (a, b), line in bad.items() if (a, b) not in KNOWN_CLI_IMPORTS)
    assert not new, "library modules must not import the CLI (move the shared code out of cli/):\n  " + "\n  ".join(new)
    stale = sorted(KNOWN_CLI_IMPORTS - set(bad))
    assert not stale, f"these cli imports are gone: remove them from KNOWN_CLI_IMPORTS: {stale}"


# -------------------------------------------------------- the checker itself, on hand-made input
MODULES = {"pkg", "pkg.a", "pkg.b", "pkg.sub", "pkg.sub.c", "pkg.sub.d", "pkg.cli", "pkg.cli.run"}
SOURCE = '''
from typing import TYPE_CHECKING
import os
import pkg.b
from pkg import a, cli
from . import d
from .d import thing
from .. import a as a2, b
import importlib
if TYPE_CHECKING:
    from pkg.cli import run
try:
    from pkg.sub.c import other
except ImportError:
    pass
class K:
    from pkg.a import x
def f():
    from ..cli.run import main
    importlib.import_module("pkg.cli.run")
g = lambda: __import__("os")
'''


def test_imports_of_reads_every_form() -> None:
    got = {(i.imported, i.line, i.deferred, i.type_checking) for i in imports_of("pkg.sub.c", SOURCE, False, MODULES)}
    assert got == {
        ("pkg.b", 4, False, False),
        ("pkg.a", 5, False, False),
        ("pkg.cli", 5, False, False),
        ("pkg.sub.d", 6, False, False),  # "." in module pkg.sub.c is pkg.sub
        ("pkg.sub.d", 7, False, False),
        ("pkg.a", 8, False, False),
        ("pkg.b", 8, False, False),
        ("pkg.cli.run", 11, False, True),  # TYPE_CHECKING only
        # line 13 imports pkg.sub.c itself: not an edge
        ("pkg.a", 17, False, False),  # class bodies run at import time
        ("pkg.cli.run", 19, True, False),  # inside f()
        ("pkg.cli.run", 20, True, False),  # importlib.import_module with a literal name
    }
    # in a package __init__, "." is the package itself
    pkg_init = {i.imported for i in imports_of("pkg.sub", "from . import c\nfrom .. import b\n", True, MODULES)}
    assert pkg_init == {"pkg.sub.c", "pkg.b"}


def test_cycles_and_the_cycle_message() -> None:
    edges = [("a", "b"), ("b", "c"), ("c", "a"), ("c", "d"), ("d", "e"), ("e", "d"), ("x", "a")]
    assert cycles(edges) == [["a", "b", "c"], ["d", "e"]]
    assert cycles([("a", "b"), ("b", "c")]) == []
    imports = [Import(a, b, n, b == "a", False) for n, (a, b) in enumerate(edges, 1)]
    assert _cycle_report(imports) == ["a (line 1) -> b (line 2) -> c (line 3, in a function) -> a", "d (line 5) -> e (line 6) -> d"]
    assert _cycle_report(imports, frozenset({("c", "a")})) == ["d (line 5) -> e (line 6) -> d"]
