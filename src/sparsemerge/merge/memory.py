"""How much memory a merge may use, and which tensors it must compute in row blocks.

The engine streams tensor by tensor, but one tensor's working set is a multiple of the tensor
(the inputs in the working dtype, the output, a product or the stacked task vectors), and a
few worker threads hold several at once. Under a memory limit smaller than that (a 262 MB
embedding of three models needs ~1.3 GB for a linear merge) it would fail half way.

So before the merge starts:

* the **budget** is ``--max-memory`` if given, else what the process may still allocate: the
  soft ``RLIMIT_DATA`` and ``RLIMIT_AS`` less what is already used (``VmData`` / ``VmSize``
  of ``/proc/self/status``) and the system's ``MemAvailable``, the smallest, times
  :data:`SAFETY`;
* each in-flight job gets a **slot** of ``budget / (2 * workers + 1)`` (the engine keeps up to
  ``2 * workers`` results in flight, plus the one being written);
* a tensor whose estimated working set (:func:`working_set`) exceeds the slot is, for a
  ``rowwise`` method (an elementwise formula: linear, soups, task arithmetic, passthrough),
  computed in blocks of rows that fit the slot - each block read from the inputs with one
  positioned read per model, merged, and written at its final offset (exact: the same
  arithmetic per element);
* TIES (a top-k trim over each whole task vector, then elementwise steps) first gathers each
  model's ``|tau|`` from the row blocks and selects on it (``methods/gta.py``, ~8 bytes per
  entry, :func:`prepare_bytes`), alone, then merges the blocks with the masks' slices;
* other methods (DARE/DELLA draw over the whole tensor, SLERP and model stock use
  whole-tensor norms; TIES with a rescale norm) run such a tensor alone, with no other job
  in flight.
"""
from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from typing import Optional

import torch

from sparsemerge.errors import SparsemergeError

SAFETY = 0.8  # of the memory left: allocator slack, the writer's buffers, Python objects
MIN_BLOCK_BYTES = 1 << 20  # a block smaller than this costs more in calls than it saves


def _status_bytes(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _mem_available() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def memory_budget(max_memory: Optional[int] = None) -> Optional[int]:
    """Bytes the merge may allocate from now on (see the module docstring); None when nothing
    bounds it (no limit set and ``/proc`` unreadable)."""
    if max_memory is not None:
        if isinstance(max_memory, bool) or int(max_memory) <= 0:
            raise SparsemergeError(f"max_memory (--max-memory) must be a positive size, got {max_memory!r}")
        return int(max_memory)
    room = []
    for limit, used_key in ((resource.RLIMIT_DATA, "VmData"), (resource.RLIMIT_AS, "VmSize")):
        soft = resource.getrlimit(limit)[0]
        used = _status_bytes(used_key)
        if soft != resource.RLIM_INFINITY and used is not None:
            room.append(soft - used)
    available = _mem_available()
    if available is not None:
        room.append(available)
    if not room:
        return None
    return max(0, int(min(room) * SAFETY))


def parse_size(text: str) -> int:
    """``"1.5GB"``, ``"800M"``, ``"2GiB"``, ``"123456"`` -> bytes (K/M/G/T: powers of 1024)."""
    raw = str(text).strip().upper().replace(" ", "")
    for suffix in ("IB", "B"):
        if raw.endswith(suffix) and len(raw) > len(suffix) and raw[-len(suffix) - 1] in "KMGT":
            raw = raw[: -len(suffix)]
            break
    scale = 1
    if raw and raw[-1] in "KMGT":
        scale = 1024 ** ("KMGT".index(raw[-1]) + 1)
        raw = raw[:-1]
    try:
        value = float(raw)
    except ValueError:
        raise SparsemergeError(f"cannot read {text!r} as a memory size (e.g. 800M, 1.5G, 2GiB)") from None
    if not value > 0 or value == float("inf"):
        raise SparsemergeError(f"a memory size must be positive and finite, got {text!r}")
    return int(value * scale)


def working_set(shape: tuple[int, ...], stored: list[torch.dtype], work: torch.dtype) -> int:
    """Estimated peak bytes to merge one tensor of ``shape`` from inputs stored as ``stored``:
    each input as read and in the working dtype, twice that again for the method's stacked
    copies and temporaries, the output and one product (measured: linear of 3 float32 inputs
    5x the tensor, TIES ~12x)."""
    numel = 1
    for d in shape:
        numel *= d
    w = torch.empty((), dtype=work).element_size()
    read = sum(torch.empty((), dtype=d).element_size() for d in stored)
    return numel * (read + (3 * len(stored) + 2) * w)


@dataclass(frozen=True)
class BlockPlan:
    """How the engine computes one tensor: whole (``rows`` None), in blocks of ``rows``, or
    whole but alone (``exclusive``: no other job in flight)."""

    rows: Optional[int] = None
    exclusive: bool = False


def plan_tensor(shape: tuple[int, ...], need: int, slot: Optional[int], rowwise: bool) -> BlockPlan:
    """The :class:`BlockPlan` of a tensor needing ``need`` bytes when each job may use ``slot``."""
    if slot is None or need <= slot:
        return BlockPlan()
    if not rowwise or len(shape) < 1 or shape[0] < 2:
        return BlockPlan(exclusive=True)
    per_row = max(1, need // shape[0])
    rows = max(1, min(shape[0], slot // per_row), MIN_BLOCK_BYTES // per_row)
    return BlockPlan(rows=rows) if rows < shape[0] else BlockPlan(exclusive=True)


def prepare_bytes(shape: tuple[int, ...], n_inputs: int) -> int:
    """Peak bytes of a row_prepare (TIES' trim over the whole tensor): float32 keys and int32
    indices per entry during one model's selection, plus every model's packed mask."""
    numel = 1
    for d in shape:
        numel *= d
    return numel * 8 + n_inputs * (numel // 8 + 1)


def slot_bytes(budget: Optional[int], workers: int) -> Optional[int]:
    return None if budget is None else max(1, budget // (2 * max(1, workers) + 1))
