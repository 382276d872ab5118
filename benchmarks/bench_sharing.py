"""Cross-layer sharing on SmolLM2-135M: held-out perplexity against stored bytes for runs of
shared layers (``--groups``) with low-rank or sparse per-layer residuals (``sparsemerge share``).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_sharing.py [--windows 8 --seqlen 256]

Prints a table (setting, MiB of tensors, ratio to the source, perplexity on BBC held-out) and
writes outputs/sharing/sharing.png (perplexity against bytes, log scale) and sharing.json.
A quality number, not a timing.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sparsemerge.eval.data import eval_windows
from sparsemerge.eval.perplexity import perplexity
from sparsemerge.io import load_model
from sparsemerge.merge.share import ShareConfig, share_layers

SETTINGS = [  # (label, options)
    ("15 runs, shared only", {"groups": 15, "residual": "none"}),
    ("15 runs + rank 64", {"groups": 15, "residual": "lowrank", "rank": 64}),
    ("15 runs + rank 128", {"groups": 15, "residual": "lowrank", "rank": 128}),
    ("15 runs + 10% sparse", {"groups": 15, "residual": "sparse", "density": 0.10}),
    ("10 runs + rank 128", {"groups": 10, "residual": "lowrank", "rank": 128}),
    ("10 runs + 20% sparse", {"groups": 10, "residual": "sparse", "density": 0.20}),
    ("30 runs: no sharing (dense)", {"groups": 30, "residual": "none"}),
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2")
    p.add_argument("--windows", type=int, default=8, help="held-out windows")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--only", type=int, nargs="*", help="indices of SETTINGS to run (default all)")
    p.add_argument("--out", type=Path, default=Path("outputs/sharing"))
    args = p.parse_args()
    loaded = load_model(args.model)
    windows = eval_windows(loaded.tokenizer, "bbc", args.seqlen, args.windows)
    dense_ppl = perplexity(loaded.model, windows, progress=False)
    layers = loaded.model.config.num_hidden_layers
    del loaded
    rows = []
    settings = [SETTINGS[i] for i in args.only] if args.only else SETTINGS
    print(f"{args.model}: {layers} layers, {windows.shape[0]} x {args.seqlen} BBC held-out tokens; dense perplexity {dense_ppl:.2f}")
    print(f"{'setting':<34}{'MiB':>9}{'ratio':>8}{'err':>8}{'perplexity':>12}")
    with tempfile.TemporaryDirectory(prefix="bench-sharing-") as tmp:
        for i, (label, options) in enumerate(settings):
            out = Path(tmp) / f"s{i}"
            report = share_layers(args.model, out, ShareConfig(**options))
            ppl = perplexity(load_model(out).model, windows, progress=False)
            err = sum(k.residual_error for k in report.kinds) / len(report.kinds)
            rows.append({"setting": label, "options": options, "bytes": report.bytes_shared, "bytes_source": report.bytes_source,
                         "ratio": report.bytes_shared / report.bytes_source, "mean_relative_error": err, "perplexity": ppl,
                         "neighbour_cosine": {k.kind: k.neighbour_cosine for k in report.kinds}})
            print(f"{label:<34}{report.bytes_shared / 2**20:9.1f}{rows[-1]['ratio']:8.3f}{err:8.4f}{ppl:12.2f}", flush=True)
    cos = rows[0]["neighbour_cosine"] if rows else {}
    if cos:
        print("mean cosine of consecutive layers' weights: " + ", ".join(f"{k.split('.')[-2]} {v:.3f}" for k, v in sorted(cos.items())))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharing.json").write_text(json.dumps({"model": args.model, "dense_perplexity": dense_ppl, "rows": rows}, indent=1))
    from sparsemerge.eval.report import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for r in rows:
        ax.scatter(r["bytes"] / 2**20, r["perplexity"])
        ax.annotate(r["setting"], (r["bytes"] / 2**20, r["perplexity"]), fontsize=6)
    if rows:
        ax.axhline(dense_ppl, color="gray", ls="--", label=f"dense {dense_ppl:.1f}")
    ax.set_yscale("log")
    ax.set_xlabel("stored tensors (MiB)")
    ax.set_ylabel("BBC held-out perplexity")
    ax.set_title(f"cross-layer sharing on {args.model}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.out / "sharing.png", dpi=120)
    plt.close(fig)
    print(f"plot and JSON -> {args.out}/")


if __name__ == "__main__":
    main()
