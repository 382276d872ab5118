"""Where a decoded token's time goes, product by product: the head against the sparse layers.

    .venv/bin/python benchmarks/bench_decode_breakdown.py outputs/bench-llamacpp/smol-24-int4-g128
    .venv/bin/python benchmarks/bench_decode_breakdown.py MODEL --threads 2 --cpu-level avx2

Builds the decode engine of a packed checkpoint (INT8 activations by default), decodes
``--tokens`` tokens after a short prompt, then times every product of a step alone
(``DecodeEngine.time_ops``: each after a 96 MiB read, so its weights come from DRAM as in
decoding; the cost of the Python call subtracted) and prints them grouped by projection
(q+k+v, o, gate+up, down over all layers, and the head): milliseconds, MB read, GB/s and share
of the products. Beside it the token's own split (``DecodeEngine.breakdown``): the products run
back to back (``time_products``, weights partly cached by then), attention, the element-wise
rest, and the runtime's overhead - calling the compiled step (``time_dispatch``: a step that
runs none of its parts) and the Python around it - as a share of the token (issue 12's target:
under 10%), each part timed alone; what the parts leave of the step is printed as unattributed.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def group_of(name: str) -> str:
    if name == "lm_head":
        return "head"
    last = name.split(".")[-1]
    return {"q_proj": "q+k+v", "k_proj": "q+k+v", "v_proj": "q+k+v", "o_proj": "o", "gate_proj": "gate+up",
            "up_proj": "gate+up", "down_proj": "down"}[last.split("+")[0]]


def main(argv: "list[str] | None" = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="a packed checkpoint (sparsemerge pack)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cpu-level", default=None, help="cap the CPU features (e.g. avx2), as SPARSEMERGE_CPU_FEATURES")
    p.add_argument("--act-quant", default="int8", choices=["none", "int8"])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    if args.cpu_level:
        os.environ["SPARSEMERGE_CPU_FEATURES"] = args.cpu_level
    import sparsemerge  # noqa: F401 - before torch (huge pages)
    import torch

    from sparsemerge.eval.report import format_table
    from sparsemerge.kernels.model import load_packed
    from sparsemerge.runtime.engine import DecodeEngine

    torch.set_num_threads(args.threads)
    loaded = load_packed(args.model)
    engine = DecodeEngine(loaded.model, loaded.tokenizer, act_quant=args.act_quant, max_seq=args.tokens + 64)
    prompt = "The history of the printing press begins in"
    engine.generate(prompt, max_new_tokens=4)  # JIT warm-up
    best = None
    for _ in range(3):
        res = engine.generate(prompt, max_new_tokens=args.tokens)
        if best is None or res.decode_seconds < best.decode_seconds:
            best = res
    parts = engine.breakdown(best, repeats=20)  # before time_ops: the engine is at the end of the best run
    ops = engine.time_ops(repeats=args.repeats)
    groups: dict[str, list[float]] = {}
    for r in ops:
        g = groups.setdefault(group_of(r["name"]), [0.0, 0.0, 0])
        g[0] += r["seconds"]
        g[1] += r["bytes"]
        g[2] += 1
    total = sum(g[0] for g in groups.values())
    rows = [(name, g[2], 1e3 * g[0], g[1] / 1e6, g[1] / max(g[0], 1e-12) / 1e9, 100 * g[0] / total)
            for name, g in sorted(groups.items(), key=lambda kv: -kv[1][0])]
    rows.append(("all products, each alone", len(ops), 1e3 * total, sum(g[1] for g in groups.values()) / 1e6,
                 sum(g[1] for g in groups.values()) / total / 1e9, 100.0))
    print(f"{os.path.basename(args.model.rstrip('/'))}: kernels {engine.plan.kernel_counts()}, threads {args.threads}, "
          f"act_quant {args.act_quant}, SPARSEMERGE_CPU_FEATURES={os.environ.get('SPARSEMERGE_CPU_FEATURES', 'native')}")
    print(format_table(["products", "ops", "ms (from DRAM)", "MB", "GB/s", "% of products"], rows))
    print()
    token = parts["token"]
    print(format_table(["per token", "ms", "% of token"], [
        (label, 1e3 * parts[key], 100 * parts[key] / token) for label, key in (
            ("token (decode, best of 3)", "token"),
            ("step (compiled)", "step"),
            ("products back to back (time_products)", "products"),
            ("attention at the middle position (time_attention)", "attention"),
            ("element-wise: embedding, norms + quantization, RoPE, KV write, SwiGLU, residuals", "elementwise"),
            ("dispatch: calling the compiled step, walking layers and ops (time_dispatch)", "dispatch"),
            ("python around the step (sampling, stop checks)", "python"),
            ("runtime overhead: dispatch + python", "overhead"),
            ("unattributed: step - the four parts above it (timing noise)", "unattributed"))]))
    print(f"decode {1 / token:.1f} tok/s; measured {time.strftime('%Y-%m-%d %H:%M:%S')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
