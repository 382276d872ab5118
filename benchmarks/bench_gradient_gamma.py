"""Gradient-aware 2:4 pruning of SmolLM2-135M: held-out perplexity against gamma in
``|W| + gamma * c * |dL/dW|`` (c = mean|W| / mean|dL/dW| per layer), plus first-order Taylor
``|W * dL/dW|``, from one set of calibration gradients. gamma = 0 is magnitude pruning.

    .venv/bin/python benchmarks/bench_gradient_gamma.py [--nsamples 8 --calib-seqlen 256 --windows 4]

This sweep chose the default gamma of ``PruneConfig``; BENCHMARKS.md records a run.
"""
from __future__ import annotations

import argparse
import time

from sparsemerge.eval.data import calibration_windows, eval_windows
from sparsemerge.eval.perplexity import perplexity
from sparsemerge.io import load_model
from sparsemerge.prune import PruneConfig
from sparsemerge.prune.base import apply_scores
from sparsemerge.prune.gradient import calibration_gradients
from sparsemerge.prune.select import select_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=8)
    parser.add_argument("--calib-seqlen", type=int, default=256)
    parser.add_argument("--windows", type=int, default=4, help="held-out windows of 512 tokens")
    parser.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0])
    args = parser.parse_args()
    loaded = load_model("smollm2")
    model = loaded.model
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_windows(loaded.tokenizer, "bbc", args.nsamples, args.calib_seqlen, 0)
    windows = eval_windows(loaded.tokenizer, "bbc", 512, args.windows)
    targets, _ = select_targets(model, PruneConfig())
    start = time.perf_counter()
    grads = calibration_gradients(model, targets, calib, progress=False)
    print(f"gradients from {args.nsamples} x {args.calib_seqlen} BBC calibration tokens in {time.perf_counter() - start:.0f} s")
    print(f"dense perplexity {perplexity(model, windows, progress=False):.2f} ({args.windows} x 512 held-out tokens)")
    print(f"{'score':<26}{'2:4 perplexity':>15}")
    for gamma in args.gammas:
        model.load_state_dict(dense)
        targets, _ = select_targets(model, PruneConfig())
        scores = {}
        for t in targets:
            weight, grad = t.weight.detach().abs(), grads[t.name].abs()
            scores[t.name] = weight + gamma * (weight.mean() / grad.mean()) * grad
        apply_scores(targets, scores)
        print(f"{'gradient gamma=' + format(gamma, 'g'):<26}{perplexity(model, windows, progress=False):>15.1f}", flush=True)
    model.load_state_dict(dense)
    targets, _ = select_targets(model, PruneConfig())
    apply_scores(targets, {t.name: (t.weight.detach() * grads[t.name]).abs() for t in targets})
    print(f"{'taylor |W*g|':<26}{perplexity(model, windows, progress=False):>15.1f}")


if __name__ == "__main__":
    main()
