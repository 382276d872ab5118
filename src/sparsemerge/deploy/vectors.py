"""Task vectors as task-store entries: ``tau = theta_task - theta_base`` (chapter 10.3.4,
"base model + task vectors"), sparsified and quantized, in one of two spaces per tensor.

* ``slots`` (``select="nm"``): for a tensor the base stores N:M packed (format ``nm``),
  ``tau`` is read at the base's kept positions only - a ``(rows, cols*n/m)`` tensor in the
  base's slot order (group g's n slots in ascending position) - so ``base + tau`` keeps the
  base's pattern and can be added to the packed values in place.
* ``dense`` (``select="topk"``, and every tensor the base does not store N:M): ``tau`` in
  the tensor's own shape.

In either space the ``density`` share of largest ``|tau|`` of each 2-D tensor is kept
(top-k, as TIES' trim step, Yadav et al. 2023, arXiv:2306.01708), and the result is packed
with the project's formats (``bitmask`` positions + INT8/INT4 values per group; 1-D tensors
stay dense float32). A tensor with ``tau == 0`` everywhere is not stored.
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Iterable, Optional

import torch

from sparsemerge.errors import SparsemergeError

SLOTS, DENSE = "slots", "dense"
EMPTY = "_empty"  # the placeholder tensor of an entry that changes nothing
SELECT_MODES = ("nm", "topk")
QUANTS = ("int8", "int4", "none")


def slot_positions(packed) -> torch.Tensor:
    """``(rows, G, n)`` int64 in-group positions of an ``NMPacked`` tensor's kept slots."""
    rows, cols = packed.shape
    g = cols // packed.m
    return packed.positions().reshape(rows, g, packed.n).long()


def to_slots(dense: torch.Tensor, positions: torch.Tensor, m: int) -> torch.Tensor:
    """``(rows, cols)`` -> ``(rows, G*n)``: the values at the kept positions, in slot order."""
    rows, g, n = positions.shape
    return torch.gather(dense.float().reshape(rows, g, m), 2, positions).reshape(rows, g * n)


def from_slots(slots: torch.Tensor, positions: torch.Tensor, m: int) -> torch.Tensor:
    """Inverse of :func:`to_slots` (zeros off the pattern): ``(rows, G*n)`` -> ``(rows, G*m)``."""
    rows, g, n = positions.shape
    out = torch.zeros(rows, g, m, dtype=torch.float32)
    out.scatter_(2, positions, slots.float().reshape(rows, g, n))
    return out.reshape(rows, g * m)


def top_k(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``ceil(density * numel)`` largest ``|tau|`` of a 2-D tensor (ties broken by
    ``torch.topk``'s order), zero the rest; 1-D tensors and ``density >= 1`` pass through."""
    if density >= 1.0 or tau.dim() < 2:
        return tau
    flat = tau.reshape(-1)
    k = max(1, math.ceil(density * flat.numel()))
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
    return torch.where(keep, flat, torch.zeros((), dtype=flat.dtype)).reshape(tau.shape)


def check_options(select: str, density: float, quant: str, group_size: int) -> None:
    if select not in SELECT_MODES:
        raise SparsemergeError(f"unknown select mode {select!r}; expected one of {', '.join(SELECT_MODES)} "
                               "(nm: aligned to the base's N:M slots, topk: largest |tau| anywhere)")
    if not (isinstance(density, (int, float)) and 0.0 < float(density) <= 1.0):
        raise SparsemergeError(f"density must be in (0, 1] (share of |tau| entries kept per tensor), got {density!r}")
    if quant not in QUANTS:
        raise SparsemergeError(f"unknown quant {quant!r}; expected one of {', '.join(QUANTS)}")
    if group_size < 0:
        raise SparsemergeError(f"group_size must be >= 0 (0: per row), got {group_size}")


def pack_tensors(tensors: dict[str, torch.Tensor], out: Path, quant: str, group_size: int) -> int:
    """Pack ``tensors`` (float32) into a packed folder at ``out`` (which must not exist):
    2-D tensors as ``bitmask`` + ``quant`` values per ``group_size``, the rest dense.
    Returns the bytes of the packed fields."""
    from sparsemerge.formats.model import pack
    from sparsemerge.io.writer import save_safetensors

    with tempfile.TemporaryDirectory(prefix=".tau-", dir=out.parent) as tmp:
        src = Path(tmp) / "tau.safetensors"
        save_safetensors({k: v.contiguous() for k, v in tensors.items()}, src)
        report = pack(src, out, format="bitmask", quant=quant, group_size=group_size,
                      include=[r".*"], exclude=[r"(?!)"])  # every 2-D tensor sparse, nothing excluded
    return int(report.nbytes)


def read_tensors(folder: Path, verify: bool = True) -> dict[str, torch.Tensor]:
    """All tensors of a packed entry decoded to float32 (checksums verified)."""
    from sparsemerge.formats.model import read_packed

    with read_packed(folder) as ckpt:
        return {n: ckpt.get_dense(n, verify=verify, dtype=torch.float32) for n in ckpt.names() if n != EMPTY}


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of a reconstructed task vector (names, dtypes, shapes, float32 bytes)."""
    from sparsemerge.io.checksum import fields_digest

    return fields_digest({k: v.float().contiguous() for k, v in tensors.items()})


def add_into(acc: dict[str, torch.Tensor], more: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``acc + more`` tensor by tensor (a name missing on one side counts as zeros)."""
    out = dict(acc)
    for k, v in more.items():
        out[k] = v.clone() if k not in out else out[k] + v
    return out


def nonzero_only(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in tensors.items() if bool((v != 0).any())}


def subtract(new: dict[str, torch.Tensor], old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``new - old`` over the union of names (missing: zeros)."""
    out = {k: v - old[k] if k in old else v.clone() for k, v in new.items()}
    for k, v in old.items():
        if k not in new:
            out[k] = -v
    return out


def energy_share(kept: Iterable[torch.Tensor], full: Iterable[torch.Tensor]) -> Optional[float]:
    """``sum ||kept||^2 / sum ||full||^2`` (None when ``full`` is all zero)."""
    num = sum(float(t.double().pow(2).sum()) for t in kept)
    den = sum(float(t.double().pow(2).sum()) for t in full)
    return None if den == 0 else num / den


def task_vector_from(base_dir: Path, source: Path, select: str, nm_names: "set[str]",
                     shapes: "dict[str, list[int]]", origin: Optional[Path] = None
                     ) -> "tuple[dict[str, torch.Tensor], dict[str, str], list, list]":
    """``tau = source - base`` tensor by tensor (float32), at the base's kept slots for the
    N:M tensors when ``select == "nm"``; ``origin``: the model ``source`` was fine-tuned from
    when that is not the base (e.g. the dense model the sparse base was pruned from):
    ``tau = source - origin``. Returns ``(tau, spaces, kept, full)`` where ``kept`` and
    ``full`` are the slot and whole tensors of those N:M ones (for :func:`energy_share`)."""
    import contextlib

    from sparsemerge.formats.model import read_packed

    tau: dict[str, torch.Tensor] = {}
    spaces: dict[str, str] = {}
    kept, full = [], []
    with contextlib.ExitStack() as stack:
        base = stack.enter_context(read_packed(base_dir))
        task = stack.enter_context(_TaskSource(source))
        start = stack.enter_context(_TaskSource(origin)) if origin is not None else None
        extra = [n for n in task.names() if n not in base]
        if extra:
            raise SparsemergeError(f"task model {str(source)!r} has tensors the base lacks: {extra[:8]}; "
                                   "is it a fine-tune of this base?")
        for name in base.names():
            if name not in task:
                continue  # e.g. a tied head: the task model does not store it either
            theirs = task.get(name)
            if list(theirs.shape) != shapes[name]:
                raise SparsemergeError(f"tensor {name!r}: the task model has shape {list(theirs.shape)}, the base "
                                       f"{shapes[name]}; is it a fine-tune of this base?")
            if not theirs.is_floating_point():
                continue
            obj = base.get_format(name)
            if start is not None:
                if name not in start:
                    raise SparsemergeError(f"the model the task was fine-tuned from ({str(origin)!r}) lacks {name!r}")
                mine = start.get(name)
                if list(mine.shape) != shapes[name]:
                    raise SparsemergeError(f"tensor {name!r}: {str(origin)!r} has shape {list(mine.shape)}, the base "
                                           f"{shapes[name]}; is the base pruned from it?")
                diff = theirs.float() - mine.float()
            else:
                diff = theirs.float() - obj.to_dense().float()
            if select == "nm" and name in nm_names:
                slots = to_slots(diff, slot_positions(obj), obj.m)
                kept.append(slots)
                full.append(diff)
                tau[name], spaces[name] = slots, SLOTS
            else:
                tau[name], spaces[name] = diff, DENSE
    return tau, spaces, kept, full


class _TaskSource:
    """A fine-tuned model's tensors, dense: an HF folder / safetensors file, or a packed folder."""

    def __init__(self, source: Path) -> None:
        from sparsemerge.kernels.model import is_packed_folder

        self.packed = is_packed_folder(source)
        if self.packed:
            from sparsemerge.formats.model import read_packed

            self.src = read_packed(source)
        else:
            from sparsemerge.io import open_tensor_source

            self.src = open_tensor_source(source)

    def names(self) -> list[str]:
        return list(self.src.names())

    def __contains__(self, name: str) -> bool:
        return name in self.src

    def get(self, name: str) -> torch.Tensor:
        return self.src.get_dense(name) if self.packed else self.src.get(name)

    def __enter__(self) -> "_TaskSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.src.close()
