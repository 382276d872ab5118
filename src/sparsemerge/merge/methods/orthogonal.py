"""Task arithmetic on orthogonalized task vectors (chapter 10.3.7, "interference").

``tau'_i = tau_i - sum_{j<i} <tau_i, tau'_j> / ||tau'_j||^2 tau'_j`` (Gram-Schmidt per tensor, in
config order, so the first model's task vector is kept whole), then
``theta = theta_0 + lambda * sum_i w_i tau'_i``. Removes the components a later task shares
with earlier ones, so overlapping updates are not added twice. Not in mergekit.
"""
from __future__ import annotations

import torch

from sparsemerge.merge.ops import gram_schmidt, task_vector
from sparsemerge.merge.base import MergeInputs, register_method


@register_method(
    "orthogonal",
    "chapter 10.3.7 (orthogonalized task vectors, Gram-Schmidt)",
    model_params={"weight": 1.0},
    global_params={"lambda": 1.0},
)
def orthogonal(inputs: MergeInputs) -> torch.Tensor:
    base = inputs.base
    assert base is not None
    taus = gram_schmidt([task_vector(t, base) for t in inputs.tensors])
    lam = float(inputs.globals.get("lambda", 1.0))
    out = base.double()
    for tau, params in zip(taus, inputs.params):
        out = out + lam * float(params.get("weight", 1.0)) * tau.double()
    return out.to(base.dtype)
