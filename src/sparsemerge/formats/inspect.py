"""What a checkpoint holds, tensor by tensor: storage format, bytes and bits per weight, and
the ratio against dense fp16 / fp32 (``sparsemerge inspect PATH``).

A packed folder (or a compressed-tensors folder) is read through its manifest / headers;
any other checkpoint (HF folder, .safetensors, .gguf) is read as dense tensors.
``bits/weight = 8 * bytes / numel``; ``x fp16 = bytes / (2 * numel)``; ``x fp32 = bytes / (4 * numel)``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple


class InspectRow(NamedTuple):
    name: str
    format: str  # e.g. "nm 2:4 entropy+int4", "bitmask", "dense float32"
    shape: str  # "ROWSxCOLS"
    nbytes: int
    bits_per_weight: float
    x_fp16: float
    x_fp32: float


def inspect_rows(path: "str | Path", verify: bool = False) -> tuple[list[InspectRow], tuple[int, int]]:
    """One :class:`InspectRow` per tensor, and ``(total bytes, total numel)``; ``verify`` also
    reads every tensor of a packed checkpoint (checksums and format invariants)."""
    from sparsemerge.formats.ct import is_ct_folder
    from sparsemerge.formats.layout import MANIFEST_NAME
    from sparsemerge.formats.model import read_packed

    folder = Path(path)
    rows: list[InspectRow] = []
    if folder.is_dir() and ((folder / MANIFEST_NAME).is_file() or is_ct_folder(folder)):
        with read_packed(folder) as packed:
            for name in packed.names():
                record = packed.record(name)
                if verify:
                    packed.get(name)
                rows.append(_row(name, format_label(record), [int(s) for s in record["shape"]], packed.nbytes(name)))
    else:
        from sparsemerge.io import open_tensor_source

        with open_tensor_source(path) as source:
            for name in source.names():
                tensor = source.get(name)
                rows.append(_row(name, f"dense {str(tensor.dtype).replace('torch.', '')}", list(tensor.shape), tensor.numel() * tensor.element_size()))
    nbytes_total = sum(r.nbytes for r in rows)
    numel_total = sum(_numel(r.shape) for r in rows)
    return rows, (nbytes_total, numel_total)


def verified_what(path: "str | Path") -> str:
    """What ``inspect --verify`` checked for this checkpoint (the reader's ``checks``)."""
    from sparsemerge.formats.ct import is_ct_folder
    from sparsemerge.formats.layout import MANIFEST_NAME
    from sparsemerge.formats.model import read_packed

    folder = Path(path)
    if folder.is_dir() and ((folder / MANIFEST_NAME).is_file() or is_ct_folder(folder)):
        with read_packed(folder) as packed:
            return str(packed.checks)
    return "readable: a dense checkpoint has no checksums of ours (every tensor was read)"


def format_label(record: dict[str, Any]) -> str:
    """``format`` of a manifest record, with N:M and metadata coding for nm and ``+codec``."""
    params = record.get("params") or {}
    codec = params.get("codec")
    suffix = f"+{codec['kind']}" if codec else ""
    if record["format"] == "nm":
        return f"nm {params['n']}:{params['m']} {params['metadata']}{suffix}"
    return record["format"] + suffix


def _numel(shape: Any) -> int:
    out = 1
    for s in (shape.split("x") if isinstance(shape, str) else shape):
        if s != "":
            out *= int(s)
    return out


def _row(name: str, label: str, shape: list[int], nbytes: int) -> InspectRow:
    numel = _numel(shape)
    return InspectRow(name, label, "x".join(map(str, shape)), nbytes, 8 * nbytes / max(numel, 1), nbytes / max(2 * numel, 1),
                      nbytes / max(4 * numel, 1))
