"""Generalized task arithmetic: the one formula behind task arithmetic, TIES, DARE,
breadcrumbs and DELLA (as in mergekit's ``generalized_task_arithmetic.py``), and the table of
its variants.

Per tensor, with base ``theta_0`` and models ``theta_i`` (weights ``w_i``, densities ``d_i``):

1. ``tau_i = sparsify(theta_i - theta_0, d_i)``      (trim / drop / outliers / magprune / none)
2. ``delta_i = w_i tau_i``
3. with a consensus: ``m_i = 1[sign(delta_i) == elect_sign(delta)]`` (TIES);
   ``mixed = sum_i m_i delta_i``, ``divisor = sum_i m_i w_i`` (or ``sum_i m_i`` with
   ``divide: count``); without: ``mixed = sum_i delta_i``, ``divisor = sum_i w_i``
4. ``theta = theta_0 + lambda * mixed / (divisor if normalize else 1)``

A variant is one row of :data:`GTA_VARIANTS`: its sparsification (step 1), whether it elects
signs (step 3) and its defaults of ``normalize`` and ``rescale`` (mergekit's defaults):

==================  ===========  =========  =========  =======
name                sparsify     consensus  normalize  rescale
==================  ===========  =========  =========  =======
task_arithmetic     --           no         false      false
ties                trim         yes        true       false
dare_linear         drop         no         false      true
dare_ties           drop         yes        false      true
breadcrumbs         outliers     no         false      false
breadcrumbs_ties    outliers     yes        false      false
della               magprune     yes        true       true
della_linear        magprune     no         false      true
==================  ===========  =========  =========  =======

* task arithmetic (chapter 10.3.2; Ilharco et al. 2023, arXiv:2212.04089):
  ``theta = theta_0 + lambda * sum_i w_i (theta_i - theta_0)``: add capabilities (w > 0),
  strengthen one (w > 1), remove one (w < 0, "negation").
* TIES (chapter 10.3.3; Yadav et al. 2023, arXiv:2306.01708): trim to the top ``density``
  magnitudes, elect ``s = sign(sum_i delta_i)`` (by mass, ``consensus: sum``), disjoint merge
  divided by the agreeing weights (``divide: weights``). Paper / chapter variants:
  ``consensus: count``, ``divide: count``.
* DARE (chapter 10.3.3; Yu et al. 2023, arXiv:2311.03099): ``tau_i = rescale(m_i * tau_i)``,
  ``m_i ~ Bernoulli(density_i)`` (density = 1 - p). ``rescale: true`` restores each task
  vector's L1 norm (mergekit); the paper's ``tau / (1-p)`` is ``rescale_mode: inverse``.
  Seeded per tensor (``seed:`` in the config).
* breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): each task vector loses its
  ``gamma`` fraction of largest entries (outliers) and its smallest, keeping ``density``.
* DELLA (Deep et al. 2024, arXiv:2406.11617): MagPrune, a magnitude-ranked stochastic drop:
  entry j of a row survives with probability ``density - epsilon + 2 epsilon * rank_j/(n-1)``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.merge.base import REQUIRED, MergeInputs, register_method, weights_tensor
from sparsemerge.merge.ops import (
    agreement_mask,
    della_magprune,
    drop_and_rescale,
    elect_sign,
    magnitude_outliers,
    magnitude_trim,
)

SparsifyFn = Callable[[torch.Tensor, dict[str, Any], Any, Optional[torch.Generator]], torch.Tensor]

GTA_GLOBALS = {
    "lambda": 1.0,
    "int8_mask": False,  # accepted for mergekit configs; the mask dtype does not change results
    "consensus": "sum",  # "sum" (TIES paper, mergekit) | "count" (chapter's vote of signs)
    "divide": "weights",  # "weights" (mergekit) | "count" (TIES paper: 1/|A_j|)
    "rescale_mode": "l1",  # with rescale: "l1" (mergekit) | "inverse" (DARE paper 1/(1-p)) | "l2" | "linf"
}
GTA_MODEL_PARAMS: dict[str, Any] = {"density": 1.0}


def rescale_norm(globals_: dict[str, Any]) -> Any:
    if not globals_.get("rescale", False):
        return None
    mode = globals_.get("rescale_mode", "l1")
    if mode not in ("l1", "l2", "linf", "inverse"):
        raise SparsemergeError(f"rescale_mode must be l1, l2, linf or inverse, got {mode!r}")
    return mode


def generalized_task_arithmetic(
    inputs: MergeInputs,
    sparsify: Optional[SparsifyFn],
    use_consensus: bool,
) -> torch.Tensor:
    """Steps 1-4 of the module docstring for one tensor (see there for the formula)."""
    base = inputs.base
    assert base is not None
    if not inputs.tensors:
        return base
    g = inputs.globals
    norm = rescale_norm(g)
    deltas = base.new_empty((len(inputs.tensors), *base.shape))
    for i, (tensor, params) in enumerate(zip(inputs.tensors, inputs.params)):
        delta = tensor - base
        if inputs.row_state is not None:  # a row block: the whole tensor's trim masks, sliced
            delta = _apply_trim_rows(delta, inputs.row_state[i], inputs.rows)
        elif sparsify is not None:
            delta = sparsify(delta, params, norm, inputs.generator)
        deltas[i] = delta
    weights = weights_tensor([p["weight"] for p in inputs.params], deltas[0])
    deltas.mul_(weights)
    if use_consensus:
        consensus = g.get("consensus", "sum")
        mask = agreement_mask(deltas, elect_sign(deltas, consensus))
        mixed = (deltas * mask).sum(dim=0)
        if g.get("divide", "weights") == "count":
            divisor = mask.sum(dim=0)
        elif g.get("divide", "weights") == "weights":
            divisor = (weights * mask).sum(dim=0)
        else:
            raise SparsemergeError(f"divide must be 'weights' or 'count', got {g.get('divide')!r}")
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if g.get("normalize", False):
        mixed /= divisor
    lam = float(g.get("lambda", 1.0))
    if lam != 1:
        mixed *= lam
    return (base + mixed).to(base.dtype)


# ----------------------------------------------------------------------------- TIES' trim in row blocks
# A tensor too large for memory (merge/memory.py) is merged in row blocks. The trim keeps the
# top-k magnitudes of each whole task vector, so first, one model at a time, |tau_i| is
# gathered from the row blocks into one float32 buffer and the selection is replayed on it
# (sortselect.sort_window_bits: mergekit's choice among ties, kept as packed bits, n / 8
# bytes); then every block is merged with its slice of the masks - the same numbers as the
# whole tensor. Peak: ~8 bytes per entry (keys and index) during one model's selection.
KEEP_ALL, KEEP_NONE = "all", "none"


def trim_row_prepare(block: Callable[..., MergeInputs], rows: int, block_rows: int) -> Optional[list[Any]]:
    """The trim masks of every model for a tensor of ``rows`` rows (``row_prepare``); None when
    the rows cannot be used (a rescale norm needs the whole tensor, or the replay fell back)."""
    import numpy as np

    from sparsemerge.merge.sortselect import sort_window_bits

    first = block(0, min(rows, block_rows), [])
    if rescale_norm(first.globals) is not None or first.base is None:
        return None
    numel = rows * first.base[0].numel()
    states: list[Any] = []
    for i, params in enumerate(first.params):
        density = float(params.get("density", 1.0))
        if density >= 1:
            states.append(KEEP_ALL)
            continue
        if density <= 0 or numel == 0:
            states.append(KEEP_NONE)
            continue
        keys = np.empty(numel, np.float32)
        for r0 in range(0, rows, block_rows):
            r1 = min(rows, r0 + block_rows)
            part = block(r0, r1, [i])
            mag = (part.tensors[i] - part.base).abs().reshape(-1).float()  # as magnitude_trim: |tau| then float32
            keys[r0 * (numel // rows): r1 * (numel // rows)] = mag.numpy()
            del part, mag
        bits = sort_window_bits(keys, 0, max(1, int(density * numel)), descending=True)
        del keys
        if bits is None:
            return None
        states.append(bits)
    return states


def _apply_trim_rows(delta: torch.Tensor, state: Any, rows: Optional[tuple[int, int]]) -> torch.Tensor:
    import numpy as np

    if isinstance(state, str):
        return delta if state == KEEP_ALL else torch.zeros_like(delta)
    assert rows is not None
    per_row = delta[0].numel() if delta.shape[0] else 0
    start, stop = rows[0] * per_row, rows[1] * per_row
    raw = np.unpackbits(state[start // 8: (stop + 7) // 8], bitorder="little")[start % 8: start % 8 + (stop - start)]
    mask = torch.from_numpy(raw).reshape(delta.shape).to(delta.dtype)
    return delta * mask


# ----------------------------------------------------------------------------- step 1: sparsification


def trim(delta: torch.Tensor, params: dict[str, Any], norm: Any, generator: Optional[torch.Generator]) -> torch.Tensor:
    return magnitude_trim(delta, float(params.get("density", 1.0)), norm)


def drop(delta: torch.Tensor, params: dict[str, Any], norm: Any, generator: Optional[torch.Generator]) -> torch.Tensor:
    return drop_and_rescale(delta, float(params.get("density", 1.0)), norm, generator)


def outliers(delta: torch.Tensor, params: dict[str, Any], norm: Any, generator: Optional[torch.Generator]) -> torch.Tensor:
    return magnitude_outliers(delta, float(params.get("density", 1.0)), float(params.get("gamma", 0.01)), norm)


def magprune(delta: torch.Tensor, params: dict[str, Any], norm: Any, generator: Optional[torch.Generator]) -> torch.Tensor:
    return della_magprune(delta, float(params.get("density", 1.0)), float(params.get("epsilon", 0.15)), norm, generator)


@dataclass(frozen=True)
class Sparsification:
    """Step 1 of the formula: ``fn(delta, model_params, rescale_norm, generator)``, the
    per-model parameters it reads beyond ``density`` (with defaults), and whether it draws
    random numbers (then the method is seeded per tensor)."""

    fn: SparsifyFn
    params: Mapping[str, Any] = field(default_factory=dict)
    stochastic: bool = False


TRIM = Sparsification(trim)  # TIES: keep the top-density magnitudes
DROP = Sparsification(drop, stochastic=True)  # DARE: Bernoulli(density) keep, rescale
OUTLIERS = Sparsification(outliers, {"gamma": 0.01})  # breadcrumbs: drop the top gamma and the smallest
MAGPRUNE = Sparsification(magprune, {"epsilon": 0.15}, stochastic=True)  # DELLA: rank-dependent keep probability


# ----------------------------------------------------------------------------- the variants


@dataclass(frozen=True)
class GTAVariant:
    """One generalized-task-arithmetic method: a row of :data:`GTA_VARIANTS`. Calling it
    merges one tensor (it is the registered method's function)."""

    name: str
    reference: str
    sparsify: Optional[Sparsification]  # step 1; None keeps the whole task vector
    consensus: bool  # step 3: TIES sign election and disjoint merge
    normalize: bool  # default of ``normalize`` (step 4)
    rescale: bool  # default of ``rescale`` (step 1)

    def __call__(self, inputs: MergeInputs) -> torch.Tensor:
        return generalized_task_arithmetic(inputs, self.sparsify.fn if self.sparsify else None, self.consensus)

    @property
    def model_params(self) -> dict[str, Any]:
        return {"weight": REQUIRED, **GTA_MODEL_PARAMS, **(self.sparsify.params if self.sparsify else {})}

    @property
    def global_params(self) -> dict[str, Any]:
        return {**GTA_GLOBALS, "normalize": self.normalize, "rescale": self.rescale}

    @property
    def stochastic(self) -> bool:
        return self.sparsify is not None and self.sparsify.stochastic


_TA = "Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089); chapter 10.3.2"
_TIES = "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708); chapter 10.3.3"
_DARE = "Yu et al. 2023, Language Models are Super Mario (DARE, arXiv:2311.03099); chapter 10.3.3"
_BREADCRUMBS = "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)"
_DELLA = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"

GTA_VARIANTS: tuple[GTAVariant, ...] = (
    #          name                reference     sparsify  consensus normalize rescale
    GTAVariant("task_arithmetic", _TA, None, False, False, False),
    GTAVariant("ties", _TIES, TRIM, True, True, False),
    GTAVariant("dare_linear", _DARE, DROP, False, False, True),
    GTAVariant("dare_ties", _DARE, DROP, True, False, True),
    GTAVariant("breadcrumbs", _BREADCRUMBS, OUTLIERS, False, False, False),
    GTAVariant("breadcrumbs_ties", _BREADCRUMBS, OUTLIERS, True, False, False),
    GTAVariant("della", _DELLA, MAGPRUNE, True, True, True),
    GTAVariant("della_linear", _DELLA, MAGPRUNE, False, False, True),
)

for _variant in GTA_VARIANTS:
    register_method(
        _variant.name,
        _variant.reference,
        model_params=_variant.model_params,
        global_params=_variant.global_params,
        stochastic=_variant.stochastic,
        rowwise=_variant.sparsify is None,  # trimming and dropping look at the whole tensor
        row_prepare=trim_row_prepare if _variant.sparsify is TRIM else None,
    )(_variant)

_BY_NAME = {v.name: v for v in GTA_VARIANTS}
task_arithmetic = _BY_NAME["task_arithmetic"]
ties = _BY_NAME["ties"]
dare_linear = _BY_NAME["dare_linear"]
dare_ties = _BY_NAME["dare_ties"]
breadcrumbs = _BY_NAME["breadcrumbs"]
breadcrumbs_ties = _BY_NAME["breadcrumbs_ties"]
della = _BY_NAME["della"]
della_linear = _BY_NAME["della_linear"]
