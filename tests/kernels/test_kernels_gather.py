"""The AVX-512 gather kernel for 2:4 float32 layers at batch 1 (kernels/cpu_gather.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from sparsemerge.kernels import SparsifyConfig, sparsify_
from sparsemerge.kernels import cpu_gather as G
from sparsemerge.kernels.cpu import cpu_matmul
from sparsemerge.kernels.layout import pack_blocked, to_dense
from sparsemerge.kernels.reference import reference_matmul
from sparsemerge.masks import nm_mask

needs_vbmi = pytest.mark.skipif(bool(G.cpu_features_missing()), reason=f"CPU lacks {G.cpu_features_missing()}")


def sparse_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return w * nm_mask(w.abs(), 2, 4)


@needs_vbmi
@pytest.mark.parametrize("rows,cols", [(1, 32), (3, 64), (5, 96), (197, 576), (256, 1536), (1030, 160), (13, 4192)])
@pytest.mark.parametrize("threads", [1, 2])
def test_gather_matches_the_reference(rows, cols, threads):
    layer = pack_blocked(sparse_weight(rows, cols, rows + cols), 2, 4)
    assert G.unavailable_reason(layer) is None
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(1))
    y = G.gather_matmul(layer, x, threads)
    torch.testing.assert_close(y, reference_matmul(layer, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_matmul(layer, x, path="gather"), y)


@needs_vbmi
def test_plan_interleaves_row_quads_and_pads():
    rows, cols = 6, 64
    w = sparse_weight(rows, cols)
    plan = G.prepare(pack_blocked(w, 2, 4))
    assert plan["vals"].shape == (2 * 2 * 4 * 16,) and plan["meta"].shape == (2 * 2 * 4,)
    vals, metas = plan["vals"].reshape(2, 2, 4, 16), plan["meta"].reshape(2, 2, 4)  # one column block:
    # (quads, units, 4 rows, 16)
    kept = w[w != 0].reshape(rows, 32).numpy()  # row-major kept values in column order
    np.testing.assert_array_equal(vals[1, 0, 1], kept[5, :16])  # row 5 = quad 1, row 1; unit 0
    assert (vals[1, :, 2:] == 0).all()  # padding rows 6, 7
    # metadata word: field j (bits 2j..2j+1) = position of kept weight j in its group of 4
    cols_kept = np.nonzero(w[2, 32:].numpy())[0]
    word = int(metas[0, 1, 2])
    assert [(word >> (2 * j)) & 3 for j in range(16)] == list(cols_kept % 4)


def test_reasons_and_auto_routing():
    assert "multiple of 32" in G.unavailable_reason(pack_blocked(sparse_weight(8, 48), 2, 4))
    assert "not float32" in G.unavailable_reason(pack_blocked(sparse_weight(8, 64), 2, 4, "int8"))
    assert "not float32" in G.unavailable_reason(pack_blocked(sparse_weight(8, 64), 2, 4, value_dtype="bfloat16"))
    odd = pack_blocked(sparse_weight(8, 48), 2, 4)  # not a multiple of 32: the blocked kernel
    x = torch.randn(1, 48)
    torch.testing.assert_close(cpu_matmul(odd, x), x @ to_dense(odd).T, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="gather path cannot run"):
        cpu_matmul(odd, x, path="gather")


@needs_vbmi
def test_swapped_layer_uses_the_token_shortcut():
    lin = torch.nn.Linear(64, 40, bias=True)
    lin.weight.data.mul_(nm_mask(lin.weight.data.abs(), 2, 4))
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.ModuleDict({"proj": lin})])})
    sparsify_(model, SparsifyConfig(include=[r"proj"], exclude=[]))
    layer = model["layers"][0]["proj"]
    x = torch.randn(1, 1, 64)
    with torch.no_grad():
        y = layer(x)
        (choice, token), = layer.__dict__["_kernel"].values()  # one cached choice (cpu, one row)
        assert choice.name == "avx512-gather-f32" and token is not None  # the shortcut was built
        assert layer.kernel_choice[0] == "avx512-gather-f32"
        torch.testing.assert_close(y, lin(x), rtol=1e-5, atol=1e-5)
