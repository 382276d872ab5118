"""Penalties that push weights towards sparsity while they train (chapter 10.1.7, 10.2.6).

* :func:`l1_penalty` - the three-stage recipe's pre-sparsification term ``beta ||W||_1``
  (chapter 10.1.7: ``L = L_CE + alpha L_KL(S||T) + beta ||W||_1``). Returned as the mean
  ``|w|`` over the penalised weights (``||W||_1 / P``), so ``beta`` does not depend on the model's size.
* :func:`nm_penalty` - a differentiable N:M regularizer. The chapter's
  ``R_N:M = sum_g max(0, ||g||_0 - N)^2`` counts the non-zeros of each group of ``M``; it is
  piecewise constant (zero gradient almost everywhere), so it cannot steer training. We use
  its L1 relaxation: for each group, the sum of the ``M - N`` smallest magnitudes,
  ``R = sum_g sum_{j in Bottom_{M-N}(|g|)} |w_j|`` (divided by the number of penalised weights).
  It is zero exactly when the chapter's ``R_N:M`` is (every group has at most ``N`` non-zeros)
  and its gradient shrinks precisely the weights an N:M mask would remove, so when the mask
  is finally applied little is lost. :func:`nm_penalty_l0` computes the chapter's form for reporting.
"""
from __future__ import annotations

import torch
from torch import nn

from sparsemerge.patterns import NM
from sparsemerge.train.sparse_masks import as_matrix


def l1_penalty(weights: "dict[str, nn.Parameter] | list[torch.Tensor]") -> torch.Tensor:
    """``||W||_1 / P`` over all ``weights`` (differentiable)."""
    tensors = list(weights.values()) if isinstance(weights, dict) else list(weights)
    total = sum(t.numel() for t in tensors)
    return sum(t.abs().sum() for t in tensors) / max(total, 1)


def _groups(weight: torch.Tensor, pattern: NM) -> torch.Tensor:
    return as_matrix(weight).reshape(-1, pattern.m)


def nm_penalty(weights: "dict[str, nn.Parameter] | list[torch.Tensor]", pattern: NM) -> torch.Tensor:
    """Sum over groups of the ``M - N`` smallest ``|w|``, divided by the number of weights."""
    tensors = list(weights.values()) if isinstance(weights, dict) else list(weights)
    total = sum(t.numel() for t in tensors)
    k = pattern.m - pattern.n
    terms = [torch.topk(_groups(t, pattern).abs(), k, dim=1, largest=False).values.sum() for t in tensors]
    return sum(terms) / max(total, 1)


@torch.no_grad()
def nm_penalty_l0(weights: "dict[str, nn.Parameter] | list[torch.Tensor]", pattern: NM) -> int:
    """The chapter's ``sum_g max(0, ||g||_0 - N)^2`` (0 when every group satisfies N:M)."""
    tensors = list(weights.values()) if isinstance(weights, dict) else list(weights)
    out = 0
    for t in tensors:
        excess = ((_groups(t, pattern) != 0).sum(1) - pattern.n).clamp_min(0)
        out += int((excess**2).sum())
    return out
