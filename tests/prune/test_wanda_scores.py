"""Wanda: score |W| * ||X||, per-row comparison groups, every pattern."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import check_pattern
from sparsemerge.prune.wanda import InputNorms, per_row_mask, wanda_mask, wanda_scores


def test_hand_case_2_4_keeps_3_4_7_8():
    weight = torch.arange(1.0, 9.0).reshape(1, 8)
    norms = torch.ones(8)
    keep = wanda_mask(wanda_scores(weight, norms), "2:4")
    assert keep.nonzero()[:, 1].tolist() == [2, 3, 6, 7]  # weights 3, 4, 7, 8


def test_activation_norms_change_the_choice():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    norms = torch.tensor([10.0, 10.0, 1.0, 1.0])  # scores 10, 20, 3, 4
    keep = wanda_mask(wanda_scores(weight, norms), "2:4")
    assert keep.tolist() == [[True, True, False, False]]


def test_input_norms_accumulate_l2_norm_over_tokens():
    torch.manual_seed(0)
    xs = [torch.randn(7, 5), torch.randn(3, 5)]
    stats = InputNorms(5)
    for x in xs:
        stats.add(x)
    assert stats.tokens == 10
    torch.testing.assert_close(stats.norms, torch.cat(xs).norm(dim=0))


def test_unstructured_compares_within_rows():
    # row 0 has huge weights, row 1 tiny ones: a per-layer threshold would empty row 1
    weight = torch.cat([torch.arange(1.0, 9.0) * 100, torch.arange(1.0, 9.0)]).reshape(2, 8)
    keep = wanda_mask(wanda_scores(weight, torch.ones(8)), "unstructured:0.5")
    assert keep.sum(dim=1).tolist() == [4, 4]
    assert keep[1].nonzero().flatten().tolist() == [4, 5, 6, 7]


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), cols=st.integers(1, 23), sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 99))
def test_per_row_mask_meets_the_layer_sparsity_exactly(rows, cols, sparsity, seed):
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    keep = per_row_mask(scores, sparsity)
    zeros = (~keep).sum(dim=1)
    assert int(zeros.sum()) == int(round(sparsity * rows * cols))
    assert int(zeros.max() - zeros.min()) <= 1
    # within each row, every dropped score is <= every kept one
    for r in range(rows):
        if keep[r].any() and (~keep[r]).any():
            assert scores[r][~keep[r]].max() <= scores[r][keep[r]].min()


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "2:8", "unstructured:0.3", "unstructured:0.7", "block4:0.5"])
def test_every_pattern_conforms(pattern):
    torch.manual_seed(1)
    weight = torch.randn(16, 32)
    keep = wanda_mask(wanda_scores(weight, torch.rand(32)), pattern)
    assert check_pattern(weight * keep, pattern).ok


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(SparsemergeError, match="expected \\(8,\\)"):
        wanda_scores(torch.ones(2, 8), torch.ones(4))
    with pytest.raises(SparsemergeError, match="rows"):
        wanda_mask(torch.ones(2, 8), "unstructured-global:0.5")
