"""Greedy soup (chapter 10.3.6; Wortsman et al. 2022, "Model soups", arXiv:2203.05482, Alg. 1).

Sort the candidates by their own held-out score, best first; start the soup with the best;
for each next candidate, keep it if the uniform average of the soup plus it scores at least
as well as the soup alone (``>=`` as in the paper, so equal scores admit it). The uniform and
weighted soups are the ``model_soup`` and ``linear`` methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from sparsemerge.errors import SparsemergeError

StateDict = Mapping[str, torch.Tensor]


@dataclass
class GreedySoupResult:
    state_dict: dict[str, torch.Tensor]
    chosen: list[int]  # indices into the candidates, in the order they joined
    score: float  # the soup's score
    individual: list[float]  # each candidate's own score
    history: list[tuple[int, float, bool]] = field(default_factory=list)  # (candidate, soup score with it, kept)


def uniform_average(models: Sequence[StateDict]) -> dict[str, torch.Tensor]:
    """``(1/K) sum_k theta_k`` over float tensors (accumulated in float32); others from the first."""
    out: dict[str, torch.Tensor] = {}
    for key, ref in models[0].items():
        if not ref.is_floating_point():
            out[key] = ref.clone()
            continue
        acc = torch.zeros_like(ref, dtype=torch.float64 if ref.dtype == torch.float64 else torch.float32)
        for m in models:
            acc += m[key].to(acc.dtype)
        out[key] = (acc / len(models)).to(ref.dtype)
    return out


def greedy_soup(
    candidates: Sequence[StateDict],
    evaluate: Callable[[dict[str, torch.Tensor]], float],
    higher_is_better: bool = False,
) -> GreedySoupResult:
    """Greedy soup of in-memory candidates; ``evaluate(state_dict)`` is the held-out metric
    (e.g. perplexity, lower is better; pass ``higher_is_better=True`` for accuracy)."""
    if not candidates:
        raise SparsemergeError("greedy_soup needs at least one candidate model")
    keys = set(candidates[0])
    for i, c in enumerate(candidates[1:], 1):
        if set(c) != keys:
            raise SparsemergeError(f"candidate {i} has different tensors than candidate 0: {sorted(keys ^ set(c))[:8]}")

    def better_or_equal(a: float, b: float) -> bool:
        return a >= b if higher_is_better else a <= b

    individual = [float(evaluate(dict(c))) for c in candidates]
    order = sorted(range(len(candidates)), key=lambda i: individual[i], reverse=higher_is_better)
    chosen = [order[0]]
    soup = dict(candidates[order[0]])
    score = individual[order[0]]
    history: list[tuple[int, float, bool]] = [(order[0], score, True)]
    for i in order[1:]:
        trial = uniform_average([candidates[j] for j in chosen + [i]])
        trial_score = float(evaluate(trial))
        kept = better_or_equal(trial_score, score)
        history.append((i, trial_score, kept))
        if kept:
            chosen.append(i)
            soup, score = trial, trial_score
    return GreedySoupResult({k: v.clone() for k, v in soup.items()}, chosen, score, individual, history)
