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


def test_loop_schedule_finite_check_and_cleanup():
    from types import SimpleNamespace

    from sparsemerge.errors import SparsemergeError
    from sparsemerge.train.loop import lr_factor, train_loop

    cfg = SimpleNamespace(steps=6, batch_size=2, seqlen=3, lr=0.1, weight_decay=0.0, warmup_steps=2,
                          grad_clip=1.0, seed=0, progress=False)
    # warm-up (s+1)/2, then 1 - 0.9 (s-2)/4: hand-computed
    assert [lr_factor(s, cfg) for s in range(6)] == pytest.approx([0.5, 1.0, 1.0, 0.775, 0.55, 0.325])

    model = torch.nn.Linear(3, 1, bias=False)
    ids = torch.arange(20, dtype=torch.float32)
    seen, calls = [], []

    def loss_fn(batch):
        seen.append(batch.clone())
        return model(batch).pow(2).mean()

    result = train_loop(model, list(model.parameters()), ids, loss_fn, cfg, "t", after_step=lambda: calls.append(1))
    assert len(result.losses) == 6 and result.tokens == 6 * 2 * 3 and len(calls) == 6
    assert all(b.shape == (2, 3) and torch.equal(b[:, 1:] - b[:, :-1], torch.ones(2, 2)) for b in seen)  # windows of ids
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    model.weight.requires_grad_(True)
    steps = iter(range(10))
    with pytest.raises(SparsemergeError, match="became nan at step 2"):
        train_loop(model, list(model.parameters()), ids,
                   lambda b: model(b).sum() * (float("nan") if next(steps) == 2 else 1.0), cfg, "t")
    assert not model.training and not model.weight.requires_grad  # frozen also after a failure
