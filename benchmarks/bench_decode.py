"""End-to-end decoding: 2:4-pruned SmolLM2-135M with SparseLinear layers vs the dense float32
model, tokens/s at batch 1, all variants in one process, interleaved.

    .venv/bin/python benchmarks/bench_decode.py                       # 2 threads, wall clock
    .venv/bin/python benchmarks/bench_decode.py --threads 1 --clock cpu

The model is pruned 2:4 by magnitude in memory (decoding speed does not depend on which
weights were kept); "dense float32" is that pruned model run densely (the same speed as the
unpruned one). The sparse variants swap the decoder blocks' Linear layers (q, k, v, o, gate,
up, down: 106 M of the 135 M weights); the tied embedding / lm_head (49152 x 576) stays
dense float32 in every variant except "+ int8 head" (Int8Linear, per-channel INT8; the
embedding lookup keeps its float32 table). The sparse variants run their float32 head with
``GemvLinear`` (``kernels/dense_f32.py``: a numba GEMV, about twice as fast as torch's MKL
sgemv at batch 1 on AMD CPUs); "dense float32 gemv" is the dense model with every Linear so
(a stronger dense baseline than transformers' own, shown beside it for that reason). " a8": the 2:4 INT8/INT4 layers take INT8
activations at batch 1 (the AVX-512 VNNI kernel, ``kernels/cpu_vnni.py``). "max |dlogit|" is
measured on the prompt (batch 16, where every variant runs float activations).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import sparsemerge  # noqa: F401 - before torch: huge pages for its buffers (sparsemerge/__init__.py)

import torch


def decode_time(model, ids, tokens: int, clock) -> float:
    with torch.no_grad():
        out = model(ids, use_cache=True)
        past = out.past_key_values
        nxt = out.logits[:, -1:].argmax(-1)
        start = clock()
        for _ in range(tokens):
            out = model(nxt, past_key_values=past, use_cache=True)
            past = out.past_key_values
            nxt = out.logits[:, -1:].argmax(-1)
        return clock() - start


def main(argv: "list[str] | None" = None) -> int:
    from sparsemerge.eval.report import format_table
    from sparsemerge.io import load_model
    from sparsemerge.kernels import SparsifyConfig, sparsify_
    from sparsemerge.kernels.model import model_bytes
    from sparsemerge.prune.api import prune_
    from sparsemerge.prune.config import PruneConfig

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--variants", default="dense float32 gemv,2:4 f32,2:4 int8,2:4 int8 + int8 head,2:4 int4 g128,2:4 int8 a8,"
                   "2:4 int8 a8 + int8 head,2:4 int4 g128 a8",
                   help="' a8': INT8 activations at batch 1 (the AVX-512 VNNI kernel)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() > 1:
        p.error("--clock cpu sums all threads' CPU time: use it with --threads 1")
    clock = time.perf_counter if args.clock == "wall" else time.process_time

    threads = torch.get_num_threads()
    loaded = load_model(args.model)
    dense = loaded.model
    prune_(dense, PruneConfig(pattern="2:4", progress=False))
    torch.set_num_threads(threads)  # pruning may change the thread count; measure with the asked one
    specs = {"2:4 f32": ("none", None), "2:4 bf16": ("none", None), "2:4 int8": ("int8", None), "2:4 int8 + int8 head": ("int8", None),
             "2:4 int8 g128": ("int8", 128), "2:4 int4": ("int4", None), "2:4 int4 g128": ("int4", 128)}
    models = {"dense float32": dense}
    for name in [v.strip() for v in args.variants.split(",")]:
        if name == "dense float32 gemv":
            from sparsemerge.kernels.dense_f32 import use_gemv_

            models[name] = copy.deepcopy(dense)
            use_gemv_(models[name])
            continue
        quant, gs = specs[name.replace(" a8", "")]
        model = copy.deepcopy(dense)
        sparsify_(model, SparsifyConfig(quant=quant, group_size=gs, value_dtype="bfloat16" if "bf16" in name else "float32",
                                        head_quant="int8" if "head" in name else "none",
                                        act_quant="int8" if " a8" in name else "none"))
        models[name] = model
    torch.manual_seed(0)
    ids = torch.randint(0, dense.config.vocab_size, (1, args.prompt_tokens))
    with torch.no_grad():
        ref = dense(ids).logits[0, -1]
    for model in models.values():  # warm-up: numba JIT / cache load
        decode_time(model, ids, 2, clock)
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(args.repeats):
        for name, model in models.items():
            times[name].append(decode_time(model, ids, args.tokens, clock))
    base_min = min(times["dense float32"])
    base_med = statistics.median(times["dense float32"])
    rows = []
    for name, model in models.items():
        with torch.no_grad():
            drift = (model(ids).logits[0, -1] - ref).abs().max().item()
        tmin, tmed = min(times[name]), statistics.median(times[name])
        rows.append((name, model_bytes(model) / 2**20, args.tokens / tmin, args.tokens / tmed, base_min / tmin, base_med / tmed, drift))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, clock {args.clock}, load average {os.getloadavg()[0]:.1f}")
    print(f"{args.model}: decode {args.tokens} tokens after {args.prompt_tokens} prompt tokens, batch 1, {args.repeats} interleaved repeats")
    print(format_table(["model", "weights MiB", "tok/s (best)", "tok/s (median)", "x dense (best)", "x dense (median)", "max |dlogit|"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
