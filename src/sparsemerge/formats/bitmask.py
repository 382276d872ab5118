"""Bitmask format: one bit per element plus the nonzero values (chapter 10.4.1 family).

Storage fields: ``bitmask`` uint8 ``(rows, ceil(cols/8))``, bit ``j`` of a row is bit
``j % 8`` of byte ``j // 8`` (LSB first, ``numpy.packbits(..., axis=-1, bitorder="little")``,
the compressed-tensors convention); ``values`` ``(nnz,)`` the nonzeros in row-major order.
Size: ``rows * ceil(cols/8) + nnz * sizeof(value)`` bytes.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.base import FORMATS, SparseFormat, check_2d, need
from sparsemerge.formats.size import PlanRow, bitmask_nbytes


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """Bool ``(rows, cols)`` -> uint8 ``(rows, ceil(cols/8))``, little-endian bits per row."""
    return torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))


def unpack_mask(bits: torch.Tensor, cols: int) -> torch.Tensor:
    return torch.from_numpy(np.unpackbits(bits.numpy(), axis=-1, count=cols, bitorder="little").astype(bool))


@FORMATS.register("bitmask")
class Bitmask(SparseFormat):
    name = "bitmask"
    help = "1 bit per element + the nonzero values"
    plan_order = 30

    @classmethod
    def plan_rows(cls, p: Any) -> list[PlanRow]:
        return [p.row("bitmask", "1 bit/element + values", bitmask_nbytes(p.rows, p.cols, p.nnz, p.value_bytes))]

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, mask: torch.Tensor, values: Any) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.mask = mask  # bool (rows, cols)
        self.values = values

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "Bitmask":
        dense = check_2d(dense, "bitmask")
        mask = dense != 0
        return cls(tuple(dense.shape), dense.dtype, mask, dense[mask].contiguous())

    def _values_shape(self) -> tuple[int, ...]:
        return (int(self.mask.sum()),)

    def _dense_from_values(self, values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=values.dtype)
        out[self.mask] = values.reshape(-1)
        return out

    def _index_fields(self) -> dict[str, torch.Tensor]:
        return {"bitmask": pack_mask(self.mask)}

    def _params(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _from_index_fields(cls, shape, dtype, params, fields, what):  # type: ignore[override]
        rows, cols = shape
        bits = need(fields, "bitmask", torch.uint8, (rows, (cols + 7) // 8), what)
        return cls(shape, dtype, unpack_mask(bits, cols), None)

    def check(self, full: bool = False) -> None:
        if tuple(self.mask.shape) != self.shape:
            raise SparsemergeError(f"bitmask: mask shape {tuple(self.mask.shape)} != {self.shape}")
        if tuple(self.values_float.shape) != self._values_shape():
            raise SparsemergeError(f"bitmask: {self.values_float.numel()} values for {self._values_shape()[0]} set bits")
