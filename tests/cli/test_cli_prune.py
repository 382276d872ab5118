"""End-to-end: the `sparsemerge` command on a tiny random Llama built in the test."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparsemerge.cli.main import main
from sparsemerge.io import load_model


def run(*args: str) -> int:
    return main([str(a) for a in args])


def test_prune_check_eval_end_to_end(tiny_llama_dir, tmp_path, text_file, capsys):
    out = tmp_path / "pruned"
    assert run("prune", tiny_llama_dir, out, "--pattern", "2:4", "--method", "magnitude", "--no-progress") == 0
    record = json.loads((out / "sparsemerge_prune.json").read_text())
    assert record["pattern"] == "2:4" and record["method"] == "magnitude"
    assert len(record["source"]["sha256"]) == 64
    assert len(record["layers"]) == 14 and all(layer["sparsity"] == 0.5 for layer in record["layers"])  # 2 of every 4
    # transformers loads OUT as it is
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5
    capsys.readouterr()
    assert run("check", out, "--pattern", "2:4") == 0
    table = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in table and "0 violations" in table
    assert run("check", tiny_llama_dir, "--pattern", "2:4", "--quiet") == 1  # the dense model violates
    assert " 0 violations" not in capsys.readouterr().out
    assert run("eval", "ppl", out, "--data", text_file, "--seqlen", "32", "--no-progress") == 0
    line = capsys.readouterr().out
    assert "perplexity" in line
    # the same number from a hand-written loop over all 32-token windows of the file
    from transformers import AutoTokenizer

    from layout_reference import hand_perplexity

    ids = AutoTokenizer.from_pretrained(out)(text_file.read_text(), add_special_tokens=False).input_ids
    windows = torch.tensor(ids[: len(ids) // 32 * 32]).reshape(-1, 32)
    assert float(line.split()[1]) == pytest.approx(hand_perplexity(model.eval(), windows), rel=1e-5)
    # a packed checkpoint is evaluated from its stored values: unquantized, the same perplexity
    assert run("pack", out, tmp_path / "packed", "--quant", "none") == 0
    capsys.readouterr()
    assert run("eval", "ppl", tmp_path / "packed", "--data", text_file, "--seqlen", "32", "--no-progress") == 0
    packed_line = capsys.readouterr().out
    assert float(packed_line.split()[1]) == pytest.approx(float(line.split()[1]), rel=1e-4)
    assert "decode runtime, float activations" in packed_line  # decoded token by token by the runtime
    assert run("eval", "ppl", tmp_path / "packed", "--data", text_file, "--seqlen", "32", "--no-progress", "--runtime", "off") == 0
    off_line = capsys.readouterr().out
    assert "transformers" in off_line and float(off_line.split()[1]) == pytest.approx(float(line.split()[1]), rel=1e-4)


def test_prune_gradient_with_text_calibration(tiny_llama_dir, tmp_path, text_file):
    out = tmp_path / "g"
    rc = run("prune", tiny_llama_dir, out, "--pattern", "4:8", "--method", "gradient", "--calib", text_file, "--nsamples", "2", "--seqlen", "32", "--no-progress")
    assert rc == 0
    assert run("check", out, "--pattern", "4:8", "--quiet") == 0


def test_existing_output_is_not_touched(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    assert run("prune", tiny_llama_dir, out) == 2
    assert "already exists" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert run("prune", tiny_llama_dir, out, "--overwrite", "--no-progress") == 0
    assert (out / "sparsemerge_prune.json").exists() and not (out / "keep.txt").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pattern", "4:4"], "0 < N < M"),
        (["--pattern", "2:0"], "M > 0"),
        (["--pattern", "two:four"], "unknown sparsity pattern"),
        (["--method", "nope"], "known pruning methods"),
    ],
)
def test_bad_options(tiny_llama_dir, tmp_path, capsys, args, message):
    out = tmp_path / "o"
    assert run("prune", tiny_llama_dir, out, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_and_corrupt_sources(tiny_llama_dir, tmp_path, capsys):
    assert run("prune", tmp_path / "nowhere", tmp_path / "o") == 2
    assert "not found" in capsys.readouterr().err
    weights = tiny_llama_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert run("prune", tiny_llama_dir, tmp_path / "o") == 2
    assert "could not" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_corrupt_gguf(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SPARSEMERGE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    assert run("prune", bad, tmp_path / "o") == 2
    assert "could not read GGUF" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_nan_weights_leave_nothing(tiny_llama_dir, tmp_path, capsys):
    weights = tiny_llama_dir / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.mlp.gate_proj.weight"][0, 0] = float("nan")
    save_file(state, weights, metadata={"format": "pt"})
    assert run("prune", tiny_llama_dir, tmp_path / "o") == 2
    assert "NaN" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_indivisible_layer_is_reported(tmp_path, tiny_tokenizer, capsys):
    from conftest import make_tiny_llama

    src = tmp_path / "odd"
    make_tiny_llama(intermediate=100).save_pretrained(src)  # down_proj input 100 is not divisible by 8
    tiny_tokenizer.save_pretrained(src)
    assert run("prune", src, tmp_path / "o", "--pattern", "4:8", "--no-progress") == 0
    assert "skipped model.layers.0.mlp.down_proj: input dimension 100 not divisible by M=8" in capsys.readouterr().err
    pruned = load_model(tmp_path / "o").model
    assert (pruned.model.layers[0].mlp.down_proj.weight != 0).all()
    assert run("check", tmp_path / "o", "--pattern", "4:8") == 0
    assert "skipped" in capsys.readouterr().out


def test_recipe_yaml(tiny_llama_dir, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("prune:\n  pattern: '1:4'\n  method: magnitude\n")
    assert run("prune", tiny_llama_dir, tmp_path / "o", "--recipe", recipe, "--no-progress") == 0
    assert run("check", tmp_path / "o", "--pattern", "1:4", "--quiet") == 0
    recipe.write_text("prune:\n  patern: '1:4'\n")
    assert run("prune", tiny_llama_dir, tmp_path / "o2", "--recipe", recipe) == 2
