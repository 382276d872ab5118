"""``sparsemerge share``: cross-layer parameter sharing with per-layer residuals."""
from __future__ import annotations

import argparse

from sparsemerge.cli.common import add_overwrite, format_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "share",
        help="share each layer matrix across runs of similar layers, plus a small per-layer residual",
        description="Cross-layer sharing (chapter 10.3.6): for every kind of layer matrix, cut the layers into GROUPS "
        "runs of consecutive layers whose weights are closest (least squared distance to the run's mean, by dynamic "
        "programming), store one mean weight per run and per layer a low-rank (SVD) or sparse (top-magnitude) "
        "residual. The output folder loads with every sparsemerge command that loads a model (eval ppl ...).",
    )
    p.add_argument("model", help="HF folder, .safetensors with config.json, .gguf file, or smollm2")
    p.add_argument("out", help="output folder")
    p.add_argument("--groups", type=int, required=True, help="runs of consecutive layers per matrix kind")
    p.add_argument("--residual", choices=["lowrank", "sparse", "none"], default="lowrank")
    p.add_argument("--rank", type=int, default=16, help="lowrank: rank of each layer's residual (default 16)")
    p.add_argument("--density", type=float, default=0.05, help="sparse: fraction of residual entries kept (default 0.05)")
    p.add_argument("--include", action="append", help="regex on the in-layer tensor name to share (repeatable; default the projections)")
    p.add_argument("--dtype", help="stored dtype (default: the source's)")
    p.add_argument("--no-progress", action="store_true")
    add_overwrite(p)
    p.set_defaults(func=run_share)


def run_share(args: argparse.Namespace) -> int:
    from sparsemerge.errors import options_error
    from sparsemerge.merge.share import ShareConfig, share_layers

    options = {"groups": args.groups, "residual": args.residual, "rank": args.rank, "density": args.density, "dtype": args.dtype}
    if args.include:
        options["include"] = args.include
    try:
        config = ShareConfig(**options)
    except ValueError as exc:  # pydantic.ValidationError
        raise options_error("share options", exc) from None
    report = share_layers(args.model, args.out, config, overwrite=args.overwrite, progress=not args.no_progress)
    rows = [[k.kind, len(k.groups), " ".join(f"{a}-{b - 1}" for a, b in k.groups), f"{k.neighbour_cosine:.3f}",
             f"{k.within:.4f}", f"{k.residual_error:.4f}"] for k in report.kinds]
    print(format_table(["matrix", "runs", "layers", "cos(l, l+1)", "err shared", "err +residual"], rows, align="lrlrrr"))
    print(f"bytes {report.bytes_source / 2**20:.2f} MiB -> {report.bytes_shared / 2**20:.2f} MiB "
          f"({report.bytes_shared / max(report.bytes_source, 1):.3f}) in {report.seconds:.1f} s -> {args.out}")
    print("err: sum ||W_l - rebuilt||^2 / sum ||W_l||^2 over the layers")
    return 0
