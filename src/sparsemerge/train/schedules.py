"""Sparsity schedules for training with masks that change (chapter 10.1.4 "渐进式稀疏化" and
10.2.6 "渐进式增加稀疏度"): what each layer's mask should look like at optimizer step ``t``.

A schedule answers ``target(t) -> (pattern, fraction)``: the N:M pattern being approached and
how far along the way to it the mask is (``fraction`` in [0, 1]; 0 = dense, 1 = exactly the
pattern). :func:`sparsemerge.train.sparse_masks.scheduled_mask` turns that into a mask: it
removes ``fraction`` of the weights the pattern would remove, the least important first, so
every intermediate mask is a superset of an exact N:M mask and the last one is exact.

* :class:`CubicRamp` - gradual magnitude pruning (Zhu and Gupta, 2017, "To prune, or not to
  prune"): ``s_t = s_f + (s_i - s_f) (1 - (t - t_0) / (t_1 - t_0))^3`` for ``t_0 <= t <= t_1``;
  here ``s`` is the fraction of the pattern's removals applied (``s_i = 0``, ``s_f = 1``), so the
  layer reaches its N:M pattern at ``t_1`` after pruning fast early and slowly late.
* :class:`ProgressiveNM` - the chapter's stage list (e.g. dense -> 4:8 -> 2:4, or 2:4 -> 2:8
  -> 1:8): stage ``i`` holds pattern ``P_i`` exactly from its start step on.
* :class:`ExponentialN` - the chapter's formula ``N(t) = N_final + (N_init - N_final) e^{-lambda t}``
  with a fixed ``M`` (``N`` rounded to the nearest integer; ``N = M`` means dense).

Masks are recomputed every ``update_every`` steps (the trainer's option); a schedule only says
what the mask should be at a step.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from sparsemerge.errors import SparsemergeError
from sparsemerge.patterns import NM, parse_pattern

DENSE = "dense"


@dataclass(frozen=True)
class Target:
    """The mask wanted at one step: ``pattern`` (None = dense) reached to ``fraction``."""

    pattern: Optional[NM]
    fraction: float

    @property
    def dense(self) -> bool:
        return self.pattern is None or self.fraction <= 0.0

    def __str__(self) -> str:
        if self.dense:
            return DENSE
        return str(self.pattern) if self.fraction >= 1.0 else f"{self.fraction:.0%} of {self.pattern}"


def as_nm(text: "str | NM") -> NM:
    pattern = parse_pattern(text) if not isinstance(text, NM) else text
    if not isinstance(pattern, NM):
        raise SparsemergeError(f"sparse training schedules use N:M patterns, got {text!r} (e.g. 2:4)")
    return pattern


class Schedule(abc.ABC):
    """Abstract base: what the mask should be at a step, and where the schedule ends."""

    @abc.abstractmethod
    def target(self, step: int) -> Target:
        """The mask wanted at optimizer step ``step``."""

    @abc.abstractmethod
    def final(self) -> Target:
        """The exact pattern the schedule ends on (the masks a stage leaves behind)."""


@dataclass
class Constant(Schedule):
    """The exact pattern from the first step (one-shot masks, SR-STE, dynamic reallocation)."""

    pattern: NM

    def target(self, step: int) -> Target:
        return Target(self.pattern, 1.0)

    def final(self) -> Target:
        return Target(self.pattern, 1.0)


@dataclass
class CubicRamp(Schedule):
    """Zhu and Gupta's cubic ramp of the removed fraction from 0 at ``start`` to 1 at ``end``."""

    pattern: NM
    start: int
    end: int

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise SparsemergeError(f"the ramp needs 0 <= start < end, got start={self.start}, end={self.end}")

    def fraction(self, step: int) -> float:
        if step <= self.start:
            return 0.0
        if step >= self.end:
            return 1.0
        return 1.0 - (1.0 - (step - self.start) / (self.end - self.start)) ** 3

    def target(self, step: int) -> Target:
        return Target(self.pattern, self.fraction(step))

    def final(self) -> Target:
        return Target(self.pattern, 1.0)


@dataclass
class ProgressiveNM(Schedule):
    """Stage ``i`` holds ``patterns[i]`` ("dense" allowed) from step ``starts[i]`` on (``starts[0] == 0``)."""

    patterns: Sequence[Optional[NM]]
    starts: Sequence[int]

    def __post_init__(self) -> None:
        if not self.patterns or len(self.patterns) != len(self.starts):
            raise SparsemergeError("a progressive schedule needs one start step per pattern")
        if self.starts[0] != 0 or any(b <= a for a, b in zip(self.starts, self.starts[1:])):
            raise SparsemergeError(f"progressive stage starts must begin at 0 and increase, got {list(self.starts)}")
        if self.patterns[-1] is None:
            raise SparsemergeError("the last stage of a progressive schedule must be an N:M pattern")
        sparsities = [0.0 if p is None else p.sparsity for p in self.patterns]
        if any(b < a for a, b in zip(sparsities, sparsities[1:])):
            names = [DENSE if p is None else str(p) for p in self.patterns]
            raise SparsemergeError(f"progressive stages must not get denser: {' -> '.join(names)}")

    @classmethod
    def even(cls, patterns: Sequence[str], steps: int) -> "ProgressiveNM":
        """Stages of equal length over ``steps`` (the chapter's "epochs 1-10, 11-20, 21-30")."""
        parsed = [None if str(p).lower() == DENSE else as_nm(p) for p in patterns]
        if steps < len(parsed):
            raise SparsemergeError(f"{len(parsed)} progressive stages need at least {len(parsed)} steps, got {steps}")
        return cls(parsed, [i * steps // len(parsed) for i in range(len(parsed))])

    def target(self, step: int) -> Target:
        stage = max(i for i, s in enumerate(self.starts) if s <= step)
        pattern = self.patterns[stage]
        return Target(pattern, 0.0 if pattern is None else 1.0)

    def final(self) -> Target:
        return Target(self.patterns[-1], 1.0)


@dataclass
class ExponentialN(Schedule):
    """``N(t) = N_final + (N_init - N_final) exp(-lam t)`` of a fixed ``M`` (chapter 10.2.6), N rounded;
    ``N(t) = M`` is dense. Reaches ``N_final`` exactly at ``exact_from`` (the last steps train on it)."""

    m: int
    n_init: int
    n_final: int
    lam: float
    exact_from: int

    def __post_init__(self) -> None:
        NM(self.n_final, self.m)
        if not self.n_final <= self.n_init <= self.m:
            raise SparsemergeError(f"exponential N schedule needs N_final <= N_init <= M, got {self.n_final}, {self.n_init}, {self.m}")
        if self.lam <= 0:
            raise SparsemergeError(f"lambda must be > 0, got {self.lam}")

    def n_at(self, step: int) -> int:
        if step >= self.exact_from:
            return self.n_final
        return int(round(self.n_final + (self.n_init - self.n_final) * math.exp(-self.lam * step)))

    def target(self, step: int) -> Target:
        n = self.n_at(step)
        return Target(None, 0.0) if n >= self.m else Target(NM(n, self.m), 1.0)

    def final(self) -> Target:
        return Target(NM(self.n_final, self.m), 1.0)
