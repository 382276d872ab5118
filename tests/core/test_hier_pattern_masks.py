"""Hierarchical N:M (chapter 10.2.5): the pattern value and its syntax, the mask (hand-worked
cases, brute force over the block choices, hypothesis properties), applicability and the
two-level conformance check."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import check_pattern, hier_mask, mask_for, nm_mask, pattern_applicable
from sparsemerge.patterns import PATTERN_SYNTAX_HELP, Hierarchical, parse_pattern


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hier:1:4@16/2:4", Hierarchical(1, 4, 16, 2, 4, 16)),  # the chapter's 1:4 of 16x16 blocks, then 2:4
        ("hier:2:4@8x16/2:4", Hierarchical(2, 4, 16, 2, 4, 8)),
        (" HIER:1:2 @ 1x8 / 1:4 ", Hierarchical(1, 2, 8, 1, 4, 1)),
        ("hier:3:8@32/4:8", Hierarchical(3, 8, 32, 4, 8, 32)),
    ],
)
def test_parse_hierarchical(text, expected):
    assert parse_pattern(text) == expected
    assert parse_pattern(str(expected)) == expected  # str() round-trips
    assert parse_pattern(expected) is expected


def test_density_is_the_product_of_the_levels():
    p = parse_pattern("hier:1:4@16/2:4")
    # 1 - prod N_i/M_i = 1 - (1/4)(2/4) = 0.875 (10.2.5)
    assert p.density == pytest.approx(0.125) and p.sparsity == pytest.approx(0.875)
    assert str(p.fine) == "2:4" and p.span == 64
    assert str(parse_pattern("hier:2:4@1x16/2:4")) == "hier:2:4@1x16/2:4"


@pytest.mark.parametrize(
    "text, words",
    [
        ("hier:4:4@16/2:4", "0 < K < L"),
        ("hier:0:4@16/2:4", "0 < K < L"),
        ("hier:5:4@16/2:4", "0 < K < L"),
        ("hier:1:4@6/2:4", "multiple of M=4"),
        ("hier:1:4@0x16/2:4", "row tile"),
        ("hier:1:4@16/4:4", "fine level"),
        ("hier:1:4@16/0:4", "fine level"),
        ("hier:1:4/2:4", "hier:K:L@B/N:M"),
        ("hier:1:4@16", "hier:K:L@B/N:M"),
    ],
)
def test_parse_rejects_with_a_clear_error(text, words):
    with pytest.raises(SparsemergeError, match=None) as info:
        parse_pattern(text)
    assert words in str(info.value)


def test_syntax_help_names_the_hierarchical_form():
    assert "hier:K:L@B/N:M" in PATTERN_SYNTAX_HELP and "hier:K:L@RxB/N:M" in PATTERN_SYNTAX_HELP
    with pytest.raises(SparsemergeError):
        Hierarchical(1, 2, 8, 2, 4, True)  # a bool is not a row tile


def test_hand_worked_mask():
    # one row, B = 4, 1 of 2 blocks, 2:4: the fine level keeps {9, 8} in block 0 and {7, 6}
    # in block 1, block 0's kept score (17) beats block 1's (13), so block 1 is dropped whole
    s = torch.tensor([[9.0, 1.0, 8.0, 2.0, 7.0, 6.0, 5.0, 5.5]])
    m = hier_mask(s, "hier:1:2@1x4/2:4")
    assert m.tolist() == [[True, False, True, False, False, False, False, False]]
    # per block totals would prefer block 1 (23.5 vs 20): the choice uses the N:M-kept scores only
    s2 = torch.tensor([[9.0, 0.0, 8.0, 3.0, 7.0, 6.0, 5.0, 5.5]])
    assert s2[0, :4].sum() < s2[0, 4:].sum()
    assert hier_mask(s2, "hier:1:2@1x4/2:4").tolist() == [[True, False, True, False, False, False, False, False]]


def test_row_tile_shares_the_block_choice_and_ties_go_low():
    # two rows in one tile: row 0 prefers block 1, row 1 prefers block 0 more strongly
    s = torch.tensor([[1.0, 1.0, 0.0, 0.0, 2.0, 2.0, 0.0, 0.0],
                      [5.0, 5.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]])
    tiled = hier_mask(s, "hier:1:2@2x4/2:4")
    assert tiled[:, :4].any(dim=1).all() and not tiled[:, 4:].any()  # both rows keep block 0
    per_row = hier_mask(s, "hier:1:2@1x4/2:4")
    assert per_row[0, 4:].any() and per_row[1, :4].any()  # R = 1: each row chooses
    tie = torch.ones(1, 8)
    assert hier_mask(tie, "hier:1:2@1x4/2:4").tolist() == [[True, True, False, False, False, False, False, False]]


def test_block_choice_maximises_the_kept_score_brute_force():
    g = torch.Generator().manual_seed(3)
    p = Hierarchical(2, 4, 4, 2, 4, 2)
    s = torch.rand(2, 16, generator=g)
    fine = nm_mask(s, 2, 4)
    block_score = (s * fine).reshape(2, 4, 4).sum(dim=(0, 2))  # (4 blocks)
    best = max(itertools.combinations(range(4), 2), key=lambda c: float(block_score[list(c)].sum()))
    keep = hier_mask(s, p)
    kept_blocks = [b for b in range(4) if keep[:, 4 * b : 4 * b + 4].any()]
    assert kept_blocks == sorted(best)
    assert torch.equal(keep, fine & keep.reshape(2, 4, 4).any(dim=2, keepdim=True).expand(2, 4, 4).reshape(2, 16))


@st.composite
def hier_cases(draw):
    m = draw(st.sampled_from([2, 4, 8]))
    n = draw(st.integers(1, m - 1))
    block = m * draw(st.integers(1, 3))
    l = draw(st.integers(2, 4))
    k = draw(st.integers(1, l - 1))
    r = draw(st.sampled_from([1, 2, 4]))
    rows = r * draw(st.integers(1, 3))
    cols = block * l * draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    scores = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed))
    if draw(st.booleans()):  # heavy ties
        scores = (scores * 3).floor()
    return Hierarchical(k, l, block, n, m, r), scores


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=hier_cases())
def test_mask_properties(case):
    p, scores = case
    keep = mask_for(scores, p)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    # exact density K/L * N/M, conformance at both levels, and inside the fine N:M mask
    assert int(keep.sum()) * p.l * p.m == scores.numel() * p.k * p.n
    report = check_pattern(torch.where(keep, scores + 1, torch.zeros(())), p)
    assert report.ok and report.levels["fine"][0] == 0 and report.levels["coarse"][0] == 0
    assert not (keep & ~nm_mask(scores, p.n, p.m)).any()
    assert torch.equal(keep, hier_mask(scores.clone(), p))  # deterministic


def test_applicability_and_errors():
    p = parse_pattern("hier:1:2@8x16/2:4")
    assert pattern_applicable((16, 64), p) is None
    assert "B*L = 16*2 = 32" in pattern_applicable((16, 48), p)
    assert "row tile R=8" in pattern_applicable((12, 64), p)
    assert "2-D" in pattern_applicable((4, 4, 32), p)
    with pytest.raises(SparsemergeError, match="divisible"):
        hier_mask(torch.rand(12, 64), p)
    with pytest.raises(SparsemergeError, match="cannot apply"):
        check_pattern(torch.rand(16, 48), p)
    with pytest.raises(SparsemergeError, match="hierarchical"):
        hier_mask(torch.rand(16, 64), "2:4")
    with pytest.raises(SparsemergeError, match="NaN"):
        hier_mask(torch.full((16, 64), float("nan")), p)


def test_check_counts_violations_at_both_levels():
    p = parse_pattern("hier:1:2@2x4/2:4")
    w = torch.zeros(2, 16)
    w[0, 0:2] = 1.0  # block 0 of run 0: fine
    assert check_pattern(w, p).ok
    w[1, 4] = 1.0  # row 1 uses block 1 too: the tile now holds 2 nonzero blocks in run 0
    r = check_pattern(w, p)
    assert r.levels == {"fine": (0, 8), "coarse": (1, 2)} and r.violations == 1 and r.units == 10
    w[0, 8:11] = 1.0  # 3 nonzeros in one group of 4 (run 1 still uses one block)
    r = check_pattern(w, p)
    assert r.levels == {"fine": (1, 8), "coarse": (1, 2)} and r.violations == 2
    assert r.sparsity == pytest.approx(1 - 6 / 32)
