"""``sparsemerge prune`` and ``sparsemerge check``."""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from sparsemerge.cli.common import add_overwrite, format_table
from sparsemerge.errors import SparsemergeError, options_error


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "prune",
        help="prune a model to a sparsity pattern",
        description="Prune SRC (HF folder, .safetensors, .gguf or 'smollm2') and write OUT as a Hugging Face folder.",
    )
    p.add_argument("src", help="HF folder, .safetensors or .gguf file, or a bundled model name (smollm2)")
    p.add_argument("out", help="output Hugging Face folder")
    p.add_argument("--recipe", help="YAML recipe with PruneConfig keys; command-line options override it")
    p.add_argument("--pattern", help="2:4, 1:4, 4:8, block16:0.5, unstructured:0.6, unstructured-global:0.6 ... (default 2:4)")
    p.add_argument("--method", help="magnitude (default), gradient, taylor, wanda, sparsegpt")
    p.add_argument("--include", action="append", help="regex on module names to prune (repeatable; replaces the default)")
    p.add_argument("--exclude", action="append", help="regex on module names to keep dense (repeatable; replaces the default)")
    p.add_argument("--gamma", type=float, help="gradient weight in |W| + gamma*c*|grad W| (default 0.1)")
    p.add_argument("--calib", help="calibration text: bbc, bbc:CATEGORY, FILE, hf:NAME (default bbc)")
    p.add_argument("--nsamples", type=int, help="calibration windows (default 32)")
    p.add_argument("--seqlen", type=int, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=int, help="seed for the calibration windows (default 0)")
    p.add_argument("--dampening", type=float, help="SparseGPT: fraction of mean Hessian diagonal (default 0.01)")
    p.add_argument("--blocksize", type=int, help="SparseGPT: column block size (default 128)")
    p.add_argument(
        "--sequential",
        choices=["auto", "layer", "block", "off"],
        help="wanda/sparsegpt calibration order: auto (default: layer for sparsegpt, off for wanda), layer (one pass "
        "per block, each layer pruned as its input arrives), block (dense statistics pass, then a pruned pass), "
        "off (one-shot: statistics of the dense model)",
    )
    p.add_argument(
        "--permute",
        action="store_true",
        help="permute channels first (MLP, attention values, hidden; the model computes the same function) "
        "so the N:M masks keep more weight (NVIDIA ASP's channel permutation)",
    )
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    add_overwrite(p)
    p.set_defaults(func=run_prune)

    c = sub.add_parser(
        "check",
        help="verify a model's weights against its sparsity pattern(s)",
        description="Check every targeted tensor of MODEL against its pattern; exit 1 on any violation. "
        "Each layer's pattern comes from --pattern (one for all), else from --recipe (its pattern and "
        "layer_patterns), else from the pruning record that `sparsemerge prune` wrote beside the model "
        "(each layer the pattern it was pruned to, so mixed allocations check layer by layer), else 2:4.",
    )
    c.add_argument("model", help="HF folder, .safetensors or .gguf file")
    c.add_argument("--pattern", help="one pattern for every layer (e.g. 2:4)")
    c.add_argument("--recipe", help="prune recipe YAML: check each layer against its pattern / layer_patterns")
    c.add_argument("--include", action="append")
    c.add_argument("--exclude", action="append")
    c.add_argument("--quiet", action="store_true", help="print only the summary line")
    c.set_defaults(func=run_check)


def read_recipe(path: str) -> dict:
    """The PruneConfig keys of a recipe YAML (top level or under ``prune:``)."""
    from sparsemerge.io.yaml_config import read_yaml

    loaded = read_yaml(path, "recipe")
    if not isinstance(loaded, dict):
        raise SparsemergeError(f"recipe {path!r} must be a mapping of PruneConfig keys")
    values = loaded.get("prune", loaded)
    if not isinstance(values, dict):
        raise SparsemergeError(f"recipe {path!r}: 'prune' must be a mapping of PruneConfig keys")
    return dict(values)


def config_from_args(args: argparse.Namespace):
    from sparsemerge.prune.config import PruneConfig

    values: dict = {}
    if args.recipe:
        values.update(read_recipe(args.recipe))
    for key in ("pattern", "method", "include", "exclude", "gamma", "calib", "nsamples", "seqlen", "seed", "dampening", "blocksize", "sequential"):
        value = getattr(args, key, None)
        if value is not None:
            values[key] = value
    values["progress"] = not args.no_progress
    if getattr(args, "permute", False):
        values["permute"] = True
    try:
        return PruneConfig(**values)
    except SparsemergeError:
        raise
    except Exception as exc:  # pydantic.ValidationError
        raise options_error("pruning options", exc) from None


def run_prune(args: argparse.Namespace) -> int:
    from sparsemerge.io import ensure_writable, load_model, resolve_source, save_model
    from sparsemerge.prune.api import prune_
    from sparsemerge.prune.record import PRUNE_RECORD
    from sparsemerge.prune.streaming import prune_streaming, streaming_unsupported

    config = config_from_args(args)
    ensure_writable(args.out, args.overwrite, inputs=[args.src])  # fail before any work
    source = resolve_source(args.src)
    source_entry = lambda: {"name": args.src, "path": str(Path(source.path).resolve()), "kind": source.kind,  # noqa: E731
                            "sha256": source.checksum()}
    report = None
    if streaming_unsupported(config, source) is None:  # magnitude: one tensor at a time, not the whole model
        report = prune_streaming(source, args.out, config, overwrite=args.overwrite,
                                 record_extra={"source": source_entry()}, inputs=[args.src, source.path])
    if report is None:
        loaded = load_model(source)
        report = prune_(loaded.model, config, tokenizer=loaded.tokenizer)
        record = report.to_json()
        record["source"] = source_entry()
        save_model(loaded.model, loaded.tokenizer, args.out, overwrite=args.overwrite, records={PRUNE_RECORD: record},
                   inputs=[args.src, source.path])
    for name, reason in report.skipped:
        print(f"skipped {name}: {reason}", file=sys.stderr)
    counts: dict[str, int] = {}
    for layer in report.layers:
        counts[layer.pattern] = counts.get(layer.pattern, 0) + 1
    dense = sum(1 for _, reason in report.skipped if reason.startswith("dense by recipe"))
    if dense:
        counts["dense"] = dense
    patterns = config.pattern if len(counts) <= 1 else ", ".join(f"{n} x {p}" for p, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    if report.permutation is not None:
        perm = report.permutation
        print(
            f"permuted {perm['permuted']} of {len(perm['spaces'])} channel spaces: N:M-kept {perm['score']} score "
            f"{perm['kept_before']:.6g} -> {perm['kept_after']:.6g} (+{100 * perm['gain']:.2f}%)"
        )
    print(
        f"pruned {len(report.layers)} layers of {args.src} with {config.method} to {patterns}: "
        f"sparsity {report.sparsity:.4f} of pruned weights, {report.seconds:.1f} s -> {args.out}"
    )
    return 0


def check_patterns(args: argparse.Namespace):
    """``(LayerPatterns, where they come from)`` for ``check`` (see its description)."""
    from sparsemerge.prune.record import PRUNE_RECORD, read_prune_record, recorded_patterns
    from sparsemerge.selection import LayerPatterns

    if args.pattern:
        return LayerPatterns(args.pattern), args.pattern
    if args.recipe:
        from sparsemerge.prune.config import PruneConfig

        try:
            config = PruneConfig(**{k: v for k, v in read_recipe(args.recipe).items() if k in ("pattern", "layer_patterns")})
        except Exception as exc:  # pydantic.ValidationError
            raise options_error(f"recipe {args.recipe!r}", exc) from None
        return LayerPatterns(config.pattern, config.layer_patterns), f"the patterns of {args.recipe}"
    record = read_prune_record(args.model)
    if record is not None:
        return LayerPatterns.exact("2:4", recorded_patterns(record)), f"each layer's pattern from {PRUNE_RECORD}"
    return LayerPatterns("2:4"), "2:4"


def run_check(args: argparse.Namespace) -> int:
    from sparsemerge.io import open_tensor_source
    from sparsemerge.masks import check_pattern, pattern_applicable
    from sparsemerge.patterns import parse_pattern
    from sparsemerge.selection import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, DENSE, LayerFilter

    patterns, source = check_patterns(args)
    selected = LayerFilter(args.include or DEFAULT_INCLUDE, args.exclude or DEFAULT_EXCLUDE)
    rows = []
    violations = 0
    with open_tensor_source(args.model) as tensors:
        for name in tensors.names():
            if not name.endswith(".weight"):
                continue
            module = name[: -len(".weight")]
            if not selected(module):
                continue
            shape = tensors.shape(name)
            if len(shape) != 2:
                continue
            text = patterns(module)
            dims = "x".join(map(str, shape))
            if text == DENSE:
                rows.append((module, dims, DENSE, "-", "-", "skipped: dense by recipe"))
                continue
            pattern = parse_pattern(text)
            reason = pattern_applicable(shape, pattern)
            if reason is not None:
                rows.append((module, dims, str(pattern), "-", "-", f"skipped: {reason}"))
                continue
            report = check_pattern(tensors.get(name), pattern)
            violations += report.violations
            rows.append((module, dims, str(pattern), f"{report.sparsity:.4f}", report.violations,
                         "ok" if report.ok else "VIOLATES"))
    if not rows:
        raise SparsemergeError(f"no tensor of {args.model!r} matched the include/exclude regexes")
    if not args.quiet:
        print(format_table(["tensor", "shape", "pattern", "sparsity", "violations", "status"], rows))
    checked = sum(1 for r in rows if not r[5].startswith("skipped"))
    unfit = [r for r in rows if r[5].startswith("skipped") and r[2] != DENSE]
    if not checked and unfit:  # "0 tensors checked, 0 violations" would read as a pass
        raise SparsemergeError(
            f"the pattern fits none of the {len(unfit)} selected tensors ({unfit[0][0]} {unfit[0][1]}: "
            f"{unfit[0][5][len('skipped: '):]}); nothing was checked - choose a pattern whose M / block divides the shapes"
        )
    print(f"{checked} tensors checked against {source}: {violations} violations")
    return 1 if violations else 0
