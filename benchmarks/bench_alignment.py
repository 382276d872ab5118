"""Permutation alignment (weight matching, Git Re-Basin) before linear interpolation: MLPs on
scikit-learn's digits trained from different seeds; the loss barrier along (1-a) A + a B before
and after aligning B to A, printed and plotted.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_alignment.py [--width 512 --depth 2 --pairs 3]

Needs scikit-learn (only for its bundled digits data: ``pip install scikit-learn``). The issue's
target: the barrier drops by at least half. A quality number, not a timing: any machine gives
the same curves up to float summation order.
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from torch import nn

from sparsemerge.merge.align import align_
from sparsemerge.merge.lmc import LMCPoint, LMCResult, alpha_grid, interpolate, plot_lmc


def digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test): 1797 8x8 images scaled to [0, 1], 20 % held out."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise SystemExit("this benchmark reads scikit-learn's bundled digits: pip install scikit-learn") from exc
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test, train = order[: len(y) // 5], order[len(y) // 5:]
    return x[train], y[train], x[test], y[test]


def make_mlp(width: int, depth: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    sizes = [64] + [width] * depth + [10]
    for i, (m, n) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(m, n))
        if i < depth:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def train(model: nn.Sequential, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    """Adam, batches of 64, shuffled by ``seed`` (the init and the data order differ per seed)."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=g).split(64):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()


@torch.no_grad()
def curve(a: nn.Sequential, b: nn.Sequential, x: torch.Tensor, y: torch.Tensor, grid: int, label_a: str, label_b: str) -> tuple[LMCResult, list[float]]:
    """Test loss (nats) and accuracy of (1-a) A + a B on the grid."""
    mid = copy.deepcopy(a)
    sa, sb = a.state_dict(), b.state_dict()
    points, acc = [], []
    for alpha in alpha_grid(grid):
        mid.load_state_dict({k: interpolate(sa[k], sb[k], alpha) for k in sa})
        logits = mid(x)
        points.append(LMCPoint(alpha, float(nn.functional.cross_entropy(logits, y))))
        acc.append(float((logits.argmax(1) == y).float().mean()))
    return LMCResult(label_a, label_b, points, len(y), 1, "digits test split"), acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--depth", type=int, default=2, help="hidden layers")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--pairs", type=int, default=3, help="model pairs (seeds 2k, 2k+1)")
    p.add_argument("--grid", type=int, default=21)
    p.add_argument("--out", type=Path, default=Path("outputs/alignment"))
    args = p.parse_args()
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    x_train, y_train, x_test, y_test = digits()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"digits: {len(y_train)} train / {len(y_test)} test images; MLP 64-{'-'.join([str(args.width)] * args.depth)}-10, "
          f"ReLU, Adam {args.epochs} epochs; loss = test cross-entropy (nats)")
    rows = []
    for k in range(args.pairs):
        models = []
        for seed in (2 * k, 2 * k + 1):
            m = make_mlp(args.width, args.depth, seed)
            train(m, x_train, y_train, args.epochs, seed)
            m.eval()
            models.append(m)
        a, b = models
        naive, acc_naive = curve(a, b, x_test, y_test, args.grid, f"MLP seed {2 * k}", f"MLP seed {2 * k + 1}")
        with torch.no_grad():
            before_logits = b(x_test)
        start = time.perf_counter()
        result = align_(a, b)
        seconds = time.perf_counter() - start
        with torch.no_grad():
            drift = float((b(x_test) - before_logits).abs().max())  # 0 up to float order: same function
        aligned, acc_aligned = curve(a, b, x_test, y_test, args.grid, f"MLP seed {2 * k}", f"MLP seed {2 * k + 1} (aligned)")
        mid = len(naive.points) // 2
        row = {
            "pair": [2 * k, 2 * k + 1],
            "loss_a": naive.points[0].loss, "loss_b": naive.points[-1].loss,
            "acc_a": acc_naive[0], "acc_b": acc_naive[-1],
            "barrier_before": naive.barrier, "barrier_after": aligned.barrier,
            "ratio": aligned.barrier / naive.barrier if naive.barrier > 0 else float("nan"),
            "mid_acc_before": acc_naive[mid], "mid_acc_after": acc_aligned[mid],
            "cosine_before": result.similarity_before, "cosine_after": result.similarity_after,
            "sweeps": result.iterations, "align_seconds": seconds, "max_logit_change": drift,
            "curve_before": naive.to_json()["points"], "curve_after": aligned.to_json()["points"],
            "acc_before": acc_naive, "acc_after": acc_aligned,
        }
        rows.append(row)
        plot_lmc(aligned, args.out / f"lmc_digits_pair{k}.png", overwrite=True, before=naive)
        print(f"\npair {k} (seeds {2 * k}, {2 * k + 1}): test acc A {acc_naive[0]:.3f}, B {acc_naive[-1]:.3f}; "
              f"weight matching {result.iterations} sweeps, {seconds:.2f} s, cosine {result.similarity_before:.3f} -> "
              f"{result.similarity_after:.3f}, aligned B's logits change by {drift:.1e}")
        print(f"{'a':>6} {'loss naive':>11} {'loss aligned':>13} {'acc naive':>10} {'acc aligned':>12}")
        for i, (pn, pa) in enumerate(zip(naive.points, aligned.points)):
            print(f"{pn.alpha:6.2f} {pn.loss:11.4f} {pa.loss:13.4f} {acc_naive[i]:10.3f} {acc_aligned[i]:12.3f}")
        print(f"barrier {naive.barrier:.4f} -> {aligned.barrier:.4f} nats ({aligned.barrier / naive.barrier:.1%} of before)")
    print("\npair  barrier naive  barrier aligned  aligned/naive  mid acc naive  mid acc aligned")
    for k, r in enumerate(rows):
        print(f"{k:>4}  {r['barrier_before']:13.4f}  {r['barrier_after']:15.4f}  {r['ratio']:13.1%}  "
              f"{r['mid_acc_before']:13.3f}  {r['mid_acc_after']:15.3f}")
    worst = max(r["ratio"] for r in rows)
    print(f"worst aligned/naive barrier ratio {worst:.1%} (target <= 50%): {'met' if worst <= 0.5 else 'NOT met'}")
    (args.out / "bench_alignment.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "pairs": rows}, indent=1))
    print(f"plots and JSON -> {args.out}/")


if __name__ == "__main__":
    main()
