"""Cross-layer sharing on SmolLM2-135M (issue 16 item 2): held-out perplexity against the bytes
of the MLP weights, for groups of consecutive layers sharing one weight plus a per-layer scale
and a low-rank or sparse residual, beside the no-sharing baseline at similar bytes (each MLP
weight replaced by its own truncated SVD), in one process on the same held-out BBC windows.

    .venv/bin/python benchmarks/bench_cross_layer_sharing.py [--windows 8] [--json outputs/results/sharing.json]

Bytes are counted at 2 bytes per value (fp16) for every variant; "MLP MiB" covers the 90 MLP
projections (gate, up, down of 30 layers), 76% of the decoder's Linear weights.
"""
from __future__ import annotations

import argparse
import copy

import torch

from sparsemerge.eval.data import eval_windows
from sparsemerge.eval.perplexity import perplexity
from sparsemerge.io import load_model, write_json_atomic
from sparsemerge.merge.sharing import KIND_SETS, SharingConfig, layer_distances, lowrank_per_layer_, projection_weights, share_layers_

VARIANTS = [
    ("share 2, no residual", dict(group_size=2, residual="none")),
    ("share 2 + rank 64", dict(group_size=2, residual="lowrank", rank=64)),
    ("share 2 + rank 128", dict(group_size=2, residual="lowrank", rank=128)),
    ("share 2 + rank 256", dict(group_size=2, residual="lowrank", rank=256)),
    ("share 2 + sparse 25%", dict(group_size=2, residual="sparse", density=0.25)),
    ("share 2 + sparse 40%", dict(group_size=2, residual="sparse", density=0.40)),
    ("share 3 + rank 256", dict(group_size=3, residual="lowrank", rank=256)),
]
BASELINE_RANKS = [96, 160, 288, 384]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2")
    kinds = KIND_SETS["mlp"]
    windows = eval_windows(loaded.tokenizer, "bbc", 512, args.windows)
    dense_ppl = perplexity(loaded.model, windows, progress=False)
    for kind in kinds:
        d = layer_distances(projection_weights(loaded.model, kind))
        near = [float(d[i, i + 1]) for i in range(d.shape[0] - 1)]
        print(f"{kind}: relative distance to the next layer mean {sum(near) / len(near):.3f}, min {min(near):.3f}", flush=True)
    rows = [{"variant": "dense (no sharing)", "mib": None, "ratio": 1.0, "perplexity": dense_ppl}]
    dense_bytes = None
    for name, options in VARIANTS:
        model = copy.deepcopy(loaded.model)
        report = share_layers_(model, SharingConfig(kinds, **options))
        dense_bytes = report.dense_bytes
        ppl = perplexity(model, windows, progress=False)
        rows.append({"variant": name, "mib": report.shared_bytes / 2**20, "ratio": report.ratio, "perplexity": ppl})
        print(f"{name}: {report.shared_bytes / 2**20:.1f} MiB ({report.ratio:.3f}x), perplexity {ppl:.2f}", flush=True)
        del model
    for rank in BASELINE_RANKS:
        model = copy.deepcopy(loaded.model)
        dense, stored = lowrank_per_layer_(model, kinds, rank)
        ppl = perplexity(model, windows, progress=False)
        rows.append({"variant": f"per-layer rank {rank} (no sharing)", "mib": stored / 2**20, "ratio": stored / dense, "perplexity": ppl})
        print(f"per-layer rank {rank}: {stored / 2**20:.1f} MiB ({stored / dense:.3f}x), perplexity {ppl:.2f}", flush=True)
        del model
    rows[0]["mib"] = dense_bytes / 2**20
    print()
    print(f"SmolLM2-135M, MLP weights (fp16 bytes), {args.windows} x 512 held-out BBC tokens")
    print("| variant | MLP MiB | x dense bytes | perplexity | x dense perplexity |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['mib']:.1f} | {r['ratio']:.3f} | {r['perplexity']:.2f} | {r['perplexity'] / dense_ppl:.2f} |")
    if args.json:
        write_json_atomic(args.json, {"rows": rows, "dense_perplexity": dense_ppl})


if __name__ == "__main__":
    main()
