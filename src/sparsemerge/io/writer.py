"""The one safetensors writer: tensor by tensor, sharded, atomic; memory bounded by one tensor.

:class:`ShardedWriter` writes tensors into shards of at most ``max_shard_bytes`` (a tensor
or group larger than that gets a shard of its own) under a folder:

* with a ``plan`` (every name, shape and dtype known before any tensor is computed, as in a
  merge), each shard's header is laid out in advance and each tensor's bytes go straight to
  their final offset as it arrives (``write`` in plan order);
* without one (packing: a field's size is known only once the tensor is encoded), each
  tensor's bytes are appended to a spool file beside the shard, and when the shard is full
  its header is written and the bytes are copied behind it (``os.copy_file_range``).

Shards are written under hidden temporary names and renamed only by :meth:`finish`; any
failure (or :meth:`close` before ``finish``) removes them, so nothing is left half written.
Existing outputs are refused unless ``overwrite``. Names: ``PREFIX-0000i-of-0000n.safetensors``,
or ``single_name`` when one shard suffices; with ``index`` and more than one shard,
``PREFIX.safetensors.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``) as
transformers writes it.

Header bytes: compact JSON, ``__metadata__`` first (keys in the caller's order), padded with
spaces to a multiple of 8. ``layout="safetensors"`` orders tensors as
``safetensors.torch.save_file`` does (descending dtype rank of :mod:`.dtypes`, then name), so
a file equals save_file's byte for byte (save_file's own order of several metadata keys is a
hash-map order, so byte equality holds for at most one metadata key); ``layout="plan"``
keeps the caller's order (the merge engine's layout).
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Optional

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.io.atomic import follow_umask
from sparsemerge.io.dtypes import BY_TORCH, dtype_name, itemsize, to_code

Layout = Literal["safetensors", "plan"]


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
        return n * itemsize(self.dtype)


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor as safetensors stores them."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def header_bytes(entries: Iterable[PlannedTensor], metadata: Optional[Mapping[str, str]], layout: Layout = "safetensors") -> tuple[bytes, list[PlannedTensor]]:
    """The header (length prefix included) and the entries in file order."""
    ordered = list(entries)
    if layout == "safetensors":
        ordered.sort(key=lambda p: (-BY_TORCH[p.dtype].rank, p.name))
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for p in ordered:
        header[p.name] = {"dtype": to_code(p.dtype, p.name), "shape": list(p.shape), "data_offsets": [offset, offset + p.nbytes]}
        offset += p.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, ordered


def _copy_range(src: int, dst: int, offset: int, count: int) -> None:
    """Append ``count`` bytes of ``src`` from ``offset`` to ``dst`` (kernel copy where possible)."""
    if hasattr(os, "copy_file_range"):
        try:
            while count > 0:
                n = os.copy_file_range(src, dst, count, offset)
                if n <= 0:
                    break
                offset += n
                count -= n
        except OSError:
            pass  # e.g. a filesystem without support: copy through user space
    while count > 0:
        chunk = os.pread(src, min(count, 1 << 24), offset)
        if not chunk:
            raise SparsemergeError("internal: the spool file ended early")
        os.write(dst, chunk)
        offset += len(chunk)
        count -= len(chunk)


def _write_all(fd: int, data: "bytes | memoryview", offset: Optional[int] = None) -> None:
    view = memoryview(data).cast("B")
    done = 0
    while done < len(view):
        n = os.write(fd, view[done:]) if offset is None else os.pwrite(fd, view[done:], offset + done)
        done += n


class ShardedWriter:
    """See the module docstring. ``write``/``write_group`` tensors, then ``finish()``."""

    def __init__(
        self,
        folder: "str | os.PathLike[str]",
        max_shard_bytes: int = 5 * 1024**3,
        *,
        plan: Optional[list[PlannedTensor]] = None,
        prefix: str = "model",
        single_name: Optional[str] = "model.safetensors",
        metadata: Optional[Mapping[str, str]] = None,
        layout: Layout = "safetensors",
        index: bool = True,
        overwrite: bool = False,
    ) -> None:
        if max_shard_bytes <= 0:
            raise SparsemergeError(f"shard size must be positive, got {max_shard_bytes}")
        if layout not in ("safetensors", "plan"):
            raise SparsemergeError(f"unknown safetensors layout {layout!r}; expected 'safetensors' or 'plan'")
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.prefix, self.single_name = prefix, single_name
        self.metadata = dict(metadata) if metadata is not None else None
        self.layout: Layout = layout
        self.index, self.overwrite = index, overwrite
        self.total_bytes = 0
        self.files: list[str] = []
        self._temps: list[Path] = []  # every temporary this writer created (removed on failure)
        self._done: list[tuple[Path, list[str]]] = []  # closed shards: temporary path, tensor names
        self._seen: set[str] = set()
        self._finished = False
        self._fd: Optional[int] = None
        self.plan = plan
        if plan is not None:
            self._init_plan(plan)
        else:
            self._spool_fd: Optional[int] = None
            self._spool: list[tuple[PlannedTensor, int]] = []  # entry, offset in the spool
            self._spool_bytes = 0

    # -- names ----------------------------------------------------------------------------
    def _names(self, n: int) -> list[str]:
        if n == 1 and self.single_name:
            return [self.single_name]
        return [f"{self.prefix}-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]

    @property
    def index_name(self) -> str:
        return f"{self.prefix}.safetensors.index.json"

    def _refuse_existing(self, names: list[str]) -> None:
        if self.overwrite:
            return
        taken = [n for n in names + ([self.index_name] if self.index and len(names) > 1 else []) if (self.folder / n).exists()]
        if taken:
            raise SparsemergeError(
                f"output {str(self.folder / taken[0])!r} already exists; choose another folder or pass --overwrite (overwrite=True) to replace it"
            )

    def _temp(self, what: str) -> tuple[int, Path]:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{self.prefix}-{what}-", suffix=".tmp", dir=self.folder)
        follow_umask(name, is_dir=False)  # renamed to a shard: the mode open() would give, not 0600
        self._temps.append(Path(name))
        return fd, Path(name)

    @staticmethod
    def _check_dtype(name: str, dtype: torch.dtype) -> None:
        if dtype not in BY_TORCH:
            raise SparsemergeError(f"cannot write tensor {name!r} of dtype {dtype_name(dtype)} to safetensors")

    # -- planned: headers in advance, bytes to their offsets -------------------------------
    def _init_plan(self, plan: list[PlannedTensor]) -> None:
        shards: list[list[PlannedTensor]] = [[]]
        size = 0
        for p in plan:
            self._check_dtype(p.name, p.dtype)
            if p.name in self._seen:
                raise SparsemergeError(f"tensor {p.name!r} is planned twice")
            self._seen.add(p.name)
            if shards[-1] and size + p.nbytes > self.max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(p)
            size += p.nbytes
        self.files = self._names(len(shards))
        self._refuse_existing(self.files)
        self._shards = shards
        self._order = [(i, p) for i, shard in enumerate(shards) for p in shard]
        self._next = 0
        self._offsets: list[dict[str, int]] = []
        self._headers: list[bytes] = []
        for shard in shards:
            raw, ordered = header_bytes(shard, self.metadata, self.layout)
            self._headers.append(raw)
            offsets, pos = {}, len(raw)
            for p in ordered:
                offsets[p.name] = pos
                pos += p.nbytes
            self._offsets.append(offsets)
        self._shard_index = -1
        self.total_bytes = sum(p.nbytes for p in plan)

    def _open_planned(self, i: int) -> None:
        self._close_fd()
        fd, path = self._temp(f"shard{i + 1:05d}")
        self._fd = fd
        _write_all(fd, self._headers[i], 0)
        self._done.append((path, [p.name for p in self._shards[i]]))
        self._shard_index = i

    def _write_planned(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._order):
            raise SparsemergeError(f"internal: writer got {name} after all planned tensors")
        i, expected = self._order[self._next]
        if name != expected.name or tuple(tensor.shape) != expected.shape or tensor.dtype != expected.dtype:
            raise SparsemergeError(
                f"internal: writer expected {expected.name} {expected.shape} {expected.dtype}, "
                f"got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        while self._shard_index < i:
            self._open_planned(self._shard_index + 1)
        assert self._fd is not None
        _write_all(self._fd, tensor_bytes(tensor), self._offsets[i][name])
        self._next += 1

    # -- unplanned: spool, then header + copy ------------------------------------------------
    def _write_spooled(self, group: Mapping[str, torch.Tensor]) -> None:
        size = 0
        for key, tensor in group.items():
            self._check_dtype(key, tensor.dtype)
            if key in self._seen:
                raise SparsemergeError(f"storage key {key!r} is written twice")
            size += tensor.numel() * itemsize(tensor.dtype)
        if self._spool and self._spool_bytes + size > self.max_shard_bytes:
            self._close_spooled()
        if self._spool_fd is None:
            self._spool_fd, _ = self._temp("spool")
        for key, tensor in group.items():
            self._seen.add(key)
            data = tensor_bytes(tensor)
            _write_all(self._spool_fd, data)
            self._spool.append((PlannedTensor(key, tuple(tensor.shape), tensor.dtype), self._spool_bytes))
            self._spool_bytes += len(data)
        self.total_bytes += size

    def _close_spooled(self) -> None:
        """Write the pending shard: header, then the spooled bytes in header order."""
        fd, path = self._temp(f"shard{len(self._done) + 1:05d}")
        try:
            raw, ordered = header_bytes([p for p, _ in self._spool], self.metadata, self.layout)
            _write_all(fd, raw)
            where = {p.name: off for p, off in self._spool}
            for p in ordered:
                if p.nbytes:
                    assert self._spool_fd is not None
                    _copy_range(self._spool_fd, fd, where[p.name], p.nbytes)
        finally:
            os.close(fd)
        self._done.append((path, [p.name for p, _ in self._spool]))
        self._spool, self._spool_bytes = [], 0
        if self._spool_fd is not None:
            os.ftruncate(self._spool_fd, 0)
            os.lseek(self._spool_fd, 0, os.SEEK_SET)

    # -- API --------------------------------------------------------------------------------
    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Add one tensor (with a plan: the next planned one, in plan order)."""
        self._check_open()
        try:
            if self.plan is not None:
                self._write_planned(name, tensor)
            else:
                self._write_spooled({name: tensor})
        except BaseException:
            self.close()
            raise

    add = write

    def write_rows(self, name: str, blocks: Iterable[torch.Tensor]) -> None:
        """Add the next planned tensor as consecutive row blocks (``tensor[r0:r1]`` in order),
        each written to its final offset as it comes: a tensor larger than memory is never whole."""
        self._check_open()
        try:
            if self.plan is None:
                raise SparsemergeError("internal: write_rows needs a planned writer")
            if self._next >= len(self._order):
                raise SparsemergeError(f"internal: writer got {name} after all planned tensors")
            i, expected = self._order[self._next]
            if name != expected.name or not expected.shape:
                raise SparsemergeError(f"internal: writer expected {expected.name} {expected.shape}, got rows of {name}")
            while self._shard_index < i:
                self._open_planned(self._shard_index + 1)
            assert self._fd is not None
            rows, pos = 0, self._offsets[i][name]
            for block in blocks:
                if tuple(block.shape[1:]) != expected.shape[1:] or block.dtype != expected.dtype:
                    raise SparsemergeError(
                        f"internal: rows of {name} are {tuple(block.shape)} {block.dtype}, planned {expected.shape} {expected.dtype}"
                    )
                if rows + block.shape[0] > expected.shape[0]:
                    raise SparsemergeError(f"internal: more than the planned {expected.shape[0]} rows of {name}")
                data = tensor_bytes(block)
                _write_all(self._fd, data, pos)
                pos += len(data)
                rows += block.shape[0]
            if rows != expected.shape[0]:
                raise SparsemergeError(f"internal: {rows} of the planned {expected.shape[0]} rows of {name} were written")
            self._next += 1
        except BaseException:
            self.close()
            raise

    def write_group(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Add tensors that belong together (one weight's fields) to the same shard."""
        if self.plan is not None:
            for name, tensor in tensors.items():
                self.write(name, tensor)
            return
        self._check_open()
        try:
            self._write_spooled(tensors)
        except BaseException:
            self.close()
            raise

    add_group = write_group

    def _check_open(self) -> None:
        if self._finished:
            raise SparsemergeError("internal: the writer is already finished or closed")

    def finish(self) -> dict[str, str]:
        """Complete the last shard, rename every shard to its final name, write the index;
        returns ``tensor name -> file name``."""
        self._check_open()
        try:
            if self.plan is not None:
                if self._next != len(self._order):
                    raise SparsemergeError(f"internal: {len(self._order) - self._next} planned tensors were not written")
                while self._shard_index < len(self._shards) - 1:  # an empty plan still gets its (empty) file
                    self._open_planned(self._shard_index + 1)
                self._close_fd()
            elif self._spool or not self._done:  # an empty checkpoint still gets one (empty) shard
                self._close_spooled()
            names = self._names(len(self._done))
            self._refuse_existing(names)
            location: dict[str, str] = {}
            for (path, keys), name in zip(self._done, names):
                os.replace(path, self.folder / name)
                self._temps.remove(path)
                for key in keys:
                    location[key] = name
            self.files = names
            if self.index and len(names) > 1:
                weight_map = location if self.plan is not None else dict(sorted(location.items()))
                index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
                fd, tmp = self._temp("index")
                with os.fdopen(fd, "w") as handle:
                    handle.write(json.dumps(index, indent=2) + "\n")
                os.replace(tmp, self.folder / self.index_name)
                self._temps.remove(tmp)
        except BaseException:
            self.close()
            raise
        self.close()
        return location

    def _close_fd(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Release files; before ``finish`` this discards everything written so far."""
        self._finished = True
        self._close_fd()
        spool = getattr(self, "_spool_fd", None)
        if spool is not None:
            os.close(spool)
            self._spool_fd = None
        for path in self._temps:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self._temps.clear()

    def __del__(self) -> None:  # an abandoned writer leaves no temporaries or open files
        if not getattr(self, "_finished", True):
            self.close()

    def __enter__(self) -> "ShardedWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: "str | os.PathLike[str]",
    metadata: Optional[Mapping[str, str]] = None,
    overwrite: bool = False,
) -> Path:
    """One file, atomically, byte-identical to ``safetensors.torch.save_file(tensors, path, metadata)``."""
    path = Path(path)
    writer = ShardedWriter(path.parent, 1 << 62, prefix=path.name, single_name=path.name, metadata=metadata, index=False, overwrite=overwrite)
    if not overwrite and path.exists():
        writer.close()
        raise SparsemergeError(f"output {str(path)!r} already exists; choose another path or pass overwrite=True to replace it")
    writer.write_group(tensors)
    writer.finish()
    return path
