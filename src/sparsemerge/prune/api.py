"""``prune_(model, config)``: the Python entry point behind ``sparsemerge prune``."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn

from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import check_pattern
from sparsemerge.patterns import Unstructured
from sparsemerge.prune import gradient, magnitude, sparsegpt, wanda  # noqa: F401  (register methods)
from sparsemerge.prune.base import METHODS, Target
from sparsemerge.prune.config import PruneConfig
from sparsemerge.prune.select import select_targets


@dataclass
class LayerRecord:
    name: str
    shape: list[int]
    pattern: str
    sparsity: float
    violations: int


@dataclass
class PruneReport:
    method: str
    pattern: str
    layers: list[LayerRecord]
    skipped: list[tuple[str, str]]
    seconds: float
    config: dict[str, Any] = field(default_factory=dict)
    permutation: Optional[dict[str, Any]] = None  # PermutationReport.to_json() when config.permute

    @property
    def sparsity(self) -> float:
        """Fraction of zeros over all pruned weights."""
        total = sum(_numel(r.shape) for r in self.layers)
        return sum(r.sparsity * _numel(r.shape) for r in self.layers) / max(total, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "pattern": self.pattern,
            "overall_sparsity": round(self.sparsity, 6),
            "seconds": round(self.seconds, 3),
            "config": self.config,
            "layers": [asdict(r) for r in self.layers],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            **({"permutation": self.permutation} if self.permutation is not None else {}),
        }


def _numel(shape: list[int]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


def _is_global(target: Target) -> bool:
    return isinstance(target.pattern, Unstructured) and target.pattern.scope == "global"


def check_finite(targets: list[Target]) -> None:
    for t in targets:
        if not torch.isfinite(t.weight).all():
            raise SparsemergeError(
                f"weight {t.name} contains NaN or Inf values; the checkpoint is corrupt - fix or re-export it"
            )


def prune_(
    model: nn.Module,
    config: Union[PruneConfig, dict[str, Any], None] = None,
    tokenizer: Any = None,
    calibration: Optional[torch.Tensor] = None,
) -> PruneReport:
    """Prune ``model`` in place with ``config.method`` to ``config.pattern``; return a report.

    ``calibration``: ``(nsamples, seqlen)`` token ids; when omitted and the method needs it,
    windows are drawn from ``config.calib`` with ``tokenizer``.
    """
    if config is None:
        config = PruneConfig()
    elif isinstance(config, dict):
        config = PruneConfig(**config)
    start = time.perf_counter()
    method = METHODS.get(config.method)()
    targets, skipped = select_targets(model, config)
    check_finite(targets)
    if method.needs_calibration and calibration is None:
        if tokenizer is None:
            raise SparsemergeError(f"method {config.method!r} needs calibration data: pass a tokenizer or calibration ids")
        from sparsemerge.eval.data import calibration_windows

        calibration = calibration_windows(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed)
    permutation = None
    if config.permute:  # same function, N:M masks keep more: scores |W|, or |W|*||X_j|| for calibrated methods
        from sparsemerge.prune.permutation import collect_input_norms, permute_channels_

        norms = collect_input_norms(model, targets, calibration) if method.needs_calibration else None
        permutation = permute_channels_(model, config, targets=targets, input_norms=norms).to_json()
    method.prune(model, targets, config, calibration)
    layers = []
    for t in targets:
        if _is_global(t):  # a global budget is checked over all such layers together, below
            sparsity = float((t.weight == 0).sum()) / t.weight.numel()
            layers.append(LayerRecord(t.name, list(t.weight.shape), str(t.pattern), sparsity, 0))
            continue
        report = check_pattern(t.weight.detach(), t.pattern)
        layers.append(LayerRecord(t.name, list(t.weight.shape), str(t.pattern), report.sparsity, report.violations))
    global_targets = [t for t in targets if _is_global(t)]
    if global_targets:
        zeros = sum(int((t.weight == 0).sum()) for t in global_targets)
        total = sum(t.weight.numel() for t in global_targets)
        if zeros < round(global_targets[0].pattern.sparsity * total):
            raise RuntimeError(f"pruning method {config.method} missed the global sparsity budget")
    bad = [r.name for r in layers if r.violations]
    if bad:  # a method that breaks its own pattern is a bug, not bad input
        raise RuntimeError(f"pruning method {config.method} left pattern violations in {bad[:5]}")
    return PruneReport(
        method=config.method,
        pattern=config.pattern,
        layers=layers,
        skipped=skipped,
        seconds=time.perf_counter() - start,
        config=config.model_dump(),
        permutation=permutation,
    )
