"""MoE assembly configs: mergekit-moe's YAML schema (plus two sparsemerge keys) as pydantic models.

mergekit-moe keys, same meaning as there: ``base_model`` (attention, norms, embeddings and the
prompts' hidden states come from it), ``experts`` (``source_model``, ``positive_prompts``,
``negative_prompts``, ``noise_scale``, ``residual_scale``), ``shared_experts`` (one, for the
Qwen2-MoE layout), ``gate_mode`` (see :data:`GATE_MODES`), ``dtype`` (stored dtype; default
the base's), ``experts_per_token`` (top-k, default 2), ``architecture`` (``mixtral`` or
``qwen``; default Mixtral without shared experts, Qwen2-MoE with one).

sparsemerge keys: ``seed`` (random gates and ``noise_scale``; mergekit draws them from torch's
unseeded global generator), ``shard_size``, and ``keep_pattern`` (e.g. ``2:4``: every expert
weight is projected onto that N:M pattern by magnitude - experts pruned to it already keep
their values - so the MoE's experts can run on the project's N:M kernels, :mod:`.sparse`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from sparsemerge.errors import SparsemergeError
from sparsemerge.io.dtypes import ALIASES as _DTYPE_ALIASES
from sparsemerge.io.dtypes import FLOAT_NAMES

# gate_mode -> how the router rows are initialised (mergekit's names and meanings):
GATE_MODES: dict[str, str] = {
    "hidden": "hidden state of each prompt's last token at the input of every layer (base model in bfloat16)",
    "hidden_last": "same as hidden",
    "hidden_avg": "hidden states averaged over each prompt's positions (padding included, as mergekit does)",
    "cheap_embed": "sum of the prompts' token embeddings, normalised; the same row for every layer",
    "random": "standard normal rows (seeded)",
    "uniform_random": "uniform in +-1/sqrt(hidden), as torch.nn.Linear initialises (seeded)",
}
RANDOM_MODES = ("random", "uniform_random")
ARCHITECTURES = ("mixtral", "qwen")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Expert(_Strict):
    """One model whose MLPs become one expert in every layer."""

    source_model: str
    positive_prompts: Optional[list[str]] = None
    negative_prompts: Optional[list[str]] = None
    noise_scale: Optional[float] = None  # add N(0, noise_scale^2) to the expert's MLP weights
    residual_scale: Optional[float] = None  # multiply the expert's down projection

    def prompt_key(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        return tuple(self.positive_prompts or []), tuple(self.negative_prompts or [])


class MoEConfig(_Strict):
    """One MoE assembly (see the module docstring)."""

    base_model: str
    experts: list[Expert]
    gate_mode: str = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    shared_experts: Optional[list[Expert]] = None
    architecture: Optional[str] = None
    # sparsemerge extensions
    seed: int = 0
    shard_size: Union[int, str] = "5GB"
    keep_pattern: Optional[str] = None

    @field_validator("keep_pattern")
    @classmethod
    def _pattern(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return None
        from sparsemerge.patterns import NM, parse_pattern

        if not isinstance(parse_pattern(v), NM):
            raise SparsemergeError(f"keep_pattern must be an N:M pattern such as 2:4, got {v!r}")
        return v

    @field_validator("shard_size")
    @classmethod
    def _shard_size(cls, v: Union[int, str]) -> Union[int, str]:
        from sparsemerge.merge.config import parse_size

        parse_size(v)  # at load, not after the experts are built
        return v

    @field_validator("gate_mode")
    @classmethod
    def _gate_mode(cls, v: str) -> str:
        if v not in GATE_MODES:
            raise SparsemergeError(f"unknown gate_mode {v!r}; expected one of: {', '.join(GATE_MODES)}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return None
        key = _DTYPE_ALIASES.get(v.lower(), v.lower())
        if key not in FLOAT_NAMES:
            raise SparsemergeError(f"dtype {v!r} is not supported; use one of {', '.join(FLOAT_NAMES)}")
        return key

    @field_validator("architecture")
    @classmethod
    def _arch(cls, v: Optional[str]) -> Optional[str]:
        if v is None:
            return None
        # mergekit matches a prefix of the output architecture's name ("Mixtral", "Qwen MoE")
        found = [a for a in ARCHITECTURES if a.startswith(v.lower())]
        if len(found) != 1:
            raise SparsemergeError(f"architecture {v!r} is not supported; expected one of: {', '.join(ARCHITECTURES)}")
        return found[0]

    @model_validator(mode="after")
    def _check(self) -> "MoEConfig":
        if not self.experts:
            raise SparsemergeError("an MoE config needs at least one entry under experts")
        if self.experts_per_token < 1:
            raise SparsemergeError(f"experts_per_token must be >= 1, got {self.experts_per_token}")
        if len(self.experts) < self.experts_per_token:
            raise SparsemergeError(
                f"experts_per_token is {self.experts_per_token} but there are only {len(self.experts)} experts; "
                "list at least as many experts or lower experts_per_token"
            )
        if self.shared_experts is not None and len(self.shared_experts) != 1:
            raise SparsemergeError(f"the Qwen2-MoE layout takes exactly one shared expert, got {len(self.shared_experts)}")
        if self.architecture == "mixtral" and self.shared_experts:
            raise SparsemergeError("architecture mixtral has no shared experts; remove shared_experts or use architecture: qwen")
        if self.architecture == "qwen" and not self.shared_experts:
            raise SparsemergeError("architecture qwen (Qwen2-MoE) needs exactly one entry under shared_experts")
        if self.gate_mode in RANDOM_MODES:
            return self
        for i, expert in enumerate(self.experts):
            if not expert.positive_prompts:
                raise SparsemergeError(
                    f"expert {i} ({expert.source_model}) has no positive_prompts; gate_mode {self.gate_mode} builds "
                    "each router row from them (or use gate_mode: random)"
                )
        if len(self.experts) > 1 and len({e.prompt_key() for e in self.experts}) == 1:
            raise SparsemergeError(
                "the positive and negative prompts are identical for every expert, so every router row would be the "
                "same; give each expert prompts that show what should be routed to it"
            )
        if self.shared_experts and not self.shared_experts[0].positive_prompts:
            raise SparsemergeError(
                f"the shared expert needs positive_prompts for gate_mode {self.gate_mode} (its sigmoid gate is "
                "initialised from them), or use gate_mode: random"
            )
        return self

    @property
    def output_architecture(self) -> str:
        return self.architecture or ("qwen" if self.shared_experts else "mixtral")

    @property
    def all_experts(self) -> list[Expert]:
        """Routed experts, then the shared one (the order of the gate rows)."""
        return [*self.experts, *(self.shared_experts or [])]

    @property
    def shard_bytes(self) -> int:
        from sparsemerge.merge.config import parse_size

        return parse_size(self.shard_size)

    def referenced_models(self) -> list[str]:
        """Every model path the config names, base first, without repeats."""
        return list(dict.fromkeys([self.base_model, *(e.source_model for e in self.all_experts)]))


def load_moe_config(source: "str | Path | dict[str, Any] | MoEConfig") -> MoEConfig:
    """Read an MoE config from a mergekit-moe YAML file, a mapping, or pass one through."""
    from sparsemerge.io.yaml_config import load_yaml_config

    if isinstance(source, MoEConfig):
        return source
    return load_yaml_config(source, MoEConfig, "MoE config", "base_model and experts (mergekit-moe's YAML)")


__all__ = ["ARCHITECTURES", "Expert", "GATE_MODES", "MoEConfig", "RANDOM_MODES", "load_moe_config"]
