"""Value codecs: the documented formulas on hand-worked cases, error bounds, INT4 packing,
the public fields the kernels consume, and the k-means codebook."""
from __future__ import annotations

import pytest
import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats import Codebook, QuantizedValues, dequantize, fit_codebook, quantize
from sparsemerge.formats.bits import pack_codes, pack_nibbles, unpack_codes, unpack_nibbles


def test_symmetric_int8_hand_case():
    x = torch.tensor([[1.27, -0.635, 0.0, 0.5]])
    q = quantize(x, bits=8, group_size=0, symmetric=True)
    assert q.scale.shape == (1, 1) and q.zero_point is None
    assert q.scale.item() == pytest.approx(0.01)  # absmax / 127
    assert q.int8_codes().tolist() == [[127, -64, 0, 50]]  # round(-63.5) = -64 (half to even)
    assert torch.allclose(dequantize(q), torch.tensor([[1.27, -0.64, 0.0, 0.5]]))


def test_asymmetric_int4_hand_case_keeps_zero_exact():
    x = torch.tensor([[0.0, 1.5, 3.0, 0.75]])
    q = quantize(x, bits=4, group_size=0, symmetric=False)
    # lo = 0, hi = 3, scale = 3/15 = 0.2, zp = round(-8 - 0/0.2) = -8
    assert q.scale.item() == pytest.approx(0.2)
    assert q.zero_point.tolist() == [[-8]]
    assert q.int8_codes().tolist() == [[-8, 0, 7, -4]]  # 1.5/0.2 = 7.5 -> 8 - 8; 0.75/0.2=3.75 -> 4 - 8
    out = dequantize(q)
    assert out[0, 0].item() == 0.0
    assert torch.allclose(out, torch.tensor([[0.0, 1.6, 3.0, 0.8]]))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [0, 1, 5, 128])
def test_quantization_error_is_at_most_half_a_step(bits, symmetric, group):
    torch.manual_seed(bits + group)
    x = torch.randn(7, 37) * torch.logspace(-3, 1, 37)
    q = quantize(x, bits, group, symmetric)
    n_groups = 1 if group == 0 else -(-37 // group)
    assert q.scale.shape == (7, n_groups) and q.scale.dtype == torch.float32
    assert q.codes.dtype == torch.int8
    qmax = 2 ** (bits - 1) - 1
    assert int(q.codes.max()) <= qmax and int(q.codes.min()) >= (-qmax if symmetric else -qmax - 1)
    err = (dequantize(q) - x).abs()
    assert bool((err <= q.expanded_scale() / 2 * (1 + 1e-5) + 1e-7).all())


def test_quantized_storage_packs_int4_two_per_byte():
    x = torch.randn(3, 9)
    q = quantize(x, 4, 4, True)
    fields = q.fields()
    assert fields["codes"].dtype == torch.uint8 and fields["codes"].shape == (3, 5)
    back = QuantizedValues.from_fields((3, 9), q.params(), fields, "t")
    assert torch.equal(back.int8_codes(), q.int8_codes())
    assert torch.equal(dequantize(back), dequantize(q))
    assert q.nbytes == 3 * 5 + 3 * 3 * 4


def test_nibble_order_is_low_nibble_first_twos_complement():
    codes = torch.tensor([[1, -1, 7, -8, 3]], dtype=torch.int8)
    packed = pack_nibbles(codes)
    assert packed.tolist() == [[0xF1, 0x87, 0x03]]
    assert torch.equal(unpack_nibbles(packed, 5), codes)


def test_bitstream_is_lsb_first():
    stream = pack_codes(torch.tensor([1, 2, 3, 0, 5]), 3)
    # bits: 100 010 110 000 101 -> byte0 = 0b01_010_001? little-endian: code k at bits 3k..3k+2
    value = sum(int(c) << (3 * k) for k, c in enumerate([1, 2, 3, 0, 5]))
    assert stream.tolist() == [value & 0xFF, (value >> 8) & 0xFF]
    assert unpack_codes(stream, 3, 5).tolist() == [1, 2, 3, 0, 5]


def test_quantize_refuses_bad_input():
    with pytest.raises(SparsemergeError, match="4 or 8"):
        quantize(torch.zeros(2, 2), bits=3)
    with pytest.raises(SparsemergeError, match="NaN"):
        quantize(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(SparsemergeError, match="float"):
        quantize(torch.zeros(2, 2, dtype=torch.int32))
    q = quantize(torch.randn(2, 4), 8, 2)
    bad = dict(q.fields(), scale=torch.zeros(2, 3))
    with pytest.raises(SparsemergeError, match="scale.*shape"):
        QuantizedValues.from_fields((2, 4), q.params(), bad, "tensor 'w'")


@pytest.mark.parametrize("k", [4, 16, 256])
def test_codebook_fits_clusters_and_keeps_zeros(k):
    torch.manual_seed(k)
    centers = torch.tensor([-2.0, -0.5, 0.7, 3.0])
    x = centers[torch.randint(0, 4, (2000,))] + 0.01 * torch.randn(2000)
    x[::7] = 0.0
    cb = fit_codebook(x, k)
    assert cb.centroids.shape == (k,) and cb.centroids.dtype == torch.float32
    out = cb.decode()
    assert bool((out[x == 0] == 0).all())
    if k >= 16:
        assert (out - x).abs().max() < 0.1
    fields = cb.fields()
    assert fields["indices"].numel() == (2000 * max(k - 1, 1).bit_length() + 7) // 8
    back = Codebook.from_fields((2000,), cb.params(), fields, "t")
    assert torch.equal(back.decode(), out)


def test_codebook_k_means_is_a_fixed_point_of_lloyd():
    x = torch.tensor([1.0, 1.1, 0.9, 5.0, 5.2, 4.8, -3.0, -3.1])
    cb = fit_codebook(x, 4, keep_zero=True)
    assert torch.allclose(cb.centroids, torch.tensor([-3.05, 0.0, 1.0, 5.0]), atol=1e-5)


def test_codebook_refuses_bad_k():
    with pytest.raises(SparsemergeError, match="2..256"):
        fit_codebook(torch.randn(10), 300)
