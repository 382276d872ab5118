"""Hierarchical N:M execution: the numba row and the pure-torch reference against the dense
product of the decoded weight (shapes, row tiles, codecs, batches), the registry's choice
and reasons, and HierLinear's module behaviour."""
from __future__ import annotations

import pytest
import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.formats.base import CodecSpec
from sparsemerge.formats.hnm import HNMPacked
from sparsemerge.kernels import force_kernel, select
from sparsemerge.kernels.cpu_hier import hier_matmul
from sparsemerge.kernels.dispatch import KernelUnavailable
from sparsemerge.kernels.hier import HierLayout, HierLinear, hier_to_dense
from sparsemerge.kernels.reference import hier_reference_matmul
from sparsemerge.masks import hier_mask

CASES = [  # (pattern, rows, cols)
    ("hier:1:2@8x16/2:4", 32, 128),
    ("hier:1:4@16/2:4", 48, 256),  # the chapter's 1:4 of 16x16 tiles, then 2:4
    ("hier:2:3@1x8/1:4", 5, 48),  # per-row blocks, odd row count
    ("hier:3:4@4x32/4:8", 12, 256),
]
CODECS = [CodecSpec("none"), CodecSpec("int8", 0), CodecSpec("int8", 16), CodecSpec("int4", 8, symmetric=False)]


def _layout(pattern: str, rows: int, cols: int, spec: CodecSpec, seed: int = 0) -> tuple[HierLayout, HNMPacked]:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    packed = HNMPacked.from_dense(w * hier_mask(w.abs(), pattern), pattern).with_codec(spec)
    return HierLayout.from_packed(packed), packed


@pytest.mark.parametrize("pattern, rows, cols", CASES)
@pytest.mark.parametrize("spec", CODECS, ids=lambda s: f"{s.kind}-g{s.group_size}")
@pytest.mark.parametrize("batch", [1, 2, 7])
def test_kernel_and_reference_match_the_decoded_dense_product(pattern, rows, cols, spec, batch):
    layout, packed = _layout(pattern, rows, cols, spec)
    dense = packed.to_dense().float()  # the storage's own decoding
    assert torch.equal(hier_to_dense(layout), dense)
    x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
    want = x @ dense.T
    torch.testing.assert_close(hier_matmul(layout, x), want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hier_reference_matmul(layout, x), want, rtol=1e-5, atol=1e-4)


def test_the_kernel_never_reads_dropped_blocks():
    # NaN in the inputs a row tile dropped leaves that tile's outputs finite (a dense product
    # would give NaN: 0 * NaN); batch 1 and a batch take different loops
    layout, packed = _layout("hier:1:2@8x16/2:4", 16, 64, CodecSpec("none"))
    for t, blocks in enumerate(packed.kept_blocks().tolist()):
        kept = torch.zeros(64, dtype=torch.bool)
        for b in blocks:
            kept[b * 16 : b * 16 + 16] = True
        for batch in (1, 3):
            x = torch.randn(batch, 64)
            x[:, ~kept] = float("nan")
            y = hier_matmul(layout, x)
            assert torch.isfinite(y[:, t * 8 : t * 8 + 8]).all()
            assert torch.isfinite(hier_reference_matmul(layout, x)[:, t * 8 : t * 8 + 8]).all()


def test_registry_chooses_numba_hier_and_explains_the_others():
    layer = HierLinear.from_dense(torch.randn(32, 128), pattern="hier:1:2@8x16/2:4", prune=True)
    choice = layer.explain_kernel(batch=1)
    assert choice.name == "numba-hier"
    reasons = dict(choice.reasons)
    assert reasons["numba-general"] == "a hier layout, not nm" and reasons["cuda"].startswith("input is on cpu")
    assert "hierarchical N:M, any codec, any batch" in choice.why()
    with force_kernel("numba-general"), pytest.raises(KernelUnavailable, match="a hier layout"):
        layer(torch.randn(1, 128))
    x = torch.randn(4, 128)
    with force_kernel("reference"):
        ref = layer(x)
    with force_kernel("cpu"):
        assert select(layer, x).name == "numba-hier"
        torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)


def test_hier_linear_module():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    layer = HierLinear.from_dense(linear.weight, linear.bias, pattern="hier:1:2@16/2:4", prune=True)
    weight = linear.weight.detach() * hier_mask(linear.weight.detach().abs(), "hier:1:2@16/2:4")
    assert torch.equal(layer.to_dense(), weight)
    x = torch.randn(2, 5, 64)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, weight, linear.bias.detach()), rtol=1e-5, atol=1e-5)
    assert layer(x.double()).dtype == torch.float64
    # values (16 slots per row), positions, kept block ids (2 tiles x 2 int32), bias
    assert layer.packed_nbytes() == 32 * 16 * 4 + 32 * 16 + 2 * 2 * 4 + 32 * 4
    assert "hier:1:2@16/2:4" in repr(layer)
    state = layer.state_dict()
    other = HierLinear.from_dense(torch.randn(32, 64), torch.zeros(32), pattern="hier:1:2@16/2:4", prune=True)
    other.load_state_dict(state)
    torch.testing.assert_close(other(x), layer(x))
    with pytest.raises(SparsemergeError, match="last dimension 64"):
        layer(torch.randn(3, 32))
    with pytest.raises(SparsemergeError, match="hier:1:2@16/2:4"):
        HierLinear.from_dense(torch.randn(32, 64), pattern="hier:1:2@16/2:4")  # dense: not hierarchical
    with pytest.raises(SparsemergeError, match="hnm packed"):
        HierLinear.from_packed(torch.zeros(4, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_row_runs_the_decoded_weight():
    layer = HierLinear.from_dense(torch.randn(32, 128), pattern="hier:1:2@8x16/2:4", prune=True)
    x = torch.randn(3, 128)
    want = layer(x)
    got = layer.to("cuda")(x.cuda())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-2, atol=1e-2)
