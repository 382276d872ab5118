"""Run an MoE's experts on the project's N:M kernels (chapter 10.1.3 applied to 10.3.8).

:func:`sparse_experts_` replaces, in a loaded transformers MoE (Mixtral, Qwen2-MoE), every
fused experts module - ``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]`` - by
:class:`SparseExperts`: per expert one packed :class:`~sparsemerge.kernels.SparseLinear` for
``gate_up`` and one for ``down`` (N:M values and positions, optionally INT8/INT4 codes), with
the same computation as transformers' loop over the chosen experts:

    y_t = sum_{k} w_{t,k} * down_{e_k}( act(gate_{e_k} x_t) * up_{e_k} x_t )

The experts must already be N:M (an MoE built with ``keep_pattern``, or from N:M-pruned task
models); ``prune=True`` applies the magnitude mask first. Routers, attention and the shared
expert stay as they are.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from sparsemerge.errors import SparsemergeError


class SparseExperts(nn.Module):
    """Drop-in for transformers' fused experts: ``forward(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H]``, each expert's two products on packed N:M weights."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module], act_fn: Any) -> None:
        super().__init__()
        if len(gate_up) != len(down) or not gate_up:
            raise SparsemergeError("SparseExperts needs one gate_up and one down layer per expert")
        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)
        self.act_fn = act_fn
        self.num_experts = len(gate_up)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for expert in torch.unique(top_k_index).tolist():
            if not 0 <= expert < self.num_experts:  # transformers marks dropped slots with num_experts
                continue
            token_idx, slot = torch.where(top_k_index == expert)
            gate, up = self.gate_up[expert](hidden_states[token_idx]).chunk(2, dim=-1)
            h = self.down[expert](self.act_fn(gate) * up) * top_k_weights[token_idx, slot, None]
            out.index_add_(0, token_idx, h.to(out.dtype))
        return out


@dataclass
class SparseExpertsReport:
    swapped: list[str] = field(default_factory=list)
    dense_bytes: int = 0
    packed_bytes: int = 0


def _is_fused_experts(module: nn.Module) -> bool:
    gu, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor) and gu.dim() == 3 and down.dim() == 3 and hasattr(module, "act_fn")


def sparse_experts_(model: nn.Module, pattern: str = "2:4", quant: str = "none", group_size: Optional[int] = None,
                    prune: bool = False) -> SparseExpertsReport:
    """Swap every fused experts module of ``model`` for :class:`SparseExperts` in place
    (see the module docstring); ``quant``: ``none``, ``int8`` or ``int4`` values."""
    from sparsemerge.kernels.sparse_linear import SparseLinear
    from sparsemerge.patterns import NM, parse_pattern
    from sparsemerge.selection import replace_module

    nm = parse_pattern(pattern)
    if not isinstance(nm, NM):
        raise SparsemergeError(f"the experts run N:M patterns only (e.g. 2:4), got {pattern!r}")
    if quant not in ("none", "int8", "int4"):
        raise SparsemergeError(f"quant must be none, int8 or int4, got {quant!r}")
    report = SparseExpertsReport()
    for name, module in list(model.named_modules()):
        if not _is_fused_experts(module):
            continue
        gate_up, down = [], []
        for e in range(module.gate_up_proj.shape[0]):
            for weights, out in ((module.gate_up_proj, gate_up), (module.down_proj, down)):
                try:
                    out.append(SparseLinear.from_dense(weights[e], n=nm.n, m=nm.m, codec=quant, group_size=group_size, prune=prune))
                except SparsemergeError as exc:
                    raise SparsemergeError(
                        f"{name} expert {e}: {exc} (build the MoE with keep_pattern: {pattern}, or pass prune=True)"
                    ) from None
                report.packed_bytes += out[-1].packed_nbytes()
        report.dense_bytes += sum(p.numel() * p.element_size() for p in (module.gate_up_proj, module.down_proj))
        replace_module(model, name, SparseExperts(gate_up, down, module.act_fn))
        report.swapped.append(name)
    if not report.swapped:
        raise SparsemergeError(f"{type(model).__name__} has no fused experts module (gate_up_proj/down_proj [E, ...]); it is not an MoE")
    return report
