"""Execution of hierarchical N:M layers (chapter 10.2.5): the layout the kernels read, its
pure-torch reference product, and ``HierLinear``, the packed Linear that runs it.

A :class:`~sparsemerge.formats.hnm.HNMPacked` weight (pattern ``hier:K:L@RxB/N:M``) becomes::

    blocks[t, kb]   int32 (T, KB)   ascending kept block indices of row tile t (T = rows/R)
    values[i, j]    (rows, V)       float32 slot values, or INT8/INT4 codes (int8 in memory)
    index[i, j]     uint8 (rows, V) in-group position 0..M-1 of slot j
    scale, zero     float32 (rows, Q) per run of ``group_size`` slots (codecs only; zero:
                    asymmetric only), ``w = (q - zero) * scale``

with slot ``j = (kb*B/M + g)*N + s`` at input column ``blocks[i//R, kb]*B + g*M + index[i, j]``.
Float16/bfloat16 values are widened to float32 on load; codebook values are decoded.

The pure-torch reference product is ``kernels/reference.py``'s ``hier_reference_matmul``.
``HierLinear`` asks the kernel registry (``kernels/backends.py``) for its row like
``SparseLinear`` does: ``numba-hier`` (``kernels/cpu_hier.py``) on the CPU, ``reference``
when forced, ``cuda`` (the decoded dense weight) on a GPU. It is not a ``SparseLinear``: the
decode runtime (``runtime/plan.py``) plans N:M layouts only and reports a model holding
``HierLinear`` layers as unsupported, so ``run``/``bench`` take the transformers path.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from sparsemerge.errors import SparsemergeError
from sparsemerge.patterns import Hierarchical, parse_pattern

_TENSORS = ("values", "index", "blocks", "scale", "zero")


@dataclass
class HierLayout:
    """A hierarchical N:M layer as the kernels read it (see the module docstring)."""

    rows: int
    cols: int
    pattern: Hierarchical
    codec: str  # "none" | "int8" | "int4"
    values: torch.Tensor
    index: torch.Tensor
    blocks: torch.Tensor
    scale: Optional[torch.Tensor] = None
    zero: Optional[torch.Tensor] = None
    group_size: Optional[int] = None  # slots per scale; None = one per row
    extra: dict = field(default_factory=dict)
    kind = "hier"  # kernel rows check it (``Handles.layouts``)

    @property
    def n(self) -> int:
        return self.pattern.n

    @property
    def m(self) -> int:
        return self.pattern.m

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in _TENSORS if getattr(self, k) is not None}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @classmethod
    def from_packed(cls, packed) -> "HierLayout":
        """From a :class:`~sparsemerge.formats.hnm.HNMPacked` (codes and scales as stored)."""
        from sparsemerge.formats.hnm import HNMPacked
        from sparsemerge.formats.quant import QuantizedValues

        if not isinstance(packed, HNMPacked):
            raise SparsemergeError(f"a hierarchical layer needs an hnm packed tensor, got {type(packed).__name__}")
        rows, cols = packed.shape
        vals = packed.values
        scale = zero = group_size = None
        codec = "none"
        if isinstance(vals, QuantizedValues):
            codec, values = vals.kind, vals.int8_codes().contiguous()
            scale = vals.scale.float().contiguous()
            zero = None if vals.zero_point is None else vals.zero_point.float().contiguous()
            group_size = vals.group_size or None
        else:
            values = packed.values_float.float().contiguous()
        blocks = packed.kept_blocks().to(torch.int32).contiguous()
        return cls(rows, cols, packed.pattern, codec, values, packed.positions().contiguous(), blocks, scale, zero, group_size)

    def weights(self) -> torch.Tensor:
        """Float32 slot values ``(rows, V)`` (dequantized for INT8/INT4)."""
        v = self.values.float()
        if self.codec == "none":
            return v
        g = self.group_size or max(v.shape[1], 1)
        s = self.scale.repeat_interleave(g, dim=1)[:, : v.shape[1]]
        if self.zero is not None:
            v = v - self.zero.repeat_interleave(g, dim=1)[:, : v.shape[1]]
        return v * s

    def columns(self) -> torch.Tensor:
        """Input column of every slot, int64 ``(rows, V)``."""
        p = self.pattern
        v = self.index.shape[1]
        j = torch.arange(v, device=self.index.device)
        per_block = p.block // p.m * p.n  # slots per kept block
        starts = self.blocks.long().repeat_interleave(p.rows, 0) * p.block  # (rows, KB)
        return starts[:, j // per_block] + (j % per_block // p.n * p.m) + self.index.long()


def hier_to_dense(layout: HierLayout) -> torch.Tensor:
    """The ``(rows, cols)`` float32 weight the layout stands for (tests, the CUDA path)."""
    dense = torch.zeros(layout.rows, layout.cols, dtype=torch.float32, device=layout.values.device)
    dense.scatter_(1, layout.columns(), layout.weights())
    return dense


class HierLinear(nn.Module):
    """A Linear layer held in the hierarchical N:M layout; ``y = x W^T + b`` from the kept
    slots only. Inference only."""

    def __init__(self, layout: HierLayout, bias: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.in_features, self.out_features = layout.cols, layout.rows
        self.pattern, self.codec, self.group_size = layout.pattern, layout.codec, layout.group_size
        for name in _TENSORS:
            self.register_buffer(name, getattr(layout, name))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.act_quant = "none"  # no INT8-activation row runs this layout

    @classmethod
    def from_packed(cls, packed, bias: Optional[torch.Tensor] = None) -> "HierLinear":
        return cls(HierLayout.from_packed(packed), bias)

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, pattern: "Hierarchical | str" = "hier:1:2@16/2:4",
                   prune: bool = False, codec: str = "none", group_size: int = 0, metadata: str = "bits2") -> "HierLinear":
        """Pack a hierarchical-pruned ``weight (out, in)`` (``prune=True``: magnitude mask first,
        :func:`~sparsemerge.masks.hier_mask`); ``codec`` none/int8/int4, ``group_size`` slots
        per scale (0: per output channel), as in :mod:`sparsemerge.formats.quant`."""
        from sparsemerge.formats.base import CodecSpec
        from sparsemerge.formats.hnm import HNMPacked
        from sparsemerge.masks import hier_mask

        pattern = parse_pattern(pattern)
        weight = weight.detach().cpu().float()
        if prune:
            weight = weight * hier_mask(weight.abs(), pattern)
        packed = HNMPacked.from_dense(weight, pattern, metadata).with_codec(CodecSpec(codec, group_size))
        return cls.from_packed(packed, bias)

    @property
    def layout(self) -> HierLayout:
        cached = self.__dict__.get("_layout")
        if cached is None or cached.values is not self.values:
            cached = HierLayout(self.out_features, self.in_features, self.pattern, self.codec, self.values, self.index,
                                self.blocks, self.scale, self.zero, self.group_size)
            self.__dict__["_layout"] = cached
        return cached

    def _apply(self, fn, recurse: bool = True):
        for key in ("_layout", "_kernel", "_cuda"):
            self.__dict__.pop(key, None)
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        for key in ("_layout", "_kernel", "_cuda"):
            self.__dict__.pop(key, None)
        return super()._load_from_state_dict(*args, **kwargs)

    def to_dense(self) -> torch.Tensor:
        return hier_to_dense(self.layout)

    def packed_nbytes(self) -> int:
        return self.layout.nbytes() + (0 if self.bias is None else self.bias.numel() * 4)

    def cuda_weight(self, device: torch.device) -> torch.Tensor:
        """The decoded dense float16 weight on ``device`` (the ``cuda`` row), built once."""
        cached = self.__dict__.get("_cuda")
        if cached is None or cached[0] != device:
            dense = hier_to_dense(self.layout).to(device=device, dtype=torch.float16)
            cached = self.__dict__["_cuda"] = (device, dense)
        return cached[1]

    def explain_kernel(self, batch: int = 1, device: "str | torch.device | None" = None):
        """The registry's choice for ``batch`` input rows (as ``SparseLinear.explain_kernel``)."""
        dev = torch.device(device) if device is not None else self.values.device
        return self._choice(torch.zeros(batch, self.in_features, device=dev))

    def _choice(self, x2: torch.Tensor):
        from sparsemerge.kernels.dispatch import select, state_key

        cache = self.__dict__.setdefault("_kernel", {})
        key = (x2.device.type, x2.shape[0] == 1, *state_key())
        if key not in cache:
            cache[key] = select(self, x2)
        return cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise SparsemergeError(f"HierLinear expects inputs with last dimension {self.in_features}, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.device.type != "cuda":
            x2 = x2.detach().float().contiguous()
        y = self._choice(x2).run(self, x2)
        if self.bias is not None:
            y = y + self.bias.to(y.device)
        return y.to(x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        q = f", {self.codec} " + ("per-channel" if self.group_size is None else f"group {self.group_size}") if self.codec != "none" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.pattern}{q}, bias={self.bias is not None}"
