"""Tables and plots of eval/report.py, checked against hand-written expected text."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from sparsemerge.errors import SparsemergeError
from sparsemerge.eval.report import format_cell, format_table, markdown_table, plot_lmc, plot_perplexity


def test_format_table_aligns_and_formats_floats():
    text = format_table(["model", "x", "ppl"], [("dense", 1, 12.3456), ("sparse 2:4", 1234.5, 0.012344)])
    assert text.splitlines() == [
        "model           x      ppl",
        "----------  -----  -------",
        "dense           1    12.35",
        "sparse 2:4  1,234  0.01234",
    ]


def test_format_table_explicit_alignment_and_empty():
    assert format_table(["a", "b"], [("x", "y")], align="rl").splitlines() == ["a  b", "-  -", "x  y"]
    assert format_table(["name", "v"], []).splitlines() == ["name  v", "----  -"]


@pytest.mark.parametrize("value, text", [(float("nan"), "nan"), (123456.0, "123,456"), (150.04, "150.0"), (2.0, "2.00"),
                                          (0.000123456, "0.0001235"), (-5.5, "-5.50"), ("s", "s"), (7, "7")])
def test_format_cell(value, text):
    assert format_cell(value) == text


def test_markdown_table():
    assert markdown_table(["model", "ppl"], [["dense", 12.34567], ["x", "-"]]) == (
        "| model | ppl |\n|---|---|\n| dense | 12.35 |\n| x | - |\n"
    )


def test_plots_are_written(tmp_path):
    rows = [SimpleNamespace(name="dense", pattern="-", perplexity=10.0), SimpleNamespace(name="m+int4", pattern="2:4", perplexity=12.5)]
    plot_perplexity(tmp_path / "p.png", rows)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    points = [SimpleNamespace(alpha=a, loss=l) for a, l in [(0.0, 2.0), (0.5, 2.5), (1.0, 2.2)]]
    result = SimpleNamespace(points=points, data="bbc", barrier=0.4, model_a="A", model_b="B",
                             linear_baseline=lambda a: 2.0 + 0.2 * a)
    assert plot_lmc(result, tmp_path / "l.svg").read_text().lstrip().startswith("<?xml")
    with pytest.raises(SparsemergeError, match="not supported"):
        plot_lmc(result, tmp_path / "l.txt")
