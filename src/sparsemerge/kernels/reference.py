"""Pure-PyTorch reference for every kernel: ``y = x W^T`` read straight from the blocked
N:M layout, without building the dense weight.

``y[b, i] = sum_g sum_s w[i, g, s] * x[b, g*m + p[i, g, s]]`` (chapter 10.1.3: only the kept
weights and their in-group positions take part). The gather touches ``B * rows * G * n``
elements, so this is for correctness checks and fallbacks, not speed.
"""
from __future__ import annotations

import torch

from sparsemerge.kernels.layout import BlockedNM, dequantized_values, positions_of


def reference_matmul(layer: BlockedNM, x: torch.Tensor) -> torch.Tensor:
    """``x (B, cols)`` float32 -> ``(B, rows)`` float32, computed from the packed values."""
    if getattr(layer, "kind", "nm") == "hier":  # hierarchical N:M (kernels/hier.py)
        return hier_reference_matmul(layer, x)
    vals = dequantized_values(layer).to(x.device)  # (rows, G, n)
    pos = positions_of(layer).to(x.device)  # (rows, G, n)
    g = layer.groups
    cols_idx = pos + (torch.arange(g, device=x.device) * layer.m)[None, :, None]  # (rows, G, n)
    out = torch.empty(x.shape[0], layer.rows, dtype=torch.float32, device=x.device)
    chunk = max(1, (1 << 22) // max(1, layer.rows * g * layer.n))  # bound the gathered size
    for start in range(0, x.shape[0], chunk):
        xb = x[start : start + chunk].float()
        picked = xb[:, cols_idx]  # (b, rows, G, n)
        out[start : start + chunk] = (picked * vals).sum(dim=(-1, -2))
    return out


def hier_reference_matmul(layer, x: torch.Tensor) -> torch.Tensor:
    """A hierarchical N:M :class:`~sparsemerge.kernels.hier.HierLayout`: ``x (B, cols)`` ->
    ``(B, rows)`` float32 from the stored slots only, ``y[b, i] = sum_j w[i, j] x[b, col[i, j]]``
    (``col`` from the kept blocks and in-group positions; no dense weight is built)."""
    vals = layer.weights().to(x.device)  # (rows, V)
    cols = layer.columns().to(x.device)  # (rows, V)
    out = torch.empty(x.shape[0], layer.rows, dtype=torch.float32, device=x.device)
    chunk = max(1, (1 << 22) // max(1, vals.numel()))  # bound the gathered size
    for start in range(0, x.shape[0], chunk):
        xb = x[start : start + chunk].float()
        out[start : start + chunk] = (xb[:, cols] * vals).sum(dim=-1)
    return out
