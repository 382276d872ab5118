"""Shared fixtures: tiny random models built in the test (no downloads)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

TINY_TEXT = (
    "The government said on Monday that the economy grew faster than expected. "
    "Shares in the company rose after the results were published. "
    "The team won the match in the final minutes. A new phone was launched by the firm. "
    "The film won three awards at the ceremony. Ministers will discuss the plan next week. "
) * 20


def make_tokenizer(vocab_size: int = 256):
    """A byte-level BPE tokenizer trained on a fixed text (deterministic, offline)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TINY_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def make_tiny_llama(seed: int = 0, vocab_size: int = 384, hidden: int = 64, intermediate: int = 128, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return make_tokenizer(384)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_llama_dir(tmp_path: Path, tiny_tokenizer) -> Path:
    """A Hugging Face folder (config, safetensors, tokenizer) of a tiny random Llama."""
    model = make_tiny_llama()
    out = tmp_path / "tiny-llama"
    model.save_pretrained(out)
    tiny_tokenizer.save_pretrained(out)
    return out


@pytest.fixture
def two_tiny_llama_dirs(tmp_path: Path, tiny_tokenizer) -> list[Path]:
    """Two Hugging Face folders of tiny random Llamas of the same shape (seeds 0 and 1)."""
    dirs = []
    for seed in (0, 1):
        folder = tmp_path / f"m{seed}"
        make_tiny_llama(seed=seed).save_pretrained(folder)
        tiny_tokenizer.save_pretrained(folder)
        dirs.append(folder)
    return dirs


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(TINY_TEXT)
    return path
