"""Pure tensor functions: importance scores + pattern -> boolean keep-mask, and checks.

Conventions: a weight has shape ``(out_features, in_features)``; N:M groups run along
the input (last) dimension, as the hardware layouts do (chapter 10.1.1: groups
``G_i = [w_{i,4j}, ..., w_{i,4j+3}]``). ``True`` in a mask means *keep*.
Scores are non-negative importances (e.g. ``|W|``); larger is more important.
N:M ties are broken towards the lower index; every function is deterministic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.patterns import NM, Block, Hierarchical, Pattern, Unstructured, parse_pattern

# Up to this M a group's ranks come from pairwise comparisons (O(M^2) elementwise ops on
# contiguous views), which beats torch.topk + scatter; above it we fall back to topk.
_PAIRWISE_MAX_M = 8
# On CPU a numba kernel (masks_fast.py) does the same ranking in one memory-bound pass.
_FAST_MAX_M = 32


def _check_scores(scores: torch.Tensor, what: str = "scores") -> None:
    if not isinstance(scores, torch.Tensor):
        raise SparsemergeError(f"{what} must be a torch.Tensor, got {type(scores).__name__}")
    if scores.is_floating_point() and torch.isnan(scores).any():
        raise SparsemergeError(
            f"{what} contain NaN; the weights (or calibration statistics) are corrupt - "
            "check the source checkpoint"
        )


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest scores in every group of ``m`` along the last dimension.

    ``M_ij = 1[w_ij in TopN(G)]`` (chapter 10.1.2, greedy magnitude rule generalised to N:M).
    """
    pattern = NM(n, m)  # validates 0 < n < m
    _check_scores(scores)
    if scores.dim() == 0 or scores.shape[-1] % m != 0:
        raise SparsemergeError(
            f"N:M {pattern} groups the last dimension in runs of {m}, but it has size "
            f"{scores.shape[-1] if scores.dim() else 0} (shape {tuple(scores.shape)}), "
            f"which is not divisible by {m}; exclude this tensor or choose another M"
        )
    groups = scores.reshape(-1, m)
    if scores.device.type == "cpu" and scores.is_floating_point() and m <= _FAST_MAX_M:
        from sparsemerge.masks_fast import nm_keep_cpu

        keep = nm_keep_cpu(groups, n, m)
    elif m <= _PAIRWISE_MAX_M:
        keep = _nm_keep_pairwise(groups, n, m)
    else:
        # A stable descending sort keeps the lower index first among equal scores.
        order = torch.sort(groups, dim=1, descending=True, stable=True).indices
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, order[:, :n], True)
    return keep.reshape(scores.shape)


def nm_mask_reference(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Pure-torch N:M mask (pairwise ranks or stable sort): the reference the fast path is tested against."""
    NM(n, m)
    groups = scores.reshape(-1, m)
    if m <= _PAIRWISE_MAX_M:
        return _nm_keep_pairwise(groups, n, m).reshape(scores.shape)
    order = torch.sort(groups, dim=1, descending=True, stable=True).indices
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, order[:, :n], True)
    return keep.reshape(scores.shape)


def _nm_keep_pairwise(groups: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """rank_i = #{j : s_j > s_i} + #{j < i : s_j == s_i}; keep where rank_i < n."""
    cols = [groups[:, i] for i in range(m)]
    keep = []
    for i in range(m):
        rank = torch.zeros_like(cols[i], dtype=torch.int8)
        for j in range(m):
            if j == i:
                continue
            beats = cols[j] >= cols[i] if j < i else cols[j] > cols[i]
            rank += beats
        keep.append(rank < n)
    return torch.stack(keep, dim=1)


def block_mask(scores: torch.Tensor, rows: int, cols: int, sparsity: float) -> torch.Tensor:
    """Zero the ``round(sparsity * #blocks)`` blocks with the smallest summed score (10.2.4)."""
    pattern = Block(rows, cols, sparsity)
    _check_scores(scores)
    if scores.dim() != 2:
        raise SparsemergeError(f"block sparsity needs a 2-D weight, got shape {tuple(scores.shape)}")
    out_f, in_f = scores.shape
    if out_f % rows or in_f % cols:
        raise SparsemergeError(
            f"block pattern {pattern} needs the shape divisible by {rows}x{cols}, got "
            f"{out_f}x{in_f}; exclude this tensor or choose another block size"
        )
    block_scores = scores.reshape(out_f // rows, rows, in_f // cols, cols).sum(dim=(1, 3))
    keep_blocks = _drop_bottom_fraction(block_scores.flatten(), sparsity).reshape(block_scores.shape)
    return keep_blocks.repeat_interleave(rows, 0).repeat_interleave(cols, 1)


def hier_mask(scores: torch.Tensor, pattern: "Hierarchical | str") -> torch.Tensor:
    """Hierarchical N:M keep-mask (chapter 10.2.5): fine ``n:m`` first, then per row tile
    (``rows`` x ``block``) the ``k`` of every ``l`` blocks with the largest summed *kept* score.

    ``F = nm_mask(S)``; ``T[t, b] = sum_{i in tile t, j in block b} S_ij F_ij``;
    ``C = nm_mask(T, k, l)`` (ties towards the lower block); ``M = F & C`` expanded.
    """
    pattern = parse_pattern(pattern)
    if not isinstance(pattern, Hierarchical):
        raise SparsemergeError(f"hier_mask needs a hierarchical pattern such as hier:1:4@16/2:4, got {pattern}")
    _check_scores(scores)
    reason = pattern_applicable(tuple(scores.shape), pattern)
    if reason is not None:
        raise SparsemergeError(f"pattern {pattern} cannot apply: {reason}; exclude this tensor or choose another pattern")
    out_f, in_f = scores.shape
    R, B = pattern.rows, pattern.block
    fine = nm_mask(scores, pattern.n, pattern.m)
    kept = torch.where(fine, scores, torch.zeros((), dtype=scores.dtype, device=scores.device)).float()
    tiles = kept.reshape(out_f // R, R, in_f // B, B).sum(dim=(1, 3))  # (tiles, blocks per row)
    coarse = nm_mask(tiles, pattern.k, pattern.l)
    return fine & coarse.repeat_interleave(R, 0).repeat_interleave(B, 1)


def unstructured_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Zero the ``round(sparsity * numel)`` smallest scores (per row when ``per_row``)."""
    Unstructured(sparsity)  # validates the fraction
    _check_scores(scores)
    if per_row:
        if scores.dim() < 2:
            raise SparsemergeError("per-row unstructured masks need a 2-D weight")
        flat = scores.reshape(scores.shape[0], -1)
        n_keep = flat.shape[1] - int(round(sparsity * flat.shape[1]))
        keep = torch.zeros_like(flat, dtype=torch.bool)
        if n_keep > 0:
            idx = torch.topk(flat.float(), n_keep, dim=1, sorted=False).indices
            keep.scatter_(1, idx, True)
        return keep.reshape(scores.shape)
    return _drop_bottom_fraction(scores.flatten(), sparsity).reshape(scores.shape)


def _drop_bottom_fraction(flat: torch.Tensor, sparsity: float) -> torch.Tensor:
    # round(sparsity * n) from the sparsity itself: 1 - (1 - 0.15) = 0.15000000000000002 made
    # round(0.15 * 70) = 11 instead of 10
    n_keep = flat.numel() - int(round(sparsity * flat.numel()))
    keep = torch.zeros_like(flat, dtype=torch.bool)
    if n_keep > 0:
        keep[torch.topk(flat.float(), n_keep, sorted=False).indices] = True
    return keep


def global_threshold(score_list: list[torch.Tensor], sparsity: float) -> float:
    """Score below which weights are zeroed so that ``sparsity`` of all of them go (global)."""
    Unstructured(sparsity)
    total = sum(s.numel() for s in score_list)
    n_zero = int(round(sparsity * total))
    if n_zero == 0:
        return -math.inf
    flat = torch.cat([s.flatten().float() for s in score_list])
    return float(torch.kthvalue(flat, n_zero).values)


def mask_for(scores: torch.Tensor, pattern: "Pattern | str") -> torch.Tensor:
    """Dispatch: the keep-mask of ``scores`` under any pattern (global scope acts per tensor here)."""
    pattern = parse_pattern(pattern)
    if isinstance(pattern, NM):
        return nm_mask(scores, pattern.n, pattern.m)
    if isinstance(pattern, Block):
        return block_mask(scores, pattern.rows, pattern.cols, pattern.sparsity)
    if isinstance(pattern, Hierarchical):
        return hier_mask(scores, pattern)
    return unstructured_mask(scores, pattern.sparsity)


def pattern_applicable(shape: tuple[int, ...], pattern: "Pattern | str") -> "str | None":
    """``None`` when the pattern can be applied to a weight of ``shape``, else the reason."""
    pattern = parse_pattern(pattern)
    if len(shape) != 2:
        return f"not a 2-D weight (shape {tuple(shape)})"
    if isinstance(pattern, NM) and shape[1] % pattern.m:
        return f"input dimension {shape[1]} not divisible by M={pattern.m}"
    if isinstance(pattern, Block) and (shape[0] % pattern.rows or shape[1] % pattern.cols):
        return f"shape {shape[0]}x{shape[1]} not divisible by block {pattern.rows}x{pattern.cols}"
    if isinstance(pattern, Hierarchical):
        if shape[1] % pattern.span:
            return f"input dimension {shape[1]} not divisible by B*L = {pattern.block}*{pattern.l} = {pattern.span}"
        if shape[0] % pattern.rows:
            return f"output dimension {shape[0]} not divisible by the row tile R={pattern.rows}"
    return None


@dataclass
class ConformanceReport:
    """How one tensor measures against a pattern."""

    shape: tuple[int, ...]
    sparsity: float  # fraction of exact zeros
    violations: int  # N:M: groups with more than N nonzeros; block/unstructured: zeros missing
    units: int  # N:M: number of groups; block: number of blocks; unstructured: numel
    # hierarchical: violations and units are fine + coarse; each level's (violations, units) here
    levels: "dict[str, tuple[int, int]] | None" = None

    @property
    def ok(self) -> bool:
        return self.violations == 0


def check_pattern(weight: torch.Tensor, pattern: "Pattern | str") -> ConformanceReport:
    """Measure ``weight`` against ``pattern``.

    N:M: every group of M along the input dimension must hold at most N nonzeros.
    Block: at least ``round(S * #blocks)`` blocks must be all zero.
    Unstructured: at least ``round(S * numel)`` weights must be zero.
    Hierarchical: every group of M at most N nonzeros (fine) and, per row tile, every run of
    L blocks at most K blocks holding a nonzero (coarse); violations counted at both levels.
    """
    pattern = parse_pattern(pattern)
    reason = pattern_applicable(tuple(weight.shape), pattern)
    if reason is not None and not isinstance(pattern, Unstructured):
        raise SparsemergeError(f"pattern {pattern} cannot apply: {reason}")
    nonzero = weight != 0
    sparsity = 1.0 - nonzero.sum().item() / max(weight.numel(), 1)
    if isinstance(pattern, NM):
        per_group = nonzero.reshape(-1, pattern.m).sum(dim=1)
        return ConformanceReport(tuple(weight.shape), sparsity, int((per_group > pattern.n).sum()), per_group.numel())
    if isinstance(pattern, Block):
        out_f, in_f = weight.shape
        blocks = nonzero.reshape(out_f // pattern.rows, pattern.rows, in_f // pattern.cols, pattern.cols).any(dim=(1, 3))
        need = int(round(pattern.sparsity * blocks.numel()))
        zero_blocks = int((~blocks).sum())
        return ConformanceReport(tuple(weight.shape), sparsity, max(0, need - zero_blocks), blocks.numel())
    if isinstance(pattern, Hierarchical):
        out_f, in_f = weight.shape
        per_group = nonzero.reshape(-1, pattern.m).sum(dim=1)
        fine = (int((per_group > pattern.n).sum()), per_group.numel())
        used = nonzero.reshape(out_f // pattern.rows, pattern.rows, in_f // pattern.block, pattern.block).any(dim=(1, 3))
        per_run = used.reshape(-1, pattern.l).sum(dim=1)
        coarse = (int((per_run > pattern.k).sum()), per_run.numel())
        return ConformanceReport(tuple(weight.shape), sparsity, fine[0] + coarse[0], fine[1] + coarse[1],
                                 {"fine": fine, "coarse": coarse})
    need = int(round(pattern.sparsity * weight.numel()))
    zeros = weight.numel() - int(nonzero.sum())
    return ConformanceReport(tuple(weight.shape), sparsity, max(0, need - zeros), weight.numel())
