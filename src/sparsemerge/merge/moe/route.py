"""Routing report: which experts an MoE model sends each text's tokens to.

Forward hooks on every layer's router (``mlp.gate`` of transformers' Mixtral and Qwen2-MoE
blocks, which return ``(logits, top-k weights, top-k indices)``) record, per text, per layer
and per token, the ``top_k`` experts chosen and their weights. Summaries:

* ``share[e]`` = selections of expert ``e`` / (tokens x layers x top_k), over the whole text;
* ``layer_share[l, e]`` the same within layer ``l``;
* ``token_top1[t]`` = the expert most often ranked first for token ``t`` across the layers.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from sparsemerge.errors import SparsemergeError


@dataclass
class TextRouting:
    text: str
    tokens: list[str]
    counts: torch.Tensor  # [layers, experts] selections (top-k slots) per expert
    weights: torch.Tensor  # [layers, experts] summed routing weight per expert
    top1: torch.Tensor  # [layers, tokens] expert ranked first

    @property
    def share(self) -> torch.Tensor:
        """[experts]: share of all selections in the text."""
        total = self.counts.sum()
        return self.counts.sum(0).double() / max(float(total), 1.0)

    @property
    def layer_share(self) -> torch.Tensor:
        """[layers, experts]: share of selections per layer."""
        return self.counts.double() / self.counts.sum(1, keepdim=True).clamp(min=1)

    def token_top1(self, n_experts: int) -> list[int]:
        """The expert most often ranked first for each token across the layers (ties: lowest index)."""
        votes = torch.nn.functional.one_hot(self.top1, n_experts).sum(0)  # [tokens, experts]
        return votes.argmax(-1).tolist()


@dataclass
class RoutingReport:
    experts: list[str]
    top_k: int
    layers: int
    texts: list[TextRouting] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        n = len(self.experts)
        return {
            "experts": self.experts, "top_k": self.top_k, "layers": self.layers,
            "texts": [{"text": t.text, "tokens": len(t.tokens), "share": [round(float(s), 6) for s in t.share],
                       "layer_share": [[round(float(s), 6) for s in row] for row in t.layer_share],
                       "token_top1": [[tok, self.experts[e]] for tok, e in zip(t.tokens, t.token_top1(n))]}
                      for t in self.texts],
        }


def _routers(model: Any) -> list[Any]:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise SparsemergeError("the routing report needs a decoder model with model.layers")
    gates = [getattr(getattr(layer, "mlp", None), "gate", None) for layer in layers]
    if any(g is None or not hasattr(g, "top_k") for g in gates):
        raise SparsemergeError(
            f"{type(model).__name__} has no router (mlp.gate) in every layer; the routing report needs an MoE model "
            "such as the output of sparsemerge moe (Mixtral or Qwen2-MoE)"
        )
    return gates


def expert_labels(folder: Optional[Path], n: int) -> list[str]:
    """Names written by :func:`build_moe` (``sparsemerge_moe.json``), else ``expert0..``."""
    if folder is not None:
        from sparsemerge.merge.moe.build import MOE_RECORD

        record = Path(folder) / MOE_RECORD
        if record.is_file():
            names = json.loads(record.read_text()).get("expert_names")
            if isinstance(names, list) and len(names) == n:
                return [str(x) for x in names]
    return [f"expert{i}" for i in range(n)]


def route_texts(model: "Any | str | Path", texts: Sequence[str], tokenizer: Any = None,
                expert_names: Optional[list[str]] = None) -> RoutingReport:
    """Run each text through the MoE (one at a time, no padding) and record its routing."""
    folder: Optional[Path] = None
    if isinstance(model, (str, Path)):
        from sparsemerge.io import load_model

        loaded = load_model(model)
        folder = loaded.source.folder
        model, tokenizer = loaded.model, tokenizer or loaded.tokenizer
    if tokenizer is None:
        raise SparsemergeError("the routing report tokenizes the texts; the model has no tokenizer")
    if not texts:
        raise SparsemergeError("give at least one text to route (--text or --file)")
    gates = _routers(model)
    n_exp, top_k = int(gates[0].num_experts), int(gates[0].top_k)
    names = expert_names or expert_labels(folder, n_exp)
    if len(names) != n_exp:
        raise SparsemergeError(f"{len(names)} expert names for a model with {n_exp} experts")
    report = RoutingReport(names, top_k, len(gates))
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(_module: Any, _inp: Any, output: Any) -> None:
        _logits, weights, indices = output
        captured.append((weights.detach().float(), indices.detach()))

    handles = [g.register_forward_hook(hook) for g in gates]
    try:
        for text in texts:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            if ids.shape[1] == 0:
                raise SparsemergeError(f"text {text!r} has no tokens")
            captured.clear()
            with torch.no_grad():
                model(input_ids=ids)
            counts = torch.zeros(len(gates), n_exp, dtype=torch.long)
            weight_sum = torch.zeros(len(gates), n_exp, dtype=torch.float64)
            top1 = torch.empty(len(gates), ids.shape[1], dtype=torch.long)
            for layer, (w, idx) in enumerate(captured):  # idx, w: [tokens, top_k], best first
                counts[layer] = torch.bincount(idx.reshape(-1), minlength=n_exp)
                weight_sum[layer].index_add_(0, idx.reshape(-1), w.reshape(-1).double())
                top1[layer] = idx[:, 0]
            tokens = [tokenizer.decode([t]) for t in ids[0].tolist()]
            report.texts.append(TextRouting(text, tokens, counts, weight_sum, top1))
    finally:
        for h in handles:
            h.remove()
    return report


def format_routing(report: RoutingReport, per_layer: bool = False, tokens: bool = False, width: int = 40) -> str:
    """Tables: one row per text with each expert's share of the selections (%); with
    ``per_layer`` one row per layer for each text; with ``tokens`` each token's top expert."""
    from sparsemerge.eval.report import format_table

    def short(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[: width - 3] + "..."

    headers = ["text", "tokens", *report.experts, "top"]
    rows = []
    for t in report.texts:
        share = t.share
        rows.append([short(t.text), len(t.tokens), *(f"{100 * float(s):.1f}" for s in share), report.experts[int(share.argmax())]])
    parts = [f"share of expert selections (%), top-{report.top_k} of {len(report.experts)} experts over {report.layers} layers",
             format_table(headers, rows, align="lr" + "r" * len(report.experts) + "l")]
    for t in report.texts:
        if per_layer:
            lrows = [[layer, *(f"{100 * float(s):.1f}" for s in row)] for layer, row in enumerate(t.layer_share)]
            parts += ["", f"per layer: {short(t.text)}", format_table(["layer", *report.experts], lrows)]
        if tokens:
            best = t.token_top1(len(report.experts))
            parts += ["", f"tokens -> expert ranked first in most layers: {short(t.text)}",
                      " ".join(f"{tok!r}->{report.experts[e]}" for tok, e in zip(t.tokens, best))]
    return "\n".join(parts)
