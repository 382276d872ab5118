"""Cross-layer parameter sharing (chapter 10.3.6, "参数共享的层级设计": ``Layer_i = Layer_j``
(full sharing) or ``Layer_i = alpha Layer_j + beta Layer_k`` (a linear combination)).

For one kind of projection (``mlp.down_proj``, ``self_attn.q_proj`` ...) of a decoder, the
layers are split into groups of consecutive layers (a fixed ``group_size``, or greedily while
each new layer stays within ``threshold`` relative distance of the group's mean). Each group
stores one shared weight ``S = mean_i W_i`` and each layer keeps

    ``W_i ~ a_i S + R_i``,  ``a_i = <W_i, S> / ||S||^2``  (the least-squares scale of S),

with a small residual ``R_i`` of ``W_i - a_i S``: rank ``r`` (truncated SVD, ``U_r diag(s_r) V_r^T``,
stored as two factors), the ``density`` fraction of largest entries (sparse), or none (pure
sharing with a scale). Bytes per layer: the shared weight once per group, one scale, and the
residual's factors or its values + 32-bit indices.

The result is written as a Hugging Face folder with the reconstructed weights (it loads
anywhere) plus ``sparsemerge_sharing.json`` (groups, ranks, relative errors, bytes) and, with
``compact``, ``sharing.safetensors``: the shared weights, scales and residual factors, from
which :func:`reconstruct_from_compact` rebuilds every shared projection exactly as the folder holds it.

:func:`layer_distances` gives the relative distances ``||W_i - W_j||_F / sqrt(||W_i|| ||W_j||)``
between layers that guide the grouping (trained LM layers are far apart: sharing them needs the
residual, which the benchmark's perplexity-vs-bytes table quantifies against per-layer low rank).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

import torch
from torch import nn

from sparsemerge.errors import SparsemergeError

SHARING_RECORD = "sparsemerge_sharing.json"
COMPACT_FILE = "sharing.safetensors"
LAYER_RX = re.compile(r"^(?P<prefix>.*\.layers)\.(?P<index>\d+)\.(?P<kind>.+)\.weight$")
Residual = Literal["none", "lowrank", "sparse"]


@dataclass
class SharingConfig:
    kinds: list[str]  # e.g. ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    group_size: int = 2
    threshold: Optional[float] = None  # greedy grouping by relative distance instead of group_size
    residual: Residual = "lowrank"
    rank: int = 64
    density: float = 0.1
    value_bytes: int = 2  # bytes per stored value (2: fp16/bf16)

    def __post_init__(self) -> None:
        if not self.kinds:
            raise SparsemergeError("cross-layer sharing needs at least one projection kind (e.g. mlp.down_proj)")
        if self.group_size < 1:
            raise SparsemergeError(f"group size must be >= 1, got {self.group_size}")
        if self.threshold is not None and not self.threshold > 0:
            raise SparsemergeError(f"threshold must be > 0, got {self.threshold}")
        if self.residual not in ("none", "lowrank", "sparse"):
            raise SparsemergeError(f"residual must be none, lowrank or sparse, got {self.residual!r}")
        if self.residual == "lowrank" and self.rank < 1:
            raise SparsemergeError(f"residual rank must be >= 1, got {self.rank}")
        if self.residual == "sparse" and not 0 < self.density <= 1:
            raise SparsemergeError(f"residual density must be in (0, 1], got {self.density}")


@dataclass
class LayerShare:
    name: str
    group: int
    scale: float
    rel_error: float  # ||W_i - (a_i S + R_i)|| / ||W_i||
    residual_bytes: int


@dataclass
class SharingReport:
    kinds: list[str]
    groups: dict[str, list[list[int]]]
    layers: list[LayerShare] = field(default_factory=list)
    dense_bytes: int = 0
    shared_bytes: int = 0

    @property
    def ratio(self) -> float:
        return self.shared_bytes / max(1, self.dense_bytes)

    def to_json(self) -> dict[str, Any]:
        return {"kinds": self.kinds, "groups": self.groups, "dense_bytes": self.dense_bytes,
                "shared_bytes": self.shared_bytes, "ratio": round(self.ratio, 6),
                "layers": [asdict(x) for x in self.layers]}


def projection_weights(model: nn.Module, kind: str) -> dict[int, nn.Parameter]:
    """``{layer index: weight}`` of the decoder layers' ``kind`` projection."""
    out: dict[int, nn.Parameter] = {}
    for name, param in model.named_parameters():
        match = LAYER_RX.match(name)
        if match and match["kind"] == kind:
            out[int(match["index"])] = param
    if not out:
        kinds = sorted({m["kind"] for n, _ in model.named_parameters() if (m := LAYER_RX.match(n))})
        raise SparsemergeError(f"no decoder layer has a {kind!r} weight; kinds here: {kinds}")
    shapes = {tuple(p.shape) for p in out.values()}
    if len(shapes) != 1:
        raise SparsemergeError(f"{kind} has different shapes across layers ({sorted(shapes)}): it cannot be shared")
    return dict(sorted(out.items()))


def layer_distances(weights: dict[int, torch.Tensor]) -> torch.Tensor:
    """``D[i, j] = ||W_i - W_j||_F / sqrt(||W_i|| ||W_j||)`` over the layers in index order."""
    flat = torch.stack([w.detach().float().flatten() for w in weights.values()])
    norms = flat.norm(dim=1)
    return torch.cdist(flat, flat) / (norms[:, None] * norms[None, :]).sqrt()


def make_groups(weights: dict[int, torch.Tensor], config: SharingConfig) -> list[list[int]]:
    """Consecutive layer groups: fixed ``group_size``, or greedy by ``threshold`` on the distance
    of each next layer to the running mean of its group."""
    layers = list(weights)
    if config.threshold is None:
        return [layers[i : i + config.group_size] for i in range(0, len(layers), config.group_size)]
    groups: list[list[int]] = [[layers[0]]]
    for index in layers[1:]:
        members = groups[-1]
        mean = torch.stack([weights[i].detach().float() for i in members]).mean(0)
        w = weights[index].detach().float()
        if float((w - mean).norm() / (w.norm() * mean.norm()).sqrt()) <= config.threshold:
            members.append(index)
        else:
            groups.append([index])
    return groups


def _residual(r: torch.Tensor, config: SharingConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """``(approximation, stored tensors, bytes)`` of the residual ``r``."""
    if config.residual == "none":
        return torch.zeros_like(r), {}, 0
    if config.residual == "lowrank":
        rank = min(config.rank, *r.shape)
        u, s, vh = torch.linalg.svd(r, full_matrices=False)
        left, right = u[:, :rank] * s[:rank], vh[:rank]
        return left @ right, {"U": left, "V": right}, rank * (r.shape[0] + r.shape[1]) * config.value_bytes
    k = max(1, int(round(config.density * r.numel())))
    flat = r.flatten()
    idx = torch.topk(flat.abs(), k).indices.sort().values
    approx = torch.zeros_like(flat)
    approx[idx] = flat[idx]
    return approx.reshape(r.shape), {"indices": idx.to(torch.int32), "values": flat[idx]}, k * (config.value_bytes + 4)


@torch.no_grad()
def share_layers_(model: nn.Module, config: SharingConfig, compact: Optional[dict[str, torch.Tensor]] = None) -> SharingReport:
    """Replace each ``config.kinds`` weight by its shared approximation in place (see the module
    docstring); ``compact``: a dict that receives the shared weights, scales and residual factors."""
    report = SharingReport(list(config.kinds), {})
    for kind in config.kinds:
        weights = projection_weights(model, kind)
        groups = make_groups(weights, config)
        report.groups[kind] = groups
        for g, members in enumerate(groups):
            originals = {i: weights[i].detach().float().clone() for i in members}
            shared = torch.stack(list(originals.values())).mean(0)
            report.shared_bytes += shared.numel() * config.value_bytes
            if compact is not None:
                compact[f"{kind}.group{g}.shared"] = shared.clone()
            denominator = float((shared * shared).sum()) or 1.0
            for i in members:
                w = originals[i]
                scale = float((w * shared).sum()) / denominator
                approx, stored, nbytes = _residual(w - scale * shared, config)
                new = scale * shared + approx
                report.dense_bytes += w.numel() * config.value_bytes
                report.shared_bytes += nbytes + 4
                report.layers.append(LayerShare(f"layers.{i}.{kind}", g, scale,
                                                float((w - new).norm() / w.norm().clamp_min(1e-30)), nbytes))
                weights[i].copy_(new.to(weights[i].dtype))
                if compact is not None:
                    compact[f"{kind}.layer{i}.scale"] = torch.tensor(scale)
                    for key, tensor in stored.items():
                        compact[f"{kind}.layer{i}.{key}"] = tensor.contiguous()
    return report


def reconstruct_from_compact(tensors: dict[str, torch.Tensor], record: dict[str, Any]) -> dict[str, torch.Tensor]:
    """``{"<kind> of layer i": weight}`` rebuilt from :data:`COMPACT_FILE`'s tensors and the record."""
    out: dict[str, torch.Tensor] = {}
    for kind, groups in record["groups"].items():
        for g, members in enumerate(groups):
            shared = tensors[f"{kind}.group{g}.shared"]
            for i in members:
                w = float(tensors[f"{kind}.layer{i}.scale"]) * shared
                if f"{kind}.layer{i}.U" in tensors:
                    w = w + tensors[f"{kind}.layer{i}.U"] @ tensors[f"{kind}.layer{i}.V"]
                elif f"{kind}.layer{i}.values" in tensors:
                    flat = w.flatten().clone()
                    flat[tensors[f"{kind}.layer{i}.indices"].long()] += tensors[f"{kind}.layer{i}.values"]
                    w = flat.reshape(shared.shape)
                out[f"layers.{i}.{kind}"] = w
    return out


def lowrank_per_layer_(model: nn.Module, kinds: list[str], rank: int, value_bytes: int = 2) -> tuple[int, int]:
    """The no-sharing baseline at a similar byte count: each weight replaced by its own rank-``rank``
    truncated SVD. Returns ``(dense bytes, stored bytes)``."""
    dense = stored = 0
    with torch.no_grad():
        for kind in kinds:
            for weight in projection_weights(model, kind).values():
                w = weight.detach().float()
                u, s, vh = torch.linalg.svd(w, full_matrices=False)
                r = min(rank, *w.shape)
                weight.copy_(((u[:, :r] * s[:r]) @ vh[:r]).to(weight.dtype))
                dense += w.numel() * value_bytes
                stored += r * (w.shape[0] + w.shape[1]) * value_bytes
    return dense, stored


KIND_SETS = {
    "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    "attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
}


def parse_kinds(text: str) -> list[str]:
    """``mlp``, ``attn``, ``all`` or a comma list of projection kinds."""
    out: list[str] = []
    for part in text.split(","):
        part = part.strip()
        if part == "all":
            out += KIND_SETS["mlp"] + KIND_SETS["attn"]
        elif part in KIND_SETS:
            out += KIND_SETS[part]
        elif part:
            out.append(part)
    return list(dict.fromkeys(out))
