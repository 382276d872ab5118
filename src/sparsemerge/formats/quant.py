"""INT8 / INT4 value codecs, symmetric or asymmetric, per output channel or per group of G.

Applied to a format's stored values ``X`` of shape ``(rows, k)``: N:M and dense values are
2-D already; the 1-D values of bitmask / COO / CSR are one row (so "per channel" is one
scale for the tensor); BSR's ``(blocks, R, C)`` values are ``(blocks, R*C)``.
Groups are ``G`` consecutive stored values of a row (``group_size = 0``: the whole row, i.e.
one scale per output channel); ``n_groups = ceil(k / G)``, the last group may be shorter.
All arithmetic is float32; ``round`` is round-half-to-even (``torch.round``).

Symmetric (``qmax = 2**(b-1) - 1``: 127 or 7; the code -2**(b-1) is never produced)::

    scale = absmax(group) / qmax            (1.0 for an all-zero group)
    q     = clamp(round(x / scale), -qmax, qmax)
    x_hat = q * scale

Asymmetric (``qmin = -2**(b-1)``, ``qmax = 2**(b-1) - 1``; the range always contains 0, so
zeros - pruned slots - decode exactly)::

    lo, hi = min(min(group), 0), max(max(group), 0)
    scale  = (hi - lo) / (qmax - qmin)      (1.0 when hi == lo)
    zp     = clamp(round(qmin - lo / scale), qmin, qmax)     (int8)
    q      = clamp(round(x / scale) + zp, qmin, qmax)
    x_hat  = (q - zp) * scale

Both give ``|x - x_hat| <= scale / 2`` for every value (up to float32 rounding).

Storage fields (prefixed ``values.`` inside a format): ``codes`` - int8 ``(rows, k)`` for
INT8, uint8 ``(rows, ceil(k/2))`` for INT4 (two codes per byte, see
:func:`sparsemerge.formats.bits.pack_nibbles`: even column in the low nibble, 4-bit two's
complement); ``scale`` float32 ``(rows, n_groups)``; ``zero_point`` int8 ``(rows, n_groups)``
(asymmetric only). Parameters: ``{"kind": "int8"|"int4", "bits", "group_size", "symmetric"}``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numba
import numpy as np
import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.base import CODECS, CodecSpec, ValueCodec, dtype_name, need
from sparsemerge.formats.bits import pack_nibbles, unpack_nibbles


def _as_rows(values: torch.Tensor) -> torch.Tensor:
    if values.dim() == 1:
        return values.reshape(1, -1)
    if values.dim() != 2:
        return values.reshape(values.shape[0], -1)
    return values


def n_groups_for(k: int, group_size: int) -> int:
    return 1 if group_size == 0 or k == 0 else math.ceil(k / group_size)


@dataclass
class QuantizedValues(ValueCodec):
    """Integer codes plus float32 scales (and int8 zero points when asymmetric).

    ``codes``: int8 ``(rows, k)``, always unpacked in memory (INT4 in [-8, 7]); the packed
    on-disk form is :meth:`packed_codes`. ``scale``: float32 ``(rows, n_groups)``
    (``(rows, 1)`` per channel). ``zero_point``: int8 like ``scale`` or None (symmetric).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: Optional[torch.Tensor]
    bits: int
    group_size: int
    symmetric: bool
    shape: tuple[int, ...]

    @property
    def kind(self) -> str:  # type: ignore[override]
        return f"int{self.bits}"

    def int8_codes(self) -> torch.Tensor:
        """Unpacked int8 codes ``(rows, k)`` (INT4 codes sign-extended to int8)."""
        return self.codes

    def packed_codes(self) -> torch.Tensor:
        return self.codes if self.bits == 8 else pack_nibbles(self.codes)

    def expanded_scale(self) -> torch.Tensor:
        """Scale per code, ``(rows, k)`` float32."""
        return _expand(self.scale, self.codes.shape[1], self.group_size)

    def decode(self) -> torch.Tensor:
        codes = self.codes.numpy()
        out = np.empty(codes.shape, dtype=np.float32)
        zp = self.zero_point.numpy() if self.zero_point is not None else np.zeros(self.scale.shape, dtype=np.int8)
        g = codes.shape[1] if self.group_size == 0 else self.group_size
        _dequantize_rows(codes, self.scale.numpy(), zp, max(g, 1), out)
        return torch.from_numpy(out).reshape(self.shape)

    def fields(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.packed_codes(), "scale": self.scale}
        if self.zero_point is not None:
            out["zero_point"] = self.zero_point
        return out

    def params(self) -> dict[str, Any]:
        return {"kind": self.kind, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}

    @classmethod
    def from_fields(cls, shape: tuple[int, ...], params: dict[str, Any], fields: dict[str, torch.Tensor], what: str) -> "QuantizedValues":
        try:
            bits, group_size, symmetric = int(params["bits"]), int(params["group_size"]), bool(params["symmetric"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SparsemergeError(f"{what}: bad quantization parameters {params!r}: {exc}") from None
        if bits not in (4, 8) or group_size < 0:
            raise SparsemergeError(f"{what}: quantization bits must be 4 or 8 and group_size >= 0, got {params!r}")
        rows_view = _as_rows(torch.empty(shape, device="meta"))
        rows, k = rows_view.shape
        ng = n_groups_for(k, group_size)
        if bits == 8:
            codes = need(fields, "codes", torch.int8, (rows, k), what)
        else:
            packed = need(fields, "codes", torch.uint8, (rows, (k + 1) // 2), what)
            codes = unpack_nibbles(packed, k)
        scale = need(fields, "scale", torch.float32, (rows, ng), what)
        zero_point = None if symmetric else need(fields, "zero_point", torch.int8, (rows, ng), what)
        if not torch.isfinite(scale).all():
            raise SparsemergeError(f"{what}: quantization scales are not finite (corrupt file?)")
        return cls(codes, scale, zero_point, bits, group_size, symmetric, tuple(shape))

    @classmethod
    def encode(cls, values: torch.Tensor, spec: CodecSpec) -> "QuantizedValues":
        return quantize(values, 8 if spec.kind == "int8" else 4, spec.group_size, spec.symmetric)


CODECS.register("int8")(QuantizedValues)
CODECS.register("int4")(QuantizedValues)


def _expand(per_group: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    if group_size == 0 or per_group.shape[1] == 1:
        return per_group.expand(per_group.shape[0], k)
    return per_group.repeat_interleave(group_size, dim=1)[:, :k]


def quantize(values: torch.Tensor, bits: int = 8, group_size: int = 128, symmetric: bool = True) -> QuantizedValues:
    """Quantize ``values`` with the formulas of the module docstring."""
    if bits not in (4, 8):
        raise SparsemergeError(f"quantization supports 4 or 8 bits, got {bits}")
    if group_size < 0:
        raise SparsemergeError(f"group size must be >= 0 (0 = per output channel), got {group_size}")
    if not values.is_floating_point():
        raise SparsemergeError(f"quantize needs float values, got {dtype_name(values.dtype)}")
    shape = tuple(values.shape)
    x = np.ascontiguousarray(_as_rows(values.detach().cpu()).to(torch.float32).numpy())
    rows, k = x.shape
    ng = n_groups_for(k, group_size)
    g = k if group_size == 0 else group_size
    qmax = 2 ** (bits - 1) - 1
    qmin = -(2 ** (bits - 1))
    codes = np.zeros((rows, k), dtype=np.int8)
    scale = np.ones((rows, ng), dtype=np.float32)
    zp = np.zeros((rows, ng), dtype=np.int8)
    if k and not _quantize_rows(x, max(g, 1), qmin, qmax, symmetric, codes, scale, zp):
        raise SparsemergeError("cannot quantize values that contain NaN or infinity")
    zero_point = None if symmetric else torch.from_numpy(zp)
    return QuantizedValues(torch.from_numpy(codes), torch.from_numpy(scale), zero_point, bits, group_size, symmetric, shape)


@numba.njit(cache=True, nogil=True)
def _quantize_rows(x, g, qmin, qmax, symmetric, codes, scale, zp):  # pragma: no cover - compiled
    """The module docstring's formulas in float32, one pass per group; False on NaN/inf."""
    rows, k = x.shape
    fqmin = np.float32(qmin)
    fqmax = np.float32(qmax)
    for r in range(rows):
        for gi in range(scale.shape[1]):
            start = gi * g
            stop = min(start + g, k)
            lo = np.float32(0.0)
            hi = np.float32(0.0)
            for j in range(start, stop):
                v = x[r, j]
                if not np.isfinite(v):
                    return False
                if v < lo:
                    lo = v
                if v > hi:
                    hi = v
            if symmetric:
                absmax = max(hi, -lo)
                s = absmax / fqmax
                if not s > 0:
                    s = np.float32(1.0)
                scale[r, gi] = s
                for j in range(start, stop):
                    q = np.rint(x[r, j] / s)
                    codes[r, j] = np.int8(min(max(q, -fqmax), fqmax))
            else:
                s = (hi - lo) / (fqmax - fqmin)
                if not s > 0:
                    s = np.float32(1.0)
                z = min(max(np.rint(fqmin - lo / s), fqmin), fqmax)
                scale[r, gi] = s
                zp[r, gi] = np.int8(z)
                for j in range(start, stop):
                    q = np.rint(x[r, j] / s) + z
                    codes[r, j] = np.int8(min(max(q, fqmin), fqmax))
    return True


@numba.njit(cache=True, nogil=True)
def _dequantize_rows(codes, scale, zp, g, out):  # pragma: no cover - compiled
    """x_hat = (q - zp) * scale, float32."""
    rows, k = codes.shape
    for r in range(rows):
        for j in range(k):
            gi = j // g
            out[r, j] = np.float32(np.int32(codes[r, j]) - np.int32(zp[r, gi])) * scale[r, gi]


def dequantize(codec: QuantizedValues) -> torch.Tensor:
    """``x_hat`` of the module docstring, float32, in the quantized values' shape."""
    return codec.decode()
