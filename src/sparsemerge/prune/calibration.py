"""Sequential calibration: walk a transformer one block at a time (SparseGPT/Wanda protocol).

1. The inputs of the first block are captured for all calibration windows by a forward
   pre-hook that records ``(hidden_states, kwargs)`` - in transformers 5 Llama these kwargs
   carry ``position_embeddings``, ``position_ids``, ``attention_mask`` - and then raises
   :class:`_StopForward`, so embeddings run once and no later block or head runs.
2. Each block's target Linears are pruned from statistics of their inputs ``X`` (tokens x
   in_features, ``stats.add(X)``); layers that read the same tensor (q/k/v, gate/up) share one
   statistics object, so ``X^T X`` is computed once.
3. The block's outputs become the next block's inputs.

``config.sequential`` chooses how the statistics are gathered (``"auto"``: the method's
``default_sequential``, chosen by ``benchmarks/bench_calibrated.py --all-modes``):

* ``"layer"`` (default; "true sequential", Frantar & Alistarh 2023, Sec. 3 and their code's
  ``--true-sequential``): ONE forward pass per block over the whole calibration set; a
  forward pre-hook on each target prunes it the moment its full input arrives, so o_proj sees
  the pruned q/k/v, down_proj the pruned gate/up, and the pass's output is the pruned block's
  output. One block pass instead of two.
* ``"block"``: a dense pass over the block collects every layer's statistics, the block is
  pruned, and a second pass recomputes its outputs with the pruned weights (llm-compressor's
  sequential pipeline).
* ``"off"`` ("one-shot"): every layer sees the dense model's activations (one dense pass per
  block, its outputs passed on) - Wanda's simplest variant.

Memory holds one block's input and output activations for the calibration set; ``"layer"``
also holds one block's intermediate activations for the whole set at once (it runs the set as
one batch), and falls back to ``"block"`` when those would not fit comfortably in RAM.
"""
from __future__ import annotations

import abc
import logging
import os
from typing import Any, Callable, Optional, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsemerge.errors import SparsemergeError
from sparsemerge.patterns import Unstructured
from sparsemerge.prune.base import PruningMethod, Target
from sparsemerge.prune.config import PruneConfig
from sparsemerge.prune.select import find_blocks

BATCH_SIZE = 8  # calibration windows per block forward ("block" and "off" modes)
SEQUENTIAL_MODES = ("auto", "layer", "block", "off")
LAYER_MODE_RAM_SHARE = 0.4  # "layer" runs one batch if its activations fit in this share of RAM

log = logging.getLogger(__name__)


class LayerStats(Protocol):
    def add(self, x: torch.Tensor) -> None:
        """Accumulate one batch of layer inputs ``x`` of shape ``(tokens, in_features)``."""


class _StopForward(Exception):
    """Raised by the capture hook once the first block's inputs are recorded."""


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, list):
        return [_detach(v) for v in value]
    return value


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module, first_block: nn.Module, calibration: torch.Tensor, batch_size: int = BATCH_SIZE
) -> list[tuple[torch.Tensor, tuple, dict[str, Any]]]:
    """``[(hidden_states, extra_args, kwargs)]`` entering ``first_block``, one entry per batch."""
    captured: list[tuple[torch.Tensor, tuple, dict[str, Any]]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        kwargs = dict(kwargs)
        if args:
            hidden, rest = args[0], tuple(args[1:])
        elif "hidden_states" in kwargs:
            hidden, rest = kwargs.pop("hidden_states"), ()
        else:
            raise SparsemergeError("could not find the hidden states entering the first transformer block")
        captured.append((hidden.detach(), _detach(rest), _detach(kwargs)))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next(model.parameters()).device
    try:
        for batch in torch.split(calibration, batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _StopForward:
                pass
            else:
                raise SparsemergeError("the model's forward pass never reached its first transformer block")
    finally:
        handle.remove()
    return captured


def _block_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def resolve_block_patterns(targets: list[Target], block_of: dict[str, int], config: PruneConfig, n_blocks: int) -> None:
    """Reject patterns a block-by-block walk cannot honour (a global threshold needs all layers
    at once). ``config.sparsity_per_layer`` was already applied by ``select_targets``."""
    for t in targets:
        if isinstance(t.pattern, Unstructured) and t.pattern.scope == "global":
            raise SparsemergeError(
                f"pattern {t.pattern} needs one threshold over all layers, but calibrated methods prune block by "
                "block; use unstructured:S (per layer) or sparsity_per_layer"
            )


@torch.no_grad()
def walk_blocks(
    model: nn.Module,
    targets: list[Target],
    calibration: Optional[torch.Tensor],
    config: PruneConfig,
    make_stats: Callable[[Target], LayerStats],
    prune_block: Callable[[list[Target], dict[str, LayerStats]], None],
    desc: str = "calibrated pruning",
    default_mode: str = "block",
) -> None:
    """Prune ``targets`` block by block; ``prune_block(block_targets, stats_by_name)`` zeroes/updates
    their weights (layers that read the same input share one statistics object)."""
    if calibration is None or not isinstance(calibration, torch.Tensor) or calibration.dim() != 2:
        raise SparsemergeError("calibrated pruning needs calibration token ids of shape (nsamples, seqlen)")
    _, blocks = find_blocks(model)
    block_of_module = {id(m): i for i, block in enumerate(blocks) for m in block.modules()}
    block_of: dict[str, int] = {}
    for t in targets:
        if id(t.module) not in block_of_module:
            raise SparsemergeError(
                f"layer {t.name} is outside the transformer blocks; calibrated methods prune only Linears inside "
                "them - exclude it (e.g. --exclude lm_head)"
            )
        block_of[t.name] = block_of_module[id(t.module)]
    resolve_block_patterns(targets, block_of, config, len(blocks))
    mode = sequential_mode(config.sequential)
    if mode == "auto":
        mode = default_mode
    if mode == "layer" and not _fits_one_batch(calibration, targets):
        log.warning("calibration set too large to run as one batch; using sequential='block' (two passes per block)")
        mode = "block"
    was_training = model.training
    model.eval()
    try:
        batch_size = calibration.shape[0] if mode == "layer" else BATCH_SIZE
        batches = capture_block_inputs(model, blocks[0], calibration, batch_size)
        last = max(block_of.values())
        bar = tqdm(range(last + 1), desc=desc, disable=not config.progress, leave=False)
        groups: dict[str, list[str]] = {}  # "layer" mode: relative name -> relative names sharing its input
        for index in bar:
            block = blocks[index]
            block_targets = [t for t in targets if block_of[t.name] == index]
            if mode == "layer":
                (hidden, rest, kwargs), = batches
                output = _prune_in_pass(block, block_targets, (hidden, rest, kwargs), make_stats, prune_block, groups)
                batches = [(output, rest, kwargs)]
                if index == last:
                    break
                continue
            stats, outputs = _collect(block, block_targets, batches, make_stats)
            if block_targets:
                prune_block(block_targets, stats)
            del stats
            if index == last:
                break
            if mode == "block" and block_targets:
                outputs = [_block_output(block(h, *rest, **kw)) for h, rest, kw in batches]
            batches = [(out, rest, kw) for out, (_, rest, kw) in zip(outputs, batches)]
        bar.close()
    finally:
        model.train(was_training)


def sequential_mode(value: Any) -> str:
    """``"auto"`` (the method's default), ``"layer"``, ``"block"`` or ``"off"``; ``True``/``False``
    (older recipes) mean block/off."""
    if value is True:
        return "block"
    if value is False:
        return "off"
    if value not in SEQUENTIAL_MODES:
        raise SparsemergeError(f"sequential must be one of {', '.join(SEQUENTIAL_MODES)}, got {value!r}")
    return value


def _fits_one_batch(calibration: torch.Tensor, targets: list[Target]) -> bool:
    """Whether one block's activations for the whole calibration set (about ten tensors of
    tokens x the widest layer, float32) fit in ``LAYER_MODE_RAM_SHARE`` of physical memory."""
    widest = max((max(t.weight.shape) for t in targets), default=1)
    need = calibration.numel() * widest * 4 * 10
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return True
    return need <= LAYER_MODE_RAM_SHARE * ram


def _prune_in_pass(
    block: nn.Module,
    targets: list[Target],
    batch: tuple,
    make_stats: Callable[[Target], LayerStats],
    prune_block: Callable[[list[Target], dict[str, LayerStats]], None],
    groups: dict[str, list[str]],
) -> torch.Tensor:
    """One forward pass of ``block`` over the whole calibration batch in which each target is
    pruned by a pre-hook just before it computes; returns the pruned block's output.

    Layers reading the same tensor share one statistics object. ``groups`` (relative names,
    learned from the blocks so far and filled in here) lets later blocks prune such siblings
    together in one ``prune_block`` call (SparseGPT stacks them: one Cholesky, one OBS pass).
    A mixed allocation may target fewer (or more) siblings in one block than in another."""
    hidden, rest, kwargs = batch
    by_relative = {_relative(t.name): t for t in targets}
    pruned: set[str] = set()
    seen: list[tuple[torch.Tensor, LayerStats, list[str]]] = []  # (input, its stats, relative names reading it)

    def pre_hook(module: nn.Module, args: tuple, target: Target) -> None:
        rel = _relative(target.name)
        x = args[0]
        entry = next((e for e in seen if e[0] is x), None)
        if entry is None:
            stats = make_stats(target)
            stats.add(x.reshape(-1, x.shape[-1]))
            entry = (x, stats, [])
            seen.append(entry)
        entry[2].append(rel)
        if target.name in pruned:
            return
        group = [by_relative[r] for r in groups.get(rel, [rel]) if r in by_relative and by_relative[r].name not in pruned]
        if target not in group:
            group = [target]
        prune_block(group, {t.name: entry[1] for t in group})
        pruned.update(t.name for t in group)

    handles = [
        t.module.register_forward_pre_hook(lambda m, args, t=t: pre_hook(m, args, t)) for t in targets
    ]
    try:
        output = _block_output(block(hidden, *rest, **kwargs))
    finally:
        for h in handles:
            h.remove()
    missing = [t.name for t in targets if t.name not in pruned]
    if missing:
        raise SparsemergeError(f"layers {missing} received no input during the block's forward pass")
    for _, _, names in seen:
        for rel in names:
            known = groups.setdefault(rel, names)
            if set(names) <= set(known):  # the same siblings, or fewer targeted here (a layer kept dense)
                continue
            if set(known) <= set(names):  # more siblings targeted here than where first seen
                for other in names:
                    groups[other] = names
                continue
            # a block wired unlike the earlier ones: grouping siblings ahead of time would be wrong
            raise RuntimeError(f"layers sharing inputs differ between blocks ({known} vs {names}); "
                               "use sequential='block' for this model")
    return output


def _relative(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj`` (the name inside its block)."""
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):
        if parts[i].isdigit():
            return ".".join(parts[i + 1 :])
    return name


def _collect(
    block: nn.Module, targets: list[Target], batches: list, make_stats: Callable[[Target], LayerStats]
) -> tuple[dict[str, LayerStats], list[torch.Tensor]]:
    """Run ``block`` densely over all batches, feeding its target layers' inputs to statistics."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        t.module.register_forward_hook(lambda m, inp, out, name=t.name: captured.__setitem__(name, inp[0]))
        for t in targets
    ]
    by_name = {t.name: t for t in targets}
    stats: dict[str, LayerStats] = {}
    owner: dict[str, str] = {}  # name -> name whose captured input feeds the shared statistics
    outputs = []
    try:
        for hidden, rest, kwargs in batches:
            captured.clear()
            outputs.append(_block_output(block(hidden, *rest, **kwargs)))
            missing = [t.name for t in targets if t.name not in captured]
            if missing:
                raise SparsemergeError(f"layers {missing} received no input during the block's forward pass")
            if not stats:  # first batch: group layers reading the same tensor
                seen: dict[int, str] = {}
                for name, x in captured.items():
                    first = seen.setdefault(id(x), name)
                    owner[name] = first
                    stats[name] = stats[first] if first != name else make_stats(by_name[name])
            for name, first in owner.items():
                if first == name:
                    x = captured[name]
                    stats[name].add(x.reshape(-1, x.shape[-1]))
    finally:
        for h in handles:
            h.remove()
        captured.clear()
    return stats, outputs


class CalibratedMethod(PruningMethod):
    """A method that prunes each target from statistics of its calibration inputs."""

    needs_calibration = True
    default_sequential = "block"  # the walk when config.sequential is "auto"

    @abc.abstractmethod
    def make_stats(self, target: Target, config: PruneConfig) -> LayerStats:
        """A fresh accumulator of the statistics this method needs for ``target``."""

    @abc.abstractmethod
    def prune_layer(self, target: Target, stats: LayerStats, config: PruneConfig) -> None:
        """Prune one target in place from its accumulated statistics."""

    def prune_block(self, targets: list[Target], stats: dict[str, LayerStats], config: PruneConfig) -> None:
        for t in targets:
            self.prune_layer(t, stats[t.name], config)

    def prune(self, model: nn.Module, targets: list[Target], config: PruneConfig, calibration: Optional[torch.Tensor]) -> None:
        walk_blocks(
            model,
            targets,
            calibration,
            config,
            lambda t: self.make_stats(t, config),
            lambda ts, s: self.prune_block(ts, s, config),
            desc=f"{self.name} blocks",
            default_mode=self.default_sequential,
        )
