"""Channel permutation for N:M: the search (exact swap gains, monotone, a lossless case) and
its function-preserving application to tiny Llama / Qwen2 models, wired into prune_."""
import itertools
import json

import pytest
import torch

from conftest import make_tiny_llama
from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import check_pattern
from sparsemerge.prune import PruneConfig
from sparsemerge.prune.api import prune_
from sparsemerge.prune.permutation import permute_channels_
from sparsemerge.prune.permutation_search import ScoreBlock, _BlockState, kept_score, search_permutation, total_kept
from sparsemerge.prune.select import select_targets


def _kept_by_hand(scores: torch.Tensor, n: int, m: int, perm) -> float:
    total = 0.0
    for row in scores[:, perm].tolist():
        for g in range(0, len(row), m):
            total += sum(sorted(row[g : g + m], reverse=True)[:n])
    return total


@pytest.mark.parametrize("rows,cols,n,m", [(5, 8, 2, 4), (7, 16, 1, 4), (3, 16, 4, 8), (6, 12, 2, 4)])
def test_swap_gains_are_exact(rows, cols, n, m):
    torch.manual_seed(rows * cols)
    scores = torch.rand(rows, cols) ** 3
    perm = torch.randperm(cols)
    state = _BlockState(ScoreBlock(scores, n, m))
    state.refresh(perm, None)
    gains = state.gains(perm)
    base = _kept_by_hand(scores, n, m, perm)
    assert kept_score(scores, n, m, perm) == pytest.approx(base, rel=1e-9)
    for a, b in itertools.product(range(cols), repeat=2):
        swapped = perm.clone()
        swapped[a], swapped[b] = perm[b], perm[a]
        assert float(gains[a, b]) == pytest.approx(_kept_by_hand(scores, n, m, swapped) - base, abs=1e-4)


def test_search_improves_random_scores_and_is_deterministic():
    torch.manual_seed(0)
    blocks = [ScoreBlock(torch.rand(48, 64), 2, 4), ScoreBlock(torch.rand(16, 64) * 2, 4, 8)]
    result = search_permutation(blocks, seed=3)
    assert sorted(result.perm.tolist()) == list(range(64))
    assert result.after > result.before * 1.005 and result.swaps > 0
    assert result.before == pytest.approx(total_kept(blocks))
    assert result.after == pytest.approx(sum(_kept_by_hand(b.scores, b.n, b.m, result.perm) for b in blocks), rel=1e-9)
    assert torch.equal(search_permutation(blocks, seed=3).perm, result.perm)
    # a row subsample steers the search, the report still counts every row and never loses
    sub = search_permutation(blocks, max_rows=8, seed=1)
    assert sub.after >= sub.before == result.before
    assert sub.after == pytest.approx(total_kept(blocks, sub.perm))


def test_search_reaches_the_exhaustive_optimum_on_eight_columns():
    torch.manual_seed(1)
    scores = torch.rand(6, 8)
    best = max(kept_score(scores, 2, 4, torch.tensor(p)) for p in itertools.permutations(range(8)))
    assert search_permutation(ScoreBlock(scores, 2, 4)).after >= best - 0.01 * best


def lossless_case(groups: int = 4) -> torch.Tensor:
    """Rows 0-1 use only the first half of the columns, rows 2-3 only the second half: in the
    identity order every 2:4 group of a row holds 4 non-zeros (half lost); two columns of each
    half per group make 2:4 lossless."""
    torch.manual_seed(2)
    cols = 4 * groups
    w = torch.zeros(4, cols)
    w[:2, : cols // 2] = torch.rand(2, cols // 2) + 0.5
    w[2:, cols // 2 :] = torch.rand(2, cols // 2) + 0.5
    return w


def test_permutation_makes_two_four_lossless():
    w = lossless_case()
    result = search_permutation(ScoreBlock(w, 2, 4))
    assert result.before < 0.75 * float(w.sum())
    assert result.after == pytest.approx(float(w.sum()), rel=1e-6)  # everything kept


def test_bad_blocks_are_refused():
    with pytest.raises(SparsemergeError, match="M dividing"):
        ScoreBlock(torch.rand(2, 6), 2, 4)
    with pytest.raises(SparsemergeError, match="non-negative"):
        ScoreBlock(-torch.rand(2, 8), 2, 4)
    with pytest.raises(SparsemergeError, match="column count"):
        search_permutation([ScoreBlock(torch.rand(2, 8), 2, 4), ScoreBlock(torch.rand(2, 12), 2, 4)])


def tiny(kind: str, tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cls, cfg = (Qwen2ForCausalLM, Qwen2Config) if kind == "qwen2" else (LlamaForCausalLM, LlamaConfig)
    model = cls(
        cfg(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tied)
    ).eval()
    with torch.no_grad():  # norms and biases away from their ones/zeros, so a wrong permutation shows
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                param.normal_()
    return model


def _kept_of_weights(model, pattern="2:4") -> float:
    n, m = map(int, pattern.split(":"))
    return sum(kept_score(t.weight.detach().abs(), n, m) for t in select_targets(model, PruneConfig(pattern=pattern))[0])


@pytest.mark.parametrize("kind,tied", [("llama", True), ("llama", False), ("qwen2", False)])
def test_permuted_model_computes_the_same_function(kind, tied):
    model = tiny(kind, tied)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        ref = model(ids).logits
    kept = _kept_of_weights(model)
    report = permute_channels_(model, pattern="2:4")
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=2e-5, rtol=0)
    spaces = {s.space: s for s in report.spaces}
    assert {"hidden", "model.layers.1.mlp", "model.layers.1.self_attn.v_head1"} <= set(spaces)
    assert all(s.swaps > 0 and s.kept_after > s.kept_before for s in report.spaces)  # every kind moved
    for name in ("model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                 "model.norm.weight"):
        assert not torch.equal(dict(model.named_parameters())[name], before[name])
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    # the report's kept score is the one the model's weights now give (every target counted once)
    assert report.kept_before == pytest.approx(kept, rel=1e-6)
    assert _kept_of_weights(model) == pytest.approx(report.kept_after, rel=1e-6) and report.gain > 0


def test_scope_and_refusals():
    model = tiny("llama", False)
    embed = model.model.embed_tokens.weight.detach().clone()
    report = permute_channels_(model, {"permute_scope": ["mlp"]})
    assert [s.space for s in report.spaces] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert torch.equal(model.model.embed_tokens.weight, embed)
    report = permute_channels_(tiny("llama", False), pattern="unstructured:0.5")
    assert not report.spaces and all("no targeted N:M layer" in r for _, r in report.skipped)
    with pytest.raises(SparsemergeError, match="supports llama"):
        permute_channels_(torch.nn.Linear(4, 4))


def _removed(dense: dict, model) -> tuple[float, float]:
    """(kept sum |W|, removed sum W^2 = E||(W - W_pruned) x||^2 for x ~ N(0, I)) over the targets;
    both are invariant to the channel order of the dense weights."""
    kept = removed = 0.0
    for t in select_targets(model, PruneConfig())[0]:
        kept += float(t.weight.detach().abs().sum())
        removed += float(dense[t.name].pow(2).sum() - t.weight.detach().pow(2).sum())
    return kept, removed


def test_magnitude_with_permutation_keeps_more_and_errs_less():
    plain, permuted = make_tiny_llama(), make_tiny_llama()
    dense = {t.name: t.weight.detach().clone() for t in select_targets(plain, PruneConfig())[0]}
    prune_(plain, {"pattern": "2:4"})
    report = prune_(permuted, {"pattern": "2:4", "permute": True})
    for t in select_targets(permuted, PruneConfig())[0]:
        assert check_pattern(t.weight, "2:4").ok
    kept0, removed0 = _removed(dense, plain)
    kept1, removed1 = _removed(dense, permuted)
    assert kept1 > kept0 * 1.005 and removed1 < removed0
    perm = report.to_json()["permutation"]
    assert perm["score"] == "magnitude" and perm["kept_after"] == pytest.approx(kept1, rel=1e-5)
    assert perm["kept_before"] == pytest.approx(kept0, rel=1e-5)


def test_lossless_mlp_and_calibrated_scores():
    model = make_tiny_llama()
    down = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        down.weight.copy_(lossless_case(32).repeat(16, 1))  # (64, 128)
    w = down.weight.detach().clone()
    report = permute_channels_(model, permute_scope=["mlp"])
    prune_(model, {"pattern": "2:4", "include": [r"layers\.0\.mlp\.down_proj$"]})
    assert float(down.weight.detach().abs().sum()) == pytest.approx(float(w.abs().sum()), rel=1e-6)  # nothing lost
    assert report.spaces[0].kept_after == pytest.approx(float(w.sum()), rel=1e-6)
    # calibrated methods search on Wanda scores |W| * ||X_j||
    ids = torch.randint(0, 384, (2, 16))
    report = prune_(make_tiny_llama(), {"pattern": "2:4", "method": "wanda", "permute": True}, calibration=ids)
    assert report.permutation["score"] == "wanda" and report.permutation["gain"] > 0


def test_permuted_pruned_model_packs_and_runs(tmp_path, tiny_tokenizer):
    from sparsemerge.formats.model import PackConfig, pack
    from sparsemerge.kernels.model import load_for_run

    model = make_tiny_llama()
    ids = torch.randint(0, 384, (1, 8))
    prune_(model, {"pattern": "2:4", "permute": True})
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer.save_pretrained(tmp_path / "hf")
    pack(tmp_path / "hf", tmp_path / "packed", PackConfig(quant="none"))
    sparse = load_for_run(str(tmp_path / "packed"))
    assert len(sparse.swapped) == 14
    with torch.no_grad():
        torch.testing.assert_close(sparse.model(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_cli_permute_flag(tiny_llama_dir, tmp_path, capsys):
    from sparsemerge.cli.main import main

    out = tmp_path / "p"
    assert main(["prune", str(tiny_llama_dir), str(out), "--permute", "--no-progress"]) == 0
    assert "permuted" in capsys.readouterr().out
    record = json.loads((out / "sparsemerge_prune.json").read_text())
    assert record["config"]["permute"] and record["permutation"]["gain"] > 0
    assert main(["check", str(out), "--pattern", "2:4", "--quiet"]) == 0
