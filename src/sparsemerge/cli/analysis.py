"""``sparsemerge lmc`` (linear mode connectivity), ``sparsemerge align`` (permutation alignment by
weight matching) and ``sparsemerge tv-stats`` (task-vector statistics)."""
from __future__ import annotations

import argparse
import math

from sparsemerge.cli.common import add_overwrite, format_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lmc",
        help="loss / perplexity along the line (1-a) A + a B (linear mode connectivity)",
        description="Evaluate held-out loss and perplexity of (1-a) A + a B for a grid of a in [0, 1] "
        "(chapter 10.3.1), print a table with the barrier over the straight line between the end losses, "
        "and optionally plot it. A and B must share the architecture (same tensor names and shapes).",
    )
    p.add_argument("model_a", help="model A: HF folder, .safetensors (with config.json) or .gguf file, or smollm2")
    p.add_argument("model_b", help="model B, same architecture as A")
    p.add_argument("--data", default="bbc", help="bbc (held-out split), bbc:CATEGORY, FILE, folder, hf:NAME[:CONFIG][:SPLIT]")
    p.add_argument("--grid", type=int, default=11, help="number of points in [0, 1], ends included (default 11)")
    p.add_argument("--seqlen", type=int, default=256)
    p.add_argument("--max-windows", type=int, default=None, help="evaluate at most this many windows per point")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", help="write a plot (.png, .pdf, .svg)")
    p.add_argument("--json", dest="json_out", help="write the curve as JSON")
    p.add_argument("--align", action="store_true",
                   help="first permute B's units to match A (weight matching, as `sparsemerge align`); "
                   "prints and plots the curve before and after alignment")
    p.add_argument("--align-scope", action="append", choices=["mlp", "heads", "hidden"],
                   help="with --align: permutation spaces (repeatable; default all)")
    p.add_argument("--no-progress", action="store_true")
    add_overwrite(p)
    p.set_defaults(func=run_lmc)

    g = sub.add_parser(
        "align",
        help="permute model B's hidden units to match model A (Git Re-Basin weight matching)",
        description="Weight matching (Ainsworth et al. 2022, chapter 10.3.5): find the permutations of B's MLP "
        "channels, attention heads (within KV groups) and residual stream that best match A's weights "
        "(a linear assignment per space, coordinate descent until nothing changes), apply them to B (its "
        "function is unchanged) and write the result as a Hugging Face folder. Merge it with A or measure "
        "connectivity (`sparsemerge lmc A OUT`) afterwards. Llama / Mistral / Qwen2 / Qwen3 models.",
    )
    g.add_argument("model_a", help="reference model A (HF folder, .safetensors with config.json, .gguf, or smollm2)")
    g.add_argument("model_b", help="model B to permute, same architecture as A")
    g.add_argument("out", help="output folder: B with its units permuted")
    g.add_argument("--scope", action="append", choices=["mlp", "heads", "hidden"],
                   help="permutation spaces (repeatable; default mlp, heads and hidden)")
    g.add_argument("--max-iters", type=int, default=100, help="coordinate-descent sweeps at most (default 100)")
    g.add_argument("--seed", type=int, default=0, help="seed of the sweep order")
    add_overwrite(g)
    g.set_defaults(func=run_align)

    t = sub.add_parser(
        "tv-stats",
        help="cosine similarity and sign conflicts between task vectors",
        description="Task vectors tau_i = M_i - BASE (chapter 10.3.2). Prints, per model pair, the cosine "
        "similarity, the sign-conflict rate (opposite signs among coordinates where both are nonzero) and the "
        "overlap; the norm of each task vector; and the rate over all models. A model may be a PEFT LoRA "
        "adapter folder (read as BASE + B A * scale).",
    )
    t.add_argument("base", help="the common base model")
    t.add_argument("models", nargs="+", help="two or more fine-tuned models (or LoRA adapters) of BASE")
    t.add_argument("--by-layer-type", action="store_true", help="also break the statistics down by layer type (q_proj, mlp ...)")
    t.add_argument("--density", type=float, help="first trim each task vector to this top-|tau| fraction per tensor (TIES trim)")
    t.add_argument("--include", action="append", help="regex on tensor names to include (repeatable; default all)")
    t.add_argument("--json", dest="json_out", help="write the statistics as JSON")
    t.add_argument("--no-progress", action="store_true")
    add_overwrite(t)
    t.set_defaults(func=run_tv_stats)


def _write_json(path: str, data: dict, overwrite: bool) -> None:
    from sparsemerge.io import ensure_writable, write_json_atomic

    ensure_writable(path, overwrite)
    write_json_atomic(path, data)


def _align_config(scopes, max_iters: int = 100, seed: int = 0):
    from sparsemerge.errors import SparsemergeError, options_error
    from sparsemerge.merge.align import AlignConfig

    try:
        return AlignConfig(**({"scopes": scopes} if scopes else {}), max_iters=max_iters, seed=seed)
    except ValueError as exc:  # pydantic.ValidationError
        raise options_error("alignment options", exc) from None


def _print_alignment(result) -> None:
    rows = [[s, p.numel(), result.moved.get(s, 0)] for s, p in result.perms.items()]
    print(format_table(["space", "units", "moved"], rows, align="lrr"))
    print(f"cosine(A, B) over the permuted tensors: {result.similarity_before:.4f} -> {result.similarity_after:.4f} "
          f"({result.iterations} sweeps, {result.seconds:.2f} s)")


def run_align(args: argparse.Namespace) -> int:
    from sparsemerge.merge.align import align_checkpoints

    config = _align_config(args.scope, args.max_iters, args.seed)
    result = align_checkpoints(args.model_a, args.model_b, args.out, config, overwrite=args.overwrite)
    _print_alignment(result)
    print(f"aligned B -> {args.out}")
    return 0


def run_lmc(args: argparse.Namespace) -> int:
    from sparsemerge.errors import SparsemergeError, options_error
    from sparsemerge.io import ensure_writable
    from sparsemerge.merge.lmc import LMCConfig, lmc_curve, plot_lmc

    for out in (args.out, args.json_out):  # fail before any work
        if out:
            ensure_writable(out, args.overwrite)
    if args.out:
        from sparsemerge.eval.report import check_plot_format

        check_plot_format(args.out)
    try:
        config = LMCConfig(
            grid=args.grid, data=args.data, seqlen=args.seqlen, max_windows=args.max_windows,
            batch_size=args.batch_size, progress=not args.no_progress,
        )
    except ValueError as exc:  # pydantic.ValidationError
        raise options_error("lmc options", exc) from None
    align = _align_config(args.align_scope) if args.align else None
    if args.align_scope and not args.align:
        raise SparsemergeError("--align-scope needs --align")
    result = lmc_curve(args.model_a, args.model_b, config)
    print(f"A = {args.model_a}\nB = {args.model_b}\n{result.windows} windows x {result.seqlen} tokens of {args.data}")
    _print_curve(result)
    unaligned, alignment = None, None
    if align is not None:
        import tempfile

        from sparsemerge.merge.align import align_checkpoints

        with tempfile.TemporaryDirectory(prefix="sparsemerge-align-") as tmp:
            alignment = align_checkpoints(args.model_a, args.model_b, f"{tmp}/b", align)
            print("\nalignment of B to A (weight matching):")
            _print_alignment(alignment)
            unaligned, result = result, lmc_curve(args.model_a, f"{tmp}/b", config)
        result.model_b = f"{args.model_b} (aligned)"
        print("\nafter alignment:")
        _print_curve(result)
        print(f"barrier: {unaligned.barrier:.4f} nats before alignment, {result.barrier:.4f} aligned")
    if args.out:
        plot_lmc(result, args.out, overwrite=args.overwrite, before=unaligned)
        print(f"plot -> {args.out}")
    if args.json_out:
        data = result.to_json()
        if unaligned is not None:
            data["unaligned"] = unaligned.to_json()
            data["alignment"] = alignment.to_json()
        _write_json(args.json_out, data, args.overwrite)
        print(f"json -> {args.json_out}")
    return 0


def _print_curve(result) -> None:
    rows = [[f"{p.alpha:.3f}", p.loss, p.perplexity, result.linear_baseline(p.alpha), result.barrier_at(p)] for p in result.points]
    print(format_table(["a", "loss", "perplexity", "linear loss", "barrier"], rows))
    print(f"barrier max_a [L(a) - ((1-a) L(A) + a L(B))] = {result.barrier:.4f} nats")


def _pct(x: float) -> str:
    return "nan" if math.isnan(x) else f"{100 * x:.2f}%"


def _short_names(paths: list[str]) -> list[str]:
    """Folder names when they tell the models apart, else the paths as given."""
    from pathlib import Path

    short = [Path(p).name or p for p in paths]
    return short if len(set(short)) == len(short) else list(paths)


def run_tv_stats(args: argparse.Namespace) -> int:
    from sparsemerge.merge.analysis import task_vector_stats

    if args.json_out:
        from sparsemerge.io import ensure_writable

        ensure_writable(args.json_out, args.overwrite)
    stats = task_vector_stats(
        args.base, args.models, by_layer_type=args.by_layer_type, density=args.density,
        include=args.include, progress=not args.no_progress,
    )
    names = _short_names(stats.models)
    trim = f", trimmed to density {args.density}" if args.density else ""
    print(f"task vectors of {len(names)} models against {args.base} ({stats.tensors} tensors{trim})")
    print(format_table(["model", "||tau||"], [[n, f"{v:.4g}"] for n, v in zip(names, stats.norms)]))
    print()
    rows = [[names[i], names[j], f"{s.cosine:.4f}", _pct(s.conflict_rate), _pct(s.overlap)] for (i, j), s in sorted(stats.pairs.items())]
    print(format_table(["model A", "model B", "cosine", "sign conflict", "overlap"], rows, align="llrrr"))
    print(f"\nall {len(names)} models: {_pct(stats.all_conflict_rate)} of coordinates where >= 2 task vectors are nonzero have conflicting signs")
    if args.by_layer_type:
        print()
        changed = {k: p for k, p in sorted(stats.by_type.items()) if any(s.norm_a2 > 0 or s.norm_b2 > 0 for s in p.values())}
        rows = [
            [kind, f"{names[i]} / {names[j]}", f"{s.cosine:.4f}", _pct(s.conflict_rate)]
            for kind, pairs in changed.items()
            for (i, j), s in sorted(pairs.items())
        ]
        print(format_table(["layer type", "pair", "cosine", "sign conflict"], rows, align="llrr"))
        unchanged = sorted(set(stats.by_type) - set(changed))
        if unchanged:
            print(f"unchanged in every model (task vector 0): {', '.join(unchanged)}")
    if args.json_out:
        _write_json(args.json_out, stats.to_json(), args.overwrite)
        print(f"json -> {args.json_out}")
    return 0
