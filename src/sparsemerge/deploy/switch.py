"""Task switching in memory (chapter 10.3.4, 10.3.9): one loaded sparse base, tasks applied
to its packed values in place, back to the base bit for bit, combinations cached.

Activating ``{T1: w1, T2: w2, ...}`` sets every touched tensor to
``theta = theta_base + sum_i w_i tau_i`` (task arithmetic, Ilharco et al. 2023,
arXiv:2212.04089). For a layer the base holds N:M packed (``SparseLinear``) the update is
added to the kept slots only - ``values[b, g, s, r] += tau`` at the base's own positions - so
the pattern and the metadata stay; INT8/INT4 layers are re-quantized with their codec
(``scale = absmax / qmax`` per group, :func:`sparsemerge.kernels.layout.quantize_slots`).
Entries stored with ``select="nm"`` lose nothing there; top-k entries and LoRA adapters lose
their part off the pattern (as a merge with ``keep_mask: base``). Other float tensors
(embeddings, norms, dense layers) take the whole update.

Going back to the base copies a snapshot of the base's tensors taken at construction, so the
base returns bit-identically. The stored tensors of a combination (what gets copied into the
model) are kept in a size-bounded LRU cache (:class:`.cache.LRUCache`): a cached switch is a
memory copy plus, with a :class:`~sparsemerge.runtime.engine.DecodeEngine`, re-deriving the
flat weight arrays of the touched products in place (``DecodeEngine.refresh_weights``).
"""
from __future__ import annotations

import math
import re
import threading
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Union

import torch
from torch import nn

from sparsemerge.deploy import vectors as V
from sparsemerge.deploy.cache import LRUCache
from sparsemerge.errors import SparsemergeError

Spec = Union[None, str, Mapping[str, float]]
_TERM = re.compile(r"^\s*(?:([-+]?[0-9.]+(?:e[-+]?\d+)?)\s*\*\s*)?([A-Za-z0-9][A-Za-z0-9._-]*)\s*$")


def parse_spec(spec: Spec) -> dict[str, float]:
    """``None``/"base" -> {} (the base); "news" -> {news: 1}; "0.5*news+0.5*sport" or a
    mapping -> the weights (zero weights dropped)."""
    if spec is None or (isinstance(spec, str) and spec.strip() in ("", "base")):
        return {}
    if isinstance(spec, str):
        out: dict[str, float] = {}
        for term in spec.split("+"):
            match = _TERM.match(term)
            if not match:
                raise SparsemergeError(f"cannot read {term.strip()!r} in task combination {spec!r}; write e.g. "
                                       "'news', or '0.5*news+0.5*sport'")
            w, name = match.groups()
            out[name] = out.get(name, 0.0) + (1.0 if w is None else float(w))
        spec = out
    if not isinstance(spec, Mapping):
        raise SparsemergeError(f"a task combination is a name, 'w*a+w*b' or a mapping name -> weight, got {type(spec).__name__}")
    return {str(k): float(v) for k, v in spec.items() if float(v) != 0.0}


@dataclass
class _Target:
    """One tensor of the model that tasks may change, with the base's copy."""

    name: str
    module: nn.Module
    slots: bool  # a SparseLinear: the update goes to its kept slots
    live: dict  # field -> the live tensor (updated in place)
    base: dict  # field -> the base's copy


class TaskSwitcher:
    """Switch ``model`` (loaded from ``store``'s base; see module docstring) between tasks.

    ``engine``: a DecodeEngine over ``model`` whose arrays are rebuilt after each switch
    (or None). ``cache_bytes``: capacity of the LRU cache of combinations."""

    def __init__(self, store, model: Optional[nn.Module] = None, engine=None, cache_bytes: int = 256 << 20) -> None:
        self.store = store
        if model is None:
            from sparsemerge.kernels.model import load_packed

            loaded = load_packed(store.base_dir)
            model, self.tokenizer = loaded.model, loaded.tokenizer
        else:
            self.tokenizer = None
        self.model = model
        self.engine = engine
        self.cache = LRUCache(cache_bytes, _state_bytes)
        self._targets: dict[str, _Target] = {}
        self._tasks: dict[tuple[str, int], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._dirty: set[str] = set()  # names whose live tensors differ from the base now
        self.active: tuple = ()
        self.lock = threading.RLock()
        self.dropped: dict[str, float] = {}  # task -> share of |tau|^2 off the base's pattern

    # ------------------------------------------------------------------ targets
    def _target(self, name: str) -> _Target:
        t = self._targets.get(name)
        if t is not None:
            return t
        from sparsemerge.kernels.sparse_linear import SparseLinear

        module_name, _, field = name.rpartition(".")
        try:
            module = self.model.get_submodule(module_name)
        except AttributeError:
            raise SparsemergeError(f"the task changes {name!r}, which the base model does not have") from None
        if isinstance(module, SparseLinear) and field == "weight":
            live = {k: getattr(module, k) for k in ("values", "scale", "zero") if getattr(module, k) is not None}
            t = _Target(name, module, True, live, {k: v.clone() for k, v in live.items()})
        else:
            tensor = getattr(module, field, None)
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise SparsemergeError(f"the task changes {name!r}, but the base holds it as {type(module).__name__} "
                                       "(integer codes or hierarchical N:M), which task switching does not update; "
                                       "store the base with float or N:M packed tensors there")
            t = _Target(name, module, False, {"weight": tensor}, {"weight": tensor.detach().clone()})
        self._targets[name] = t
        return t

    def _task(self, name: str) -> tuple[tuple[str, int], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        """``(key, {tensor: (flat indices int32/int64, values float32)})`` of the latest version of task
        ``name`` in the targets' spaces (slot order for SparseLinear), read from the store once."""
        version = self.store.versions(name)[-1]  # raises on an unknown task
        key = (name, version)
        if key in self._tasks:
            return key, self._tasks[key]
        kind = self.store.kind(name)
        if kind == "vector":
            tau = self.store.task_vector(name)
            spaces = self.store.spaces(name)
            items = [(n, t, spaces.get(n, V.DENSE)) for n, t in tau.items()]
        else:
            from sparsemerge.merge.lora import LoraAdapter

            adapter = LoraAdapter(self.store.lora_folder(name))
            items = [(n, adapter.delta(n), V.DENSE) for n in adapter.targets()]
        out, kept, full = {}, 0.0, 0.0
        for tname, t, space in items:
            target = self._target(tname)
            m = target.module.m if target.slots else 0
            if target.slots and space == V.DENSE:  # project onto the base's slots
                from sparsemerge.kernels.layout import positions_of

                full += float(t.double().pow(2).sum())
                t = V.to_slots(t, positions_of(target.module.layout), m)
                kept += float(t.double().pow(2).sum())
            elif not target.slots and space == V.SLOTS:
                raise SparsemergeError(f"task {name!r} stores {tname!r} at N:M slots, but the loaded base holds it dense; "
                                       "load the store's base with load_packed (its N:M layers as SparseLinear)")
            lay = target.module.layout if target.slots else None
            want = (lay.rows, lay.groups * lay.n) if target.slots else tuple(target.live["weight"].shape)
            if t.numel() != math.prod(want):
                raise SparsemergeError(f"task {name!r}: {tname!r} has {tuple(t.shape)} values, the loaded base {want}; "
                                       "the task was stored against another base")
            flat = t.reshape(-1).float()
            idx = torch.nonzero(flat).reshape(-1)
            if flat.numel() < 2**31:  # index_add_ takes int32 indices: a third less memory per entry
                idx = idx.to(torch.int32)
            out[tname] = (idx, flat[idx].contiguous())
        if full > 0:
            self.dropped[name] = 1.0 - kept / full
        self._tasks[key] = out
        return key, out

    # ------------------------------------------------------------------ switching
    def activate(self, spec: Spec) -> tuple:
        """Make the model ``base + sum w_i tau_i`` for the combination ``spec`` (a task name,
        'w*a+w*b', a mapping, or None/'base' for the base). Returns the combination's key."""
        weights = parse_spec(spec)
        with self.lock:
            resolved = {self._task(n)[0]: w for n, w in weights.items()}
            key = tuple(sorted((n, v, w) for (n, v), w in resolved.items()))
            if key == self.active:
                return key
            state = {} if not key else self.cache.get(key)
            if state is None:
                state = self._compute(resolved)
                self.cache.put(key, state)
            self._write(state)
            self.active = key
            return key

    def base(self) -> tuple:
        """Back to the base (bit-identical to the loaded base)."""
        return self.activate(None)

    def _compute(self, resolved: Mapping[tuple[str, int], float]) -> dict[str, dict[str, torch.Tensor]]:
        """The stored tensors of every tensor the combination touches."""
        from sparsemerge.kernels.layout import BlockedNM, block_slot_values, dequantized_values, quantize_slots

        parts: dict[str, list] = {}
        for key, w in resolved.items():
            for tname, (idx, vals) in self._tasks[key].items():
                parts.setdefault(tname, []).append((w, idx, vals))
        state = {}
        for tname, terms in parts.items():
            t = self._target(tname)
            if t.slots:
                lay = t.module.layout
                snap = BlockedNM(lay.rows, lay.cols, lay.n, lay.m, lay.codec, t.base["values"], lay.meta, lay.index,
                                 t.base.get("scale"), t.base.get("zero"), lay.group_size)
                theta = dequantized_values(snap).contiguous().clone()  # (rows, G, n) float32
            else:
                theta = t.base["weight"].float().clone()
            flat = theta.view(-1)
            for w, idx, vals in terms:
                flat.index_add_(0, idx, vals if w == 1.0 else vals * w)
            if not t.slots:
                state[tname] = {"weight": theta.to(t.base["weight"].dtype)}
                continue
            codes = None
            if lay.codec != "none":
                symmetric = lay.zero is None if lay.codec == "int8" else bool((lay.zero == 8).all())
                codes = quantize_slots(theta, lay.codec, lay.group_size, symmetric)
            dtype = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(lay.values.dtype, "float32")
            new = dict(zip(("values", "scale", "zero"), block_slot_values(
                lay.rows, lay.groups, lay.n, theta, lay.codec, codes, dtype if lay.codec == "none" else "float32")))
            state[tname] = {k: new[k] for k in t.live}
        return state

    def _write(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        touched = set(state) | self._dirty
        with torch.no_grad():
            for tname in self._dirty - set(state):  # back to the base where the new combination is silent
                t = self._targets[tname]
                for k, live in t.live.items():
                    live.copy_(t.base[k])
            for tname, fields in state.items():
                t = self._targets[tname]
                for k, live in t.live.items():
                    live.copy_(fields[k])
        modules = list({id(m): m for m in (self._targets[n].module for n in touched)}.values())
        for module in modules:
            for cached in ("_layout", "_kernel"):  # views and prepared streams of the old values
                module.__dict__.pop(cached, None)
            if hasattr(module, "_cuda_cache"):
                module._cuda_cache = None
        self._dirty = set(state)
        if self.engine is not None and modules:
            self.engine.refresh_weights(modules)  # the products of the touched layers, in place

    # ------------------------------------------------------------------ reporting
    def memory(self) -> dict[str, int]:
        """Bytes held besides the model: the base snapshot of the targeted tensors, the task
        vectors read so far (sparse: indices + values), the cache of combinations, and what
        the engine keeps to refresh its arrays fast."""
        snap = sum(v.numel() * v.element_size() for t in self._targets.values() for v in t.base.values())
        tasks = sum(i.numel() * i.element_size() + v.numel() * v.element_size()
                    for d in self._tasks.values() for i, v in d.values())
        engine = self.engine.refresh_nbytes() if self.engine is not None else 0
        return {"snapshot": snap, "tasks": tasks, "cache": self.cache.nbytes, "engine_refresh": engine}


def _state_bytes(state: Mapping[str, Mapping[str, torch.Tensor]]) -> int:
    return sum(v.numel() * v.element_size() for fields in state.values() for v in fields.values())
