"""Reading packed checkpoints (layout: :mod:`sparsemerge.formats.model`): ``read_packed``
opens a folder and verifies each tensor as it is read; ``unpack`` writes a Hugging Face folder.
Both are re-exported by :mod:`sparsemerge.formats.model`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.base import FORMATS, SparseFormat, TensorTable, dtype_from_name, dtype_name
from sparsemerge.formats.dense import Dense
from sparsemerge.formats.layout import LAYOUT, MANIFEST_NAME, READABLE_VERSIONS, _progress, copy_side_files
from sparsemerge.formats.stacks import StackCollector, stack_entry
from sparsemerge.io.checksum import MANIFEST_DIGEST_KEY, fields_digest, manifest_digest, record_digest
from sparsemerge.io.reader import ShardReader
from sparsemerge.io.writer import ShardedWriter


class PackedCheckpoint(TensorTable):
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
        version = manifest.get("version")
        if version not in READABLE_VERSIONS:
            readable = ", ".join(str(v) for v in READABLE_VERSIONS)
            raise SparsemergeError(
                f"{str(path)!r} has layout version {version!r}; this sparsemerge reads versions {readable} - "
                "repack it from the source, or upgrade sparsemerge if a newer one wrote it"
            )
        if not isinstance(manifest.get("tensors"), dict):
            raise SparsemergeError(f"{str(path)!r} has no 'tensors' table")
        self.version = int(version)
        if self.version >= 2:
            # The manifest digest covers every entry, so edits are caught here, before any tensor is used.
            recorded, actual = manifest.get(MANIFEST_DIGEST_KEY), _manifest_digest(path, manifest)
            if recorded != actual:
                state = "has no manifest_sha256" if recorded is None else "does not match its manifest_sha256"
                raise SparsemergeError(
                    f"{str(path)!r} {state}: the manifest was edited or is corrupt - repack it from the source"
                )
            self.checks = "full: every tensor's bytes and manifest entry, and the manifest as a whole (sha256)"
        else:
            self.checks = "data only: version 1 manifest - tensor bytes are checksummed, manifest entries are not (repack to cover them)"
        self.manifest = manifest
        self.tensors: dict[str, Any] = manifest["tensors"]
        shards = manifest.get("shards")
        _check_shard_lists(path, self.tensors, shards)
        self._reader = ShardReader(self.folder, shards if isinstance(shards, dict) else {})

    def record(self, name: str) -> dict[str, Any]:
        try:
            return self.tensors[name]
        except KeyError:
            raise SparsemergeError(f"tensor {name!r} is not in the packed checkpoint {str(self.folder)!r}") from None

    def config(self) -> dict[str, Any]:
        path = self.folder / "config.json"
        if not path.is_file():
            return {}
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SparsemergeError(f"{str(path)!r} is not valid JSON ({exc}); restore it from the source model") from None
        if not isinstance(config, dict):
            raise SparsemergeError(f"{str(path)!r} must hold a JSON object; restore it from the source model")
        return config

    def read_fields(self, name: str, verify: bool = True) -> dict[str, torch.Tensor]:
        record = self.record(name)
        what = f"tensor {name!r}"
        try:
            shard, specs = record["shard"], record["fields"]
            items = [(k, s["key"], s["dtype"], [int(x) for x in s["shape"]]) for k, s in specs.items()]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # e.g. "fields": null
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
            if self.version >= 2:
                digest = record_digest(name, record, digest)  # bytes and entry together
            if digest != record.get("sha256"):
                raise SparsemergeError(
                    f"{what}: checksum mismatch in shard {shard!r} (manifest sha256 {str(record.get('sha256'))[:12]}..., "
                    f"data {digest[:12]}...); {'the data or its manifest entry was changed' if self.version >= 2 else 'the file is corrupt'}"
                    " - repack it from the source"
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
        try:
            return int(self.record(name)["nbytes"])
        except (KeyError, TypeError, ValueError) as exc:
            raise SparsemergeError(f"tensor {name!r}: manifest entry has no valid 'nbytes' ({exc!r}); the checkpoint is corrupt") from None

    def close(self) -> None:
        self._reader.close()

    def __enter__(self) -> "PackedCheckpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _manifest_digest(path: Path, manifest: dict[str, Any]) -> str:
    try:
        return manifest_digest(manifest)
    except ValueError as exc:  # NaN or infinity in a number: canonical JSON refuses it
        raise SparsemergeError(f"{str(path)!r} holds a value JSON cannot digest ({exc}); the manifest is corrupt - repack it") from None


def _check_shard_lists(path: Path, tensors: dict[str, Any], shards: Any) -> None:
    """The manifest's tensor table and its per-shard name lists must agree: an entry added to,
    or dropped from, one of them is an edited or damaged manifest."""
    if not isinstance(shards, dict) or not all(isinstance(v, list) for v in shards.values()):
        raise SparsemergeError(f"{str(path)!r} has no valid 'shards' table (shard file -> tensor names); the checkpoint is corrupt")
    listed = {str(n): str(f) for f, names in shards.items() for n in names}
    extra = sorted(set(tensors) - set(listed))
    missing = sorted(set(listed) - set(tensors))
    for problem, names in (("are in the tensor table but in no shard list", extra),
                           ("are in a shard list but not in the tensor table", missing)):
        if names:
            raise SparsemergeError(f"{str(path)!r}: tensors {names[:5]} {problem}; the manifest was edited or is corrupt - repack it")


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
    if target is not None and not target.is_floating_point:  # int8 would truncate every weight to 0
        raise SparsemergeError(f"--dtype {dtype!r} is not a float dtype; use keep, float32, float16 or bfloat16")
    ensure_writable(out, overwrite, inputs=[path])
    packed = read_packed(path)
    if isinstance(packed, PackedCheckpoint):
        packed.config()  # a broken config.json fails now, not after every tensor is decoded
    with packed, atomic_output(out, overwrite=overwrite, inputs=[path]) as tmp:
        writer = ShardedWriter(tmp, shard_size, metadata={"format": "pt"})  # model.safetensors, or shards + index
        stacks = StackCollector()  # MoE experts stored one entry per expert (stacks.py)
        for name in _progress(packed.names(), progress, "unpack"):
            tensor = packed.get_dense(name)
            if target is not None and tensor.is_floating_point():
                tensor = tensor.to(target)
            stack = stack_entry(packed.record(name), f"tensor {name!r}") if isinstance(packed, PackedCheckpoint) else None
            if stack is None:
                writer.write(name, tensor)
                continue
            parts = stacks.add(*stack, tensor, f"tensor {name!r}")
            if parts is not None:
                writer.write(stack[0], torch.stack(parts))
        stacks.finish()
        writer.finish()
        for name in copy_side_files(packed.folder, tmp):
            if name == "config.json":
                try:
                    config = json.loads((tmp / name).read_text())
                except ValueError as exc:
                    raise SparsemergeError(f"config.json of {str(path)!r} is not valid JSON ({exc})") from None
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
