"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter 2023, arXiv:2306.11695).

Score ``S_ij = |W_ij| * ||X_j||_2`` where ``X_j`` is input feature ``j`` over all calibration
tokens. Scores are compared within each output row (Wanda's per-output comparison group):
N:M keeps the N best of every M consecutive weights of a row, ``unstructured:S`` zeroes the
``round(S * in_features)`` lowest scores of each row, ``blockRxC:S`` zeroes the blocks with
the lowest summed score, ``hier:...`` keeps N:M per row and the blocks with the largest
summed kept score per row tile. No weight update. Calibration runs block by block
(:mod:`sparsemerge.prune.calibration`); by default one-shot (``sequential="off"``: norms from
the dense model's activations); ``"block"``/``"layer"`` take them from the pruned prefix.
"""
from __future__ import annotations

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import block_mask, hier_mask, nm_mask
from sparsemerge.patterns import NM, Block, Hierarchical, Pattern, Unstructured, parse_pattern
from sparsemerge.prune.base import METHODS, Target
from sparsemerge.prune.calibration import CalibratedMethod
from sparsemerge.prune.config import PruneConfig


class InputNorms:
    """Running ``sum_t x_tj^2`` per input feature ``j`` (float32): ``||X_j||_2^2``."""

    def __init__(self, in_features: int, device: "torch.device | None" = None) -> None:
        self.sq = torch.zeros(in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        self.sq += (x * x).sum(dim=0)
        self.tokens += x.shape[0]

    @property
    def norms(self) -> torch.Tensor:
        """``||X_j||_2`` per input feature."""
        return self.sq.sqrt()


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """``|W_ij| * ||X_j||_2`` (float32), ``weight``: ``(out, in)``, ``norms``: ``(in,)``."""
    if norms.shape != (weight.shape[1],):
        raise SparsemergeError(f"input norms have shape {tuple(norms.shape)}, expected ({weight.shape[1]},)")
    return weight.detach().float().abs() * norms.float().reshape(1, -1)


def wanda_mask(scores: torch.Tensor, pattern: "Pattern | str") -> torch.Tensor:
    """Keep-mask of Wanda scores under ``pattern`` (comparisons within each output row)."""
    pattern = parse_pattern(pattern)
    if isinstance(pattern, NM):
        return nm_mask(scores, pattern.n, pattern.m)
    if isinstance(pattern, Block):
        return block_mask(scores, pattern.rows, pattern.cols, pattern.sparsity)
    if isinstance(pattern, Hierarchical):  # N:M per row, blocks by summed score per row tile
        return hier_mask(scores, pattern)
    if isinstance(pattern, Unstructured) and pattern.scope == "layer":
        return per_row_mask(scores, pattern.sparsity)
    raise SparsemergeError(f"wanda cannot apply pattern {pattern}: it compares weights within a layer's rows")


def per_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the lowest scores of each row, ``round(S * numel)`` in all: row ``r`` loses
    ``round(S * in * (r + 1)) - round(S * in * r)`` (floor or ceil of ``S * in``), so the layer
    meets ``unstructured:S`` exactly even when ``S * in`` is not an integer."""
    Unstructured(sparsity)
    rows, cols = scores.shape
    bounds = torch.round(sparsity * cols * torch.arange(rows + 1, dtype=torch.float64)).long()
    n_zero = (bounds[1:] - bounds[:-1]).to(scores.device)  # (rows,)
    order = torch.sort(scores.float(), dim=1, stable=True).indices  # ascending
    drop_sorted = torch.arange(cols, device=scores.device).reshape(1, -1) < n_zero.reshape(-1, 1)
    keep = torch.ones_like(scores, dtype=torch.bool)
    keep.scatter_(1, order, ~drop_sorted)
    return keep


@METHODS.register("wanda")
class Wanda(CalibratedMethod):
    name = "wanda"
    # One-shot: norms from the dense model's activations. On SmolLM2 2:4 it beat both
    # sequential walks (BENCHMARKS.md, issue 6) and needs one block pass instead of two.
    default_sequential = "off"

    def make_stats(self, target: Target, config: PruneConfig) -> InputNorms:
        return InputNorms(target.weight.shape[1], target.weight.device)

    @torch.no_grad()
    def prune_layer(self, target: Target, stats: InputNorms, config: PruneConfig) -> None:
        keep = wanda_mask(wanda_scores(target.weight, stats.norms), target.pattern)
        target.weight.mul_(keep.to(target.weight.dtype))
