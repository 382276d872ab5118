"""The same YAML through mergekit and sparsemerge on tiny random Llamas: equal outputs.

Needs the mergekit peer venv; create it with
    bash benchmarks/peers/setup_mergekit.sh
(it makes .venv-peers/mergekit with CPU torch and the pinned mergekit). All mergekit merges
run in one mergekit process (benchmarks/peers/mergekit_batch.py) to pay its import once.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from merge_testlib import MK_PYTHON, ROOT, needs_mergekit, save_family, tensors
from sparsemerge.merge import run_merge

BATCH = ROOT / "benchmarks" / "peers" / "mergekit_batch.py"

pytestmark = needs_mergekit


def _write_lora(folder: Path, base_dir: Path, rank: int = 4, alpha: int = 8) -> None:
    """A PEFT LoRA adapter on q_proj/v_proj of the tiny Llama, written without peft."""
    folder.mkdir()
    g = torch.Generator().manual_seed(7)
    state = {}
    base = tensors(base_dir)
    for layer in range(2):
        for mod in ("self_attn.q_proj", "self_attn.v_proj"):
            out_f, in_f = base[f"model.layers.{layer}.{mod}.weight"].shape
            key = f"base_model.model.model.layers.{layer}.{mod}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
            state[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
    save_file(state, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "v_proj"], "bias": "none", "fan_in_fan_out": False,
        "base_model_name_or_path": str(base_dir), "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config))


def _configs(base: Path, tuned: list[Path], lora: Path) -> dict[str, dict]:
    b, t = str(base), [str(p) for p in tuned]

    def with_base(params):
        return [{"model": b}] + [{"model": m, **({"parameters": p} if p else {})} for m, p in zip(t, params)]

    return {
        "linear": {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": w}} for m, w in zip(t, [1.0, 2.0, 0.5])]},
        "linear_unnormalized": {"merge_method": "linear", "parameters": {"normalize": False, "weight": 0.4}, "models": [{"model": m} for m in t[:2]]},
        "task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b, "parameters": {"lambda": 0.8},
                            "models": with_base([{"weight": [0.2, 0.9]}, {"weight": -0.5}, {"weight": 1.0}])},
        "ties": {"merge_method": "ties", "base_model": b, "models": with_base([{"weight": 0.7, "density": 0.5}, {"weight": 1.0, "density": 0.3}, {"weight": 0.4, "density": 0.9}])},
        "ties_filtered": {"merge_method": "ties", "base_model": b, "dtype": "bfloat16", "out_dtype": "float16",
                          "parameters": {"density": [{"filter": "mlp", "value": 0.2}, {"value": 0.6}], "weight": 1.0, "normalize": False},
                          "models": with_base([None, None, None])},
        "breadcrumbs": {"merge_method": "breadcrumbs", "base_model": b, "models": with_base([{"weight": 0.5, "density": 0.8, "gamma": 0.05}] * 3)},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", "base_model": b, "models": with_base([{"weight": 0.5, "density": 0.7, "gamma": 0.02}] * 3)},
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": b}, {"model": t[0]}],
                  "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 1]}, {"filter": "mlp", "value": [1, 0.5, 0.7, 0]}, {"value": 0.5}]}},
        "model_stock": {"merge_method": "model_stock", "base_model": b, "models": with_base([None, None, None])},
        "passthrough_stitch": {"merge_method": "passthrough", "slices": [
            {"sources": [{"model": t[0], "layer_range": [0, 2]}]},
            {"sources": [{"model": t[1], "layer_range": [1, 2]}]}]},
        "lora_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": b,
                                 "models": [{"model": b}, {"model": f"{b}+{lora}", "parameters": {"weight": 0.7}}, {"model": t[0], "parameters": {"weight": 0.3}}]},
    }


STOCHASTIC = {
    "dare_linear": {"merge_method": "dare_linear", "parameters": {"weight": 1.0, "density": 0.3}},
    "dare_ties": {"merge_method": "dare_ties", "parameters": {"weight": 1.0, "density": 0.4}},
    "della": {"merge_method": "della", "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1}},
}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    root = tmp_path_factory.mktemp("vs-mergekit")
    base, tuned = save_family(root, 3)
    lora = root / "lora"
    _write_lora(lora, base)
    configs = _configs(base, tuned, lora)
    for name, cfg in STOCHASTIC.items():
        n_models = 1 if name == "dare_linear" else 3
        configs[name] = {**cfg, "base_model": str(base), "models": [{"model": str(base)}] + [{"model": str(m)} for m in tuned[:n_models]]}
    args = []
    for name, cfg in configs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        args += [str(path), str(root / "mk" / name)]
    proc = subprocess.run([str(MK_PYTHON), str(BATCH), *args], capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2",
                               "HOME": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in configs:
        run_merge(root / f"{name}.yaml", root / "sm" / name)
    return root, base, tuned


@pytest.mark.parametrize("name", ["ties", "ties_filtered", "task_arithmetic", "linear"])
def test_row_blocked_merges_match_mergekit(merged, name, tmp_path, monkeypatch):
    """Under a memory budget that splits every tensor into row blocks (merge/memory.py), the
    result is still mergekit's, entry for entry (TIES: the trim masks of the whole tensors)."""
    from sparsemerge.merge import memory

    monkeypatch.setattr(memory, "MIN_BLOCK_BYTES", 1)
    root, _, _ = merged
    report = run_merge(root / f"{name}.yaml", tmp_path / name, max_memory=150_000)
    assert report.memory["row_blocked"]
    ours, theirs = tensors(tmp_path / name), tensors(root / "mk" / name)
    assert set(ours) == set(theirs)
    for key in theirs:
        diff = (ours[key].double() - theirs[key].double()).abs().max().item()
        assert diff <= 1e-6, f"{name}: {key} differs by {diff}"
    assert all(torch.equal(ours[k], v) for k, v in tensors(root / "sm" / name).items())  # and byte-equal to the whole-tensor merge


@pytest.mark.parametrize("name", list(_configs(Path("b"), [Path("t")] * 3, Path("l"))))
def test_deterministic_methods_match_mergekit(merged, name):
    root, _, _ = merged
    ours, theirs = tensors(root / "sm" / name), tensors(root / "mk" / name)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape, key
        diff = (ours[key].double() - theirs[key].double()).abs().max().item()
        assert diff <= 1e-6, f"{name}: {key} differs by {diff}"


def test_dare_linear_matches_mergekit_in_distribution(merged):
    """One model, density d: both keep a Bernoulli(d) share of each task vector and restore its L1 norm."""
    root, base_dir, tuned = merged
    base, tuned0 = tensors(base_dir), tensors(tuned[0])
    ours, theirs = tensors(root / "sm" / "dare_linear"), tensors(root / "mk" / "dare_linear")
    for key in base:
        tau = tuned0[key] - base[key]
        nonzero = tau != 0
        if nonzero.sum() < 2000:
            continue
        kept_ours = ((ours[key] - base[key]) != 0)[nonzero].float().mean().item()
        kept_theirs = ((theirs[key] - base[key]) != 0)[nonzero].float().mean().item()
        sd = (0.3 * 0.7 / nonzero.sum().item()) ** 0.5
        assert abs(kept_ours - 0.3) < 5 * sd and abs(kept_theirs - 0.3) < 5 * sd, key
        l1 = tau.abs().sum().item()
        assert (ours[key] - base[key]).abs().sum().item() == pytest.approx(l1, rel=1e-3)
        assert (theirs[key] - base[key]).abs().sum().item() == pytest.approx(l1, rel=1e-3)
        assert not torch.equal(ours[key], tuned0[key])


@pytest.mark.parametrize("name", ["dare_ties", "della"])
def test_stochastic_ties_methods_match_mergekit_in_distribution(merged, name):
    """Three models: per tensor, the mean |theta - theta_0| and the share of changed entries agree within 5 %."""
    root, base_dir, _ = merged
    base = tensors(base_dir)
    ours, theirs = tensors(root / "sm" / name), tensors(root / "mk" / name)
    checked = 0
    for key in base:
        if base[key].numel() < 8000:
            continue
        d_ours, d_theirs = (ours[key] - base[key]), (theirs[key] - base[key])
        assert d_ours.abs().mean().item() == pytest.approx(d_theirs.abs().mean().item(), rel=0.05), key
        assert (d_ours != 0).float().mean().item() == pytest.approx((d_theirs != 0).float().mean().item(), rel=0.05), key
        checked += 1
    assert checked >= 6
