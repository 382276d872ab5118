"""The same mergekit-moe YAML through mergekit-moe and ``sparsemerge moe`` on tiny random
Llamas: identical tensors and config for the deterministic gate modes (cheap_embed, hidden,
hidden_avg; Mixtral and Qwen2-MoE layouts, a dtype change, residual_scale).

Needs the mergekit peer venv (bash benchmarks/peers/setup_mergekit.sh); every mergekit-moe
build runs in one mergekit process (benchmarks/peers/mergekit_moe_batch.py).
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from conftest import make_tokenizer
from merge_testlib import MK_PYTHON, ROOT, needs_mergekit, save_family, tensors
from sparsemerge.merge.moe import build_moe

BATCH = ROOT / "benchmarks" / "peers" / "mergekit_moe_batch.py"

pytestmark = needs_mergekit

PROMPTS = [
    {"positive_prompts": ["The government said on Monday", "Ministers will discuss the plan"], "negative_prompts": ["The team won"]},
    {"positive_prompts": ["The team won the match in the final minutes"]},
    {"positive_prompts": ["A new phone was launched by the firm.", "Shares rose"], "negative_prompts": ["The film won three awards"]},
]


def _configs(base: Path, tuned: list[Path]) -> dict[str, dict]:
    experts = [{"source_model": str(t), **p} for t, p in zip(tuned, PROMPTS)]
    shared = [{"source_model": str(base), "positive_prompts": ["The film won three awards at the ceremony"]}]
    common = {"base_model": str(base), "experts": experts}
    return {
        "cheap_embed": {**common, "gate_mode": "cheap_embed"},
        "hidden": {**common, "gate_mode": "hidden", "experts_per_token": 1},
        "hidden_avg_bf16": {**common, "gate_mode": "hidden_avg", "dtype": "bfloat16"},
        "residual_scale": {"base_model": str(base), "gate_mode": "cheap_embed", "dtype": "float16",
                           "experts": [{**experts[0], "residual_scale": 0.5}, experts[1]]},
        "qwen_cheap_embed": {**common, "gate_mode": "cheap_embed", "shared_experts": shared},
        "qwen_hidden": {**common, "gate_mode": "hidden", "shared_experts": shared, "experts_per_token": 3},
    }


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe-vs-mergekit")
    base, tuned = save_family(root, 3, tokenizer=make_tokenizer(384))
    configs = _configs(base, tuned)
    args = []
    for name, cfg in configs.items():
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        args += [str(path), str(root / "mk" / name)]
    proc = subprocess.run([str(MK_PYTHON), str(BATCH), *args], capture_output=True, text=True, timeout=600,
                          env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "HOME": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in configs:
        build_moe(root / f"{name}.yaml", root / "sm" / name)
    return root


@pytest.mark.parametrize("name", list(_configs(Path("b"), [Path("t")] * 3)))
def test_moe_tensors_equal_mergekit_moe(built, name):
    ours, theirs = tensors(built / "sm" / name), tensors(built / "mk" / name)
    assert set(ours) == set(theirs)
    for key in theirs:
        assert ours[key].dtype == theirs[key].dtype, key
        assert ours[key].shape == theirs[key].shape, key
        assert torch.equal(ours[key], theirs[key]), f"{key}: max diff {(ours[key].double() - theirs[key].double()).abs().max()}"


@pytest.mark.parametrize("name", ["cheap_embed", "hidden_avg_bf16", "qwen_hidden"])
def test_moe_config_equals_mergekit_moe(built, name):
    ours = json.loads((built / "sm" / name / "config.json").read_text())
    theirs = json.loads((built / "mk" / name / "config.json").read_text())
    assert ours == theirs
