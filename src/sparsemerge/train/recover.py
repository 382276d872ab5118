"""Recovery fine-tuning of a pruned model by distillation from its dense original
(chapter 10.1.4 and 10.1.7, stage 3 "蒸馏恢复": the original dense model is the teacher).

Each step draws ``batch_size`` random windows of ``seqlen`` tokens from the training text
(seeded, as :mod:`sparsemerge.train.finetune` does), runs the frozen teacher without
gradients and the student with them, and minimises

``L = kd_weight * T^2 KL(p_teacher^T || p_student^T) + ce_weight * CE(student, next token)``

(:func:`sparsemerge.train.distill.kd_loss`; the chapter's ``L_task + lambda L_KD``). The default
is pure distillation (``ce_weight = 0``): the student is pulled back towards the dense model
rather than adapted to the training text, so "recovered" means closer to the teacher, not
fitted to the domain. The pruned positions stay zero (:class:`FixedMasks`: masked gradients,
masks re-applied after every step), so the output keeps its N:M pattern and can be packed.
AdamW with linear warm-up and decay to 10% of ``lr``, gradient clipping; the token embedding
(and a head tied to it) is frozen unless ``train_embeddings``.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from tqdm.auto import tqdm

from sparsemerge.errors import SparsemergeError
from sparsemerge.train.distill import kd_loss
from sparsemerge.train.finetune import _lr_factor, _windows
from sparsemerge.train.masked import FixedMasks

RECOVER_RECORD = "sparsemerge_recover.json"


class RecoverConfig(BaseModel):
    """Options of :func:`recover_` (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid")

    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    seqlen: int = Field(256, ge=2)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    temperature: float = Field(2.0, gt=0)
    kd_weight: float = Field(1.0, ge=0)
    ce_weight: float = Field(0.0, ge=0)
    seed: int = 0
    train_embeddings: bool = False
    progress: bool = True


@dataclass
class RecoverReport:
    steps: int
    tokens: int
    trainable_params: int
    masked_layers: int
    seconds: float
    losses: list[float] = field(default_factory=list)
    mask_violations: int = 0

    def to_json(self) -> dict[str, Any]:
        tenth = max(1, len(self.losses) // 10)
        first, last = self.losses[:tenth], self.losses[-tenth:]
        return {
            "steps": self.steps,
            "tokens": self.tokens,
            "trainable_params": self.trainable_params,
            "masked_layers": self.masked_layers,
            "seconds": round(self.seconds, 2),
            "loss_first": sum(first) / len(first) if first else None,
            "loss_last": sum(last) / len(last) if last else None,
            "mask_violations": self.mask_violations,
        }


def _trainable(model: nn.Module, train_embeddings: bool) -> list[nn.Parameter]:
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    params = [p for p in model.parameters() if train_embeddings or id(p) not in embeddings]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    return params


def recover_(student: nn.Module, teacher: nn.Module, tokenizer: Any, texts: list[str],
             config: "RecoverConfig | None" = None) -> RecoverReport:
    """Distil ``teacher`` into the pruned ``student`` in place, keeping its zeros."""
    config = config or RecoverConfig()
    if config.kd_weight == 0 and config.ce_weight == 0:
        raise SparsemergeError("kd_weight and ce_weight are both 0: nothing to minimise")
    s_vocab, t_vocab = student.get_output_embeddings(), teacher.get_output_embeddings()
    if s_vocab is not None and t_vocab is not None and s_vocab.weight.shape[0] != t_vocab.weight.shape[0]:
        raise SparsemergeError(f"student and teacher vocabularies differ ({s_vocab.weight.shape[0]} vs "
                               f"{t_vocab.weight.shape[0]} tokens): distillation needs the same tokenizer")
    ids = _windows(tokenizer, texts, config.seqlen)
    params = _trainable(student, config.train_embeddings)
    masks = FixedMasks(student)
    if not len(masks):
        raise SparsemergeError("the student has no pruned Linear layers (no zeros): prune it first")
    masks.attach()
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, config))
    generator = torch.Generator().manual_seed(config.seed)
    report = RecoverReport(config.steps, 0, sum(p.numel() for p in params), len(masks), 0.0)
    student.train()
    start = time.perf_counter()
    bar = tqdm(range(config.steps), desc="recover (distillation)", disable=not config.progress)
    try:
        for step in bar:
            starts = torch.randint(0, ids.numel() - config.seqlen, (config.batch_size,), generator=generator)
            batch = torch.stack([ids[s : s + config.seqlen] for s in starts.tolist()])
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch, use_cache=False).logits
            out = student(input_ids=batch, labels=batch if config.ce_weight else None, use_cache=False)
            loss = config.kd_weight * kd_loss(out.logits, teacher_logits, config.temperature)
            if config.ce_weight:
                loss = loss + config.ce_weight * out.loss
            value = loss.item()
            if not math.isfinite(value):
                raise SparsemergeError(f"the loss became {value} at step {step}; lower lr (now {config.lr})")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            scheduler.step()
            masks.apply_()
            report.losses.append(value)
            report.tokens += batch.numel()
            bar.set_postfix(loss=f"{value:.3f}")
    finally:
        bar.close()
        masks.detach()
        student.eval()
        for p in student.parameters():
            p.requires_grad_(False)
    report.mask_violations = masks.violations()
    report.seconds = time.perf_counter() - start
    return report
