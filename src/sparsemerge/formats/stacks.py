"""MoE experts in a packed checkpoint: a fused experts weight ``[E, out, in]`` (transformers'
Mixtral and Qwen2-MoE layout, ``...mlp.experts.gate_up_proj`` / ``down_proj``) is stored as
``E`` ordinary 2-D tensor entries ``NAME.0 .. NAME.{E-1}``, each in the pack's format (N:M
values + metadata, a codec), whose manifest entries carry ``"stack": {"of": NAME, "index": e,
"count": E}`` (sealed by the entry's checksum like every other key). ``inspect``, ``check``
and the size plan see plain 2-D weights; ``unpack`` stacks them back into ``NAME``;
``load_packed`` runs them as :class:`~sparsemerge.merge.moe.sparse.SparseExperts` on the N:M
kernels without a dense copy.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import torch

from sparsemerge.errors import SparsemergeError

EXPERTS_WEIGHT = re.compile(r"(^|\.)experts\.(gate_up_proj|down_proj)$")


def is_expert_stack(name: str, tensor: torch.Tensor) -> bool:
    """A fused experts weight: a 3-D float tensor named ``...experts.gate_up_proj|down_proj``."""
    return tensor.dim() == 3 and tensor.is_floating_point() and EXPERTS_WEIGHT.search(name) is not None


def slice_name(name: str, expert: int) -> str:
    return f"{name}.{expert}"


def stack_entry(record: dict[str, Any], what: str) -> Optional[tuple[str, int, int]]:
    """``(stacked name, index, count)`` of a slice's manifest entry, or None for other entries."""
    stack = record.get("stack")
    if stack is None:
        return None
    try:
        of, index, count = str(stack["of"]), int(stack["index"]), int(stack["count"])
    except (KeyError, TypeError, ValueError) as exc:
        raise SparsemergeError(f"{what}: malformed expert-stack entry {stack!r} ({exc})") from None
    if not 0 <= index < count:
        raise SparsemergeError(f"{what}: expert index {index} outside 0..{count - 1}")
    return of, index, count


class StackCollector:
    """Gathers the slices of each stacked tensor (any order); :meth:`add` returns the complete
    list once the last slice arrives; :meth:`finish` refuses stacks left incomplete."""

    def __init__(self) -> None:
        self._parts: dict[str, list[Any]] = {}

    def add(self, of: str, index: int, count: int, part: Any, what: str) -> Optional[list[Any]]:
        parts = self._parts.setdefault(of, [None] * count)
        if len(parts) != count or parts[index] is not None:
            raise SparsemergeError(f"{what}: expert stack {of!r} has conflicting entries (count or index repeated)")
        parts[index] = part
        if all(p is not None for p in parts):
            del self._parts[of]
            return parts
        return None

    def finish(self) -> None:
        if self._parts:
            of, parts = next(iter(self._parts.items()))
            missing = [i for i, p in enumerate(parts) if p is None]
            raise SparsemergeError(f"expert stack {of!r} lacks slices {missing[:8]}; the checkpoint is incomplete - repack it")
