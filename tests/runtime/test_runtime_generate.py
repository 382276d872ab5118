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


def test_nucleus_equals_a_full_stable_sort_and_draws_equal_rng_choice():
    """The partial-sort nucleus keeps exactly what sorting the whole vocabulary keeps (ties at
    the cut to the lower ids), and the sampler's inverse-cdf draw is rng.choice's."""
    from sparsemerge.runtime.sampling import nucleus

    def full_sort(p, top_p):
        order = np.argsort(-p, kind="stable")
        n = int(np.searchsorted(np.cumsum(p[order]), top_p) + 1)
        mask = np.zeros(p.shape[0], bool)
        mask[order[:n]] = True
        return mask

    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(5, 50000))
        z = rng.standard_normal(n) * [0.1, 1.0, 3.0, 10.0][trial % 4]
        if trial % 3 == 0:
            z = np.round(z, 1)  # many equal probabilities, also at the cut
        p = np.exp(z - z.max())
        p /= p.sum()
        for top_p in (0.05, 0.5, 0.9, 0.999):
            assert np.array_equal(nucleus(p, top_p), full_sort(p, top_p)), (trial, n, top_p)
    z = rng.standard_normal(3000) * 2
    cfg = SamplingConfig(temperature=0.8, top_p=0.95, seed=11)
    p = sample_probs(z, cfg)
    ref = np.random.default_rng(11)
    assert [Sampler(cfg)(z) for _ in range(1)] == [int(ref.choice(p.shape[0], p=p))]
    s, ref = Sampler(cfg), np.random.default_rng(11)
    assert [s(z) for _ in range(200)] == [int(ref.choice(p.shape[0], p=p)) for _ in range(200)]


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


def test_stream_decodes_in_the_callers_thread(engine, monkeypatch):
    """numba's parallel regions are ~40x slower to launch from a second thread once the main
    thread has launched some, so stream() must not hand the decoding to a thread of its own."""
    import threading

    threads = set()
    real_step = engine.step

    def step(tok):
        threads.add(threading.current_thread())
        return real_step(tok)

    monkeypatch.setattr(engine, "step", step)
    pieces = list(engine.stream("the quick brown", max_new_tokens=6))
    assert threads == {threading.current_thread()} and len(pieces) >= 1


def test_short_prompts_are_prefilled_by_the_step_like_the_batched_path(engine, monkeypatch):
    """Prompts of up to STEPPED_PREFILL_MAX tokens go through the compiled step (no ~70 ms
    transformers forward): the same logits and cache as the batched prefill, within float error."""
    import numpy as np

    import sparsemerge.runtime.engine as E

    ids = [5, 17, 42, 7, 99]
    assert len(ids) <= E.STEPPED_PREFILL_MAX
    engine.reset()
    stepped = engine.prefill(ids).copy()
    kc = engine.kc[:, :, : len(ids)].copy()
    monkeypatch.setattr(E, "STEPPED_PREFILL_MAX", 0)
    engine.reset()
    batched = engine.prefill(ids).copy()
    assert engine.pos == len(ids)
    np.testing.assert_allclose(stepped, batched, rtol=0, atol=1e-4 * float(np.abs(batched).max()))
    np.testing.assert_allclose(kc, engine.kc[:, :, : len(ids)], rtol=0, atol=1e-4)


def test_max_seq_is_checked_before_generating(engine):
    with pytest.raises(Exception, match="max_seq"):
        engine.generate([1] * 90, max_new_tokens=10)


def test_a_non_finite_weight_stops_generation_with_a_clear_error(tiny_tokenizer):
    """NaN in a weight (e.g. a checkpoint packed before pack refused NaN) made every logit NaN;
    argmax then chose token 0 and `run` printed nothing. Now the sampler, the perplexity loop and
    transformers' generate (through the logits processor) all refuse non-finite logits."""
    from transformers import LogitsProcessorList

    from sparsemerge.errors import SparsemergeError
    from sparsemerge.eval.perplexity import engine_perplexity
    from sparsemerge.runtime.sampling import finite_logits_processor

    model = make_tiny_llama(vocab_size=384, hidden=128, intermediate=256)
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    sparsify_(model, SparsifyConfig(prune=True, quant="int8"))
    engine = DecodeEngine(model, tiny_tokenizer, max_seq=32)
    with pytest.raises(SparsemergeError, match="logits are NaN or infinite.*inspect MODEL --verify"):
        engine.generate("the quick brown", max_new_tokens=4)
    with pytest.raises(SparsemergeError, match="logits are NaN or infinite"):
        engine_perplexity(engine, torch.arange(8).reshape(1, 8), progress=False)
    ids = tiny_tokenizer("the quick brown", return_tensors="pt").input_ids
    with pytest.raises(SparsemergeError, match="logits are NaN or infinite"), torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=0,
                       logits_processor=LogitsProcessorList([finite_logits_processor()]))
    for bad in (np.array([0.0, np.nan]), np.array([np.inf, 0.0])):
        with pytest.raises(SparsemergeError):
            Sampler(SamplingConfig(temperature=1.0, seed=0))(bad)
    assert Sampler(SamplingConfig())(np.array([0.0, 1.0, -np.float32(3e38)])) == 1  # large but finite is fine
