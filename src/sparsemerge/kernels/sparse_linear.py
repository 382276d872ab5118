"""``SparseLinear``: a Linear layer held in a packed N:M format, and the in-place swap.

``y = x W^T + b`` is computed from the packed values (float32/float16/bfloat16, or INT8 /
INT4 codes with per-channel or per-group scales) and their in-group positions, never from
a dense weight (CPU); on CUDA 2:4 layers go through the semi-structured sparse tensor cores
(chapter 10.1.3, 10.2.7). Inference only: no gradients flow through it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, field_validator
from torch import nn

from sparsemerge.errors import SparsemergeError
from sparsemerge.kernels.dispatch import select, state_key
from sparsemerge.kernels.layout import VALUE_DTYPES, BlockedNM, codes_from_quantized, pack_blocked, pack_slots, to_dense
from sparsemerge.masks import nm_mask
from sparsemerge.patterns import NM, parse_pattern
from sparsemerge.selection import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, LayerFilter, compile_regexes, replace_module

_TENSORS = ("values", "meta", "index", "scale", "zero")


class SparseLinear(nn.Module):
    """A packed N:M linear layer (see ``kernels/layout.py`` for the storage)."""

    def __init__(self, layout: BlockedNM, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.in_features = layout.cols
        self.out_features = layout.rows
        self.n, self.m = layout.n, layout.m
        self.codec = layout.codec
        self.group_size = layout.group_size
        for name in _TENSORS:
            self.register_buffer(name, getattr(layout, name))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._cuda_cache: Optional[tuple[torch.device, torch.Tensor]] = None
        # "int8": at batch 1 on CPU, quantize the input per block of 256 and use the VNNI
        # kernel (kernels/cpu_vnni.py) when it can run this layer; "none": float inputs
        self.act_quant = "none"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(
        cls,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        n: int = 2,
        m: int = 4,
        codec: Optional[str] = None,
        group_size: Optional[int] = None,
        value_dtype: str = "float32",
        prune: bool = False,
        symmetric: bool = True,
    ) -> "SparseLinear":
        """Pack a dense N:M-pruned ``weight (out, in)``; ``prune=True`` applies the magnitude
        N:M mask first (``M_ij = 1[|w_ij| in TopN(group)]``), else a non-N:M weight raises.
        ``codec`` None/"none", "int8" or "int4"; ``group_size`` stored values per scale
        (None: per output channel), as in :mod:`sparsemerge.formats.quant`."""
        weight = weight.detach().cpu().float()
        if prune:
            weight = weight * nm_mask(weight.abs(), n, m)
        layout = pack_blocked(weight, n, m, codec or "none", group_size or None, value_dtype, symmetric)
        return cls(layout, bias)

    @classmethod
    def from_packed(cls, packed, bias: Optional[torch.Tensor] = None) -> "SparseLinear":
        """Build from a storage object ``formats.nm.NMPacked`` without re-selecting or
        re-quantizing: float values keep their dtype (float32/float16/bfloat16), INT8/INT4
        codes keep their scales and zero points. Other codecs (codebook) are decoded to float32."""
        from sparsemerge.formats.nm import NMPacked
        from sparsemerge.formats.quant import QuantizedValues

        if not isinstance(packed, NMPacked):
            raise SparsemergeError(f"SparseLinear.from_packed needs an N:M packed tensor (format nm), got {type(packed).__name__}")
        rows, cols = packed.shape
        n, m = packed.n, packed.m
        g = cols // m
        pos = packed.positions().reshape(rows, g, n)
        vals = packed.values
        if isinstance(vals, QuantizedValues) and (vals.group_size == 0 or vals.group_size % n == 0):
            gs = vals.group_size or None
            codes = codes_from_quantized(vals.codes, vals.scale, vals.zero_point, vals.kind, (rows, g, n))
            layout = pack_slots(rows, cols, n, m, pos, None, vals.kind, codes, gs)
        elif isinstance(vals, torch.Tensor) and vals.dtype in VALUE_DTYPES.values():
            name = {v: k for k, v in VALUE_DTYPES.items()}[vals.dtype]
            layout = pack_slots(rows, cols, n, m, pos, vals.reshape(rows, g, n), "none", None, None, name)
        else:  # codebook, odd group sizes: exact float32 values of the stored codes
            layout = pack_slots(rows, cols, n, m, pos, packed.values_float.float().reshape(rows, g, n))
        return cls(layout, bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "SparseLinear":
        return cls.from_dense(linear.weight, linear.bias, **kwargs)

    @property
    def layout(self) -> BlockedNM:
        """The layout over the current buffers (cached; rebuilt after ``.to()``/``load_state_dict``)."""
        cached = self.__dict__.get("_layout")
        if cached is None or cached.values is not self.values:
            cached = BlockedNM(
                self.out_features, self.in_features, self.n, self.m, self.codec,
                self.values, self.meta, self.index, self.scale, self.zero, self.group_size,
            )
            self.__dict__["_layout"] = cached
        return cached

    def _apply(self, fn, recurse: bool = True):
        self.__dict__.pop("_layout", None)
        self.__dict__.pop("_kernel", None)
        self._cuda_cache = None
        return super()._apply(fn, recurse)

    @property
    def value_dtype(self) -> str:
        if self.codec != "none":
            return self.codec
        return {v: k for k, v in VALUE_DTYPES.items()}[self.values.dtype]

    def packed_nbytes(self) -> int:
        return self.layout.nbytes() + (0 if self.bias is None else self.bias.numel() * 4)

    def to_dense(self) -> torch.Tensor:
        """The (out, in) float32 weight this layer represents (tests, fallbacks)."""
        return to_dense(self.layout)

    # ------------------------------------------------------------------ CUDA
    def cuda_weight(self, device: torch.device) -> torch.Tensor:
        """The weight for the CUDA path, built once per device: semi-structured when possible."""
        from sparsemerge.kernels.cuda import to_semi_structured

        if self._cuda_cache is not None and self._cuda_cache[0] == device:
            return self._cuda_cache[1]
        dtype = self.values.dtype if self.values.dtype in (torch.float16, torch.bfloat16) else torch.float16
        dense = to_dense(self.layout.to("cpu")).to(device=device, dtype=dtype)
        if self.n == 2 and self.m == 4:
            weight, reason = to_semi_structured(dense)
        else:
            weight, reason = dense, f"{self.n}:{self.m} is not 2:4"
        self.cuda_fallback_reason = reason
        self._cuda_cache = (device, weight)
        return weight

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise SparsemergeError(f"SparseLinear expects inputs with last dimension {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        # the registry is asked once per situation (device, one row or more, forced name,
        # feature cap) and the choice cached: per-call overhead matters at batch 1, where a
        # small layer takes a few microseconds
        one = x.numel() == self.in_features
        key = (x.device.type, one, *state_key())
        entry = self._kernel_entry(key, x.reshape(-1, self.in_features), one)
        y = None
        if entry[1] is not None and x.dtype == torch.float32:
            y = entry[1](x)  # one decoding token: straight to the kernel (None: not finite)
        if y is None:
            x2 = x.reshape(-1, self.in_features)
            y = entry[0].run(self, x2 if x2.device.type == "cuda" else x2.float())
        if self.bias is not None:
            y = y + self.bias.to(y.device)
        if y.dtype != x.dtype:
            y = y.to(x.dtype)
        return y.reshape(*lead, self.out_features)

    def _kernel_entry(self, key: tuple, x2: torch.Tensor, one: bool) -> tuple:
        """``(KernelChoice, token runner or None)`` for ``key``, chosen once and cached."""
        cache = self.__dict__.get("_kernel")
        if cache is None:
            cache = self.__dict__["_kernel"] = {}
        entry = cache.get(key)
        if entry is None:
            choice = select(self, x2)
            token = None
            if one and key[0] == "cpu" and choice.kernel.token_runner is not None:
                token = choice.kernel.token_runner(self.layout)
            entry = cache[key] = (choice, token)
        return entry

    def explain_kernel(self, batch: int = 1, device: "str | torch.device | None" = None):
        """The registry's :class:`~sparsemerge.kernels.dispatch.KernelChoice` for ``batch``
        input rows on ``device`` (default: where the values are): the row, the reasons the
        faster rows were skipped, and ``why()`` in words. The same choice ``forward`` makes."""
        dev = torch.device(device) if device is not None else self.values.device
        x2 = torch.zeros(batch, self.in_features, device=dev)
        return self._kernel_entry((dev.type, batch == 1, *state_key()), x2, batch == 1)[0]

    @property
    def kernel_choice(self) -> tuple[str, tuple[tuple[str, str], ...]]:
        """``(row name, ((skipped row, reason), ...))`` at batch 1 on the values' device."""
        choice = self.explain_kernel()
        return choice.name, choice.reasons

    def _load_from_state_dict(self, *args, **kwargs):
        # in-place copies keep the buffer objects: drop what was derived from the old values
        for key in ("_layout", "_kernel"):
            self.__dict__.pop(key, None)
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        gs = "per-channel" if self.group_size is None else f"group {self.group_size}"
        q = f", {self.codec} {gs}" if self.codec != "none" else f", {self.value_dtype}"
        a = f", act_quant={self.act_quant}" if self.act_quant != "none" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.n}:{self.m}{q}{a}, bias={self.bias is not None}"


# ---------------------------------------------------------------------- in-place swap
# DEFAULT_INCLUDE / DEFAULT_EXCLUDE (imported above from sparsemerge.selection) stay importable here.


class SparsifyConfig(BaseModel):
    """What :func:`sparsify_` swaps and how it stores the values."""

    model_config = ConfigDict(extra="forbid")
    pattern: str = "2:4"
    quant: Literal["none", "int8", "int4"] = "none"
    group_size: Optional[int] = None  # stored values per scale; None/0 = per output channel
    symmetric: bool = True
    value_dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    include: list[str] = DEFAULT_INCLUDE
    exclude: list[str] = DEFAULT_EXCLUDE
    prune: bool = False  # apply the magnitude N:M mask to layers that are not N:M yet
    head_quant: Literal["none", "int8"] = "none"  # the dense lm_head: float32 GemvLinear, or INT8 Int8Linear
    act_quant: Literal["none", "int8"] = "none"  # batch-1 inputs quantized to INT8 (VNNI kernel)
    head: str = r"(^|\.)lm_head$"

    @field_validator("pattern")
    @classmethod
    def _nm(cls, value: str) -> str:
        if not isinstance(parse_pattern(value), NM):
            raise SparsemergeError(f"SparseLinear runs N:M patterns only (e.g. 2:4), got {value!r}")
        return value


@dataclass
class SparsifyReport:
    swapped: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    dense_bytes: int = 0
    packed_bytes: int = 0
    seconds: float = 0.0


def sparsify_(model: nn.Module, config: "SparsifyConfig | None" = None) -> SparsifyReport:
    """Replace the matching ``nn.Linear`` layers of ``model`` by ``SparseLinear`` in place."""
    config = config or SparsifyConfig()
    pattern = parse_pattern(config.pattern)
    selected = LayerFilter(config.include, config.exclude)
    report = SparsifyReport()
    start = time.perf_counter()
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or not selected(name):
            continue
        if module.in_features % pattern.m:
            report.skipped.append((name, f"input dimension {module.in_features} not divisible by M={pattern.m}"))
            continue
        try:
            new = SparseLinear.from_linear(
                module, n=pattern.n, m=pattern.m, codec=config.quant, group_size=config.group_size,
                value_dtype=config.value_dtype, prune=config.prune, symmetric=config.symmetric,
            )
        except SparsemergeError as exc:
            raise SparsemergeError(f"layer {name}: {exc}") from None
        report.dense_bytes += module.weight.numel() * module.weight.element_size()
        report.packed_bytes += new.layout.nbytes()
        replace_module(model, name, new.to(module.weight.device))
        report.swapped.append(name)
    if config.head_quant == "int8":
        quantize_head_(model, config.head, report)
    else:  # float32 head: the same weight, a faster batch-1 GEMV than torch's (kernels/dense_f32.py)
        from sparsemerge.kernels.dense_f32 import use_gemv_

        use_gemv_(model, config.head)
    set_act_quant_(model, config.act_quant)
    if not report.swapped:
        raise SparsemergeError(
            f"no Linear layer matched include={config.include} and exclude={config.exclude}"
            + (f"; skipped: {report.skipped[:3]}" if report.skipped else "")
        )
    report.seconds = time.perf_counter() - start
    return report


def quantize_head_(model: nn.Module, head: str = r"(^|\.)lm_head$", report: Optional[SparsifyReport] = None) -> list[str]:
    """Replace the dense Linear layers matching ``head`` by per-channel INT8 ``Int8Linear``
    in place (a tied embedding keeps its float table for the lookup)."""
    from sparsemerge.kernels.dense_int8 import Int8Linear

    head_rx = compile_regexes([head], "head")[0]
    done = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and head_rx.search(name):
            new = Int8Linear.from_linear(module)
            if report is not None:
                report.dense_bytes += module.weight.numel() * module.weight.element_size()
                report.packed_bytes += new.codes.numel() + new.scale.numel() * 4
                report.swapped.append(name)
            replace_module(model, name, new)
            done.append(name)
    return done


ACT_QUANT_MODES = ("none", "int8")


def set_act_quant_(model: nn.Module, mode: str) -> int:
    """Set ``act_quant`` on every SparseLinear of ``model``; returns how many. ``"int8"``
    quantizes batch-1 inputs per block of 256 for the VNNI kernel (faster, adds the
    activation rounding error); ``"none"`` keeps float inputs."""
    if mode not in ACT_QUANT_MODES:
        raise SparsemergeError(f"act_quant must be one of {', '.join(ACT_QUANT_MODES)}, got {mode!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, SparseLinear):
            module.act_quant = mode
            module.__dict__.pop("_kernel", None)
            count += 1
    return count
