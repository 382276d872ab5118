"""The row-blocked N:M execution layout that the CPU kernels read (pure tensor functions).

A weight ``W`` of shape ``(rows, cols)`` that keeps ``n`` of every ``m`` consecutive inputs
(chapter 10.1.3, 10.2.7) is stored in blocks of ``R = 64`` output rows. Inside a block the
``R`` values of one (group, slot) are contiguous, so a batch-1 kernel reads one stream and
works on 16 rows per AVX-512 vector; the input element is chosen per row by
compare-and-blend (2:4) or by a gather (general N:M)::

    values[b, g, s, r]   value of slot s (0..n-1) of group g in row b*R + r  (float or int8)
    packed[b, g, k, r]   INT4: slots 2k (low nibble) and 2k+1 (high nibble), unsigned codes
    meta[b, w, r]        2:4 only, uint32: 4 bits per group g = 8w + j at bits 4j..4j+3:
                         bit0 = p0 >= 1, bit1 = p0 == 2, bit2 = p1 >= 2, bit3 = p1 == 3
                         for the kept positions p0 < p1 (so x is picked by two blends each)
    index[b, g, s, r]    general N:M, uint8: position 0..m-1 of slot s
    scale[b, q, r]       per quantization group q of ``group_size`` stored values
                         (q = g // (group_size / n)); one q per row when per channel;
                         zero[b, q, r] the zero point (int4 always, 8 when symmetric; int8
                         only when asymmetric). Codes follow formats/quant.py.

Dequantization: ``w = (code - zero) * scale``; ``y_i = sum_g sum_s w_{i,g,s} x[g*m + p_{i,g,s}]``.
Rows are padded to a multiple of R with zero values (outputs sliced off).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.io.dtypes import dtype_from_name
from sparsemerge.patterns import NM

BLOCK_ROWS = 64
CODECS = ("none", "int8", "int4")
# the float value dtypes the layout stores, from the one dtype table (io/dtypes.py)
VALUE_DTYPES = {name: dtype_from_name(name) for name in ("float32", "float16", "bfloat16")}


@dataclass
class BlockedNM:
    """A layer in the row-blocked layout (see module docstring). Tensors live on one device."""

    rows: int
    cols: int
    n: int
    m: int
    codec: str  # "none" | "int8" | "int4"
    values: torch.Tensor  # (nb, G, n, R) float/int8, or (nb, G, ceil(n/2), R) uint8 for int4
    meta: Optional[torch.Tensor]  # 2:4: (nb, ceil(G/8), R) int32 (bit pattern of uint32)
    index: Optional[torch.Tensor]  # general N:M: (nb, G, n, R) uint8
    scale: Optional[torch.Tensor] = None  # (nb, Q, R) float32
    zero: Optional[torch.Tensor] = None  # (nb, Q, R) float32 or None (symmetric int8)
    group_size: Optional[int] = None  # stored (kept) values per scale; None = per channel
    extra: dict = field(default_factory=dict)

    @property
    def groups(self) -> int:
        return self.cols // self.m

    @property
    def is_24(self) -> bool:
        return self.n == 2 and self.m == 4

    @property
    def groups_per_scale(self) -> int:
        """Groups of m inputs that share one scale (all of them when per channel)."""
        return self.groups if self.group_size is None else self.group_size // self.n

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("values", "meta", "index", "scale", "zero")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: "torch.device | str") -> "BlockedNM":
        out = BlockedNM(**{**self.__dict__})
        for k, t in self.tensors().items():
            setattr(out, k, t.to(device))
        return out


def _check_inputs(weight: torch.Tensor, n: int, m: int, codec: str, group_size: Optional[int]) -> None:
    NM(n, m)  # validates 0 < n < m
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise SparsemergeError(f"expected a 2-D weight (out_features, in_features), got {getattr(weight, 'shape', weight)!r}")
    if weight.shape[1] % m:
        raise SparsemergeError(
            f"N:M {n}:{m} groups the input dimension in runs of {m}, but it is {weight.shape[1]}; "
            "keep this layer dense (exclude it) or choose another M"
        )
    if codec not in CODECS:
        raise SparsemergeError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")
    if group_size is not None:
        if codec == "none":
            raise SparsemergeError("group_size applies to int8/int4 codecs only; drop it or pick --quant int8|int4")
        if group_size <= 0 or group_size % n:
            raise SparsemergeError(
                f"group_size counts stored (kept) values per scale and must be a positive multiple of N={n}, "
                f"got {group_size}; e.g. 128 (or omit it for one scale per output channel)"
            )
    if not weight.is_floating_point() or not torch.isfinite(weight).all():
        raise SparsemergeError("the weight must be a finite floating-point tensor; check the checkpoint")


def kept_positions(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """``(rows, G, n)`` ascending in-group positions of the kept slots of an N:M weight.

    Groups with fewer than n nonzeros are filled with zero-valued positions; a group with
    more than n nonzeros raises (the weight is not N:M; prune it first).
    """
    rows, cols = weight.shape
    nz = (weight != 0).reshape(rows, cols // m, m)
    over = int((nz.sum(-1) > n).sum())
    if over:
        raise SparsemergeError(
            f"weight of shape {rows}x{cols} is not {n}:{m} sparse: {over} groups hold more than {n} nonzeros; "
            f"prune it first (sparsemerge prune --pattern {n}:{m}), or let loading prune it: --prune on the command line, "
            "prune=True in Python"
        )
    # nonzeros first (stable), then the first n positions in ascending order
    order = torch.sort((~nz).to(torch.int8), dim=-1, stable=True).indices[..., :n]
    return torch.sort(order, dim=-1).values


def quantize_slots(
    vals: torch.Tensor, codec: str, group_size: Optional[int], symmetric: bool = True
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Quantize kept values ``vals (rows, G, n)`` with the storage codec
    (:func:`sparsemerge.formats.quant.quantize`: ``scale = absmax / qmax``,
    ``q = clamp(round(x / scale), -qmax, qmax)``, or the asymmetric form with a zero point)
    over runs of ``group_size`` stored values per row (None: per output channel).
    Returns layout codes ``(rows, G, n)`` (int8 for INT8; unsigned ``q + 8`` for INT4), the
    scale ``(rows, Q)`` and the zero point ``(rows, Q)`` or None.
    """
    from sparsemerge.formats.quant import quantize

    rows, g, n = vals.shape
    qv = quantize(vals.reshape(rows, g * n), 8 if codec == "int8" else 4, group_size or 0, symmetric)
    return codes_from_quantized(qv.codes, qv.scale, qv.zero_point, codec, (rows, g, n))


def codes_from_quantized(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: Optional[torch.Tensor], codec: str, shape: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Storage codes (int8, INT4 sign-extended; ``x = (q - zp) * scale``) -> layout codes."""
    q = codes.reshape(shape)
    z = None if zero_point is None else zero_point.float()
    if codec == "int8":
        return q.to(torch.int8), scale.float(), z
    u = (q.to(torch.int16) + 8).to(torch.uint8)  # unsigned nibble, zero point shifted by 8
    return u, scale.float(), (torch.full_like(scale.float(), 8.0) if z is None else z + 8.0)


def _block(t: torch.Tensor, rows_pad: int, fill: float = 0) -> torch.Tensor:
    """(rows, ...) -> (nb, ..., R): rows padded, then the row index moved innermost."""
    rows = t.shape[0]
    if rows_pad != rows:
        pad = torch.full((rows_pad - rows, *t.shape[1:]), fill, dtype=t.dtype)
        t = torch.cat([t, pad])
    t = t.reshape(rows_pad // BLOCK_ROWS, BLOCK_ROWS, *t.shape[1:])
    return t.movedim(1, -1).contiguous()


def encode_24_meta(pos: torch.Tensor) -> torch.Tensor:
    """(rows, G, 2) positions -> (rows, ceil(G/8)) int32 words of 4-bit blend codes."""
    p0, p1 = pos[..., 0].long(), pos[..., 1].long()
    code = (p0 >= 1).long() | ((p0 == 2).long() << 1) | ((p1 >= 2).long() << 2) | ((p1 == 3).long() << 3)
    rows, g = code.shape
    words = -(-g // 8)
    full = torch.zeros(rows, words * 8, dtype=torch.long)
    full[:, :g] = code
    shifts = torch.arange(8, dtype=torch.long) * 4
    word = (full.reshape(rows, words, 8) << shifts).sum(-1)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def decode_24_meta(meta_rows: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`encode_24_meta`: (rows, W) int32 -> (rows, G, 2) positions."""
    word = meta_rows.long() & 0xFFFFFFFF
    shifts = torch.arange(8, dtype=torch.long) * 4
    code = ((word[..., None] >> shifts) & 15).reshape(word.shape[0], -1)[:, :groups]
    p0 = (code & 1) + ((code >> 1) & 1)
    p1 = 1 + ((code >> 2) & 1) + ((code >> 3) & 1)
    return torch.stack([p0, p1], -1)


def pack_blocked(
    weight: torch.Tensor,
    n: int = 2,
    m: int = 4,
    codec: str = "none",
    group_size: Optional[int] = None,
    value_dtype: str = "float32",
    symmetric: bool = True,
) -> BlockedNM:
    """Pack an N:M weight ``(rows, cols)`` into the blocked layout (quantizing if asked)."""
    _check_inputs(weight, n, m, codec, group_size)
    weight = weight.detach().cpu()
    rows, cols = weight.shape
    pos = kept_positions(weight, n, m)
    vals = torch.gather(weight.float().reshape(rows, cols // m, m), 2, pos)  # (rows, G, n)
    codes = None if codec == "none" else quantize_slots(vals, codec, group_size, symmetric)
    return pack_slots(rows, cols, n, m, pos, vals, codec, codes, group_size, value_dtype)


def pack_slots(
    rows: int,
    cols: int,
    n: int,
    m: int,
    positions: torch.Tensor,
    vals: Optional[torch.Tensor],
    codec: str = "none",
    codes: Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None,
    group_size: Optional[int] = None,
    value_dtype: str = "float32",
) -> BlockedNM:
    """Block already selected slots: ``positions (rows, G, n)``; float ``vals (rows, G, n)``
    or, for int8/int4, layout ``codes = (q (rows, G, n), scale (rows, Q), zero or None)``
    (see :func:`codes_from_quantized`)."""
    if value_dtype not in VALUE_DTYPES:
        raise SparsemergeError(f"unknown value dtype {value_dtype!r}; expected one of {', '.join(VALUE_DTYPES)}")
    g = cols // m
    pos = positions.reshape(rows, g, n).long()
    rows_pad = -(-rows // BLOCK_ROWS) * BLOCK_ROWS
    meta = index = None
    if n == 2 and m == 4:
        meta = _block(encode_24_meta(pos), rows_pad)
    else:
        index = _block(pos.to(torch.uint8), rows_pad)
    values, scale, zero = block_slot_values(rows, g, n, vals, codec, codes, value_dtype)
    return BlockedNM(rows, cols, n, m, codec, values, meta, index, scale, zero, group_size)


def block_slot_values(
    rows: int,
    g: int,
    n: int,
    vals: Optional[torch.Tensor],
    codec: str = "none",
    codes: Optional[tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]] = None,
    value_dtype: str = "float32",
) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The blocked ``(values, scale, zero)`` of :func:`pack_slots` alone (the positions'
    metadata left out): what changes when only the values of a layer change."""
    rows_pad = -(-rows // BLOCK_ROWS) * BLOCK_ROWS
    scale = zero = None
    if codec == "none":
        values = _block(vals.reshape(rows, g, n).to(VALUE_DTYPES[value_dtype]), rows_pad)
    else:
        q, s, z = codes
        if codec == "int4":
            if n % 2:
                q = torch.cat([q, torch.full_like(q[..., :1], 8)], -1)  # pad slot decodes to 0
            q = q.to(torch.uint8)
            q = q[..., 0::2] | (q[..., 1::2] << 4)
            z = torch.full_like(s, 8.0) if z is None else z
        values = _block(q.contiguous(), rows_pad, fill=8 if codec == "int4" else 0)
        scale = _block(s.float(), rows_pad, fill=1.0)
        zero = None if z is None else _block(z.float(), rows_pad, fill=8.0 if codec == "int4" else 0.0)
    return values, scale, zero


def unblock(t: torch.Tensor, rows: int) -> torch.Tensor:
    """(nb, ..., R) -> (rows, ...): inverse of the row blocking."""
    t = t.movedim(-1, 1)
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])[:rows]


def positions_of(layer: BlockedNM) -> torch.Tensor:
    """(rows, G, n) int64 kept positions."""
    if layer.meta is not None:
        return decode_24_meta(unblock(layer.meta, layer.rows).cpu(), layer.groups).to(layer.values.device)
    return unblock(layer.index, layer.rows).long()


def dequantized_values(layer: BlockedNM) -> torch.Tensor:
    """(rows, G, n) float32 values ``(code - zero) * scale``."""
    v = unblock(layer.values, layer.rows)
    if layer.codec == "none":
        return v.float()
    if layer.codec == "int4":
        v = torch.stack([v & 15, v >> 4], -1).reshape(*v.shape[:2], -1)[..., : layer.n]
    v = v.float()
    gps = layer.groups_per_scale
    s = unblock(layer.scale, layer.rows).repeat_interleave(gps, dim=1)[:, : layer.groups, None]
    if layer.zero is not None:
        z = unblock(layer.zero, layer.rows).repeat_interleave(gps, dim=1)[:, : layer.groups, None]
        v = v - z
    return v * s


def to_dense(layer: BlockedNM) -> torch.Tensor:
    """The (rows, cols) float32 weight the layout represents (for tests and fallbacks)."""
    vals = dequantized_values(layer)
    pos = positions_of(layer)
    dense = torch.zeros(layer.rows, layer.groups, layer.m, dtype=torch.float32, device=vals.device)
    dense.scatter_(2, pos, vals)
    return dense.reshape(layer.rows, layer.cols)
