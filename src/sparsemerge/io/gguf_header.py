"""GGUF files checked before transformers reads them (:func:`sparsemerge.io.sources.gguf_as_hf_folder`).

The readers behind transformers trust the file: the ``gguf`` package's reader loops over an
array's count even past the end of the file, and a ``block_count`` of a million makes
transformers build a million layers. This module walks the header itself, every count and
length checked against the bytes that remain, so a corrupt file fails in milliseconds with a
:class:`SparsemergeError` naming the file and what is wrong; :func:`check_gguf_model` then
checks the metadata that sizes the model against the tensors.

Layout (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): ``GGUF``, u32 version
(2 or 3), u64 tensor count, u64 metadata count; metadata ``(string key, u32 type, value)``;
tensor infos ``(string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 offset)``;
padding to ``general.alignment`` (default 32); tensor data. Strings are u64 length + UTF-8.
Little-endian, or big-endian when the version reads byte-swapped (as the gguf reader decides).
"""
from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsemerge.errors import SparsemergeError

# metadata value types (gguf.GGUFValueType) -> struct format of a scalar
SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 4
VERSIONS = (2, 3)  # what gguf.GGUFReader reads


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the fastest-varying (numpy's last)
    ggml_type: int
    offset: int  # absolute position of the data in the file
    nbytes: int

    @property
    def numel(self) -> int:
        count = 1
        for d in self.dims:
            count *= d
        return count


@dataclass
class GGUFHeader:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)  # scalars and strings; arrays as ArrayInfo
    tensors: list[GGUFTensorInfo] = field(default_factory=list)

    def numel(self) -> int:
        """Values stored in all tensors (an upper bound on the parameters of the model it holds)."""
        return sum(t.numel for t in self.tensors)


@dataclass(frozen=True)
class ArrayInfo:
    item_type: int
    count: int


class _Cursor:
    def __init__(self, buf: "mmap.mmap | bytes", fail: Any) -> None:
        self.buf, self.pos, self.size, self.fail, self.endian = buf, 0, len(buf), fail, "<"

    def take(self, n: int, what: str) -> int:
        if n < 0 or n > self.size - self.pos:
            raise self.fail(f"{what} needs {n} bytes at offset {self.pos}, but the file ends at {self.size}")
        start = self.pos
        self.pos += n
        return start

    def scalar(self, fmt: str, what: str) -> Any:
        start = self.take(struct.calcsize(fmt), what)
        return struct.unpack_from(self.endian + fmt, self.buf, start)[0]

    def string(self, what: str, strict: bool) -> str:
        n = self.scalar("Q", f"the length of {what}")
        start = self.take(n, f"{what} ({n} bytes)")
        raw = bytes(self.buf[start : start + n])
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if strict:
                raise self.fail(f"{what} is not UTF-8 ({raw[:40]!r})") from None
            return raw.decode("utf-8", "replace")


def _value(cur: _Cursor, vtype: int, what: str, depth: int = 0) -> Any:
    if vtype in SCALAR_FORMATS:
        return cur.scalar(SCALAR_FORMATS[vtype], what)
    if vtype == STRING:
        return cur.string(what, strict=False)
    if vtype != ARRAY:
        raise cur.fail(f"{what} has unknown value type {vtype}")
    if depth >= MAX_ARRAY_NESTING:
        raise cur.fail(f"{what} nests arrays more than {MAX_ARRAY_NESTING} deep")
    item_type = cur.scalar("I", f"the item type of {what}")
    count = cur.scalar("Q", f"the length of {what}")
    if item_type in SCALAR_FORMATS:
        size = struct.calcsize(SCALAR_FORMATS[item_type])
        cur.take(count * size, f"{what} ({count} items of {size} bytes)")
    elif item_type in (STRING, ARRAY):
        least = 8 if item_type == STRING else 12  # a string's length / an array's type and length
        if count * least > cur.size - cur.pos:  # before looping: a count of 2**40 ends here
            raise cur.fail(f"{what} claims {count} items, more than the {cur.size - cur.pos} bytes left can hold")
        for i in range(count):
            _value(cur, item_type, f"item {i} of {what}", depth + 1)
    else:
        raise cur.fail(f"{what} has unknown item type {item_type}")
    return ArrayInfo(item_type, count)


def read_gguf_header(path: "str | os.PathLike[str]") -> GGUFHeader:
    """Walk and check the whole header and tensor table of ``path`` (data is not read)."""
    from gguf import GGML_QUANT_SIZES

    path = Path(path)
    quant_sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}  # ggml type -> (block, bytes per block)

    def fail(reason: str) -> SparsemergeError:
        return SparsemergeError(f"could not read GGUF file {str(path)!r} (truncated or corrupt?): {reason}")

    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size < 24:
                raise fail(f"{size} bytes, shorter than the 24-byte GGUF header")
            buf = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except OSError as exc:
        raise SparsemergeError(f"could not read GGUF file {str(path)!r}: {exc.strerror or exc}") from None
    try:
        cur = _Cursor(buf, fail)
        if bytes(buf[:4]) != b"GGUF":
            raise fail(f"it starts with {bytes(buf[:4])!r}, not the magic b'GGUF'")
        cur.pos = 4
        version = cur.scalar("I", "the version")
        if version & 0xFFFF == 0:  # written on a machine of the other byte order
            cur.endian = ">"
            version = struct.unpack(">I", struct.pack("<I", version))[0]
        if version not in VERSIONS:
            raise fail(f"version {version}; sparsemerge reads GGUF versions {', '.join(map(str, VERSIONS))}")
        header = GGUFHeader(version)
        tensor_count = cur.scalar("Q", "the tensor count")
        kv_count = cur.scalar("Q", "the metadata count")
        # the smallest metadata entry is 13 bytes (empty key, type, one-byte value), a tensor info 24
        if kv_count * 13 + tensor_count * 24 > size - cur.pos:
            raise fail(f"{kv_count} metadata entries and {tensor_count} tensors cannot fit in {size} bytes")
        for i in range(kv_count):
            key = cur.string(f"metadata key {i}", strict=True)
            if key in header.metadata:
                raise fail(f"metadata key {key!r} appears twice")
            vtype = cur.scalar("I", f"the type of {key!r}")
            header.metadata[key] = _value(cur, vtype, f"metadata {key!r}")
        for i in range(tensor_count):
            name = cur.string(f"the name of tensor {i}", strict=True)
            n_dims = cur.scalar("I", f"the rank of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise fail(f"tensor {name!r} has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}")
            dims = tuple(cur.scalar("Q", f"dimension {d} of tensor {name!r}") for d in range(n_dims))
            ggml_type = cur.scalar("I", f"the type of tensor {name!r}")
            offset = cur.scalar("Q", f"the data offset of tensor {name!r}")
            sizes = quant_sizes.get(ggml_type)
            if sizes is None:
                raise fail(f"tensor {name!r} has unknown ggml type {ggml_type}")
            block, type_size = sizes
            if dims and dims[0] % block:
                raise fail(f"tensor {name!r}: its first dimension {dims[0]} is not a multiple of the type's block of {block}")
            numel = GGUFTensorInfo(name, dims, ggml_type, offset, 0).numel
            header.tensors.append(GGUFTensorInfo(name, dims, ggml_type, offset, numel * type_size // block))
        if len({t.name for t in header.tensors}) != len(header.tensors):
            raise fail("a tensor name appears twice")
        alignment = header.metadata.get("general.alignment", 32)
        if type(alignment) is not int or alignment <= 0 or alignment & (alignment - 1):
            raise fail(f"general.alignment is {alignment!r}, not a power of two")
        start = -(-cur.pos // alignment) * alignment
        for i, t in enumerate(header.tensors):
            begin = start + t.offset
            if begin + t.nbytes > size:
                raise fail(f"tensor {t.name!r} ({list(t.dims)}, {t.nbytes} bytes at {begin}) runs past the end of the file ({size} bytes)")
            header.tensors[i] = GGUFTensorInfo(t.name, t.dims, t.ggml_type, begin, t.nbytes)
        return header
    finally:
        buf.close()


_BLOCK = re.compile(r"blk\.(\d+)\.")


def check_gguf_model(path: "str | os.PathLike[str]", header: GGUFHeader) -> str:
    """The architecture of a checked header, after the metadata that sizes the model is
    checked against the tensors: every block ``{arch}.block_count`` declares holds tensors
    (transformers would otherwise build the missing blocks from random numbers)."""
    arch = header.metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise SparsemergeError(f"GGUF file {str(path)!r} has no general.architecture; it is corrupt or not a model")
    blocks = header.metadata.get(f"{arch}.block_count")
    if blocks is not None:
        if type(blocks) is not int or blocks < 0:
            raise SparsemergeError(f"GGUF file {str(path)!r}: {arch}.block_count is {blocks!r}, not a count of layers")
        held = {int(m.group(1)) for t in header.tensors if (m := _BLOCK.match(t.name))}
        missing = sorted(set(range(min(blocks, len(header.tensors) + 1))) - held)
        if blocks > len(header.tensors) or missing:
            raise SparsemergeError(
                f"GGUF file {str(path)!r} declares {blocks} blocks ({arch}.block_count) but holds tensors for "
                f"{len(held)} (no blk.{missing[0] if missing else len(held)}.*); the file is corrupt or truncated"
            )
    return arch
