"""``sparsemerge tune``: search methods x allocations x codecs, print and plot the Pareto
frontier, write the chosen candidate's recipe and packed model (:mod:`sparsemerge.prune.tune`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from sparsemerge.cli.common import add_overwrite
from sparsemerge.errors import SparsemergeError


def _list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in _list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune",
        help="search pruning methods x per-layer allocations x codecs; keep the Pareto frontier",
        description="Evaluate candidates of MODEL - the dense model, INT8/INT4 quantization only, and for each method x "
        "codec one N:M pattern for every layer or a per-layer allocation under a global sparsity budget - on held-out "
        "text: perplexity, packed MB and decode tokens/s. Print the table and the Pareto frontier (minimise perplexity and "
        "MB, maximise tokens/s), plot it, and write the chosen candidate (its recipe and packed model) to --out.",
    )
    p.add_argument("model", help="HF folder, .safetensors or .gguf file, or smollm2")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--max-ppl", type=float, help="choose the smallest candidate with at most this perplexity")
    goal.add_argument("--max-mb", type=float, help="choose the lowest-perplexity candidate of at most this many MB (10^6 bytes)")
    goal.add_argument("--min-speedup", type=float, help="choose the lowest-perplexity candidate decoding at least this much faster than dense")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder: recipe.yaml, model/ (packed), tune.json, frontier.png")
    p.add_argument("--text", default="bbc", help="text: bbc (calibration and held-out splits), bbc:CATEGORY, FILE, hf:NAME (default bbc)")
    p.add_argument("--methods", metavar="LIST", type=_list, default=["magnitude", "wanda", "sparsegpt"], help="pruning methods (default magnitude,wanda,sparsegpt)")
    p.add_argument("--codecs", metavar="LIST", type=_list, default=["none", "int8", "int4"], help="value codecs: none,int8,int4 (default all three)")
    p.add_argument("--candidates", metavar="LIST", type=_list, default=["4:8", "2:4", "2:8", "1:4"], help="N:M patterns (default 4:8,2:4,2:8,1:4)")
    p.add_argument("--sparsities", metavar="LIST", type=_floats, default=[0.4, 0.5, 0.6],
                   help="global sparsity budgets of the per-layer allocations (default 0.4,0.5,0.6)")
    p.add_argument("--no-allocations", action="store_true", help="uniform patterns only (no sensitivity report)")
    p.add_argument("--criterion", default="taylor", help="sensitivity criterion the allocations minimise (default taylor)")
    p.add_argument("--workers", type=int, default=1, help="local worker processes (default 1: in this process)")
    p.add_argument("--ray", metavar="ADDRESS", help="run one Ray task per candidate on this cluster (auto, HOST:PORT, ray://HOST:PORT)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads per candidate (default 1)")
    p.add_argument("--seqlen", type=int, default=256, help="tokens per held-out and calibration window (default 256)")
    p.add_argument("--max-windows", type=int, default=8, help="held-out windows per candidate (default 8)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows for wanda/sparsegpt (default 32)")
    p.add_argument("--tokens", type=int, default=16, help="decoded tokens per speed measurement (default 16)")
    p.add_argument("--repeats", type=int, default=2, help="speed: best of this many interleaved runs (default 2)")
    p.add_argument("--dtype", default="source", help="float dtype of stored values: source (default), float32, float16, bfloat16")
    p.add_argument("--extra-points", metavar="FILE", help="JSON list of external points {label, mb, ppl, tok_s} drawn on the plot")
    p.add_argument("--plot", metavar="FILE", help="also write the frontier plot here (PNG, PDF or SVG)")
    p.add_argument("--json", metavar="FILE", help="also write every row (and the choice) as JSON here")
    p.add_argument("--scratch", metavar="DIR", help="folder for the temporary pruned and packed candidates (default: the system's)")
    p.add_argument("--no-progress", action="store_true")
    add_overwrite(p)
    p.set_defaults(func=run_tune)


def _constraint(args: argparse.Namespace):
    from sparsemerge.prune.tune import Constraint

    for kind in ("max_ppl", "max_mb", "min_speedup"):
        value = getattr(args, kind)
        if value is not None:
            return Constraint(kind, value)
    raise SparsemergeError("give one of --max-ppl, --max-mb or --min-speedup")


def _check(args: argparse.Namespace) -> None:
    for flag, value, low in (("--threads", args.threads, 1), ("--seqlen", args.seqlen, 2), ("--max-windows", args.max_windows, 1),
                             ("--nsamples", args.nsamples, 1), ("--tokens", args.tokens, 1), ("--repeats", args.repeats, 1),
                             ("--workers", args.workers, 1)):
        if value < low:
            raise SparsemergeError(f"{flag} must be >= {low}, got {value}")
    if not args.methods:
        raise SparsemergeError("--methods is empty; give e.g. magnitude,wanda,sparsegpt")
    from sparsemerge.prune.base import METHODS

    unknown = [m for m in args.methods if m not in METHODS.names()]
    if unknown:
        raise SparsemergeError(f"unknown pruning method(s) {unknown}; known: {', '.join(METHODS.names())}")
    from sparsemerge.patterns import NM, parse_pattern
    from sparsemerge.prune.tune import CODECS

    bad = [c for c in args.codecs if c not in CODECS]
    if bad or not args.codecs:
        raise SparsemergeError(f"--codecs takes {', '.join(CODECS)}; got {','.join(args.codecs) or 'nothing'}")
    if not args.candidates:
        raise SparsemergeError("--candidates is empty; give N:M patterns such as 4:8,2:4,2:8,1:4")
    for p in args.candidates:
        if not isinstance(parse_pattern(p), NM):
            raise SparsemergeError(f"--candidates takes N:M patterns (e.g. 2:4), got {p!r}")
    if any(not 0.0 < s < 1.0 for s in args.sparsities):
        raise SparsemergeError(f"--sparsities must lie strictly between 0 and 1, got {args.sparsities}")
    if not args.no_allocations and args.sparsities:
        try:
            from sparsemerge.prune.sensitivity import CRITERIA
        except ImportError:  # reported by the allocation step
            CRITERIA = (args.criterion,)
        if args.criterion not in CRITERIA:
            raise SparsemergeError(f"--criterion must be one of {', '.join(CRITERIA)}, got {args.criterion!r}")
    if args.dtype not in ("source", "float32", "float16", "bfloat16"):
        raise SparsemergeError(f"--dtype must be source, float32, float16 or bfloat16, got {args.dtype!r}")


def run_tune(args: argparse.Namespace) -> int:
    from sparsemerge.prune.tune_exec import quiet_transformers

    with quiet_transformers():
        return _run_tune(args)


def _run_tune(args: argparse.Namespace) -> int:
    from sparsemerge.eval.data import eval_windows
    from sparsemerge.io import ensure_writable, load_model, write_json_atomic
    from sparsemerge.prune.tune import build_candidates, choose, compute_allocations, mark_frontier
    from sparsemerge.prune.tune_exec import run_candidates, source_dtype, torch_threads
    from sparsemerge.prune.tune_report import TABLE_HEADERS, load_extra_points, plot_frontier, sparsity_verdict, table_rows

    constraint = _constraint(args)
    _check(args)
    ensure_writable(args.out, args.overwrite)  # fail before any work
    for extra in (args.plot, args.json):
        if extra:
            ensure_writable(extra, args.overwrite)
    extra_points = load_extra_points(args.extra_points) if args.extra_points else []
    if args.ray:
        from sparsemerge.prune.tune_exec import ray_module

        ray_module()  # a clear error now rather than after the sensitivity pass
        if args.workers > 1:
            raise SparsemergeError("choose either --workers N (local processes) or --ray ADDRESS (a Ray cluster), not both")

    prune_settings = {"calib": args.text, "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": 0}
    loaded = load_model(args.model)
    windows = eval_windows(loaded.tokenizer, args.text, args.seqlen, args.max_windows)
    allocations = []
    if not args.no_allocations and args.sparsities:
        with torch_threads(args.threads):
            allocations = compute_allocations(loaded.model, loaded.tokenizer, args.candidates, args.sparsities, prune_settings, args.criterion)
    del loaded
    dtype = source_dtype(args.model) if args.dtype == "source" else args.dtype
    candidates = build_candidates(args.methods, args.codecs, args.candidates, allocations, prune_settings, dtype=dtype)
    settings = {"windows": windows.tolist(), "threads": args.threads, "tokens": args.tokens, "prompt_tokens": 8, "repeats": args.repeats}
    print(f"tune: {len(candidates)} candidates of {args.model}, {windows.shape[0]} held-out windows x {args.seqlen} tokens, "
          + (f"Ray cluster {args.ray}" if args.ray else f"{args.workers} worker(s)"), file=sys.stderr)
    rows = run_candidates(args.model, [c.to_json() for c in candidates], settings, workers=args.workers,
                          ray_address=args.ray, scratch=args.scratch, progress=not args.no_progress)
    mark_frontier(rows)
    chosen, closest = choose(rows, constraint)

    from sparsemerge.cli.common import format_table

    print(format_table(TABLE_HEADERS, table_rows(rows, chosen)))
    front = [r["label"] for r in rows if r.get("frontier")]
    print(f"Pareto frontier (min ppl, min MB, max tok/s): {', '.join(front) if front else 'none'}")
    verdict = sparsity_verdict(rows)
    for line in verdict:
        print(line)
    record: dict[str, Any] = {
        "model": str(args.model), "text": args.text, "constraint": {"kind": constraint.kind, "value": constraint.value},
        "settings": {k: v for k, v in settings.items() if k != "windows"} | {"seqlen": args.seqlen, "windows": int(windows.shape[0]), "dtype": dtype},
        "chosen": chosen, "closest": closest, "verdict": verdict, "rows": rows, "candidates": [c.to_json() for c in candidates], "extra_points": extra_points,
    }
    title = f"{Path(str(args.model)).name}: {windows.shape[0]}x{args.seqlen} held-out tokens of {args.text}"
    if args.json:
        write_json_atomic(args.json, record)
    if args.plot and any(not r.get("error") for r in rows):
        plot_frontier(args.plot, rows, extra_points, chosen, title, verdict)
    if chosen is None:
        if closest is None:
            raise SparsemergeError(f"no candidate was evaluated successfully, so none meets {constraint.flag} {constraint.value:g}; "
                                   "see the errors in the table")
        near = rows[closest]
        measured = constraint.measured(near)
        raise SparsemergeError(f"no candidate meets {constraint.flag} {constraint.value:g}; the closest is #{closest} "
                               f"{near['label']!r} with {measured:.4g} (ppl {near['ppl']:.4g}, {near['mb']:.4g} MB, "
                               f"{near['speedup']:.3g}x dense speed); relax the limit or widen the search. Nothing was written to {args.out}")
    _write_choice(args, candidates[chosen], rows[chosen], record, extra_points, title)
    row = rows[chosen]
    print(f"chosen #{chosen} {row['label']}: ppl {row['ppl']:.4f}, {row['mb']:.3f} MB, {row['tok_s']:.1f} tok/s "
          f"({row['speedup']:.2f}x dense) -> {args.out}")
    return 0


def _write_choice(args: argparse.Namespace, candidate: Any, row: dict[str, Any], record: dict[str, Any],
                  extra_points: list[dict[str, Any]], title: str) -> None:
    """--out: the chosen candidate rebuilt (deterministic: same recipe, same thread count as
    its evaluation) and packed into model/, its recipe, every row, the plot - all or nothing."""
    import json
    import tempfile

    import yaml

    from sparsemerge.io import atomic_output
    from sparsemerge.prune.tune_exec import build_candidate, torch_threads
    from sparsemerge.prune.tune_report import plot_frontier

    with atomic_output(args.out, overwrite=args.overwrite) as tmp, tempfile.TemporaryDirectory(prefix="sparsemerge-tune-", dir=args.scratch) as work:
        with torch_threads(args.threads):
            info = build_candidate(args.model, candidate.to_json(), tmp / "model", work)
        if info["bytes"] != row["bytes"]:  # pruning is deterministic at a fixed thread count; say so if it was not
            print(f"warning: the chosen candidate rebuilt to {info['bytes']:,} bytes, not the {row['bytes']:,} it was measured "
                  "with (nondeterministic pruning?)", file=sys.stderr)
        head = (f"# sparsemerge tune: #{row['index']} {row['label']} - ppl {row['ppl']:.4f}, {row['mb']:.3f} MB, "
                f"{row['tok_s']:.1f} tok/s ({row['speedup']:.2f}x dense)\n")
        body: dict[str, Any] = {}
        if candidate.recipe is None:
            head += "# not pruned: pack the model with the options below\n"
        else:
            body["prune"] = candidate.recipe
        body["pack"] = candidate.pack
        (tmp / "recipe.yaml").write_text(head + yaml.safe_dump(body, sort_keys=False))
        (tmp / "tune.json").write_text(json.dumps(record, indent=1) + "\n")
        plot_frontier(tmp / "frontier.png", record["rows"], extra_points, row["index"], title, record["verdict"])
