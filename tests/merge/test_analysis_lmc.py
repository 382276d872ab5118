"""Linear mode connectivity: interpolation, the curve on tiny models, the plot and the lmc CLI."""
from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import make_tiny_llama
from sparsemerge.cli.main import main
from sparsemerge.errors import SparsemergeError
from sparsemerge.eval.perplexity import perplexity
from sparsemerge.merge.lmc import LMCConfig, LMCPoint, LMCResult, alpha_grid, interpolate, lmc_curve, plot_lmc


def test_alpha_grid_and_interpolate():
    assert alpha_grid(3) == [0.0, 0.5, 1.0]
    assert alpha_grid(11)[1] == pytest.approx(0.1)
    with pytest.raises(SparsemergeError):
        alpha_grid(1)
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    assert torch.equal(interpolate(a, b, 0.0), a) and torch.equal(interpolate(a, b, 1.0), b)
    torch.testing.assert_close(interpolate(a, b, 0.25), torch.tensor([1.5, 1.0]))
    assert interpolate(a.bfloat16(), b.bfloat16(), 0.5).dtype == torch.bfloat16
    with pytest.raises(SparsemergeError, match="shapes"):
        interpolate(a, b[:1], 0.5)


def test_barrier_from_points():
    r = LMCResult("A", "B", [LMCPoint(0.0, 2.0), LMCPoint(0.5, 3.5), LMCPoint(1.0, 3.0)], 1, 8, "x")
    assert r.linear_baseline(0.5) == pytest.approx(2.5)
    assert r.barrier == pytest.approx(1.0)
    assert r.points[1].perplexity == pytest.approx(math.exp(3.5))


@pytest.fixture
def two_models(two_tiny_llama_dirs):
    return two_tiny_llama_dirs


def test_curve_matches_direct_evaluation(two_models, text_file):
    a_dir, b_dir = two_models
    config = LMCConfig(grid=3, data=str(text_file), seqlen=32, max_windows=4, progress=False)
    windows = torch.randint(0, 384, (4, 32), generator=torch.Generator().manual_seed(0))
    result = lmc_curve(a_dir, b_dir, config, windows=windows)
    assert [p.alpha for p in result.points] == [0.0, 0.5, 1.0]
    ma, mb = make_tiny_llama(seed=0), make_tiny_llama(seed=1)
    assert result.points[0].perplexity == pytest.approx(perplexity(ma, windows, progress=False), rel=1e-5)
    assert result.points[2].perplexity == pytest.approx(perplexity(mb, windows, progress=False), rel=1e-5)
    mid = make_tiny_llama(seed=0)
    sb = mb.state_dict()
    with torch.no_grad():
        for name, p in mid.named_parameters():
            p.copy_(0.5 * p + 0.5 * sb[name])
    assert result.points[1].perplexity == pytest.approx(perplexity(mid, windows, progress=False), rel=1e-5)
    assert result.barrier_at(result.points[0]) == 0.0 and result.barrier_at(result.points[2]) == pytest.approx(0.0, abs=1e-12)
    # default windows: held-out text tokenized with A's tokenizer
    own = lmc_curve(a_dir, b_dir, config)
    assert own.windows == 4 and own.seqlen == 32


def test_mismatched_models_are_rejected(tmp_path, two_models):
    other = tmp_path / "wide"
    make_tiny_llama(intermediate=96).save_pretrained(other)
    windows = torch.zeros(1, 8, dtype=torch.long)
    with pytest.raises(SparsemergeError, match=r"(?s)differ.*mlp\.gate_proj\.weight: .*\(128, 64\) vs .*\(96, 64\)"):
        lmc_curve(two_models[0], other, LMCConfig(grid=2, progress=False), windows=windows)
    with pytest.raises(ValueError):
        LMCConfig(grid=1)
    with pytest.raises(ValueError):
        LMCConfig(grids=3)


def test_plot_written_atomically(tmp_path):
    r = LMCResult("A", "B", [LMCPoint(0.0, 2.0), LMCPoint(0.5, 2.2), LMCPoint(1.0, 2.1)], 1, 8, "x")
    out = plot_lmc(r, tmp_path / "lmc.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SparsemergeError, match="already exists"):
        plot_lmc(r, out)
    with pytest.raises(SparsemergeError, match="format"):
        plot_lmc(r, tmp_path / "lmc.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lmc.png"]  # no temporaries left


def test_lmc_cli(two_models, text_file, tmp_path, capsys):
    a_dir, b_dir = two_models
    plot, data = tmp_path / "curve.svg", tmp_path / "curve.json"
    args = ["lmc", str(a_dir), str(b_dir), "--data", str(text_file), "--grid", "3", "--seqlen", "32",
            "--max-windows", "2", "--out", str(plot), "--json", str(data), "--no-progress"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "barrier" in text and "0.500" in text
    curve = json.loads(data.read_text())
    assert [p["alpha"] for p in curve["points"]] == [0.0, 0.5, 1.0] and curve["windows"] == 2
    assert plot.read_text().lstrip().startswith("<?xml")
    assert main(args) == 2  # outputs exist, no --overwrite: fails before any work
    assert "already exists" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0
    assert main(["lmc", str(a_dir), str(tmp_path / "missing"), "--data", str(text_file), "--no-progress"]) == 2
