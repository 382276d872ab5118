"""The block-by-block calibration walker, the prune_ API and the CLI for wanda / sparsegpt."""
from __future__ import annotations

import pytest
import torch

from sparsemerge.masks import check_pattern

from conftest import make_tiny_llama
from sparsemerge.errors import SparsemergeError
from sparsemerge.prune.api import prune_
from sparsemerge.prune.base import METHODS
from sparsemerge.prune.calibration import capture_block_inputs
from sparsemerge.prune.config import PruneConfig
from sparsemerge.prune.select import find_blocks, select_targets
from sparsemerge.prune.sparsegpt import Hessian
from sparsemerge.prune.wanda import InputNorms


@pytest.fixture(scope="module")
def calib() -> torch.Tensor:
    return torch.randint(0, 384, (10, 24), generator=torch.Generator().manual_seed(0))  # 2 batches of <= 8


def whole_model_oneshot(model, method: str, pattern: str, calibration: torch.Tensor) -> None:
    """The straightforward non-sequential implementation: one full forward with hooks on
    every target, then every layer pruned from the dense model's statistics."""
    config = PruneConfig(method=method, pattern=pattern, progress=False)
    targets, _ = select_targets(model, config)
    impl = METHODS.get(method)()
    stats = {t.name: (Hessian if method == "sparsegpt" else InputNorms)(t.weight.shape[1]) for t in targets}
    handles = [
        t.module.register_forward_hook(lambda m, inp, out, s=stats[t.name]: s.add(inp[0].reshape(-1, inp[0].shape[-1])))
        for t in targets
    ]
    with torch.no_grad():
        model(input_ids=calibration, use_cache=False)
    for h in handles:
        h.remove()
    for t in targets:
        impl.prune_layer(t, stats[t.name], config)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_non_sequential_walk_equals_whole_model_implementation(method, calib):
    walked, direct = make_tiny_llama(seed=3), make_tiny_llama(seed=3)
    prune_(walked, {"method": method, "pattern": "2:4", "sequential": False, "progress": False}, calibration=calib)
    whole_model_oneshot(direct, method, "2:4", calib)
    for (name, a), (_, b) in zip(walked.named_parameters(), direct.named_parameters()):
        assert torch.equal(a == 0, b == 0), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


def test_block_sequential_sees_pruned_blocks(calib):
    seq, one = make_tiny_llama(seed=4), make_tiny_llama(seed=4)
    prune_(seq, {"method": "sparsegpt", "pattern": "2:4", "sequential": "block", "progress": False}, calibration=calib)
    prune_(one, {"method": "sparsegpt", "pattern": "2:4", "sequential": False, "progress": False}, calibration=calib)
    first = seq.model.layers[0].mlp.down_proj.weight
    torch.testing.assert_close(first, one.model.layers[0].mlp.down_proj.weight)
    assert not torch.allclose(seq.model.layers[1].mlp.down_proj.weight, one.model.layers[1].mlp.down_proj.weight)


def layer_by_layer_reference(model, method: str, pattern: str, calibration: torch.Tensor, **options) -> None:
    """True-sequential pruning the slow, obvious way: for each target in call order, one full
    forward of the (partly pruned) model collects that layer's input, then it is pruned."""
    config = PruneConfig(method=method, pattern=pattern, progress=False, **options)
    targets, _ = select_targets(model, config)
    impl = METHODS.get(method)()
    for t in targets:  # named_modules order = call order in a Llama block (q,k,v,o,gate,up,down)
        stats = (Hessian if method == "sparsegpt" else InputNorms)(t.weight.shape[1])
        handle = t.module.register_forward_hook(lambda m, inp, out: stats.add(inp[0].reshape(-1, inp[0].shape[-1])))
        with torch.no_grad():
            model(input_ids=calibration, use_cache=False)
        handle.remove()
        impl.prune_layer(t, stats, config)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_layer_sequential_equals_layer_by_layer_reference(method, calib):
    walked, direct = make_tiny_llama(seed=5), make_tiny_llama(seed=5)
    prune_(walked, {"method": method, "pattern": "2:4", "sequential": "layer", "progress": False}, calibration=calib)
    layer_by_layer_reference(direct, method, "2:4", calib)
    for (name, a), (_, b) in zip(walked.named_parameters(), direct.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
        assert float(((a == 0) != (b == 0)).float().mean()) < 0.01, name


@pytest.mark.parametrize("first_block_dense", [True, False])
def test_layer_sequential_with_per_layer_patterns_and_dense_siblings(first_block_dense, calib):
    """A mixed allocation: k_proj dense in one block (fewer siblings share q's input there),
    q_proj 1:4 in another (its siblings no longer stack): the one-pass walk still equals the
    layer-by-layer reference, whichever block comes first."""
    dense_block, sparse_q_block = (0, 1) if first_block_dense else (1, 0)
    patterns = {rf"^model\.layers\.{dense_block}\.self_attn\.k_proj$": "dense",
                rf"^model\.layers\.{sparse_q_block}\.self_attn\.q_proj$": "1:4", r"up_proj$": "4:8"}
    walked, direct = make_tiny_llama(seed=6), make_tiny_llama(seed=6)
    prune_(walked, {"method": "sparsegpt", "pattern": "2:4", "sequential": "layer", "layer_patterns": patterns,
                    "progress": False}, calibration=calib)
    layer_by_layer_reference(direct, "sparsegpt", "2:4", calib, layer_patterns=patterns)
    for (name, a), (_, b) in zip(walked.named_parameters(), direct.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
    k = walked.model.layers[dense_block].self_attn.k_proj.weight
    assert torch.equal(k, make_tiny_llama(seed=6).model.layers[dense_block].self_attn.k_proj.weight)
    assert check_pattern(walked.model.layers[sparse_q_block].self_attn.q_proj.weight, "1:4").ok


def test_layer_sequential_differs_from_block_within_a_block(calib):
    layer, block = make_tiny_llama(seed=4), make_tiny_llama(seed=4)
    prune_(layer, {"method": "sparsegpt", "pattern": "2:4", "sequential": "layer", "progress": False}, calibration=calib)
    prune_(block, {"method": "sparsegpt", "pattern": "2:4", "sequential": "block", "progress": False}, calibration=calib)
    attn_l, attn_b = layer.model.layers[0].self_attn, block.model.layers[0].self_attn
    torch.testing.assert_close(attn_l.q_proj.weight, attn_b.q_proj.weight)  # same (block) input
    # o_proj reads the pruned q/k/v's attention output in "layer" mode, the dense one in "block" mode
    assert not torch.allclose(attn_l.o_proj.weight, attn_b.o_proj.weight)


@pytest.mark.parametrize("method,mode", [("wanda", "off"), ("sparsegpt", "layer")])
def test_auto_uses_the_method_default(method, mode, calib):
    auto, explicit = make_tiny_llama(seed=6), make_tiny_llama(seed=6)
    prune_(auto, {"method": method, "pattern": "2:4", "progress": False}, calibration=calib)
    prune_(explicit, {"method": method, "pattern": "2:4", "sequential": mode, "progress": False}, calibration=calib)
    for (name, a), (_, b) in zip(auto.named_parameters(), explicit.named_parameters()):
        assert torch.equal(a, b), name


def test_sequential_mode_names():
    from sparsemerge.prune.calibration import sequential_mode

    names = ("auto", "layer", "block", "off", True, False)
    assert [sequential_mode(v) for v in names] == ["auto", "layer", "block", "off", "block", "off"]
    with pytest.raises(SparsemergeError, match="sequential must be one of"):
        sequential_mode("sometimes")


def test_capture_stops_before_later_blocks_and_head(calib):
    model = make_tiny_llama()
    calls = {"head": 0, "block1": 0}
    model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))
    model.model.layers[1].register_forward_hook(lambda *a: calls.__setitem__("block1", calls["block1"] + 1))
    _, blocks = find_blocks(model)
    batches = capture_block_inputs(model, blocks[0], calib, batch_size=4)
    assert calls == {"head": 0, "block1": 0}
    assert [b[0].shape for b in batches] == [torch.Size([4, 24, 64])] * 2 + [torch.Size([2, 24, 64])]
    assert "position_embeddings" in batches[0][2]
    # the captured inputs reproduce the model's own hidden states after block 0
    hidden, rest, kwargs = batches[0]
    out = blocks[0](hidden, *rest, **kwargs)
    out = out[0] if isinstance(out, tuple) else out
    with torch.no_grad():
        ref = model(input_ids=calib[:4], use_cache=False, output_hidden_states=True).hidden_states[1]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4", "2:8", "unstructured:0.5", "unstructured:0.85", "block16:0.5"])
def test_every_pattern_with_both_methods(method, pattern, calib):
    model = make_tiny_llama()
    report = prune_(model, {"method": method, "pattern": pattern, "progress": False}, calibration=calib[:4])
    assert len(report.layers) == 14 and all(r.violations == 0 for r in report.layers)
    expected = {"2:4": 0.5, "4:8": 0.5, "1:4": 0.75, "2:8": 0.75}.get(pattern) or float(pattern.split(":")[1])
    assert report.sparsity == pytest.approx(expected, abs=1e-3)


@pytest.mark.parametrize("method", ["magnitude", "gradient", "taylor", "wanda", "sparsegpt"])
def test_sparsity_per_layer(method, calib):
    """Every method honours one sparsity per block (issue 13: magnitude, gradient and taylor
    used to ignore it and prune 0.5 everywhere)."""
    model = make_tiny_llama()
    report = prune_(
        model, {"method": method, "sparsity_per_layer": [0.25, 0.75], "progress": False}, calibration=calib[:4]
    )
    by_block = {r.name.split(".")[2]: r for r in report.layers}
    assert by_block["0"].pattern == "unstructured:0.25" and by_block["0"].sparsity == pytest.approx(0.25, abs=1e-3)
    assert by_block["1"].pattern == "unstructured:0.75" and by_block["1"].sparsity == pytest.approx(0.75, abs=1e-3)
    for r in report.layers:  # measured on the weights themselves, per layer
        weight = model.get_submodule(r.name).weight
        expected = 0.25 if r.name.split(".")[2] == "0" else 0.75
        assert float((weight == 0).float().mean()) == pytest.approx(expected, abs=1e-2)
    with pytest.raises(SparsemergeError, match=r"\[0, 1\)"):
        prune_(make_tiny_llama(), {"method": method, "sparsity_per_layer": [0.5, 1.5], "progress": False}, calibration=calib)
    with pytest.raises(SparsemergeError, match="one sparsity per block"):
        prune_(make_tiny_llama(), {"method": method, "sparsity_per_layer": [0.5], "progress": False}, calibration=calib)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_clear_errors(method, calib):
    with pytest.raises(SparsemergeError, match="per layer"):
        prune_(make_tiny_llama(), {"method": method, "pattern": "unstructured-global:0.5", "progress": False}, calibration=calib)
    with pytest.raises(SparsemergeError, match="outside the transformer blocks"):
        prune_(make_tiny_llama(), {"method": method, "include": ["lm_head", r"layers\.0\.mlp"], "exclude": [], "progress": False},
               calibration=calib)
    with pytest.raises(SparsemergeError, match="calibration"):
        prune_(make_tiny_llama(), {"method": method, "progress": False})


def test_pruning_helps_output_match(calib):
    """SparseGPT keeps the pruned model's logits closer to the dense ones than Wanda and magnitude."""
    dense = make_tiny_llama(seed=5)
    with torch.no_grad():
        ref = dense(input_ids=calib, use_cache=False).logits
    errors = {}
    for method in ("magnitude", "wanda", "sparsegpt"):
        model = make_tiny_llama(seed=5)
        prune_(model, {"method": method, "pattern": "2:4", "progress": False}, calibration=calib)
        with torch.no_grad():
            errors[method] = float((model(input_ids=calib, use_cache=False).logits - ref).norm())
    assert errors["sparsegpt"] < errors["magnitude"]
    assert errors["sparsegpt"] < errors["wanda"]


@pytest.mark.parametrize("method,pattern", [("sparsegpt", "2:4"), ("wanda", "unstructured:0.6")])
def test_cli_prune_then_check(method, pattern, tiny_llama_dir, text_file, tmp_path, capsys):
    from sparsemerge.cli.main import main

    out = tmp_path / "pruned"
    code = main(["prune", str(tiny_llama_dir), str(out), "--method", method, "--pattern", pattern,
                 "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--no-progress"])
    assert code == 0
    assert f"with {method} to {pattern}" in capsys.readouterr().out
    assert main(["check", str(out), "--pattern", pattern, "--quiet"]) == 0
    assert "0 violations" in capsys.readouterr().out


@pytest.mark.parametrize("mode", ["layer", "block", "off"])
def test_cli_sequential_flag_reaches_the_record(mode, tiny_llama_dir, text_file, tmp_path, capsys):
    import json

    from sparsemerge.cli.main import main

    out = tmp_path / f"pruned-{mode}"
    code = main(["prune", str(tiny_llama_dir), str(out), "--method", "wanda", "--sequential", mode,
                 "--calib", str(text_file), "--nsamples", "4", "--seqlen", "32", "--no-progress"])
    assert code == 0
    record = json.loads((out / "sparsemerge_prune.json").read_text())
    assert record["config"]["sequential"] == mode


def test_layer_walk_falls_back_to_block_when_one_batch_would_not_fit(calib, monkeypatch, caplog):
    import sparsemerge.prune.calibration as calibration

    monkeypatch.setattr(calibration, "LAYER_MODE_RAM_SHARE", 0.0)  # nothing fits
    fallback, block = make_tiny_llama(seed=7), make_tiny_llama(seed=7)
    with caplog.at_level("WARNING"):
        prune_(fallback, {"method": "sparsegpt", "pattern": "2:4", "sequential": "layer", "progress": False}, calibration=calib)
    assert "using sequential='block'" in caplog.text
    prune_(block, {"method": "sparsegpt", "pattern": "2:4", "sequential": "block", "progress": False}, calibration=calib)
    for (name, a), (_, b) in zip(fallback.named_parameters(), block.named_parameters()):
        assert torch.equal(a, b), name
