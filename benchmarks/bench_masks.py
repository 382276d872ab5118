"""Mask computation over all targeted weights of SmolLM2-135M: sparsemerge vs a plain
PyTorch top-k reference, in one run.

    .venv/bin/python benchmarks/bench_masks.py [--repeats 5]

The reference is what most pruning code does: ``topk`` of |W| over each group of M, then a
scatter into a boolean mask. Both produce the same mask on distinct scores (checked here).
Each measurement is the median of ``--repeats`` runs over all 210 targeted weights.
"""
from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from sparsemerge.io import load_model
from sparsemerge.masks import mask_for, nm_mask
from sparsemerge.patterns import NM, parse_pattern
from sparsemerge.prune import PruneConfig
from sparsemerge.prune.select import select_targets


def topk_reference(scores: torch.Tensor, pattern) -> torch.Tensor:
    if isinstance(pattern, NM):
        groups = scores.reshape(-1, pattern.m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, torch.topk(groups, pattern.n, dim=1).indices, True)
        return keep.reshape(scores.shape)
    flat = scores.flatten()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, flat.numel() - int(round(pattern.sparsity * flat.numel()))).indices] = True
    return keep.reshape(scores.shape)


def valid_top_n(scores: torch.Tensor, keep: torch.Tensor, pattern) -> bool:
    """Every kept score >= every dropped score of its group (dequantized weights tie a lot,
    so two correct methods may keep different members of a tie)."""
    if not isinstance(pattern, NM):
        return bool(scores[keep].min() >= scores[~keep].max())
    s, k = scores.reshape(-1, pattern.m), keep.reshape(-1, pattern.m)
    kept_min = torch.where(k, s, torch.inf).min(1).values
    dropped_max = torch.where(~k, s, -torch.inf).max(1).values
    return bool((k.sum(1) == pattern.n).all() and (kept_min >= dropped_max).all())


def timed(fn, weights, pattern, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for w in weights:
            fn(w, pattern)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--patterns", nargs="+", default=["2:4", "1:4", "4:8", "2:8", "16:32", "unstructured:0.5"])
    args = parser.parse_args()
    model = load_model("smollm2").model
    targets, _ = select_targets(model, PruneConfig())
    weights = [t.weight.detach().abs().contiguous() for t in targets]
    numel = sum(w.numel() for w in weights)
    print(f"{len(weights)} weights, {numel / 1e6:.1f} M scores; torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    nm_mask(weights[0][:4], 2, 4)  # JIT warm-up (numba, cached on disk after the first run)
    print(f"{'pattern':<18}{'sparsemerge ms':>15}{'torch topk ms':>15}{'speed-up':>10}  both valid")
    for text in args.patterns:
        pattern = parse_pattern(text)
        ours = timed(lambda w, p: mask_for(w, p), weights, pattern, args.repeats)
        ref = timed(topk_reference, weights, pattern, args.repeats)
        same = all(valid_top_n(w, mask_for(w, pattern), pattern) and valid_top_n(w, topk_reference(w, pattern), pattern) for w in weights[:8])
        print(f"{text:<18}{ours * 1e3:>15.1f}{ref * 1e3:>15.1f}{ref / ours:>9.2f}x  {same}")


if __name__ == "__main__":
    main()
