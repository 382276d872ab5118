"""Sparse training of SmolLM2-135M to 2:4 on BBC text (issue 14's second benchmark): every
recipe starts from the dense model and gets the same training budget (steps x batch x seqlen
tokens from one pool of BBC calibration windows, distilled from the dense model's cached top-64
logits), and is evaluated on the same held-out BBC windows, in one process.

    .venv/bin/python benchmarks/bench_sparse_training_smollm2.py [--steps 60 --batch-size 4 --seqlen 128]
        [--recipes recover,gradual,gradual-magnitude,progressive,srste,dynamic,three-stage] [--json outputs/results/train_smollm2.json]
    .venv/bin/python benchmarks/bench_sparse_training_smollm2.py --throughput [--steps 4]

Recipes (``sparsemerge.train.recipe``; the same stages run from ``sparsemerge train RECIPE.yaml``):
  recover      one-shot SparseGPT 2:4 (32 x 512 calibration tokens), then fixed-mask distillation
               (what ``sparsemerge prune`` + ``sparsemerge recover`` do today)
The mask-changing recipes score weights by ``|W_ij| * ||X_j||`` (``activation_aware``); a
``-magnitude`` suffix (e.g. ``gradual-magnitude``) runs the same recipe on plain ``|W|``.
  gradual      cubic ramp dense -> 2:4 over the first 70% of the steps, masks every 5 steps
  progressive  dense -> 4:8 -> 2:4 in equal thirds
  srste        SR-STE 2:4 from the first step (masks every step)
  dynamic      2:4 from the first step, TopK(|W| + gamma c |grad W|) every 5 steps
  three-stage  dense + L1 (10%) -> gradual 2:4 (60%) -> fixed masks (30%), the chapter's 10.1.7
  sparsegpt-srste, sparsegpt-dynamic
               one-shot SparseGPT 2:4, then SR-STE / dynamic reallocation (masks free to change)
Target (issue 14): the best recipe at most 2.0x the dense perplexity, and better than recover.

``--throughput``: tokens/s of one training step - a plain transformers loop (model(ids,
labels=ids).loss, AdamW) beside our fixed-mask step with the cached teacher and our SR-STE step
on the same model, batch and thread count. Run it on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch

from sparsemerge.eval.data import eval_windows
from sparsemerge.eval.perplexity import perplexity
from sparsemerge.io import load_model, write_json_atomic
from sparsemerge.train.recipe import TrainRecipe, train_recipe_

WORK = Path("outputs/bench_train")


def stages(recipe: str, steps: int, lr: float) -> list[dict]:
    magnitude = recipe.endswith("-magnitude")
    recipe = recipe.removesuffix("-magnitude")
    common = {"lr": lr, "warmup_steps": max(1, steps // 10), "kd_weight": 1.0, "ce_weight": 0.0,
              "activation_aware": not magnitude}
    if recipe == "recover":
        return [{"name": "sparsegpt", "method": "prune", "pattern": "2:4", "steps": 0,
                 "prune": {"method": "sparsegpt", "nsamples": 32, "seqlen": 512}},
                {"name": "recover", "method": "fixed", "steps": steps, **common}]
    if recipe in ("sparsegpt-srste", "sparsegpt-dynamic"):  # one-shot start, masks free to change afterwards
        method = recipe.split("-")[1]
        extra = {"update_every": 1} if method == "srste" else {"update_every": 5, "gamma": 0.1}
        return [{"name": "sparsegpt", "method": "prune", "pattern": "2:4", "steps": 0,
                 "prune": {"method": "sparsegpt", "nsamples": 32, "seqlen": 512}},
                {"name": method, "method": method, "steps": steps, **extra, **common}]
    if recipe == "gradual":
        return [{"method": "gradual", "steps": steps, "ramp_end": 0.7, "update_every": 5, **common}]
    if recipe == "progressive":
        return [{"method": "progressive", "steps": steps, "progressive": ["dense", "4:8", "2:4"], "update_every": 5, **common}]
    if recipe == "srste":
        return [{"method": "srste", "steps": steps, "update_every": 1, **common}]
    if recipe == "dynamic":
        return [{"method": "dynamic", "steps": steps, "update_every": 5, "gamma": 0.1, **common}]
    if recipe == "three-stage":
        a, b = max(1, steps // 10), int(0.6 * steps)
        return [{"name": "L1", "method": "dense", "steps": a, "l1": 1e-3, **common},
                {"name": "gradual", "method": "gradual", "steps": b, "ramp_end": 0.8, "update_every": 5, **common},
                {"name": "fixed", "method": "fixed", "steps": steps - a - b, **common, "warmup_steps": 0}]
    raise SystemExit(f"unknown recipe {recipe!r}")


def throughput(args, loaded) -> None:
    from sparsemerge.train.loop import dense_parameters, set_trainable_
    from sparsemerge.train.sparse_masks import trainable_weights
    from sparsemerge.train.sparse_train import StageConfig, run_stage
    from sparsemerge.train.teacher_cache import TeacherCache, WindowPool, topk_kd_loss
    from sparsemerge.train.loop import training_tokens
    from sparsemerge.eval.data import load_texts

    ids = training_tokens(loaded.tokenizer, load_texts("bbc", "calib"), args.seqlen)
    pool = WindowPool.draw(ids, args.seqlen, (args.steps + 1) * args.batch_size, seed=0)
    teacher = copy.deepcopy(loaded.model)
    cache = TeacherCache.build(teacher, pool, 64, WORK / "throughput_teacher.pt", progress=False)
    rows = []

    def plain():
        model = copy.deepcopy(loaded.model)
        params = set_trainable_(model, dense_parameters(model))
        opt = torch.optim.AdamW(params, lr=1e-5)
        model.train()
        times = []
        for step in range(args.steps + 1):
            batch = pool.windows[pool.indices(step, args.batch_size)]
            start = time.perf_counter()
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.perf_counter() - start)
        return times[1:]  # the first step allocates the optimizer state

    def ours(method: str, cached: bool = True):
        model = copy.deepcopy(loaded.model)
        params = set_trainable_(model, dense_parameters(model))
        weights = trainable_weights(model, include_conv=False, pattern=None)
        if method == "fixed":
            from sparsemerge.prune import PruneConfig, prune_

            prune_(model, PruneConfig(method="magnitude", pattern="2:4", progress=False))
            params = set_trainable_(model, dense_parameters(model))

        starts = []

        def loss_fn(step):
            starts.append(time.perf_counter())  # a step runs from one loss_fn call to the next
            which = pool.indices(step, args.batch_size)
            out = model(input_ids=pool.windows[which], use_cache=False)
            if not cached:  # the teacher run on every batch, as recover does
                from sparsemerge.train.distill import kd_loss

                with torch.no_grad():
                    teacher_logits = teacher(input_ids=pool.windows[which], use_cache=False).logits
                return kd_loss(out.logits, teacher_logits, 2.0), args.batch_size * args.seqlen
            values, indices, lse = cache.batch(which, 2.0)
            return topk_kd_loss(out.logits, values, indices, lse, 2.0), args.batch_size * args.seqlen

        # steps + 2 calls: step 0 (optimizer state, first masks) is not timed, as in the plain loop
        config = StageConfig(method=method, steps=args.steps + 2, lr=1e-5, warmup_steps=0, update_every=1)
        run_stage(model, params, weights, config, loss_fn, progress=False)
        return [b - a for a, b in zip(starts[1:], starts[2:])]

    torch.set_num_threads(args.threads)
    tokens = args.batch_size * args.seqlen
    plain_times = plain()
    plain_tps = tokens * len(plain_times) / sum(plain_times)
    rows.append(("transformers loop (CE, AdamW)", plain_tps, 1.0))
    for method, cached in (("fixed", True), ("srste", True), ("fixed", False)):
        times = ours(method, cached)
        tps = tokens * len(times) / sum(times)
        kd = "cached top-64 KD" if cached else "teacher run every step, full KD"
        rows.append((f"sparsemerge {method} step ({kd})", tps, tps / plain_tps))
    print(f"training throughput, SmolLM2-135M, batch {args.batch_size} x {args.seqlen} tokens, {args.threads} threads, "
          f"{args.steps} timed steps")
    print("| loop | tokens/s | x plain |")
    print("|---|---:|---:|")
    for name, tps, ratio in rows:
        print(f"| {name} | {tps:.1f} | {ratio:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--recipes", default="recover,gradual,gradual-magnitude,progressive,srste,dynamic,three-stage")
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--throughput", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model("smollm2")
    if args.throughput:
        throughput(args, loaded)
        return
    teacher = copy.deepcopy(loaded.model)
    windows = eval_windows(loaded.tokenizer, "bbc", 512, args.eval_windows)
    dense = perplexity(teacher, windows, progress=False)
    print(f"dense perplexity {dense:.2f} ({args.eval_windows} x 512 held-out BBC tokens)", flush=True)
    rows = []
    for name in args.recipes.split(","):
        recipe = TrainRecipe(model="smollm2", text="bbc", eval="none", batch_size=args.batch_size,
                             seqlen=args.seqlen, topk=64, teacher_cache=str(WORK / "teacher_top64.pt"), seed=0,
                             checkpoint_every=0, stages=stages(name, args.steps, args.lr))
        model = copy.deepcopy(loaded.model)
        start = time.perf_counter()
        result = train_recipe_(model, loaded.tokenizer, recipe, WORK / name, teacher=teacher, progress=True, restart=True)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, windows, progress=False)
        tokens = sum(s.tokens for s in result.stages)
        train_s = sum(s.train_seconds for s in result.stages)
        violations = sum(layer["violations"] for layer in result.layers)
        flips = sum(u["changed"] for s in result.stages for u in s.mask_updates)
        rows.append({"recipe": name, "perplexity": ppl, "x_dense": ppl / dense, "tokens": tokens, "seconds": seconds,
                     "train_tokens_per_s": tokens / train_s if train_s else None, "violations": violations,
                     "mask_flips": flips, "stages": [s.to_json() for s in result.stages]})
        print(f"{name}: perplexity {ppl:.2f} ({ppl / dense:.2f}x dense), {tokens} tokens, {seconds:.0f} s, "
              f"2:4 violations {violations}", flush=True)
        del model
    print()
    print(f"SmolLM2-135M 2:4, budget {args.steps} steps x {args.batch_size} x {args.seqlen} tokens per recipe, "
          f"lr {args.lr}, distilled from the dense model (top-64 logits), {args.eval_windows} x 512 held-out BBC tokens")
    print("| recipe | perplexity | x dense | training tokens | mask flips | wall s |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| dense | {dense:.2f} | 1.00 | - | - | - |")
    for r in rows:
        print(f"| {r['recipe']} | {r['perplexity']:.2f} | {r['x_dense']:.2f} | {r['tokens']} | {r['mask_flips']} | {r['seconds']:.0f} |")
    if args.json:
        write_json_atomic(args.json, {"args": vars(args), "dense": dense, "rows": rows})


if __name__ == "__main__":
    main()
