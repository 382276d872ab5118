"""Per-layer latency table for the ``latency`` budget of :mod:`sparsemerge.prune.allocate`:
milliseconds of one batch-1 product ``y = x W^T`` per (shape, pattern, codec) on this CPU,
timed with the kernels a packed model runs."""
from __future__ import annotations

import time
from typing import Any

from sparsemerge.errors import SparsemergeError
from sparsemerge.patterns import NM, parse_pattern
from sparsemerge.prune.sensitivity import DENSE

_LATENCY_CACHE: dict[tuple, float] = {}


def measure_latency_table(shapes: "list[tuple[int, int]]", patterns: list[str], codec: str = "none", group_size: int = 128,
                          min_seconds: float = 0.05, progress: bool = False) -> dict[str, dict[str, float]]:
    """``{"ROWSxCOLS": {pattern: ms}}``: median batch-1 time of ``y = x W^T`` with the
    project's kernels on this CPU - N:M through :class:`~sparsemerge.kernels.SparseLinear`
    (the dispatcher's best row for the pattern and codec), dense through torch's float32
    Linear. Each distinct (shape, pattern, codec) is timed once per process (cached)."""
    import torch
    from tqdm.auto import tqdm

    from sparsemerge.kernels.sparse_linear import SparseLinear

    out: dict[str, dict[str, float]] = {}
    work = sorted({(int(r), int(c)) for r, c in shapes})
    for rows, cols in tqdm(work, desc="latency", disable=not progress, leave=False):
        row = out.setdefault(f"{rows}x{cols}", {})
        for pattern in patterns:
            key = (rows, cols, pattern, codec, group_size, torch.get_num_threads())
            if key not in _LATENCY_CACHE:
                gen = torch.Generator().manual_seed(0)
                weight = torch.randn(rows, cols, generator=gen)
                x = torch.randn(1, cols, generator=gen)
                if pattern == DENSE:
                    layer: Any = torch.nn.Linear(cols, rows, bias=False)
                    layer.weight.data.copy_(weight)
                else:
                    p = parse_pattern(pattern)
                    if not isinstance(p, NM):
                        raise SparsemergeError(f"latency is measured for N:M and dense layers, not {pattern}")
                    layer = SparseLinear.from_dense(weight, None, p.n, p.m, codec=codec,
                                                    group_size=group_size if codec != "none" else None, prune=True)
                _LATENCY_CACHE[key] = _time_ms(layer, x, min_seconds)
            row[pattern] = _LATENCY_CACHE[key]
    return out


def _time_ms(layer: Any, x: Any, min_seconds: float) -> float:
    import torch

    with torch.no_grad():
        for _ in range(3):  # compile / warm caches
            layer(x)
        samples: list[float] = []
        spent = 0.0
        while len(samples) < 5 or (spent < min_seconds and len(samples) < 1000):
            start = time.perf_counter()
            layer(x)
            dt = time.perf_counter() - start
            samples.append(dt)
            spent += dt
    samples.sort()
    return 1e3 * samples[len(samples) // 2]
