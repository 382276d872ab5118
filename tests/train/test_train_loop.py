"""The training loop shared by fine-tuning and recovery: losses pinned to the values the two
separate loops gave before they were merged into :mod:`sparsemerge.train.loop` (same seed,
same windows, schedule, clipping), plus the loop's own contract."""
from __future__ import annotations

import copy

import pytest
import torch

from conftest import TINY_TEXT, make_tiny_llama
from sparsemerge.train.finetune import FinetuneConfig, finetune_
from sparsemerge.train.recover import RecoverConfig, recover_

TEXTS = [TINY_TEXT[:600]]

# Computed with the pre-refactor finetune_/recover_ (commit 1fdb2d4), 1 and 2 threads alike.
FULL = [5.983314514160156, 5.98277473449707, 5.795643329620361, 5.72309684753418]
LORA = [6.026914596557617, 5.933279037475586, 6.006330966949463, 5.8053460121154785]
RECOVER = [2.9991867542266846, 2.977648973464966, 2.983630657196045, 2.9274330139160156]


def test_finetune_losses_are_pinned(tiny_tokenizer):
    full = finetune_(make_tiny_llama(), tiny_tokenizer, TEXTS, FinetuneConfig(
        steps=4, batch_size=2, seqlen=16, lr=3e-3, warmup_steps=2, seed=3, progress=False))
    assert full.losses == pytest.approx(FULL, rel=1e-5)
    lora = finetune_(make_tiny_llama(), tiny_tokenizer, TEXTS, FinetuneConfig(
        mode="lora", steps=4, batch_size=2, seqlen=16, lr=1e-2, warmup_steps=2, lora_r=4, seed=5, progress=False))
    assert lora.losses == pytest.approx(LORA, rel=1e-5)
    assert full.tokens == lora.tokens == 4 * 2 * 16


def test_recover_losses_are_pinned(tiny_tokenizer):
    from sparsemerge.prune.api import prune_
    from sparsemerge.prune.config import PruneConfig

    teacher = make_tiny_llama()
    student = copy.deepcopy(teacher)
    prune_(student, PruneConfig(pattern="2:4", progress=False))
    report = recover_(student, teacher, tiny_tokenizer, TEXTS, RecoverConfig(
        steps=4, batch_size=2, seqlen=16, lr=3e-3, warmup_steps=2, ce_weight=0.5, seed=7, progress=False))
    assert report.losses == pytest.approx(RECOVER, rel=1e-5)
    assert report.tokens == 4 * 2 * 16 and report.mask_violations == 0
