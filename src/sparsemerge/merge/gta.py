"""Generalized task arithmetic: the one formula behind task arithmetic, TIES, DARE,
breadcrumbs and DELLA (as in mergekit's ``generalized_task_arithmetic.py``).

Per tensor, with base ``theta_0`` and models ``theta_i`` (weights ``w_i``, densities ``d_i``):

1. ``tau_i = sparsify(theta_i - theta_0, d_i)``      (trim / drop / outliers / magprune)
2. ``delta_i = w_i tau_i``
3. with a consensus: ``m_i = 1[sign(delta_i) == elect_sign(delta)]`` (TIES);
   ``mixed = sum_i m_i delta_i``, ``divisor = sum_i m_i w_i`` (or ``sum_i m_i`` with
   ``divide: count``); without: ``mixed = sum_i delta_i``, ``divisor = sum_i w_i``
4. ``theta = theta_0 + lambda * mixed / (divisor if normalize else 1)``
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.merge import ops
from sparsemerge.merge.base import MergeInputs, weights_tensor

Sparsifier = Callable[[torch.Tensor, dict[str, Any], Any, Optional[torch.Generator]], torch.Tensor]

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
    sparsify: Optional[Sparsifier],
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
        if sparsify is not None:
            delta = sparsify(delta, params, norm, inputs.generator)
        deltas[i] = delta
    weights = weights_tensor([p["weight"] for p in inputs.params], deltas[0])
    deltas.mul_(weights)
    if use_consensus:
        consensus = g.get("consensus", "sum")
        mask = ops.agreement_mask(deltas, ops.elect_sign(deltas, consensus))
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


def trim(delta: torch.Tensor, params: dict[str, Any], norm: Any, generator: Optional[torch.Generator]) -> torch.Tensor:
    return ops.magnitude_trim(delta, float(params.get("density", 1.0)), norm)


def drop(delta: torch.Tensor, params: dict[str, Any], norm: Any, generator: Optional[torch.Generator]) -> torch.Tensor:
    return ops.drop_and_rescale(delta, float(params.get("density", 1.0)), norm, generator)


def outliers(delta: torch.Tensor, params: dict[str, Any], norm: Any, generator: Optional[torch.Generator]) -> torch.Tensor:
    return ops.magnitude_outliers(delta, float(params.get("density", 1.0)), float(params.get("gamma", 0.01)), norm)


def magprune(delta: torch.Tensor, params: dict[str, Any], norm: Any, generator: Optional[torch.Generator]) -> torch.Tensor:
    return ops.della_magprune(delta, float(params.get("density", 1.0)), float(params.get("epsilon", 0.15)), norm, generator)
