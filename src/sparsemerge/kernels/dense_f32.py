"""``GemvLinear``: a dense float32 Linear whose batch-1 product runs a numba GEMV.

For layers that stay dense in a sparse model - the language-model head above all (49152 x 576
in SmolLM2, 108 MiB read per decoded token). torch's CPU wheels compute ``x W^T`` at batch 1
with MKL's sgemv, which streams ~12 GB/s on the AMD Zen 4 machines we measure on; this kernel
(one fastmath dot product per row, rows split over numba's threads) streams ~27 GB/s on one
core and ~33 GB/s on two (``benchmarks/bench_decode.py`` shows the dense model with and
without it). The weight stays the same ``nn.Parameter`` - a head tied to the embedding stays
tied - and every other case (batches, autograd, other devices/dtypes) is ``nn.Linear``'s.
"""
from __future__ import annotations

import numpy as np
import torch
from numba import njit, prange
from torch import nn

MIN_ROWS_PER_THREAD = 1024  # below this a second thread costs more than it saves


@njit(fastmath=True, cache=True)
def _dot_f32(w, x):  # pragma: no cover - jitted
    # a separate fastmath helper so that LLVM vectorizes the reduction (not in the prange body)
    acc = np.float32(0.0)
    for k in range(w.shape[0]):
        acc += w[k] * x[k]
    return acc


@njit(parallel=True, cache=True)
def gemv_f32_dense(w, x, out, tasks):  # pragma: no cover - jitted
    """``out[r] = dot(w[r], x)``, rows in ``tasks`` contiguous ranges."""
    rows = w.shape[0]
    step = (rows + tasks - 1) // tasks
    for t in prange(tasks):
        for r in range(t * step, min(rows, (t + 1) * step)):
            out[r] = _dot_f32(w[r], x)


class GemvLinear(nn.Linear):
    """``nn.Linear`` with a faster batch-1 float32 CPU path (inference only)."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "GemvLinear":
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight  # the same Parameter: ties survive
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (x.numel() != self.in_features or x.device.type != "cpu" or x.dtype != torch.float32
                or w.dtype != torch.float32 or w.device.type != "cpu" or not w.is_contiguous()
                or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))):
            return super().forward(x)
        from sparsemerge.kernels.dispatch import cpu_fast_path_allowed
        from sparsemerge.kernels.threads import sync_threads

        if not cpu_fast_path_allowed():
            return super().forward(x)
        threads = sync_threads()
        out = np.empty(self.out_features, np.float32)
        tasks = max(1, min(threads, self.out_features // MIN_ROWS_PER_THREAD))
        gemv_f32_dense(w.detach().numpy(), x.detach().reshape(-1).contiguous().numpy(), out, tasks)
        y = torch.from_numpy(out)
        if self.bias is not None:
            y = y + self.bias.detach()
        return y.reshape(*x.shape[:-1], self.out_features)


def use_gemv_(model: nn.Module, pattern: str = r".*") -> list[str]:
    """Turn the ``nn.Linear`` layers of ``model`` whose names match ``pattern`` (a regex)
    into :class:`GemvLinear` in place; returns their names."""
    import re

    from sparsemerge.selection import replace_module

    done = []
    for name, module in list(model.named_modules()):
        if type(module) is nn.Linear and re.search(pattern, name):
            replace_module(model, name, GemvLinear.from_linear(module))
            done.append(name)
    return done
