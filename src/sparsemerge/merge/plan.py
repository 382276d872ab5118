"""Plan a merge: which output tensors, from which input tensors, with which parameter scopes.

A ``models:`` config becomes one slice spanning every layer of every model (the base added as
a source when it is not listed), as in mergekit. Tensors are classified by name: layer tensors
(``...layers.<i>.<rest>``), "pre" tensors (embeddings) and "post" tensors (final norm, LM head).
The output has the pre tensors (from the first slice's sources), then the slices' layers
renumbered in order, then the post tensors (from the last slice's sources). Nothing is read
here but names, shapes and dtypes, so bad inputs fail before any work.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.merge.base import MethodSpec
from sparsemerge.merge.config import MergeConfig, OutputSlice, SliceSource

LAYER_RE = re.compile(r"^(.*?(?:^|\.)(?:layers|h|blocks|block|layer)\.)(\d+)\.(.+)$")
_PRE_RE = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings)")
_TIED_HEAD = ("lm_head.weight", "model.embed_tokens.weight")


class Source(Protocol):
    def names(self) -> list[str]: ...
    def __contains__(self, name: str) -> bool: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def get(self, name: str) -> torch.Tensor: ...
    def config(self) -> dict[str, Any]: ...


@dataclass
class InputRef:
    model: str  # model reference as written in the config
    name: str  # tensor name inside that model
    scopes: list[Optional[dict[str, Any]]]  # parameter scopes, highest precedence first
    is_base: bool = False


@dataclass
class TensorJob:
    out_name: str
    t: float
    inputs: list[InputRef]  # every input in config order (the base included where listed)
    base: Optional[InputRef]
    slice_scopes: list[Optional[dict[str, Any]]] = field(default_factory=list)
    shape: tuple[int, ...] = ()
    dtype: torch.dtype = torch.float32


def split_layer(name: str) -> "tuple[str, int, str] | None":
    m = LAYER_RE.match(name)
    return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def num_layers(source: Source) -> int:
    indices = [s[1] for n in source.names() if (s := split_layer(n))]
    return max(indices) + 1 if indices else 0


def normalized_slices(config: MergeConfig, sources: dict[str, Source]) -> list[OutputSlice]:
    """``models:`` -> one slice over all layers (mergekit's normalization); ``slices:`` as given."""
    if config.slices:
        return list(config.slices)
    assert config.models
    entries = [SliceSource(model=e.model, layer_range=(0, max(1, num_layers(sources[e.model]))), parameters=e.parameters) for e in config.models]
    if config.base_model and all(e.model != config.base_model for e in config.models):
        entries.append(SliceSource(model=config.base_model, layer_range=(0, max(1, num_layers(sources[config.base_model])))))
    lengths = {e.model: e.layer_range[1] for e in entries}
    if len(set(lengths.values())) > 1:
        raise SparsemergeError("models have different numbers of layers: " + ", ".join(f"{k}: {v}" for k, v in lengths.items()))
    return [OutputSlice.model_construct(sources=entries, base_model=None, parameters=None, residual_weight=None)]


def _resolve_name(source: Source, name: str) -> Optional[str]:
    if name in source:
        return name
    if name == _TIED_HEAD[0] and _TIED_HEAD[1] in source and source.config().get("tie_word_embeddings", False):
        return _TIED_HEAD[1]
    return None


def build_plan(config: MergeConfig, spec: MethodSpec, sources: dict[str, Source]) -> list[TensorJob]:
    """Every output tensor in write order; raises one error listing all missing or mismatched tensors."""
    slices = normalized_slices(config, sources)
    jobs: list[TensorJob] = []
    first, last = slices[0], slices[-1]
    reference = sources[first.sources[0].model]
    layer_prefix = None
    pre: list[str] = []
    post: list[str] = []
    for name in reference.names():
        split = split_layer(name)
        if split:
            layer_prefix = layer_prefix or split[0]
        elif _PRE_RE.search(name):
            pre.append(name)
        else:
            post.append(name)

    def job(out_name: str, sl: OutputSlice, t: float, layer_of: dict[str, int] | None) -> TensorJob:
        base_name = sl.base_model or config.base_model
        inputs: list[InputRef] = []
        for src in sl.sources:
            name = out_name
            if layer_of is not None:
                assert layer_prefix is not None
                _, _, rest = split_layer(out_name)  # type: ignore[misc]
                name = f"{layer_prefix}{layer_of[src.model]}.{rest}"
            inputs.append(InputRef(src.model, name, [src.parameters, sl.parameters, config.parameters], src.model == base_name))
        base = next((i for i in inputs if i.is_base), None)
        if base_name and base is None and spec.base == "required":
            raise SparsemergeError(f"the base_model {base_name!r} must be one of the sources of every slice")
        return TensorJob(out_name, t, inputs, base, [sl.parameters, config.parameters])

    for name in pre:
        jobs.append(job(name, first, 0.0, None))
    out_layer = 0
    for sl in slices:
        n = sl.num_layers
        src0 = sl.sources[0]
        for idx in range(n):
            t = idx / (n - 1) if n > 1 else 1.0
            layer_of = {s.model: s.layer_range[0] + idx for s in sl.sources}
            ref = sources[src0.model]
            rests = [s[2] for nm in ref.names() if (s := split_layer(nm)) and s[1] == layer_of[src0.model]]
            if not rests and layer_prefix is not None:
                raise SparsemergeError(f"{src0.model!r} has no layer {layer_of[src0.model]} (layer_range {list(src0.layer_range)})")
            for rest in rests:
                jobs.append(job(f"{layer_prefix}{out_layer}.{rest}", sl, t, layer_of))
            out_layer += 1
    for name in post:
        jobs.append(job(name, last, 0.0, None))
    _check(jobs, config, sources)
    return jobs


def _check(jobs: list[TensorJob], config: MergeConfig, sources: dict[str, Source]) -> None:
    missing: list[str] = []
    mismatched: list[str] = []
    vocab = False  # only the first dimension of an embedding or head differs: the vocabularies
    for j in jobs:
        shapes: dict[str, tuple[int, ...]] = {}
        dtypes: list[torch.dtype] = []
        for ref in j.inputs:
            src = sources[ref.model]
            resolved = _resolve_name(src, ref.name)
            if resolved is None:
                missing.append(f"{ref.name} (in {ref.model})")
                continue
            ref.name = resolved
            shapes[ref.model] = tuple(src.shape(resolved))
            dtypes.append(src.dtype(resolved))
        if len(set(shapes.values())) > 1:
            if re.search(r"embed|lm_head|wte", j.out_name) and len({s[1:] for s in shapes.values()}) == 1:
                vocab = True
            mismatched.append(f"{j.out_name}: " + ", ".join(f"{m} {list(s)}" for m, s in shapes.items()))
        if shapes:
            j.shape = next(iter(shapes.values()))
            dtype = dtypes[0]
            for d in dtypes[1:]:
                dtype = torch.promote_types(dtype, d)
            j.dtype = dtype
    if missing:
        raise SparsemergeError(
            f"{len(missing)} tensors are missing from some models (different architectures?): "
            + "; ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        )
    if mismatched:
        hint = (" The vocabularies differ: merge models that share one tokenizer." if vocab
                else " The models have different sizes (hidden size, layers or heads): merge models of one architecture.")
        raise SparsemergeError(
            f"{len(mismatched)} tensors have different shapes across models:{hint} "
            + "; ".join(mismatched[:20]) + (" ..." if len(mismatched) > 20 else "")
        )
