"""Output of a :class:`~sparsemerge.prune.sensitivity.SensitivityReport`: one table per
criterion (``sparsemerge sensitivity`` prints them) and a PNG plot (matplotlib, Agg)."""
from __future__ import annotations

import math
from pathlib import Path

from sparsemerge.prune.sensitivity import DENSE, SensitivityReport

UNITS = {
    "taylor": "first-order predicted loss increase, nats",
    "fisher": "diagonal-Fisher predicted loss increase, nats",
    "obs": "SparseGPT layer error ||(W-W')X^T||^2/n",
    "measured": "held-out loss increase, nats/token",
}


def format_report(report: SensitivityReport) -> str:
    """One table per criterion: layer, shape, then one column per candidate."""
    from sparsemerge.eval.report import format_table

    parts = []
    for c in report.criteria:
        rows = [
            [lay.name, "x".join(map(str, lay.shape))] + [lay.scores[c][p] for p in report.candidates]
            for lay in report.layers if c in lay.scores
        ]
        rows = [[r[0], r[1]] + [_num(v) for v in r[2:]] for r in rows]
        parts.append(f"{c} ({UNITS[c]})\n" + format_table(["layer", "shape"] + report.candidates, rows))
    if report.base_loss is not None:
        parts.append(f"dense held-out loss {report.base_loss:.4f} nats/token (perplexity {math.exp(report.base_loss):.2f})")
    return "\n\n".join(parts)


def _num(v: float) -> str:
    return "0" if v == 0 else f"{v:.4g}"


def plot_report(report: SensitivityReport, path: "str | Path", overwrite: bool = False) -> Path:
    """Lines per candidate pattern against layer index (log scale), one panel per criterion."""
    from sparsemerge.eval.report import _pyplot
    from sparsemerge.io.atomic import atomic_output

    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    n = len(report.criteria)
    fig, axes = plt.subplots(n, 1, figsize=(max(6.0, min(16.0, 0.06 * len(report.layers) + 5)), 2.8 * n), squeeze=False)
    for ax, c in zip(axes[:, 0], report.criteria):
        idx = [i for i, lay in enumerate(report.layers) if c in lay.scores]
        series = {p: [report.layers[i].scores[c][p] for i in idx] for p in report.candidates if p != DENSE}
        for p, values in series.items():
            ax.plot(idx, values, ".-", label=p, linewidth=1, markersize=3)
        flat = [abs(v) for values in series.values() for v in values if v != 0]
        if any(v <= 0 for values in series.values() for v in values):  # measured: noise can go below 0
            ax.set_yscale("symlog", linthresh=min(flat) if flat else 1.0)
            ax.axhline(0.0, color="gray", linewidth=0.5)
        else:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"{c}: {UNITS[c]}", fontsize=9)
        ax.set_xlabel("layer index (targeted Linear layers in model order)", fontsize=8)
        ax.legend(fontsize=7, ncol=len(report.candidates))
    fig.tight_layout()
    try:
        with atomic_output(path, overwrite=overwrite, is_dir=False) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
    finally:
        plt.close(fig)
    return Path(path)
