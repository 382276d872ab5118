"""What a merge method is: a pure function over one tensor's inputs, plus a spec of its parameters.

A method receives :class:`MergeInputs` (the base tensor, the other models' tensors in
config order, per-model parameters, global parameters, a seeded generator) and returns the
merged tensor. The engine streams one tensor at a time and calls it; the Python API
(:func:`sparsemerge.merge.merge_tensors`) calls it directly on in-memory tensors.

Methods register in :data:`MERGE_METHODS` with :func:`register_method` (the only way), each
from its own module in :mod:`sparsemerge.merge.methods`; the spec lists the parameters (with
mergekit's names and defaults), so configs are checked before any work. This module imports no
method (no import cycle); ``import sparsemerge.merge`` imports them all and fills the registry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.registry import Registry

REQUIRED = object()  # a parameter without default


@dataclass
class MergeInputs:
    """Inputs for one output tensor.

    ``tensors[i]`` and ``params[i]`` belong to the i-th non-base model (config order);
    ``base`` is the base model's tensor (None for base-free methods); ``all_tensors`` lists
    every input in config order including the base where the method takes it as an input."""

    name: str
    tensors: list[torch.Tensor]
    params: list[dict[str, Any]]
    base: Optional[torch.Tensor] = None
    globals: dict[str, Any] = field(default_factory=dict)
    generator: Optional[torch.Generator] = None
    base_index: Optional[int] = None  # position of the base in ``tensors`` for base_is_input methods
    # a row block of the tensor (merge/memory.py): rows [start, stop) of the first dimension,
    # and what the method's row_prepare computed over the whole tensor first
    rows: Optional[tuple[int, int]] = None
    row_state: Any = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    fn: Callable[[MergeInputs], torch.Tensor]
    reference: str
    base: str = "required"  # "required" | "optional" | "none"
    model_params: dict[str, Any] = field(default_factory=dict)  # name -> default or REQUIRED
    global_params: dict[str, Any] = field(default_factory=dict)
    min_models: int = 1  # inputs the method receives in ``tensors`` (non-base models, or all models when base_is_input)
    max_models: Optional[int] = None
    stochastic: bool = False
    base_is_input: bool = False  # linear/slerp: the base is one of the merged inputs
    # each output row depends only on the same row of the inputs (elementwise formulas with
    # per-tensor parameters): the engine may compute a large tensor in row blocks, exactly
    rowwise: bool = False
    # methods with a whole-tensor step (TIES' top-k trim): ``row_prepare(block, rows,
    # block_rows)`` computes it from row blocks (``block(r0, r1, models)`` reads them) and
    # returns the state each block's call receives in ``MergeInputs.row_state`` (None: the
    # tensor cannot be done in blocks, it is computed whole)
    row_prepare: Optional[Callable[..., Any]] = None

    def check_counts(self, n_models: int, has_base: bool) -> None:
        if self.base == "required" and not has_base:
            raise SparsemergeError(f"merge method {self.name!r} needs a base_model; add base_model: PATH to the config")
        what = "models" if self.base_is_input else "models besides the base"
        if n_models < self.min_models:
            raise SparsemergeError(f"merge method {self.name!r} needs at least {self.min_models} {what}, got {n_models}")
        if self.max_models is not None and n_models > self.max_models:
            raise SparsemergeError(f"merge method {self.name!r} takes at most {self.max_models} {what}, got {n_models}")


MERGE_METHODS: "Registry[MethodSpec]" = Registry("merge method")


def register_method(
    name: str,
    reference: str,
    *,
    base: str = "required",
    model_params: Optional[dict[str, Any]] = None,
    global_params: Optional[dict[str, Any]] = None,
    min_models: int = 1,
    max_models: Optional[int] = None,
    stochastic: bool = False,
    base_is_input: bool = False,
    rowwise: bool = False,
    row_prepare: Optional[Callable[..., Any]] = None,
) -> Callable[[Callable[[MergeInputs], torch.Tensor]], Callable[[MergeInputs], torch.Tensor]]:
    """Decorator: register ``fn(inputs) -> tensor`` as merge method ``name``."""

    def decorator(fn: Callable[[MergeInputs], torch.Tensor]) -> Callable[[MergeInputs], torch.Tensor]:
        spec = MethodSpec(
            name=name,
            fn=fn,
            reference=reference,
            base=base,
            model_params=dict(model_params or {}),
            global_params=dict(global_params or {}),
            min_models=min_models,
            max_models=max_models,
            stochastic=stochastic,
            base_is_input=base_is_input,
            rowwise=rowwise,
            row_prepare=row_prepare,
        )
        MERGE_METHODS.register(name)(spec)
        return fn

    return decorator


def get_method(name: str) -> MethodSpec:
    """The spec of a registered method; an unknown name lists the known ones."""
    return MERGE_METHODS.get(name)


def seed_for(seed: int, name: str) -> int:
    """A per-tensor seed, stable across runs and processes (DARE/DELLA masks)."""
    import zlib

    return (zlib.crc32(name.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def weights_tensor(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-model weights shaped ``[k, 1, ..., 1]`` to broadcast against stacked ``[k, *shape]``."""
    w = torch.tensor([float(v) for v in values], dtype=like.dtype, device=like.device)
    return w.reshape((-1,) + (1,) * like.dim())
