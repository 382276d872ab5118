"""Cross-layer sharing: scales, residuals, grouping, the compact file and the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama
from sparsemerge.errors import SparsemergeError
from sparsemerge.merge.sharing import (SharingConfig, layer_distances, lowrank_per_layer_, make_groups, parse_kinds,
                                       projection_weights, reconstruct_from_compact, share_layers_)

DOWN = "mlp.down_proj"


def _weights(model, kind=DOWN):
    return {i: w.detach().clone() for i, w in projection_weights(model, kind).items()}


def test_a_scaled_copy_is_shared_exactly_with_its_least_squares_scale():
    model = make_tiny_llama()
    w = projection_weights(model, DOWN)
    with torch.no_grad():
        w[1].copy_(3 * w[0])
    original = _weights(model)
    report = share_layers_(model, SharingConfig([DOWN], group_size=2, residual="none"))
    # S = (W0 + 3 W0) / 2 = 2 W0: a_0 = 0.5, a_1 = 1.5, nothing left over
    assert [round(x.scale, 6) for x in report.layers] == [0.5, 1.5]
    assert max(x.rel_error for x in report.layers) < 1e-6
    torch.testing.assert_close(w[1].detach(), original[1])
    n = original[0].numel()
    assert report.dense_bytes == 2 * n * 2 and report.shared_bytes == n * 2 + 2 * 4  # one S + two scales


@pytest.mark.parametrize("residual", [{"residual": "lowrank", "rank": 64}, {"residual": "sparse", "density": 1.0}])
def test_a_full_residual_reconstructs_every_layer(residual):
    model = make_tiny_llama()
    original = _weights(model)
    report = share_layers_(model, SharingConfig([DOWN], group_size=2, **residual))
    for i, w in projection_weights(model, DOWN).items():
        torch.testing.assert_close(w.detach(), original[i], atol=1e-5, rtol=1e-4)
    assert max(x.rel_error for x in report.layers) < 1e-4


def test_lowrank_residual_error_is_the_svd_tail_and_bytes_count_factors():
    model = make_tiny_llama()
    original = _weights(model)
    report = share_layers_(model, SharingConfig([DOWN], group_size=2, residual="lowrank", rank=8))
    s = torch.stack(list(original.values())).mean(0)
    a0 = float((original[0] * s).sum() / (s * s).sum())
    tail = torch.linalg.svdvals(original[0] - a0 * s)[8:]
    assert report.layers[0].rel_error == pytest.approx(float(tail.norm() / original[0].norm()), rel=1e-4)
    out, inn = original[0].shape
    assert report.layers[0].residual_bytes == 8 * (out + inn) * 2


def test_sparse_residual_keeps_the_largest_entries():
    model = make_tiny_llama()
    original = _weights(model)
    share_layers_(model, SharingConfig([DOWN], group_size=2, residual="sparse", density=0.25))
    s = torch.stack(list(original.values())).mean(0)
    for i, w in projection_weights(model, DOWN).items():
        a = float((original[i] * s).sum() / (s * s).sum())
        r = original[i] - a * s
        kept = (w.detach() - a * s).abs() > 1e-6
        assert kept.float().mean().item() == pytest.approx(0.25, abs=0.01)
        assert r.abs()[kept].min() >= r.abs()[~kept].max() - 1e-6


def test_greedy_threshold_groups_close_layers_only():
    w = {0: torch.ones(4, 4), 1: torch.ones(4, 4) * 1.01, 2: -torch.ones(4, 4), 3: -torch.ones(4, 4)}
    assert make_groups(w, SharingConfig([DOWN], threshold=0.1)) == [[0, 1], [2, 3]]
    assert make_groups(w, SharingConfig([DOWN], group_size=3)) == [[0, 1, 2], [3]]
    d = layer_distances(w)
    assert float(d[0, 2]) == pytest.approx(2.0) and float(d[2, 3]) == 0.0


def test_per_layer_lowrank_baseline_counts_bytes():
    model = make_tiny_llama()
    dense, stored = lowrank_per_layer_(model, [DOWN], rank=4)
    out, inn = projection_weights(model, DOWN)[0].shape
    assert dense == 2 * out * inn * 2 and stored == 2 * 4 * (out + inn) * 2
    assert int(torch.linalg.matrix_rank(projection_weights(model, DOWN)[0].detach())) == 4


def test_bad_sharing_options_are_refused():
    with pytest.raises(SparsemergeError, match="kinds here"):
        projection_weights(make_tiny_llama(), "mlp.nope")
    with pytest.raises(SparsemergeError, match="rank"):
        SharingConfig([DOWN], residual="lowrank", rank=0)
    with pytest.raises(SparsemergeError, match="density"):
        SharingConfig([DOWN], residual="sparse", density=1.5)
    assert parse_kinds("mlp,self_attn.q_proj")[-1] == "self_attn.q_proj" and len(parse_kinds("all")) == 7


def test_share_cli_writes_a_loadable_model_and_an_exact_compact_file(tmp_path, tiny_llama_dir, text_file, capsys):
    from transformers import AutoModelForCausalLM

    from sparsemerge.cli.main import main

    out = tmp_path / "shared"
    assert main(["share", str(tiny_llama_dir), str(out), "--kinds", "mlp", "--residual", "lowrank:8", "--compact",
                 "--eval", str(text_file), "--eval-windows", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "mlp.down_proj: distance to the next layer" in text and "x original" in text
    record = json.loads((out / "sparsemerge_sharing.json").read_text())
    assert record["groups"]["mlp.up_proj"] == [[0, 1]] and record["shared_bytes"] < record["dense_bytes"]
    model = AutoModelForCausalLM.from_pretrained(out)
    rebuilt = reconstruct_from_compact(load_file(out / "sharing.safetensors"), record)
    for kind in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        for i, w in projection_weights(model, kind).items():
            torch.testing.assert_close(rebuilt[f"layers.{i}.{kind}"], w.detach(), atol=1e-6, rtol=1e-5)
    assert main(["share", str(tiny_llama_dir), str(out)]) == 2  # existing output refused
    assert main(["share", str(tiny_llama_dir), str(tmp_path / "x"), "--residual", "lowrank:abc"]) == 2
    assert "lowrank:RANK" in capsys.readouterr().err
