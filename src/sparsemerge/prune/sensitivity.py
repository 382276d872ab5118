"""Per-layer sensitivity to N:M pruning (chapter 10.2.3, exercise 5): how much the loss grows
when ONE targeted Linear layer is pruned to a candidate pattern, every other layer dense.

Criteria (all are "predicted loss increase" up to scale; ``dense`` always scores 0):

* ``taylor`` - first order (Molchanov et al. 2019): ``sum_{i in R} |g_i w_i|`` with ``g`` the
  mean gradient of the LM loss (mean token cross-entropy, nats) over the calibration windows
  and ``R`` the weights the pattern removes. Units: nats (|first-order term| per weight, summed).
* ``fisher`` - second order with the diagonal empirical Fisher as the Hessian (the second term
  of the chapter's expansion, LeCun et al.'s OBD): ``0.5 * sum_{i in R} F_ii w_i^2``,
  ``F_ii = mean over windows of g_i^2`` (``g`` the per-window gradient of that window's mean
  token loss). Units: nats.
* ``obs`` - the OBS / SparseGPT layer error (Frantar & Alistarh 2023): the layer is pruned to
  the pattern WITH the OBS update by :func:`~sparsemerge.prune.sparsegpt.sparsegpt_prune` from
  its calibration Hessian ``H = 2/n X^T X`` (dense model's inputs, captured block by block),
  and the score is ``||(W - W') X^T||_F^2 / n = 0.5 tr(D H D^T)``, ``D = W - W'``. Units:
  squared output activations summed over output features, per token (not nats).
* ``measured`` - mean token cross-entropy on held-out windows with only that layer pruned
  (magnitude mask, or the SparseGPT weight of the ``obs`` pass), minus the dense loss. Units:
  nats per token. Costs one held-out evaluation per layer and pattern; limited by
  ``max_layers`` / ``layer_regex`` / ``max_windows``. Each weight is restored bit-exactly.

For ``taylor`` and ``fisher`` the removed set ``R`` is the complement of the MAGNITUDE mask
``masks.mask_for(|W|, pattern)``: the score predicts the cost of magnitude pruning that layer.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import mask_for
from sparsemerge.patterns import NM, parse_pattern
from sparsemerge.prune.base import Target
from sparsemerge.prune.config import PruneConfig
from sparsemerge.prune.gradient import calibration_gradients
from sparsemerge.prune.select import find_blocks, select_targets
from sparsemerge.selection import DEFAULT_EXCLUDE, DEFAULT_INCLUDE

CRITERIA = ("taylor", "fisher", "obs", "measured")
DENSE = "dense"
FORMAT_VERSION = 1


class SensitivityConfig(BaseModel):
    """Options of :func:`layer_sensitivity` (``sparsemerge sensitivity``)."""

    model_config = ConfigDict(extra="forbid")

    criteria: list[str] = Field(default_factory=lambda: ["taylor", "fisher", "obs"])
    patterns: list[str] = Field(default_factory=lambda: ["4:8", "2:4", "2:8", "1:4"], description='candidates; "dense" scores 0')
    include: list[str] = Field(default_factory=lambda: list(DEFAULT_INCLUDE))
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    calib: str = "bbc"
    data: str = Field("bbc", description="held-out text for 'measured' (its held-out split)")
    nsamples: int = Field(16, ge=1)
    seqlen: int = Field(256, ge=2)
    seed: int = 0
    dampening: float = Field(0.01, gt=0.0)
    blocksize: int = Field(128, ge=1)
    max_windows: Optional[int] = Field(8, ge=1, description="held-out windows for 'measured' (None: all)")
    max_layers: Optional[int] = Field(None, ge=1, description="'measured': only the first K selected layers")
    layer_regex: Optional[str] = Field(None, description="'measured': only layers whose name matches (re.search)")
    measured_method: Literal["magnitude", "sparsegpt"] = "magnitude"
    batch_size: int = Field(4, ge=1)
    progress: bool = True

    @field_validator("criteria")
    @classmethod
    def _criteria(cls, value: list[str]) -> list[str]:
        bad = [c for c in value if c not in CRITERIA]
        if bad or not value:
            raise ValueError(f"unknown criteria {bad}; choose from {', '.join(CRITERIA)}")
        return list(dict.fromkeys(value))

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one candidate pattern")
        out = []
        for p in value:
            p = p.strip()
            out.append(DENSE if p.lower() == DENSE else str(parse_pattern(p)))
        return list(dict.fromkeys(out))

    @field_validator("layer_regex")
    @classmethod
    def _regex(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"bad layer regex {value!r}: {exc}") from None
        return value


@dataclass
class LayerSensitivity:
    name: str
    shape: tuple[int, int]
    block: int
    scores: dict[str, dict[str, float]]  # criterion -> pattern -> predicted / measured loss increase


@dataclass
class SensitivityReport:
    layers: list[LayerSensitivity]
    candidates: list[str]
    criteria: list[str]
    base_loss: Optional[float] = None
    meta: dict[str, Any] = field(default_factory=dict)  # config, skipped layers, value_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "candidates": list(self.candidates),
            "criteria": list(self.criteria),
            "base_loss": self.base_loss,
            "meta": self.meta,
            "layers": [
                {"name": lay.name, "shape": list(lay.shape), "block": lay.block, "scores": lay.scores} for lay in self.layers
            ],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "SensitivityReport":
        try:
            layers = [
                LayerSensitivity(x["name"], (int(x["shape"][0]), int(x["shape"][1])), int(x["block"]),
                                 {c: {p: float(v) for p, v in s.items()} for c, s in x["scores"].items()})
                for x in d["layers"]
            ]
            return cls(layers, list(d["candidates"]), list(d["criteria"]), d.get("base_loss"), dict(d.get("meta") or {}))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise SparsemergeError(f"not a sensitivity report (sparsemerge sensitivity --json): {exc!r}") from None

    def save(self, path: "str | Path", overwrite: bool = False) -> Path:
        from sparsemerge.io.atomic import write_json_atomic

        return write_json_atomic(path, self.to_json(), overwrite=overwrite)

    @classmethod
    def load(cls, path: "str | Path") -> "SensitivityReport":
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise SparsemergeError(f"could not read sensitivity report {str(path)!r}: {exc}") from None

    def scores(self, criterion: str) -> dict[str, dict[str, float]]:
        """``{layer: {pattern: score}}`` of one criterion; every layer must have it."""
        missing = [lay.name for lay in self.layers if criterion not in lay.scores]
        if missing:
            raise SparsemergeError(
                f"criterion {criterion!r} is missing for {len(missing)} layer(s) (e.g. {missing[0]}); "
                f"the report has {', '.join(self.criteria)}"
            )
        return {lay.name: lay.scores[criterion] for lay in self.layers}


# ------------------------------------------------------------------------- targets
def sensitivity_targets(model: nn.Module, config: SensitivityConfig) -> tuple[list[Target], list[tuple[str, str]]]:
    """Layers chosen as ``prune`` chooses them, kept only where EVERY candidate applies."""
    non_dense = [p for p in config.patterns if p != DENSE] or ["2:4"]
    skipped: dict[str, str] = {}
    chosen: Optional[dict[str, Target]] = None
    for pattern in non_dense:
        targets, skip = select_targets(model, PruneConfig(pattern=pattern, include=config.include, exclude=config.exclude))
        for name, reason in skip:
            skipped.setdefault(name, f"{pattern}: {reason}")
        names = {t.name: t for t in targets}
        chosen = names if chosen is None else {n: t for n, t in chosen.items() if n in names}
    targets = list((chosen or {}).values())
    if not targets:
        raise SparsemergeError(f"no layer accepts every candidate pattern {config.patterns}; skipped: {list(skipped.items())[:3]}")
    return targets, sorted(skipped.items())


def _removed(weight: torch.Tensor, pattern: str) -> torch.Tensor:
    """True where the magnitude mask of ``pattern`` zeroes a weight."""
    return ~mask_for(weight.detach().abs(), pattern)


# ---------------------------------------------------------------- taylor / fisher
def gradient_scores(
    model: nn.Module, targets: list[Target], calibration: torch.Tensor, patterns: list[str], criteria: list[str], progress: bool = True
) -> dict[str, dict[str, dict[str, float]]]:
    """``{layer: {criterion: {pattern: score}}}`` for ``taylor`` and/or ``fisher`` from one
    pass of per-window gradients (:func:`calibration_gradients` on each window)."""
    n = calibration.shape[0]
    total = {t.name: torch.zeros_like(t.weight, dtype=torch.float32) for t in targets}
    squares = {t.name: torch.zeros_like(t.weight, dtype=torch.float32) for t in targets} if "fisher" in criteria else None
    for i in tqdm(range(n), desc="gradients", disable=not progress, leave=False):
        grads = calibration_gradients(model, targets, calibration[i : i + 1], progress=False)
        for name, g in grads.items():
            g = g.float()
            total[name].add_(g)
            if squares is not None:
                squares[name].addcmul_(g, g)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for t in targets:
        w = t.weight.detach().float()
        taylor = (total[t.name] / n * w).abs()
        fisher = 0.5 * squares[t.name] / n * w * w if squares is not None else None
        entry: dict[str, dict[str, float]] = {c: {} for c in criteria if c in ("taylor", "fisher")}
        for p in patterns:
            removed = _removed(w, p) if p != DENSE else None
            for c, score in (("taylor", taylor), ("fisher", fisher)):
                if c in entry:
                    entry[c][p] = 0.0 if removed is None else float(score[removed].double().sum())
        out[t.name] = entry
    return out


# --------------------------------------------------------------------------- obs
def obs_scores(
    model: nn.Module, targets: list[Target], calibration: torch.Tensor, patterns: list[str], config: SensitivityConfig,
    keep_weights: "set[str] | None" = None,
) -> tuple[dict[str, dict[str, float]], dict[tuple[str, str], torch.Tensor]]:
    """``({layer: {pattern: ||(W - W')X^T||^2 / n}}, {(layer, pattern): W'})`` with ``W'`` the
    SparseGPT weight of each layer pruned alone from the dense model's inputs (one-shot walk:
    no weight changes). ``W'`` is kept only for layers in ``keep_weights``."""
    from sparsemerge.prune.calibration import walk_blocks
    from sparsemerge.prune.sparsegpt import Hessian, sparsegpt_prune

    keep_weights = keep_weights or set()
    scores: dict[str, dict[str, float]] = {}
    kept: dict[tuple[str, str], torch.Tensor] = {}

    @torch.no_grad()
    def score_block(block_targets: list[Target], stats: dict[str, Hessian]) -> None:
        # layers reading one input (q/k/v, gate/up) share H; for N:M the rows are independent
        # given H, so they are stacked and pruned in one call (as SparseGPT.prune_block does)
        groups: dict[int, list[Target]] = {}
        for t in block_targets:
            groups.setdefault(id(stats[t.name]), []).append(t)
        for group in groups.values():
            hessian = stats[group[0].name].value
            for p in patterns:
                if p == DENSE:
                    for t in group:
                        scores.setdefault(t.name, {})[p] = 0.0
                    continue
                parts = [group] if isinstance(parse_pattern(p), NM) else [[t] for t in group]
                for part in parts:
                    weight = torch.cat([t.weight.detach().float() for t in part])
                    new = sparsegpt_prune(weight, hessian, p, config.dampening, config.blocksize, "+".join(t.name for t in part))
                    rows = [t.weight.shape[0] for t in part]
                    for t, d, w_new in zip(part, torch.split(weight - new, rows), torch.split(new, rows)):
                        d = d.double()
                        scores.setdefault(t.name, {})[p] = float(0.5 * ((d @ hessian.double()) * d).sum())
                        if t.name in keep_weights:
                            kept[(t.name, p)] = w_new.to(t.weight.dtype).clone()

    walk = PruneConfig(sequential="off", progress=config.progress, dampening=config.dampening, blocksize=config.blocksize)
    walk_blocks(model, targets, calibration, walk, lambda t: Hessian(t.weight.shape[1], t.weight.device), score_block,
                desc="obs blocks", default_mode="off")
    return scores, kept


# ---------------------------------------------------------------------- measured
@torch.no_grad()
def mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> float:
    """Mean token cross-entropy (nats) of ``windows`` (each predicts its tokens 2..seqlen)."""
    total, tokens = 0.0, 0
    for batch in torch.split(windows, batch_size):
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        targets = batch[:, 1:]
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
        tokens += targets.numel()
    return total / max(tokens, 1)


def measured_layers(targets: list[Target], config: SensitivityConfig) -> list[Target]:
    chosen = [t for t in targets if config.layer_regex is None or re.search(config.layer_regex, t.name)]
    if config.max_layers is not None:
        chosen = chosen[: config.max_layers]
    if not chosen:
        raise SparsemergeError(f"no targeted layer matches the layer regex {config.layer_regex!r}")
    return chosen


@torch.no_grad()
def measured_scores(
    model: nn.Module, layers: list[Target], heldout: torch.Tensor, patterns: list[str], config: SensitivityConfig,
    pruned: "dict[tuple[str, str], torch.Tensor] | None" = None,
) -> tuple[float, dict[str, dict[str, float]]]:
    """``(dense loss, {layer: {pattern: loss with only that layer pruned - dense loss}})``.

    Each trial prunes one weight in place and restores the saved copy (bit-exact) in a
    ``finally``, so an interruption leaves the model as it came."""
    was_training = model.training
    model.eval()
    try:
        base = mean_loss(model, heldout, config.batch_size)
        out: dict[str, dict[str, float]] = {}
        for t in tqdm(layers, desc="measured", disable=not config.progress, leave=False):
            saved = t.weight.detach().clone()
            out[t.name] = {}
            try:
                for p in patterns:
                    if p == DENSE:
                        out[t.name][p] = 0.0
                        continue
                    if config.measured_method == "sparsegpt":
                        t.weight.copy_(pruned[(t.name, p)])  # type: ignore[index]
                    else:
                        t.weight.mul_(mask_for(saved.abs(), p).to(saved.dtype))
                    out[t.name][p] = mean_loss(model, heldout, config.batch_size) - base
                    t.weight.copy_(saved)
            finally:
                t.weight.copy_(saved)
    finally:
        model.train(was_training)
    return base, out


# ------------------------------------------------------------------------ driver
def layer_sensitivity(
    model: nn.Module,
    tokenizer: Any = None,
    config: "SensitivityConfig | dict | None" = None,
    calibration: Optional[torch.Tensor] = None,
    heldout: Optional[torch.Tensor] = None,
) -> SensitivityReport:
    """Score every targeted layer for every candidate pattern by ``config.criteria`` (module
    docstring). ``calibration``: ``(nsamples, seqlen)`` ids (else drawn from ``config.calib``);
    ``heldout``: ids for ``measured`` (else ``config.max_windows`` held-out windows of
    ``config.data``). The model's weights are unchanged on return."""
    if config is None:
        config = SensitivityConfig()
    elif isinstance(config, dict):
        config = SensitivityConfig(**config)
    patterns, criteria = config.patterns, config.criteria
    targets, skipped = sensitivity_targets(model, config)
    _, blocks = find_blocks(model)
    block_of = {id(m): i for i, b in enumerate(blocks) for m in b.modules()}
    needs_calib = any(c in criteria for c in ("taylor", "fisher", "obs")) or (
        "measured" in criteria and config.measured_method == "sparsegpt"
    )
    if needs_calib and calibration is None:
        if tokenizer is None:
            raise SparsemergeError("sensitivity needs calibration text: pass a tokenizer or calibration ids")
        from sparsemerge.eval.data import calibration_windows

        calibration = calibration_windows(tokenizer, config.calib, config.nsamples, config.seqlen, config.seed)
    measure = measured_layers(targets, config) if "measured" in criteria else []
    if measure and heldout is None:
        if tokenizer is None:
            raise SparsemergeError("'measured' needs held-out text: pass a tokenizer or held-out ids")
        from sparsemerge.eval.data import eval_windows

        heldout = eval_windows(tokenizer, config.data, config.seqlen, config.max_windows)

    per_layer: dict[str, dict[str, dict[str, float]]] = {t.name: {} for t in targets}
    if "taylor" in criteria or "fisher" in criteria:
        for name, entry in gradient_scores(model, targets, calibration, patterns, criteria, config.progress).items():
            per_layer[name].update(entry)
    pruned: dict[tuple[str, str], torch.Tensor] = {}
    use_obs_weights = bool(measure) and config.measured_method == "sparsegpt"
    if "obs" in criteria or use_obs_weights:
        obs, pruned = obs_scores(model, targets, calibration, patterns, config,
                                 {t.name for t in measure} if use_obs_weights else None)
        if "obs" in criteria:
            for name, s in obs.items():
                per_layer[name]["obs"] = s
    base_loss = None
    if measure:
        base_loss, measured = measured_scores(model, measure, heldout, patterns, config, pruned)
        for name, s in measured.items():
            per_layer[name]["measured"] = s
    for scores in per_layer.values():
        for c in list(scores):
            scores[c] = {p: scores[c][p] for p in patterns}  # candidate order
    dtype = targets[0].weight.dtype
    layers = [
        LayerSensitivity(t.name, (int(t.weight.shape[0]), int(t.weight.shape[1])), block_of.get(id(t.module), -1), per_layer[t.name])
        for t in targets
    ]
    meta = {
        "config": config.model_dump(),
        "skipped": [{"name": n, "reason": r} for n, r in skipped],
        "value_bytes": torch.empty(0, dtype=dtype).element_size(),
        "calibration_tokens": None if calibration is None else int(calibration.numel()),
        "heldout_tokens": None if heldout is None or not measure else int(heldout.numel()),
    }
    return SensitivityReport(layers, list(patterns), list(criteria), base_loss, meta)
