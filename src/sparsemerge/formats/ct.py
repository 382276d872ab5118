"""Interop with the compressed-tensors ``sparse-24-bitmask`` layout (vLLM, llm-compressor).

Layout (as compressed-tensors' ``Sparse24BitMaskCompressor`` writes it; verified against
its source and, when the peer venv exists, against the library itself):

* For a compressed weight of module ``MOD`` (``MOD.weight`` in the dense model) the
  safetensors hold ``MOD.compressed`` - the kept values, ``(rows, cols/2)`` row-major in
  the weight's dtype; ``MOD.bitmask`` - uint8 ``(rows, ceil(cols/8))``, bits packed
  little-endian along each row (``numpy.packbits(mask, axis=-1, bitorder="little")``), one
  bit per dense element, exactly 2 set per group of 4; ``MOD.shape`` - int64 ``(2, 1)``,
  the dense shape. Every other tensor is stored as it is.
* ``config.json`` carries ``quantization_config = {"quant_method": "compressed-tensors",
  "format": "dense", "config_groups": {}, "version": ..., "sparsity_config": {"format":
  "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": [MOD, ...], "ignore": [...],
  "global_sparsity": float}}``.

Groups with fewer than two nonzeros mark their lowest-index zeros as kept (stored zeros).

That layout has no checksums. Beside it we write ``sparsemerge_checksums.json`` (ignored by
vLLM and compressed-tensors): a :func:`fields_digest` per safetensors key, a digest of the
``quantization_config`` and a digest of the file itself, so our reader detects a flipped byte,
an edited, added or dropped tensor, or an edited sparsity config. Folders written by other
tools (no such file) get structure checks only, and ``checks`` says so.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.base import LAYOUTS, PackLayout, SparseFormat, TensorTable, dtype_name
from sparsemerge.formats.bitmask import Bitmask, pack_mask, unpack_mask
from sparsemerge.formats.nm import NMPacked
from sparsemerge.formats.size import PlanRow, ct_nbytes
from sparsemerge.io.checksum import canonical_json, fields_digest
from sparsemerge.patterns import NM

if TYPE_CHECKING:
    from sparsemerge.formats.model import PackConfig

CT_FORMAT = "sparse-24-bitmask"
CT_SUFFIXES = ("compressed", "bitmask", "shape")
CT_VERSION_WRITTEN = "0.9.4"  # the compressed-tensors release line that reads and writes this layout
CHECKSUMS_LAYOUT = "sparsemerge-ct-checksums"


def _key_digest(key: str, tensor: torch.Tensor) -> str:
    return fields_digest({key: tensor})


def _sealed(body: dict[str, Any]) -> str:
    import hashlib

    return hashlib.sha256(b"sparsemerge-ct-checksums\0" + canonical_json(body)).hexdigest()


def write_checksums(folder: Path, digests: dict[str, str], quantization_config: dict[str, Any]) -> None:
    """The digests file beside a compressed-tensors folder (see the module docstring)."""
    from sparsemerge.formats.layout import CT_CHECKSUMS_NAME

    body = {"layout": CHECKSUMS_LAYOUT, "version": 1, "tensors": dict(sorted(digests.items())),
            "quantization_config_sha256": _sealed({"quantization_config": quantization_config})}
    body["sha256"] = _sealed(body)
    (folder / CT_CHECKSUMS_NAME).write_text(json.dumps(body, indent=1) + "\n")


def read_checksums(folder: Path, config: dict[str, Any], keys: "set[str]") -> "dict[str, str] | None":
    """The per-key digests of a folder we wrote, checked against itself, the config and the
    set of keys in the safetensors; None where there is no checksums file."""
    from sparsemerge.formats.layout import CT_CHECKSUMS_NAME

    path = folder / CT_CHECKSUMS_NAME
    if not path.is_file():
        return None
    where = f"{str(path)!r}"
    try:
        body = json.loads(path.read_text())
        recorded = body.pop("sha256")
        tensors = body["tensors"]
        sealed = _sealed(body)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SparsemergeError(f"{where} is unreadable or malformed ({exc}); repack, or delete it to read the folder unchecked") from None
    if body.get("layout") != CHECKSUMS_LAYOUT or recorded != sealed or not isinstance(tensors, dict):
        raise SparsemergeError(f"{where} does not match its own sha256: it was edited or is corrupt - repack the model")
    try:
        written = _sealed({"quantization_config": config.get("quantization_config")})
    except ValueError as exc:  # NaN or infinity: no canonical JSON, so it is not what we wrote
        raise SparsemergeError(f"the quantization_config in {str(folder / 'config.json')!r} holds a value JSON cannot "
                               f"represent ({exc}); it was edited - restore it or repack the model") from None
    if body.get("quantization_config_sha256") != written:
        raise SparsemergeError(
            f"the quantization_config in {str(folder / 'config.json')!r} differs from the one written with the weights "
            f"({where}): it was edited - restore it or repack the model"
        )
    extra, missing = sorted(keys - set(tensors)), sorted(set(tensors) - keys)
    if extra or missing:
        raise SparsemergeError(
            f"{str(folder)!r}: the safetensors hold tensors that were not written with them ({extra[:5]}) or lack "
            f"tensors that were ({missing[:5]}); the folder was edited or is incomplete - repack the model"
        )
    return {str(k): str(v) for k, v in tensors.items()}


def sparsity_config_of(config: dict[str, Any]) -> "dict[str, Any] | None":
    """The ``sparsity_config`` of a config.json (under quantization_config, or legacy top level)."""
    if not isinstance(config, dict):
        return None
    for holder in (config.get("quantization_config"), config.get("compression_config"), config):
        if isinstance(holder, dict) and isinstance(holder.get("sparsity_config"), dict) and holder["sparsity_config"]:
            return holder["sparsity_config"]
    return None


def is_ct_folder(folder: Path) -> bool:
    path = Path(folder) / "config.json"
    if not path.is_file():
        return False
    try:
        config = json.loads(path.read_text())
    except ValueError:
        return False
    sparsity = sparsity_config_of(config)
    return bool(sparsity and sparsity.get("format") == CT_FORMAT)


def to_ct_fields(obj: NMPacked) -> dict[str, torch.Tensor]:
    """An unquantized 2:4 :class:`NMPacked` -> the three compressed-tensors tensors."""
    if (obj.n, obj.m) != (2, 4) or obj.codec is not None:
        raise SparsemergeError("the sparse-24-bitmask layout holds unquantized 2:4 weights only")
    rows, cols = obj.shape
    mask = torch.zeros(rows * cols // 4, 4, dtype=torch.bool)
    mask.scatter_(1, obj.positions().reshape(-1, 2).to(torch.int64), True)
    return {
        "compressed": obj.values.contiguous(),  # type: ignore[union-attr]
        "bitmask": pack_mask(mask.reshape(rows, cols)),
        "shape": torch.tensor([rows, cols], dtype=torch.int64).reshape(-1, 1),
    }


def from_ct_fields(name: str, compressed: torch.Tensor, bitmask: torch.Tensor, shape: torch.Tensor) -> SparseFormat:
    """The three tensors -> :class:`NMPacked` (exactly 2 bits per group) or :class:`Bitmask`."""
    what = f"tensor {name!r}"
    dims = [int(x) for x in shape.reshape(-1).tolist()]
    if len(dims) != 2 or min(dims) < 0:
        raise SparsemergeError(f"{what}: compressed-tensors shape {dims} is not a 2-D shape")
    rows, cols = dims
    if tuple(bitmask.shape) != (rows, (cols + 7) // 8) or bitmask.dtype != torch.uint8:
        raise SparsemergeError(f"{what}: bitmask is {dtype_name(bitmask.dtype)} {tuple(bitmask.shape)}, expected uint8 {(rows, (cols + 7) // 8)}")
    mask = unpack_mask(bitmask, cols)
    nset = int(mask.sum())
    if compressed.numel() != nset:
        raise SparsemergeError(f"{what}: {compressed.numel()} compressed values for {nset} set bitmask bits; the file is corrupt")
    values = compressed.reshape(-1)
    if cols % 4 == 0 and nset * 2 == rows * cols and bool((mask.reshape(-1, 4).sum(1) == 2).all()):
        positions = mask.reshape(-1, 4).nonzero()[:, 1].to(torch.uint8).reshape(rows, cols // 2)
        return NMPacked((rows, cols), values.dtype, 2, 4, "bits2", values.reshape(rows, cols // 2).contiguous(), positions.contiguous())
    return Bitmask((rows, cols), values.dtype, mask, values.contiguous())


def write_ct(src: Any, out: "str | Path", config: "PackConfig", overwrite: bool = False, progress: bool = False) -> Any:
    """``pack --format sparse-24-bitmask``: write a compressed-tensors folder."""
    from sparsemerge.formats.layout import STORED_DTYPES, PackReport, _progress, _targets, copy_side_files
    from sparsemerge.io import ShardedWriter, atomic_output, ensure_writable, open_tensor_source

    if config.quant != "none" or config.codebook is not None or config.dense_quant != "none":
        raise SparsemergeError("the sparse-24-bitmask layout stores unquantized values; drop --quant/--codebook/--dense-quant")
    ensure_writable(out, overwrite, inputs=[src])
    started = time.perf_counter()
    report = PackReport(Path(out))
    targeted = _targets(config)
    stored = STORED_DTYPES[config.dtype]
    targets: list[str] = []
    ignore: list[str] = []
    zeros = total = 0
    digests: dict[str, str] = {}
    with open_tensor_source(src) as source, atomic_output(out, overwrite=overwrite, inputs=[src]) as tmp:
        writer = ShardedWriter(tmp, config.shard_size, metadata={"format": "pt"})  # model.safetensors, or shards + index
        for name in _progress(source.names(), progress, "pack"):
            tensor = source.get(name)
            if stored is not None and tensor.is_floating_point():
                tensor = tensor.to(stored)
            report.numel += tensor.numel()
            if targeted(name) and tensor.dim() == 2 and tensor.is_floating_point():
                module = name[: -len(".weight")]
                if tensor.shape[1] % 4:
                    report.kept_dense.append((name, f"input dimension {tensor.shape[1]} not divisible by 4"))
                    ignore.append(module)
                else:
                    try:
                        packed = NMPacked.from_dense(tensor, 2, 4, "bits2")
                    except SparsemergeError as exc:
                        raise type(exc)(f"tensor {name!r}: {exc}") from None
                    fields = {f"{module}.{k}": v for k, v in to_ct_fields(packed).items()}
                    writer.add_group(fields)
                    digests.update({k: _key_digest(k, v) for k, v in fields.items()})
                    report.nbytes += sum(v.numel() * v.element_size() for v in fields.values())
                    report.packed.append(name)
                    targets.append(module)
                    zeros += int((tensor == 0).sum())
                    total += tensor.numel()
                    continue
            writer.add(name, tensor)
            digests[name] = _key_digest(name, tensor)
            report.nbytes += tensor.numel() * tensor.element_size()
        writer.finish()
        copy_side_files(source.folder, tmp, only_known=source.source.kind == "safetensors")
        config_path = tmp / "config.json"
        model_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        model_config["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "dense",
            "config_groups": {},
            "version": CT_VERSION_WRITTEN,
            "sparsity_config": {
                "format": CT_FORMAT,
                "sparsity_structure": "2:4",
                "targets": targets,
                "ignore": ignore,
                "global_sparsity": zeros / total if total else 0.0,
            },
        }
        config_path.write_text(json.dumps(model_config, indent=2) + "\n")
        write_checksums(tmp, digests, json.loads(config_path.read_text())["quantization_config"])
        report.tensors = len(source.names())
    report.seconds = time.perf_counter() - started
    return report


class CTCheckpoint(TensorTable):
    """A compressed-tensors sparse-24-bitmask folder behind the :class:`PackedCheckpoint` API.

    Reads check shapes and bit counts; where we wrote the folder, ``verify`` also checks each
    tensor's digest from ``sparsemerge_checksums.json`` (``checks`` says which applies)."""

    def __init__(self, folder: "str | Path") -> None:
        from sparsemerge.io.reader import ShardReader

        self.folder = Path(folder)
        self._config = json.loads((self.folder / "config.json").read_text())
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                location = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise SparsemergeError(f"corrupt shard index {str(index)!r}: {exc}") from None
        else:
            files = sorted(p.name for p in self.folder.glob("*.safetensors"))
            if not files:
                raise SparsemergeError(f"no safetensors files in {str(self.folder)!r}")
            location = {}
            reader = ShardReader(self.folder)
            for shard in files:
                for key in reader.keys(shard):
                    location[key] = shard
        holders: dict[str, list[str]] = {}
        for key, shard in location.items():
            holders.setdefault(shard, []).append(key)
        self._reader = ShardReader(self.folder, holders)
        self._location = location
        self.tensors: dict[str, dict[str, str]] = {}  # dense name -> {suffix or "": key}
        for key in location:
            module, _, suffix = key.rpartition(".")
            if suffix in CT_SUFFIXES and all(f"{module}.{s}" in location for s in CT_SUFFIXES):
                self.tensors.setdefault(f"{module}.weight", {})[suffix] = key
            else:
                self.tensors[key] = {"": key}
        self.manifest = {"layout": CT_FORMAT, "sparsity_config": sparsity_config_of(self._config)}
        self._digests = read_checksums(self.folder, self._config, set(location))
        self.checks = (
            "structure only: a compressed-tensors folder without sparsemerge_checksums.json (shapes and bit counts)"
            if self._digests is None
            else "full: every tensor's bytes, the key set and the sparsity config (sparsemerge_checksums.json)"
        )

    def _read(self, key: str, what: str, verify: bool) -> torch.Tensor:
        tensor = self._reader.get(self._location[key], key, what)
        if verify and self._digests is not None and _key_digest(key, tensor) != self._digests[key]:
            raise SparsemergeError(
                f"{what}: checksum mismatch of {key!r} in shard {self._location[key]!r}; the file is corrupt - repack the model"
            )
        return tensor

    def config(self) -> dict[str, Any]:
        return dict(self._config)

    def _entry(self, name: str) -> dict[str, str]:
        try:
            return self.tensors[name]
        except KeyError:
            raise SparsemergeError(f"tensor {name!r} is not in {str(self.folder)!r}") from None

    def get(self, name: str, verify: bool = True) -> "SparseFormat | torch.Tensor":
        entry = self._entry(name)
        what = f"tensor {name!r}"
        if "" in entry:
            return self._read(entry[""], what, verify)
        parts = {s: self._read(k, what, verify) for s, k in entry.items()}
        obj = from_ct_fields(name, parts["compressed"], parts["bitmask"], parts["shape"])
        obj.check()
        return obj

    def get_format(self, name: str, verify: bool = True) -> SparseFormat:
        obj = self.get(name, verify)
        if isinstance(obj, torch.Tensor):
            from sparsemerge.formats.dense import Dense

            return Dense.from_dense(obj)
        return obj

    def get_dense(self, name: str, verify: bool = True, dtype: "torch.dtype | None" = None) -> torch.Tensor:
        obj = self.get(name, verify)
        dense = obj if isinstance(obj, torch.Tensor) else obj.to_dense()
        return dense.to(dtype or dense.dtype)

    def nbytes(self, name: str) -> int:
        total = 0
        for key in self._entry(name).values():
            header = self._reader.header(self._location[key])[key]
            start, end = header["data_offsets"]
            total += int(end) - int(start)
        return total

    def record(self, name: str) -> dict[str, Any]:
        entry = self._entry(name)
        if "" in entry:
            header = self._reader.header(self._location[entry[""]])[entry[""]]
            return {"format": "dense", "shape": header["shape"], "params": {"codec": None}}
        shape = self.get_dense_shape(name)
        return {"format": CT_FORMAT, "shape": shape, "params": {"n": 2, "m": 4, "codec": None}}

    def get_dense_shape(self, name: str) -> list[int]:
        key = self._entry(name)["shape"]
        return [int(x) for x in self._reader.get(self._location[key], key, f"tensor {name!r}").reshape(-1).tolist()]

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "CTCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def ct_nbytes(rows: int, cols: int, value_bytes: int) -> int:
    """Bytes of one weight in the sparse-24-bitmask layout (values + bitmask + shape)."""
    return rows * cols // 2 * value_bytes + rows * math.ceil(cols / 8) + 16


def _ct_plan_rows(p: Any) -> list[PlanRow]:
    if isinstance(p.pattern, NM) and (p.pattern.n, p.pattern.m) == (2, 4):
        return [p.row("ct 2:4", "compressed-tensors sparse-24-bitmask", ct_nbytes(p.rows, p.cols, p.value_bytes))]
    return []


LAYOUTS.register(CT_FORMAT)(PackLayout(
    CT_FORMAT, "compressed-tensors 2:4 (vLLM, llm-compressor): unquantized 2:4 weights, the rest dense", write_ct,
    plan_rows=_ct_plan_rows, plan_order=60,
))
