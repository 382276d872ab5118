"""Fixed sparsity masks for fine-tuning a pruned model (chapter 10.1.4, "only the non-zero
weights are updated"): ``W <- W - eta * (grad W) . M``.

:class:`FixedMasks` records ``M = 1[W != 0]`` of every pruned ``nn.Linear`` when it is created,
multiplies each weight's gradient by its mask (a tensor hook, so the optimizer's moments
never see the pruned positions) and re-applies the mask after each optimizer step, so the
pattern (2:4, block, unstructured) survives any optimizer, weight decay included.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sparsemerge.selection import LayerFilter


class FixedMasks:
    """Masks of the trainable pruned Linear layers of ``model`` (weights that require grad and
    hold at least ``min_sparsity`` zeros; a frozen weight cannot move)."""

    def __init__(self, model: nn.Module, min_sparsity: float = 0.01, exclude: Optional[list[str]] = None) -> None:
        kept = LayerFilter(None, exclude)
        self.masks: dict[str, torch.Tensor] = {}
        self._params: dict[str, nn.Parameter] = {}
        self._hooks: list = []
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or not module.weight.requires_grad or not kept(name):
                continue
            mask = module.weight.detach() != 0
            if 1.0 - mask.float().mean().item() >= min_sparsity:
                self.masks[name] = mask
                self._params[name] = module.weight

    def __len__(self) -> int:
        return len(self.masks)

    def attach(self) -> "FixedMasks":
        """Mask the gradients from now on (idempotent)."""
        if not self._hooks:
            for name, param in self._params.items():
                mask = self.masks[name]
                self._hooks.append(param.register_hook(lambda g, m=mask: g * m))
        return self

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero the pruned positions again (after an optimizer step)."""
        for name, param in self._params.items():
            param.mul_(self.masks[name])

    def violations(self) -> int:
        """How many pruned positions are non-zero now (0 while the masks hold)."""
        return sum(int(((p.detach() != 0) & ~self.masks[n]).sum()) for n, p in self._params.items())
