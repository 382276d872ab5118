"""``sparsemerge pack``, ``sparsemerge unpack`` and ``sparsemerge inspect`` (compressed storage)."""
from __future__ import annotations

import argparse
import re
import sys
from typing import Any

from sparsemerge.cli.common import KeepLinesFormatter, add_overwrite, defer, format_table
from sparsemerge.errors import SparsemergeError, options_error

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.I)


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise SparsemergeError(f"bad size {text!r}; use e.g. 500MB, 2GB or a byte count")
    scale = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def _add_format_options(p: argparse.ArgumentParser) -> None:
    """What the formats declare: the list of ``--format`` values with their one line (epilog)
    and each format's own options as flags (e.g. nm: --pattern, --metadata; bsr: --block)."""
    from sparsemerge.formats.base import format_options, pack_formats

    formats = pack_formats()
    width = max(map(len, formats)) + 2
    p.epilog = "formats (--format):\n" + "\n".join(f"  {name:<{width}}{text}" for name, text in formats.items())
    group = p.add_argument_group("format options (declared by the formats)")
    options = format_options()
    for option in options.values():  # default None: run_pack tells a given value from the declared default
        group.add_argument(option.flag, dest=option.name, type=option.type, default=None, help=option.help)
    p.set_defaults(format_options=list(options))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pack",
        help="write a compressed (sparse / quantized) checkpoint",
        description="Pack SRC into OUT: targeted weights (the pruning include/exclude default) in a sparse "
        "format, the rest dense; safetensors shards plus a manifest with a checksum per tensor.",
        formatter_class=KeepLinesFormatter,
    )
    p.add_argument("src", help="HF folder, .safetensors or .gguf file, or smollm2")
    p.add_argument("out", help="output folder")
    p.add_argument("--format", default="nm", metavar="FORMAT", help="storage format, one of those listed below (default nm)")
    p.add_argument("--quant", default="none", help="value codec: none (default), int8, int4")
    p.add_argument("--group", type=int, default=128, help="quantization group size G (0 = per output channel; default 128)")
    p.add_argument("--asymmetric", action="store_true", help="asymmetric quantization (scale + zero point)")
    p.add_argument("--codebook", type=int, help="k-means codebook of K centroids (4..256) instead of --quant")
    p.add_argument("--dense-quant", default="none", help="codec for 2-D tensors kept dense, e.g. the embedding: none, int8, int4")
    p.add_argument("--dtype", default="keep", help="float dtype of stored values: keep (default), float16, bfloat16, float32")
    p.add_argument("--include", action="append", help="regex on module names to pack sparse (repeatable)")
    p.add_argument("--exclude", action="append", help="regex on module names to keep dense (repeatable)")
    p.add_argument("--shard-size", default="2GB", help="maximum shard size (default 2GB)")
    p.add_argument("--recipe", help="prune recipe YAML: pack each layer with its pattern / layer_patterns "
                   "(without --pattern or --recipe, a model pruned by `sparsemerge prune` packs each layer with the "
                   "N:M pattern its pruning record names)")
    p.add_argument("--no-progress", action="store_true")
    add_overwrite(p)
    p.set_defaults(func=run_pack)
    defer(p, _add_format_options)  # the registry is read when pack is the command, not for every command

    u = sub.add_parser("unpack", help="decode a packed checkpoint into a Hugging Face folder")
    u.add_argument("packed", help="packed folder (or a compressed-tensors sparse-24-bitmask folder)")
    u.add_argument("out", help="output Hugging Face folder")
    u.add_argument("--dtype", default="keep", help="keep (the source dtype, default), float32, float16, bfloat16")
    u.add_argument("--shard-size", default="5GB")
    u.add_argument("--no-progress", action="store_true")
    add_overwrite(u)
    u.set_defaults(func=run_unpack)

    i = sub.add_parser(
        "inspect",
        help="bytes and bits per weight of a checkpoint, or a size plan without a model",
        description="inspect PATH: per tensor format, bytes, bits/weight and ratio against dense fp16/fp32. "
        "inspect --plan SHAPE PATTERN...: the size of each format for a weight of SHAPE (e.g. 1024x1024) "
        "pruned to each PATTERN (2:4, block16:0.5, unstructured:0.5), or a sparsity such as 0.75 to list "
        "every N:M with M <= --max-m and its index overhead.",
    )
    i.add_argument("path", nargs="?", help="packed folder, compressed-tensors folder or HF folder")
    i.add_argument("--plan", nargs="+", metavar="ARG", help="SHAPE PATTERN [PATTERN ...]")
    i.add_argument("--value-bits", type=int, default=16, help="plan: bits per stored value (default 16, fp16)")
    i.add_argument("--max-m", type=int, default=8, help="plan: largest M when a sparsity is given (default 8)")
    i.add_argument("--quant-bits", type=int, choices=[4, 8], help="plan: also N:M with INT4/INT8 values")
    i.add_argument("--group", type=int, default=128, help="plan: quantization group size (0 = per channel; default 128)")
    i.add_argument("--all", action="store_true", help="list every tensor (default: the 40 largest)")
    i.add_argument("--verify", action="store_true", help="also read every tensor and check its checksum")
    i.set_defaults(func=run_inspect)


def layer_patterns_for_pack(args: argparse.Namespace) -> "tuple[dict, str | None]":
    """``({"pattern"?, "layer_patterns"?}, note)``: the per-layer patterns pack uses when
    --pattern is not given - from --recipe, else from the source's pruning record."""
    if getattr(args, "pattern", None) is not None:
        if args.recipe:
            raise SparsemergeError("give either --pattern (one pattern for every layer) or --recipe, not both")
        return {}, None
    if args.recipe:
        from sparsemerge.cli.prune import read_recipe

        recipe = read_recipe(args.recipe)
        values = {k: recipe[k] for k in ("pattern", "layer_patterns") if k in recipe}
        return values, f"layer patterns from {args.recipe}"
    from sparsemerge.prune.record import PRUNE_RECORD, read_prune_record, recorded_patterns

    record = read_prune_record(args.src)
    if record is None:
        return {}, None
    patterns = recorded_patterns(record, nm_only=True)
    if len(set(patterns.values())) <= 1:  # one pattern (or none): nothing mixed to carry
        only = next(iter(patterns.values()), None)
        return ({"pattern": only} if only not in (None, "dense") else {}), None
    import re

    counts: dict[str, int] = {}
    for value in patterns.values():
        counts[value] = counts.get(value, 0) + 1
    summary = ", ".join(f"{n} x {p}" for p, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    default = max(counts, key=lambda p: (counts[p] if p != "dense" else -1))
    overrides = {f"^{re.escape(name)}$": p for name, p in patterns.items() if p != default}
    return {"pattern": default, "layer_patterns": overrides}, f"each layer's pattern from {PRUNE_RECORD} ({summary})"


def run_pack(args: argparse.Namespace) -> int:
    from sparsemerge.formats.model import PackConfig, pack

    patterns, note = layer_patterns_for_pack(args)
    given = {name: getattr(args, name) for name in args.format_options if getattr(args, name) is not None}
    try:
        config = PackConfig(
            format=args.format,
            **{**given, **patterns},
            quant=args.quant,
            group_size=args.group,
            symmetric=not args.asymmetric,
            codebook=args.codebook,
            dense_quant=args.dense_quant,
            dtype=args.dtype,
            include=args.include,
            exclude=args.exclude,
            shard_size=parse_size(args.shard_size),
        )
    except SparsemergeError:
        raise
    except Exception as exc:  # pydantic.ValidationError
        raise options_error("pack options", exc, {"group_size": "--group", "symmetric": "--asymmetric"}) from None
    if note:
        print(f"packing {note}", file=sys.stderr)
    report = pack(args.src, args.out, config, overwrite=args.overwrite, progress=not args.no_progress)
    for name, reason in report.kept_dense:
        print(f"kept dense {name}: {reason}", file=sys.stderr)
    fp32 = 4 * report.numel
    print(
        f"packed {len(report.packed)} of {report.tensors} tensors as {config.format}: {report.nbytes:,} bytes "
        f"({report.nbytes / fp32:.4f}x dense fp32, {8 * report.nbytes / max(report.numel, 1):.3f} bits/weight), "
        f"{report.seconds:.1f} s -> {args.out}"
    )
    return 0


def run_unpack(args: argparse.Namespace) -> int:
    from sparsemerge.formats.model import unpack

    out = unpack(args.packed, args.out, overwrite=args.overwrite, dtype=args.dtype, shard_size=parse_size(args.shard_size), progress=not args.no_progress)
    print(f"unpacked {args.packed} -> {out}")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    if args.plan:
        return _plan(args)
    if not args.path:
        raise SparsemergeError("inspect needs a PATH, or --plan SHAPE PATTERN ...")
    from sparsemerge.formats.inspect import inspect_rows

    rows, total = inspect_rows(args.path, verify=args.verify)
    shown = rows if args.all else sorted(rows, key=lambda r: -r.nbytes)[:40]
    table = [(n, f, s, f"{b:,}", bpw, r16, r32) for n, f, s, b, bpw, r16, r32 in shown]
    print(format_table(["tensor", "format", "shape", "bytes", "bits/weight", "x fp16", "x fp32"], table))
    if len(shown) < len(rows):
        print(f"... {len(rows) - len(shown)} smaller tensors not shown (--all lists them)")
    nbytes, numel = total
    print(
        f"total: {len(rows)} tensors, {nbytes:,} bytes, {8 * nbytes / max(numel, 1):.3f} bits/weight, "
        f"{nbytes / max(2 * numel, 1):.4f}x dense fp16 ({2 * numel:,} B), {nbytes / max(4 * numel, 1):.4f}x dense fp32 ({4 * numel:,} B)"
    )
    if args.verify:
        from sparsemerge.formats.inspect import verified_what

        print(f"verified {len(rows)} tensors - checks: {verified_what(args.path)}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from sparsemerge.formats.size import SparsityChoices, storage_plan

    shape_text, *patterns = args.plan
    match = re.match(r"^\s*(\d+)\s*[xX,]\s*(\d+)\s*$", shape_text)
    if not match:
        raise SparsemergeError(f"--plan needs SHAPE as ROWSxCOLS (e.g. 1024x1024), got {shape_text!r}")
    shape = (int(match.group(1)), int(match.group(2)))
    if args.value_bits % 8:
        raise SparsemergeError(f"--value-bits must be a multiple of 8, got {args.value_bits}")
    vb = args.value_bits // 8
    if not patterns:
        raise SparsemergeError("--plan needs at least one PATTERN after SHAPE, e.g. 2:4 or 0.75")
    if shape[0] * shape[1] > 2**48:
        raise SparsemergeError(f"--plan shape {shape[0]}x{shape[1]} is larger than any weight (at most 2**48 elements)")
    # every section computed first: a pattern that does not fit fails before anything is printed
    items = list(storage_plan(shape, patterns, vb, max_m=args.max_m, quant_bits=args.quant_bits, group_size=args.group))
    for item in items:
        if isinstance(item, SparsityChoices):
            print(f"N:M patterns with sparsity {item.sparsity:g} and M <= {item.max_m} (index overhead):")
            table = [
                (f"{o.n}:{o.m}", o.bits2, o.index, f"{o.entropy:.3f}", f"{o.index / o.m:.3f}", f"{o.entropy / o.m:.3f}")
                for o in item.overheads
            ]
            print(format_table(["N:M", "bits2 b/group", "index b/group", "log2 C(M,N)", "index b/weight", "entropy b/weight"], table))
            if item.skipped:
                print(f"(no size plan for {', '.join(item.skipped)}: {shape[1]} columns are not divisible by M)")
        else:
            _print_plan(shape, item.pattern, vb, item.rows)
    return 0


def _print_plan(shape: tuple[int, int], pattern: str, vb: int, rows: list[Any]) -> None:
    dense = rows[0].nbytes
    print(f"\n{shape[0]}x{shape[1]} at {pattern}, {8 * vb}-bit values:")
    table = [(r.format, r.detail, f"{r.nbytes:,}", r.bits_per_weight, r.ratio(dense)) for r in rows]
    print(format_table(["format", "layout", "bytes", "bits/weight", "x smaller than dense"], table))
