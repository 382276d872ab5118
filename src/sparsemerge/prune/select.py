"""Which tensors are pruned: Linear layers matched by include/exclude regexes, with a
pattern each (per-layer overrides allowed). Weights the pattern cannot apply to (e.g. an
input dimension not divisible by M) are reported and skipped, never silently mangled."""
from __future__ import annotations

from torch import nn

from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import pattern_applicable
from sparsemerge.patterns import Unstructured, parse_pattern
from sparsemerge.prune.base import Target
from sparsemerge.prune.config import DENSE, PruneConfig
from sparsemerge.prune.record import DENSE_BY_RECIPE
from sparsemerge.selection import LayerFilter, compile_regexes


def select_targets(model: nn.Module, config: PruneConfig) -> tuple[list[Target], list[tuple[str, str]]]:
    """``(targets, skipped)`` where ``skipped`` holds ``(name, reason)`` pairs."""
    selected = LayerFilter(config.include, config.exclude)
    regexes = compile_regexes(config.layer_patterns, "layer_patterns")
    overrides = [(rx, p if p == DENSE else parse_pattern(p)) for rx, p in zip(regexes, config.layer_patterns.values())]
    default = parse_pattern(config.pattern)
    per_block = _block_sparsities(model, config)
    targets: list[Target] = []
    skipped: list[tuple[str, str]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or not selected(name):
            continue
        pattern = next((p for rx, p in overrides if rx.search(name)), default)
        if pattern == DENSE:
            skipped.append((name, DENSE_BY_RECIPE))
            continue
        if per_block is not None:
            pattern = _block_pattern(name, per_block, pattern)
        reason = pattern_applicable(tuple(module.weight.shape), pattern)
        if reason is not None:
            skipped.append((name, reason))
            continue
        targets.append(Target(name, module, pattern))
    if not targets:
        hint = f"; skipped: {skipped[:3]}" if skipped else ""
        raise SparsemergeError(
            f"no Linear layer matched include={config.include} and exclude={config.exclude}{hint}; "
            "adjust --include/--exclude"
        )
    return targets, skipped


def _block_sparsities(model: nn.Module, config: PruneConfig) -> "tuple[str, list[float]] | None":
    """``(blocks prefix, sparsities)`` when ``config.sparsity_per_layer`` is set (checked against
    the number of transformer blocks), else None."""
    per_layer = config.sparsity_per_layer
    if per_layer is None:
        return None
    prefix, blocks = find_blocks(model)
    if len(per_layer) != len(blocks):
        raise SparsemergeError(
            f"sparsity_per_layer has {len(per_layer)} values but the model has {len(blocks)} transformer blocks; "
            "give one sparsity per block"
        )
    for value in per_layer:
        Unstructured(float(value))  # a clear error for a value outside [0, 1)
    return prefix, [float(v) for v in per_layer]


def _block_pattern(name: str, per_block: "tuple[str, list[float]]", pattern):
    """``unstructured:S`` with the sparsity of the block holding layer ``name``; layers outside
    the blocks (e.g. a head that was included) keep their pattern."""
    prefix, sparsities = per_block
    head = f"{prefix}." if prefix else ""
    if not name.startswith(head):
        return pattern
    index = name[len(head):].split(".", 1)[0]
    return Unstructured(sparsities[int(index)]) if index.isdigit() else pattern


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The repeated transformer blocks: the longest ``nn.ModuleList`` in the model."""
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (best is None or len(module) > len(best[1])):
            best = (name, module)
    if best is None:
        raise SparsemergeError("could not find the transformer blocks (no nn.ModuleList in the model)")
    return best
