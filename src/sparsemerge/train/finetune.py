"""A small fine-tuning recipe for causal LMs on a list of texts: full or LoRA.

It exists to make *task models* for merging (section 10.3: ``tau_i = theta_task_i - theta_base``):
a short fine-tune of one base on one domain gives a model whose task vector carries that
domain. It is deliberately plain:

* data: the texts are joined with blank lines, tokenized once, and every step draws
  ``batch_size`` random windows of ``seqlen`` tokens (seeded), the same protocol as the
  calibration windows of :mod:`sparsemerge.eval.data`; loss = mean next-token cross-entropy;
* optimizer (the loop shared with recovery, :mod:`sparsemerge.train.loop`): AdamW, linear
  warm-up for ``warmup_steps`` then linear decay to 10% of ``lr``,
  gradient clipping at ``grad_clip``;
* ``mode="full"``: every weight of the decoder blocks trains; the token embedding (tied to
  the LM head in SmolLM2, 28M of its 135M parameters) is frozen unless ``train_embeddings``,
  which keeps the AdamW state and the task vectors small and avoids drifting rare-token rows;
* ``mode="lora"`` (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
  each targeted ``nn.Linear`` ``W`` (out x in) gets ``W x + (alpha / r) B A x`` with
  ``A`` (r x in, Kaiming-uniform) and ``B`` (out x r, zeros), only ``A`` and ``B`` train.
  The adapter is written in PEFT's format by :func:`save_lora_adapter` (peft itself is not
  needed): ``adapter_config.json`` and ``adapter_model.safetensors`` with keys
  ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight``. Its task vector is
  ``delta W = B A * alpha / r``, read back by :class:`sparsemerge.merge.lora.LoraAdapter`.

Full fine-tunes are saved with :func:`sparsemerge.io.save_model` (atomic Hugging Face folder).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
from pydantic import BaseModel, ConfigDict, Field

from sparsemerge.errors import SparsemergeError
from sparsemerge.io.atomic import atomic_output, write_json_atomic
from sparsemerge.selection import replace_module
from sparsemerge.train.loop import dense_parameters, set_trainable_, train_loop, training_tokens

FINETUNE_RECORD = "sparsemerge_finetune.json"
PEFT_PREFIX = "base_model.model."
DEFAULT_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class FinetuneConfig(BaseModel):
    """Options of :func:`finetune_` (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["full", "lora"] = "full"
    steps: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    seqlen: int = Field(128, ge=2)
    lr: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(10, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    seed: int = 0
    train_embeddings: bool = False
    lora_r: int = Field(8, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] = Field(default_factory=lambda: list(DEFAULT_LORA_TARGETS))
    progress: bool = True


@dataclass
class FinetuneReport:
    mode: str
    steps: int
    tokens: int
    trainable_params: int
    seconds: float
    losses: list[float] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        first = self.losses[: max(1, len(self.losses) // 10)]
        last = self.losses[-max(1, len(self.losses) // 10) :]
        return {
            "mode": self.mode,
            "steps": self.steps,
            "tokens": self.tokens,
            "trainable_params": self.trainable_params,
            "seconds": round(self.seconds, 2),
            "loss_first": sum(first) / len(first) if first else None,
            "loss_last": sum(last) / len(last) if last else None,
        }


# ----------------------------------------------------------------------------- LoRA modules


class LoRALinear(nn.Module):
    """``y = W x + b + (alpha / r) * B (A dropout(x))``; the wrapped ``base`` stays frozen."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base = base
        self.r = r
        self.alpha = alpha
        self.scale = alpha / r
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=dtype, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    def delta(self) -> torch.Tensor:
        """``B A * alpha / r`` with the shape of ``base.weight`` (out x in)."""
        return (self.lora_B @ self.lora_A) * self.scale


def add_lora_(model: nn.Module, r: int, alpha: float, targets: list[str], dropout: float = 0.0) -> list[str]:
    """Wrap every ``nn.Linear`` whose module name ends with a name in ``targets``; return their names."""
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] in targets and "lm_head" not in name:
            replace_module(model, name, LoRALinear(module, r, alpha, dropout))
            wrapped.append(name)
    if not wrapped:
        linears = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise SparsemergeError(f"no linear layer matches lora_targets {targets}; this model's linear layers: {linears}")
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora_(model: nn.Module) -> int:
    """Fold every adapter into its base weight (``W += B A * alpha / r``) and unwrap it."""
    count = 0
    for name, module in lora_modules(model).items():
        with torch.no_grad():
            module.base.weight += module.delta().to(module.base.weight.dtype)
        replace_module(model, name, module.base)
        count += 1
    return count


# ----------------------------------------------------------------------------- training


def _trainable(model: nn.Module, config: FinetuneConfig) -> list[nn.Parameter]:
    if config.mode == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        add_lora_(model, config.lora_r, config.lora_alpha, config.lora_targets, config.lora_dropout)
        params = [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]
    else:
        params = dense_parameters(model, config.train_embeddings)
    return set_trainable_(model, params)


def finetune_(model: nn.Module, tokenizer: Any, texts: list[str], config: "FinetuneConfig | None" = None) -> FinetuneReport:
    """Fine-tune ``model`` in place on ``texts`` (see the module docstring for the recipe).

    With ``mode="lora"`` the model is left with :class:`LoRALinear` wrappers; write them with
    :func:`save_lora_adapter` or fold them in with :func:`merge_lora_`.
    """
    config = config or FinetuneConfig()
    ids = training_tokens(tokenizer, texts, config.seqlen)
    torch.manual_seed(config.seed)  # LoRA init
    params = _trainable(model, config)

    def loss_fn(batch: torch.Tensor) -> torch.Tensor:  # mean next-token cross-entropy
        return model(input_ids=batch, labels=batch, use_cache=False).loss

    result = train_loop(model, params, ids, loss_fn, config, f"finetune ({config.mode})")
    return FinetuneReport(config.mode, config.steps, result.tokens, sum(p.numel() for p in params), result.seconds, result.losses)


# ----------------------------------------------------------------------------- PEFT adapters


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """PEFT key names: ``base_model.model.<module>.lora_A.weight`` (r x in) and ``.lora_B.weight`` (out x r)."""
    state = {}
    for name, module in lora_modules(model).items():
        state[f"{PEFT_PREFIX}{name}.lora_A.weight"] = module.lora_A.detach().contiguous().clone()
        state[f"{PEFT_PREFIX}{name}.lora_B.weight"] = module.lora_B.detach().contiguous().clone()
    return state


def save_lora_adapter(
    model: nn.Module,
    out: "str | Path",
    config: FinetuneConfig,
    base_model_name: str = "",
    overwrite: bool = False,
    records: "dict[str, Any] | None" = None,
) -> Path:
    """Write ``out/adapter_config.json`` + ``out/adapter_model.safetensors`` (PEFT's layout) atomically."""
    from sparsemerge.io.writer import save_safetensors

    state = lora_state_dict(model)
    if not state:
        raise SparsemergeError("the model has no LoRA adapters to save; fine-tune with mode='lora' first")
    modules = sorted({k[len(PEFT_PREFIX) :].rsplit(".lora_", 1)[0].split(".")[-1] for k in state})
    adapter_config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name,
        "r": config.lora_r,
        "lora_alpha": config.lora_alpha,
        "lora_dropout": config.lora_dropout,
        "target_modules": modules,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }
    with atomic_output(out, overwrite=overwrite) as tmp:
        save_safetensors(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        write_json_atomic(tmp / "adapter_config.json", adapter_config)
        for name, data in (records or {}).items():
            write_json_atomic(tmp / name, data)
    return Path(out)
