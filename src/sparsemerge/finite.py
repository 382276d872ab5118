"""``all_finite(t)``: no NaN and no infinity in a tensor, without a tensor-sized temporary.

``torch.isfinite(t).all()`` materializes a bool tensor and, for floats, ``t.abs()`` and two
more bool tensors on the way: ~1.7x the tensor's bytes for an instant (436 MiB on a
262 MB float32 embedding), which is what breaks a streamed job under a memory limit
(BENCHMARKS.md, "Larger than memory"). The minimum and the maximum are finite exactly when
every entry is: ``aminmax`` propagates NaN and returns +-inf when one is present, in one
pass with no temporary (and ~10x faster than ``isfinite(t).all()`` on 65M floats).
"""
from __future__ import annotations

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True when ``tensor`` holds no NaN, +inf or -inf (integer and empty tensors: True)."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return True
    if tensor.is_complex():
        return all_finite(torch.view_as_real(tensor))
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))
