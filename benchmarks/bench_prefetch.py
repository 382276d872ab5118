"""Software prefetch in the INT8-activation kernels: GEMV and decoding at several distances.

    .venv/bin/python benchmarks/bench_prefetch.py                      # GEMV, 1 thread, AVX2 rows
    .venv/bin/python benchmarks/bench_prefetch.py --vnni512            # the AVX-512 VNNI rows
    .venv/bin/python benchmarks/bench_prefetch.py --avxvnni            # the AVX-VNNI (VEX 256-bit) rows
    .venv/bin/python benchmarks/bench_prefetch.py --decode outputs/bench-llamacpp/smol-24-int4-g128

The kernels (``kernels/cpu_avx2.py`` gemv24 int8/int4, ``kernels/dense_a8.py`` avx2: the dense
INT8 head) can issue one ``prefetcht0`` per row and 64-column chunk, ``D`` bytes ahead in the
weight stream (``A8_PREFETCH_DEFAULT`` / ``PREFETCH_BYTES``; 0 = none); ``--avxvnni`` and
``--vnni512`` time those kernels' VNNI variants instead (a CPU with the feature: Alder Lake or
Zen 5 for AVX-VNNI). Each distance is compiled
separately; all are timed interleaved in one process (round robin), each GEMV call after a
96 MiB read so its weights stream from DRAM as in decoding. Ratios are against D = 0 (the
minimum time of each; the median ratio beside it).

``--decode MODEL``: one decode engine per distance over the same loaded packed checkpoint
(the engine takes the module's default distance when it is built), INT8 activations, the
AVX2 rows (``SPARSEMERGE_CPU_FEATURES=avx2``, so an AVX-512 machine runs them too), decode
tokens/s timed round robin.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

# --vnni512: the AVX-512 VNNI rows (cpu_vnni, dense_a8 avx512vnni) on a CPU that has them;
# --avxvnni: the AVX-VNNI rows (cpu_avx2 vnni variants, dense_a8 avxvnni); otherwise the AVX2
# rows - each forced with the CPU cap, so that an AVX-512 machine runs the 256-bit ones too
VNNI512 = "--vnni512" in sys.argv
AVXVNNI = "--avxvnni" in sys.argv
MODE = "avx512vnni" if VNNI512 else "avxvnni" if AVXVNNI else "avx2"
os.environ.setdefault("SPARSEMERGE_CPU_FEATURES", {"avx512vnni": "native", "avxvnni": "avxvnni", "avx2": "avx2"}[MODE])

import sparsemerge  # noqa: F401,E402 - before torch: huge pages for its buffers

import numpy as np  # noqa: E402
import torch  # noqa: E402

from sparsemerge.kernels import cpu_avx2, cpu_vnni, dense_a8, features  # noqa: E402
from sparsemerge.kernels.layout import pack_blocked  # noqa: E402
from sparsemerge.masks import nm_mask  # noqa: E402

STREAM_BYTES = 96 << 20
_FLUSH = np.ones(STREAM_BYTES // 4, np.float32)
# the shapes of the issue's GEMV table, SmolLM2-135M's decoder products and its 49152 x 576 head
SHAPES = "4096x4096,11008x4096,4096x11008,1536x576,576x1536"
HEAD = "49152x576"


def sparse_runner(rows: int, cols: int, codec: str, distance: int, threads: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    layer = pack_blocked(w * nm_mask(w.abs(), 2, 4), 2, 4, codec, 128)
    if VNNI512:
        plan = cpu_vnni.prepare(layer)
        fns, reason = cpu_vnni._compiled_fns(distance)
        if fns is None:
            raise SystemExit(f"--vnni512: {reason}")
        run = cpu_vnni._row_runner(fns[codec])
    else:
        plan = cpu_avx2.prepare_a8(layer)
        run = cpu_vnni._row_runner(cpu_avx2.compiled_functions(AVXVNNI, distance)[codec])
    args = (plan["stream"], plan["scale"], plan["corr"])
    tail = (rows, plan["npairs"], plan["tail"], plan["nscale"], plan["xb_per_q"], threads)
    return (lambda x: run(*args, x, *tail)), plan["nbytes"]


def f32_runner(rows: int, cols: int, distance: int, threads: int, seed: int):
    from sparsemerge.kernels import cpu_gather

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    layer = pack_blocked(w * nm_mask(w.abs(), 2, 4), 2, 4)
    plan = cpu_avx2.prepare_f32(layer)
    run = cpu_gather._row_runner(cpu_avx2.compiled_functions(False, f32_prefetch=distance)["f32"])
    return (lambda x: run(plan["vals"], plan["meta"], x, rows, plan["units"], threads)), plan["nbytes"]


def dense_runner(rows: int, cols: int, distance: int, threads: int, seed: int):
    rng = np.random.default_rng(seed)
    plan = dense_a8.prepare(rng.integers(-127, 128, (rows, cols)).astype(np.int8),
                            (rng.random((rows, 1)) * 0.01 + 1e-3).astype(np.float32), 0)
    addr = dense_a8.address(MODE, distance)
    args = (plan["stream"], plan["scale"], plan["corr"])
    tail = (rows, plan["npairs"], plan["tail"], plan["nscale"], plan["xb_per_q"], threads)
    return (lambda x: dense_a8._run(addr, *args, x[0], *tail)), plan["stream"].nbytes


def bench_gemv(shapes: list[tuple[int, int, str]], distances: list[int], repeats: int, threads: int) -> list[tuple]:
    out = []
    for rows, cols, kind in shapes:
        x = np.random.default_rng(rows + cols).standard_normal((1, cols)).astype(np.float32)
        fns = {}
        for d in distances:
            if kind == "2:4 f32":
                fns[d] = f32_runner(rows, cols, d, threads, rows + cols)
            elif kind == "dense int8":
                fns[d] = dense_runner(rows, cols, d, threads, rows + cols)
            else:
                fns[d] = sparse_runner(rows, cols, kind.split()[1], d, threads, rows + cols)
        ref = fns[distances[0]][0](x)
        for d, (f, _) in fns.items():  # warm-up (JIT) and the same numbers at every distance
            if not np.array_equal(f(x), ref):
                raise AssertionError(f"{kind} {rows}x{cols}: distance {d} changed the output")
        times = {d: [] for d in distances}
        for _ in range(repeats):
            for d, (f, _) in fns.items():
                float(_FLUSH.sum())
                t = time.perf_counter()
                f(x)
                times[d].append(time.perf_counter() - t)
        base_min, base_med = min(times[0]), statistics.median(times[0])
        for d in distances:
            tmin, tmed = min(times[d]), statistics.median(times[d])
            out.append((f"{rows}x{cols}", kind, d, tmin * 1e3, tmed * 1e3, fns[d][1] / tmin / 1e9,
                        base_min / tmin, base_med / tmed))
    return out


def bench_decode(model_dir: str, distances: list[int], tokens: int, repeats: int) -> list[tuple]:
    from sparsemerge.kernels.model import load_packed
    from sparsemerge.runtime.engine import DecodeEngine

    loaded = load_packed(model_dir)
    prompt = "The history of the printing press begins in"
    engines = {}
    defaults = (dict(cpu_avx2.A8_PREFETCH_DEFAULT), cpu_vnni.PREFETCH_BYTES, dict(dense_a8.PREFETCH_BYTES))
    for d in distances:  # the engine takes the module defaults when it resolves its kernels
        if VNNI512:
            cpu_vnni.PREFETCH_BYTES = d
        else:
            cpu_avx2.A8_PREFETCH_DEFAULT[AVXVNNI] = d
        dense_a8.PREFETCH_BYTES[MODE] = d
        engines[d] = DecodeEngine(loaded.model, loaded.tokenizer, act_quant="int8", max_seq=tokens + 64)
        engines[d].generate(prompt, max_new_tokens=4)  # JIT warm-up
    cpu_avx2.A8_PREFETCH_DEFAULT.update(defaults[0])
    cpu_vnni.PREFETCH_BYTES = defaults[1]
    dense_a8.PREFETCH_BYTES.update(defaults[2])
    first = engines[distances[0]]
    kernels = first.plan.kernel_counts()
    results = {d: [] for d in distances}
    texts = {}
    for _ in range(repeats):
        for d, e in engines.items():
            res = e.generate(prompt, max_new_tokens=tokens)
            results[d].append(res.decode_tokens_per_s)
            texts[d] = res.tokens
    if any(texts[d] != texts[distances[0]] for d in distances):
        raise AssertionError("the prefetch distance changed the decoded tokens")
    base_max, base_med = max(results[0]), statistics.median(results[0])
    return [(os.path.basename(model_dir.rstrip("/")), d, max(results[d]), statistics.median(results[d]),
             max(results[d]) / base_max, statistics.median(results[d]) / base_med, str(kernels)) for d in distances]


def main(argv: "list[str] | None" = None) -> int:
    from sparsemerge.eval.report import format_table

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--distances", default="0,1024,2048,4096,8192", help="bytes ahead; 0 (none) is the baseline")
    p.add_argument("--shapes", default=SHAPES, help="rows x cols of the 2:4 INT8 / INT4 g128 layers")
    p.add_argument("--f32", action="store_true", help="also the float32 2:4 kernel at --shapes")
    p.add_argument("--head", default=HEAD, help="rows x cols of the dense INT8 head ('' to skip)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--decode", nargs="*", default=[], help="packed checkpoints to decode at every distance")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--decode-repeats", type=int, default=5)
    p.add_argument("--vnni512", action="store_true", help="the AVX-512 VNNI kernels instead of the AVX2 ones")
    p.add_argument("--avxvnni", action="store_true", help="the AVX-VNNI (256-bit) kernels instead of the AVX2 ones")
    args = p.parse_args(argv)
    if args.vnni512 and args.avxvnni:
        p.error("--vnni512 and --avxvnni time different kernels: pick one")
    if args.avxvnni and "avxvnni" not in features.host_features():
        p.error("--avxvnni: this CPU has no AVX-VNNI (Alder Lake, Zen 5 and newer have it)")
    distances = [int(d) for d in args.distances.split(",")]
    if distances[0] != 0:
        distances = [0] + [d for d in distances if d != 0]
    import numba

    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    flags = open("/proc/cpuinfo").read().split("flags", 2)[1].split("\n")[0] if os.path.exists("/proc/cpuinfo") else ""
    print(f"CPU: avx512f={'avx512f' in flags} avx_vnni={'avx_vnni' in flags} avx2={'avx2' in flags}; kernels {MODE}; threads {args.threads}; "
          f"SPARSEMERGE_CPU_FEATURES={os.environ['SPARSEMERGE_CPU_FEATURES']}")
    shapes = []
    for s in [s for s in args.shapes.split(",") if s]:
        r, c = map(int, s.split("x"))
        shapes += [(r, c, "2:4 int8"), (r, c, "2:4 int4")] + ([(r, c, "2:4 f32")] if args.f32 else [])
    if args.head:
        r, c = map(int, args.head.split("x"))
        shapes.append((r, c, "dense int8"))
    if shapes:
        rows = bench_gemv(shapes, distances, args.repeats, args.threads)
        print(format_table(["shape", "kernel", "prefetch B", "min ms", "median ms", "GB/s", "x none (min)", "x none (median)"],
                           rows))
    for m in args.decode:
        rows = bench_decode(m, distances, args.tokens, args.decode_repeats)
        print(format_table(["model", "prefetch B", "best tok/s", "median tok/s", "x none (best)", "x none (median)", "kernels"],
                           rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
