"""Gradient-aware scores from the language-model loss on calibration text.

* ``gradient``: ``|W| + gamma * c * |dL/dW|`` (the score of chapter 10.1.7's dynamic sparse
  reallocation, computed once at prune time: small weights with large gradients survive; the
  reallocation itself, masks re-chosen inside the training loop, is the ``dynamic`` method of
  :mod:`sparsemerge.train.sparse_train`). ``c = mean|W| / mean|dL/dW|`` per layer makes
  ``gamma`` unitless - raw gradients of a trained model are ~100x smaller than its weights,
  so without ``c`` any gamma near 1 would reduce the score to plain magnitude.
* ``taylor``: first-order Taylor estimate of the loss change when a weight is removed,
  ``|W * dL/dW|`` (chapter 10.2.3, first term of the expansion; Molchanov et al. 2019).

``dL/dW`` is the mean gradient over the calibration windows (mean token cross-entropy).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsemerge.errors import SparsemergeError
from sparsemerge.prune.base import METHODS, ScoreMethod, Target
from sparsemerge.prune.config import PruneConfig


def calibration_gradients(
    model: nn.Module, targets: list[Target], calibration: torch.Tensor, batch_size: int = 1, progress: bool = True
) -> dict[str, torch.Tensor]:
    """Mean gradient of the LM loss w.r.t. each target weight over the calibration windows."""
    if calibration is None:
        raise SparsemergeError("gradient-based scores need calibration data (--calib)")
    target_params = {id(t.weight) for t in targets}
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    for param in model.parameters():
        param.requires_grad_(id(param) in target_params)
        param.grad = None
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    try:
        batches = list(torch.split(calibration, batch_size))
        for batch in tqdm(batches, desc="gradients", disable=not progress, leave=False):
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            (loss * batch.shape[0] / calibration.shape[0]).backward()
        grads = {}
        for t in targets:
            if t.weight.grad is None:
                raise SparsemergeError(f"layer {t.name} received no gradient; is it used by the forward pass?")
            grads[t.name] = t.weight.grad.detach().clone()
    finally:
        for name, param in model.named_parameters():
            param.grad = None
            param.requires_grad_(saved[name])
        model.train(was_training)
    return grads


@METHODS.register("gradient")
class GradientAware(ScoreMethod):
    name = "gradient"
    needs_calibration = True

    def scores(
        self, model: nn.Module, targets: list[Target], config: PruneConfig, calibration: Optional[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        grads = calibration_gradients(model, targets, calibration, progress=config.progress)
        out = {}
        for t in targets:
            weight = t.weight.detach().abs()
            grad = grads[t.name].abs()
            scale = weight.mean() / grad.mean().clamp_min(torch.finfo(grad.dtype).tiny)
            out[t.name] = weight + config.gamma * scale * grad
        return out


@METHODS.register("taylor")
class Taylor(ScoreMethod):
    name = "taylor"
    needs_calibration = True

    def scores(
        self, model: nn.Module, targets: list[Target], config: PruneConfig, calibration: Optional[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        grads = calibration_gradients(model, targets, calibration, progress=config.progress)
        return {t.name: (t.weight.detach() * grads[t.name]).abs() for t in targets}
