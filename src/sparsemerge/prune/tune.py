"""``sparsemerge tune``: search pruning methods x allocations x value codecs, keep the Pareto
frontier of (perplexity, packed MB, decode tokens/s) and choose one candidate under a constraint.

A candidate is plain data (picklable, JSON-able): a prune recipe (:class:`PruneConfig` keys,
or None for an unpruned model) and pack options (:class:`~sparsemerge.formats.model.PackConfig`
keys). The families searched (chapter 10.2.3-10.2.4, exercise 5):

* the dense model as stored (the reference), and quantization only: every targeted weight
  INT8 / INT4 (``pack --format dense --quant ...``);
* for each method x codec: one N:M pattern for every layer (uniform), and one pattern per
  layer chosen by :func:`sparsemerge.prune.allocate.allocate` from a sensitivity report under a
  global-sparsity budget (mixed).

Evaluation and execution (sequential, local processes, Ray) live in :mod:`.tune_exec`; the
report (table, plot) in :mod:`.tune_report`.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from sparsemerge.errors import SparsemergeError, options_error
from sparsemerge.patterns import NM, parse_pattern
from sparsemerge.selection import DENSE

CODECS = ("none", "int8", "int4")
CONSTRAINTS = ("max_ppl", "max_mb", "min_speedup")
MB = 1e6  # packed sizes are reported in MB = 10^6 bytes


@dataclass
class Candidate:
    """One point of the search (plain data: it crosses process and Ray boundaries)."""

    label: str
    method: str  # a pruning method, or "none" (not pruned)
    allocation: str  # "dense", "uniform 2:4", "mixed 0.50"
    codec: str  # value codec of the targeted weights: none, int8, int4
    recipe: Optional[dict[str, Any]]  # PruneConfig keys; None: not pruned
    pack: dict[str, Any]  # PackConfig keys
    target_sparsity: Optional[float] = None  # the allocation's budget (share of prunable weights zeroed)
    layer_patterns: dict[str, str] = field(default_factory=dict)  # module name -> pattern ("dense" too), mixed only

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------- candidates
def dense_quant_for(codec: str) -> str:
    """Codec of the 2-D tensors a candidate keeps dense (embeddings, tied head): INT8 whenever
    the targeted weights are quantized (INT4 embeddings cost much quality for few bytes)."""
    return "none" if codec == "none" else "int8"


def exact_regex(name: str) -> str:
    """A regex matching exactly the module ``name`` (recipes' layer_patterns keys)."""
    return f"^{re.escape(name)}$"


def mixed_pack(layer_patterns: dict[str, str], base: dict[str, Any]) -> dict[str, Any]:
    """Pack options for a model pruned with one pattern per layer: the most common N:M as
    ``pattern``, every other layer by an exact regex in ``layer_patterns`` ("dense" layers are
    stored dense with the targeted layers' codec); all layers dense: the dense format."""
    counts = Counter(p for p in layer_patterns.values() if p != DENSE)
    if not counts:
        return {**base, "format": "dense"}
    default = counts.most_common(1)[0][0]
    overrides = {exact_regex(n): p for n, p in sorted(layer_patterns.items()) if p != default}
    return {**base, "pattern": default, "layer_patterns": overrides}


def build_candidates(
    methods: Sequence[str],
    codecs: Sequence[str],
    patterns: Sequence[str],
    allocations: Sequence[tuple[float, dict[str, str], dict[str, Any]]] = (),
    prune_settings: Optional[dict[str, Any]] = None,
    dtype: str = "keep",
    group_size: int = 128,
) -> list[Candidate]:
    """Every candidate of the search, the dense reference first.

    ``allocations``: ``(budget sparsity, {module: pattern}, recipe)`` from the allocator (the
    recipe's method is replaced per candidate); ``prune_settings``: PruneConfig keys every recipe
    shares (calibration text, nsamples, seqlen, seed)."""
    bad = [c for c in codecs if c not in CODECS]
    if bad:
        raise SparsemergeError(f"unknown codec(s) {bad}; choose from {', '.join(CODECS)}")
    for p in patterns:
        if not isinstance(parse_pattern(p), NM):
            raise SparsemergeError(f"candidate patterns must be N:M (e.g. 2:4), got {p!r}")
    settings = {k: v for k, v in (prune_settings or {}).items() if k != "progress"}

    def pack(fmt: str, codec: str, pattern: str = "2:4") -> dict[str, Any]:
        return {"format": fmt, "pattern": pattern, "quant": codec, "group_size": group_size,
                "dense_quant": dense_quant_for(codec), "dtype": dtype}

    out = [Candidate("dense", "none", "dense", "none", None, pack("dense", "none"))]
    out += [Candidate(f"dense {c}", "none", "dense", c, None, pack("dense", c)) for c in codecs if c != "none"]
    for method in methods:
        for codec in codecs:
            suffix = "" if codec == "none" else f" {codec}"
            for p in patterns:
                recipe = {**settings, "method": method, "pattern": p}
                out.append(Candidate(f"{method} {p}{suffix}", method, f"uniform {p}", codec, recipe, pack("nm", codec, p),
                                     target_sparsity=1 - parse_pattern(p).density))
            for sparsity, layer_patterns, recipe in allocations:
                recipe = {**recipe, **settings, "method": method}
                out.append(Candidate(f"{method} mixed {sparsity:.2f}{suffix}", method, f"mixed {sparsity:.2f}", codec, recipe,
                                     mixed_pack(layer_patterns, pack("nm", codec)), target_sparsity=sparsity,
                                     layer_patterns=dict(layer_patterns)))
    return out


# ----------------------------------------------------------------------------- frontier and choice
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def pareto_front(points: Sequence[Optional[tuple[float, float, float]]]) -> list[bool]:
    """``points[i] = (ppl, mb, tokens_per_s)`` (None or non-finite: a failed candidate);
    returns whether each is on the Pareto frontier of minimising ppl and MB and maximising
    tokens/s. Point a dominates b when a is no worse on all three and better on one; equal
    points do not dominate each other. Failed points are never on it and dominate nothing."""
    ok = [p is not None and len(p) == 3 and all(_finite(v) for v in p) for p in points]
    keys = [(p[0], p[1], -p[2]) if good else None for p, good in zip(points, ok)]  # all minimised

    def dominates(a: tuple, b: tuple) -> bool:
        return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))

    return [good and not any(o is not None and dominates(o, keys[i]) for o in keys) for i, good in enumerate(ok)]


def row_point(row: dict[str, Any]) -> Optional[tuple[float, float, float]]:
    if row.get("error"):
        return None
    return (row.get("ppl"), row.get("mb"), row.get("tok_s"))  # type: ignore[return-value]


def mark_frontier(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for row, on in zip(rows, pareto_front([row_point(r) for r in rows])):
        row["frontier"] = on
    return rows


@dataclass
class Constraint:
    """``--max-ppl X``, ``--max-mb X`` or ``--min-speedup X``."""

    kind: str  # one of CONSTRAINTS
    value: float

    def __post_init__(self) -> None:
        if self.kind not in CONSTRAINTS:
            raise SparsemergeError(f"constraint must be one of {', '.join(CONSTRAINTS)}, got {self.kind!r}")
        if not _finite(self.value) or self.value <= 0:
            raise SparsemergeError(f"--{self.kind.replace('_', '-')} must be a positive number, got {self.value}")

    @property
    def flag(self) -> str:
        return "--" + self.kind.replace("_", "-")

    def measured(self, row: dict[str, Any]) -> Optional[float]:
        value = row.get({"max_ppl": "ppl", "max_mb": "mb", "min_speedup": "speedup"}[self.kind])
        return value if (not row.get("error") and _finite(value)) else None

    def excess(self, row: dict[str, Any]) -> float:
        """How far ``row`` is from meeting it, as a ratio (<= 1: met; inf: not measured)."""
        value = self.measured(row)
        if value is None:
            return math.inf
        if self.kind == "min_speedup":
            return self.value / value if value > 0 else math.inf
        return value / self.value


def choose(rows: Sequence[dict[str, Any]], constraint: Constraint) -> tuple[Optional[int], Optional[int]]:
    """``(chosen index, closest index)``. Under --max-mb / --min-speedup the lowest-perplexity
    row meeting it (ties: fewer MB); under --max-ppl the smallest (ties: lower perplexity).
    When none meets it, chosen is None and closest the row with the smallest excess ratio."""
    measured = [i for i, r in enumerate(rows) if constraint.measured(r) is not None and _finite(r.get("ppl")) and _finite(r.get("mb"))]
    meeting = [i for i in measured if constraint.excess(rows[i]) <= 1.0]
    if meeting:
        if constraint.kind == "max_ppl":
            best = min(meeting, key=lambda i: (rows[i]["mb"], rows[i]["ppl"], i))
        else:
            best = min(meeting, key=lambda i: (rows[i]["ppl"], rows[i]["mb"], i))
        return best, best
    closest = min(measured, key=lambda i: (constraint.excess(rows[i]), i)) if measured else None
    return None, closest


# ----------------------------------------------------------------------------- allocations
def compute_allocations(model: Any, tokenizer: Any, patterns: Sequence[str], sparsities: Sequence[float],
                        prune_settings: dict[str, Any], criterion: str = "taylor") -> list[tuple[float, dict[str, str], dict[str, Any]]]:
    """One sensitivity report of ``model`` (the cheap ``criterion``, on the calibration text of
    ``prune_settings``), then one allocation per global-sparsity budget:
    ``[(sparsity, {module: pattern}, recipe), ...]`` (:mod:`sparsemerge.prune.allocate`)."""
    try:
        from sparsemerge.prune.allocate import Budget, allocate
        from sparsemerge.prune.sensitivity import SensitivityConfig, layer_sensitivity
    except ImportError as exc:
        raise SparsemergeError(f"mixed allocations need sparsemerge.prune.sensitivity and .allocate ({exc}); "
                               "pass --no-allocations to search uniform patterns only") from None
    for s in sparsities:
        if not 0.0 < s < 1.0:
            raise SparsemergeError(f"--sparsities must lie strictly between 0 and 1, got {s}")
    keys = ("calib", "nsamples", "seqlen", "seed")
    # "dense" is a candidate too (it scores 0): the allocator may keep the most sensitive layers whole
    try:
        config = SensitivityConfig(patterns=[*patterns, "dense"], criteria=[criterion], progress=False,
                                   **{k: prune_settings[k] for k in keys if k in prune_settings})
    except SparsemergeError:
        raise
    except Exception as exc:  # pydantic.ValidationError: e.g. an unknown criterion
        raise options_error("sensitivity options for the allocations", exc) from None
    report = layer_sensitivity(model, tokenizer, config)
    out = []
    for s in sparsities:
        allocation = allocate(report, Budget("sparsity", float(s)), criterion=criterion)
        recipe = allocation.to_recipe(method="magnitude")
        out.append((float(s), dict(allocation.patterns), dict(recipe.get("prune", recipe))))
    return out
