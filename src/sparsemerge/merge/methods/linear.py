"""Linear interpolation and model soups (chapter 10.3.1 and 10.3.6; Wortsman et al. 2022, arXiv:2203.05482).

``theta = sum_k w_k theta_k / sum_k w_k`` (``normalize: true``, mergekit's default) or
``sum_k w_k theta_k`` (``normalize: false``). Equal weights give the uniform soup
``(1/K) sum_k theta_k``; weights from validation scores give the weighted soup; two models
with weights ``1-a, a`` give the LMC path ``(1-a) theta_1 + a theta_2``. Computed in float32
(float64 for float64 inputs), returned in the inputs' dtype. The greedy soup is in
:mod:`sparsemerge.merge.soups`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.merge.base import REQUIRED, MergeInputs, register_method


def linear_combination(tensors: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True) -> torch.Tensor:
    """``sum_k w_k t_k`` (divided by ``sum_k w_k`` when ``normalize``), in float32 accumulation."""
    first = tensors[0]
    if not first.is_floating_point():
        raise SparsemergeError(f"linear merging needs floating-point tensors, got {first.dtype}")
    dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    out = torch.zeros_like(first, dtype=dtype)
    for tensor, w in zip(tensors, weights):
        out.add_(tensor.to(dtype) * torch.tensor(float(w), dtype=dtype))
    if normalize:
        total = sum(float(w) for w in weights)
        if total == 0:
            raise SparsemergeError("linear merge with normalize: the weights sum to zero; set normalize: false or change weights")
        out.div_(torch.tensor(total, dtype=dtype))
    return out.to(first.dtype)


@register_method(
    "linear",
    "Wortsman et al. 2022, Model soups (arXiv:2203.05482); chapter 10.3.6",
    base="optional",
    model_params={"weight": REQUIRED},
    global_params={"normalize": True},
    base_is_input=True,
    rowwise=True,
)
def linear(inputs: MergeInputs) -> torch.Tensor:
    return linear_combination(inputs.tensors, [p["weight"] for p in inputs.params], bool(inputs.globals.get("normalize", True)))


@register_method(
    "model_soup",
    "Wortsman et al. 2022, Model soups (arXiv:2203.05482): uniform soup (1/K) sum_k theta_k; chapter 10.3.6",
    base="optional",
    base_is_input=True,
    rowwise=True,
)
def uniform_soup(inputs: MergeInputs) -> torch.Tensor:
    return linear_combination(inputs.tensors, [1.0] * len(inputs.tensors), True)
