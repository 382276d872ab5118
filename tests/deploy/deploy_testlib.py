"""Tiny random Llama bases and fine-tunes for the task-store tests (built in the test)."""
from __future__ import annotations

from pathlib import Path

import torch

from conftest import make_tiny_llama


def pruned_llama(seed: int = 0, hidden: int = 64, intermediate: int = 128, pattern: str = "2:4"):
    from sparsemerge.prune.api import prune_
    from sparsemerge.prune.config import PruneConfig

    model = make_tiny_llama(seed=seed, hidden=hidden, intermediate=intermediate)
    prune_(model, PruneConfig(pattern=pattern, progress=False))
    return model


def make_base(tmp: Path, tokenizer, quant: str = "none", fmt: str = "nm", pattern: str = "2:4",
              **pack_kw) -> "tuple[Path, Path]":
    """(HF folder of a tiny Llama pruned to ``pattern``, its packed folder)."""
    from sparsemerge.formats.model import pack

    model = pruned_llama(pattern=pattern)
    hf = tmp / "base-hf"
    model.save_pretrained(hf)
    tokenizer.save_pretrained(hf)
    packed = tmp / f"base-{fmt}-{quant}"
    pack(hf, packed, format=fmt, quant=quant, pattern=pattern, **pack_kw)
    return hf, packed


def make_finetune(base_hf: Path, out: Path, seed: int, scale: float = 0.02, names: "tuple[str, ...] | None" = None,
                  keep_pattern: bool = False) -> Path:
    """A 'fine-tune' of ``base_hf``: random updates of size ``scale`` on every (or the named)
    float tensor; ``keep_pattern``: only where the base weight is nonzero."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_hf)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if names is not None and name not in names:
                continue
            d = torch.randn(p.shape, generator=g) * scale
            if keep_pattern:
                d = d * (p != 0)
            p.add_(d)
    model.save_pretrained(out)
    return out
