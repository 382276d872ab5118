import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import (
    block_mask,
    check_pattern,
    global_threshold,
    mask_for,
    nm_mask,
    nm_mask_reference,
    unstructured_mask,
)

NM_CASES = [(1, 4), (2, 4), (3, 4), (2, 8), (4, 8), (1, 8), (5, 16), (16, 32)]


def test_chapter_exercise_1():
    w = torch.tensor([0.5, -0.2, 0.8, -0.1, 0.3, 0.7, -0.6, 0.4])
    pruned = w * nm_mask(w.abs(), 2, 4)
    assert torch.equal(pruned, torch.tensor([0.5, 0, 0.8, 0, 0, 0.7, -0.6, 0]))


@settings(max_examples=40, deadline=None)
@given(
    case=st.sampled_from(NM_CASES),
    rows=st.integers(1, 6),
    groups=st.integers(1, 5),
    seed=st.integers(0, 2**16),
    quantize=st.booleans(),
)
def test_nm_mask_properties(case, rows, groups, seed, quantize):
    n, m = case
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows, groups * m, generator=g).abs()
    if quantize:  # many ties
        scores = (scores * 2).round()
    keep = nm_mask(scores, n, m)
    per_group = keep.reshape(-1, m)
    assert (per_group.sum(1) == n).all()  # exactly N kept in every group
    # every kept score >= every dropped score in its group
    s = scores.reshape(-1, m)
    kept_min = torch.where(per_group, s, torch.full_like(s, math.inf)).min(1).values
    dropped_max = torch.where(~per_group, s, torch.full_like(s, -math.inf)).max(1).values
    assert (kept_min >= dropped_max).all()
    assert torch.equal(keep, nm_mask_reference(scores, n, m))  # fast path == reference


def test_nm_mask_matches_topk_without_ties():
    scores = torch.randn(32, 64).abs()
    for n, m in NM_CASES:
        idx = torch.topk(scores.reshape(-1, m), n, dim=1).indices
        ref = torch.zeros(scores.numel() // m, m, dtype=torch.bool).scatter_(1, idx, True).reshape(scores.shape)
        assert torch.equal(nm_mask(scores, n, m), ref)


def test_nm_mask_ties_prefer_lower_index():
    keep = nm_mask(torch.ones(1, 8), 2, 4)
    assert keep.int().tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]]


def test_nm_mask_bad_input():
    with pytest.raises(SparsemergeError, match="not divisible by 4"):
        nm_mask(torch.rand(4, 6), 2, 4)
    with pytest.raises(SparsemergeError, match="0 < N < M"):
        nm_mask(torch.rand(4, 8), 4, 4)
    with pytest.raises(SparsemergeError, match="M > 0"):
        nm_mask(torch.rand(4, 8), 2, 0)
    with pytest.raises(SparsemergeError, match="NaN"):
        nm_mask(torch.tensor([[1.0, float("nan"), 0.2, 0.3]]), 2, 4)


@settings(max_examples=25, deadline=None)
@given(sparsity=st.floats(0.0, 0.95), blocks_r=st.integers(1, 5), blocks_c=st.integers(1, 5), size=st.sampled_from([2, 4]))
def test_block_mask_hits_density(sparsity, blocks_r, blocks_c, size):
    scores = torch.rand(blocks_r * size, blocks_c * size)
    keep = block_mask(scores, size, size, sparsity)
    nblocks = blocks_r * blocks_c
    kept_blocks = keep.reshape(blocks_r, size, blocks_c, size).all(3).all(1)
    any_blocks = keep.reshape(blocks_r, size, blocks_c, size).any(3).any(1)
    assert torch.equal(kept_blocks, any_blocks)  # blocks are whole
    assert int((~any_blocks).sum()) == round(sparsity * nblocks)
    report = check_pattern(scores * keep, f"block{size}:{sparsity}")
    assert report.ok


def test_block_mask_keeps_largest_blocks():
    scores = torch.zeros(4, 4)
    scores[:2, 2:] = 5.0  # the top-right 2x2 block is the most important
    scores[2:, :2] = 1.0
    keep = block_mask(scores, 2, 2, 0.75)
    assert keep[:2, 2:].all() and keep.sum() == 4


@settings(max_examples=25, deadline=None)
@given(sparsity=st.floats(0.0, 0.99), numel=st.integers(1, 300))
def test_unstructured_mask_hits_density(sparsity, numel):
    scores = torch.rand(numel)
    keep = unstructured_mask(scores, sparsity)
    assert int((~keep).sum()) == round(sparsity * numel)
    if keep.any() and (~keep).any():
        assert scores[keep].min() >= scores[~keep].max()


def test_unstructured_per_row():
    scores = torch.rand(5, 10)
    keep = unstructured_mask(scores, 0.3, per_row=True)
    assert (keep.sum(1) == 7).all()


def test_global_threshold():
    a, b = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([0.5, 5.0])
    t = global_threshold([a, b], 0.5)  # zero the 3 smallest of 6: 0.5, 1, 2
    assert (a > t).sum() + (b > t).sum() == 3 and t == 2.0


def test_check_pattern_counts_violations():
    w = torch.tensor([[1.0, 2.0, 3.0, 0.0, 1.0, 0.0, 0.0, 1.0]])
    report = check_pattern(w, "2:4")
    assert report.violations == 1 and report.units == 2 and not report.ok
    assert check_pattern(w * mask_for(w.abs(), "2:4"), "2:4").ok
    with pytest.raises(SparsemergeError):
        check_pattern(torch.ones(2, 6), "2:4")
