"""CSR format (chapter 10.4.1): row pointers, column indices, values.

Storage fields: ``indptr`` ``(rows+1,)`` (dtype for values up to nnz), ``indices`` ``(nnz,)``
column of each nonzero, ascending within a row (dtype for values up to cols-1; int16 when it
fits), ``values`` ``(nnz,)``. Row ``i`` holds entries ``indptr[i] : indptr[i+1]``.
The same arrays as ``scipy.sparse.csr_matrix``.
"""
from __future__ import annotations

from typing import Any

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.base import FORMATS, SparseFormat, check_2d, need
from sparsemerge.formats.bits import index_dtype
from sparsemerge.formats.size import PlanRow, csr_nbytes


@FORMATS.register("csr")
class CSR(SparseFormat):
    name = "csr"
    help = "row pointers, column indices, values"
    plan_order = 20

    @classmethod
    def plan_rows(cls, p: Any) -> list[PlanRow]:
        return [p.row("csr", "indptr, col, value", csr_nbytes(p.rows, p.cols, p.nnz, p.value_bytes))]

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, indptr: torch.Tensor, indices: torch.Tensor, values: Any) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.indptr, self.indices, self.values = indptr, indices, values

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "CSR":
        dense = check_2d(dense, "csr")
        rows, cols = dense.shape
        mask = dense != 0
        counts = mask.sum(dim=1)
        nnz = int(counts.sum())
        indptr = torch.zeros(rows + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(counts, 0)
        idx = mask.nonzero()
        return cls(
            (rows, cols), dense.dtype, indptr.to(index_dtype(nnz)), idx[:, 1].to(index_dtype(max(cols - 1, 0))).contiguous(), dense[mask].contiguous()
        )

    @classmethod
    def from_coo(cls, coo: "SparseFormat", **params: Any) -> "CSR":
        from sparsemerge.formats.coo import COO

        assert isinstance(coo, COO)
        rows, cols = coo.shape
        nnz = coo.row.numel()
        counts = torch.bincount(coo.row.to(torch.int64), minlength=rows)
        indptr = torch.zeros(rows + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(counts, 0)
        return cls(coo.shape, coo.dtype, indptr.to(index_dtype(nnz)), coo.col.to(index_dtype(max(cols - 1, 0))), coo.values_float)

    def to_coo(self) -> "SparseFormat":
        from sparsemerge.formats.coo import COO

        rows = self.shape[0]
        counts = (self.indptr[1:].to(torch.int64) - self.indptr[:-1].to(torch.int64))
        row = torch.repeat_interleave(torch.arange(rows), counts).to(index_dtype(max(rows - 1, 0)))
        return COO(self.shape, self.dtype, row, self.indices, self.values_float)

    def _values_shape(self) -> tuple[int, ...]:
        return (int(self.indices.numel()),)

    def _dense_from_values(self, values: torch.Tensor) -> torch.Tensor:
        coo = self.to_coo()
        return coo._dense_from_values(values)  # type: ignore[attr-defined]

    def _index_fields(self) -> dict[str, torch.Tensor]:
        return {"indptr": self.indptr, "indices": self.indices}

    def _params(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _from_index_fields(cls, shape, dtype, params, fields, what):  # type: ignore[override]
        rows, cols = shape
        indices = need(fields, "indices", index_dtype(max(cols - 1, 0)), None, what)
        indptr = need(fields, "indptr", index_dtype(indices.numel()), (rows + 1,), what)
        obj = cls(shape, dtype, indptr, indices, None)
        obj._check_indices(what)
        return obj

    def _check_indices(self, what: str) -> None:
        rows, cols = self.shape
        ptr = self.indptr.to(torch.int64)
        nnz = self.indices.numel()
        if self.indices.dim() != 1 or int(ptr[0]) != 0 or int(ptr[-1]) != nnz or bool((ptr[1:] < ptr[:-1]).any()):
            raise SparsemergeError(f"{what}: CSR indptr must rise from 0 to nnz={nnz} (corrupt file?)")
        if nnz == 0:
            return
        col = self.indices.to(torch.int64)
        if int(col.min()) < 0 or int(col.max()) >= cols:
            raise SparsemergeError(f"{what}: CSR column index out of range for {cols} columns (corrupt file?)")
        row = torch.repeat_interleave(torch.arange(rows), ptr[1:] - ptr[:-1])
        key = row * cols + col
        if bool((key[1:] <= key[:-1]).any()):
            raise SparsemergeError(f"{what}: CSR column indices must ascend within each row")

    def check(self, full: bool = False) -> None:
        self._check_indices("csr")
        if self.values_float.numel() != self.indices.numel():
            raise SparsemergeError(f"csr: {self.values_float.numel()} values for {self.indices.numel()} indices")
