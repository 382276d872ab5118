"""registry.Registry: unknown names list the known ones; ``discover`` imports every module of
a package on first lookup, so a member is one module that registers itself."""
from __future__ import annotations

import sys
import threading

import pytest

from sparsemerge.errors import SparsemergeError
from sparsemerge.registry import Registry

PLUGIN = """
from {holder} import REG

@REG.register("{name}")
def {name}():
    return "{name}"
"""


def _package(tmp_path, monkeypatch, pkg: str, modules: dict[str, str]) -> Registry:
    holder = f"{pkg}_holder"
    (tmp_path / f"{holder}.py").write_text(f"from sparsemerge.registry import Registry\nREG = Registry('plugin', discover={pkg!r})\n")
    (tmp_path / pkg).mkdir()
    (tmp_path / pkg / "__init__.py").write_text("")
    for name, text in modules.items():
        (tmp_path / pkg / f"{name}.py").write_text(text.format(holder=holder, name=name))
    monkeypatch.syspath_prepend(str(tmp_path))
    for mod in [m for m in sys.modules if m == holder or m.startswith(pkg)]:
        monkeypatch.delitem(sys.modules, mod)
    return __import__(holder).REG


def test_discover_imports_every_module_on_first_lookup(tmp_path, monkeypatch):
    reg = _package(tmp_path, monkeypatch, "plugins_ok", {"alpha": PLUGIN, "beta": PLUGIN, "helper": "X = 1\n"})
    assert "plugins_ok.alpha" not in sys.modules  # nothing imported before a lookup
    assert reg.names() == ["alpha", "beta"]
    assert reg.get("BETA")() == "beta" and "alpha" in reg and list(reg) == ["alpha", "beta"]
    with pytest.raises(SparsemergeError, match="unknown plugin 'gamma'; known plugins: alpha, beta"):
        reg.get("gamma")


def test_discover_waits_for_other_threads(tmp_path, monkeypatch):
    slow = PLUGIN + "import time\ntime.sleep(0.3)\n"
    reg = _package(tmp_path, monkeypatch, "plugins_slow", {"alpha": PLUGIN, "zeta": slow})
    seen = []
    threads = [threading.Thread(target=lambda: seen.append(reg.names())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [["alpha", "zeta"]] * 3  # no thread saw the registry half-loaded


def test_a_broken_module_fails_every_lookup(tmp_path, monkeypatch):
    reg = _package(tmp_path, monkeypatch, "plugins_bad", {"alpha": PLUGIN, "broken": "raise ImportError('no numpy here')\n"})
    for _ in range(2):
        with pytest.raises(ImportError, match="no numpy here"):
            reg.names()


def test_registering_a_second_object_under_a_name_fails():
    reg: Registry = Registry("thing")
    reg.register("a")(int)
    reg.register("A")(int)  # the same object again is fine
    with pytest.raises(RuntimeError, match="registered twice"):
        reg.register("a")(str)
