"""Quality at equal sparsity (issue 13's target): SmolLM2-135M with half of its prunable
weights removed, uniform 2:4 SparseGPT against a mixed per-layer allocation (sensitivity ->
allocate under a 50% sparsity budget -> SparseGPT with each layer's own pattern), with and
without channel permutation, all calibrated on the same BBC windows and evaluated on the same
held-out BBC windows, in one process.

    .venv/bin/python benchmarks/bench_mixed_allocation.py [--nsamples 32 --seqlen 512 --windows 8]
        [--candidates dense,4:8,2:4,2:8,1:4] [--criteria taylor,fisher,obs] [--json outputs/results/mixed.json]

Rows: dense; uniform 2:4 and 4:8 (the same 50%); uniform 2:4 after permutation; a mixed
allocation per sensitivity criterion; the same on the permuted model (permutation first, then
sensitivity and allocation on the permuted weights, so the scores see the masks that will be used).
Target (issue 13): mixed + permutation at most 0.75x the perplexity of uniform 2:4 SparseGPT.
"""
from __future__ import annotations

import argparse
import copy
import time

import torch

from sparsemerge.eval.data import calibration_windows, eval_windows
from sparsemerge.eval.perplexity import perplexity
from sparsemerge.io import load_model, write_json_atomic
from sparsemerge.prune import PruneConfig
from sparsemerge.prune.allocate import Budget, allocate
from sparsemerge.prune.api import prune_
from sparsemerge.prune.permutation import collect_input_norms, permute_channels_
from sparsemerge.prune.select import select_targets
from sparsemerge.prune.sensitivity import SensitivityConfig, layer_sensitivity


def pruned_share(model: torch.nn.Module) -> float:
    """Zeros among the weights the default selection targets (the prunable ones)."""
    targets, _ = select_targets(model, PruneConfig())
    zeros = sum(int((t.weight == 0).sum()) for t in targets)
    return zeros / sum(t.weight.numel() for t in targets)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nsamples", type=int, default=32, help="calibration windows (pruning and sensitivity)")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--windows", type=int, default=8, help="held-out windows of 512 tokens")
    parser.add_argument("--candidates", default="dense,4:8,2:4,2:8,1:4")
    parser.add_argument("--criteria", default="taylor,fisher,obs", help="sensitivity criteria; one allocation each")
    parser.add_argument("--sparsity", type=float, default=0.5, help="share of the prunable weights removed")
    parser.add_argument("--permute-iters", type=int, default=100, help="channel-swap rounds per permuted space")
    parser.add_argument("--json", help="write the rows as JSON")
    args = parser.parse_args()
    torch.manual_seed(0)
    loaded = load_model("smollm2")
    dense, tok = loaded.model, loaded.tokenizer
    calib = calibration_windows(tok, "bbc", args.nsamples, args.seqlen, 0)
    heldout = eval_windows(tok, "bbc", 512, args.windows)
    candidates = [c.strip() for c in args.candidates.split(",")]
    rows: list[dict] = []

    def record(name: str, model: torch.nn.Module, seconds: float, note: str = "") -> None:
        ppl = perplexity(model, heldout, progress=False)
        rows.append({"model": name, "pruned share": round(pruned_share(model), 4), "perplexity": ppl,
                     "seconds": round(seconds, 1), "note": note})
        print(f"{name:<34} share {rows[-1]['pruned share']:.4f}  ppl {ppl:9.2f}  {seconds:6.0f} s  {note}", flush=True)

    record("dense", dense, 0.0)
    sgpt = {"method": "sparsegpt", "nsamples": args.nsamples, "seqlen": args.seqlen, "progress": False,
            "permute_iters": args.permute_iters}
    for pattern in ("2:4", "4:8"):
        model, start = copy.deepcopy(dense), time.perf_counter()
        prune_(model, {**sgpt, "pattern": pattern}, calibration=calib)
        record(f"uniform {pattern} sparsegpt", model, time.perf_counter() - start)
        del model
    model, start = copy.deepcopy(dense), time.perf_counter()
    report = prune_(model, {**sgpt, "pattern": "2:4", "permute": True}, calibration=calib)
    gain = report.permutation["gain"] if report.permutation else float("nan")
    record("uniform 2:4 sparsegpt + permute", model, time.perf_counter() - start, f"N:M-kept score +{100 * gain:.2f}%")
    del model

    criteria = [c.strip() for c in args.criteria.split(",")]
    for permuted in (False, True):
        model, start = copy.deepcopy(dense), time.perf_counter()
        if permuted:  # permute for 2:4-like groups first; sensitivity then scores the permuted weights
            config = PruneConfig(**{**sgpt, "pattern": "2:4", "permute": True})
            targets, _ = select_targets(model, config)
            norms = collect_input_norms(model, targets, calib)
            permute_channels_(model, config, targets=targets, input_norms=norms)
        sens = layer_sensitivity(model, tok, SensitivityConfig(criteria=criteria, patterns=candidates,
                                                                  nsamples=args.nsamples, seqlen=args.seqlen,
                                                                  progress=False), calibration=calib)
        shared = time.perf_counter() - start  # permutation + sensitivity, counted in every row below
        for criterion in criteria:
            start = time.perf_counter()
            alloc = allocate(sens, Budget("sparsity", args.sparsity), criterion=criterion)
            recipe = alloc.to_recipe(method="sparsegpt")["prune"]
            pruned = copy.deepcopy(model)
            prune_(pruned, {**sgpt, **{k: v for k, v in recipe.items() if k in ("pattern", "layer_patterns", "include", "exclude")}},
                   calibration=calib)
            counts: dict[str, int] = {}
            for p in alloc.patterns.values():
                counts[p] = counts.get(p, 0) + 1
            mix = ", ".join(f"{n} x {p}" for p, n in sorted(counts.items(), key=lambda kv: -kv[1]))
            name = f"mixed ({criterion})" + (" + permute" if permuted else "")
            record(name, pruned, shared + time.perf_counter() - start, mix)
            del pruned
        del model

    base = next(r["perplexity"] for r in rows if r["model"] == "uniform 2:4 sparsegpt")
    dense_ppl = rows[0]["perplexity"]
    print(f"\n| model | pruned share | perplexity | x dense | x uniform 2:4 | seconds | allocation / note |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        r["x dense"] = r["perplexity"] / dense_ppl
        r["x uniform 2:4"] = r["perplexity"] / base
        print(f"| {r['model']} | {r['pruned share']:.4f} | {r['perplexity']:.2f} | {r['x dense']:.2f} | "
              f"{r['x uniform 2:4']:.3f} | {r['seconds']:.0f} | {r['note']} |")
    best = min((r for r in rows if r["model"].endswith("+ permute") and r["model"].startswith("mixed")),
               key=lambda r: r["perplexity"])
    verdict = "met" if best["x uniform 2:4"] <= 0.75 else "missed"
    print(f"\ntarget: mixed + permute <= 0.75x uniform 2:4 SparseGPT: best {best['model']} "
          f"{best['x uniform 2:4']:.3f} ({verdict})")
    if args.json:
        write_json_atomic(args.json, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
