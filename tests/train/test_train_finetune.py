"""The fine-tuning recipe on a tiny random Llama: loss goes down, PEFT-format LoRA adapters."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_TEXT, make_tiny_llama
from sparsemerge.errors import SparsemergeError
from sparsemerge.io import load_model, save_model
from sparsemerge.merge.lora import LoraAdapter
from sparsemerge.train.finetune import (
    FinetuneConfig,
    LoRALinear,
    finetune_,
    lora_modules,
    merge_lora_,
    save_lora_adapter,
)

TEXTS = [TINY_TEXT[:600]]  # one short text, repeated windows of it


def _mean(xs):
    return sum(xs) / len(xs)


def test_full_finetune_lowers_loss_and_keeps_embeddings(tiny_tokenizer, tmp_path):
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = FinetuneConfig(steps=30, batch_size=4, seqlen=32, lr=3e-3, warmup_steps=3, progress=False)
    report = finetune_(model, tiny_tokenizer, TEXTS, config)
    assert len(report.losses) == 30 and report.tokens == 30 * 4 * 32
    assert _mean(report.losses[-5:]) < 0.88 * _mean(report.losses[:5])
    after = model.state_dict()
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])  # frozen by default
    assert not torch.equal(after["model.layers.0.mlp.down_proj.weight"], before["model.layers.0.mlp.down_proj.weight"])
    assert not any(p.requires_grad for p in model.parameters())
    out = save_model(model, tiny_tokenizer, tmp_path / "ft", records={"sparsemerge_finetune.json": report.to_json()})
    reloaded = load_model(out).model.state_dict()
    assert torch.equal(reloaded["model.layers.1.self_attn.q_proj.weight"], after["model.layers.1.self_attn.q_proj.weight"])


def test_lora_finetune_writes_peft_adapter_read_back_as_task_vector(tiny_tokenizer, tmp_path):
    model = make_tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    config = FinetuneConfig(mode="lora", steps=30, batch_size=4, seqlen=32, lr=1e-2, warmup_steps=3, lora_r=4, lora_alpha=8, progress=False)
    report = finetune_(model, tiny_tokenizer, TEXTS, config)
    assert _mean(report.losses[-5:]) < 0.95 * _mean(report.losses[:5])  # tiny random model: ~6.0 -> ~5.4
    modules = lora_modules(model)
    assert len(modules) == 2 * 7  # 2 layers x q k v o gate up down
    for name, module in modules.items():  # base weights untouched
        assert torch.equal(module.base.weight, before[name + ".weight"])
    assert report.trainable_params == sum(m.lora_A.numel() + m.lora_B.numel() for m in modules.values())

    out = save_lora_adapter(model, tmp_path / "adapter", config, base_model_name="tiny")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["task_type"] == "CAUSAL_LM"
    assert sorted(cfg["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    state = load_file(str(out / "adapter_model.safetensors"))
    q = "model.layers.0.self_attn.q_proj"
    assert state[f"base_model.model.{q}.lora_A.weight"].shape == (4, 64)
    assert state[f"base_model.model.{q}.lora_B.weight"].shape == (64, 4)
    assert all(k.startswith("base_model.model.model.layers.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)

    adapter = LoraAdapter(out)  # the merge engine's reader: tau = B A * alpha / r
    for name, module in modules.items():
        expected = module.lora_B.detach() @ module.lora_A.detach() * (8 / 4)
        assert expected.abs().max() > 0  # B trained away from its zero init
        torch.testing.assert_close(adapter.delta(name + ".weight"), expected)

    x = torch.randint(0, 384, (2, 16))
    with torch.no_grad():
        wrapped_logits = model(input_ids=x).logits
    assert merge_lora_(model) == 14
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, wrapped_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        model.state_dict()[f"{q}.weight"], before[f"{q}.weight"] + adapter.delta(f"{q}.weight")
    )


def test_bad_options_are_rejected(tiny_tokenizer, tmp_path):
    with pytest.raises(ValueError):
        FinetuneConfig(steps=10, learning_rate=1e-3)  # unknown key
    with pytest.raises(SparsemergeError, match="no linear layer matches"):
        finetune_(make_tiny_llama(), tiny_tokenizer, TEXTS, FinetuneConfig(mode="lora", steps=1, seqlen=16, lora_targets=["c_attn"], progress=False))
    with pytest.raises(SparsemergeError, match="need more than seqlen"):
        finetune_(make_tiny_llama(), tiny_tokenizer, ["short text"], FinetuneConfig(steps=1, seqlen=128, progress=False))
    with pytest.raises(SparsemergeError, match="no LoRA adapters"):
        save_lora_adapter(make_tiny_llama(), tmp_path / "a", FinetuneConfig())
    (tmp_path / "exists").mkdir()
    model = make_tiny_llama()
    cfg = FinetuneConfig(mode="lora", steps=1, seqlen=16, progress=False)
    finetune_(model, tiny_tokenizer, TEXTS, cfg)
    with pytest.raises(SparsemergeError, match="already exists"):
        save_lora_adapter(model, tmp_path / "exists", cfg)
