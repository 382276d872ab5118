"""Knowledge-distillation loss (chapter 10.1.4 / 10.1.7: a dense teacher guides the sparse student).

``L_KD = T^2 * mean_tokens KL(softmax(z_t / T) || softmax(z_s / T))`` (Hinton, Vinyals and Dean,
2015, "Distilling the Knowledge in a Neural Network"): the teacher's distribution softened by
the temperature ``T`` is the target; ``T^2`` keeps the gradient scale independent of ``T``.
The chapter writes the term as ``L_KL(S || T)``; we use the usual forward direction (the
teacher's distribution first), which is what the cited recipe and llm-compressor/SparseML's
distillation modifiers minimise.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from sparsemerge.errors import SparsemergeError


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0,
            mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``T^2 * KL(p_teacher || p_student)`` per token, averaged over the tokens where ``mask``
    (same leading shape, bool) is true (all tokens when None). Logits ``(..., vocab)``."""
    if student_logits.shape != teacher_logits.shape:
        raise SparsemergeError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                               f"{tuple(teacher_logits.shape)} differ: the models must share a vocabulary")
    if temperature <= 0:
        raise SparsemergeError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    per_token = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # KL(p_t || p_s)
    if mask is not None:
        per_token = per_token[mask]
    return per_token.mean() * temperature**2
