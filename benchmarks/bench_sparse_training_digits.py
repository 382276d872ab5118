"""Sparse training from scratch on a small vision model (issue 14's first benchmark): a small
CNN on scikit-learn's digits (8x8 images, 1,797 samples; a fixed stratified 80/20 split),
dense against 2:4 by every training method of ``sparsemerge.train``, each with the same
number of optimizer steps (the equal training budget), over several seeds, in one process.

    .venv/bin/python benchmarks/bench_sparse_training_digits.py [--seeds 0,1,2] [--epochs 60]
        [--pattern 2:4] [--width 4] [--json outputs/results/digits_sparse_training.json]

Methods (all 2:4 - or ``--pattern`` - on the four layers whose inputs have a multiple of 4 channels/features -
conv2, conv3, fc1, fc2; the 1-channel input conv stays dense, as NVIDIA ASP does):
  dense               no masks
  oneshot + finetune  dense for 60% of the steps, magnitude 2:4 once, fine-tune the rest (fixed masks)
  gradual             cubic ramp dense -> 2:4 from 10% to 60% of the steps, masks every 10 steps
  progressive         dense -> 4:8 -> 2:4 in three equal parts
  srste               SR-STE from the first step (masks every step, lambda_W = 2e-4)
  dynamic             2:4 from the first step, TopK(|W| + gamma c |grad W|) every 10 steps (gamma 0.5)
Target (issue 14): SR-STE 2:4 within 0.5 points of the dense accuracy (mean over seeds).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from sparsemerge.patterns import NM
from sparsemerge.train.sparse_train import StageConfig, run_stage
from sparsemerge.train.sparse_masks import trainable_weights


def make_cnn(width: int = 4) -> nn.Module:
    """Channels 4w, 8w, 8w and 32w hidden units (w = 4: 16, 32, 32, 128; w = 1 is a narrow net
    whose capacity the sparsity actually costs)."""
    c1, c2, hidden = 4 * width, 8 * width, 32 * width
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(c2 * 4 * 4, hidden), nn.ReLU(), nn.Linear(hidden, 10),
    )


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    train, test = train_test_split(range(len(y)), test_size=0.2, stratify=y.numpy(), random_state=seed)
    return x[train], y[train], x[test], y[test]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def stages_for(method: str, steps: int, lr: float, pattern: str = "2:4") -> list[dict]:
    n, m = (int(v) for v in pattern.split(":"))
    halfway = f"{2 * n}:{m}" if 2 * n < m else None  # progressive: dense -> 2N:M -> N:M
    common = {"optimizer": "adamw", "lr": lr, "warmup_steps": steps // 20, "grad_clip": 5.0, "kd_weight": 0.0,
              "pattern": pattern}
    if method == "dense":
        return [{"method": "dense", "steps": steps, **common}]
    if method == "oneshot":
        first = int(0.6 * steps)
        return [{"method": "dense", "steps": first, **common},
                {"method": "oneshot", "steps": steps - first, **common, "warmup_steps": 0}]
    if method == "gradual":
        return [{"method": "gradual", "steps": steps, "ramp_start": 0.1, "ramp_end": 0.6, "update_every": 10, **common}]
    if method == "progressive":
        return [{"method": "progressive", "steps": steps, "progressive": ["dense"] + ([halfway] if halfway else []) + [pattern], "update_every": 10, **common}]
    if method == "srste":
        return [{"method": "srste", "steps": steps, "update_every": 1, "srste_decay": 2e-4, **common}]
    if method == "dynamic":
        return [{"method": "dynamic", "steps": steps, "update_every": 10, "gamma": 0.5, **common}]
    raise ValueError(method)


def train_one(method: str, seed: int, data, epochs: int, batch: int, lr: float, pattern: str = "2:4",
              width: int = 4) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = make_cnn(width)
    steps_per_epoch = (len(ytr) + batch - 1) // batch
    steps = epochs * steps_per_epoch
    loss_f = nn.CrossEntropyLoss()
    offset = 0
    start = time.perf_counter()
    reports = []
    nm = NM(*(int(v) for v in pattern.split(":")))
    for stage in stages_for(method, steps, lr, pattern):
        config = StageConfig(**stage)
        weights = trainable_weights(model, pattern=nm)

        def loss_fn(step: int, offset: int = offset) -> tuple[torch.Tensor, int]:
            global_step = offset + step
            epoch, k = divmod(global_step, steps_per_epoch)
            order = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
            idx = order[k * batch : (k + 1) * batch]
            return loss_f(model(xtr[idx]), ytr[idx]), len(idx)

        report, _ = run_stage(model, list(model.parameters()), weights, config, loss_fn, progress=False)
        reports.append(report)
        offset += config.steps
    seconds = time.perf_counter() - start
    weights = trainable_weights(model, pattern=nm)
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    flips = sum(u["changed"] for r in reports for u in r.mask_updates)
    return {"method": method, "seed": seed, "accuracy": accuracy(model, xte, yte), "sparsity": zeros,
            "steps": steps, "seconds": seconds, "mask_flips": flips}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--methods", default="dense,oneshot,gradual,progressive,srste,dynamic")
    parser.add_argument("--pattern", default="2:4", help="N:M of the sparse runs (1:4, 1:8 separate the methods more)")
    parser.add_argument("--width", type=int, default=4, help="channel multiplier (4: 16/32/32/128; 1: 4/8/8/32)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = load_digits_split(0)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for method in args.methods.split(","):
        for seed in seeds:
            row = train_one(method, seed, data, args.epochs, args.batch, args.lr, args.pattern, args.width)
            rows.append(row)
            print(f"{method:12s} seed {seed}: accuracy {row['accuracy']:.2f}%  sparsity {row['sparsity']:.3f}  "
                  f"{row['seconds']:.1f} s", flush=True)
    print()
    print(f"digits CNN width {args.width}, {args.pattern} sparse runs, {args.epochs} epochs x batch {args.batch} ({rows[0]['steps']} steps) per run, AdamW lr {args.lr}, "
          f"seeds {args.seeds}; test accuracy (360 images)")
    print("| method | sparsity of the N:M layers | accuracy mean | min | max | vs dense (points) | s per run |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    dense = None
    summary = []
    for method in args.methods.split(","):
        accs = [r["accuracy"] for r in rows if r["method"] == method]
        mean = statistics.mean(accs)
        dense = mean if method == "dense" else dense
        sparsity = statistics.mean(r["sparsity"] for r in rows if r["method"] == method)
        secs = statistics.mean(r["seconds"] for r in rows if r["method"] == method)
        delta = "-" if dense is None or method == "dense" else f"{mean - dense:+.2f}"
        summary.append({"method": method, "mean": mean, "min": min(accs), "max": max(accs), "sparsity": sparsity})
        print(f"| {method} | {sparsity:.3f} | {mean:.2f} | {min(accs):.2f} | {max(accs):.2f} | {delta} | {secs:.1f} |")
    if args.json:
        from sparsemerge.io import write_json_atomic

        write_json_atomic(args.json, {"args": vars(args), "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
