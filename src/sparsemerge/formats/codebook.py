"""k-means codebook codec (chapter 10.4.3 "clustering + sparsity"): each stored value is
replaced by the index of its nearest centroid; the file holds ``k`` float32 centroids and
``ceil(log2 k)``-bit indices.

Fitting is 1-D Lloyd's algorithm (k-means, Lloyd 1982) over the tensor's values, started
from evenly spaced quantiles (deterministic, no random seed), at most ``iters`` rounds:

    assign:  a_i = argmin_c |x_i - mu_c|     (sorted centroids -> boundaries at midpoints)
    update:  mu_c = mean{x_i : a_i = c}      (an empty cluster keeps its centroid)

With ``keep_zero`` (default) centroid 0 is pinned to 0.0, so zeros - pruned slots - stay
exact. Storage fields (prefixed ``values.`` inside a format): ``centroids`` float32 ``(k,)``
and ``indices`` uint8, the bitstream of :mod:`sparsemerge.formats.bits` holding the
row-major indices at ``ceil(log2 k)`` bits each. Parameters: ``{"kind": "codebook", "k",
"keep_zero"}``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.base import CODECS, CodecSpec, ValueCodec, need
from sparsemerge.formats.bits import pack_codes, packed_nbytes, unpack_codes, width_for


@CODECS.register("codebook")
@dataclass
class Codebook(ValueCodec):
    """``indices`` int64 in [0, k) of the values' shape (unpacked in memory); ``centroids`` (k,)."""

    centroids: torch.Tensor
    indices: torch.Tensor
    keep_zero: bool
    shape: tuple[int, ...]
    kind = "codebook"

    @property
    def k(self) -> int:
        return int(self.centroids.numel())

    def decode(self) -> torch.Tensor:
        return self.centroids[self.indices].reshape(self.shape)

    def fields(self) -> dict[str, torch.Tensor]:
        return {"centroids": self.centroids, "indices": pack_codes(self.indices, width_for(self.k))}

    def params(self) -> dict[str, Any]:
        return {"kind": "codebook", "k": self.k, "keep_zero": self.keep_zero}

    @classmethod
    def from_fields(cls, shape: tuple[int, ...], params: dict[str, Any], fields: dict[str, torch.Tensor], what: str) -> "Codebook":
        try:
            k = int(params["k"])
        except (KeyError, TypeError, ValueError):
            raise SparsemergeError(f"{what}: codebook parameters {params!r} need an integer 'k'") from None
        if not 2 <= k <= 256:
            raise SparsemergeError(f"{what}: codebook size {k} out of range 2..256")
        count = 1
        for s in shape:
            count *= int(s)
        centroids = need(fields, "centroids", torch.float32, (k,), what)
        stream = need(fields, "indices", torch.uint8, (packed_nbytes(count, width_for(k)),), what)
        indices = torch.from_numpy(unpack_codes(stream, width_for(k), count))
        if count and int(indices.max()) >= k:
            raise SparsemergeError(f"{what}: codebook index {int(indices.max())} >= k={k} (corrupt file?)")
        return cls(centroids, indices.reshape(shape), bool(params.get("keep_zero", True)), tuple(shape))

    @classmethod
    def encode(cls, values: torch.Tensor, spec: CodecSpec) -> "Codebook":
        return fit_codebook(values, spec.k)


def fit_codebook(values: torch.Tensor, k: int = 16, iters: int = 25, keep_zero: bool = True) -> Codebook:
    """Fit ``k`` centroids to ``values`` by 1-D Lloyd iterations (module docstring)."""
    if not 2 <= k <= 256:
        raise SparsemergeError(f"codebook size k must be in 2..256, got {k}")
    x = values.detach().cpu().reshape(-1).to(torch.float32)
    if not torch.isfinite(x).all():
        raise SparsemergeError("cannot cluster values that contain NaN or infinity")
    free = k - 1 if keep_zero else k
    data = x[x != 0] if keep_zero else x
    if data.numel() == 0:
        data = torch.zeros(1)
    xs = np.sort(data.numpy().astype(np.float64))
    prefix = np.concatenate([[0.0], np.cumsum(xs)])
    mu = np.quantile(xs, (np.arange(free) + 0.5) / free)
    for _ in range(iters):
        # On sorted data a cluster is a slice: x in (mid_{c-1}, mid_c] -> prefix sums give the means.
        cuts = np.concatenate([[0], np.searchsorted(xs, (mu[1:] + mu[:-1]) / 2, side="right"), [xs.size]])
        counts = np.diff(cuts)
        sums = prefix[cuts[1:]] - prefix[cuts[:-1]]
        new = np.sort(np.where(counts > 0, sums / np.maximum(counts, 1), mu))
        if np.array_equal(new, mu):
            break
        mu = new
    mu_t = torch.from_numpy(mu.astype(np.float32))
    centroids = torch.cat([torch.zeros(1), mu_t]) if keep_zero else mu_t
    centroids = torch.sort(centroids, stable=True).values.contiguous()
    indices = _assign(x, centroids)
    if keep_zero:  # exact zeros map to the pinned zero centroid even when another centroid ties
        zero_index = int((centroids == 0).nonzero()[0])
        indices = torch.where(x == 0, torch.full_like(indices, zero_index), indices)
    return Codebook(centroids, indices.reshape(values.shape), keep_zero, tuple(values.shape))


def _assign(x: torch.Tensor, sorted_centroids: torch.Tensor) -> torch.Tensor:
    """Nearest centroid index (ties to the lower one) via midpoints between sorted centroids."""
    if sorted_centroids.numel() == 1:
        return torch.zeros_like(x, dtype=torch.long)
    mids = ((sorted_centroids[1:] + sorted_centroids[:-1]) / 2).numpy()
    return torch.from_numpy(np.searchsorted(mids, x.numpy(), side="left").astype(np.int64))
