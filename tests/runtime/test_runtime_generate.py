"""Sampling and generation of the decode runtime."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_llama
from sparsemerge.kernels import SparsifyConfig, sparsify_
from sparsemerge.runtime.engine import DecodeEngine
from sparsemerge.runtime.sampling import Sampler, SamplingConfig, sample_probs


def test_sampling_distributions_by_hand():
    z = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    np.testing.assert_allclose(sample_probs(z, SamplingConfig(temperature=1.0)), [0.1, 0.2, 0.3, 0.4])
    np.testing.assert_allclose(sample_probs(z, SamplingConfig()), [0, 0, 0, 1])  # greedy
    # top-k 2 keeps 0.3 and 0.4 -> 3/7, 4/7
    np.testing.assert_allclose(sample_probs(z, SamplingConfig(temperature=1.0, top_k=2)), [0, 0, 3 / 7, 4 / 7])
    # top-p 0.6: 0.4 alone is < 0.6, 0.4 + 0.3 reaches it
    np.testing.assert_allclose(sample_probs(z, SamplingConfig(temperature=1.0, top_p=0.6)), [0, 0, 3 / 7, 4 / 7])
    # temperature 0.5 squares the odds: p_i^2 / sum p^2
    p2 = np.array([0.01, 0.04, 0.09, 0.16])
    np.testing.assert_allclose(sample_probs(z, SamplingConfig(temperature=0.5)), p2 / p2.sum())


def test_sampler_is_seeded_and_follows_the_distribution():
    z = np.log(np.array([0.1, 0.2, 0.3, 0.4]))
    cfg = SamplingConfig(temperature=1.0, seed=3)
    a = [Sampler(cfg)(z) for _ in range(1)]
    s1, s2 = Sampler(cfg), Sampler(cfg)
    assert [s1(z) for _ in range(50)] == [s2(z) for _ in range(50)] and a
    draws = np.bincount([s1(z) for _ in range(4000)], minlength=4) / 4000
    np.testing.assert_allclose(draws, [0.1, 0.2, 0.3, 0.4], atol=0.03)
    with pytest.raises(Exception):
        SamplingConfig(top_p=0.0)


@pytest.fixture
def engine(tiny_tokenizer):
    model = make_tiny_llama(vocab_size=384, hidden=128, intermediate=256)
    sparsify_(model, SparsifyConfig(prune=True, quant="int4"))
    return DecodeEngine(model, tiny_tokenizer, max_seq=96, kv_cache="float32")  # compared token for token with transformers


def test_greedy_generate_equals_transformers_generate(engine, tiny_tokenizer):
    ids = tiny_tokenizer("the quick brown", return_tensors="pt").input_ids
    with torch.no_grad():
        ref = engine.model.generate(ids, max_new_tokens=24, do_sample=False, min_new_tokens=24,
                                    pad_token_id=tiny_tokenizer.eos_token_id)[0, ids.shape[1]:].tolist()
    eos = tiny_tokenizer.eos_token_id
    res = engine.generate(ids[0].tolist(), max_new_tokens=24)
    n = ref.index(eos) + 1 if eos in ref else len(ref)
    assert res.tokens == ref[:n]
    assert res.stop_reason == ("eos" if eos in ref else "length")


def test_streaming_and_stop_strings(engine):
    pieces = list(engine.stream("the quick brown", max_new_tokens=20))
    full = engine.generate("the quick brown", max_new_tokens=20)
    assert "".join(pieces) == full.text
    if len(full.text) > 3:
        stop = full.text[2:4]
        cut = engine.generate("the quick brown", max_new_tokens=20, stop=[stop])
        assert cut.stop_reason == "stop string" and cut.text == full.text[: full.text.index(stop)]
        streamed = []
        cut2 = engine.generate("the quick brown", max_new_tokens=20, stop=[stop], on_token=lambda t, p: streamed.append(p))
        assert "".join(streamed) == cut2.text == cut.text  # the stop string is never streamed


def test_max_seq_is_checked_before_generating(engine):
    with pytest.raises(Exception, match="max_seq"):
        engine.generate([1] * 90, max_new_tokens=10)
