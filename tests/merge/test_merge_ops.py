"""Merge building blocks and methods on small tensors: the chapter's exercises, hand-worked
cases and properties (hypothesis)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemerge.errors import SparsemergeError
from sparsemerge.merge import list_methods, merge_state_dicts, merge_tensors, ops
from sparsemerge.merge.lora import low_rank_factors
from sparsemerge.merge.slerp import slerp

BASE = torch.tensor([1.0, 2.0, 3.0])
THETA_A = torch.tensor([1.2, 2.1, 2.8])
THETA_B = torch.tensor([0.9, 2.3, 3.1])


def test_exercise_3_task_arithmetic():
    """Chapter 10 exercise 3: tau_A = [0.2, 0.1, -0.2], tau_B = [-0.1, 0.3, 0.1]; base + 0.5 (tau_A + tau_B)."""
    tau_a, tau_b = ops.task_vector(THETA_A, BASE), ops.task_vector(THETA_B, BASE)
    assert torch.allclose(tau_a, torch.tensor([0.2, 0.1, -0.2]), atol=1e-6)
    assert torch.allclose(tau_b, torch.tensor([-0.1, 0.3, 0.1]), atol=1e-6)
    expected = torch.tensor([1.05, 2.2, 2.95])
    assert torch.allclose(ops.apply_task_vectors(BASE, [tau_a, tau_b], 0.5), expected, atol=1e-6)
    merged = merge_tensors("task_arithmetic", [THETA_A, THETA_B], base=BASE, weights=[0.5, 0.5])
    assert torch.allclose(merged, expected, atol=1e-6)
    # the same through a lambda instead of weights
    merged = merge_tensors("task_arithmetic", [THETA_A, THETA_B], base=BASE, weights=[1, 1], **{"lambda": 0.5})
    assert torch.allclose(merged, expected, atol=1e-6)


@pytest.mark.parametrize("consensus", ["sum", "count"])
@pytest.mark.parametrize("divide", ["weights", "count"])
def test_exercise_6_ties_elects_plus_and_averages(consensus, divide):
    """Chapter 10 exercise 6: tau = +0.5, -0.3, +0.2 -> elected +, disjoint mean (0.5 + 0.2) / 2 = 0.35."""
    taus = torch.tensor([[0.5], [-0.3], [0.2]])
    elected = ops.elect_sign(taus, consensus)
    assert elected.item() == 1
    mask = ops.agreement_mask(taus, elected)
    assert mask.flatten().tolist() == [1, 0, 1]
    mean = ops.disjoint_mean(taus, torch.ones(3, 1), mask, divide)
    assert mean.item() == pytest.approx(0.35)
    base = torch.zeros(1)
    merged = merge_tensors("ties", [base + t for t in taus], base=base, weights=[1, 1, 1], consensus=consensus, divide=divide)
    assert merged.item() == pytest.approx(0.35)


def test_exercise_6_with_50_percent_trim():
    """"If a 50 % trim is applied first": per task vector over a layer, the small entries go."""
    base = torch.zeros(4)
    t1 = torch.tensor([0.5, 0.01, 0.0, 0.0])
    t2 = torch.tensor([-0.3, 0.02, 0.0, 0.0])
    t3 = torch.tensor([0.2, 0.03, 0.0, 0.0])
    merged = merge_tensors("ties", [t1, t2, t3], base=base, weights=[1, 1, 1], model_params=[{"density": 0.5}] * 3)
    assert merged[0].item() == pytest.approx(0.35)
    trimmed = ops.magnitude_trim(torch.tensor([0.5, -0.3, 0.2, 0.1]), 0.5)
    assert trimmed.tolist() == pytest.approx([0.5, -0.3, 0.0, 0.0])


def test_ties_mass_vs_count_election_differ():
    """Mass election (TIES paper, mergekit) and the chapter's vote of signs can disagree."""
    taus = torch.tensor([[-0.9], [0.1], [0.2]])
    assert ops.elect_sign(taus, "sum").item() == -1
    assert ops.elect_sign(taus, "count").item() == 1


def test_weighted_ties_divides_by_agreeing_weights():
    base = torch.zeros(1)
    xs = [torch.tensor([0.4]), torch.tensor([0.2]), torch.tensor([-0.1])]
    merged = merge_tensors("ties", xs, base=base, weights=[1.0, 3.0, 1.0])
    assert merged.item() == pytest.approx((0.4 + 3 * 0.2) / 4)
    paper = merge_tensors("ties", xs, base=base, weights=[1.0, 3.0, 1.0], divide="count")
    assert paper.item() == pytest.approx((0.4 + 3 * 0.2) / 2)


def test_dare_rescale_modes():
    gen = torch.Generator().manual_seed(0)
    tau = torch.randn(200, 200, generator=gen)
    l1 = ops.drop_and_rescale(tau, 0.3, "l1", torch.Generator().manual_seed(1))
    assert l1.abs().sum().item() == pytest.approx(tau.abs().sum().item(), rel=1e-4)
    inv = ops.drop_and_rescale(tau, 0.3, "inverse", torch.Generator().manual_seed(1))
    kept = inv != 0
    assert torch.allclose(inv[kept], tau[kept] / 0.3)
    assert kept.float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert ops.drop_and_rescale(tau, 1.0) is tau


def test_dare_expectation_is_the_task_vector():
    tau = torch.linspace(-1, 1, 50)
    runs = torch.stack([ops.drop_and_rescale(tau, 0.5, "inverse", torch.Generator().manual_seed(s)) for s in range(400)])
    assert torch.allclose(runs.mean(0), tau, atol=0.15)


def test_breadcrumbs_drops_outliers_and_small():
    tau = torch.arange(1, 101, dtype=torch.float32)
    out = ops.magnitude_outliers(tau, density=0.5, gamma=0.1)
    kept = out.nonzero().flatten() + 1
    assert kept.min().item() == 41 and kept.max().item() == 90 and kept.numel() == 50


def test_della_keeps_large_entries_more_often():
    tau = torch.arange(1, 201, dtype=torch.float32).repeat(50, 1)
    out = ops.della_magprune(tau, 0.5, 0.4, None, torch.Generator().manual_seed(0))
    kept = (out != 0).float().mean(0)
    assert kept[:20].mean() < 0.2 and kept[-20:].mean() > 0.8
    with pytest.raises(SparsemergeError, match="epsilon"):
        ops.della_magprune(tau, 0.5, 0.6)


def test_gram_schmidt_orthogonalizes_in_order():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([1.0, 1.0, 0.0])
    c = torch.tensor([1.0, 1.0, 1.0])
    oa, ob, oc = ops.gram_schmidt([a, b, c])
    assert torch.equal(oa, a)
    assert torch.allclose(ob, torch.tensor([0.0, 1.0, 0.0]))
    assert torch.allclose(oc, torch.tensor([0.0, 0.0, 1.0]))
    merged = merge_tensors("orthogonal", [a, b, c], base=torch.zeros(3))
    assert torch.allclose(merged, torch.ones(3))


def test_slerp_endpoints_and_unit_norm():
    a = torch.tensor([1.0, 0.0])
    b = torch.tensor([0.0, 1.0])
    assert torch.allclose(slerp(0.0, a, b), a)
    assert torch.allclose(slerp(1.0, a, b), b)
    mid = slerp(0.5, a, b)
    assert torch.allclose(mid, torch.tensor([math.sqrt(0.5)] * 2))
    # nearly collinear -> linear interpolation
    assert torch.allclose(slerp(0.25, a, 2 * a), 1.25 * a)
    assert torch.allclose(merge_tensors("slerp", [b], base=a, t=0.5), mid)


def test_model_stock_formula():
    base = torch.zeros(2)
    w1, w2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])  # orthogonal: cos = 0 -> t = 0 -> base
    assert torch.allclose(merge_tensors("model_stock", [w1, w2], base=base), base)
    w1, w2 = torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])  # identical: cos = 1 -> t = 1 -> mean
    assert torch.allclose(merge_tensors("model_stock", [w1, w2], base=base), w1)


def test_linear_soups():
    xs = [torch.tensor([1.0]), torch.tensor([2.0]), torch.tensor([6.0])]
    assert merge_tensors("model_soup", xs).item() == pytest.approx(3.0)
    assert merge_tensors("linear", xs, weights=[1, 1, 2]).item() == pytest.approx(15 / 4)
    assert merge_tensors("linear", xs, weights=[1, 1, 2], normalize=False).item() == pytest.approx(15.0)
    with pytest.raises(SparsemergeError, match="sum to zero"):
        merge_tensors("linear", xs[:2], weights=[1, -1])


def test_unknown_method_lists_known():
    with pytest.raises(SparsemergeError) as info:
        merge_tensors("frankenmerge", [BASE])
    for name in ("ties", "dare_ties", "slerp", "model_stock", "della", "breadcrumbs", "orthogonal", "passthrough"):
        assert name in str(info.value)
    assert set(list_methods()) >= {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp", "model_stock"}


def test_mismatched_shapes_and_missing_parameters():
    with pytest.raises(SparsemergeError, match="equal shapes"):
        merge_tensors("ties", [torch.zeros(3), torch.zeros(4)], base=torch.zeros(3))
    with pytest.raises(SparsemergeError, match="base"):
        merge_tensors("ties", [torch.zeros(3)])
    with pytest.raises(SparsemergeError, match="'t'"):
        merge_tensors("slerp", [torch.zeros(3)], base=torch.ones(3))
    with pytest.raises(SparsemergeError, match="does not take"):
        merge_tensors("ties", [torch.zeros(3)], base=torch.zeros(3), bogus=1)


def test_merge_state_dicts_keeps_keys_and_buffers():
    sd = [{"w": torch.randn(4, 4), "n": torch.tensor([3])} for _ in range(2)]
    base = {"w": torch.zeros(4, 4), "n": torch.tensor([3])}
    out = merge_state_dicts("task_arithmetic", sd, base=base, weights=[0.5, 0.5])
    assert torch.allclose(out["w"], (sd[0]["w"] + sd[1]["w"]) / 2)
    assert torch.equal(out["n"], base["n"])


def test_low_rank_factors_exact_for_low_rank():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(32, 3, generator=g) @ torch.randn(3, 24, generator=g)
    b, a, err = low_rank_factors(delta, 3)
    assert b.shape == (32, 3) and a.shape == (3, 24)
    assert torch.allclose(b @ a, delta, atol=1e-4) and err < 1e-5
    _, _, err1 = low_rank_factors(delta, 1)
    assert 0 < err1 < 1


# ---------------------------------------------------------------- properties

DTYPES = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])
SHAPES = st.sampled_from([(7,), (4, 8), (3, 5, 2), (16, 16)])
DET_METHODS = ["linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "model_stock", "orthogonal", "model_soup"]
STOCH_METHODS = ["dare_linear", "dare_ties", "della", "della_linear"]


@settings(max_examples=25, deadline=None)
@given(shape=SHAPES, dtype=DTYPES, method=st.sampled_from(DET_METHODS + STOCH_METHODS), seed=st.integers(0, 2**16))
def test_merge_keeps_shape_and_dtype(shape, dtype, method, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    xs = [(base.float() + 0.1 * torch.randn(shape, generator=g)).to(dtype) for _ in range(3)]
    params = {"epsilon": 0.1} if method.startswith("della") else {}
    out = merge_tensors(method, xs, base=base, weights=[0.3, 0.5, 0.2], model_params=[{"density": 0.5, **params}] * 3 if method not in ("linear", "model_soup", "model_stock", "orthogonal", "task_arithmetic") else None)
    assert out.shape == base.shape and out.dtype == dtype
    assert torch.isfinite(out.float()).all()


@settings(max_examples=25, deadline=None)
@given(numel=st.integers(10, 400), density=st.floats(0.05, 0.95), seed=st.integers(0, 2**16))
def test_trim_honours_density(numel, density, seed):
    tau = torch.randn(numel, generator=torch.Generator().manual_seed(seed))
    out = ops.magnitude_trim(tau, density)
    assert int((out != 0).sum()) == max(1, int(density * numel))
    kept = out != 0
    if (~kept).any():
        assert tau[kept].abs().min() >= tau[~kept].abs().max()


@settings(max_examples=20, deadline=None)
@given(density=st.floats(0.1, 0.9), seed=st.integers(0, 2**16))
def test_drop_honours_density_in_expectation(density, seed):
    tau = torch.randn(20000, generator=torch.Generator().manual_seed(seed))
    out = ops.drop_and_rescale(tau, density, "l1", torch.Generator().manual_seed(seed + 1))
    sd = math.sqrt(density * (1 - density) / tau.numel())
    assert abs((out != 0).float().mean().item() - density) < 6 * sd


@settings(max_examples=25, deadline=None)
@given(shape=SHAPES, lam=st.floats(0.1, 3.0), seed=st.integers(0, 2**16))
def test_negation_undoes_addition(shape, lam, seed):
    g = torch.Generator().manual_seed(seed)
    base, tuned = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    tau = ops.task_vector(tuned, base)
    added = ops.apply_task_vectors(base, [tau], lam)
    back = ops.apply_task_vectors(added, [ops.negate(tau)], lam)
    assert torch.allclose(back, base, atol=1e-5)
    added = merge_tensors("task_arithmetic", [tuned], base=base, weights=[lam])
    assert torch.allclose(added, base + lam * tau, atol=1e-5)
    back = merge_tensors("task_arithmetic", [tuned, tuned], base=base, weights=[lam, -lam])
    assert torch.allclose(back, base, atol=1e-5)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), k=st.integers(2, 4))
def test_ties_result_between_agreeing_values(seed, k):
    """With unit weights and no trim, every merged delta lies within the range of the agreeing deltas."""
    g = torch.Generator().manual_seed(seed)
    base = torch.zeros(64)
    xs = [torch.randn(64, generator=g) for _ in range(k)]
    out = merge_tensors("ties", xs, base=base, weights=[1.0] * k)
    stack = torch.stack(xs)
    assert (out <= stack.max(0).values + 1e-6).all() and (out >= stack.min(0).values - 1e-6).all()


def _trim_by_argsort(tensor, density):
    k = max(1, int(density * tensor.numel()))
    mask = torch.zeros(tensor.numel())
    mask[torch.argsort(tensor.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return tensor * mask.reshape_as(tensor)


def _outliers_by_sort(tensor, density, gamma):
    n = tensor.numel()
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    mask = torch.zeros(n)
    mask[torch.sort(tensor.abs().reshape(-1).float()).indices[bottom : bottom + target]] = 1
    return tensor * mask.reshape_as(tensor)


@settings(max_examples=60, deadline=None)
@given(numel=st.integers(1, 300), density=st.floats(0.01, 0.99), gamma=st.floats(0.0, 0.2),
       levels=st.integers(1, 6), zeros=st.floats(0, 0.9), seed=st.integers(0, 2**16))
def test_selection_without_full_sort_equals_sorting(numel, density, gamma, levels, zeros, seed):
    """The O(n) kthvalue selection gives exactly the sort-based result, ties and zeros included."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-levels, levels + 1, (numel,), generator=g).float() * (torch.rand(numel, generator=g) >= zeros)
    if seed % 2:
        x = x + 0.001 * torch.randn(numel, generator=g)  # mostly distinct values
    assert torch.equal(ops.magnitude_trim(x, density), _trim_by_argsort(x, density))
    assert torch.equal(ops.magnitude_outliers(x, density, gamma), _outliers_by_sort(x, density, gamma))


@pytest.mark.parametrize("shape", [(7, 50), (3, 5, 2)])
def test_della_ranks_by_scatter_equal_the_double_argsort(shape):
    """della_magprune ranks entries with one argsort and a scatter; the textbook double argsort
    (mergekit's) must give the same probabilities, hence the same draws for one seed."""
    tau = torch.randn(*shape)
    out = ops.della_magprune(tau, 0.5, 0.1, rescale=None, generator=torch.Generator().manual_seed(3))
    ranks = torch.argsort(torch.argsort(tau.abs(), dim=1), dim=1).float() + 1
    lo, hi = ranks.min(1, keepdim=True).values, ranks.max(1, keepdim=True).values
    probs = 0.4 + (ranks - lo) / (hi - lo) * 0.2
    mask = (torch.rand(probs.shape, generator=torch.Generator().manual_seed(3)) < probs).float()
    assert torch.equal(out, tau * mask)


def test_drop_mask_keeps_the_density_in_law():
    tau = torch.ones(400_000)
    out = ops.drop_and_rescale(tau, 0.3, rescale=None, generator=torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    assert abs(float(out.mean()) - 0.3) < 0.003  # 4 sigma of a Binomial(400k, 0.3) share


def test_radix_row_ranks_equal_a_stable_argsort():
    from sparsemerge.merge.rowrank import row_ranks

    gen = torch.Generator().manual_seed(0)
    cases = [
        torch.randn(40, 576, generator=gen).abs(),
        torch.randn(3, 1000, generator=gen).abs().to(torch.bfloat16).float(),  # many ties
        torch.zeros(2, 7),  # all equal: every byte pass is skipped
        torch.tensor([[0.0, float("inf"), 1.5, float("nan"), 1e-40]]),  # subnormal, inf, NaN last
        torch.rand(5, 1, generator=gen),
    ]
    for x in cases:
        order = torch.argsort(x, dim=1, stable=True)
        expect = torch.empty_like(order).scatter_(1, order, torch.arange(x.shape[1]).expand_as(order))
        assert torch.equal(row_ranks(x).long(), expect)
    with pytest.raises(ValueError, match="2-D CPU"):
        row_ranks(torch.zeros(2, 3, 4))
