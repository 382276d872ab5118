"""Cross-layer sharing: the optimal contiguous grouping (brute force), residuals, exact limits,
loading through load_model, the CLI, and refusal by tensor-level readers."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from conftest import make_tiny_llama
from sparsemerge.cli.main import main
from sparsemerge.errors import SparsemergeError
from sparsemerge.io import load_model, open_tensor_source
from sparsemerge.merge.share import ShareConfig, contiguous_groups, load_shared_state, lowrank, share_layers, sparse_topk


def _brute(gram: torch.Tensor, k: int) -> float:
    n = gram.shape[0]
    best = float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        cost = 0.0
        for a, b in zip(bounds, bounds[1:]):
            block = gram[a:b, a:b]
            cost += float(block.diagonal().sum() - block.sum() / (b - a))
        best = min(best, cost)
    return best


@pytest.mark.parametrize("k", [1, 2, 3, 6])
def test_contiguous_groups_is_optimal(k):
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(k)).double()
    gram = x @ x.T
    runs, cost = contiguous_groups(gram, k)
    assert len(runs) == k and runs[0][0] == 0 and runs[-1][1] == 6
    assert all(a < b for a, b in runs) and all(r[1] == s[0] for r, s in zip(runs, runs[1:]))
    assert cost == pytest.approx(_brute(gram, k), abs=1e-9)
    # the cost is the squared distance to each run's mean, computed directly
    direct = sum(float((x[a:b] - x[a:b].mean(0)).square().sum()) for a, b in runs)
    assert cost == pytest.approx(direct, rel=1e-9, abs=1e-9)


def test_contiguous_groups_finds_equal_neighbours():
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 5.0], [0.0, 5.0], [3.0, 3.0]]).double()
    runs, cost = contiguous_groups(x @ x.T, 3)
    assert runs == [(0, 2), (2, 4), (4, 5)] and cost == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(SparsemergeError, match="between 1 and"):
        contiguous_groups(x @ x.T, 6)


def test_lowrank_and_sparse_residuals():
    r = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    u, v = lowrank(r, 3)
    assert u.shape == (12, 3) and v.shape == (3, 8)
    s = torch.linalg.svdvals(r)
    # Eckart-Young: the error of the best rank-3 approximation is the tail of the spectrum
    assert float((r - u @ v).square().sum()) == pytest.approx(float(s[3:].square().sum()), rel=1e-4)
    index, values = sparse_topk(r, 0.25)
    assert index.dtype == torch.int32 and index.numel() == 24
    assert torch.equal(values, r.reshape(-1)[index.long()])
    assert float(values.abs().min()) >= float(r.abs().reshape(-1).sort().values[-24])


@pytest.fixture
def tiny_dir(tmp_path, tiny_tokenizer):
    d = tmp_path / "tiny"
    make_tiny_llama(seed=0, layers=4).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("options", [
    {"groups": 4, "residual": "none"},  # every layer its own run: a copy
    {"groups": 2, "residual": "lowrank", "rank": 128},  # full rank residual: exact
    {"groups": 1, "residual": "sparse", "density": 1.0},  # every residual entry kept: exact
])
def test_exact_limits_reproduce_the_model(tiny_dir, tmp_path, options):
    report = share_layers(tiny_dir, tmp_path / "s", ShareConfig(**options))
    assert report.kinds and all(k.residual_error < 1e-9 for k in report.kinds)
    ids = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(load_model(tmp_path / "s").model, ids), _logits(load_model(tiny_dir).model, ids), atol=1e-4, rtol=1e-4)


def test_shared_weights_are_group_means_plus_residual(tiny_dir, tmp_path):
    report = share_layers(tiny_dir, tmp_path / "s", {"groups": 2, "residual": "lowrank", "rank": 4})
    original = dict(load_model(tiny_dir).model.named_parameters())
    rebuilt = load_shared_state(tmp_path / "s")
    kind = "mlp.down_proj.weight"
    runs = next(k.groups for k in report.kinds if k.kind == kind)
    assert len(runs) == 2
    for a, b in runs:
        mean = torch.stack([original[f"model.layers.{i}.{kind}"].detach() for i in range(a, b)]).mean(0)
        for i in range(a, b):
            res = original[f"model.layers.{i}.{kind}"].detach() - mean
            u, s, vh = torch.linalg.svd(res)
            expected = mean + (u[:, :4] * s[:4]) @ vh[:4]
            torch.testing.assert_close(rebuilt[f"model.layers.{i}.{kind}"], expected, atol=1e-5, rtol=1e-4)
    # norms and embeddings are copied
    assert torch.equal(rebuilt["model.norm.weight"], original["model.norm.weight"].detach())
    data = report.to_json()
    assert 0 < data["ratio"] < 1 and data["bytes_source"] == sum(p.numel() * 4 for p in original.values())
    manifest = json.loads((tmp_path / "s" / "sharing" / "sharing.json").read_text())
    assert manifest["tensors"][f"model.layers.0.{kind}"]["shared"].startswith("shared.")


def test_share_cli_eval_and_refusals(tiny_dir, tmp_path, text_file, capsys):
    out = tmp_path / "shared"
    assert main(["share", str(tiny_dir), str(out), "--groups", "2", "--residual", "sparse", "--density", "0.1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "bytes" in text and "mlp.down_proj.weight" in text
    assert main(["eval", "ppl", str(out), "--data", str(text_file), "--seqlen", "32", "--max-windows", "2", "--no-progress"]) == 0
    assert "perplexity" in capsys.readouterr().out
    with pytest.raises(SparsemergeError, match="cross-layer shared"):
        open_tensor_source(out)
    assert main(["share", str(tiny_dir), str(out), "--groups", "2"]) == 2  # exists
    assert main(["share", str(tiny_dir), str(tmp_path / "x"), "--groups", "9"]) == 2
    assert "groups=9" in capsys.readouterr().err
    with pytest.raises(ValueError):
        ShareConfig(groups=2, rnak=3)
