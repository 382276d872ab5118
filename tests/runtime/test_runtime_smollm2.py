"""The decode runtime on the bundled SmolLM2-135M (slow): 64 greedy tokens identical to the
transformers model built from the same sparse layers."""
from __future__ import annotations

import pytest
import torch

from sparsemerge.kernels import SparsifyConfig, sparsify_
from sparsemerge.kernels.dense_int8 import Int8Embedding
from sparsemerge.runtime import half
from sparsemerge.runtime.engine import DecodeEngine

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2_int4():
    from sparsemerge.io import load_model

    try:
        loaded = load_model("smollm2")
    except Exception as exc:  # the bundled package is part of `make venv`
        pytest.skip(f"bundled SmolLM2 unavailable: {exc}")
    model = loaded.model
    # 2:4 (magnitude) + INT4 groups of 128, INT8 head: the demo's storage
    sparsify_(model, SparsifyConfig(quant="int4", group_size=128, prune=True, head_quant="int8"))
    return model, loaded.tokenizer


def test_64_greedy_tokens_identical_to_transformers(smollm2_int4):
    model, tok = smollm2_int4
    prompt = "The government said on Tuesday that"
    ids = tok(prompt, return_tensors="pt").input_ids
    engine = DecodeEngine(model, tok, max_seq=128)
    assert engine.plan.supported and sum("+" in p.name for p in engine.plan.layers) == 60  # QKV, gate/up fused
    assert engine.kv_cache == ("float16" if half.supported() else "float32")  # the default cache
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False,
                             pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    res = engine.generate(prompt, max_new_tokens=64)
    assert res.tokens == ref[: len(res.tokens)] and (len(res.tokens) == 64 or res.stop_reason == "eos")
    assert not isinstance(model.model.embed_tokens, Int8Embedding)
