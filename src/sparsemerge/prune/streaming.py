"""Magnitude pruning streamed tensor by tensor, for models larger than memory.

``sparsemerge prune`` loads the whole model through transformers (calibrated methods need the
modules to run); magnitude pruning needs only each weight itself, so :func:`prune_streaming`
reads one tensor at a time from the checkpoint (positioned reads, :mod:`sparsemerge.io.reader`),
zeroes it to its pattern and writes it to its final offset in the output
(:class:`sparsemerge.io.writer.ShardedWriter`). Peak memory is about the imports plus a few
copies of the largest tensor, not the model (a 4.4 GB checkpoint pruned under 1.1 GB of
memory: BENCHMARKS.md, "Larger than memory").

Which layers are pruned, with which pattern, and what is skipped is decided exactly as
:func:`sparsemerge.prune.api.prune_` decides it - by :func:`sparsemerge.prune.select.select_targets`
on the model's modules, built on the ``meta`` device (no memory) - and the output is the
folder the loading path writes (float32 weights like ``load_model``, config.json,
generation_config.json, tokenizer, the pruning record). :func:`streaming_unsupported` says
when this path does not apply (another method, channel permutation, a global budget, a
checkpoint whose tensor names are not the model's, ...); the caller then loads the model.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.finite import all_finite
from sparsemerge.masks import check_pattern, mask_for
from sparsemerge.patterns import Unstructured, parse_pattern
from sparsemerge.prune.api import LayerRecord, PruneReport
from sparsemerge.prune.config import DENSE, PruneConfig

# transformers' save_pretrained default (max_shard_size="50GB", decimal), so the files are named as it names them
SAVE_PRETRAINED_SHARD_BYTES = 50 * 10**9
LOAD_DTYPE = torch.float32  # load_model's default: the loading path writes float32 weights


def _folder(source: Any) -> "Path | None":
    if source.kind == "hf":
        return Path(source.path)
    if source.kind == "gguf":  # the dequantized cache folder, which load_model reads too
        from sparsemerge.io.sources import gguf_as_hf_folder

        return gguf_as_hf_folder(source)
    return None  # a bare .safetensors file: load_model assembles it with load_state_dict


def streaming_unsupported(config: PruneConfig, source: Any) -> Optional[str]:
    """``None`` when :func:`prune_streaming` can prune ``source`` with ``config``, else why not
    (checks the options and the folder kind; the tensor names are checked by ``prune_streaming``)."""
    if config.method != "magnitude":
        return f"method {config.method!r} needs the loaded model"
    if config.permute:
        return "channel permutation needs the loaded model"
    patterns = [config.pattern, *(p for p in config.layer_patterns.values() if p != DENSE)]
    if any(isinstance(parse_pattern(p), Unstructured) and parse_pattern(p).scope == "global" for p in patterns):
        return "a global sparsity budget needs every score at once"
    if source.kind not in ("hf", "gguf"):
        return f"a {source.kind} source is assembled by the model loader"
    folder = _folder(source)
    assert folder is not None
    from sparsemerge.io.shared import has_sharing
    from sparsemerge.io.stitched import has_adapters

    if has_sharing(folder) or has_adapters(folder):
        return "a shared or stitched model is rebuilt by the model loader"
    if not any(folder.glob("*.safetensors")):
        return "the weights are not safetensors files"
    return None


def _meta_model(folder: Path) -> Any:
    """The model transformers would build for ``folder``, on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=LOAD_DTYPE, trust_remote_code=False)
    return model


def _saved_tensors(model: Any) -> dict[str, tuple[int, ...]]:
    """``{name: shape}`` of what ``save_pretrained`` writes: the state dict without tied aliases."""
    seen: set[int] = set()
    out: dict[str, tuple[int, ...]] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = tuple(tensor.shape)
    return out


def prune_streaming(
    source: Any,
    out: "str | Path",
    config: PruneConfig,
    overwrite: bool = False,
    record_extra: "dict[str, Any] | None" = None,
    inputs: "list[Any] | None" = None,
) -> Optional[PruneReport]:
    """Magnitude-prune ``source`` (a resolved HF or GGUF source) into the HF folder ``out``,
    one tensor at a time; returns the report, or ``None`` (nothing written) when the checkpoint's
    tensors are not exactly the model's (renamed, missing or extra keys: the loader's business).

    ``record_extra`` is merged into the pruning record (e.g. its ``source`` entry)."""
    from sparsemerge.io import atomic_output, open_tensor_source, write_json_atomic
    from sparsemerge.io.sources import _check_float_weights, _load_tokenizer
    from sparsemerge.io.writer import PlannedTensor, ShardedWriter
    from sparsemerge.prune.base import Target
    from sparsemerge.prune.record import PRUNE_RECORD
    from sparsemerge.prune.select import select_targets

    reason = streaming_unsupported(config, source)
    if reason is not None:
        raise SparsemergeError(f"internal: prune_streaming called where it does not apply ({reason})")
    folder = _folder(source)
    assert folder is not None
    try:  # the checks and messages of load_model, which the loading path would give
        _check_float_weights(folder)
        model = _meta_model(folder)
        tensors = open_tensor_source(folder)
    except SparsemergeError as exc:
        raise SparsemergeError(f"could not load a model from {source.name!r}: {exc}") from None
    except Exception as exc:  # transformers raises many types for a broken config.json
        raise SparsemergeError(f"could not load a model from {source.name!r}: {type(exc).__name__}: {exc}") from exc
    expected = _saved_tensors(model)
    with tensors:
        names = tensors.names()
        if set(names) != set(expected) or any(tuple(tensors.shape(n)) != expected[n] for n in names):
            return None
        targets, skipped = select_targets(model, config)
        by_weight: dict[str, Target] = {f"{t.name}.weight": t for t in targets}
        plan = []
        for name in names:
            dtype = tensors.dtype(name)
            plan.append(PlannedTensor(name, tuple(tensors.shape(name)), LOAD_DTYPE if dtype.is_floating_point else dtype))
        records: dict[str, LayerRecord] = {}
        start = time.perf_counter()  # like prune_'s seconds: the pruning (here with its reads and writes)
        bar = None
        if config.progress:
            from tqdm import tqdm

            bar = tqdm(total=len(plan), desc="prune magnitude (streamed)", unit="tensor")
        with atomic_output(out, overwrite=overwrite, inputs=inputs) as tmp:
            writer = ShardedWriter(tmp, SAVE_PRETRAINED_SHARD_BYTES, plan=plan, metadata={"format": "pt"}, layout="safetensors")
            try:
                for p in plan:  # plan order is the writer's order
                    tensor = tensors.get(p.name).to(p.dtype)
                    target = by_weight.get(p.name)
                    if target is not None:
                        tensor = _prune_one(target, tensor, records)
                    writer.write(p.name, tensor)
                    del tensor
                    if bar is not None:
                        bar.update(1)
                writer.finish()
                seconds = time.perf_counter() - start
            finally:
                writer.close()
                if bar is not None:
                    bar.close()
            layers = [records[t.name] for t in targets]
            report = PruneReport(
                method=config.method,
                pattern=config.pattern,
                layers=layers,
                skipped=skipped,
                seconds=seconds,
                config=config.model_dump(),
            )
            _write_side_files(model, folder, tmp)
            tokenizer = _load_tokenizer(folder)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_json_atomic(tmp / PRUNE_RECORD, {**report.to_json(), **(record_extra or {})})
    return report


@torch.no_grad()
def _prune_one(target: Any, weight: torch.Tensor, records: dict[str, LayerRecord]) -> torch.Tensor:
    """``W * mask(|W|, pattern)`` (Magnitude.scores + apply_scores), checked like prune_ checks it."""
    if not all_finite(weight):  # no tensor-sized temporary
        raise SparsemergeError(
            f"weight {target.name} contains NaN or Inf values; the checkpoint is corrupt - fix or re-export it"
        )
    weight.mul_(mask_for(weight.abs(), target.pattern).to(weight.dtype))
    report = check_pattern(weight, target.pattern)
    if report.violations:  # a method that breaks its own pattern is a bug, not bad input
        raise RuntimeError(f"pruning method magnitude left pattern violations in {[target.name]}")
    records[target.name] = LayerRecord(target.name, list(weight.shape), str(target.pattern), report.sparsity, report.violations)
    return weight


def _write_side_files(model: Any, folder: Path, tmp: Path) -> None:
    """config.json and generation_config.json as ``save_pretrained`` writes them after ``from_pretrained``."""
    config = model.config
    config.architectures = [type(model).__name__]
    config.dtype = LOAD_DTYPE
    if model.can_generate():
        from transformers import GenerationConfig

        try:  # from_pretrained reads the folder's generation_config.json when there is one
            generation = GenerationConfig.from_pretrained(folder)
        except OSError:
            generation = model.generation_config
        if generation is not None:
            generation.save_pretrained(tmp)
    config.save_pretrained(tmp)
