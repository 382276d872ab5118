"""Inputs of an MoE assembly: architecture and shape checks before any work, and the base
tensors the output keeps (an unplaceable tensor is an error, not silently dropped)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.io.dtypes import dtype_from_name
from sparsemerge.merge.moe.config import MoEConfig

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
SUPPORTED_TYPES = {"mixtral": ("llama", "mistral"), "qwen": ("llama", "mistral", "qwen2")}
_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_BASE_LAYER_KEEP = {
    "mixtral": {"input_layernorm.weight", "post_attention_layernorm.weight",
                *(f"self_attn.{p}_proj.weight" for p in "qkvo")},
}
_BASE_LAYER_KEEP["qwen"] = _BASE_LAYER_KEEP["mixtral"] | {f"self_attn.{p}_proj.bias" for p in "qkv"}
_BASE_GLOBAL_KEEP = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@dataclass
class MoEInputs:
    """What the writer needs to know about the inputs (all checked)."""

    arch: str  # "mixtral" | "qwen"
    base_config: dict[str, Any]
    base_folder: Path
    layers: int
    hidden: int
    intermediate: int
    head: list[str]  # base tensors before the layers (embedding)
    per_layer: dict[int, list[str]]  # base tensors of each layer that stay (norms, attention)
    tail: list[str]  # final norm, LM head when untied
    out_dtype: Optional[torch.dtype]


def check_inputs(cfg: MoEConfig, sources: dict[str, Any]) -> MoEInputs:
    """Every check that can fail on the inputs, before any tensor is written."""
    arch = cfg.output_architecture
    base = sources[cfg.base_model]
    base_cfg, layers, hidden, inter = _check_shapes(cfg, sources, arch)
    head, per_layer, tail = _base_tensors(base, arch, layers, cfg.base_model)
    return MoEInputs(arch, base_cfg, Path(base.folder), layers, hidden, inter, head, per_layer, tail, _out_dtype(cfg, base_cfg))


def _check_shapes(cfg: MoEConfig, sources: dict[str, Any], arch: str) -> tuple[dict[str, Any], int, int, int]:
    """Architecture and shape checks before any work: ``(base config, layers, hidden, intermediate)``."""
    base = sources[cfg.base_model]
    base_cfg = base.config()
    if not base_cfg:
        raise SparsemergeError(f"base_model {cfg.base_model!r} has no config.json; the MoE's config is built from it")
    btype = base_cfg.get("model_type")
    allowed = SUPPORTED_TYPES[arch]
    if btype not in allowed:
        name = "Mixtral" if arch == "mixtral" else "Qwen2-MoE"
        raise SparsemergeError(f"the {name} layout is built from {' or '.join(allowed)} models; base_model {cfg.base_model!r} is {btype!r}")
    try:
        layers, hidden = int(base_cfg["num_hidden_layers"]), int(base_cfg["hidden_size"])
    except KeyError as exc:
        raise SparsemergeError(f"base_model {cfg.base_model!r}: config.json lacks {exc.args[0]}") from None
    up = "model.layers.0.mlp.up_proj.weight"
    if up not in base:
        raise SparsemergeError(f"base_model {cfg.base_model!r} has no tensor {up}; it is not a Llama-style decoder")
    inter = base.shape(up)[0]
    if cfg.keep_pattern is not None:
        from sparsemerge.patterns import parse_pattern

        m = parse_pattern(cfg.keep_pattern).m  # type: ignore[union-attr]
        if hidden % m or inter % m:
            raise SparsemergeError(f"keep_pattern {cfg.keep_pattern}: the MLP dimensions (hidden {hidden}, intermediate {inter}) "
                                   f"must be multiples of {m}")
    for expert in cfg.all_experts:
        ref = expert.source_model
        src = sources[ref]
        ecfg = src.config()
        etype = ecfg.get("model_type") if ecfg else None
        if etype is not None and etype != btype:
            raise SparsemergeError(f"expert {ref!r} is a {etype!r} model but base_model is {btype!r}; all inputs must share one architecture")
        if ecfg and int(ecfg.get("num_hidden_layers", layers)) != layers:
            raise SparsemergeError(f"expert {ref!r} has {ecfg['num_hidden_layers']} layers but base_model has {layers}; they must match")
        for layer in range(layers):
            for part in MLP_PARTS:
                name = f"model.layers.{layer}.mlp.{part}.weight"
                want = (hidden, inter) if part == "down_proj" else (inter, hidden)
                if name not in src:
                    raise SparsemergeError(f"expert {ref!r} has no tensor {name}; experts need the base's {layers} layers of gate/up/down MLPs")
                got = tuple(src.shape(name))
                if got != want:
                    raise SparsemergeError(
                        f"expert {ref!r}: {name} has shape {list(got)} but the base's MLP needs {list(want)} "
                        f"(hidden {hidden}, intermediate {inter}); experts must have the base's dimensions"
                    )
    return base_cfg, layers, hidden, inter


def _base_tensors(base: Any, arch: str, layers: int, ref: str) -> tuple[list[str], dict[int, list[str]], list[str]]:
    """The base's tensors the output keeps: before the layers, per layer, after the layers.
    A tensor the layout has no place for is an error rather than silently dropped."""
    keep = _BASE_LAYER_KEEP[arch]
    per_layer: dict[int, list[str]] = {i: [] for i in range(layers)}
    for name in base.names():
        m = _LAYER.fullmatch(name)
        if m is None:
            if name in _BASE_GLOBAL_KEEP or name.endswith("rotary_emb.inv_freq"):
                continue
            raise SparsemergeError(f"base_model {ref!r}: tensor {name} has no place in the {arch} layout")
        layer, rest = int(m.group(1)), m.group(2)
        if rest.endswith("rotary_emb.inv_freq") or rest in {f"mlp.{p}.weight" for p in MLP_PARTS}:
            continue
        if layer >= layers or rest not in keep:
            hint = " (attention biases need architecture: qwen)" if "bias" in rest else ""
            raise SparsemergeError(f"base_model {ref!r}: tensor {name} has no place in the {arch} layout{hint}")
        per_layer[layer].append(name)
    for part in ("input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight",
                 "self_attn.v_proj.weight", "self_attn.o_proj.weight", "post_attention_layernorm.weight"):
        for layer in range(layers):
            if f"model.layers.{layer}.{part}" not in per_layer[layer]:
                raise SparsemergeError(f"base_model {ref!r} has no tensor model.layers.{layer}.{part}")
    order = {k: i for i, k in enumerate(["input_layernorm.weight", *(f"self_attn.{p}_proj.{w}" for p in "qkvo" for w in ("weight", "bias")),
                                         "post_attention_layernorm.weight"])}
    for layer in per_layer:
        per_layer[layer].sort(key=lambda n: order[n.split(".", 3)[3]])
    head = [n for n in ("model.embed_tokens.weight",) if n in base]
    if not head:
        raise SparsemergeError(f"base_model {ref!r} has no model.embed_tokens.weight")
    tail = [n for n in ("model.norm.weight", "lm_head.weight") if n in base]
    if "model.norm.weight" not in tail:
        raise SparsemergeError(f"base_model {ref!r} has no model.norm.weight")
    return head, per_layer, tail


def _out_dtype(cfg: MoEConfig, base_cfg: dict[str, Any]) -> Optional[torch.dtype]:
    """``dtype`` of the config, else the base's (mergekit's rule); None keeps each tensor's."""
    if cfg.dtype:
        return dtype_from_name(cfg.dtype, "dtype")
    for key in ("dtype", "torch_dtype"):
        value = base_cfg.get(key)
        if isinstance(value, str):
            return dtype_from_name(value.replace("torch.", ""), f"base config {key}")
    return None
