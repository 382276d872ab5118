"""Magnitude pruning: score ``|W_ij|`` (chapter 10.1.2, greedy Top-N per group)."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from sparsemerge.prune.base import METHODS, ScoreMethod, Target


@METHODS.register("magnitude")
class Magnitude(ScoreMethod):
    name = "magnitude"
    needs_calibration = False

    def scores(
        self, model: nn.Module, targets: list[Target], config: Any, calibration: Optional[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return {t.name: t.weight.detach().abs() for t in targets}
