"""Merged task vectors stored sparse and quantized (chapter 10.3.4: "base model + task vectors",
"quantized task vectors (INT8/INT4)").

``tau = theta_merged - theta_base`` of a TIES / DARE / breadcrumbs merge is sparse (DARE keeps
a ``density`` share of each task vector, TIES trims to the top ``density``), so it stores far
smaller than the model: :func:`write_packed_task_vector` streams ``tau`` tensor by tensor into a
packed checkpoint of :mod:`sparsemerge.formats` (default: ``bitmask`` positions + INT8 values
per group of 128 for the layer weights; the rest dense). :func:`apply_packed_task_vector`
rebuilds ``theta_base + scale * tau`` as a Hugging Face folder (``scale = -1`` removes it).
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from sparsemerge.errors import SparsemergeError

DEFAULT_PACK = {"format": "bitmask", "quant": "int8", "group_size": 128}


def write_packed_task_vector(
    merged: "str | Path",
    base: "str | Path",
    out: "str | Path",
    overwrite: bool = False,
    **pack_options: Any,
) -> Any:
    """Write ``merged - base`` as a packed checkpoint at ``out``; returns the formats ``PackReport``.

    ``pack_options`` are :class:`sparsemerge.formats.model.PackConfig` keys (default
    ``format=bitmask, quant=int8, group_size=128``; e.g. ``format="csr"``, ``quant="int4"``,
    ``format="nm", pattern="2:4"`` for merges kept on 2:4 with ``keep_mask: base``)."""
    from sparsemerge.formats.model import pack
    from sparsemerge.io import ensure_writable, open_tensor_source
    from sparsemerge.io.writer import PlannedTensor, ShardedWriter

    ensure_writable(out, overwrite, inputs=[merged, base])
    options = {**DEFAULT_PACK, **pack_options}
    with open_tensor_source(merged) as m, open_tensor_source(base) as b:
        missing = [n for n in m.names() if n not in b]
        if missing:
            raise SparsemergeError(f"the base lacks tensors of the merged model: {missing[:8]}")
        mismatched = [f"{n} {m.shape(n)} vs {b.shape(n)}" for n in m.names() if tuple(m.shape(n)) != tuple(b.shape(n))]
        if mismatched:
            raise SparsemergeError(f"merged and base shapes differ: {'; '.join(mismatched[:8])}")
        tmp = Path(tempfile.mkdtemp(prefix=".task-vector-", dir=Path(out).parent))
        try:
            names = m.names()
            planned = [PlannedTensor(n, tuple(m.shape(n)), m.dtype(n)) for n in names]
            writer = ShardedWriter(tmp, 1 << 62, plan=planned, metadata={"format": "pt"}, layout="plan")
            for n in names:
                x, y = m.get(n), b.get(n)
                writer.write(n, (x - y.to(x.dtype)) if x.is_floating_point() else x)
            writer.finish()
            for f in Path(m.folder).iterdir():
                if _side_file(f):
                    shutil.copy2(f, tmp / f.name)
            return pack(tmp, out, overwrite=overwrite, **options)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _side_file(f: Path) -> bool:
    """Config, tokenizer and template files (not weights, indexes or our records)."""
    return f.is_file() and f.suffix in (".json", ".jinja", ".txt", ".model") and "safetensors" not in f.name and not f.name.startswith("sparsemerge")


def apply_packed_task_vector(base: "str | Path", task_vector: "str | Path", out: "str | Path", scale: float = 1.0, overwrite: bool = False) -> Path:
    """``theta_base + scale * tau`` from a packed task vector, written as a Hugging Face folder."""
    from sparsemerge.formats.model import read_packed
    from sparsemerge.io import atomic_output, open_tensor_source
    from sparsemerge.io.writer import PlannedTensor, ShardedWriter

    with open_tensor_source(base) as b, read_packed(task_vector) as tv:
        names = b.names()
        missing = [n for n in tv.names() if n not in b]
        if missing:
            raise SparsemergeError(f"the task vector has tensors the base lacks: {missing[:8]}")
        with atomic_output(out, overwrite=overwrite, inputs=[base, task_vector]) as tmp:
            plan = [PlannedTensor(n, tuple(b.shape(n)), b.dtype(n)) for n in names]
            writer = ShardedWriter(tmp, 5 * 10**9, plan=plan, metadata={"format": "pt"}, layout="plan")
            for n in names:
                w = b.get(n)
                if n in tv and w.is_floating_point():
                    w = (w.float() + scale * tv.get_dense(n, dtype=torch.float32)).to(w.dtype)
                writer.write(n, w)
            writer.finish()
            for f in Path(b.folder).iterdir():
                if _side_file(f):
                    shutil.copy2(f, tmp / f.name)
    return Path(out)
