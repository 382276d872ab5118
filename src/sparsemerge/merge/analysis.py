"""Task-vector statistics: cosine similarity and sign conflicts between fine-tuned models.

Task vector (chapter 10.3.2; Ilharco et al., 2023, "Editing Models with Task Arithmetic"):
``tau_i = theta_i - theta_base``. For two task vectors over a set of tensors

* cosine similarity ``cos(tau_a, tau_b) = <tau_a, tau_b> / (||tau_a|| ||tau_b||)`` (near 0 for
  independent fine-tunes, which is why task arithmetic interferes little; chapter 10.3.7),
* sign-conflict rate: among coordinates where both are nonzero, the fraction with opposite
  signs ``P[sign(tau_a) != sign(tau_b) | tau_a != 0, tau_b != 0]`` (the interference that TIES
  resolves by sign election; Yadav et al., 2023, "TIES-Merging", chapter 10.3.3),
* over all N models: among coordinates where at least two are nonzero, the fraction whose
  nonzero signs are not all equal.

``density`` (0 < d <= 1) first keeps the top ``d`` fraction of each task vector's entries by
magnitude, per tensor, with TIES' trim (:func:`sparsemerge.merge.ops.magnitude_trim`), so the
conflicts counted are those TIES would see.

A model may also be a PEFT LoRA adapter folder: it is read as the base plus ``B A * scale``
(:class:`sparsemerge.merge.lora.LoraTensorSource`).

Everything streams: one tensor name at a time, holding the base tensor and the N model tensors.
Sums are accumulated in float64.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from sparsemerge.errors import SparsemergeError
from sparsemerge.selection import LayerFilter

_LAYER_INDEX = re.compile(r"\.\d+\.")


def layer_type(name: str) -> str:
    """``model.layers.3.self_attn.q_proj.weight`` -> ``q_proj``; ``model.embed_tokens.weight`` -> ``embed_tokens``."""
    parts = name.split(".")
    if parts[-1] in ("weight", "bias") and len(parts) > 1:
        parts = parts[:-1]
    return parts[-1]


@dataclass
class PairStats:
    """Sufficient statistics of two task vectors (add them over tensors with ``+=``)."""

    dot: float = 0.0
    norm_a2: float = 0.0
    norm_b2: float = 0.0
    both_nonzero: int = 0
    conflicts: int = 0
    numel: int = 0

    @property
    def cosine(self) -> float:
        denom = (self.norm_a2 * self.norm_b2) ** 0.5
        return self.dot / denom if denom > 0 else float("nan")

    @property
    def conflict_rate(self) -> float:
        return self.conflicts / self.both_nonzero if self.both_nonzero else float("nan")

    @property
    def overlap(self) -> float:
        """Fraction of coordinates where both task vectors are nonzero."""
        return self.both_nonzero / self.numel if self.numel else float("nan")

    def __iadd__(self, other: "PairStats") -> "PairStats":
        self.dot += other.dot
        self.norm_a2 += other.norm_a2
        self.norm_b2 += other.norm_b2
        self.both_nonzero += other.both_nonzero
        self.conflicts += other.conflicts
        self.numel += other.numel
        return self


def pair_stats(tau_a: torch.Tensor, tau_b: torch.Tensor) -> PairStats:
    """Dot product, squared norms and sign conflicts of two same-shaped task vectors."""
    if tau_a.shape != tau_b.shape:
        raise SparsemergeError(f"task vectors differ in shape: {tuple(tau_a.shape)} vs {tuple(tau_b.shape)}")
    a, b = tau_a.detach().double().flatten(), tau_b.detach().double().flatten()
    sa, sb = torch.sign(a), torch.sign(b)
    both = (sa != 0) & (sb != 0)
    return PairStats(
        dot=float(a @ b),
        norm_a2=float(a @ a),
        norm_b2=float(b @ b),
        both_nonzero=int(both.sum()),
        conflicts=int((both & (sa != sb)).sum()),
        numel=a.numel(),
    )


def cosine_similarity(tau_a: torch.Tensor, tau_b: torch.Tensor) -> float:
    return pair_stats(tau_a, tau_b).cosine


def sign_conflict_rate(tau_a: torch.Tensor, tau_b: torch.Tensor) -> float:
    return pair_stats(tau_a, tau_b).conflict_rate


def multi_sign_conflicts(taus: Sequence[torch.Tensor]) -> tuple[int, int]:
    """``(conflicting, contested)``: coordinates with >= 2 nonzero entries, and those whose nonzero signs differ."""
    signs = torch.stack([torch.sign(t.detach()).flatten() for t in taus])
    positive = (signs > 0).sum(0)
    negative = (signs < 0).sum(0)
    contested = (positive + negative) >= 2
    return int((contested & (positive > 0) & (negative > 0)).sum()), int(contested.sum())


@dataclass
class TaskVectorStats:
    """Result of :func:`task_vector_stats`; keys of ``pairs`` are ``(i, j)`` model indices, i < j."""

    models: list[str]
    pairs: dict[tuple[int, int], PairStats] = field(default_factory=dict)
    by_type: dict[str, dict[tuple[int, int], PairStats]] = field(default_factory=dict)
    norms: list[float] = field(default_factory=list)
    all_conflicts: int = 0
    all_contested: int = 0
    tensors: int = 0
    density: "float | None" = None

    @property
    def all_conflict_rate(self) -> float:
        return self.all_conflicts / self.all_contested if self.all_contested else float("nan")

    def to_json(self) -> dict[str, Any]:
        def pairs_json(pairs: dict[tuple[int, int], PairStats]) -> list[dict[str, Any]]:
            return [
                {"a": self.models[i], "b": self.models[j], "cosine": s.cosine, "sign_conflict": s.conflict_rate, "overlap": s.overlap}
                for (i, j), s in sorted(pairs.items())
            ]

        return {
            "models": self.models,
            "density": self.density,
            "tensors": self.tensors,
            "norms": dict(zip(self.models, self.norms)),
            "pairs": pairs_json(self.pairs),
            "all_models_sign_conflict": self.all_conflict_rate,
            "by_layer_type": {t: pairs_json(p) for t, p in sorted(self.by_type.items())},
        }


def _label(source: Any) -> str:
    adapter = getattr(source, "adapter", None)
    return str(adapter.folder) if adapter is not None else source.source.name


def _task_vector_tensors(base: Any, models: Sequence[Any]) -> list[str]:
    """Names shared by all sources with float dtype; a clear error on missing or mismatched tensors."""
    names = [n for n in base.names()]
    missing, mismatched = [], []
    for m in models:
        for n in names:
            if n not in m:
                missing.append(f"{n} (absent from {_label(m)})")
            elif tuple(m.shape(n)) != tuple(base.shape(n)):
                mismatched.append(f"{n}: base {tuple(base.shape(n))} vs {_label(m)} {tuple(m.shape(n))}")
    if missing or mismatched:
        lines = (mismatched + missing)[:20]
        more = len(missing) + len(mismatched) - len(lines)
        raise SparsemergeError(
            "the models do not share the base's tensors; task vectors need the same architecture:\n  "
            + "\n  ".join(lines)
            + (f"\n  ... and {more} more" if more > 0 else "")
        )
    return names


def task_vector_stats(
    base: "str | os.PathLike[str]",
    models: Sequence["str | os.PathLike[str]"],
    by_layer_type: bool = False,
    density: "float | None" = None,
    include: "Iterable[str] | None" = None,
    progress: bool = True,
) -> TaskVectorStats:
    """Pairwise cosine / sign-conflict statistics of ``tau_i = models[i] - base`` (see the module docstring).

    ``include``: regular expressions on tensor names to restrict the statistics to (default: all
    floating-point tensors).
    """
    from sparsemerge.io import open_tensor_source

    if len(models) < 2:
        raise SparsemergeError(f"task-vector statistics need at least two models besides the base, got {len(models)}")
    from sparsemerge.merge.lora import LoraAdapter, LoraTensorSource, is_lora_adapter
    from sparsemerge.merge.ops import magnitude_trim, task_vector

    if density is not None and not 0 < density <= 1:
        raise SparsemergeError(f"density must be in (0, 1], got {density}")
    selected = LayerFilter(include or None)  # no include regexes: every tensor
    base_src = open_tensor_source(base)
    sources = [
        LoraTensorSource(open_tensor_source(base), LoraAdapter(m)) if is_lora_adapter(m) else open_tensor_source(m)
        for m in models
    ]
    try:
        names = _task_vector_tensors(base_src, sources)
        stats = TaskVectorStats(models=[str(m) for m in models], density=density, norms=[0.0] * len(models))
        n = len(models)
        for i in range(n):
            for j in range(i + 1, n):
                stats.pairs[(i, j)] = PairStats()
        for name in tqdm(names, desc="task vectors", disable=not progress, leave=False):
            if not selected(name):
                continue
            theta0 = base_src.get(name)
            if not theta0.is_floating_point():
                continue
            taus = [task_vector(src.get(name).double(), theta0.double()) for src in sources]
            if density is not None:
                taus = [magnitude_trim(t, density) for t in taus]
            stats.tensors += 1
            kind = layer_type(name)
            for i in range(n):
                stats.norms[i] += float((taus[i].flatten() @ taus[i].flatten()))
                for j in range(i + 1, n):
                    s = pair_stats(taus[i], taus[j])
                    stats.pairs[(i, j)] += s
                    if by_layer_type:
                        stats.by_type.setdefault(kind, {}).setdefault((i, j), PairStats())
                        stats.by_type[kind][(i, j)] += s
            conflicts, contested = multi_sign_conflicts(taus)
            stats.all_conflicts += conflicts
            stats.all_contested += contested
        if stats.tensors == 0:
            raise SparsemergeError(f"no floating-point tensor matched include={list(include or [])}")
        stats.norms = [v**0.5 for v in stats.norms]
        return stats
    finally:
        base_src.close()
        for src in sources:
            src.close()
