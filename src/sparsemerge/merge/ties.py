"""TIES-merging (chapter 10.3.3; Yadav et al. 2023, arXiv:2306.01708): trim, elect, disjoint merge.

``tau_i = trim_top_k(theta_i - theta_0, density_i)``; ``delta_i = w_i tau_i``;
``s = sign(sum_i delta_i)``; ``theta = theta_0 + lambda * sum_{i: sign(delta_i)=s} delta_i / sum_{i: sign(delta_i)=s} w_i``.
mergekit defaults: ``normalize: true``, election by mass (``consensus: sum``), division by the
agreeing weights (``divide: weights``). Paper / chapter variants: ``consensus: count``,
``divide: count``.
"""
from __future__ import annotations

import torch

from sparsemerge.merge.base import REQUIRED, MergeInputs, register_method
from sparsemerge.merge.gta import GTA_GLOBALS, GTA_MODEL_PARAMS, generalized_task_arithmetic, trim


@register_method(
    "ties",
    "Yadav et al. 2023, TIES-Merging (arXiv:2306.01708); chapter 10.3.3",
    model_params={"weight": REQUIRED, **GTA_MODEL_PARAMS},
    global_params={**GTA_GLOBALS, "normalize": True, "rescale": False},
)
def ties(inputs: MergeInputs) -> torch.Tensor:
    return generalized_task_arithmetic(inputs, trim, use_consensus=True)
