"""SHA-256 checksums of files and tensors (recorded in outputs so a result names its source)."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    import torch

_CHUNK = 1 << 22


def sha256_file(path: "str | Path") -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_files(paths: Iterable["str | Path"]) -> str:
    """One digest over several files, in the given order (names and contents)."""
    digest = hashlib.sha256()
    for path in paths:
        path = Path(path)
        digest.update(path.name.encode() + b"\0")
        digest.update(bytes.fromhex(sha256_file(path)))
    return digest.hexdigest()


def fields_digest(fields: "dict[str, torch.Tensor]") -> str:
    """SHA-256 over ``name \\0 dtype \\0 shape \\0 bytes`` of every field, fields sorted by name
    (the per-tensor checksum of a packed checkpoint's manifest)."""
    from sparsemerge.io.dtypes import dtype_name
    from sparsemerge.io.writer import tensor_bytes

    digest = hashlib.sha256()
    for name in sorted(fields):
        t = fields[name]
        header = f"{name}\0{dtype_name(t.dtype)}\0{','.join(map(str, t.shape))}\0"
        digest.update(header.encode())
        digest.update(tensor_bytes(t))
    return digest.hexdigest()
