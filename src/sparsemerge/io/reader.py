"""The one safetensors reader: header parsed and validated at open, tensors read lazily, one
at a time, with positioned reads (``os.preadv``) into a fresh buffer; no memory map.

A memory-mapped checkpoint stays resident in the process once touched (a merge of four
540 MB models showed ~2 GB RSS); a positioned read copies each tensor once into its own
buffer and leaves the file in the page cache only, so a job's memory stays at the tensors it
holds. Reads are thread-safe (no shared file position).

File layout (https://github.com/huggingface/safetensors, format section): 8-byte
little-endian header length ``n``, ``n`` bytes of UTF-8 JSON ``{"__metadata__": {str: str},
NAME: {"dtype": CODE, "shape": [int], "data_offsets": [begin, end]}}`` (offsets relative to
the byte after the header), then the data. Validation follows the reference reader: the
offsets tile the data section exactly (no gaps, no overlap, ending at the end of the file),
and every ``end - begin`` equals ``prod(shape) * itemsize``. A truncated or corrupt file
fails at open with :class:`SparsemergeError`.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.io.dtypes import BY_CODE

MAX_HEADER_BYTES = 100_000_000  # the reference reader's limit


@dataclass(frozen=True)
class TensorInfo:
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # absolute position of the first byte in the file
    nbytes: int


class SafetensorsFile:
    """One ``.safetensors`` file: ``keys()``, ``info(name)``, ``get(name)``, ``metadata``."""

    def __init__(self, path: "str | os.PathLike[str]") -> None:
        self.path = Path(path)
        try:
            self._fd: Optional[int] = os.open(self.path, os.O_RDONLY)
        except OSError as exc:
            raise SparsemergeError(f"could not open {str(self.path)!r}: {exc.strerror or exc}") from None
        try:
            self.header, self.metadata, self.entries = self._parse()
        except SparsemergeError:
            self.close()
            raise

    def _fail(self, reason: str) -> SparsemergeError:
        return SparsemergeError(f"{str(self.path)!r} is not a readable safetensors file (truncated or corrupt?): {reason}")

    def _parse(self) -> tuple[dict[str, Any], Optional[dict[str, str]], dict[str, TensorInfo]]:
        assert self._fd is not None
        size = os.fstat(self._fd).st_size
        if size < 8:
            raise self._fail(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", os.pread(self._fd, 8, 0))
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise self._fail(f"header length {n} does not fit the file of {size} bytes")
        raw = os.pread(self._fd, n, 8)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError) as exc:
            raise self._fail(f"header is not valid UTF-8 JSON ({exc})") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        metadata = header.get("__metadata__")
        if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
            raise self._fail("__metadata__ is not a string-to-string map")
        base = 8 + n
        spans: list[tuple[int, int, str]] = []
        entries: dict[str, TensorInfo] = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                row = BY_CODE[info["dtype"]]
                shape = tuple(info["shape"])
                begin, end = info["data_offsets"]
                # torch sizes are int64: a dimension of 2**63 (legal next to a 0) cannot be built
                ok = all(type(d) is int and 0 <= d < 2**63 for d in (*shape, begin, end)) and begin <= end
            except (KeyError, TypeError, ValueError):
                raise self._fail(f"entry {name!r} is malformed: {str(info)[:120]}") from None
            if not ok:
                raise self._fail(
                    f"entry {name!r} has invalid shape or offsets (integers in [0, 2**63), begin <= end): {str(info)[:120]}"
                )
            count = span = 1
            for d in shape:
                count *= d
                span *= max(d, 1)  # torch's strides: a zero-size tensor still needs them to fit int64
            if span >= 2**63:
                raise self._fail(f"entry {name!r}: shape {list(shape)} is too large for any tensor (its strides overflow int64)")
            if count * row.itemsize != end - begin:
                raise self._fail(f"entry {name!r}: {row.code} {list(shape)} needs {count * row.itemsize} bytes, offsets span {end - begin}")
            spans.append((begin, end, name))
            entries[name] = TensorInfo(row.torch, shape, base + begin, end - begin)
        position = 0
        for begin, end, name in sorted(spans):
            if begin != position:
                raise self._fail(f"entry {name!r} starts at {begin}, expected {position} (gap or overlap)")
            position = end
        if base + position != size:
            raise self._fail(f"the data section holds {size - base} bytes, the header describes {position}")
        return header, metadata, entries

    def keys(self) -> list[str]:
        """Tensor names, sorted (as ``safe_open(...).keys()`` gives them)."""
        return sorted(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.entries)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.entries[name]
        except (KeyError, TypeError):  # TypeError: a manifest gave a list or dict as the name
            raise SparsemergeError(f"tensor {name!r} is not in {str(self.path)!r}") from None

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into a new buffer (positioned read; safe from several threads)."""
        info = self.info(name)
        if self._fd is None:
            raise SparsemergeError(f"{str(self.path)!r} is closed")
        buf = torch.empty(info.nbytes, dtype=torch.uint8)
        read_into(self._fd, memoryview(buf.numpy()), info.offset, f"tensor {name!r} in {str(self.path)!r}")
        return buf.view(info.dtype).reshape(info.shape)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of the first dimension into a new buffer (one positioned read of
        their bytes: a large tensor can be processed in blocks without reading it whole)."""
        info = self.info(name)
        if not info.shape:
            raise SparsemergeError(f"tensor {name!r} is a scalar: it has no rows")
        rows = info.shape[0]
        if not 0 <= start <= stop <= rows:
            raise SparsemergeError(f"rows {start}:{stop} are outside tensor {name!r} of {rows} rows")
        if self._fd is None:
            raise SparsemergeError(f"{str(self.path)!r} is closed")
        row_bytes = info.nbytes // rows if rows else 0
        buf = torch.empty((stop - start) * row_bytes, dtype=torch.uint8)
        read_into(self._fd, memoryview(buf.numpy()), info.offset + start * row_bytes,
                  f"rows {start}:{stop} of tensor {name!r} in {str(self.path)!r}")
        return buf.view(info.dtype).reshape(stop - start, *info.shape[1:])

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_into(fd: int, view: memoryview, offset: int, what: str) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a short file is an error naming ``what``."""
    done, total = 0, len(view)
    while done < total:
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [view[done:]], offset + done)
        else:  # no preadv (Windows): pread returns bytes
            chunk = os.pread(fd, total - done, offset + done)
            n = len(chunk)
            view[done : done + n] = chunk
        if n <= 0:
            raise SparsemergeError(f"could not read {what}: the file ends early (truncated?)")
        done += n


def load_safetensors(path: "str | os.PathLike[str]") -> dict[str, torch.Tensor]:
    """Every tensor of one file, in file order (the counterpart of ``safetensors.torch.load_file``)."""
    with SafetensorsFile(path) as f:
        return {name: f.get(name) for name in sorted(f.entries, key=lambda k: f.entries[k].offset)}


INDEX_NAME = "model.safetensors.index.json"


def index_shards(folder: "str | os.PathLike[str]") -> "list[Path] | None":
    """The shard files that ``folder``'s ``model.safetensors.index.json`` maps tensors to (None
    without an index). Each must be a plain ``.safetensors`` file name inside the folder: an
    index naming ``../other/...``, an absolute path or a pickle file is refused, never read."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if not index.is_file():
        return None
    try:  # RecursionError: JSON nested thousands deep
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise SparsemergeError(
            f"corrupt shard index {str(index)!r} ({type(exc).__name__}: {exc}); it must be JSON with a 'weight_map' "
            "of tensor name -> shard file - restore it from the source model"
        ) from None
    if not isinstance(weight_map, dict):
        raise SparsemergeError(f"corrupt shard index {str(index)!r}: 'weight_map' is not a mapping")
    shards: set[str] = set()
    for shard in weight_map.values():  # checked before hashing: a list or dict value is refused, not a TypeError
        if (not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", "..")
                or not shard.endswith(".safetensors")):
            raise SparsemergeError(
                f"shard index {str(index)!r} names {shard!r}: shards must be .safetensors files inside the "
                "model folder; the index is corrupt or points elsewhere"
            )
        shards.add(shard)
    return sorted(folder / shard for shard in shards)


class ShardReader:
    """Shards of one folder opened lazily by file name; every failure names the shard and the
    tensors it holds (``holders``: shard -> tensor names, from a manifest or index)."""

    def __init__(self, folder: "str | os.PathLike[str]", holders: "dict[str, list[str]] | None" = None) -> None:
        self.folder = Path(folder)
        self.holders = holders or {}
        self._files: dict[str, SafetensorsFile] = {}

    def _who(self, shard: str) -> str:
        names = self.holders.get(shard, [])
        names = list(names) if isinstance(names, (list, tuple)) else []
        shown = ", ".join(map(str, names[:4])) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return f" (it holds {shown})" if shown else ""

    def open(self, shard: str) -> SafetensorsFile:
        if not isinstance(shard, str) or shard not in self._files:
            if not isinstance(shard, str) or Path(shard).name != shard or shard in ("", ".", ".."):
                raise SparsemergeError(f"shard name {shard!r} is not a file name inside {str(self.folder)!r}; the manifest is corrupt")
            path = self.folder / shard
            if not path.is_file():
                raise SparsemergeError(f"shard {shard!r} is missing from {str(self.folder)!r}{self._who(shard)}")
            try:
                self._files[shard] = SafetensorsFile(path)
            except SparsemergeError as exc:
                raise SparsemergeError(f"shard {shard!r} is unreadable - truncated or corrupt? ({exc}){self._who(shard)}") from None
        return self._files[shard]

    def keys(self, shard: str) -> list[str]:
        return self.open(shard).keys()

    def get(self, shard: str, key: str, what: str) -> torch.Tensor:
        handle = self.open(shard)
        try:
            return handle.get(key)
        except SparsemergeError as exc:
            raise SparsemergeError(
                f"{what}: could not read {key!r} from shard {shard!r} ({exc}); the file is corrupt or does not match the manifest"
            ) from None

    def header(self, shard: str) -> dict[str, Any]:
        """The raw safetensors header (dtype, shape, offsets per key) without reading data."""
        return self.open(shard).header

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()
