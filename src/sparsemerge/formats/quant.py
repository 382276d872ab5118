"""INT8 / INT4 value codecs, symmetric or asymmetric, per output channel or per group of G.

Applied to a format's stored values ``X`` of shape ``(rows, k)`` (1-D values are one row).
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

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.base import CODECS, ValueCodec, dtype_name, need
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
        q = self.codes.to(torch.float32)
        if self.zero_point is not None:
            q = q - _expand(self.zero_point, q.shape[1], self.group_size).to(torch.float32)
        return (q * self.expanded_scale()).reshape(self.shape)

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
    x = _as_rows(values.detach().cpu()).to(torch.float32)
    rows, k = x.shape
    ng = n_groups_for(k, group_size)
    g = k if group_size == 0 else group_size
    width = ng * g if k else 0
    padded = torch.nn.functional.pad(x, (0, width - k)) if width > k else x
    groups = padded.reshape(rows, ng, max(g, 1)) if k else padded.reshape(rows, 1, 0)
    qmax = 2 ** (bits - 1) - 1
    qmin = -(2 ** (bits - 1))
    if symmetric:
        absmax = groups.abs().amax(dim=2) if k else torch.zeros(rows, 1)
        _check_finite(absmax)
        scale = absmax / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.clamp(torch.round(groups / scale[..., None]), -qmax, qmax)
        zero_point = None
    else:
        lo = torch.clamp(groups.amin(dim=2), max=0.0) if k else torch.zeros(rows, 1)
        hi = torch.clamp(groups.amax(dim=2), min=0.0) if k else torch.zeros(rows, 1)
        _check_finite(hi - lo)
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
        q = torch.clamp(torch.round(groups / scale[..., None]) + zp[..., None], qmin, qmax)
        zero_point = zp.to(torch.int8).contiguous()
    codes = q.reshape(rows, -1)[:, :k].to(torch.int8).contiguous()
    return QuantizedValues(codes, scale.to(torch.float32).contiguous(), zero_point, bits, group_size, symmetric, shape)


def _check_finite(extent: torch.Tensor) -> None:
    # A NaN or infinity in a group makes its extent non-finite (cheaper than scanning x).
    if not bool(torch.isfinite(extent).all()):
        raise SparsemergeError("cannot quantize values that contain NaN or infinity")


def dequantize(codec: QuantizedValues) -> torch.Tensor:
    """``x_hat`` of the module docstring, float32, in the quantized values' shape."""
    return codec.decode()
