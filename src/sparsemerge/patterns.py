"""Sparsity patterns as values, and the one string syntax that names them.

Syntax (documented in the README, parsed by :func:`parse_pattern`):

=========================  ===================================================================
``N:M``                    keep N of every M consecutive weights along the input dimension
                           (chapter 10.2.1; sparsity ``1 - N/M``), e.g. ``2:4``, ``1:4``, ``16:32``
``blockB:S``               B x B blocks, a fraction S of them zeroed per layer (10.2.4)
``blockRxC:S``             R x C blocks (rows x input columns)
``unstructured:S``         a fraction S of the weights zeroed in each layer
``unstructured-global:S``  a fraction S zeroed over all targeted layers together
``hier:K:L@B/N:M``         hierarchical N:M (10.2.5): each row's inputs in blocks of B; in every
                           L consecutive blocks K are kept (chosen once per B x B tile: all
                           B rows of a tile keep the same blocks), then N:M inside the kept
                           blocks; density ``K/L * N/M``, e.g. ``hier:1:4@16/2:4`` (the
                           chapter's 1:4 of 16x16 blocks, then 2:4: 87.5% sparse)
``hier:K:L@RxB/N:M``       the same with tiles of R rows x B inputs (``@1xB``: per row)
=========================  ===================================================================

S is always the *sparsity* (fraction of zeros), 0 <= S < 1; ``pattern.density`` is ``1 - S``.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Union

from sparsemerge.errors import SparsemergeError


@dataclass(frozen=True)
class NM:
    """Keep ``n`` of every ``m`` consecutive weights along the input (last) dimension."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int)):
            raise SparsemergeError(f"N:M needs integers, got N={self.n!r}, M={self.m!r}")
        if self.m <= 0:
            raise SparsemergeError(f"N:M needs M > 0, got M={self.m}; e.g. use 2:4")
        if not 0 < self.n < self.m:
            raise SparsemergeError(
                f"N:M needs 0 < N < M, got {self.n}:{self.m}; "
                "N is how many of each M weights are kept (e.g. 2:4 keeps half)"
            )

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    @property
    def density(self) -> float:
        return self.n / self.m

    @property
    def index_bits(self) -> int:
        """Bits to name one group's kept positions: ceil(log2 C(M, N)) (chapter 10.2.2)."""
        return math.ceil(math.log2(math.comb(self.m, self.n)))

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


@dataclass(frozen=True)
class Hierarchical:
    """Two-level N:M (chapter 10.2.5): coarse ``k:l`` over blocks, fine ``n:m`` inside them.

    A weight ``(out, in)`` is cut into tiles of ``rows`` output rows x ``block`` consecutive
    inputs. Along the input dimension, in every ``l`` consecutive tiles of a row tile exactly
    ``k`` are kept (the same for all ``rows`` rows, so a kernel skips a dropped tile for the
    whole row tile); inside a kept tile every group of ``m`` inputs keeps ``n``.
    Total sparsity ``1 - prod_i N_i/M_i = 1 - (k/l) * (n/m)``.
    """

    k: int
    l: int  # noqa: E741 - the chapter's name for the coarse group size
    block: int
    n: int
    m: int
    rows: int

    def __post_init__(self) -> None:
        values = (self.k, self.l, self.block, self.n, self.m, self.rows)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise SparsemergeError(f"hierarchical pattern needs integers, got K:L@RxB/N:M = {values!r}")
        try:
            NM(self.n, self.m)  # 0 < N < M
        except SparsemergeError as exc:
            raise SparsemergeError(f"hierarchical pattern, fine level: {exc}") from None
        if not 0 < self.k < self.l:
            raise SparsemergeError(
                f"hierarchical pattern needs 0 < K < L for the coarse level, got {self.k}:{self.l}; "
                "K of every L blocks are kept (K = L would be plain N:M)"
            )
        if self.block <= 0 or self.block % self.m:
            raise SparsemergeError(
                f"hierarchical pattern needs the block size B to be a positive multiple of M={self.m}, got B={self.block}; "
                f"e.g. hier:{self.k}:{self.l}@{4 * self.m}/{self.n}:{self.m}"
            )
        if self.rows <= 0:
            raise SparsemergeError(f"hierarchical pattern needs a row tile R >= 1, got {self.rows}")

    @property
    def density(self) -> float:
        return (self.k / self.l) * (self.n / self.m)

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    @property
    def fine(self) -> NM:
        return NM(self.n, self.m)

    @property
    def span(self) -> int:
        """Inputs per coarse group (``l`` blocks): the input dimension must divide by it."""
        return self.block * self.l

    def __str__(self) -> str:
        tile = str(self.block) if self.rows == self.block else f"{self.rows}x{self.block}"
        return f"hier:{self.k}:{self.l}@{tile}/{self.n}:{self.m}"


@dataclass(frozen=True)
class Block:
    """``rows x cols`` blocks that are kept or zeroed whole; ``sparsity`` of them zeroed."""

    rows: int
    cols: int
    sparsity: float

    def __post_init__(self) -> None:
        if self.rows <= 0 or self.cols <= 0:
            raise SparsemergeError(f"block size must be positive, got {self.rows}x{self.cols}")
        _check_sparsity(self.sparsity, "block")

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def __str__(self) -> str:
        size = str(self.rows) if self.rows == self.cols else f"{self.rows}x{self.cols}"
        return f"block{size}:{self.sparsity:g}"


@dataclass(frozen=True)
class Unstructured:
    """A fraction ``sparsity`` of individual weights zeroed, per layer or over all layers."""

    sparsity: float
    scope: str = "layer"  # "layer" | "global"

    def __post_init__(self) -> None:
        _check_sparsity(self.sparsity, "unstructured")
        if self.scope not in ("layer", "global"):
            raise SparsemergeError(f"unstructured scope must be 'layer' or 'global', got {self.scope!r}")

    @property
    def density(self) -> float:
        return 1.0 - self.sparsity

    def __str__(self) -> str:
        name = "unstructured" if self.scope == "layer" else "unstructured-global"
        return f"{name}:{self.sparsity:g}"


Pattern = Union[NM, Block, Unstructured, Hierarchical]


def _check_sparsity(value: float, what: str) -> None:
    if not (isinstance(value, (int, float)) and 0.0 <= float(value) < 1.0) or math.isnan(value):
        raise SparsemergeError(
            f"{what} sparsity must be a fraction in [0, 1), got {value!r}; "
            f"e.g. {what}:0.5 zeroes half of the weights"
        )


_NM_RE = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*$")
_BLOCK_RE = re.compile(r"^\s*block\s*(\d+)(?:x(\d+))?\s*:\s*([0-9.eE+-]+)\s*$", re.I)
_HIER_RE = re.compile(r"^\s*hier\s*:\s*(-?\d+)\s*:\s*(-?\d+)\s*@\s*(\d+)(?:\s*x\s*(\d+))?\s*/\s*(-?\d+)\s*:\s*(-?\d+)\s*$", re.I)
_UNSTRUCTURED_RE = re.compile(r"^\s*unstructured(-global)?\s*:\s*([0-9.eE+-]+)\s*$", re.I)

PATTERN_SYNTAX_HELP = (
    "expected one of: 'N:M' (e.g. 2:4, 1:4, 4:8, 16:32), 'blockB:S' or 'blockRxC:S' "
    "(e.g. block16:0.5), 'unstructured:S' or 'unstructured-global:S' (e.g. unstructured:0.6), "
    "'hier:K:L@B/N:M' or 'hier:K:L@RxB/N:M' (hierarchical: K of every L blocks of R rows x B inputs, "
    "R = B when omitted, then N:M inside, e.g. hier:1:4@16/2:4), "
    "where S is the fraction of weights set to zero"
)


def parse_pattern(text: "str | Pattern") -> Pattern:
    """Parse the pattern syntax in the module docstring; pattern values pass through."""
    if isinstance(text, (NM, Block, Unstructured, Hierarchical)):
        return text
    if not isinstance(text, str):
        raise SparsemergeError(f"a pattern must be a string, got {type(text).__name__}; {PATTERN_SYNTAX_HELP}")
    if match := _NM_RE.match(text):
        return NM(int(match.group(1)), int(match.group(2)))
    if match := _BLOCK_RE.match(text):
        rows = int(match.group(1))
        cols = int(match.group(2)) if match.group(2) else rows
        return Block(rows, cols, _float(match.group(3), text))
    if match := _HIER_RE.match(text):
        k, l, first, second, n, m = match.groups()
        rows, block = (int(first), int(second)) if second else (int(first), int(first))
        return Hierarchical(int(k), int(l), block, int(n), int(m), rows)
    if text.strip().lower().startswith("hier"):
        raise SparsemergeError(f"bad hierarchical pattern {text!r}; {PATTERN_SYNTAX_HELP}")
    if match := _UNSTRUCTURED_RE.match(text):
        scope = "global" if match.group(1) else "layer"
        return Unstructured(_float(match.group(2), text), scope)
    raise SparsemergeError(f"unknown sparsity pattern {text!r}; {PATTERN_SYNTAX_HELP}")


def _float(value: str, text: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise SparsemergeError(f"bad sparsity in pattern {text!r}; {PATTERN_SYNTAX_HELP}") from None
