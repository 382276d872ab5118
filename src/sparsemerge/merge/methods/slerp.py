"""Spherical linear interpolation between two models (Shoemake 1985; as in mergekit's ``slerp``).

Per tensor, flattened: ``cos(Omega) = <a/|a|, b/|b|>``;
``theta(t) = sin((1-t) Omega)/sin(Omega) a + sin(t Omega)/sin(Omega) b``, falling back to
``(1-t) a + t b`` when ``|cos(Omega)| > 0.9995`` (nearly collinear). ``a`` is the base model,
``b`` the other; ``t`` may be a gradient over layers and filtered per tensor (``self_attn``,
``mlp``), as in mergekit configs. Computed in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.merge.base import REQUIRED, MergeInputs, register_method


def slerp(t: float, a: torch.Tensor, b: torch.Tensor, dot_threshold: float = 0.9995, eps: float = 1e-8) -> torch.Tensor:
    """SLERP of ``a`` (t=0) and ``b`` (t=1); see the module docstring for the formula."""
    if a.shape != b.shape:
        raise SparsemergeError(f"slerp needs equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    x = a.reshape(-1).to(dtype)
    y = b.reshape(-1).to(dtype)
    t_ = torch.tensor(float(t), dtype=dtype)
    if x.numel() == 0:
        return ((1 - t_) * x + t_ * y).reshape(a.shape).to(a.dtype)
    na = torch.linalg.vector_norm(x)
    nb = torch.linalg.vector_norm(y)
    na = torch.where(na > eps, na, torch.ones_like(na))
    nb = torch.where(nb > eps, nb, torch.ones_like(nb))
    dot = ((x / na) * (y / nb)).sum().clamp(-1, 1)
    if dot.abs() > dot_threshold:
        ca, cb = 1 - t_, t_
    else:
        omega = torch.acos(dot)
        sin_omega = torch.sin(omega)
        ca = torch.sin((1 - t_) * omega) / sin_omega
        cb = torch.sin(t_ * omega) / sin_omega
    return (ca * x + cb * y).reshape(a.shape).to(a.dtype)


@register_method(
    "slerp",
    "Shoemake 1985, Animating rotation with quaternion curves; mergekit slerp",
    global_params={"t": REQUIRED},
    min_models=2,
    max_models=2,
    base_is_input=True,
)
def slerp_method(inputs: MergeInputs) -> torch.Tensor:
    if len(inputs.tensors) != 2 or inputs.base_index is None:
        raise SparsemergeError("slerp needs exactly two models, one of them the base_model")
    a = inputs.tensors[inputs.base_index]
    b = inputs.tensors[1 - inputs.base_index]
    return slerp(float(inputs.globals["t"]), a, b)
