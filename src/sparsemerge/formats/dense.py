"""Dense storage (tensors left unpruned: embeddings, norms, the output head), optionally
with a value codec (e.g. the embedding in INT8). Storage field: ``values`` of the tensor's
shape, or ``values.*`` codec fields for a 2-D tensor."""
from __future__ import annotations

from typing import Any

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.base import FORMATS, SparseFormat
from sparsemerge.formats.size import PlanRow, dense_nbytes


@FORMATS.register("dense")
class Dense(SparseFormat):
    name = "dense"
    help = "every tensor dense (the targeted weights take --quant / --codebook)"
    plan_order = 0
    float_values_only = False
    two_d_only = False

    @classmethod
    def plan_rows(cls, p: Any) -> list[PlanRow]:
        return [p.row("dense", f"{8 * p.value_bytes}-bit values", dense_nbytes(p.rows, p.cols, p.value_bytes))]

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, values: Any) -> None:
        self.shape = tuple(int(s) for s in shape)  # type: ignore[assignment]
        self.dtype = dtype
        self.values = values

    @classmethod
    def from_dense(cls, dense: torch.Tensor) -> "Dense":
        if not isinstance(dense, torch.Tensor):
            raise SparsemergeError(f"dense: expected a torch.Tensor, got {type(dense).__name__}")
        dense = dense.detach().cpu().contiguous()
        return cls(tuple(dense.shape), dense.dtype, dense)

    @property
    def numel(self) -> int:
        out = 1
        for s in self.shape:
            out *= s
        return out

    def _values_shape(self) -> tuple[int, ...]:
        return tuple(self.shape)

    def _dense_from_values(self, values: torch.Tensor) -> torch.Tensor:
        return values.reshape(self.shape)

    def _index_fields(self) -> dict[str, torch.Tensor]:
        return {}

    def _params(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _from_index_fields(cls, shape, dtype, params, fields, what):  # type: ignore[override]
        return cls(shape, dtype, None)

    def check(self, full: bool = False) -> None:
        if tuple(self.values_float.shape) != tuple(self.shape):
            raise SparsemergeError(f"dense: values shape {tuple(self.values_float.shape)} != {self.shape}")
