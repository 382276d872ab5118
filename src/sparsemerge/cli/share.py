"""``sparsemerge share``: cross-layer parameter sharing with a per-layer scale and residual (chapter 10.3.6)."""
from __future__ import annotations

import argparse

from sparsemerge.cli.common import add_overwrite, format_table
from sparsemerge.errors import SparsemergeError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "share",
        help="share one weight across groups of layers, plus a per-layer scale and low-rank or sparse residual",
        description=(
            "Cross-layer sharing (chapter 10.3.6): the chosen projections of consecutive decoder layers are "
            "grouped; each group keeps one shared weight S (the mean) and each layer a_i S + R_i with R_i a "
            "rank-r or sparse approximation of its residual. Writes OUT (reconstructed weights, loadable "
            "anywhere) with sparsemerge_sharing.json and, with --compact, sharing.safetensors (S, a_i and the "
            "residual factors). Prints the layer distances, the bytes and the held-out perplexity before and after."
        ),
    )
    p.add_argument("model", help="decoder model: HF folder, .safetensors, .gguf or smollm2")
    p.add_argument("out", nargs="?", help="output folder (omit with --analyze)")
    p.add_argument("--kinds", default="mlp", help="mlp, attn, all or a comma list such as mlp.down_proj (default mlp)")
    p.add_argument("--group-size", type=int, default=2, help="consecutive layers per group (default 2)")
    p.add_argument("--threshold", type=float, help="group greedily while a layer is within this relative distance of the group mean")
    p.add_argument("--residual", default="lowrank:64",
                   help="none, lowrank:RANK or sparse:DENSITY (default lowrank:64)")
    p.add_argument("--compact", action="store_true", help="also write sharing.safetensors (shared weights + factors)")
    p.add_argument("--analyze", action="store_true", help="only print the distances between layers")
    p.add_argument("--eval", default="bbc", help="held-out text for perplexity ('none' skips it)")
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--no-progress", action="store_true")
    add_overwrite(p)
    p.set_defaults(func=run_share)


def parse_residual(text: str) -> dict:
    kind, _, value = text.partition(":")
    try:
        if kind == "none" and not value:
            return {"residual": "none"}
        if kind == "lowrank":
            return {"residual": "lowrank", "rank": int(value or 64)}
        if kind == "sparse":
            return {"residual": "sparse", "density": float(value or 0.1)}
    except ValueError:
        pass
    raise SparsemergeError(f"--residual {text!r}: use none, lowrank:RANK (e.g. lowrank:64) or sparse:DENSITY (e.g. sparse:0.1)")


def run_share(args: argparse.Namespace) -> int:
    import torch

    from sparsemerge.io import ensure_writable, load_model, save_model
    from sparsemerge.merge.sharing import (COMPACT_FILE, SHARING_RECORD, SharingConfig, layer_distances, parse_kinds,
                                           projection_weights, share_layers_)

    config = SharingConfig(kinds=parse_kinds(args.kinds), group_size=args.group_size, threshold=args.threshold,
                           **parse_residual(args.residual))
    if not args.analyze:
        if not args.out:
            raise SparsemergeError("pass OUT (or --analyze to only print the distances)")
        ensure_writable(args.out, args.overwrite, inputs=[args.model])
    loaded = load_model(args.model)
    for kind in config.kinds:
        d = layer_distances(projection_weights(loaded.model, kind))
        neighbours = [float(d[i, i + 1]) for i in range(d.shape[0] - 1)]
        off = d[~torch.eye(d.shape[0], dtype=torch.bool)]
        print(f"{kind}: distance to the next layer min {min(neighbours):.3f} mean {sum(neighbours) / len(neighbours):.3f} "
              f"max {max(neighbours):.3f}; any pair min {float(off.min()):.3f}")
    if args.analyze:
        return 0
    windows = None
    rows = []
    if args.eval != "none":
        from sparsemerge.eval.data import eval_windows
        from sparsemerge.eval.perplexity import perplexity

        windows = eval_windows(loaded.tokenizer, args.eval, 512, args.eval_windows)
        rows.append(("original", perplexity(loaded.model, windows, progress=not args.no_progress)))
    compact: dict = {} if args.compact else None
    report = share_layers_(loaded.model, config, compact)
    if windows is not None:
        rows.append(("shared", perplexity(loaded.model, windows, progress=not args.no_progress)))
    record = {"config": dict(vars(config)), "model": args.model, **report.to_json()}
    if rows:
        record["perplexity"] = dict(rows)

    def write_compact(folder) -> None:
        from sparsemerge.io.writer import save_safetensors

        save_safetensors(compact, folder / COMPACT_FILE, metadata={"format": "pt"})

    save_model(loaded.model, loaded.tokenizer, args.out, overwrite=args.overwrite, records={SHARING_RECORD: record},
               inputs=[args.model], extra=write_compact if compact is not None else None)
    groups = sum(len(g) for g in report.groups.values())
    print(f"{len(report.layers)} weights in {groups} groups; their bytes {report.dense_bytes / 2**20:.1f} MiB -> "
          f"{report.shared_bytes / 2**20:.1f} MiB ({report.ratio:.3f}x) at {config.value_bytes} bytes per value")
    if rows:
        print(format_table(["model", "perplexity", "x original"], [(n, v, v / rows[0][1]) for n, v in rows]))
    print(f"-> {args.out}")
    return 0
