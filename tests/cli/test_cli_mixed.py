"""Mixed N:M end to end (issue 13 item 3): a recipe gives layers their own patterns (2:4, 1:4,
4:8, dense); prune applies each, check validates each against its own, pack stores each with
its own, and the decode runtime runs each with its own kernel."""
import json

import numpy as np
import pytest
import torch
import yaml

from sparsemerge.cli.main import main
from sparsemerge.masks import check_pattern

RECIPE = {
    "prune": {
        "method": "magnitude",
        "pattern": "2:4",
        "layer_patterns": {
            r"^model\.layers\.0\.self_attn\.q_proj$": "1:4",
            r"^model\.layers\.1\.mlp\.down_proj$": "dense",
            r"k_proj$": "4:8",
            r"^model\.layers\.1\.mlp\.up_proj$": "2:8",
        },
    }
}
EXPECTED = {"model.layers.0.self_attn.q_proj": "1:4", "model.layers.1.mlp.down_proj": "dense",
            "model.layers.0.self_attn.k_proj": "4:8", "model.layers.1.self_attn.k_proj": "4:8",
            "model.layers.1.mlp.up_proj": "2:8", "model.layers.0.mlp.up_proj": "2:4"}


def run(*args) -> int:
    return main([str(a) for a in args])


@pytest.fixture
def mixed(tmp_path, tiny_tokenizer):
    from conftest import make_tiny_llama

    model = make_tiny_llama(hidden=256, intermediate=512)  # rows multiple of 64: the blocked kernels
    src = tmp_path / "src"
    model.save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RECIPE))
    out = tmp_path / "pruned"
    assert run("prune", src, out, "--recipe", recipe, "--no-progress") == 0
    return src, out, recipe


def test_prune_applies_each_layers_pattern_and_check_reads_the_record(mixed, capsys):
    from transformers import AutoModelForCausalLM

    src, out, _ = mixed
    record = json.loads((out / "sparsemerge_prune.json").read_text())
    patterns = {r["name"]: r["pattern"] for r in record["layers"]}
    dense_before = AutoModelForCausalLM.from_pretrained(src).model.layers[1].mlp.down_proj.weight
    model = AutoModelForCausalLM.from_pretrained(out)
    for name, pattern in EXPECTED.items():
        weight = model.get_submodule(name).weight
        if pattern == "dense":
            assert name not in patterns and torch.equal(weight, dense_before)
        else:
            assert patterns[name] == pattern and check_pattern(weight, pattern).ok
            n, m = map(int, pattern.split(":"))
            assert float((weight == 0).float().mean()) == pytest.approx(1 - n / m)
    capsys.readouterr()
    assert run("check", out) == 0  # each layer against the pattern it was pruned to
    text = capsys.readouterr().out
    assert "each layer's pattern from sparsemerge_prune.json" in text and "0 violations" in text
    assert "dense by recipe" in text and "1:4" in text
    # one pattern for all: the 1:4 layer passes 2:4, but the 4:8 and dense layers do not
    assert run("check", out, "--pattern", "2:4", "--quiet") == 1
    assert run("check", src, "--recipe", mixed[2], "--quiet") == 1  # the dense source violates the recipe


def test_check_catches_a_layer_that_breaks_its_own_pattern(mixed, capsys):
    from safetensors.torch import load_file, save_file

    _, out, _ = mixed
    path = out / "model.safetensors"
    tensors = load_file(path)
    weight = tensors["model.layers.0.self_attn.q_proj.weight"]
    weight[0, :2] = 1.0  # two nonzeros in a group of 4: fine for 2:4, a violation of its 1:4
    save_file(tensors, path, metadata={"format": "pt"})
    capsys.readouterr()
    assert run("check", out) == 1
    assert "VIOLATES" in capsys.readouterr().out


def test_pack_stores_each_layer_with_its_pattern_and_the_runtime_runs_each(mixed, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from sparsemerge.formats.model import read_packed
    from sparsemerge.kernels.model import load_packed
    from sparsemerge.runtime.engine import DecodeEngine

    _, out, _ = mixed
    packed = tmp_path / "packed"
    capsys.readouterr()
    assert run("pack", out, packed, "--quant", "int8", "--group", "0", "--no-progress") == 0
    assert "each layer's pattern from sparsemerge_prune.json" in capsys.readouterr().err
    manifest = json.loads((packed / "sparsemerge_packed.json").read_text())
    for name, pattern in EXPECTED.items():
        entry = manifest["tensors"][f"{name}.weight"]
        if pattern == "dense":
            assert entry["format"] == "dense" and entry["params"]["codec"]["kind"] == "int8"
        else:
            assert entry["format"] == "nm" and f"{entry['params']['n']}:{entry['params']['m']}" == pattern
    # the packed weights decode to the pruned ones (within INT8 rounding)
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    ckpt = read_packed(packed)
    q = ckpt.get_dense("model.layers.0.self_attn.q_proj.weight")
    ref = pruned.model.layers[0].self_attn.q_proj.weight.detach()
    assert torch.equal(q != 0, ref != 0)
    torch.testing.assert_close(q, ref, atol=float(ref.abs().max()) / 100, rtol=0)
    # the decode runtime: each layer its own kernel, logits equal to the transformers model of the same layers
    loaded = load_packed(packed)
    engine = DecodeEngine(loaded.model, max_seq=32, kv_cache="float32")  # exact cache: compared at 5e-5
    by_name = {p.name: p for p in engine.plan.layers}
    assert by_name["model.layers.0.self_attn.q_proj"].pattern == "1:4"
    assert by_name["model.layers.0.self_attn.q_proj"].kernel == "numba-general"
    assert by_name["model.layers.0.self_attn.k_proj"].pattern == "4:8"
    assert by_name["model.layers.1.mlp.down_proj"].pattern == "dense"
    assert by_name["model.layers.0.mlp.gate_proj+up_proj"].pattern == "2:4"
    ids = [1, 5, 9, 3, 7, 11, 2, 40]
    with torch.no_grad():
        reference = loaded.model(torch.tensor([ids])).logits[0].numpy()
    engine.reset()
    got = [engine.prefill(ids[:3]).copy()] + [engine.step(t).copy() for t in ids[3:-1]]
    np.testing.assert_allclose(np.stack(got), reference[2:-1], atol=5e-5, rtol=1e-4)
    # `run` takes the runtime for it and says so
    capsys.readouterr()
    assert run("run", packed, "--prompt", "ab", "--max-new-tokens", "4") == 0
    assert "decode runtime" in capsys.readouterr().out


def test_pack_with_an_explicit_pattern_or_recipe(mixed, tmp_path, capsys):
    src, out, recipe = mixed
    # --recipe: the same per-layer patterns, also for a folder without a record
    assert run("pack", out, tmp_path / "p1", "--recipe", recipe, "--no-progress") == 0
    manifest = json.loads((tmp_path / "p1" / "sparsemerge_packed.json").read_text())
    assert manifest["tensors"]["model.layers.0.self_attn.q_proj.weight"]["params"]["n"] == 1
    # --pattern: one pattern for all, as before; a 4:8 layer does not fit 2:4 and is refused clearly
    assert run("pack", out, tmp_path / "p2", "--pattern", "2:4", "--no-progress") == 2
    assert "k_proj" in capsys.readouterr().err
    assert not (tmp_path / "p2").exists()
    assert run("pack", out, tmp_path / "p3", "--pattern", "2:4", "--recipe", recipe) == 2
    assert "not both" in capsys.readouterr().err


def test_a_uniformly_pruned_model_packs_with_its_recorded_pattern(tmp_path, tiny_tokenizer, capsys):
    """One pattern in the record (1:4 everywhere): pack stores 1:4 without --pattern (it used to
    store 2:4 slots, half of them explicit zeros)."""
    from conftest import make_tiny_llama

    src = tmp_path / "src"
    make_tiny_llama().save_pretrained(src)
    tiny_tokenizer.save_pretrained(src)
    assert run("prune", src, tmp_path / "p", "--pattern", "1:4", "--no-progress") == 0
    assert run("pack", tmp_path / "p", tmp_path / "k", "--no-progress") == 0
    tensors = json.loads((tmp_path / "k" / "sparsemerge_packed.json").read_text())["tensors"]
    nm = [t["params"] for t in tensors.values() if t["format"] == "nm"]
    assert nm and all((p["n"], p["m"]) == (1, 4) for p in nm)
