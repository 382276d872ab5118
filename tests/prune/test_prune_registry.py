"""``sparsemerge.prune.METHODS`` is complete as soon as the package is imported (it used to be
empty until ``sparsemerge.prune.api`` was imported)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sparsemerge

SRC = str(Path(sparsemerge.__file__).resolve().parents[1])


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter (nothing imported yet) and return the JSON it prints."""
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_methods_registered_on_package_import() -> None:
    got = _fresh(
        "import json, sys, sparsemerge.prune as p; "
        "print(json.dumps({'names': p.METHODS.names(), 'api': 'sparsemerge.prune.api' in sys.modules}))"
    )
    assert {"magnitude", "gradient", "taylor", "wanda", "sparsegpt"} <= set(got["names"])
    assert got["api"] is False  # filled by the package itself, not as a side effect of prune_


def test_methods_registered_when_a_submodule_is_imported_first() -> None:
    got = _fresh("import json; from sparsemerge.prune.base import METHODS; print(json.dumps({'names': METHODS.names()}))")
    assert {"magnitude", "gradient", "taylor", "wanda", "sparsegpt"} <= set(got["names"])
