"""Lazy, one-tensor-at-a-time access to checkpoint weights (for merging, packing and checks).

Safetensors shards are read per tensor with positioned reads (:mod:`sparsemerge.io.reader`,
no memory map), so a job holds only the tensors it is working on. GGUF sources go through the
dequantized cache of :mod:`sources`; ``pytorch_model*.bin`` files are loaded memory-mapped.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.io.dtypes import SAFETENSORS_DTYPES  # noqa: F401  (re-exported: the old home of the table)
from sparsemerge.io.reader import SafetensorsFile, index_shards
from sparsemerge.io.sources import ResolvedSource, gguf_as_hf_folder, resolve_source


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
        self._files: dict[Path, SafetensorsFile] = {}
        self._torch_state: dict[Path, dict[str, torch.Tensor]] = {}
        try:
            for path in files:
                for name in self._names_in(path):
                    self._location[name] = path
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _folder_files(folder: Path) -> list[Path]:
        shards = index_shards(folder)
        if shards is not None:
            return shards
        files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
        if not files:
            raise SparsemergeError(f"no weight files (*.safetensors or pytorch_model*.bin) in {str(folder)!r}")
        return files

    def _names_in(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            if not path.is_file():
                raise SparsemergeError(f"weight file {str(path)!r} is missing")
            self._files[path] = SafetensorsFile(path)  # header read and checked now, data on demand
            return self._files[path].keys()
        try:  # weights_only: a pickle that would run code, or a damaged file, is refused, never run
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # torch raises pickle.UnpicklingError, RuntimeError, EOFError ...
            raise SparsemergeError(
                f"cannot read {str(path)!r} as a weights-only PyTorch checkpoint ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); convert it to safetensors from a trusted copy"
            ) from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise SparsemergeError(f"{str(path)!r} does not hold a mapping of tensor names to tensors")
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
        return self._files[path].info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of ``name`` without reading its data."""
        path = self._where(name)
        if path in self._torch_state:
            return self._torch_state[path][name].dtype
        return self._files[path].info(name).dtype

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (positioned read into a new buffer; safe from several threads)."""
        path = self._where(name)
        if path in self._torch_state:
            return self._torch_state[path][name]
        return self._files[path].get(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the first dimension (a safetensors file reads only their bytes)."""
        path = self._where(name)
        if path in self._torch_state:
            return self._torch_state[path][name][start:stop].clone()
        return self._files[path].get_rows(name, start, stop)

    def config(self) -> dict[str, Any]:
        """The folder's config.json ({} without one); a corrupt one is a SparsemergeError."""
        path = self.folder / "config.json"
        if not path.is_file():
            return {}
        try:
            config = json.loads(path.read_text())
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: invalid JSON or UTF-8
            raise SparsemergeError(f"{str(path)!r} is not valid JSON ({exc}); restore it from the source model") from None
        if not isinstance(config, dict):
            raise SparsemergeError(f"{str(path)!r} must hold a JSON object; restore it from the source model")
        return config

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._torch_state.clear()

    def __enter__(self) -> "TensorSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_tensor_source(spec: "str | os.PathLike[str] | ResolvedSource") -> TensorSource:
    source = spec if isinstance(spec, ResolvedSource) else resolve_source(spec)
    if source.kind == "hf":  # folders whose weights alone are not the model: refuse, never drop a part
        from sparsemerge.io.shared import refuse_sharing
        from sparsemerge.io.stitched import refuse_adapters

        refuse_adapters(source.path, "reading its tensors")
        refuse_sharing(source.path, "reading its tensors")
    return TensorSource(source)
