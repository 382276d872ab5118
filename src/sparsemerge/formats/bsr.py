"""Block sparse row format (chapter 10.2.4, 10.4.1 "block sparse"): only blocks with a
nonzero are stored, each densely.

A weight ``(rows, cols)`` divisible by the block ``(R, C)`` has ``rows/R`` block rows.
Storage fields: ``indptr`` ``(rows/R + 1,)``, ``indices`` ``(nblocks,)`` block-column of each
stored block, ascending within a block row (narrowest dtype that fits), ``values``
``(nblocks, R, C)``. The arrays of ``scipy.sparse.bsr_matrix``. Parameters:
``{"block": [R, C]}``.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.base import FORMATS, FormatOption, PackOptions, SparseFormat, check_2d, need
from sparsemerge.formats.bits import index_dtype
from sparsemerge.formats.size import PlanRow, bsr_plan_rows


def _block(block: "int | tuple[int, int] | list[int]") -> tuple[int, int]:
    if isinstance(block, int):
        block = (block, block)
    r, c = (int(b) for b in block)
    if r <= 0 or c <= 0:
        raise SparsemergeError(f"BSR block size must be positive, got {r}x{c}")
    return r, c


@FORMATS.register("bsr")
class BSR(SparseFormat):
    name = "bsr"
    help = "block rows of dense BxB blocks holding a nonzero (--block)"
    options = (FormatOption("block", 16, "bsr block size (default 16)", int),)
    plan_order = 40

    @classmethod
    def pack_params(cls, shape: tuple[int, ...], config: PackOptions) -> tuple[dict[str, Any], Optional[str]]:
        block = int(config.option("block"))
        if shape[0] % block or shape[1] % block:
            return {}, f"shape {tuple(shape)} not divisible by block {block}"
        return {"block": block}, None

    @classmethod
    def plan_rows(cls, p: Any) -> list[PlanRow]:
        return bsr_plan_rows(p)

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, block: tuple[int, int], indptr: torch.Tensor, indices: torch.Tensor, values: Any) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.block = _block(block)
        self.indptr, self.indices, self.values = indptr, indices, values

    @classmethod
    def from_dense(cls, dense: torch.Tensor, block: "int | tuple[int, int]" = 16) -> "BSR":
        dense = check_2d(dense, "bsr")
        r, c = _block(block)
        rows, cols = dense.shape
        if rows % r or cols % c:
            raise SparsemergeError(
                f"BSR block {r}x{c} does not divide shape {rows}x{cols}; choose a block size that divides both dimensions"
            )
        tiles = dense.reshape(rows // r, r, cols // c, c).permute(0, 2, 1, 3)  # (br, bc, r, c)
        keep = (tiles != 0).any(dim=3).any(dim=2)
        counts = keep.sum(dim=1)
        indptr = torch.zeros(rows // r + 1, dtype=torch.int64)
        indptr[1:] = torch.cumsum(counts, 0)
        nblocks = int(indptr[-1])
        idx = keep.nonzero()
        values = tiles[idx[:, 0], idx[:, 1]].contiguous()
        return cls((rows, cols), dense.dtype, (r, c), indptr.to(index_dtype(nblocks)), idx[:, 1].to(index_dtype(max(cols // c - 1, 0))).contiguous(), values)

    @classmethod
    def from_coo(cls, coo: "SparseFormat", block: "int | tuple[int, int]" = 16, **params: Any) -> "BSR":
        return cls.from_dense(coo.to_dense(), block=block)

    def _values_shape(self) -> tuple[int, ...]:
        return (int(self.indices.numel()), *self.block)

    def _dense_from_values(self, values: torch.Tensor) -> torch.Tensor:
        r, c = self.block
        rows, cols = self.shape
        ptr = self.indptr.to(torch.int64)
        brow = torch.repeat_interleave(torch.arange(rows // r), ptr[1:] - ptr[:-1])
        tiles = torch.zeros(rows // r, cols // c, r, c, dtype=values.dtype)
        tiles[brow, self.indices.to(torch.int64)] = values.reshape(-1, r, c)
        return tiles.permute(0, 2, 1, 3).reshape(rows, cols)

    def _index_fields(self) -> dict[str, torch.Tensor]:
        return {"indptr": self.indptr, "indices": self.indices}

    def _params(self) -> dict[str, Any]:
        return {"block": list(self.block)}

    @classmethod
    def _from_index_fields(cls, shape, dtype, params, fields, what):  # type: ignore[override]
        try:
            r, c = _block(params["block"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SparsemergeError(f"{what}: bad BSR parameters {params!r}: {exc}") from None
        rows, cols = shape
        if rows % r or cols % c:
            raise SparsemergeError(f"{what}: BSR block {r}x{c} does not divide shape {rows}x{cols}")
        indices = need(fields, "indices", index_dtype(max(cols // c - 1, 0)), None, what)
        indptr = need(fields, "indptr", index_dtype(indices.numel()), (rows // r + 1,), what)
        obj = cls(shape, dtype, (r, c), indptr, indices, None)
        obj._check_indices(what)
        return obj

    def _check_indices(self, what: str) -> None:
        r, c = self.block
        ptr = self.indptr.to(torch.int64)
        nb = self.indices.numel()
        if self.indices.dim() != 1 or int(ptr[0]) != 0 or int(ptr[-1]) != nb or bool((ptr[1:] < ptr[:-1]).any()):
            raise SparsemergeError(f"{what}: BSR indptr must rise from 0 to nblocks={nb} (corrupt file?)")
        if nb == 0:
            return
        col = self.indices.to(torch.int64)
        bcols = self.shape[1] // c
        if int(col.min()) < 0 or int(col.max()) >= bcols:
            raise SparsemergeError(f"{what}: BSR block column out of range (corrupt file?)")
        brow = torch.repeat_interleave(torch.arange(self.shape[0] // r), ptr[1:] - ptr[:-1])
        key = brow * bcols + col
        if bool((key[1:] <= key[:-1]).any()):
            raise SparsemergeError(f"{what}: BSR block columns must ascend within each block row")

    def check(self, full: bool = False) -> None:
        self._check_indices("bsr")
        if tuple(self.values_float.shape) != self._values_shape():
            raise SparsemergeError(f"bsr: values shape {tuple(self.values_float.shape)} != {self._values_shape()}")
