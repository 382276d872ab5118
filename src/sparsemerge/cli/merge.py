"""``sparsemerge merge CONFIG.yaml OUT``: merge models as a mergekit-style config says."""
from __future__ import annotations

import argparse
from pathlib import Path

from sparsemerge.cli.common import KeepLinesFormatter, add_overwrite, defer, format_table
from sparsemerge.errors import SparsemergeError


def _methods_epilog() -> str:
    """Every registered merge method with the parameters it declares (per model, then global)."""
    from sparsemerge.merge import get_method, list_methods

    names = list_methods()
    width = max(map(len, names)) + 2
    lines = ["merge methods (merge_method in CONFIG) and their parameters (per model; global):"]
    for name in names:
        spec = get_method(name)
        model, glob = ", ".join(spec.model_params) or "-", ", ".join(spec.global_params) or "-"
        lines.append(f"  {name:<{width}}{model}; {glob}")
    return "\n".join(lines)


def _add_registry_texts(p: argparse.ArgumentParser) -> None:
    """The method list (epilog) and the --tv-format values, from the registries."""
    from sparsemerge.formats.base import FORMATS

    p.epilog = _methods_epilog()
    for action in p._actions:
        if action.dest == "tv_format":
            action.help = f"packed format of the task vector: {', '.join(FORMATS.names())} (default bitmask; see pack --help)"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="merge fine-tuned models (mergekit YAML configs)",
        description=(
            "Merge the models named in CONFIG (mergekit's YAML: merge_method, models or slices, base_model, "
            "parameters, dtype, out_dtype, ...) into OUT, streaming one tensor at a time, with one of the "
            "methods listed below (--list-methods gives their references)."
        ),
        formatter_class=KeepLinesFormatter,
    )
    p.add_argument("config", nargs="?", help="merge config YAML (mergekit format, plus sparsemerge keys)")
    p.add_argument("out", nargs="?", help="output folder (Hugging Face model, or a PEFT LoRA adapter with --lora-rank)")
    p.add_argument("--keep-pattern", help="project merged layer weights onto a sparsity pattern, e.g. 2:4")
    p.add_argument("--keep-mask", choices=["merged", "base"], help="mask for --keep-pattern: merged magnitudes (default) or the base's support")
    p.add_argument("--lora-rank", type=int, help="write the merge minus the base as a LoRA adapter of this rank (SVD)")
    p.add_argument("--task-vector-out", metavar="DIR", help="also write the merged task vector (merge - base) as a sparse, quantized packed checkpoint")
    p.add_argument("--tv-format", default="bitmask", help="packed format of the task vector (default bitmask)")
    p.add_argument("--tv-quant", default="int8", choices=["none", "int8", "int4"], help="value codec of the task vector (default int8)")
    p.add_argument("--seed", type=int, help="seed for DARE/DELLA (overrides the config's seed)")
    p.add_argument("--threads", type=int, help="tensors merged concurrently (default: CPU count, at most 4)")
    p.add_argument("--max-memory", metavar="SIZE",
                   help="working memory to stay within, e.g. 1.5G (default: what the process limits and the system leave); "
                        "larger tensors are merged in row blocks (linear, soups, task arithmetic, passthrough) or alone")
    p.add_argument("--list-methods", action="store_true", help="print the merge methods and exit")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_overwrite(p)
    p.set_defaults(func=run)
    defer(p, _add_registry_texts)  # the registries are read when merge is the command, not for every command


def memory_limited() -> bool:
    """A soft RLIMIT_DATA or RLIMIT_AS is set: freed memory must go back (no keep_freed_memory)."""
    import resource

    return any(resource.getrlimit(r)[0] != resource.RLIM_INFINITY for r in (resource.RLIMIT_DATA, resource.RLIMIT_AS))


def keep_freed_memory() -> None:
    """glibc only: keep freed large blocks for reuse instead of unmapping them. A merge streams
    thousands of tensor-sized buffers; by default each one is a fresh mmap whose pages fault in
    (zero-filled) one by one - on SmolLM2 that was 0.87 M page faults and ~0.5 s of a 4 s
    merge. The peak memory is unchanged (freed blocks are reused, not added)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        mallopt = None
    if mallopt is None:  # not glibc: nothing to tune
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    mallopt(M_MMAP_THRESHOLD, 1 << 30)  # blocks below 1 GiB come from the heap and are reused
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


def run(args: argparse.Namespace) -> int:
    from sparsemerge.merge import MERGE_METHODS, get_method, load_config, run_merge

    if args.list_methods:
        get_method("linear")  # imports the method modules
        rows = [(n, MERGE_METHODS.get(n).reference) for n in MERGE_METHODS.names()]
        print(format_table(["method", "reference"], rows, align="ll"))
        return 0
    if not args.config or not args.out:
        raise SparsemergeError("merge needs CONFIG.yaml and OUT (or --list-methods)")
    max_memory = None
    if args.max_memory is not None:
        from sparsemerge.merge.memory import parse_size

        max_memory = parse_size(args.max_memory)
    config = load_config(args.config)
    if args.seed is not None:
        config = type(config)(**{**config.model_dump(), "seed": args.seed})
    if args.task_vector_out:
        from sparsemerge.io import ensure_writable

        if not config.base_model:
            raise SparsemergeError("--task-vector-out needs a base_model in the config (the task vector is merge - base)")
        ensure_writable(args.task_vector_out, args.overwrite, inputs=[args.out, *config.referenced_models()])
    if max_memory is None and not memory_limited():
        keep_freed_memory()
    else:  # bounded: blocks of 1 MiB and more are mapped and unmapped, so freeing one returns it at once
        from sparsemerge import heap

        heap.set_mmap_threshold(1 << 20)
    report = run_merge(
        config, args.out, overwrite=args.overwrite, keep_pattern=args.keep_pattern, keep_mask=args.keep_mask,
        lora_rank=args.lora_rank, progress=not args.no_progress, workers=args.threads, max_memory=max_memory,
    )
    line = f"merged {report.tensors} tensors with {report.method} in {report.seconds:.1f} s -> {args.out}"
    if report.pattern:
        pat = report.pattern
        line += f"; {pat['tensors']} tensors kept on {pat['pattern']} (sparsity {pat['sparsity']:.4f}, {pat['violations']} violations)"
    if report.lora:
        errs = list(report.lora["relative_error"].values())
        if errs:
            line += f"; LoRA rank {report.lora['rank']}, mean relative error {sum(errs) / len(errs):.4f}"
    print(line)
    mem = report.memory or {}
    if mem.get("row_blocked") or mem.get("alone"):
        print(f"memory: budget {mem['budget_bytes'] / 2**30:.2f} GiB, {mem['slot_bytes'] / 2**20:.0f} MiB per tensor in flight; "
              f"{len(mem['row_blocked'])} tensors merged in row blocks, {len(mem['alone'])} alone")
    for seam in (report.stitch or {}).get("seams", []):
        print(f"stitch adapter before layer {seam['layer']} (into {seam['model']} layer {seam['source_layer']}): relative "
              f"error of the hidden state {seam['relative_error_identity']:.4f} as passthrough -> {seam['relative_error_fitted']:.4f} fitted")
    if (report.stitch or {}).get("tuning"):
        t = report.stitch["tuning"]
        print(f"stitch adapters trained: calibration loss {t['loss_before']:.4f} -> {t['loss_after']:.4f}")
    if args.task_vector_out:
        from sparsemerge.merge.task_vectors import write_packed_task_vector

        packed = write_packed_task_vector(args.out, config.base_model, args.task_vector_out, overwrite=args.overwrite,
                                          format=args.tv_format, quant=args.tv_quant)
        dense_bytes = sum(p.stat().st_size for p in Path(args.out).glob("*.safetensors"))
        print(f"task vector: {len(packed.packed)} tensors as {args.tv_format}/{args.tv_quant}, {packed.nbytes / 2**20:.1f} MiB "
              f"({packed.nbytes / max(dense_bytes, 1):.3f} of the merged model's {dense_bytes / 2**20:.1f} MiB) -> {args.task_vector_out}")
    return 0
