"""The streaming engine, configs, LoRA in/out, keep-pattern and the CLI on tiny random Llamas."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from merge_testlib import save_family, tensors
from sparsemerge.cli.main import main as cli_main
from sparsemerge.errors import SparsemergeError
from sparsemerge.io.writer import PlannedTensor, ShardedWriter
from sparsemerge.masks import check_pattern, nm_mask
from sparsemerge.merge import greedy_soup, load_config, run_merge


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from conftest import make_tokenizer

    root = tmp_path_factory.mktemp("family")
    base, tuned = save_family(root, 3, tokenizer=make_tokenizer(384))
    return root, base, tuned


def _ta(base: Path, tuned: list[Path], **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(m), "parameters": {"weight": 0.5}} for m in tuned], **extra}


def test_output_is_a_loadable_model_with_tokenizer_and_record(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, base, tuned = family
    out = tmp_path / "merged"
    report = run_merge(_ta(base, tuned), out)
    assert report.tensors == 20 and report.files == ["model.safetensors"]
    model = AutoModelForCausalLM.from_pretrained(out)
    text = "The team won the match in the final minutes."
    assert AutoTokenizer.from_pretrained(out)(text).input_ids == AutoTokenizer.from_pretrained(base)(text).input_ids
    record = json.loads((out / "sparsemerge_merge.json").read_text())
    assert record["method"] == "task_arithmetic"
    b, ts, merged = tensors(base), [tensors(t) for t in tuned], tensors(out)
    for key in b:
        expected = b[key] + sum(0.5 * (t[key] - b[key]) for t in ts)
        assert torch.allclose(merged[key], expected, atol=1e-6)
    assert torch.allclose(model.model.norm.weight, merged["model.norm.weight"])


def test_sharded_output_equals_single_file(family, tmp_path):
    from transformers import AutoModelForCausalLM

    _, base, tuned = family
    run_merge(_ta(base, tuned), tmp_path / "one")
    run_merge(_ta(base, tuned, shard_size="60KB"), tmp_path / "many")
    shards = sorted((tmp_path / "many").glob("model-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    one, many = tensors(tmp_path / "one"), tensors(tmp_path / "many")
    assert set(one) == set(many) and all(torch.equal(one[k], many[k]) for k in one)
    AutoModelForCausalLM.from_pretrained(tmp_path / "many")


def test_streaming_writer_layout_is_valid_safetensors(tmp_path):
    from safetensors.torch import load_file

    data = {"a": torch.randn(3, 5), "b": torch.arange(7, dtype=torch.int64), "c": torch.randn(4).to(torch.bfloat16), "d": torch.zeros(0)}
    plan = [PlannedTensor(k, tuple(v.shape), v.dtype) for k, v in data.items()]
    writer = ShardedWriter(tmp_path, 10**9, plan=plan, layout="plan")
    for k, v in data.items():
        writer.write(k, v)
    writer.finish()
    loaded = load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(loaded[k], v) for k, v in data.items())
    writer = ShardedWriter(tmp_path, 10**9, plan=plan, layout="plan", overwrite=True)  # the file exists now
    with pytest.raises(SparsemergeError, match="expected a"):
        writer.write("b", data["b"])
    writer.close()


def test_gradient_and_filter_parameters(family, tmp_path):
    _, base, tuned = family
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(tuned[0]), "parameters": {"weight": [{"filter": "mlp", "value": 0.0}, {"value": [0.0, 1.0]}]}}]}
    run_merge(cfg, tmp_path / "g")
    b, t, m = tensors(base), tensors(tuned[0]), tensors(tmp_path / "g")
    assert torch.equal(m["model.layers.0.self_attn.q_proj.weight"], b["model.layers.0.self_attn.q_proj.weight"])  # t = 0
    assert torch.allclose(m["model.layers.1.self_attn.q_proj.weight"], t["model.layers.1.self_attn.q_proj.weight"])  # t = 1
    assert torch.equal(m["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])  # filter
    assert torch.equal(m["model.embed_tokens.weight"], b["model.embed_tokens.weight"])  # outside layers: t = 0


def test_layer_stitching_renumbers_and_sets_config(family, tmp_path):
    _, base, tuned = family
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(tuned[0]), "layer_range": [0, 1]}]},
        {"sources": [{"model": str(tuned[1]), "layer_range": [0, 2]}]}]}
    run_merge(cfg, tmp_path / "s")
    m, a, b = tensors(tmp_path / "s"), tensors(tuned[0]), tensors(tuned[1])
    assert torch.equal(m["model.layers.0.mlp.up_proj.weight"], a["model.layers.0.mlp.up_proj.weight"])
    assert torch.equal(m["model.layers.2.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(m["model.norm.weight"], b["model.norm.weight"])
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 3


def test_dtype_and_out_dtype(family, tmp_path):
    _, base, tuned = family
    run_merge(_ta(base, tuned, dtype="bfloat16", out_dtype="float16"), tmp_path / "h")
    m = tensors(tmp_path / "h")
    assert {v.dtype for v in m.values()} == {torch.float16}
    assert json.loads((tmp_path / "h" / "config.json").read_text()).get("dtype", "float16") == "float16"


def test_dare_is_seeded(family, tmp_path):
    _, base, tuned = family
    cfg = {"merge_method": "dare_ties", "base_model": str(base), "parameters": {"weight": 1.0, "density": 0.5},
           "models": [{"model": str(m)} for m in tuned]}
    run_merge({**cfg, "seed": 3}, tmp_path / "a")
    run_merge({**cfg, "seed": 3}, tmp_path / "b")
    run_merge({**cfg, "seed": 4}, tmp_path / "c")
    a, b, c = tensors(tmp_path / "a"), tensors(tmp_path / "b"), tensors(tmp_path / "c")
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(a[key], b[key]) and not torch.equal(a[key], c[key])


def test_bad_inputs_fail_clearly_and_write_nothing(family, tmp_path):
    from conftest import make_tiny_llama

    _, base, tuned = family
    other = tmp_path / "other-vocab"
    make_tiny_llama(seed=5, vocab_size=400).save_pretrained(other)
    with pytest.raises(SparsemergeError, match=r"different shapes.*vocabularies differ.*embed_tokens.*\[400, 64\]"):
        run_merge(_ta(base, [tuned[0], other]), tmp_path / "x")
    with pytest.raises(SparsemergeError, match="not found"):
        run_merge(_ta(base, [tmp_path / "nowhere"]), tmp_path / "x")
    with pytest.raises(SparsemergeError, match="unknown merge method 'frankenmerge'.*ties"):
        run_merge({**_ta(base, tuned), "merge_method": "frankenmerge"}, tmp_path / "x")
    with pytest.raises(SparsemergeError, match="does not take parameter.*densty"):
        run_merge({**_ta(base, tuned), "parameters": {"densty": 0.5}}, tmp_path / "x")
    with pytest.raises(SparsemergeError, match="missing required parameter 'weight'"):
        run_merge({"merge_method": "ties", "base_model": str(base), "models": [{"model": str(tuned[0])}]}, tmp_path / "x")
    with pytest.raises(SparsemergeError, match="needs a base_model"):
        run_merge({"merge_method": "ties", "models": [{"model": str(tuned[0]), "parameters": {"weight": 1}}]}, tmp_path / "x")
    with pytest.raises(SparsemergeError, match="exactly one of 'models' or 'slices'"):
        load_config({"merge_method": "linear"})
    with pytest.raises(SparsemergeError, match="extra|not permitted|Extra"):
        load_config({"merge_method": "linear", "models": [{"model": "a"}], "bogus_key": 1})
    assert not (tmp_path / "x").exists()
    (tmp_path / "exists").mkdir()
    with pytest.raises(SparsemergeError, match="already exists"):
        run_merge(_ta(base, tuned), tmp_path / "exists")


def test_failure_mid_merge_leaves_no_output(family, tmp_path, monkeypatch):
    import sparsemerge.merge.task_arithmetic as ta_mod
    from sparsemerge.merge.base import MERGE_METHODS

    _, base, tuned = family
    spec = MERGE_METHODS.get("task_arithmetic")
    calls = {"n": 0}

    def boom(inputs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("disk on fire")
        return ta_mod.task_arithmetic(inputs)

    monkeypatch.setitem(MERGE_METHODS._items, "task_arithmetic", type(spec)(**{**spec.__dict__, "fn": boom}))
    with pytest.raises(RuntimeError, match="disk on fire"):
        run_merge(_ta(base, tuned), tmp_path / "half")
    assert not (tmp_path / "half").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".half")]


def _pruned_family(root: Path) -> tuple[Path, list[Path]]:
    """Base and variants pruned to 2:4 (each with its own mask) on the layer weights."""
    base, tuned = save_family(root, 2)
    for folder in [base, *tuned]:
        state = tensors(folder)
        for k, v in state.items():
            if ".layers." in k and v.dim() == 2:
                state[k] = v * nm_mask(v.abs(), 2, 4)
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return base, tuned


def test_keep_pattern_projects_merges_of_pruned_models(tmp_path):
    base, tuned = _pruned_family(tmp_path)
    cfg = {"merge_method": "ties", "base_model": str(base), "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.7}} for m in tuned]}
    run_merge(cfg, tmp_path / "dense")
    key = "model.layers.0.mlp.up_proj.weight"
    assert not check_pattern(tensors(tmp_path / "dense")[key], "2:4").ok  # a plain merge breaks 2:4
    report = run_merge(cfg, tmp_path / "kept", keep_pattern="2:4")
    assert report.pattern["violations"] == 0 and report.pattern["tensors"] == 14
    kept = tensors(tmp_path / "kept")
    for k, v in kept.items():
        if ".layers." in k and v.dim() == 2:
            assert check_pattern(v, "2:4").ok, k
    report = run_merge(cfg, tmp_path / "base-mask", keep_pattern="2:4", keep_mask="base")
    b, m = tensors(base), tensors(tmp_path / "base-mask")
    assert torch.equal(m[key] != 0, (b[key] != 0) & (m[key] != 0))
    assert ((m[key] != 0) & (b[key] == 0)).sum() == 0
    assert report.pattern["keep_mask"] == "base"


def _write_adapter(folder: Path, base: Path, seed: int, rank: int = 4, alpha: int = 8) -> None:
    folder.mkdir()
    g = torch.Generator().manual_seed(seed)
    b = tensors(base)
    state = {}
    for layer in range(2):
        for mod in ("self_attn.q_proj", "mlp.down_proj"):
            out_f, in_f = b[f"model.layers.{layer}.{mod}.weight"].shape
            key = f"base_model.model.model.layers.{layer}.{mod}"
            state[f"{key}.lora_A.weight"] = torch.randn(rank, in_f, generator=g) * 0.1
            state[f"{key}.lora_B.weight"] = torch.randn(out_f, rank, generator=g) * 0.1
    save_file(state, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "down_proj"],
         "base_model_name_or_path": str(base)}))


def test_lora_adapters_in_and_merged_lora_out(family, tmp_path):
    _, base, _ = family
    a, c = tmp_path / "lora-a", tmp_path / "lora-c"
    _write_adapter(a, base, 1)
    _write_adapter(c, base, 2)
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base),
           "models": [{"model": str(a), "parameters": {"weight": 1.0}}, {"model": f"{base}+{c}", "parameters": {"weight": 0.5}}]}
    run_merge(cfg, tmp_path / "full")
    full, b = tensors(tmp_path / "full"), tensors(base)
    sa, sc = tensors(a), tensors(c)
    key = "model.layers.1.self_attn.q_proj"
    delta = lambda s: s[f"base_model.model.{key}.lora_B.weight"] @ s[f"base_model.model.{key}.lora_A.weight"] * 2.0  # noqa: E731
    assert torch.allclose(full[key + ".weight"], b[key + ".weight"] + delta(sa) + 0.5 * delta(sc), atol=1e-5)
    assert torch.equal(full["model.layers.1.self_attn.k_proj.weight"], b["model.layers.1.self_attn.k_proj.weight"])
    report = run_merge(cfg, tmp_path / "lora-out", lora_rank=8)  # rank 4 + 4: exact
    out_cfg = json.loads((tmp_path / "lora-out" / "adapter_config.json").read_text())
    assert out_cfg["r"] == 8 and sorted(out_cfg["target_modules"]) == ["down_proj", "q_proj"]
    out = tensors(tmp_path / "lora-out")
    rebuilt = out[f"base_model.model.{key}.lora_B.weight"] @ out[f"base_model.model.{key}.lora_A.weight"]
    assert torch.allclose(rebuilt, full[key + ".weight"] - b[key + ".weight"], atol=1e-5)
    assert max(report.lora["relative_error"].values()) < 1e-4
    low = run_merge(cfg, tmp_path / "lora-2", lora_rank=2)
    assert min(low.lora["relative_error"].values()) > 0.01


def test_greedy_soup_keeps_only_helpful_models():
    target = torch.ones(4)
    cands = [{"w": target + 0.1}, {"w": target - 0.1}, {"w": target + 5.0}, {"w": target + 0.2}]
    result = greedy_soup(cands, lambda sd: float((sd["w"] - target).abs().sum()))
    assert result.chosen[0] == 0 and 1 in result.chosen and 2 not in result.chosen
    assert result.score <= min(result.individual)
    assert torch.allclose(result.state_dict["w"], torch.stack([cands[i]["w"] for i in result.chosen]).mean(0))


def test_cli_merge(family, tmp_path, capsys):
    _, base, tuned = family
    config = tmp_path / "ties.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "ties", "base_model": str(base),
                                      "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}} for m in tuned]}))
    assert cli_main(["merge", str(config), str(tmp_path / "o"), "--keep-pattern", "2:4", "--no-progress"]) == 0
    assert "kept on 2:4" in capsys.readouterr().out
    assert cli_main(["merge", str(config), str(tmp_path / "o"), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["merge", str(config), str(tmp_path / "o"), "--no-progress", "--overwrite"]) == 0


def test_packed_sparse_quantized_task_vector_round_trip(family, tmp_path, capsys):
    from sparsemerge.formats.model import read_packed
    from sparsemerge.merge.task_vectors import apply_packed_task_vector

    _, base, tuned = family
    config = tmp_path / "dare.yaml"
    config.write_text(yaml.safe_dump({"merge_method": "dare_ties", "base_model": str(base),
                                      "parameters": {"weight": 1.0, "density": 0.2},
                                      "models": [{"model": str(m)} for m in tuned[:2]]}))
    assert cli_main(["merge", str(config), str(tmp_path / "m"), "--no-progress", "--task-vector-out", str(tmp_path / "tv")]) == 0
    assert "task vector:" in capsys.readouterr().out
    with read_packed(tmp_path / "tv") as tv:
        key = "model.layers.0.mlp.up_proj.weight"
        assert tv.record(key)["format"] == "bitmask" and tv.record(key)["params"]["codec"]["kind"] == "int8"
        total = sum(tv.nbytes(n) for n in tv.names())
    merged_bytes = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert total < 0.5 * merged_bytes
    apply_packed_task_vector(base, tmp_path / "tv", tmp_path / "rebuilt")
    rebuilt, merged, b = tensors(tmp_path / "rebuilt"), tensors(tmp_path / "m"), tensors(base)
    tau = merged[key] - b[key]
    err = (rebuilt[key] - merged[key]).abs().max().item()
    assert err <= tau.abs().max().item() / 100  # int8 per-group rounding
    assert int(((rebuilt[key] != b[key]) & (tau == 0)).sum()) == 0  # zeros of tau stay exact
    assert (rebuilt[key] != b[key]).float().mean().item() > 0.5 * (tau != 0).float().mean().item()


def test_single_safetensors_file_and_adapter_folder_inputs(family, tmp_path):
    """A bare .safetensors file is a model; a LoRA folder finds its base via base_model_name_or_path."""
    import shutil

    _, base, tuned = family
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(tuned[0] / "model.safetensors", single / "weights.safetensors")
    cfg = {"merge_method": "linear", "models": [{"model": str(single / "weights.safetensors"), "parameters": {"weight": 1.0}},
                                                {"model": str(tuned[1]), "parameters": {"weight": 1.0}}]}
    run_merge(cfg, tmp_path / "o")
    m, a, b = tensors(tmp_path / "o"), tensors(tuned[0]), tensors(tuned[1])
    assert all(torch.allclose(m[k], (a[k] + b[k]) / 2, atol=1e-6) for k in m)
    adapter = tmp_path / "adapter"
    _write_adapter(adapter, base, 3)
    run_merge({"merge_method": "passthrough", "models": [{"model": str(adapter)}]}, tmp_path / "p")
    p, bb = tensors(tmp_path / "p"), tensors(base)
    assert not torch.equal(p["model.layers.0.self_attn.q_proj.weight"], bb["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(p["model.layers.0.self_attn.k_proj.weight"], bb["model.layers.0.self_attn.k_proj.weight"])
