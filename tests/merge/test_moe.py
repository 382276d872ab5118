"""MoE assembly from task models (sparsemerge.merge.moe) on tiny random Llamas: the layout
against the inputs, router rows against hand computations, transformers loading and
generating, identical experts computing the base's function, routing report, bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from conftest import make_tiny_llama, make_tokenizer
from merge_testlib import save_family, tensors
from sparsemerge.errors import SparsemergeError
from sparsemerge.merge.moe import build_moe, format_routing, load_moe_config, route_texts

PROMPTS = [["The government said on Monday"], ["The team won the match"], ["A new phone was launched"]]


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    tok = make_tokenizer(384)
    base, tuned = save_family(root, 3, tokenizer=tok)
    return root, base, tuned, tok


def _cfg(base: Path, experts: list[Path], mode: str = "cheap_embed", **extra) -> dict:
    return {"base_model": str(base), "gate_mode": mode,
            "experts": [{"source_model": str(e), "positive_prompts": PROMPTS[i % 3] + ([f"x{i}"] if i >= 3 else [])}
                        for i, e in enumerate(experts)], **extra}


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).eval()


def test_mixtral_layout_takes_mlps_from_experts_and_the_rest_from_base(family, tmp_path):
    root, base, tuned, tok = family
    out = tmp_path / "moe"
    report = build_moe(_cfg(base, tuned), out)
    assert report.architecture == "mixtral" and report.experts == 3 and report.layers == 2
    got, b = tensors(out), tensors(base)
    ts = [tensors(t) for t in tuned]
    for layer in range(2):
        p = f"model.layers.{layer}.mlp"
        for e in range(3):
            assert torch.equal(got[f"{p}.experts.gate_up_proj"][e, :128], ts[e][f"{p}.gate_proj.weight"])
            assert torch.equal(got[f"{p}.experts.gate_up_proj"][e, 128:], ts[e][f"{p}.up_proj.weight"])
            assert torch.equal(got[f"{p}.experts.down_proj"][e], ts[e][f"{p}.down_proj.weight"])
        for name in ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight", "self_attn.o_proj.weight"):
            key = f"model.layers.{layer}.{name}"
            assert torch.equal(got[key], b[key])
    assert torch.equal(got["model.embed_tokens.weight"], b["model.embed_tokens.weight"])
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 3 and config["num_experts_per_tok"] == 2
    assert (out / "tokenizer.json").is_file() and (out / "sparsemerge_moe.json").is_file()


def test_cheap_embed_rows_are_the_normalised_sum_of_prompt_embeddings(family, tmp_path):
    root, base, tuned, tok = family
    cfg = _cfg(base, tuned)
    cfg["experts"][0]["negative_prompts"] = ["The film won"]
    build_moe(cfg, tmp_path / "moe")
    router = tensors(tmp_path / "moe")["model.layers.1.mlp.gate.weight"]
    embed = tensors(base)["model.embed_tokens.weight"]
    bos = tok.bos_token

    def summed(prompts):  # by hand: sum of embedding rows of bos + prompt tokens, normalised
        v = sum(embed[tok(bos + p, add_special_tokens=False)["input_ids"]].sum(0) for p in prompts)
        return v / v.norm()

    for e in range(3):
        want = summed(PROMPTS[e])
        if e == 0:
            want = want - summed(["The film won"])
        want = want / want.norm()
        torch.testing.assert_close(router[e], want, rtol=0, atol=1e-6)


def test_hidden_rows_at_layer0_are_the_last_tokens_embeddings(family, tmp_path):
    """hidden: the state entering layer 0 is the embedding (bfloat16), at each prompt's last token."""
    root, base, tuned, tok = family
    cfg = _cfg(base, tuned, "hidden", dtype="float32")
    cfg["experts"][1]["positive_prompts"] = ["The team won the match", "Shares rose after the results"]
    build_moe(cfg, tmp_path / "moe")
    router = tensors(tmp_path / "moe")["model.layers.0.mlp.gate.weight"]
    embed = tensors(base)["model.embed_tokens.weight"].bfloat16()
    for e, prompts in enumerate(p["positive_prompts"] for p in cfg["experts"]):
        last = [tok(p, add_special_tokens=False)["input_ids"][-1] for p in prompts]
        v = embed[last].float().mean(0)
        torch.testing.assert_close(router[e], v / v.norm(), rtol=0, atol=2e-2)  # bfloat16 arithmetic
    avg = build_moe({**cfg, "gate_mode": "hidden_avg"}, tmp_path / "avg")
    assert avg.gate_mode == "hidden_avg"
    assert not torch.equal(tensors(tmp_path / "avg")["model.layers.1.mlp.gate.weight"], tensors(tmp_path / "moe")["model.layers.1.mlp.gate.weight"])


def test_routers_shared_between_threads_equal_one_thread(family, tmp_path, monkeypatch):
    """The main thread, done copying, takes experts' forward passes from the router thread's
    queue; every router equals the one-thread gate_vectors result bit for bit, and both threads
    did compute rows (each row is slowed so that the main thread arrives in time)."""
    import threading
    import time

    import sparsemerge.merge.moe.build as build
    from sparsemerge.merge.moe import gate_vectors
    from sparsemerge.merge.moe.gates import expert_gate_fn as real_fn, prepare_tokenizer
    from transformers import AutoTokenizer

    root, base, tuned, tok = family
    cfg = _cfg(base, tuned * 2, "hidden", dtype="float32")  # six experts, prompts of the three kinds
    ran_on: list[str] = []

    def slow_fn(*args, **kwargs):
        row = real_fn(*args, **kwargs)

        def slowed(expert):
            ran_on.append(threading.current_thread().name)
            time.sleep(0.2)
            return row(expert)
        return slowed

    monkeypatch.setattr(build, "expert_gate_fn", slow_fn)
    monkeypatch.setattr(build, "_spare_core", lambda: True)
    build_moe(cfg, tmp_path / "moe", allow_identical_experts=True)
    assert "MainThread" in ran_on and len(set(ran_on)) == 2 and len(ran_on) == 6
    got = tensors(tmp_path / "moe")
    config = load_moe_config(cfg)
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(base))
    want = gate_vectors("hidden", config.experts, 2, 64, tokenizer=tokenizer, model_folder=Path(base)).float()
    for layer in range(2):
        assert torch.equal(got[f"model.layers.{layer}.mlp.gate.weight"], want[layer])


def test_random_gates_are_seeded(family, tmp_path):
    root, base, tuned, _ = family
    cfg = {"base_model": str(base), "gate_mode": "random", "experts": [{"source_model": str(t)} for t in tuned]}
    build_moe(cfg, tmp_path / "a")
    build_moe(cfg, tmp_path / "b")
    build_moe({**cfg, "seed": 1}, tmp_path / "c")
    key = "model.layers.0.mlp.gate.weight"
    a, b, c = (tensors(tmp_path / n)[key] for n in "abc")
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 64) and abs(float(a.std()) - 1.0) < 0.2
    build_moe({**cfg, "gate_mode": "uniform_random"}, tmp_path / "u")
    u = tensors(tmp_path / "u")[key]
    assert float(u.abs().max()) <= 64 ** -0.5


def test_identical_experts_compute_the_base_model(family, tmp_path):
    root, base, tuned, tok = family
    cfg = _cfg(base, [base, base, base], experts_per_token=2)
    with pytest.raises(SparsemergeError, match="same model"):
        build_moe(cfg, tmp_path / "moe")
    build_moe(cfg, tmp_path / "moe", allow_identical_experts=True)
    moe, ref = _load(tmp_path / "moe"), _load(base)
    ids = tok(["The government said on Monday that the team won"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want = moe(ids).logits, ref(ids).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = moe.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref.generate(ids, max_new_tokens=4, do_sample=False))


def test_qwen2_moe_layout_loads_and_generates(family, tmp_path):
    root, base, tuned, tok = family
    cfg = _cfg(base, tuned, shared_experts=[{"source_model": str(tuned[0]), "positive_prompts": ["The film won"]}],
               dtype="bfloat16", experts_per_token=1)
    report = build_moe(cfg, tmp_path / "qwen")
    assert report.architecture == "qwen"
    got = tensors(tmp_path / "qwen")
    assert got["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)
    assert torch.equal(got["model.layers.1.mlp.experts.2.up_proj.weight"], tensors(tuned[2])["model.layers.1.mlp.up_proj.weight"].bfloat16())
    assert torch.equal(got["model.layers.0.mlp.shared_expert.down_proj.weight"], tensors(tuned[0])["model.layers.0.mlp.down_proj.weight"].bfloat16())
    assert not got["model.layers.0.self_attn.k_proj.bias"].any()  # Llama has no biases: zeros
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    model = _load(tmp_path / "qwen")
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    ids = tok(["The team won"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    assert model.generate(ids, max_new_tokens=3, do_sample=False).shape == (1, ids.shape[1] + 3)


def test_routing_report_matches_the_routers_computed_by_hand(family, tmp_path):
    root, base, tuned, tok = family
    build_moe(_cfg(base, tuned), tmp_path / "moe")
    model = _load(tmp_path / "moe")
    texts = ["The government said on Monday", "The team won the match in the final minutes"]
    report = route_texts(tmp_path / "moe", texts)
    assert report.experts == ["tuned0", "tuned1", "tuned2"] and report.top_k == 2
    inputs: list[torch.Tensor] = []
    hooks = [layer.mlp.register_forward_pre_hook(lambda m, a: inputs.append(a[0].reshape(-1, 64))) for layer in model.model.layers]
    for text, routed in zip(texts, report.texts):
        inputs.clear()
        with torch.no_grad():
            model(tok(text, return_tensors="pt")["input_ids"])
        for layer, x in enumerate(inputs):
            logits = x @ model.model.layers[layer].mlp.gate.weight.T  # [tokens, experts]
            top = logits.topk(2, dim=-1).indices
            assert torch.equal(routed.counts[layer], torch.bincount(top.reshape(-1), minlength=3))
            assert torch.equal(routed.top1[layer], top[:, 0])
        assert abs(float(routed.share.sum()) - 1.0) < 1e-9
    for h in hooks:
        h.remove()
    table = format_routing(report, per_layer=True, tokens=True)
    assert "tuned0" in table and "per layer" in table and "->" in table
    with pytest.raises(SparsemergeError, match="no router"):
        route_texts(base, texts)


def test_bad_input_gets_clear_errors(family, tmp_path):
    root, base, tuned, tok = family
    with pytest.raises(SparsemergeError, match="unknown gate_mode 'fancy'.*cheap_embed"):
        load_moe_config(_cfg(base, tuned, "fancy"))
    with pytest.raises(SparsemergeError, match="not found"):
        build_moe(_cfg(base, [tuned[0], root / "missing"]), tmp_path / "a")
    with pytest.raises(SparsemergeError, match="experts_per_token is 4"):
        load_moe_config(_cfg(base, tuned, experts_per_token=4))
    no_prompts = _cfg(base, tuned)
    del no_prompts["experts"][1]["positive_prompts"]
    with pytest.raises(SparsemergeError, match="expert 1 .* has no positive_prompts"):
        load_moe_config(no_prompts)
    same = _cfg(base, tuned)
    for e in same["experts"]:
        e["positive_prompts"] = ["same"]
    with pytest.raises(SparsemergeError, match="identical for every expert"):
        load_moe_config(same)
    with pytest.raises(SparsemergeError, match="unknown|Extra inputs|extra"):
        load_moe_config({**_cfg(base, tuned), "merge_method": "ties"})
    with pytest.raises(SparsemergeError, match="architecture mixtral has no shared experts"):
        load_moe_config(_cfg(base, tuned, architecture="mixtral", shared_experts=[{"source_model": str(base), "positive_prompts": ["a"]}]))
    # an expert with a different intermediate size
    wide = make_tiny_llama(seed=3, intermediate=96)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(SparsemergeError, match=r"shape \[96, 64\].*needs \[128, 64\]"):
        build_moe(_cfg(base, [tuned[0], tmp_path / "wide"]), tmp_path / "b")
    # an expert with fewer layers
    short = make_tiny_llama(seed=3, layers=1)
    short.save_pretrained(tmp_path / "short")
    with pytest.raises(SparsemergeError, match="has 1 layers but base_model has 2"):
        build_moe(_cfg(base, [tuned[0], tmp_path / "short"]), tmp_path / "c")
    # a base with attention biases has no place in Mixtral
    biased = tmp_path / "biased"
    base_model = make_tiny_llama()
    base_model.save_pretrained(biased)
    state = load_file(str(biased / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(state, str(biased / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(SparsemergeError, match="q_proj.bias has no place in the mixtral layout.*architecture: qwen"):
        build_moe({**_cfg(biased, tuned), "gate_mode": "random"}, tmp_path / "d")
    # prompts need the base's tokenizer (the error comes from the router thread, before the copying ends)
    with pytest.raises(SparsemergeError, match="has no tokenizer"):
        build_moe(_cfg(tuned[0], tuned[1:]), tmp_path / "e")
    assert not (tmp_path / "e").exists()
    # an existing output is not replaced without overwrite; nothing half-written is left
    (tmp_path / "taken").mkdir()
    with pytest.raises(SparsemergeError, match="already exists"):
        build_moe(_cfg(base, tuned), tmp_path / "taken")
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_yaml_file_and_cli(family, tmp_path, capsys):
    from sparsemerge.cli.main import main

    root, base, tuned, tok = family
    path = tmp_path / "moe.yaml"
    path.write_text(yaml.safe_dump(_cfg(base, tuned)))
    assert main(["moe", str(path), str(tmp_path / "out"), "--no-progress", "--route", "The team won"]) == 0
    out = capsys.readouterr().out
    assert "built a mixtral MoE: 3 experts x 2 layers" in out and "tuned1" in out
    assert main(["moe-route", str(tmp_path / "out"), "--text", "Shares rose", "--json", str(tmp_path / "r.json")]) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["experts"] == ["tuned0", "tuned1", "tuned2"] and len(data["texts"][0]["share"]) == 3
    assert main(["moe", str(path), str(tmp_path / "nm"), "--no-progress", "--keep-pattern", "2:4"]) == 0
    assert json.loads((tmp_path / "nm" / "sparsemerge_moe.json").read_text())["config"]["keep_pattern"] == "2:4"
    assert main(["moe-route", str(tmp_path / "nm"), "--text", "Shares rose", "--kernels", "2:4"]) == 0
    assert "experts on the 2:4 kernels: 2 layers" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_cfg(base, tuned, "fancy")))
    assert main(["moe", str(bad), str(tmp_path / "out2")]) == 2
    assert "unknown gate_mode" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()


def test_keep_pattern_experts_run_on_the_nm_kernels(family, tmp_path):
    from sparsemerge.masks import nm_mask_reference
    from sparsemerge.merge.moe import SparseExperts, sparse_experts_

    root, base, tuned, tok = family
    build_moe(_cfg(base, tuned, keep_pattern="2:4"), tmp_path / "moe")
    got = tensors(tmp_path / "moe")
    src = tensors(tuned[1])["model.layers.0.mlp.down_proj.weight"]
    want = src * nm_mask_reference(src.abs(), 2, 4)  # magnitude 2:4 of the expert's own weight
    assert torch.equal(got["model.layers.0.mlp.experts.down_proj"][1], want)
    gu = got["model.layers.1.mlp.experts.gate_up_proj"]
    assert int((gu.reshape(-1, 4) != 0).sum(1).max()) == 2
    assert torch.equal(got["model.layers.1.self_attn.q_proj.weight"], tensors(base)["model.layers.1.self_attn.q_proj.weight"])

    dense, sparse = _load(tmp_path / "moe"), _load(tmp_path / "moe")
    report = sparse_experts_(sparse, "2:4")
    assert report.swapped == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert isinstance(sparse.model.layers[0].mlp.experts, SparseExperts) and report.packed_bytes < report.dense_bytes
    ids = tok(["The government said on Monday that the team won"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids).logits, dense(ids).logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(sparse.generate(ids, max_new_tokens=3, do_sample=False), dense.generate(ids, max_new_tokens=3, do_sample=False))
    int8 = _load(tmp_path / "moe")
    sparse_experts_(int8, "2:4", quant="int8")
    with torch.no_grad():
        torch.testing.assert_close(int8(ids).logits, dense(ids).logits, rtol=0, atol=0.05)
    # dense experts are refused unless pruned on the way
    build_moe(_cfg(base, tuned), tmp_path / "dense")
    with pytest.raises(SparsemergeError, match="keep_pattern: 2:4"):
        sparse_experts_(_load(tmp_path / "dense"), "2:4")
    sparse_experts_(_load(tmp_path / "dense"), "2:4", prune=True)
    with pytest.raises(SparsemergeError, match="not an MoE"):
        sparse_experts_(_load(base), "2:4")
    with pytest.raises(SparsemergeError, match="N:M pattern such as 2:4, got 'block16:0.5'"):
        load_moe_config(_cfg(base, tuned, keep_pattern="block16:0.5"))
    with pytest.raises(SparsemergeError, match="unknown sparsity pattern '50%'"):
        load_moe_config(_cfg(base, tuned, keep_pattern="50%"))


def test_packed_moe_experts_load_onto_the_kernels_and_unpack_exactly(family, tmp_path):
    """`pack` stores each expert of a 2:4 MoE as its own N:M entry (sealed 'stack' key);
    load_packed runs them as SparseExperts with no dense copy and the dense MoE's logits;
    unpack restores the fused [E, out, in] tensors bit for bit; --quant int8 stays close."""
    from sparsemerge.cli.main import main
    from sparsemerge.formats.model import pack, read_packed
    from sparsemerge.formats.reader import unpack
    from sparsemerge.kernels.model import load_packed
    from sparsemerge.merge.moe import SparseExperts

    root, base, tuned, tok = family
    build_moe(_cfg(base, tuned, keep_pattern="2:4", dtype="float32"), tmp_path / "moe")
    # only the experts are 2:4 here (attention comes from the dense base); routers are never targeted
    report = pack(tmp_path / "moe", tmp_path / "packed", format="nm", pattern="2:4", include=["experts"])
    assert "model.layers.1.mlp.experts.down_proj.2" in report.packed
    with read_packed(tmp_path / "packed") as ckpt:
        rec = ckpt.record("model.layers.0.mlp.experts.gate_up_proj.1")
        assert rec["format"] == "nm" and rec["stack"] == {"of": "model.layers.0.mlp.experts.gate_up_proj", "index": 1, "count": 3}
    dense = _load(tmp_path / "moe")
    loaded = load_packed(tmp_path / "packed")
    experts = [m for m in loaded.model.modules() if isinstance(m, SparseExperts)]
    assert len(experts) == 2 and "model.layers.0.mlp.experts" in loaded.swapped
    assert not any(n.endswith("experts.gate_up_proj") for n, _ in loaded.model.named_parameters())
    ids = tok("The team won the match and shares rose", return_tensors="pt").input_ids
    with torch.no_grad():
        want, got = dense(ids).logits, loaded.model(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    unpack(tmp_path / "packed", tmp_path / "unpacked")
    original, back = tensors(tmp_path / "moe"), tensors(tmp_path / "unpacked")
    assert set(back) == set(original)
    for key in original:
        assert torch.equal(back[key], original[key]), key
    # INT8 expert values through the CLI: smaller, and close to the float MoE
    assert main(["pack", str(tmp_path / "moe"), str(tmp_path / "int8"), "--format", "nm", "--quant", "int8", "--include", "experts"]) == 0
    q = load_packed(tmp_path / "int8")
    with torch.no_grad():
        close = q.model(ids).logits
    assert float((close - want).abs().max()) < 0.05 * float(want.abs().max())
    # `run` loads it like any packed model (the transformers path: the decode runtime has no MoE layers)
    assert main(["run", str(tmp_path / "packed"), "--prompt", "The team won", "--max-new-tokens", "4"]) == 0
    # the dense baseline of `bench` decodes the stacks back into the fused tensors
    assert torch.allclose(load_packed(tmp_path / "packed", dense=True).model(ids).logits, want, atol=1e-4)


def test_an_output_config_that_cannot_be_built_fails_the_build_and_writes_nothing(family, tmp_path, monkeypatch):
    """The output config.json is built in the router thread while the tensors are copied; its
    failure ends the build with that error and leaves nothing under the output name."""
    import sparsemerge.merge.moe.build as build

    root, base, tuned, tok = family

    def broken(*args, **kwargs):
        raise SparsemergeError("the base's config cannot become a Mixtral config")

    monkeypatch.setattr(build, "_config_json", broken)
    for mode in ("cheap_embed", "random"):
        with pytest.raises(SparsemergeError, match="cannot become a Mixtral config"):
            build_moe(_cfg(base, tuned, mode), tmp_path / mode)
        assert not (tmp_path / mode).exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
