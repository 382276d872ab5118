"""GEMV / small-batch GEMM: sparsemerge N:M kernels vs the best dense float32 library.

Run (unset the OpenBLAS overrides so numpy's dense GEMV gets its best kernel):

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python benchmarks/bench_gemv.py

Variants ending in "a8" run the AVX-512 VBMI/VNNI kernel (``kernels/cpu_vnni.py``): INT8
activations quantized per call (the quantization is inside the timed call), batch 1 only.

For every shape and batch all methods are timed interleaved in one process (round robin,
``--repeats`` rounds); before every timed call a 96 MiB buffer (3x the last-level cache) is
read, so every call streams its weights from DRAM as in decoding. (Rotating many copies of
the weights instead was tried: on this VM the kernel's proactive reclaim (DAMON) pages the
rarely touched copies out and the refaults were timed.) Ratios use the minimum time of each method (the least disturbed run on a shared
machine); the median ratio is printed beside it.

``--clock cpu`` measures process CPU time instead of wall time. With ``--threads 1`` (and
``OPENBLAS_NUM_THREADS=1``) that is the time the one working thread ran, which stays
meaningful when other jobs share the cores (time slices lost to them are not counted; the
shared memory bandwidth and caches still are).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import sparsemerge  # noqa: F401 - before torch: huge pages for its buffers (sparsemerge/__init__.py)

import numpy as np
import torch

from sparsemerge.kernels.cpu import cpu_matmul
from sparsemerge.kernels.layout import BlockedNM, pack_blocked
from sparsemerge.masks import nm_mask

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]
STREAM_BYTES = 96 << 20  # > 2x the 32 MiB L3 of the reference machine


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info

        return "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} threads={i.get('num_threads')}" for i in threadpool_info())
    except ImportError:
        pass
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg.get("Build Dependencies", {}).get("blas", {})
        return f"numpy BLAS {blas.get('name')} {blas.get('version')} (threadpoolctl not installed; kernel = OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', 'auto')})"
    except Exception as exc:  # pragma: no cover
        return f"unknown ({exc})"


def copies_for(nbytes: int) -> int:
    return 1


_FLUSH = np.ones(STREAM_BYTES // 4, np.float32)


def flush_caches() -> float:
    return float(_FLUSH.sum())


def clone(layer: BlockedNM) -> BlockedNM:
    out = BlockedNM(**{**layer.__dict__, "extra": {}})
    for k, t in layer.tensors().items():
        setattr(out, k, t.clone())
    return out


def methods_for(w: torch.Tensor, variants: list[str]) -> dict:
    """name -> (list of per-copy callables taking x (B, cols) torch, bytes per call)."""
    out = {}
    wn = w.numpy()
    k = copies_for(wn.nbytes)
    dense_np = [wn.copy() for _ in range(k)]
    dense_t = [torch.from_numpy(d) for d in dense_np]

    def np_fn(d):
        return lambda x: (d @ x.numpy()[0]) if x.shape[0] == 1 else (x.numpy() @ d.T)

    def torch_fn(d):
        return lambda x: torch.mv(d, x[0]) if x.shape[0] == 1 else torch.nn.functional.linear(x, d)

    out["numpy dense f32"] = ([np_fn(d) for d in dense_np], wn.nbytes)
    out["torch dense f32"] = ([torch_fn(d) for d in dense_t], wn.nbytes)
    for name in variants:
        if name.endswith(" a8"):  # the VNNI kernel: INT8 activations, batch 1 (kernels/cpu_vnni.py)
            from sparsemerge.kernels.cpu_vnni import prepare, unavailable_reason

            codec, gs = ("int8" if "int8" in name else "int4"), (128 if "g128" in name else None)
            layer = pack_blocked(w, 2, 4, codec, gs)
            reason = unavailable_reason(layer)
            if reason:
                print(f"skipping {name}: {reason}")
                continue
            nb = prepare(layer)["nbytes"]
            out[name] = ([(lambda L: (lambda x: cpu_matmul(L, x, act_quant="int8")))(layer)], nb)
            continue
        codec, value_dtype, gs = {
            "2:4 f32": ("none", "float32", None),
            "2:4 bf16": ("none", "bfloat16", None),
            "2:4 int8": ("int8", "float32", None),
            "2:4 int8 g128": ("int8", "float32", 128),
            "2:4 int4": ("int4", "float32", None),
            "2:4 int4 g128": ("int4", "float32", 128),
        }[name]
        layer = pack_blocked(w, 2, 4, codec, gs, value_dtype)
        nb = layer.nbytes()
        layers = [layer] + [clone(layer) for _ in range(copies_for(nb) - 1)]
        out[name] = ([(lambda L: (lambda x: cpu_matmul(L, x)))(L) for L in layers], nb)
    return out


def bench_shape(rows: int, cols: int, batches: list[int], variants: list[str], repeats: int, clock=time.perf_counter) -> list[tuple]:
    g = torch.Generator().manual_seed(rows * 7 + cols)
    w = torch.randn(rows, cols, generator=g)
    w = w * nm_mask(w.abs(), 2, 4)
    all_methods = methods_for(w, variants)
    rows_out = []
    for batch in batches:
        x = torch.randn(batch, cols, generator=g)
        # INT8 activations are a batch-1 path; larger batches run the float kernels
        methods = {k: v for k, v in all_methods.items() if batch == 1 or not k.endswith(" a8")}
        times: dict[str, list[float]] = {m: [] for m in methods}
        for fns, _ in methods.values():  # warm up: JIT, page faults
            for f in fns:
                f(x)
        reps = repeats if batch == 1 else max(3, repeats // 3)
        for i in range(reps):
            for name, (fns, _) in methods.items():
                f = fns[i % len(fns)]
                flush_caches()
                t = clock()
                f(x)
                times[name].append(clock() - t)
        best_dense_min = min(min(times["numpy dense f32"]), min(times["torch dense f32"]))
        best_dense_med = min(statistics.median(times["numpy dense f32"]), statistics.median(times["torch dense f32"]))
        for name, (fns, nbytes) in methods.items():
            tmin, tmed = min(times[name]), statistics.median(times[name])
            rows_out.append((f"{rows}x{cols}", batch, name, tmin * 1e3, tmed * 1e3, nbytes / 2**20,
                             nbytes / tmin / 1e9, best_dense_min / tmin, best_dense_med / tmed))
        del x
    return rows_out


def main(argv: "list[str] | None" = None) -> int:
    from sparsemerge.eval.report import format_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES))
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--variants", default="2:4 f32,2:4 bf16,2:4 int8,2:4 int8 g128,2:4 int4,2:4 int4 g128,"
                   "2:4 int8 a8,2:4 int8 g128 a8,2:4 int4 a8,2:4 int4 g128 a8",
                   help="'... a8': the AVX-512 VNNI kernel with INT8 activations (batch 1 only)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="wall time, or process CPU time (use with --threads 1)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ.setdefault("OPENBLAS_NUM_THREADS", str(args.threads))
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        p.error("--clock cpu sums the CPU time of all threads: use it with --threads 1")
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    variants = [v.strip() for v in args.variants.split(",")]
    print(f"python {sys.version.split()[0]}, torch {torch.__version__} ({torch.get_num_threads()} threads), numpy {np.__version__}")
    print(f"BLAS: {blas_info()}")
    print(f"cpu: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at start; clock: {args.clock}")
    all_rows = []
    for rows, cols in shapes:
        all_rows += bench_shape(rows, cols, batches, variants, args.repeats, clock)
    print(format_table(["shape", "batch", "method", "min ms", "median ms", "MiB read", "GB/s", "x best dense (min)", "x best dense (median)"], all_rows, align="lrlrrrrrr"))
    print(f"load average {os.getloadavg()[0]:.1f} at end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
