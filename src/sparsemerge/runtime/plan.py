"""Static analysis of a sparse decoder: the execution plan (chapter 10.2.8).

For every projection of a Llama-family model (the transformers model that
``kernels.model.load_packed`` builds from a packed checkpoint, or one converted on load) the
plan records the pattern, codec, group size, shape and bytes, and picks the kernel that runs
it at batch 1 on this CPU, with the reason (why faster kernels were passed over). Projections
that read the same input - q/k/v and gate/up - are fused into one product when their storage
agrees. A model the runtime cannot run (another architecture, a layer no decode kernel
handles) gets ``plan.supported = False`` and ``plan.reason``: callers then use the
transformers path and say why.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from sparsemerge.errors import SparsemergeError
from sparsemerge.io.dtypes import dtype_name

SUPPORTED_ARCHS = ("llama", "mistral", "qwen2")
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


class UnsupportedModel(SparsemergeError):
    """The decode runtime cannot run this model (the message says why)."""


@dataclass
class LayerPlan:
    """One product of a decoding step."""

    name: str  # e.g. "model.layers.3.self_attn.q_proj+k_proj+v_proj"
    rows: int
    cols: int
    pattern: str  # "2:4" or "dense"
    codec: str  # "int4 g128", "int8 per-channel", "float32", ...
    kernel: str  # "avx512-vnni-a8", "avx512-gather-f32", "numba-blocked", "numba-dense-f32", ...
    bytes: int  # packed bytes of the product (values, metadata, scales): what a token reads of it
    why: str
    kind: int = -1  # runtime.step KIND_*
    modules: list = field(default_factory=list, repr=False)  # the nn.Modules (not serialized)


@dataclass
class DecodePlan:
    arch: str
    supported: bool
    reason: str  # why the runtime cannot run it ("" when supported)
    act_quant: str
    cpu: str
    layers: list[LayerPlan] = field(default_factory=list)
    config: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(p.bytes for p in self.layers)

    def kernel_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for p in self.layers:
            out[p.kernel] = out.get(p.kernel, 0) + 1
        return out

    def to_json(self) -> str:
        rows = [{k: v for k, v in asdict(p).items() if k not in ("modules", "kind")} for p in self.layers]
        return json.dumps({"arch": self.arch, "supported": self.supported, "reason": self.reason,
                           "act_quant": self.act_quant, "cpu": self.cpu, "config": self.config,
                           "total_bytes": self.total_bytes, "layers": rows}, indent=1)

    def format_table(self, collapse: bool = True) -> str:
        """The plan as a table; ``collapse`` merges the layers whose rows differ only in the
        layer index (``layers.{0-29}``) so a 30-layer model prints a screenful."""
        from sparsemerge.runtime.report import plan_table

        return plan_table(self, collapse)


# ---------------------------------------------------------------------------------- analysis
def _decoder(model: nn.Module) -> nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers") or not hasattr(inner, "embed_tokens"):
        raise UnsupportedModel(f"{type(model).__name__} has no .model.layers / .model.embed_tokens (not a Llama-family decoder)")
    return inner


def _arch_reason(model: nn.Module) -> Optional[str]:
    config = getattr(model, "config", None)
    arch = getattr(config, "model_type", None)
    if arch not in SUPPORTED_ARCHS:
        return f"architecture {arch!r} is not one the decode runtime supports ({', '.join(SUPPORTED_ARCHS)})"
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        return f"hidden_act {act!r} (the runtime's MLP is SwiGLU with silu)"
    if getattr(model, "device", torch.device("cpu")).type != "cpu":
        return "the model is not on the CPU"
    if arch == "qwen2" and getattr(config, "use_sliding_window", False):
        layer_types = getattr(config, "layer_types", None) or []
        if len(set(layer_types)) > 1:
            return "Qwen2 with sliding-window attention on some layers only"
    return None


def _window(config: Any) -> int:
    if getattr(config, "model_type", "") == "mistral" or getattr(config, "use_sliding_window", False):
        return int(getattr(config, "sliding_window", None) or 0)
    return 0


def _codec_text(layout) -> str:
    if layout.codec == "none":
        return dtype_name(layout.values.dtype)
    gs = "per-channel" if layout.group_size is None else f"g{layout.group_size}"
    return f"{layout.codec} {gs}"


def _same_storage(layouts: list) -> Optional[str]:
    """None when the layouts can be stacked row-wise into one product; else why not."""
    from sparsemerge.kernels.layout import BLOCK_ROWS

    a = layouts[0]
    for b in layouts[1:]:
        if (b.n, b.m, b.cols, b.codec, b.group_size, b.values.dtype, b.zero is None) != (
                a.n, a.m, a.cols, a.codec, a.group_size, a.values.dtype, a.zero is None):
            return "their storage differs"
    if any(layout.rows % BLOCK_ROWS for layout in layouts):
        return f"rows are not multiples of {BLOCK_ROWS}"
    return None


def concat_rows(layouts: list):
    """Stack N:M layouts with equal storage row-wise (``[W_q; W_k; W_v]``): every row block is
    self-contained, so the blocked tensors concatenate along their first (block) axis."""
    from sparsemerge.kernels.layout import BlockedNM

    a = layouts[0]
    cat = {k: (torch.cat([getattr(x, k) for x in layouts], 0) if getattr(a, k) is not None else None)
           for k in ("values", "meta", "index", "scale", "zero")}
    return BlockedNM(sum(x.rows for x in layouts), a.cols, a.n, a.m, a.codec, cat["values"], cat["meta"],
                     cat["index"], cat["scale"], cat["zero"], a.group_size)


def choose_sparse_kernel(layout, act_quant: str) -> tuple[Optional[str], int, str]:
    """``(kernel name, runtime kind, why)`` for a packed N:M layer at batch 1 on this CPU;
    name None when no decode kernel can run it (the why says which)."""
    from sparsemerge.runtime import kernels as rk

    return rk.choose(layout, act_quant)


def _dense_entry(name: str, module: nn.Module, act_quant: str = "none") -> tuple[str, str, int, int, str, str]:
    """(pattern, codec, bytes, kind, kernel, why) for a dense projection; an INT8 one takes the
    INT8-activation kernel of ``kernels/dense_a8.py`` when activations are INT8 and it can run."""
    from sparsemerge.kernels.dense_int8 import Int8Linear
    from sparsemerge.runtime.step import KIND_A8, KIND_DF, KIND_DQ

    if isinstance(module, Int8Linear):
        gs = "per-channel" if not module.group_size else f"g{module.group_size}"
        nbytes = module.codes.numel() + module.scale.numel() * 4
        why = "dense INT8 codes (not N:M)"
        if act_quant == "int8":
            from sparsemerge.kernels import dense_a8

            variant, skipped = dense_a8.best_variant()
            reason = "no variant runs here" if variant is None else dense_a8.unavailable_reason(
                module.out_features, module.in_features, module.group_size, variant)
            if reason is None:
                return "dense", f"int8 {gs}", nbytes, KIND_A8, f"dense-a8-{variant}", why + ", INT8 activations"
            why += f"; dense A8 kernel skipped: {reason}"
        return "dense", f"int8 {gs}", nbytes, KIND_DQ, "numba-dense-int8", why
    if type(module) not in (nn.Linear,) and not _is_gemv(module):
        raise UnsupportedModel(f"{name}: {type(module).__name__} is not a layer the decode runtime can run")
    if module.weight.dtype != torch.float32:
        raise UnsupportedModel(f"{name}: dense weights in {module.weight.dtype} (the runtime reads float32)")
    return "dense", "float32", module.weight.numel() * 4, KIND_DF, "numba-dense-f32", "dense float32 (not N:M)"


def _is_gemv(module: nn.Module) -> bool:
    from sparsemerge.kernels.dense_f32 import GemvLinear

    return isinstance(module, GemvLinear)


def _entry(names: list[str], modules: list[nn.Module], act_quant: str) -> list[LayerPlan]:
    """Plan rows for projections that read one input (fused when they can be)."""
    from sparsemerge.kernels.sparse_linear import SparseLinear

    sparse = [isinstance(m, SparseLinear) for m in modules]
    rows = []
    if all(sparse):
        layouts = [m.layout for m in modules]
        if len(modules) > 1:
            reason = _same_storage(layouts)
            if reason is None:
                fused = concat_rows(layouts)
                kernel, kind, why = choose_sparse_kernel(fused, act_quant)
                if kernel is not None:
                    base = names[0].rsplit(".", 1)[0]
                    short = "+".join(n.rsplit(".", 1)[1] for n in names)
                    return [LayerPlan(f"{base}.{short}", fused.rows, fused.cols, f"{fused.n}:{fused.m}",
                                      _codec_text(fused), kernel, fused.nbytes(), f"fused; {why}",
                                      kind, list(modules))]
    for name, module, is_sparse in zip(names, modules, sparse):
        if is_sparse:
            layout = module.layout
            kernel, kind, why = choose_sparse_kernel(layout, act_quant)
            if kernel is None:
                raise UnsupportedModel(f"{name}: {why}")
            if len(modules) > 1:
                why = f"not fused ({'storage differs' if all(sparse) else 'dense neighbours'}); {why}"
            rows.append(LayerPlan(name, layout.rows, layout.cols, f"{layout.n}:{layout.m}", _codec_text(layout),
                                  kernel, layout.nbytes(), why, kind, [module]))
        else:
            pattern, codec, nbytes, kind, kernel, why = _dense_entry(name, module, act_quant)
            rows.append(LayerPlan(name, module.out_features, module.in_features, pattern, codec, kernel, nbytes,
                                  why, kind, [module]))
    return rows


def build_plan(model: nn.Module, act_quant: str = "none") -> DecodePlan:
    """Analyse ``model`` (a transformers Llama-family model whose projections are
    SparseLinear / Linear / Int8Linear) and pick a kernel per product for this CPU."""
    from sparsemerge.runtime.kernels import cpu_summary

    if act_quant not in ("none", "int8"):
        raise SparsemergeError(f"act_quant must be 'none' or 'int8', got {act_quant!r}")
    config = getattr(model, "config", None)
    arch = str(getattr(config, "model_type", type(model).__name__))
    plan = DecodePlan(arch, True, "", act_quant, cpu_summary())
    reason = _arch_reason(model)
    if reason is not None:
        plan.supported, plan.reason = False, reason
        return plan
    try:
        decoder = _decoder(model)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        plan.config = {"hidden": config.hidden_size, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                       "intermediate": config.intermediate_size, "layers": len(decoder.layers),
                       "vocab": config.vocab_size, "window": _window(config),
                       "tied": bool(getattr(config, "tie_word_embeddings", False))}
        for i, layer in enumerate(decoder.layers):
            attn, mlp = layer.self_attn, layer.mlp
            for part in ("q_norm", "k_norm"):
                if getattr(attn, part, None) is not None:
                    raise UnsupportedModel(f"layer {i} normalizes q/k ({part}); the runtime does not")
            pre = f"model.layers.{i}"
            plan.layers += _entry([f"{pre}.self_attn.{p}" for p in ATTN[:3]], [getattr(attn, p) for p in ATTN[:3]], act_quant)
            plan.layers += _entry([f"{pre}.self_attn.o_proj"], [attn.o_proj], act_quant)
            plan.layers += _entry([f"{pre}.mlp.{p}" for p in MLP[:2]], [getattr(mlp, p) for p in MLP[:2]], act_quant)
            plan.layers += _entry([f"{pre}.mlp.down_proj"], [mlp.down_proj], act_quant)
        head = model.get_output_embeddings()
        plan.layers += _entry(["lm_head"], [head], act_quant)
    except UnsupportedModel as exc:
        plan.supported, plan.reason = False, str(exc)
    except AttributeError as exc:
        plan.supported, plan.reason = False, f"unexpected model structure ({exc})"
    return plan
