"""SparseLinear, the in-place swap, forced kernel paths, packed checkpoints and the CLI."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from conftest import make_tiny_llama
from sparsemerge.errors import SparsemergeError
from sparsemerge.kernels import KERNELS, SparseLinear, SparsifyConfig, choose_kernel, force_kernel, sparsify_
from sparsemerge.masks import nm_mask


def pruned_tiny_llama(n: int = 2, m: int = 4):
    from sparsemerge.prune.api import prune_
    from sparsemerge.prune.config import PruneConfig

    model = make_tiny_llama()
    prune_(model, PruneConfig(pattern=f"{n}:{m}", progress=False))
    return model


@pytest.mark.parametrize("codec,group_size,atol", [(None, None, 1e-5), ("int8", None, 3e-2), ("int8", 32, 3e-2), ("int4", 32, 0.5)])
@pytest.mark.parametrize("kernel", ["cpu", "reference"])
def test_swapped_model_matches_dense_masked_model(codec, group_size, atol, kernel):
    model = pruned_tiny_llama()
    ids = torch.randint(0, 384, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    report = sparsify_(model, SparsifyConfig(quant=codec or "none", group_size=group_size))
    assert len(report.swapped) == 14 and report.packed_bytes < report.dense_bytes
    assert all(isinstance(model.get_submodule(n), SparseLinear) for n in report.swapped)
    with force_kernel(kernel), torch.no_grad():
        out = model(ids).logits
        step = model(ids[:1, :1]).logits  # batch-1 path
    torch.testing.assert_close(out, ref, atol=atol, rtol=0)
    torch.testing.assert_close(step, ref[:1, :1], atol=atol, rtol=0)
    if codec is not None:
        assert (out - ref).abs().max() > 0  # the codec really quantized


def test_int8_error_tracks_the_codec():
    """Logit error of the swapped model equals that of the dense model with dequantized weights."""
    model = pruned_tiny_llama()
    dequant = copy.deepcopy(model)
    sparsify_(model, SparsifyConfig(quant="int8"))
    for name, mod in model.named_modules():
        if isinstance(mod, SparseLinear):
            dequant.get_submodule(name).weight.data = mod.to_dense()
    ids = torch.randint(0, 384, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dequant(ids).logits, atol=1e-4, rtol=0)


def test_from_dense_bias_dtype_and_shapes():
    w = torch.randn(70, 24)
    layer = SparseLinear.from_dense(w, torch.randn(70), prune=True)
    dense = nn.Linear(24, 70)
    dense.weight.data = w * nm_mask(w.abs(), 2, 4)
    dense.bias.data = layer.bias.clone()
    x = torch.randn(2, 3, 24)
    torch.testing.assert_close(layer(x), dense(x), atol=1e-5, rtol=1e-5)
    y16 = layer(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16 and y16.shape == (2, 3, 70)
    with pytest.raises(SparsemergeError, match="last dimension 24"):
        layer(torch.randn(2, 25))
    with pytest.raises(SparsemergeError, match="not 2:4 sparse"):
        SparseLinear.from_dense(w)


def test_state_dict_round_trip():
    layer = SparseLinear.from_dense(torch.randn(64, 32), codec="int4", group_size=8, prune=True)
    other = SparseLinear(copy.deepcopy(layer.layout))
    other.load_state_dict(layer.state_dict())
    x = torch.randn(1, 32)
    torch.testing.assert_close(other(x), layer(x))


def test_dispatch_force_and_errors():
    layer = SparseLinear.from_dense(torch.randn(64, 32), prune=True)
    x = torch.randn(1, 32)
    assert set(KERNELS.names()) >= {"cpu", "cuda", "reference"}
    assert choose_kernel(layer, x).name in KERNELS.get("cpu").members  # a row of the "cpu" group
    with force_kernel("reference"):
        assert choose_kernel(layer, x).name == "reference"
    with pytest.raises(SparsemergeError, match="known kernels"):
        with force_kernel("nope"):
            pass
    with force_kernel("cuda"), pytest.raises(SparsemergeError, match="forced but cannot run"):
        layer(x)


def test_sparsify_rejects_unpruned_and_bad_config():
    model = make_tiny_llama()
    with pytest.raises(SparsemergeError, match="prune it first"):
        sparsify_(model, SparsifyConfig())
    report = sparsify_(model, SparsifyConfig(prune=True, pattern="4:8"))
    assert report.swapped
    with pytest.raises(ValueError, match="N:M patterns only"):
        SparsifyConfig(pattern="unstructured:0.5")
    with pytest.raises(ValueError, match="bogus"):
        SparsifyConfig(bogus=1)


@pytest.mark.parametrize("quant,group_size", [("none", 128), ("int8", 0), ("int4", 32)])
def test_packed_checkpoint_runs_without_dense_weights(tmp_path, tiny_tokenizer, quant, group_size):
    from sparsemerge.formats.model import PackConfig, pack
    from sparsemerge.kernels.model import load_for_run

    model = pruned_tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer.save_pretrained(tmp_path / "hf")
    pack(tmp_path / "hf", tmp_path / "packed", PackConfig(quant=quant, group_size=group_size))
    sparse = load_for_run(str(tmp_path / "packed"))
    dense = load_for_run(str(tmp_path / "packed"), dense=True)
    assert sparse.kind == "packed" and len(sparse.swapped) == 14
    ids = torch.randint(0, 384, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(sparse.model(ids).logits, dense.model(ids).logits, atol=1e-4, rtol=0)
        if quant == "none":
            torch.testing.assert_close(sparse.model(ids).logits, model(ids).logits, atol=1e-4, rtol=0)
    with pytest.raises(SparsemergeError, match="drop --quant"):
        load_for_run(str(tmp_path / "packed"), quant="int8")
    headq = load_for_run(str(tmp_path / "packed"), head_quant="int8")
    assert "lm_head" in headq.swapped and type(headq.model.lm_head).__name__ == "Int8Linear"
    with torch.no_grad():
        torch.testing.assert_close(headq.model(ids).logits, dense.model(ids).logits, atol=5e-2, rtol=0)
    with pytest.raises(SparsemergeError, match="invalid sparse execution options"):
        load_for_run(str(tmp_path / "hf"), pattern="block4:0.5")


def test_cli_run_and_bench(tmp_path, tiny_tokenizer, capsys):
    from sparsemerge.cli.main import main

    model = pruned_tiny_llama()
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer.save_pretrained(tmp_path / "hf")
    assert main(["run", str(tmp_path / "hf"), "--quant", "int8", "--prompt", "The team", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The team") and "14 sparse layers" in out and "decode runtime" in out
    assert main(["bench", str(tmp_path / "hf"), "--quant", "int4", "--tokens", "3", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "dense float32" in out and "tokens/s" in out and "peak RSS +MiB" in out
    # peak memory comes from a fresh process per model: a number, not nan
    sparse_row = next(line for line in out.splitlines() if line.startswith("sparse "))
    assert sparse_row.split()[2] == "runtime" and float(sparse_row.split()[6]) > 0
    assert main(["bench", str(tmp_path / "hf"), "--tokens", "1", "--repeats", "1", "--no-dense", "--no-peak-memory"]) == 0
    assert "nan" in capsys.readouterr().out
    # the transformers path on request, saying so
    assert main(["run", str(tmp_path / "hf"), "--prompt", "The team", "--max-new-tokens", "2", "--runtime", "off"]) == 0
    assert "transformers (the decode runtime is off" in capsys.readouterr().out
    assert main(["run", str(tmp_path / "hf"), "--prompt", "x", "--kernel", "nope"]) == 2
    assert main(["run", str(tmp_path / "hf"), "--prompt", "x", "--top-p", "0"]) == 2
    assert main(["bench", str(tmp_path / "missing"), "--tokens", "1"]) == 2


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(256, 512), (100, 64)])  # supported, and a fallback shape
def test_cuda_path_matches_reference(shape):
    w = torch.randn(*shape)
    layer = SparseLinear.from_dense(w, prune=True, value_dtype="float16")
    x = torch.randn(8, shape[1])
    with force_kernel("reference"):
        ref = layer(x)
    cuda = layer.to("cuda")
    y = cuda(x.cuda().half()).float().cpu()
    torch.testing.assert_close(y, ref, atol=5e-2, rtol=1e-2)
    from sparsemerge.kernels.cuda import semi_structured_reason

    expect_fallback = semi_structured_reason(*shape, torch.float16) is not None
    assert (cuda.cuda_fallback_reason is not None) == expect_fallback


def test_cuda_reason_without_gpu():
    from sparsemerge.kernels.cuda import semi_structured_reason

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    assert semi_structured_reason(256, 512, torch.float16) == "no CUDA device"


@pytest.mark.slow
def test_smollm2_int8_swap_generates():
    from sparsemerge.io import load_model

    loaded = load_model("smollm2")
    model = loaded.model
    layer = model.model.layers[0].mlp.up_proj
    ids = loaded.tokenizer("The government said", return_tensors="pt").input_ids
    sparsify_(model, SparsifyConfig(quant="int8", prune=True, include=[r"layers\.0\."]))
    assert isinstance(model.model.layers[0].mlp.up_proj, SparseLinear)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 4
    del layer


def test_int8_head_matches_dequantized_head():
    from sparsemerge.kernels.dense_int8 import Int8Linear

    model = pruned_tiny_llama()
    ids = torch.randint(0, 384, (2, 5))
    with torch.no_grad():
        ref = model(ids).logits
    report = sparsify_(model, SparsifyConfig(quant="int8", head_quant="int8"))
    head = model.lm_head
    assert isinstance(head, Int8Linear) and "lm_head" in report.swapped
    x = torch.randn(3, head.in_features)
    torch.testing.assert_close(head(x), x @ head.to_dense().T, atol=1e-4, rtol=1e-5)
    with force_kernel("reference"):
        torch.testing.assert_close(head(x), x @ head.to_dense().T, atol=1e-4, rtol=1e-5)
    assert torch.equal(model.model.embed_tokens.weight, model.model.embed_tokens.weight.float())  # embedding untouched
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref, atol=5e-2, rtol=0)


@pytest.mark.parametrize("dense_quant,group_size", [("int8", 0), ("int8", 48), ("int4", 32)])
def test_packed_int8_embedding_stays_codes_and_feeds_the_tied_head(tmp_path, tiny_tokenizer, dense_quant, group_size):
    from sparsemerge.formats.model import PackConfig, pack
    from sparsemerge.kernels.dense_int8 import Int8Embedding, Int8Linear
    from sparsemerge.kernels.model import load_for_run, model_bytes

    model = pruned_tiny_llama()  # tied embedding / head, hidden 64 (a 48-wide group leaves a 16-wide one)
    model.save_pretrained(tmp_path / "hf")
    tiny_tokenizer.save_pretrained(tmp_path / "hf")
    pack(tmp_path / "hf", tmp_path / "packed", PackConfig(quant="int8", group_size=group_size, dense_quant=dense_quant))
    sparse = load_for_run(str(tmp_path / "packed"))
    dense = load_for_run(str(tmp_path / "packed"), dense=True)
    table, head = sparse.model.model.embed_tokens, sparse.model.lm_head
    assert isinstance(table, Int8Embedding) and isinstance(head, Int8Linear)
    assert head.codes is table.codes and head.scale is table.scale  # one copy of the codes
    assert "lm_head" in sparse.swapped
    assert model_bytes(sparse.model) < model_bytes(dense.model) / 3
    ids = torch.randint(0, 384, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(sparse.model(ids).logits, dense.model(ids).logits, atol=1e-4, rtol=0)
        torch.testing.assert_close(table(ids), dense.model.model.embed_tokens(ids), atol=1e-6, rtol=0)
        x = torch.randn(1, 64)
        fast = head(x)
        with force_kernel("reference"):  # the dequantizing path of Int8Linear agrees
            torch.testing.assert_close(head(x), fast, atol=1e-4, rtol=0)


def test_int8_linear_groups_match_the_dequantized_weight():
    from sparsemerge.kernels.dense_int8 import Int8Linear

    lin = torch.nn.Linear(100, 37, bias=True)
    for group in (0, 32, 100):
        q = Int8Linear.from_linear(lin, group_size=group)
        x = torch.randn(3, 100)
        expect = x @ q.to_dense().T + lin.bias
        torch.testing.assert_close(q(x), expect, rtol=1e-5, atol=1e-5)
        with force_kernel("reference"):
            torch.testing.assert_close(q(x), expect, rtol=1e-5, atol=1e-5)
        assert float((q.to_dense() - lin.weight).abs().max()) <= float(lin.weight.abs().max()) / 127
    with pytest.raises(SparsemergeError, match="does not fit"):
        Int8Linear(torch.zeros(4, 10, dtype=torch.int8), torch.ones(4, 2), group_size=3)
