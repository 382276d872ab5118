"""N:M packed format (chapter 10.1.3, 10.2.2, 10.4.2): kept values plus position metadata.

A weight ``(rows, cols)`` with ``cols % M == 0`` is split along the input dimension into
``G = cols / M`` groups per row. Every group has exactly N *slots*: its nonzeros, and - for a
group holding fewer than N nonzeros - the lowest-index zero positions, stored as explicit
zeros. The layout is therefore regular and every group decodes exactly.

Storage fields:

``values``     ``(rows, cols*N/M)`` the slot values in group order (group 0's N slots in
               ascending position, then group 1 ...), source dtype - or ``values.*`` codec
               fields (:mod:`quant`, :mod:`codebook`).
``metadata``   uint8 bitstream of the positions in one of three codings (``bits2``,
               ``index``, ``entropy``; :mod:`sparsemerge.formats.nm_coding`),
               ``ceil(rows * row_bits / 8)`` bytes.

Parameters: ``{"n", "m", "metadata": "bits2"|"index"|"entropy", "codec"}``.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch

from sparsemerge.errors import PatternViolation, SparsemergeError
from sparsemerge.formats.base import FORMATS, FormatOption, PackOptions, SparseFormat, check_2d, need
from sparsemerge.formats.bits import packed_nbytes
from sparsemerge.formats.nm_coding import CODINGS, ENTROPY_MAX_COMBINATIONS, coding_row_bits, decode_metadata, encode_metadata, select_slots
from sparsemerge.formats.size import PlanRow, nm_plan_rows, nm_quant_plan_rows
from sparsemerge.patterns import NM, parse_pattern


@FORMATS.register("nm")
class NMPacked(SparseFormat):
    """N:M packed weight.

    Public fields for kernels: ``shape`` (rows, cols), ``n``, ``m``, ``coding``,
    ``values`` (float tensor ``(rows, cols*n//m)`` or a codec standing for it;
    :attr:`values_float` decodes), :meth:`positions` (uint8, same shape as the values,
    each slot's in-group position 0..m-1, ascending within a group). Groups with fewer than
    ``n`` nonzeros hold explicit zeros in their unused slots.
    """

    name = "nm"
    help = "N:M packed values + position metadata (--pattern, --metadata)"
    options = (
        FormatOption("pattern", "2:4", "N:M pattern of the nm format (default 2:4); hier:K:L@B/N:M for hnm"),
        FormatOption("metadata", "entropy", "nm position coding: " + ", ".join(c + " (default)" * (c == "entropy") for c in CODINGS)),
    )
    plan_order = 50

    @classmethod
    def pack_params(cls, shape: tuple[int, ...], config: PackOptions) -> tuple[dict[str, Any], Optional[str]]:
        pattern = parse_pattern(config.option("pattern"))
        if not isinstance(pattern, NM):
            hint = "; hierarchical patterns pack with --format hnm" if str(pattern).startswith("hier:") else ""
            raise SparsemergeError(f"the nm format needs an N:M pattern such as 2:4, got {pattern}{hint}")
        if shape[1] % pattern.m:
            return {}, f"input dimension {shape[1]} not divisible by M={pattern.m}"
        return {"n": pattern.n, "m": pattern.m, "metadata": config.option("metadata")}, None

    @classmethod
    def plan_rows(cls, p: Any) -> list[PlanRow]:
        return nm_plan_rows(p)

    @classmethod
    def plan_quant_rows(cls, p: Any) -> list[PlanRow]:
        return nm_quant_plan_rows(p)

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, n: int, m: int, coding: str, values: Any, positions: torch.Tensor) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self.dtype = dtype
        self.n, self.m, self.coding = int(n), int(m), coding
        self.values = values
        self._positions = positions  # (rows, k) uint8
        self._stream: "torch.Tensor | None" = None

    @property
    def groups_per_row(self) -> int:
        return self.shape[1] // self.m

    @property
    def kept_per_row(self) -> int:
        return self.shape[1] * self.n // self.m

    def positions(self) -> torch.Tensor:
        """In-group position (0..m-1) of every stored value, uint8 ``(rows, cols*n//m)``."""
        return self._positions

    def column_indices(self) -> torch.Tensor:
        """Absolute input column of every stored value, int64 ``(rows, cols*n//m)``."""
        group = torch.arange(self.kept_per_row, dtype=torch.int64) // self.n
        return group * self.m + self._positions.to(torch.int64)

    @classmethod
    def from_dense(cls, dense: torch.Tensor, n: int = 2, m: int = 4, metadata: str = "entropy", pattern: "str | None" = None) -> "NMPacked":
        """Pack a weight whose every group of ``m`` inputs has at most ``n`` nonzeros.

        Raises :class:`PatternViolation` (count and first offending row/group) otherwise:
        prune first (``sparsemerge prune --pattern N:M``) or use a general format.
        """
        if pattern is not None:
            parsed = parse_pattern(pattern)
            if not isinstance(parsed, NM):
                raise SparsemergeError(f"the nm format needs an N:M pattern such as 2:4, got {pattern!r}")
            n, m = parsed.n, parsed.m
        NM(n, m)
        if metadata not in CODINGS:
            raise SparsemergeError(f"unknown N:M metadata coding {metadata!r}; use one of {', '.join(CODINGS)}")
        if metadata == "entropy" and math.comb(m, n) > ENTROPY_MAX_COMBINATIONS:
            raise SparsemergeError(
                f"entropy coding supports C(M,N) < 2**32; C({m},{n}) = {math.comb(m, n)} is larger - use --metadata index"
            )
        dense = check_2d(dense, "nm")
        rows, cols = dense.shape
        if cols % m:
            raise SparsemergeError(f"N:M {n}:{m} needs the input dimension divisible by {m}; shape {rows}x{cols}")
        groups = dense.reshape(-1, m)
        positions, bad, first = select_slots(groups != 0, n)
        if bad:
            gpr = cols // m
            raise PatternViolation(
                f"not {n}:{m} sparse: {bad} of {groups.shape[0]} groups hold more than {n} nonzeros "
                f"(first: row {first // gpr}, columns {first % gpr * m}..{first % gpr * m + m - 1}); "
                f"prune it first (sparsemerge prune --pattern {n}:{m}) or pack it with a general format (bitmask, csr)"
            )
        values = torch.gather(groups, 1, positions.to(torch.int64)).reshape(rows, cols * n // m).contiguous()
        return cls((rows, cols), dense.dtype, n, m, metadata, values, positions.reshape(rows, -1).contiguous())

    def _values_shape(self) -> tuple[int, ...]:
        return (self.shape[0], self.kept_per_row)

    def _dense_from_values(self, values: torch.Tensor) -> torch.Tensor:
        rows, cols = self.shape
        out = torch.zeros(rows * self.groups_per_row, self.m, dtype=values.dtype)
        out.scatter_(1, self._positions.reshape(-1, self.n).to(torch.int64), values.reshape(-1, self.n))
        return out.reshape(rows, cols)

    def metadata_stream(self) -> torch.Tensor:
        if self._stream is None:
            self._stream = encode_metadata(self._positions.reshape(-1, self.n), self.coding, self.n, self.m, self.shape[0])
        return self._stream

    def metadata_bits_per_group(self) -> float:
        groups = self.shape[0] * self.groups_per_row
        return 8.0 * self.metadata_stream().numel() / max(groups, 1)

    def _index_fields(self) -> dict[str, torch.Tensor]:
        return {"metadata": self.metadata_stream()}

    def _params(self) -> dict[str, Any]:
        return {"n": self.n, "m": self.m, "metadata": self.coding}

    @classmethod
    def _from_index_fields(cls, shape, dtype, params, fields, what):  # type: ignore[override]
        try:
            n, m, coding = int(params["n"]), int(params["m"]), str(params["metadata"])
            NM(n, m)
        except (KeyError, TypeError, ValueError) as exc:
            raise SparsemergeError(f"{what}: bad N:M parameters {params!r}: {exc}") from None
        if coding not in CODINGS:
            raise SparsemergeError(f"{what}: unknown N:M metadata coding {coding!r}")
        rows, cols = shape
        if cols % m:
            raise SparsemergeError(f"{what}: shape {rows}x{cols} is not divisible into groups of M={m}")
        gpr = cols // m
        row_bits = coding_row_bits(coding, n, m, gpr)
        stream = need(fields, "metadata", torch.uint8, (packed_nbytes(rows, row_bits),), what)
        positions = decode_metadata(stream, coding, n, m, rows, gpr, what).reshape(rows, -1)
        obj = cls(shape, dtype, n, m, coding, None, positions.contiguous())
        obj._stream = stream
        return obj

    def check(self, full: bool = False) -> None:
        """Shapes and dtypes; ``full`` also validates every group's positions and that the
        stored metadata re-encodes to the same bytes."""
        rows, cols = self.shape
        k = self.kept_per_row
        pos = self._positions
        if tuple(pos.shape) != (rows, k) or pos.dtype != torch.uint8:
            raise SparsemergeError(f"nm: positions have shape {tuple(pos.shape)}, expected {(rows, k)} uint8")
        vshape = tuple(self.codec.shape) if self.codec is not None else tuple(self.values.shape)  # type: ignore[union-attr]
        if vshape != (rows, k):
            raise SparsemergeError(f"nm: values have shape {vshape}, expected {(rows, k)}")
        if not full:
            return
        groups = pos.reshape(-1, self.n).to(torch.int64)
        if groups.numel() and (int(groups.max()) >= self.m or (self.n > 1 and bool((groups[:, 1:] <= groups[:, :-1]).any()))):
            raise SparsemergeError("nm: positions must be ascending within a group and < M")
        if self._stream is not None:
            fresh = encode_metadata(groups, self.coding, self.n, self.m, rows)
            if not torch.equal(fresh, self._stream):
                raise SparsemergeError("nm: stored metadata does not re-encode to the same bytes")


def index_overhead_bits(n: int, m: int) -> dict[str, float]:
    """Metadata bits per group of each coding, and the entropy bound ``log2 C(M,N)``."""
    combos = math.comb(m, n)
    return {
        "bits2": n * max(m - 1, 0).bit_length(),
        "index": max(combos - 1, 0).bit_length(),
        "entropy_bound": math.log2(combos),
    }
