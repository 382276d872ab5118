"""Helpers for the merge tests: a tiny random Llama base and 'fine-tuned' variants on disk."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import make_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
MK_PYTHON = ROOT / ".venv-peers" / "mergekit" / "bin" / "python"  # the mergekit peer venv's interpreter
needs_mergekit = pytest.mark.skipif(
    not MK_PYTHON.exists(),
    reason="mergekit peer venv absent; create it with: bash benchmarks/peers/setup_mergekit.sh",
)


def save_family(root: Path, n: int = 3, scale: float = 0.02, seed: int = 0, tokenizer=None, layers: int = 2) -> tuple[Path, list[Path]]:
    """Write a base model and ``n`` variants (base + sparse-ish random deltas) as HF folders."""
    base = make_tiny_llama(seed=seed, layers=layers)
    base_dir = root / "base"
    base.save_pretrained(base_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(base_dir)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    dirs = []
    for i in range(n):
        g = torch.Generator().manual_seed(1000 + 17 * i + seed)
        model = make_tiny_llama(seed=seed, layers=layers)
        with torch.no_grad():
            for name, p in model.named_parameters():
                delta = torch.randn(p.shape, generator=g) * scale
                keep = torch.rand(p.shape, generator=g) < 0.6
                p.copy_(state[name] + delta * keep)
        d = root / f"tuned{i}"
        model.save_pretrained(d)
        dirs.append(d)
    return base_dir, dirs


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out
