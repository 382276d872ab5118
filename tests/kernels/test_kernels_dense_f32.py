"""GemvLinear: the dense float32 Linear with a numba batch-1 GEMV (kernels/dense_f32.py)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from sparsemerge.kernels import SparsifyConfig, sparsify_
from sparsemerge.kernels.dense_f32 import GemvLinear, use_gemv_
from sparsemerge.kernels.dispatch import force_kernel
from sparsemerge.prune.api import prune_


@pytest.mark.parametrize("rows,cols,bias", [(1, 7, False), (2500, 64, True), (49, 576, False)])
@pytest.mark.parametrize("threads", [1, 2])
def test_batch_one_matches_linear(rows, cols, bias, threads):
    torch.set_num_threads(threads)
    lin = nn.Linear(cols, rows, bias=bias)
    fast = GemvLinear.from_linear(lin)
    assert fast.weight is lin.weight
    x = torch.randn(1, 1, cols)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), lin(x), rtol=1e-5, atol=1e-5)
        xb = torch.randn(3, cols)  # batches take nn.Linear's path
        assert torch.equal(fast(xb), lin(xb))
        with force_kernel("reference"):
            assert torch.equal(fast(x), lin(x))
    torch.set_num_threads(2)


def test_autograd_still_flows():
    lin = nn.Linear(16, 8)
    fast = GemvLinear.from_linear(lin)
    x = torch.randn(1, 16)
    fast(x).sum().backward()
    # d sum(W x + b) / dW = 1 x^T for every output row, and 1 for the bias
    torch.testing.assert_close(lin.weight.grad, x.expand(8, 16))
    torch.testing.assert_close(lin.bias.grad, torch.ones(8))


def test_sparsify_keeps_the_tied_head_tied_and_float():
    model = make_tiny_llama()
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    prune_(model, {"pattern": "2:4", "progress": False})
    ids = torch.randint(0, 384, (1, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
    sparsify_(model, SparsifyConfig())
    assert isinstance(model.lm_head, GemvLinear)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, rtol=1e-4, atol=1e-4)


def test_use_gemv_converts_only_plain_linears_matching_the_pattern():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    assert use_gemv_(model, r"^2$") == ["2"]
    assert type(model[0]) is nn.Linear and isinstance(model[2], GemvLinear)
