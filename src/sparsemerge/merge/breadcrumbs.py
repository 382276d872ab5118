"""Model breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795).

Each task vector loses its ``gamma`` fraction of largest entries (outliers) and its smallest,
keeping a fraction ``density``; then task arithmetic (``breadcrumbs``) or a TIES merge
(``breadcrumbs_ties``). mergekit defaults: ``gamma: 0.01``, ``normalize: false``.
"""
from __future__ import annotations

import torch

from sparsemerge.merge.base import REQUIRED, MergeInputs, register_method
from sparsemerge.merge.gta import GTA_GLOBALS, GTA_MODEL_PARAMS, generalized_task_arithmetic, outliers

_REF = "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)"
_PARAMS = {"weight": REQUIRED, **GTA_MODEL_PARAMS, "gamma": 0.01}
_GLOBALS = {**GTA_GLOBALS, "normalize": False, "rescale": False}


@register_method("breadcrumbs", _REF, model_params=_PARAMS, global_params=_GLOBALS)
def breadcrumbs(inputs: MergeInputs) -> torch.Tensor:
    return generalized_task_arithmetic(inputs, outliers, use_consensus=False)


@register_method("breadcrumbs_ties", _REF, model_params=_PARAMS, global_params=_GLOBALS)
def breadcrumbs_ties(inputs: MergeInputs) -> torch.Tensor:
    return generalized_task_arithmetic(inputs, outliers, use_consensus=True)
