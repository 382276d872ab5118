"""The one training loop behind fine-tuning (:mod:`sparsemerge.train.finetune`) and recovery
by distillation (:mod:`sparsemerge.train.recover`); they differ only in the loss and in what
happens after each optimizer step (recovery re-applies the pruning masks).

Per step ``s`` (``0 <= s < steps``):

1. draw ``batch_size`` random windows of ``seqlen`` tokens from the joined training text
   (one seeded generator, the protocol of :mod:`sparsemerge.eval.data`'s calibration windows);
2. ``L = loss_fn(batch)``; stop with a clear error when ``L`` is not finite;
3. back-propagate, clip the gradient norm at ``grad_clip``, AdamW step with learning rate
   ``lr * f(s)``: ``f`` rises linearly to 1 over ``warmup_steps``, then falls linearly to 0.1
   at the last step (:func:`lr_factor`);
4. ``after_step()`` (e.g. re-apply fixed masks).

The model is in training mode during the loop; afterwards it is in eval mode with every
parameter frozen (``requires_grad=False``), also when the loop fails.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsemerge.errors import SparsemergeError


class LoopConfig(Protocol):
    """The options the loop reads; :class:`~sparsemerge.train.finetune.FinetuneConfig` and
    :class:`~sparsemerge.train.recover.RecoverConfig` both have them."""

    steps: int
    batch_size: int
    seqlen: int
    lr: float
    weight_decay: float
    warmup_steps: int
    grad_clip: float
    seed: int
    progress: bool


@dataclass
class LoopResult:
    losses: list[float] = field(default_factory=list)  # one per step, before that step's update
    tokens: int = 0
    seconds: float = 0.0


def training_tokens(tokenizer: Any, texts: list[str], seqlen: int) -> torch.Tensor:
    """The texts joined and tokenized once (1-D ids); at least ``seqlen + 1`` tokens."""
    from sparsemerge.eval.data import tokenize_joined

    ids = tokenize_joined(tokenizer, texts)
    if ids.numel() <= seqlen:
        raise SparsemergeError(f"the training text has {ids.numel()} tokens; need more than seqlen={seqlen}")
    return ids


def dense_parameters(model: nn.Module, train_embeddings: bool = False) -> list[nn.Parameter]:
    """Every parameter of ``model`` in order, without the token embedding's (and a head tied to
    it) unless ``train_embeddings``: the embedding holds a large share of a small LM's weights,
    so freezing it keeps optimizer state and task vectors small."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    return [p for p in model.parameters() if train_embeddings or id(p) not in embeddings]


def set_trainable_(model: nn.Module, params: list[nn.Parameter]) -> list[nn.Parameter]:
    """Freeze every parameter of ``model`` except ``params``; return ``params``."""
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def lr_factor(step: int, config: LoopConfig) -> float:
    """Linear warm-up to 1, then linear decay to 0.1 at the last step."""
    if config.warmup_steps and step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    return 1.0 - 0.9 * (step - config.warmup_steps) / span


def train_loop(
    model: nn.Module,
    params: list[nn.Parameter],
    ids: torch.Tensor,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    config: LoopConfig,
    desc: str,
    after_step: Optional[Callable[[], None]] = None,
) -> LoopResult:
    """Train ``params`` of ``model`` on windows of ``ids`` minimising ``loss_fn(batch)``
    (``batch``: ``[batch_size, seqlen]`` token ids); see the module docstring."""
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    generator = torch.Generator().manual_seed(config.seed)
    result = LoopResult()
    model.train()
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc=desc, disable=not config.progress)
    try:
        for step in bar:
            starts = torch.randint(0, ids.numel() - config.seqlen, (config.batch_size,), generator=generator)
            batch = torch.stack([ids[s : s + config.seqlen] for s in starts.tolist()])
            loss = loss_fn(batch)
            value = loss.item()
            if not math.isfinite(value):
                raise SparsemergeError(f"the loss became {value} at step {step}; lower lr (now {config.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            if after_step is not None:
                after_step()
            result.losses.append(value)
            result.tokens += batch.numel()
            bar.set_postfix(loss=f"{value:.3f}")
    finally:
        bar.close()
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
    result.seconds = time.perf_counter() - start
    return result
