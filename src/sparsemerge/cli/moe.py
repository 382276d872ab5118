"""``sparsemerge moe CONFIG.yaml OUT`` (a mixture of experts from task models, mergekit-moe's
YAML) and ``sparsemerge moe-route MODEL --text ...`` (which experts each text goes to)."""
from __future__ import annotations

import argparse
from pathlib import Path

from sparsemerge.cli.common import KeepLinesFormatter, add_overwrite
from sparsemerge.errors import SparsemergeError

_GATE_HELP = """gate modes (gate_mode in CONFIG): how each expert's router row is set from its prompts
  hidden        hidden state of each prompt's last token entering every layer (default)
  hidden_avg    the same averaged over the prompt's positions
  cheap_embed   normalised sum of the prompts' token embeddings (no forward pass)
  random        seeded N(0, 1) rows (seed: in CONFIG); uniform_random: U(+-1/sqrt(hidden))
Without shared_experts the output is a Mixtral model; with one shared expert, Qwen2-MoE."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "moe",
        help="assemble a mixture of experts from task models (mergekit-moe YAML)",
        description=(
            "Build a Mixtral (or, with a shared expert, Qwen2-MoE) model from CONFIG, mergekit-moe's YAML "
            "(base_model, gate_mode, dtype, experts_per_token, experts: [{source_model, positive_prompts, "
            "negative_prompts}], shared_experts): attention, norms and embeddings from the base, each expert's "
            "MLPs from its model, the routers from the prompts."
        ),
        epilog=_GATE_HELP,
        formatter_class=KeepLinesFormatter,
    )
    p.add_argument("config", help="MoE config YAML (mergekit-moe format)")
    p.add_argument("out", help="output Hugging Face folder")
    p.add_argument("--allow-identical-experts", "--i-understand-this-is-not-useful-without-training", action="store_true",
                   dest="allow_identical", help="accept experts that are all the same model (a starting point for training)")
    p.add_argument("--keep-pattern", metavar="N:M", help="project every expert weight onto this N:M pattern (e.g. 2:4; "
                   "overrides keep_pattern in CONFIG) so the experts can run on the N:M kernels")
    p.add_argument("--route", action="append", metavar="TEXT", help="after building, print the routing of TEXT (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_overwrite(p)
    p.set_defaults(func=run)

    r = sub.add_parser(
        "moe-route",
        help="show which experts an MoE model routes each text's tokens to",
        description="Run texts through an MoE model (Mixtral, Qwen2-MoE) and tabulate the share of router selections per expert.",
    )
    r.add_argument("model", help="MoE model folder (e.g. the output of sparsemerge moe)")
    r.add_argument("--text", action="append", default=[], help="a text to route (repeatable)")
    r.add_argument("--file", action="append", default=[], type=Path, help="a file of texts, one per non-empty line (repeatable)")
    r.add_argument("--per-layer", action="store_true", help="also a table per text with one row per layer")
    r.add_argument("--tokens", action="store_true", help="also each token's most frequent first-ranked expert")
    r.add_argument("--kernels", metavar="N:M", help="run the experts on the project's N:M kernels with this pattern "
                   "(an MoE built with --keep-pattern)")
    r.add_argument("--json", type=Path, help="write the report as JSON")
    r.set_defaults(func=run_route)


def run(args: argparse.Namespace) -> int:
    from sparsemerge.merge.moe import build_moe, format_routing, load_moe_config, route_texts

    config = load_moe_config(args.config)
    if args.keep_pattern:
        config = type(config)(**{**config.model_dump(), "keep_pattern": args.keep_pattern})
    report = build_moe(config, args.out, overwrite=args.overwrite, allow_identical_experts=args.allow_identical,
                       progress=not args.no_progress)
    print(f"built a {report.architecture} MoE: {report.experts} experts x {report.layers} layers, gate_mode "
          f"{report.gate_mode}, {report.tensors} tensors in {report.seconds:.1f} s -> {args.out}")
    if report.degenerate_layers:
        print(f"warning: layers {report.degenerate_layers} have nearly dependent router rows (prompts too similar)")
    if args.route:
        print(format_routing(route_texts(args.out, args.route)))
    return 0


def run_route(args: argparse.Namespace) -> int:
    from sparsemerge.io import write_json_atomic
    from sparsemerge.merge.moe import format_routing, route_texts

    texts = list(args.text)
    for path in args.file:
        try:
            texts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
        except OSError as exc:
            raise SparsemergeError(f"could not read texts from {str(path)!r}: {exc}") from exc
    if not texts:
        raise SparsemergeError("moe-route needs at least one --text or --file")
    if args.kernels:
        from sparsemerge.io import load_model
        from sparsemerge.merge.moe import expert_labels, sparse_experts_

        loaded = load_model(args.model)
        swapped = sparse_experts_(loaded.model, args.kernels)
        print(f"experts on the {args.kernels} kernels: {len(swapped.swapped)} layers, {swapped.packed_bytes / 2**20:.1f} MiB packed "
              f"(dense {swapped.dense_bytes / 2**20:.1f} MiB)")
        n_exp = len(loaded.model.get_submodule(swapped.swapped[0]).gate_up)
        report = route_texts(loaded.model, texts, loaded.tokenizer, expert_names=expert_labels(loaded.source.folder, n_exp))
    else:
        report = route_texts(args.model, texts)
    print(format_routing(report, per_layer=args.per_layer, tokens=args.tokens))
    if args.json:
        write_json_atomic(args.json, report.to_json())
    return 0


__all__ = ["register"]
