"""Recovery fine-tuning by distillation: the KD loss, fixed masks, the loop and the CLI."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_TEXT, make_tiny_llama
from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import check_pattern
from sparsemerge.patterns import parse_pattern
from sparsemerge.prune.api import prune_
from sparsemerge.prune.config import PruneConfig
from sparsemerge.train.distill import kd_loss
from sparsemerge.train.masked import FixedMasks
from sparsemerge.train.recover import RecoverConfig, recover_

TEXTS = [TINY_TEXT[:600]]


def test_kd_loss_is_temperature_scaled_forward_kl():
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    T = 3.0
    expect = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1).mean() * T * T
    torch.testing.assert_close(kd_loss(s, t, T), expect)
    assert float(kd_loss(t, t, T)) == pytest.approx(0.0, abs=1e-6)
    mask = torch.tensor([[True, False, True, True, False], [False] * 5])
    per_token = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kd_loss(s, t, T, mask), per_token[mask].mean() * T * T)
    with pytest.raises(SparsemergeError, match="share a vocabulary"):
        kd_loss(s, t[..., :10])
    with pytest.raises(SparsemergeError, match="temperature"):
        kd_loss(s, t, 0.0)


def test_fixed_masks_keep_zeros_through_adamw_with_weight_decay():
    lin = torch.nn.Linear(16, 8)
    with torch.no_grad():
        lin.weight[:, ::2] = 0
    masks = FixedMasks(torch.nn.Sequential(lin)).attach()
    assert len(masks) == 1
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1, weight_decay=0.1)
    for _ in range(5):
        loss = lin(torch.randn(4, 16)).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        assert (lin.weight.grad[:, ::2] == 0).all()  # masked gradient
        opt.step()
        masks.apply_()
    assert masks.violations() == 0 and (lin.weight[:, 1::2] != 0).all()
    masks.detach()


def _kl_to_teacher(student, teacher, ids):
    with torch.no_grad():
        return float(kd_loss(student(ids).logits, teacher(ids).logits, 1.0))


def test_recover_pulls_the_pruned_student_towards_the_teacher(tiny_tokenizer):
    from sparsemerge.eval.data import tokenize_joined
    from sparsemerge.train.finetune import FinetuneConfig, finetune_

    teacher = make_tiny_llama()  # a teacher with something to teach: fitted to the text first
    finetune_(teacher, tiny_tokenizer, [TINY_TEXT], FinetuneConfig(steps=40, batch_size=4, seqlen=32, lr=3e-3, progress=False))
    student = copy.deepcopy(teacher)
    prune_(student, PruneConfig(pattern="2:4", progress=False))
    embed_before = student.model.embed_tokens.weight.clone()
    held_out = tokenize_joined(tiny_tokenizer, [TINY_TEXT])[-64:].reshape(2, 32)  # text the student does not train on
    kl_before = _kl_to_teacher(student, teacher, held_out)
    config = RecoverConfig(steps=30, batch_size=4, seqlen=32, lr=3e-3, warmup_steps=3, progress=False)
    report = recover_(student, teacher, tiny_tokenizer, TEXTS, config)
    assert len(report.losses) == 30 and report.tokens == 30 * 4 * 32 and report.masked_layers == 14
    assert sum(report.losses[-5:]) < 0.8 * sum(report.losses[:5])
    assert _kl_to_teacher(student, teacher, held_out) < 0.8 * kl_before
    assert report.mask_violations == 0
    pattern = parse_pattern("2:4")
    for layer in student.model.layers:
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            assert check_pattern(lin.weight, pattern).ok
    assert torch.equal(student.model.embed_tokens.weight, embed_before)  # frozen (and the tied head with it)
    assert not any(p.requires_grad for p in student.parameters())


def test_recover_refuses_a_dense_student_and_an_empty_objective(tiny_tokenizer):
    teacher = make_tiny_llama()
    with pytest.raises(SparsemergeError, match="prune it first"):
        recover_(copy.deepcopy(teacher), teacher, tiny_tokenizer, TEXTS, RecoverConfig(steps=1, seqlen=16, progress=False))
    with pytest.raises(SparsemergeError, match="nothing to minimise"):
        recover_(teacher, teacher, tiny_tokenizer, TEXTS, RecoverConfig(kd_weight=0, ce_weight=0, progress=False))


def test_cli_recover_writes_a_pruned_folder_and_reports_perplexity(tiny_llama_dir, tmp_path, capsys):
    from sparsemerge.cli.main import main

    text = tmp_path / "train.txt"
    text.write_text(TINY_TEXT)
    assert main(["prune", str(tiny_llama_dir), str(tmp_path / "pruned"), "--pattern", "2:4", "--no-progress"]) == 0
    args = ["recover", str(tmp_path / "pruned"), str(tmp_path / "rec"), "--text", str(text), "--eval", str(text),
            "--eval-windows", "1", "--steps", "4", "--batch-size", "2", "--seqlen", "32", "--no-progress"]
    assert main(args) == 0  # the teacher comes from the prune record
    out = capsys.readouterr().out
    assert "teacher (dense)" in out and "pruned, recovered" in out and "still zero: True" in out
    record = json.loads((tmp_path / "rec" / "sparsemerge_recover.json").read_text())
    assert record["steps"] == 4 and record["teacher"] == str(tiny_llama_dir) and "pruned, before" in record["perplexity"]
    assert main(["check", str(tmp_path / "rec"), "--pattern", "2:4", "--quiet"]) == 0
    assert main(args) == 2  # OUT exists: refused without --overwrite
    assert main(["recover", str(tiny_llama_dir), str(tmp_path / "x"), "--text", str(text), "--no-progress"]) == 2  # no record, no --teacher


def test_cli_recover_finds_the_recorded_teacher_from_anywhere_and_refuses_a_changed_one(tiny_llama_dir, tmp_path, monkeypatch, capsys):
    """The record keeps the source's absolute path and checksum: a relative name run from
    another directory still finds it, and a teacher whose weights changed is refused."""
    import shutil

    from sparsemerge.cli.main import main

    text = tmp_path / "train.txt"
    text.write_text(TINY_TEXT)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_llama_dir, work / "dense")
    monkeypatch.chdir(work)
    assert main(["prune", "dense", str(tmp_path / "pruned"), "--pattern", "2:4", "--no-progress"]) == 0
    other = tmp_path / "elsewhere"
    other.mkdir()
    make_tiny_llama(seed=7).save_pretrained(other / "dense")  # a different model under the same relative name
    monkeypatch.chdir(other)
    args = ["recover", str(tmp_path / "pruned"), str(tmp_path / "rec"), "--text", str(text), "--eval", "none",
            "--steps", "1", "--batch-size", "1", "--seqlen", "16", "--no-progress"]
    assert main(args) == 0
    record = json.loads((tmp_path / "rec" / "sparsemerge_recover.json").read_text())
    assert record["teacher"] == str((work / "dense").resolve())
    # the recorded teacher's weights change: refused, with what to do
    make_tiny_llama(seed=8).save_pretrained(work / "dense")
    capsys.readouterr()
    assert main(args + ["--overwrite"]) == 2
    assert "no longer has the recorded weights" in capsys.readouterr().err
