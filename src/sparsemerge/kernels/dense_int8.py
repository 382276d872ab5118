"""Dense INT8 layers for the parts of a model that are not pruned: ``Int8Linear`` (the
language-model head: 49152 x 576 in SmolLM2, 108 MiB per token in float32, 27 MiB in INT8 -
the largest single read of a decoding step once the blocks are 2:4) and ``Int8Embedding``
(the token table), which can share one set of codes when the head is tied to the embedding.

``w_ik = s_{i, k // G} * q_ik`` with symmetric absmax codes ``q_ik = round(w_ik / s_ig)``,
``s_ig = max_{k in group g} |w_ik| / 127`` over groups of ``G`` consecutive inputs of a row
(``G = 0``: one scale per row); :func:`sparsemerge.formats.quant.quantize`. A packed
checkpoint whose embedding was stored this way (``sparsemerge pack --dense-quant int8``) is
run from its codes: no float copy of the table is made, and the tied head computes
``y_i = sum_g s_ig sum_{k in g} q_ik x_k`` - the same numbers as the dequantized table.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from numba import njit, prange
from torch import nn

from sparsemerge.errors import SparsemergeError


@njit(fastmath=True, cache=True)
def _dot_q8(q, x):  # pragma: no cover - jitted
    # a separate fastmath helper so that LLVM vectorizes the reduction (not in the prange body)
    acc = np.float32(0.0)
    for k in range(q.shape[0]):
        acc += np.float32(q[k]) * x[k]
    return acc


@njit(parallel=True, cache=True)
def gemv_q8_dense(q, scale, group, x, out):  # pragma: no cover - jitted
    """``out[b, r] = sum_g scale[r, g] * dot(q[r, g*group : (g+1)*group], x[b, same])``."""
    cols = q.shape[1]
    for r in prange(q.shape[0]):
        for b in range(x.shape[0]):
            acc = np.float32(0.0)
            for g in range(scale.shape[1]):
                k0 = g * group
                k1 = min(cols, k0 + group)
                acc += _dot_q8(q[r, k0:k1], x[b, k0:k1]) * scale[r, g]
            out[b, r] = acc


def _check(codes: torch.Tensor, scale: torch.Tensor, group_size: int, what: str) -> torch.Tensor:
    if codes.dtype != torch.int8 or codes.dim() != 2:
        raise SparsemergeError(f"{what} needs int8 codes (rows, cols), got {codes.dtype} {tuple(codes.shape)}")
    if scale.dim() == 1:
        scale = scale.reshape(-1, 1)
    groups = 1 if group_size == 0 else -(-codes.shape[1] // group_size)
    if group_size < 0 or scale.shape != (codes.shape[0], groups):
        raise SparsemergeError(f"{what}: scale {tuple(scale.shape)} does not fit codes {tuple(codes.shape)} "
                               f"with group size {group_size} (expected ({codes.shape[0]}, {groups}))")
    return scale.float().contiguous()


class Int8Linear(nn.Module):
    """Dense INT8 linear layer with per-channel or per-group scales (CPU numba kernel;
    dequantized torch elsewhere)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
                 group_size: int = 0) -> None:
        super().__init__()
        scale = _check(codes, scale, group_size, "Int8Linear")
        self.out_features, self.in_features = codes.shape
        self.group_size = group_size
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 0) -> "Int8Linear":
        from sparsemerge.formats.quant import quantize

        qv = quantize(linear.weight.detach().float().cpu(), bits=8, group_size=group_size, symmetric=True)
        return cls(qv.codes, qv.scale, linear.bias, group_size)

    def to_dense(self) -> torch.Tensor:
        from sparsemerge.formats.quant import _expand

        return self.codes.float() * _expand(self.scale, self.in_features, self.group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from sparsemerge.kernels.dispatch import cpu_fast_path_allowed
        from sparsemerge.kernels.threads import sync_threads

        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).float()
        if x2.device.type == "cpu" and cpu_fast_path_allowed():
            sync_threads()
            out = np.empty((x2.shape[0], self.out_features), np.float32)
            group = self.group_size or self.in_features
            gemv_q8_dense(self.codes.numpy(), self.scale.numpy(), group, x2.detach().contiguous().numpy(), out)
            y = torch.from_numpy(out)
        else:  # reference / CUDA: dequantize (the dense weight exists only for this call)
            y = x2 @ self.to_dense().to(x2.device).T
        if self.bias is not None:
            y = y + self.bias.to(y.device)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        scales = "per-channel" if not self.group_size else f"group {self.group_size}"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 {scales}, bias={self.bias is not None}"


class Int8Embedding(nn.Module):
    """A token table held as INT8 codes with per-row or per-group scales; a lookup
    dequantizes only the rows it returns."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, group_size: int = 0,
                 padding_idx: Optional[int] = None) -> None:
        super().__init__()
        scale = _check(codes, scale, group_size, "Int8Embedding")
        self.num_embeddings, self.embedding_dim = codes.shape
        self.group_size = group_size
        self.padding_idx = padding_idx
        self.register_buffer("codes", codes.contiguous())
        self.register_buffer("scale", scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        from sparsemerge.formats.quant import _expand

        flat = ids.reshape(-1)
        rows = self.codes[flat].float() * _expand(self.scale[flat], self.embedding_dim, self.group_size)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def tied_head(self, bias: Optional[torch.Tensor] = None) -> Int8Linear:
        """The output layer that shares this table's codes and scales (a tied LM head)."""
        head = Int8Linear(self.codes, self.scale, bias, self.group_size)
        head.codes, head.scale = self.codes, self.scale  # the same tensors, not copies
        return head

    def extra_repr(self) -> str:
        scales = "per-row" if not self.group_size else f"group {self.group_size}"
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 {scales}"
