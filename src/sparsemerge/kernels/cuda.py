"""CUDA path: 2:4 layers through ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt or
CUTLASS sparse tensor cores, chapter 10.1.3), with a fallback when unsupported.

The semi-structured format holds the kept half of the values plus 2-bit indices, so a
``(rows, cols)`` fp16/bf16 weight becomes ``rows * cols / 2`` values + metadata, and
``F.linear(x, W_sparse)`` runs the sparse tensor-core GEMM. Constraints (PyTorch docs):
fp16/bf16 (or int8) values, rows a multiple of 32/64 and cols a multiple of 64/128
depending on backend, CUDA compute capability >= 8.0. :func:`semi_structured_reason`
returns why a layer cannot use it; callers then use the dense masked weight on the GPU
(or the CPU kernels), never a wrong result.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

log = logging.getLogger(__name__)

MIN_ROWS = 64
MIN_COLS = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def cuda_available() -> bool:
    return torch.cuda.is_available()


def semi_structured_reason(rows: int, cols: int, dtype: torch.dtype, device: "torch.device | None" = None) -> Optional[str]:
    """``None`` when a (rows, cols) 2:4 weight of ``dtype`` can go semi-structured, else why not."""
    if not cuda_available():
        return "no CUDA device"
    if not hasattr(torch.sparse, "to_sparse_semi_structured"):
        return "this PyTorch has no torch.sparse.to_sparse_semi_structured"
    dev = device if device is not None and device.type == "cuda" else torch.device("cuda")
    major, _ = torch.cuda.get_device_capability(dev)
    if major < 8:
        return f"compute capability {major}.x < 8.0 (no sparse tensor cores)"
    if dtype not in SUPPORTED_DTYPES:
        return f"dtype {dtype} (semi-structured needs float16 or bfloat16)"
    if rows % MIN_ROWS or cols % MIN_COLS or rows < MIN_ROWS or cols < MIN_COLS:
        return f"shape {rows}x{cols} (needs rows % {MIN_ROWS} == 0 and cols % {MIN_COLS} == 0)"
    return None


def to_semi_structured(dense_24: torch.Tensor) -> "tuple[torch.Tensor, Optional[str]]":
    """(weight for F.linear, None) on success, or (dense weight, reason) on fallback.

    ``dense_24`` is a CUDA 2:4-sparse (rows, cols) fp16/bf16 tensor.
    """
    reason = semi_structured_reason(dense_24.shape[0], dense_24.shape[1], dense_24.dtype, dense_24.device)
    if reason is not None:
        return dense_24, reason
    try:
        from torch.sparse import to_sparse_semi_structured

        return to_sparse_semi_structured(dense_24.contiguous()), None
    except (RuntimeError, ValueError, NotImplementedError) as exc:  # backend refused (arch/shape)
        log.info("semi-structured conversion failed, using the dense weight: %s", exc)
        return dense_24, f"to_sparse_semi_structured failed: {exc}"


def semi_structured_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``x W^T + b`` with a semi-structured (or fallback dense) CUDA weight.

    The sparse kernels need a row count that is a multiple of 8 (cuSPARSELt) / 64 in some
    versions; pad the flattened batch and slice the result.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(weight.dtype)
    rows = x2.shape[0]
    pad = (-rows) % 64 if weight.is_sparse or type(weight).__name__.startswith("SparseSemi") else 0
    if pad:
        x2 = torch.cat([x2, x2.new_zeros(pad, x2.shape[1])])
    y = torch.nn.functional.linear(x2, weight)
    y = y[:rows]
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*shape[:-1], y.shape[-1])
