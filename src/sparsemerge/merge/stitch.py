"""Model stitching with adapters (chapter 10.3.6; Lenc & Vedaldi, 2015, "Understanding image
representations by measuring their equivariance and equivalence"; Bansal et al., 2021,
"Revisiting Model Stitching"): a decoder built from blocks of two (or more) models, with a
linear adapter at each seam that maps the residual stream of the blocks before it into the
space the blocks after it were trained on.

A ``passthrough`` merge with ``slices`` lays the blocks end to end; a slice with ``adapter: true``
(or ``adapter: {ridge: ..., steps: ...}``) gets an adapter at its entry. With ``x`` the stitched
model's hidden state entering the seam and ``y`` the hidden state that the slice's own model
feeds its layer ``layer_range[0]`` on the same calibration tokens, the adapter
``T(x) = W x + b`` starts at the identity and is fitted in closed form by ridge regression
toward it (the seams in order, each seeing the adapters before it)::

    [W b] = argmin ||W X + b - Y||^2 + lam ||[W b] - [I 0]||^2,    lam = ridge * tr(X X^T) / d

then, optionally, ``steps`` of Adam on the stitched model's next-token loss with only the
adapters trainable. ``ridge`` large keeps the identity (plain passthrough).

Storage: the stitched model is an ordinary Hugging Face folder (the passthrough merge); the
adapters live in ``stitch/adapters.safetensors`` with ``stitch/stitch.json`` naming the layers
they enter. :func:`sparsemerge.io.load_model` (every sparsemerge command) installs them as a
forward pre-hook on those layers; transformers alone loads the plain passthrough model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from sparsemerge.errors import SparsemergeError

# the on-disk / in-model parts, re-exported here where the technique lives
from sparsemerge.io.stitched import (  # noqa: E402,F401
    ADAPTERS_FILE,
    STITCH_DIR,
    STITCH_JSON,
    SeamAdapter,
    decoder_layers,
    adapters_of,
    attach_adapter_,
    has_adapters,
    install_adapters_,
    refuse_adapters,
    save_adapters,
)


class AdapterOptions(BaseModel):
    """A slice's ``adapter:`` mapping (``adapter: true`` takes these defaults)."""

    model_config = ConfigDict(extra="forbid")

    ridge: float = Field(1e-3, ge=0, description="pull toward the identity, relative to tr(X X^T) / d")
    steps: int = Field(0, ge=0, description="Adam steps on the next-token loss after the closed-form fit")
    lr: float = Field(1e-4, gt=0)


class StitchCalibration(BaseModel):
    """The merge config's ``stitch:`` mapping: calibration text for the adapters."""

    model_config = ConfigDict(extra="forbid")

    data: str = "bbc"
    nsamples: int = Field(16, ge=1)
    seqlen: int = Field(128, ge=2)
    seed: int = 0
    batch_size: int = Field(4, ge=1)


@dataclass
class Seam:
    layer: int  # output layer the adapter feeds
    model: str  # the slice's model, whose own hidden states are the target
    source_layer: int  # its layer_range[0]
    options: AdapterOptions


class _Stop(Exception):
    pass


@torch.no_grad()
def layer_inputs(model: nn.Module, windows: torch.Tensor, layer: int, batch_size: int = 4) -> torch.Tensor:
    """``(tokens, hidden)``: the hidden states entering decoder layer ``layer`` (after any adapter
    already attached there is *not* applied: captured before the pre-hooks of that layer run)."""
    block = decoder_layers(model)[layer]
    captured: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = args[0] if args else kwargs["hidden_states"]
        captured.append(x.detach().float().reshape(-1, x.shape[-1]).cpu())
        raise _Stop

    # prepend: run before an adapter's own pre-hook on this layer
    handle = block.register_forward_pre_hook(grab, with_kwargs=True, prepend=True)
    device = next(model.parameters()).device
    try:
        for batch in torch.split(windows, batch_size):
            try:
                model(input_ids=batch.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return torch.cat(captured)


def fit_ridge(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, b)`` minimising ``||x W^T + b - y||^2 + lam ||[W b] - [I 0]||^2`` with
    ``lam = ridge * tr(x^T x) / d`` (rows of ``x``, ``y`` are tokens); float64 normal equations."""
    n, d = x.shape
    xa = torch.cat([x.double(), torch.ones(n, 1, dtype=torch.float64)], 1)  # (n, d+1)
    prior = torch.cat([torch.eye(d, dtype=torch.float64), torch.zeros(1, d, dtype=torch.float64)])  # [I 0]^T
    lam = ridge * float(x.double().square().sum()) / d
    gram = xa.T @ xa + lam * torch.eye(d + 1, dtype=torch.float64)
    if lam == 0:
        gram += 1e-9 * float(gram.diagonal().mean()) * torch.eye(d + 1, dtype=torch.float64)  # singular X: stay solvable
    sol = torch.linalg.solve(gram, xa.T @ y.double() + lam * prior)  # (d+1, d) = [W b]^T
    return sol[:d].T.float().contiguous(), sol[d].float().contiguous()


def find_seams(cfg: Any) -> list[Seam]:
    """The seams of a merge config: the entry of every slice after the first with ``adapter`` set."""
    seams, layer = [], 0
    for i, sl in enumerate(cfg.slices or []):
        adapter = getattr(sl, "adapter", None)
        if adapter not in (None, False):
            if i == 0:
                raise SparsemergeError("the first slice has no seam before it; put 'adapter' on a later slice")
            if len(sl.sources) != 1:
                raise SparsemergeError("a slice with an adapter takes one source (passthrough stitching)")
            options = adapter if isinstance(adapter, AdapterOptions) else AdapterOptions(**(adapter if isinstance(adapter, dict) else {}))
            seams.append(Seam(layer, sl.sources[0].model, sl.sources[0].layer_range[0], options))
        layer += sl.num_layers
    return seams


def fit_adapters(folder: Path, seams: list[Seam], calibration: StitchCalibration, progress: bool = False) -> dict[str, Any]:
    """Fit the adapters of ``seams`` for the stitched model in ``folder`` (already written) and
    save them to ``folder/stitch``; returns the record (also written as ``stitch.json``)."""
    from sparsemerge.eval.data import calibration_windows
    from sparsemerge.io import load_model

    stitched = load_model(folder)
    if stitched.tokenizer is None:
        raise SparsemergeError("fitting stitch adapters needs a tokenizer in the merged folder (tokenizer_source)")
    windows = calibration_windows(stitched.tokenizer, calibration.data, calibration.nsamples, calibration.seqlen, calibration.seed)
    hidden = stitched.model.get_input_embeddings().weight.shape[1]
    targets: dict[tuple[str, int], torch.Tensor] = {}
    for model_ref in dict.fromkeys(s.model for s in seams):  # one source model in memory at a time
        source = load_model(model_ref).model
        for s in seams:
            if s.model == model_ref:
                targets[(s.model, s.source_layer)] = layer_inputs(source, windows, s.source_layer, calibration.batch_size)
        del source
    records = []
    for s in seams:
        x = layer_inputs(stitched.model, windows, s.layer, calibration.batch_size)
        y = targets[(s.model, s.source_layer)]
        if x.shape != y.shape:
            raise SparsemergeError(f"seam at layer {s.layer}: hidden states {tuple(x.shape)} vs {tuple(y.shape)} of {s.model!r}")
        w, b = fit_ridge(x, y, s.options.ridge)
        adapter = SeamAdapter(hidden)
        with torch.no_grad():
            adapter.weight.copy_(w)
            adapter.bias.copy_(b)
        norm_y = float(y.norm())
        fitted = x @ w.T + b
        records.append({
            "layer": s.layer, "model": s.model, "source_layer": s.source_layer, **s.options.model_dump(),
            "relative_error_identity": round(float((x - y).norm()) / norm_y, 6),
            "relative_error_fitted": round(float((fitted - y).norm()) / norm_y, 6),
        })
        attach_adapter_(stitched.model, s.layer, adapter)
    tuning = None
    if any(s.options.steps for s in seams):
        before, after = tune_adapters_(stitched.model, windows, seams, calibration.batch_size, progress)
        tuning = {"loss_before": round(before, 6), "loss_after": round(after, 6)}
    record = {"hidden": hidden, "calibration": calibration.model_dump(), "seams": records, "tuning": tuning}
    save_adapters(stitched.model, folder, record)
    return record


def tune_adapters_(model: nn.Module, windows: torch.Tensor, seams: list[Seam], batch_size: int, progress: bool = False) -> tuple[float, float]:
    """Adam on the next-token loss of ``model`` with only the seams' adapters trainable (each its
    own ``steps`` and ``lr``; the longest sets the loop). Returns the mean loss before and after."""
    layers = decoder_layers(model)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    groups = []
    for s in seams:
        adapter = layers[s.layer].stitch_adapter
        tensors = [adapter.weight, adapter.bias]
        for t in tensors:
            t.requires_grad_(True)
        groups.append({"params": tensors, "lr": s.options.lr, "steps": s.options.steps})
    opt = torch.optim.Adam([{"params": g["params"], "lr": g["lr"]} for g in groups])
    batches = list(torch.split(windows, batch_size))
    device = next(model.parameters()).device

    def mean_loss() -> float:
        with torch.no_grad():
            return sum(float(model(input_ids=b.to(device), labels=b.to(device), use_cache=False).loss) for b in batches) / len(batches)

    before = mean_loss()
    steps = max(g["steps"] for g in groups)
    from tqdm.auto import tqdm

    try:
        for step in tqdm(range(steps), desc="stitch adapters", disable=not progress):
            for g, pg in zip(groups, opt.param_groups):
                pg["lr"] = g["lr"] if step < g["steps"] else 0.0
            batch = batches[step % len(batches)].to(device)
            opt.zero_grad()
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            if not math.isfinite(float(loss.detach())):
                raise SparsemergeError(f"stitch adapter training diverged at step {step} (loss {float(loss.detach())}); lower lr")
            loss.backward()
            opt.step()
    finally:
        for g in groups:
            for p in g["params"]:
                p.requires_grad_(False)
        for p in frozen:
            p.requires_grad_(True)
    return before, mean_loss()


def stitch_calibration(cfg: Any) -> StitchCalibration:
    raw = getattr(cfg, "stitch", None)
    return raw if isinstance(raw, StitchCalibration) else StitchCalibration(**(raw or {}))
