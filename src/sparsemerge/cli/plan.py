"""``sparsemerge plan MODEL``: the decode runtime's execution plan for this CPU (per product:
pattern, codec, kernel, bytes read per token, and why that kernel)."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from sparsemerge.cli.run import _add_model_options

    p = sub.add_parser("plan", help="the decode runtime's execution plan: a kernel per layer for this CPU",
                       description="Analyse MODEL as the decode runtime does at load and print, for every product "
                       "of a decoding step, its pattern, codec, the kernel chosen for this CPU, the bytes it "
                       "reads per token and why.")
    _add_model_options(p)
    p.add_argument("--all-layers", action="store_true", help="one row per layer instead of collapsing equal layers")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the plan as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=run_plan)


def run_plan(args: argparse.Namespace) -> int:
    from sparsemerge.cli.run import _spec
    import json

    from sparsemerge.io.atomic import write_json_atomic
    from sparsemerge.runtime.plan import build_plan

    if args.json:
        from sparsemerge.io.atomic import ensure_writable

        ensure_writable(args.json, args.overwrite)  # before the minutes of loading
    spec = _spec(args)
    with spec.setup():
        loaded = spec.load(dense=False)
        plan = build_plan(loaded.model, args.act_quant)
    print(plan.format_table(collapse=not args.all_layers))
    if args.json:
        write_json_atomic(args.json, json.loads(plan.to_json()), overwrite=args.overwrite)
    return 0
