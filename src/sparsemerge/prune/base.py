"""The pruning-method interface and its registry.

A method receives the model, the list of targeted Linear layers (each with its pattern)
and, when it needs one, a batch of calibration token windows; it zeroes weights in place.
Score-based methods only compute importances; :func:`apply_scores` turns them into masks
for any pattern, so every method works with every pattern.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from sparsemerge.masks import global_threshold, mask_for
from sparsemerge.patterns import Pattern, Unstructured
from sparsemerge.prune.config import PruneConfig
from sparsemerge.registry import Registry


@dataclass
class Target:
    """One Linear layer to prune: its qualified name, the module, and its pattern."""

    name: str
    module: nn.Linear
    pattern: Pattern

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight


class PruningMethod(abc.ABC):
    """Base class. Subclasses set ``name`` and ``needs_calibration`` and implement ``prune``."""

    name: str = ""
    needs_calibration: bool = False

    @abc.abstractmethod
    def prune(self, model: nn.Module, targets: list[Target], config: PruneConfig, calibration: Optional[torch.Tensor]) -> None:
        """Zero weights of ``targets`` in place to their patterns."""


class ScoreMethod(PruningMethod):
    """A method defined by an importance score per weight; masks come from the pattern."""

    @abc.abstractmethod
    def scores(
        self, model: nn.Module, targets: list[Target], config: PruneConfig, calibration: Optional[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Non-negative importance per weight, keyed by target name."""

    def prune(self, model: nn.Module, targets: list[Target], config: PruneConfig, calibration: Optional[torch.Tensor]) -> None:
        apply_scores(targets, self.scores(model, targets, config, calibration))


METHODS: Registry[type[PruningMethod]] = Registry("pruning method")


@torch.no_grad()
def apply_scores(targets: list[Target], scores: dict[str, torch.Tensor]) -> None:
    """Zero each target's weights outside the keep-mask of its scores under its pattern.

    Global unstructured targets share one threshold over all their scores.
    """
    global_targets = [t for t in targets if isinstance(t.pattern, Unstructured) and t.pattern.scope == "global"]
    threshold = None
    if global_targets:
        threshold = global_threshold([scores[t.name] for t in global_targets], global_targets[0].pattern.sparsity)
    for target in targets:
        score = scores[target.name]
        if threshold is not None and target in global_targets:
            keep = score > threshold
        else:
            keep = mask_for(score, target.pattern)
        target.weight.mul_(keep.to(target.weight.dtype))
