"""Round-trip properties of every format x codec (hypothesis): odd shapes, empty rows,
all-zero and fully dense tensors, through the storage fields (``fields``/``from_fields``)."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsemerge.errors import PatternViolation, SparsemergeError
from sparsemerge.formats import BSR, COO, CSR, Bitmask, CodecSpec, Dense, NMPacked, convert
from sparsemerge.formats.base import FORMATS
from sparsemerge.formats.nm_coding import entropy_row_bits
from sparsemerge.masks import nm_mask

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _rebuild(obj):
    """Through storage only: fields + params -> a new object."""
    fields = {k: v.clone() for k, v in obj.fields().items()}
    return type(obj).from_fields(obj.shape, obj.dtype, obj.params(), fields, "test tensor")


@st.composite
def sparse_tensors(draw, col_multiple: int = 1, max_rows: int = 9, max_cols: int = 21):
    rows = draw(st.integers(1, max_rows))
    cols = col_multiple * draw(st.integers(1, max(1, max_cols // col_multiple)))
    seed = draw(st.integers(0, 2**16))
    density = draw(st.sampled_from([0.0, 0.2, 0.5, 1.0]))
    dtype = draw(st.sampled_from(DTYPES))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen)
    x = x * (torch.rand(rows, cols, generator=gen) < density)
    if draw(st.booleans()) and rows > 1:
        x[draw(st.integers(0, rows - 1))] = 0  # an empty row
    return x.to(dtype)


@SETTINGS
@given(x=sparse_tensors(), fmt=st.sampled_from(["bitmask", "coo", "csr", "dense"]))
def test_general_formats_round_trip_exactly(x, fmt):
    obj = FORMATS.get(fmt).from_dense(x)
    obj.check(full=True)
    back = _rebuild(obj)
    back.check(full=True)
    assert back.to_dense().dtype == x.dtype
    assert torch.equal(back.to_dense(), x)
    assert obj.nbytes == sum(t.numel() * t.element_size() for t in obj.fields().values())


@SETTINGS
@given(x=sparse_tensors(col_multiple=4, max_rows=8, max_cols=24), block=st.sampled_from([1, 2, 4]))
def test_bsr_round_trips_and_keeps_only_nonzero_blocks(x, block):
    if x.shape[0] % block:
        x = x[: x.shape[0] - x.shape[0] % block] if x.shape[0] >= block else torch.zeros(block, x.shape[1], dtype=x.dtype)
    obj = BSR.from_dense(x, block=block)
    back = _rebuild(obj)
    assert torch.equal(back.to_dense(), x)
    blocks = x.reshape(x.shape[0] // block, block, -1, block).permute(0, 2, 1, 3)
    assert obj.indices.numel() == int((blocks != 0).any(-1).any(-1).sum())


@st.composite
def nm_tensors(draw):
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    x = draw(sparse_tensors(col_multiple=m, max_cols=4 * m))
    keep = nm_mask(x.float().abs(), n, m)
    return x * keep, n, m


@SETTINGS
@given(case=nm_tensors(), coding=st.sampled_from(["bits2", "index", "entropy"]))
def test_nm_round_trips_exactly_with_every_coding(case, coding):
    x, n, m = case
    obj = NMPacked.from_dense(x, n, m, coding)
    rows, cols = x.shape
    assert tuple(obj.values.shape) == (rows, cols * n // m)
    assert tuple(obj.positions().shape) == tuple(obj.values.shape) and obj.positions().dtype == torch.uint8
    back = _rebuild(obj)
    back.check(full=True)
    assert torch.equal(back.to_dense(), x)
    assert torch.equal(back.positions(), obj.positions())
    # the kept slots hold every nonzero; positions ascend within a group
    pos = obj.positions().reshape(-1, n).to(torch.int64)
    assert n == 1 or bool((pos[:, 1:] > pos[:, :-1]).all())
    dense_from_cols = torch.zeros(rows, cols, dtype=x.dtype).scatter(1, obj.column_indices(), obj.values)
    assert torch.equal(dense_from_cols, x)


@SETTINGS
@given(case=nm_tensors())
def test_entropy_metadata_is_within_one_bit_per_row_of_the_bound(case):
    x, n, m = case
    obj = NMPacked.from_dense(x, n, m, "entropy")
    rows, cols = x.shape
    groups = cols // m
    bound = groups * math.log2(math.comb(m, n))
    row_bits = entropy_row_bits(groups, math.comb(m, n))
    assert bound <= row_bits < bound + 1
    assert obj.metadata_stream().numel() == (rows * row_bits + 7) // 8


CODECS = [
    CodecSpec("int8", 0, True),
    CodecSpec("int8", 4, False),
    CodecSpec("int4", 3, True),
    CodecSpec("int4", 0, False),
    CodecSpec("codebook", k=4),
    CodecSpec("codebook", k=16),
]


@SETTINGS
@given(x=sparse_tensors(col_multiple=4), fmt=st.sampled_from(["nm", "bitmask", "coo", "csr", "dense"]), spec=st.sampled_from(CODECS))
def test_every_format_with_every_codec_round_trips_through_storage(x, fmt, spec):
    if fmt == "nm":
        x = x * nm_mask(x.float().abs(), 2, 4)
        obj = NMPacked.from_dense(x, 2, 4, "entropy")
    else:
        obj = FORMATS.get(fmt).from_dense(x)
    exact_values = obj.values.clone()
    obj.with_codec(spec)
    back = _rebuild(obj)
    assert back.codec is not None and back.codec.params() == obj.codec.params()
    decoded = back.values_float
    assert decoded.dtype == x.dtype and decoded.shape == exact_values.shape
    assert torch.equal(decoded, obj.values_float)  # storage is lossless for the codes
    dense = back.to_dense()
    assert torch.equal(dense[x == 0], torch.zeros_like(dense[x == 0]))  # zeros stay zero (sparsity kept)
    err = (decoded.float() - exact_values.float()).abs()
    if spec.kind != "codebook":
        q = back.codec
        bound = q.expanded_scale().reshape(err.shape) / 2 if err.numel() else err
        slack = 1e-6 + exact_values.float().abs() * (2.0**-7 if x.dtype != torch.float32 else 1e-6)
        assert bool((err <= bound * (1 + 1e-5) + slack).all())


def test_nm_rejects_a_tensor_that_violates_the_pattern():
    x = torch.tensor([[1.0, 2.0, 3.0, 0.0, 1.0, 0.0, 0.0, 0.0]])
    with pytest.raises(PatternViolation, match=r"1 of 2 groups hold more than 2 nonzeros.*row 0, columns 0..3"):
        NMPacked.from_dense(x, 2, 4)
    with pytest.raises(SparsemergeError, match="divisible by 4"):
        NMPacked.from_dense(torch.zeros(2, 6), 2, 4)


def test_nm_groups_with_fewer_nonzeros_use_the_lowest_free_slots():
    x = torch.tensor([[0.0, 0.0, 0.0, 5.0, 0.0, 0.0, 0.0, 0.0]])
    obj = NMPacked.from_dense(x, 2, 4, "bits2")
    assert obj.positions().tolist() == [[0, 3, 0, 1]]
    assert obj.values.tolist() == [[0.0, 5.0, 0.0, 0.0]]


def test_convert_goes_through_the_coo_hub():
    x = torch.tensor([[0.0, 1.5, 0.0, 0.0], [2.0, 0.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 3.0, 4.0, 0.0]])
    start = CSR.from_dense(x)
    for target in ("coo", "bitmask", "csr", "dense"):
        assert torch.equal(convert(start, target).to_dense(), x)
    assert torch.equal(convert(start, "bsr", block=2).to_dense(), x)
    assert torch.equal(convert(COO.from_dense(x), "nm", n=2, m=4).to_dense(), x)
    assert isinstance(convert(Bitmask.from_dense(x), "dense"), Dense)


@pytest.mark.parametrize("fmt", ["nm", "bitmask", "coo", "csr", "bsr"])
def test_from_dense_refuses_non_2d_and_integer_input(fmt):
    cls = FORMATS.get(fmt)
    with pytest.raises(SparsemergeError, match="2-D"):
        cls.from_dense(torch.zeros(4))
    with pytest.raises(SparsemergeError, match="float"):
        cls.from_dense(torch.zeros(4, 4, dtype=torch.int32))
