"""Magnitude pruning: score ``|W_ij|`` (chapter 10.1.2, greedy Top-N per group)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from sparsemerge.prune.base import METHODS, ScoreMethod, Target
from sparsemerge.prune.config import PruneConfig


@METHODS.register("magnitude")
class Magnitude(ScoreMethod):
    name = "magnitude"
    needs_calibration = False

    def scores(
        self, model: nn.Module, targets: list[Target], config: PruneConfig, calibration: Optional[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {t.name: t.weight.detach().abs() for t in targets}
