"""Streaming sharded safetensors writer: memory bounded by one tensor, not by a shard.

Every output tensor's name, shape and dtype is known before any is computed (a merge keeps
the inputs' shapes), so each shard's safetensors header (8-byte little-endian length, JSON
``{name: {dtype, shape, data_offsets}}``, space padding to 8 bytes) is written first and the
tensors' bytes are appended as they are produced, in plan order. Shards are named as
transformers names them (``model-00001-of-00003.safetensors`` + ``model.safetensors.index.json``;
``model.safetensors`` when one shard suffices).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Optional

import torch

from sparsemerge.errors import SparsemergeError

_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty((), dtype=self.dtype).element_size()


class StreamingShardWriter:
    """Write ``planned`` tensors, in order, into shards of at most ``max_shard_bytes`` under ``folder``."""

    def __init__(self, folder: Path, planned: list[PlannedTensor], max_shard_bytes: int, metadata: Optional[dict[str, str]] = None) -> None:
        self.folder = Path(folder)
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for p in planned:
            if p.dtype not in _CODES:
                raise SparsemergeError(f"cannot write tensor {p.name} of dtype {p.dtype}")
            if shards[-1] and size + p.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(p)
            size += p.nbytes
        n = len(shards)
        self.files = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._shards = shards
        self._order = [p for shard in shards for p in shard]
        self._next = 0
        self._shard_index = -1
        self._remaining = 0
        self._handle: Optional[BinaryIO] = None
        self.total_size = sum(p.nbytes for p in planned)

    def _open_next(self) -> None:
        self._close_current()
        self._shard_index += 1
        tensors = self._shards[self._shard_index]
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for p in tensors:
            header[p.name] = {"dtype": _CODES[p.dtype], "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
            offset += p.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._handle = open(self.folder / self.files[self._shard_index], "wb")
        self._handle.write(struct.pack("<Q", len(raw)))
        self._handle.write(raw)
        self._remaining = len(tensors)

    def _close_current(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next planned tensor (names must come in plan order)."""
        expected = self._order[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise SparsemergeError(
                f"internal: writer expected {expected.name} {expected.shape} {expected.dtype}, "
                f"got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if self._remaining == 0:
            self._open_next()
        assert self._handle is not None
        data = tensor.detach().contiguous().cpu().reshape(-1)
        if data.numel():
            self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1
        self._remaining -= 1

    def finish(self) -> None:
        """Close the last shard and write the index (for more than one shard)."""
        self._close_current()
        if self._next != len(self._order):
            raise SparsemergeError(f"internal: {len(self._order) - self._next} planned tensors were not written")
        if len(self.files) > 1:
            weight_map = {p.name: self.files[i] for i, shard in enumerate(self._shards) for p in shard}
            index = {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")

    def close(self) -> None:
        self._close_current()
