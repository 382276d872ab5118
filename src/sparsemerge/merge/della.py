"""DELLA (Deep et al. 2024, arXiv:2406.11617): magnitude-ranked stochastic drop (MagPrune),
then a TIES merge (``della``) or task arithmetic (``della_linear``).

Entry j of a row survives with probability ``density - epsilon + 2 epsilon * rank_j/(n-1)``.
mergekit defaults: ``epsilon: 0.15``, ``rescale: true`` (L1), ``normalize`` true for ``della``,
false for ``della_linear``.
"""
from __future__ import annotations

import torch

from sparsemerge.merge.base import REQUIRED, MergeInputs, register_method
from sparsemerge.merge.gta import GTA_GLOBALS, GTA_MODEL_PARAMS, generalized_task_arithmetic, magprune

_REF = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"
_PARAMS = {"weight": REQUIRED, **GTA_MODEL_PARAMS, "epsilon": 0.15}


@register_method("della", _REF, model_params=_PARAMS, global_params={**GTA_GLOBALS, "normalize": True, "rescale": True}, stochastic=True)
def della(inputs: MergeInputs) -> torch.Tensor:
    return generalized_task_arithmetic(inputs, magprune, use_consensus=True)


@register_method("della_linear", _REF, model_params=_PARAMS, global_params={**GTA_GLOBALS, "normalize": False, "rescale": True}, stochastic=True)
def della_linear(inputs: MergeInputs) -> torch.Tensor:
    return generalized_task_arithmetic(inputs, magprune, use_consensus=False)
