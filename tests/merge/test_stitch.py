"""Stitching with seam adapters: the ridge fit, a stitch whose exact adapter is known (B = A with
its residual stream permuted), loading and saving, adapter training, config errors."""
from __future__ import annotations

import json
import re

import pytest
import torch

from conftest import make_tiny_llama
from sparsemerge.errors import SparsemergeError
from sparsemerge.io import load_model, save_model
from sparsemerge.merge import load_config, run_merge
from sparsemerge.merge.align import apply_permutation, llama_spec
from sparsemerge.merge.stitch import SeamAdapter, adapters_of, attach_adapter_, fit_ridge, layer_inputs


def test_fit_ridge_exact_and_identity_limits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g)
    m, c = torch.randn(6, 6, generator=g), torch.randn(6, generator=g)
    y = x @ m.T + c
    w, b = fit_ridge(x, y, ridge=0.0)
    torch.testing.assert_close(w, m, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b, c, atol=1e-4, rtol=1e-4)
    w, b = fit_ridge(x, y, ridge=1e9)  # all weight on the prior: the identity
    torch.testing.assert_close(w, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(b, torch.zeros(6), atol=1e-5, rtol=0)
    # in between: the normal equations of the ridge problem, solved by hand
    w, b = fit_ridge(x, y, ridge=0.1)
    xa = torch.cat([x, torch.ones(200, 1)], 1).double()
    lam = 0.1 * float(x.double().square().sum()) / 6
    prior = torch.cat([torch.eye(6), torch.zeros(1, 6)]).double()
    sol = torch.linalg.solve(xa.T @ xa + lam * torch.eye(7, dtype=torch.float64), xa.T @ y.double() + lam * prior)
    torch.testing.assert_close(w, sol[:6].T.float())
    torch.testing.assert_close(b, sol[6].float())


def _untied_llama(seed: int = 0):
    """A 4-layer tiny Llama with its own LM head (a stitched model takes the head with the last
    slice and the embedding with the first, so a tied head would read the wrong basis)."""
    from transformers import LlamaForCausalLM

    config = make_tiny_llama(layers=4).config
    config.tie_word_embeddings = False
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def permuted_pair(tmp_path, tiny_tokenizer):
    """A and B = A with its residual stream permuted (same function, different basis)."""
    a = _untied_llama()
    spec = llama_spec(a, ["hidden"])
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    b = _untied_llama()
    with torch.no_grad():
        params = dict(b.named_parameters())
        for n, t in apply_permutation(dict(a.named_parameters()), spec, {"hidden": perm}).items():
            params[n].copy_(t)
    dirs = []
    for name, model in (("a", a), ("b", b)):
        d = tmp_path / name
        model.save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        dirs.append(d)
    return a, perm, dirs


def _config(a_dir, b_dir, text_file, adapter=True, **stitch):
    return {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(a_dir), "layer_range": [0, 2]}]},
            {"sources": [{"model": str(b_dir), "layer_range": [2, 4]}], "adapter": adapter},
        ],
        "stitch": {"data": str(text_file), "nsamples": 8, "seqlen": 48, **stitch},
    }


def test_stitch_recovers_the_known_seam_map(permuted_pair, text_file, tmp_path):
    a, perm, (a_dir, b_dir) = permuted_pair
    out = tmp_path / "stitched"
    report = run_merge(_config(a_dir, b_dir, text_file, adapter={"ridge": 1e-8}), out)
    seam = report.stitch["seams"][0]
    assert seam["layer"] == 2 and seam["source_layer"] == 2
    assert seam["relative_error_identity"] > 0.5 and seam["relative_error_fitted"] < 1e-3
    record = json.loads((out / "sparsemerge_merge.json").read_text())
    assert record["stitch"]["seams"][0]["layer"] == 2
    stitched = load_model(out).model
    adapter = adapters_of(stitched)[2]
    # y = x[perm]: W is the permutation matrix, b is 0
    torch.testing.assert_close(adapter.weight, torch.eye(64)[perm], atol=2e-3, rtol=0)
    torch.testing.assert_close(adapter.bias, torch.zeros(64), atol=2e-3, rtol=0)
    ids = torch.randint(0, 384, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = a(ids).logits
        torch.testing.assert_close(stitched(ids).logits, ref, atol=5e-3, rtol=1e-3)
        # the plain passthrough (what transformers alone loads) is broken at the seam
        plain = type(stitched).from_pretrained(out)
        assert float((plain(ids).logits - ref).abs().max()) > 0.1
    assert "stitch_adapter" not in " ".join(stitched.state_dict())  # kept out of the weights


def test_adapters_round_trip_through_save_model(permuted_pair, text_file, tmp_path):
    _, _, (a_dir, b_dir) = permuted_pair
    out = tmp_path / "stitched"
    run_merge(_config(a_dir, b_dir, text_file), out)
    loaded = load_model(out)
    copy = save_model(loaded.model, loaded.tokenizer, tmp_path / "copy")
    again = load_model(copy).model
    assert sorted(adapters_of(again)) == [2]
    ids = torch.randint(0, 384, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, loaded.model(ids).logits)
    # attaching by hand gives the same model as loading
    plain = type(again).from_pretrained(out)
    adapter = SeamAdapter(64)
    with torch.no_grad():
        adapter.weight.copy_(adapters_of(again)[2].weight)
        adapter.bias.copy_(adapters_of(again)[2].bias)
    attach_adapter_(plain, 2, adapter)
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, again(ids).logits)
    # layer_inputs sees the stream before the layer's own adapter
    x = layer_inputs(plain, ids, 2)
    assert x.shape == (16, 64)
    with pytest.raises(SparsemergeError, match="already has"):
        attach_adapter_(plain, 2, SeamAdapter(64))


def test_adapter_steps_lower_the_loss(permuted_pair, text_file, tmp_path):
    _, _, (a_dir, b_dir) = permuted_pair
    # a strong pull to the identity leaves a poor closed-form adapter; Adam steps on the
    # next-token loss improve it
    report = run_merge(_config(a_dir, b_dir, text_file, adapter={"ridge": 100.0, "steps": 30, "lr": 3e-2}), tmp_path / "s")
    tuning = report.stitch["tuning"]
    assert tuning["loss_after"] < tuning["loss_before"] - 0.01


def test_stitch_config_errors(permuted_pair, text_file):
    _, _, (a_dir, b_dir) = permuted_pair
    cfg = _config(a_dir, b_dir, text_file)
    assert load_config(cfg).slices[1].adapter is True
    bad_first = {**cfg, "slices": [{**cfg["slices"][0], "adapter": True}, cfg["slices"][1]]}
    with pytest.raises(SparsemergeError, match="first slice"):
        load_config(bad_first)
    with pytest.raises(SparsemergeError, match="passthrough"):
        load_config({**cfg, "merge_method": "linear"})
    with pytest.raises(SparsemergeError, match="no slice has"):
        load_config({**cfg, "slices": [cfg["slices"][0], {**cfg["slices"][1], "adapter": False}]})
    with pytest.raises(SparsemergeError, match="ridges"):
        load_config({**cfg, "slices": [cfg["slices"][0], {**cfg["slices"][1], "adapter": {"ridges": 1}}]})
    with pytest.raises(SparsemergeError, match="nsample"):
        load_config({**cfg, "stitch": {"nsample": 3}})


def test_merge_cli_stitches_and_eval_uses_the_adapters(permuted_pair, text_file, tmp_path, capsys):
    import yaml

    from sparsemerge.cli.main import main

    _, _, (a_dir, b_dir) = permuted_pair
    path = tmp_path / "stitch.yaml"
    path.write_text(yaml.safe_dump(_config(a_dir, b_dir, text_file, adapter={"ridge": 1e-8})))
    assert main(["merge", str(path), str(tmp_path / "out"), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "stitch adapter before layer 2" in text and "fitted" in text
    # perplexity through the CLI (load_model installs the adapters) equals model A's
    assert main(["eval", "ppl", str(tmp_path / "out"), "--data", str(text_file), "--seqlen", "32", "--max-windows", "2", "--no-progress"]) == 0
    stitched = capsys.readouterr().out
    assert main(["eval", "ppl", str(a_dir), "--data", str(text_file), "--seqlen", "32", "--max-windows", "2", "--no-progress"]) == 0
    original = capsys.readouterr().out
    ppl = [float(re.search(r"perplexity ([0-9.]+)", s).group(1)) for s in (stitched, original)]
    assert ppl[0] == pytest.approx(ppl[1], rel=1e-3)


def test_tensor_level_commands_refuse_a_stitched_model(permuted_pair, text_file, tmp_path):
    from sparsemerge.formats.model import pack

    _, _, (a_dir, b_dir) = permuted_pair
    out = tmp_path / "stitched"
    run_merge(_config(a_dir, b_dir, text_file), out)
    with pytest.raises(SparsemergeError, match="seam adapters"):
        run_merge({"merge_method": "linear", "models": [{"model": str(out)}, {"model": str(a_dir)}]}, tmp_path / "m")
    with pytest.raises(SparsemergeError, match="seam adapters"):
        pack(out, tmp_path / "packed")
