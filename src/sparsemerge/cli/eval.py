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
    ppl.add_argument("--runtime", choices=["auto", "off"], default="auto",
                     help="packed checkpoints: auto (default) decodes every window on the decode runtime, token by "
                     "token - the numbers decoding gives; off: the stored values decoded into a dense transformers model")
    ppl.add_argument("--act-quant", choices=["none", "int8"], default="none",
                     help="with the runtime: int8 evaluates with the INT8 activations decoding uses (--act-quant of run)")
    ppl.add_argument("--kv-cache", choices=["auto", "float16", "float32"], default="auto",
                     help="with the runtime: the KV cache's precision (--kv-cache of run; auto: float16 where the CPU converts it)")
    ppl.set_defaults(func=run_ppl)


def run_ppl(args: argparse.Namespace) -> int:
    from sparsemerge.eval.data import eval_windows
    from sparsemerge.eval.perplexity import perplexity
    from sparsemerge.io import load_model
    from sparsemerge.kernels.model import is_packed_folder, load_packed

    from sparsemerge.errors import SparsemergeError

    for flag, value in (("--batch-size", args.batch_size), ("--seqlen", args.seqlen), ("--max-windows", args.max_windows)):
        if value is not None and value < (2 if flag == "--seqlen" else 1):  # checked before the model loads
            raise SparsemergeError(f"{flag} must be >= {2 if flag == '--seqlen' else 1}, got {value}")
    engine = None
    if is_packed_folder(args.model):
        if args.runtime == "auto":  # the packed model as it decodes
            from sparsemerge.kernels.sparse_linear import set_act_quant_
            from sparsemerge.runtime.engine import DecodeEngine
            from sparsemerge.runtime.plan import build_plan

            from sparsemerge.runtime.engine import resolve_kv_cache

            resolve_kv_cache(args.kv_cache)  # before the model loads
            loaded = load_packed(args.model)
            set_act_quant_(loaded.model, args.act_quant)
            plan = build_plan(loaded.model, args.act_quant)
            if plan.supported:
                engine = DecodeEngine(loaded.model, loaded.tokenizer, args.act_quant, max_seq=args.seqlen, plan=plan,
                                      kv_cache=args.kv_cache)
            else:
                print(f"decode runtime not used ({plan.reason}): evaluating the stored values in transformers")
        if engine is None:  # its stored values (INT4/INT8 codes included), decoded to float
            loaded = load_packed(args.model, dense=True)
        if loaded.tokenizer is None:
            raise SparsemergeError(f"packed checkpoint {args.model!r} has no tokenizer; repack it from a folder with one")
    else:
        loaded = load_model(args.model)
    windows = eval_windows(loaded.tokenizer, args.data, args.seqlen, args.max_windows)
    if engine is not None:
        from sparsemerge.eval.perplexity import engine_perplexity

        value = engine_perplexity(engine, windows, progress=not args.no_progress)
        how = f"decode runtime, {'INT8' if args.act_quant == 'int8' else 'float'} activations, {engine.kv_cache} KV cache"
    else:
        value = perplexity(loaded.model, windows, batch_size=args.batch_size, progress=not args.no_progress)
        how = "transformers"
    print(f"perplexity {value:.4f}  ({args.model} on {args.data}, {windows.shape[0]} windows x {args.seqlen} tokens; {how})")
    return 0
