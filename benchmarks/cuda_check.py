"""One-shot CUDA check of the semi-structured 2:4 path (run on a machine with a GPU).

    .venv/bin/python benchmarks/cuda_check.py            # prints a table; also writes
                                                          # $OUT/cuda_check.json when OUT is set

For each shape and batch: SparseLinear (2:4, float16 values) moved to the GPU runs through
``torch.sparse.to_sparse_semi_structured`` (or the recorded fallback); it is compared with
the pure-torch reference on the CPU (correctness) and timed against dense float16
``F.linear`` with CUDA events (speed), interleaved, median of ``--repeats``. Then the CUDA
tests of the kernels run (``pytest -m cuda tests/kernels``). Nothing here needs the network.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (576, 576), (100, 64)]
BATCHES = [1, 8, 32, 128, 2048]


def time_cuda(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out


def main(argv: "list[str] | None" = None) -> int:
    from sparsemerge.kernels import SparseLinear, force_kernel
    from sparsemerge.kernels.cuda import semi_structured_reason
    from sparsemerge.masks import nm_mask

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--no-tests", action="store_true")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    info = {"device": torch.cuda.get_device_name(dev), "capability": list(torch.cuda.get_device_capability(dev)),
            "torch": torch.__version__, "cuda": torch.version.cuda, "rows": []}
    print(f"{info['device']} cc {info['capability']} torch {info['torch']} cuda {info['cuda']}")
    header = f"{'shape':>12} {'batch':>5} {'path':>15} {'max err':>9} {'sparse ms':>10} {'dense ms':>9} {'x dense':>7}"
    print(header)
    for rows, cols in SHAPES:
        g = torch.Generator().manual_seed(rows + cols)
        w = torch.randn(rows, cols, generator=g)
        w = w * nm_mask(w.abs(), 2, 4)
        layer = SparseLinear.from_dense(w, value_dtype="float16")
        gpu = SparseLinear.from_dense(w, value_dtype="float16").to(dev)
        dense16 = w.half().to(dev)
        for batch in BATCHES:
            x = torch.randn(batch, cols, generator=g)
            if batch * rows * cols // 2 <= 1 << 27:
                with force_kernel("reference"):
                    ref = layer(x)
            else:  # the gather reference would need too much memory: dense fp32 on the GPU
                ref = (x.to(dev) @ w.to(dev).T).cpu()
            xg = x.half().to(dev)
            y = gpu(xg).float().cpu()
            err = (y - ref).abs().max().item() / max(ref.abs().max().item(), 1e-6)
            reason = getattr(gpu, "cuda_fallback_reason", "?")
            t_sparse, t_dense = [], []
            for _ in range(3):  # warm-up
                gpu(xg)
                torch.nn.functional.linear(xg, dense16)
            for _ in range(args.repeats):
                t_sparse += time_cuda(lambda: gpu(xg), 1)
                t_dense += time_cuda(lambda: torch.nn.functional.linear(xg, dense16), 1)
            ms_s, ms_d = statistics.median(t_sparse), statistics.median(t_dense)
            path = "semi-structured" if reason is None else "dense fallback"
            row = {"shape": [rows, cols], "batch": batch, "path": path, "fallback_reason": reason,
                   "expected_reason": semi_structured_reason(rows, cols, torch.float16, dev),
                   "max_rel_err": err, "sparse_ms": ms_s, "dense_ms": ms_d, "speedup": ms_d / ms_s}
            info["rows"].append(row)
            print(f"{rows}x{cols:>6} {batch:>5} {path:>15} {err:9.2e} {ms_s:10.4f} {ms_d:9.4f} {ms_d / ms_s:7.2f}"
                  + (f"  ({reason})" if reason else ""))
    bad = [r for r in info["rows"] if r["max_rel_err"] > 2e-2]
    info["correct"] = not bad
    print("correctness:", "OK" if not bad else f"{len(bad)} cases above 2e-2 relative error")
    if not args.no_tests:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "tests/kernels"], capture_output=True, text=True)
        info["pytest_cuda"] = proc.stdout[-2000:]
        print(proc.stdout[-2000:])
    out = os.environ.get("OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "cuda_check.json").write_text(json.dumps(info, indent=1))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
