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


def canonical_json(value: object) -> bytes:
    """The one byte form of a JSON value that digests are taken over: keys sorted, no
    whitespace, ASCII, no NaN (so re-indenting or re-ordering a manifest changes nothing)."""
    import json

    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def record_digest(name: str, record: dict, fields_sha256: str) -> str:
    """SHA-256 of one packed tensor: its name, its manifest entry (every key but ``sha256``:
    format, shape, dtype, params, shard, field specs, nbytes) and :func:`fields_digest` of its
    bytes. Editing the entry (a dtype, a shape, a codec parameter), renaming it or swapping two
    entries changes the digest as surely as a flipped byte of data."""
    meta = {k: v for k, v in record.items() if k != "sha256"}
    digest = hashlib.sha256(b"sparsemerge-tensor\0" + name.encode() + b"\0")
    digest.update(canonical_json(meta))
    digest.update(b"\0" + fields_sha256.encode())
    return digest.hexdigest()


MANIFEST_DIGEST_KEY = "manifest_sha256"


def manifest_digest(manifest: dict) -> str:
    """SHA-256 of a whole manifest without its own ``manifest_sha256`` entry: a tensor entry
    deleted or added (from both the tensor table and the shard lists), the options, the
    copied-file list or the totals edited - any change of the manifest is detected at open."""
    body = {k: v for k, v in manifest.items() if k != MANIFEST_DIGEST_KEY}
    return hashlib.sha256(b"sparsemerge-manifest\0" + canonical_json(body)).hexdigest()
