"""Every pruning method works with a hierarchical N:M pattern (chapter 10.2.5): the score
methods through masks.mask_for, Wanda through wanda_mask, SparseGPT with the mask chosen
up front from its saliency and the OBS update reconstructing around it."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from sparsemerge.masks import check_pattern, hier_mask
from sparsemerge.prune import PruneConfig
from sparsemerge.prune.api import prune_
from sparsemerge.prune.select import select_targets
from sparsemerge.prune.sparsegpt import sparsegpt_prune
from sparsemerge.prune.wanda import wanda_mask

PATTERN = "hier:1:2@8x16/2:4"


@pytest.mark.parametrize("method", ["magnitude", "gradient", "taylor", "wanda", "sparsegpt"])
def test_every_method_prunes_to_the_hierarchical_pattern(method):
    model = make_tiny_llama()
    calib = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    config = {"pattern": PATTERN, "method": method, "progress": False, "nsamples": 2, "seqlen": 16}
    report = prune_(model, config, calibration=calib)
    assert report.sparsity == pytest.approx(0.75)
    for t in select_targets(model, PruneConfig(pattern=PATTERN))[0]:
        assert check_pattern(t.weight, PATTERN).ok, t.name


def test_wanda_mask_uses_the_activation_norms():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 64, generator=g)
    w[:, :16] *= 3.0  # by magnitude alone block 0 wins run 0
    norms = torch.ones(64)
    norms[16:32] = 100.0  # block 1's inputs dominate: it wins run 0 (blocks 0, 1) in every tile
    keep = wanda_mask(w.abs() * norms, PATTERN)
    assert torch.equal(keep, hier_mask(w.abs() * norms, PATTERN))
    assert not keep[:, :16].any() and keep[:, 16:32].sum(dim=1).eq(8).all()
    assert check_pattern(w * keep, PATTERN).ok
    assert not torch.equal(keep, hier_mask(w.abs(), PATTERN))  # the norms changed the choice


def test_sparsegpt_reconstructs_better_than_masking():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    x = torch.randn(256, 64, generator=g) @ torch.randn(64, 64, generator=g) * 0.3  # correlated inputs
    h = 2.0 / x.shape[0] * x.T @ x
    out = sparsegpt_prune(w, h, PATTERN, blocksize=32)
    assert check_pattern(out, PATTERN).ok
    mask = out != 0
    err = lambda v: float(((v - w) @ x.T).pow(2).sum())  # noqa: E731
    assert err(out) < 0.95 * err(w * mask)  # the OBS update beats zeroing with the same mask
    assert err(out) < 0.95 * err(w * hier_mask(w.abs(), PATTERN))  # and magnitude pruning
