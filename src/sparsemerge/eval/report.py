"""Reports: the plain-text and Markdown tables every command and the demo print, and the
matplotlib plots (the demo's perplexity bars, the LMC curve). Plots are written atomically
(:func:`sparsemerge.io.atomic.atomic_output`) with the Agg backend (no display needed)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from sparsemerge.errors import SparsemergeError

if TYPE_CHECKING:  # type hints only: the report layer sits above merge/ and the demo
    from sparsemerge.demo import DemoRow
    from sparsemerge.merge.lmc import LMCResult

PLOT_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: "str | None" = None) -> str:
    """A plain-text table: first column left-aligned, the rest right-aligned (unless ``align``,
    one ``l``/``r`` per column). Floats print with :func:`format_cell`."""
    cells = [[format_cell(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(values, widths, align)).rstrip()

    out = [line([str(h) for h in headers]), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def format_cell(value: Any) -> str:
    """Floats: ``nan``; thousands separators from 1000; one decimal from 100; else 2 decimals,
    or 4 significant digits below 1. Anything else: ``str``."""
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table (floats to 4 significant digits), newline-terminated."""
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_perplexity(path: Path, rows: "list[DemoRow]") -> None:
    """The demo's bar chart: held-out perplexity (log scale) of the dense model and each pruned row."""
    from sparsemerge.io.atomic import atomic_output

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 1, 3.4))
    names = [r.name if r.name == "dense" else f"{r.name.replace('+', chr(10) + '+')}\n{r.pattern}" for r in rows]
    values = [r.perplexity for r in rows]
    bars = ax.bar(names, values, color=["#4c72b0"] + ["#dd8452"] * (len(rows) - 1))
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log)")
    ax.set_title("SmolLM2-135M on BBC News: dense vs pruned")
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, value), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    with atomic_output(path, overwrite=True, is_dir=False) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def check_plot_format(out: "str | Path") -> str:
    """The plot format named by ``out``'s extension (none: png); call it before the work."""
    fmt = Path(out).suffix.lstrip(".").lower() or "png"
    if fmt not in PLOT_FORMATS:
        raise SparsemergeError(f"plot format {fmt!r} is not supported; use .png, .pdf, .svg or .jpg")
    return fmt


def plot_lmc(result: "LMCResult", out: "str | Path", overwrite: bool = False, before: "LMCResult | None" = None) -> Path:
    """Loss along the path (solid) against the straight line between the ends (dashed); written
    atomically. ``before``: the curve before permutation alignment, drawn too (dotted)."""
    import numpy as np

    from sparsemerge.io.atomic import atomic_output

    out = Path(out)
    fmt = check_plot_format(out)
    plt = _pyplot()
    alphas = [p.alpha for p in result.points]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(alphas, [p.loss for p in result.points], "o-", label="L((1-a) A + a B)")
    ax.plot(alphas, [result.linear_baseline(a) for a in alphas], "--", color="gray", label="(1-a) L(A) + a L(B)")
    title = f"linear mode connectivity, barrier {result.barrier:.4f}"
    if before is not None:
        ax.plot([p.alpha for p in before.points], [p.loss for p in before.points], "s:", color="tab:red",
                label="before alignment")
        ax.lines[0].set_label("after alignment")
        title = f"linear mode connectivity, barrier {before.barrier:.4f} -> {result.barrier:.4f} aligned"
    ax.set_xlabel("a")
    ax.set_ylabel(f"loss (nats/token) on {result.data}")
    ax.set_title(title, fontsize=10)
    right = ax.secondary_yaxis("right", functions=(np.exp, lambda y: np.log(np.maximum(y, 1e-12))))
    right.set_ylabel("perplexity")
    ax.legend(fontsize=8)
    ax.text(0.0, -0.18, f"A = {result.model_a}", transform=ax.transAxes, fontsize=7)
    ax.text(0.0, -0.24, f"B = {result.model_b}", transform=ax.transAxes, fontsize=7)
    fig.tight_layout()
    try:
        with atomic_output(out, overwrite=overwrite, is_dir=False) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120)
    finally:
        plt.close(fig)
    return out
