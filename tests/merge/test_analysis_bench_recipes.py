"""The merge-quality benchmark's recipes are valid configs that the engine runs, for every registered method."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from conftest import make_tiny_llama
from sparsemerge.merge import list_methods, run_merge

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from bench_merge_quality import default_methods, recipe, run_greedy_soup  # noqa: E402


def test_every_method_recipe_runs_on_tiny_models(tmp_path):
    make_tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    specialists = []
    for i in range(3):
        model = make_tiny_llama(seed=0)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        model.save_pretrained(tmp_path / f"s{i}")
        specialists.append(tmp_path / f"s{i}")
    methods = default_methods()
    assert set(list_methods()) <= set(methods) and methods[-1] == "greedy_soup"
    for method in methods[:-1]:
        config = recipe(method, tmp_path / "base", specialists, 0.5, 0.5, layers=2)
        report = run_merge(config, tmp_path / "out" / method)
        assert report.files, method
    ties = recipe("ties", tmp_path / "base", specialists, 0.5, 0.5, layers=2)
    assert ties["models"][0]["parameters"] == {"weight": 0.5, "density": 0.5}
    assert recipe("task_arithmetic", tmp_path / "base", specialists, 0.5, 0.5, layers=2)["models"][0]["parameters"] == {"weight": 0.5}
    val = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    ppl, chosen = run_greedy_soup(tmp_path / "base", specialists, val, {"x": val})
    assert chosen and ppl["x"] > 1
