"""The AVX-512 VNNI batch-1 kernel for 2:4 INT8/INT4 layers with INT8 activations."""
from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_llama
from sparsemerge.errors import SparsemergeError
from sparsemerge.kernels import SparsifyConfig, sparsify_
from sparsemerge.kernels import cpu_vnni as V
from sparsemerge.kernels.cpu import cpu_matmul
from sparsemerge.kernels.layout import pack_blocked, to_dense
from sparsemerge.kernels import set_act_quant_  # the public name
from sparsemerge.masks import nm_mask

needs_vnni = pytest.mark.skipif(bool(V.cpu_features_missing()), reason=f"CPU lacks {V.cpu_features_missing()}")


def sparse_weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    return w * nm_mask(w.abs(), 2, 4)


def test_activation_quantization_round_trips():
    x = torch.randn(1, 576) * 3
    xq, xs = V.quantize_activations(x)
    assert xq.dtype.name == "int8" and xs.shape == (3,)
    x_hat = torch.from_numpy(xq).float() * torch.from_numpy(xs).repeat_interleave(256)[:576]
    assert float((x_hat - x).abs().max()) <= float(xs.max()) / 2 + 1e-6  # half a step per block
    assert int(torch.from_numpy(xq).abs().max()) == 127  # the largest |x| of a block maps to 127
    zq, zs = V.quantize_activations(torch.zeros(1, 256))
    assert (zq == 0).all() and zs[0] == 1.0  # all-zero block: no division by zero
    with pytest.raises(ValueError, match="NaN or infinity"):
        V.quantize_activations(torch.tensor([[1.0, float("inf")] * 32]))


def test_metadata_layout_puts_each_field_where_multishift_reads_it():
    """The 2-bit field of kept weight j must sit in the metadata qword that the 128-bit
    broadcast copies into qword j // 8, at the bit offset byte j's control selects."""
    pos = torch.randint(0, 4, (2, 3, 64), generator=torch.Generator().manual_seed(0)).numpy().astype("uint8")
    meta = V._pack_meta(pos).reshape(2, 3, 2, 8).view("uint64")[..., 0]  # (rows, units, 2 qwords)
    for j in range(64):
        broadcast_qword = meta[:, :, (j // 8) % 2]
        got = (broadcast_qword >> V.META_SHIFT[j]) & 3
        assert (got == pos[:, :, j]).all()
    assert sorted(2 * ((j // 8) % 2) * 32 + V.META_SHIFT[j] for j in range(64)) == list(range(0, 128, 2))  # no overlap


@needs_vnni
@pytest.mark.parametrize("codec", ["int8", "int4"])
@pytest.mark.parametrize("group_size", [None, 128])
@pytest.mark.parametrize("rows,cols", [(1, 64), (3, 128), (5, 192), (197, 576), (256, 1536), (640, 320)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernel_matches_the_w8a8_reference(codec, group_size, rows, cols, threads):
    if group_size and cols % 256:
        group_size = None  # a 128-value scale group must cover whole 256-input blocks
    layer = pack_blocked(sparse_weight(rows, cols), 2, 4, codec, group_size, "float32", True)
    assert V.unavailable_reason(layer) is None
    x = torch.randn(1, cols, generator=torch.Generator().manual_seed(1))
    y = V.vnni_matmul(layer, x, threads)
    ref = V.reference_w8a8(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-4)
    # against float activations the only difference is the rounding of x, at most half a step
    wd = to_dense(layer)
    _, xs = V.quantize_activations(x)
    half_step = torch.from_numpy(xs).repeat_interleave(256)[:cols] / 2
    bound = wd.abs() @ half_step
    assert ((y - x @ wd.T).abs() <= bound * 1.001 + 1e-5).all()


def test_unavailable_reasons_are_specific():
    w = sparse_weight(64, 576)
    assert "asymmetric" in V.unavailable_reason(pack_blocked(w, 2, 4, "int8", None, "float32", False))
    assert "int8/int4" in V.unavailable_reason(pack_blocked(w, 2, 4, "none"))
    assert "not a multiple of 64" in V.unavailable_reason(pack_blocked(sparse_weight(64, 100), 2, 4, "int8"))
    assert "not a multiple of 256" in V.unavailable_reason(pack_blocked(w, 2, 4, "int8", 32))
    w48 = torch.randn(64, 64)
    w48 = w48 * nm_mask(w48.abs(), 4, 8)
    assert "not 2:4" in V.unavailable_reason(pack_blocked(w48, 4, 8, "int8"))


@needs_vnni
def test_cpu_matmul_routes_batch_one_only_when_asked():
    layer = pack_blocked(sparse_weight(128, 256), 2, 4, "int8", 128)
    x = torch.randn(1, 256)
    exact = cpu_matmul(layer, x)  # float activations
    w8a8 = cpu_matmul(layer, x, act_quant="int8")
    torch.testing.assert_close(w8a8, V.reference_w8a8(layer, x), rtol=1e-5, atol=1e-4)
    assert not torch.equal(exact, w8a8)
    torch.testing.assert_close(cpu_matmul(layer, x, path="vnni"), w8a8)
    xb = torch.randn(3, 256)
    torch.testing.assert_close(cpu_matmul(layer, xb, act_quant="int8"), cpu_matmul(layer, xb))  # batch 3: float path
    with pytest.raises(ValueError, match="batch is not 1"):
        cpu_matmul(layer, xb, path="vnni")
    x[0, 5] = float("nan")  # non-finite inputs take the float path, so NaN reaches the output as in dense
    assert torch.isnan(cpu_matmul(layer, x, act_quant="int8")).any()


@needs_vnni
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_swapped_model_with_int8_activations_tracks_float_activations(codec):
    from sparsemerge.prune.api import prune_

    model = make_tiny_llama()
    prune_(model, {"pattern": "2:4", "progress": False})
    sparsify_(model, SparsifyConfig(quant=codec))
    ids = torch.randint(0, 384, (1, 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
        assert set_act_quant_(model, "int8") == 14
        out = model(ids).logits
    assert not torch.equal(out, ref)
    assert float((out - ref).norm() / ref.norm()) < 0.02
    assert "act_quant=int8" in repr(model.model.layers[0].mlp.down_proj)
    with pytest.raises(SparsemergeError, match="act_quant must be one of"):
        set_act_quant_(model, "int4")


@needs_vnni
def test_cli_run_with_int8_activations(tmp_path, tiny_tokenizer, capsys):
    from sparsemerge.cli.main import main
    from sparsemerge.prune.api import prune_

    model = make_tiny_llama()
    prune_(model, {"pattern": "2:4", "progress": False})
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer.save_pretrained(tmp_path / "hf")
    assert main(["run", str(tmp_path / "hf"), "--quant", "int8", "--act-quant", "int8", "--prompt", "The team",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("The team")


def test_fake_quant_rounds_every_row_like_the_kernel():
    x = torch.randn(3, 5, 576)
    fq = V.fake_quant_activations(x)
    assert fq.shape == x.shape
    for i, j in ((0, 0), (2, 4)):
        xq, xs = V.quantize_activations(x[i, j].unsqueeze(0))
        expect = torch.from_numpy(xq).float() * torch.from_numpy(xs).repeat_interleave(256)[:576]
        torch.testing.assert_close(fq[i, j], expect)


@needs_vnni
def test_swapped_layer_token_path_matches_the_kernel_and_keeps_nan():
    lin = torch.nn.Linear(576, 192, bias=True)
    lin.weight.data.mul_(nm_mask(lin.weight.data.abs(), 2, 4))
    model = torch.nn.ModuleDict({"layers": torch.nn.ModuleList([torch.nn.ModuleDict({"proj": lin})])})
    sparsify_(model, SparsifyConfig(quant="int8", act_quant="int8", include=[r"proj"], exclude=[]))
    layer = model["layers"][0]["proj"]
    x = torch.randn(1, 1, 576)
    with torch.no_grad():
        y = layer(x)  # the one-token shortcut
        expect = V.reference_w8a8(layer.layout, x.reshape(1, -1)) + layer.bias
        torch.testing.assert_close(y.reshape(1, -1), expect, rtol=1e-5, atol=1e-4)
        x[0, 0, 3] = float("nan")
        assert torch.isnan(layer(x)).any()  # not finite: the float path, NaN propagates


@needs_vnni
@pytest.mark.parametrize("codec", ["int8", "int4"])
def test_prefetch_distance_changes_no_number(codec):
    """The software prefetch (PREFETCH_BYTES ahead of each pair) only touches the cache: with
    none, one line and the default distance the kernel gives the same float32 numbers, which
    equal the w8a8 reference."""
    import numpy as np

    rows, cols = 37, 640  # pairs and a tail chunk
    g = torch.Generator().manual_seed(4)
    w = torch.randn(rows, cols, generator=g)
    layer = pack_blocked(w * nm_mask(w.abs(), 2, 4), 2, 4, codec, 128)
    x = torch.randn(1, cols, generator=g)
    plan = V.prepare(layer)
    outs = [V._row_runner(V._compiled_fns(d)[0][codec])(plan["stream"], plan["scale"], plan["corr"], x.numpy(), rows,
                                                        plan["npairs"], plan["tail"], plan["nscale"], plan["xb_per_q"], 1)
            for d in (0, 64, V.PREFETCH_BYTES)]
    assert V.PREFETCH_BYTES > 0
    torch.testing.assert_close(torch.from_numpy(np.asarray(outs[0])).reshape(1, rows), V.reference_w8a8(layer, x), rtol=1e-5, atol=1e-4)
    assert all(np.array_equal(outs[0], o) for o in outs[1:])
