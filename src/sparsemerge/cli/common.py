"""Small helpers shared by command modules: tables and common options."""
from __future__ import annotations

import argparse
from typing import Any, Sequence


def add_overwrite(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: "str | None" = None) -> str:
    """A plain-text table: first column left-aligned, the rest right-aligned (unless ``align``)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) if cells else len(str(h)) for i, h in enumerate(headers)]
    align = align or ("l" + "r" * (len(headers) - 1))

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if a == "l" else v.rjust(w) for v, w, a in zip(values, widths, align)).rstrip()

    out = [line([str(h) for h in headers]), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        if abs(value) >= 100:
            return f"{value:.1f}"
        return f"{value:.4g}" if abs(value) < 1 else f"{value:.2f}"
    return str(value)
