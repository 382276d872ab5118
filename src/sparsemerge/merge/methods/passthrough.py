"""Passthrough: copy one model's tensor (optionally scaled). With ``slices`` this is layer
stitching (chapter 10.3.6, "model stitching"): the output's layers are taken from ranges of
different models' layers, in order (e.g. the first layers of A, the last of B)."""
from __future__ import annotations

import torch

from sparsemerge.merge.base import MergeInputs, register_method


@register_method(
    "passthrough",
    "chapter 10.3.6 (model stitching); mergekit passthrough",
    base="none",
    model_params={"scale": None},
    min_models=1,
    max_models=1,
    base_is_input=True,
    rowwise=True,
)
def passthrough(inputs: MergeInputs) -> torch.Tensor:
    tensor = inputs.tensors[0]
    scale = inputs.params[0].get("scale")
    return tensor if scale is None else tensor * float(scale)
