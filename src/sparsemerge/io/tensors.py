"""Lazy, one-tensor-at-a-time access to checkpoint weights (for merging, packing and checks).

Safetensors shards are memory-mapped and read per tensor, so a job holds only the tensors
it is working on. GGUF sources go through the dequantized cache of :mod:`sources`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.io.sources import ResolvedSource, gguf_as_hf_folder, resolve_source


SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class TensorSource:
    """Names, shapes and dtypes without reading data; ``get(name)`` reads one tensor."""

    def __init__(self, source: ResolvedSource) -> None:
        self.source = source
        if source.kind == "gguf":
            self.folder = gguf_as_hf_folder(source)
            files = self._folder_files(self.folder)
        elif source.kind == "hf":
            self.folder = source.path
            files = self._folder_files(self.folder)
        else:
            self.folder = source.path.parent
            files = [source.path]
        self._location: dict[str, Path] = {}
        self._handles: dict[Path, Any] = {}
        self._torch_state: dict[Path, dict[str, torch.Tensor]] = {}
        for path in files:
            for name in self._names_in(path):
                self._location[name] = path

    @staticmethod
    def _folder_files(folder: Path) -> list[Path]:
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as exc:
                raise SparsemergeError(f"corrupt shard index {str(index)!r}: {exc}") from exc
            return sorted({folder / shard for shard in weight_map.values()})
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
        if not files:
            raise SparsemergeError(f"no weight files (*.safetensors or pytorch_model*.bin) in {str(folder)!r}")
        return files

    def _open(self, path: Path) -> Any:
        if path not in self._handles:
            from safetensors import safe_open

            if not path.is_file():
                raise SparsemergeError(f"weight file {str(path)!r} is missing")
            try:
                self._handles[path] = safe_open(str(path), framework="pt")
            except Exception as exc:
                raise SparsemergeError(f"could not read {str(path)!r} (truncated or corrupt?): {exc}") from exc
        return self._handles[path]

    def _names_in(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            return list(self._open(path).keys())
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        self._torch_state[path] = state
        return list(state)

    def names(self) -> list[str]:
        return list(self._location)

    def __contains__(self, name: str) -> bool:
        return name in self._location

    def __iter__(self) -> Iterator[str]:
        return iter(self._location)

    def __len__(self) -> int:
        return len(self._location)

    def _where(self, name: str) -> Path:
        try:
            return self._location[name]
        except KeyError:
            raise SparsemergeError(f"tensor {name!r} is not in {self.source.name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        path = self._where(name)
        if path in self._torch_state:
            return tuple(self._torch_state[path][name].shape)
        return tuple(self._open(path).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of ``name`` without reading its data."""
        path = self._where(name)
        if path in self._torch_state:
            return self._torch_state[path][name].dtype
        code = self._open(path).get_slice(name).get_dtype()
        try:
            return SAFETENSORS_DTYPES[code]
        except KeyError:
            raise SparsemergeError(f"tensor {name!r} has unsupported dtype {code}") from None

    def get(self, name: str) -> torch.Tensor:
        path = self._where(name)
        if path in self._torch_state:
            return self._torch_state[path][name]
        try:
            return self._open(path).get_tensor(name)
        except Exception as exc:
            raise SparsemergeError(f"could not read tensor {name!r} from {str(path)!r}: {exc}") from exc

    def config(self) -> dict[str, Any]:
        config = self.folder / "config.json"
        return json.loads(config.read_text()) if config.is_file() else {}

    def close(self) -> None:
        self._handles.clear()
        self._torch_state.clear()

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tensor_source(spec: "str | os.PathLike[str] | ResolvedSource") -> TensorSource:
    source = spec if isinstance(spec, ResolvedSource) else resolve_source(spec)
    return TensorSource(source)
