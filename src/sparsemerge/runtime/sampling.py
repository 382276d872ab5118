"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

``p_i = softmax(z / T)_i`` over the ``top_k`` largest logits, then the smallest prefix of the
sorted probabilities whose mass reaches ``top_p`` (Holtzman et al., 2020), renormalized;
``temperature = 0`` is greedy (argmax). A seed makes sampling repeatable.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from sparsemerge.errors import SparsemergeError

NOT_FINITE = (
    "the model's logits are NaN or infinite, so no token can be chosen: a weight is not finite (a checkpoint "
    "packed with NaN values or edited; `sparsemerge inspect MODEL --verify` reads every tensor) or an activation "
    "overflowed (try --act-quant none, --kv-cache float32, or the dense model with --dense)"
)


def check_finite(logits: np.ndarray) -> None:
    """Raise :class:`SparsemergeError` when ``logits`` hold NaN or inf: argmax of NaN is token 0,
    which would end or garble the text without a word."""
    if not np.isfinite(logits).all():
        raise SparsemergeError(NOT_FINITE)


def finite_logits_processor():  # type: ignore[no-untyped-def]
    """The same check for transformers' ``generate`` (the path for architectures the runtime
    does not support): a ``LogitsProcessor`` that raises on non-finite scores."""
    import torch
    from transformers import LogitsProcessor

    class _Finite(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if not bool(torch.isfinite(scores).all()):
                raise SparsemergeError(NOT_FINITE)
            return scores

    return _Finite()


class SamplingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(0.0, ge=0.0)  # 0: greedy
    top_k: int = Field(0, ge=0)  # 0: all tokens
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: Optional[int] = None


def sample_probs(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """The distribution the sampler draws from (float64, sums to 1); tests check it."""
    z = np.asarray(logits, np.float64)
    if cfg.temperature == 0:
        p = np.zeros_like(z)
        p[int(np.argmax(z))] = 1.0
        return p
    z = z / cfg.temperature
    keep = np.ones(z.shape[0], bool)
    if cfg.top_k and cfg.top_k < z.shape[0]:
        kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
        keep &= z >= kth
        z = np.where(keep, z, -np.inf)
    p = z  # reused in place: a vocabulary of 49k costs ~0.1 ms per pass
    p -= z.max()
    np.exp(p, out=p)
    p /= p.sum()
    if cfg.top_p < 1.0:
        p = np.where(nucleus(p, cfg.top_p), p, 0.0)
        p /= p.sum()
    return p


def nucleus(p: np.ndarray, top_p: float) -> np.ndarray:
    """The mask of the smallest prefix of ``p`` sorted descending (a stable sort: among equal
    probabilities the lower token id first) whose mass reaches ``top_p``.

    Sorting a 49k vocabulary costs ~6 ms, as much as a decode step; the nucleus is usually far
    smaller, so the ``k`` largest are found by partition (k = 64, 256, ...) and only they are
    sorted. Their values in descending order are the full sort's first ``k`` values, so the
    cumulative sums and the cut are the same numbers; ties at the cut go to the lower ids."""
    size = p.shape[0]
    k = 64
    while k < size:
        top = np.sort(p[np.argpartition(-p, k - 1)[:k]])[::-1]
        cum = np.cumsum(top)
        if cum[-1] >= top_p:
            n = int(np.searchsorted(cum, top_p) + 1)
            cut = top[n - 1]
            mask = p > cut
            mask[np.flatnonzero(p == cut)[: n - int(mask.sum())]] = True
            return mask
        k *= 4
    order = np.argsort(-p, kind="stable")
    n = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)
    mask = np.zeros(size, bool)
    mask[order[:n]] = True
    return mask


class Sampler:
    def __init__(self, cfg: SamplingConfig) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(cfg.seed)

    def __call__(self, logits: np.ndarray) -> int:
        check_finite(logits)
        if self.cfg.temperature == 0:
            return int(np.argmax(logits))
        p = sample_probs(logits, self.cfg)
        # what rng.choice(len(p), p=p) draws (the same cdf and uniform; tested), without its
        # checks of p, which cost more than the rest of sampling over a 49k vocabulary
        cdf = np.cumsum(p)
        cdf /= cdf[-1]
        return int(cdf.searchsorted(self.rng.random(), side="right"))
