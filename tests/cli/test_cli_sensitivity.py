"""End-to-end: `sparsemerge sensitivity` -> `sparsemerge allocate` -> `sparsemerge prune --recipe`."""
import json
from fractions import Fraction

import yaml

from sparsemerge.cli.main import main
from sparsemerge.masks import check_pattern
from sparsemerge.prune.config import PruneConfig


def run(*args) -> int:
    return main([str(a) for a in args])


def test_sensitivity_allocate_prune(tiny_llama_dir, tmp_path, text_file, capsys):
    sens, png = tmp_path / "sens.json", tmp_path / "sens.png"
    common = ["--text", text_file, "--nsamples", "2", "--seqlen", "32", "--no-progress"]
    assert run("sensitivity", tiny_llama_dir, "--criteria", "taylor,fisher,obs", "--patterns", "3:4,2:4,1:4",
               *common, "--json", sens, "--plot", png) == 0
    out = capsys.readouterr().out
    assert "taylor (" in out and "obs (" in out and "model.layers.1.mlp.down_proj" in out
    report = json.loads(sens.read_text())
    assert report["candidates"] == ["3:4", "2:4", "1:4"] and report["criteria"] == ["taylor", "fisher", "obs"]
    assert len(report["layers"]) == 14 and all(set(x["scores"]) == {"taylor", "fisher", "obs"} for x in report["layers"])
    assert png.read_bytes()[:4] == b"\x89PNG"
    # outputs are never replaced without --overwrite (checked before any work)
    assert run("sensitivity", tiny_llama_dir, "--criteria", "taylor", *common, "--json", sens) == 2
    assert "already exists" in capsys.readouterr().err

    recipe, alloc_json = tmp_path / "recipe.yaml", tmp_path / "alloc.json"
    assert run("allocate", sens, "--budget", "sparsity=0.6", "--criterion", "obs", "--method", "magnitude",
               "--recipe-out", recipe, "--json", alloc_json) == 0
    out = capsys.readouterr().out
    assert "sparsity 0.6" in out and "recipe ->" in out
    alloc = json.loads(alloc_json.read_text())
    shares = {"3:4": Fraction(1, 4), "2:4": Fraction(1, 2), "1:4": Fraction(3, 4)}
    numel = {x["name"]: x["shape"][0] * x["shape"][1] for x in report["layers"]}
    zeroed = sum(shares[p] * numel[n] for n, p in alloc["patterns"].items())
    assert zeroed / sum(numel.values()) >= Fraction(3, 5)
    config = PruneConfig(**yaml.safe_load(recipe.read_text())["prune"])  # the recipe validates
    assert config.method == "magnitude"

    pruned = tmp_path / "pruned"
    assert run("prune", tiny_llama_dir, pruned, "--recipe", recipe, "--no-progress") == 0
    record = json.loads((pruned / "sparsemerge_prune.json").read_text())
    applied = {r["name"]: r["pattern"] for r in record["layers"]}
    assert applied == alloc["patterns"]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(pruned)
    modules = dict(model.named_modules())
    for name, pattern in alloc["patterns"].items():
        assert check_pattern(modules[name].weight, pattern).ok
    assert record["overall_sparsity"] >= 0.6 - 1e-6

    assert run("allocate", sens, "--budget", "bytes=1KB") == 2  # unreachable: a clear error
    assert "cannot be met" in capsys.readouterr().err
