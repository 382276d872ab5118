"""The introsort replay (merge/sortselect.py) selects exactly the entries torch's CPU sort puts
in a window of positions - ties included - which is what keeps TIES trim and breadcrumbs
bit-identical to mergekit's ``argsort``/``sort`` based selection."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsemerge.merge import ops
from sparsemerge.merge.sortselect import sort_window_mask

SIZES = [1, 2, 3, 15, 16, 17, 18, 33, 100, 1000, 100_000]
KINDS = ["bf16", "levels", "randn", "equal", "ascending", "descending", "zeros", "task_vector"]


def _data(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "bf16":  # |bf16 values|: heavy ties
        return torch.randn(n, generator=g).to(torch.bfloat16).abs().float()
    if kind == "levels":
        return torch.randint(0, 5, (n,), generator=g).float()
    if kind == "randn":
        return torch.randn(n, generator=g).abs()
    if kind == "equal":
        return torch.full((n,), 0.25)
    if kind == "ascending":
        return torch.sort(torch.randn(n, generator=g).to(torch.bfloat16).abs().float()).values
    if kind == "descending":
        return torch.sort(torch.randn(n, generator=g).to(torch.bfloat16).abs().float(), descending=True).values
    if kind == "zeros":
        x = torch.randn(n, generator=g).to(torch.bfloat16).abs().float()
        return x * (torch.rand(n, generator=g) < 0.5)
    if kind == "task_vector":  # (w + small noise on 60%) - w: float rounding makes many ties and zeros
        w = torch.randn(n, generator=g) * 0.02
        noise = torch.randn(n, generator=g) * 2e-4 * (torch.rand(n, generator=g) < 0.6)
        return ((w + noise) - w).abs()
    raise AssertionError(kind)


def _cuts(n: int, g: torch.Generator) -> list:
    fixed = [0, 1, 2, n // 3, n // 2, int(0.9 * n), n - 2, n - 1, n]
    return sorted({c for c in fixed + torch.randint(0, n + 1, (3,), generator=g).tolist() if 0 <= c <= n})


def _same_window(got: torch.Tensor, order: torch.Tensor, lo: int, hi: int) -> bool:
    """``got`` marks exactly ``order[lo:hi]`` (numpy: cheaper than small torch ops here)."""
    ref = np.zeros(order.numel(), dtype=np.bool_)
    ref[order.numpy()[lo:hi]] = True
    return got is not None and np.array_equal(got.numpy(), ref)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_top_k_equals_argsort(kind, n):
    for seed in range(3 if n <= 1000 else 1):
        g = torch.Generator().manual_seed(1000 * seed + n)
        w = _data(kind, n, g)
        order = torch.argsort(w, descending=True)
        for k in _cuts(n, g):
            assert _same_window(sort_window_mask(w, 0, k, descending=True), order, 0, k), (seed, k)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", SIZES)
def test_ascending_window_equals_sort(kind, n):
    for seed in range(3 if n <= 1000 else 1):
        g = torch.Generator().manual_seed(7 + 1000 * seed + n)
        w = _data(kind, n, g)
        order = torch.sort(w, descending=False).indices
        cuts = _cuts(n, g)
        for lo in cuts[:: 2 if n > 1000 else 1]:
            for hi in cuts:
                if hi >= lo:
                    got = sort_window_mask(w, lo, hi, descending=False)
                    assert _same_window(got, order, lo, hi), (seed, lo, hi)


@pytest.mark.parametrize("kind", ["bf16", "task_vector"])
def test_three_million_entries(kind):
    n = 3_000_000
    g = torch.Generator().manual_seed(3)
    w = _data(kind, n, g)
    order = torch.argsort(w, descending=True)
    for k in (1, n // 2, n - 1):
        assert _same_window(sort_window_mask(w, 0, k, descending=True), order, 0, k)
    lo, hi = int(0.39 * n), int(0.99 * n)  # breadcrumbs-like window
    order = torch.sort(w).indices
    assert _same_window(sort_window_mask(w, lo, hi, descending=False), order, lo, hi)


def test_nan_defers_to_a_real_sort():
    w = torch.tensor([1.0, float("nan"), 2.0] * 20)
    assert sort_window_mask(w, 0, 10, descending=True) is None
    x = torch.tensor([1.0, float("nan"), -2.0, 2.0] * 20)
    mask = torch.zeros(x.numel())
    mask[torch.argsort(x.abs(), descending=True)[: int(0.3 * x.numel())]] = 1
    torch.testing.assert_close(ops.magnitude_trim(x, 0.3), x * mask, rtol=0, atol=0, equal_nan=True)


def test_depth_limit_is_reported_and_ops_fall_back_to_a_real_sort(monkeypatch):
    from sparsemerge.merge import sortselect

    def replay(depth_limit):
        keys, idx = np.linspace(1.0, 0.0, 100, dtype=np.float32), np.arange(100, dtype=np.int32)
        return sortselect._replay_select(keys, idx, 0, 30, depth_limit)

    assert not replay(1)  # libstdc++ would heap-sort the segment holding the cut
    assert replay(-1) and replay(40)
    monkeypatch.setattr(sortselect, "sort_window_mask", lambda *args: None)
    x = torch.randn(3000, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).float()
    mask = torch.zeros(x.numel())
    mask[torch.argsort(x.abs(), descending=True)[:600]] = 1
    assert torch.equal(ops.magnitude_trim(x, 0.2), x * mask)


@pytest.mark.parametrize("density,gamma", [(0.1, 0.01), (0.5, 0.0), (0.9, 0.05)])
def test_ops_match_mergekit_selection_on_tie_heavy_task_vectors(density, gamma):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(64, 1500, generator=g) * 0.02
    tau = (base + torch.randn(64, 1500, generator=g) * 2e-4 * (torch.rand(64, 1500, generator=g) < 0.6)) - base
    flat = tau.abs().reshape(-1)
    n = flat.numel()
    k = max(1, int(density * n))
    mask = torch.zeros(n)
    mask[torch.argsort(flat, descending=True)[:k]] = 1
    assert torch.equal(ops.magnitude_trim(tau, density), tau * mask.reshape_as(tau))
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    mask = torch.zeros(n)
    mask[torch.sort(flat).indices[bottom : bottom + target]] = 1
    assert torch.equal(ops.magnitude_outliers(tau, density, gamma), tau * mask.reshape_as(tau))


@pytest.mark.parametrize("descending", [True, False])
@pytest.mark.parametrize("lo,hi", [(0, 600), (100, 900), (0, 1000), (0, 0), (999, 1000)])
def test_sort_window_bits_equals_the_mask(descending, lo, hi):
    """The packed-bits variant (row-blocked TIES) selects exactly what sort_window_mask and
    torch.sort select, ties included, and overwrites only the keys it was handed."""
    from sparsemerge.merge.sortselect import sort_window_bits

    g = torch.Generator().manual_seed(lo + hi)
    flat = (torch.randint(0, 12, (1000,), generator=g).float() / 4)  # many ties
    mask = sort_window_mask(flat, lo, hi, descending)
    keys = flat.numpy().copy()
    bits = sort_window_bits(keys, lo, hi, descending)
    got = np.unpackbits(bits, bitorder="little")[:1000].astype(bool)
    assert np.array_equal(got, mask.numpy())
    ref = torch.zeros(1000, dtype=torch.bool)
    ref[torch.sort(flat, descending=descending).indices[lo:hi]] = True
    assert np.array_equal(got, ref.numpy())
    nan = flat.numpy().copy()
    nan[3] = np.nan
    assert sort_window_bits(nan, 0, 10, descending) is None
    with pytest.raises(ValueError, match="writable 1-D float32"):
        sort_window_bits(flat.numpy().astype(np.float64), 0, 10, descending)
