"""Measure llama.cpp (llama-cpp-python, in its own venv) on a GGUF file; prints one JSON line.

Run by benchmarks/bench_vs_llamacpp.py with the peer venv's python:
    .venv-peers/llamacpp/bin/python benchmarks/peers/run_llamacpp.py MODEL.gguf IDS.json --threads 2

IDS.json holds {"prompt": [...ids], "decode_prompt": [...], "windows": [[...], ...]}: the same
token ids our side uses (no second tokenizer in the comparison). Measured, in this process:
decode tokens/s (greedy, batch 1, after a short prompt), prompt tokens/s (one batched eval of
the long prompt), perplexity over the windows (logits of every position), peak RSS.
"""
from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np


def vm_hwm() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def last_logits(llm) -> np.ndarray:
    """The logits of the last evaluated position, straight from the context (without
    ``logits_all`` the Python wrapper keeps none; ``eval_logits`` would copy every row)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf")
    ap.add_argument("ids")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-ppl", action="store_true")
    args = ap.parse_args()
    import llama_cpp

    data = json.load(open(args.ids))
    base = vm_hwm()
    n_ctx = max(len(data["prompt"]), max((len(w) for w in data["windows"]), default=0)) + args.tokens + 8
    t0 = time.perf_counter()
    # decode and prompt speed (and the peak memory) without logits for every position
    llm = llama_cpp.Llama(args.gguf, n_ctx=n_ctx, n_batch=512, n_threads=args.threads, n_threads_batch=args.threads,
                          logits_all=False, verbose=False)
    load_s = time.perf_counter() - t0
    out = {"peer": "llama.cpp", "version": llama_cpp.__version__, "threads": args.threads, "load_s": load_s,
           "system_info": llama_cpp.llama_print_system_info().decode(errors="replace")}

    # decode: greedy tokens after the short prompt (prompt evaluation not timed)
    best = math.inf
    for _ in range(args.repeats):
        llm.reset()
        llm.eval(data["decode_prompt"])
        tok = int(np.argmax(last_logits(llm)))
        start = time.perf_counter()
        for _ in range(args.tokens):
            llm.eval([tok])
            tok = int(np.argmax(last_logits(llm)))
        best = min(best, time.perf_counter() - start)
    out["decode_tps"] = args.tokens / best

    # prompt processing: one long prompt, batched
    best = math.inf
    for _ in range(args.repeats):
        llm.reset()
        start = time.perf_counter()
        llm.eval(data["prompt"])
        best = min(best, time.perf_counter() - start)
    out["prompt_tokens"] = len(data["prompt"])
    out["prompt_tps"] = len(data["prompt"]) / best

    out["peak_rss_mib"] = (vm_hwm() - base) / 2**20
    if not args.no_ppl:  # a second instance that keeps the logits of every position
        del llm
        llm = llama_cpp.Llama(args.gguf, n_ctx=n_ctx, n_batch=512, n_threads=args.threads,
                              n_threads_batch=args.threads, logits_all=True, verbose=False)
        nll, count = 0.0, 0
        for w in data["windows"]:
            llm.reset()
            llm.eval(w)
            logits = np.asarray(llm.scores[: len(w)], np.float64)
            logits -= logits.max(1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            nll -= float(logp[np.arange(len(w) - 1), np.asarray(w[1:])].sum())
            count += len(w) - 1
        out["perplexity"] = math.exp(nll / count)
        out["ppl_tokens"] = count
    out["file_mb"] = __import__("os").path.getsize(args.gguf) / 1e6
    print(json.dumps(out))


if __name__ == "__main__":
    main()
