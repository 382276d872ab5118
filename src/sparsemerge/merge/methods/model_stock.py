"""Model stock (Jang et al. 2024, arXiv:2403.19522; as in mergekit's ``model_stock``).

With task vectors ``tau_i = theta_i - theta_0`` (k >= 2 models) and ``cos`` the mean pairwise
cosine between them: ``t = k cos / (1 + (k-1) cos)``,
``theta = t * mean_i theta_i + (1-t) theta_0``. Per tensor (flattened), or per output row with
``filter_wise: true``. Where ``1 + (k-1) cos ~ 0`` the base is kept.
"""
from __future__ import annotations

import torch

from sparsemerge.merge.base import MergeInputs, register_method


def model_stock(base: torch.Tensor, tensors: list[torch.Tensor], filter_wise: bool = False) -> torch.Tensor:
    """See the module docstring."""
    shape = base.shape
    if filter_wise:
        w0 = base.unsqueeze(0) if base.dim() == 1 else base
        ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in tensors]
    else:
        w0 = base.reshape(-1)
        ws = [w.reshape(-1) for w in tensors]
    offsets = [w - w0 for w in ws]
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1 :]:
            norms = torch.norm(a, dim=-1) * torch.norm(b, dim=-1)
            cosines.append(((a * b).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    k = len(ws)
    denom = 1 + (k - 1) * cos
    singular = denom.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), (k * cos) / torch.where(singular, torch.ones_like(denom), denom))
    average = sum(ws) / k
    return (t * average + (1 - t) * w0).reshape(shape)


@register_method(
    "model_stock",
    "Jang et al. 2024, Model Stock (arXiv:2403.19522)",
    global_params={"filter_wise": False},
    min_models=2,
)
def model_stock_method(inputs: MergeInputs) -> torch.Tensor:
    assert inputs.base is not None
    return model_stock(inputs.base, inputs.tensors, bool(inputs.globals.get("filter_wise", False)))
