"""Task arithmetic (chapter 10.3.2; Ilharco et al. 2023, arXiv:2212.04089).

``theta = theta_0 + lambda * sum_i w_i (theta_i - theta_0)``: add capabilities (w > 0),
strengthen one (w > 1), remove one (w < 0, "negation"). mergekit name ``task_arithmetic``;
defaults ``normalize: false``, ``lambda: 1``.
"""
from __future__ import annotations

import torch

from sparsemerge.merge.base import REQUIRED, MergeInputs, register_method
from sparsemerge.merge.gta import GTA_GLOBALS, GTA_MODEL_PARAMS, generalized_task_arithmetic


@register_method(
    "task_arithmetic",
    "Ilharco et al. 2023, Editing Models with Task Arithmetic (arXiv:2212.04089); chapter 10.3.2",
    model_params={"weight": REQUIRED, **GTA_MODEL_PARAMS},
    global_params={**GTA_GLOBALS, "normalize": False, "rescale": False},
)
def task_arithmetic(inputs: MergeInputs) -> torch.Tensor:
    return generalized_task_arithmetic(inputs, None, use_consensus=False)
