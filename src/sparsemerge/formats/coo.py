"""COO format (chapter 10.4.1): row indices, column indices and values of the nonzeros.

Storage fields: ``row`` and ``col`` ``(nnz,)`` in row-major order (sorted by row, then
column, no duplicates), each in the narrowest signed dtype for its dimension (int16 when the
dimension is at most 32768, see :func:`sparsemerge.formats.bits.index_dtype`); ``values``
``(nnz,)``. Size: ``nnz * (sizeof(row) + sizeof(col) + sizeof(value))`` bytes.
"""
from __future__ import annotations

from typing import Any

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.base import FORMATS, SparseFormat, check_2d, need
from sparsemerge.formats.bits import index_dtype
from sparsemerge.formats.size import PlanRow, coo_nbytes


@FORMATS.register("coo")
class COO(SparseFormat):
    name = "coo"
    help = "row, column and value of each nonzero"
    plan_order = 10

    @classmethod
    def plan_rows(cls, p: Any) -> list[PlanRow]:
        return [p.row("coo", "row, col, value", coo_nbytes(p.rows, p.cols, p.nnz, p.value_bytes))]

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, row: torch.Tensor, col: torch.Tensor, values: Any) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.row, self.col, self.values = row, col, values

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "COO":
        dense = check_2d(dense, "coo")
        rows, cols = dense.shape
        idx = (dense != 0).nonzero()  # row-major order
        row = idx[:, 0].to(index_dtype(max(rows - 1, 0)))
        col = idx[:, 1].to(index_dtype(max(cols - 1, 0)))
        return cls((rows, cols), dense.dtype, row.contiguous(), col.contiguous(), dense[idx[:, 0], idx[:, 1]].contiguous())

    def to_coo(self) -> "COO":
        return COO(self.shape, self.dtype, self.row, self.col, self.values_float)

    @classmethod
    def from_coo(cls, coo: "SparseFormat", **params: Any) -> "COO":
        assert isinstance(coo, COO)
        return cls(coo.shape, coo.dtype, coo.row, coo.col, coo.values_float)

    def _values_shape(self) -> tuple[int, ...]:
        return (int(self.row.numel()),)

    def _dense_from_values(self, values: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.shape, dtype=values.dtype)
        out[self.row.to(torch.int64), self.col.to(torch.int64)] = values.reshape(-1)
        return out

    def _index_fields(self) -> dict[str, torch.Tensor]:
        return {"row": self.row, "col": self.col}

    def _params(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _from_index_fields(cls, shape, dtype, params, fields, what):  # type: ignore[override]
        rows, cols = shape
        row = need(fields, "row", index_dtype(max(rows - 1, 0)), None, what)
        col = need(fields, "col", index_dtype(max(cols - 1, 0)), (row.numel(),), what)
        if row.dim() != 1:
            raise SparsemergeError(f"{what}: COO row indices must be 1-D, got shape {tuple(row.shape)}")
        obj = cls(shape, dtype, row, col, None)
        obj._check_indices(what)
        return obj

    def _check_indices(self, what: str) -> None:
        rows, cols = self.shape
        r, c = self.row.to(torch.int64), self.col.to(torch.int64)
        if r.numel() == 0:
            return
        if int(r.min()) < 0 or int(r.max()) >= rows or int(c.min()) < 0 or int(c.max()) >= cols:
            raise SparsemergeError(f"{what}: COO index out of range for shape {rows}x{cols} (corrupt file?)")
        key = r * cols + c
        if bool((key[1:] <= key[:-1]).any()):
            raise SparsemergeError(f"{what}: COO indices are not sorted row-major without duplicates")

    def check(self, full: bool = False) -> None:
        self._check_indices("coo")
        if self.values_float.numel() != self.row.numel():
            raise SparsemergeError(f"coo: {self.values_float.numel()} values for {self.row.numel()} indices")
