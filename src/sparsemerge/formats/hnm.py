"""Hierarchical N:M packed format (chapter 10.2.5): a kept-block bitmap per row tile plus the
N:M packed values and positions of the kept blocks.

Pattern ``hier:K:L@RxB/N:M`` (:class:`~sparsemerge.patterns.Hierarchical`): a weight
``(rows, cols)`` is cut into tiles of ``R`` rows x ``B`` inputs (``T = rows/R`` row tiles,
``NB = cols/B`` blocks per row); in every run of ``L`` blocks of a row tile exactly ``K``
are *kept* - the blocks holding a nonzero, then (for a run with fewer than K) the
lowest-index empty ones; inside a kept block every group of ``M`` inputs has exactly ``N``
slots, filled as in :mod:`sparsemerge.formats.nm`. So every row stores
``KB = NB*K/L`` blocks, ``GK = KB*B/M`` groups and ``V = GK*N`` values, and every group decodes exactly.

Storage fields:

``blocks``     uint8 ``(T, ceil(NB/8))``: bit ``b`` of tile row ``t`` (LSB first, as
               :mod:`sparsemerge.formats.bitmask`) is set when block ``b`` is kept; exactly
               K set bits per run of L (anything else is refused as corrupt).
``values``     ``(rows, V)`` slot values: a row's kept blocks in ascending order, each
               block's groups, each group's N slots ascending - or ``values.*`` codec fields.
``metadata``   the kept groups' in-group positions as an N:M bitstream
               (:mod:`sparsemerge.formats.nm_coding`: ``bits2`` | ``index`` | ``entropy``,
               ``GK`` groups per row), ``ceil(rows * row_bits / 8)`` bytes.

Size: ``rows*V*vb + T*ceil(NB/8) + ceil(rows*row_bits(GK)/8)`` bytes (:func:`hnm_nbytes`).
Parameters: ``{"k", "l", "block", "tile_rows", "n", "m", "metadata", "codec"}``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from sparsemerge.errors import PatternViolation, SparsemergeError
from sparsemerge.formats.base import FORMATS, PackOptions, SparseFormat, check_2d, need
from sparsemerge.formats.bitmask import pack_mask, unpack_mask
from sparsemerge.formats.bits import packed_nbytes
from sparsemerge.formats.nm_coding import CODINGS, ENTROPY_MAX_COMBINATIONS, coding_row_bits, decode_metadata, encode_metadata, select_slots
from sparsemerge.formats.size import PlanRow
from sparsemerge.patterns import Hierarchical, parse_pattern


def hnm_nbytes(rows: int, cols: int, pattern: Hierarchical, coding: str, vb: int) -> int:
    """Bytes of a ``rows x cols`` weight in the hnm format with ``vb``-byte values."""
    gk = cols // pattern.span * pattern.k * pattern.block // pattern.m
    bitmap = rows // pattern.rows * math.ceil(cols // pattern.block / 8)
    return rows * gk * pattern.n * vb + bitmap + packed_nbytes(rows, coding_row_bits(coding, pattern.n, pattern.m, gk))


def _pattern_of(pattern: Any) -> Hierarchical:
    parsed = parse_pattern(pattern)
    if not isinstance(parsed, Hierarchical):
        raise SparsemergeError(
            f"the hnm format needs a hierarchical pattern such as hier:1:4@16/2:4 (--pattern), got {str(parsed)!r}; "
            "plain N:M patterns go to --format nm"
        )
    return parsed


@FORMATS.register("hnm")
class HNMPacked(SparseFormat):
    """Hierarchical N:M packed weight.

    Public fields for kernels: ``shape``, ``pattern`` (:class:`Hierarchical`), ``coding``,
    ``values`` (float ``(rows, V)`` or a codec), :meth:`kept_blocks` (int64 ``(T, KB)``
    ascending block indices per row tile), :meth:`positions` (uint8 ``(rows, V)``, each
    slot's in-group position), :meth:`column_indices` (absolute input column per slot).
    """

    name = "hnm"
    help = "hierarchical N:M: kept-block bitmap per row tile + N:M values of kept blocks (--pattern hier:..., --metadata)"
    plan_order = 55

    @classmethod
    def pack_params(cls, shape: tuple[int, ...], config: PackOptions) -> tuple[dict[str, Any], Optional[str]]:
        from sparsemerge.masks import pattern_applicable

        pattern = _pattern_of(config.option("pattern"))
        reason = pattern_applicable(tuple(shape), pattern)
        if reason is not None:
            return {}, reason
        return {"pattern": pattern, "metadata": config.option("metadata")}, None

    @classmethod
    def plan_rows(cls, p: Any) -> list[PlanRow]:
        pattern = p.pattern
        if not isinstance(pattern, Hierarchical) or p.rows % pattern.rows or p.cols % pattern.span:
            return []
        out = []
        for coding in CODINGS:
            if coding == "entropy" and math.comb(pattern.m, pattern.n) > ENTROPY_MAX_COMBINATIONS:
                continue
            detail = f"{pattern.k}/{pattern.l} of {pattern.rows}x{pattern.block} tiles (bitmap), then {pattern.fine}"
            out.append(p.row(f"hnm/{coding}", detail, hnm_nbytes(p.rows, p.cols, pattern, coding, p.value_bytes)))
        return out

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, pattern: Hierarchical, coding: str, values: Any,
                 kept: torch.Tensor, positions: torch.Tensor) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.pattern = pattern
        self.coding = coding
        self.values = values
        self._kept = kept  # bool (T, NB): kept blocks per row tile
        self._positions = positions  # uint8 (rows, V)
        self._stream: "torch.Tensor | None" = None

    # ---------------------------------------------------------------- geometry
    @property
    def blocks_per_row(self) -> int:
        return self.shape[1] // self.pattern.block

    @property
    def kept_blocks_per_row(self) -> int:
        return self.blocks_per_row * self.pattern.k // self.pattern.l

    @property
    def groups_per_row(self) -> int:
        """Kept groups of M per row (``GK``)."""
        return self.kept_blocks_per_row * self.pattern.block // self.pattern.m

    @property
    def kept_per_row(self) -> int:
        return self.groups_per_row * self.pattern.n

    def kept_blocks(self) -> torch.Tensor:
        """Ascending kept block indices per row tile, int64 ``(T, KB)``."""
        kb = self.kept_blocks_per_row
        order = torch.sort((~self._kept).to(torch.int8), dim=1, stable=True).indices[:, :kb]
        return torch.sort(order, dim=1).values

    def positions(self) -> torch.Tensor:
        """In-group position (0..m-1) of every stored value, uint8 ``(rows, V)``."""
        return self._positions

    def kept_columns(self) -> torch.Tensor:
        """Input column of every position of a kept block per row, int64 ``(rows, KB*B)``."""
        B = self.pattern.block
        starts = self.kept_blocks().repeat_interleave(self.pattern.rows, 0) * B  # (rows, KB)
        return (starts[:, :, None] + torch.arange(B)).reshape(self.shape[0], -1)

    def column_indices(self) -> torch.Tensor:
        """Absolute input column of every stored value, int64 ``(rows, V)``."""
        p = self.pattern
        slot_group = torch.arange(self.kept_per_row) // p.n  # kept group of each slot
        within = slot_group * p.m + self._positions.to(torch.int64)  # offset into the kept columns
        return torch.gather(self.kept_columns(), 1, within)

    # ---------------------------------------------------------------- encode / decode
    @classmethod
    def from_dense(cls, dense: torch.Tensor, pattern: "Hierarchical | str | None" = None, metadata: str = "entropy") -> "HNMPacked":
        """Pack a weight that meets ``pattern`` (at most K nonzero blocks per run of L in every
        row tile, at most N nonzeros per group of M). Raises :class:`PatternViolation` (count
        and first offending place) otherwise: prune first or use a general format."""
        if pattern is None:
            raise SparsemergeError("the hnm format needs pattern=, e.g. hier:1:4@16/2:4")
        p = _pattern_of(pattern)
        if metadata not in CODINGS:
            raise SparsemergeError(f"unknown N:M metadata coding {metadata!r}; use one of {', '.join(CODINGS)}")
        if metadata == "entropy" and math.comb(p.m, p.n) > ENTROPY_MAX_COMBINATIONS:
            raise SparsemergeError(f"entropy coding supports C(M,N) < 2**32; C({p.m},{p.n}) is larger - use --metadata index")
        dense = check_2d(dense, "hnm")
        rows, cols = dense.shape
        from sparsemerge.masks import pattern_applicable

        reason = pattern_applicable((rows, cols), p)
        if reason is not None:
            raise SparsemergeError(f"hnm {p}: {reason} (shape {rows}x{cols})")
        R, B, nb = p.rows, p.block, cols // p.block
        used = (dense != 0).reshape(rows // R, R, nb, B).any(dim=(1, 3))  # (T, NB)
        slots, bad, first = select_slots(used.reshape(-1, p.l), p.k)
        if bad:
            runs = nb // p.l
            t, run = divmod(first, runs)
            raise PatternViolation(
                f"not {p} sparse: {bad} runs of {p.l} blocks hold more than {p.k} nonzero blocks (first: rows "
                f"{t * R}..{t * R + R - 1}, columns {run * p.span}..{run * p.span + p.span - 1}); "
                f"prune it first (sparsemerge prune --pattern {p}) or pack it with a general format (bitmask, csr)"
            )
        kept = torch.zeros(used.numel() // p.l, p.l, dtype=torch.bool)
        kept.scatter_(1, slots.to(torch.int64), True)
        obj = cls((rows, cols), dense.dtype, p, metadata, None, kept.reshape(used.shape), torch.empty(0, dtype=torch.uint8))
        sub = torch.gather(dense, 1, obj.kept_columns()).reshape(-1, p.m)  # kept blocks' groups
        positions, bad, first = select_slots(sub != 0, p.n)  # dropped blocks are empty: only kept groups can break N:M
        if bad:
            gpr = obj.groups_per_row
            col = int(obj.kept_columns()[first // gpr, first % gpr * p.m])
            raise PatternViolation(
                f"not {p} sparse: {bad} groups of {p.m} hold more than {p.n} nonzeros (first: row {first // gpr}, "
                f"columns {col}..{col + p.m - 1}); "
                f"prune it first (sparsemerge prune --pattern {p}) or pack it with a general format (bitmask, csr)"
            )
        obj.values = torch.gather(sub, 1, positions.to(torch.int64)).reshape(rows, -1).contiguous()
        obj._positions = positions.reshape(rows, -1).contiguous()
        return obj

    def _values_shape(self) -> tuple[int, ...]:
        return (self.shape[0], self.kept_per_row)

    def _dense_from_values(self, values: torch.Tensor) -> torch.Tensor:
        rows, cols = self.shape
        p = self.pattern
        sub = torch.zeros(rows * self.groups_per_row, p.m, dtype=values.dtype)
        sub.scatter_(1, self._positions.reshape(-1, p.n).to(torch.int64), values.reshape(-1, p.n))
        out = torch.zeros(rows, cols, dtype=values.dtype)
        out.scatter_(1, self.kept_columns(), sub.reshape(rows, -1))
        return out

    def metadata_stream(self) -> torch.Tensor:
        if self._stream is None:
            self._stream = encode_metadata(self._positions.reshape(-1, self.pattern.n), self.coding, self.pattern.n,
                                           self.pattern.m, self.shape[0])
        return self._stream

    def _index_fields(self) -> dict[str, torch.Tensor]:
        return {"blocks": pack_mask(self._kept), "metadata": self.metadata_stream()}

    def _params(self) -> dict[str, Any]:
        p = self.pattern
        return {"k": p.k, "l": p.l, "block": p.block, "tile_rows": p.rows, "n": p.n, "m": p.m, "metadata": self.coding}

    @classmethod
    def _from_index_fields(cls, shape, dtype, params, fields, what):  # type: ignore[override]
        try:
            p = Hierarchical(int(params["k"]), int(params["l"]), int(params["block"]), int(params["n"]), int(params["m"]),
                             int(params["tile_rows"]))
            coding = str(params["metadata"])
        except (KeyError, TypeError, ValueError, SparsemergeError) as exc:
            raise SparsemergeError(f"{what}: bad hierarchical N:M parameters {params!r}: {exc}") from None
        if coding not in CODINGS:
            raise SparsemergeError(f"{what}: unknown N:M metadata coding {coding!r}")
        from sparsemerge.masks import pattern_applicable

        rows, cols = shape
        reason = pattern_applicable((rows, cols), p)
        if reason is not None:
            raise SparsemergeError(f"{what}: shape {rows}x{cols} does not fit {p}: {reason}")
        nb = cols // p.block
        bits = need(fields, "blocks", torch.uint8, (rows // p.rows, math.ceil(nb / 8)), what)
        kept = unpack_mask(bits, nb)
        _check_kept(kept, p, what)
        obj = cls(shape, dtype, p, coding, None, kept, torch.empty(0, dtype=torch.uint8))
        gk = obj.groups_per_row
        stream = need(fields, "metadata", torch.uint8, (packed_nbytes(rows, coding_row_bits(coding, p.n, p.m, gk)),), what)
        obj._positions = decode_metadata(stream, coding, p.n, p.m, rows, gk, what).reshape(rows, -1).contiguous()
        obj._stream = stream
        return obj

    def check(self, full: bool = False) -> None:
        """Shapes and dtypes, K kept blocks per run of L; ``full`` also validates every group's
        positions and that the stored metadata re-encodes to the same bytes."""
        rows, cols = self.shape
        p = self.pattern
        if tuple(self._kept.shape) != (rows // p.rows, cols // p.block) or self._kept.dtype != torch.bool:
            raise SparsemergeError(f"hnm: block bitmap has shape {tuple(self._kept.shape)}, expected {(rows // p.rows, cols // p.block)}")
        _check_kept(self._kept, p, "hnm")
        k = self.kept_per_row
        pos = self._positions
        if tuple(pos.shape) != (rows, k) or pos.dtype != torch.uint8:
            raise SparsemergeError(f"hnm: positions have shape {tuple(pos.shape)}, expected {(rows, k)} uint8")
        vshape = tuple(self.codec.shape) if self.codec is not None else tuple(self.values.shape)  # type: ignore[union-attr]
        if vshape != (rows, k):
            raise SparsemergeError(f"hnm: values have shape {vshape}, expected {(rows, k)}")
        if not full:
            return
        groups = pos.reshape(-1, p.n).to(torch.int64)
        if groups.numel() and (int(groups.max()) >= p.m or (p.n > 1 and bool((groups[:, 1:] <= groups[:, :-1]).any()))):
            raise SparsemergeError("hnm: positions must be ascending within a group and < M")
        if self._stream is not None:
            fresh = encode_metadata(groups, self.coding, p.n, p.m, rows)
            if not torch.equal(fresh, self._stream):
                raise SparsemergeError("hnm: stored metadata does not re-encode to the same bytes")


def _check_kept(kept: torch.Tensor, p: Hierarchical, what: str) -> None:
    """Exactly K kept blocks in every run of L (a flipped bitmap bit breaks this)."""
    counts = kept.reshape(-1, p.l).sum(dim=1)
    bad = int((counts != p.k).sum())
    if bad:
        first = int((counts != p.k).nonzero()[0, 0])
        raise SparsemergeError(
            f"{what}: kept-block bitmap is invalid: {bad} runs of {p.l} blocks do not keep exactly {p.k} "
            f"(first: run {first} holds {int(counts[first])}); corrupt file?"
        )
