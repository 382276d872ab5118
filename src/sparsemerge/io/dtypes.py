"""The one dtype table: safetensors codes <-> torch dtypes <-> names <-> numpy.

``name`` is torch's own name (``str(dtype)`` without ``torch.``), used in manifests, configs
and messages. ``rank`` is the position of the code in safetensors' ``Dtype`` enum
(safetensors/src/tensor.rs): ``save_file`` orders a file's tensors by descending rank, then
by name, and :mod:`sparsemerge.io.writer` reproduces that order byte for byte.
``numpy`` is the numpy dtype name, None where numpy has none (bfloat16, float8).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from sparsemerge.errors import SparsemergeError


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``."""
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class DtypeInfo:
    code: str  # safetensors header code, e.g. "BF16"
    torch: torch.dtype
    numpy: Optional[str]
    rank: int  # safetensors Dtype enum order (ascending)

    @property
    def name(self) -> str:
        return dtype_name(self.torch)

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch).element_size()


def _rows() -> list[DtypeInfo]:
    # (code, torch attribute, numpy name) in safetensors' enum order; attributes missing
    # from an older torch are skipped.
    spec = [
        ("BOOL", "bool", "bool"), ("U8", "uint8", "uint8"), ("I8", "int8", "int8"),
        ("F8_E5M2", "float8_e5m2", None), ("F8_E4M3", "float8_e4m3fn", None),
        ("F8_E4M3FNUZ", "float8_e4m3fnuz", None), ("F8_E5M2FNUZ", "float8_e5m2fnuz", None),
        ("I16", "int16", "int16"), ("U16", "uint16", "uint16"), ("F16", "float16", "float16"),
        ("BF16", "bfloat16", None), ("I32", "int32", "int32"), ("U32", "uint32", "uint32"),
        ("F32", "float32", "float32"), ("C64", "complex64", "complex64"), ("F64", "float64", "float64"),
        ("I64", "int64", "int64"), ("U64", "uint64", "uint64"),
    ]
    return [DtypeInfo(code, getattr(torch, attr), np, rank) for rank, (code, attr, np) in enumerate(spec) if hasattr(torch, attr)]


DTYPES: tuple[DtypeInfo, ...] = tuple(_rows())
BY_CODE: dict[str, DtypeInfo] = {d.code: d for d in DTYPES}
BY_TORCH: dict[torch.dtype, DtypeInfo] = {d.torch: d for d in DTYPES}
# name -> torch dtype for every row ("float32", "bfloat16", "float8_e4m3fn", ...)
DTYPE_NAMES: dict[str, torch.dtype] = {d.name: d.torch for d in DTYPES}
# Float dtypes a user may ask for as a working or stored dtype, and their short spellings.
FLOAT_NAMES: tuple[str, ...] = ("float32", "float16", "bfloat16", "float64")
ALIASES: dict[str, str] = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16", "float": "float32", "fp64": "float64"}

# safetensors code -> torch dtype (the table io/tensors.py exported before)
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {d.code: d.torch for d in DTYPES}


def dtype_from_name(name: str, what: str = "tensor") -> torch.dtype:
    """``"bfloat16"`` -> ``torch.bfloat16``; an unknown name is a clear error naming ``what``."""
    try:
        return DTYPE_NAMES[name]
    except (KeyError, TypeError):
        raise SparsemergeError(f"{what}: unknown dtype {name!r}; known: {', '.join(DTYPE_NAMES)}") from None


def from_code(code: str, what: str = "tensor") -> torch.dtype:
    """safetensors code (``"F32"``) -> torch dtype."""
    info = BY_CODE.get(code) if isinstance(code, str) else None
    if info is None:
        raise SparsemergeError(f"{what}: unsupported safetensors dtype {code!r}; known: {', '.join(BY_CODE)}")
    return info.torch


def to_code(dtype: torch.dtype, what: str = "tensor") -> str:
    """torch dtype -> safetensors code (``torch.float32`` -> ``"F32"``)."""
    info = BY_TORCH.get(dtype)
    if info is None:
        raise SparsemergeError(f"{what}: dtype {dtype_name(dtype)} cannot be stored in safetensors")
    return info.code


def itemsize(dtype: torch.dtype) -> int:
    info = BY_TORCH.get(dtype)
    return info.itemsize if info is not None else torch.empty((), dtype=dtype).element_size()


def numpy_dtype(dtype: torch.dtype) -> "object":
    """The numpy dtype of a torch dtype; a clear error for bfloat16/float8 (no numpy twin)."""
    import numpy as np

    info = BY_TORCH.get(dtype)
    if info is None or info.numpy is None:
        raise SparsemergeError(f"dtype {dtype_name(dtype)} has no numpy equivalent; view it as integers first")
    return np.dtype(info.numpy)
