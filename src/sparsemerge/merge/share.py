"""Cross-layer parameter sharing (chapter 10.3.6, "Layer_i = Layer_j"; as in ALBERT, Lan et al.
2020, with per-layer residuals as in "Basis Sharing", Wang et al. 2024, and "Relaxed Recursive
Transformers", Bae et al. 2024).

For every kind of layer matrix (``self_attn.q_proj.weight``, ``mlp.down_proj.weight``, ...) the
``L`` layers are cut into ``groups`` runs of consecutive layers whose weights are closest: with
the Gram matrix ``G[i, j] = <W_i, W_j>``, a run ``g`` costs ``sum_{l in g} ||W_l - S_g||^2 =
sum_l G[l, l] - (1/|g|) sum_{l, m in g} G[l, m]`` (``S_g`` = the run's mean, which minimises it),
and dynamic programming finds the cut of least total cost. Each layer then stores only a small
residual ``R_l ~ W_l - S_g``:

* ``lowrank``: the best rank-``r`` approximation (truncated SVD, Eckart-Young), ``U (out, r) @ V (r, in)``;
* ``sparse``: the ``density`` fraction of largest-magnitude entries (flat int32 indices + values);
* ``none``: ``W_l = S_g`` (plain sharing).

Output: a folder with the source's ``config.json`` and tokenizer and ``sharing/shared.safetensors``
+ ``sharing/sharing.json`` (how to rebuild every tensor). :func:`sparsemerge.io.load_model`
(every sparsemerge command that loads a model) rebuilds the dense model; tensor-level commands
(merge, pack) read weights only and refuse it. Memory: all layers of one matrix kind at a time.
"""
from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field

from sparsemerge.errors import SparsemergeError

from sparsemerge.io.shared import FORMAT, SHARED_FILE, SHARING_DIR, SHARING_JSON, has_sharing, load_shared_state, refuse_sharing  # noqa: F401


class ShareConfig(BaseModel):
    """Options of :func:`share_layers` (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid")

    groups: int = Field(..., ge=1, description="runs of consecutive layers per matrix kind (1 = one weight for all layers)")
    residual: Literal["lowrank", "sparse", "none"] = "lowrank"
    rank: int = Field(16, ge=1, description="lowrank: rank of each layer's residual")
    density: float = Field(0.05, gt=0, le=1, description="sparse: fraction of each residual's entries kept")
    include: list[str] = Field(default_factory=lambda: [r"(proj|fc\d*|dense|query|key|value)\.weight$"],
                               description="regexes on the in-layer name of the matrices to share")
    dtype: Optional[str] = Field(None, description="stored dtype (default: the source's)")


@dataclass
class KindRecord:
    kind: str  # "mlp.down_proj.weight"
    groups: list[tuple[int, int]]  # [start, end) layer runs
    within: float  # sum ||W_l - S_g||^2 / sum ||W_l||^2 : what plain sharing loses
    residual_error: float  # sum ||W_l - S_g - R_l||^2 / sum ||W_l||^2 : what is left after the residual
    neighbour_cosine: float  # mean cosine of consecutive layers' weights


@dataclass
class ShareReport:
    out: Path
    kinds: list[KindRecord] = field(default_factory=list)
    bytes_source: int = 0  # tensors of the source in the stored dtype
    bytes_shared: int = 0  # tensors written
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "bytes_source": self.bytes_source, "bytes_shared": self.bytes_shared,
            "ratio": round(self.bytes_shared / max(self.bytes_source, 1), 6), "seconds": round(self.seconds, 3),
            "kinds": [{"kind": k.kind, "groups": [list(g) for g in k.groups], "within": round(k.within, 6),
                       "residual_error": round(k.residual_error, 6), "neighbour_cosine": round(k.neighbour_cosine, 6)}
                      for k in self.kinds],
        }


def contiguous_groups(gram: torch.Tensor, groups: int) -> tuple[list[tuple[int, int]], float]:
    """Cut ``L`` layers into ``groups`` runs ``[start, end)`` minimising the total squared distance
    to each run's mean, from the ``(L, L)`` Gram matrix; returns the runs and that cost. O(groups L^2)."""
    n = gram.shape[0]
    if not 1 <= groups <= n:
        raise SparsemergeError(f"groups must be between 1 and the number of layers ({n}), got {groups}")
    g = gram.double()
    csum = torch.zeros(n + 1, n + 1, dtype=torch.float64)  # 2-D prefix sums: sum of G[a:b, a:b] in O(1)
    csum[1:, 1:] = g.cumsum(0).cumsum(1)
    diag = torch.cat([torch.zeros(1, dtype=torch.float64), g.diagonal().cumsum(0)])

    def cost(a: int, b: int) -> float:
        block = csum[b, b] - csum[a, b] - csum[b, a] + csum[a, a]
        return float(diag[b] - diag[a] - block / (b - a))

    inf = math.inf
    best = [[inf] * (n + 1) for _ in range(groups + 1)]  # best[k][j]: first j layers in k runs
    back = [[0] * (n + 1) for _ in range(groups + 1)]
    best[0][0] = 0.0
    for k in range(1, groups + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                c = best[k - 1][i] + cost(i, j)
                if c < best[k][j]:
                    best[k][j], back[k][j] = c, i
    runs, j = [], n
    for k in range(groups, 0, -1):
        i = back[k][j]
        runs.append((i, j))
        j = i
    return runs[::-1], max(best[groups][n], 0.0)


def lowrank(residual: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, V)`` with ``U @ V`` the best rank-``rank`` approximation of ``residual`` (SVD)."""
    u, s, vh = torch.linalg.svd(residual.float(), full_matrices=False)
    r = min(rank, s.numel())
    return (u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous()


def sparse_topk(residual: torch.Tensor, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(flat int32 indices, values)`` of the ``ceil(density * numel)`` largest-magnitude entries."""
    flat = residual.reshape(-1)
    if flat.numel() >= 2**31:
        raise SparsemergeError("a residual of 2^31 or more entries does not fit int32 indices")
    k = max(1, math.ceil(density * flat.numel()))
    index = flat.abs().topk(k).indices.sort().values
    return index.to(torch.int32), flat[index].contiguous()


def _layer_split(name: str) -> Optional[tuple[str, int, str]]:
    from sparsemerge.merge.plan import split_layer

    return split_layer(name)


def share_layers(src: Any, out: "str | Path", config: "ShareConfig | dict[str, Any]", overwrite: bool = False,
                 progress: bool = False) -> ShareReport:
    """Write ``src`` (any source ``open_tensor_source`` reads) with its layer matrices shared
    across runs of layers plus per-layer residuals (see the module docstring)."""
    from sparsemerge.io import atomic_output, ensure_writable, open_tensor_source, save_safetensors
    from sparsemerge.io.dtypes import dtype_from_name, itemsize
    from sparsemerge.merge.engine import TOKENIZER_FILES

    config = config if isinstance(config, ShareConfig) else ShareConfig(**config)
    patterns = [re.compile(p) for p in config.include]
    start = time.perf_counter()
    ensure_writable(out, overwrite, inputs=[src])
    report = ShareReport(Path(out))
    with open_tensor_source(src) as source, atomic_output(out, overwrite=overwrite, inputs=[src]) as tmp:
        kinds: dict[str, dict[int, str]] = {}
        for name in source.names():
            split = _layer_split(name)
            if split and len(source.shape(name)) == 2 and any(p.search(split[2]) for p in patterns):
                kinds.setdefault(split[2], {})[split[1]] = name
        if not kinds:
            raise SparsemergeError(f"no layer matrices match include {config.include}; nothing to share")
        n_layers = max(max(v) for v in kinds.values()) + 1
        if config.groups > n_layers:
            raise SparsemergeError(f"groups={config.groups} but the model has {n_layers} layers")
        tensors: dict[str, torch.Tensor] = {}
        recipes: dict[str, dict[str, Any]] = {}
        shared_names = {n for v in kinds.values() for n in v.values()}
        for name in source.names():  # everything else is stored as it is
            report.bytes_source += math.prod(source.shape(name)) * itemsize(source.dtype(name))
            if name not in shared_names:
                tensors[name] = source.get(name)
                recipes[name] = {"copy": name}
        from tqdm.auto import tqdm

        records = []
        for kind, by_layer in tqdm(sorted(kinds.items()), desc="share", disable=not progress):
            layers = sorted(by_layer)
            if layers != list(range(len(layers))) or len(layers) < config.groups:
                raise SparsemergeError(f"{kind}: found in layers {layers}; cross-layer sharing needs it in every layer 0..{n_layers - 1}")
            shapes = {tuple(source.shape(by_layer[i])) for i in layers}
            if len(shapes) > 1:
                raise SparsemergeError(f"{kind}: layers have different shapes {sorted(shapes)}; they cannot share a weight")
            store = dtype_from_name(config.dtype) if config.dtype else source.dtype(by_layer[0])
            w = torch.stack([source.get(by_layer[i]).float() for i in layers])  # (L, out, in)
            flat = w.reshape(len(layers), -1).double()
            gram = flat @ flat.T
            runs, _ = contiguous_groups(gram, config.groups)
            total = float(gram.diagonal().sum())
            lost = left = 0.0
            for gi, (a, b) in enumerate(runs):
                key = f"shared.{kind}.{gi}"
                tensors[key] = w[a:b].mean(0).to(store).contiguous()
                shared = tensors[key].float()  # the stored (rounded) mean is what the loader adds to
                for i in range(a, b):
                    res = w[i] - shared
                    lost += float(res.double().square().sum())
                    recipe: dict[str, Any] = {"shared": key}
                    if config.residual == "lowrank":
                        u, v = lowrank(res, config.rank)
                        tensors[f"residual.{by_layer[i]}.u"], tensors[f"residual.{by_layer[i]}.v"] = u.to(store), v.to(store)
                        recipe.update(u=f"residual.{by_layer[i]}.u", v=f"residual.{by_layer[i]}.v")
                        res = res - tensors[recipe["u"]].float() @ tensors[recipe["v"]].float()
                    elif config.residual == "sparse":
                        index, values = sparse_topk(res, config.density)
                        tensors[f"residual.{by_layer[i]}.index"], tensors[f"residual.{by_layer[i]}.values"] = index, values.to(store)
                        recipe.update(index=f"residual.{by_layer[i]}.index", values=f"residual.{by_layer[i]}.values")
                        res = res.reshape(-1).clone()
                        res[index.long()] -= tensors[recipe["values"]].float()
                    left += float(res.double().square().sum())
                    recipes[by_layer[i]] = recipe
            cos = [float(gram[i, i + 1] / max(math.sqrt(float(gram[i, i] * gram[i + 1, i + 1])), 1e-300)) for i in range(len(layers) - 1)]
            records.append(KindRecord(kind, runs, lost / max(total, 1e-300), left / max(total, 1e-300), sum(cos) / max(len(cos), 1)))
            del w, flat
        report.kinds = records
        folder = tmp / SHARING_DIR
        folder.mkdir()
        save_safetensors(tensors, folder / SHARED_FILE, metadata={"format": "pt"})
        report.bytes_shared = sum(t.numel() * t.element_size() for t in tensors.values())
        report.seconds = time.perf_counter() - start
        manifest = {"format": FORMAT, "config": config.model_dump(), "tensors": recipes, "report": report.to_json()}
        (folder / SHARING_JSON).write_text(json.dumps(manifest, indent=1) + "\n")
        for name in ("config.json", "generation_config.json") + TOKENIZER_FILES:
            if (Path(source.folder) / name).is_file():
                shutil.copyfile(Path(source.folder) / name, tmp / name)
        if not (tmp / "config.json").is_file():
            raise SparsemergeError(f"{src!r} has no config.json beside its weights; a shared model needs one to be loaded")
    return report
