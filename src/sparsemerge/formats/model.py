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
          "format": "nm"|"bitmask"|"coo"|"csr"|"bsr"|"dense",
          "shape": [rows, cols] (dense: any shape),
          "dtype": source dtype name ("float32", "bfloat16", ...),
          "params": format parameters + "codec": null | codec parameters,
          "shard": shard file name,
          "fields": {FIELD: {"key": "NAME:FIELD", "dtype": str, "shape": [int, ...]}},
          "nbytes": bytes of all fields,
          "sha256": fields_digest (sha256 over name, dtype, shape, bytes of each field, sorted)
        }
      },
      "totals": {"tensors", "nbytes", "numel", "dense_fp32_bytes", "dense_fp16_bytes"}
    }

Reading checks every field's dtype and shape against the manifest, the digest against the
bytes, and each format's invariants; any failure raises :class:`SparsemergeError` naming the
tensor (and the shard). Writes go to a temporary folder renamed when complete.
"""
from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.base import FORMATS, CodecSpec, SparseFormat, dtype_from_name, dtype_name
from sparsemerge.formats.dense import Dense
from sparsemerge.formats.shards import ShardReader, ShardWriter, fields_digest
from sparsemerge.patterns import NM, parse_pattern

MANIFEST_NAME = "sparsemerge_packed.json"
LAYOUT, VERSION = "sparsemerge-packed", 1
WEIGHT_FILE = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.gguf|\.safetensors\.index\.json|\.bin\.index\.json)$")
SKIP_FILES = {"sparsemerge-cache.json", MANIFEST_NAME}
STORED_DTYPES = {"keep": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PackConfig(BaseModel):
    """Options of ``sparsemerge pack`` (rejects unknown keys)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["nm", "bitmask", "coo", "csr", "bsr", "dense", "sparse-24-bitmask"] = "nm"
    pattern: str = Field("2:4", description="N:M pattern of the nm format")
    metadata: Literal["bits2", "index", "entropy"] = "entropy"
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

    @field_validator("pattern")
    @classmethod
    def _nm_pattern(cls, value: str) -> str:
        if not isinstance(parse_pattern(value), NM):
            raise ValueError(f"pack needs an N:M pattern such as 2:4, got {value!r}")
        return value

    def codec(self) -> CodecSpec:
        if self.codebook is not None and self.quant != "none":
            raise SparsemergeError("choose either --quant or --codebook, not both")
        if self.codebook is not None:
            return CodecSpec("codebook", k=self.codebook)
        return CodecSpec(self.quant, self.group_size, self.symmetric)

    def dense_codec(self) -> CodecSpec:
        return CodecSpec(self.dense_quant, self.group_size, self.symmetric)


def _targets(config: PackConfig) -> Callable[[str], bool]:
    from sparsemerge.prune.config import DEFAULT_EXCLUDE, DEFAULT_INCLUDE

    include = [re.compile(r) for r in (config.include or DEFAULT_INCLUDE)]
    exclude = [re.compile(r) for r in (config.exclude or DEFAULT_EXCLUDE)]

    def targeted(name: str) -> bool:
        if not name.endswith(".weight"):
            return False
        module = name[: -len(".weight")]
        return any(r.search(module) for r in include) and not any(r.search(module) for r in exclude)

    return targeted


@dataclass
class PackReport:
    out: Path
    tensors: int = 0
    packed: list[str] = field(default_factory=list)  # names stored in a sparse format
    kept_dense: list[tuple[str, str]] = field(default_factory=list)  # (name, reason) targeted but stored dense
    nbytes: int = 0
    numel: int = 0
    seconds: float = 0.0


def encode_tensor(name: str, tensor: torch.Tensor, config: PackConfig, targeted: bool) -> tuple[SparseFormat, Optional[str]]:
    """One tensor -> its format object; the second item says why a targeted tensor stayed dense."""
    stored = STORED_DTYPES[config.dtype]
    is_float = tensor.is_floating_point()
    t = tensor.to(stored) if (stored is not None and is_float) else tensor
    reason = None
    if targeted and config.format != "dense" and is_float and t.dim() == 2:
        pattern = parse_pattern(config.pattern)
        if config.format == "nm" and t.shape[1] % pattern.m:
            reason = f"input dimension {t.shape[1]} not divisible by M={pattern.m}"
        elif config.format == "bsr" and (t.shape[0] % config.block or t.shape[1] % config.block):
            reason = f"shape {tuple(t.shape)} not divisible by block {config.block}"
        else:
            params: dict[str, Any] = {}
            if config.format == "nm":
                params = {"n": pattern.n, "m": pattern.m, "metadata": config.metadata}
            elif config.format == "bsr":
                params = {"block": config.block}
            try:
                obj = FORMATS.get(config.format).from_dense(t, **params)
                return obj.with_codec(config.codec()), None
            except SparsemergeError as exc:
                raise type(exc)(f"tensor {name!r}: {exc}") from None
    elif targeted and t.dim() != 2:
        reason = f"not a 2-D weight (shape {tuple(t.shape)})"
    obj = Dense.from_dense(t)
    if is_float and t.dim() == 2:
        obj = obj.with_codec(config.dense_codec())  # type: ignore[assignment]
    return obj, reason


def pack(src: Any, out: "str | Path", config: "PackConfig | None" = None, overwrite: bool = False, progress: bool = False, **options: Any) -> PackReport:
    """Pack every tensor of ``src`` (read lazily, one at a time) into ``out``.

    Targeted tensors (``.weight`` of modules matching include/exclude, the pruning default)
    go into ``config.format``; the rest stay dense (``dense_quant`` may quantize 2-D ones).
    """
    from sparsemerge.io import atomic_output, ensure_writable, open_tensor_source

    config = config or PackConfig(**options)
    if config.format == "sparse-24-bitmask":
        from sparsemerge.formats.ct import write_ct

        return write_ct(src, out, config, overwrite=overwrite, progress=progress)
    config.codec()  # validate the combination early
    ensure_writable(out, overwrite)
    started = time.perf_counter()
    report = PackReport(Path(out))
    targeted = _targets(config)
    with open_tensor_source(src) as source, atomic_output(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, "packed", config.shard_size, metadata={"format": LAYOUT})
        records: dict[str, Any] = {}
        names = source.names()
        for name in _progress(names, progress, "pack"):
            tensor = source.get(name)
            obj, reason = encode_tensor(name, tensor, config, targeted(name))
            if reason is not None:
                report.kept_dense.append((name, reason))
            elif obj.name != "dense":
                report.packed.append(name)
            records[name] = _record(name, obj, tensor.dtype)
            del tensor
            fields = obj.fields()
            writer.add_group({f"{name}:{k}": v for k, v in fields.items()})
            report.nbytes += records[name]["nbytes"]
            report.numel += obj.numel
        location = writer.finish()
        shards: dict[str, list[str]] = {}
        for name, record in records.items():
            keys = [f["key"] for f in record["fields"].values()]
            record["shard"] = location[keys[0]] if keys else next(iter(set(location.values())), "")
            shards.setdefault(record["shard"], []).append(name)
        files = copy_side_files(source.folder, tmp)
        manifest = {
            "layout": LAYOUT,
            "version": VERSION,
            "options": config.model_dump(),
            "source": {"name": str(src), "kind": source.source.kind},
            "files": files,
            "shards": shards,
            "tensors": records,
            "totals": _totals(records),
        }
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
        report.tensors = len(records)
    report.seconds = time.perf_counter() - started
    return report


def _record(name: str, obj: SparseFormat, source_dtype: torch.dtype) -> dict[str, Any]:
    fields = obj.fields()
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
        "sha256": fields_digest(fields),
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


def copy_side_files(folder: Path, dest: Path) -> list[str]:
    """Copy config, tokenizer and other non-weight files (not sub-folders) of ``folder``."""
    copied = []
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and not WEIGHT_FILE.search(path.name) and path.name not in SKIP_FILES and not path.name.startswith("."):
            shutil.copy2(path, dest / path.name)
            copied.append(path.name)
    return copied


def _progress(items: list[str], enabled: bool, desc: str) -> Iterator[str]:
    if not enabled:
        yield from items
        return
    from tqdm import tqdm

    yield from tqdm(items, desc=desc, unit="tensor")


class PackedCheckpoint:
    """A packed folder opened for reading; tensors are read and verified one at a time.

    ``get(name)`` returns the format object (``NMPacked``, ``Bitmask``, ..., its codec in
    ``.codec``), or the dense tensor for tensors stored dense without a codec;
    ``get_dense(name)`` always returns the decoded dense tensor in the source dtype.
    ``folder`` holds config.json and the tokenizer.
    """

    def __init__(self, folder: "str | Path") -> None:
        self.folder = Path(folder)
        path = self.folder / MANIFEST_NAME
        if not path.is_file():
            raise SparsemergeError(f"{str(self.folder)!r} is not a packed checkpoint: {MANIFEST_NAME} is missing")
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SparsemergeError(f"the manifest {str(path)!r} is not valid JSON ({exc}); the checkpoint is corrupt") from None
        if not isinstance(manifest, dict) or manifest.get("layout") != LAYOUT:
            raise SparsemergeError(f"{str(path)!r} is not a {LAYOUT} manifest")
        if manifest.get("version") != VERSION:
            raise SparsemergeError(f"{str(path)!r} has layout version {manifest.get('version')!r}; this sparsemerge reads version {VERSION}")
        if not isinstance(manifest.get("tensors"), dict):
            raise SparsemergeError(f"{str(path)!r} has no 'tensors' table")
        self.manifest = manifest
        self.tensors: dict[str, Any] = manifest["tensors"]
        self._reader = ShardReader(self.folder, manifest.get("shards") or {})

    def names(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __len__(self) -> int:
        return len(self.tensors)

    def record(self, name: str) -> dict[str, Any]:
        try:
            return self.tensors[name]
        except KeyError:
            raise SparsemergeError(f"tensor {name!r} is not in the packed checkpoint {str(self.folder)!r}") from None

    def config(self) -> dict[str, Any]:
        path = self.folder / "config.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def read_fields(self, name: str, verify: bool = True) -> dict[str, torch.Tensor]:
        record = self.record(name)
        what = f"tensor {name!r}"
        try:
            shard, specs = record["shard"], record["fields"]
            items = [(k, s["key"], s["dtype"], [int(x) for x in s["shape"]]) for k, s in specs.items()]
        except (KeyError, TypeError, ValueError) as exc:
            raise SparsemergeError(f"{what}: manifest entry is malformed ({exc})") from None
        fields = {}
        for fname, key, dt, shape in items:
            tensor = self._reader.get(shard, key, what)
            if dtype_name(tensor.dtype) != dt or list(tensor.shape) != shape:
                raise SparsemergeError(
                    f"{what}: field {fname!r} in shard {shard!r} is {dtype_name(tensor.dtype)} {list(tensor.shape)}, "
                    f"the manifest says {dt} {shape}; the manifest does not match the data"
                )
            fields[fname] = tensor
        if verify:
            digest = fields_digest(fields)
            if digest != record.get("sha256"):
                raise SparsemergeError(
                    f"{what}: checksum mismatch in shard {shard!r} (manifest sha256 {str(record.get('sha256'))[:12]}..., "
                    f"data {digest[:12]}...); the file is corrupt - repack it from the source"
                )
        return fields

    def get_format(self, name: str, verify: bool = True) -> SparseFormat:
        record = self.record(name)
        what = f"tensor {name!r}"
        fields = self.read_fields(name, verify)
        try:
            cls = FORMATS.get(str(record["format"]))
            shape = tuple(int(s) for s in record["shape"])
            dtype = dtype_from_name(str(record["dtype"]), what)
            params = dict(record["params"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SparsemergeError(f"{what}: manifest entry is malformed ({exc})") from None
        except SparsemergeError as exc:
            raise SparsemergeError(f"{what}: {exc}") from None
        obj = cls.from_fields(shape, dtype, params, fields, what)  # type: ignore[arg-type]
        try:
            obj.check()
        except SparsemergeError as exc:
            raise SparsemergeError(f"{what}: {exc}") from None
        return obj

    def get(self, name: str, verify: bool = True) -> "SparseFormat | torch.Tensor":
        obj = self.get_format(name, verify)
        if isinstance(obj, Dense) and obj.codec is None:
            return obj.values  # type: ignore[return-value]
        return obj

    def get_dense(self, name: str, verify: bool = True, dtype: "torch.dtype | None" = None) -> torch.Tensor:
        obj = self.get_format(name, verify)
        dense = obj.to_dense()
        return dense.to(dtype or obj.dtype)

    def nbytes(self, name: str) -> int:
        return int(self.record(name)["nbytes"])

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "PackedCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_packed(path: "str | Path") -> "PackedCheckpoint":
    """Open a packed folder, or a compressed-tensors ``sparse-24-bitmask`` folder (same API)."""
    folder = Path(path)
    if not folder.is_dir():
        raise SparsemergeError(f"packed checkpoint {str(folder)!r} not found (expected a folder)")
    if not (folder / MANIFEST_NAME).is_file():
        from sparsemerge.formats.ct import CTCheckpoint, is_ct_folder

        if is_ct_folder(folder):
            return CTCheckpoint(folder)  # type: ignore[return-value]
    return PackedCheckpoint(folder)


def unpack(path: "str | Path", out: "str | Path", overwrite: bool = False, dtype: "str | None" = None, shard_size: int = 5 * 1024**3, progress: bool = False) -> Path:
    """Decode every tensor and write a Hugging Face folder (``model.safetensors`` or shards
    plus ``model.safetensors.index.json``, config and tokenizer). Bit exact when the pack
    used no codec and ``dtype`` ``keep``."""
    from sparsemerge.io import atomic_output, ensure_writable

    target = None if dtype in (None, "keep") else dtype_from_name(str(dtype), "--dtype")
    ensure_writable(out, overwrite)
    packed = read_packed(path)
    with packed, atomic_output(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, "model", shard_size, metadata={"format": "pt"}, single_name="model.safetensors")
        for name in _progress(packed.names(), progress, "unpack"):
            tensor = packed.get_dense(name)
            if target is not None and tensor.is_floating_point():
                tensor = tensor.to(target)
            writer.add(name, tensor)
        location = writer.finish()
        if len(set(location.values())) > 1:
            index = {"metadata": {"total_size": writer.total_bytes}, "weight_map": dict(sorted(location.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name in copy_side_files(packed.folder, tmp):
            if name == "config.json":
                config = json.loads((tmp / name).read_text())
                _drop_ct_config(config)
                if target is not None:
                    config["torch_dtype"] = config["dtype"] = dtype_name(target)
                (tmp / name).write_text(json.dumps(config, indent=2) + "\n")
    return Path(out)


def _drop_ct_config(config: dict[str, Any]) -> None:
    """A dense folder carries no compression config (it would make transformers expect one)."""
    quant = config.get("quantization_config")
    if isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors" and not quant.get("config_groups"):
        del config["quantization_config"]
    config.pop("sparsity_config", None)
