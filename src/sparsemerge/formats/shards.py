"""Sharded safetensors writing and checked reading for packed checkpoints.

:class:`ShardWriter` buffers tensors until a shard reaches ``max_bytes`` and then writes it;
``finish()`` renames the shards to their final ``PREFIX-0000i-of-0000n.safetensors`` names and
returns ``key -> file name``. It writes into a folder that the caller made atomic
(:func:`sparsemerge.io.atomic_output`), so a failure leaves nothing behind.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from sparsemerge.errors import SparsemergeError


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor as safetensors stores them."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def fields_digest(fields: dict[str, torch.Tensor]) -> str:
    """SHA-256 over ``name \\0 dtype \\0 shape \\0 bytes`` of every field, fields sorted by name."""
    digest = hashlib.sha256()
    for name in sorted(fields):
        t = fields[name]
        header = f"{name}\0{str(t.dtype).replace('torch.', '')}\0{','.join(map(str, t.shape))}\0"
        digest.update(header.encode())
        digest.update(tensor_bytes(t))
    return digest.hexdigest()


class ShardWriter:
    def __init__(self, folder: Path, prefix: str, max_bytes: int, metadata: "dict[str, str] | None" = None, single_name: "str | None" = None) -> None:
        if max_bytes <= 0:
            raise SparsemergeError(f"shard size must be positive, got {max_bytes}")
        self.folder, self.prefix, self.max_bytes = Path(folder), prefix, max_bytes
        self.metadata = metadata or {}
        self.single_name = single_name
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0
        self._seen: set[str] = set()

    def add(self, key: str, tensor: torch.Tensor) -> None:
        self.add_group({key: tensor})

    def add_group(self, tensors: dict[str, torch.Tensor]) -> None:
        """Add tensors that belong together (one weight's fields) to the same shard."""
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        for key, tensor in tensors.items():
            if key in self._pending or key in self._seen:
                raise SparsemergeError(f"storage key {key!r} is written twice")
            self._seen.add(key)
            self._pending[key] = tensor.detach().cpu().contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        from safetensors.torch import save_file

        if not self._pending:
            return
        path = self.folder / f".shard-{len(self._written):05d}.tmp"
        save_file(self._pending, str(path), metadata=self.metadata)
        self._written.append((path, list(self._pending)))
        self._pending = {}
        self._pending_bytes = 0

    def finish(self) -> dict[str, str]:
        self._flush()
        if not self._written:  # an empty checkpoint still gets one (empty) shard
            from safetensors.torch import save_file

            path = self.folder / ".shard-00000.tmp"
            save_file({}, str(path), metadata=self.metadata)
            self._written.append((path, []))
        total = len(self._written)
        location: dict[str, str] = {}
        for i, (path, keys) in enumerate(self._written):
            name = self.single_name if (total == 1 and self.single_name) else f"{self.prefix}-{i + 1:05d}-of-{total:05d}.safetensors"
            os.replace(path, self.folder / name)
            for key in keys:
                location[key] = name
        return location


class ShardReader:
    """Opens shards lazily; every failure names the shard and the tensors it holds."""

    def __init__(self, folder: Path, holders: "dict[str, list[str]] | None" = None) -> None:
        self.folder = Path(folder)
        self.holders = holders or {}  # shard -> tensor names, for error messages
        self._handles: dict[str, Any] = {}

    def _who(self, shard: str) -> str:
        names = self.holders.get(shard, [])
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return f" (it holds {shown})" if shown else ""

    def open(self, shard: str) -> Any:
        if shard not in self._handles:
            from safetensors import safe_open

            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise SparsemergeError(f"shard name {shard!r} is not a file name inside {str(self.folder)!r}; the manifest is corrupt")
            path = self.folder / shard
            if not path.is_file():
                raise SparsemergeError(f"shard {shard!r} is missing from {str(self.folder)!r}{self._who(shard)}")
            try:
                self._handles[shard] = safe_open(str(path), framework="pt")
            except Exception as exc:
                raise SparsemergeError(
                    f"shard {shard!r} is unreadable - truncated or corrupt? ({exc}){self._who(shard)}"
                ) from None
        return self._handles[shard]

    def keys(self, shard: str) -> Iterable[str]:
        return self.open(shard).keys()

    def get(self, shard: str, key: str, what: str) -> torch.Tensor:
        handle = self.open(shard)
        try:
            return handle.get_tensor(key)
        except Exception as exc:
            raise SparsemergeError(f"{what}: could not read {key!r} from shard {shard!r} ({exc}); the file is corrupt or does not match the manifest") from None

    def header(self, shard: str) -> dict[str, Any]:
        """The raw safetensors header (dtype, shape, offsets per key) without reading data."""
        import json
        import struct

        path = self.folder / shard
        with open(path, "rb") as handle:
            size = struct.unpack("<Q", handle.read(8))[0]
            return json.loads(handle.read(size))

    def close(self) -> None:
        self._handles.clear()
