"""Model-level packing: ``pack`` a checkpoint into a packed folder, ``read_packed`` it back
tensor by tensor, ``unpack`` it to a Hugging Face folder.

On-disk layout of a packed folder (version 1)::

    OUT/
      sparsemerge_packed.json              the manifest (below)
      packed-00001-of-0000K.safetensors    storage fields of the tensors, shard by shard
      config.json, tokenizer*.json, ...    every non-weight file of the source, copied

Each tensor ``NAME`` (e.g. ``model.layers.0.mlp.up_proj.weight``) is stored as one
safetensors entry per storage field, keyed ``NAME:FIELD`` (fields of a format, e.g.
``values`` and ``metadata`` for ``nm``; codec fields carry a ``values.`` prefix, e.g.
``values.codes``, ``values.scale``). All fields of a tensor sit in one shard. The manifest::

    {
      "layout": "sparsemerge-packed", "version": 1,
      "options": {...PackConfig...},
      "source": {"name": str, "kind": "hf"|"safetensors"|"gguf"},
      "files": [copied non-weight file names],
      "shards": {shard file name: [tensor names in it]},
      "tensors": {
        NAME: {
          "format": a registered format name ("nm", "bitmask", "coo", "csr", "bsr", "dense", ...),
          "shape": [rows, cols] (dense: any shape),
          "dtype": source dtype name ("float32", "bfloat16", ...),
          "params": format parameters + "codec": null | codec parameters,
          "shard": shard file name,
          "fields": {FIELD: {"key": "NAME:FIELD", "dtype": str, "shape": [int, ...]}},
          "nbytes": bytes of all fields,
          "sha256": record_digest (sha256 over NAME, this entry but its sha256, and
                    fields_digest: name, dtype, shape, bytes of each field, sorted)
        }
      },
      "totals": {"tensors", "nbytes", "numel", "dense_fp32_bytes", "dense_fp16_bytes"},
      "manifest_sha256": manifest_digest (sha256 over the canonical JSON of all of the above)
    }

Opening checks the manifest digest, so any edit of the manifest (a dtype, a deleted or
swapped entry, the options) is caught before a tensor is read; reading a tensor checks every
field's dtype and shape against the manifest, its digest against entry and bytes, and the
format's invariants. Any failure raises :class:`SparsemergeError` naming the tensor (and the
shard). Version 1 manifests (before 2026-12) read too, with only their bytes checksummed.
Writes go to a temporary folder renamed when complete.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sparsemerge.errors import SparsemergeError
from sparsemerge.finite import all_finite
from sparsemerge.formats.base import FORMATS, LAYOUTS, CodecSpec, SparseFormat, check_pack_format, dtype_name, format_options
from sparsemerge.formats.dense import Dense
from sparsemerge.formats.layout import (LAYOUT, MANIFEST_NAME, STORED_DTYPES, VERSION, PackReport, _progress, _target_filter, _targets,
                                        copy_side_files)
from sparsemerge.formats.nm_coding import CODINGS
from sparsemerge.formats.stacks import is_expert_stack, slice_name
from sparsemerge.io.checksum import MANIFEST_DIGEST_KEY, fields_digest, manifest_digest, record_digest
from sparsemerge.io.writer import ShardedWriter
from sparsemerge.patterns import NM, Hierarchical, parse_pattern
from sparsemerge.selection import DENSE, LayerPatterns


_NM_FAMILY = {False: "nm", True: "hnm"}  # by "is the pattern hierarchical"


class PackConfig(BaseModel):
    """Options of ``sparsemerge pack``. ``format`` is a registered format or pack layout
    (:func:`sparsemerge.formats.base.pack_formats`); keys besides the fields below must be
    options a registered format declares (:func:`~sparsemerge.formats.base.format_options`);
    anything else is rejected."""

    model_config = ConfigDict(extra="allow")

    format: str = Field("nm", description="a registered format or pack layout (sparsemerge pack --help lists them)")
    pattern: str = Field("2:4", description="N:M pattern of the nm format (hier:K:L@B/N:M: of hnm)")
    layer_patterns: dict[str, str] = Field(
        default_factory=dict,
        description="per-layer N:M patterns of a mixed model: regex on module name -> pattern or 'dense' "
        "(first match wins; the rest take `pattern`)",
    )
    metadata: Literal[CODINGS] = "entropy"  # type: ignore[valid-type]  # nm position codings, from their table
    quant: Literal["none", "int8", "int4"] = "none"
    group_size: int = Field(128, ge=0, description="quantization group of G stored values; 0 = per output channel")
    symmetric: bool = True
    codebook: Optional[int] = Field(None, ge=4, le=256, description="k-means codebook of K centroids instead of quant")
    dense_quant: Literal["none", "int8", "int4"] = Field("none", description="codec for 2-D tensors kept dense (embeddings)")
    dtype: Literal["keep", "float32", "float16", "bfloat16"] = Field("keep", description="float dtype of stored values")
    block: int = Field(16, ge=1, description="bsr block size")
    include: Optional[list[str]] = None
    exclude: Optional[list[str]] = None
    shard_size: int = Field(2 * 1024**3, ge=1, description="bytes per shard")

    @field_validator("format")
    @classmethod
    def _registered_format(cls, value: str) -> str:
        try:
            return check_pack_format(value)
        except SparsemergeError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _declared_options(self) -> "PackConfig":
        extra = self.model_extra or {}
        if extra:
            declared = format_options()
            unknown = sorted(k for k in extra if k not in declared)
            if unknown:
                known = sorted(set(type(self).model_fields) | set(declared))
                raise ValueError(f"unknown pack option(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return self

    def option(self, name: str) -> Any:
        """A format option's value: a field, an extra key given, or the declared default."""
        if name in type(self).model_fields:
            return getattr(self, name)
        extra = self.model_extra or {}
        if name in extra:
            return extra[name]
        return format_options()[name].default

    @field_validator("pattern")
    @classmethod
    def _nm_pattern(cls, value: str) -> str:
        if not isinstance(parse_pattern(value), (NM, Hierarchical)):  # hierarchical: the hnm format
            raise ValueError(f"pack needs an N:M pattern such as 2:4 (or hier:K:L@B/N:M for hnm), got {value!r}")
        return value

    @field_validator("layer_patterns")
    @classmethod
    def _nm_layer_patterns(cls, value: dict[str, str]) -> dict[str, str]:
        for regex, pattern in value.items():
            if pattern != DENSE and not isinstance(parse_pattern(pattern), (NM, Hierarchical)):
                raise ValueError(f"layer_patterns[{regex!r}]: pack needs an N:M (or hier:...) pattern or 'dense', got {pattern!r}")
        return value

    def manifest_options(self) -> dict[str, Any]:
        """The options as the manifest records them (``layer_patterns`` only when a model is mixed)."""
        options = self.model_dump()
        if not options["layer_patterns"]:
            del options["layer_patterns"]
        return options

    def for_layer(self, patterns: LayerPatterns, tensor_name: str) -> "tuple[PackConfig, Optional[str]]":
        """``(config, why dense)`` for one targeted tensor: its own pattern under a mixed
        allocation (with format nm or hnm, in the format of that pattern: hierarchical -> hnm,
        N:M -> nm), or - 'dense' in layer_patterns - the dense format with the targeted layers'
        value codec (--quant), and the reason."""
        module = tensor_name[: -len(".weight")] if tensor_name.endswith(".weight") else tensor_name
        pattern = patterns(module)
        if pattern == DENSE:
            return self.model_copy(update={"format": "dense"}), "dense by recipe (layer_patterns)"
        update = {} if pattern == self.pattern else {"pattern": pattern}
        if self.format in _NM_FAMILY.values():  # each layer in its pattern's format: hierarchical -> hnm, N:M -> nm
            fmt = _NM_FAMILY[isinstance(parse_pattern(pattern), Hierarchical)]
            update.update({"format": fmt} if fmt != self.format else {})
        return (self.model_copy(update=update) if update else self), None

    def codec(self) -> CodecSpec:
        if self.codebook is not None and self.quant != "none":
            raise SparsemergeError("choose either --quant or --codebook, not both")
        if self.codebook is not None:
            return CodecSpec("codebook", k=self.codebook)
        return CodecSpec(self.quant, self.group_size, self.symmetric)

    def dense_codec(self) -> CodecSpec:
        return CodecSpec(self.dense_quant, self.group_size, self.symmetric)


def encode_tensor(name: str, tensor: torch.Tensor, config: PackConfig, targeted: bool) -> tuple[SparseFormat, Optional[str]]:
    """One tensor -> its format object; the second item says why a targeted tensor stayed dense."""
    stored = STORED_DTYPES[config.dtype]
    is_float = tensor.is_floating_point()
    t = tensor.to(stored) if (stored is not None and is_float) else tensor
    reason = None
    if targeted and config.format != "dense" and is_float and t.dim() == 2:
        fmt = FORMATS.get(config.format)
        params, reason = fmt.pack_params(tuple(t.shape), config)  # the format reads its own options
        if reason is None:
            try:
                obj = fmt.from_dense(t, **params)
                return obj.with_codec(config.codec()), None
            except SparsemergeError as exc:
                raise type(exc)(f"tensor {name!r}: {exc}") from None
    elif targeted and t.dim() != 2:
        reason = f"not a 2-D weight (shape {tuple(t.shape)})"
    obj = Dense.from_dense(t)
    if is_float and t.dim() == 2:
        # --format dense: targeted weights take --quant/--codebook, the rest --dense-quant
        spec = config.codec() if (targeted and config.format == "dense") else config.dense_codec()
        obj = obj.with_codec(spec)  # type: ignore[assignment]
    return obj, reason


def pack(src: Any, out: "str | Path", config: "PackConfig | None" = None, overwrite: bool = False, progress: bool = False, **options: Any) -> PackReport:
    """Pack every tensor of ``src`` (read lazily, one at a time) into ``out``.

    Targeted tensors (``.weight`` of modules matching include/exclude, the pruning default)
    go into ``config.format``; the rest stay dense (``dense_quant`` may quantize 2-D ones).
    """
    from sparsemerge.io import atomic_output, ensure_writable, open_tensor_source

    config = config or PackConfig(**options)
    if config.format in LAYOUTS:  # a layout of its own (compressed-tensors ...), not the packed folder
        return LAYOUTS.get(config.format).write(src, out, config, overwrite=overwrite, progress=progress)
    config.codec()  # validate the combination early
    ensure_writable(out, overwrite, inputs=[src])
    started = time.perf_counter()
    report = PackReport(Path(out))
    targeted = _targets(config)
    patterns = LayerPatterns(config.pattern, config.layer_patterns)
    with open_tensor_source(src) as source, atomic_output(out, overwrite=overwrite, inputs=[src]) as tmp:
        # fields of one tensor share a shard; no index (the manifest maps tensors to shards)
        writer = ShardedWriter(tmp, config.shard_size, prefix="packed", single_name=None, metadata={"format": LAYOUT}, index=False)
        records: dict[str, Any] = {}
        names = source.names()
        selected = _target_filter(config)

        def add(name: str, tensor: torch.Tensor, is_target: bool, stack: "dict[str, Any] | None" = None) -> None:
            layer_config, dense_reason = config.for_layer(patterns, name) if is_target else (config, None)
            obj, reason = encode_tensor(name, tensor, layer_config, is_target)
            reason = reason or dense_reason
            if reason is not None:
                report.kept_dense.append((name, reason))
            elif obj.name != "dense":
                report.packed.append(name)
            fields = obj.fields()
            records[name] = _record(name, obj, tensor.dtype, fields)
            if stack is not None:
                records[name]["stack"] = stack
            writer.add_group({f"{name}:{k}": v for k, v in fields.items()})
            report.nbytes += records[name]["nbytes"]
            report.numel += obj.numel

        for name in _progress(names, progress, "pack"):
            tensor = source.get(name)
            if not all_finite(tensor):  # one pass, no tensor-sized temporary (finite.py)
                bad = int((~torch.isfinite(tensor)).sum())
                raise SparsemergeError(
                    f"tensor {name!r} holds {bad} NaN or inf values: the packed model would compute NaN - "
                    "fix or re-export the source before packing"
                )
            if is_expert_stack(name, tensor) and selected(name):  # MoE experts: one 2-D entry per expert (stacks.py)
                for e in range(tensor.shape[0]):
                    add(slice_name(name, e), tensor[e], True, {"of": name, "index": e, "count": int(tensor.shape[0])})
            else:
                add(name, tensor, targeted(name))
            del tensor
        location = writer.finish()
        shards: dict[str, list[str]] = {}
        for name, record in records.items():
            keys = [f["key"] for f in record["fields"].values()]
            record["shard"] = location[keys[0]] if keys else next(iter(set(location.values())), "")
            shards.setdefault(record["shard"], []).append(name)
            record["sha256"] = record_digest(name, record, record["sha256"])  # entry complete: seal it
        files = copy_side_files(source.folder, tmp, only_known=source.source.kind == "safetensors")
        manifest = {
            "layout": LAYOUT,
            "version": VERSION,
            "options": config.manifest_options(),
            "source": {"name": str(src), "kind": source.source.kind},
            "files": files,
            "shards": shards,
            "tensors": records,
            "totals": _totals(records),
        }
        manifest[MANIFEST_DIGEST_KEY] = manifest_digest(manifest)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        report.tensors = len(records)
    report.seconds = time.perf_counter() - started
    return report


def _record(name: str, obj: SparseFormat, source_dtype: torch.dtype, fields: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {
        "format": obj.name,
        "shape": list(obj.shape),
        "dtype": dtype_name(source_dtype),
        "params": obj.params(),
        "shard": None,
        "fields": {
            k: {"key": f"{name}:{k}", "dtype": dtype_name(v.dtype), "shape": list(v.shape)} for k, v in fields.items()
        },
        "nbytes": sum(v.numel() * v.element_size() for v in fields.values()),
        "sha256": fields_digest(fields),  # of the bytes; pack() seals it with the entry once the shard is known
    }


def _totals(records: dict[str, Any]) -> dict[str, int]:
    numel = 0
    for record in records.values():
        count = 1
        for s in record["shape"]:
            count *= int(s)
        numel += count
    return {
        "tensors": len(records),
        "nbytes": sum(r["nbytes"] for r in records.values()),
        "numel": numel,
        "dense_fp32_bytes": 4 * numel,
        "dense_fp16_bytes": 2 * numel,
    }


# Reading lives in its own module; these names are part of this module's API.
from sparsemerge.formats.reader import PackedCheckpoint, read_packed, unpack  # noqa: E402,F401
