"""SparseGPT: one-shot OBS prune-and-reconstruct (Frantar & Alistarh 2023, arXiv:2301.00774).

For a Linear layer ``W`` (out x in) with calibration inputs ``X`` (tokens x in), minimise
``||W X^T - W' X^T||^2`` over ``W'`` with the pattern's zeros:

* Hessian ``H = 2/n * X^T X`` (float32); dead inputs (``H_jj = 0``) get ``H_jj = 1`` and
  ``W[:, j] = 0``; dampening ``H += lambda * mean(diag H) * I``.
* ``U`` = upper Cholesky factor of ``H^-1`` (``H^-1 = U^T U``); its rows give the inverse
  Hessians of the remaining columns after each elimination (Alg. 1 of the paper).
* Columns are processed in blocks of ``blocksize``; within a block, column ``j`` is pruned
  (``q = w_j * mask_j``), the error ``e = (w_j - q) / U_jj`` is propagated to the later
  columns ``W[:, j:] -= e U[j, j:]``, and after the block the accumulated errors update all
  remaining columns at once (lazy batch updates).
* Masks: N:M - for every M consecutive columns, when the first is reached, keep the N with
  the largest ``w^2 / U_jj^2`` per row (on the already-updated weights); unstructured - per
  column block, zero the lowest ``w^2 / U_jj^2`` of the block; block patterns (rows x cols
  tiles) - the mask is chosen once up front from the same saliency summed per tile, and the
  OBS update reconstructs around it; hierarchical N:M - the kept blocks are chosen up front
  (:func:`~sparsemerge.masks.hier_mask` of the saliency), the N:M inside them as for N:M.

If the Cholesky factorisation fails, the dampening is multiplied by 10 step by step (a
warning says so) up to 100% of the mean diagonal.
"""
from __future__ import annotations

import warnings

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import block_mask, hier_mask
from sparsemerge.patterns import NM, Block, Hierarchical, Pattern, Unstructured, parse_pattern
from sparsemerge.prune.base import METHODS, Target
from sparsemerge.prune.calibration import CalibratedMethod
from sparsemerge.prune.config import PruneConfig
from sparsemerge.prune.sparsegpt_fast import obs_block

MAX_DAMPENING = 1.0
SYMMETRIC_SPLIT_MIN = 512  # from this width, accumulate X^T X as three half-blocks


class Hessian:
    """Running ``sum_t x_t x_t^T`` (float32) over calibration tokens; ``value`` is ``2/n`` of it."""

    def __init__(self, in_features: int, device: "torch.device | None" = None) -> None:
        self.xtx = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.float()
        d = x.shape[1]
        if d < SYMMETRIC_SPLIT_MIN:
            self.xtx.addmm_(x.T, x)
        else:  # X^T X is symmetric: compute 3 of its 4 half-blocks (-25% flops), mirror in ``value``
            h = d // 2
            a, b = x[:, :h], x[:, h:]
            self.xtx[:h, :h].addmm_(a.T, a)
            self.xtx[h:, :h].addmm_(b.T, a)
            self.xtx[h:, h:].addmm_(b.T, b)
        self.tokens += x.shape[0]

    @property
    def value(self) -> torch.Tensor:
        """``H = 2/n * X^T X``."""
        h = self.xtx * (2.0 / max(self.tokens, 1))
        d = h.shape[0]
        if d >= SYMMETRIC_SPLIT_MIN:
            half = d // 2
            h[:half, half:] = h[half:, :half].T
        return h


def inverse_hessian_factor(hessian: torch.Tensor, dampening: float, name: str = "layer") -> tuple[torch.Tensor, float]:
    """``(U, lambda)`` with ``U`` the upper Cholesky factor of ``(H + lambda mean(diag H) I)^-1``.

    ``hessian`` must already have its dead diagonal entries set. On failure the dampening
    fraction grows tenfold per step (with a warning) up to :data:`MAX_DAMPENING`.
    """
    if not torch.isfinite(hessian).all():
        raise SparsemergeError(f"the calibration Hessian of {name} has NaN/Inf: the activations overflowed")
    mean_diag = hessian.diagonal().mean()
    idx = torch.arange(hessian.shape[0], device=hessian.device)
    damp = dampening
    while True:
        h = hessian.clone()
        h[idx, idx] += damp * mean_diag
        # With J the reversal permutation, J H J = L L^T gives H = R R^T for the upper
        # triangular R = J L J, so H^-1 = (R^-1)^T R^-1 and U = R^-1 is the upper Cholesky
        # factor of H^-1: one factorisation and one triangular inverse, no explicit H^-1.
        lower, info = torch.linalg.cholesky_ex(h.flip(0, 1))
        if int(info) == 0:
            eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
            upper = torch.linalg.solve_triangular(lower.flip(0, 1).contiguous(), eye, upper=True)
            if torch.isfinite(upper).all():
                return upper, damp
        if damp >= MAX_DAMPENING:
            raise SparsemergeError(
                f"the Hessian of {name} is not positive definite even with dampening {damp:g}; "
                "use more calibration samples"
            )
        new = min(damp * 10.0, MAX_DAMPENING)
        warnings.warn(f"SparseGPT: Cholesky failed for {name} with dampening {damp:g}; retrying with {new:g}", stacklevel=2)
        damp = new


@torch.no_grad()
def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: "Pattern | str",
    dampening: float = 0.01,
    blocksize: int = 128,
    name: str = "layer",
) -> torch.Tensor:
    """The pruned and reconstructed weight (float32, new tensor) of ``weight`` (out x in)."""
    pattern = parse_pattern(pattern)
    if isinstance(pattern, Unstructured) and pattern.scope != "layer":
        raise SparsemergeError(f"sparsegpt cannot apply {pattern}: it prunes one layer at a time")
    rows, cols = weight.shape
    if hessian.shape != (cols, cols):
        raise SparsemergeError(f"Hessian of {name} has shape {tuple(hessian.shape)}, expected ({cols}, {cols})")
    if isinstance(pattern, NM) and cols % pattern.m:
        raise SparsemergeError(f"{name}: input dimension {cols} not divisible by M={pattern.m}")
    if blocksize < 1:
        raise SparsemergeError(f"blocksize must be >= 1, got {blocksize}")
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    threads = torch.get_num_threads()
    # Factorisations of a few hundred columns and the column loop's many small ops gain
    # nothing from threads and, on a busy machine, lose 10x to OpenMP synchronisation.
    torch.set_num_threads(1)
    try:
        U, _ = inverse_hessian_factor(H, dampening, name)
        del H
        d = U.diagonal()
        fixed = None  # mask chosen up front (block patterns); True = prune
        if isinstance(pattern, Block):
            fixed = ~block_mask(W * W / (d * d).reshape(1, -1), pattern.rows, pattern.cols, pattern.sparsity)
        if isinstance(pattern, Hierarchical):
            # coarse level up front: the blocks hier_mask keeps (every row of a kept tile keeps
            # N of each group there, so any() recovers them); N:M inside is chosen as the columns
            # are reached, like plain N:M (obs_block ORs it into this mask): ~11% less output
            # error than fixing both levels up front on random correlated inputs
            keep = hier_mask(W * W / (d * d).reshape(1, -1), pattern).reshape(rows, -1, pattern.block)
            fixed = ~keep.any(dim=2, keepdim=True).expand_as(keep).reshape(rows, cols)
        if isinstance(pattern, (NM, Hierarchical)):
            blocksize = max(pattern.m, blocksize // pattern.m * pattern.m)  # groups never straddle blocks
        _obs_columns(W, U, d, pattern, fixed, blocksize)
    finally:
        torch.set_num_threads(threads)
    return W


def _obs_columns(W: torch.Tensor, U: torch.Tensor, d: torch.Tensor, pattern: Pattern, fixed, blocksize: int) -> None:
    """The blocked OBS loop of Algorithm 1, in place on ``W`` (float32, out x in).

    Works on ``W^T`` so that one input column is one contiguous row of memory.
    """
    rows, cols = W.shape
    WT = W.T.contiguous()  # (in, out)
    prune_t = fixed.T.contiguous() if fixed is not None else None
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        count = i2 - i1
        W1 = WT[i1:i2].clone()  # (count, out)
        U1 = U[i1:i2, i1:i2]
        d1 = d[i1:i2].reshape(-1, 1)
        if prune_t is not None:
            mask1 = prune_t[i1:i2].clone()
        elif isinstance(pattern, Unstructured):
            # zeros allotted so that the blocks add up to round(S * numel) exactly
            k = int(round(pattern.sparsity * rows * i2)) - int(round(pattern.sparsity * rows * i1))
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            if k > 0:
                saliency = (W1 * W1 / (d1 * d1)).flatten()
                mask1.view(-1)[torch.topk(saliency, k, largest=False, sorted=False).indices] = True
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        nm = isinstance(pattern, (NM, Hierarchical))  # hierarchical: N:M inside the blocks kept by ``fixed``
        Err1 = torch.from_numpy(
            obs_block(W1.numpy(), U1.contiguous().numpy(), mask1.numpy(), pattern.n if nm else 0, pattern.m if nm else 1, nm)
        )
        WT[i1:i2] = W1.masked_fill(mask1, 0.0)
        if i2 < cols:
            WT[i2:].sub_(U[i1:i2, i2:].T @ Err1)
    W.copy_(WT.T)


@METHODS.register("sparsegpt")
class SparseGPT(CalibratedMethod):
    name = "sparsegpt"
    # One pass per block (true sequential): on SmolLM2 2:4 with 64 x 512 calibration tokens it
    # took ~0.65x the time of "block" for 4% more perplexity (75.1 vs 72.4; BENCHMARKS.md);
    # --sequential block gives the lower perplexity.
    default_sequential = "layer"

    def make_stats(self, target: Target, config: PruneConfig) -> Hessian:
        return Hessian(target.weight.shape[1], target.weight.device)

    @torch.no_grad()
    def prune_block(self, targets: list[Target], stats: dict[str, Hessian], config: PruneConfig) -> None:
        """Layers with the same input (q/k/v, gate/up) and the same N:M pattern are stacked
        along the output dimension and pruned in one pass: rows are independent given ``H``
        and N:M masks are chosen per row, so the result equals pruning them one by one."""
        groups: dict[tuple, list[Target]] = {}
        for t in targets:
            key = (id(stats[t.name]), str(t.pattern)) if isinstance(t.pattern, NM) else (t.name,)
            groups.setdefault(key, []).append(t)
        for group in groups.values():
            if len(group) == 1:
                self.prune_layer(group[0], stats[group[0].name], config)
                continue
            stacked = torch.cat([t.weight.detach() for t in group])
            new = sparsegpt_prune(
                stacked,
                stats[group[0].name].value,
                group[0].pattern,
                dampening=config.dampening,
                blocksize=config.blocksize,
                name="+".join(t.name for t in group),
            )
            for t, part in zip(group, torch.split(new, [t.weight.shape[0] for t in group])):
                t.weight.copy_(part.to(t.weight.dtype))

    @torch.no_grad()
    def prune_layer(self, target: Target, stats: Hessian, config: PruneConfig) -> None:
        new = sparsegpt_prune(
            target.weight,
            stats.value,
            target.pattern,
            dampening=config.dampening,
            blocksize=config.blocksize,
            name=target.name,
        )
        target.weight.copy_(new.to(target.weight.dtype))
