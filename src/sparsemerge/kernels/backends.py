"""The kernels SparseLinear can run on, registered in ``dispatch.KERNELS``.

=========  ========  ==============================================================
name       priority  runs when
=========  ========  ==============================================================
cuda       0         input on a CUDA device (2:4 -> semi-structured, else dense GPU)
cpu        10        input on the CPU (numba kernels of ``kernels/cpu.py``; at batch 1
                     with ``act_quant="int8"`` the VNNI kernel of ``kernels/cpu_vnni.py``)
reference  100       always (pure torch, ``kernels/reference.py``; slow)
=========  ========  ==============================================================
"""
from __future__ import annotations

from typing import Optional

import torch

from sparsemerge.kernels.dispatch import Kernel, register_kernel


def _cuda_supports(layer, x: torch.Tensor) -> Optional[str]:
    return None if x.device.type == "cuda" else f"input is on {x.device.type}, not cuda"


def _cuda_run(layer, x: torch.Tensor) -> torch.Tensor:
    from sparsemerge.kernels.cuda import semi_structured_linear

    weight = layer.cuda_weight(x.device)
    return semi_structured_linear(x, weight, None).float()


def _cpu_supports(layer, x: torch.Tensor) -> Optional[str]:
    if x.device.type != "cpu":
        return f"input is on {x.device.type}, not cpu"
    if layer.values.device.type != "cpu":
        return "the packed values are not on the cpu"
    return None


def _cpu_run(layer, x: torch.Tensor) -> torch.Tensor:
    from sparsemerge.kernels.cpu import cpu_matmul

    return cpu_matmul(layer.layout, x, act_quant=getattr(layer, "act_quant", "none"))


def _reference_supports(layer, x: torch.Tensor) -> Optional[str]:
    return None


def _reference_run(layer, x: torch.Tensor) -> torch.Tensor:
    from sparsemerge.kernels.reference import reference_matmul

    return reference_matmul(layer.layout, x)


register_kernel(Kernel("cuda", 0, _cuda_supports, _cuda_run))
register_kernel(Kernel("cpu", 10, _cpu_supports, _cpu_run))
register_kernel(Kernel("reference", 100, _reference_supports, _reference_run))
