"""Masks that change during training: the controller behind gradual / progressive N:M,
SR-STE and dynamic reallocation (chapter 10.1.4, 10.1.7, 10.2.6).

:class:`MaskController` owns one boolean mask per trainable weight (``nn.Linear`` and
``nn.Conv2d``; N:M groups run along the input dimension - for a convolution along the input
channels at each kernel position, as NVIDIA ASP and the sparse tensor cores group them, so a
conv weight ``(out, in, kh, kw)`` is viewed as ``(out, kh*kw*in)``). The training loop calls it
around every step:

* ``before_forward(t)``: every ``update_every`` steps (and whenever the schedule's target
  changes) recompute the masks for ``schedule.target(t)``; SR-STE swaps the masked weights in;
* ``after_backward()``: hard-mask methods zero the gradient of pruned weights (after recording
  ``|grad|`` for dynamic reallocation); SR-STE puts the dense weights back and adds its decay;
* ``after_step()``: hard-mask methods zero the pruned weights again.

Modes:

* ``hard`` (one-shot + fine-tune, gradual, progressive, dynamic, fixed): the model holds
  ``W . M``; ``W <- W - eta (grad W) . M`` (chapter 10.1.4).
* ``srste`` (Zhou et al., 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From
  Scratch"): the dense ``W`` is what the optimizer updates; the forward and backward pass run with
  ``W~ = W . M`` (weights swapped in, so the gradient is evaluated at the sparse weights, the
  straight-through estimator ``dL/dW := dL/dW~``) and the sparse-refined term is added to the
  gradient: ``g <- g(W~) + lambda_W (1 - M) . W`` (the paper's eq. 6), which pulls the pruned weights
  towards zero so the masks settle.

Scores for a mask: ``|W|`` (magnitude; SR-STE reads the dense weights), or for dynamic
reallocation the chapter's ``M^(t+1) = TopK(|W^(t)| + gamma |grad W^(t)|)`` with ``|grad W|`` the
mean absolute dense gradient since the last update, scaled by ``c = mean|W| / mean|grad W|`` per
layer (as :mod:`sparsemerge.prune.gradient` does) so ``gamma`` means the same in every layer.
Pruned weights that come back start from zero (RigL's rule: Evci et al., 2020).
With ``activation_aware`` (Linear layers only) the magnitude is weighted by the input norm,
``|W_ij| * ||X_j||_2`` (Wanda's score: Sun et al., 2023), ``||X_j||`` accumulated by forward hooks
over every training batch of the stage (and a calibration pass before the first masks): in a
language model a few input features carry large activations, and plain magnitude masks remove
the weights that read them (one-shot magnitude 2:4 multiplies SmolLM2's perplexity by ~90,
Wanda's score by ~9).

A mask for ``fraction`` of a pattern (:func:`scheduled_mask`): of the weights the exact N:M
mask removes, remove the ``fraction`` with the lowest scores; ``fraction = 1`` is the exact mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import torch
from torch import nn

from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import nm_mask
from sparsemerge.patterns import NM
from sparsemerge.train.schedules import Schedule, Target

Mode = Literal["hard", "srste"]
Score = Literal["magnitude", "gradient"]


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """The 2-D view whose rows hold N:M groups: Linear ``(out, in)`` as is, Conv ``(out, in, *k)``
    as ``(out, prod(k) * in)`` with the input channel fastest (a copy for convolutions)."""
    if weight.dim() == 2:
        return weight
    if weight.dim() >= 3:
        return weight.movedim(1, -1).reshape(weight.shape[0], -1)
    raise SparsemergeError(f"cannot mask a weight of shape {tuple(weight.shape)}: need a Linear or Conv weight")


def from_matrix(matrix: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`as_matrix` for a tensor of the original ``shape``."""
    if len(shape) == 2:
        return matrix
    moved = (shape[0], *shape[2:], shape[1])
    return matrix.reshape(moved).movedim(-1, 1).contiguous()


def group_dim(weight: torch.Tensor) -> int:
    """Length of the grouped dimension: ``in`` for Linear, ``in`` for Conv (groups stay inside one kernel position)."""
    return weight.shape[1]


def scheduled_mask(scores: torch.Tensor, target: Target) -> torch.Tensor:
    """Keep-mask of a 2-D ``scores`` for ``target``: dense, exactly ``target.pattern``, or
    ``target.fraction`` of the way (the lowest-scored of the pattern's removals removed first)."""
    if target.dense:
        return torch.ones_like(scores, dtype=torch.bool)
    exact = nm_mask(scores, target.pattern.n, target.pattern.m)
    if target.fraction >= 1.0:
        return exact
    candidates = (~exact).flatten().nonzero().squeeze(1)
    k = int(round(target.fraction * candidates.numel()))
    keep = torch.ones(scores.numel(), dtype=torch.bool)
    if k:
        order = torch.sort(scores.flatten()[candidates].float(), stable=True).indices
        keep[candidates[order[:k]]] = False
    return keep.reshape(scores.shape)


def trainable_weights(model: nn.Module, include_conv: bool = True, exclude: "list[str] | None" = None,
                      pattern: "NM | None" = None) -> dict[str, nn.Parameter]:
    """``{module name: weight}`` of the Linear (and Conv) layers a sparse trainer masks: those with
    a grouped dimension divisible by ``pattern.m`` (others - a first conv on 1 channel, a head
    whose input is not divisible - stay dense), minus the names matching ``exclude`` regexes,
    minus the output embedding / LM head and any weight shared with an ``nn.Embedding``."""
    from sparsemerge.selection import LayerFilter

    kept = LayerFilter(None, exclude)
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        kinds = (nn.Linear, nn.Conv1d, nn.Conv2d) if include_conv else (nn.Linear,)
        if not isinstance(module, kinds) or not kept(name) or module is head or id(module.weight) in embedding_ids:
            continue
        if pattern is not None and group_dim(module.weight) % pattern.m:
            continue
        if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
            continue
        out[name] = module.weight
    if not out:
        raise SparsemergeError("no Linear/Conv layer to sparsify: check exclude and that input sizes are divisible by M")
    return out


@dataclass
class MaskUpdate:
    """One recomputation of the masks: how many entries flipped (kept <-> pruned)."""

    step: int
    target: str
    changed: int
    total: int
    density: float

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "target": self.target, "changed": self.changed, "total": self.total,
                "density": round(self.density, 6)}


@dataclass
class MaskController:
    """See the module docstring. ``weights``: ``{name: parameter}`` (:func:`trainable_weights`);
    ``update_every = 0``: compute the masks once, at the first step, and keep them;
    ``initial_masks``: start from these (e.g. a pruned model's zeros) instead of computing them."""

    weights: dict[str, nn.Parameter]
    schedule: Schedule
    mode: Mode = "hard"
    update_every: int = 1
    score: Score = "magnitude"
    gamma: float = 0.1
    srste_decay: float = 2e-4
    activation_aware: bool = False
    modules: Optional[dict[str, nn.Module]] = None  # for activation_aware: the Linear owning each weight
    initial_masks: Optional[dict[str, torch.Tensor]] = None
    masks: dict[str, Optional[torch.Tensor]] = field(default_factory=dict)
    history: list[MaskUpdate] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in ("hard", "srste"):
            raise SparsemergeError(f"mask mode must be 'hard' or 'srste', got {self.mode!r}")
        if self.update_every < 0:
            raise SparsemergeError(f"update_every must be >= 0, got {self.update_every}")
        self._grad_sum: dict[str, torch.Tensor] = {}
        self._grad_count = 0
        self._dense: dict[str, torch.Tensor] = {}
        self._last_target: Optional[Target] = None
        self._input_sq: dict[str, torch.Tensor] = {}  # sum over tokens of x_j^2 per input feature
        self._input_rows: dict[str, int] = {}
        self._hooks: list = []
        self.recording = True  # input norms are accumulated while True
        if self.activation_aware:
            if self.modules is None or set(self.modules) != set(self.weights):
                raise SparsemergeError("activation-aware masks need the module of every masked weight")
            for name, module in self.modules.items():
                if not isinstance(module, nn.Linear):
                    raise SparsemergeError(f"activation-aware masks support Linear layers only, not {name} ({type(module).__name__})")
                self._hooks.append(module.register_forward_hook(self._record_input(name)))
        if self.initial_masks is not None:
            missing = set(self.weights) - set(self.initial_masks)
            if missing:
                raise SparsemergeError(f"initial masks missing for {sorted(missing)[:3]}")
            self.masks = {n: self.initial_masks[n].to(torch.bool).clone() for n in self.weights}

    # ------------------------------------------------------------------ masks
    def _record_input(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if not self.recording:
                return
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            acc = self._input_sq.get(name)
            self._input_sq[name] = x.pow(2).sum(0) if acc is None else acc.add_(x.pow(2).sum(0))
            self._input_rows[name] = self._input_rows.get(name, 0) + x.shape[0]

        return hook

    def has_input_norms(self) -> bool:
        return bool(self._input_sq)

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def _scores(self, name: str, param: torch.Tensor) -> torch.Tensor:
        w = as_matrix(param.detach()).abs().float()
        if self.activation_aware and name in self._input_sq:  # |W_ij| * ||X_j|| (mean over tokens)
            w = w * (self._input_sq[name] / max(1, self._input_rows[name])).sqrt().unsqueeze(0)
        if self.score == "gradient" and name in self._grad_sum and self._grad_count:
            g = as_matrix(self._grad_sum[name] / self._grad_count)
            c = w.mean() / g.mean().clamp_min(1e-30)
            return w + self.gamma * c * g
        return w

    @torch.no_grad()
    def update_masks(self, step: int) -> MaskUpdate:
        """Recompute every mask for ``schedule.target(step)`` and record how many entries flipped."""
        return self._set_masks(self.schedule.target(step), step)

    def _set_masks(self, target: Target, step: int) -> MaskUpdate:
        changed = total = kept = 0
        for name, param in self.weights.items():
            new = from_matrix(scheduled_mask(self._scores(name, param), target), param.shape)
            old = self.masks.get(name)
            changed += int((new != old).sum()) if old is not None else 0
            total += new.numel()
            kept += int(new.sum())
            if self.mode == "hard" and old is not None:  # weights that come back start at zero (RigL)
                param.masked_fill_(new & ~old, 0.0)
            self.masks[name] = new
        self._grad_sum.clear()
        self._grad_count = 0
        self._last_target = target
        update = MaskUpdate(step, str(target), changed, total, kept / max(total, 1))
        self.history.append(update)
        if self.mode == "hard":
            self.apply_()
        return update

    def _due(self, step: int) -> bool:
        if not self.masks:
            return True
        if self.update_every == 0:
            return False
        if step % self.update_every == 0:
            return True
        # a progressive schedule's pattern change forces an update between intervals
        return self._last_target is None or self.schedule.target(step).pattern != self._last_target.pattern

    # ------------------------------------------------------------------ hooks of the loop
    @torch.no_grad()
    def before_forward(self, step: int) -> Optional[MaskUpdate]:
        update = self.update_masks(step) if self._due(step) else None
        if self.mode == "srste":
            self._dense = {}
            for name, param in self.weights.items():
                self._dense[name] = param.detach().clone()
                param.mul_(self.masks[name])
        return update

    @torch.no_grad()
    def after_backward(self) -> None:
        if self.mode == "srste":
            for name, param in self.weights.items():
                param.copy_(self._dense[name])  # the optimizer updates the dense weights
                if param.grad is not None and self.srste_decay:
                    param.grad.add_(param * ~self.masks[name], alpha=self.srste_decay)
            self._dense = {}
            return
        record = self.score == "gradient"
        for name, param in self.weights.items():
            if param.grad is None:
                continue
            if record:
                acc = self._grad_sum.get(name)
                self._grad_sum[name] = param.grad.abs().float() if acc is None else acc.add_(param.grad.abs())
            param.grad.mul_(self.masks[name])
        if record:
            self._grad_count += 1

    @torch.no_grad()
    def after_step(self) -> None:
        if self.mode == "hard":
            self.apply_()

    @torch.no_grad()
    def apply_(self) -> None:
        """Zero the pruned positions of every weight."""
        for name, param in self.weights.items():
            mask = self.masks.get(name)
            if mask is not None:
                param.mul_(mask)

    @torch.no_grad()
    def finalize_(self) -> Optional[MaskUpdate]:
        """Leave the model exactly on the schedule's final pattern: recompute the masks for it when
        they are not there already (always for SR-STE, which re-reads its dense weights) and zero
        the rest. Fixed masks (``update_every = 0`` with ``initial_masks``) stay as they are."""
        final = self.schedule.final()
        update = None
        fixed = self.initial_masks is not None and self.update_every == 0
        if not fixed and (self.mode == "srste" or self._last_target != final):
            update = self._set_masks(final, step=-1)
        self.apply_()
        return update

    def violations(self) -> int:
        """Pruned positions that hold a non-zero weight now (0 for a hard-masked model)."""
        return sum(int(((p.detach() != 0) & ~self.masks[n]).sum()) for n, p in self.weights.items() if self.masks.get(n) is not None)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        return {
            "masks": {n: m.clone() for n, m in self.masks.items() if m is not None},
            "grad_sum": {n: g.clone() for n, g in self._grad_sum.items()},
            "grad_count": self._grad_count,
            "input_sq": {n: t.clone() for n, t in self._input_sq.items()},
            "input_rows": dict(self._input_rows),
            "last_target": None if self._last_target is None else (
                None if self._last_target.pattern is None else str(self._last_target.pattern), self._last_target.fraction),
            "history": [u.to_json() for u in self.history],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.masks = {n: m.clone() for n, m in state["masks"].items()}
        self._grad_sum = {n: g.clone() for n, g in state["grad_sum"].items()}
        self._grad_count = int(state["grad_count"])
        self._input_sq = {n: t.clone() for n, t in state.get("input_sq", {}).items()}
        self._input_rows = dict(state.get("input_rows", {}))
        last = state["last_target"]
        if last is None:
            self._last_target = None
        else:
            from sparsemerge.train.schedules import as_nm

            self._last_target = Target(None if last[0] is None else as_nm(last[0]), float(last[1]))
        self.history = [MaskUpdate(h["step"], h["target"], h["changed"], h["total"], h["density"]) for h in state["history"]]


def masks_of_zeros(weights: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """``1[W != 0]`` of each weight: a pruned model's masks (the ``fixed`` method)."""
    return {n: p.detach() != 0 for n, p in weights.items()}

