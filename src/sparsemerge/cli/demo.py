"""``sparsemerge demo``: the end-to-end showcase on the bundled model and text."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="prune the bundled SmolLM2 to 2:4 with every method and compare perplexity",
        description="Dense vs 2:4 pruned SmolLM2-135M on held-out BBC News text: perplexity, sparsity and time.",
    )
    p.add_argument("--model", default="smollm2", help="model to use (default: the bundled SmolLM2-135M)")
    p.add_argument("--data", default="bbc", help="text source for calibration and evaluation (default bbc)")
    p.add_argument("--pattern", default="2:4")
    p.add_argument("--methods", nargs="+", help="pruning methods to compare (default: all registered of magnitude, gradient, wanda, sparsegpt)")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--max-windows", type=int, default=8, help="held-out windows to evaluate (default 8 x 512 tokens)")
    p.add_argument("--nsamples", type=int, default=8, help="calibration windows for Wanda / SparseGPT")
    p.add_argument("--gradient-nsamples", type=int, default=4, help="calibration windows for gradient scores (backward passes)")
    p.add_argument("--out", default="outputs/demo", help="output folder (default outputs/demo)")
    p.add_argument("--no-save", action="store_true", help="do not write the pruned models")
    p.add_argument("--no-pack", action="store_true", help="skip packing the best model (2:4 + INT4) and timing its decoding")
    p.add_argument("--embedding-quant", choices=["none", "int8", "int4"], default="int8",
                   help="codec of the (tied) embedding/head when packing the best model (default int8; int4, group "
                   "128, saves ~14 MB on SmolLM2 but more than doubles the perplexity without recovery fine-tuning)")
    p.add_argument("--recover-steps", type=int, default=16,
                   help="recovery fine-tuning steps for the best pruned model, distilled from the dense one "
                   "(2 x 256 tokens each, ~5 s per step on 2 cores; default 16, 0 skips it)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparsemerge.cli.common import format_table
    from sparsemerge.demo import DEMO_METHODS, DemoConfig, results_table, run_demo
    from sparsemerge.errors import SparsemergeError

    if args.recover_steps < 0:
        raise SparsemergeError(f"--recover-steps must be >= 0, got {args.recover_steps}")

    config = DemoConfig(
        model=args.model,
        data=args.data,
        pattern=args.pattern,
        methods=args.methods or list(DEMO_METHODS),
        seqlen=args.seqlen,
        max_windows=args.max_windows,
        nsamples=args.nsamples,
        gradient_nsamples=args.gradient_nsamples,
        out=args.out,
        save_models=not args.no_save,
        pack=not args.no_pack,
        embedding_quant=args.embedding_quant,
        recover_steps=args.recover_steps,
        progress=not args.no_progress,
    )
    rows = run_demo(config)
    headers, body = results_table(rows)
    print()
    print(format_table(headers, body))
    print(f"\nresults, pruned models and perplexity.png in {config.out}/")
    return 0
