"""``sparsemerge plan`` and ``run`` on the decode runtime."""
from __future__ import annotations

import json

from conftest import make_tiny_llama
from sparsemerge.cli.main import main
from sparsemerge.masks import nm_mask


def _pruned_dir(tmp_path, tokenizer):
    model = make_tiny_llama(hidden=128, intermediate=256)
    for name, p in model.named_parameters():
        if "layers" in name and name.endswith("proj.weight"):
            p.data *= nm_mask(p.data.abs(), 2, 4)
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def test_plan_prints_a_kernel_per_product_and_writes_json(tmp_path, tiny_tokenizer, capsys):
    hf = _pruned_dir(tmp_path, tiny_tokenizer)
    assert main(["plan", str(hf), "--quant", "int4", "--group-size", "128", "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    assert "layers.{0-1}.self_attn.q_proj+k_proj+v_proj" in out and "int4 g128" in out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["supported"] and len(plan["layers"]) == 2 * 4 + 1
    assert {r["kernel"] for r in plan["layers"][:-1]} == {"numba-gemv24"}  # float activations, int4 codes
    assert main(["plan", str(hf), "--quant", "int4", "--all-layers"]) == 0
    assert "model.layers.1.mlp.down_proj" in capsys.readouterr().out
    # an existing --json is kept unless --overwrite
    (tmp_path / "plan.json").write_text("keep")
    assert main(["plan", str(hf), "--json", str(tmp_path / "plan.json")]) == 2
    assert "already exists" in capsys.readouterr().err and (tmp_path / "plan.json").read_text() == "keep"
    assert main(["plan", str(hf), "--json", str(tmp_path / "plan.json"), "--overwrite"]) == 0
    assert json.loads((tmp_path / "plan.json").read_text())["supported"]


def test_plan_runs_other_patterns_on_the_general_kernel(tmp_path, tiny_tokenizer, capsys):
    hf = _pruned_dir(tmp_path, tiny_tokenizer)
    assert main(["plan", str(hf), "--pattern", "1:4", "--prune"]) == 0
    out = capsys.readouterr().out
    assert "numba-general" in out and "1:4" in out and "not used" not in out


def test_plan_says_what_falls_back_when_no_decode_kernel_can_run_a_layer(tmp_path, tiny_tokenizer, capsys, monkeypatch):
    hf = _pruned_dir(tmp_path, tiny_tokenizer)
    monkeypatch.setenv("SPARSEMERGE_KERNEL", "reference")  # a row the compiled step cannot call
    assert main(["plan", str(hf), "--pattern", "2:4", "--prune"]) == 0
    out = capsys.readouterr().out
    assert "not used" in out and "reference" in out and "transformers path" in out


def test_run_streams_with_sampling_and_stops(tmp_path, tiny_tokenizer, capsys):
    hf = _pruned_dir(tmp_path, tiny_tokenizer)
    args = ["run", str(hf), "--quant", "int8", "--prompt", "the quick", "--max-new-tokens", "12"]
    assert main(args + ["--temperature", "0.8", "--top-k", "20", "--seed", "1"]) == 0
    first = capsys.readouterr().out
    assert main(args + ["--temperature", "0.8", "--top-k", "20", "--seed", "1"]) == 0
    assert capsys.readouterr().out.split("[")[0] == first.split("[")[0]  # seeded: the same text
    assert "decode runtime" in first and first.startswith("the quick")


def test_run_stops_at_a_stop_string(tmp_path, tiny_tokenizer, capsys):
    hf = _pruned_dir(tmp_path, tiny_tokenizer)
    args = ["run", str(hf), "--prompt", "the quick", "--max-new-tokens", "12"]
    assert main(args) == 0
    text = capsys.readouterr().out.split("[")[0][len("the quick"):].rstrip("\n")
    if len(text.strip()) < 3:
        return  # the tiny model produced too little text to cut
    stop = text.strip()[1:3]
    assert main(args + ["--stop", stop]) == 0
    out = capsys.readouterr().out
    assert "stopped: stop string" in out
    assert out.split("[")[0][len("the quick"):].rstrip("\n") == text[: text.index(stop)]


def test_eval_ppl_of_a_packed_model_with_int8_activations(tmp_path, tiny_tokenizer, text_file, capsys):
    hf = _pruned_dir(tmp_path, tiny_tokenizer)
    assert main(["pack", str(hf), str(tmp_path / "packed"), "--quant", "int8"]) == 0
    base = ["eval", "ppl", str(tmp_path / "packed"), "--data", str(text_file), "--seqlen", "32", "--no-progress"]
    capsys.readouterr()
    assert main(base) == 0
    float_line = capsys.readouterr().out
    assert main(base + ["--act-quant", "int8"]) == 0
    int8_line = capsys.readouterr().out
    assert "INT8 activations" in int8_line and "float activations" in float_line
    f, q = float(float_line.split()[1]), float(int8_line.split()[1])
    assert f != q and abs(q / f - 1) < 0.05  # the activation rounding: applied, and small
