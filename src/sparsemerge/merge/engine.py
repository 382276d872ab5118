"""The streaming merge engine: one output tensor at a time, from lazily opened inputs.

For each planned tensor the engine reads that tensor from each input (positioned reads,
:mod:`sparsemerge.io.reader`), converts to the working dtype (``dtype:`` or the inputs'
promoted dtype), resolves the method's parameters for that tensor (filters, gradients),
merges, optionally projects onto an N:M pattern, converts to ``out_dtype`` and writes the
bytes to the output shard (:class:`sparsemerge.io.writer.ShardedWriter`, headers laid out
from the plan). Peak memory is a few tensors. The output folder (config, tokenizer, generation
config, shards, ``sparsemerge_merge.json``) appears atomically.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from sparsemerge import heap
from sparsemerge.errors import SparsemergeError
from sparsemerge.finite import all_finite
from sparsemerge.io.dtypes import dtype_from_name, dtype_name
from sparsemerge.io.writer import PlannedTensor, ShardedWriter
from sparsemerge.merge import memory as memory_mod
from sparsemerge.merge import mergekit_yaml as params_mod
from sparsemerge.merge.base import MergeInputs, MethodSpec, get_method, seed_for
from sparsemerge.merge.config import MergeConfig, load_config
from sparsemerge.merge.lora import LoraAdapter, LoraTensorSource, is_lora_adapter, lora_config, lora_key, low_rank_factors
from sparsemerge.merge.plan import Source, TensorJob, build_plan, split_layer
from sparsemerge.merge.sparsity import PatternProjector
from sparsemerge.merge.stitch import find_seams, fit_adapters, stitch_calibration

log = logging.getLogger(__name__)

MERGE_RECORD = "sparsemerge_merge.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
    "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


@dataclass
class MergeReport:
    out: Path
    method: str
    tensors: int
    seconds: float
    files: list[str] = field(default_factory=list)
    pattern: Optional[dict[str, Any]] = None
    lora: Optional[dict[str, Any]] = None
    stitch: Optional[dict[str, Any]] = None  # fitted seam adapters (passthrough slices with adapter)
    # the memory plan (merge/memory.py): budget, per-job slot, tensors computed in row blocks
    # or alone; machine-dependent, so not part of the merge record
    memory: Optional[dict[str, Any]] = None

    def to_json(self) -> dict[str, Any]:
        data = {"method": self.method, "tensors": self.tensors, "seconds": round(self.seconds, 3),
                "files": self.files, "keep_pattern": self.pattern, "lora": self.lora}
        if self.stitch is not None:
            data["stitch"] = self.stitch
        return data


def open_model(ref: str, config: MergeConfig) -> Source:
    """A tensor source for a model reference: a checkpoint, a LoRA adapter folder, or ``BASE+ADAPTER``."""
    from sparsemerge.io import open_tensor_source

    if "+" in ref and not Path(ref).exists():
        base_ref, adapter_ref = ref.split("+", 1)
        return LoraTensorSource(open_tensor_source(base_ref), LoraAdapter(adapter_ref))
    if Path(ref).is_dir() and is_lora_adapter(ref):
        adapter = LoraAdapter(ref)
        candidates = [c for c in (adapter.base_model, config.base_model) if c and c != ref]
        for cand in candidates:
            try:
                return LoraTensorSource(open_tensor_source(cand), adapter)
            except SparsemergeError:
                continue
        raise SparsemergeError(
            f"LoRA adapter {ref!r}: its base {adapter.base_model!r} is not found locally; set base_model in the config "
            f"or write the model as BASE+{ref}"
        )
    return open_tensor_source(ref)


def _method_inputs(job: TensorJob, spec: MethodSpec, tensors: list[torch.Tensor], config: MergeConfig) -> MergeInputs:
    globals_ = params_mod.resolve_globals(spec, job.slice_scopes, job.out_name, job.t)
    if spec.base_is_input:
        chosen = list(range(len(job.inputs)))
    else:
        chosen = [i for i, ref in enumerate(job.inputs) if not ref.is_base]
    params = []
    for i in chosen:
        ref = job.inputs[i]
        wanted = spec.model_params if (spec.base_is_input or not ref.is_base) else {}
        params.append({k: params_mod.resolve(k, d, ref.scopes, job.out_name, job.t, f"{ref.model}:{job.out_name}") for k, d in wanted.items()})
    base_pos = next((i for i, ref in enumerate(job.inputs) if ref.is_base), None)
    gen = torch.Generator().manual_seed(seed_for(config.seed, job.out_name)) if spec.stochastic else None
    return MergeInputs(
        name=job.out_name,
        tensors=[tensors[i] for i in chosen],
        params=params,
        base=tensors[base_pos] if base_pos is not None else None,
        globals=globals_,
        generator=gen,
        base_index=chosen.index(base_pos) if (spec.base_is_input and base_pos is not None) else None,
    )


def run_merge(
    config: "MergeConfig | str | Path | dict[str, Any]",
    out: "str | Path",
    overwrite: bool = False,
    keep_pattern: Optional[str] = None,
    keep_mask: Optional[str] = None,
    lora_rank: Optional[int] = None,
    progress: bool = False,
    workers: Optional[int] = None,
    max_memory: Optional[int] = None,
) -> MergeReport:
    """Merge as ``config`` says and write ``out`` (an HF folder, or a LoRA adapter with ``lora_rank``).

    ``keep_pattern``/``keep_mask``/``lora_rank`` override the config's keys of the same names;
    ``workers`` threads compute tensors concurrently (default: the CPU count, at most 4);
    ``max_memory`` bytes bound the working memory (default: what the process limits and the
    system leave, :func:`sparsemerge.merge.memory.memory_budget`): larger tensors are computed
    in row blocks or alone."""
    from sparsemerge.io import atomic_output, ensure_writable

    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    updates = {k: v for k, v in (("keep_pattern", keep_pattern), ("keep_mask", keep_mask), ("lora_rank", lora_rank)) if v is not None}
    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise SparsemergeError(f"lora_rank (--lora-rank) must be a whole number >= 1, got {lora_rank!r}")
    if keep_pattern is not None:
        from sparsemerge.patterns import parse_pattern

        try:
            parse_pattern(keep_pattern)
        except ValueError as exc:
            raise SparsemergeError(f"keep_pattern (--keep-pattern) {keep_pattern!r}: {exc}") from None
    if updates:  # validated like the YAML's own keys (a clear error, not a pydantic traceback)
        cfg = load_config({**cfg.model_dump(), **updates})
    inputs = _input_paths(cfg)
    ensure_writable(out, overwrite, inputs=inputs)
    workers = workers or min(4, os.cpu_count() or 1)
    if isinstance(workers, bool) or int(workers) < 1:
        raise SparsemergeError(f"workers (--threads) must be a whole number >= 1, got {workers!r}")
    spec = get_method(cfg.merge_method)
    if getattr(spec.fn, "sparsify", None) is not None:
        # the trims' selection is numba code: import it here, before the workers start and
        # before memory runs short (imported first in a worker thread under memory pressure,
        # numba's import of scipy - whose OpenBLAS retries its buffers forever - hung a merge)
        import sparsemerge.merge.sortselect  # noqa: F401
    params_mod.check_values(spec, _all_scopes(cfg))
    start = time.perf_counter()
    sources: dict[str, Source] = {ref: open_model(ref, cfg) for ref in cfg.referenced_models()}
    unknown = params_mod.unknown_parameters(spec, _all_scopes(cfg))
    if unknown:
        known = sorted(set(spec.global_params) | set(spec.model_params)) or ["(none)"]
        raise SparsemergeError(f"merge method {spec.name!r} does not take parameter(s) {', '.join(unknown)}; it takes: {', '.join(known)}")
    jobs = build_plan(cfg, spec, sources)
    n_inputs = {len([i for i in j.inputs if spec.base_is_input or not i.is_base]) for j in jobs}
    for n in n_inputs:
        spec.check_counts(n, any(i.is_base for i in jobs[0].inputs) if jobs else False)
    work_dtype = dtype_from_name(cfg.dtype, "dtype") if cfg.dtype else None
    out_dtype = dtype_from_name(cfg.out_dtype, "out_dtype") if cfg.out_dtype else None
    projector = PatternProjector(cfg.keep_pattern, cfg.keep_mask) if cfg.keep_pattern else None
    lora_out = cfg.lora_rank is not None
    if lora_out and not any(j.base for j in jobs):
        raise SparsemergeError("writing a LoRA (lora_rank) needs a base_model: the adapter is the merge minus the base")
    lora_targets = _lora_targets(jobs, sources) if lora_out else set()
    planned = []
    for j in jobs:
        wd = work_dtype if (work_dtype and j.dtype.is_floating_point) else j.dtype
        od = out_dtype if (out_dtype and j.dtype.is_floating_point) else wd
        planned.append(PlannedTensor(j.out_name, j.shape, od))
    workers = max(1, int(workers or 1))
    budget = memory_mod.memory_budget(max_memory)
    slot = memory_mod.slot_bytes(budget, workers)
    block_plans = [_block_plan(j, spec, sources, work_dtype, slot, budget, projector, lora_out) for j in jobs]
    with atomic_output(out, overwrite=overwrite, inputs=inputs) as tmp:
        metadata = {"format": "pt", "merged_by": "sparsemerge", "merge_method": spec.name}
        writer = None if lora_out else ShardedWriter(tmp, cfg.shard_bytes, plan=planned, metadata=metadata, layout="plan")
        lora_state: dict[str, torch.Tensor] = {}
        lora_errors: dict[str, float] = {}
        base_pos = {id(j): next((i for i, r in enumerate(j.inputs) if r.is_base), None) for j in jobs}

        def compute(job: TensorJob, plan: PlannedTensor) -> Any:
            raw = [sources[ref.model].get(ref.name) for ref in job.inputs]
            bpos = base_pos[id(job)]
            if not raw[0].is_floating_point():
                merged = raw[bpos if bpos is not None else 0].clone()
            else:
                wd = work_dtype or job.dtype
                tensors = [t.to(wd) for t in raw]
                merged = spec.fn(_method_inputs(job, spec, tensors, cfg))
                if not all_finite(merged):  # no tensor-sized temporary (isfinite(...).all() needs ~1.7x)
                    _refuse_non_finite(job, tensors)
                if projector is not None:
                    merged = projector(job.out_name, merged, tensors[bpos] if bpos is not None else None)
            if not lora_out:
                return merged.to(plan.dtype)
            if job.out_name not in lora_targets:
                return None
            assert bpos is not None
            return low_rank_factors(merged.float() - raw[bpos].float(), int(cfg.lora_rank or 0))

        def compute_rows(job: TensorJob, plan: PlannedTensor, rows: int) -> Any:
            """The merged tensor in blocks of ``rows`` rows (exact: rowwise methods, or a
            row_prepare that computed the whole-tensor step first)."""
            wd = work_dtype or job.dtype
            positions = _chosen_positions(job, spec)
            bpos = base_pos[id(job)]

            def block(r0: int, r1: int, models: Optional[list[int]] = None) -> MergeInputs:
                """Rows r0:r1 of the inputs (only the base and ``models``, indices of the
                method's tensors, when given; the others are None)."""
                wanted = set(range(len(job.inputs))) if models is None else {positions[m] for m in models} | {bpos}
                tensors = [_read_rows(sources[ref.model], ref.name, r0, r1).to(wd) if p in wanted else None
                           for p, ref in enumerate(job.inputs)]
                inputs = _method_inputs(job, spec, tensors, cfg)
                inputs.rows = (r0, r1)
                return inputs

            state = spec.row_prepare(block, job.shape[0], rows) if spec.row_prepare is not None else None
            if spec.row_prepare is not None and state is None:  # the method needs the whole tensor after all
                yield compute(job, plan)
                return
            for r0 in range(0, job.shape[0], rows):
                inputs = block(r0, min(job.shape[0], r0 + rows))
                inputs.row_state = state
                merged = spec.fn(inputs)
                if not all_finite(merged):
                    _refuse_non_finite(job, [t for t in (inputs.base, *inputs.tensors) if t is not None])
                yield merged.to(plan.dtype)
                del inputs, merged

        def emit(job: TensorJob, result: Any) -> None:
            if lora_out:
                if result is not None:
                    b, a, err = result
                    lora_state[lora_key(job.out_name, "lora_A")] = a
                    lora_state[lora_key(job.out_name, "lora_B")] = b
                    lora_errors[job.out_name] = round(err, 6)
            else:
                assert writer is not None
                writer.write(job.out_name, result)

        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc=f"merge {spec.name}", unit="tensor")
        # Tensors are computed by a few worker threads (torch releases the GIL; sorts are
        # single-threaded) and written in plan order; at most 2 * workers are in flight. A
        # tensor over the memory slot is computed by this thread: in row blocks, or (methods
        # that need the whole tensor) alone, once everything before it is written.
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        try:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                pending: deque = deque()
                k = 0
                while True:
                    while len(pending) < 2 * workers and k < len(jobs):
                        bp = block_plans[k]
                        if bp.exclusive and pending:
                            break  # drain first
                        job, plan = jobs[k], planned[k]
                        k += 1
                        if bp.exclusive or bp.rows:
                            pending.append((job, plan, bp, None))
                            if bp.exclusive:
                                break  # nothing runs beside it
                        else:
                            pending.append((job, plan, bp, pool.submit(compute, job, plan)))
                    if not pending:
                        break
                    job, plan, bp, future = pending.popleft()
                    if bp.exclusive:  # alone: hand what earlier tensors freed back before it starts
                        heap.trim()
                    try:
                        if bp.rows:
                            assert writer is not None
                            writer.write_rows(job.out_name, compute_rows(job, plan, bp.rows))
                        else:
                            result = compute(job, plan) if future is None else future.result()
                            emit(job, result)
                            del result
                    except (MemoryError, RuntimeError) as exc:
                        if isinstance(exc, RuntimeError) and "allocate" not in str(exc):
                            raise
                        raise _out_of_memory(job, spec, sources, work_dtype, budget, bp, exc) from None
                    del future
                    if bar is not None:
                        bar.update(1)
            if writer is not None:
                writer.finish()
        finally:
            if writer is not None:
                writer.close()
            if bar is not None:
                bar.close()
        report = MergeReport(Path(out), spec.name, len(jobs), 0.0)
        report.memory = {
            "budget_bytes": budget, "slot_bytes": slot, "workers": workers,
            "row_blocked": {j.out_name: bp.rows for j, bp in zip(jobs, block_plans) if bp.rows},
            "alone": [j.out_name for j, bp in zip(jobs, block_plans) if bp.exclusive],
        }
        if lora_out:
            _write_lora(tmp, lora_state, cfg, sorted(lora_targets))
            report.lora = {"rank": cfg.lora_rank, "relative_error": lora_errors}
            report.files = ["adapter_model.safetensors"]
        else:
            report.files = list(writer.files) if writer else []
            _copy_model_files(tmp, cfg, sources, jobs, out_dtype or work_dtype)
            seams = find_seams(cfg)
            if seams:  # stitching: fit the seam adapters on the stitched model just written
                report.stitch = fit_adapters(tmp, seams, stitch_calibration(cfg), progress)
        if projector is not None:
            report.pattern = projector.summary()
        report.seconds = time.perf_counter() - start
        record = {"config": cfg.model_dump(exclude_none=True), **report.to_json()}
        (tmp / MERGE_RECORD).write_text(json.dumps(record, indent=2, default=str) + "\n")
    for src in sources.values():
        close = getattr(src, "close", None)
        if close:
            close()
    return report


def _block_plan(job: TensorJob, spec: MethodSpec, sources: dict[str, Source], work_dtype: Optional[torch.dtype],
                slot: Optional[int], budget: Optional[int], projector: Optional[PatternProjector],
                lora_out: bool) -> memory_mod.BlockPlan:
    """Whole, in row blocks, or alone (merge/memory.py): row blocks only where each output row
    is the method's formula over the same input rows - a rowwise method, every input of the
    output's shape, no pattern projection or LoRA factorization (they need the whole tensor)."""
    stored = [sources[ref.model].dtype(ref.name) for ref in job.inputs]
    wd = work_dtype if (work_dtype and job.dtype.is_floating_point) else job.dtype
    need = memory_mod.working_set(tuple(job.shape), stored, wd)
    rowwise = (
        (spec.rowwise or spec.row_prepare is not None) and job.dtype.is_floating_point and not lora_out
        and all(tuple(sources[ref.model].shape(ref.name)) == tuple(job.shape) for ref in job.inputs)
        and not (projector is not None and projector.targets(job.out_name))
    )
    plan = memory_mod.plan_tensor(tuple(job.shape), need, slot, rowwise)
    if plan.rows and spec.row_prepare is not None:  # its whole-tensor step runs with nothing beside it
        if budget is not None and memory_mod.prepare_bytes(tuple(job.shape), len(job.inputs)) > budget:
            return memory_mod.BlockPlan(exclusive=True)
        return memory_mod.BlockPlan(rows=plan.rows, exclusive=True)
    return plan


def _out_of_memory(job: TensorJob, spec: MethodSpec, sources: dict[str, Source], work_dtype: Optional[torch.dtype],
                   budget: Optional[int], bp: memory_mod.BlockPlan, exc: BaseException) -> SparsemergeError:
    stored = [sources[ref.model].dtype(ref.name) for ref in job.inputs]
    need = memory_mod.working_set(tuple(job.shape), stored, work_dtype or job.dtype)
    how = f"in blocks of {bp.rows} rows" if bp.rows else "whole"
    room = f"the budget was {budget / 2**30:.2f} GiB" if budget is not None else "no budget was known"
    hint = ("" if (spec.rowwise or spec.row_prepare) else f"; {spec.name} cannot merge it in row blocks (linear, "
            "task_arithmetic, model_soup, passthrough and ties without rescale can)")
    what = " ".join(str(exc).split())[:160]
    return SparsemergeError(
        f"out of memory merging {job.out_name} {list(job.shape)} {how} (~{need / 2**30:.2f} GiB of working memory whole; "
        f"{room}){hint}. Raise the memory limit, pass a smaller --max-memory so more is done in blocks, or use "
        f"--threads 1. Nothing was written. (The allocation that failed: {what})"
    )


def _chosen_positions(job: TensorJob, spec: MethodSpec) -> list[int]:
    """Positions in ``job.inputs`` of the method's ``tensors`` (as :func:`_method_inputs` picks them)."""
    return [i for i, ref in enumerate(job.inputs) if spec.base_is_input or not ref.is_base]


def _read_rows(source: Source, name: str, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a tensor: one positioned read where the source can (safetensors),
    else the whole tensor sliced (a LoRA view: base + B A)."""
    get_rows = getattr(source, "get_rows", None)
    if get_rows is not None:
        return get_rows(name, start, stop)
    return source.get(name)[start:stop].clone()


def _refuse_non_finite(job: TensorJob, tensors: list[torch.Tensor]) -> None:
    """A merged tensor with NaN or inf: name the input that holds them, or else the parameters
    (e.g. weight 1e308 overflows the working dtype)."""
    for ref, t in zip(job.inputs, tensors):
        if not bool(torch.isfinite(t).all()):
            raise SparsemergeError(f"input {ref.model!r} holds NaN or inf values in {ref.name!r}; it cannot be merged")
    raise SparsemergeError(
        f"merging {job.out_name!r} gave NaN or inf values from finite inputs: a weight or parameter is too large "
        f"for the working dtype {str(tensors[0].dtype).replace('torch.', '')}; use smaller values"
    )


def _all_scopes(cfg: MergeConfig) -> list[Optional[dict[str, Any]]]:
    scopes: list[Optional[dict[str, Any]]] = [cfg.parameters]
    scopes += [m.parameters for m in cfg.models or []]
    for sl in cfg.slices or []:
        scopes.append(sl.parameters)
        scopes += [s.parameters for s in sl.sources]
    return scopes


def _lora_targets(jobs: list[TensorJob], sources: dict[str, Source]) -> set[str]:
    """Tensors written as LoRA factors: those some input adapter targets, else every 2-D
    layer weight outside the norms (when the inputs are full models)."""
    from sparsemerge.selection import DEFAULT_EXCLUDE, LayerFilter

    adapters = [s.adapter for s in sources.values() if isinstance(s, LoraTensorSource)]
    if adapters:
        return {t for a in adapters for t in a.targets()}
    kept = LayerFilter(None, DEFAULT_EXCLUDE)  # any layer weight; split_layer stands for the include list
    return {j.out_name for j in jobs if len(j.shape) == 2 and split_layer(j.out_name)
            and kept(j.out_name[: -len(".weight")])}


def _write_lora(tmp: Path, state: dict[str, torch.Tensor], cfg: MergeConfig, targets: list[str]) -> None:
    from sparsemerge.io.writer import save_safetensors

    save_safetensors(state, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    (tmp / "adapter_config.json").write_text(json.dumps(lora_config(int(cfg.lora_rank or 0), targets, cfg.base_model), indent=2) + "\n")


def _copy_model_files(tmp: Path, cfg: MergeConfig, sources: dict[str, Source], jobs: list[TensorJob], dtype: Optional[torch.dtype]) -> None:
    first_ref = cfg.base_model or (cfg.models[0].model if cfg.models else cfg.slices[0].sources[0].model)  # type: ignore[index]
    ref_src = sources[first_ref]
    model_config = dict(ref_src.config())
    layers = {split_layer(j.out_name)[1] for j in jobs if split_layer(j.out_name)}  # type: ignore[index]
    if model_config:
        if layers and "num_hidden_layers" in model_config:
            model_config["num_hidden_layers"] = len(layers)
            if isinstance(model_config.get("layer_types"), list):
                model_config["layer_types"] = (model_config["layer_types"] * len(layers))[: len(layers)]
        if dtype is not None:
            for key in ("torch_dtype", "dtype"):
                if key in model_config:
                    model_config[key] = dtype_name(dtype)
        (tmp / "config.json").write_text(json.dumps(model_config, indent=2) + "\n")
    tok_ref = cfg.tokenizer_source if cfg.tokenizer_source not in (None, "base") else first_ref
    tok_folder = Path(getattr(sources.get(tok_ref) or open_model(tok_ref, cfg), "folder"))
    for name in TOKENIZER_FILES + ("generation_config.json",):
        if (tok_folder / name).is_file():
            shutil.copyfile(tok_folder / name, tmp / name)
    if cfg.chat_template and len(cfg.chat_template) > 40:
        (tmp / "chat_template.jinja").write_text(cfg.chat_template)


def _input_paths(cfg: MergeConfig) -> list[str]:
    """Every path the config reads (a ``model+adapter`` reference names two)."""
    out: list[str] = []
    for ref in cfg.referenced_models():
        out.append(ref)
        out.extend(part for part in ref.split("+") if part)
    return out
