"""The decode runtime against the transformers model built from the same sparse layers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama
from sparsemerge.errors import SparsemergeError
from sparsemerge.kernels import SparsifyConfig, sparsify_
from sparsemerge.kernels.cpu_vnni import cpu_features_missing as vnni_missing
from sparsemerge.kernels.cpu_vnni import fake_quant_inputs
from sparsemerge.kernels.sparse_linear import SparseLinear
from sparsemerge.kernels.features import cpu_level, missing_reason
from sparsemerge.runtime import UnsupportedModel, build_plan
from sparsemerge.runtime import half
from sparsemerge.runtime.engine import DecodeEngine

# the products and the step are checked against transformers with the float32 KV cache (its
# values exactly); the float16 cache, the default where the CPU converts it, has its own tests
KV = "float32"
from sparsemerge.runtime.step import KIND_A8, KIND_BF, KIND_BG, KIND_BQ, KIND_F32

IDS = [1, 5, 9, 3, 7, 11, 2, 40, 41, 8]


def _sparse_llama(quant="none", act_quant="none", group_size=None, hidden=256, intermediate=512, layers=2, **kw):
    model = make_tiny_llama(hidden=hidden, intermediate=intermediate, layers=layers, **kw)
    sparsify_(model, SparsifyConfig(quant=quant, prune=True, act_quant=act_quant, group_size=group_size))
    return model


def _reference_logits(model, ids, act_quant="none"):
    """Logits of the whole sequence in one transformers forward (float activations, or the
    activation rounding the A8 kernels apply, on the inputs of every sparse layer)."""
    handles = []
    if act_quant == "int8":
        names = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]
        handles = fake_quant_inputs(model, names)
    try:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].numpy()
    finally:
        for h in handles:
            h.remove()


def _engine_logits(engine, ids, prompt=3):
    """Logits at every position: the prompt through prefill, the rest one step at a time."""
    engine.reset()
    out = [engine.prefill(ids[:prompt]).copy()]
    out += [engine.step(t).copy() for t in ids[prompt:-1]]
    return np.stack(out)


@pytest.mark.parametrize("quant,group_size", [("none", None), ("int8", None), ("int4", None), ("int4", 128)])
def test_float_activations_match_transformers(quant, group_size):
    model = _sparse_llama(quant, group_size=group_size)
    engine = DecodeEngine(model, max_seq=32, kv_cache=KV)
    ref = _reference_logits(model, IDS)[2:-1]
    got = _engine_logits(engine, IDS)
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-4)
    # every projection ran through a sparse kernel, q/k/v and gate/up fused
    kinds = {p.kind for p in engine.plan.layers if p.name != "lm_head"}
    assert kinds <= {KIND_F32, KIND_BF, KIND_BQ}
    assert sum("+" in p.name for p in engine.plan.layers) == 4


def test_step_only_equals_prefill_then_step():
    model = _sparse_llama("int4")
    engine = DecodeEngine(model, max_seq=32, kv_cache=KV)
    via_prefill = _engine_logits(engine, IDS, prompt=5)
    engine.reset()
    stepped = np.stack([engine.step(t).copy() for t in IDS[:-1]])[4:]
    np.testing.assert_allclose(stepped, via_prefill, atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(bool(vnni_missing()), reason="the CPU lacks the AVX-512 VNNI features of the A8 kernel")
@pytest.mark.parametrize("quant,group_size", [("int8", None), ("int4", 128)])
def test_int8_activations_match_fake_quantized_transformers(quant, group_size):
    model = _sparse_llama(quant, act_quant="int8", group_size=group_size)
    engine = DecodeEngine(model, act_quant="int8", max_seq=32, kv_cache=KV)
    assert {p.kind for p in engine.plan.layers if p.name != "lm_head"} == {KIND_A8}
    engine.reset()
    got = np.stack([engine.step(t).copy() for t in IDS[:-1]])
    ref = _reference_logits(model, IDS, act_quant="int8")[:-1]
    # the same rounded activations; only the summation order differs
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)
    # and the rounding is really applied: float activations differ by more than that
    assert np.abs(_reference_logits(model, IDS)[:-1] - got).max() > 1e-3


def test_unfused_small_layers_and_separate_ops():
    # hidden 64 with 2 KV heads of 16: k/v have 32 rows, not a multiple of the 64-row blocks
    model = _sparse_llama("int8", hidden=64, intermediate=128)
    engine = DecodeEngine(model, max_seq=32, kv_cache=KV)
    assert not any("+" in p.name and "self_attn" in p.name for p in engine.plan.layers)
    np.testing.assert_allclose(_engine_logits(engine, IDS), _reference_logits(model, IDS)[2:-1], atol=2e-5, rtol=1e-4)


def test_dense_layers_and_float_head_are_planned_dense():
    model = make_tiny_llama(hidden=128, intermediate=256)
    sparsify_(model, SparsifyConfig(prune=True, exclude=[r"norm", r"lm_head", r"down_proj"]))
    engine = DecodeEngine(model, max_seq=32, kv_cache=KV)
    kernels = {p.name.split(".")[-1]: p.kernel for p in engine.plan.layers}
    assert kernels["down_proj"] == "numba-dense-f32" and kernels["lm_head"] == "numba-dense-f32"
    np.testing.assert_allclose(_engine_logits(engine, IDS), _reference_logits(model, IDS)[2:-1], atol=2e-5, rtol=1e-4)


def test_qwen2_biases_and_mistral_window():
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=200, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    for model in (Qwen2ForCausalLM(Qwen2Config(**common)).eval(),
                  MistralForCausalLM(MistralConfig(sliding_window=4, **common)).eval()):
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # Qwen2's q/k/v biases: make them matter
                torch.nn.init.normal_(p, std=0.5)
        sparsify_(model, SparsifyConfig(prune=True))
        engine = DecodeEngine(model, max_seq=32, kv_cache=KV)
        ref = _reference_logits(model, IDS)[2:-1]
        np.testing.assert_allclose(_engine_logits(engine, IDS), ref, atol=3e-5, rtol=1e-4)
    assert engine.plan.config["window"] == 4


def test_unsupported_architecture_and_pattern_say_why():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=64, n_head=4, vocab_size=100)).eval()
    plan = build_plan(gpt2)
    assert not plan.supported and "gpt2" in plan.reason
    with pytest.raises(UnsupportedModel, match="gpt2"):
        DecodeEngine(gpt2)
    model = make_tiny_llama(hidden=128, intermediate=256)
    sparsify_(model, SparsifyConfig(pattern="1:4", prune=True))
    from sparsemerge.kernels.dispatch import force_kernel

    with force_kernel("reference"):  # a registry row the compiled step cannot call
        plan = build_plan(model)
    assert not plan.supported and "1:4" in plan.reason and "q_proj" in plan.reason and "reference" in plan.reason
    assert "transformers path" in plan.format_table()


def test_bad_inputs():
    engine = DecodeEngine(_sparse_llama(), max_seq=4, kv_cache=KV)
    with pytest.raises(SparsemergeError, match="vocabulary"):
        engine.step(10_000)
    with pytest.raises(SparsemergeError, match="max_seq"):
        engine.prefill([1, 2, 3, 4, 5])
    with pytest.raises(SparsemergeError, match="empty"):
        engine.prefill([])
    with pytest.raises(SparsemergeError, match="outside the vocabulary"):
        engine.prefill([1, 99_999])
    with pytest.raises(SparsemergeError, match="max_new_tokens"):
        engine.generate([1], max_new_tokens=0)
    with pytest.raises(SparsemergeError, match="max_seq"):
        DecodeEngine(_sparse_llama(), max_seq=0, kv_cache=KV)
    with pytest.raises(SparsemergeError, match="act_quant"):
        build_plan(_sparse_llama(), act_quant="int3")


@pytest.mark.skipif(bool(vnni_missing()), reason="the CPU lacks the AVX-512 VNNI features of the A8 kernel")
def test_non_finite_activations_give_nan_logits_not_stale_ones():
    model = _sparse_llama("int8", act_quant="int8")
    engine = DecodeEngine(model, act_quant="int8", max_seq=8, kv_cache=KV)
    table = model.model.embed_tokens.weight
    with torch.no_grad():
        table[7, 3] = float("nan")  # the engine reads the same storage
    engine.step(1)
    assert np.isfinite(np.delete(engine.logits, 7)).all()  # the tied head's row 7 is NaN too
    assert np.isnan(engine.step(7)).all()


def test_plan_table_collapses_layers_and_counts_bytes():
    model = _sparse_llama("int4", group_size=128, layers=3)
    plan = build_plan(model)
    table = plan.format_table()
    assert "layers.{0-2}.self_attn.q_proj+k_proj+v_proj" in table
    sparse = [m for m in model.modules() if isinstance(m, SparseLinear)]
    assert plan.total_bytes == sum(m.layout.nbytes() for m in sparse) + model.lm_head.weight.numel() * 4
    import json

    rows = json.loads(plan.to_json())["layers"]
    assert len(rows) == 3 * 4 + 1 and all(r["why"] for r in rows)


@pytest.mark.parametrize("level,f32_row,a8_row", [("avx2", "avx2-f32", "avx2-a8"), ("none", "numba-gemv24", "numba-gemv24")])
def test_capped_cpu_levels_plan_and_match(level, f32_row, a8_row):
    """The AVX2 rows (or the portable numba ones) run every product under a feature cap, on
    any machine that has the features, and give the same logits."""
    if level == "avx2" and missing_reason(("avx2", "fma")):
        pytest.skip("the CPU lacks AVX2/FMA")
    with cpu_level(level):
        model = _sparse_llama("none")
        engine = DecodeEngine(model, max_seq=32, kv_cache=KV)
        assert {p.kernel for p in engine.plan.layers if p.name != "lm_head"} == {f32_row}
        assert level in engine.plan.cpu
        np.testing.assert_allclose(_engine_logits(engine, IDS), _reference_logits(model, IDS)[2:-1], atol=2e-5, rtol=1e-4)
        model = _sparse_llama("int4", act_quant="int8", group_size=128)
        engine = DecodeEngine(model, act_quant="int8", max_seq=32, kv_cache=KV)
        assert {p.kernel for p in engine.plan.layers if p.name != "lm_head"} == {a8_row}
        engine.reset()
        got = np.stack([engine.step(t).copy() for t in IDS[:-1]])
        ref = _reference_logits(model, IDS, act_quant="int8" if a8_row != "numba-gemv24" else "none")[:-1]
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)
        if a8_row != "numba-gemv24":
            assert "passed over avx512-vnni-a8" in engine.plan.layers[0].why or missing_reason(("avx512vnni",))


@pytest.mark.parametrize("pattern,quant,group_size,value_dtype", [
    ("1:4", "none", None, "float32"), ("4:8", "int8", None, "float32"), ("2:8", "int4", 128, "float32"),
    ("3:8", "int4", None, "float32"), ("1:4", "none", None, "bfloat16"), ("4:8", "none", None, "float16"),
    ("4:16", "int8", 128, "float32"), ("3:4", "int4", 96, "float32")])  # 4:16 takes the gather path; 3:4 int4 pads its odd slot
def test_other_nm_patterns_run_on_the_general_kernel(pattern, quant, group_size, value_dtype):
    """Patterns besides 2:4 (the layers of a mixed allocation) run in the compiled step too."""
    model = make_tiny_llama(hidden=256, intermediate=512)
    sparsify_(model, SparsifyConfig(pattern=pattern, quant=quant, prune=True, group_size=group_size,
                                    value_dtype=value_dtype))
    engine = DecodeEngine(model, max_seq=32, kv_cache=KV)
    sparse = [p for p in engine.plan.layers if p.pattern != "dense"]
    assert sparse and {p.kernel for p in sparse} == {"numba-general"} and {p.kind for p in sparse} == {KIND_BG}
    assert all(p.pattern == pattern for p in sparse)
    np.testing.assert_allclose(_engine_logits(engine, IDS), _reference_logits(model, IDS)[2:-1], atol=2e-5, rtol=1e-4)


def test_mixed_patterns_run_each_with_its_own_kernel():
    model = make_tiny_llama(hidden=256, intermediate=512)
    sparsify_(model, SparsifyConfig(pattern="1:4", quant="int4", group_size=128, prune=True, include=[r"q_proj$", r"down_proj$"]))
    sparsify_(model, SparsifyConfig(pattern="4:8", quant="int4", group_size=128, prune=True, include=[r"k_proj$"]))
    sparsify_(model, SparsifyConfig(pattern="2:4", quant="int4", group_size=128, prune=True, exclude=[r"o_proj$", "norm"]))
    engine = DecodeEngine(model, max_seq=32, kv_cache=KV)
    by_name = {p.name: p for p in engine.plan.layers}
    assert by_name["model.layers.0.self_attn.q_proj"].kernel == "numba-general"
    assert by_name["model.layers.0.self_attn.k_proj"].pattern == "4:8"
    assert by_name["model.layers.0.self_attn.v_proj"].pattern == "2:4" and by_name["model.layers.0.self_attn.v_proj"].kernel != "numba-general"
    assert by_name["model.layers.0.self_attn.o_proj"].pattern == "dense"
    assert by_name["model.layers.0.mlp.gate_proj+up_proj"].pattern == "2:4"
    assert by_name["model.layers.0.mlp.down_proj"].pattern == "1:4"
    np.testing.assert_allclose(_engine_logits(engine, IDS), _reference_logits(model, IDS)[2:-1], atol=2e-5, rtol=1e-4)


def test_mixed_storage_in_one_layer_runs_unfused_with_a_kernel_each():
    model = make_tiny_llama(hidden=256, intermediate=512)
    sparsify_(model, SparsifyConfig(quant="int8", prune=True, include=[r"k_proj$", r"up_proj$"]))
    sparsify_(model, SparsifyConfig(quant="int4", group_size=128, prune=True))
    engine = DecodeEngine(model, max_seq=32, kv_cache=KV)
    names = [p.name for p in engine.plan.layers]
    assert "model.layers.0.self_attn.k_proj" in names and "model.layers.0.mlp.up_proj" in names
    assert all("not fused" in p.why for p in engine.plan.layers if p.name.endswith(("k_proj", "up_proj")))
    np.testing.assert_allclose(_engine_logits(engine, IDS), _reference_logits(model, IDS)[2:-1], atol=2e-5, rtol=1e-4)


@pytest.mark.skipif(bool(missing_reason(("avx2", "fma"))), reason="the CPU lacks AVX2/FMA")
@pytest.mark.parametrize("level", ["native", "avx2"])
def test_int8_head_with_int8_activations_runs_the_dense_a8_kernel(level):
    from sparsemerge.kernels.sparse_linear import SparsifyConfig as SC

    with cpu_level(level):
        model = make_tiny_llama(hidden=256, intermediate=512)
        sparsify_(model, SC(quant="int4", group_size=128, prune=True, act_quant="int8", head_quant="int8"))
        engine = DecodeEngine(model, act_quant="int8", max_seq=32, kv_cache=KV)
        head = engine.plan.layers[-1]
        assert head.name == "lm_head" and head.kernel.startswith("dense-a8-") and head.kind == KIND_A8
        engine.reset()
        got = np.stack([engine.step(t).copy() for t in IDS[:-1]])
        names = [n for n, m in model.named_modules() if isinstance(m, SparseLinear)] + ["lm_head"]
        handles = fake_quant_inputs(model, names)
        try:
            with torch.no_grad():
                ref = model(torch.tensor([IDS])).logits[0, :-1].numpy()
        finally:
            for h in handles:
                h.remove()
        np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)


def test_long_context_splits_attention_over_threads_and_still_matches():
    from sparsemerge.runtime.attention import PAR_MIN_POS as ATTN_PAR_MIN_POS

    model = _sparse_llama("int4", group_size=128)
    engine = DecodeEngine(model, max_seq=200, kv_cache=KV)
    ids = torch.randint(0, 384, (ATTN_PAR_MIN_POS + 40,), generator=torch.Generator().manual_seed(0)).tolist()
    got = _engine_logits(engine, ids, prompt=ATTN_PAR_MIN_POS - 20)  # steps cross the threshold
    ref = _reference_logits(model, ids)[ATTN_PAR_MIN_POS - 21:-1]
    np.testing.assert_allclose(got, ref, atol=3e-5, rtol=1e-4)


@pytest.mark.parametrize("value_dtype", ["float16", "bfloat16"])
def test_half_precision_values_are_widened_as_read(value_dtype):
    from sparsemerge.runtime.step import KIND_BH

    model = make_tiny_llama(hidden=256, intermediate=512)
    sparsify_(model, SparsifyConfig(prune=True, value_dtype=value_dtype))
    engine = DecodeEngine(model, max_seq=32, kv_cache=KV)
    assert {p.kind for p in engine.plan.layers if p.name != "lm_head"} == {KIND_BH}
    assert all(p.codec == value_dtype for p in engine.plan.layers if p.name != "lm_head")
    np.testing.assert_allclose(_engine_logits(engine, IDS), _reference_logits(model, IDS)[2:-1], atol=3e-5, rtol=1e-4)


@pytest.mark.skipif(not half.supported(), reason="no hardware float16 conversion on this CPU")
def test_float16_kv_cache_equals_the_float32_step_on_rounded_keys_and_values():
    """The float16 cache changes nothing but the rounding of the stored keys and values: the
    float32 engine whose cache is rounded to float16 after every write gives the same logits."""
    model = _sparse_llama("int4", group_size=128)
    half_engine = DecodeEngine(model, max_seq=200, kv_cache="float16")
    ref_engine = DecodeEngine(model, max_seq=200, kv_cache="float32")
    assert half_engine.kc.dtype == np.uint16 and half_engine.kc.nbytes * 2 == ref_engine.kc.nbytes

    def rounded(t):
        ref_engine.kc[:] = ref_engine.kc.astype(np.float16).astype(np.float32)
        ref_engine.vc[:] = ref_engine.vc.astype(np.float16).astype(np.float32)
        return t

    ids = torch.randint(0, 384, (150,), generator=torch.Generator().manual_seed(1)).tolist()  # past PAR_MIN_POS
    got = _engine_logits(half_engine, ids, prompt=5)
    ref_engine.reset()
    ref = [rounded(ref_engine.prefill(ids[:5])).copy()]
    for t in ids[5:-1]:
        rounded(None)  # the step reads the cache before writing its own row: round it first
        ref.append(ref_engine.step(t).copy())
    ref = np.stack(ref)
    # the float32 step also reads its own new row, unrounded: equal up to that one row's rounding
    np.testing.assert_allclose(got, ref, atol=3e-4, rtol=0)  # logits up to ~3: measured 9e-5
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    # against transformers: float16 rounding of K and V, nothing more
    np.testing.assert_allclose(got, _reference_logits(model, ids)[4:-1], atol=1e-3, rtol=0)  # measured 2.6e-4


def test_kv_cache_choice_and_errors(monkeypatch):
    from sparsemerge.runtime.engine import resolve_kv_cache

    assert resolve_kv_cache("float32") == "float32"
    with pytest.raises(SparsemergeError, match="kv_cache must be one of"):
        resolve_kv_cache("int8")
    monkeypatch.setattr(half, "supported", lambda: False)
    assert resolve_kv_cache("auto") == "float32"
    with pytest.raises(SparsemergeError, match="F16C"):
        resolve_kv_cache("float16")


def test_time_ops_covers_every_product_and_leaves_the_state_alone(act_quant="int8"):
    """The per-op breakdown (benchmarks/bench_decode_breakdown.py): one entry per plan row in
    plan order, with its bytes; timing the ops writes only to scratch buffers, so decoding
    goes on with the same logits as an engine that was never timed."""
    model = _sparse_llama("int8", act_quant=act_quant)
    timed = DecodeEngine(model, max_seq=32, kv_cache=KV, act_quant=act_quant)
    plain = DecodeEngine(model, max_seq=32, kv_cache=KV, act_quant=act_quant)
    for e in (timed, plain):
        e.prefill(IDS[:4])
    rows = timed.time_ops(repeats=2, flush_bytes=1 << 16)
    assert [r["name"] for r in rows] == [p.name for p in timed.plan.layers]
    assert [r["bytes"] for r in rows] == [p.bytes for p in timed.plan.layers]
    assert rows[-1]["name"] == "lm_head" and all(r["seconds"] >= 0 for r in rows)
    for t in IDS[4:8]:
        np.testing.assert_array_equal(timed.step(t), plain.step(t))


def test_breakdown_times_each_part_and_leaves_the_state_alone():
    """``DecodeEngine.breakdown`` (bench_vs_llamacpp.py's per-token split): products,
    attention and the element-wise rest are timed on the step's own buffers; the element-wise
    part writes one KV cache slot and puts it back, so a full cache is unchanged and decoding
    goes on with the logits of an engine that was never timed."""
    model = _sparse_llama("int8", act_quant="int8")
    timed = DecodeEngine(model, max_seq=12, kv_cache=KV, act_quant="int8")
    plain = DecodeEngine(model, max_seq=12, kv_cache=KV, act_quant="int8")
    res = timed.generate(IDS[:4], max_new_tokens=5)
    ref = plain.generate(IDS[:4], max_new_tokens=5)
    assert res.tokens == ref.tokens and len(res.step_seconds) == 4
    logits = timed.logits.copy()
    parts = timed.breakdown(res, repeats=2)
    assert set(parts) == {"token", "step", "products", "attention", "elementwise", "dispatch", "python", "overhead",
                          "unattributed"}
    assert all(parts[k] > 0 for k in ("token", "step", "products", "attention", "elementwise", "dispatch"))
    assert parts["python"] == pytest.approx(max(0.0, parts["token"] - parts["step"]))
    assert parts["overhead"] == pytest.approx(parts["dispatch"] + parts["python"])
    assert parts["unattributed"] == pytest.approx(
        parts["step"] - parts["products"] - parts["attention"] - parts["elementwise"] - parts["dispatch"])
    np.testing.assert_array_equal(timed.logits, logits)  # time_products writes the logits to a sink
    for t in (3, 8):
        np.testing.assert_array_equal(timed.step(t), plain.step(t))
    while timed.pos < timed.max_seq:
        timed.step(5)
    full_k, full_v = timed.kc.copy(), timed.vc.copy()
    timed.time_elementwise(repeats=2)  # writes slot max_seq - 1, which holds a real key and value
    timed.time_dispatch(repeats=2)
    np.testing.assert_array_equal(timed.kc, full_k)
    np.testing.assert_array_equal(timed.vc, full_v)
    with pytest.raises(SparsemergeError, match="not in the cache"):
        timed.time_attention(pos=timed.pos)


def test_step_runs_the_compiled_entry_point_and_follows_a_swapped_array():
    """``step`` calls the step's compiled entry point (numba's dispatcher would type ~50
    arrays per call), resolved once for the engine's argument objects; an argument replaced by
    a new object is picked up, not the stale one."""
    from sparsemerge.runtime import step as S

    model = _sparse_llama("int8", act_quant="int8")
    engine = DecodeEngine(model, max_seq=12, kv_cache=KV, act_quant="int8")
    plain = DecodeEngine(model, max_seq=12, kv_cache=KV, act_quant="int8")
    np.testing.assert_array_equal(engine.step(IDS[0]), plain.step(IDS[0]))
    entry = engine._entries[S.decode_step][1]
    assert entry is not S.decode_step and callable(entry)
    old = engine.logits
    engine.logits = np.full_like(old, -1.0)  # a new object: the step must write into it
    out = engine.step(IDS[1])
    assert out is engine.logits and not np.shares_memory(out, old)
    np.testing.assert_array_equal(out, plain.step(IDS[1]))
    assert engine._entries[S.decode_step][0][-1] is engine.logits  # resolved again for the new array


def test_decode_step_parts_runs_only_the_parts_asked_for():
    """What ``breakdown`` times: no part touches nothing; the element-wise part moves the
    residual stream and writes the KV slot but no logits; the products write the logits but
    leave the residual stream and the cache alone; all parts is the real step."""
    from sparsemerge.runtime import step as S

    model = _sparse_llama("int8", act_quant="int8")
    engine = DecodeEngine(model, max_seq=12, kv_cache=KV, act_quant="int8")
    plain = DecodeEngine(model, max_seq=12, kv_cache=KV, act_quant="int8")
    engine.prefill(IDS[:3])
    plain.prefill(IDS[:3])

    def state():
        return [a.copy() for a in engine.bufs[:6]] + [engine.kc.copy(), engine.vc.copy(), engine.logits.copy()]

    def run(parts):
        return S.decode_step_parts(IDS[3], engine.pos, *engine._step_args(), parts)

    before = state()
    run(0)
    for a, b in zip(state(), before):
        np.testing.assert_array_equal(a, b)
    run(S.PART_PRODUCTS)
    after = state()
    np.testing.assert_array_equal(after[0], before[0])  # residual stream
    np.testing.assert_array_equal(after[6], before[6])  # keys
    assert not np.array_equal(after[-1], before[-1])  # logits
    run(S.PART_ELEMENTWISE)
    again = state()
    assert not np.array_equal(again[0], after[0])
    assert not np.array_equal(again[6][:, :, engine.pos], after[6][:, :, engine.pos])  # the KV slot written
    np.testing.assert_array_equal(again[-1], after[-1])
    engine.kc[:], engine.vc[:] = before[6], before[7]
    assert run(S.PART_ALL)
    np.testing.assert_array_equal(engine.logits, plain.step(IDS[3]))
