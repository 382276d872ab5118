"""Pruning configuration: a pydantic model that rejects unknown keys (YAML recipes validate into it)."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sparsemerge.patterns import parse_pattern
from sparsemerge.selection import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, DENSE  # re-exported: the old home of the defaults

__all__ = ["PruneConfig", "DEFAULT_INCLUDE", "DEFAULT_EXCLUDE", "DENSE"]


class PruneConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pattern: str = Field("2:4", description="sparsity pattern, see sparsemerge.patterns")
    method: str = Field("magnitude", description="a name from sparsemerge.prune.METHODS")
    include: list[str] = Field(default_factory=lambda: list(DEFAULT_INCLUDE), description="regexes on module names to prune")
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_EXCLUDE), description="regexes on module names to keep dense")
    layer_patterns: dict[str, str] = Field(
        default_factory=dict,
        description="per-layer overrides: regex on module name -> pattern (first match wins); "
        "'dense' keeps the matched layers dense (an allocation's recipe, sparsemerge allocate)",
    )
    # gradient-aware scores |W| + gamma * |grad W| (chapter 10.1.7)
    gamma: float = Field(0.1, ge=0.0, description="chosen by benchmarks/bench_gradient_gamma.py")
    # calibration data (gradient, taylor, wanda, sparsegpt)
    calib: str = "bbc"
    nsamples: int = Field(32, ge=1)
    seqlen: int = Field(512, ge=2)
    seed: int = 0
    # SparseGPT (Frantar & Alistarh 2023)
    dampening: float = Field(0.01, gt=0.0, description="fraction of the mean Hessian diagonal added to it")
    blocksize: int = Field(128, ge=1, description="columns pruned and updated together")
    sequential: Union[Literal["auto", "layer", "block", "off"], bool] = Field(
        "auto",
        description="calibrated methods: 'auto' = the method's default (sparsegpt: layer, wanda: off); "
        "'layer' = one pass per block, each layer pruned as its input arrives "
        "(sees the pruned layers and blocks before it); 'block' = a dense statistics pass then a pruned pass per "
        "block; 'off' = one-shot, every layer sees the dense model's activations (True/False = block/off)",
    )
    progress: bool = Field(True, description="show progress bars")
    # channel permutation before pruning (sparsemerge.prune.permutation; NVIDIA ASP, Pool & Yu 2021)
    permute: bool = Field(False, description="permute channels (same function) so N:M masks keep more score")
    permute_scope: list[Literal["mlp", "attn", "hidden"]] = Field(default_factory=lambda: ["mlp", "attn", "hidden"])
    permute_iters: int = Field(100, ge=0, description="channel-swap rounds per permuted space")
    sparsity_per_layer: Optional[list[float]] = Field(
        None, description="one unstructured sparsity per transformer block (overrides the patterns of its layers)"
    )

    @field_validator("pattern")
    @classmethod
    def _valid_pattern(cls, value: str) -> str:
        parse_pattern(value)
        return value

    @field_validator("layer_patterns")
    @classmethod
    def _valid_layer_patterns(cls, value: dict[str, str]) -> dict[str, str]:
        for pattern in value.values():
            if pattern != DENSE:
                parse_pattern(pattern)
        return value
