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
The loop (:mod:`sparsemerge.train.loop`, shared with fine-tuning): AdamW with linear warm-up
and decay to 10% of ``lr``, gradient clipping; the token embedding
(and a head tied to it) is frozen unless ``train_embeddings``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sparsemerge.errors import SparsemergeError
from sparsemerge.train.distill import kd_loss
from sparsemerge.train.loop import dense_parameters, set_trainable_, train_loop, training_tokens
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
    ids = training_tokens(tokenizer, texts, config.seqlen)
    params = set_trainable_(student, dense_parameters(student, config.train_embeddings))
    masks = FixedMasks(student)
    if not len(masks):
        raise SparsemergeError("the student has no pruned Linear layers (no zeros): prune it first")
    for p in teacher.parameters():
        p.requires_grad_(False)
    teacher.eval()

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:  # kd_weight * T^2 KL(teacher || student) + ce_weight * CE
        with torch.no_grad():
            teacher_logits = teacher(input_ids=batch, use_cache=False).logits
        out = student(input_ids=batch, labels=batch if config.ce_weight else None, use_cache=False)
        loss = config.kd_weight * kd_loss(out.logits, teacher_logits, config.temperature)
        if config.ce_weight:
            loss = loss + config.ce_weight * out.loss
        return loss

    masks.attach()
    try:
        result = train_loop(student, params, ids, loss_fn, config, "recover (distillation)", after_step=masks.apply_)
    finally:
        masks.detach()
    return RecoverReport(config.steps, result.tokens, sum(p.numel() for p in params), len(masks), result.seconds,
                         result.losses, mask_violations=masks.violations())
