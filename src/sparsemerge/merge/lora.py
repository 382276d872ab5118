"""PEFT LoRA adapters as merge inputs and outputs (chapter 10.3.8, "LoRA merging").

In: a LoRA adapter is a low-rank task vector. For a targeted linear ``W`` (out x in) with
``lora_A`` (r x in) and ``lora_B`` (out x r): ``tau = B A * s`` with ``s = lora_alpha / r``
(``lora_alpha / sqrt(r)`` with ``use_rslora``); the model seen by a merge is ``W + tau``
(Hu et al. 2021, arXiv:2106.09685). Embedding adapters (``lora_embedding_A/B``) give
``tau = (B A)^T * s``; ``fan_in_fan_out`` adapters are transposed.

Out: a merged task vector ``tau`` of a 2-D weight becomes rank r by truncated SVD,
``tau ~ U_r S_r V_r^T``, written as ``lora_B = U_r S_r``, ``lora_A = V_r^T`` with
``lora_alpha = r`` (scale 1), the best rank-r approximation in Frobenius norm (Eckart-Young).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from sparsemerge.errors import SparsemergeError

ADAPTER_CONFIG = "adapter_config.json"
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+?)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?(?:\.weight)?$")


def is_lora_adapter(path: "str | Path") -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


class LoraAdapter:
    """A PEFT LoRA adapter folder: ``delta(name)`` gives ``B A * scale`` for a targeted weight name."""

    def __init__(self, folder: "str | Path") -> None:
        self.folder = Path(folder)
        try:
            self.config: dict[str, Any] = json.loads((self.folder / ADAPTER_CONFIG).read_text())
        except (OSError, ValueError) as exc:
            raise SparsemergeError(f"could not read {ADAPTER_CONFIG} in {str(self.folder)!r}: {exc}") from exc
        if self.config.get("peft_type", "LORA").upper() != "LORA":
            raise SparsemergeError(f"adapter {str(self.folder)!r} is {self.config.get('peft_type')}, only LORA adapters can be merged")
        files = sorted(self.folder.glob("adapter_model*.safetensors"))
        if files:
            from sparsemerge.io.reader import load_safetensors

            state: dict[str, torch.Tensor] = {}
            for f in files:
                state.update(load_safetensors(f))
        elif (self.folder / "adapter_model.bin").is_file():
            state = torch.load(self.folder / "adapter_model.bin", map_location="cpu", weights_only=True)
        else:
            raise SparsemergeError(f"adapter {str(self.folder)!r} has no adapter_model.safetensors")
        self._parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            match = _KEY.match(key)
            if not match:
                continue
            module, part = match.groups()
            self._parts.setdefault(module + ".weight", {})[part] = tensor
        if not self._parts:
            raise SparsemergeError(f"adapter {str(self.folder)!r} holds no lora_A/lora_B tensors")
        for name, parts in self._parts.items():
            if len(parts) != 2:
                raise SparsemergeError(f"adapter {str(self.folder)!r}: {name} has only {sorted(parts)}")

    @property
    def base_model(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")

    def targets(self) -> list[str]:
        """Weight names of the base model that the adapter changes."""
        return sorted(self._parts)

    def _lookup(self, pattern_key: str, module: str, default: Any) -> Any:
        for key, value in (self.config.get(pattern_key) or {}).items():
            if module == key or module.endswith("." + key) or re.fullmatch(key, module):
                return value
        return default

    def scale(self, name: str) -> float:
        module = name[: -len(".weight")]
        r = self._lookup("rank_pattern", module, self.config.get("r", 8))
        alpha = self._lookup("alpha_pattern", module, self.config.get("lora_alpha", r))
        return float(alpha) / (math.sqrt(r) if self.config.get("use_rslora") else float(r))

    def delta(self, name: str, dtype: torch.dtype = torch.float32) -> Optional[torch.Tensor]:
        """``B A * scale`` shaped like the base weight, or None when ``name`` is not targeted."""
        parts = self._parts.get(name)
        if parts is None:
            return None
        s = self.scale(name)
        if "lora_embedding_A" in parts:
            return ((parts["lora_embedding_B"].float() @ parts["lora_embedding_A"].float()).T * s).to(dtype)
        delta = parts["lora_B"].float() @ parts["lora_A"].float() * s
        if self.config.get("fan_in_fan_out"):
            delta = delta.T
        return delta.to(dtype)


class LoraTensorSource:
    """A base model's tensor source seen through a LoRA adapter: ``get(name) = W + B A s``."""

    def __init__(self, base: Any, adapter: LoraAdapter) -> None:
        self.base = base
        self.adapter = adapter
        missing = [n for n in adapter.targets() if n not in base]
        if missing:
            raise SparsemergeError(
                f"adapter {str(adapter.folder)!r} targets tensors its base lacks: {', '.join(missing[:8])}"
                + (" ..." if len(missing) > 8 else "")
            )

    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def get(self, name: str) -> torch.Tensor:
        weight = self.base.get(name)
        delta = self.adapter.delta(name)
        if delta is None:
            return weight
        if tuple(delta.shape) != tuple(weight.shape):
            raise SparsemergeError(f"adapter delta for {name} has shape {tuple(delta.shape)}, the base weight {tuple(weight.shape)}")
        return (weight.float() + delta).to(weight.dtype)

    def config(self) -> dict[str, Any]:
        return self.base.config()

    @property
    def folder(self) -> Path:
        return self.base.folder

    def close(self) -> None:
        self.base.close()


def low_rank_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(B, A, rel_err)`` with ``B A`` the best rank-``rank`` approximation of ``delta`` (SVD),
    ``B = U_r S_r`` (out x r), ``A = V_r^T`` (r x in); ``rel_err = ||delta - B A||_F / ||delta||_F``."""
    if delta.dim() != 2:
        raise SparsemergeError(f"a LoRA factorizes 2-D weights, got shape {tuple(delta.shape)}")
    d = delta.float()
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    r = min(rank, s.numel())
    b = u[:, :r] * s[:r]
    a = vh[:r]
    total = float(torch.linalg.vector_norm(s))
    rel = float(torch.linalg.vector_norm(s[r:])) / total if total > 0 else 0.0
    return b.contiguous(), a.contiguous(), rel


def lora_config(rank: int, targets: list[str], base_model: Optional[str]) -> dict[str, Any]:
    """A PEFT ``adapter_config.json`` for factors written with scale 1 (``lora_alpha = r``)."""
    modules = sorted({t[: -len(".weight")].rsplit(".", 1)[-1] for t in targets})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": rank,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
        "target_modules": modules,
        "base_model_name_or_path": base_model,
    }


def lora_key(name: str, part: str) -> str:
    """PEFT's tensor key for weight ``name`` (``x.weight``) and ``part`` (``lora_A``/``lora_B``)."""
    return f"base_model.model.{name[: -len('.weight')]}.{part}.weight"
