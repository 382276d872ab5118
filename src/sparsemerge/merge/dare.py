"""DARE, drop and rescale (chapter 10.3.3; Yu et al. 2023, arXiv:2311.03099), with a linear or TIES merge.

``tau_i = rescale(m_i * (theta_i - theta_0))``, ``m_i ~ Bernoulli(density_i)`` (density = 1 - p).
mergekit's ``rescale: true`` (the default) restores each task vector's L1 norm; the paper's
``tau / (1-p)`` is ``rescale_mode: inverse``. ``dare_linear`` then adds the weighted task
vectors (task arithmetic); ``dare_ties`` elects signs and takes the disjoint merge (TIES).
Both default to ``normalize: false`` as in mergekit. Seeded per tensor (``seed:`` in the config).
"""
from __future__ import annotations

import torch

from sparsemerge.merge.base import REQUIRED, MergeInputs, register_method
from sparsemerge.merge.gta import GTA_GLOBALS, GTA_MODEL_PARAMS, drop, generalized_task_arithmetic

_REF = "Yu et al. 2023, Language Models are Super Mario (DARE, arXiv:2311.03099); chapter 10.3.3"
_PARAMS = {"weight": REQUIRED, **GTA_MODEL_PARAMS}
_GLOBALS = {**GTA_GLOBALS, "normalize": False, "rescale": True}


@register_method("dare_linear", _REF, model_params=_PARAMS, global_params=_GLOBALS, stochastic=True)
def dare_linear(inputs: MergeInputs) -> torch.Tensor:
    return generalized_task_arithmetic(inputs, drop, use_consensus=False)


@register_method("dare_ties", _REF, model_params=_PARAMS, global_params=_GLOBALS, stochastic=True)
def dare_ties(inputs: MergeInputs) -> torch.Tensor:
    return generalized_task_arithmetic(inputs, drop, use_consensus=True)
