"""Hierarchical N:M end to end on a tiny random Llama: prune (magnitude) -> check -> pack
--format hnm -> the packed model (HierLinear layers on the numba-hier row) gives the pruned
model's logits; `sparsemerge run` takes the transformers path for it. A recipe mixing
hierarchical, N:M and dense layers packs each in its own format (hnm / nm / dense)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import yaml

from sparsemerge.cli.main import main

PATTERN = "hier:1:2@8x16/2:4"  # 8-row x 16-input tiles, 1 of every 2 kept, then 2:4: 75% sparse


@pytest.fixture
def pruned_hier(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    out = tmp_path / "pruned"
    assert main(["prune", str(tiny_llama_dir), str(out), "--pattern", PATTERN, "--method", "magnitude", "--no-progress"]) == 0
    return out


def test_prune_check_pack_run_hierarchical(pruned_hier, tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from sparsemerge.formats.hnm import HNMPacked
    from sparsemerge.formats.model import read_packed
    from sparsemerge.kernels.hier import HierLinear
    from sparsemerge.kernels.model import load_packed

    assert main(["check", str(pruned_hier), "--pattern", PATTERN, "--quiet"]) == 0
    assert "14 tensors checked against hier:1:2@8x16/2:4: 0 violations" in capsys.readouterr().out
    assert main(["check", str(tiny_llama_dir), "--pattern", PATTERN, "--quiet"]) == 1  # the dense model violates
    # without --pattern/--format the pruning record's pattern routes every layer to hnm
    assert main(["pack", str(pruned_hier), str(tmp_path / "from-record"), "--no-progress"]) == 0
    with read_packed(tmp_path / "from-record") as ckpt:
        assert isinstance(ckpt.get_format("model.layers.1.self_attn.v_proj.weight"), HNMPacked)
    packed_dir = tmp_path / "packed"
    assert main(["pack", str(pruned_hier), str(packed_dir), "--format", "hnm", "--pattern", PATTERN]) == 0
    with read_packed(packed_dir) as ckpt:
        obj = ckpt.get_format("model.layers.0.mlp.down_proj.weight")
        assert isinstance(obj, HNMPacked) and str(obj.pattern) == PATTERN
        # values: 64 rows x 128*(1/2)*(2/4) = 32 kept slots, float32; bitmap 8 tiles x 1 byte
        assert obj.fields()["values"].shape == (64, 32) and obj.fields()["blocks"].shape == (8, 1)

    pruned = AutoModelForCausalLM.from_pretrained(pruned_hier).eval()
    loaded = load_packed(packed_dir)
    assert len(loaded.swapped) == 14
    layer = loaded.model.model.layers[1].mlp.up_proj
    assert isinstance(layer, HierLinear) and layer.explain_kernel().name == "numba-hier"
    torch.testing.assert_close(layer.to_dense(), pruned.model.layers[1].mlp.up_proj.weight, rtol=0, atol=0)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 11]])
    with torch.no_grad():
        want = pruned(ids).logits
        got = loaded.model(ids).logits
        got1 = loaded.model(ids[:, :1]).logits  # batch-1 rows (one token)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got1, want[:, :1], rtol=1e-4, atol=1e-4)

    assert main(["run", str(packed_dir), "--prompt", "The team", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "14 sparse layers" in out and "transformers (" in out and "HierLinear" in out


@pytest.mark.parametrize("quant, group, extra", [("int8", "16", []), ("int4", "0", ["--asymmetric"])])
def test_packed_hierarchical_quantized(pruned_hier, tmp_path, quant, group, extra):
    """INT8 per group of 16 slots / asymmetric INT4 per channel: the kernel dequantizes
    exactly as the storage decodes."""
    from sparsemerge.formats.model import read_packed
    from sparsemerge.kernels.model import load_packed

    packed_dir = tmp_path / "packed-q"
    assert main(["pack", str(pruned_hier), str(packed_dir), "--format", "hnm", "--pattern", PATTERN,
                 "--quant", quant, "--group", group, "--no-progress", *extra]) == 0
    loaded = load_packed(packed_dir)
    with read_packed(packed_dir) as ckpt:
        decoded = ckpt.get_format("model.layers.0.self_attn.k_proj.weight").to_dense().float()
    layer = loaded.model.model.layers[0].self_attn.k_proj
    assert layer.codec == quant and layer.group_size == (int(group) or None)
    assert (layer.zero is not None) == bool(extra)
    x = torch.randn(3, 64)
    for rows in (x[:1], x):  # batch 1 and a small batch
        torch.testing.assert_close(layer(rows), rows @ decoded.T, rtol=1e-5, atol=1e-5)


def test_mixed_recipe_packs_each_layer_in_its_own_format(tiny_llama_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from sparsemerge.kernels import SparseLinear
    from sparsemerge.kernels.hier import HierLinear
    from sparsemerge.kernels.model import load_packed

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"prune": {"method": "magnitude", "pattern": "2:4", "layer_patterns": {
        r"mlp\.(gate|up)_proj$": PATTERN, r"^model\.layers\.1\.mlp\.down_proj$": "dense"}}}))
    pruned = tmp_path / "pruned"
    assert main(["prune", str(tiny_llama_dir), str(pruned), "--recipe", str(recipe), "--no-progress"]) == 0
    assert main(["check", str(pruned), "--quiet"]) == 0  # each layer against its recorded pattern
    packed = tmp_path / "packed"
    assert main(["pack", str(pruned), str(packed), "--no-progress"]) == 0
    loaded = load_packed(packed)
    layers = loaded.model.model.layers
    assert isinstance(layers[0].mlp.up_proj, HierLinear) and str(layers[0].mlp.up_proj.pattern) == PATTERN
    assert isinstance(layers[0].mlp.down_proj, SparseLinear) and isinstance(layers[1].self_attn.q_proj, SparseLinear)
    assert type(layers[1].mlp.down_proj) is torch.nn.Linear  # dense by recipe
    model = AutoModelForCausalLM.from_pretrained(pruned).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)
