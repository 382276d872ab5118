"""SparseGPT on single layers: reconstruction quality, a slow float64 reference, Cholesky fallback."""
from __future__ import annotations

import warnings

import pytest
import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.masks import check_pattern, mask_for
from sparsemerge.patterns import NM, Unstructured, parse_pattern
from sparsemerge.prune.sparsegpt import Hessian, inverse_hessian_factor, sparsegpt_prune
from sparsemerge.prune.wanda import InputNorms, wanda_mask, wanda_scores


def correlated_inputs(tokens: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated features and uneven scales, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(features, features, generator=g) / features**0.5
    scale = torch.exp(torch.randn(features, generator=g))
    return (torch.randn(tokens, features, generator=g) @ mix + 0.3 * torch.randn(tokens, features, generator=g)) * scale


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    stats = Hessian(x.shape[1])
    stats.add(x[: x.shape[0] // 2])
    stats.add(x[x.shape[0] // 2 :])
    return stats.value


def reference_sparsegpt(weight, hessian, pattern, dampening=0.01):
    """Column by column, no blocking, float64: explicit inverse-Hessian downdates (OBS)."""
    pattern = parse_pattern(pattern)
    W = weight.double().clone()
    H = hessian.double().clone()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += dampening * H.diagonal().mean() * torch.eye(H.shape[0], dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    cols = W.shape[1]
    prune = torch.zeros_like(W, dtype=torch.bool)
    if isinstance(pattern, Unstructured):  # one mask for the whole layer, chosen up front
        sal = W * W / torch.linalg.cholesky(Hinv, upper=True).diagonal() ** 2
        k = int(round(pattern.sparsity * W.numel()))
        prune.view(-1)[torch.topk(sal.flatten(), k, largest=False).indices] = True
    for j in range(cols):
        # Hinv restricted to columns j.. (the earlier ones are eliminated)
        if isinstance(pattern, NM) and j % pattern.m == 0:
            d = torch.linalg.cholesky(Hinv, upper=True).diagonal()[: pattern.m]
            sal = W[:, j : j + pattern.m] ** 2 / d**2
            drop = torch.topk(sal, pattern.m - pattern.n, dim=1, largest=False).indices
            prune[:, j : j + pattern.m].scatter_(1, drop, True)
        w = W[:, j]
        err = torch.where(prune[:, j], w, torch.zeros_like(w)) / Hinv[0, 0]
        W[:, j:] -= err.unsqueeze(1) * Hinv[0, :].unsqueeze(0)
        W[:, j][prune[:, j]] = 0.0
        Hinv = Hinv[1:, 1:] - Hinv[1:, :1] @ Hinv[:1, 1:] / Hinv[0, 0]
    return W


def recon_error(weight, pruned, x):
    return float(torch.linalg.norm(x @ weight.T - x @ pruned.T))


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "2:8", "unstructured:0.5", "unstructured:0.8", "block4:0.5"])
def test_reconstruction_beats_magnitude_and_wanda(pattern):
    torch.manual_seed(0)
    x = correlated_inputs(512, 64)
    weight = torch.randn(48, 64)
    pruned = sparsegpt_prune(weight, hessian_of(x), pattern, blocksize=32)
    assert check_pattern(pruned, pattern).ok
    magnitude = weight * mask_for(weight.abs(), pattern)
    norms = InputNorms(64)
    norms.add(x)
    wanda = weight * wanda_mask(wanda_scores(weight, norms.norms), pattern)
    err = recon_error(weight, pruned, x)
    assert err < recon_error(weight, magnitude, x)
    assert err < recon_error(weight, wanda, x)


@pytest.mark.parametrize("pattern,blocksize", [("2:4", 8), ("2:4", 128), ("1:4", 12), ("4:8", 16), ("unstructured:0.5", 64)])
def test_fast_agrees_with_slow_float64_reference(pattern, blocksize):
    x = correlated_inputs(400, 64, seed=3)
    weight = torch.randn(24, 64, generator=torch.Generator().manual_seed(4))
    H = hessian_of(x)
    fast = sparsegpt_prune(weight, H, pattern, blocksize=blocksize)
    slow = reference_sparsegpt(weight, H, pattern).float()
    assert torch.equal(fast == 0, slow == 0)
    torch.testing.assert_close(fast, slow, rtol=1e-3, atol=1e-3)


def test_blocking_does_not_change_n_m_result():
    x = correlated_inputs(300, 96, seed=5)
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(6))
    H = hessian_of(x)
    a = sparsegpt_prune(weight, H, "2:4", blocksize=4)
    b = sparsegpt_prune(weight, H, "2:4", blocksize=128)
    c = sparsegpt_prune(weight, H, "2:4", blocksize=30)  # rounded down to a multiple of M
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-4)


def test_dead_inputs_are_zeroed_without_nan():
    x = correlated_inputs(200, 16, seed=7)
    x[:, 3] = 0.0
    weight = torch.randn(8, 16)
    pruned = sparsegpt_prune(weight, hessian_of(x), "2:4")
    assert torch.isfinite(pruned).all()
    assert (pruned[:, 3] == 0).all()
    assert check_pattern(pruned, "2:4").ok


def test_hessian_is_two_over_n_xtx():
    x = torch.randn(10, 4, dtype=torch.float64).float()
    torch.testing.assert_close(hessian_of(x), 2.0 / 10 * x.T @ x)


def test_wide_hessian_from_half_blocks_is_symmetric_and_exact():
    from sparsemerge.prune.sparsegpt import SYMMETRIC_SPLIT_MIN, Hessian

    d = SYMMETRIC_SPLIT_MIN + 3  # odd width: unequal halves
    acc = Hessian(d)
    xs = [torch.randn(7, d), torch.randn(5, d)]
    for x in xs:
        acc.add(x)
    x = torch.cat(xs).double()
    h = acc.value
    assert torch.equal(h, h.T)
    torch.testing.assert_close(h.double(), 2.0 / 12 * x.T @ x, rtol=1e-5, atol=1e-4)


def test_cholesky_failure_raises_dampening_with_warning():
    H = torch.tensor([[1.0, 1.5], [1.5, 1.0]])  # indefinite: eigenvalues -0.5 and 2.5
    with pytest.warns(UserWarning, match="Cholesky failed") as record:
        upper, damp = inverse_hessian_factor(H, 0.01, "toy")
    assert len(record) == 2 and damp == pytest.approx(1.0)
    Hd = H + torch.eye(2)
    torch.testing.assert_close(upper.T @ upper, torch.linalg.inv(Hd))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(SparsemergeError, match="not positive definite"):
            inverse_hessian_factor(torch.tensor([[1.0, 3.0], [3.0, 1.0]]), 0.01, "toy")


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(SparsemergeError, match="expected \\(8, 8\\)"):
        sparsegpt_prune(torch.ones(2, 8), torch.eye(4), "2:4")
    with pytest.raises(SparsemergeError, match="one layer at a time"):
        sparsegpt_prune(torch.ones(2, 8), torch.eye(8), "unstructured-global:0.5")
    with pytest.raises(SparsemergeError, match="NaN"):
        sparsegpt_prune(torch.ones(2, 8), torch.full((8, 8), float("nan")), "2:4")
