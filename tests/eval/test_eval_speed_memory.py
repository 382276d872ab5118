"""eval/speed.py and eval/memory.py: the decoding loop on a scripted model, and the peak
memory of a known allocation in a fresh process."""
from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import pytest
import torch

from sparsemerge.errors import SparsemergeError
from sparsemerge.eval.memory import peak_memory, peak_rss_bytes, rss_bytes
from sparsemerge.eval.speed import RunSpec, decode_seconds


class NextTokenModel:
    """Logits that always pick (last input token + 1) mod V; records every call."""

    def __init__(self, vocab: int = 10) -> None:
        self.vocab, self.calls = vocab, []

    def __call__(self, ids, past_key_values=None, use_cache=True):
        self.calls.append((ids.clone(), past_key_values))
        logits = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        logits[0, -1, (int(ids[0, -1]) + 1) % self.vocab] = 1.0
        return SimpleNamespace(logits=logits, past_key_values=len(self.calls))


def test_decode_seconds_runs_the_prompt_then_feeds_back_the_argmax():
    model = NextTokenModel()
    seconds = decode_seconds(model, torch.tensor([[5, 6, 7]]), tokens=4)
    assert seconds >= 0
    inputs = [ids.tolist() for ids, _ in model.calls]
    assert inputs == [[[5, 6, 7]], [[8]], [[9]], [[0]], [[1]]]  # prompt, then one token per step
    assert [past for _, past in model.calls] == [None, 1, 2, 3, 4]  # each step gets the previous cache


def test_run_spec_validates():
    with pytest.raises(SparsemergeError, match="threads must be >= 1"):
        RunSpec("m", threads=0)
    with pytest.raises(SparsemergeError, match="device must be cpu or cuda"):
        RunSpec("m", device="tpu")
    with pytest.raises(SparsemergeError, match="unknown kernel 'nope'"):
        with RunSpec("m", kernel="nope").setup():
            pass


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_peak_memory_of_a_known_allocation_in_a_fresh_process():
    assert 0 < rss_bytes() <= peak_rss_bytes()
    size = 64 << 20
    base, peak = peak_memory(os.urandom, (size,), imports=())  # 64 MiB, every page written
    assert size - (1 << 20) <= peak - base < size + (32 << 20)  # a few baseline pages may be freed
    failed = peak_memory(int, ("not a number",), imports=())
    assert isinstance(failed, str) and "ValueError" in failed
