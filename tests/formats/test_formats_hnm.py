"""The hnm format (hierarchical N:M, chapter 10.2.5): exact round trips (hypothesis), byte
counts of a hand-computed case, codecs, the size plan, and corrupt or non-conforming input."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparsemerge.errors import PatternViolation, SparsemergeError
from sparsemerge.formats.base import FORMATS, CodecSpec, convert
from sparsemerge.formats.hnm import HNMPacked, hnm_nbytes
from sparsemerge.formats.size import plan
from sparsemerge.masks import hier_mask
from sparsemerge.patterns import Hierarchical, parse_pattern

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def hier_weights(draw):
    m = draw(st.sampled_from([2, 4, 8]))
    n = draw(st.integers(1, m - 1))
    block = m * draw(st.integers(1, 2))
    l = draw(st.integers(2, 4))
    k = draw(st.integers(1, l - 1))
    r = draw(st.sampled_from([1, 2, 3]))
    p = Hierarchical(k, l, block, n, m, r)
    rows, cols = r * draw(st.integers(1, 3)), p.span * draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    w = torch.randn(rows, cols, generator=g)
    w = w * hier_mask(w.abs(), p)
    w = w * (torch.rand(rows, cols, generator=g) > draw(st.sampled_from([0.0, 0.5, 0.95])))  # underfull groups/blocks
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    return p, w.to(dtype)


@SETTINGS
@given(case=hier_weights(), coding=st.sampled_from(["bits2", "index", "entropy"]))
def test_round_trip_is_exact(case, coding):
    p, w = case
    obj = HNMPacked.from_dense(w, p, coding)
    obj.check(full=True)
    assert obj.to_dense().dtype == w.dtype and torch.equal(obj.to_dense(), w)
    assert obj.nbytes == hnm_nbytes(w.shape[0], w.shape[1], p, coding, w.element_size())
    back = HNMPacked.from_fields(obj.shape, obj.dtype, obj.params(), obj.fields())
    back.check(full=True)
    assert torch.equal(back.to_dense(), w) and back.pattern == p
    # kernels' view: every stored value sits at its column; kept blocks ascending, K per run of L
    dense = torch.zeros(w.shape, dtype=w.dtype).scatter_(1, obj.column_indices(), obj.values)
    assert torch.equal(dense, w)
    kept = obj.kept_blocks()
    assert kept.shape == (w.shape[0] // p.rows, w.shape[1] // p.block * p.k // p.l)
    assert bool((kept[:, 1:] > kept[:, :-1]).all()) if kept.shape[1] > 1 else True


def test_hand_computed_bytes():
    # 4 x 32, tiles of 2 rows x 8 inputs, 1 of every 2 blocks, 2:4: T = 2 row tiles, NB = 4 blocks
    # values: 4 rows x 32*(1/2)*(2/4) = 8 slots x 4 B = 128; bitmap 2 x ceil(4/8) = 2 bytes;
    # 4 kept groups per row: bits2 2*2 bits/group -> 16 bits/row -> 8 bytes; index 3 bits/group
    # -> 12 bits/row -> 6 bytes; entropy bitlength(6**4 - 1) = 11 bits/row -> 44 bits -> 6 bytes
    p = parse_pattern("hier:1:2@2x8/2:4")
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))
    w = w * hier_mask(w.abs(), p)
    sizes = {c: HNMPacked.from_dense(w, p, c).nbytes for c in ("bits2", "index", "entropy")}
    assert sizes == {"bits2": 138, "index": 136, "entropy": 136}
    fields = HNMPacked.from_dense(w, p, "bits2").fields()
    assert {k: tuple(v.shape) for k, v in fields.items()} == {"blocks": (2, 1), "metadata": (8,), "values": (4, 8)}
    # INT8 per channel: 32 one-byte codes + 4 float32 scales replace the 128 value bytes
    assert HNMPacked.from_dense(w, p, "bits2").with_codec(CodecSpec("int8", 0)).nbytes == 10 + 32 + 16
    # the size plan says the same for a shape it was never shown
    rows = {r.format: r.nbytes for r in plan((64, 256), "hier:1:4@16/2:4", value_bytes=2)}
    big = parse_pattern("hier:1:4@16/2:4")
    # 16 blocks per row, 4 kept -> 64 inputs -> 32 slots and 16 groups (bitlength(6**16 - 1) = 42 bits)
    assert rows["hnm/entropy"] == hnm_nbytes(64, 256, big, "entropy", 2) == 64 * 32 * 2 + 4 * 2 + 64 * 42 // 8 == 4440


@pytest.mark.parametrize("spec", [CodecSpec("int8", 8), CodecSpec("int4", 0, symmetric=False), CodecSpec("codebook", k=16)])
def test_codecs_round_trip_through_storage(spec):
    p = parse_pattern("hier:2:4@4x8/1:4")
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    w = w * hier_mask(w.abs(), p)
    obj = HNMPacked.from_dense(w, p).with_codec(spec)
    back = HNMPacked.from_fields(obj.shape, obj.dtype, obj.params(), obj.fields())
    assert back.codec.kind == spec.kind and torch.equal(back.to_dense(), obj.to_dense())
    decoded = obj.to_dense()
    assert torch.equal(decoded != 0, (w != 0) & (decoded != 0))  # nothing outside the pattern
    if spec.kind != "codebook":
        assert (decoded - w).abs().max() < w.abs().max() / (3 if spec.kind == "int4" else 60)


def test_registered_and_converts_through_the_hub():
    assert FORMATS.get("hnm") is HNMPacked
    p = "hier:1:2@2x8/2:4"
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    w = w * hier_mask(w.abs(), p)
    csr = convert(HNMPacked.from_dense(w, p), "csr")
    assert torch.equal(csr.to_dense(), w)
    assert torch.equal(convert(csr, "hnm", pattern=p).to_dense(), w)


def test_all_zero_weight_keeps_the_lowest_blocks():
    p = parse_pattern("hier:1:2@2x8/2:4")
    obj = HNMPacked.from_dense(torch.zeros(4, 32), p)
    assert obj.kept_blocks().tolist() == [[0, 2], [0, 2]] and torch.equal(obj.to_dense(), torch.zeros(4, 32))


def test_non_conforming_weights_are_refused_with_the_place():
    p = "hier:1:2@2x8/2:4"
    w = torch.zeros(4, 32)
    w[2, 0] = w[3, 8] = 1.0  # rows 2-3 (tile 1) use both blocks of run 0
    with pytest.raises(PatternViolation, match=r"1 runs of 2 blocks hold more than 1 .*rows 2..3, columns 0..15"):
        HNMPacked.from_dense(w, p)
    w = torch.zeros(4, 32)
    w[1, 16:19] = 1.0  # 3 nonzeros in one group of 4
    with pytest.raises(PatternViolation, match=r"row 1, columns 16..19"):
        HNMPacked.from_dense(w, p)
    with pytest.raises(SparsemergeError, match="not divisible"):
        HNMPacked.from_dense(torch.zeros(3, 32), p)
    with pytest.raises(SparsemergeError, match="hierarchical pattern"):
        HNMPacked.from_dense(torch.zeros(4, 32), "2:4")
    with pytest.raises(SparsemergeError, match="coding"):
        HNMPacked.from_dense(torch.zeros(4, 32), p, "zip")


def test_corruption_is_detected():
    p = parse_pattern("hier:1:2@2x8/2:4")
    w = torch.randn(4, 32, generator=torch.Generator().manual_seed(3))
    obj = HNMPacked.from_dense(w * hier_mask(w.abs(), p), p, "entropy")
    fields, params = obj.fields(), obj.params()

    def load(f=fields, prm=params):
        return HNMPacked.from_fields(obj.shape, obj.dtype, prm, f, "model.w")

    flipped = dict(fields, blocks=fields["blocks"] ^ torch.tensor([[1], [0]], dtype=torch.uint8))
    with pytest.raises(SparsemergeError, match="model.w: kept-block bitmap is invalid"):
        load(flipped)
    with pytest.raises(SparsemergeError, match="'blocks' has shape"):
        load(dict(fields, blocks=fields["blocks"][:1]))
    with pytest.raises(SparsemergeError, match="'metadata' has shape"):
        load(dict(fields, metadata=fields["metadata"][:-1]))
    with pytest.raises(SparsemergeError, match="out of range"):
        load(dict(fields, metadata=torch.full_like(fields["metadata"], 255)))
    with pytest.raises(SparsemergeError, match="values"):
        load({k: v for k, v in fields.items() if k != "values"})
    with pytest.raises(SparsemergeError, match="bad hierarchical N:M parameters"):
        load(prm=dict(params, k=2))
    with pytest.raises(SparsemergeError, match="does not fit"):
        HNMPacked.from_fields((4, 40), obj.dtype, params, fields, "model.w")
    broken = load()
    broken.positions()[0, 1] = broken.positions()[0, 0]  # not ascending
    with pytest.raises(SparsemergeError, match="ascending"):
        broken.check(full=True)
    broken._kept[0, 1] = True  # a run keeping 2 of 2
    with pytest.raises(SparsemergeError, match="exactly 1"):
        broken.check()


def test_pack_params_read_the_pattern_option():
    class Opts:
        def __init__(self, **kw):
            self.kw = {"pattern": "2:4", "metadata": "entropy", **kw}

        def option(self, name):
            return self.kw[name]

    params, reason = HNMPacked.pack_params((64, 128), Opts(pattern="hier:1:2@16/2:4"))
    assert reason is None and params == {"pattern": parse_pattern("hier:1:2@16/2:4"), "metadata": "entropy"}
    assert "not divisible" in HNMPacked.pack_params((64, 48), Opts(pattern="hier:1:2@16/2:4"))[1]
    with pytest.raises(SparsemergeError, match="--format nm"):
        HNMPacked.pack_params((64, 128), Opts())
