"""Function-preserving channel permutation of Llama-family decoders for N:M pruning.

An N:M mask compares M consecutive input channels of a Linear layer. Reordering those
channels - and every tensor that produces or reads them, so the network computes exactly the
same function - lets the mask keep more score (:mod:`sparsemerge.prune.permutation_search`).
Three kinds of channel spaces (``scope``) of LlamaForCausalLM / Mistral / Qwen2 / Qwen3:

* ``"mlp"``: the intermediate channels of each block: rows of gate_proj and up_proj (and their
  biases), columns of down_proj; ``act(gate) * up`` is elementwise. Searched on down_proj.
* ``"attn"``: the value channels inside each KV head: rows of v_proj within head h and the
  matching o_proj columns of every query head that reads h (GQA: query heads h*g .. h*g+g-1).
  v is not rotated by RoPE and attention mixes tokens, not channels. Only permutations within a
  head are used (heads keep their places), so each KV head is one search over the head_dim
  columns of its query heads' o_proj slices stacked by rows (needs head_dim % M == 0).
* ``"hidden"``: the residual stream, one permutation for the whole model: embedding columns,
  every RMSNorm weight (mean of squares is order-free), input columns of q/k/v/gate/up and the
  head, output rows (and biases) of o_proj and down_proj. A tied head is permuted once with the
  embedding and stays tied. Searched on all targeted hidden-reading layers together.

Scores: ``|W|``, or Wanda's ``|W_ij| * ||X_j||`` when input norms (from a dense calibration
pass, :func:`collect_input_norms`) are given - what :func:`sparsemerge.prune.api.prune_` uses
for calibrated methods (a diagonal stand-in for SparseGPT's Hessian-weighted error). Only
targeted layers with an N:M pattern enter a search; other layers are permuted consistently but
do not steer it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsemerge.errors import SparsemergeError
from sparsemerge.patterns import NM
from sparsemerge.prune.base import Target
from sparsemerge.prune.config import PruneConfig
from sparsemerge.prune.permutation_search import ScoreBlock, search_permutation

SCOPES = ("mlp", "attn", "hidden")
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")
MAX_ROWS = 16384  # rows the search looks at per channel space (seeded subsample beyond)
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


@dataclass
class SpaceRecord:
    space: str  # "model.layers.3.mlp", "model.layers.3.self_attn.v_head1", "hidden"
    size: int  # channels permuted
    layers: list[str]  # targeted layers whose scores steered the search
    kept_before: float
    kept_after: float
    swaps: int
    iterations: int
    start: str

    @property
    def gain(self) -> float:
        return self.kept_after / self.kept_before - 1.0 if self.kept_before > 0 else 0.0


@dataclass
class PermutationReport:
    score: str  # "magnitude" (|W|) or "wanda" (|W| * ||X_j||)
    spaces: list[SpaceRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def kept_before(self) -> float:
        return sum(s.kept_before for s in self.spaces)

    @property
    def kept_after(self) -> float:
        return sum(s.kept_after for s in self.spaces)

    @property
    def gain(self) -> float:
        """Relative increase of the N:M-kept score over all searched spaces."""
        return self.kept_after / self.kept_before - 1.0 if self.kept_before > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "kept_before": round(self.kept_before, 6),
            "kept_after": round(self.kept_after, 6),
            "gain": round(self.gain, 6),
            "permuted": sum(1 for s in self.spaces if s.swaps),
            "seconds": round(self.seconds, 3),
            "spaces": [{**asdict(s), "gain": round(s.gain, 6)} for s in self.spaces],
            "skipped": [{"space": n, "reason": r} for n, r in self.skipped],
        }


@torch.no_grad()
def collect_input_norms(model: nn.Module, targets: list[Target], calibration: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """``||X_j||_2`` of every target's input feature over the calibration windows (one dense pass)."""
    from sparsemerge.prune.wanda import InputNorms

    stats = {t.name: InputNorms(t.weight.shape[1], t.weight.device) for t in targets}
    handles = [
        t.module.register_forward_pre_hook(lambda mod, args, s=stats[t.name]: s.add(args[0].reshape(-1, args[0].shape[-1])))
        for t in targets
    ]
    device = next(model.parameters()).device
    try:
        for batch in torch.split(calibration, batch_size):
            model(input_ids=batch.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return {name: s.norms for name, s in stats.items()}


def permute_channels_(
    model: nn.Module,
    config: Union[PruneConfig, dict[str, Any], None] = None,
    targets: Optional[list[Target]] = None,
    input_norms: Optional[dict[str, torch.Tensor]] = None,
    **options: Any,
) -> PermutationReport:
    """Permute ``model``'s channels in place (same function) so that each targeted layer's N:M
    mask keeps more score. ``config``: a PruneConfig (or its keys, also as keyword ``options``):
    pattern / layer_patterns / include / exclude choose the targets, ``permute_scope`` the
    spaces, ``permute_iters`` the swap rounds, ``seed`` the row subsample."""
    if config is None or isinstance(config, dict):
        config = PruneConfig(**{**(config or {}), **options})
    elif options:
        config = PruneConfig(**{**config.model_dump(), **options})
    start = time.perf_counter()
    core, lm_head = _check_architecture(model)
    if targets is None:
        from sparsemerge.prune.select import select_targets

        targets = select_targets(model, config)[0]
    by_module = {id(t.module): t for t in targets}
    norms = input_norms or {}
    report = PermutationReport(score="wanda" if norms else "magnitude")

    def block_of(linear: nn.Linear, slices: Optional[list[slice]] = None) -> Optional[tuple[str, ScoreBlock]]:
        """The score block of a targeted N:M layer (column ``slices`` stacked as rows, if given)."""
        t = by_module.get(id(linear))
        if t is None or not isinstance(t.pattern, NM):
            return None
        s = t.weight.detach().float().abs()
        if t.name in norms:
            s = s * norms[t.name].float().to(s.device).reshape(1, -1)
        if slices is not None:
            s = torch.cat([s[:, c] for c in slices], 0)
        return t.name, ScoreBlock(s.cpu(), t.pattern.n, t.pattern.m)

    def search(space: str, size: int, found: list) -> Optional[torch.Tensor]:
        found = [f for f in found if f is not None]
        if not found:
            report.skipped.append((space, "no targeted N:M layer reads these channels"))
            return None
        bad = sorted({f[1].m for f in found if size % f[1].m})
        if bad:
            report.skipped.append((space, f"{size} channels are not a multiple of M={bad}"))
            return None
        merged: dict[tuple[int, int], list[torch.Tensor]] = {}
        for _, b in found:  # one block per N:M: rows of layers with the same pattern concatenated
            merged.setdefault((b.n, b.m), []).append(b.scores)
        blocks = [ScoreBlock(torch.cat(v, 0), n, m) for (n, m), v in merged.items()]
        r = search_permutation(blocks, max_iters=config.permute_iters, max_rows=MAX_ROWS, seed=config.seed)
        report.spaces.append(SpaceRecord(space, size, [f[0] for f in found], r.before, r.after, r.swaps, r.iterations, r.start))
        return r.perm if r.swaps else None

    scopes = set(config.permute_scope)
    layers = core.layers
    plan: list[tuple[str, Any, torch.Tensor]] = []  # (kind, where, perm): searched first, applied after
    if "hidden" in scopes:
        hidden = core.embed_tokens.weight.shape[1]
        readers = [getattr(layer.self_attn, n) for layer in layers for n in _ATTN[:3]]
        readers += [getattr(layer.mlp, n) for layer in layers for n in _MLP[:2]] + [lm_head]
        perm = search("hidden", hidden, [block_of(m) for m in readers])
        if perm is not None:
            plan.append(("hidden", None, perm))
    prefix = _layers_prefix(model, layers)
    for i, layer in enumerate(tqdm(layers, desc="permute channels", disable=not config.progress)):
        if "mlp" in scopes:
            down = layer.mlp.down_proj
            perm = search(f"{prefix}.{i}.mlp", down.in_features, [block_of(down)])
            if perm is not None:
                plan.append(("mlp", layer, perm))
        if "attn" in scopes:
            attn = layer.self_attn
            head_dim, n_kv, n_heads = _heads(model, attn)
            group = n_heads // n_kv
            for h in range(n_kv):
                heads = [slice(q * head_dim, (q + 1) * head_dim) for q in range(h * group, (h + 1) * group)]
                perm = search(f"{prefix}.{i}.self_attn.v_head{h}", head_dim, [block_of(attn.o_proj, heads)])
                if perm is not None:
                    plan.append(("attn", (attn, h, head_dim, group), perm))
    with torch.no_grad():
        for kind, where, perm in plan:
            if kind == "hidden":
                _apply_hidden(core, lm_head, perm)
            elif kind == "mlp":
                _rows(where.mlp.gate_proj, perm)
                _rows(where.mlp.up_proj, perm)
                _cols(where.mlp.down_proj.weight, perm)
            else:
                attn, h, d, g = where
                _rows(attn.v_proj, h * d + perm, slice(h * d, (h + 1) * d))
                for q in range(h * g, (h + 1) * g):
                    _cols(attn.o_proj.weight, q * d + perm, slice(q * d, (q + 1) * d))
    report.seconds = time.perf_counter() - start
    return report


def _rows(linear: nn.Linear, index: torch.Tensor, where: slice = slice(None)) -> None:
    """Output rows ``where`` of ``linear`` (and its bias) become rows ``index``."""
    index = index.to(linear.weight.device)
    linear.weight[where] = linear.weight[index].clone()
    if linear.bias is not None:
        linear.bias[where] = linear.bias[index].clone()


def _cols(weight: torch.Tensor, index: torch.Tensor, where: slice = slice(None)) -> None:
    weight[:, where] = weight[:, index.to(weight.device)].clone()


def _apply_hidden(core: nn.Module, lm_head: nn.Linear, perm: torch.Tensor) -> None:
    done: set[int] = set()

    def cols(param: torch.Tensor) -> None:
        if id(param) not in done:  # a tied head shares the embedding's Parameter: permute once
            done.add(id(param))
            _cols(param, perm)

    cols(core.embed_tokens.weight)
    cols(lm_head.weight)
    for name, param in core.named_parameters():
        if param.dim() == 1 and name.endswith("norm.weight") and ".self_attn." not in name:
            param.copy_(param[perm.to(param.device)].clone())
    for layer in core.layers:
        for linear in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.mlp.gate_proj, layer.mlp.up_proj):
            cols(linear.weight)
        _rows(layer.self_attn.o_proj, perm)
        _rows(layer.mlp.down_proj, perm)


def _heads(model: nn.Module, attn: nn.Module) -> tuple[int, int, int]:
    cfg = model.config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(attn, "head_dim", None) or getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    if attn.v_proj.out_features != n_kv * head_dim or attn.o_proj.in_features != n_heads * head_dim or n_heads % n_kv:
        raise SparsemergeError(
            f"unexpected attention shapes (v_proj {attn.v_proj.out_features}, o_proj {attn.o_proj.in_features}) "
            f"for {n_heads} heads, {n_kv} KV heads of size {head_dim}; channel permutation refuses to guess"
        )
    return head_dim, n_kv, n_heads


def _layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    return next(name for name, module in model.named_modules() if module is layers)


def _check_architecture(model: nn.Module, hint: str = "run without --permute") -> tuple[nn.Module, nn.Linear]:
    """``(decoder core, lm_head)`` of a supported model; refuse anything holding a parameter
    this module would not permute (a permutation must keep the function exact). ``hint``: what
    the user can do instead (the caller's words)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    core = getattr(model, "model", None)
    lm_head = getattr(model, "lm_head", None)
    if model_type not in SUPPORTED or core is None or not isinstance(lm_head, nn.Linear):
        raise SparsemergeError(
            f"channel permutation supports {', '.join(SUPPORTED)} causal LMs (got model_type {model_type!r}); "
            + hint
        )
    if lm_head.bias is not None:
        raise SparsemergeError(f"channel permutation does not handle an lm_head bias; {hint}")
    if any(hasattr(layer, "stitch_adapter") for layer in core.layers):  # maps the residual stream: not permuted here
        raise SparsemergeError(f"channel permutation does not handle a stitched model's seam adapters; {hint}")
    hidden = core.embed_tokens.weight.shape[1]
    allowed = {"embed_tokens.weight", "norm.weight"}
    for i, layer in enumerate(core.layers):
        for n in _ATTN:
            allowed |= {f"layers.{i}.self_attn.{n}.weight", f"layers.{i}.self_attn.{n}.bias"}
        for n in _MLP:
            allowed |= {f"layers.{i}.mlp.{n}.weight", f"layers.{i}.mlp.{n}.bias"}
        allowed |= {f"layers.{i}.self_attn.q_norm.weight", f"layers.{i}.self_attn.k_norm.weight"}  # per head_dim
        for name, param in layer.named_parameters():
            if name.endswith("norm.weight") and "self_attn." not in name and param.shape == (hidden,):
                allowed.add(f"layers.{i}.{name}")
    unknown = [n for n, _ in core.named_parameters() if n not in allowed]
    if unknown:
        raise SparsemergeError(
            f"channel permutation does not know how to permute {unknown[:3]} of this {model_type} model; "
            + hint
        )
    return core, lm_head
