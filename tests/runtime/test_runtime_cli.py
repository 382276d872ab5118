"""``sparsemerge plan`` and ``run`` on the decode runtime."""
from __future__ import annotations

import json

from conftest import make_tiny_llama
from sparsemerge.cli.main import main
from sparsemerge.masks import nm_mask


def _pruned_dir(tmp_path, tokenizer):
    model = make_tiny_llama(hidden=128, intermediate=256)
    for name, p in model.named_parameters():
        if "layers" in name and name.endswith("proj.weight"):
            p.data *= nm_mask(p.data.abs(), 2, 4)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_plan_prints_a_kernel_per_product_and_writes_json(tmp_path, tiny_tokenizer, capsys):
    hf = _pruned_dir(tmp_path, tiny_tokenizer)
    assert main(["plan", str(hf), "--quant", "int4", "--group-size", "128", "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "layers.{0-1}.self_attn.q_proj+k_proj+v_proj" in out and "int4 g128" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["supported"] and len(plan["layers"]) == 2 * 4 + 1
    assert {r["kernel"] for r in plan["layers"][:-1]} == {"numba-gemv24"}  # float activations, int4 codes
    assert main(["plan", str(hf), "--quant", "int4", "--all-layers"]) == 0
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().out


def test_plan_of_an_unsupported_pattern_says_what_falls_back(tmp_path, tiny_tokenizer, capsys):
    hf = _pruned_dir(tmp_path, tiny_tokenizer)
    assert main(["plan", str(hf), "--pattern", "1:4", "--prune"]) == 0
    out = capsys.readouterr().out
    assert "not used" in out and "1:4" in out and "transformers path" in out


def test_run_streams_with_sampling_and_stops(tmp_path, tiny_tokenizer, capsys):
    hf = _pruned_dir(tmp_path, tiny_tokenizer)
    args = ["run", str(hf), "--quant", "int8", "--prompt", "the quick", "--max-new-tokens", "12"]
    assert main(args + ["--temperature", "0.8", "--top-k", "20", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert main(args + ["--temperature", "0.8", "--top-k", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out.split("[")[0] == first.split("[")[0]  # seeded: the same text
    assert "decode runtime" in first and first.startswith("the quick")
