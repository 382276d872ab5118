"""Permutation alignment (weight matching): exact recovery of a known permutation, function
preservation, Llama round trips, errors, and the align / lmc --align commands."""
from __future__ import annotations

import copy
import itertools
import json

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from sparsemerge.cli.main import main
from sparsemerge.errors import SparsemergeError
from sparsemerge.merge.align import (
    AlignConfig,
    Axis,
    Move,
    PermutationSpec,
    align_,
    apply_permutation,
    llama_spec,
    mlp_spec,
    weight_matching,
)


def _mlp(seed: int, sizes=(8, 16, 12, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (m, n) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(m, n))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU() if i % 2 == 0 else nn.Tanh())
    return nn.Sequential(*layers)


def _random_perms(spec: PermutationSpec, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {s: torch.randperm(n, generator=g) for s, n in spec.spaces.items()}


def test_hand_made_mlp_permutation():
    """B's hidden units are A's in a hand-written order; weight matching finds that order."""
    w1 = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, -1.0]])  # 3 hidden units, 2 inputs
    b1 = torch.tensor([0.5, -0.5, 0.0])
    w2 = torch.tensor([[1.0, -2.0, 0.5]])
    a = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    b = copy.deepcopy(a)
    perm = torch.tensor([2, 0, 1])  # B's unit i is A's unit perm[i]
    with torch.no_grad():
        a[0].weight.copy_(w1), a[0].bias.copy_(b1), a[2].weight.copy_(w2)
        b[0].weight.copy_(w1[perm]), b[0].bias.copy_(b1[perm]), b[2].weight.copy_(w2[:, perm])
    x = torch.randn(7, 2)
    torch.testing.assert_close(a(x), b(x))
    result = align_(a, b)
    # position i of aligned B takes B's unit perm^-1[i]: B's unit 1 holds A's unit 0, ...
    assert result.perms["0.out"].tolist() == [1, 2, 0]
    assert result.moved == {"0.out": 3}
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name
    assert result.similarity_after == pytest.approx(1.0) and result.similarity_before < 1.0


@pytest.mark.parametrize("sizes", [(8, 16, 3), (8, 16, 12, 10, 3)])
def test_mlp_recovers_random_permutation_exactly(sizes):
    a = _mlp(0, sizes)
    spec = mlp_spec(a)
    assert list(spec.spaces) == [f"{2 * k}.out" for k in range(len(sizes) - 2)]
    perms = _random_perms(spec, seed=5)
    b = copy.deepcopy(a)
    b.load_state_dict(apply_permutation(a.state_dict(), spec, perms))
    x = torch.randn(11, sizes[0])
    torch.testing.assert_close(b(x), a(x))  # a permutation keeps the function
    assert not torch.equal(b[0].weight, a[0].weight)
    result = align_(a, b, seed=3)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    for s, p in perms.items():  # aligned position i holds permuted-B unit result[i] = A's unit i
        assert torch.equal(p[result.perms[s]], torch.arange(p.numel()))


def test_alignment_keeps_function_and_raises_similarity():
    a, b = _mlp(0), _mlp(1)
    x = torch.randn(32, 8)
    before = b(x)
    wm = weight_matching(a.state_dict(), b.state_dict(), mlp_spec(a))
    result = align_(a, b)
    torch.testing.assert_close(b(x), before, rtol=1e-5, atol=1e-6)
    assert result.similarity_after > result.similarity_before
    assert result.similarity_after == pytest.approx(wm.similarity_after)
    # the objective equals the cosine of the aligned weights, computed directly (the output
    # layer's bias touches no hidden unit, so the spec leaves it out)
    sa, sb = a.state_dict(), b.state_dict()
    del sa["4.bias"], sb["4.bias"]
    dot = sum(float((sa[n] * sb[n]).sum()) for n in sa)
    norm = (sum(float(sa[n].square().sum()) for n in sa) * sum(float(sb[n].square().sum()) for n in sb)) ** 0.5
    assert result.similarity_after == pytest.approx(dot / norm, rel=1e-5)


def test_single_layer_matching_is_the_optimal_assignment():
    """One hidden layer: the objective is linear in P, so weight matching equals brute force."""
    a, b = _mlp(0, (3, 5, 2)), _mlp(1, (3, 5, 2))
    spec = mlp_spec(a)
    sa, sb = a.state_dict(), b.state_dict()

    def score(p: torch.Tensor) -> float:
        pb = apply_permutation(sb, spec, {"0.out": p})
        return sum(float((sa[n] * pb[n]).sum()) for n in sa if n != "2.bias")

    best = max(itertools.permutations(range(5)), key=lambda p: score(torch.tensor(p)))
    assert weight_matching(sa, sb, spec).perms["0.out"].tolist() == list(best)


def test_llama_round_trip_recovers_heads_mlp_and_hidden():
    a = make_tiny_llama(seed=0, layers=2)
    spec = llama_spec(a)
    assert spec.spaces["model.layers.0.self_attn.kv_heads"] == 2 and spec.spaces["model.layers.0.self_attn.q_heads"] == 4
    # a consistent head permutation: swap the two KV heads (with their query groups), then swap
    # the query heads inside the group now first; MLP and hidden spaces random
    perms = _random_perms(spec, seed=7)
    for i in range(2):
        perms[f"model.layers.{i}.self_attn.kv_heads"] = torch.tensor([1, 0])
        perms[f"model.layers.{i}.self_attn.q_heads"] = torch.tensor([3, 2, 0, 1])
    state_a = dict(a.named_parameters())
    b = make_tiny_llama(seed=0, layers=2)
    with torch.no_grad():
        for n, t in apply_permutation(state_a, spec, perms).items():
            dict(b.named_parameters())[n].copy_(t)
    ids = torch.randint(0, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = a(ids).logits
        torch.testing.assert_close(b(ids).logits, ref, rtol=1e-4, atol=1e-5)
    assert not torch.equal(b.model.layers[0].self_attn.q_proj.weight, a.model.layers[0].self_attn.q_proj.weight)
    result = align_(a, b)
    for n, t in a.named_parameters():
        assert torch.equal(t, dict(b.named_parameters())[n]), n
    assert result.similarity_after == pytest.approx(1.0)
    assert b.lm_head.weight is b.model.embed_tokens.weight  # still tied


def test_llama_independent_models_keep_function():
    a, b = make_tiny_llama(seed=0), make_tiny_llama(seed=1)
    ids = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = b(ids).logits
        result = align_(a, b, scopes=["mlp", "heads"])
        torch.testing.assert_close(b(ids).logits, ref, rtol=1e-4, atol=1e-5)
    assert "hidden" not in result.perms and result.moved["model.layers.0.mlp"] > 0
    assert result.similarity_after > result.similarity_before


def test_errors():
    with pytest.raises(SparsemergeError, match="elementwise"):
        mlp_spec(nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3), nn.Linear(3, 1)))
    with pytest.raises(SparsemergeError, match="at least two Linear"):
        mlp_spec(nn.Sequential(nn.Linear(2, 3)))
    with pytest.raises(SparsemergeError, match="nn.Sequential"):
        mlp_spec(nn.Linear(2, 3))
    a = _mlp(0)
    with pytest.raises(SparsemergeError, match=r"0\.weight has shape \(20, 8\)"):
        align_(a, _mlp(0, (8, 20, 12, 3)))
    with pytest.raises(SparsemergeError, match="cannot align"):
        align_(a, make_tiny_llama())
    with pytest.raises(ValueError):
        AlignConfig(scope=["mlp"])
    with pytest.raises(ValueError):
        AlignConfig(scopes=["ffn"])
    with pytest.raises(SparsemergeError, match="unknown alignment scope"):
        llama_spec(make_tiny_llama(), ["ffn"])
    spec = PermutationSpec({"s": 4}, [Axis("w", 0, "s", unit=2)], [Move("s", 4, (("s", 0, 1),))])
    with pytest.raises(SparsemergeError, match="expected 8 entries on axis 0"):
        spec.check({"w": torch.zeros(4, 3)})


@pytest.fixture
def two_llamas(two_tiny_llama_dirs):
    return two_tiny_llama_dirs


def test_align_cli_writes_permuted_b(two_llamas, tmp_path, capsys):
    from sparsemerge.io import load_model

    a_dir, b_dir = two_llamas
    out = tmp_path / "b-aligned"
    assert main(["align", str(a_dir), str(b_dir), str(out), "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "cosine" in text and "model.layers.0.mlp" in text
    report = json.loads((out / "alignment.json").read_text())
    assert report["similarity_after"] > report["similarity_before"]
    ids = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(2))
    aligned, original = load_model(out).model, load_model(b_dir).model
    with torch.no_grad():
        torch.testing.assert_close(aligned(ids).logits, original(ids).logits, rtol=1e-4, atol=1e-5)
    expected = make_tiny_llama(seed=1)
    align_(make_tiny_llama(seed=0), expected, seed=1)
    for n, t in expected.named_parameters():
        assert torch.equal(dict(aligned.named_parameters())[n], t), n
    assert main(["align", str(a_dir), str(b_dir), str(out)]) == 2  # exists, no --overwrite
    assert "already exists" in capsys.readouterr().err
    assert main(["align", str(a_dir), str(b_dir), str(tmp_path / "x"), "--scope", "heads"]) == 0


def test_lmc_align_cli(two_llamas, text_file, tmp_path, capsys):
    a_dir, b_dir = two_llamas
    data = tmp_path / "curve.json"
    plot = tmp_path / "curve.png"
    args = ["lmc", str(a_dir), str(b_dir), "--data", str(text_file), "--grid", "3", "--seqlen", "32",
            "--max-windows", "2", "--json", str(data), "--out", str(plot), "--no-progress", "--align"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "aligned" in text and "barrier" in text
    curve = json.loads(data.read_text())
    assert "unaligned" in curve and "alignment" in curve
    # the ends: A is the same, and aligned B computes what B computes
    assert curve["points"][0]["loss"] == pytest.approx(curve["unaligned"]["points"][0]["loss"], rel=1e-6)
    assert curve["points"][-1]["loss"] == pytest.approx(curve["unaligned"]["points"][-1]["loss"], rel=1e-4)
    assert plot.read_bytes()[:4] == b"\x89PNG"
