"""``Int8Linear``: a dense Linear with INT8 weights and one scale per output channel, for
layers that are not pruned (the language-model head, 49152 x 576 in SmolLM2: at batch 1 it
reads 113 MB per token in float32, 28 MB in INT8 - the largest single read of a decoding
step once the blocks are 2:4 + INT8).

``y_i = s_i * sum_k q_ik x_k + b_i`` with ``s_i = max_k |w_ik| / 127`` and
``q_ik = round(w_ik / s_i)`` (symmetric absmax; :func:`sparsemerge.formats.quant.quantize`
with ``group_size = 0``).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from numba import njit, prange
from torch import nn

from sparsemerge.errors import SparsemergeError


@njit(fastmath=True, cache=True)
def _dot_q8(q, x):
    # a separate fastmath helper so that LLVM vectorizes the reduction (not in the prange body)
    acc = np.float32(0.0)
    for k in range(q.shape[0]):
        acc += np.float32(q[k]) * x[k]
    return acc


@njit(parallel=True, cache=True)
def gemv_q8_dense(q, scale, x, out):
    """out[b, r] = scale[r] * dot(q[r], x[b]) for x (B, cols)."""
    for r in prange(q.shape[0]):
        for b in range(x.shape[0]):
            out[b, r] = _dot_q8(q[r], x[b]) * scale[r]


class Int8Linear(nn.Module):
    """Dense INT8 per-channel linear layer (CPU numba kernel; reference torch elsewhere)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        if codes.dtype != torch.int8 or codes.dim() != 2 or scale.shape != (codes.shape[0],):
            raise SparsemergeError(f"Int8Linear needs int8 codes (out, in) and a scale (out,), got {codes.dtype} {tuple(codes.shape)}, {tuple(scale.shape)}")
        self.out_features, self.in_features = codes.shape
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        from sparsemerge.formats.quant import quantize

        qv = quantize(linear.weight.detach().float().cpu(), bits=8, group_size=0, symmetric=True)
        return cls(qv.codes, qv.scale.reshape(-1), linear.bias)

    def to_dense(self) -> torch.Tensor:
        return self.codes.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from sparsemerge.kernels.cpu import sync_threads
        from sparsemerge.kernels.dispatch import forced_kernel

        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if x2.device.type == "cpu" and forced_kernel() in (None, "cpu"):
            sync_threads()
            out = np.empty((x2.shape[0], self.out_features), np.float32)
            gemv_q8_dense(self.codes.numpy(), self.scale.numpy(), x2.contiguous().numpy(), out)
            y = torch.from_numpy(out)
        else:  # reference / CUDA: dequantize (the dense weight exists only for this call)
            y = x2 @ self.to_dense().to(x2.device).T
        if self.bias is not None:
            y = y + self.bias.to(y.device)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel, bias={self.bias is not None}"
