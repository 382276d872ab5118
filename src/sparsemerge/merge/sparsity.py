"""Sparsity-aware merging: keep a merged model on a sparsity pattern (``--keep-pattern 2:4``).

Merging N:M-pruned models with any dense method breaks the pattern (two models' different
supports add up, TIES/DARE fill zeros). After each targeted weight is merged it is projected
back onto the pattern:

* ``keep_mask: merged`` (default): the pattern's mask of the merged weight's own magnitudes,
  ``W' = W * mask(|W|)`` (for 2:4, the 2 largest of each 4) -- the pruning of the merge;
* ``keep_mask: base``: the base's support first, ``score = |W| + (max|W| + 1) * 1[W_base != 0]``,
  so a 2:4 base keeps exactly its positions (the merged values on them) and a dense or less
  sparse base falls back to the merged magnitudes within each group.

Targeted weights are the 2-D layer weights outside norms, embeddings and the LM head
(``sparsemerge.selection.DEFAULT_INCLUDE/EXCLUDE``); shapes the pattern cannot tile are
left dense and listed in the summary.
"""
from __future__ import annotations

import threading
from typing import Any, Optional

import torch

from sparsemerge.masks import check_pattern, mask_for, pattern_applicable
from sparsemerge.patterns import parse_pattern
from sparsemerge.selection import LayerFilter


def project_to_pattern(merged: torch.Tensor, pattern: str, base: Optional[torch.Tensor] = None, keep_mask: str = "merged") -> torch.Tensor:
    """``merged * mask`` with the mask chosen as the module docstring says."""
    scores = merged.abs().float()
    if keep_mask == "base":
        if base is None:
            raise ValueError("keep_mask 'base' needs the base tensor")
        scores = scores + (scores.max() + 1) * (base != 0).float()
    elif keep_mask != "merged":
        raise ValueError(f"keep_mask must be 'merged' or 'base', got {keep_mask!r}")
    return merged * mask_for(scores, pattern).to(merged.dtype)


class PatternProjector:
    """Applies :func:`project_to_pattern` to targeted tensors and keeps a conformance summary."""

    def __init__(self, pattern: str, keep_mask: str = "merged") -> None:
        self.pattern = parse_pattern(pattern)
        self.keep_mask = keep_mask
        self._targets = LayerFilter.default()
        self.projected: list[str] = []
        self.skipped: dict[str, str] = {}
        self.violations = 0
        self._zeros = 0
        self._numel = 0
        self._lock = threading.Lock()

    def targets(self, name: str) -> bool:
        return self._targets.weight(name)

    def __call__(self, name: str, merged: torch.Tensor, base: Optional[torch.Tensor]) -> torch.Tensor:
        if not self.targets(name):
            return merged
        reason = pattern_applicable(tuple(merged.shape), self.pattern)
        if reason is not None:
            with self._lock:
                self.skipped[name] = reason
            return merged
        out = project_to_pattern(merged, str(self.pattern), base, self.keep_mask if base is not None else "merged")
        report = check_pattern(out, self.pattern)
        zeros = int((out == 0).sum())
        with self._lock:  # called from the engine's worker threads
            self.violations += report.violations
            self._zeros += zeros
            self._numel += out.numel()
            self.projected.append(name)
        return out

    def summary(self) -> dict[str, Any]:
        return {
            "pattern": str(self.pattern),
            "keep_mask": self.keep_mask,
            "tensors": len(self.projected),
            "sparsity": round(self._zeros / self._numel, 6) if self._numel else 0.0,
            "violations": self.violations,
            "skipped": self.skipped,
        }
