"""``sparsemerge sensitivity`` (per-layer sensitivity to N:M patterns) and ``sparsemerge
allocate`` (one pattern per layer under a budget, written as a prune recipe)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sparsemerge.cli.common import add_overwrite, format_table
from sparsemerge.errors import SparsemergeError, options_error


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def register(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "sensitivity",
        help="per-layer sensitivity to candidate N:M patterns (table, JSON, plot)",
        description="Score how much each targeted Linear layer of MODEL minds each candidate pattern: first-order "
        "Taylor, diagonal Fisher, the SparseGPT (OBS) layer error, and the measured held-out loss with only that layer "
        "pruned. Feed the JSON to `sparsemerge allocate`.",
    )
    s.add_argument("model", help="HF folder, .safetensors or .gguf file, or a bundled model name (smollm2)")
    s.add_argument("--text", default="bbc", help="text: calibration split for gradients/Hessians, held-out split for "
                   "'measured' (bbc, bbc:CATEGORY, FILE, hf:NAME; default bbc)")
    s.add_argument("--criteria", default="taylor,fisher,obs", help="comma list of taylor, fisher, obs, measured")
    s.add_argument("--patterns", default="4:8,2:4,2:8,1:4", help="comma list of candidate patterns ('dense' scores 0)")
    s.add_argument("--nsamples", type=int, default=16, help="calibration windows (default 16)")
    s.add_argument("--seqlen", type=int, default=256, help="tokens per window (default 256)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--max-windows", type=int, default=8, help="held-out windows for 'measured' (default 8)")
    s.add_argument("--max-layers", type=int, help="'measured': only the first K targeted layers")
    s.add_argument("--layers", dest="layer_regex", help="'measured': only layers matching this regex")
    s.add_argument("--measured-method", choices=["magnitude", "sparsegpt"], default="magnitude",
                   help="how 'measured' prunes the one layer (default magnitude)")
    s.add_argument("--dampening", type=float, default=0.01, help="obs: SparseGPT dampening (default 0.01)")
    s.add_argument("--include", action="append", help="regex on module names to score (repeatable)")
    s.add_argument("--exclude", action="append", help="regex on module names to skip (repeatable)")
    s.add_argument("--json", dest="json_out", help="write the report as JSON")
    s.add_argument("--plot", help="write a PNG plot (scores per layer, one panel per criterion)")
    s.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_overwrite(s)
    s.set_defaults(func=run_sensitivity)

    a = sub.add_parser(
        "allocate",
        help="choose one pattern per layer under a sparsity, bytes or latency budget; write a prune recipe",
        description="Minimise the summed predicted loss (a criterion of SENS.json) over one pattern per layer under "
        "--budget (Lagrangian relaxation + greedy fill; --solver exact for small problems). --recipe-out writes a "
        "YAML that `sparsemerge prune --recipe` takes.",
    )
    a.add_argument("report", help="JSON written by `sparsemerge sensitivity --json`")
    a.add_argument("--budget", required=True, help="sparsity=0.5 (share of targeted weights zeroed, at least), "
                   "bytes=40MB (packed bytes of the targeted layers, at most) or latency=12ms (per token, at most)")
    a.add_argument("--candidates", help="comma list (default: the report's candidates), e.g. dense,4:8,2:4,1:4")
    a.add_argument("--criterion", default="taylor", help="which scores to minimise (default taylor)")
    a.add_argument("--codec", choices=["none", "int8", "int4"], default="none", help="values of the packed layers (bytes, latency)")
    a.add_argument("--group-size", type=int, default=128, help="quantization group (default 128)")
    a.add_argument("--value-bytes", type=int, help="bytes per unquantized value (default: the model's dtype)")
    a.add_argument("--latency-table", help="JSON {\"ROWSxCOLS\" or layer: {pattern: ms}} (default: measured now on this CPU)")
    a.add_argument("--solver", choices=["lagrangian", "exact"], default="lagrangian")
    a.add_argument("--method", default="sparsegpt", help="pruning method written into the recipe (default sparsegpt)")
    a.add_argument("--recipe-out", help="write the allocation as a prune recipe (YAML)")
    a.add_argument("--json", dest="json_out", help="write the allocation as JSON")
    add_overwrite(a)
    a.set_defaults(func=run_allocate)


def run_sensitivity(args: argparse.Namespace) -> int:
    from sparsemerge.io import ensure_writable, load_model
    from sparsemerge.prune.sensitivity import SensitivityConfig, layer_sensitivity
    from sparsemerge.prune.sensitivity_plot import format_report, plot_report

    values = {
        "criteria": _csv(args.criteria), "patterns": _csv(args.patterns), "calib": args.text, "data": args.text,
        "nsamples": args.nsamples, "seqlen": args.seqlen, "seed": args.seed, "max_windows": args.max_windows,
        "max_layers": args.max_layers, "layer_regex": args.layer_regex, "measured_method": args.measured_method,
        "dampening": args.dampening, "progress": not args.no_progress,
    }
    if args.include:
        values["include"] = args.include
    if args.exclude:
        values["exclude"] = args.exclude
    try:
        config = SensitivityConfig(**values)
    except Exception as exc:  # pydantic.ValidationError
        raise options_error("sensitivity options", exc) from None
    for out in (args.json_out, args.plot):  # fail before any work
        if out:
            ensure_writable(out, args.overwrite)
    if args.plot and not args.plot.lower().endswith(".png"):
        raise SparsemergeError(f"--plot writes a PNG; give a .png path, got {args.plot!r}")
    loaded = load_model(args.model)
    report = layer_sensitivity(loaded.model, loaded.tokenizer, config)
    report.meta["model"] = args.model
    print(format_report(report))
    if args.json_out:
        report.save(args.json_out, overwrite=args.overwrite)
        print(f"report -> {args.json_out}")
    if args.plot:
        plot_report(report, args.plot, overwrite=args.overwrite)
        print(f"plot -> {args.plot}")
    return 0


def run_allocate(args: argparse.Namespace) -> int:
    from sparsemerge.io import ensure_writable, write_json_atomic
    from sparsemerge.prune.allocate import Budget, allocate
    from sparsemerge.prune.sensitivity import SensitivityReport

    budget = Budget.parse(args.budget)
    for out in (args.recipe_out, args.json_out):
        if out:
            ensure_writable(out, args.overwrite)
    report = SensitivityReport.load(args.report)
    cost = None
    if args.latency_table:
        try:
            cost = json.loads(Path(args.latency_table).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise SparsemergeError(f"could not read latency table {args.latency_table!r}: {exc}") from None
        if budget.kind != "latency":
            raise SparsemergeError("--latency-table is used with a latency budget (--budget latency=...)")
    elif budget.kind == "latency":
        print("measuring per-layer latency on this CPU (batch 1) ...", file=sys.stderr)
    alloc = allocate(report, budget, _csv(args.candidates) if args.candidates else None, args.criterion, cost,
                     codec=args.codec, value_bytes=args.value_bytes, group_size=args.group_size, solver=args.solver)
    scores = report.scores(args.criterion)
    rows = [(name, p, scores[name][p]) for name, p in alloc.patterns.items()]
    print(format_table(["layer", "pattern", args.criterion], rows))
    counts: dict[str, int] = {}
    for p in alloc.patterns.values():
        counts[p] = counts.get(p, 0) + 1
    latency = "" if alloc.latency_ms is None else f", {alloc.latency_ms:.3f} ms/token"
    gap = "" if alloc.lower_bound == float("-inf") else f" (lower bound {alloc.lower_bound:.6g})"
    print(f"{len(alloc.patterns)} layers: " + ", ".join(f"{p} x{n}" for p, n in counts.items()))
    print(f"sparsity {alloc.sparsity:.4f} of targeted weights, {alloc.nbytes / 1e6:.3f} MB packed ({args.codec}){latency}; "
          f"predicted {args.criterion} loss {alloc.predicted_loss:.6g}{gap}")
    if args.recipe_out:
        alloc.write_recipe(args.recipe_out, overwrite=args.overwrite, method=args.method)
        print(f"recipe -> {args.recipe_out}")
    if args.json_out:
        write_json_atomic(args.json_out, alloc.to_json(), overwrite=args.overwrite)
        print(f"allocation -> {args.json_out}")
    return 0
