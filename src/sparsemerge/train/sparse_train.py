"""One stage of sparse training, for any model and loss (chapter 10.1.4, 10.1.7, 10.2.6).

A stage is a method, a pattern and an optimizer budget (:class:`StageConfig`):

============  ============================================================================
method        masks during the stage
============  ============================================================================
dense         none (the three-stage recipe's first stage, usually with ``l1``)
oneshot       magnitude N:M at the first step, then fixed (one-shot + fine-tune)
fixed         the model's zeros at the start of the stage (a pruned model: recovery)
gradual       cubic ramp to N:M between ``ramp_start`` and ``ramp_end`` (Zhu and Gupta, 2017)
progressive   the stage list ``progressive`` in equal parts (e.g. dense -> 4:8 -> 2:4), or with
              ``exp_n_init`` the chapter's N(t) = N_final + (N_init - N_final) e^(-lambda t)
srste         N:M of the dense weights every ``update_every`` steps, SR-STE (Zhou et al., 2021)
dynamic       TopK(|W| + gamma |grad W|) every ``update_every`` steps (chapter 10.1.7)
prune         no training: a one-shot prune with :func:`sparsemerge.prune.prune_` (``prune``)
============  ============================================================================

:func:`run_stage` is the loop: per step ``t`` the controller's ``before_forward(t)``, the loss
(the caller's ``loss_fn(t)`` plus ``l1 * ||W||_1 / P`` and ``nm_reg * R_N:M``,
:mod:`sparsemerge.train.regularizers`), backward, ``after_backward``, gradient clipping, the
optimizer step (AdamW or SGD with momentum; linear warm-up then linear decay to 10% of ``lr``),
``after_step``. A :class:`Checkpointer` saves everything a resumed run needs (weights,
optimizer, scheduler, masks, losses) every ``checkpoint_every`` steps, atomically; batches
are a function of the step index (the caller's ``loss_fn``), so a run resumed after ``kill -9``
ends bit-identical to one that was never interrupted. At the end of a stage the controller
leaves the model exactly on its final pattern (:meth:`MaskController.finalize_`).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn
from tqdm.auto import tqdm

from sparsemerge.errors import SparsemergeError
from sparsemerge.patterns import NM
from sparsemerge.train.regularizers import l1_penalty, nm_penalty
from sparsemerge.train.schedules import Constant, CubicRamp, ExponentialN, ProgressiveNM, as_nm
from sparsemerge.train.sparse_masks import MaskController, masks_of_zeros

Method = Literal["dense", "oneshot", "fixed", "gradual", "progressive", "srste", "dynamic", "prune"]
TRAINING_METHODS = ("dense", "oneshot", "fixed", "gradual", "progressive", "srste", "dynamic")


class StageConfig(BaseModel):
    """One stage of a sparse-training recipe (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    method: Method
    pattern: str = "2:4"
    steps: int = Field(100, ge=0)
    # optimizer
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = Field(5e-5, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # masks
    update_every: int = Field(10, ge=0, description="recompute masks every k steps (0: once)")
    ramp_start: float = Field(0.0, ge=0, le=1, description="gradual: fraction of the stage's steps where the ramp starts")
    ramp_end: float = Field(0.75, gt=0, le=1, description="gradual: fraction of the stage's steps where N:M is reached")
    progressive: list[str] = Field(default_factory=lambda: ["dense", "4:8", "2:4"])
    exp_n_init: Optional[int] = Field(None, ge=1, description="progressive: N(t) = N_final + (N_init - N_final) e^(-lambda t) "
                                      "of the pattern's M instead of the stage list (chapter 10.2.6)")
    exp_lambda: float = Field(0.05, gt=0, description="progressive with exp_n_init: lambda per step")
    gamma: float = Field(0.1, ge=0, description="dynamic: gradient weight in |W| + gamma c |grad W|")
    srste_decay: float = Field(2e-4, ge=0, description="SR-STE's lambda_W")
    activation_aware: bool = Field(False, description="mask scores |W_ij| * ||X_j|| (Wanda's) instead of |W_ij|; Linear layers")
    # loss terms
    l1: float = Field(0.0, ge=0, description="beta of beta ||W||_1 / P")
    nm_reg: float = Field(0.0, ge=0, description="weight of the N:M regularizer")
    kd_weight: float = Field(1.0, ge=0, description="language models: weight of the distillation term")
    ce_weight: float = Field(0.0, ge=0, description="language models: weight of the next-token cross-entropy")
    temperature: float = Field(2.0, gt=0)
    prune: dict[str, Any] = Field(default_factory=dict, description="method prune: sparsemerge.prune.PruneConfig options")

    @field_validator("pattern")
    @classmethod
    def _nm(cls, value: str) -> str:
        as_nm(value)
        return value

    @property
    def nm(self) -> NM:
        if self.method == "progressive" and self.exp_n_init is None:
            return as_nm(self.progressive[-1])
        return as_nm(self.pattern)

    @property
    def label(self) -> str:
        return self.name or self.method


def make_controller(stage: StageConfig, weights: dict[str, nn.Parameter],
                    modules: Optional[dict[str, nn.Module]] = None) -> Optional[MaskController]:
    """The mask controller of ``stage`` (None for ``dense``); ``modules``: the layer owning each
    weight (needed for ``activation_aware``)."""
    m = stage.method
    if m == "dense":
        return None
    pattern = stage.nm
    if m == "fixed":
        return MaskController(weights, Constant(pattern), update_every=0, initial_masks=masks_of_zeros(weights))
    extra: dict[str, Any] = {"activation_aware": True, "modules": modules} if stage.activation_aware else {}
    every = max(1, stage.update_every)
    if m == "oneshot":
        return MaskController(weights, Constant(pattern), update_every=0, **extra)
    if m == "gradual":
        start, end = int(stage.ramp_start * stage.steps), max(1, int(round(stage.ramp_end * stage.steps)))
        if end <= start:
            raise SparsemergeError(f"stage {stage.label!r}: ramp_end must come after ramp_start")
        return MaskController(weights, CubicRamp(pattern, start, end), update_every=every, **extra)
    if m == "progressive" and stage.exp_n_init is not None:  # N(t) exact on N_final for the last 20% of the steps
        schedule = ExponentialN(pattern.m, stage.exp_n_init, pattern.n, stage.exp_lambda, exact_from=int(0.8 * stage.steps))
        return MaskController(weights, schedule, update_every=stage.update_every, **extra)
    if m == "progressive":
        schedule = ProgressiveNM.even(stage.progressive, max(stage.steps, len(stage.progressive)))
        return MaskController(weights, schedule, update_every=stage.update_every, **extra)
    if m == "srste":
        return MaskController(weights, Constant(pattern), mode="srste", update_every=every, srste_decay=stage.srste_decay, **extra)
    if m == "dynamic":
        return MaskController(weights, Constant(pattern), update_every=every, score="gradient", gamma=stage.gamma, **extra)
    raise SparsemergeError(f"stage method {m!r} does not train")


def lr_factor(step: int, steps: int, warmup: int) -> float:
    """Linear warm-up to 1, then linear decay to 0.1 at the last step."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    return 1.0 - 0.9 * (step - warmup) / max(1, steps - warmup)


def make_optimizer(stage: StageConfig, params: list[nn.Parameter]) -> tuple[torch.optim.Optimizer, Any]:
    if stage.optimizer == "sgd":
        optimizer = torch.optim.SGD(params, lr=stage.lr, momentum=stage.momentum, weight_decay=stage.weight_decay)
    else:
        optimizer = torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, stage.steps, stage.warmup_steps))
    return optimizer, scheduler


@dataclass
class StageReport:
    name: str
    method: str
    pattern: str
    steps: int
    tokens: int = 0
    train_seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    mask_updates: list[dict[str, Any]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    final_density: Optional[float] = None
    violations: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_seconds if self.train_seconds > 0 else math.nan

    def to_json(self) -> dict[str, Any]:
        tenth = max(1, len(self.losses) // 10)
        return {
            "name": self.name, "method": self.method, "pattern": self.pattern, "steps": self.steps,
            "tokens": self.tokens, "train_seconds": round(self.train_seconds, 2),
            "tokens_per_s": round(self.tokens_per_s, 2) if self.tokens else None,
            "loss_first": sum(self.losses[:tenth]) / tenth if self.losses else None,
            "loss_last": sum(self.losses[-tenth:]) / tenth if self.losses else None,
            "mask_updates": self.mask_updates, "evals": self.evals,
            "final_density": self.final_density, "violations": self.violations,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "StageReport":
        keep = {k: data[k] for k in ("name", "method", "pattern", "steps", "tokens", "train_seconds", "mask_updates",
                                     "final_density", "violations") if k in data}
        report = cls(**keep)
        report.losses = list(data.get("losses", []))
        report.evals = [tuple(e) for e in data.get("evals", [])]
        return report


class Checkpointer:
    """``<directory>/checkpoint.pt``, written to a temporary name and renamed (a kill during the
    write leaves the previous checkpoint). ``key`` identifies the run: a checkpoint of another
    recipe is refused rather than resumed."""

    def __init__(self, directory: "str | Path", every: int, key: str) -> None:
        self.directory = Path(directory)
        self.every = every
        self.key = key
        self.path = self.directory / "checkpoint.pt"

    def load(self) -> Optional[dict[str, Any]]:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)  # never unpickle code
        except Exception as exc:
            raise SparsemergeError(f"{self.path} cannot be read ({exc}); delete it or pass --restart") from None
        if state.get("key") != self.key:
            raise SparsemergeError(f"{self.path} belongs to another recipe or model; pass --restart to discard it "
                                   "or use another work directory")
        return state

    def save(self, state: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"checkpoint.pt.tmp{os.getpid()}")
        torch.save({**state, "key": self.key}, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def due(self, next_step: int, steps: int) -> bool:
        return self.every > 0 and (next_step % self.every == 0 or next_step == steps)


def run_stage(
    model: nn.Module,
    params: list[nn.Parameter],
    weights: dict[str, nn.Parameter],
    stage: StageConfig,
    loss_fn: Callable[[int], tuple[torch.Tensor, int]],
    *,
    progress: bool = True,
    eval_fn: Optional[Callable[[], float]] = None,
    eval_every: int = 0,
    checkpoint: Optional[Callable[[dict[str, Any]], None]] = None,
    checkpoint_due: Optional[Callable[[int], bool]] = None,
    resume: Optional[dict[str, Any]] = None,
    modules: Optional[dict[str, nn.Module]] = None,
    calibrate: Optional[Callable[[], None]] = None,
) -> tuple[StageReport, Optional[MaskController]]:
    """Train ``params`` for ``stage.steps`` steps (see the module docstring). ``weights``: the
    masked weights; ``loss_fn(t)`` -> ``(loss, tokens)`` of step ``t``; ``eval_fn()`` -> a held-out
    number (perplexity, error) evaluated with the masks applied; ``checkpoint(state)`` saves a
    stage state when ``checkpoint_due(next_step)``; ``resume``: such a state to continue from;
    ``modules`` and ``calibrate()`` (forward passes without gradients, e.g. a few training
    batches) give activation-aware masks their input norms before the first masks."""
    if stage.method == "prune":
        raise SparsemergeError("run_stage trains; a 'prune' stage runs sparsemerge.prune.prune_")
    controller = make_controller(stage, weights, modules)
    optimizer, scheduler = make_optimizer(stage, params)
    report = StageReport(stage.label, stage.method, str(stage.nm) if stage.method != "dense" else "dense", stage.steps)
    first = 0
    if resume is not None:
        first = int(resume["step"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        if controller is not None and resume.get("controller") is not None:
            controller.load_state_dict(resume["controller"])
        report = StageReport.from_json(resume["report"])
    if controller is not None and controller.activation_aware and not controller.has_input_norms():
        if calibrate is None:
            controller.remove_hooks()
            raise SparsemergeError(f"stage {stage.label!r}: activation-aware masks need a calibration pass (calibrate=...)")
        model.eval()
        with torch.no_grad():
            calibrate()
    nm = stage.nm if stage.nm_reg else None
    model.train()
    bar = tqdm(range(first, stage.steps), desc=f"train: {stage.label}", disable=not progress, initial=first, total=stage.steps)
    try:
        for step in bar:
            start = time.perf_counter()
            update = controller.before_forward(step) if controller is not None else None
            if update is not None:
                report.mask_updates.append(update.to_json())
            loss, tokens = loss_fn(step)
            if stage.l1:
                loss = loss + stage.l1 * l1_penalty(weights)
            if nm is not None:
                loss = loss + stage.nm_reg * nm_penalty(weights, nm)
            value = float(loss.item())
            if not math.isfinite(value):
                raise SparsemergeError(f"stage {stage.label!r}: the loss became {value} at step {step}; lower lr (now {stage.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if controller is not None:
                controller.after_backward()
            torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
            optimizer.step()
            scheduler.step()
            if controller is not None:
                controller.after_step()
            report.train_seconds += time.perf_counter() - start
            report.losses.append(value)
            report.tokens += tokens
            postfix = {"loss": f"{value:.3f}"}
            if update is not None and update.changed:
                postfix["flips"] = update.changed
            if eval_fn is not None and eval_every and (step + 1) % eval_every == 0 and step + 1 < stage.steps:
                report.evals.append((step + 1, _eval_masked(model, controller, eval_fn)))
                postfix["eval"] = f"{report.evals[-1][1]:.3g}"
            bar.set_postfix(postfix)
            if checkpoint is not None and checkpoint_due is not None and checkpoint_due(step + 1) and step + 1 < stage.steps:
                checkpoint({"step": step + 1, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                            "controller": controller.state_dict() if controller is not None else None,
                            "report": {**report.to_json(), "losses": report.losses}})
                model.train()
    finally:
        bar.close()
        if controller is not None:
            controller.remove_hooks()
    if controller is not None:
        final = controller.finalize_()
        if final is not None:
            report.mask_updates.append(final.to_json())
        report.violations = controller.violations()
        masks = [m for m in controller.masks.values() if m is not None]
        report.final_density = sum(int(m.sum()) for m in masks) / max(1, sum(m.numel() for m in masks))
    model.eval()
    if eval_fn is not None:
        report.evals.append((stage.steps, eval_fn()))
    return report, controller


def _eval_masked(model: nn.Module, controller: Optional[MaskController], eval_fn: Callable[[], float]) -> float:
    """``eval_fn()`` on the sparse model: SR-STE holds dense weights between steps, so its masks
    are applied for the evaluation and the dense weights put back after."""
    model.eval()
    saved = None
    if controller is not None:
        controller.recording = False  # held-out text must not steer activation-aware masks
    try:
        if controller is not None and controller.mode == "srste" and controller.masks:
            saved = {n: p.detach().clone() for n, p in controller.weights.items()}
            controller.apply_()
        with torch.no_grad():
            return float(eval_fn())
    finally:
        if saved is not None:
            with torch.no_grad():
                for n, p in controller.weights.items():
                    p.copy_(saved[n])
        if controller is not None:
            controller.recording = True
        model.train()
