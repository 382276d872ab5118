"""Task-vector statistics: hand-worked cases, streamed statistics on tiny models, the tv-stats CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama
from sparsemerge.cli.main import main
from sparsemerge.errors import SparsemergeError
from sparsemerge.merge.analysis import (
    PairStats,
    cosine_similarity,
    layer_type,
    multi_sign_conflicts,
    pair_stats,
    sign_conflict_rate,
    task_vector_stats,
)


def test_pair_stats_hand_worked():
    a = torch.tensor([1.0, -2.0, 0.0, 3.0])
    b = torch.tensor([2.0, 1.0, 5.0, -1.0])
    s = pair_stats(a, b)
    assert s.dot == pytest.approx(-3.0)
    assert s.cosine == pytest.approx(-3.0 / math.sqrt(14 * 31))
    # both nonzero at 0, 1, 3; opposite signs at 1 and 3
    assert (s.both_nonzero, s.conflicts) == (3, 2)
    assert s.conflict_rate == pytest.approx(2 / 3) and s.overlap == pytest.approx(3 / 4)
    assert cosine_similarity(a, a) == pytest.approx(1.0) and cosine_similarity(a, -a) == pytest.approx(-1.0)
    assert sign_conflict_rate(a, -a) == 1.0 and sign_conflict_rate(a, 2 * a) == 0.0
    total = PairStats()
    total += s
    total += pair_stats(a, a)
    assert total.numel == 8 and total.both_nonzero == 6 and total.conflicts == 2
    assert math.isnan(pair_stats(torch.zeros(3), a[:3]).cosine)
    with pytest.raises(SparsemergeError, match="shape"):
        pair_stats(a, b[:3])


def test_multi_sign_conflicts_hand_worked():
    taus = [torch.tensor([1.0, 1.0, 0.0, -1.0, 0.0]), torch.tensor([2.0, -1.0, 3.0, -2.0, 0.0]), torch.tensor([0.0, 0.0, -1.0, -1.0, 4.0])]
    # contested (>= 2 nonzero): positions 0, 1, 2, 3; conflicting: 1 (+,-) and 2 (+,-)
    assert multi_sign_conflicts(taus) == (2, 4)


def test_layer_type():
    assert layer_type("model.layers.3.self_attn.q_proj.weight") == "q_proj"
    assert layer_type("model.layers.0.mlp.down_proj.weight") == "down_proj"
    assert layer_type("model.embed_tokens.weight") == "embed_tokens"
    assert layer_type("model.norm.weight") == "norm"


def _family(root, taus_scale=(1.0, 2.0, -1.0)):
    """base, and models base + s * tau for one random tau (so cosines are +-1) plus an independent one."""
    base = make_tiny_llama(seed=0)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    tau = {k: torch.randn(v.shape, generator=g) * 0.01 * (torch.rand(v.shape, generator=g) < 0.5) for k, v in state.items()}
    other = {k: torch.randn(v.shape, generator=g) * 0.01 for k, v in state.items()}
    dirs = []
    for i, (scale, t) in enumerate([(s, tau) for s in taus_scale] + [(1.0, other)]):
        model = make_tiny_llama(seed=0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(state[name] + scale * t[name])
        d = root / f"m{i}"
        model.save_pretrained(d)
        dirs.append(d)
    return base_dir, dirs


def _deltas(base_dir, d):
    b, m = load_file(str(base_dir / "model.safetensors")), load_file(str(d / "model.safetensors"))
    return {k: (m[k].double() - b[k].double()) for k in b}


def test_task_vector_stats_streamed_matches_direct(tmp_path):
    base_dir, dirs = _family(tmp_path)
    stats = task_vector_stats(base_dir, dirs, by_layer_type=True, progress=False)
    assert stats.tensors == len(load_file(str(base_dir / "model.safetensors")))
    p = stats.pairs
    assert p[(0, 1)].cosine == pytest.approx(1.0, abs=1e-5) and p[(0, 1)].conflict_rate == 0.0
    assert p[(0, 2)].cosine == pytest.approx(-1.0, abs=1e-5) and p[(0, 2)].conflict_rate == pytest.approx(1.0)
    assert p[(0, 1)].overlap == pytest.approx(0.5, abs=0.02)  # tau is half zeros
    # against a direct computation over all tensors
    d0, d3 = _deltas(base_dir, dirs[0]), _deltas(base_dir, dirs[3])
    v0 = torch.cat([d0[k].flatten() for k in sorted(d0)])
    v3 = torch.cat([d3[k].flatten() for k in sorted(d3)])
    assert p[(0, 3)].cosine == pytest.approx(float(v0 @ v3 / (v0.norm() * v3.norm())), abs=1e-6)
    both = (v0 != 0) & (v3 != 0)
    assert p[(0, 3)].conflict_rate == pytest.approx(float((both & (v0.sign() != v3.sign())).sum() / both.sum()), abs=1e-6)
    assert stats.norms[1] == pytest.approx(2 * stats.norms[0], rel=1e-4)
    # per layer type: q_proj only
    q = [k for k in d0 if layer_type(k) == "q_proj"]
    q0, q3 = torch.cat([d0[k].flatten() for k in q]), torch.cat([d3[k].flatten() for k in q])
    assert stats.by_type["q_proj"][(0, 3)].cosine == pytest.approx(float(q0 @ q3 / (q0.norm() * q3.norm())), abs=1e-6)
    assert {"q_proj", "down_proj", "embed_tokens", "input_layernorm"} <= set(stats.by_type)
    # all-model sign conflicts: model 2 = -model 0 everywhere tau != 0
    assert 0.5 < stats.all_conflict_rate <= 1.0
    json.dumps(stats.to_json())


def test_density_trims_before_counting(tmp_path):
    base_dir, dirs = _family(tmp_path)
    full = task_vector_stats(base_dir, dirs[2:], progress=False)
    trimmed = task_vector_stats(base_dir, dirs[2:], density=0.1, progress=False)
    assert trimmed.pairs[(0, 1)].overlap < 0.1 * 1.05  # at most ~10% of coordinates kept in each
    assert trimmed.pairs[(0, 1)].overlap < full.pairs[(0, 1)].overlap
    with pytest.raises(SparsemergeError, match="density"):
        task_vector_stats(base_dir, dirs[:2], density=1.5, progress=False)


def test_lora_adapter_input_equals_folded_model(tmp_path):
    from sparsemerge.train.finetune import FinetuneConfig, add_lora_, lora_modules, merge_lora_, save_lora_adapter

    base = make_tiny_llama(seed=0)
    base.save_pretrained(tmp_path / "base")
    adapters, folded = [], []
    for i in range(2):
        model = make_tiny_llama(seed=0)
        add_lora_(model, 2, 4.0, ["q_proj", "down_proj"])
        torch.manual_seed(10 + i)
        for m in lora_modules(model).values():
            torch.nn.init.normal_(m.lora_B, std=0.02)
        adapters.append(save_lora_adapter(model, tmp_path / f"lora{i}", FinetuneConfig(mode="lora", lora_r=2, lora_alpha=4.0)))
        merge_lora_(model)
        model.save_pretrained(tmp_path / f"folded{i}")
        folded.append(tmp_path / f"folded{i}")
    a = task_vector_stats(tmp_path / "base", adapters, progress=False).pairs[(0, 1)]
    b = task_vector_stats(tmp_path / "base", folded, progress=False).pairs[(0, 1)]
    assert a.cosine == pytest.approx(b.cosine, abs=1e-5)
    assert a.both_nonzero == b.both_nonzero and a.conflicts == b.conflicts


def test_mismatched_models_list_the_tensors(tmp_path):
    make_tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    make_tiny_llama(seed=1).save_pretrained(tmp_path / "a")
    make_tiny_llama(seed=1, intermediate=96).save_pretrained(tmp_path / "b")
    with pytest.raises(SparsemergeError, match=r"mlp\.up_proj\.weight: base \(128, 64\) vs .*\(96, 64\)"):
        task_vector_stats(tmp_path / "base", [tmp_path / "a", tmp_path / "b"], progress=False)
    with pytest.raises(SparsemergeError, match="at least two"):
        task_vector_stats(tmp_path / "base", [tmp_path / "a"], progress=False)


def test_tv_stats_cli(tmp_path, capsys):
    base_dir, dirs = _family(tmp_path)
    out = tmp_path / "stats.json"
    code = main(["tv-stats", str(base_dir), *map(str, dirs[:3]), "--by-layer-type", "--json", str(out), "--no-progress"])
    assert code == 0
    text = capsys.readouterr().out
    assert "sign conflict" in text and "cosine" in text and "q_proj" in text
    assert "-1.0000" in text and "100.00%" in text  # m0 vs m2 = -m0
    data = json.loads(out.read_text())
    assert len(data["pairs"]) == 3 and "q_proj" in data["by_layer_type"]
    assert main(["tv-stats", str(base_dir), *map(str, dirs[:2]), "--json", str(out), "--no-progress"]) == 2  # exists
    assert "already exists" in capsys.readouterr().err
