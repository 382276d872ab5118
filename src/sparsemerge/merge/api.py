"""In-memory merging: one tensor or whole state dicts, with plain scalar parameters.

For files on disk use :func:`sparsemerge.merge.run_merge` (streaming, gradients, filters).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.merge.base import MERGE_METHODS, REQUIRED, MergeInputs, get_method, seed_for


def list_methods() -> list[str]:
    """Names of every registered merge method."""
    return MERGE_METHODS.names()


def merge_tensors(
    method: str,
    tensors: Sequence[torch.Tensor],
    base: Optional[torch.Tensor] = None,
    weights: Optional[Sequence[float]] = None,
    model_params: Optional[Sequence[Mapping[str, Any]]] = None,
    seed: int = 0,
    name: str = "tensor",
    **params: Any,
) -> torch.Tensor:
    """Merge ``tensors`` (the fine-tuned models' values of one tensor) with ``method``.

    ``base`` is the base model's tensor (not part of ``tensors``); for ``slerp`` the result
    runs from ``base`` (t=0) to ``tensors[0]`` (t=1), for ``linear``/``model_soup`` the base,
    when given, is one more input with weight ``params['base_weight']`` (default 0). ``weights``
    and ``model_params`` are per tensor (``density``, ``gamma``, ``epsilon``, ...); ``params`` are
    the method's global parameters (``lambda``, ``normalize``, ``t``, ``consensus``, ...).

    >>> merge_tensors("task_arithmetic", [torch.tensor([1.2, 2.1, 2.8]), torch.tensor([0.9, 2.3, 3.1])],
    ...               base=torch.tensor([1.0, 2.0, 3.0]), weights=[0.5, 0.5])
    tensor([1.0500, 2.2000, 2.9500])
    """
    spec = get_method(method)
    tensors = list(tensors)
    if not tensors:
        raise SparsemergeError("merge_tensors needs at least one tensor")
    shapes = {tuple(t.shape) for t in tensors + ([base] if base is not None else [])}
    if len(shapes) > 1:
        raise SparsemergeError(f"merge_tensors needs equal shapes, got {sorted(shapes)}")
    per_model = [dict(p) for p in (model_params or [{} for _ in tensors])]
    if len(per_model) != len(tensors):
        raise SparsemergeError(f"{len(tensors)} tensors but {len(per_model)} model_params")
    if weights is not None:
        if len(weights) != len(tensors):
            raise SparsemergeError(f"{len(tensors)} tensors but {len(weights)} weights")
        for p, w in zip(per_model, weights):
            p["weight"] = float(w)
    base_weight = float(params.pop("base_weight", 0.0))
    unknown = set(params) - set(spec.global_params)
    if unknown:
        raise SparsemergeError(f"{spec.name} does not take {sorted(unknown)}; it takes {sorted(spec.global_params)}")
    globals_ = {}
    for key, default in spec.global_params.items():
        if key in params:
            globals_[key] = params[key]
        elif default is REQUIRED:
            raise SparsemergeError(f"{spec.name} needs the parameter {key!r}")
        else:
            globals_[key] = default
    for p in per_model:
        for key, default in spec.model_params.items():
            if key not in p:
                if default is REQUIRED:
                    if key == "weight":
                        p[key] = 1.0
                        continue
                    raise SparsemergeError(f"{spec.name} needs the per-model parameter {key!r}")
                p[key] = default
    base_index = None
    if spec.base_is_input and base is not None:
        tensors = [base] + tensors
        base_params = {k: (base_weight if k == "weight" else d) for k, d in spec.model_params.items()}
        per_model = [base_params] + per_model
        base_index = 0
    if spec.base == "required" and base is None:
        raise SparsemergeError(f"{spec.name} needs a base tensor")
    spec.check_counts(len(tensors), base is not None)
    generator = torch.Generator().manual_seed(seed_for(seed, name)) if spec.stochastic else None
    return spec.fn(MergeInputs(name, tensors, per_model, base, globals_, generator, base_index))


def merge_state_dicts(
    method: str,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    base: Optional[Mapping[str, torch.Tensor]] = None,
    weights: Optional[Sequence[float]] = None,
    model_params: Optional[Sequence[Mapping[str, Any]]] = None,
    seed: int = 0,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """:func:`merge_tensors` over every floating-point tensor of in-memory models (same keys).
    Non-float tensors are copied from the base (or the first model)."""
    keys = list((base or state_dicts[0]).keys())
    for i, sd in enumerate(state_dicts):
        missing = [k for k in keys if k not in sd]
        if missing:
            raise SparsemergeError(f"model {i} lacks tensors {missing[:8]}")
    out: dict[str, torch.Tensor] = {}
    for k in keys:
        ref = (base or state_dicts[0])[k]
        if not ref.is_floating_point():
            out[k] = ref.clone()
            continue
        out[k] = merge_tensors(
            method, [sd[k] for sd in state_dicts], base=None if base is None else base[k],
            weights=weights, model_params=model_params, seed=seed, name=k, **params,
        )
    return out
