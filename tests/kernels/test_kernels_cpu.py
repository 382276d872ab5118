"""CPU kernels against the pure-torch reference and the dense masked weight."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsemerge.errors import SparsemergeError
from sparsemerge.kernels.cpu import cpu_matmul
from sparsemerge.kernels.layout import decode_24_meta, encode_24_meta, kept_positions, pack_blocked, to_dense
from sparsemerge.kernels.reference import reference_matmul
from sparsemerge.masks import nm_mask


def nm_weight(rows: int, cols: int, n: int, m: int, seed: int = 0, extra_zeros: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g)
    w = w * nm_mask(w.abs(), n, m)
    if extra_zeros:  # groups with fewer than n nonzeros must still decode exactly
        w = w * (torch.rand(rows, cols, generator=g) >= extra_zeros)
    return w


def tol(codec: str) -> float:
    return 2e-4 if codec == "none" else 5e-4


# odd shapes: rows not a multiple of the 64-row block, groups not a multiple of 8
SHAPES = [(1, 4), (63, 36), (65, 100), (130, 8)]


@pytest.mark.parametrize("rows,cols", SHAPES)
@pytest.mark.parametrize("codec,value_dtype,group_size", [
    ("none", "float32", None), ("none", "bfloat16", None), ("none", "float16", None),
    ("int8", "float32", None), ("int8", "float32", 8), ("int4", "float32", None), ("int4", "float32", 6),
])
@pytest.mark.parametrize("batch", [1, 5])
@pytest.mark.parametrize("parallel", [False, True])
def test_24_paths_match_reference_and_dense(rows, cols, codec, value_dtype, group_size, batch, parallel, monkeypatch):
    import sparsemerge.kernels.cpu_blocked as cpu  # the numba kernels read the threshold there

    monkeypatch.setattr(cpu, "PARALLEL_MIN_BYTES", 0 if parallel else 1 << 60)
    w = nm_weight(rows, cols, 2, 4, seed=rows + cols, extra_zeros=0.1)
    layer = pack_blocked(w, 2, 4, codec, group_size, value_dtype)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(1))
    ref = reference_matmul(layer, x)
    dense = x @ to_dense(layer).T
    torch.testing.assert_close(ref, dense, atol=tol(codec), rtol=1e-4)
    for path in (["gemv24", "gemm24", "general"] if batch == 1 else ["gemm24", "general"]):
        out = cpu_matmul(layer, x, path=path)
        assert out.shape == (batch, rows)
        torch.testing.assert_close(out, ref, atol=tol(codec), rtol=1e-4)
    if codec == "none" and value_dtype == "float32":
        torch.testing.assert_close(to_dense(layer), w)  # exact round trip


@pytest.mark.parametrize("n,m", [(1, 4), (4, 8), (3, 8), (1, 2)])
@pytest.mark.parametrize("codec,group_size", [("none", None), ("int8", None), ("int4", None), ("int8", 12)])
@pytest.mark.parametrize("batch", [1, 3])
def test_general_nm_matches_reference(n, m, codec, group_size, batch, monkeypatch):
    import sparsemerge.kernels.cpu_blocked as cpu  # the numba kernels read the threshold there

    monkeypatch.setattr(cpu, "PARALLEL_MIN_BYTES", 0 if batch == 3 else 1 << 60)
    if group_size is not None and group_size % n:
        group_size = n * 4
    w = nm_weight(70, 8 * m, n, m, seed=n * m)
    layer = pack_blocked(w, n, m, codec, group_size)
    x = torch.randn(batch, 8 * m)
    torch.testing.assert_close(cpu_matmul(layer, x), reference_matmul(layer, x), atol=tol(codec), rtol=1e-4)
    torch.testing.assert_close(reference_matmul(layer, x), x @ to_dense(layer).T, atol=tol(codec), rtol=1e-4)


def test_quantization_error_is_bounded_by_half_a_step():
    w = nm_weight(64, 64, 2, 4, seed=3)
    for codec, qmax in (("int8", 127), ("int4", 7)):
        layer = pack_blocked(w, 2, 4, codec)
        step = w.abs().amax(1, keepdim=True) / qmax  # per-channel scale
        assert ((to_dense(layer) - w).abs() <= step / 2 + 1e-6).all()
        assert (to_dense(layer)[w == 0] == 0).all()  # pruned weights stay exactly zero


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)).filter(lambda p: p[0] != p[1]), min_size=1, max_size=20))
def test_meta_round_trip(pairs):
    pos = torch.tensor([sorted(p) for p in pairs]).reshape(1, -1, 2)
    assert torch.equal(decode_24_meta(encode_24_meta(pos), pos.shape[1]), pos)


def test_kept_positions_rejects_dense_groups():
    w = torch.ones(2, 8)
    with pytest.raises(SparsemergeError, match="not 2:4 sparse"):
        kept_positions(w, 2, 4)
    assert kept_positions(torch.zeros(1, 4), 2, 4).tolist() == [[[0, 1]]]


def test_hand_worked_24_gemv():
    # row 0 keeps (w0, w2) = (1, 2), row 1 keeps (w1, w3) = (-1, 3); x = (1, 10, 100, 1000)
    w = torch.tensor([[1.0, 0, 2, 0], [0, -1, 0, 3]])
    layer = pack_blocked(w, 2, 4)
    x = torch.tensor([[1.0, 10, 100, 1000]])
    assert cpu_matmul(layer, x, path="gemv24").tolist() == [[201.0, 2990.0]]


@pytest.mark.parametrize("bad", [dict(codec="int9"), dict(group_size=3), dict(n=2, m=5), dict(value_dtype="float64")])
def test_bad_inputs_raise_clear_errors(bad):
    args = dict(n=2, m=4, codec="int8", group_size=None, value_dtype="float32")
    args.update(bad)
    w = torch.zeros(4, 12)
    with pytest.raises(SparsemergeError):
        pack_blocked(w, **args)
