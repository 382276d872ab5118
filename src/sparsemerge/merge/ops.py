"""Building blocks of model merging: pure tensor functions shared by every method.

Notation (chapter 10.3): a base ``theta_0``, fine-tuned models ``theta_i``, task vectors
``tau_i = theta_i - theta_0`` (10.3.2). The sparsifiers below keep a fraction ``density`` of
a task vector's entries (TIES trim, DARE drop, breadcrumbs, DELLA); ``elect_sign`` and
``disjoint_mean`` are TIES' election and disjoint merge (10.3.3).

Defaults follow mergekit (github.com/arcee-ai/mergekit, ``sparsify.py`` and
``generalized_task_arithmetic.py``) so that merges give the same numbers; the paper
variants are options (``rescale="inverse"``: DARE's ``1/(1-p)``; ``divide="count"``:
TIES' ``1/|A_j|``; ``consensus="count"``: the chapter's vote of signs).
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch

from sparsemerge.errors import SparsemergeError

RescaleMode = Optional[Literal["l1", "l2", "linf", "inverse"]]


def task_vector(tuned: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``tau = theta_tuned - theta_base`` (Ilharco et al. 2023, "Editing models with task arithmetic")."""
    if tuned.shape != base.shape:
        raise SparsemergeError(f"task vector needs equal shapes, got {tuple(tuned.shape)} and {tuple(base.shape)}")
    return tuned - base


def apply_task_vectors(
    base: torch.Tensor, taus: Sequence[torch.Tensor], scale: "float | Sequence[float]" = 1.0
) -> torch.Tensor:
    """``theta = theta_0 + sum_i lambda_i tau_i`` (10.3.2): add (lambda=1), scale (lambda>1),
    negate (lambda=-1) capabilities. ``scale`` is one lambda or one per task vector."""
    scales = [float(scale)] * len(taus) if isinstance(scale, (int, float)) else [float(s) for s in scale]
    if len(scales) != len(taus):
        raise SparsemergeError(f"{len(taus)} task vectors but {len(scales)} scales")
    out = base.clone()
    for tau, lam in zip(taus, scales):
        out = out + lam * tau.to(out.dtype)
    return out


def negate(tau: torch.Tensor) -> torch.Tensor:
    """``-tau``: ``theta_0 - tau`` removes a capability (10.3.2, "forgetting via negation")."""
    return -tau


def rescale_masked(tensor: torch.Tensor, mask: torch.Tensor, norm: RescaleMode, density: float = 1.0, eps: float = 1e-7) -> torch.Tensor:
    """``tensor * mask`` rescaled: ``"l1"``/``"l2"``/``"linf"`` match the norm of the unmasked
    tensor (mergekit's behaviour; no rescale when either norm is below ``eps``);
    ``"inverse"`` divides by ``density`` (DARE paper, Yu et al. 2023: ``tau / (1-p)``)."""
    masked = tensor * mask
    if norm is None:
        return masked
    if norm == "inverse":
        return masked / density if density > 0 else masked
    if norm == "l1":
        before, after = tensor.abs().sum(), masked.abs().sum()
    elif norm == "l2":
        before, after = tensor.norm(), masked.norm()
    elif norm == "linf":
        before, after = tensor.abs().max(), masked.abs().max()
    else:
        raise SparsemergeError(f"unknown rescale norm {norm!r}; expected l1, l2, linf, inverse or none")
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def magnitude_trim(tensor: torch.Tensor, density: float, rescale: RescaleMode = None) -> torch.Tensor:
    """TIES trim (Yadav et al. 2023): keep the ``k = max(1, floor(density * numel))`` entries of
    largest ``|tau|``, zero the rest (``tau * 1[|tau| >= top-k threshold]``)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    k = max(1, int(density * tensor.numel()))
    flat = tensor.abs().reshape(-1)
    if flat.device.type == "cpu":
        flat = flat.float()
    mask = _sort_window(flat, 0, k, descending=True).to(tensor.dtype)
    return rescale_masked(tensor, mask.reshape_as(tensor), rescale, density)


def _sort_window(flat: torch.Tensor, lo: int, hi: int, descending: bool) -> torch.Tensor:
    """Mask of the entries that ``torch.sort(flat, descending=descending)`` puts in positions
    ``[lo, hi)`` - mergekit's selection, ties included - without a full sort where possible.

    CPU: ``sortselect`` replays the partition steps of torch's introsort (O(n), bit-identical;
    faster than ``kthvalue`` even without ties). Other devices: two ``kthvalue`` selections,
    exact unless equal nonzero values straddle a cut. Either way a real sort is the fallback."""
    n = flat.numel()
    keep: Optional[torch.Tensor]
    if flat.device.type == "cpu" and flat.dtype == torch.float32:
        from sparsemerge.merge.sortselect import sort_window_mask

        keep = sort_window_mask(flat, lo, hi, descending)
    elif descending:
        keep = _rank_window(flat, n - hi, n - lo)
    else:
        keep = _rank_window(flat, lo, hi)
    if keep is None:
        keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
        keep[torch.sort(flat, descending=descending).indices[lo:hi]] = True
    return keep


def _rank_window(flat: torch.Tensor, lo: int, hi: int) -> Optional[torch.Tensor]:
    """Mask of the entries whose ascending rank is in ``[lo, hi)``, found with two O(n)
    selections (``kthvalue``) instead of a full sort. None when equal nonzero values straddle a
    boundary (the chosen subset would depend on the sort's tie order); ties of zeros are
    harmless (a kept zero is still zero) and resolve here."""
    n = flat.numel()
    if hi <= lo:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    mask = torch.ones(n, dtype=torch.bool, device=flat.device)
    if lo > 0:
        low = flat.kthvalue(lo + 1).values  # smallest kept value
        mask &= flat >= low
        below = int((flat < low).sum())
        if below != lo and low != 0:
            return None
    if hi < n:
        high = flat.kthvalue(hi).values  # largest kept value
        if int((flat <= high).sum()) != hi:
            return None
        mask &= flat <= high
    if lo > 0 and int(mask.sum()) != hi - lo:
        if low != 0:
            return None
        mask &= flat > 0  # surplus kept zeros contribute nothing
    return mask


def magnitude_outliers(tensor: torch.Tensor, density: float, gamma: float = 0.01, rescale: RescaleMode = None) -> torch.Tensor:
    """Model breadcrumbs (Davari & Belilovsky 2023): drop the ``gamma`` fraction of largest
    ``|tau|`` (outliers) and the smallest, keeping ``floor(density * numel)`` entries."""
    if density >= 1:
        return tensor
    numel = tensor.numel()
    target = int(density * numel)
    n_top = int(gamma * numel)
    n_bottom = max(0, numel - target - n_top)
    flat = tensor.abs().reshape(-1)
    if flat.device.type == "cpu":
        flat = flat.float()
    mask = _sort_window(flat, n_bottom, n_bottom + target, descending=False).to(tensor.dtype)
    return rescale_masked(tensor, mask.reshape_as(tensor), rescale, density)


def _work_dtype(tensor: torch.Tensor) -> torch.dtype:
    # float16 arithmetic is slow (and partly missing) on CPU
    return tensor.dtype if tensor.device.type != "cpu" or tensor.dtype == torch.bfloat16 else torch.float32


def drop_and_rescale(
    tensor: torch.Tensor,
    density: float,
    rescale: RescaleMode = "l1",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """DARE (Yu et al. 2023): ``tau * m``, ``m ~ Bernoulli(density)`` with ``density = 1 - p``, then
    rescaled. mergekit's default rescales to the original L1 norm (``"l1"``); the paper's
    ``1/(1-p)`` is ``rescale="inverse"``; both keep ``E[result] ~= tau``."""
    if density >= 1:
        return tensor
    dtype = _work_dtype(tensor)
    mask = _bernoulli_mask(torch.full((), density), tensor.shape, dtype, tensor.device, generator)
    return rescale_masked(tensor.to(dtype), mask, rescale, density).to(tensor.dtype)


def _bernoulli_mask(probs: torch.Tensor, shape, dtype: torch.dtype, device, generator: Optional[torch.Generator]) -> torch.Tensor:
    """``m ~ Bernoulli(probs)`` as ``1[u < probs]``, ``u ~ U[0, 1)`` float32: the same law as
    ``torch.bernoulli`` at a third of its CPU time (DARE draws one per weight). The draws
    differ from mergekit's, as any two random masks do; tests compare them in distribution."""
    u = torch.rand(shape, generator=generator, device=device)
    return (u < probs.to(device)).to(dtype)


def della_magprune(
    tensor: torch.Tensor,
    density: float,
    epsilon: float = 0.15,
    rescale: RescaleMode = "l1",
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """DELLA MagPrune (Deep et al. 2024): per row, keep entry j with probability
    ``p_j = density - epsilon + 2 epsilon * rank_j / (n-1)`` (rank by ``|tau|``, ascending),
    so larger deltas survive more often; then rescale (mergekit: L1; paper: ``1/p_j``-like)."""
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    if density + epsilon >= 1 or density - epsilon <= 0:
        raise SparsemergeError(
            f"DELLA needs density +/- epsilon inside (0, 1), got density={density}, epsilon={epsilon}; lower epsilon"
        )
    shape = tensor.shape
    dtype = _work_dtype(tensor)
    rows = tensor.unsqueeze(0) if tensor.dim() < 2 else tensor
    # Ranks along dim 1 are a permutation of 1..n, so mergekit's min/max normalisation is
    # (rank - 1) / (n - 1): compute p for the n sorted positions once (same float formula) and
    # hand it to each entry by its rank.
    n = rows.shape[1]
    ranks = torch.arange(1, n + 1, dtype=dtype, device=rows.device)
    rank_norm = ((ranks - 1) / (n - 1)).clamp(0, 1) if n > 1 else torch.zeros_like(ranks)
    p_sorted = (density - epsilon) + rank_norm * 2 * epsilon
    if rows.dim() == 2 and rows.device.type == "cpu":
        from sparsemerge.merge.rowrank import row_ranks  # numba: imported only when DELLA runs

        probs = p_sorted[row_ranks(rows.abs())]  # radix ranks, ~5x faster than argsort (merge/rowrank.py)
    else:
        order = torch.argsort(rows.abs(), dim=1, descending=False)
        along = [1, n] + [1] * (rows.dim() - 2)  # ranks run along dim 1 (rows may be 3-D+)
        probs = torch.empty(order.shape, dtype=dtype, device=rows.device).scatter_(1, order, p_sorted.reshape(along).expand_as(order))
    mask = _bernoulli_mask(probs.float(), probs.shape, dtype, probs.device, generator)
    out = rescale_masked(rows.to(dtype), mask, rescale, density)
    return out.to(tensor.dtype).reshape(shape)


def elect_sign(deltas: torch.Tensor, consensus: Literal["sum", "count"] = "sum") -> torch.Tensor:
    """TIES sign election over the stacked (weighted) task vectors ``deltas[i, ...]``.

    ``"sum"`` (TIES paper and mergekit): ``sign(sum_i tau_i)``, the sign of the larger total mass;
    ``"count"`` (the chapter's formula): ``sign(sum_i sign(tau_i))``. Zero elects ``+``.
    Returns +1/-1 of the per-entry dtype of ``deltas``."""
    if consensus == "sum":
        total = deltas.sum(dim=0)
    elif consensus == "count":
        total = deltas.sign().sum(dim=0)
    else:
        raise SparsemergeError(f"unknown consensus {consensus!r}; expected 'sum' or 'count'")
    return (total >= 0).to(deltas.dtype) * 2 - 1


def agreement_mask(deltas: torch.Tensor, elected: torch.Tensor) -> torch.Tensor:
    """``1[sign(tau_i) == elected]``: which task vectors join the disjoint merge at each entry."""
    return (deltas.sign() == elected).to(deltas.dtype)


def disjoint_mean(
    deltas: torch.Tensor,
    weights: torch.Tensor,
    mask: torch.Tensor,
    divide: Literal["weights", "count"] = "weights",
) -> torch.Tensor:
    """TIES disjoint merge of weighted deltas ``deltas[i] = w_i tau_i``:
    ``sum_{i in A_j} w_i tau_ij / sum_{i in A_j} w_i`` (mergekit, ``divide="weights"``) or
    ``/ |A_j|`` (TIES paper and the chapter, ``divide="count"``); entries with empty ``A_j`` give 0."""
    total = (deltas * mask).sum(dim=0)
    divisor = (weights * mask).sum(dim=0) if divide == "weights" else mask.sum(dim=0)
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    return total / divisor


def gram_schmidt(taus: Sequence[torch.Tensor], eps: float = 1e-12) -> list[torch.Tensor]:
    """Orthogonalized task vectors (10.3.7):
    ``tau'_i = tau_i - sum_{j<i} <tau_i, tau'_j> / ||tau'_j||^2 tau'_j`` (classical Gram-Schmidt
    against the already orthogonalized vectors, so the result is pairwise orthogonal).
    Computed in float64; returned in each input's dtype."""
    out: list[torch.Tensor] = []
    basis: list[torch.Tensor] = []
    for tau in taus:
        v = tau.double().reshape(-1)
        w = v.clone()
        for b in basis:
            nb = torch.dot(b, b)
            if nb > eps:
                w = w - (torch.dot(v, b) / nb) * b
        basis.append(w)
        out.append(w.reshape(tau.shape).to(tau.dtype))
    return out
