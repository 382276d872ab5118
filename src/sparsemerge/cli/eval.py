"""``sparsemerge eval ppl``."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="evaluate a model")
    esub = p.add_subparsers(dest="eval_command", metavar="WHAT")
    esub.required = True
    ppl = esub.add_parser(
        "ppl",
        help="perplexity on held-out text",
        description="Perplexity with the pruning-literature protocol: texts joined with blank lines, "
        "tokenized once, non-overlapping windows, exp(mean token NLL).",
    )
    ppl.add_argument("model", help="HF folder, packed checkpoint (sparsemerge pack), .safetensors or .gguf file, or smollm2")
    ppl.add_argument("--data", default="bbc", help="bbc (held-out split), bbc:CATEGORY, FILE, folder, hf:NAME[:CONFIG][:SPLIT]")
    ppl.add_argument("--seqlen", type=int, default=512)
    ppl.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows")
    ppl.add_argument("--batch-size", type=int, default=4)
    ppl.add_argument("--no-progress", action="store_true")
    ppl.set_defaults(func=run_ppl)


def run_ppl(args: argparse.Namespace) -> int:
    from sparsemerge.eval.data import eval_windows
    from sparsemerge.eval.perplexity import perplexity
    from sparsemerge.io import load_model
    from sparsemerge.kernels.model import is_packed_folder, load_packed

    if is_packed_folder(args.model):  # its stored values (INT4/INT8 codes included), decoded to float
        loaded = load_packed(args.model, dense=True)
        if loaded.tokenizer is None:
            from sparsemerge.errors import SparsemergeError

            raise SparsemergeError(f"packed checkpoint {args.model!r} has no tokenizer; repack it from a folder with one")
    else:
        loaded = load_model(args.model)
    windows = eval_windows(loaded.tokenizer, args.data, args.seqlen, args.max_windows)
    value = perplexity(loaded.model, windows, batch_size=args.batch_size, progress=not args.no_progress)
    print(f"perplexity {value:.4f}  ({args.model} on {args.data}, {windows.shape[0]} windows x {args.seqlen} tokens)")
    return 0
