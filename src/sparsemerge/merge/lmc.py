"""Linear mode connectivity (chapter 10.3.1): loss along the straight line between two models.

``theta(a) = (1 - a) theta_A + a theta_B`` for ``a`` on a grid of ``[0, 1]``; ``L(theta(a))`` is the
mean next-token cross-entropy on held-out windows (perplexity ``exp(L)``). If the loss stays
low along the whole segment, A and B are linearly mode-connected and averaging them (a soup,
10.3.6) is safe. The *barrier* measures the bump over the straight line between the end losses
(Frankle et al., 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis";
Entezari et al., 2022)::

    B(a) = L(theta(a)) - ((1 - a) L(theta_A) + a L(theta_B)),    barrier = max_a B(a)

Memory: one model (built from A) plus one tensor of A and of B at a time (read lazily); each
grid point rewrites the model's weights in place from the two sources.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from sparsemerge.errors import SparsemergeError


class LMCConfig(BaseModel):
    """Options of :func:`lmc_curve` (unknown keys are rejected)."""

    model_config = ConfigDict(extra="forbid")

    # each point is a full evaluation; past 1001 (a step of 0.001) a run would not end (or allocate the grid)
    grid: int = Field(11, ge=2, le=1001, description="number of evenly spaced points in [0, 1], ends included")
    data: str = "bbc"
    seqlen: int = Field(256, ge=2)
    max_windows: "int | None" = Field(None, ge=1)
    batch_size: int = Field(4, ge=1)
    progress: bool = True


@dataclass
class LMCPoint:
    alpha: float
    loss: float  # mean token NLL (nats)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@dataclass
class LMCResult:
    model_a: str
    model_b: str
    points: list[LMCPoint]
    windows: int
    seqlen: int
    data: str

    def linear_baseline(self, alpha: float) -> float:
        """``(1 - a) L(A) + a L(B)`` from the end points."""
        la, lb = self.points[0].loss, self.points[-1].loss
        return (1 - alpha) * la + alpha * lb

    def barrier_at(self, point: LMCPoint) -> float:
        return point.loss - self.linear_baseline(point.alpha)

    @property
    def barrier(self) -> float:
        """``max_a B(a)`` (0 at the ends; > 0 means a bump above the straight line)."""
        return max(self.barrier_at(p) for p in self.points)

    def to_json(self) -> dict[str, Any]:
        return {
            "model_a": self.model_a,
            "model_b": self.model_b,
            "data": self.data,
            "windows": self.windows,
            "seqlen": self.seqlen,
            "barrier": self.barrier,
            "points": [
                {"alpha": p.alpha, "loss": p.loss, "perplexity": p.perplexity, "barrier": self.barrier_at(p)} for p in self.points
            ],
        }


def alpha_grid(n: int) -> list[float]:
    """``n`` evenly spaced points of [0, 1], ends included."""
    if n < 2:
        raise SparsemergeError(f"the grid needs at least 2 points (both ends), got {n}")
    return [i / (n - 1) for i in range(n)]


def interpolate(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) a + alpha b`` computed in float32 (or wider), returned in ``a``'s dtype."""
    if a.shape != b.shape:
        raise SparsemergeError(f"cannot interpolate tensors of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    work = torch.promote_types(a.dtype, torch.float32)
    return ((1 - alpha) * a.to(work) + alpha * b.to(work)).to(a.dtype)


def _check_compatible(model: Any, src_a: Any, src_b: Any, label_a: str, label_b: str) -> list[str]:
    """Parameter names of ``model`` to set from the sources; clear error on missing / mismatched tensors."""
    names, problems = [], []
    for name, tensor in model.state_dict().items():
        in_a, in_b = name in src_a, name in src_b
        if not in_a and not in_b:
            continue  # tied (lm_head) or a non-persistent buffer: follows its owner
        if in_a != in_b:
            problems.append(f"{name}: only in {label_a if in_a else label_b}")
            continue
        shape_a, shape_b = tuple(src_a.shape(name)), tuple(src_b.shape(name))
        if shape_a != shape_b or shape_a != tuple(tensor.shape):
            problems.append(f"{name}: {label_a} {shape_a} vs {label_b} {shape_b}")
            continue
        names.append(name)
    if problems:
        raise SparsemergeError(
            "models A and B differ, so they cannot be interpolated:\n  " + "\n  ".join(problems[:20])
            + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        )
    return names


@torch.no_grad()
def set_interpolated_(model: Any, src_a: Any, src_b: Any, names: Sequence[str], alpha: float) -> None:
    """Write ``(1 - alpha) A + alpha B`` into ``model``'s tensors, one tensor at a time."""
    state = model.state_dict()
    for name in names:
        state[name].copy_(interpolate(src_a.get(name).float(), src_b.get(name).float(), alpha))


def lmc_curve(
    model_a: "str | os.PathLike[str]",
    model_b: "str | os.PathLike[str]",
    config: "LMCConfig | None" = None,
    windows: "torch.Tensor | None" = None,
) -> LMCResult:
    """Loss and perplexity of ``(1 - a) A + a B`` for ``a`` in ``alpha_grid(config.grid)``.

    ``windows``: ``(n, seqlen)`` token ids; by default the held-out windows of ``config.data``
    tokenized with A's tokenizer.
    """
    from sparsemerge.eval.data import eval_windows
    from sparsemerge.eval.perplexity import perplexity
    from sparsemerge.io import load_model, open_tensor_source

    config = config or LMCConfig()
    loaded = load_model(model_a)
    if windows is None:
        windows = eval_windows(loaded.tokenizer, config.data, config.seqlen, config.max_windows)
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise SparsemergeError(f"windows must be (n, seqlen >= 2) token ids, got shape {tuple(windows.shape)}")
    vocab = loaded.model.get_input_embeddings().weight.shape[0]
    if int(windows.max()) >= vocab:
        raise SparsemergeError(f"token id {int(windows.max())} is outside model A's vocabulary of {vocab}")
    with open_tensor_source(model_a) as src_a, open_tensor_source(model_b) as src_b:
        names = _check_compatible(loaded.model, src_a, src_b, str(model_a), str(model_b))
        points = []
        grid = alpha_grid(config.grid)
        bar = tqdm(grid, desc="lmc", disable=not config.progress)
        for alpha in bar:
            set_interpolated_(loaded.model, src_a, src_b, names, alpha)
            ppl = perplexity(loaded.model, windows, batch_size=config.batch_size, progress=False)
            points.append(LMCPoint(alpha, math.log(ppl)))
            bar.set_postfix(alpha=f"{alpha:.2f}", ppl=f"{ppl:.2f}")
        bar.close()
    return LMCResult(str(model_a), str(model_b), points, int(windows.shape[0]), int(windows.shape[1]), config.data)


# The plot lives with the other reports; re-exported here, where it always was.
from sparsemerge.eval.report import plot_lmc  # noqa: E402,F401
