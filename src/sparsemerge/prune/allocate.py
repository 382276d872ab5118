"""Mixed N:M allocation (chapter 10.2.3, exercise 5): one pattern per layer from a candidate
set (``dense`` allowed) that minimises the summed predicted loss of a sensitivity criterion
under a budget - a multiple-choice knapsack:

    minimise  sum_l s_l(p_l)   subject to   sum_l c_l(p_l) <= C

with ``s_l`` a criterion's scores (:mod:`sparsemerge.prune.sensitivity`) and the cost ``c``:

* ``sparsity=S`` (share of the targeted weights zeroed, numel-weighted, at least S): ``c`` =
  weights KEPT, ``C = total - ceil(S * total)``;
* ``bytes=B``: packed bytes of the layer (:mod:`sparsemerge.formats.size`: ``nm_nbytes`` with
  the entropy position coding, values float of ``value_bytes`` or INT8/INT4 codes with float32
  scales per ``group_size``; dense = ``numel * value_bytes``, or its quantized codes), ``C = B``;
* ``latency=T``: ms per token at batch 1 from a per-layer table (:func:`measure_latency_table`
  times the project's kernels on this CPU), ``C = T``.

Solver (the chapter's hint): Lagrangian relaxation - each layer independently takes
``argmin_p s_l(p) + lambda c_l(p)``; bisection on ``lambda`` finds the smallest multiplier
whose choice fits the budget - then a greedy fill spends the slack left on the upgrades with
the best loss reduction per unit of cost. ``L(lambda) = sum_l min_p (s + lambda c) - lambda C``
is a lower bound on the optimum for every ``lambda >= 0``, so the result carries its own
optimality gap; :func:`solve_exact` (Pareto-front dynamic program) is exact for small problems.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from sparsemerge.errors import SparsemergeError
from sparsemerge.patterns import NM, parse_pattern
from sparsemerge.prune.latency import measure_latency_table  # noqa: F401  (re-exported)
from sparsemerge.prune.sensitivity import DENSE, SensitivityReport

KINDS = ("sparsity", "bytes", "latency")
CODECS = {"none": None, "int8": 8, "int4": 4}
_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 1024, "mib": 1024**2, "gib": 1024**3}


@dataclass
class Budget:
    kind: Literal["sparsity", "bytes", "latency"]
    value: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise SparsemergeError(f"budget kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not (isinstance(self.value, (int, float)) and math.isfinite(self.value) and self.value > 0):
            raise SparsemergeError(f"budget value must be a positive number, got {self.value!r}")
        if self.kind == "sparsity" and not self.value < 1:
            raise SparsemergeError(f"a sparsity budget is a fraction below 1, got {self.value}")

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """``sparsity=0.5`` | ``sparsity=50%`` | ``bytes=40MB`` (B, KB, MB, GB, KiB, MiB, GiB) | ``latency=12ms``."""
        kind, sep, value = text.partition("=")
        kind, value = kind.strip().lower(), value.strip().lower()
        match = re.fullmatch(r"([0-9.eE+-]+)\s*([a-z%]*)", value)
        if not sep or kind not in KINDS or not match:
            raise SparsemergeError(f"bad budget {text!r}; use sparsity=0.5, bytes=40MB or latency=12ms")
        number, unit = float(match.group(1)), match.group(2)
        if kind == "sparsity" and unit in ("", "%"):
            return cls(kind, number / 100 if unit == "%" else number)
        if kind == "bytes" and unit in _UNITS:
            return cls(kind, number * _UNITS[unit])
        if kind == "latency" and unit in ("", "ms", "s", "us"):
            return cls(kind, number * {"": 1, "ms": 1, "s": 1e3, "us": 1e-3}[unit])
        raise SparsemergeError(f"bad unit {unit!r} in budget {text!r}")


# ------------------------------------------------------------------------ costs
def kept_weights(shape: tuple[int, int], pattern: str) -> int:
    """Weights a pattern keeps in a ``rows x cols`` layer (exact for N:M and dense)."""
    numel = shape[0] * shape[1]
    if pattern == DENSE:
        return numel
    p = parse_pattern(pattern)
    if isinstance(p, NM):
        return numel * p.n // p.m
    return numel - int(round(p.sparsity * numel))


def layer_nbytes(shape: tuple[int, int], pattern: str, codec: str = "none", value_bytes: int = 2,
                 group_size: int = 128, coding: str = "entropy") -> int:
    """Packed bytes of one layer (see the module docstring)."""
    from sparsemerge.formats.size import bitmask_nbytes, nm_nbytes, quantized_values_nbytes

    if codec not in CODECS:
        raise SparsemergeError(f"codec must be one of {', '.join(CODECS)}, got {codec!r}")
    rows, cols = shape
    bits = CODECS[codec]
    if pattern == DENSE:
        return rows * cols * value_bytes if bits is None else quantized_values_nbytes(rows, cols, bits, group_size)
    p = parse_pattern(pattern)
    if isinstance(p, NM):
        meta = nm_nbytes(rows, cols, p.n, p.m, coding, 0)  # position metadata alone
        if bits is None:
            return meta + rows * (cols * p.n // p.m) * value_bytes
        return meta + quantized_values_nbytes(rows, cols * p.n // p.m, bits, group_size)
    if bits is not None:
        raise SparsemergeError(f"quantized sizes are defined for N:M and dense layers, not {pattern}")
    return bitmask_nbytes(rows, cols, kept_weights(shape, pattern), value_bytes)


# ---------------------------------------------------------------------- solvers
@dataclass
class Solution:
    choice: list[int]  # option index per layer
    loss: float
    cost: float
    lower_bound: float  # Lagrangian dual bound on the optimal loss (-inf if unknown)


def _check_problem(losses: list[list[float]], costs: list[list[float]], cap: float) -> None:
    if len(losses) != len(costs) or any(len(a) != len(b) or not a for a, b in zip(losses, costs)):
        raise SparsemergeError("each layer needs as many losses as costs, and at least one option")
    cheapest = sum(min(c) for c in costs)
    if cheapest > cap * (1 + 1e-12) + 1e-9:
        raise SparsemergeError(
            f"the budget cannot be met: even the cheapest candidate of every layer costs {cheapest:.6g} > {cap:.6g}; "
            "add sparser candidates or loosen the budget"
        )


def _pick(losses: list[list[float]], costs: list[list[float]], lam: float) -> list[int]:
    """Per layer the option minimising loss + lam * cost (ties: cheaper, then lower index)."""
    return [min(range(len(s)), key=lambda j: (s[j] + lam * c[j], c[j], j)) for s, c in zip(losses, costs)]


def _total(values: list[list[float]], choice: list[int]) -> float:
    return math.fsum(v[j] for v, j in zip(values, choice))


def solve_lagrangian(losses: list[list[float]], costs: list[list[float]], cap: float, iterations: int = 200) -> Solution:
    """Lagrangian relaxation with bisection on the multiplier, then a greedy fill of the slack
    and a pairwise local search. ``lower_bound`` is the best dual value ``L(lambda)`` found, so
    ``loss - lower_bound`` bounds the distance to the optimum; with one layer "fractional" at
    the optimal multiplier it is at most the largest loss range of one layer (checked against
    brute force in tests/prune/test_allocate.py, where the result is also optimal >= 95% of the time)."""
    _check_problem(losses, costs, cap)
    fits = lambda ch: _total(costs, ch) <= cap + 1e-9 * max(1.0, abs(cap))  # noqa: E731
    bound = -math.inf
    choice = _pick(losses, costs, 0.0)
    if not fits(choice):
        lo = 0.0
        spread_s = max(max(s) - min(s) for s in losses) or 1.0
        spread_c = max(max(c) - min(c) for c in costs) or 1.0
        hi = spread_s / spread_c
        while not fits(_pick(losses, costs, hi)):
            lo, hi = hi, hi * 2
            if hi > 1e300:
                raise SparsemergeError("Lagrangian multiplier diverged; costs or losses are not finite")
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if mid in (lo, hi):
                break
            if fits(_pick(losses, costs, mid)):
                hi = mid
            else:
                lo = mid
        choice = _pick(losses, costs, hi)
        for lam in (lo, hi):  # weak duality: both multipliers give lower bounds
            bound = max(bound, _total(losses, _pick(losses, costs, lam)) + lam * (_total(costs, _pick(losses, costs, lam)) - cap))
    else:
        bound = _total(losses, choice)  # unconstrained optimum fits: optimal
    choice = _pair_search(losses, costs, cap, _greedy_fill(losses, costs, cap, choice))
    return Solution(choice, _total(losses, choice), _total(costs, choice), bound)


def _greedy_fill(losses: list[list[float]], costs: list[list[float]], cap: float, choice: list[int]) -> list[int]:
    """Spend the slack on single-layer switches with the best loss drop per added cost."""
    choice = list(choice)
    tol = 1e-9 * max(1.0, abs(cap))
    while True:
        slack = cap - _total(costs, choice)
        best, best_key = None, None
        for layer, (s, c) in enumerate(zip(losses, costs)):
            j0 = choice[layer]
            for j in range(len(s)):
                gain, extra = s[j0] - s[j], c[j] - c[j0]
                if gain <= 0 or extra > slack + tol:
                    continue
                key = math.inf if extra <= 0 else gain / extra
                if best_key is None or key > best_key:
                    best, best_key = (layer, j), key
        if best is None:
            return choice
        choice[best[0]] = best[1]


def _pair_search(losses: list[list[float]], costs: list[list[float]], cap: float, choice: list[int],
                 max_rounds: int = 10_000) -> list[int]:
    """Local search after the fill: apply the best pair of switches in two different layers
    (typically one upgrade paid for by one downgrade) that stays within the budget and lowers
    the loss, then fill again; each round is one vectorised pass over all pairs of moves."""
    import numpy as np

    choice = list(choice)
    tol = 1e-9 * max(1.0, abs(cap))
    for _ in range(max_rounds):
        slack = cap - _total(costs, choice)
        moves = [(i, j, c[j] - c[choice[i]], s[j] - s[choice[i]])
                 for i, (s, c) in enumerate(zip(losses, costs)) for j in range(len(s)) if j != choice[i]]
        if len(moves) < 2:
            return choice
        layer = np.array([m[0] for m in moves])
        dc = np.array([m[2] for m in moves], dtype=np.float64)
        dl = np.array([m[3] for m in moves], dtype=np.float64)
        gain = -(dl[:, None] + dl[None, :])
        ok = (dc[:, None] + dc[None, :] <= slack + tol) & (layer[:, None] != layer[None, :])
        gain = np.where(ok, gain, -np.inf)
        best = int(np.argmax(gain))
        a, b = divmod(best, len(moves))
        if not gain[a, b] > 1e-12 * max(1.0, abs(_total(losses, choice))):
            return choice
        choice[moves[a][0]], choice[moves[b][0]] = moves[a][1], moves[b][1]
        choice = _greedy_fill(losses, costs, cap, choice)
    return choice


def solve_exact(losses: list[list[float]], costs: list[list[float]], cap: float, max_states: int = 200_000) -> Solution:
    """Exact optimum by a dynamic program over Pareto-optimal (cost, loss) partial sums:
    after each layer only states not dominated by a cheaper-and-better one are kept."""
    _check_problem(losses, costs, cap)
    tol = 1e-9 * max(1.0, abs(cap))
    states: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for s, c in zip(losses, costs):
        grown = sorted(((cost + c[j], loss + s[j], ch + (j,)) for cost, loss, ch in states for j in range(len(s))
                        if cost + c[j] <= cap + tol), key=lambda t: (t[0], t[1]))
        states = []
        for state in grown:
            if not states or state[1] < states[-1][1]:
                states.append(state)
        if len(states) > max_states:
            raise SparsemergeError(f"exact allocation needs more than {max_states} states; use the Lagrangian solver")
    cost, loss, choice = min(states, key=lambda t: (t[1], t[0]))
    return Solution(list(choice), loss, cost, loss)


# -------------------------------------------------------------------- allocation
@dataclass
class Allocation:
    patterns: dict[str, str]
    predicted_loss: float
    sparsity: float
    nbytes: int
    latency_ms: Optional[float]
    criterion: str = "taylor"
    budget: Optional[Budget] = None
    lower_bound: float = -math.inf  # Lagrangian bound on the best predicted loss
    include: Optional[list[str]] = None
    exclude: Optional[list[str]] = None  # the report's exclude plus layers it skipped
    meta: dict[str, Any] = field(default_factory=dict)

    def default_pattern(self) -> str:
        counts = Counter(p for p in self.patterns.values() if p != DENSE)
        return counts.most_common(1)[0][0] if counts else "2:4"

    def to_recipe(self, method: str = "sparsegpt", extra: Optional[dict] = None) -> dict:
        """``{"prune": PruneConfig keys}``: the most common pattern as the default, every other
        layer by an exact anchored regex (``^name$``, ``re.escape``); ``dense`` keeps a layer dense."""
        default = self.default_pattern()
        body: dict[str, Any] = {"method": method, "pattern": default}
        if self.include is not None:
            body["include"] = list(self.include)
        if self.exclude is not None:
            body["exclude"] = list(self.exclude)
        body["layer_patterns"] = {f"^{re.escape(n)}$": p for n, p in self.patterns.items() if p != default}
        body.update(extra or {})
        return {"prune": body}

    def write_recipe(self, path: "str | Path", overwrite: bool = False, method: str = "sparsegpt", extra: Optional[dict] = None) -> Path:
        import yaml

        from sparsemerge.io.atomic import atomic_output

        text = yaml.safe_dump(self.to_recipe(method, extra), sort_keys=False, width=200)
        with atomic_output(path, overwrite=overwrite, is_dir=False) as tmp:
            tmp.write_text(text)
        return Path(path)

    def to_json(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion,
            "budget": None if self.budget is None else {"kind": self.budget.kind, "value": self.budget.value},
            "predicted_loss": self.predicted_loss,
            "lower_bound": None if math.isinf(self.lower_bound) else self.lower_bound,
            "sparsity": self.sparsity,
            "nbytes": self.nbytes,
            "latency_ms": self.latency_ms,
            "patterns": self.patterns,
            **self.meta,
        }


def _table_costs(cost: dict, name: str, shape: tuple[int, int], candidates: list[str]) -> list[float]:
    """The row of ``cost`` for a layer (by name, else by ``"ROWSxCOLS"``), one value per candidate."""
    row = cost.get(name) or cost.get(f"{shape[0]}x{shape[1]}")
    if not isinstance(row, dict):
        raise SparsemergeError(f"the cost table has no entry for layer {name} (or shape {shape[0]}x{shape[1]})")
    missing = [p for p in candidates if p not in row]
    if missing:
        raise SparsemergeError(f"the cost table has no {', '.join(missing)} for layer {name}; it has {', '.join(row)}")
    try:
        return [float(row[p]) for p in candidates]
    except (TypeError, ValueError):
        raise SparsemergeError(f"the cost table's entry for layer {name} is not numbers: {row}") from None


def allocate(
    report: SensitivityReport,
    budget: Budget,
    candidates: Optional[list[str]] = None,
    criterion: str = "taylor",
    cost: Optional[dict] = None,
    *,
    codec: str = "none",
    value_bytes: Optional[int] = None,
    group_size: int = 128,
    solver: Literal["lagrangian", "exact"] = "lagrangian",
) -> Allocation:
    """One pattern per layer of ``report`` minimising the summed ``criterion`` scores under
    ``budget``. ``candidates`` (default: the report's) must have scores in the report.
    ``cost``: ``{layer name or "ROWSxCOLS": {pattern: cost}}`` in the budget's unit - a
    bytes table, or the latency table (ms; measured with :func:`measure_latency_table` when
    omitted); ``codec`` / ``value_bytes`` (default: the report's weights) / ``group_size``
    set the packed bytes."""
    if not report.layers:
        raise SparsemergeError("the sensitivity report has no layers")
    candidates = [DENSE if c.strip().lower() == DENSE else str(parse_pattern(c)) for c in (candidates or report.candidates)]
    unknown = [c for c in candidates if c not in report.candidates]
    if unknown:
        raise SparsemergeError(f"candidates {unknown} have no scores in the report (it has {', '.join(report.candidates)})")
    scores = report.scores(criterion)
    vb = int(value_bytes or report.meta.get("value_bytes") or 2)
    shapes = {lay.name: lay.shape for lay in report.layers}
    names = [lay.name for lay in report.layers]
    total = sum(r * c for r, c in shapes.values())
    if budget.kind == "latency" and cost is None:
        cost = measure_latency_table(list(shapes.values()), candidates, codec, group_size)
    losses = [[float(scores[n][p]) for p in candidates] for n in names]
    kept = [[kept_weights(shapes[n], p) for p in candidates] for n in names]
    nbytes = [[layer_nbytes(shapes[n], p, codec, vb, group_size) for p in candidates] for n in names]
    if budget.kind == "sparsity":
        costs, cap = kept, total - math.ceil(budget.value * total - 1e-9)
    elif cost is None:  # bytes from the size calculator
        costs, cap = nbytes, budget.value
    else:
        costs, cap = [_table_costs(cost, n, shapes[n], candidates) for n in names], budget.value
    solve = solve_exact if solver == "exact" else solve_lagrangian
    sol = solve(losses, [[float(x) for x in c] for c in costs], float(cap))
    latency = None
    if cost is not None and budget.kind == "latency":
        latency = math.fsum(costs[i][j] for i, j in enumerate(sol.choice))
    config = report.meta.get("config") or {}
    skipped = [s["name"] for s in report.meta.get("skipped", [])]
    exclude = list(config.get("exclude", [])) + [f"^{re.escape(n)}$" for n in skipped] if config or skipped else None
    return Allocation(
        patterns={n: candidates[j] for n, j in zip(names, sol.choice)},
        predicted_loss=sol.loss,
        sparsity=1.0 - sum(kept[i][j] for i, j in enumerate(sol.choice)) / total,
        nbytes=int(sum(nbytes[i][j] for i, j in enumerate(sol.choice))),
        latency_ms=latency,
        criterion=criterion,
        budget=budget,
        lower_bound=sol.lower_bound,
        include=list(config["include"]) if "include" in config else None,
        exclude=exclude,
        meta={"candidates": candidates, "codec": codec, "value_bytes": vb, "solver": solver},
    )
