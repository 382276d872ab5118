"""``sparsemerge tune``'s report: the table of candidates and the frontier plot (perplexity
against packed MB coloured by decode tokens/s, and perplexity against tokens/s), with
external points (e.g. a llama.cpp file measured separately) drawn beside the candidates."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from sparsemerge.errors import SparsemergeError

TABLE_HEADERS = ["#", "candidate", "method", "allocation", "codec", "sparsity", "MB", "ppl", "tok/s", "speedup", "frontier", "note"]


def _num(value: Any) -> Any:
    return float(value) if isinstance(value, (int, float)) and value is not None else "-"


def table_rows(rows: Sequence[dict[str, Any]], chosen: Optional[int] = None) -> list[tuple]:
    out = []
    for r in rows:
        note = f"error: {r['error']}" if r.get("error") else ""
        if r.get("index") == chosen and chosen is not None:
            note = "CHOSEN"
        mark = "*" if r.get("frontier") else ""
        out.append((r.get("index"), r.get("label"), r.get("method"), r.get("allocation"), r.get("codec"), _num(r.get("sparsity")),
                    _num(r.get("mb")), _num(r.get("ppl")), _num(r.get("tok_s")), _num(r.get("speedup")), mark, note[:90]))
    return out


def load_extra_points(path: "str | Path") -> list[dict[str, Any]]:
    """External points from a JSON file: a list (or ``{"points": [...]}``) of objects with
    ``label``, ``mb``, ``ppl`` and optional ``tok_s`` (e.g. llama.cpp's Q4_1 file)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SparsemergeError(f"could not read --extra-points {str(path)!r}: {exc}") from None
    points = data.get("points") if isinstance(data, dict) else data
    if not isinstance(points, list):
        raise SparsemergeError(f"--extra-points {str(path)!r} must hold a list of points (or {{\"points\": [...]}})")
    out = []
    for i, p in enumerate(points):
        if not isinstance(p, dict) or not all(isinstance(p.get(k), (int, float)) for k in ("mb", "ppl")):
            raise SparsemergeError(f"--extra-points {str(path)!r}: point {i} needs numbers 'mb' and 'ppl' (and a 'label'), got {p!r}")
        tok = p.get("tok_s")
        if tok is not None and not isinstance(tok, (int, float)):
            raise SparsemergeError(f"--extra-points {str(path)!r}: point {i}'s 'tok_s' must be a number, got {tok!r}")
        out.append({"label": str(p.get("label", f"external {i}")), "mb": float(p["mb"]), "ppl": float(p["ppl"]),
                    "tok_s": None if tok is None else float(tok)})
    return out


def _ok(r: dict[str, Any]) -> bool:
    return not r.get("error") and all(isinstance(r.get(k), (int, float)) and math.isfinite(r[k]) for k in ("mb", "ppl", "tok_s"))


def plot_frontier(path: "str | Path", rows: Sequence[dict[str, Any]], extra: Sequence[dict[str, Any]] = (),
                  chosen: Optional[int] = None, title: str = "", notes: Sequence[str] = ()) -> None:
    """Two panels: perplexity vs MB (colour: tokens/s) and perplexity vs tokens/s; the
    frontier's points ringed, joined and labelled; the chosen one starred; external points as
    black diamonds; ``notes`` printed under the panels. Written atomically (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsemerge.io.atomic import atomic_output

    good = [r for r in rows if _ok(r)]
    if not good:
        raise SparsemergeError("no candidate was evaluated successfully: nothing to plot")
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    toks = [r["tok_s"] for r in good]
    sc = left.scatter([r["mb"] for r in good], [r["ppl"] for r in good], c=toks, cmap="viridis", s=36, zorder=3)
    fig.colorbar(sc, ax=left, label="decode tokens/s")
    right.scatter(toks, [r["ppl"] for r in good], c=[r["mb"] for r in good], cmap="plasma", s=36, zorder=3)
    front = [r for r in good if r.get("frontier")]
    for ax, x in ((left, "mb"), (right, "tok_s")):
        ax.scatter([r[x] for r in front], [r["ppl"] for r in front], s=130, facecolors="none", edgecolors="red",
                   linewidths=1.4, zorder=4, label="Pareto frontier (ppl, MB, tok/s)")
        # the 2-D trade-off of this panel: best perplexity so far along the x axis
        order = sorted(good, key=lambda r: r[x], reverse=(x == "tok_s"))
        best, xs, ys = math.inf, [], []
        for r in order:
            if r["ppl"] < best:
                best = r["ppl"]
                xs.append(r[x])
                ys.append(r["ppl"])
        ax.step(xs, ys, where="post", color="red", alpha=0.5, linewidth=1, zorder=2)
        # every point labelled in a small sweep; in a large one the frontier and the dense reference
        for r in (good if len(good) <= 16 else [r for r in good if r.get("frontier") or r.get("label") == "dense"]):
            ax.annotate(r["label"], (r[x], r["ppl"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        pick = [r for r in good if chosen is not None and r.get("index") == chosen]
        if pick:
            ax.scatter([pick[0][x]], [pick[0]["ppl"]], marker="*", s=260, color="gold", edgecolors="black", zorder=5, label="chosen")
        ext = [p for p in extra if x == "mb" or p.get("tok_s") is not None]
        if ext:
            ax.scatter([p[x] for p in ext], [p["ppl"] for p in ext], marker="D", s=50, color="black", zorder=5, label="external")
            for p in ext:
                ax.annotate(p["label"], (p[x], p["ppl"]), fontsize=7, xytext=(4, -9), textcoords="offset points")
        ppls = [r["ppl"] for r in good] + [p["ppl"] for p in ext]
        if max(ppls) / max(min(ppls), 1e-9) > 4:
            ax.set_yscale("log")
        ax.set_ylabel("held-out perplexity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    left.set_xlabel("packed size (MB)")
    right.set_xlabel("decode tokens/s (colour: MB)")
    fig.suptitle(title or "sparsemerge tune: perplexity vs size vs speed")
    if notes:  # e.g. where sparsity adds to quantization (sparsity_verdict)
        fig.text(0.01, 0.01, "\n".join(notes), fontsize=7, va="bottom", ha="left", family="monospace")
    fig.tight_layout(rect=(0, 0.035 * len(notes), 1, 1))
    path = Path(path)
    fmt = path.suffix.lstrip(".").lower() or "png"
    with atomic_output(path, overwrite=True, is_dir=False) as tmp:
        fig.savefig(tmp, format=fmt, dpi=120)
    plt.close(fig)


def _brief(r: dict[str, Any]) -> str:
    return f"{r['label']} ({r['mb']:.4g} MB, ppl {r['ppl']:.4g}, {r['tok_s']:.4g} tok/s)"


def sparsity_verdict(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per codec: whether pruning adds to that codec, i.e. whether some pruned
    candidate of the codec is on the Pareto frontier (after :func:`~.tune.mark_frontier`), set
    beside the unpruned point of the same codec (the dense model, or quantization only)."""
    lines = []
    good = [r for r in rows if _ok(r)]
    for codec in dict.fromkeys(r.get("codec") for r in good):
        base = next((r for r in good if r.get("codec") == codec and r.get("method") == "none"), None)
        pruned = [r for r in good if r.get("codec") == codec and r.get("method") != "none"]
        if not pruned:
            continue
        name = "no quantization" if codec == "none" else codec.upper()
        beside = f" beside {_brief(base)}" if base else ""
        front = [r for r in pruned if r.get("frontier")]
        if front:
            best = min(front, key=lambda r: r["ppl"])
            lines.append(f"{name}: sparsity adds - {len(front)} pruned candidate(s) on the frontier, e.g. {_brief(best)}{beside}")
        else:
            best = min(pruned, key=lambda r: r["ppl"])
            lines.append(f"{name}: sparsity does not add - every pruned candidate is dominated (best {_brief(best)}){beside}")
    return lines
