"""``sparsemerge demo`` end to end on a tiny model and a text file (the real run uses SmolLM2)."""
from __future__ import annotations

import json
from pathlib import Path


def test_demo_prunes_packs_and_times_decoding(tiny_llama_dir, text_file, tmp_path, capsys):
    from sparsemerge.cli.main import main
    from sparsemerge.kernels.cpu_vnni import cpu_features_missing

    out = tmp_path / "demo"
    code = main(["demo", "--model", str(tiny_llama_dir), "--data", str(text_file), "--methods", "magnitude", "sparsegpt",
                 "--seqlen", "32", "--max-windows", "2", "--nsamples", "2", "--out", str(out), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "decoding, float activations" in printed
    rows = json.loads((out / "results.json").read_text())["rows"]
    # SparseGPT is shown with its default walk and with sequential="block"
    assert [r["name"] for r in rows[:4]] == ["dense", "magnitude", "sparsegpt", "sparsegpt-block"]
    # pruned models are written inside --out, named after the model folder
    assert all(r["folder"].startswith(str(out)) for r in rows[1:])
    assert (out / f"{tiny_llama_dir.name}-sparsegpt-block-2of4" / "config.json").is_file()
    # the best pruned model is recovered by distillation (its zeros kept), then packed
    recovered = rows[4]
    assert recovered["name"].endswith("+recovered") and recovered["perplexity"] > 0
    assert (Path(recovered["folder"]) / "sparsemerge_recover.json").is_file()
    assert main(["check", recovered["folder"], "--pattern", "2:4", "--quiet"]) == 0
    packed = rows[-1]
    assert packed["name"].endswith("+int4") and packed["megabytes"] < packed["dense_megabytes"]
    assert packed["speedup"] > 0 and packed["perplexity"] > 0
    table = (out / "results.md").read_text()
    if not cpu_features_missing():  # the INT8-activation row: its own perplexity and speed
        assert packed["speedup_a8"] > 0 and packed["perplexity_a8"] > 0
        assert "int8-act" in table and "decoding, INT8 activations (VNNI)" in printed
    assert (out / "perplexity.png").stat().st_size > 0
