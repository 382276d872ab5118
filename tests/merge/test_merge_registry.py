"""How merge methods register: each method module registers itself, the registry's module
imports no method, ``import sparsemerge.merge`` fills the registry, and merge/ and train/
have no import cycle (module- and function-level imports alike)."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import sparsemerge

SRC = Path(sparsemerge.__file__).resolve().parent.parent
GTA_NAMES = ["task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear"]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (SRC / rel).with_suffix(".py").is_file() or (SRC / rel / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """Modules of the project imported anywhere in ``path``; ``from pkg import sub`` counts as
    ``pkg.sub`` when ``sub`` is a module (Python imports the package's __init__ too, but a
    package's own submodules always do that, so it is no cycle worth flagging)."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            subs = [f"{mod}.{a.name}" for a in node.names if _is_module(f"{mod}.{a.name}")]
            found.update(subs or [mod])
    return {m for m in found if m.startswith("sparsemerge") and _is_module(m)}


def test_registry_module_imports_no_method():
    from sparsemerge.merge import base

    imported = _imports(Path(base.__file__))
    assert not [m for m in imported if m.startswith("sparsemerge.merge.methods") or m == "sparsemerge.merge"], imported


def test_importing_the_package_fills_the_registry():
    code = "from sparsemerge.merge.base import MERGE_METHODS; print(' '.join(MERGE_METHODS.names()))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(SRC)}).stdout.split()
    assert set(GTA_NAMES) | {"linear", "model_soup", "slerp", "model_stock", "orthogonal", "passthrough"} == set(out)


def test_gta_variants_are_rows_of_one_table():
    from sparsemerge.merge import get_method
    from sparsemerge.merge.methods.gta import GTA_VARIANTS, GTAVariant

    assert [v.name for v in GTA_VARIANTS] == GTA_NAMES
    for v in GTA_VARIANTS:
        spec = get_method(v.name)
        assert isinstance(spec.fn, GTAVariant) and spec.fn is v
        assert spec.stochastic == (v.name.startswith(("dare", "della")))
        assert spec.global_params["normalize"] == (v.name in ("ties", "della"))  # mergekit's defaults
        assert spec.global_params["rescale"] == (v.name.startswith(("dare", "della")))


def test_no_import_cycle_in_merge_and_train():
    roots = [SRC / "sparsemerge" / "merge", SRC / "sparsemerge" / "train"]
    graph = {_module_name(p): _imports(p) for r in roots for p in sorted(r.rglob("*.py"))}
    inside = set(graph)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node] & inside):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
