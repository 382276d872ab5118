"""The merge-quality benchmark's recipes are valid configs that the engine runs, for every registered method."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from conftest import make_tiny_llama
from layout_reference import hand_perplexity
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
    base_state = _state(tmp_path / "base")
    spec_states = [_state(p) for p in specialists]
    for method in methods[:-1]:
        config = recipe(method, tmp_path / "base", specialists, 0.5, 0.5, layers=2)
        report = run_merge(config, tmp_path / "out" / method)
        assert report.files, method
        merged = _state(tmp_path / "out" / method)
        # every recipe keeps the architecture: same tensors, shapes and dtypes as the base, all finite
        assert {k: (v.shape, v.dtype) for k, v in merged.items()} == {k: (v.shape, v.dtype) for k, v in base_state.items()}, method
        assert all(torch.isfinite(v).all() for v in merged.values()), method
        # the recipes whose result is known by hand: linear (weights 1, normalized) and model_soup
        # are the mean; task_arithmetic with weight 0.5 is base + 0.5 * sum(specialist - base)
        for key, value in merged.items():
            if method in ("linear", "model_soup"):
                want = sum(s[key] for s in spec_states) / len(spec_states)
            elif method == "task_arithmetic":
                want = base_state[key] + sum(0.5 * (s[key] - base_state[key]) for s in spec_states)
            else:
                break
            assert torch.allclose(value, want, atol=1e-6), (method, key)
    ties = recipe("ties", tmp_path / "base", specialists, 0.5, 0.5, layers=2)
    assert ties["models"][0]["parameters"] == {"weight": 0.5, "density": 0.5}
    assert recipe("task_arithmetic", tmp_path / "base", specialists, 0.5, 0.5, layers=2)["models"][0]["parameters"] == {"weight": 0.5}
    val = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    ppl, chosen = run_greedy_soup(tmp_path / "base", specialists, val, {"x": val})
    # an independent greedy soup (Wortsman et al. 2022): specialists by validation perplexity,
    # each added to the uniform average if that does not raise it; perplexity by a hand-written loop
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()

    def score(state):
        model.load_state_dict(state, strict=False)
        return hand_perplexity(model, val)

    individual = [score(s) for s in spec_states]
    order = sorted(range(3), key=lambda i: individual[i])
    want_chosen, best = [order[0]], individual[order[0]]
    for i in order[1:]:
        trial = score({k: sum(spec_states[j][k] for j in want_chosen + [i]) / (len(want_chosen) + 1) for k in base_state})
        if trial <= best:
            want_chosen, best = want_chosen + [i], trial
    assert chosen == want_chosen
    # the test windows are the validation windows here, so the soup's test perplexity is its best score
    assert ppl["x"] == pytest.approx(best, rel=1e-5) and ppl["mean"] == pytest.approx(best, rel=1e-5)
    assert best <= min(individual)


def _state(folder):
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}

