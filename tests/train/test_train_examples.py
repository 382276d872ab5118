"""The training recipes shipped in examples/ load, and the best SmolLM2 recipe of BENCHMARKS.md
is the one its benchmark runs."""
import importlib.util
from pathlib import Path

import pytest

from sparsemerge.train.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples").glob("train_*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_every_example_recipe_loads(path):
    recipe = load_recipe(path)
    assert recipe.stages and recipe.model == "smollm2"


def test_the_sparsegpt_srste_example_is_the_benchmarked_recipe():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks/bench_sparse_training_smollm2.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    recipe = load_recipe(ROOT / "examples/train_sparsegpt_srste.yaml")
    assert (recipe.batch_size, recipe.seqlen, recipe.topk) == (4, 256, 64)
    expected = bench.stages("sparsegpt-srste", 200, 1e-4)
    assert len(recipe.stages) == len(expected)
    for stage, want in zip(recipe.stages, expected):
        got = stage.model_dump() if hasattr(stage, "model_dump") else dict(stage)
        for key, value in want.items():
            if key == "prune":
                assert {k: got["prune"][k] for k in value} == value
            else:
                assert got[key] == value, key
